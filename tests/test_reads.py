"""Newest-first, filtered and metric-sorted reads, and the overview, over real sockets against
a real server and LevelDB, checked against brute force over the records that were written."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from perfdb.records import record_ids
from perfdb.records.profiles import Profile
from perfdb.records.record_ids import record_id_micros
from perfdb.records.schema import Query, RecordDraft
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.storage import layout
from perfdb.storage import store as store_module
from perfdb.storage.overview import PENDING_ROWS, Overview
from tests.support import (
    Connection,
    connect,
    error_code,
    opened_store,
    page_through,
    perfdb_with_provider,
    record_request,
    send_burst,
)

USERS = ("alice", "bob", "carol")
TESTS = ("unary", "streaming", "ping_pong", "rare")
TAGS = ("", "nightly", "pr")


class DenseClock:
    """Stands in for the server's clock: many records share each microsecond, as in a burst
    from a fast machine, so record ids differ only in their sequence part."""

    def __init__(self, records_per_tick: int) -> None:
        self._base = now_micros() - 10_000_000
        self._calls = 0
        self._per_tick = records_per_tick

    def __call__(self) -> int:
        self._calls += 1
        return self._base + self._calls // self._per_tick


def burst_requests(count: int, seed: int) -> list[dict[str, Any]]:
    """Varied records: every user, test and tag, qps with many ties, some without qps."""
    chooser = random.Random(seed)
    requests = []
    for n in range(count):
        metrics: dict[str, Any] = {"perc_lat_50": chooser.choice([90.5, 120, 250.25, 1e-5])}
        if n % 17:
            metrics["qps"] = chooser.choice([1000, 2000.5, 7, 0, -3.5, 1e9, chooser.uniform(0, 5e5)])
        test_name = "rare" if n % 97 == 0 else TESTS[n % 3]
        requests.append(
            record_request(
                token=f"user-{USERS[n % len(USERS)]}",
                test_name=test_name,
                tag=TAGS[(n // 3) % len(TAGS)],
                metrics=metrics,
            )
        )
    return requests


async def write_burst(conn: Connection, count: int, seed: int = 1) -> list[dict[str, Any]]:
    """Store `count` records in one pipelined burst; returns them as stored (fields we check)."""
    requests = burst_requests(count, seed)
    acks = await send_burst(conn, requests)
    written = []
    for request, ack in zip(requests, acks, strict=True):
        assert ack["ok"], ack
        written.append(
            {
                "record_id": ack["record_id"],
                "user_id": ack["user_id"],
                "test_name": request["test_name"],
                "tag": request["tag"],
                "metrics": request["metrics"],
            }
        )
    return written


def matching(records: list[dict[str, Any]], **filters: str) -> list[dict[str, Any]]:
    return [r for r in records if all(r[field] == value for field, value in filters.items())]


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["record_id"] for r in records]


def paged_ids(pages: list[dict[str, Any]], limit: int) -> list[str]:
    for page in pages:
        assert len(page["records"]) <= limit
    return [r["record_id"] for page in pages for r in page["records"]]


FILTERS: list[dict[str, str]] = [
    {},
    {"test_name": "rare"},
    {"tag": "nightly"},
    {"test_name": "unary", "tag": "pr"},
    {"test_name": "nonexistent"},
]


async def test_forward_and_reverse_paging_return_every_record_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_ids, "now_micros", DenseClock(records_per_tick=40))
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 10_500)
        assert len({r["record_id"][:14] for r in written}) < len(written) // 10  # dense indeed
        oldest_first = sorted(written, key=lambda r: r["record_id"])
        for filters in FILTERS:
            expected = ids(matching(oldest_first, **filters))
            for limit in (1000, 333):
                forward = await page_through(conn, "get_all", limit=limit, **filters)
                assert paged_ids(forward, limit) == expected, filters
                backward = await page_through(conn, "get_all", limit=limit, reverse=True, **filters)
                assert paged_ids(backward, limit) == expected[::-1], filters
                # Every first page says how many there are when one count answers it.
                if len(filters) <= 1:
                    assert forward[0]["total"] == backward[0]["total"] == len(expected)
                else:
                    assert "total" not in forward[0]
                assert all("total" not in page for page in forward[1:])
        for filters in ({}, {"tag": ""}, {"test_name": "streaming", "tag": "nightly"}):
            expected = ids(matching(oldest_first, user_id="bob", **filters))
            backward = await page_through(conn, "get_user", user_id="bob", limit=250, reverse=True, **filters)
            assert paged_ids(backward, 250) == expected[::-1]
            forward = await page_through(conn, "get_user", user_id="bob", limit=4000, **filters)
            assert paged_ids(forward, 4000) == expected
            assert forward[0].get("total") == (None if filters else len(expected))
        # A time window inside one dense microsecond, newest first.
        micros = int(oldest_first[5000]["record_id"][:14], 16)
        window = {"since": format_micros(micros), "until": format_micros(micros + 2)}
        inside = [r for r in oldest_first if micros <= int(r["record_id"][:14], 16) < micros + 2]
        backward = await page_through(conn, "get_all", limit=7, reverse=True, **window)
        assert paged_ids(backward, 7) == ids(inside)[::-1] and len(inside) >= 40
        assert "total" not in backward[0]


def brute_force_sorted(records: list[dict[str, Any]], metric: str, descending: bool) -> list[str]:
    having = [r for r in records if metric in r["metrics"]]
    lacking = [r for r in records if metric not in r["metrics"]]
    having.sort(key=lambda r: r["record_id"])
    having.sort(key=lambda r: r["metrics"][metric], reverse=descending)  # stable: ties by id
    return ids(having) + ids(sorted(lacking, key=lambda r: r["record_id"]))


def force_sorted_walk(monkeypatch: pytest.MonkeyPatch, walk: str) -> None:
    """Make every read sorted by a core metric walk the metric's index ("metric index") or rank
    the records its filters (or time range) hold ("filter index"), whatever each would cost; a
    read of everything walks the index either way."""
    walks = walk == "metric index"

    def chosen(snapshot: Any, source: Any, query: Query, max_examined: int) -> bool:
        everything = source.prefix == layout.RECORD_PREFIX and query.since is None and query.until is None
        return query.sort in layout.INDEXED_METRICS and (walks or everything)

    monkeypatch.setattr(store_module, "_walks_metric_index", chosen)


@pytest.mark.parametrize("walk", ["metric index", "filter index"])
async def test_sorting_ranks_the_whole_filtered_set_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, walk: str
) -> None:
    """Both ways of a sorted read give the brute-force order: the core metric's index (here even
    for small filters), and ranking the filter's own entries (here for every filter)."""
    monkeypatch.setattr(record_ids, "now_micros", DenseClock(records_per_tick=25))
    force_sorted_walk(monkeypatch, walk)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 6000, seed=2)
        # The true top result by qps comes first, though it is neither newest nor oldest; with no
        # filter the metric index gives it from the first entry, and one more shows a next page.
        top = await conn.request("get_all", sort="qps", limit=1)
        best = max((r for r in written if "qps" in r["metrics"]), key=lambda r: r["metrics"]["qps"])
        assert top["records"][0]["metrics"]["qps"] == best["metrics"]["qps"]
        assert (top["examined"], top["complete"], top["total"]) == (2, True, 6000)
        filtered = await conn.request("get_all", sort="qps", limit=1, test_name="unary")
        unary = len(matching(written, test_name="unary"))
        if walk == "metric index":  # a third of the records are unary: a few entries find one
            assert filtered["examined"] < 100
        else:
            assert filtered["examined"] == unary
        for filters in ({}, {"test_name": "unary"}, {"tag": "pr", "test_name": "streaming"}, {"test_name": "nope"}):
            for order, descending in (("desc", True), ("asc", False)):
                expected = brute_force_sorted(matching(written, **filters), "qps", descending)
                pages = await page_through(conn, "get_all", sort="qps", order=order, limit=700, **filters)
                assert paged_ids(pages, 700) == expected, (filters, order)
                assert all(page["complete"] for page in pages)
        # Small pages: cursors land inside tie groups (a thousand records share qps 1000) and
        # on the records without qps, which come last.
        for order, descending in (("desc", True), ("asc", False)):
            pages = await page_through(conn, "get_all", sort="qps", order=order, limit=37)
            assert paged_ids(pages, 37) == brute_force_sorted(written, "qps", descending), order
        # A time range inside the burst.
        oldest_first = sorted(written, key=lambda r: r["record_id"])
        # (Records committed in one write batch share their time: the bounds are records' times.)
        micros = int(oldest_first[2000]["record_id"][:14], 16)
        end = int(oldest_first[4000]["record_id"][:14], 16) + 1
        window = {"since": format_micros(micros), "until": format_micros(end)}
        inside = [r for r in written if micros <= int(r["record_id"][:14], 16) < end]
        pages = await page_through(conn, "get_all", sort="qps", limit=100, tag="nightly", **window)
        assert paged_ids(pages, 100) == brute_force_sorted(matching(inside, tag="nightly"), "qps", True)
        assert 2000 < len(inside) < len(written)
        expected = brute_force_sorted(matching(written, user_id="carol"), "perc_lat_50", False)
        pages = await page_through(conn, "get_user", user_id="carol", sort="perc_lat_50", order="asc", limit=900)
        assert paged_ids(pages, 900) == expected
        # A metric nobody has: every record, in record-id order.
        pages = await page_through(conn, "get_all", sort="no_such_metric", limit=5000, test_name="rare")
        assert paged_ids(pages, 5000) == ids(sorted(matching(written, test_name="rare"), key=lambda r: r["record_id"]))


