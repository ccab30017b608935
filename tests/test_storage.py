"""Storage behaviour seen through the server: schema checks, damaged values, failing batches."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import orjson
import plyvel
import pytest

from perfdb.config import Config, config_from_args
from perfdb.protocol.errors import PerfdbError
from perfdb.records import record_ids
from perfdb.records.profiles import Profile
from perfdb.records.record_ids import RecordIdClock
from perfdb.records.schema import Query, RecordDraft
from perfdb.server import build_store
from perfdb.storage import StoreOpenError, layout, store
from tests.support import connect, error_code, make_config, record_request, running_server, userinfo_server


def open_store(database: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        build_store(Config(database=database, max_batch_records=10)).open(loop)
    finally:
        loop.close()


@pytest.mark.parametrize(
    "metrics",
    [
        {name: float(n) + 0.5 for n, name in enumerate(layout.INDEXED_METRICS)},  # every core metric
        {"qps": 7, "perc_lat_50": 1.25, "rpc_bytes": 2**40, "ratio": -0.5},  # ints, floats, custom ones
        {"qps": True, "perc_lat_99": "fast", "warm": False, "note": "x", "nested": {"qps": 1}},  # no numbers
        {},
        None,  # not an object: no metrics at all
    ],
)
def test_user_and_test_index_entries_carry_exactly_the_numeric_metrics(metrics: object) -> None:
    numbers = {
        name: value
        for name, value in (metrics if isinstance(metrics, dict) else {}).items()
        if type(value) in (int, float)
    }
    entries = dict(layout.record_index_entries("0662102fe9f88d000002", "static:u", "unary", "nightly", metrics))
    for prefix, fields in (
        (layout.user_index_prefix("static:u"), ("static:u", "unary", "nightly")),
        (layout.test_index_prefix("unary"), ("static:u", "unary", "nightly")),
    ):
        value = entries[prefix + b"0662102fe9f88d000002"]
        user_id, test_name, tag, carried = layout.index_entry(prefix, value)
        assert (user_id, test_name, tag) == fields
        assert layout.index_fields(prefix, value) == fields
        assert carried is not None
        for name in [*layout.INDEXED_METRICS, "rpc_bytes", "ratio", "warm", "note", "nested", "absent"]:
            got = carried.get(name)
            assert got == numbers.get(name) and type(got) is type(numbers.get(name)), name
    # The tag index entries carry no metrics: the record has them.
    tag_prefix = layout.tag_index_prefix("nightly")
    assert layout.index_entry(tag_prefix, entries[tag_prefix + b"0662102fe9f88d000002"]) == (
        "static:u", "unary", "nightly", None,
    )  # fmt: skip


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
        for flags, sync in (([], True), (["--no-sync"], False)):
            # The default comes from the command line, as an operator gets it.
            parsed = config_from_args(["--address=127.0.0.1:0", f"--userinfo-url={provider.url}", *flags])
            config = dataclasses.replace(parsed, database=tmp_path / f"db-{sync}")
            async with running_server(config) as server, connect(server) as conn:
                server.store.writer._db = RecordingDB(server.store.writer._db, seen)
                assert (await conn.request(**record_request()))["ok"]
                stats = await conn.request("stats")
                assert stats["commits"]["sync"] is sync
    assert seen == [True, False]


async def test_import_keeps_ids_skips_existing_ids_and_never_replaces_a_profile(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text("an-admin-key-of-some-length\n")
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url, admin_key_file=key_file)
        async with running_server(config) as server, connect(server) as conn:
            mine = await conn.request(**record_request())
            exported = await conn.request("export", admin_key="an-admin-key-of-some-length")
            [original] = exported["records"]
            restored = {
                **original,
                "record_id": "0" * 6 + original["record_id"][6:],  # an older id, same microsecond part
                "timestamp": None,
            }
            restored["timestamp"] = _timestamp_for(restored["record_id"]).replace("Z", "+00:00")
            other_user = {**original, "user_id": "someone-else"}
            profiles = {
                "alice": {"user_id": "alice", "name": "Old name"},
                "someone-else": {"user_id": "someone-else", "name": "Else"},
            }
            reply = await conn.request(
                "import",
                admin_key="an-admin-key-of-some-length",
                records=[restored, other_user, restored],
                users=profiles,
            )
            stored = (await conn.request("get_all"))["records"]
            profile = (await conn.request("get_user", user_id="alice"))["user"]
            # A record that could be imported, beside one that cannot: neither may be stored.
            huge = {**restored, "record_id": restored["record_id"][:-1] + "f", "metrics": {"qps": 1}}
            huge["timestamp"] = _timestamp_for(huge["record_id"])
            bad = await conn.request(
                "import", admin_key="an-admin-key-of-some-length", records=[huge, {"record_id": "x"}], users=profiles
            )
            after_bad = (await conn.request("stats"))["records"]
    assert reply["ok"], reply
    # The same id under another user, and the same id twice, are duplicates, not new records.
    assert (reply["imported"], reply["duplicates"]) == (1, 2)
    assert [r["record_id"] for r in stored] == sorted([restored["record_id"], mine["record_id"]])
    old = next(r for r in stored if r["record_id"] == restored["record_id"])
    assert old["timestamp"].endswith("Z")  # canonical form, whatever the dump said
    assert profile["name"] == "User alice"  # the newer profile stays
    assert error_code(bad) == "bad_request" and bad["error"]["message"].startswith("records[1]")
    assert after_bad == 2  # a refused import stores none of its records


def _timestamp_for(record_id: str) -> str:
    from perfdb.records.record_ids import record_id_micros
    from perfdb.records.timestamps import format_micros

    return format_micros(record_id_micros(record_id))


async def test_repair_finds_damage_and_drops_it_on_request(tmp_path: Path) -> None:
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url)
        async with running_server(config) as server, connect(server) as conn:
            acks = [await conn.request(**record_request(request_id=f"r{n}")) for n in range(4)]
        victim = acks[2]
        db = plyvel.DB(str(config.database))
        key = layout.record_key(victim["record_id"], victim["user_id"])
        db.put(key, b"\x00\x00" + db.get(key)[2:])  # damage the checksum itself
        db.close()
        command = [sys.executable, "-m", "perfdb.cli", "repair", "--database", str(config.database)]
        checked = await run_command(command)
        dropped = await run_command([*command, "--drop-damaged"])
        again = await run_command(command)
        async with running_server(config) as server, connect(server) as conn:
            stats = await conn.request("stats")
            records = (await conn.request("get_all"))["records"]
            retry = await conn.request(**record_request(request_id="r2"))
    assert checked.returncode == 1, checked.stderr
    assert f"damaged record {victim['record_id']}" in checked.stdout
    assert "3 good records" in checked.stdout
    assert dropped.returncode == 0, dropped.stderr
    assert "(dropped)" in dropped.stdout
    assert again.returncode == 0 and "0 index entries" in again.stdout
    assert stats["records"] == 3 and stats["corrupt_records"] == 0
    assert [r["record_id"] for r in records] == [a["record_id"] for i, a in enumerate(acks) if i != 2]
    # The damaged record's idempotency key went with it, so a retry stores it afresh.
    assert retry["duplicate"] is False


async def run_command(command: list[str]) -> subprocess.CompletedProcess[str]:
    """A command run to completion off the event loop (the test's server shares the loop)."""
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)


