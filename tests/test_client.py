"""The client library against real servers: AsyncClient and Client calls and errors, record_many
pipelines (order, refusals, retries across a killed server), paging, admin export/import, and the
sans-I/O RecordWindow on its own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any

import orjson
import pytest

from perfdb import PROTOCOL_VERSION
from perfdb.client import AsyncClient, Client, PerfdbClientError, RetryPolicy
from perfdb.client.common import RecordWindow
from perfdb.server import PerfdbServer
from tests.support import (
    ServerProcess,
    Spawn,
    UserinfoAnswer,
    closed_port,
    closed_port_url,
    free_port,
    perfdb_with_provider,
    silent_port,
    token_hash,
)

# Retries that give up quickly, for the failure tests.
QUICK_RETRY = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.02)
# Generous enough to outlast a server restart (interpreter start included).
RESTART_RETRY = RetryPolicy(attempts=40, first_delay=0.05, max_delay=0.5)
ADMIN_KEY = "client-tests-admin-key-0123456789"
BOT_TOKEN = "client-tests-bot-token"
BOT_USER_ID = "static:ci-bot"
# A record without a test_name: the server refuses it for good (bad_request).
NO_TEST_NAME: dict[str, Any] = {"access_token": "user-alice", "metrics": {"qps": 1.0}}
PAGE = 7  # page size for the paging tests: smaller than, and not dividing, the record counts
RESTART_TOTAL = 3000
KILL_AFTER_ACKS = 700


# -- helpers ------------------------------------------------------------------------------


def bench(
    seq: int, *, token: str = "user-alice", test_name: str = "unary", tag: str = "", **extra: Any
) -> dict[str, Any]:
    """One record to submit; metrics.seq says which one it is when it is read back."""
    return {
        "access_token": token,
        "test_name": test_name,
        "tag": tag,
        "metrics": {"seq": seq, "qps": 1000.0 + seq},
        **extra,
    }


def address(server: PerfdbServer) -> str:
    return f"127.0.0.1:{server.port}"


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [record["record_id"] for record in records]


async def collect(
    stream: AsyncIterator[dict[str, Any]], into: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Every item of an async iterator, appended to `into` as it comes (so a failure keeps them)."""
    items = [] if into is None else into
    async for item in stream:
        items.append(item)
    return items


def error_reply(code: str, retryable: bool) -> bytes:
    return orjson.dumps({"id": None, "ok": False, "error": {"code": code, "message": "m", "retryable": retryable}})


def ok_reply(number: int) -> bytes:
    return orjson.dumps({"id": None, "ok": True, "n": number})


def decoded(requests: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(request) for request in requests]


@dataclasses.dataclass(frozen=True)
class CountingPolicy(RetryPolicy):
    """A RetryPolicy that remembers every pause it handed out."""

    drawn: list[float] = dataclasses.field(default_factory=list)

    def delay(self, failures: int) -> float | None:
        pause = super().delay(failures)
        if pause is not None:
            self.drawn.append(pause)
        return pause


@dataclasses.dataclass
class FakeServer:
    """A plain asyncio server that reads requests and either never answers or hangs up."""

    hang_up: bool
    port: int = 0
    connections: int = 0
    received: bytearray = dataclasses.field(default_factory=bytearray)
    writers: list[asyncio.StreamWriter] = dataclasses.field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.received += data
                if self.hang_up:
                    break
        writer.close()


@contextlib.asynccontextmanager
async def fake_server(*, hang_up: bool) -> AsyncIterator[FakeServer]:
    fake = FakeServer(hang_up=hang_up)
    listener = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    fake.port = listener.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        listener.close()
        for writer in fake.writers:
            writer.close()
        await listener.wait_closed()
        await asyncio.sleep(0.01)  # let the handlers see their connections close