async def test_a_sorted_read_past_its_bound_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with perfdb_with_provider(tmp_path, max_sort_examined=50) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 250, seed=3)
        # Ranking a filter's entries: only the newest 50 of alice's 84 are ranked.
        force_sorted_walk(monkeypatch, "filter index")
        reply = await conn.request("get_user", user_id="alice", sort="qps", limit=5)
        hello = await conn.request("hello")
        # The metric index: a page that the bound cuts short ranks exactly but holds what it found
        # (here fewer than `limit` of the rare test), and its cursor goes on past what it examined.
        force_sorted_walk(monkeypatch, "metric index")
        pages = await page_through(conn, "get_all", sort="qps", order="asc", limit=5, test_name="rare")
    assert hello["limits"]["max_sort_examined"] == 50
    assert (reply["examined"], reply["complete"]) == (50, False)
    newest = sorted(matching(written, user_id="alice"), key=lambda r: r["record_id"])[-50:]  # what was examined
    assert ids(reply["records"]) == brute_force_sorted(newest, "qps", True)[:5]
    assert paged_ids(pages, 5) == brute_force_sorted(matching(written, test_name="rare"), "qps", False)
    assert len(pages) == 5 and [page["examined"] for page in pages] == [50, 50, 50, 50, 50]
    assert [page["complete"] for page in pages] == [False] * 4 + [True]


