"""Start-up and shutdown of the real server process: --help, the defaults, one-line start-up
errors, SIGTERM/SIGINT answering what was sent, and data surviving a restart."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from perfdb.config import DEFAULT_ADDRESS, Config, build_parser, config_from_args
from perfdb.server import PerfdbServer
from tests.support import (
    REPO_ROOT,
    Connection,
    ServerProcess,
    Spawn,
    closed_port_url,
    make_config,
    record_request,
    silent_port,
    token_hash,
    userinfo_server,
)

# A start-up failure must be reported this fast, interpreter start included: about 0.6 s on an idle
# machine, so this bound only catches a start that waits on something (a lock, a provider, a drain)
# and leaves room for a loaded CI machine.
STARTUP_FAILURE_SECONDS = 10.0
# An idle server must be gone this soon after the signal: well before the drain timeout these tests
# give it (DRAIN_SECONDS), so an exit that waited for the drain fails, while a loaded machine passes.
IDLE_SHUTDOWN_SECONDS = 20.0
DRAIN_SECONDS = 120
BOT_TOKEN = "lifecycle-bot-token"
BOT_USER_ID = "static:ci-bot"
ERROR_PREFIX = "run_perf_db_server: error: "
SIGNALS = pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])

# -- helpers ------------------------------------------------------------------------------


def write_tokens_file(directory: Path) -> Path:
    path = directory / "tokens.json"
    path.write_bytes(
        orjson.dumps({"tokens": [{"sha256": token_hash(BOT_TOKEN), "user_id": "ci-bot", "name": "CI bot"}]})
    )
    return path


def static_token_args(directory: Path, database: Path | str, loop: str = "auto") -> list[str]:
    return [
        "--address=127.0.0.1:0",
        f"--database={database}",
        f"--tokens-file={write_tokens_file(directory)}",
        f"--userinfo-url={closed_port_url()}",
        f"--loop={loop}",
    ]


def sync_request(port: int, request: dict[str, Any], host: str = "127.0.0.1") -> dict[str, Any]:
    """One request on a fresh blocking socket; for the plain (not async) tests."""
    with socket.create_connection((host, port), timeout=5) as sock, sock.makefile("rb") as replies:
        sock.sendall(orjson.dumps(request) + b"\n")
        line = replies.readline()
    assert line.endswith(b"\n"), line
    reply: dict[str, Any] = orjson.loads(line)
    return reply


def wait_ready(server: ServerProcess) -> int:
    """Wait for the 'listening on' line, then for a ping answer: once the event loop answers,
    the server is past start-up. The port."""
    port = server.wait_listening()
    assert sync_request(port, {"op": "ping", "id": "ready"}) == {"id": "ready", "ok": True}
    return port


def stop(server: ServerProcess, signum: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, str, float]:
    """Signal the server and wait for it: exit code, all of stderr, seconds from signal to exit."""
    signalled = time.monotonic()
    code, stderr = server.stop(signum, timeout)
    return code, stderr, time.monotonic() - signalled


def expect_startup_failure(spawn: Spawn, *args: str, cwd: Path | None = None) -> str:
    """Run a server that must refuse to start; returns its one stderr line."""
    started = time.monotonic()
    server = spawn(*args, cwd=cwd)
    code, stderr = server.wait_exit(timeout=STARTUP_FAILURE_SECONDS + 20)
    elapsed = time.monotonic() - started
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert len(lines[0]) > len(ERROR_PREFIX) + 10, lines[0]
    assert elapsed < STARTUP_FAILURE_SECONDS, f"took {elapsed:.2f}s to report: {lines[0]}"
    return lines[0]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def foreign_address() -> str:
    """A documentation-range IPv4 address that this machine does not have."""
    for host in ("203.0.113.77", "198.51.100.77", "192.0.2.177"):
        with socket.socket() as sock:
            try:
                sock.bind((host, 0))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    return host
    pytest.skip("every candidate foreign address is assigned to this machine")


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        except OSError:
            return None
        host: str = sock.getsockname()[0]
    return None if host.startswith("127.") or host == "0.0.0.0" else host


async def open_raw(port: int) -> socket.socket:
    """A bare non-blocking socket: unlike StreamReader, it hands over every byte that arrived
    before a reset, so a lost reply is the server's doing, not the client library's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def raw_request(sock: socket.socket, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, orjson.dumps(request) + b"\n")
    received = b""
    async with asyncio.timeout(timeout):
        while not received.endswith(b"\n"):
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, "the server closed the connection"
            received += chunk
    reply: dict[str, Any] = orjson.loads(received)
    return reply


