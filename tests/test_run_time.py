"""Records that say when they ran are filed at that time: an imported history reads, filters and
charts over the time it ran, while each record keeps its commit timestamp."""

from __future__ import annotations

import datetime
import random
from pathlib import Path
from typing import Any

from perfdb.records.record_ids import record_id_micros
from perfdb.records.timestamps import format_micros, now_micros, parse_rfc3339
from tests.support import all_records_pages, connect, page_through, perfdb_with_provider

LAST_YEAR = int(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC).timestamp() * 1_000_000)
DAY = 86_400 * 1_000_000


def history(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """A year of nightly results, sent in a shuffled order (as an import of several files might)."""
    records = [
        {
            "test_name": "BM_Sort",
            "request_id": f"nightly-{day}",
            "run_time": format_micros(LAST_YEAR + day * DAY + rng.randrange(DAY)),
            "metrics": {"real_time": 1000.0 + day},
        }
        for day in range(count)
    ]
    rng.shuffle(records)
    return records


async def test_an_imported_history_is_read_filtered_and_charted_at_the_time_it_ran(tmp_path: Path) -> None:
    rng = random.Random(3)
    records = history(300, rng)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        today = await conn.request("record", access_token="user-alice", test_name="BM_Sort", metrics={"real_time": 1})
        sent_at = now_micros()
        results = (await conn.request("record_batch", access_token="user-alice", records=records))["results"]
        stored = all_records_pages(await page_through(conn, "get_user", user_id="alice", limit=100))
        spring = all_records_pages(
            await page_through(conn, "get_all", since="2025-03-01T00:00:00Z", until="2025-06-01T00:00:00Z")
        )
        newest = (await conn.request("get_user", user_id="alice", reverse=True, limit=1))["records"]
        series = await conn.request(
            "series", metric="real_time", test_name="BM_Sort", since="2025-01-01T00:00:00Z",
            until="2026-01-01T00:00:00Z", buckets=365,
        )  # fmt: skip
        again = (await conn.request("record_batch", access_token="user-alice", records=records[:5]))["results"]
    ran = {record["request_id"]: parse_rfc3339(record["run_time"]) for record in records}
    for record, result in zip(records, results, strict=True):
        # Filed at the time it ran; its timestamp is still when the server stored it.
        assert record_id_micros(result["record_id"]) == ran[record["request_id"]]
        assert parse_rfc3339(result["timestamp"]) >= sent_at - 5 * 60 * 1_000_000
    # Oldest first is run-time order; the record stored today comes last, and first newest-first.
    by_run_time = sorted(records, key=lambda record: ran[record["request_id"]])
    assert [record.get("request_id") for record in stored] == [r["request_id"] for r in by_run_time] + [None]
    assert newest[0]["record_id"] == today["record_id"]
    # since/until select by the time a record ran.
    start, end = parse_rfc3339("2025-03-01T00:00:00Z"), parse_rfc3339("2025-06-01T00:00:00Z")
    assert {record["request_id"] for record in spring} == {rid for rid, micros in ran.items() if start <= micros < end}
    # The chart of last year holds every one of those results, each in the bucket of its day.
    real_time = series["series"]["real_time"]
    assert real_time["count"] == 300 and series["records"] == 300
    assert sum(point["count"] for point in real_time["points"]) == 300
    assert real_time["min"]["value"] == 1000.0 and real_time["max"]["value"] == 1299.0
    # A resend is a duplicate of the record it stored, at the same place.
    assert [result["record_id"] for result in again] == [result["record_id"] for result in results[:5]]
    assert all(result["duplicate"] for result in again)


async def test_a_record_that_ran_moments_ago_keeps_commit_order(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        first = await conn.request("record", access_token="user-alice", test_name="t", metrics={"qps": 1})
        recent = await conn.request(
            "record", access_token="user-alice", test_name="t", metrics={"qps": 2},
            run_time=format_micros(now_micros() - 10 * 1_000_000),
        )  # fmt: skip
    assert recent["record_id"] > first["record_id"]
    stored_run_time = parse_rfc3339(recent["timestamp"]) - record_id_micros(recent["record_id"])
    assert stored_run_time == 0  # its id is its commit time


async def test_records_filed_at_their_run_time_export_and_import_into_another_database(tmp_path: Path) -> None:
    admin_key = "admin-key-for-run-times"
    key_file = tmp_path / "admin.key"
    key_file.write_text(admin_key)
    records = history(20, random.Random(4))
    async with perfdb_with_provider(tmp_path / "a", admin_key_file=key_file) as (server, _), connect(server) as conn:
        await conn.request("record_batch", access_token="user-alice", records=records)
        exported = await conn.request("export", admin_key=admin_key)
    async with perfdb_with_provider(tmp_path / "b", admin_key_file=key_file) as (server, _), connect(server) as conn:
        restored = await conn.request(
            "import", admin_key=admin_key, records=exported["records"], users=exported["users"]
        )
        again = await conn.request("export", admin_key=admin_key)
        # An id whose time is neither its timestamp's nor its run_time's is refused, as before.
        forged = {**exported["records"][0], "run_time": format_micros(LAST_YEAR - DAY)}
        refused = await conn.request("import", admin_key=admin_key, records=[forged], users=exported["users"])
    assert restored["ok"] and restored["imported"] == 20, restored
    assert again["records"] == exported["records"]
    assert refused["error"]["message"] == "records[0]: timestamp: does not match the record id"