@pytest.mark.timeout(180)
async def test_a_sorted_read_over_30000_records_of_one_filter_finds_the_true_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slow machine's 30,000 results, all below everyone else's qps but one old fast run among
    them. Whichever way the read goes (by cost; ranking the filter; walking the qps index) the true
    top comes first, page after page; ranking from the user or test index entries reads only the
    page's records."""
    async with opened_store(tmp_path / "db") as store:
        slow, fast = Profile.create("static:slow", {}), Profile.create("static:fast", {})
        drafts = []
        for n in range(36_000):
            if n % 6:  # 30,000 of the slow machine, interleaved with the others'
                qps: float = 1_000_000.5 if n == 12_001 else float(n % 4999)
                drafts.append((slow, RecordDraft("slow_test", "slow", {}, {"qps": qps, "perc_lat_50": n % 77}, {}, {})))
            else:
                drafts.append((fast, RecordDraft("fast_test", "fast", {}, {"qps": 10_000.0 + n}, {}, {})))
        written = []
        for first in range(0, len(drafts), 4000):
            chunk = drafts[first : first + 4000]
            acks = await asyncio.gather(*(store.submit(profile, draft) for profile, draft in chunk))
            written += [
                {"record_id": ack.record_id, "user_id": ack.user_id, "metrics": draft.metrics}
                for ack, (_, draft) in zip(acks, chunk, strict=True)
            ]
        slow_records = [r for r in written if r["user_id"] == "static:slow"]
        assert len(slow_records) == 30_000
        expected = {descending: brute_force_sorted(slow_records, "qps", descending) for descending in (True, False)}
        assert expected[True][0] == written[12_001]["record_id"]
        counting = CountingDB(store._db)
        store._db = counting
        try:

            def query(**fields: Any) -> Query:
                return Query(**{**dict.fromkeys(("user_id", "test_name", "tag", "since", "until", "cursor")), **fields})

            for walk in ("by cost", "filter index", "metric index"):
                if walk != "by cost":
                    force_sorted_walk(monkeypatch, walk)
                for filters in ({"user_id": "static:slow"}, {"test_name": "slow_test"}, {"tag": "slow"}):
                    for descending in (True, False):
                        sort = {"limit": 10, "sort": "qps", "descending": descending, **filters}
                        counting.take_counts()
                        page = await store.get_all(query(**sort))
                        gets = counting.take_record_gets()
                        following = await store.get_all(query(**sort, cursor=page.next_cursor))
                        where = (walk, filters, descending)
                        assert ids([orjson.loads(r) for r in page.records]) == expected[descending][:10], where
                        assert ids([orjson.loads(r) for r in following.records]) == expected[descending][10:20], where
                        assert page.complete, where
                        if walk == "filter index":
                            assert page.examined == 30_000, where
                            if "tag" not in filters:  # the tag index entries carry no metrics
                                assert gets == 10, where  # the page's records only
        finally:
            store._db = counting.real