@pytest.fixture
def bot_server(tmp_path: Path, spawn: Spawn) -> Callable[[int], ServerProcess]:
    """Starts a perfdb server process on 127.0.0.1:<port> (without waiting for it to listen),
    its database in tmp_path, with a static bot token and no reachable provider."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_bytes(
        orjson.dumps({"tokens": [{"sha256": token_hash(BOT_TOKEN), "user_id": "ci-bot", "name": "CI bot"}]})
    )

    def start(port: int) -> ServerProcess:
        return spawn(
            f"--address=127.0.0.1:{port}",
            f"--database={tmp_path / 'child-db'}",
            f"--tokens-file={tokens_file}",
            f"--userinfo-url={closed_port_url()}",
        )

    return start


def bot_records(total: int, prefix: str) -> list[dict[str, Any]]:
    return [bench(seq, token=BOT_TOKEN, request_id=f"{prefix}-{seq}") for seq in range(total)]


def check_stored_once(records: list[dict[str, Any]], acks: list[dict[str, Any]], stored: list[dict[str, Any]]) -> None:
    """Every record acked in input order, and the database holds each request_id exactly once."""
    assert len(acks) == len(records)
    request_ids = Counter(record["request_id"] for record in stored)
    repeated = {key: count for key, count in request_ids.items() if count != 1}
    assert not repeated, f"request_ids stored more than once: {sorted(repeated.items())[:10]}"
    assert set(request_ids) == {record["request_id"] for record in records}
    assert len(stored) == len(records)
    by_id = {record["record_id"]: record for record in stored}
    for sent, ack in zip(records, acks, strict=True):
        assert ack["user_id"] == BOT_USER_ID
        kept = by_id[ack["record_id"]]
        assert kept["request_id"] == sent["request_id"], (ack, kept)
        assert kept["metrics"]["seq"] == sent["metrics"]["seq"]


# -- AsyncClient: single calls ------------------------------------------------------------


async def test_both_clients_pass_ordering_options_and_ask_for_the_overview(tmp_path: Path) -> None:
    qps = [5.0, 1.0, 9.0, 3.0, 9.0, 7.0]
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        acks = [await client.record(**bench(n, metrics={"qps": value})) for n, value in enumerate(qps)]
        newest_first = await collect(client.get_all(reverse=True, limit=4))
        mine_newest_first = await collect(client.get_user("alice", reverse=True, limit=4))
        by_qps = await collect(client.get_all(sort="qps", limit=4))
        mine_by_qps_up = await collect(client.get_user("alice", sort="qps", order="asc", limit=4))
        overview = await client.overview("qps")
        with Client(address(server)) as blocking:
            blocking_results = await asyncio.to_thread(
                lambda: (
                    list(blocking.get_all(reverse=True, limit=4)),
                    list(blocking.get_user("alice", sort="qps", order="asc", limit=4)),
                    blocking.overview("qps", test_name="unary"),
                )
            )
    record_ids = ids(acks)
    assert ids(newest_first) == ids(mine_newest_first) == record_ids[::-1]
    assert [r["metrics"]["qps"] for r in by_qps] == [9.0, 9.0, 7.0, 5.0, 3.0, 1.0]
    assert [r["metrics"]["qps"] for r in mine_by_qps_up] == sorted(qps)
    assert overview["tests"]["unary"]["max"] == 9.0 and overview["tests"]["unary"]["count"] == 6
    blocking_newest, blocking_by_qps_up, blocking_overview = blocking_results
    assert ids(blocking_newest) == record_ids[::-1]
    assert ids(blocking_by_qps_up) == ids(mine_by_qps_up)
    assert blocking_overview["tests"] == overview["tests"]


async def test_both_clients_ask_for_a_series(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        acks = [await client.record(**bench(n, metrics={"qps": n, "perc_lat_50": 10 * n})) for n in range(4)]
        other = await client.record(**bench(9, test_name="streaming", metrics={"qps": 7}))
        one = await client.series("qps", "unary", user_id="alice", buckets=1)
        grouped = await client.series("qps", by="test", user_id="alice", buckets=1)
        since = acks[1]["timestamp"]
        with Client(address(server)) as blocking:
            both = await asyncio.to_thread(
                lambda: blocking.series(["qps", "perc_lat_50"], "unary", tag="", since=since, buckets=4000)
            )
            blocking_grouped = await asyncio.to_thread(lambda: blocking.series("qps", by="test", user_id="alice"))
    assert grouped["records"] == 5 and sorted(grouped["tests"]) == ["streaming", "unary"]
    assert grouped["tests"]["streaming"]["qps"]["min"]["record_id"] == other["record_id"]
    assert blocking_grouped["tests"]["unary"]["qps"]["count"] == 4 and blocking_grouped["tests_truncated"] is False
    [point] = one["series"]["qps"]["points"]
    assert (point["count"], point["min"], point["max"], one["buckets"]) == (4, 0, 3, 1)
    assert both["since"] == since and both["records"] == 3
    latency = both["series"]["perc_lat_50"]
    assert [p["record_id"] for p in latency["points"]] == ids(acks)[1:]
    assert latency["max"] == {"value": 30, "record_id": acks[3]["record_id"], "timestamp": acks[3]["timestamp"]}


async def test_hello_ping_stats(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        hello = await client.hello()
        await client.ping()
        await client.record(**bench(1))
        stats = await client.stats()
    assert hello["ok"] is True and hello["server"] == "perfdb" and hello["protocol_version"] == PROTOCOL_VERSION
    assert {"hello", "ping", "record", "get_user", "get_all", "stats"} <= set(hello["ops"])
    assert hello["limits"]["max_page_size"] == server.config.max_page_size
    assert stats["records"] == 1 and stats["users"] == 1
    assert stats["requests"]["ping"] == 1 and stats["requests"]["hello"] == 1


async def test_record_returns_its_identity_and_generates_a_request_id(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        ack = await client.record(**bench(1, tag="nightly"))
        keyed = await client.record(**bench(2), request_id="run-42")
        again = await client.record(**bench(3), request_id="run-42")
        stored = [record async for record in client.get_user("alice")]
    assert set(ack) >= {"record_id", "user_id", "timestamp", "duplicate"}
    assert ack["user_id"] == "alice" and ack["duplicate"] is False
    assert len(ack["record_id"]) == 20 and ack["timestamp"].endswith("Z")
    assert again["duplicate"] is True and again["record_id"] == keyed["record_id"]
    assert ids(stored) == [ack["record_id"], keyed["record_id"]]
    generated = stored[0]["request_id"]
    assert isinstance(generated, str) and len(generated) >= 16, stored[0]
    assert stored[0]["metrics"]["seq"] == 1 and stored[0]["tag"] == "nightly"
    assert stored[1]["request_id"] == "run-42" and stored[1]["metrics"]["seq"] == 2


async def test_each_record_gets_its_own_generated_request_id(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        first = await client.record(**bench(1))
        second = await client.record(**bench(1))  # the same content is a new result
    assert first["duplicate"] is False and second["duplicate"] is False
    assert first["record_id"] != second["record_id"]


async def test_error_replies_raise_with_the_servers_code(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        with pytest.raises(PerfdbClientError) as missing:
            await client.record(access_token="user-alice", metrics={"qps": 1.0})
        with pytest.raises(PerfdbClientError) as rejected:
            await client.record(**bench(1, token="not-a-valid-token"))
        with pytest.raises(PerfdbClientError) as unknown_user:
            await anext(client.get_user("nobody"))
        with pytest.raises(PerfdbClientError) as unknown_op:
            await client.call("fly")
        await client.ping()  # the connection carries on after errors
        stats = await client.stats()
    assert (missing.value.code, missing.value.retryable) == ("bad_request", False)
    assert missing.value.message.startswith("test_name"), missing.value.message
    assert missing.value.index is None
    assert (rejected.value.code, rejected.value.retryable) == ("unauthenticated", False)
    assert "not-a-valid-token" not in rejected.value.message
    assert unknown_user.value.code == "not_found"
    assert unknown_op.value.code == "unknown_op"
    assert stats["records"] == 0


async def test_retryable_error_is_retried_only_for_keyed_records(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, provider):
        provider.answers["flaky-token"] = UserinfoAnswer(status=503, body=b"{}")
        async with AsyncClient(address(server), retry=QUICK_RETRY) as client:
            with pytest.raises(PerfdbClientError) as keyed:
                await client.record(**bench(1, token="flaky-token"))
            lookups_for_keyed = provider.calls.count("flaky-token")
            with pytest.raises(PerfdbClientError) as unkeyed:
                await client.call("record", **bench(2, token="flaky-token"))  # no request_id
    assert (keyed.value.code, keyed.value.retryable) == ("auth_unavailable", True)
    assert lookups_for_keyed == QUICK_RETRY.attempts
    assert (unkeyed.value.code, unkeyed.value.retryable) == ("auth_unavailable", True)
    assert provider.calls.count("flaky-token") == QUICK_RETRY.attempts + 1


# -- AsyncClient: record_many -------------------------------------------------------------


async def test_record_many_acks_ten_thousand_in_input_order(tmp_path: Path) -> None:
    records = [bench(seq, request_id=f"bulk-{seq}") for seq in range(10_000)]
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        acks = [ack async for ack in client.record_many(iter(records))]
        stored = [record async for record in client.get_all(limit=3000)]
        stats = await client.stats()
    assert len(acks) == 10_000
    assert all(ack["duplicate"] is False and ack["user_id"] == "alice" for ack in acks)
    assert len(set(ids(acks))) == 10_000
    assert stats["records"] == 10_000 and len(stored) == 10_000
    by_id = {record["record_id"]: record for record in stored}
    for seq, ack in enumerate(acks):
        kept = by_id[ack["record_id"]]
        assert kept["metrics"]["seq"] == seq and kept["request_id"] == f"bulk-{seq}", (seq, ack, kept)
        assert kept["timestamp"] == ack["timestamp"]


async def test_record_many_generates_distinct_request_ids(tmp_path: Path) -> None:
    records = [bench(seq) for seq in range(300)]
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        acks = [ack async for ack in client.record_many(records, window=64)]
        stored = [record async for record in client.get_user("alice")]
    assert len(acks) == 300 and len(stored) == 300
    assert len({record["request_id"] for record in stored}) == 300
    assert all("request_id" not in record for record in records)  # the caller's dicts are left alone


async def test_record_many_refused_record_raises_with_its_index(tmp_path: Path) -> None:
    records = [bench(seq) for seq in range(100)]
    records[57] = dict(NO_TEST_NAME)
    acks: list[dict[str, Any]] = []
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        with pytest.raises(PerfdbClientError) as caught:
            await collect(client.record_many(records, window=16), acks)
        await client.ping()  # the client is still usable
        stored = {record["record_id"]: record async for record in client.get_user("alice")}
    assert caught.value.code == "bad_request" and caught.value.retryable is False
    assert caught.value.index == 57
    assert caught.value.message.startswith("test_name")
    assert len(acks) == 57
    assert [stored[ack["record_id"]]["metrics"]["seq"] for ack in acks] == list(range(57))


async def record_with_a_late_token(directory: Path, total: int, carol_at: int) -> None:
    """record_many where carol's token cannot be checked at first (auth_unavailable, retryable)
    and can be 0.2 s later: every record is acked in input order and stored once."""
    records = [bench(seq, request_id=f"r-{seq}") for seq in range(total)]
    records[carol_at] = bench(carol_at, token="user-carol", request_id=f"r-{carol_at}")
    policy = RetryPolicy(attempts=40, first_delay=0.01, max_delay=0.05)
    async with perfdb_with_provider(directory) as (server, provider):
        provider.answers["user-carol"] = UserinfoAnswer(status=503, body=b"{}")
        asyncio.get_running_loop().call_later(0.2, provider.answers.pop, "user-carol")
        async with AsyncClient(address(server), retry=policy) as client:
            acks = [ack async for ack in client.record_many(records, window=4)]
            carol = [record async for record in client.get_user("carol")]
            stats = await client.stats()
    assert [ack["user_id"] for ack in acks] == ["carol" if seq == carol_at else "alice" for seq in range(total)]
    assert provider.calls.count("user-carol") >= 2  # refused at least once, then accepted
    assert [record["request_id"] for record in carol] == [f"r-{carol_at}"]
    assert carol[0]["record_id"] == acks[carol_at]["record_id"]
    assert stats["records"] == total


async def test_record_many_resends_a_record_the_server_asks_to_retry(tmp_path: Path) -> None:
    await record_with_a_late_token(tmp_path, total=20, carol_at=2)


async def test_record_many_retry_in_the_last_window(tmp_path: Path) -> None:
    # The retried record holds the full window back until it is acked, and then the window
    # empties at once: the stream must end there.
    await record_with_a_late_token(tmp_path, total=6, carol_at=2)


async def test_record_many_of_nothing_yields_nothing(tmp_path: Path) -> None:
    async with (
        perfdb_with_provider(tmp_path) as (server, _),
        AsyncClient(address(server), retry=QUICK_RETRY, request_timeout=1.0) as client,
    ):
        acks = [ack async for ack in client.record_many([])]
    assert acks == []


async def test_record_many_with_a_window_of_one(tmp_path: Path) -> None:
    records = [bench(seq) for seq in range(5)]
    async with (
        perfdb_with_provider(tmp_path) as (server, _),
        AsyncClient(address(server), retry=QUICK_RETRY, request_timeout=1.0) as client,
    ):
        acks = [ack async for ack in client.record_many(records, window=1)]
    assert len(acks) == 5


# -- AsyncClient: paging ------------------------------------------------------------------


async def test_get_user_and_get_all_follow_cursors_with_filters(tmp_path: Path) -> None:
    alice = [
        bench(seq, test_name="unary" if seq % 2 else "streaming", tag="nightly" if seq % 3 == 0 else "")
        for seq in range(40)
    ]
    bob = [bench(100 + seq, token="user-bob", test_name="streaming", tag="nightly") for seq in range(9)]
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        acks = [ack async for ack in client.record_many(alice + bob, window=8)]
        sent = dict(zip(ids(acks), alice + bob, strict=True))
        every = sorted(ids(acks))  # oldest first is record id order
        timestamps = {ack["record_id"]: ack["timestamp"] for ack in acks}

        async def user(user_id: str, **filters: Any) -> list[str]:
            return ids([record async for record in client.get_user(user_id, limit=PAGE, **filters)])

        async def everyone(**filters: Any) -> list[str]:
            return ids([record async for record in client.get_all(limit=PAGE, **filters)])

        def expected(user_id: str | None = None, **filters: str) -> list[str]:
            return [
                record_id
                for record_id in every
                if (user_id is None or sent[record_id]["access_token"] == f"user-{user_id}")
                and all(sent[record_id][key] == value for key, value in filters.items())
            ]

        pages = [page async for page in client.pages("get_user", user_id="alice", limit=PAGE)]
        assert [len(page["records"]) for page in pages] == [7, 7, 7, 7, 7, 5]
        assert all(page["user"]["user_id"] == "alice" for page in pages)
        nightly = client.pages("get_user", user_id="alice", tag="nightly", limit=PAGE)
        assert [len(page["records"]) async for page in nightly] == [7, 7]  # an exact multiple: no empty page

        assert await user("alice") == expected("alice")
        assert await user("bob") == expected("bob")
        assert await user("alice", test_name="unary") == expected("alice", test_name="unary")
        assert await user("alice", tag="nightly") == expected("alice", tag="nightly")
        assert await user("alice", tag="") == expected("alice", tag="")
        assert await everyone() == every
        assert await everyone(test_name="streaming") == expected(test_name="streaming")
        assert await everyone(tag="nightly", test_name="streaming") == expected(tag="nightly", test_name="streaming")

        since, until = timestamps[every[5]], timestamps[every[43]]
        window = [record_id for record_id in every if since <= timestamps[record_id] < until]
        assert await everyone(since=since, until=until) == window
        assert await everyone(since=since) == [r for r in every if timestamps[r] >= since]
        assert await user("alice", until=until) == [r for r in expected("alice") if timestamps[r] < until]
        records = [record async for record in client.get_all(limit=PAGE)]
    assert len(every) == 49 and len(expected("alice", tag="nightly")) == 14
    assert PAGE < len(window) < len(every)
    assert [record["metrics"]["seq"] for record in records] == [sent[r]["metrics"]["seq"] for r in every]


async def test_paging_an_empty_filter_returns_nothing(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        await client.record(**bench(1))
        nothing = [record async for record in client.get_user("alice", test_name="absent", limit=PAGE)]
        pages = [page async for page in client.pages("get_all", tag="absent", limit=PAGE)]
    assert nothing == []
    assert len(pages) == 1 and pages[0]["records"] == [] and pages[0]["next_cursor"] is None


# -- retries across a killed server -------------------------------------------------------


async def test_record_many_survives_a_killed_and_restarted_server(
    bot_server: Callable[[int], ServerProcess],
) -> None:
    port = free_port()
    server = bot_server(port)
    await asyncio.to_thread(server.wait_listening)
    records = bot_records(RESTART_TOTAL, "async-restart")
    acks: list[dict[str, Any]] = []
    killed_with: int | None = None
    async with AsyncClient(f"127.0.0.1:{port}", retry=RESTART_RETRY, request_timeout=10.0) as client:
        async for ack in client.record_many(records):
            acks.append(ack)
            if len(acks) == KILL_AFTER_ACKS:
                killed_with = server.kill()
                server.restart()
        assert killed_with is not None
        await asyncio.to_thread(server.wait_listening)
        stored = [record async for record in client.get_all(limit=1000)]
        stats = await client.stats()
    assert killed_with == -signal.SIGKILL
    check_stored_once(records, acks, stored)
    assert stats["records"] == RESTART_TOTAL
    assert stats["requests"]["record"] > 0  # the stream carried on against the new server


def test_blocking_record_many_survives_a_killed_and_restarted_server(
    bot_server: Callable[[int], ServerProcess],
) -> None:
    port = free_port()
    server = bot_server(port)
    server.wait_listening()
    records = bot_records(RESTART_TOTAL, "blocking-restart")
    acks: list[dict[str, Any]] = []
    killed_with: int | None = None
    with Client(f"127.0.0.1:{port}", retry=RESTART_RETRY, request_timeout=10.0) as client:
        for ack in client.record_many(records):
            acks.append(ack)
            if len(acks) == KILL_AFTER_ACKS:
                killed_with = server.kill()
                server.restart()
        assert killed_with is not None
        server.wait_listening()
        stored = list(client.get_all(limit=1000))
        stats = client.stats()
    assert killed_with == -signal.SIGKILL
    check_stored_once(records, acks, stored)
    assert stats["records"] == RESTART_TOTAL
    assert stats["requests"]["record"] > 0


# -- connection failures and timeouts -----------------------------------------------------


async def test_connection_refused_gives_up_after_the_policy_attempts() -> None:
    policy = CountingPolicy(attempts=4, first_delay=0.01, max_delay=0.02)
    client = AsyncClient(f"127.0.0.1:{closed_port()}", retry=policy)
    with pytest.raises(PerfdbClientError) as caught:
        await client.ping()
    await client.close()
    assert (caught.value.code, caught.value.retryable) == ("connection_failed", True)
    # Every try failed and each retry waited its pause (timer resolution makes wall-clock
    # comparisons flaky, so the pauses are counted, not timed).
    assert len(policy.drawn) == policy.attempts - 1


async def test_record_many_refused_connection_reports_the_first_record() -> None:
    policy = CountingPolicy(attempts=3, first_delay=0.01, max_delay=0.02)
    client = AsyncClient(f"127.0.0.1:{closed_port()}", retry=policy)
    with pytest.raises(PerfdbClientError) as caught:
        await collect(client.record_many([bench(seq) for seq in range(5)]))
    await client.close()
    assert (caught.value.code, caught.value.retryable) == ("connection_failed", True)
    assert caught.value.index == 0
    assert len(policy.drawn) == policy.attempts - 1


async def test_a_server_that_hangs_up_is_tried_attempts_times() -> None:
    async with fake_server(hang_up=True) as fake:
        async with AsyncClient(f"127.0.0.1:{fake.port}", retry=QUICK_RETRY, request_timeout=2.0) as client:
            with pytest.raises(PerfdbClientError) as caught:
                await client.stats()
            tries_for_stats = fake.connections
            with pytest.raises(PerfdbClientError) as unkeyed:
                await client.call("record", **bench(1))  # no request_id: never resent
        assert (caught.value.code, caught.value.retryable) == ("connection_failed", True)
        assert tries_for_stats == QUICK_RETRY.attempts
        assert unkeyed.value.code == "connection_failed"
        assert fake.connections == QUICK_RETRY.attempts + 1
        assert fake.received.count(b'"op":"stats"') == QUICK_RETRY.attempts


async def test_a_server_that_never_answers_times_out() -> None:
    policy = RetryPolicy(attempts=2, first_delay=0.01, max_delay=0.02)
    async with fake_server(hang_up=False) as fake:
        async with AsyncClient(f"127.0.0.1:{fake.port}", retry=policy, request_timeout=0.2) as client:
            with pytest.raises(PerfdbClientError) as caught:
                await client.ping()
        assert (caught.value.code, caught.value.retryable) == ("timeout", True)
        assert fake.received.count(b'"op":"ping"') == policy.attempts
        assert fake.connections == policy.attempts  # a timed-out connection is not reused


async def test_record_many_times_out_against_a_server_that_never_answers() -> None:
    # Several records in flight when the reply deadline passes: the client must give up on all
    # of them without leaving failed futures behind for the event loop to complain about.
    policy = RetryPolicy(attempts=2, first_delay=0.01, max_delay=0.02)
    async with fake_server(hang_up=False) as fake:
        async with AsyncClient(f"127.0.0.1:{fake.port}", retry=policy, request_timeout=0.2) as client:
            with pytest.raises(PerfdbClientError) as caught:
                await collect(client.record_many([bench(seq) for seq in range(3)]))
        assert (caught.value.code, caught.value.retryable, caught.value.index) == ("timeout", True, 0)
        assert fake.connections == policy.attempts
        assert fake.received.count(b'"op":"record"') == 3 * policy.attempts


def test_blocking_client_refused_and_unanswered() -> None:
    refused = Client(f"127.0.0.1:{closed_port()}", retry=QUICK_RETRY)
    with pytest.raises(PerfdbClientError) as caught:
        refused.ping()
    with pytest.raises(PerfdbClientError) as streaming:
        list(refused.record_many([bench(seq) for seq in range(3)]))
    refused.close()
    assert (caught.value.code, caught.value.retryable) == ("connection_failed", True)
    assert (streaming.value.code, streaming.value.index) == ("connection_failed", 0)
    with silent_port() as port:
        silent = Client(f"127.0.0.1:{port}", retry=RetryPolicy(attempts=2, first_delay=0.01), request_timeout=0.2)
        with pytest.raises(PerfdbClientError) as timed_out:
            silent.hello()
        silent.close()
    assert (timed_out.value.code, timed_out.value.retryable) == ("timeout", True)


# -- the blocking Client ------------------------------------------------------------------


async def test_blocking_client_reads_replies_however_the_reads_cut_them() -> None:
    """A reply line sent in many writes, its newline alone in the last one, or in one write, is
    found whole, once (TCP may join writes into one read, so this holds the reading to the
    replies rather than to exact read boundaries)."""
    big = {"id": None, "ok": True, "records": [{"n": n, "pad": "x" * 900} for n in range(1000)], "next_cursor": None}
    replies = [orjson.dumps(big) + b"\n", b'{"id":null,"ok":true,"n":1}\n', b'{"id":null,"ok":true,"n":2}\n']
    big_line = replies[0]
    cuts = [0, 100_000, 300_000, 700_000, len(big_line) - 1, len(big_line)]  # the newline alone, last
    pieces = [[big_line[start:end] for start, end in itertools.pairwise(cuts)], [replies[1][:5], replies[1][5:]]]
    pieces.append([replies[2]])

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in pieces:
            await reader.readline()
            for piece in reply:
                writer.write(piece)
                await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    def session(port: int) -> list[dict[str, Any]]:
        with Client(f"127.0.0.1:{port}") as client:
            return [client.call("ping") for _ in pieces]

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        seen = await asyncio.to_thread(session, server.sockets[0].getsockname()[1])
    assert seen == [big, orjson.loads(replies[1]), orjson.loads(replies[2])]


def client_error(call: Callable[[], object]) -> PerfdbClientError | None:
    """The PerfdbClientError a blocking call raised, or None if it did not raise one."""
    try:
        call()
    except PerfdbClientError as error:
        return error
    return None


def blocking_session(server_address: str) -> dict[str, Any]:
    """What the blocking client sees of a fresh server; run in a thread."""
    seen: dict[str, Any] = {}
    with Client(server_address) as client:
        seen["hello"] = client.hello()
        client.ping()
        seen["record"] = client.record(**bench(-1, tag="single"))
        seen["keyed"] = client.record(**bench(-2), request_id="once")
        seen["again"] = client.record(**bench(-3), request_id="once")
        records = [
            bench(seq, token="user-bob" if seq % 10 == 0 else "user-alice", tag="t" if seq % 4 == 0 else "")
            for seq in range(2000)
        ]
        seen["sent"] = records
        seen["acks"] = list(client.record_many(records))
        pages = list(client.pages("get_user", user_id="bob", limit=PAGE))
        seen["bob_page_sizes"] = [len(page["records"]) for page in pages]
        seen["bob"] = [record for page in pages for record in page["records"]]
        seen["alice_tagged"] = list(client.get_user("alice", tag="t", limit=PAGE))
        seen["all"] = list(client.get_all(limit=PAGE * 100))
        seen["single"] = list(client.get_user("alice", tag="single", limit=PAGE))
        seen["missing"] = client_error(lambda: client.record(access_token="user-alice", metrics={"qps": 1.0}))
        seen["rejected"] = client_error(lambda: client.record(**bench(1, token="not-a-valid-token")))
        seen["not_found"] = client_error(lambda: list(client.get_user("nobody")))
        seen["stats"] = client.stats()
    with Client(server_address) as client:
        refused = [bench(seq) for seq in range(50)]
        refused[31] = dict(NO_TEST_NAME)
        seen["refused_acks"] = []
        try:
            for ack in client.record_many(refused, window=8):
                seen["refused_acks"].append(ack)
        except PerfdbClientError as error:
            seen["refused"] = error
    return seen


async def test_blocking_client_against_a_real_server(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _):
        seen = await asyncio.to_thread(blocking_session, address(server))
    assert seen["hello"]["server"] == "perfdb"
    assert seen["record"]["user_id"] == "alice" and seen["record"]["duplicate"] is False
    assert seen["again"]["duplicate"] is True and seen["again"]["record_id"] == seen["keyed"]["record_id"]
    assert [record["record_id"] for record in seen["single"]] == [seen["record"]["record_id"]]
    assert isinstance(seen["single"][0].get("request_id"), str)  # generated by record()

    sent, acks = seen["sent"], seen["acks"]
    assert len(acks) == 2000
    by_id = {record["record_id"]: record for record in seen["all"]}
    for record, ack in zip(sent, acks, strict=True):
        assert ack["user_id"] == record["access_token"].removeprefix("user-")
        assert by_id[ack["record_id"]]["metrics"]["seq"] == record["metrics"]["seq"]
    bob_acks = [ack["record_id"] for ack in acks if ack["user_id"] == "bob"]
    assert ids(seen["bob"]) == sorted(bob_acks) and len(bob_acks) == 200
    assert seen["bob_page_sizes"] == [PAGE] * 28 + [4]
    tagged = sorted(ack["record_id"] for record, ack in zip(sent, acks, strict=True) if record["tag"] == "t")
    assert ids(seen["alice_tagged"]) == [record_id for record_id in tagged if by_id[record_id]["user_id"] == "alice"]
    assert ids(seen["all"]) == sorted(by_id) and len(seen["all"]) == 2002

    assert seen["missing"].code == "bad_request" and seen["missing"].message.startswith("test_name")
    assert seen["rejected"].code == "unauthenticated" and seen["rejected"].retryable is False
    assert seen["not_found"].code == "not_found"
    assert seen["refused"].code == "bad_request" and seen["refused"].index == 31
    assert len(seen["refused_acks"]) == 31
    assert seen["stats"]["records"] == 2002


def stop_streams_early(server_address: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """hello's reply after a refused record ended record_many, and after the caller stopped reading."""
    records = [bench(seq) for seq in range(40)]
    with Client(server_address) as client:
        refused = [*records[:3], dict(NO_TEST_NAME), *records[3:]]
        with contextlib.suppress(PerfdbClientError):
            for _ in client.record_many(refused, window=8):
                pass
        after_refusal = client.hello()
    with Client(server_address) as client:
        stream = client.record_many(records, window=8)
        for _ in range(2):
            next(stream)
        assert isinstance(stream, Generator)
        stream.close()
        after_break = client.hello()
    return after_refusal, after_break


