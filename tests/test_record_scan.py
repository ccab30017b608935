"""Pages whose every entry is admitted (get_all and export without filters, read straight from the
record keyspace, and get_user without other filters, over the user's index) are built over the
whole run of records at once (store._run_page): they must be exactly the pages the entry-by-entry
read makes, damaged records included."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import plyvel
import pytest

from perfdb.records.profiles import Profile
from perfdb.records.record_ids import record_id_micros
from perfdb.records.schema import Query, RecordDraft
from perfdb.storage import ResultStore, layout, store
from perfdb.storage.store import Page
from tests.support import opened_store

RECORDS = 40


def sealed_values() -> list[bytes]:
    return [layout.seal(b'{"n":%d,"pad":"%s"}' % (n, b"x" * n)) for n in range(30)]


def test_unseal_all_gives_what_unseal_gives_or_none_when_any_value_is_damaged() -> None:
    values = sealed_values()
    documents = layout.unseal_all(values)
    assert documents is not None
    assert [bytes(document) for document in documents] == [bytes(layout.unseal(value)) for value in values]
    assert layout.unseal_all([]) == []
    flipped = bytearray(values[7])
    flipped[len(flipped) // 2] ^= 0x01
    for damaged in (bytes(flipped), values[3][:3], b"", values[5][:-1]):
        with pytest.raises(layout.CorruptValueError):
            layout.unseal(damaged)
        assert layout.unseal_all([*values[:10], damaged, *values[10:]]) is None


async def fill(database: Path) -> list[str]:
    """RECORDS records of growing size from three users, one of them excluded; their ids."""
    async with opened_store(database, max_batch_records=8) as results:
        users = [Profile.create(f"static:user-{n}", {"name": f"User {n}"}) for n in range(3)]
        ids = []
        for n in range(RECORDS):  # one at a time, so record ids follow n
            draft = RecordDraft("unary", "", {}, {"qps": n}, {"pad": "x" * (n * 37)}, {})
            ids.append((await results.submit(users[n % 3], draft)).record_id)
        await results.set_exclusion(ids[5], {"note": "noisy host", "excluded_by": "admin", "excluded_at": "-"}, None)
        return ids


def entry_by_entry(results: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the store read every page entry by entry, as before the run path."""
    monkeypatch.setattr(results, "_run_page", lambda snapshot, source, query, entries: None)


PageFields = tuple[list[bytes], str | None, set[bytes], dict[str, Any]]


async def all_pages(results: ResultStore, **fields: Any) -> list[PageFields]:
    """Every page of a get_all (or, given user_id, a get_user), following the cursor: (records,
    next_cursor, user ids, profiles)."""
    pages: list[PageFields] = []
    cursor: str | None = None
    user_id = fields.get("user_id")
    while len(pages) <= RECORDS + 1:
        query = Query(user_id, None, None, fields.get("since"), fields.get("until"), fields["limit"], cursor,
                      reverse=fields.get("reverse", False))  # fmt: skip
        page: Page = await results.get_all(query) if user_id is None else (await results.get_user(query))[1]
        pages.append(([bytes(document) for document in page.records], page.next_cursor, page.user_ids, page.profiles))
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor
    raise AssertionError("the cursor never ran out")


@pytest.fixture
def run_pages(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the pages the run path built (not None), so a test knows it ran."""
    built: list[int] = []
    run_page = ResultStore._run_page

    def counted(
        self: ResultStore, snapshot: Any, source: Any, query: Query, entries: Iterator[tuple[bytes, bytes]]
    ) -> Page | None:
        page = run_page(self, snapshot, source, query, entries)
        if page is not None:
            built.append(len(page.records))
        return page

    monkeypatch.setattr(ResultStore, "_run_page", counted)
    return built


async def compared(database: Path, monkeypatch: pytest.MonkeyPatch, **fields: Any) -> list[PageFields]:
    """The pages of one get_all read both ways; they must be equal."""
    async with opened_store(database, max_batch_records=8) as results:
        run = await all_pages(results, **fields)
        with monkeypatch.context() as patch:
            entry_by_entry(results, patch)
            assert await all_pages(results, **fields) == run
    return run


async def test_pages_built_over_a_run_of_records_are_the_entry_by_entry_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_pages: list[int]
) -> None:
    ids = await fill(tmp_path / "db")
    since, until = record_id_micros(ids[9]), record_id_micros(ids[30])
    for user in (None, 1):  # every record, then user 1's (every third)
        mine = [record_id for n, record_id in enumerate(ids) if user is None or n % 3 == user]
        within = sum(since <= record_id_micros(record_id) < until for record_id in mine)
        owner = {} if user is None else {"user_id": f"static:user-{user}"}
        for limit, page_bytes, budget in itertools.product((1, 3, 7, 40, 41), (1, 2_000, 8 * 1024 * 1024), (5, 50_000)):
            monkeypatch.setattr(store, "PAGE_BYTES", page_bytes)
            monkeypatch.setattr(store, "SCAN_BUDGET", budget)
            for reverse, bounds in itertools.product((False, True), ({}, {"since": since, "until": until})):
                pages = await compared(tmp_path / "db", monkeypatch, limit=limit, reverse=reverse, **bounds, **owner)
                records = [record for page in pages for record in page[0]]
                assert len(records) == (within if bounds else len(mine))
    assert run_pages, "the run path never built a page"
    # The excluded record carries its exclusion both ways (compared above); here it shows.
    async with opened_store(tmp_path / "db", max_batch_records=8) as results:
        pages = await all_pages(results, limit=RECORDS)
    assert [b'"noisy host"' in record for record in pages[0][0]] == [n == 5 for n in range(RECORDS)]


async def test_a_damaged_record_is_skipped_and_counted_and_the_page_stays_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_pages: list[int]
) -> None:
    ids = await fill(tmp_path / "db")
    db = plyvel.DB(str(tmp_path / "db"))
    try:
        damaged = {}
        for n, damage in ((3, "flip"), (4, "short"), (31, "flip")):
            key = next(db.iterator(prefix=layout.RECORD_PREFIX + ids[n].encode(), include_value=False))
            value = bytearray(db.get(key))
            if damage == "flip":
                value[len(value) // 2] ^= 0x01
            db.put(key, bytes(value) if damage == "flip" else bytes(value[:3]))
            damaged[n] = key
    finally:
        db.close()
    for limit in (1, 7, 40):
        pages = await compared(tmp_path / "db", monkeypatch, limit=limit)
        records = [record for page in pages for record in page[0]]
        assert [record for record in records if b'"record_id":"%s"' % ids[3].encode() in record] == []
        assert len(records) == RECORDS - 3
        # User 1 holds ids[4] and ids[31] (n % 3 == 1): both damaged, skipped over their index too.
        theirs = await compared(tmp_path / "db", monkeypatch, limit=limit, user_id="static:user-1")
        assert len([record for page in theirs for record in page[0]]) == len(range(1, RECORDS, 3)) - 2
    async with opened_store(tmp_path / "db", max_batch_records=8) as results:
        page = await results.get_all(Query(None, None, None, None, None, 10, None))
        assert len(page.records) == 10  # the two damaged among the first 12 skipped, the page still full
        assert results.corrupt_records == 2
