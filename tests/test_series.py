"""The series op: a metric over time in equal buckets, over real sockets against a real server and
LevelDB, checked against brute force over the records that were written."""

from __future__ import annotations

import asyncio
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from perfdb.records import record_ids
from perfdb.records.profiles import Profile
from perfdb.records.schema import RecordDraft, SeriesQuery
from perfdb.records.timestamps import format_micros, now_micros, parse_rfc3339
from perfdb.storage import layout
from perfdb.storage import store as series_store
from perfdb.storage.series import (
    BucketBounds,
    BucketGrid,
    CachedIndex,
    IndexColumns,
    MetricColumn,
    SeriesCache,
    SeriesColumns,
    bucket_order,
    formatted_micros,
    index_columns,
    metric_fields,
)
from tests.support import connect, error_code, opened_store, perfdb_with_provider, record_request, send_burst
from tests.test_deletion import ADMIN_KEY as DELETION_ADMIN_KEY
from tests.test_deletion import perfdb as deletion_perfdb
from tests.test_reads import CountingDB, DenseClock, matching, write_burst


def micros_of(record: dict[str, Any]) -> int:
    return int(record["record_id"][:14], 16)


def brute_force_points(records: list[dict[str, Any]], metric: str, start: int, width: int) -> list[dict[str, Any]]:
    """Every non-empty bucket of `metric`, computed from the whole list at once."""
    buckets: dict[int, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: r["record_id"]):
        if metric in record["metrics"]:
            buckets.setdefault((micros_of(record) - start) // width, []).append(record)
    points = []
    for bucket in sorted(buckets):
        inside = buckets[bucket]
        values = [r["metrics"][metric] for r in inside]
        point = {
            "bucket": bucket,
            "count": len(values),
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
            "mean": math.fsum(values) / len(values),
        }
        if len(values) == 1:
            point.update(record_id=inside[0]["record_id"], value=values[0])
        points.append(point)
    return points


def check_series(reply: dict[str, Any], records: list[dict[str, Any]], metrics: list[str], buckets: int) -> None:
    """The reply agrees with brute force over `records` (the records its filters admit)."""
    assert reply["ok"], reply
    assert reply["complete"] is True and reply["records"] == len(records)
    start, width = parse_rfc3339(reply["since"]), reply["bucket_micros"]
    assert reply["buckets"] <= buckets and start + reply["buckets"] * width >= parse_rfc3339(reply["until"])
    for metric in metrics:
        got = reply["series"][metric]
        having = sorted((r for r in records if metric in r["metrics"]), key=lambda r: r["record_id"])
        assert got["count"] == len(having)
        assert (got["first"], got["last"]) == (
            format_micros(micros_of(having[0])),
            format_micros(micros_of(having[-1])),
        )
        expected = brute_force_points(records, metric, start, width)
        assert [p["bucket"] for p in got["points"]] == [p["bucket"] for p in expected]
        for point, truth in zip(got["points"], expected, strict=True):
            assert math.isclose(point.pop("mean"), truth.pop("mean"), rel_tol=1e-9, abs_tol=1e-9)
            low, high = parse_rfc3339(point.pop("since")), parse_rfc3339(point.pop("until"))
            assert (low, high) == (start + truth["bucket"] * width, min(start + (truth["bucket"] + 1) * width, high))
            if "record_id" in point:
                assert point.pop("timestamp") == format_micros(micros_of({"record_id": point["record_id"]}))
            assert point == truth
        # The extremes of the whole range, with the (oldest) record that holds them.
        values = [r["metrics"][metric] for r in having]
        lowest = next(r for r in having if r["metrics"][metric] == min(values))
        highest = next(r for r in having if r["metrics"][metric] == max(values))
        assert (got["min"]["value"], got["min"]["record_id"]) == (min(values), lowest["record_id"])
        assert (got["max"]["value"], got["max"]["record_id"]) == (max(values), highest["record_id"])
        assert got["exact_medians"] is True


async def test_series_match_brute_force_for_every_filter_and_bucket_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_ids, "now_micros", DenseClock(records_per_tick=7))
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 6000, seed=11)
        for filters in (
            {"test_name": "unary"},
            {"test_name": "rare"},
            {"test_name": "streaming", "user_id": "bob"},
            {"test_name": "ping_pong", "tag": "pr"},
            {"test_name": "unary", "user_id": "alice", "tag": ""},
            {"test_name": "rare", "user_id": "alice"},  # walks the rare test's index, keeps alice's
        ):
            records = matching(written, **filters)
            assert records, filters
            for buckets in (1, 7, 100, 4000):
                reply = await conn.request("series", metric=["qps", "perc_lat_50"], buckets=buckets, **filters)
                check_series(reply, records, ["qps", "perc_lat_50"], buckets)
                # The grid spans the matching records, oldest to newest.
                assert reply["since"] == format_micros(min(micros_of(r) for r in records))
                assert reply["until"] == format_micros(max(micros_of(r) for r in records) + 1)
        # An explicit range is the grid, whatever lies inside it; records outside are left out.
        ordered = sorted(matching(written, test_name="unary"), key=lambda r: r["record_id"])
        since, until = micros_of(ordered[500]), micros_of(ordered[1500]) + 3
        window = [r for r in ordered if since <= micros_of(r) < until]
        window_fields = {"since": format_micros(since), "until": format_micros(until)}
        reply = await conn.request("series", metric="qps", test_name="unary", buckets=50, **window_fields)
        check_series(reply, window, ["qps"], 50)
        assert (reply["since"], reply["until"]) == (format_micros(since), format_micros(until))
        assert reply["bucket_micros"] == math.ceil((until - since) / 50)
        # A metric nobody recorded, and a test nobody ran.
        nothing = await conn.request("series", metric="no_such_metric", test_name="unary")
        assert nothing["series"]["no_such_metric"] == {
            "count": 0, "first": None, "last": None, "min": None, "max": None, "exact_medians": True, "points": [],
            "marks": [],
        }  # fmt: skip
        no_test = await conn.request("series", id=3, metric="qps", test_name="nobody ran this")
        assert no_test == {
            "id": 3, "ok": True, "since": None, "until": None, "bucket_micros": None, "buckets": 0,
            "records": 0, "examined": 0, "complete": True,
            "series": {"qps": nothing["series"]["no_such_metric"]},
        }  # fmt: skip


