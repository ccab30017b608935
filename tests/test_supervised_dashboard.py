"""--web-address: the server runs the dashboard as a supervised child process. The whole thing
as an operator starts it (the script, real sockets, real HTTP), plus the supervisor's restart
backoff and stop bound on throwaway children."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import re
import secrets
import select
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from perfdb.config import ConfigError, config_from_args
from perfdb.web.supervisor import DashboardSupervisor, dashboard_command
from tests.support import ServerProcess, Spawn, silent_port, token_hash

ERROR_PREFIX = "run_perf_db_server: error: "
DEADLINE = 30.0  # generous: the machine may be loaded
BOT_TOKEN = "dashboard-bot-" + secrets.token_hex(8)
SUPERVISOR_LINE = re.compile(r"dashboard \(pid (\d+)\) starting on http://([^/]+)/")
CHILD_LISTENING_LINE = re.compile(r"perfdb-web listening on http://([^/]+)/")


def start_with_dashboard(spawn: Spawn, tmp_path: Path, *extra: str) -> ServerProcess:
    """run_perf_db_server.py as an operator starts it, with a static token for the CI bot; its
    stderr carries the dashboard's log too, as the dashboard inherits it."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_bytes(
        orjson.dumps({"tokens": [{"sha256": token_hash(BOT_TOKEN), "user_id": "ci-bot", "name": "CI bot"}]})
    )
    return spawn(
        "--address=127.0.0.1:0",
        f"--database={tmp_path / 'db'}",
        f"--tokens-file={tokens_file}",
        "--userinfo-url=none",
        *extra,
    )


