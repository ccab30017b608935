"""What operators watch: /metrics, /healthz and /readyz on --metrics-address, the dashboard's
/metrics, and --log-format json; against real servers, real LevelDB and real HTTP on loopback."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import plyvel
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from perfdb import PROTOCOL_VERSION, __version__
from perfdb.config import ConfigError, config_from_args
from perfdb.observability.logformat import JsonLogFormatter
from perfdb.protocol.errors import ErrorCode
from perfdb.server import PerfdbServer
from perfdb.storage.dbstats import LEVELS, parse_compaction_stats, read_database_stats
from perfdb.web.app import WebConfig, build_app
from tests.support import (
    DASHBOARD,
    REPO_ROOT,
    Connection,
    ServerProcess,
    Spawn,
    UserinfoAnswer,
    closed_port,
    closed_port_url,
    connect,
    error_code,
    make_config,
    perfdb_with_provider,
    record_request,
    running_server,
    silent_port,
    token_hash,
)

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
METRICS_LINE = re.compile(r"metrics served at (http://\S+/metrics)")
DEADLINE = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers -------------------------------------------------------------------------------------


def parse_samples(text: str) -> Samples:
    """Every sample of a text exposition, keyed by sample name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample_name, labels in samples if sample_name == name}


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return parse_samples(await response.text())


