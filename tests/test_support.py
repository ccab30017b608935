"""The test helpers themselves, where the suite does not already show them working: a server
process that cannot start, one killed and restarted on its database, the dashboard as a
process, waiting for log lines in order (a grandchild's included), and the loopback ports."""

from __future__ import annotations

import re
import signal
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import (
    DASHBOARD,
    ServerStartError,
    Spawn,
    closed_port,
    closed_port_url,
    record_request,
    silent_port,
    token_hash,
)

BOT_TOKEN = "support-bot-token-0123456789"


def blocking_request(port: int, request: dict[str, Any]) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as replies:
        sock.sendall(orjson.dumps(request) + b"\n")
        reply: dict[str, Any] = orjson.loads(replies.readline())
    return reply


def test_a_server_that_exits_before_listening_raises_server_start_error(spawn: Spawn, tmp_path: Path) -> None:
    missing = tmp_path / "missing-tokens.json"
    server = spawn("--address=127.0.0.1:0", f"--database={tmp_path / 'db'}", f"--tokens-file={missing}")
    with pytest.raises(ServerStartError) as refused:
        server.wait_listening()
    assert "exited with 1 before listening" in str(refused.value)
    assert str(missing) in str(refused.value)  # the server's own error line is in the message
    assert server.process.returncode == 1


def test_a_killed_server_restarts_on_the_same_database(spawn: Spawn, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_bytes(orjson.dumps({"tokens": [{"sha256": token_hash(BOT_TOKEN), "user_id": "bot"}]}))
    server = spawn(
        "--address=127.0.0.1:0",
        f"--database={tmp_path / 'db'}",
        f"--tokens-file={tokens_file}",
        f"--userinfo-url={closed_port_url()}",
    )
    first_port = server.wait_listening()
    first_pid = server.pid
    assert blocking_request(first_port, record_request(BOT_TOKEN))["ok"] is True
    assert server.kill() == -signal.SIGKILL
    server.restart()
    port = server.wait_listening()
    assert server.pid != first_pid
    assert blocking_request(port, {"op": "stats"})["records"] == 1
    code, stderr = server.stop()
    assert code == 0, stderr
    assert "shut down cleanly" in stderr and " listening on " in stderr


def test_the_dashboard_runs_as_a_process(spawn: Spawn) -> None:
    perfdb_address = f"127.0.0.1:{closed_port()}"
    dashboard = spawn("--server", perfdb_address, "--listen", "127.0.0.1:0", command=DASHBOARD)
    port = dashboard.wait_listening()
    assert dashboard.listening_on == f"http://127.0.0.1:{port}/"
    with pytest.raises(urllib.error.HTTPError) as unavailable:
        urllib.request.urlopen(f"{dashboard.listening_on}api/health", timeout=10)
    assert unavailable.value.code == 503  # perfdb is down, and the dashboard says so
    unavailable.value.close()
    code, stderr = dashboard.stop()
    assert code == 0, stderr
    assert perfdb_address in stderr


# A "server" that logs a line, starts a child that logs its pid on the inherited stderr, then
# logs its first line again: as run_perf_db_server.py does with its dashboard under --web-address.
PARENT_AND_CHILD_LOGGING = """
import subprocess, sys
print("step one", file=sys.stderr, flush=True)
subprocess.run([sys.executable, "-c", "import os, sys; print(f'child {os.getpid()} step two', file=sys.stderr)"])
print("step one", file=sys.stderr, flush=True)
"""


def test_wait_for_log_reads_a_childs_lines_too_and_waits_past_a_line_found(spawn: Spawn) -> None:
    process = spawn("-c", PARENT_AND_CHILD_LOGGING, command=(sys.executable,))
    first = process.wait_for_log("step one")
    child = process.wait_for_log(re.compile(r"child (\d+) step two"), after=first.index)
    again = process.wait_for_log("step one", after=first.index + 1)
    assert first.index < child.index < again.index
    assert child.text == f"child {child.match.group(1)} step two\n"
    assert int(child.match.group(1)) != process.pid
    code, stderr = process.wait_exit()
    assert code == 0, stderr
    with pytest.raises(AssertionError, match="no 'step three' in the server's log"):
        process.wait_for_log("step three")


def test_closed_port_refuses_connections() -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port()), timeout=10)
    assert closed_port_url() == f"http://127.0.0.1:{closed_port()}/userinfo"


def test_silent_port_accepts_and_never_answers() -> None:
    with silent_port() as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b'{"op":"ping"}\n')
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(1)