def test_repair_refuses_a_database_in_use(tmp_path: Path) -> None:
    from perfdb.storage.repair import repair_database
    from perfdb.storage.store import DatabaseLock

    lock = DatabaseLock(tmp_path / "db")
    lock.acquire()
    try:
        with pytest.raises(StoreOpenError, match="already in use"):
            repair_database(tmp_path / "db", drop_damaged=False)
    finally:
        lock.release()


class CompactionFails:
    """Stands in for the writer's handle so that healing it fails and forces a reopen."""

    def compact_range(self, **_range: bytes) -> None:
        raise plyvel.IOError("injected")


async def test_reopening_under_running_reads_neither_crashes_nor_loses_data(tmp_path: Path) -> None:
    """plyvel frees LevelDB's memory on close: a reopen must wait for the reads using it."""
    store = build_store(Config(database=tmp_path / "db", sync=False))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, store.open, loop)
    profile = Profile.create("static:reader", {})
    config = {"padding": "x" * 1000}  # 5,000 of them fit in one page (PAGE_BYTES)
    drafts = [RecordDraft("t", "", {}, {"qps": n}, config, {}) for n in range(5000)]
    await asyncio.gather(*[store.submit(profile, draft) for draft in drafts])
    failures: list[str] = []
    reading = True

    async def read_everything() -> None:
        while reading:
            try:
                page = await store.get_all(Query(None, None, None, None, None, 5000, None))
                assert len(page.records) == 5000
            except PerfdbError as exc:  # none expected: reads wait for the reopen
                failures.append(exc.code.value)

    readers = [asyncio.create_task(read_everything()) for _ in range(4)]
    writer = store.writer
    for _ in range(10):
        await asyncio.sleep(0.02)
        writer._needs_heal = True
        writer._db = CompactionFails()
        await store.submit(profile, RecordDraft("t", "", {}, {"qps": -1}, {}, {}))
    reading = False
    await asyncio.gather(*readers)
    await loop.run_in_executor(None, store.close)
    assert writer.reopens == 10
    assert failures == []