async def test_series_by_test_equal_the_per_test_series_on_the_same_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_ids, "now_micros", DenseClock(records_per_tick=7))
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 6000, seed=13)
        for filters in ({"user_id": "alice"}, {"user_id": "bob", "tag": "pr"}):
            records = matching(written, **filters)
            tests = sorted({r["test_name"] for r in records})
            assert len(tests) > 1, filters
            for buckets in (1, 7, 100, 4000):
                metrics = ["qps", "perc_lat_50"]
                grouped = await conn.request("series", metric=metrics, by="test", buckets=buckets, **filters)
                assert grouped["ok"], grouped
                assert (grouped["complete"], grouped["tests_truncated"]) == (True, False)
                assert grouped["records"] == len(records) and sorted(grouped["tests"]) == tests
                grid = {"since": grouped["since"], "until": grouped["until"]}
                assert grid == {
                    "since": format_micros(min(micros_of(r) for r in records)),
                    "until": format_micros(max(micros_of(r) for r in records) + 1),
                }
                for test in tests:
                    # The same grid, asked of one test, gives the same series; both match brute force.
                    one = await conn.request(
                        "series", metric=metrics, test_name=test, buckets=buckets, **grid, **filters
                    )
                    assert grouped["tests"][test] == one["series"]
                    assert one["bucket_micros"] == grouped["bucket_micros"]
                    check_series(one, matching(records, test_name=test), metrics, buckets)
        nobody = await conn.request("series", metric="qps", by="test", user_id="nobody")
    assert nobody["ok"] and (nobody["tests"], nobody["records"], nobody["buckets"]) == ({}, 0, 0)


