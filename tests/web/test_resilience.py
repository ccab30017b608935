"""The dashboard when perfdb is not well: down, restarting, silent, or wanting a read key; and
when the dashboard itself fails. Every case is a readable page, never a stack trace."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from perfdb.client import AsyncClient
from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.server import PerfdbServer
from perfdb.web import handlers
from tests.support import closed_port, make_config, perfdb_with_provider, userinfo_server
from tests.web.conftest import dashboard_client
from tests.web.parse import parse_page

ADMIN_KEY = "admin-key-for-web-tests-0123456789"
READ_KEY = "read-key-for-web-tests-0123456789"


async def _import_three(address: str) -> list[str]:
    now = now_micros()
    records: list[dict[str, Any]] = [
        {
            "record_id": make_record_id(now - index * 1_000_000, 0),
            "user_id": "carol",
            "timestamp": format_micros(now - index * 1_000_000),
            "test_name": "unary",
            "metrics": {"qps": 1000.0 + index},
        }
        for index in range(3)
    ]
    async with AsyncClient(address) as client:
        await client.call("import", admin_key=ADMIN_KEY, records=records, users={"carol": {"name": "Carol"}})
    return [str(record["record_id"]) for record in records]


def _key_files(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "admin.key").write_text(ADMIN_KEY)
    (tmp_path / "read.key").write_text(READ_KEY + "\n")
    return {"admin_key_file": tmp_path / "admin.key"}


@contextlib.asynccontextmanager
async def started(server: PerfdbServer) -> AsyncIterator[PerfdbServer]:
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


async def test_perfdb_down_is_a_readable_503_and_a_restart_needs_no_action(tmp_path: Path) -> None:
    keys = _key_files(tmp_path)
    async with userinfo_server() as provider:
        first = PerfdbServer(make_config(tmp_path / "db", provider.url, **keys))
        await first.start()
        try:
            port = first.port
            record_ids = await _import_three(f"127.0.0.1:{port}")
        except BaseException:
            await first.shutdown()
            raise
        async with dashboard_client(f"127.0.0.1:{port}") as web:
            try:
                response = await web.get("/")
                assert parse_page(await response.text()).record_ids == record_ids
            finally:
                await first.shutdown()  # perfdb goes away; the dashboard stays

            started_at = time.monotonic()
            response = await web.get("/?tag=nightly")
            text = await response.text()
            assert time.monotonic() - started_at < 5
            assert response.status == 503 and response.headers["Retry-After"] == "5"
            page = parse_page(text)
            assert page.ids["error-message"].startswith(f"The perfdb server at 127.0.0.1:{port} cannot be reached")
            assert "Retry" in page.ids["retry"] and 'href="/?tag=nightly"' in text
            assert "Traceback" not in text and "PerfdbClientError" not in text
            api = await web.get("/api/results")
            assert api.status == 503
            assert (await api.json())["error"]["code"] == "connection_failed"
            health = await web.get("/api/health")
            assert health.status == 503

            # perfdb comes back on the same address: the very next page works.
            second = PerfdbServer(make_config(tmp_path / "db", provider.url, port=port, **keys))
            async with started(second):
                response = await web.get("/")
                assert response.status == 200
                assert parse_page(await response.text()).record_ids == record_ids
                assert (await (await web.get("/api/health")).json())["perfdb"] == "ok"


async def test_a_perfdb_that_never_answers_times_out_quickly() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read()  # swallow everything until the dashboard hangs up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with dashboard_client(f"127.0.0.1:{port}", timeout=0.3) as web:
            started_at = time.monotonic()
            response = await web.get("/overview")
            elapsed = time.monotonic() - started_at
            page = parse_page(await response.text())
        assert response.status == 503
        assert page.ids["error-message"] == f"The perfdb server at 127.0.0.1:{port} did not answer in time."
        assert elapsed < 4, elapsed
        assert connections, "the dashboard never connected"
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def holding(upstream_port: int, op: str, release: asyncio.Event | None = None) -> AsyncIterator[int]:
    """A proxy in front of perfdb that holds back requests of one op until `release` is set (with
    no event, for good: they go unanswered)."""
    relays: set[asyncio.Task[Any]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        relays.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)

        async def requests() -> None:
            while line := await reader.readline():
                if orjson.loads(line).get("op") == op:
                    if release is None:
                        continue
                    await release.wait()
                up_writer.write(line)

        async def replies() -> None:
            while line := await up_reader.readline():
                writer.write(line)

        try:
            await asyncio.gather(requests(), replies())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            up_writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await server.wait_closed()


def _chart_data(text: str) -> dict[str, Any]:
    block = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', text, re.S)
    assert block is not None, text[-500:]
    data: dict[str, Any] = orjson.loads(block.group(1))
    return data


async def test_a_chart_page_whose_data_read_fails_still_shows_and_carries_the_error(tmp_path: Path) -> None:
    keys = _key_files(tmp_path)
    async with perfdb_with_provider(tmp_path, **keys) as (server, _):
        await _import_three(f"127.0.0.1:{server.port}")
        async with holding(server.port, "series") as port, dashboard_client(f"127.0.0.1:{port}", timeout=0.5) as web:
            for path in ("/users/carol", "/tests/unary"):
                response = await web.get(path)
                text = await response.text()
                assert response.status == 200, path
                # The read's error, for the page's script to show at once (asking the API would wait as long).
                error = _chart_data(text)["error"]
                assert error["code"] in ("timeout", "connection_failed") and error["retryable"] is True, error
                assert "perfdb server at 127.0.0.1" in error["message"]
                assert text.endswith("</html>\n") and parse_page(text).ids["chart-summary"] == "Loading results…"
                api = await web.get("/api" + path + "/series")
                assert api.status == 503
                assert (await api.json())["error"]["code"] in ("timeout", "connection_failed")


async def test_a_test_page_of_an_unknown_test_says_so_in_its_charts(tmp_path: Path) -> None:
    keys = _key_files(tmp_path)
    async with (
        perfdb_with_provider(tmp_path, **keys) as (server, _),
        dashboard_client(f"127.0.0.1:{server.port}") as web,
    ):
        response = await web.get("/tests/no-such-test")
        assert response.status == 200
        error = _chart_data(await response.text())["error"]
        assert error == {"code": "not_found", "message": "perfdb has no results of a test named 'no-such-test'.",
                         "retryable": False}  # fmt: skip
        assert (await web.get("/api/tests/no-such-test/series")).status == 404


async def test_a_chart_page_failing_after_its_head_went_out_ends_whole_and_logs_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(handlers, "chart_data", broken)
    keys = _key_files(tmp_path)
    async with perfdb_with_provider(tmp_path, **keys) as (server, _):
        await _import_three(f"127.0.0.1:{server.port}")
        async with dashboard_client(f"127.0.0.1:{server.port}") as web:
            response = await web.get("/users/carol", headers={"Accept-Encoding": "gzip"})
            text = await response.text()
            assert response.status == 200 and text.endswith("</html>\n")
            assert _chart_data(text)["error"]["code"] == "internal" and "secret" not in text
            # The connection is still in step: the next request on it gets its own answer.
            assert (await web.get("/api/health")).status == 200
    assert "secret internals" in caplog.text


async def test_a_chart_page_is_gzipped_only_for_a_client_that_takes_it_and_head_reads_nothing(tmp_path: Path) -> None:
    keys = _key_files(tmp_path)
    async with perfdb_with_provider(tmp_path, **keys) as (server, _):
        await _import_three(f"127.0.0.1:{server.port}")
        async with holding(server.port, "series") as port, dashboard_client(f"127.0.0.1:{port}") as web:
            for accepted in ("identity", "gzip;q=0", "br, deflate"):
                response = await web.get("/users/carol", headers={"Accept-Encoding": accepted})
                # Held series reads: the page's head is sent, its data is not.
                assert "Content-Encoding" not in response.headers, accepted
                head = await asyncio.wait_for(response.content.readuntil(b"</head>"), timeout=30)
                assert head.startswith(b"<!doctype html>"), accepted
                response.close()
            head_only = await web.head("/users/carol")
            assert head_only.status == 200 and head_only.headers["Content-Type"] == "text/html; charset=utf-8"
            assert await head_only.read() == b""
            # The connection is still in step after a HEAD (no body went out with it).
            assert (await web.get("/api/health")).status == 200


async def test_a_user_page_sends_its_head_before_perfdb_has_read_its_charts(tmp_path: Path) -> None:
    keys = _key_files(tmp_path)
    release = asyncio.Event()
    async with perfdb_with_provider(tmp_path, **keys) as (server, _):
        await _import_three(f"127.0.0.1:{server.port}")
        async with holding(server.port, "series", release) as port, dashboard_client(f"127.0.0.1:{port}") as web:
            response = await web.get("/users/carol", headers={"Accept-Encoding": "gzip"})
            assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
            received = b""
            while b"</head>" not in received:  # decompressed by the client as it comes
                received += await asyncio.wait_for(response.content.readany(), timeout=30)
            # The stylesheet and script are named, so the browser fetches them while perfdb reads.
            assert b'rel="stylesheet"' in received and b"charts.js" in received
            assert b"chart-data" not in received and not release.is_set()
            release.set()
            page = received + await asyncio.wait_for(response.content.read(), timeout=30)
            block = re.search(rb'<script type="application/json" id="chart-data">(.*?)</script>', page, re.S)
            assert block is not None and orjson.loads(block.group(1))["results"] == 3
            assert page.endswith(b"</html>\n")


async def test_the_read_key_is_sent_when_configured(tmp_path: Path) -> None:
    keys = _key_files(tmp_path)
    async with perfdb_with_provider(tmp_path, read_key_file=tmp_path / "read.key", **keys) as (server, _):
        address = f"127.0.0.1:{server.port}"
        record_ids = await _import_three(address)
        async with dashboard_client(address) as web:
            response = await web.get("/")
            page = parse_page(await response.text())
            assert response.status == 502
            assert "refused to read: read_key: missing or wrong" in page.ids["error-message"]
            assert "Start perfdb-web with --read-key-file" in page.ids["error-message"]
            api = await web.get("/api/users/carol/series")
            assert (await api.json())["error"]["code"] == "forbidden"
        async with dashboard_client(address, read_key=READ_KEY) as web:
            table = parse_page(await (await web.get("/")).text())
            assert table.record_ids == record_ids
            for url in ("/users/carol", "/api/users/carol/series", "/overview", f"/results/{record_ids[0]}"):
                assert (await web.get(url)).status == 200, url


async def test_an_unexpected_error_is_a_plain_500_page(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(handlers, "build_table_page", broken)
    async with dashboard_client(f"127.0.0.1:{closed_port()}") as web:
        response = await web.get("/")
        text = await response.text()
        api = await web.get("/api/results")
        error = await api.json()
    assert response.status == 500 and api.status == 500
    assert parse_page(text).ids["error-message"] == "The dashboard hit an unexpected error; its log has the details."
    assert "secret internals" not in text and "Traceback" not in text
    assert error["error"]["code"] == "internal" and "secret" not in error["error"]["message"]
    assert "secret internals" in caplog.text  # the operator still learns what broke
