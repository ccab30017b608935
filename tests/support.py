"""Real things the tests run against: a perfdb server in-process, a userinfo (OIDC) server
on loopback, and a minimal NDJSON client over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from perfdb.config import Config
from perfdb.server import PerfdbServer

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


class ServerProcess:
    """run_perf_db_server.py in a child process, as an operator would start it."""

    def __init__(
        self,
        *args: str,
        cwd: Path | None = None,
        command: Sequence[str] = (sys.executable, str(REPO_ROOT / "run_perf_db_server.py")),
        env: dict[str, str] | None = None,
    ) -> None:
        if env is None:
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        self.stderr_lines: list[str] = []

    def wait_listening(self, timeout: float = 10.0) -> int:
        """The port from the 'listening on' log line."""
        assert self.process.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stderr.readline().decode()
            if not line:
                raise AssertionError(f"server exited: {''.join(self.stderr_lines)}")
            self.stderr_lines.append(line)
            if " listening on " in line:
                return int(line.split(" listening on ")[1].split()[0].rsplit(":", 1)[1])
        raise AssertionError("server did not start listening")

    def finish(self, timeout: float = 15.0) -> tuple[int, str]:
        """Wait for exit; the exit code and everything written to stderr."""
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, "".join(self.stderr_lines) + err.decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