async def test_series_by_test_keep_the_most_recently_run_tests_and_say_when_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(series_store, "MAX_SERIES_TESTS", 3)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        names = ["t0", "t1", "t2", "t3", "t4", "t0"]  # t0 runs last again: among the newest three
        await send_burst(
            conn, [record_request(test_name=name, metrics={"qps": 10.0 + n}) for n, name in enumerate(names)]
        )
        cut = await conn.request("series", metric="qps", by="test", user_id="alice")
        whole = await conn.request("series", metric="qps", by="test", user_id="alice", tag="")
    assert cut["tests_truncated"] is True and cut["complete"] is True
    assert sorted(cut["tests"]) == ["t0", "t3", "t4"]
    assert cut["records"] == 4 and cut["tests"]["t0"]["qps"]["count"] == 2
    assert whole["tests_truncated"] is True and whole["examined"] == 6


async def test_the_extremes_survive_among_thousands_of_points(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        values = [1000.0 + (n % 50) for n in range(5000)]
        values[1234], values[3777] = 0.25, 99_999.5  # one dip and one spike among 5000
        acks = await send_burst(conn, [record_request(metrics={"qps": value}) for value in values])
        reply = await conn.request("series", metric="qps", test_name="unary", buckets=20)
    series = reply["series"]["qps"]
    assert len(series["points"]) <= 20 and series["count"] == 5000
    assert series["min"] == {"value": 0.25, "record_id": acks[1234]["record_id"], "timestamp": acks[1234]["timestamp"]}
    assert series["max"]["value"] == 99_999.5 and series["max"]["record_id"] == acks[3777]["record_id"]
    assert min(p["min"] for p in series["points"]) == 0.25
    assert max(p["max"] for p in series["points"]) == 99_999.5
    assert sum(p["count"] for p in series["points"]) == 5000


async def test_big_buckets_have_exact_medians(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        values = [float(n % 1000) for n in range(3000)]
        acks = await send_burst(conn, [record_request(metrics={"qps": value}) for value in values])
        assert all(ack["ok"] for ack in acks)
        first = await conn.request("series", metric="qps", test_name="unary", buckets=1)
    [point] = first["series"]["qps"]["points"]
    assert first["series"]["qps"]["exact_medians"] is True
    assert (point["count"], point["min"], point["max"], point["mean"]) == (3000, 0.0, 999.0, 499.5)
    assert point["median"] == statistics.median(values) == 499.5


async def test_a_series_past_the_examined_bound_covers_the_newest_records(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path, max_sort_examined=100) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 400, seed=12)
        reply = await conn.request("series", metric="perc_lat_50", test_name="unary", user_id="alice")
    assert (reply["examined"], reply["complete"]) == (100, False)
    # The newest 100 entries of the smaller of the two indexes were examined.
    walked = min(matching(written, user_id="alice"), matching(written, test_name="unary"), key=len)
    assert len(walked) > 100
    newest = sorted(walked, key=lambda r: r["record_id"])[-100:]
    expected = [r for r in newest if r["test_name"] == "unary" and r["user_id"] == "alice"]
    assert reply["records"] == len(expected) and reply["series"]["perc_lat_50"]["count"] == len(expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"test_name": "unary"}, "metric: is required"),
        ({"metric": "qps"}, "test_name: is required"),
        ({"metric": 5, "test_name": "unary"}, "metric: must be a metric name"),
        ({"metric": [], "test_name": "unary"}, "metric: must list 1 to 16 metric names"),
        ({"metric": ["qps"] * 17, "test_name": "unary"}, "metric: must list 1 to 16"),
        ({"metric": ["qps", "bad name"], "test_name": "unary"}, "metric[1]: must be a metric name"),
        ({"metric": ["qps", "qps"], "test_name": "unary"}, "metric: names a metric twice"),
        ({"metric": "qps", "test_name": "unary", "buckets": 0}, "buckets: must be between 1 and 4000"),
        ({"metric": "qps", "test_name": "unary", "buckets": 4001}, "buckets: must be between 1 and 4000"),
        ({"metric": "qps", "test_name": "unary", "buckets": True}, "buckets: must be an integer, got boolean"),
        ({"metric": "qps", "test_name": "unary", "buckets": 2.5}, "buckets: must be an integer, got number"),
        ({"metric": "qps", "test_name": "", "buckets": 5}, "test_name: must not be empty"),
        ({"metric": "qps", "test_name": "unary", "user_id": 3}, "user_id: must be a string"),
        ({"metric": "qps", "test_name": "unary", "since": "yesterday"}, "since: must be an RFC 3339 timestamp"),
        (
            {"metric": "qps", "test_name": "unary", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
            "until: must be later than since",
        ),
        ({"metric": "qps", "test_name": "unary", "limit": 3}, "'limit': unknown field for this op"),
        ({"metric": "qps", "by": "test"}, "user_id: is required"),
        ({"metric": "qps", "by": "user", "user_id": "alice"}, 'by: must be "test"'),
        ({"metric": "qps", "by": 1, "user_id": "alice"}, "by: must be a string, got number"),
        ({"metric": "qps", "by": "test", "user_id": "alice", "test_name": "unary"}, "test_name: must be left out"),
    ],
)
async def test_bad_series_requests_are_refused_and_the_connection_carries_on(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request("series", **fields)
        assert error_code(reply) == "bad_request"
        assert reply["error"]["message"].startswith(message), reply
        assert (await conn.request("ping"))["ok"]


async def test_series_needs_the_read_key_when_the_server_has_one(tmp_path: Path) -> None:
    key_file = tmp_path / "read.key"
    key_file.write_text("a-read-key-of-some-length\n")
    async with perfdb_with_provider(tmp_path, read_key_file=key_file) as (server, _), connect(server) as conn:
        refused = await conn.request("series", metric="qps", test_name="unary")
        allowed = await conn.request("series", metric="qps", test_name="unary", read_key="a-read-key-of-some-length")
        hello = await conn.request("hello")
    assert error_code(refused) == "forbidden"
    assert allowed["ok"] and allowed["records"] == 0
    assert "series" in hello["ops"]


def test_the_grid_has_at_most_the_buckets_asked_for_and_covers_the_range() -> None:
    for start, end, buckets in ((0, 1, 1000), (5, 1006, 1000), (10, 10_011, 7), (0, 3, 4000), (100, 100 + 10**12, 999)):
        grid = BucketGrid.spanning(start, end, buckets)
        assert 1 <= grid.count <= buckets
        assert grid.bucket_of(start) == 0 and grid.bucket_of(end - 1) == grid.count - 1
        assert grid.bounds(grid.count - 1)[1] == end
        assert grid.width == 1 or grid.count == buckets or grid.width * (grid.count - 1) < end - start


def test_buckets_keep_ints_as_ints_and_single_buckets_name_their_record() -> None:
    rows = [(2, 3), (55, 1), (91, 7), (95, 5.0), (96, 2)]  # (microseconds, value), oldest first
    ids = np.array([record_ids.make_record_id(micros, 0) for micros, _ in rows], dtype="S20")
    values = [value for _, value in rows]
    column = MetricColumn(np.array(values, dtype=np.float64), np.array([type(v) is int for v in values]))
    columns = SeriesColumns(
        np.array([micros for micros, _ in rows], dtype=np.int64), ids, np.zeros(5, dtype=np.int32), ["t"],
        {"qps": column},
    )  # fmt: skip
    fields = metric_fields(columns, "qps", BucketBounds(BucketGrid(start=0, end=100, width=10)))
    points = fields["points"]
    assert [(p["bucket"], p["count"], p["median"], p["min"], p["max"]) for p in points] == [
        (0, 1, 3, 3, 3), (5, 1, 1, 1, 1), (9, 3, 5.0, 2, 7),
    ]  # fmt: skip
    assert [type(p["min"]) for p in points] == [int, int, int] and type(points[2]["median"]) is float
    assert points[0]["record_id"] == ids[0].decode() and points[0]["value"] == 3
    assert "record_id" not in points[2]
    assert fields["min"]["record_id"] == ids[1].decode() and fields["max"]["value"] == 7
    assert fields["count"] == 5 and fields["first"] == format_micros(2) and fields["last"] == format_micros(96)


def test_times_formatted_at_once_read_as_format_micros_writes_them() -> None:
    # Either side of the epoch, leap days, whole seconds, and the microsecond before a new year.
    moments = np.random.default_rng(7).integers(-(10**15), 4 * 10**15, 5_000)
    edges = [0, -1, 1, 951_782_400_000_000, 1_798_761_599_999_999, 4_102_444_800_000_000]
    micros = np.concatenate([moments, np.array(edges, dtype=np.int64)])
    assert formatted_micros(micros) == [format_micros(moment) for moment in micros.tolist()]
    assert formatted_micros(np.zeros(0, dtype=np.int64)) == []


async def test_a_range_holding_one_record_at_its_start_is_read_newest_first(tmp_path: Path) -> None:
    """plyvel's reverse iterator skips a range's only key when it is the range's start; a time
    range that starts at a record's exact time and holds only it must still find it."""
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        acks = [await conn.request(**record_request(metrics={"qps": n})) for n in (1, 2, 3)]  # one batch each
        assert [ack["record_id"][14:] for ack in acks] == ["000000"] * 3  # each alone in its microsecond
        middle = parse_rfc3339(acks[1]["timestamp"])
        window = {"since": format_micros(middle), "until": format_micros(middle + 1)}
        newest_first = await conn.request("get_all", reverse=True, **window)
        user_newest_first = await conn.request("get_user", user_id="alice", reverse=True, **window)
        series = await conn.request("series", metric="qps", test_name="unary", **window)
    assert [r["record_id"] for r in newest_first["records"]] == [acks[1]["record_id"]]
    assert [r["record_id"] for r in user_newest_first["records"]] == [acks[1]["record_id"]]
    assert series["series"]["qps"]["points"][0]["record_id"] == acks[1]["record_id"]


async def test_series_over_the_user_or_test_index_read_no_record(tmp_path: Path) -> None:
    """The user and test index entries carry the metrics: a series walking them reads no record
    and still agrees with brute force; one walking the tag index reads the records it admits."""
    async with opened_store(tmp_path / "db") as store:
        profiles = [Profile.create(f"static:u{n}", {}) for n in range(3)]
        drafts = []
        for n in range(3000):
            metrics: dict[str, Any] = {"qps": n % 97 + 0.5, "perc_lat_50": n % 13, "warm": True}
            if n % 7 == 0:
                del metrics["qps"]
            test_name, tag = ("rare", "x" if n % 20 else "") if n % 10 == 0 else ("common", "")
            drafts.append((profiles[n % 3], RecordDraft(test_name, tag, {}, metrics, {}, {})))
        acks = await asyncio.gather(*(store.submit(profile, draft) for profile, draft in drafts))
        written = [
            {"record_id": ack.record_id, "user_id": ack.user_id, "test_name": draft.test_name, "tag": draft.tag,
             "metrics": {name: value for name, value in draft.metrics.items() if name != "warm"}}
            for ack, (_, draft) in zip(acks, drafts, strict=True)
        ]  # fmt: skip
        counting = CountingDB(store._db)
        store._db = counting
        charted = ("qps", "perc_lat_50")
        try:
            for filters in ({"test_name": "rare"}, {"test_name": "common", "user_id": "static:u1"}):
                request = SeriesQuery(charted, filters["test_name"], filters.get("user_id"), None, None, None, 50)
                reply = {"ok": True, **await store.series(request)}
                check_series(reply, matching(written, **filters), list(charted), 50)
                assert counting.take_record_gets() == 0, filters
            grouped = await store.series(SeriesQuery(charted, None, "static:u2", None, None, None, 50))
            assert counting.take_record_gets() == 0
            for test_name in ("rare", "common"):
                alone = {"ok": True, **grouped, "series": grouped["tests"][test_name]}
                expected = matching(written, user_id="static:u2", test_name=test_name)
                check_series({**alone, "records": len(expected)}, expected, list(charted), 50)
            # The tag index (150 entries) is smaller than the rare test's (300): its records are read.
            request = SeriesQuery(charted, "rare", None, "x", None, None, 50)
            reply = {"ok": True, **await store.series(request)}
            check_series(reply, matching(written, test_name="rare", tag="x"), list(charted), 50)
            assert counting.take_record_gets() == len(matching(written, test_name="rare", tag="x"))
        finally:
            store._db = counting.real


CHARTED = ["qps", "perc_lat_50"]
# Over a test's index (unary's), over a user's (bob's is smaller than streaming's), and below a
# user's every test (by_test over carol's).
CACHED_FILTERS: tuple[dict[str, str], ...] = ({"test_name": "unary"}, {"test_name": "streaming", "user_id": "bob"})


async def check_cached_reads(conn: Any, written: list[dict[str, Any]]) -> None:
    for filters in CACHED_FILTERS:
        for buckets in (9, 400):
            reply = await conn.request("series", metric=CHARTED, buckets=buckets, **filters)
            check_series(reply, matching(written, **filters), CHARTED, buckets)
    grouped = await conn.request("series", metric=CHARTED, by="test", user_id="carol", buckets=50)
    records = matching(written, user_id="carol")
    assert grouped["records"] == len(records)
    for test_name, series in grouped["tests"].items():
        alone = {**grouped, "series": series, "records": len(matching(records, test_name=test_name))}
        check_series(alone, matching(records, test_name=test_name), CHARTED, 50)


async def test_cached_index_columns_follow_appends_deletions_imports_and_back_filled_records(tmp_path: Path) -> None:
    """Series reads keep a user's or a test's index in memory; every write after shows in the next
    read: new records (read from the index past the cached ones), deletions, records restored by an
    import and a record filed at its past run_time (the whole index read again)."""
    async with deletion_perfdb(tmp_path) as (server, _), connect(server) as conn:
        cache = server.store.series_cache
        written = await write_burst(conn, 3000, seed=21)
        await check_cached_reads(conn, written)
        assert cache.cached_bytes > 0
        hits, epoch = cache.hits, cache.epoch

        written += await write_burst(conn, 700, seed=22)
        await check_cached_reads(conn, written)
        assert cache.hits > hits and cache.epoch == epoch  # the appended entries were read on their own

        victims = (matching(written, test_name="unary")[-5], matching(written, user_id="carol")[7])
        moments = [micros_of(victim) for victim in victims]
        window = {"since": format_micros(min(moments)), "until": format_micros(max(moments) + 1)}
        dump = await conn.request("export", admin_key=DELETION_ADMIN_KEY, limit=5000, **window)
        for victim in victims:
            deleted = await conn.request("delete_record", record_id=victim["record_id"], admin_key=DELETION_ADMIN_KEY)
            assert deleted["deleted"] is True
            written.remove(victim)
        await check_cached_reads(conn, written)
        assert cache.epoch > epoch

        # Restored from an export (forced past their tombstones): back in the next reads.
        epoch = cache.epoch
        gone = {victim["record_id"] for victim in victims}
        exported = [record for record in dump["records"] if record["record_id"] in gone]
        restored = await conn.request(
            "import", admin_key=DELETION_ADMIN_KEY, records=exported, users=dump["users"], force=True
        )
        assert restored.get("imported") == len(victims), restored
        written += victims
        await check_cached_reads(conn, written)
        assert cache.epoch > epoch

        epoch = cache.epoch
        ran = now_micros() - 300 * 86_400_000_000
        metrics = {"qps": 123.25, "perc_lat_50": 7}
        past = await conn.request(**record_request("user-carol", "unary", metrics=metrics, run_time=format_micros(ran)))
        assert past["ok"] and micros_of(past) < min(micros_of(r) for r in written)
        written.append(
            {"record_id": past["record_id"], "user_id": "carol", "test_name": "unary", "tag": "", "metrics": metrics}
        )
        await check_cached_reads(conn, written)
        assert cache.epoch > epoch


async def test_an_index_too_big_for_the_cache_is_walked_and_agrees(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path, series_cache_mb=1) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 6000, seed=23)
        cache = server.store.series_cache
        unary = matching(written, test_name="unary")
        assert not cache.fits(len(unary))  # 2,000 entries: more than a quarter of 1 MiB
        for buckets in (9, 400):
            reply = await conn.request("series", metric=CHARTED, test_name="unary", buckets=buckets)
            check_series(reply, unary, CHARTED, buckets)
        assert cache.cached_bytes == 0
        rare = await conn.request("series", metric=CHARTED, test_name="rare", buckets=30)
        check_series(rare, matching(written, test_name="rare"), CHARTED, 30)
        assert cache.cached_bytes > 0