async def test_damaged_index_entry_is_skipped_and_counted(tmp_path: Path) -> None:
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url)
        async with running_server(config) as server, connect(server) as conn:
            acks = [await conn.request(**record_request(metrics={"qps": n})) for n in range(3)]
        db = plyvel.DB(str(config.database))
        db.put(layout.test_index_prefix("unary") + acks[1]["record_id"].encode(), b"\x00garbage")
        db.close()
        async with running_server(config) as server, connect(server) as conn:
            filtered = await conn.request("get_all", test_name="unary")
            stats = await conn.request("stats")
    assert [r["record_id"] for r in filtered["records"]] == [acks[0]["record_id"], acks[2]["record_id"]]
    assert stats["corrupt_records"] == 1


async def test_one_scan_pages_every_keyspace_within_the_scan_budget_and_the_byte_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_user scans a user's index, get_all the records themselves or a filter's index: the same
    limits hold in each."""
    results = build_store(Config(database=tmp_path / "db", sync=False, max_batch_records=64))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, results.open, loop)
    alice, bob = Profile.create("static:alice", {}), Profile.create("static:bob", {})
    for n in range(10):  # one at a time, so record ids follow n
        test_name = "wanted" if n in (3, 4, 9) else "other"
        await results.submit(alice if n % 2 == 0 else bob, RecordDraft(test_name, "", {}, {"qps": n}, {}, {}))

    async def pages(user_id: str | None, test_name: str | None) -> list[tuple[list[int], set[str]]]:
        """Each page's qps values and profiles, following the cursor to the end."""
        found: list[tuple[list[int], set[str]]] = []
        cursor: str | None = None
        while len(found) < 20:
            query = Query(user_id, test_name, None, None, None, 1000, cursor)
            page = (await results.get_user(query))[1] if user_id else await results.get_all(query)
            qps = [orjson.loads(bytes(document))["metrics"]["qps"] for document in page.records]
            found.append((qps, set(page.profiles)))
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor
        raise AssertionError("the cursor never ran out")

    try:
        # At most 3 entries examined per page, in every keyspace a page is read from.
        monkeypatch.setattr(store, "SCAN_BUDGET", 3)
        assert [qps for qps, _ in await pages(None, None)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
        assert [qps for qps, _ in await pages("static:bob", None)] == [[1, 3, 5], [7, 9]]
        # A filter walks its own index, so the entries examined are the matching ones.
        assert await pages(None, "wanted") == [([3, 4, 9], {"static:alice", "static:bob"})]
        assert await pages("static:alice", "wanted") == [([4], set())]
        # A page ends once its records reach PAGE_BYTES, whatever the limit.
        monkeypatch.setattr(store, "SCAN_BUDGET", 50_000)
        monkeypatch.setattr(store, "PAGE_BYTES", 1)
        assert [qps for qps, _ in await pages(None, None)] == [[n] for n in range(10)]
        assert [qps for qps, _ in await pages("static:bob", None)] == [[n] for n in range(1, 10, 2)]
    finally:
        await loop.run_in_executor(None, results.close)