async def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str | None]:
    """Everything the server sends until it closes; and what went wrong, if anything did."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    problem: str | None = None
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(sock, 1 << 16):
                chunks.append(chunk)
    except TimeoutError:
        problem = f"the server did not close the connection within {timeout}s"
    except ConnectionError as exc:
        problem = f"the connection failed: {exc!r}"
    return b"".join(chunks), problem


async def all_records(connection: Connection, limit: int = 1000) -> list[dict[str, Any]]:
    """Every stored record, following next_cursor to the end."""
    records: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": limit}
    for _ in range(1000):
        reply = await connection.request("get_all", **query)
        assert reply["ok"] is True, reply
        records.extend(reply["records"])
        if reply["next_cursor"] is None:
            return records
        query["cursor"] = reply["next_cursor"]
    raise AssertionError("get_all kept returning a next_cursor")


# -- --help ---------------------------------------------------------------------------------


def help_commands() -> dict[str, list[str]]:
    console_script = Path(sys.executable).parent / "run_perf_db_server"
    return {
        "script": [sys.executable, str(REPO_ROOT / "run_perf_db_server.py"), "--help"],
        "module": [sys.executable, "-m", "perfdb", "--help"],
        "console_script": [str(console_script), "--help"],
    }


@pytest.mark.parametrize("entry_point", ["script", "module", "console_script"])
def test_help_documents_every_option(spawn: Spawn, entry_point: str, tmp_path: Path) -> None:
    command = help_commands()[entry_point]
    assert Path(command[0]).exists(), command[0]
    # Run from elsewhere, and with no PYTHONPATH added, so the installed package is what answers.
    server = spawn(command=command, cwd=tmp_path, env=os.environ)
    code, stderr = server.wait_exit(timeout=20)
    assert code == 0, stderr
    text = server.stdout.decode()
    options = {option for action in build_parser()._actions for option in action.option_strings}
    assert {"--address", "--database", "--tokens-file", "--userinfo-url", "--shutdown-timeout"} <= options
    missing = sorted(option for option in options if option not in text)
    assert not missing, f"--help does not mention {missing}"
    # The documented defaults are shown.
    assert "localhost:50052" in text
    assert "./perfdb-data" in text
    assert "Traceback" not in stderr


def test_help_states_each_default_once_and_only_where_there_is_one() -> None:
    parser = build_parser()
    text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
    assert "(default: None)" not in text
    assert "(default: True)" not in text and "(default: False)" not in text  # switches take no value
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            assert formatter._expand_help(action).count("(default:") <= 1, action.option_strings
    assert "(default: the --tls-cert file itself" in text
    assert "--max-connections MAX_CONNECTIONS connections served at once" in text
    assert "(default: 1000)" in text


def test_zero_is_accepted_where_it_means_something() -> None:
    config = config_from_args(["--upgrade-pause", "0", "--user-rate", "0"])
    assert (config.upgrade_pause, config.user_rate) == (0.0, 0.0)
    assert config_from_args(["--upgrade-pause", "0.5"]).upgrade_pause == 0.5
    for value in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            config_from_args(["--upgrade-pause", value])
    with pytest.raises(SystemExit):
        config_from_args(["--max-connections", "0"])  # where 0 means nothing it is still refused


def test_the_default_address_is_the_default_host_and_port() -> None:
    config = config_from_args([])
    assert (config.host, config.port) == (Config().host, Config().port)
    assert config.address == DEFAULT_ADDRESS == "localhost:50052"


# -- defaults -------------------------------------------------------------------------------


def test_defaults_listen_on_localhost_50052_and_create_perfdb_data(spawn: Spawn, tmp_path: Path) -> None:
    if not port_is_free(50052):
        pytest.skip("port 50052 is already taken on this machine")
    server = spawn(cwd=tmp_path)
    port = server.wait_listening()
    assert port == 50052
    listening_line = server.listening_line
    assert "listening on 127.0.0.1:50052" in listening_line or "listening on [::1]:50052" in listening_line
    assert sync_request(50052, {"op": "ping", "id": 7}, host="localhost") == {"id": 7, "ok": True}
    database = tmp_path / "perfdb-data"
    assert database.is_dir()
    assert (database / "CURRENT").is_file()  # a LevelDB database, not just an empty directory
    assert (database / "perfdb.lock").is_file()
    other_host = non_loopback_address()
    if other_host is not None:  # "localhost" must not mean every interface
        with pytest.raises(ConnectionRefusedError), socket.create_connection((other_host, 50052), timeout=2):
            pass
    code, stderr, _ = stop(server)
    assert code == 0, stderr


# -- start-up failures --------------------------------------------------------------------


def test_address_in_use_is_one_line(spawn: Spawn, tmp_path: Path) -> None:
    with silent_port() as port:
        line = expect_startup_failure(spawn, f"--address=127.0.0.1:{port}", f"--database={tmp_path / 'db'}")
    assert f"127.0.0.1:{port}" in line
    assert "address already in use" in line


@pytest.mark.parametrize("shape", ["below_a_file", "is_a_file"])
def test_database_path_that_is_a_file_is_one_line_saying_so(spawn: Spawn, tmp_path: Path, shape: str) -> None:
    regular_file = tmp_path / "plain-file"
    regular_file.write_text("not a directory\n")
    database = regular_file / "db" if shape == "below_a_file" else regular_file
    line = expect_startup_failure(spawn, "--address=127.0.0.1:0", f"--database={database}")
    if shape == "is_a_file":
        assert line == f"{ERROR_PREFIX}database path {database} is not a directory"
    else:
        assert line == f"{ERROR_PREFIX}database path {database} cannot be created: {regular_file} is not a directory"
    assert "File exists" not in line
    assert regular_file.read_text() == "not a directory\n"


@pytest.mark.parametrize("spelling", ["same", "relative", "trailing_slash", "symlink", "dot_segments"])
def test_database_in_use_by_another_server_is_one_line(spawn: Spawn, tmp_path: Path, spelling: str) -> None:
    database = tmp_path / "db"
    first = spawn("--address=127.0.0.1:0", f"--database={database}")
    first_port = first.wait_listening()
    cwd: Path | None = None
    if spelling == "same":
        second_name = str(database)
    elif spelling == "relative":
        second_name, cwd = "db", tmp_path
    elif spelling == "trailing_slash":
        second_name = f"{database}/"
    elif spelling == "symlink":
        link = tmp_path / "link-to-db"
        link.symlink_to(database, target_is_directory=True)
        second_name = str(link)
    else:
        second_name = f"{tmp_path}/./db/../db/."
    line = expect_startup_failure(spawn, "--address=127.0.0.1:0", f"--database={second_name}", cwd=cwd)
    assert "already in use by another perfdb process" in line
    assert f"pid {first.pid}" in line
    # The first server is unharmed and still owns its database.
    assert sync_request(first_port, {"op": "ping", "id": 1}) == {"id": 1, "ok": True}
    code, stderr, _ = stop(first)
    assert code == 0, stderr
    # Once the first server is gone, the same spelling opens the database.
    again = spawn("--address=127.0.0.1:0", f"--database={second_name}", cwd=cwd)
    wait_ready(again)
    code, stderr, _ = stop(again)
    assert code == 0, stderr


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost", "hostname:port"),
        (":50052", "hostname:port"),
        ("localhost:http", "must be a number"),
        ("localhost:65536", "0-65535"),
        ("localhost:-1", "0-65535"),
    ],
)
def test_bad_address_is_one_line(spawn: Spawn, tmp_path: Path, address: str, expected: str) -> None:
    line = expect_startup_failure(spawn, f"--address={address}", f"--database={tmp_path / 'db'}")
    assert "--address" in line or "cannot listen" in line
    assert expected in line


def test_address_of_another_machine_is_one_line(spawn: Spawn, tmp_path: Path) -> None:
    host = foreign_address()
    line = expect_startup_failure(spawn, f"--address={host}:50052", f"--database={tmp_path / 'db'}")
    assert f"cannot listen on {host}:50052" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/userinfo", "https"),
        ("http://10.0.0.1/userinfo", "https"),
        ("ftp://127.0.0.1/userinfo", "http(s) URL"),
        ("https://user:secret@example.com/userinfo", "credentials"),
    ],
)
def test_bad_userinfo_url_is_one_line(spawn: Spawn, tmp_path: Path, url: str, expected: str) -> None:
    line = expect_startup_failure(
        spawn, "--address=127.0.0.1:0", f"--database={tmp_path / 'db'}", f"--userinfo-url={url}"
    )
    assert "--userinfo-url" in line
    assert expected in line
    assert "secret" not in line
    assert not (tmp_path / "db").exists()  # refused before touching storage


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"tokens": [', "not valid JSON"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b'["a", "b"]', '"tokens" list'),
        (b'{"tokens": [{"sha256": "abc", "user_id": "bot"}]}', '"sha256"'),
        (b'{"tokens": [{"sha256": "' + b"a" * 64 + b'"}]}', '"user_id"'),
        (b'{"tokens": ["just a string"]}', "must be an object"),
        (None, "cannot read tokens file"),
    ],
    ids=["truncated", "binary", "list", "short_hash", "no_user", "string_entry", "missing"],
)
def test_malformed_tokens_file_is_one_line(spawn: Spawn, tmp_path: Path, content: bytes | None, expected: str) -> None:
    tokens_file = tmp_path / "tokens.json"
    if content is not None:
        tokens_file.write_bytes(content)
    line = expect_startup_failure(
        spawn, "--address=127.0.0.1:0", f"--database={tmp_path / 'db'}", f"--tokens-file={tokens_file}"
    )
    assert str(tokens_file) in line
    assert expected in line


# -- SIGTERM and SIGINT ---------------------------------------------------------------------

CONNECTIONS = 3
REQUESTS_PER_CONNECTION = 1200  # more than the default in-flight cap of 1024
# Makes the request lines long enough that not all of them fit in one read.
PADDING = "x" * 400


@SIGNALS
async def test_signal_answers_every_request_sent_before_it(
    loop_kind: str, signum: signal.Signals, spawn: Spawn, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    database = tmp_path / "db"
    server = spawn(*static_token_args(tmp_path, database, loop=loop_kind))
    port = await asyncio.to_thread(server.wait_listening)
    sockets = [await open_raw(port) for _ in range(CONNECTIONS)]
    try:
        for sock in sockets:  # each connection is accepted before the pipelining starts
            assert await raw_request(sock, {"op": "ping", "id": "hello"}) == {"id": "hello", "ok": True}
        sent: dict[str, str] = {}  # request "id" -> request_id
        batches: list[bytes] = []
        for number in range(CONNECTIONS):
            lines = []
            for index in range(REQUESTS_PER_CONNECTION):
                request_id = f"rq-{number}-{index}"
                envelope_id = f"id-{number}-{index}"
                sent[envelope_id] = request_id
                request = record_request(
                    BOT_TOKEN, test_name="lifecycle", request_id=request_id, id=envelope_id, sys_info=PADDING
                )
                lines.append(orjson.dumps(request) + b"\n")
            batches.append(b"".join(lines))
        # Once sock_sendall returns, the kernel has every byte: the requests are sent.
        async with asyncio.timeout(10):
            await asyncio.gather(
                *(loop.sock_sendall(sock, batch) for sock, batch in zip(sockets, batches, strict=True))
            )
        server.process.send_signal(signum)
        signalled = time.monotonic()

        replies: dict[str, dict[str, Any]] = {}
        repeated: list[str] = []
        problems: list[str] = []
        for number, sock in enumerate(sockets):
            data, problem = await read_until_closed(sock, timeout=15)
            lines_received = data.split(b"\n")
            if lines_received[-1]:
                problems.append(f"connection {number} ended inside a reply line")
            answered = 0
            for line in lines_received[:-1]:
                reply = orjson.loads(line)
                assert reply["id"] in sent, reply
                if reply["id"] in replies:
                    repeated.append(reply["id"])
                replies[reply["id"]] = reply
                answered += 1
            if problem is not None:
                problems.append(f"connection {number}: {problem} after {answered} replies")
            sock.close()  # we are done too: a server that lingers for our close need not wait
        code, stderr = server.wait_exit(timeout=15)
        exit_seconds = time.monotonic() - signalled
    finally:
        for sock in sockets:
            sock.close()

    # Restart on the same database before judging the replies, so both halves are always checked.
    server.restart()
    connection = await Connection.open(await asyncio.to_thread(server.wait_listening))
    try:
        records = await all_records(connection)
        stats = await connection.request("stats")
    finally:
        await connection.close()

    unanswered = [envelope_id for envelope_id in sent if envelope_id not in replies]
    outcomes = Counter("ok" if r["ok"] else r["error"]["code"] for r in replies.values())
    summary = f"{len(sent)} sent, {len(replies)} answered {dict(outcomes)}, {len(unanswered)} unanswered"
    # Everything acknowledged is in the database, once.
    acknowledged = {reply["record_id"]: sent[envelope_id] for envelope_id, reply in replies.items() if reply["ok"]}
    stored = {record["record_id"]: record for record in records}
    assert len(stored) == len(records)
    missing = [record_id for record_id in acknowledged if record_id not in stored]
    assert not missing, f"{len(missing)} acknowledged records are missing after the restart ({summary})"
    for record_id, request_id in acknowledged.items():
        assert stored[record_id]["request_id"] == request_id
        assert stored[record_id]["user_id"] == BOT_USER_ID
    stored_request_ids = Counter(record["request_id"] for record in records)
    assert not [rid for rid, count in stored_request_ids.items() if count > 1], "a request_id was stored twice"
    assert set(stored_request_ids) <= set(sent.values())
    assert stats["records"] == len(records)
    # A stored record was owed an ok reply (shutting_down means nothing was stored).
    unacknowledged = sorted(set(stored_request_ids) - set(acknowledged.values()))
    assert not unacknowledged, (
        f"{len(unacknowledged)} records were stored but their ok reply never arrived, e.g. {unacknowledged[:3]} "
        f"({summary}; {problems})"
    )
    # Every request sent before the signal got exactly one reply: ok, or shutting_down.
    assert not repeated, f"answered twice: {repeated[:5]}"
    assert set(outcomes) <= {"ok", "shutting_down"}, summary
    assert not unanswered, f"{summary}; first unanswered {unanswered[:3]}; {problems}"
    assert not problems, problems
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert exit_seconds < 10, f"took {exit_seconds:.1f}s to exit"
    code, stderr, _ = stop(server)
    assert code == 0, stderr


@SIGNALS
async def test_signal_closes_idle_connection_and_exits_promptly(
    loop_kind: str, signum: signal.Signals, spawn: Spawn, tmp_path: Path
) -> None:
    server = spawn(*static_token_args(tmp_path, tmp_path / "db", loop=loop_kind), f"--shutdown-timeout={DRAIN_SECONDS}")
    port = await asyncio.to_thread(server.wait_listening)
    idle = await Connection.open(port)
    try:
        assert await idle.request("ping", id=1) == {"id": 1, "ok": True}
        server.process.send_signal(signum)
        signalled = time.monotonic()
        assert await idle.at_eof(timeout=IDLE_SHUTDOWN_SECONDS), "the idle connection was not closed"
        code, stderr = server.wait_exit(timeout=IDLE_SHUTDOWN_SECONDS + 10)
        elapsed = time.monotonic() - signalled
    finally:
        await idle.close()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "shut down cleanly" in stderr
    assert elapsed < IDLE_SHUTDOWN_SECONDS, f"took {elapsed:.1f}s to exit with one idle connection"
    # New connections are refused once the server is gone.
    with pytest.raises(ConnectionRefusedError):
        await Connection.open(port)


async def test_clean_restart_preserves_records_and_stats(loop_kind: str, spawn: Spawn, tmp_path: Path) -> None:
    database = tmp_path / "db"
    server = spawn(*static_token_args(tmp_path, database, loop=loop_kind))
    connection = await Connection.open(await asyncio.to_thread(server.wait_listening))
    try:
        for index in range(25):
            await connection.send(
                record_request(BOT_TOKEN, test_name=f"test-{index % 3}", tag=f"t{index}", request_id=f"keep-{index}")
            )
        acks = await connection.replies(25)
        assert all(ack["ok"] for ack in acks), acks
        before = await all_records(connection, limit=7)
        stats_before = await connection.request("stats")
    finally:
        await connection.close()
    assert [record["record_id"] for record in before] == [ack["record_id"] for ack in acks]
    assert (stats_before["records"], stats_before["users"]) == (25, 1)
    code, stderr, _ = stop(server)
    assert code == 0, stderr

    server.restart()
    connection = await Connection.open(await asyncio.to_thread(server.wait_listening))
    try:
        stats_after = await connection.request("stats")
        after = await all_records(connection, limit=7)
        # The idempotency keys survive too: a retry is recognised, not stored again.
        await connection.send(record_request(BOT_TOKEN, test_name="x", request_id="keep-3"))
        retry = await connection.reply()
        await connection.send(record_request(BOT_TOKEN, test_name="x", request_id="new-1"))
        fresh = await connection.reply()
        stats_final = await connection.request("stats")
    finally:
        await connection.close()
    assert (stats_after["records"], stats_after["users"]) == (25, 1)
    assert after == before
    assert retry["ok"] is True and retry["duplicate"] is True
    assert retry["record_id"] == acks[3]["record_id"]
    assert fresh["ok"] is True and fresh["duplicate"] is False
    assert fresh["record_id"] > before[-1]["record_id"]  # ids keep increasing across restarts
    assert (stats_final["records"], stats_final["users"]) == (26, 1)
    code, stderr, _ = stop(server)
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr


def test_sigterm_with_no_connections_exits_and_releases_the_lock(spawn: Spawn, tmp_path: Path) -> None:
    database = tmp_path / "db"
    server = spawn("--address=127.0.0.1:0", f"--database={database}", f"--shutdown-timeout={DRAIN_SECONDS}")
    wait_ready(server)
    assert (database / "perfdb.lock").read_text() == str(server.pid)
    code, stderr, elapsed = stop(server)
    assert code == 0, stderr
    assert "shut down cleanly" in stderr
    assert elapsed < IDLE_SHUTDOWN_SECONDS
    # The lock is free again: a second server opens the database at once.
    server.restart()
    wait_ready(server)
    code, stderr, _ = stop(server)
    assert code == 0, stderr


RACE_ATTEMPTS = 4


@SIGNALS
@pytest.mark.parametrize("server_loop", ["asyncio", "uvloop"])
def test_signal_right_after_listening_line_shuts_down_cleanly(
    spawn: Spawn, tmp_path: Path, signum: signal.Signals, server_loop: str
) -> None:
    """A supervisor may stop the server the moment it says it is listening; that must be a
    clean shutdown too, not death by the default signal action or a KeyboardInterrupt."""
    failures: list[str] = []
    for attempt in range(RACE_ATTEMPTS):
        server = spawn("--address=127.0.0.1:0", f"--database={tmp_path / f'db{attempt}'}", f"--loop={server_loop}")
        server.wait_listening()
        code, stderr, _ = stop(server, signum)
        if code != 0 or "Traceback" in stderr or "shut down cleanly" not in stderr:
            last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            failures.append(f"attempt {attempt}: exit {code}, last stderr line {last_line!r}")
    assert not failures, f"{len(failures)}/{RACE_ATTEMPTS} starts mishandled {signum.name}: {failures}"


async def test_shutdown_answers_connections_still_waiting_to_be_accepted(tmp_path: Path) -> None:
    """Connections the kernel completed before the signal, but the loop had not yet accepted, get
    their replies; closing the listener without taking them up would reset them."""
    async with userinfo_server() as provider:
        server = PerfdbServer(make_config(tmp_path / "db", provider.url))
        await server.start()
        try:
            # Blocking calls on the loop on purpose: the loop gets no chance to accept these, so
            # they are still in the kernel's accept queue when shutdown starts.
            waiting = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(20)]
            for number, connection in enumerate(waiting):
                connection.sendall(orjson.dumps({"op": "ping", "id": number}) + b"\n")
        finally:
            await server.shutdown()

    def replies(connection: socket.socket) -> bytes:
        with connection, connection.makefile("rb") as stream:
            return stream.read()  # up to the server's end-of-stream; a reset raises

    answers = await asyncio.gather(*(asyncio.to_thread(replies, connection) for connection in waiting))
    assert [orjson.loads(answer) for answer in answers] == [{"id": number, "ok": True} for number in range(20)]