def synthetic_index(entries: int, first_micros: int) -> IndexColumns:
    rows = [
        (
            layout.user_index_prefix("u") + record_ids.make_record_id(first_micros + n, 0).encode(),
            orjson.dumps(["t", "", [float(n)] + [None] * 10, {"extra": n}]),
        )
        for n in range(entries)
    ]
    columns = index_columns(rows, True, "u", lambda key: None)
    assert columns is not None
    return columns


def test_the_cache_holds_its_budget_and_drops_the_least_recently_read() -> None:
    index = synthetic_index(100, 1_000)
    cache = SeriesCache(max_bytes=index.bytes * 4)
    for name in (b"a", b"b", b"c", b"d"):
        cache.put(name, CachedIndex(index, b"k", cache.epoch))
    assert cache.get(b"a", cache.epoch) is not None  # a is now the most recently read
    cache.put(b"e", CachedIndex(index, b"k", cache.epoch))
    assert cache.get(b"b", cache.epoch) is None and cache.get(b"a", cache.epoch) is not None
    assert cache.cached_bytes <= cache.max_bytes
    stale = cache.epoch
    cache.invalidate()
    assert cache.get(b"a", cache.epoch) is None and cache.cached_bytes == 0
    cache.put(b"a", CachedIndex(index, b"k", stale))  # read before the invalidation: not kept
    assert cache.get(b"a", cache.epoch) is None
    # Columns extended by newer entries keep every metric, other ones included.
    longer = index.extended(synthetic_index(3, 5_000))
    assert longer.entries == 103 and len(longer.series) == 103
    assert longer.series.metrics["extra"].values[-1] == 2 and longer.series.metrics["extra"].integral.all()
    assert longer.series.micros[-1] == 5_002


