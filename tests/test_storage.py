"""Storage behaviour seen through the server: schema checks, damaged values, failing batches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import plyvel
import pytest

from perfdb.storage import ResultStore, StoreOpenError, layout
from perfdb import record_ids
from perfdb.record_ids import RecordIdClock
from tests.support import connect, error_code, make_config, record_request, running_server, userinfo_server


def open_store(database: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        ResultStore(database, sync=True, max_batch=10).open(loop)
    finally:
        loop.close()


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "db"
    db = plyvel.DB(str(database), create_if_missing=True)
    db.put(layout.SCHEMA_KEY, b"999")
    db.close()
    with pytest.raises(StoreOpenError, match="schema version 999"):
        open_store(database)


def test_foreign_leveldb_is_refused(tmp_path: Path) -> None:
    database = tmp_path / "db"
    db = plyvel.DB(str(database), create_if_missing=True)
    db.put(b"someone-else", b"data")
    db.close()
    with pytest.raises(StoreOpenError, match="not a perfdb database"):
        open_store(database)
    # Refusing must not have written anything into it.
    db = plyvel.DB(str(database))
    assert list(db.iterator(include_value=False)) == [b"someone-else"]
    db.close()


def test_record_ids_never_go_back_when_the_clock_does(monkeypatch: pytest.MonkeyPatch) -> None:
    times = iter([1_000_000, 1_000_000, 999_000, 2_000_000])
    monkeypatch.setattr(record_ids, "now_micros", lambda: next(times))
    clock = RecordIdClock(None)
    ids = [clock.next() for _ in range(4)]
    assert [micros for _, micros in ids] == [1_000_000, 1_000_000, 1_000_000, 2_000_000]
    issued = [record_id for record_id, _ in ids]
    assert issued == sorted(issued) and len(set(issued)) == 4
    resumed = RecordIdClock(issued[-1])
    monkeypatch.setattr(record_ids, "now_micros", lambda: 5)
    assert resumed.next()[0] > issued[-1]


async def test_damaged_record_is_skipped_reported_and_counted(tmp_path: Path) -> None:
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url)
        async with running_server(config) as server, connect(server) as conn:
            acks = [await conn.request(**record_request(metrics={"qps": n})) for n in range(3)]
        victim = acks[1]
        db = plyvel.DB(str(config.database))
        key = layout.record_key(victim["record_id"], victim["user_id"])
        value = bytearray(db.get(key))
        value[len(value) // 2] ^= 0x01  # one flipped bit
        db.put(key, bytes(value))
        db.close()
        async with running_server(config) as server, connect(server) as conn:
            everyone = await conn.request("get_all")
            mine = await conn.request("get_user", user_id="alice")
            stats = await conn.request("stats")
    survivors = [acks[0]["record_id"], acks[2]["record_id"]]
    assert [r["record_id"] for r in everyone["records"]] == survivors
    assert [r["record_id"] for r in mine["records"]] == survivors
    assert stats["corrupt_records"] == 2  # seen once by each read


async def test_failed_batch_answers_storage_error_and_recovers(tmp_path: Path) -> None:
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url)
        async with running_server(config) as server, connect(server) as conn:
            assert (await conn.request(**record_request(request_id="before")))["ok"]

            def disk_full() -> None:
                raise plyvel.IOError("IO error: No space left on device")

            server.store.writer.write_batch_hook = disk_full
            await conn.send(*[record_request(request_id=f"r{n}", id=n) for n in range(20)])
            failed = await conn.replies(20)
            # Reads keep working while writes fail.
            during = await conn.request("get_all")
            server.store.writer.write_batch_hook = None
            retried = [await conn.request(**record_request(request_id=f"r{n}")) for n in range(20)]
            after = await conn.request("get_all")
            stats = await conn.request("stats")
    for reply in failed:
        assert error_code(reply) == "storage_error"
        assert reply["error"]["retryable"] is True
    assert len(during["records"]) == 1
    assert all(r["ok"] and r["duplicate"] is False for r in retried)
    assert len(after["records"]) == 21
    assert stats["records"] == 21 and stats["commits"]["failed_batches"] >= 1


class RecordingDB:
    """Stands in front of the writer's plyvel.DB to see the sync flag of each batch it opens."""

    def __init__(self, real: plyvel.DB, seen: list[bool]) -> None:
        self._real = real
        self._seen = seen

    def write_batch(self, *, sync: bool) -> plyvel.WriteBatch:
        self._seen.append(sync)
        return self._real.write_batch(sync=sync)

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._real.get(key)
        return value


async def test_write_batches_are_synchronous_by_default(tmp_path: Path) -> None:
    seen: list[bool] = []
    async with userinfo_server() as provider:
        for sync in (True, False):
            config = make_config(tmp_path / f"db-{sync}", provider.url, sync=sync)
            async with running_server(config) as server, connect(server) as conn:
                server.store.writer._db = RecordingDB(server.store.writer._db, seen)
                assert (await conn.request(**record_request()))["ok"]
                stats = await conn.request("stats")
                assert stats["commits"]["sync"] is sync
    assert seen == [True, False]