async def test_blocking_client_answers_correctly_after_record_many_stops_early(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _):
        after_refusal, after_break = await asyncio.to_thread(stop_streams_early, address(server))
    assert after_refusal.get("server") == "perfdb", f"hello after a refused record got {after_refusal}"
    assert after_break.get("server") == "perfdb", f"hello after leaving record_many early got {after_break}"


async def test_async_client_answers_correctly_after_record_many_stops_early(tmp_path: Path) -> None:
    records = [bench(seq) for seq in range(40)]
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        with pytest.raises(PerfdbClientError):
            await collect(client.record_many([*records[:3], dict(NO_TEST_NAME), *records[3:]], window=8))
        after_refusal = await client.hello()
        stream = client.record_many(records, window=8)
        for _ in range(2):
            await anext(stream)
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()
        after_break = await client.hello()
    assert after_refusal.get("server") == "perfdb", after_refusal
    assert after_break.get("server") == "perfdb", after_break


async def test_blocking_record_many_edge_windows(tmp_path: Path) -> None:
    # Nothing is owed once the last ack is out: the client must not wait for another reply.
    def run(server_address: str) -> list[tuple[list[dict[str, Any]] | PerfdbClientError, float]]:
        outcomes: list[tuple[list[dict[str, Any]] | PerfdbClientError, float]] = []
        with Client(server_address, retry=RetryPolicy(attempts=2, first_delay=0.01), request_timeout=10.0) as client:
            client.ping()
            for records, window in (([], 4), ([bench(seq) for seq in range(3)], 1)):
                started = time.monotonic()
                try:
                    outcomes.append((list(client.record_many(records, window=window)), time.monotonic() - started))
                except PerfdbClientError as error:
                    outcomes.append((error, time.monotonic() - started))
        return outcomes

    async with perfdb_with_provider(tmp_path) as (server, _):
        (empty, empty_seconds), (one_at_a_time, one_seconds) = await asyncio.to_thread(run, address(server))
    assert empty == [], f"record_many([]) should yield nothing, got {empty!r}"
    assert isinstance(one_at_a_time, list) and len(one_at_a_time) == 3, one_at_a_time
    # Waiting for a reply nobody owed would take the 10 s request timeout (twice, with the retry).
    assert empty_seconds < 5, f"record_many([]) took {empty_seconds:.2f}s (waited for a reply nobody owed)"
    assert one_seconds < 5, f"record_many(window=1) took {one_seconds:.2f}s (waited for a reply nobody owed)"