def histogram_check(values: list[float], histogram: list[list[Any]]) -> None:
    """Every bucket counts exactly the values inside its bounds, and all values are counted."""
    assert sum(count for _, _, count in histogram) == len(values)
    for lower, upper, count in histogram:
        inside = [v for v in values if (lower is None or v >= lower) and (upper is None or v < upper)]
        assert len(inside) == count, (lower, upper)


def check_overview(reply: dict[str, Any], written: list[dict[str, Any]], metric: str) -> None:
    assert reply["ok"], reply
    expected_tests = {r["test_name"] for r in written if metric in r["metrics"]}
    assert set(reply["tests"]) == expected_tests
    for test_name, summary in reply["tests"].items():
        records = matching(written, test_name=test_name)
        values = [r["metrics"][metric] for r in records if metric in r["metrics"]]
        assert summary["records"] == len(records)
        assert (summary["count"], summary["min"], summary["max"]) == (len(values), min(values), max(values))
        assert math.isclose(summary["sum"], math.fsum(values), rel_tol=1e-9, abs_tol=1e-6)
        histogram_check(values, summary["histogram"])
        users: dict[str, list[float]] = {}
        for r in records:
            if metric in r["metrics"]:
                users.setdefault(r["user_id"], []).append(r["metrics"][metric])
        best = max if reply["better"] == "higher" else min
        assert summary["users"] == {u: {"count": len(v), "best": best(v)} for u, v in users.items()}


def test_overview_adds_rows_in_bulk_exactly_whatever_their_shape() -> None:
    """Rows wait and are added in bulk (numpy): the aggregates equal a brute-force count over rows
    that mix ints and floats, lack metrics, add metrics of their own, across several bulk adds."""
    rng = random.Random(12)
    written: list[dict[str, Any]] = []
    for index in range(2 * PENDING_ROWS + 2345):
        metrics: dict[str, Any] = {
            "qps": rng.randint(0, 10**6) if index % 3 == 0 else rng.uniform(0, 1e6),
            "perc_lat_99": rng.lognormvariate(3, 3),
        }
        if index % 7 == 0:
            del metrics["perc_lat_99"]  # this test's rows do not all have every metric
        if index % 11 == 0:
            metrics["custom"] = -rng.random()
        test_name = "one_shape" if index % 4 == 0 else f"test_{index % 3}"
        if test_name == "one_shape":
            metrics = {"qps": metrics["qps"]}
        written.append({"test_name": test_name, "user_id": f"user{rng.randrange(40)}", "metrics": metrics})
    overview = Overview()
    start = 0
    while start < len(written):
        size = rng.choice([1, 17, 900, 4000])
        overview.batch_writing()
        overview.batch_written(
            [(r["test_name"], r["user_id"], r["metrics"]) for r in written[start : start + size]], ()
        )
        start += size
        if rng.random() < 0.1:  # a report in between adds what waits, and later rows come on top
            check_overview({"ok": True, **overview.report(None, "qps")}, written[:start], "qps")
    for metric in ("qps", "perc_lat_99", "custom"):
        check_overview({"ok": True, **overview.report(None, metric)}, written, metric)


