"""Real things the tests run against: a perfdb server in-process or as a child process (the
dashboard too), a userinfo (OIDC) server on loopback, a minimal NDJSON client over a real
socket, and loopback ports that are free or that nothing listens on."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from perfdb.config import Config
from perfdb.regression.series import Summary
from perfdb.regression.verdicts import VerdictBatch, VerdictShapes
from perfdb.server import PerfdbServer, build_store
from perfdb.storage import ResultStore

REPO_ROOT = Path(__file__).resolve().parent.parent
GRPC_DATA = REPO_ROOT.parent / "shared" / "data" / "grpc"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GRPC_RESULT_FILES = (
    "grpc_scenario_result.json",
    "cheri-benchplot_summary_async_streaming_insecure_512b.1.json",
    "cheri-benchplot_summary_async_streaming_secure_8b_30s.7.json",
)


def grpc_result(name: str) -> dict[str, Any]:
    """A real gRPC ScenarioResult file, from tests/fixtures (copied from the shared data)."""
    result: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return result


# -- the identity provider --------------------------------------------------------------


@dataclasses.dataclass
class UserinfoAnswer:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0


class UserinfoServer:
    """An OIDC userinfo endpoint on loopback. Tokens "user-<name>" resolve to sub <name> by
    default; `answers` overrides the answer for a token."""

    def __init__(self) -> None:
        self.answers: dict[str, UserinfoAnswer] = {}
        self.calls: list[str] = []  # tokens seen, in order
        self.urls_seen: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def profile_for(self, token: str) -> dict[str, Any] | None:
        if token.startswith("user-"):
            name = token[len("user-") :]
            return {"sub": name, "name": f"User {name}", "email": f"{name}@example.com", "picture": "https://p/x.png"}
        return None

    async def _userinfo(self, request: web.Request) -> web.Response:
        self.urls_seen.append(str(request.rel_url))
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        self.calls.append(token)
        answer = self.answers.get(token)
        if answer is not None:
            if answer.delay:
                await asyncio.sleep(answer.delay)
            return web.Response(status=answer.status, body=answer.body, content_type="application/json")
        profile = self.profile_for(token)
        if profile is None:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response(profile)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/userinfo", self._userinfo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/userinfo"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def userinfo_server() -> AsyncIterator[UserinfoServer]:
    server = UserinfoServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


# -- perfdb in-process ----------------------------------------------------------------------


def make_config(database: Path, userinfo_url: str, **overrides: Any) -> Config:
    return dataclasses.replace(
        Config(host="127.0.0.1", port=0, database=database, userinfo_url=userinfo_url), **overrides
    )


@contextlib.asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[PerfdbServer]:
    server = PerfdbServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


@contextlib.asynccontextmanager
async def opened_store(database: Path, **settings: Any) -> AsyncIterator[ResultStore]:
    """A ResultStore on `database` without a server (commits not synced unless `settings` say),
    opened and closed off the event loop."""
    store = build_store(Config(database=database, **{"sync": False, **settings}))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, store.open, loop)
    try:
        yield store
    finally:
        await loop.run_in_executor(None, store.close)


@contextlib.asynccontextmanager
async def perfdb_with_provider(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[PerfdbServer, UserinfoServer]]:
    """A userinfo server plus a perfdb server that resolves tokens through it."""
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url, **overrides)
        async with running_server(config) as server:
            yield server, provider


# -- the client ---------------------------------------------------------------------------


class Connection:
    """A raw NDJSON connection: send lines, read reply lines, nothing clever."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=64 * 1024 * 1024)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, *requests: dict[str, Any]) -> None:
        await self.send_raw(b"".join(orjson.dumps(r) + b"\n" for r in requests))

    async def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("server closed the connection")
        assert line.endswith(b"\n"), line[:200]
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    async def replies(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        return [await self.reply(timeout) for _ in range(count)]

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        await self.send({"op": op, **fields})
        return await self.reply()

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (reads what is left first)."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connect(server: PerfdbServer) -> AsyncIterator[Connection]:
    connection = await Connection.open(server.port)
    try:
        yield connection
    finally:
        await connection.close()


def record_request(token: str = "user-alice", test_name: str = "unary", **fields: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "op": "record",
        "access_token": token,
        "test_name": test_name,
        "metrics": {"qps": 1000.0, "perc_lat_50": 120.5},
    }
    request.update(fields)
    return request


def error_code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    code: str = reply["error"]["code"]
    return code


async def page_through(connection: Connection, op: str, **query: Any) -> list[dict[str, Any]]:
    """Follow next_cursor to the end; returns every page."""
    pages = []
    cursor = None
    for _ in range(10_000):
        request = dict(query, cursor=cursor) if cursor else dict(query)
        reply = await connection.request(op, **request)
        assert reply["ok"], reply
        pages.append(reply)
        cursor = reply["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("paging did not end")


async def send_burst(connection: Connection, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pipeline every request while reading the replies, so neither side's buffers fill up."""
    sending = asyncio.ensure_future(connection.send(*requests))
    replies = await connection.replies(len(requests), timeout=30.0)
    await sending
    return replies


def all_records_pages(pages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for page in pages for record in page["records"]]


# -- perfdb as a process ------------------------------------------------------------------


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# The start of a server, interpreter included, takes well under a second; these bounds are for
# a machine loaded by other work.
STARTUP_SECONDS = 20.0
EXIT_SECONDS = 20.0
PERFDB_SERVER = (sys.executable, str(REPO_ROOT / "run_perf_db_server.py"))
DASHBOARD = (sys.executable, "-m", "perfdb.web")
LISTENING_LINE = re.compile(r" listening on (\S+)")  # perfdb's and the dashboard's: host:port, or a URL


class ServerStartError(AssertionError):
    """The server exited, or did not say it was listening, within the bound."""


@dataclasses.dataclass(frozen=True)
class LogLine:
    """A stderr line a wait found: its index (to wait for what the server logs after it) and the match."""

    index: int
    match: re.Match[str]

    @property
    def text(self) -> str:
        return self.match.string


class ServerProcess:
    """A server program in a child process, started as an operator would start it:
    run_perf_db_server.py by default, or the dashboard (`command=DASHBOARD`).

    Threads read its stdout and stderr for the whole of its life, so that a server logging at
    debug never stalls on a full pipe and the whole log can be searched afterwards. Processes the
    server starts (the dashboard under --web-address) inherit both pipes, so their log is read
    too, and the pipes end only once the last of them exits. `restart()`
    starts the same command again (so on the same database and address) in the same object.
    As a context manager it makes sure no process outlives the block."""

    def __init__(
        self,
        *args: str,
        command: Sequence[str] = PERFDB_SERVER,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = (*command, *args)
        self.cwd = cwd
        # The default runs this checkout's perfdb; a test of the bare script passes its own.
        self.env = dict(env) if env is not None else dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self._start()

    def _start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env=self.env,
        )
        self._stderr_lines: list[bytes] = []
        self._stdout = bytearray()
        self._stderr_ended = False
        self._changed = threading.Condition()
        self.listening_line = ""
        self.listening_on = ""  # what the listening line names: host:port, or the dashboard's URL
        self.port = 0
        self._readers = [
            threading.Thread(target=self._read_stderr, name="server-stderr", daemon=True),
            threading.Thread(target=self._read_stdout, name="server-stdout", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        for raw in iter(stream.readline, b""):
            with self._changed:
                self._stderr_lines.append(raw)
                self._changed.notify_all()
        # Closed here, at its end: closing it from another thread would block while this one
        # reads, for as long as a process the server started keeps the pipe open.
        stream.close()
        with self._changed:
            self._stderr_ended = True
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        self._stdout += stream.read()
        stream.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr_bytes(self) -> bytes:
        """Everything the server has written to stderr so far (all of it, once it has exited)."""
        with self._changed:
            return b"".join(self._stderr_lines)

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")

    @property
    def stdout(self) -> bytes:
        """What the server wrote to stdout, once it has exited."""
        return bytes(self._stdout)

    def _wait_for_line(self, pattern: re.Pattern[str], after: int, timeout: float) -> LogLine | None:
        """The first stderr line from index `after` on that `pattern` matches; None if stderr
        ends or `timeout` passes first. Each line is searched once, however long the wait."""
        found: LogLine | None = None
        searched = after

        def search() -> bool:
            nonlocal found, searched
            while searched < len(self._stderr_lines):
                match = pattern.search(self._stderr_lines[searched].decode(errors="replace"))
                if match is not None:
                    found = LogLine(searched, match)
                    return True
                searched += 1
            return self._stderr_ended

        with self._changed:
            self._changed.wait_for(search, timeout)
        return found

    def wait_listening(self, timeout: float = STARTUP_SECONDS) -> int:
        """The port from the 'listening on' log line; ServerStartError (the server killed) if
        the line does not come within `timeout`, or the server exits first."""
        line = self._wait_for_line(LISTENING_LINE, 0, timeout)
        if line is None:
            if self._stderr_ended:
                code = self._reap(EXIT_SECONDS)
                raise ServerStartError(f"the server exited with {code} before listening:\n{self.stderr}")
            self.kill()
            raise ServerStartError(f"no 'listening on' line within {timeout:g}s:\n{self.stderr}")
        self.listening_line = line.text
        self.listening_on = line.match.group(1)
        self.port = int(self.listening_on.rstrip("/").rsplit(":", 1)[1])
        return self.port

    def wait_for_log(
        self, pattern: str | re.Pattern[str], *, after: int = 0, timeout: float = STARTUP_SECONDS
    ) -> LogLine:
        """The first stderr line from index `after` on that holds `pattern` (text, or a regular
        expression searched for); fails the test if the log ends or stays silent about it for
        `timeout`. Pass the index of a line found before as `after` to wait for what follows it."""
        if isinstance(pattern, str):
            line = self._wait_for_line(re.compile(re.escape(pattern)), after, timeout)
        else:
            line = self._wait_for_line(pattern, after, timeout)
        if line is None:
            wanted = pattern if isinstance(pattern, str) else pattern.pattern
            raise AssertionError(f"no {wanted!r} in the server's log within {timeout:g}s:\n{self.stderr}")
        return line

    def _reap(self, timeout: float) -> int:
        """Wait for the process to end and its output to be read to the end (the readers close
        the pipes). A process the server started that outlives it keeps the output open: the
        wait for that is bounded, so that the test can go on to say so."""
        code = self.process.wait(timeout=timeout)
        output_deadline = time.monotonic() + EXIT_SECONDS
        for reader in self._readers:
            reader.join(timeout=max(0.0, output_deadline - time.monotonic()))
        return code

    def wait_exit(self, timeout: float = EXIT_SECONDS) -> tuple[int, str]:
        """The exit code and everything the server wrote to stderr; a server that overstays is
        killed and fails the test."""
        try:
            code = self._reap(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not exit within {timeout:g}s:\n{self.stderr}") from None
        return code, self.stderr

    def stop(self, signum: int = signal.SIGTERM, timeout: float = EXIT_SECONDS) -> tuple[int, str]:
        """Send `signum` (SIGTERM: the way operators stop it) and wait_exit."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.wait_exit(timeout)

    def kill(self) -> int:
        """SIGKILL (kill -9), and wait for it to be gone; the exit code."""
        if self.process.poll() is None:
            self.process.kill()
        return self._reap(EXIT_SECONDS)

    def restart(self) -> None:
        """Start the same command again, once the process has exited; wait_listening follows."""
        assert self.process.poll() is not None, "restart() needs the server stopped first"
        self._reap(EXIT_SECONDS)
        self._start()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def static_token_server(
    directory: Path, token: str, user_id: str, *options: str, name: str | None = None
) -> Iterator[str]:
    """A no-sync server on a database in `directory` that knows one static token, of `user_id`
    (called `name`, if given), and no identity provider; `options` are further server flags.
    Yields its address; it must stop cleanly, having logged no traceback."""
    entry = {"sha256": token_hash(token), "user_id": user_id, **({"name": name} if name else {})}
    tokens_file = directory / "tokens.json"
    tokens_file.write_bytes(orjson.dumps({"tokens": [entry]}))
    process = ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={directory / 'db'}",
        "--no-sync",
        f"--tokens-file={tokens_file}",
        f"--userinfo-url={closed_port_url()}",
        *options,
    )
    try:
        yield f"127.0.0.1:{process.wait_listening()}"
    finally:
        code, log = process.stop()
    assert code == 0 and "Traceback" not in log, log[-2000:]


@contextlib.contextmanager
def server_for_imports(directory: Path, admin_key: str) -> Iterator[str]:
    """A no-sync server on a database in `directory` that takes `import` with `admin_key` and
    knows no identity provider: the quick way to load many records. Yields its address; it
    must stop cleanly, having logged no traceback."""
    admin_key_file = directory / "admin.key"
    admin_key_file.write_text(admin_key)
    process = ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={directory / 'db'}",
        "--no-sync",
        f"--admin-key-file={admin_key_file}",
        "--userinfo-url=none",
    )
    try:
        yield f"127.0.0.1:{process.wait_listening()}"
    finally:
        code, log = process.stop()
    assert code == 0 and "Traceback" not in log, log[-2000:]


Spawn = Callable[..., ServerProcess]  # the `spawn` fixture of tests/conftest.py


# -- ports ----------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on right now, to start a server on a port known in advance."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@functools.cache
def closed_port() -> int:
    """A loopback port nothing listens on for as long as the tests run. A socket bound to it,
    never listening, holds it: connections are refused, and no other program (say, another test
    run on this machine) can be given it, as it could a port merely found free."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    atexit.register(holder.close)
    port: int = holder.getsockname()[1]
    return port


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port whose connections the kernel completes, and nobody ever reads or answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port: int = listener.getsockname()[1]
        yield port


def closed_port_url() -> str:
    """A userinfo URL nothing answers: for servers that must do without the provider."""
    return f"http://127.0.0.1:{closed_port()}/userinfo"


class RecordVerdicts:
    """One record's verdicts through the server's VerdictBatch, a metric at a time with its baseline summary as
    a tuple (as the tests make them); add, then encode or pack."""

    __slots__ = ("_finished", "_shapes", "_summaries", "_values")

    def __init__(self) -> None:
        self._shapes: list[VerdictShapes] = []
        self._values: list[float] = []
        self._summaries: list[Summary | None] = []
        self._finished: tuple[bytes, bytes] | None = None

    def add(self, shapes: VerdictShapes, value: float, summary: Summary | None) -> None:
        """Judge `value` against the baseline `summary` (None: no baseline) as `judge` does; ValueError unless
        `value` is finite."""
        assert self._finished is None, "a record's verdicts are added before they are encoded"
        if not math.isfinite(value):
            raise ValueError(f"the value judged must be a finite number, not {value}")
        self._shapes.append(shapes)
        self._values.append(value)
        self._summaries.append(summary if summary is not None and summary[0] else None)

    def encode(self) -> bytes:
        """The JSON array of the verdicts."""
        return self._finish()[0]

    def pack(self) -> bytes:
        """The numbers the verdicts were built from, packed: what is stored."""
        return self._finish()[1]

    def _finish(self) -> tuple[bytes, bytes]:
        if self._finished is None:
            counts = np.array([0 if summary is None else summary[0] for summary in self._summaries], dtype=np.intp)
            summaries = np.zeros((len(self._summaries), 5))  # mean, stddev, median, min, max
            for index, summary in enumerate(self._summaries):
                if summary is not None:
                    summaries[index] = summary[1:]
            batch = VerdictBatch()
            batch.add_record(self._shapes, self._values, 0)
            (self._finished,) = batch.finish(counts, summaries)
        return self._finished