# -- admin export and import --------------------------------------------------------------


async def export_everything(client: AsyncClient, **query: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every export page, following next_cursor; returns (records, pages)."""
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        page = await client.call("export", admin_key=ADMIN_KEY, limit=PAGE, cursor=cursor, **query)
        pages.append(page)
        cursor = page["next_cursor"]
        if not cursor:
            return [record for page in pages for record in page["records"]], pages
    raise AssertionError("export paging did not end")


def merged_users(pages: list[dict[str, Any]]) -> dict[str, Any]:
    users: dict[str, Any] = {}
    for page in pages:
        users.update(page["users"])
    return users


async def test_export_then_import_into_a_fresh_server(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    records = [bench(seq, tag="x" if seq % 2 else "", request_id=f"e-{seq}") for seq in range(17)]
    records += [bench(100 + seq, token="user-bob", sys_info={"os": "Linux"}) for seq in range(6)]
    async with (
        perfdb_with_provider(tmp_path / "a", admin_key_file=key_file) as (source, _),
        perfdb_with_provider(tmp_path / "b", admin_key_file=key_file) as (target, _),
        AsyncClient(address(source)) as old,
        AsyncClient(address(target)) as new,
    ):
        acks = [ack async for ack in old.record_many(records)]
        exported, pages = await export_everything(old)
        imports = [
            await new.call("import", admin_key=ADMIN_KEY, records=page["records"], users=page["users"])
            for page in pages
        ]
        reexported, new_pages = await export_everything(new)
        again = [
            await new.call("import", admin_key=ADMIN_KEY, records=page["records"], users=page["users"])
            for page in pages
        ]
        after_again = await new.stats()
        since = acks[17]["timestamp"]
        filtered, _ = await export_everything(old, tag="x", since=since)
        readable = [record async for record in new.get_user("alice", limit=PAGE)]
    assert len(pages) == 4 and [len(page["records"]) for page in pages] == [7, 7, 7, 2]
    assert ids(exported) == sorted(ids(acks))
    assert [(reply["imported"], reply["duplicates"]) for reply in imports] == [(7, 0), (7, 0), (7, 0), (2, 0)]
    assert reexported == exported
    assert merged_users(new_pages) == merged_users(pages)
    assert merged_users(pages)["alice"]["email"] == "alice@example.com"  # export gives full profiles
    assert [(reply["imported"], reply["duplicates"]) for reply in again] == [(0, 7), (0, 7), (0, 7), (0, 2)]
    assert after_again["records"] == 23 and after_again["users"] == 2
    assert filtered == [record for record in exported if record["tag"] == "x" and record["timestamp"] >= since]
    alice_order = sorted(range(17), key=lambda seq: acks[seq]["record_id"])  # commit order
    assert [record["metrics"]["seq"] for record in readable] == alice_order
    assert {record["metrics"]["seq"]: record["request_id"] for record in readable} == {
        seq: f"e-{seq}" for seq in range(17)
    }


async def test_export_and_import_need_the_admin_key(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY)
    (tmp_path / "keyed").mkdir()
    (tmp_path / "open").mkdir()
    async with (
        perfdb_with_provider(tmp_path / "keyed", admin_key_file=key_file) as (keyed, _),
        perfdb_with_provider(tmp_path / "open") as (keyless, _),
        AsyncClient(address(keyed), retry=QUICK_RETRY) as client,
        AsyncClient(address(keyless), retry=QUICK_RETRY) as other,
    ):
        await client.record(**bench(1))
        _, pages = await export_everything(client)
        page = pages[0]
        failures: list[PerfdbClientError] = []
        attempts = [
            client.call("export"),
            client.call("export", admin_key="wrong-key-wrong-key-wrong"),
            client.call("import", records=page["records"], users=page["users"]),
            client.call("import", admin_key=ADMIN_KEY[:-1] + "?", records=page["records"], users=page["users"]),
            other.call("export", admin_key=ADMIN_KEY),
            other.call("import", admin_key=ADMIN_KEY, records=page["records"], users=page["users"]),
        ]
        for attempt in attempts:
            with pytest.raises(PerfdbClientError) as caught:
                await attempt
            failures.append(caught.value)
        other_stats = await other.stats()
    assert [(error.code, error.retryable) for error in failures] == [("forbidden", False)] * 6
    assert all(ADMIN_KEY not in error.message for error in failures)
    assert other_stats["records"] == 0


# -- RecordWindow, no network -------------------------------------------------------------


def window_of(count: int, size: int, policy: RetryPolicy = QUICK_RETRY) -> RecordWindow:
    return RecordWindow(iter([bench(seq) for seq in range(count)]), size, policy)


def acks(window: RecordWindow) -> list[dict[str, Any]]:
    """The ready outcomes of a window, which must all be acks."""
    ready = list(window.outcomes())
    assert all(isinstance(outcome, dict) for outcome in ready), ready
    return [outcome for outcome in ready if isinstance(outcome, dict)]


def test_window_acks_in_input_order_when_some_replies_say_retry() -> None:
    window = window_of(5, 3)
    first = window.to_send()
    assert [request["metrics"]["seq"] for request in decoded(first)] == [0, 1, 2]
    assert window.on_reply(ok_reply(0)) == 0.0
    assert window.on_reply(error_reply("storage_error", True)) > 0.0  # record 1: try again
    assert window.on_reply(ok_reply(2)) == 0.0
    assert [ack["n"] for ack in acks(window)] == [0]  # 2 waits behind 1
    second = window.to_send()
    assert second[0] == first[1]  # the resend comes first, byte for byte
    assert [request["metrics"]["seq"] for request in decoded(second)] == [1, 3]
    window.on_reply(ok_reply(1))
    assert [ack["n"] for ack in acks(window)] == [1, 2]
    window.on_reply(error_reply("shutting_down", True))  # record 3
    third = window.to_send()
    assert [request["metrics"]["seq"] for request in decoded(third)] == [3, 4]
    window.on_reply(ok_reply(3))
    window.on_reply(ok_reply(4))
    assert [ack["n"] for ack in acks(window)] == [3, 4]
    assert window.to_send() == []
    assert window.finished and window.awaiting_replies == 0


def test_window_stamps_request_ids_and_keeps_given_ones() -> None:
    records = [bench(0, request_id="mine"), {**bench(1), "op": "ping"}, bench(2)]
    window = RecordWindow(iter(records), 8, QUICK_RETRY)
    sent = decoded(window.to_send())
    assert [request["op"] for request in sent] == ["record"] * 3
    assert sent[0]["request_id"] == "mine"
    assert sent[1]["request_id"] != sent[2]["request_id"]
    assert all(isinstance(request["request_id"], str) and request["request_id"] for request in sent)


def test_window_on_disconnect_resends_outstanding_in_input_order() -> None:
    window = window_of(6, 4)
    first = window.to_send()
    assert len(first) == 4 and window.awaiting_replies == 4
    window.on_reply(ok_reply(0))
    window.on_reply(error_reply("auth_unavailable", True))  # record 1 queued for resend
    assert [ack["n"] for ack in acks(window)] == [0]
    assert window.on_disconnect(PerfdbClientError("connection_failed", "gone", True)) > 0.0
    assert window.awaiting_replies == 0
    resent = window.to_send()
    assert resent[:3] == first[1:]  # 1, 2, 3 again, same bytes, same order
    assert [request["metrics"]["seq"] for request in decoded(resent)] == [1, 2, 3, 4]
    assert [request["request_id"] for request in decoded(resent[:3])] == [
        request["request_id"] for request in decoded(first[1:])
    ]
    for number in (1, 2, 3, 4):
        window.on_reply(ok_reply(number))
    assert [ack["n"] for ack in acks(window)] == [1, 2, 3, 4]


def test_window_refusal_is_an_outcome_with_its_index_and_the_rest_go_on() -> None:
    window = window_of(10, 4)
    window.to_send()
    for number in range(3):
        window.on_reply(ok_reply(number))
    assert [ack["n"] for ack in acks(window)] == [0, 1, 2]
    window.to_send()
    assert window.on_reply(error_reply("bad_request", False)) == 0.0  # record 3
    [refusal] = list(window.outcomes())
    assert isinstance(refusal, PerfdbClientError)
    assert (refusal.code, refusal.index, refusal.retryable) == ("bad_request", 3, False)
    window.on_reply(ok_reply(4))
    assert [ack["n"] for ack in acks(window)] == [4]


def test_window_gives_up_after_the_policy_attempts_in_a_row() -> None:
    policy = CountingPolicy(attempts=4, first_delay=0.01, max_delay=0.02)
    window = window_of(3, 2, policy)
    window.to_send()
    error = PerfdbClientError("connection_failed", "gone", True)
    for _ in range(policy.attempts - 1):
        assert window.on_disconnect(error) > 0.0
        window.to_send()
    with pytest.raises(PerfdbClientError) as caught:
        window.on_disconnect(error)
    assert caught.value.code == "connection_failed" and caught.value.index == 0
    assert len(policy.drawn) == policy.attempts - 1


def test_window_success_resets_the_failure_count() -> None:
    window = window_of(4, 1, RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.02))
    for number in range(4):
        for _ in range(2):  # attempts - 1 failures for every record, then success
            window.to_send()
            assert window.on_reply(error_reply("storage_error", True)) > 0.0
        window.to_send()
        window.on_reply(ok_reply(number))
        assert [ack["n"] for ack in acks(window)] == [number]
    window.to_send()
    assert window.finished


# -- deleting ---------------------------------------------------------------------------------


def blocking_deletions(server_address: str, record_ids: list[str]) -> dict[str, Any]:
    """The blocking client's delete_record, delete_user and audit_log; run in a thread."""
    with Client(server_address) as client:
        return {
            "owner": client.delete_record(record_ids[0], access_token="user-alice"),
            "again": client.delete_record(record_ids[0], access_token="user-alice"),
            "admin": client.delete_record(record_ids[1], admin_key=ADMIN_KEY),
            "user": client.delete_user("bob", admin_key=ADMIN_KEY),
            "audit": list(client.audit_log(admin_key=ADMIN_KEY, limit=1)),
            "missing": caught(lambda: client.delete_record("0" * 20, admin_key=ADMIN_KEY)),
            "left": ids(list(client.get_all())),
        }


def caught(call: Any) -> PerfdbClientError | None:
    try:
        call()
    except PerfdbClientError as error:
        return error
    return None


async def test_both_clients_delete_and_read_the_audit_log(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    async with (
        perfdb_with_provider(tmp_path, admin_key_file=key_file) as (server, _),
        AsyncClient(address(server)) as client,
    ):
        acks = [ack async for ack in client.record_many([bench(seq) for seq in range(6)])]
        bob = await client.record(**bench(99, token="user-bob"))
        alice = ids(acks)

        deleted = await client.delete_record(alice[0], access_token="user-alice")
        again = await client.delete_record(alice[0], access_token="user-alice")
        with pytest.raises(PerfdbClientError) as forbidden:
            await client.delete_record(alice[1], access_token="user-bob")
        entries = [entry async for entry in client.audit_log(admin_key=ADMIN_KEY, limit=1)]

        seen = await asyncio.to_thread(blocking_deletions, address(server), alice[2:])
        after = [entry async for entry in client.audit_log(admin_key=ADMIN_KEY)]
    assert (deleted["deleted"], again["deleted"]) == (True, False)
    assert (forbidden.value.code, forbidden.value.retryable) == ("forbidden", False)
    assert [(entry["actor"], entry["record_ids"]) for entry in entries] == [("owner", [alice[0]])]

    assert (seen["owner"]["deleted"], seen["again"]["deleted"], seen["admin"]["deleted"]) == (True, False, True)
    assert (seen["user"]["user_id"], seen["user"]["deleted"], seen["user"]["records"]) == ("bob", True, 1)
    assert [entry["op"] for entry in seen["audit"]] == ["delete_user", *["delete_record"] * 3]  # newest first
    assert seen["missing"] is not None and seen["missing"].code == "not_found"
    assert seen["left"] == [alice[1], *alice[4:]]  # bob and his record are gone; the forbidden delete changed nothing
    assert bob["record_id"] not in seen["left"]
    assert after == seen["audit"] and seen["audit"][-1] == entries[0]


async def test_both_clients_speak_the_regression_ops(tmp_path: Path) -> None:
    rng = random.Random(21)
    levels = [1000.0 * (1 + rng.gauss(0, 0.01)) for _ in range(40)] + [
        850 * (1 + rng.gauss(0, 0.01)) for _ in range(30)
    ]
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    async with (
        perfdb_with_provider(tmp_path, admin_key_file=key_file, regression_detection=True) as (server, _),
        AsyncClient(address(server)) as client,
    ):
        acks = [await client.record(access_token="user-alice", test_name="t", metrics={"qps": v}) for v in levels]
        assert acks[-31]["verdicts"][0]["status"] == "no_change"
        assert acks[-30]["verdicts"][0]["status"] == "regression"
        custom = await client.record(
            access_token="user-alice", test_name="t", metrics={"fps": 60.0}, better={"fps": "higher"}, baseline_tag="x"
        )
        assert custom["verdicts"][0]["direction"] == "higher"
        monitor = server.alert_monitor
        assert monitor is not None
        while True:  # each listing is followed by a wait for the next pass, unless it found the alert
            seen = monitor.passes
            alerts = [alert async for alert in client.regressions(test_name="t")]
            if alerts:
                break
            await monitor.wait_for_pass(seen)
        (alert,) = alerts
        excluded = await client.exclude_record(acks[0]["record_id"], note="warm-up", access_token="user-alice")
        record = await client.get_record(acks[0]["record_id"])
        updated = await client.update_alert(alert["alert_id"], "acknowledged", note="ok", access_token="user-alice")
        with Client(address(server)) as blocking:
            blocking_results = await asyncio.to_thread(
                lambda: (
                    blocking.record(access_token="user-alice", test_name="t", metrics={"qps": 850.0}),
                    list(blocking.regressions(state="acknowledged")),
                    blocking.update_alert(alert["alert_id"], "resolved", admin_key=ADMIN_KEY),
                    blocking.exclude_record(acks[0]["record_id"], excluded=False, admin_key=ADMIN_KEY),
                    blocking.get_record(acks[0]["record_id"]),
                )
            )
    assert excluded["excluded"] is True and record["excluded"] is True and record["exclusion"]["note"] == "warm-up"
    assert updated["state"] == "acknowledged" and updated["updated_by"] == "alice"
    blocking_ack, acknowledged, resolved, restored, blocking_record = blocking_results
    assert blocking_ack["verdicts"][0]["metric"] == "qps"
    assert [found["alert_id"] for found in acknowledged] == [alert["alert_id"]]
    assert resolved["state"] == "resolved" and resolved["updated_by"] == "admin"
    assert restored["excluded"] is False and "excluded" not in blocking_record


async def test_both_clients_send_a_record_batch_that_can_be_resent_safely(tmp_path: Path) -> None:
    records = [{"test_name": "unary", "metrics": {"qps": float(n)}} for n in range(20)]
    records[7]["metrics"] = {"qps": "fast"}  # refused alone
    keyed = [{**record, "request_id": f"run-1-{n}"} for n, record in enumerate(records[:3])]
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(address(server)) as client:
        results = await client.record_batch("user-alice", records)
        with Client(address(server)) as blocking:
            first = await asyncio.to_thread(blocking.record_batch, "user-alice", keyed)
            again = await asyncio.to_thread(blocking.record_batch, "user-alice", keyed)
        stored = await collect(client.get_user("alice"))
    assert results[7]["error"]["code"] == "bad_request"
    assert [result["duplicate"] for n, result in enumerate(results) if n != 7] == [False] * 19
    # The caller's records gained no request_id; what was sent did, each its own.
    assert all("request_id" not in record for record in records)
    assert len({record["request_id"] for record in stored}) == len(stored) == 19 + 3
    assert [result["duplicate"] for result in first] == [False] * 3
    assert again == [{**result, "duplicate": True} for result in first]


async def test_record_batches_yield_every_outcome_in_order_and_retry_what_the_rate_limit_refused(
    tmp_path: Path,
) -> None:
    records = [bench(n) for n in range(60)]
    for record in records:
        del record["access_token"]
    records[33]["metrics"] = {"qps": "fast"}  # refused for good: never retried
    policy = RetryPolicy(attempts=40, first_delay=0.05, max_delay=0.25)
    async with (
        perfdb_with_provider(tmp_path, user_rate=200.0, user_burst=10) as (server, _),
        AsyncClient(address(server), retry=policy) as client,
    ):
        outcomes = [o async for o in client.record_batches("user-alice", records, batch_size=16, window=2)]
        stored = await collect(client.get_user("alice"))
    refused = [outcome for outcome in outcomes if isinstance(outcome, PerfdbClientError)]
    assert [(error.code, error.index) for error in refused] == [("bad_request", 33)]
    acks = [outcome for outcome in outcomes if not isinstance(outcome, PerfdbClientError)]
    assert len(outcomes) == 60 and all(not ack["duplicate"] for ack in acks)
    # In input order, each record stored once although most were refused as overloaded at first.
    by_id = {record["record_id"]: record["metrics"]["seq"] for record in stored}
    assert [by_id[ack["record_id"]] for ack in acks] == [n for n in range(60) if n != 33]