async def test_overview_matches_brute_force_before_and_after_a_restart(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 3000, seed=4)
        check_overview(await conn.request("overview", metric="qps"), written, "qps")
    # Reopened, the overview is rebuilt from the records; new records then add to it.
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        written += await write_burst(conn, 1000, seed=5)
        qps = await conn.request("overview", metric="qps")
        latency = await conn.request("overview", metric="perc_lat_50")
        one = await conn.request("overview", metric="qps", test_name="rare")
        none = await conn.request("overview", metric="qps", test_name="no such test")
        narrowed = {user: await conn.request("overview", metric="qps", user_id=user) for user in (*USERS, "nobody")}
    check_overview(qps, written, "qps")
    check_overview(latency, written, "perc_lat_50")
    assert qps["better"] == "higher" and latency["better"] == "lower"
    assert list(one["tests"]) == ["rare"] and one["tests"]["rare"] == qps["tests"]["rare"]
    assert none["tests"] == {}
    # Narrowed to one user: the tests where they have the metric, each listing only them.
    for user in USERS:
        expected = {
            name: {**summary, "users": {user: summary["users"][user]}}
            for name, summary in qps["tests"].items()
            if user in summary["users"]
        }
        assert expected and narrowed[user]["tests"] == expected
    assert narrowed["nobody"]["tests"] == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"reverse": "yes"}, "reverse: must be a boolean"),
        ({"sort": 5}, "sort: must be a metric name"),
        ({"sort": "bad name"}, "sort: must be a metric name"),
        ({"order": "asc"}, "order: needs sort"),
        ({"sort": "qps", "order": "up"}, "order: must be 'desc' or 'asc'"),
        ({"sort": "qps", "reverse": True}, "reverse: cannot be combined with sort"),
        ({"sort": "qps", "cursor": "0" * 20}, "cursor: not a cursor this server returned for a sorted read"),
        ({"sort": "qps", "cursor": "0" * 20 + ":1.2.3"}, "cursor: not a cursor"),
        ({"reverse": True, "cursor": "0" * 20 + ":5"}, "cursor: not a cursor this server returned"),
    ],
)
async def test_bad_ordering_fields_are_refused_and_the_connection_carries_on(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        assert (await conn.request(**record_request()))["ok"]
        for op, extra in (("get_all", {}), ("get_user", {"user_id": "alice"})):
            reply = await conn.request(op, **extra, **fields)
            assert error_code(reply) == "bad_request"
            assert reply["error"]["message"].startswith(message), reply
        assert (await conn.request("ping"))["ok"]


async def test_bad_overview_requests_are_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "read.key"
    key_file.write_text("a-read-key-of-some-length\n")
    async with perfdb_with_provider(tmp_path, read_key_file=key_file) as (server, _), connect(server) as conn:
        without_key = await conn.request("overview", metric="qps")
        key = {"read_key": "a-read-key-of-some-length"}
        missing = await conn.request("overview", **key)
        bad_metric = await conn.request("overview", metric="", **key)
        extra = await conn.request("overview", metric="qps", limit=3, **key)
        bad_test = await conn.request("overview", metric="qps", test_name=7, **key)
        empty = await conn.request("overview", metric="qps", **key)
    assert error_code(without_key) == "forbidden"
    assert missing["error"]["message"] == "metric: is required"
    assert bad_metric["error"]["message"].startswith("metric: must be a metric name")
    assert extra["error"]["message"].startswith("'limit': unknown field")
    assert bad_test["error"]["message"].startswith("test_name: must be a string")
    assert empty == {"id": None, "ok": True, "metric": "qps", "better": "higher", "tests": {}}


class CountingSnapshot:
    """A real LevelDB snapshot that counts the entries reads take from it."""

    def __init__(self, real: Any, counts: dict[str, int]) -> None:
        self._real = real
        self._counts = counts

    def get(self, key: bytes) -> bytes | None:
        self._counts["gets"] += 1
        self._counts["record_gets"] += key.startswith(layout.RECORD_PREFIX)
        value: bytes | None = self._real.get(key)
        return value

    @contextlib.contextmanager
    def iterator(self, **options: Any) -> Iterator[Iterator[tuple[bytes, bytes]]]:
        with self._real.iterator(**options) as entries:
            yield self._counted(entries)

    def _counted(self, entries: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
        for entry in entries:
            self._counts["entries"] += 1
            yield entry

    def close(self) -> None:
        self._real.close()


class CountingDB:
    def __init__(self, real: Any) -> None:
        self.real = real
        self.counts = {"entries": 0, "gets": 0, "record_gets": 0}

    def snapshot(self) -> CountingSnapshot:
        return CountingSnapshot(self.real.snapshot(), self.counts)

    def take_counts(self) -> tuple[int, int]:
        counts = (self.counts["entries"], self.counts["gets"])
        self.counts.update(entries=0, gets=0, record_gets=0)
        return counts

    def take_record_gets(self) -> int:
        """How many of the gets since the last take were of records."""
        record_gets = self.counts["record_gets"]
        self.take_counts()
        return record_gets


async def test_filtered_reads_examine_only_the_matching_index_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of 100 of a rare test among many records reads about 100 index entries and 100
    records, however many records there are: the cost does not grow with the database."""
    async with opened_store(tmp_path / "db") as store:
        many, few = Profile.create("static:many", {}), Profile.create("static:few", {})
        submissions = []
        for n in range(20_000):
            rare = n % 100 == 0  # 200 rare records, half of them tagged "x"
            draft = RecordDraft("rare" if rare else "common", "x" if rare and n % 200 else "", {}, {"qps": n}, {}, {})
            submissions.append(store.submit(few if rare and n % 300 else many, draft))
            if n == 19_499:  # the newest 500 committed after the rest: a time range can hold just them
                await asyncio.gather(*submissions)
                submissions.clear()
        await asyncio.gather(*submissions)
        counting = CountingDB(store._db)
        store._db = counting
        try:

            def query(**fields: Any) -> Query:
                return Query(**{**dict.fromkeys(("user_id", "test_name", "tag", "since", "until", "cursor")), **fields})

            page = await store.get_all(query(test_name="rare", limit=100))
            assert len(page.records) == 100 and page.total == 200
            entries, gets = counting.take_counts()
            assert entries == 101  # 100 taken, one more to see that the page is not the last
            assert gets <= 100 + 3 + 2  # the records, the counts compared, the profiles

            page = await store.get_all(query(test_name="rare", tag="x", limit=100, reverse=True))
            assert len(page.records) == 100 and page.total is None
            entries, _ = counting.take_counts()
            assert entries == 100  # the tag index (100 entries) is smaller than the test index (200)

            _, page = await store.get_user(query(user_id="static:many", test_name="rare", limit=100))
            assert len(page.records) == 200 // 3 + 1
            entries, _ = counting.take_counts()
            assert entries == 200  # through the test index, not the 19,867 of static:many

            # Ranked from the test index entries' metrics: only the page's records are read.
            page = await store.get_all(query(test_name="rare", limit=5, sort="qps"))
            assert [orjson.loads(r)["metrics"]["qps"] for r in page.records] == [19_900, 19_800, 19_700, 19_600, 19_500]
            assert (page.examined, page.complete) == (200, True)
            entries, gets = counting.take_counts()
            assert entries == 200
            assert gets <= 5 + 1 + 3 + 2  # the records, the record count, the counts compared, the profiles

            # Over all 20,000 records the qps index gives a page of 50 from 51 entries (one more to
            # see a next page), best first, and reads only the page's records.
            for order, best in ((True, list(range(19_999, 19_949, -1))), (False, list(range(50)))):
                page = await store.get_all(query(limit=50, sort="qps", descending=order))
                assert [orjson.loads(r)["metrics"]["qps"] for r in page.records] == best
                assert (page.examined, page.complete) == (51, True)
                entries, gets = counting.take_counts()
                assert entries <= 52  # a descending walk reads one entry past the next one's tie group
                assert gets <= 50 + 1 + 2  # the records, the record count, the profiles

            # A time range counts as a filter, measured by counting its keys. Ranking the records of
            # one that holds all 20,000 would mean reading each (RANK_RECORD_MICROS), dearer than
            # walking the whole qps index: it walks the index. One that starts at the newest 500 ranks them.
            page = await store.get_all(query(limit=50, sort="qps", since=0))
            assert (page.examined, orjson.loads(page.records[0])["metrics"]["qps"]) == (51, 19_999)
            newest = await store.get_all(query(limit=500, reverse=True))
            since = record_id_micros(orjson.loads(newest.records[-1])["record_id"])
            in_range = len((await store.get_all(query(limit=5000, since=since))).records)
            assert 500 <= in_range < 5_000  # records committed in one write batch share their time
            page = await store.get_all(query(limit=50, sort="qps", since=since))
            assert (page.examined, orjson.loads(page.records[0])["metrics"]["qps"]) == (in_range, 19_999)
        finally:
            store._db = counting.real