def record(port: int, test_name: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock, sock.makefile("rb") as replies:
        request = {"op": "record", "access_token": BOT_TOKEN, "test_name": test_name, "metrics": {"qps": 4321.0}}
        sock.sendall(orjson.dumps(request) + b"\n")
        reply: dict[str, Any] = orjson.loads(replies.readline())
    assert reply["ok"] is True, reply
    record_id: str = reply["record_id"]
    return record_id


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        return response.status, response.read().decode()


def process_gone(pid: int) -> bool:
    """True when no process has this pid (a zombie counts as still there: nobody reaped it)."""
    return not Path(f"/proc/{pid}").exists()


def test_server_runs_restarts_and_stops_its_dashboard(spawn: Spawn, tmp_path: Path) -> None:
    server = start_with_dashboard(spawn, tmp_path, "--web-address=127.0.0.1:0")
    server_port = server.wait_listening(timeout=DEADLINE)
    assert re.search(r"perfdb \S+ listening on 127\.0\.0\.1:", server.listening_line), server.listening_line
    record_id = record(server_port, "supervised_unary")

    # The server's log says where the dashboard listens, and the dashboard's own log agrees.
    started = server.wait_for_log(SUPERVISOR_LINE, timeout=DEADLINE)
    first_pid, web_address = int(started.match.group(1)), started.match.group(2)
    assert web_address.startswith("127.0.0.1:") and not web_address.endswith(":0"), web_address
    ready = server.wait_for_log(CHILD_LISTENING_LINE, after=started.index, timeout=DEADLINE)
    assert ready.match.group(1) == web_address
    status, body = fetch(f"http://{web_address}/api/results")
    assert status == 200
    results = json.loads(body)["results"]
    assert [(r["record_id"], r["test_name"], r["user_id"]) for r in results] == [
        (record_id, "supervised_unary", "static:ci-bot")
    ]
    status, page = fetch(f"http://{web_address}/")
    assert status == 200 and "supervised_unary" in page

    # A dashboard that dies is started again, on the same address.
    os.kill(first_pid, signal.SIGKILL)
    died = server.wait_for_log(f"dashboard (pid {first_pid}) was killed by SIGKILL; restarting", timeout=DEADLINE)
    restarted = server.wait_for_log(SUPERVISOR_LINE, after=died.index, timeout=DEADLINE)
    second_pid = int(restarted.match.group(1))
    assert second_pid != first_pid and restarted.match.group(2) == web_address
    server.wait_for_log(CHILD_LISTENING_LINE, after=restarted.index, timeout=DEADLINE)
    assert process_gone(first_pid)  # reaped by the server
    second_record = record(server_port, "supervised_streaming")
    status, body = fetch(f"http://{web_address}/api/results")
    assert status == 200
    assert {r["record_id"] for r in json.loads(body)["results"]} == {record_id, second_record}

    # SIGTERM to the server stops both; no dashboard is left behind.
    code, text = server.stop(signal.SIGTERM, timeout=DEADLINE)
    assert code == 0, text
    assert process_gone(second_pid), f"dashboard pid {second_pid} outlived the server"
    web_host, web_port = web_address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((web_host, int(web_port)), timeout=DEADLINE).close()
    assert f"dashboard (pid {second_pid}) stopped" in text
    assert "Traceback" not in text, text
    assert ready.index < restarted.index


def test_a_server_killed_outright_leaves_no_dashboard_behind(spawn: Spawn, tmp_path: Path) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("os.pidfd_open (Linux 5.3+) is needed to wait for a process that is not our child")
    server = start_with_dashboard(spawn, tmp_path, "--web-address=127.0.0.1:0")
    started = server.wait_for_log(SUPERVISOR_LINE, timeout=DEADLINE)
    pid, web_address = int(started.match.group(1)), started.match.group(2)
    server.wait_for_log(CHILD_LISTENING_LINE, after=started.index, timeout=DEADLINE)
    pidfd = os.pidfd_open(pid)
    try:
        server.kill()  # SIGKILL: the server gets no chance to stop its child
        readable, _, _ = select.select([pidfd], [], [], DEADLINE)  # readable once the process has exited
        if not readable:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # no orphan of the test either
        assert readable, f"dashboard pid {pid} outlived the killed server:\n{server.stderr}"
    finally:
        os.close(pidfd)
    # The dashboard held the log pipe open until it exited: the log is whole now.
    code, text = server.wait_exit(timeout=DEADLINE)
    assert code == -signal.SIGKILL
    web_host, web_port = web_address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((web_host, int(web_port)), timeout=DEADLINE).close()
    assert "Traceback" not in text, text


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, as an operator makes one with openssl."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "self-signed.pem", directory / "self-signed.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def certificate_issued_by_a_ca(directory: Path) -> tuple[Path, Path, Path]:
    """(chain, key, CA): the CA is not in the chain, so the dashboard needs --web-ca-file."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = directory / "server.pem", directory / "server.key", directory / "ca.pem"
    for index, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert_file), append=index > 0)
    issued.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, ca_file


@pytest.mark.parametrize("certificate", ["self_signed", "issued_by_a_ca"])
def test_dashboard_reads_a_tls_server_that_requires_a_read_key(spawn: Spawn, tmp_path: Path, certificate: str) -> None:
    read_key_file = tmp_path / "read.key"
    read_key_file.write_text(secrets.token_urlsafe(24) + "\n")
    if certificate == "self_signed":
        cert_file, key_file = self_signed_certificate(tmp_path)
        ca_option = []  # the certificate file is its own CA
    else:
        cert_file, key_file, ca_file = certificate_issued_by_a_ca(tmp_path)
        ca_option = [f"--web-ca-file={ca_file}"]
    server = start_with_dashboard(
        spawn,
        tmp_path,
        "--web-address=127.0.0.1:0",
        f"--tls-cert={cert_file}",
        f"--tls-key={key_file}",
        f"--read-key-file={read_key_file}",
        *ca_option,
    )
    started = server.wait_for_log(SUPERVISOR_LINE, timeout=DEADLINE)
    web_address = started.match.group(2)
    server.wait_for_log(CHILD_LISTENING_LINE, after=started.index, timeout=DEADLINE)
    # A read: it needs both the TLS connection and the read key to succeed.
    status, body = fetch(f"http://{web_address}/api/results")
    assert status == 200, body
    assert json.loads(body)["results"] == []
    code, text = server.stop(signal.SIGTERM, timeout=DEADLINE)
    assert code == 0, text
    assert "Traceback" not in text, text


def test_web_address_in_use_fails_start_up_in_one_line(spawn: Spawn, tmp_path: Path) -> None:
    with silent_port() as port:
        server = start_with_dashboard(spawn, tmp_path, f"--web-address=127.0.0.1:{port}")
        code, text = server.wait_exit(timeout=DEADLINE)
    assert code == 1, text
    lines = text.splitlines()
    assert lines == [f"{ERROR_PREFIX}cannot listen on --web-address 127.0.0.1:{port}: address already in use"]
    assert not (tmp_path / "db").exists()  # refused before the database was touched


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--web-address=8080"], "--web-address must be hostname:port"),
        (["--web-address=localhost:http"], "--web-address port must be a number"),
        (["--address=127.0.0.1:50060", "--web-address=127.0.0.1:50060"], "--web-address must differ from --address"),
        (["--web-ca-file=ca.pem"], "--web-ca-file needs --tls-cert"),
    ],
)
def test_bad_dashboard_settings_are_refused(arguments: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_from_args(arguments)


def test_dashboard_command_passes_on_the_server_address_read_key_and_tls(tmp_path: Path) -> None:
    config = config_from_args(
        [
            "--address=0.0.0.0:0",
            "--web-address=localhost:8080",
            "--read-key-file=read.key",
            "--tls-cert=server.pem",
            "--tls-key=server.key",
            "--log-level=warning",
            "--log-format=json",
        ]
    )
    command = dashboard_command(config, 50099, "localhost:8080")
    assert command[:3] == [sys.executable, "-m", "perfdb.web"]
    options = command[3:]
    # A wildcard listener is reached on loopback; a named host by its name (so the certificate matches).
    assert options == [
        "--server",
        "127.0.0.1:50099",
        "--listen",
        "localhost:8080",
        "--log-level",
        "warning",
        "--log-format",
        "json",
        "--read-key-file",
        "read.key",
        "--tls",
        "--ca-file",
        "server.pem",
    ]
    named = config_from_args(
        [
            "--address=perf.example.com:50052",
            "--web-address=[::1]:0",
            "--web-ca-file=ca.pem",
            "--tls-cert=server.pem",
            "--tls-key=server.key",
        ]
    )
    options = dashboard_command(named, 50052, "[::1]:40000")[3:]
    assert options[:4] == ["--server", "perf.example.com:50052", "--listen", "[::1]:40000"]
    assert options[-3:] == ["--tls", "--ca-file", "ca.pem"]
    plain = dashboard_command(config_from_args(["--address=[::]:7", "--web-address=localhost:0"]), 7, "x:1")
    assert plain[3:] == ["--server", "[::1]:7", "--listen", "x:1", "--log-level", "info", "--log-format", "text"]


# -- the supervisor on throwaway children -------------------------------------------------------


@contextlib.asynccontextmanager
async def connections_from_children() -> AsyncIterator[tuple[int, asyncio.Queue[asyncio.StreamReader]]]:
    """A loopback listener the children connect to, so the test knows when each one is up."""
    arrived: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()
    writers: list[asyncio.StreamWriter] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await arrived.put(reader)

    listener = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], arrived
    finally:
        for writer in writers:
            writer.close()
        listener.close()
        await listener.wait_closed()


def child_command(port: int, then: str) -> list[str]:
    """A child that connects to the test's listener, then does `then`."""
    return [
        sys.executable,
        "-I",
        "-c",
        f"import signal, socket, sys, time\nsock = socket.create_connection(('127.0.0.1', {port}))\n{then}",
    ]


async def test_a_child_that_keeps_dying_is_restarted_with_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="perfdb.dashboard")
    async with connections_from_children() as (port, arrived):
        supervisor = DashboardSupervisor(child_command(port, "sys.exit(3)"), "127.0.0.1:1", stop_timeout=5.0)
        supervisor.start()
        try:
            for _ in range(3):
                await asyncio.wait_for(arrived.get(), DEADLINE)
        finally:
            await supervisor.stop()
    restarts = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
    delays = [float(message.rsplit(" in ", 1)[1].split()[0]) for message in restarts]
    assert delays[:2] == [0.5, 1.0], restarts
    assert all("exited with code 3" in message for message in restarts), restarts


