"""Databases written before the test and tag indexes (schema 1), or before the user and test index
entries carried the metrics (schema 2), open, keep every record and answer filtered reads and
series through the new entries; an upgrade killed half way finishes on restart; deleting from an
upgraded database removes every entry the upgrade wrote; repair rebuilds the entries."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import plyvel
import pytest

from perfdb.client import Client
from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.storage import layout
from tests.support import ServerProcess, closed_port_url, connect, make_config, page_through, running_server
from tests.test_deletion import ADMIN_KEY, expected_counts, expected_index_entries, stored_derived_keys
from tests.test_reads import brute_force_sorted, matching
from tests.test_series import check_series

TESTS = ("unary", "streaming", "rare")


def put_profiles_and_counters(batch: Any, count: int, *, schema: int) -> None:
    """What both older layouts' writers end with: the four users' profiles, the record and user
    counters and the schema version."""
    for user in range(4):
        batch.put(layout.profile_key(f"user{user}"), orjson.dumps({"user_id": f"user{user}"}))
    batch.put(layout.RECORD_COUNT_KEY, str(count).encode())
    batch.put(layout.USER_COUNT_KEY, b"4")
    batch.put(layout.SCHEMA_KEY, str(schema).encode())


def write_schema_1_database(path: Path, count: int) -> list[dict[str, Any]]:
    """A database as perfdb 0.1.0 (schema 1) wrote it: records, the user index with its
    [test_name, tag] values, profiles, the record and user counters, schema "1". Several
    records share each microsecond. Returns the records."""
    base = now_micros() - 60_000_000
    records = []
    db = plyvel.DB(str(path), create_if_missing=True)
    try:
        with db.write_batch() as batch:
            for n in range(count):
                user_id = f"user{n % 4}"
                record_id = make_record_id(base + n // 8, n % 8)
                record: dict[str, Any] = {
                    "record_id": record_id,
                    "user_id": user_id,
                    "timestamp": format_micros(base + n // 8),
                    "test_name": "rare" if n % 50 == 0 else TESTS[n % 2],
                    "tag": ("", "nightly")[n % 3 == 0],
                    "sys_info": {},
                    "metrics": {"qps": float(n % 1013)},
                    "client_config": {},
                    "server_config": {},
                }
                records.append(record)
                batch.put(layout.record_key(record_id, user_id), layout.seal(orjson.dumps(record)))
                batch.put(
                    layout.user_index_prefix(user_id) + record_id.encode(),
                    orjson.dumps([record["test_name"], record["tag"]]),
                )
            put_profiles_and_counters(batch, count, schema=1)
    finally:
        db.close()
    return records


def write_schema_2_database(path: Path, count: int) -> list[dict[str, Any]]:
    """A database as the schema 2 perfdb wrote it: records; the user index with [test_name, tag]
    values and the test index with [user_id, tag] values (no metrics); the tag and core-metric
    indexes and every count as schema 3 has them too; profiles, idempotency entries, the record and
    user counters, schema "2". Several records share each microsecond; the metrics hold ints,
    floats, a custom metric, a bool and a string, and some records lack qps. Returns the records."""
    base = now_micros() - 60_000_000
    records = []
    counts: dict[bytes, int] = {}
    db = plyvel.DB(str(path), create_if_missing=True)
    try:
        with db.write_batch() as batch:
            for n in range(count):
                user_id = f"user{n % 4}"
                record_id = make_record_id(base + n // 8, n % 8)
                metrics: dict[str, Any] = {"perc_lat_50": 100 + n % 37, "warm": n % 2 == 0}
                if n % 11:
                    metrics["qps"] = float(n % 1013) + 0.5
                if n % 5 == 0:
                    metrics["rpc_bytes"] = n * 3
                    metrics["note"] = "slow disk"
                record: dict[str, Any] = {
                    "record_id": record_id,
                    "user_id": user_id,
                    "timestamp": format_micros(base + n // 8),
                    "test_name": "rare" if n % 50 == 0 else TESTS[n % 2],
                    "tag": ("", "nightly")[n % 3 == 0],
                    "sys_info": {},
                    "metrics": metrics,
                    "client_config": {},
                    "server_config": {},
                    "request_id": f"req-{n}",
                }
                records.append(record)
                test_name, tag, rid = record["test_name"], record["tag"], record_id.encode()
                batch.put(layout.record_key(record_id, user_id), layout.seal(orjson.dumps(record)))
                batch.put(layout.user_index_prefix(user_id) + rid, orjson.dumps([test_name, tag]))
                batch.put(layout.test_index_prefix(test_name) + rid, orjson.dumps([user_id, tag]))
                for key, value in layout.record_index_entries(record_id, user_id, test_name, tag, metrics):
                    if key.startswith((layout.TAG_INDEX_PREFIX, layout.METRIC_INDEX_PREFIX)):  # as in schema 2
                        batch.put(key, value)
                for count_key in layout.record_counts(user_id, test_name, tag):
                    counts[count_key] = counts.get(count_key, 0) + 1
                batch.put(
                    layout.idempotency_key(user_id, record["request_id"]),
                    orjson.dumps({"record_id": record_id, "timestamp": record["timestamp"]}),
                )
            for count_key, counted in counts.items():
                batch.put(count_key, str(counted).encode())
            put_profiles_and_counters(batch, count, schema=2)
    finally:
        db.close()
    return records


@contextlib.contextmanager
def plyvel_db(database: Path) -> Iterator[plyvel.DB]:
    """The (closed) database opened straight through plyvel, closed again after."""
    db = plyvel.DB(str(database))
    try:
        yield db
    finally:
        db.close()


def entries_of(db: plyvel.DB, prefix: bytes) -> dict[bytes, bytes]:
    return dict(db.iterator(prefix=prefix))


def expected_entries(records: list[dict[str, Any]], prefix: bytes) -> dict[bytes, bytes]:
    """The schema 3 entries under `prefix` of these records."""
    return {
        key: value
        for r in records
        for key, value in layout.record_index_entries(
            r["record_id"], r["user_id"], r["test_name"], r["tag"], r["metrics"]
        )
        if key.startswith(prefix)
    }


def key_count(db: plyvel.DB, prefix: bytes) -> int:
    return sum(1 for _ in db.iterator(prefix=prefix, include_value=False))


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["record_id"] for r in records]


async def test_a_schema_1_database_is_upgraded_and_answers_through_the_new_indexes(tmp_path: Path) -> None:
    database = tmp_path / "db"
    records = write_schema_1_database(database, 2500)
    config = make_config(database, closed_port_url(), upgrade_batch_records=700)
    async with running_server(config) as server, connect(server) as conn:
        everything = await page_through(conn, "get_all", limit=5000)
        rare = await page_through(conn, "get_all", test_name="rare", reverse=True)
        nightly_unary = await page_through(conn, "get_all", test_name="unary", tag="nightly", limit=100)
        mine = await conn.request("get_user", user_id="user2", tag="nightly")
        top = await conn.request("get_all", sort="qps", limit=3, tag="nightly")
        overview = await conn.request("overview", metric="qps", test_name="rare")
        by_qps = {
            order: await page_through(conn, "get_all", sort="qps", order=order, limit=300) for order in ("desc", "asc")
        }
    assert [r for page in everything for r in page["records"]] == records
    assert everything[0]["total"] == 2500
    expected_rare = [r for r in records if r["test_name"] == "rare"]
    assert [r for page in rare for r in page["records"]] == expected_rare[::-1]
    assert rare[0]["total"] == len(expected_rare)
    assert [r for page in nightly_unary for r in page["records"]] == [
        r for r in records if r["test_name"] == "unary" and r["tag"] == "nightly"
    ]
    nightly = [r for r in records if r["tag"] == "nightly"]
    assert mine["records"] == [r for r in nightly if r["user_id"] == "user2"]
    assert [r["metrics"]["qps"] for r in top["records"]] == sorted(r["metrics"]["qps"] for r in nightly)[::-1][:3]
    # Through the qps index the upgrade built: ranking the nightly records by reading each would
    # cost more than walking the whole index, and a few entries find the top three.
    assert top["total"] == len(nightly) and top["complete"] and top["examined"] < 20
    assert overview["tests"]["rare"]["count"] == len(expected_rare)
    for order, pages in by_qps.items():  # through the qps index the upgrade built
        assert ids([r for page in pages for r in page["records"]]) == brute_force_sorted(
            records, "qps", order == "desc"
        )
        assert pages[0]["examined"] == 301
    with plyvel_db(database) as db:
        assert db.get(layout.SCHEMA_KEY) == str(layout.SCHEMA_VERSION).encode()
        assert db.get(layout.UPGRADE_RESUME_KEY) is None
        assert key_count(db, layout.TEST_INDEX_PREFIX) == key_count(db, layout.TAG_INDEX_PREFIX) == 2500
        assert key_count(db, layout.METRIC_INDEX_PREFIX) == 2500 * len(layout.INDEXED_METRICS)
        assert db.get(layout.test_count_key("rare")) == str(len(expected_rare)).encode()
        assert db.get(layout.user_count_key("user1")) == b"625"


@pytest.mark.timeout(120)
def test_an_upgrade_killed_half_way_finishes_on_restart(tmp_path: Path) -> None:
    database = tmp_path / "db"
    records = write_schema_1_database(database, 3000)
    common = ("--address=127.0.0.1:0", f"--database={database}", "--upgrade-batch-records=500")
    # The pause after each batch is far longer than the test needs to kill the server.
    with ServerProcess(*common, "--upgrade-pause=600") as first:
        first.wait_for_log("schema upgrade: 500 more records indexed", timeout=30)
        first.kill()  # SIGKILL: no chance to tidy up
    with plyvel_db(database) as db:
        assert db.get(layout.SCHEMA_KEY) == b"1"  # not bumped before the end
        assert db.get(layout.UPGRADE_RESUME_KEY) == layout.record_key(records[499]["record_id"], "user3")
        assert key_count(db, layout.TEST_INDEX_PREFIX) == 500
        assert key_count(db, layout.METRIC_INDEX_PREFIX) == 500 * len(layout.INDEXED_METRICS)
    with ServerProcess(*common) as second:
        second.wait_for_log("resuming an interrupted upgrade", timeout=30)
        port = second.wait_listening(timeout=60)
        with Client(f"127.0.0.1:{port}") as client:
            rare = list(client.get_all(test_name="rare", reverse=True))
            first_page = client.call("get_all", test_name="unary", limit=1)
            everything = list(client.get_all(limit=5000))
    assert everything == records
    assert rare == [r for r in records if r["test_name"] == "rare"][::-1]
    assert first_page["total"] == sum(1 for r in records if r["test_name"] == "unary")
    with plyvel_db(database) as db:
        assert db.get(layout.SCHEMA_KEY) == str(layout.SCHEMA_VERSION).encode()
        assert db.get(layout.UPGRADE_RESUME_KEY) is None
        # Each record indexed once: the restart went on from the resume key, it did not count twice.
        assert key_count(db, layout.TEST_INDEX_PREFIX) == 3000
        assert key_count(db, layout.METRIC_INDEX_PREFIX) == 3000 * len(layout.INDEXED_METRICS)
        assert db.get(layout.test_count_key("unary")) == str(first_page["total"]).encode()
        assert sum(int(db.get(layout.user_count_key(f"user{n}"))) for n in range(4)) == 3000


async def test_repair_rebuilds_the_indexes_and_counts_and_finishes_an_upgrade(tmp_path: Path) -> None:
    database = tmp_path / "db"
    records = write_schema_1_database(database, 1200)
    with plyvel_db(database) as db:
        # An upgrade interrupted after a few entries, plus a stray entry and a wrong count.
        db.put(layout.test_index_prefix("rare") + records[1]["record_id"].encode(), b'["user1",""]')
        db.put(layout.test_count_key("rare"), b"999")
        stray_qps = layout.metric_index_prefix("qps") + layout.sortable_number(5e9) + records[2]["record_id"].encode()
        db.put(stray_qps, b'["user2","unary",""]')
        db.put(layout.UPGRADE_RESUME_KEY, layout.record_key(records[0]["record_id"], "user0"))
    command = [sys.executable, "-m", "perfdb.cli", "repair", "--database", str(database)]
    repaired = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert repaired.returncode == 0, repaired.stderr
    assert "indexes and counts rebuilt for 1200 records" in repaired.stdout
    with plyvel_db(database) as db:
        assert db.get(layout.SCHEMA_KEY) == str(layout.SCHEMA_VERSION).encode()
        assert db.get(layout.UPGRADE_RESUME_KEY) is None
        assert key_count(db, layout.TEST_INDEX_PREFIX) == key_count(db, layout.TAG_INDEX_PREFIX) == 1200
        assert key_count(db, layout.METRIC_INDEX_PREFIX) == 1200 * len(layout.INDEXED_METRICS)
        assert db.get(stray_qps) is None
    rare = [r for r in records if r["test_name"] == "rare"]
    config = make_config(database, closed_port_url())
    async with running_server(config) as server, connect(server) as conn:
        pages = await page_through(conn, "get_all", test_name="rare")
        nightly = await conn.request("get_all", tag="nightly", limit=1)
        by_qps = await page_through(conn, "get_all", sort="qps", order="asc", limit=500)
    assert ids([r for page in by_qps for r in page["records"]]) == brute_force_sorted(records, "qps", False)
    assert [r for page in pages for r in page["records"]] == rare
    assert pages[0]["total"] == len(rare)
    assert nightly["total"] == sum(1 for r in records if r["tag"] == "nightly")


async def test_records_of_an_upgraded_database_delete_with_every_entry_the_upgrade_wrote(tmp_path: Path) -> None:
    database = tmp_path / "db"
    records = write_schema_1_database(database, 900)
    gone_before = make_record_id(now_micros() - 120_000_000, 0)  # a deletion the upgrade must keep
    with plyvel_db(database) as db:
        db.put(layout.tombstone_key(gone_before), b"2026-01-01T00:00:00Z")
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    config = make_config(database, closed_port_url(), upgrade_batch_records=200, admin_key_file=key_file)
    doomed = {r["record_id"] for r in records if r["test_name"] == "rare" or r["user_id"] == "user1"}
    async with running_server(config) as server, connect(server) as conn:
        for record in records:
            if record["test_name"] == "rare" and record["user_id"] != "user1":
                reply = await conn.request("delete_record", record_id=record["record_id"], admin_key=ADMIN_KEY)
                assert reply["deleted"], reply
        user = await conn.request("delete_user", user_id="user1", admin_key=ADMIN_KEY)
        assert user["records"] == sum(1 for r in records if r["user_id"] == "user1" and r["test_name"] != "rare")
        (dump,) = await page_through(conn, "export", admin_key=ADMIN_KEY, limit=5000)
        overview = await conn.request("overview", metric="qps")
    remaining = [r for r in records if r["record_id"] not in doomed]
    assert [r["record_id"] for r in dump["records"]] == ids(remaining)
    assert dump["tombstones"] == sorted([gone_before, *doomed])
    assert "rare" not in overview["tests"]
    assert sum(test["records"] for test in overview["tests"].values()) == len(remaining)
    counts, entries = stored_derived_keys(database)
    assert counts == expected_counts(remaining)
    assert entries == expected_index_entries(remaining)


async def test_a_schema_2_database_is_upgraded_and_answers_series_and_sorted_reads(tmp_path: Path) -> None:
    database = tmp_path / "db"
    records = write_schema_2_database(database, 2500)
    with plyvel_db(database) as db:
        untouched = {
            prefix: entries_of(db, prefix)
            for prefix in (layout.TAG_INDEX_PREFIX, layout.METRIC_INDEX_PREFIX, layout.COUNT_PREFIX)
        }
    config = make_config(database, closed_port_url(), upgrade_batch_records=700)
    metrics = ["qps", "perc_lat_50", "rpc_bytes", "warm", "note"]
    async with running_server(config) as server, connect(server) as conn:
        unary = await conn.request("series", metric=metrics, test_name="unary", buckets=40)
        mine = await conn.request("series", metric=metrics, test_name="streaming", user_id="user1", buckets=40)
        by_test = await conn.request("series", metric=metrics, user_id="user2", by="test", buckets=40)
        nightly = await conn.request("series", metric=metrics, test_name="rare", tag="nightly", buckets=40)
        sorted_pages = await page_through(conn, "get_user", user_id="user3", sort="qps", order="asc", limit=90)
        top = await conn.request("get_all", test_name="unary", sort="rpc_bytes", limit=5)
    numeric = metrics[:3]
    check_series(unary, matching(records, test_name="unary"), numeric, 40)
    check_series(mine, matching(records, test_name="streaming", user_id="user1"), numeric, 40)
    check_series(nightly, matching(records, test_name="rare", tag="nightly"), numeric, 40)
    assert (unary["series"]["warm"]["count"], unary["series"]["note"]["count"]) == (0, 0)  # not numbers
    assert by_test["records"] == len(matching(records, user_id="user2"))
    assert sorted(by_test["tests"]) == sorted({r["test_name"] for r in matching(records, user_id="user2")})
    for test_name, series in by_test["tests"].items():
        expected = matching(records, user_id="user2", test_name=test_name)
        assert series["qps"]["count"] == sum(1 for r in expected if "qps" in r["metrics"])
        assert series["perc_lat_50"]["max"]["value"] == max(r["metrics"]["perc_lat_50"] for r in expected)
    assert ids([r for page in sorted_pages for r in page["records"]]) == brute_force_sorted(
        matching(records, user_id="user3"), "qps", False
    )
    assert ids(top["records"]) == brute_force_sorted(matching(records, test_name="unary"), "rpc_bytes", True)[:5]
    with plyvel_db(database) as db:
        assert db.get(layout.SCHEMA_KEY) == str(layout.SCHEMA_VERSION).encode()
        assert db.get(layout.UPGRADE_RESUME_KEY) is None
        for prefix in (layout.USER_INDEX_PREFIX, layout.TEST_INDEX_PREFIX):
            assert entries_of(db, prefix) == expected_entries(records, prefix)
        for prefix, before in untouched.items():  # what schema 2 already had is left as it was
            assert entries_of(db, prefix) == before


@pytest.mark.timeout(120)
def test_an_upgrade_from_schema_2_killed_half_way_finishes_on_restart(tmp_path: Path) -> None:
    database = tmp_path / "db"
    records = write_schema_2_database(database, 3000)
    with plyvel_db(database) as db:
        counts_before = entries_of(db, layout.COUNT_PREFIX)
    common = ("--address=127.0.0.1:0", f"--database={database}", "--upgrade-batch-records=500")
    with ServerProcess(*common, "--upgrade-pause=600") as first:
        first.wait_for_log("schema upgrade: 500 more records indexed", timeout=30)
        first.kill()  # SIGKILL: no chance to tidy up
    with plyvel_db(database) as db:
        assert db.get(layout.SCHEMA_KEY) == b"2"  # not bumped before the end
        assert db.get(layout.UPGRADE_RESUME_KEY) == layout.record_key(records[499]["record_id"], "user3")
        stored = entries_of(db, layout.USER_INDEX_PREFIX)
        done = expected_entries(records[:500], layout.USER_INDEX_PREFIX)
        assert {key: stored[key] for key in done} == done  # the first batch rewritten...
        assert all(len(orjson.loads(stored[key])) == 2 for key in stored.keys() - done.keys())  # ... not the rest
        assert entries_of(db, layout.COUNT_PREFIX) == counts_before
    with ServerProcess(*common) as second:
        second.wait_for_log("resuming an interrupted upgrade", timeout=30)
        port = second.wait_listening(timeout=60)
        with Client(f"127.0.0.1:{port}") as client:
            series = client.call("series", metric="qps", test_name="streaming", user_id="user1", buckets=10)
            everything = list(client.get_all(limit=5000))
    assert everything == records
    check_series(series, matching(records, test_name="streaming", user_id="user1"), ["qps"], 10)
    with plyvel_db(database) as db:
        assert db.get(layout.SCHEMA_KEY) == str(layout.SCHEMA_VERSION).encode()
        assert db.get(layout.UPGRADE_RESUME_KEY) is None
        for prefix in (layout.USER_INDEX_PREFIX, layout.TEST_INDEX_PREFIX):
            assert entries_of(db, prefix) == expected_entries(records, prefix)
        assert entries_of(db, layout.COUNT_PREFIX) == counts_before  # counted once, by schema 2


async def test_repair_rebuilds_the_metrics_of_the_user_and_test_index_entries(tmp_path: Path) -> None:
    database = tmp_path / "db"
    records = write_schema_2_database(database, 600)
    with plyvel_db(
        database
    ) as db:  # a schema 3 database whose entries are stale: without their metrics, one with wrong ones
        db.put(layout.SCHEMA_KEY, str(layout.SCHEMA_VERSION).encode())
        second = records[1]
        db.put(
            layout.user_index_prefix(second["user_id"]) + second["record_id"].encode(),
            orjson.dumps([second["test_name"], second["tag"], {"qps": 1e9}]),
        )
    command = [sys.executable, "-m", "perfdb.cli", "repair", "--database", str(database)]
    repaired = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert repaired.returncode == 0, repaired.stderr
    with plyvel_db(database) as db:
        for prefix in (layout.USER_INDEX_PREFIX, layout.TEST_INDEX_PREFIX):
            assert entries_of(db, prefix) == expected_entries(records, prefix)
    config = make_config(database, closed_port_url())
    async with running_server(config) as server, connect(server) as conn:
        series = await conn.request("series", metric="qps", user_id=second["user_id"], test_name=second["test_name"])
    check_series(series, matching(records, user_id=second["user_id"], test_name=second["test_name"]), ["qps"], 1000)