async def test_columns_hold_the_points_of_the_same_series(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        written = await write_burst(conn, 2000, seed=24)
        for filters in ({"test_name": "unary"}, {"by": "test", "user_id": "bob"}):
            points = await conn.request("series", metric=CHARTED, buckets=300, **filters)
            columns = await conn.request("series", metric=CHARTED, buckets=300, columns=True, **filters)
            by_test = "by" in filters
            assert (
                points["records"]
                == columns["records"]
                == len(matching(written, **{k: v for k, v in filters.items() if k != "by"}))
            )
            pairs = (
                [(points["tests"][t], columns["tests"][t]) for t in points["tests"]]
                if by_test
                else [(points["series"], columns["series"])]
            )
            for as_points, as_columns in pairs:
                for metric in CHARTED:
                    given = as_columns[metric].pop("columns")
                    listed = as_points[metric].pop("points")
                    assert as_columns[metric] == as_points[metric]  # count, first, last, extremes, marks
                    assert len(listed) > 1 and all(len(values) == len(listed) for values in given.values())
                    for position, point in enumerate(listed):
                        for name in ("bucket", "count", "min", "median", "max", "mean"):
                            assert given[name][position] == point[name]
                        assert given["record_id"][position] == point.get("record_id")
                        assert given["timestamp"][position] == point.get("timestamp")
        refused = await conn.request("series", metric="qps", test_name="unary", columns="yes")
        assert error_code(refused) == "bad_request" and refused["error"]["message"].startswith("columns: must be")


@pytest.mark.parametrize("seed", range(4))
def test_bucket_order_is_lexsorts_order_with_ties_and_bursts(seed: int) -> None:
    """The matrix sort keeps equal values oldest first, as lexsort does, and a burst falls back to lexsort."""
    rng = np.random.default_rng(seed)
    for trial in range(300):
        size = int(rng.integers(1, 400))
        buckets = np.sort(rng.integers(0, int(rng.integers(1, 60)), size)).astype(np.int64)
        if trial % 3 == 0:
            buckets[: size // 2] = buckets[0]  # half of the records in one bucket
        values = rng.integers(-3, 3, size).astype(float) if trial % 2 else rng.uniform(-1e6, 1e6, size)
        starts = np.flatnonzero(np.concatenate(([True], buckets[1:] != buckets[:-1])))
        counts = np.diff(np.append(starts, size))
        assert bucket_order(values, buckets, starts, counts).tolist() == np.lexsort((values, buckets)).tolist()