async def test_stop_kills_a_child_that_ignores_sigterm_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="perfdb.dashboard")
    ignore_sigterm = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    async with connections_from_children() as (port, arrived):
        command = child_command(port, "sock.sendall(b'ignoring\\n')\ntime.sleep(120)")
        command[-1] = command[-1].replace("sock = ", ignore_sigterm + "sock = ")
        supervisor = DashboardSupervisor(command, "127.0.0.1:1", stop_timeout=0.5)
        supervisor.start()
        child = await asyncio.wait_for(arrived.get(), DEADLINE)
        assert await asyncio.wait_for(child.readline(), DEADLINE) == b"ignoring\n"  # SIGTERM is ignored now
        pid = supervisor.pid
        assert pid is not None
        await asyncio.wait_for(supervisor.stop(), DEADLINE)
        assert await asyncio.wait_for(child.read(), DEADLINE) == b""  # its socket closed: it is dead
    assert supervisor.pid is None
    assert process_gone(pid)
    messages = [r.getMessage() for r in caplog.records]
    assert f"dashboard (pid {pid}) still running after SIGTERM; killing it" in messages
    assert not any("restarting" in message for message in messages), messages


async def test_stop_during_a_restart_delay_starts_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="perfdb.dashboard")
    async with connections_from_children() as (port, arrived):
        supervisor = DashboardSupervisor(child_command(port, "sys.exit(1)"), "127.0.0.1:1", stop_timeout=5.0)
        supervisor.start()
        child = await asyncio.wait_for(arrived.get(), DEADLINE)
        assert await asyncio.wait_for(child.read(), DEADLINE) == b""  # it exited
        await asyncio.wait_for(supervisor.stop(), DEADLINE)
        assert arrived.empty()
    assert supervisor.pid is None
    assert sum("starting on" in r.getMessage() for r in caplog.records) == 1
