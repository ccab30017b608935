"""The dashboard's reads from perfdb: exact pages in either time direction and by a metric, the
bounded search, and record lookup by id. Against a real perfdb server holding dense bursts (many
results in one microsecond) and years-long gaps."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from perfdb.client import AsyncClient
from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.web import source as source_module
from perfdb.web.source import RecordQuery, ResultSource
from tests.support import perfdb_with_provider

ADMIN_KEY = "admin-key-for-scan-tests-0123456789"
DAY = 86_400 * 1_000_000
USERS = {"alice": {"user_id": "alice", "name": "Alice Adams"}, "bob": {"user_id": "bob", "name": "Bob Brown"}}


def _records() -> list[dict[str, Any]]:
    """440 results: sparse over three years, a few a day lately, and a burst of 300 within one
    second an hour ago, five at a time sharing a microsecond."""
    now = now_micros()
    moments: list[tuple[int, int]] = []
    moments += [(now - 4 * 365 * DAY + index * 27 * DAY, 0) for index in range(40)]
    moments += [(now - 10 * DAY + index * DAY // 10, 0) for index in range(100)]
    burst = now - 3600 * 1_000_000
    moments += [(burst + (index // 5) * 16_000, index % 5) for index in range(300)]
    records = []
    for index, (micros, sequence) in enumerate(sorted(moments)):
        user = "bob" if index % 9 == 0 else "alice"
        records.append(
            {
                "record_id": make_record_id(micros, sequence),
                "user_id": user,
                "timestamp": format_micros(micros),
                "test_name": "burst" if sequence or index % 2 else "steady",
                "tag": "",
                "metrics": {"qps": float(index)},
            }
        )
    return records


@contextlib.asynccontextmanager
async def seeded_source(tmp_path: Path) -> AsyncIterator[tuple[ResultSource, list[dict[str, Any]]]]:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY)
    records = _records()
    async with perfdb_with_provider(tmp_path, admin_key_file=key_file) as (server, _):
        address = f"127.0.0.1:{server.port}"
        async with AsyncClient(address) as client:
            for start in range(0, len(records), 200):
                batch = records[start : start + 200]
                users = {record["user_id"]: USERS[record["user_id"]] for record in batch}
                await client.call("import", admin_key=ADMIN_KEY, records=batch, users=users)
        source = ResultSource(address)
        try:
            yield source, records
        finally:
            await source.close()


def _ids(records: list[dict[str, Any]]) -> list[str]:
    return [record["record_id"] for record in records]


async def _time_pages(source: ResultSource, query: RecordQuery, *, wanted: int, newest_first: bool) -> list[list[str]]:
    pages = []
    position: str | None = None
    while True:
        found = await source.read_in_time_order(query, wanted=wanted, newest_first=newest_first, cursor=position)
        pages.append([row.record_id for row in found.rows])
        if not found.more:
            return pages
        assert found.resume is not None and found.resume != position
        position = found.resume


async def test_time_ordered_reads_page_exactly_both_ways(tmp_path: Path) -> None:
    async with seeded_source(tmp_path) as (source, records):
        for query, expected in (
            (RecordQuery(), _ids(records)),
            (RecordQuery(user_id="bob"), [r["record_id"] for r in records if r["user_id"] == "bob"]),
            (RecordQuery(test_name="burst"), [r["record_id"] for r in records if r["test_name"] == "burst"]),
            (RecordQuery(search_words=("alice", "steady")), [
                r["record_id"] for r in records if r["user_id"] == "alice" and r["test_name"] == "steady"
            ]),
        ):  # fmt: skip
            for newest_first in (False, True):
                pages = await _time_pages(source, query, wanted=33, newest_first=newest_first)
                assert [record_id for page in pages for record_id in page] == (
                    expected[::-1] if newest_first else expected
                )
                assert all(len(page) == 33 for page in pages[:-1])
        first = await source.read_in_time_order(RecordQuery(), wanted=10, newest_first=True)
        assert first.total == len(records)  # perfdb counts an unfiltered query exactly
        assert (await source.read_in_time_order(RecordQuery(user_id="carol"), wanted=10, newest_first=True)).rows == []


async def test_a_search_examines_a_bounded_number_and_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_module, "SEARCH_BUDGET", 60)
    monkeypatch.setattr(source_module, "PAGE_LIMIT", 20)
    async with seeded_source(tmp_path) as (source, records):
        bob = [record["record_id"] for record in records if record["user_id"] == "bob"]
        query = RecordQuery(search_words=("bob",))
        found = await source.read_in_time_order(query, wanted=10, newest_first=False)
        assert found.cut and found.more and found.examined == 60
        assert found.resume == _ids(records)[59]
        assert [row.record_id for row in found.rows] == [r for r in bob if r <= _ids(records)[59]]
        pages = await _time_pages(source, query, wanted=10, newest_first=True)
        assert [record_id for page in pages for record_id in page] == bob[::-1]
        assert any(len(page) < 10 for page in pages[:-1])  # some pages ran out of budget


async def test_sorted_reads_rank_the_whole_filtered_set(tmp_path: Path) -> None:
    async with seeded_source(tmp_path) as (source, records):
        burst = sorted(
            (r for r in records if r["test_name"] == "burst"), key=lambda r: (-r["metrics"]["qps"], r["record_id"])
        )
        seen: list[str] = []
        cursor = None
        while True:
            page = await source.read_sorted(
                RecordQuery(test_name="burst"), metric="qps", descending=True, limit=40, cursor=cursor
            )
            assert page.complete
            seen += [row.record_id for row in page.rows]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == [record["record_id"] for record in burst]


async def test_find_record_picks_one_result_out_of_its_microsecond(tmp_path: Path) -> None:
    async with seeded_source(tmp_path) as (source, records):
        shared = [record for record in records if record["record_id"][:14] == records[-1]["record_id"][:14]]
        assert len(shared) == 5
        for record in shared:
            found = await source.find_record(record["record_id"])
            assert found is not None
            assert found[0]["record_id"] == record["record_id"] and found[0]["metrics"] == record["metrics"]
            assert found[1] == USERS[record["user_id"]]
        assert await source.find_record(shared[0]["record_id"][:14] + "0000ff") is None
        assert await source.profile("bob") == USERS["bob"]
        assert await source.profile("carol") is None