async def probe(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


def operator_url(server: PerfdbServer) -> str:
    assert server.operator_endpoints is not None
    return f"http://{server.operator_endpoints.address}"


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait, with a generous deadline, until `check` holds."""
    deadline = time.monotonic() + DEADLINE
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


def metrics_url_from(lines: list[str]) -> str:
    """The /metrics URL from the start-up log (JSON lines)."""
    for line in lines:
        match = METRICS_LINE.search(orjson.loads(line)["message"])
        if match is not None:
            return match.group(1)
    raise AssertionError(f"no 'metrics served at' line in {lines}")


def check_json_log(text: str, secrets_sent: list[str]) -> list[dict[str, Any]]:
    """Every line is one JSON object with the stable keys, and no secret appears anywhere."""
    entries = []
    for line in text.splitlines():
        entry = orjson.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert RFC3339_UTC.match(entry["time"]), entry["time"]
        assert entry["level"] in ("debug", "info", "warning", "error", "critical"), line
        entries.append(entry)
    for secret in secrets_sent:
        assert secret not in text
    return entries


# -- the server's metrics ----------------------------------------------------------------------------


async def test_metrics_count_requests_errors_records_tokens_and_connections(tmp_path: Path) -> None:
    async with (
        perfdb_with_provider(tmp_path, metrics_address="127.0.0.1:0", max_connections=1) as (server, provider),
        aiohttp.ClientSession() as http,
        connect(server) as connection,
    ):
        provider.answers["tok-broken"] = UserinfoAnswer(status=500, body=b"{}")
        # One at a time, so the second of alice's records finds her token in the cache.
        for request in (
            record_request("user-alice", request_id="a1"),
            record_request("user-alice", request_id="a2"),
            record_request("user-bob"),
        ):
            assert (await connection.request(**request))["ok"] is True
        await connection.send_raw(b"{not json\n")
        assert error_code(await connection.reply()) == "bad_json"
        unknown_op = "no-such-op-" + secrets.token_hex(4)
        assert error_code(await connection.request(unknown_op)) == "unknown_op"
        assert error_code(await connection.request("ping", surprise=1)) == "bad_request"
        assert error_code(await connection.request(**record_request("nobody"))) == "unauthenticated"
        assert error_code(await connection.request(**record_request("tok-broken"))) == "auth_unavailable"
        for _ in range(2):  # the test's index is read whole, then found in the series cache
            assert (await connection.request("series", metric="qps", test_name="unary"))["ok"]
        refused = await Connection.open(server.port)
        try:
            assert error_code(await refused.reply()) == "overloaded"
            assert await refused.at_eof()
        finally:
            await refused.close()

        samples = await scrape(http, operator_url(server) + "/metrics")

    assert value(samples, "perfdb_build_info", version=__version__, protocol_version=str(PROTOCOL_VERSION)) == 1
    # Requests by op and outcome: every op of the command table has an ok series from the start,
    # and ops not in the table count under the one label "unknown", never under their own name.
    assert server.dispatcher is not None
    assert label_values(samples, "perfdb_requests_total", "op") == {*server.dispatcher.ops, "unknown"}
    assert value(samples, "perfdb_requests_total", op="record", code="ok") == 3
    assert value(samples, "perfdb_requests_total", op="record", code="unauthenticated") == 1
    assert value(samples, "perfdb_requests_total", op="record", code="auth_unavailable") == 1
    assert value(samples, "perfdb_requests_total", op="ping", code="bad_request") == 1
    assert value(samples, "perfdb_requests_total", op="ping", code="ok") == 0
    assert value(samples, "perfdb_requests_total", op="get_all", code="ok") == 0
    for code in ("bad_json", "unknown_op", "overloaded"):
        assert value(samples, "perfdb_requests_total", op="unknown", code=code) == 1, code
    assert not any(unknown_op in str(key) for key in samples)
    # Errors of an op nobody asked for are not made up.
    assert ("perfdb_requests_total", frozenset({("op", "ping"), ("code", "storage_error")})) not in samples
    codes = {ErrorCode(code) for code in label_values(samples, "perfdb_requests_total", "code") if code != "ok"}
    assert codes == {
        ErrorCode.BAD_JSON,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.OVERLOADED,
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.AUTH_UNAVAILABLE,
    }
    # Latency per op: one observation per request of a known op.
    assert value(samples, "perfdb_request_duration_seconds_count", op="record") == 5
    assert value(samples, "perfdb_request_duration_seconds_count", op="ping") == 1
    assert value(samples, "perfdb_request_duration_seconds_bucket", op="record", le="+Inf") == 5
    assert value(samples, "perfdb_request_duration_seconds_sum", op="record") > 0
    # Records and group commits.
    assert value(samples, "perfdb_records_stored_total") == 3
    assert value(samples, "perfdb_database_records") == 3
    assert value(samples, "perfdb_database_users") == 2
    batches = value(samples, "perfdb_commit_batch_records_count")
    assert batches > 0
    assert value(samples, "perfdb_commit_batch_records_sum") == 3
    assert value(samples, "perfdb_commit_write_seconds_count") == batches
    assert value(samples, "perfdb_commit_write_seconds_sum") > 0
    assert value(samples, "perfdb_commit_failures_total") == 0
    assert value(samples, "perfdb_writer_queue_depth") == 0
    # Connections: the scrape came while one was open and one had been refused.
    assert value(samples, "perfdb_connections_open") == 1
    assert value(samples, "perfdb_connections_total") == 1
    assert value(samples, "perfdb_connections_refused_total") == 1
    # Tokens: alice missed then hit; bob, nobody and tok-broken missed; tok-broken's provider failed.
    assert value(samples, "perfdb_token_cache_hits_total") == 1
    assert value(samples, "perfdb_token_cache_misses_total") == 4
    assert value(samples, "perfdb_token_cache_entries") == 3  # alice, bob, and nobody's rejection
    assert value(samples, "perfdb_token_provider_requests_total") == 4
    assert value(samples, "perfdb_token_provider_errors_total") == 1
    assert value(samples, "perfdb_series_cache_misses_total") == 1
    assert value(samples, "perfdb_series_cache_hits_total") == 1
    assert value(samples, "perfdb_series_cache_bytes") > 0
    # LevelDB, read on the store's threads; the records are still in its memtable.
    assert value(samples, "perfdb_leveldb_memory_usage_bytes") > 0
    assert value(samples, "perfdb_leveldb_approximate_size_bytes") >= 0
    assert label_values(samples, "perfdb_leveldb_files", "level") == {str(level) for level in range(LEVELS)}
    assert label_values(samples, "perfdb_leveldb_compaction_written_bytes_total", "level") == {
        str(level) for level in range(LEVELS)
    }
    # The process, from prometheus_client's own collector.
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_no_latency_is_measured_without_a_metrics_address(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _provider), connect(server) as connection:
        assert (await connection.request(**record_request()))["ok"] is True
        assert server.operator_endpoints is None
        assert server.stats.observe_latency is None
        assert server.store.writer.commit_observer is None


# -- health and readiness --------------------------------------------------------------------------


async def test_readyz_is_503_after_a_failed_write_and_recovers_without_traffic(tmp_path: Path) -> None:
    async with (
        perfdb_with_provider(tmp_path, metrics_address="127.0.0.1:0") as (server, _provider),
        aiohttp.ClientSession() as http,
        connect(server) as connection,
    ):
        base = operator_url(server)
        assert await probe(http, base + "/readyz") == (200, {"status": "ready"})

        def fail_the_write() -> None:
            raise OSError(28, "No space left on device (injected)")

        server.store.writer.write_batch_hook = fail_the_write
        assert error_code(await connection.request(**record_request())) == "storage_error"
        server.store.writer.write_batch_hook = None
        # Nothing has been written since: the first probe must see the failure.
        status, body = await probe(http, base + "/readyz")
        assert status == 503
        assert body["status"] == "not ready"
        assert "write failed" in body["reason"]
        assert await probe(http, base + "/healthz") == (200, {"status": "ok"})

        # No client writes to an unready server; the probes themselves make the writer retry.
        async def ready() -> bool:
            return (await probe(http, base + "/readyz"))[0] == 200

        await eventually(ready, "readyz back to 200")
        assert (await connection.request(**record_request()))["ok"] is True
        samples = await scrape(http, base + "/metrics")
        assert value(samples, "perfdb_commit_failures_total") == 1
        assert value(samples, "perfdb_requests_total", op="record", code="storage_error") == 1


async def test_readyz_is_503_while_shutting_down(tmp_path: Path) -> None:
    holding = threading.Event()
    release = threading.Event()

    def hold_the_write() -> None:
        holding.set()
        release.wait(DEADLINE)

    async with perfdb_with_provider(tmp_path, metrics_address="127.0.0.1:0") as (server, _provider):
        base = operator_url(server)
        async with aiohttp.ClientSession() as http:
            connection = await Connection.open(server.port)
            try:
                server.store.writer.write_batch_hook = hold_the_write
                await connection.send(record_request())
                assert await asyncio.to_thread(holding.wait, DEADLINE)
                # The record is in flight, so the shutdown waits for it.
                shutdown = asyncio.create_task(server.shutdown())
                await asyncio.sleep(0)  # let the shutdown begin
                status, body = await probe(http, base + "/readyz")
                assert (status, body["reason"]) == (503, "the server is shutting down")
                assert await probe(http, base + "/healthz") == (200, {"status": "ok"})
                release.set()
                assert (await connection.reply())["ok"] is True
            finally:
                release.set()
                await connection.close()
            await shutdown
            # The operator listener closes last, with everything else.
            with pytest.raises(aiohttp.ClientConnectionError):
                await probe(http, base + "/healthz")


def test_startup_fails_in_one_line_when_the_metrics_address_is_taken(tmp_path: Path) -> None:
    with silent_port() as port:
        process = ServerProcess(
            "--address=127.0.0.1:0", f"--database={tmp_path / 'db'}", f"--metrics-address=127.0.0.1:{port}"
        )
        try:
            code, stderr = process.wait_exit(timeout=DEADLINE)
        finally:
            process.kill()
    assert code == 1, stderr
    assert stderr.splitlines() == [
        f"run_perf_db_server: error: --metrics-address: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


def test_metrics_address_and_log_format_are_checked_on_the_command_line() -> None:
    config = config_from_args(["--metrics-address", "127.0.0.1:9100", "--log-format", "json"])
    assert (config.metrics_address, config.log_format) == ("127.0.0.1:9100", "json")
    assert (config_from_args([]).metrics_address, config_from_args([]).log_format) == (None, "text")
    with pytest.raises(ConfigError, match="--metrics-address"):
        config_from_args(["--metrics-address", "no-port"])
    with pytest.raises(SystemExit):
        config_from_args(["--log-format", "xml"])


# -- the server as a process, logging JSON --------------------------------------------------------


async def test_server_process_logs_json_and_serves_metrics_where_its_log_says(tmp_path: Path) -> None:
    bot_token = "bot-" + secrets.token_hex(16)
    unknown_token = "tok-unknown-" + secrets.token_hex(16)
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_bytes(orjson.dumps({"tokens": [{"sha256": token_hash(bot_token), "user_id": "bot"}]}))
    process = ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={tmp_path / 'db'}",
        "--metrics-address=127.0.0.1:0",
        "--log-format=json",
        "--log-level=debug",
        f"--tokens-file={tokens_file}",
        f"--userinfo-url={closed_port_url()}",
    )
    try:
        port = await asyncio.to_thread(process.wait_listening)
        metrics_url = metrics_url_from(process.stderr.splitlines())
        connection = await Connection.open(port)
        try:
            assert (await connection.request(**record_request(bot_token)))["ok"] is True
            assert error_code(await connection.request(**record_request(unknown_token))) == "auth_unavailable"
            await connection.send_raw(b'{"op": "record", "access_token": "' + bot_token.encode() + b'"\n')
            assert error_code(await connection.reply()) == "bad_json"
            async with aiohttp.ClientSession() as http:
                samples = await scrape(http, metrics_url)
        finally:
            await connection.close()
        code, stderr = await asyncio.to_thread(process.stop, signal.SIGTERM, DEADLINE)
    finally:
        process.kill()
    assert code == 0, stderr
    assert value(samples, "perfdb_requests_total", op="record", code="ok") == 1
    assert value(samples, "perfdb_requests_total", op="record", code="auth_unavailable") == 1
    assert value(samples, "perfdb_records_stored_total") == 1
    assert value(samples, "perfdb_requests_total", op="unknown", code="bad_json") == 1
    assert value(samples, "perfdb_commit_batch_records_count") > 0
    assert value(samples, "perfdb_connections_open") == 1
    entries = check_json_log(stderr, [bot_token, unknown_token])
    messages = [entry["message"] for entry in entries]
    assert any(" listening on " in message for message in messages)
    assert "shut down cleanly" in messages
    # Lines about a connection name its peer in a key of their own.
    assert any(entry.get("peer", "").startswith("127.0.0.1:") for entry in entries), messages


def test_json_log_lines_have_stable_keys_and_exception_text() -> None:
    formatter = JsonLogFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "perfdb.commands", logging.ERROR, __file__, 1, "%s: op %s failed", ("1.2.3.4:5", "x"), exc_info
    )
    record.peer, record.op = "1.2.3.4:5", "record"
    entry = orjson.loads(formatter.format(record))
    assert list(entry) == ["time", "level", "logger", "message", "peer", "op", "exception"]
    assert RFC3339_UTC.match(entry["time"])
    assert (entry["level"], entry["logger"], entry["message"]) == ("error", "perfdb.commands", "1.2.3.4:5: op x failed")
    assert entry["exception"].startswith("Traceback") and "ValueError: boom" in entry["exception"]
    plain = orjson.loads(
        formatter.format(
            logging.LogRecord("perfdb.server", logging.INFO, __file__, 1, 'two\nlines "quoted"', None, None)
        )
    )
    assert RFC3339_UTC.match(plain.pop("time"))
    assert plain == {"level": "info", "logger": "perfdb.server", "message": 'two\nlines "quoted"'}


# -- LevelDB's numbers -------------------------------------------------------------------------------


def test_database_stats_read_a_real_leveldb(tmp_path: Path) -> None:
    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True, write_buffer_size=64 * 1024)
    try:
        for number in range(5000):
            db.put(b"r:%08d" % number, secrets.token_bytes(100))
        db.compact_range()
        stats = read_database_stats(db)
    finally:
        db.close()
    assert [level.level for level in stats.levels] == list(range(LEVELS))
    files = sum(level.files for level in stats.levels)
    size = sum(level.size_bytes for level in stats.levels)
    assert files > 0
    assert 500_000 < size < 2_000_000  # 5000 values of 100 random bytes, plus keys
    assert 500_000 < stats.approximate_size_bytes < 2_000_000
    assert stats.memory_usage_bytes > 0


def test_compaction_stats_are_parsed_per_level() -> None:
    text = (
        "                               Compactions\n"
        "Level  Files Size(MB) Time(sec) Read(MB) Write(MB)\n"
        "--------------------------------------------------\n"
        "  0        2        1         0        0         1\n"
        "  2       46        2         3       40        38\n"
    )
    mib = 1024 * 1024
    assert parse_compaction_stats(text) == {0: (0.0, 0, 1 * mib), 2: (3.0, 40 * mib, 38 * mib)}
    assert parse_compaction_stats("") == {}


# -- the dashboard ---------------------------------------------------------------------------------


async def test_dashboard_counts_requests_by_route_pattern_and_status(tmp_path: Path) -> None:
    config = make_config(tmp_path / "db", closed_port_url())
    async with running_server(config) as server:
        app = build_app(WebConfig(server=server.address))
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/")).status == 200
            for path in ("/no/such/page", "/another-" + secrets.token_hex(4)):
                assert (await client.get(path)).status == 404
            assert (await client.get("/users/nobody")).status == 404
            response = await client.get("/metrics")
            assert response.status == 200
            samples = parse_samples(await response.text())
    assert value(samples, "perfdb_web_http_requests_total", route="/", code="200") == 1
    assert value(samples, "perfdb_web_http_requests_total", route="unmatched", code="404") == 2
    assert value(samples, "perfdb_web_http_requests_total", route="/users/{user_id}", code="404") == 1
    assert value(samples, "perfdb_web_http_request_duration_seconds_count", route="/") == 1
    assert label_values(samples, "perfdb_web_http_requests_total", "route") == {"/", "unmatched", "/users/{user_id}"}
    assert value(samples, "process_cpu_seconds_total") >= 0


async def test_dashboard_process_logs_json_and_where_its_metrics_are(spawn: Spawn) -> None:
    process = spawn(
        f"--server=127.0.0.1:{closed_port()}", "--listen=127.0.0.1:0", "--log-format=json", command=DASHBOARD
    )
    await asyncio.to_thread(process.wait_for_log, "metrics served at", timeout=DEADLINE)
    async with aiohttp.ClientSession() as http:
        samples = await scrape(http, metrics_url_from(process.stderr.splitlines()))
    code, log = await asyncio.to_thread(process.stop, signal.SIGTERM, DEADLINE)
    assert code == 0, log
    assert value(samples, "process_open_fds") > 0
    entries = check_json_log(log, [])
    assert any(entry["message"].startswith("perfdb-web listening on http://127.0.0.1:") for entry in entries)


# -- the documentation -------------------------------------------------------------------------------


def exposed_names(text: str) -> set[str]:
    """The perfdb metric names in an exposition, as an operator queries them."""
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("perfdb_"):
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


async def test_readme_documents_every_metric(tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    async with (
        perfdb_with_provider(tmp_path, metrics_address="127.0.0.1:0") as (server, _provider),
        aiohttp.ClientSession() as http,
    ):
        async with http.get(operator_url(server) + "/metrics") as response:
            server_names = exposed_names(await response.text())
        async with TestClient(TestServer(build_app(WebConfig(server=server.address)))) as client:
            assert (await client.get("/")).status == 200
            dashboard_names = exposed_names(await (await client.get("/metrics")).text())
    assert len(server_names) > 20 and len(dashboard_names) == 2
    undocumented = sorted(name for name in server_names | dashboard_names if f"| `{name}` |" not in readme)
    assert not undocumented, f"README's metric tables miss {undocumented}"
