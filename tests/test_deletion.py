"""Removing data: delete_record, delete_user, tombstones through export and import, and the audit
log, against a real server on loopback with its real LevelDB database."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import plyvel
import pytest

from perfdb.config import Config
from perfdb.records.profiles import Profile
from perfdb.records.schema import RecordDraft
from perfdb.server import PerfdbServer, build_store
from perfdb.storage import layout
from perfdb.storage import store as store_module
from perfdb.storage.overview import Overview, Row
from perfdb.storage.writer import USER_DELETION_BYTES, USER_DELETION_CHUNK
from tests.support import (
    REPO_ROOT,
    Connection,
    UserinfoServer,
    connect,
    error_code,
    make_config,
    page_through,
    record_request,
    running_server,
    send_burst,
    userinfo_server,
)
from tests.test_reads import FILTERS, check_overview, ids, matching, write_burst

ADMIN_KEY = "admin-key-0123456789abcdef"
QUEUE_DEADLINE = 20.0  # for the writer to take a request in; it takes milliseconds


def write_admin_key(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    key_file = directory / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    return key_file


@contextlib.asynccontextmanager
async def perfdb(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[PerfdbServer, UserinfoServer]]:
    """A server with an admin key, resolving "user-<name>" tokens through a userinfo server."""
    key_file = write_admin_key(tmp_path)
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url, admin_key_file=key_file, **overrides)
        async with running_server(config) as server:
            yield server, provider


async def store(connection: Connection, token: str, count: int, test_name: str = "unary") -> list[str]:
    """Store `count` records for the token's user; their ids."""
    await connection.send(
        *(
            record_request(token, test_name, metrics={"qps": 1000.0 + n}, request_id=f"{test_name}-{n}")
            for n in range(count)
        )
    )
    replies = await connection.replies(count)
    assert all(reply["ok"] for reply in replies), replies
    return [reply["record_id"] for reply in replies]


async def all_ids(connection: Connection) -> list[str]:
    return [r["record_id"] for page in await page_through(connection, "get_all", limit=5000) for r in page["records"]]


async def user_ids(connection: Connection, user_id: str) -> list[str] | None:
    """The ids get_user returns for the user, or None for not_found."""
    first = await connection.request("get_user", user_id=user_id, limit=1)
    if not first["ok"]:
        assert error_code(first) == "not_found"
        return None
    pages = await page_through(connection, "get_user", user_id=user_id, limit=5000)
    return [r["record_id"] for page in pages for r in page["records"]]


async def audit(connection: Connection) -> list[dict[str, Any]]:
    pages = await page_through(connection, "audit_log", admin_key=ADMIN_KEY, limit=2)
    return [entry for page in pages for entry in page["entries"]]


def keys_naming(database: Path, record_id: str) -> list[bytes]:
    """Every key of the (closed) database that holds the record id."""
    db = plyvel.DB(str(database))
    try:
        return [key for key in db.iterator(include_value=False) if record_id.encode() in key]
    finally:
        db.close()


async def test_the_owner_deletes_a_record_from_every_read(tmp_path: Path) -> None:
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        alice = await store(c, "user-alice", 3)
        bob = await store(c, "user-bob", 1)
        before = await c.request("stats")

        reply = await c.request("delete_record", id=1, record_id=alice[1], access_token="user-alice")
        assert reply == {"id": 1, "ok": True, "record_id": alice[1], "deleted": True}

        assert await user_ids(c, "alice") == [alice[0], alice[2]]
        assert await all_ids(c) == [alice[0], alice[2], bob[0]]
        export = await c.request("export", admin_key=ADMIN_KEY)
        assert [r["record_id"] for r in export["records"]] == [alice[0], alice[2], bob[0]]
        assert export["tombstones"] == [alice[1]]
        after = await c.request("stats")
        assert (after["records"], after["users"]) == (before["records"] - 1, before["users"])

        # Deleting it again is fine and says so; an id that never existed is not_found.
        again = await c.request("delete_record", record_id=alice[1], access_token="user-alice")
        assert (again["ok"], again["deleted"]) == (True, False)
        never = "0" * 20
        assert error_code(await c.request("delete_record", record_id=never, access_token="user-alice")) == "not_found"
        # Its request_id went with it: sending it again stores a new record.
        await c.send(record_request("user-alice", request_id="unary-1"))
        resent = await c.reply()
        assert resent["duplicate"] is False and resent["record_id"] not in alice
        assert len(await audit(c)) == 1


async def test_another_users_token_is_forbidden_and_changes_nothing(tmp_path: Path) -> None:
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        alice = await store(c, "user-alice", 2)
        await store(c, "user-bob", 1)
        before = (await all_ids(c), await c.request("export", admin_key=ADMIN_KEY))

        refused = await c.request("delete_record", id="x", record_id=alice[0], access_token="user-bob")
        assert refused["error"] == {
            "code": "forbidden",
            "message": "record_id: the record belongs to another user",
            "retryable": False,
        }
        stats = await c.request("stats")
        assert (await all_ids(c), await c.request("export", admin_key=ADMIN_KEY)) == before
        assert stats["records"] == 3
        assert await audit(c) == []
        # The admin key may delete anyone's record.
        by_admin = await c.request("delete_record", record_id=alice[0], admin_key=ADMIN_KEY)
        assert by_admin["deleted"] is True


async def test_a_deleted_record_is_known_only_to_its_owner_and_the_admin(tmp_path: Path) -> None:
    """Whether another user's record was deleted is not revealed: their tombstone is not_found, as
    is one that does not say whose it was (written before tombstones did, or imported)."""
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        alice = await store(c, "user-alice", 3)
        assert (await c.request("delete_record", record_id=alice[0], access_token="user-alice"))["deleted"]
        assert (await c.request("delete_record", record_id=alice[1], admin_key=ADMIN_KEY))["deleted"]
        imported = "0" * 19 + "1"  # an id deleted where an export came from; never stored here
        reply = await c.request("import", admin_key=ADMIN_KEY, tombstones=[imported])
        assert reply["ok"], reply

        for record_id in alice[:2]:
            by_owner = await c.request("delete_record", record_id=record_id, access_token="user-alice")
            by_other = await c.request("delete_record", record_id=record_id, access_token="user-bob")
            by_admin = await c.request("delete_record", record_id=record_id, admin_key=ADMIN_KEY)
            assert (by_owner["ok"], by_owner["deleted"], by_admin["deleted"]) == (True, False, False)
            assert by_other["error"] == {"code": "not_found", "message": "no such record", "retryable": False}
        assert error_code(await c.request("delete_record", record_id=imported, access_token="user-alice")) == (
            "not_found"
        )
        assert (await c.request("delete_record", record_id=imported, admin_key=ADMIN_KEY))["deleted"] is False

    # A tombstone of an older server holds only the deletion time.
    db = plyvel.DB(str(tmp_path / "db"))
    db.put(layout.tombstone_key(alice[0]), b"2026-01-01T00:00:00Z")
    db.close()
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        by_owner = await c.request("delete_record", record_id=alice[0], access_token="user-alice")
        assert error_code(by_owner) == "not_found"
        assert (await c.request("delete_record", record_id=alice[0], admin_key=ADMIN_KEY))["deleted"] is False
        assert (await c.request("delete_record", record_id=alice[1], access_token="user-alice"))["deleted"] is False
        assert await all_ids(c) == [alice[2]]
        assert len(await audit(c)) == 2  # the two deletions; the answers above changed nothing


async def test_bad_delete_requests_are_refused_with_their_field(tmp_path: Path) -> None:
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        (record_id,) = await store(c, "user-alice", 1)
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"op": "delete_record", "record_id": record_id}, "bad_request", "access_token: is required"),
            ({"op": "delete_record", "access_token": "user-alice"}, "bad_request", "record_id: is required"),
            (
                {"op": "delete_record", "record_id": "ABC", "access_token": "user-alice"},
                "bad_request",
                "record_id: must",
            ),
            ({"op": "delete_record", "record_id": 7, "access_token": "user-alice"}, "bad_request", "record_id: must"),
            (
                {"op": "delete_record", "record_id": record_id, "access_token": "user-alice", "x": 1},
                "bad_request",
                "'x'",
            ),
            (
                {"op": "delete_record", "record_id": record_id, "access_token": "user-alice", "admin_key": ADMIN_KEY},
                "bad_request",
                "access_token: cannot be combined",
            ),
            ({"op": "delete_record", "record_id": record_id, "admin_key": "wrong"}, "forbidden", "admin_key"),
            ({"op": "delete_record", "record_id": record_id, "access_token": "bad-token"}, "unauthenticated", ""),
            ({"op": "delete_user", "user_id": "alice"}, "forbidden", "admin_key"),
            ({"op": "delete_user", "admin_key": ADMIN_KEY}, "bad_request", "user_id: is required"),
            ({"op": "delete_user", "admin_key": ADMIN_KEY, "user_id": "a", "force": True}, "bad_request", "'force'"),
            ({"op": "audit_log", "admin_key": "wrong"}, "forbidden", "admin_key"),
            ({"op": "audit_log", "admin_key": ADMIN_KEY, "cursor": "nope"}, "bad_request", "cursor:"),
            ({"op": "audit_log", "admin_key": ADMIN_KEY, "limit": 0}, "bad_request", "limit:"),
            ({"op": "import", "admin_key": ADMIN_KEY, "tombstones": ["x"]}, "bad_request", "tombstones[0]:"),
            ({"op": "import", "admin_key": ADMIN_KEY, "tombstones": [record_id], "force": 1}, "bad_request", "force:"),
            ({"op": "import", "admin_key": ADMIN_KEY, "tombstones": []}, "bad_request", "records:"),
        ]
        for request, code, message in cases:
            await c.send(request)
            reply = await c.reply()
            assert error_code(reply) == code, (request, reply)
            assert reply["error"]["message"].startswith(message), (request, reply)
        assert await all_ids(c) == [record_id]
        assert await c.request("ping") == {"id": None, "ok": True}


async def test_deleted_records_stay_gone_after_restart_repair_and_compaction(tmp_path: Path) -> None:
    database = tmp_path / "db"
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        alice = await store(c, "user-alice", 5)
        bob = await store(c, "user-bob", 3)
    # The records go down into table files; their deletions will sit above them, in the log.
    await asyncio.to_thread(compact, database)

    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        assert (await c.request("delete_record", record_id=alice[2], access_token="user-alice"))["deleted"]
        assert (await c.request("delete_user", admin_key=ADMIN_KEY, user_id="bob"))["records"] == 3
        kept = await all_ids(c)
    assert kept == [alice[0], alice[1], alice[3], alice[4]]

    async def check() -> None:
        async with perfdb(tmp_path) as (server, _), connect(server) as c:
            assert await all_ids(c) == kept
            assert await user_ids(c, "alice") == kept
            assert await user_ids(c, "bob") is None
            stats = await c.request("stats")
            assert (stats["records"], stats["users"]) == (4, 1)
            export = await c.request("export", admin_key=ADMIN_KEY)
            assert export["tombstones"] == sorted([alice[2], *bob])
            assert [entry["op"] for entry in await audit(c)] == ["delete_user", "delete_record"]

    await check()  # a restart
    repaired = await asyncio.to_thread(perfdb_repair, database)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert repaired.stdout.splitlines()[0] == "4 good records, 1 users"
    await check()
    await asyncio.to_thread(compact, database)
    for record_id in [alice[2], *bob]:
        # Nothing derived from a deleted record is left but its tombstone (audit entries are
        # keyed by their own ids).
        assert await asyncio.to_thread(keys_naming, database, record_id) == [layout.tombstone_key(record_id)]
    await check()


async def test_repair_removes_a_deleted_record_that_came_back(tmp_path: Path) -> None:
    """LevelDB's repair may bring back an older copy of a record whose deletion was in a lost
    table; the tombstone tells perfdb repair that it must go again, with every key derived from
    it, on a plain repair (a deleted record is never data to keep)."""
    database = tmp_path / "db"
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        alice = await store(c, "user-alice", 3)
    db = plyvel.DB(str(database))
    old_copy = {key: value for key, value in db.iterator() if alice[1].encode() in key}
    old_copy[layout.idempotency_key("alice", "unary-1")] = db.get(layout.idempotency_key("alice", "unary-1"))
    db.close()
    # the record, its three filter index entries, one per core metric, its idempotency entry
    assert len(old_copy) == 1 + 3 + len(layout.INDEXED_METRICS) + 1
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        assert (await c.request("delete_record", record_id=alice[1], access_token="user-alice"))["deleted"]
    db = plyvel.DB(str(database))
    for key, value in old_copy.items():
        db.put(key, value)  # the record and its index entries, as a lost deletion would leave them
    db.close()

    repaired = await asyncio.to_thread(perfdb_repair, database)
    assert repaired.returncode == 0, repaired.stdout
    lines = repaired.stdout.splitlines()
    assert lines[0] == "2 good records, 1 users"
    assert f"deleted record {alice[1]} was back (removed again)" in lines
    assert "0 index entries without their record" in lines
    assert await asyncio.to_thread(keys_naming, database, alice[1]) == [layout.tombstone_key(alice[1])]
    counts, entries = await asyncio.to_thread(stored_derived_keys, database)
    assert (counts[layout.test_count_key("unary")], counts[layout.user_count_key("alice")]) == (2, 2)
    assert not [key for key in entries if alice[1].encode() in key]
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        assert await all_ids(c) == [alice[0], alice[2]]
        assert await user_ids(c, "alice") == [alice[0], alice[2]]
        export = await c.request("export", admin_key=ADMIN_KEY)
        assert [r["record_id"] for r in export["records"]] == [alice[0], alice[2]]
        assert (await c.request("stats"))["records"] == 2
        unary = await c.request("get_all", test_name="unary")
        assert ([r["record_id"] for r in unary["records"]], unary["total"]) == ([alice[0], alice[2]], 2)
        assert (await c.request("overview", metric="qps"))["tests"]["unary"]["records"] == 2
        # Its request_id was forgotten with it: sending it again stores a new record.
        await c.send(record_request("user-alice", request_id="unary-1"))
        assert (await c.reply())["duplicate"] is False


def compact(database: Path) -> None:
    db = plyvel.DB(str(database))
    try:
        db.compact_range()
    finally:
        db.close()


def perfdb_repair(database: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`perfdb repair --database DIR`, as an operator runs it with the server stopped."""
    return subprocess.run(
        [sys.executable, "-m", "perfdb.cli", "repair", "--database", str(database), *options],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_audit_entries_say_who_and_what_without_content(tmp_path: Path) -> None:
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        alice = await store(c, "user-alice", 2, test_name="secret_benchmark_name")
        await store(c, "user-bob", 2, test_name="secret_benchmark_name")
        await c.request("delete_record", record_id=alice[0], access_token="user-alice")
        await c.request("delete_record", record_id=alice[1], admin_key=ADMIN_KEY)
        await c.request("delete_user", admin_key=ADMIN_KEY, user_id="bob")
        await c.request("delete_user", admin_key=ADMIN_KEY, user_id="bob")  # nothing left: no entry

        entries = await audit(c)
        assert [
            (e["actor"], e["op"], e.get("user_id"), e.get("record_ids"), e["records"], e["complete"]) for e in entries
        ] == [
            ("admin", "delete_user", "bob", None, 2, True),
            ("admin", "delete_record", "alice", [alice[1]], 1, True),
            ("owner", "delete_record", "alice", [alice[0]], 1, True),
        ]
        assert [e["audit_id"] for e in entries] == sorted((e["audit_id"] for e in entries), reverse=True)
        assert all(
            set(e) <= {"audit_id", "time", "actor", "op", "user_id", "record_ids", "records", "complete"}
            for e in entries
        )
        text = orjson.dumps(entries)
        for content in (b"secret_benchmark_name", b"qps", b"metrics", b"User alice", b"example.com"):
            assert content not in text
        # Paging newest first: the cursor goes on from the oldest entry of a page.
        first = await c.request("audit_log", admin_key=ADMIN_KEY, limit=1)
        second = await c.request("audit_log", admin_key=ADMIN_KEY, limit=5, cursor=first["next_cursor"])
        assert [*first["entries"], *second["entries"]] == entries and second["next_cursor"] is None


async def test_delete_user_goes_in_chunks_between_other_writes(tmp_path: Path) -> None:
    count = 20_000
    async with perfdb(tmp_path) as (server, _), connect(server) as c, connect(server) as other:
        await import_records(c, "mallory", count)
        carol = await store(c, "user-carol", 2)
        writer = server.store.writer

        # The first chunk's batch waits until a record is queued behind it; every batch notes
        # the counters as the writer reaches it.
        seen: list[tuple[int, int]] = []
        release = threading.Event()

        def hook() -> None:
            seen.append((writer.record_count, writer.batched_records))
            if len(seen) == 1:
                release.wait(QUEUE_DEADLINE)

        writer.write_batch_hook = hook
        await c.send({"op": "delete_user", "admin_key": ADMIN_KEY, "user_id": "mallory"})
        await wait_for(lambda: len(seen) == 1)
        await other.send(record_request("user-carol", request_id="during"))
        await wait_for(lambda: writer._queue.qsize() == 1)  # the record; the rest of the deletion goes behind it
        release.set()
        ack = await other.reply()
        reply = await c.reply(timeout=40.0)
        writer.write_batch_hook = None

        assert reply == {"id": None, "ok": True, "user_id": "mallory", "deleted": True, "records": count}
        removed_per_batch = [before - after for (before, _), (after, _) in itertools.pairwise(seen)]
        assert len(seen) >= count // USER_DELETION_CHUNK
        assert max(removed_per_batch) <= USER_DELETION_CHUNK
        # The record was committed while the deletion was still going.
        record_batch = next(n for n, (_, records) in enumerate(seen) if records > seen[0][1])
        assert 0 < record_batch < len(seen) - 1

        assert await user_ids(c, "mallory") is None
        assert await all_ids(c) == [*carol, ack["record_id"]]
        stats = await c.request("stats")
        assert (stats["records"], stats["users"]) == (3, 1)
        again = await c.request("delete_user", admin_key=ADMIN_KEY, user_id="mallory")
        assert (again["deleted"], again["records"]) == (False, 0)


async def test_delete_user_chunks_are_bounded_in_bytes_too(tmp_path: Path) -> None:
    padding = 60_000  # bytes of client_config per record: 8 MiB hold about 140 of them
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        records = [{**exported_record("heidi", n), "client_config": {"padding": "p" * padding}} for n in range(300)]
        for start in range(0, len(records), 15):  # each import line stays under 1 MiB
            reply = await c.request(
                "import", admin_key=ADMIN_KEY, records=records[start : start + 15], users={"heidi": {}}
            )
            assert reply["imported"] == 15, reply
        writer = server.store.writer
        counts: list[int] = []
        writer.write_batch_hook = lambda: counts.append(writer.record_count)
        reply = await c.request("delete_user", admin_key=ADMIN_KEY, user_id="heidi")
        writer.write_batch_hook = None
        counts.append(writer.record_count)
    assert (reply["deleted"], reply["records"]) == (True, 300)
    removed_per_batch = [before - after for before, after in itertools.pairwise(counts)]
    assert sum(removed_per_batch) == 300
    assert max(removed_per_batch) <= USER_DELETION_BYTES // padding + 1 < 300


class ScanningWriterDB:
    """The writer's real LevelDB handle, noting for each iterator where it started and the last
    key it yielded: LevelDB steps over every key deleted in between until it compacts them."""

    def __init__(self, real: plyvel.DB) -> None:
        self.real = real
        self.scans: list[tuple[bytes, bytes | None]] = []  # (start, last key yielded)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @contextlib.contextmanager
    def iterator(self, **options: Any) -> Iterator[Iterator[Any]]:
        start = options.get("start", options.get("prefix", b""))
        with self.real.iterator(**options) as entries:
            yield self._noted(start, entries)

    def _noted(self, start: bytes, entries: Iterator[Any]) -> Iterator[Any]:
        scan = len(self.scans)
        self.scans.append((start, None))
        for entry in entries:
            self.scans[scan] = (start, entry if isinstance(entry, bytes) else entry[0])
            yield entry


async def test_delete_user_chunks_resume_where_the_last_one_stopped(tmp_path: Path) -> None:
    """Each chunk starts after the index key the previous one reached, so the user-index keys the
    whole deletion steps over (live or already deleted) grow as N, not N^2 / chunk."""
    count, chunk = 5000, 100
    store = build_store(Config(database=tmp_path / "db", sync=False, max_batch_records=4096))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, store.open, loop)
    try:
        profile = Profile.create("static:mallory", {})
        draft = RecordDraft("unary", "", {}, {"qps": 1.0}, {}, {})
        await asyncio.gather(*(store.submit(profile, draft) for _ in range(count)))
        prefix = layout.user_index_prefix("static:mallory")
        writer = store.writer
        index_keys = sorted(writer._db.iterator(prefix=prefix, include_value=False))
        scanning = ScanningWriterDB(writer._db)
        writer._db, writer._user_chunk = scanning, chunk
        try:
            ack = await store.delete_user("static:mallory")
        finally:
            writer._db = scanning.real
        assert (ack.deleted, ack.records) == (True, count)
        index_scans = [(start, last) for start, last in scanning.scans if start.startswith(prefix)]
        assert len(index_scans) >= count // chunk
        # The index keys (as they were before the deletion) each scan passed over up to its last one.
        stepped_over = sum(
            bisect.bisect_right(index_keys, last) - bisect.bisect_left(index_keys, start)
            for start, last in index_scans
            if last is not None
        )
        assert count <= stepped_over <= count + 2 * len(index_scans)  # restarting at the prefix: ~127,500
    finally:
        await loop.run_in_executor(None, store.close)


async def test_a_record_imported_between_chunks_behind_the_deletion_goes_too(tmp_path: Path) -> None:
    """Chunks resume where the last one stopped; a record imported meanwhile with an older id (in
    the part of the user's index already done) makes the next chunk go back for it."""
    # With 1000 records a batch, an import of 1000 is committed in a batch of its own.
    async with (
        perfdb(tmp_path, max_batch_records=USER_DELETION_CHUNK) as (server, _),
        connect(server) as c,
        connect(server) as other,
    ):
        await import_records(c, "mallory", 2500)
        micros = 1_700_000_000_000_000 + 5  # amid the first chunk's records
        late = {**exported_record("mallory", 5), "record_id": f"{micros:014x}{1:06x}"}
        bystanders = [exported_record("trent", 10_000 + n) for n in range(USER_DELETION_CHUNK - 1)]
        writer = server.store.writer
        seen: list[int] = []
        release = threading.Event()

        def hook() -> None:
            seen.append(writer.record_count)
            if len(seen) == 1:
                release.wait(QUEUE_DEADLINE)

        writer.write_batch_hook = hook
        await c.send({"op": "delete_user", "admin_key": ADMIN_KEY, "user_id": "mallory"})
        await wait_for(lambda: len(seen) == 1)  # the first chunk is staged
        users: dict[str, dict[str, Any]] = {"mallory": {}, "trent": {}}
        await other.send({"op": "import", "admin_key": ADMIN_KEY, "records": [late, *bystanders], "users": users})
        await wait_for(lambda: writer._queue.qsize() == 1)
        release.set()
        imported = await other.reply()
        reply = await c.reply(timeout=40.0)
        writer.write_batch_hook = None

        assert imported["imported"] == USER_DELETION_CHUNK, imported
        assert (reply["deleted"], reply["records"]) == (True, 2501)
        assert await user_ids(c, "mallory") is None
        assert await all_ids(c) == [record["record_id"] for record in bystanders]
        assert (await c.request("stats"))["records"] == len(bystanders)


async def test_a_failed_chunk_answers_storage_error_and_sending_again_finishes(tmp_path: Path) -> None:
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        await import_records(c, "mallory", 2500)
        writer = server.store.writer
        calls: list[int] = []

        def full_disk_on_the_second_chunk() -> None:
            calls.append(writer.record_count)
            if len(calls) == 2:
                raise plyvel.IOError("IO error: No space left on device")

        writer.write_batch_hook = full_disk_on_the_second_chunk
        failed = await c.request("delete_user", admin_key=ADMIN_KEY, user_id="mallory")
        writer.write_batch_hook = None
        assert error_code(failed) == "storage_error" and failed["error"]["retryable"] is True

        # The first chunk stays deleted and its audit entry says how far the deletion got.
        left = await user_ids(c, "mallory")
        assert left is not None and len(left) == 2500 - USER_DELETION_CHUNK
        assert (await c.request("stats"))["records"] == len(left)
        (entry,) = await audit(c)
        assert (entry["op"], entry["records"], entry["complete"]) == ("delete_user", USER_DELETION_CHUNK, False)

        again = await c.request("delete_user", admin_key=ADMIN_KEY, user_id="mallory")
        assert (again["deleted"], again["records"]) == (True, len(left))
        assert await user_ids(c, "mallory") is None
        stats = await c.request("stats")
        assert (stats["records"], stats["users"], stats["commits"]["failed_batches"]) == (0, 0, 1)
        assert [(e["records"], e["complete"]) for e in await audit(c)] == [
            (len(left), True),
            (USER_DELETION_CHUNK, False),
        ]


async def wait_for(condition: Any, deadline: float = QUEUE_DEADLINE) -> None:
    """Poll a condition the server's threads make true; fail after the deadline."""
    async with asyncio.timeout(deadline):
        while not condition():  # noqa: ASYNC110 - set by the writer thread, which offers nothing to await
            await asyncio.sleep(0.005)


def exported_record(user_id: str, n: int) -> dict[str, Any]:
    micros = 1_700_000_000_000_000 + n
    return {
        "record_id": f"{micros:014x}{0:06x}",
        "user_id": user_id,
        "timestamp": f"2023-11-14T22:13:20.{n:06d}Z",
        "test_name": "imported",
        "tag": "",
        "sys_info": {},
        "metrics": {"qps": float(n)},
        "client_config": {},
        "server_config": {},
    }


async def import_records(connection: Connection, user_id: str, count: int, first: int = 0) -> list[dict[str, Any]]:
    records = [exported_record(user_id, n) for n in range(first, first + count)]
    users = {user_id: {"name": user_id}}
    for start in range(0, count, 1000):
        reply = await connection.request(
            "import", admin_key=ADMIN_KEY, records=records[start : start + 1000], users=users
        )
        assert reply["ok"] and reply["imported"] == len(records[start : start + 1000]), reply
    return records


async def test_export_and_import_keep_deletions_unless_forced(tmp_path: Path) -> None:
    async with perfdb(tmp_path / "a") as (source, _), connect(source) as a:
        records = await import_records(a, "dave", 3)
        old_dump = await a.request("export", admin_key=ADMIN_KEY)
        assert old_dump["tombstones"] == []
        gone = records[1]["record_id"]
        assert (await a.request("delete_record", record_id=gone, admin_key=ADMIN_KEY))["deleted"]
        new_dump = await a.request("export", admin_key=ADMIN_KEY)
        assert new_dump["tombstones"] == [gone]

        # The old dump does not bring the record back where it was deleted...
        stale = await a.request("import", admin_key=ADMIN_KEY, records=old_dump["records"], users=old_dump["users"])
        assert stale | {"id": None} == {
            "id": None,
            "ok": True,
            "imported": 0,
            "duplicates": 2,
            "tombstoned": 1,
            "removed": 0,
        }
        assert gone not in await all_ids(a)

    async with perfdb(tmp_path / "b") as (copy, _), connect(copy) as b:
        # ...nor into a copy restored from the new dump, which carries the tombstone...
        restored = await b.request(
            "import",
            admin_key=ADMIN_KEY,
            records=new_dump["records"],
            users=new_dump["users"],
            tombstones=new_dump["tombstones"],
        )
        assert (restored["imported"], restored["tombstoned"], restored["removed"]) == (2, 0, 0)
        stale = await b.request("import", admin_key=ADMIN_KEY, records=old_dump["records"], users=old_dump["users"])
        assert (stale["imported"], stale["duplicates"], stale["tombstoned"]) == (0, 2, 1)
        assert (await b.request("export", admin_key=ADMIN_KEY))["tombstones"] == [gone]

        # ...unless forced, which forgets the tombstone.
        forced = await b.request(
            "import", admin_key=ADMIN_KEY, records=old_dump["records"], users=old_dump["users"], force=True
        )
        assert (forced["imported"], forced["duplicates"], forced["tombstoned"]) == (1, 2, 0)
        after = await b.request("export", admin_key=ADMIN_KEY)
        assert after["records"] == old_dump["records"] and after["tombstones"] == []
        assert (await b.request("stats"))["records"] == 3

    async with perfdb(tmp_path / "c") as (third, _), connect(third) as c:
        # A dump's tombstones remove the record from a database that still holds it.
        await c.request("import", admin_key=ADMIN_KEY, records=old_dump["records"], users=old_dump["users"])
        applied = await c.request("import", admin_key=ADMIN_KEY, tombstones=new_dump["tombstones"])
        assert (applied["imported"], applied["removed"]) == (0, 1)
        assert gone not in await all_ids(c)
        (entry,) = await audit(c)
        assert (entry["op"], entry["actor"], entry["record_ids"]) == ("import", "admin", [gone])
        both = await c.request(
            "import", admin_key=ADMIN_KEY, records=old_dump["records"][1:2], users=old_dump["users"], tombstones=[gone]
        )
        assert both["error"]["message"].startswith("tombstones[0]: is also the record_id")


async def test_export_pages_carry_each_tombstone_once(tmp_path: Path) -> None:
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        records = await import_records(c, "erin", 30)
        ids = [record["record_id"] for record in records]
        doomed = sorted({*ids[::3], *ids[-4:]})  # the first, scattered ones and the last few
        for record_id in doomed:
            assert (await c.request("delete_record", record_id=record_id, admin_key=ADMIN_KEY))["deleted"]
        pages = await page_through(c, "export", admin_key=ADMIN_KEY, limit=4)
        exported = [r["record_id"] for page in pages for r in page["records"]]
        tombstones = [record_id for page in pages for record_id in page["tombstones"]]
        assert exported == [record_id for record_id in ids if record_id not in doomed]
        assert tombstones == sorted(doomed)
        # Each page's tombstones lie between the previous page's end and its own.
        previous = ""
        for page in pages:
            end = page["next_cursor"] or "g" * 20
            assert all(previous < record_id <= end for record_id in page["tombstones"])
            previous = end
        ranged = await c.request("export", admin_key=ADMIN_KEY, until=records[10]["timestamp"])
        assert ranged["tombstones"] == [record_id for record_id in sorted(doomed) if record_id < ids[10]]


async def test_export_pages_cut_short_by_tombstones_still_carry_everything_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SCAN_BUDGET", 12)  # records and tombstones examined per page
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        ids = [record["record_id"] for record in await import_records(c, "ivan", 90)]
        doomed = [record_id for n, record_id in enumerate(ids) if n % 6]  # runs of five tombstones
        await c.send(*({"op": "delete_record", "admin_key": ADMIN_KEY, "record_id": rid} for rid in doomed))
        assert all(reply["deleted"] for reply in await c.replies(len(doomed)))
        pages = await page_through(c, "export", admin_key=ADMIN_KEY, limit=4)
    exported = [r["record_id"] for page in pages for r in page["records"]]
    tombstones = [record_id for page in pages for record_id in page["tombstones"]]
    assert exported == ids[::6]
    assert tombstones == doomed
    assert any(page["next_cursor"] in doomed for page in pages), "no page ended at a tombstone"
    assert max(len(page["tombstones"]) for page in pages) <= 12


async def test_a_record_stored_and_deleted_in_one_batch_is_gone(tmp_path: Path) -> None:
    """An import and the deletions of what it imports, held back until they share one write batch."""
    async with perfdb(tmp_path) as (server, _), connect(server) as c, connect(server) as other:
        writer = server.store.writer
        release = threading.Event()
        batches: list[int] = []

        def hook() -> None:
            batches.append(writer.batches)
            if len(batches) == 1:
                release.wait(QUEUE_DEADLINE)

        writer.write_batch_hook = hook
        await other.send(record_request("user-grace"))
        await wait_for(lambda: len(batches) == 1)
        record = exported_record("frank", 1)
        await c.send(
            {"op": "import", "admin_key": ADMIN_KEY, "records": [record], "users": {"frank": {"name": "F"}}},
            {"op": "delete_record", "admin_key": ADMIN_KEY, "record_id": record["record_id"]},
            {"op": "import", "admin_key": ADMIN_KEY, "records": [exported_record("frank", 2)], "users": {"frank": {}}},
            {"op": "delete_user", "admin_key": ADMIN_KEY, "user_id": "frank"},
        )
        await wait_for(lambda: writer._queue.qsize() == 4)
        release.set()
        imported, deleted, imported_again, user = await c.replies(4)
        assert (await other.reply())["ok"]
        writer.write_batch_hook = None
        assert len(batches) == 2, "the four requests did not share one batch"

        assert (imported["imported"], deleted["deleted"], imported_again["imported"]) == (1, True, 1)
        assert (user["deleted"], user["records"]) == (True, 1)
        assert await user_ids(c, "frank") is None
        assert len(await all_ids(c)) == 1
        stats = await c.request("stats")
        assert (stats["records"], stats["users"]) == (1, 1)
        (dump,) = await page_through(c, "export", admin_key=ADMIN_KEY)
        assert sorted(dump["tombstones"]) == sorted([record["record_id"], exported_record("frank", 2)["record_id"]])


# -- deletions against the indexes, counts and overview --------------------------------------


async def check_reads(connection: Connection, remaining: list[dict[str, Any]], users: list[str]) -> None:
    """Filtered reads both ways, their totals, the stats counts and the overview agree with
    brute force over the records that remain; `users` are those whose profiles remain."""
    for filters in [*FILTERS, {"tag": ""}]:
        expected = ids(matching(remaining, **filters))
        pages = await page_through(connection, "get_all", limit=400, **filters)
        assert [r["record_id"] for page in pages for r in page["records"]] == expected, filters
        if len(filters) <= 1:
            assert pages[0]["total"] == len(expected), filters
        newest_first = await page_through(connection, "get_all", limit=700, reverse=True, **filters)
        assert [r["record_id"] for page in newest_first for r in page["records"]] == expected[::-1], filters
    for user_id in users:
        expected = ids(matching(remaining, user_id=user_id))
        pages = await page_through(connection, "get_user", user_id=user_id, limit=500)
        assert [r["record_id"] for page in pages for r in page["records"]] == expected, user_id
        assert pages[0]["total"] == len(expected), user_id
        tagged = await page_through(connection, "get_user", user_id=user_id, tag="pr", limit=500)
        assert [r["record_id"] for page in tagged for r in page["records"]] == ids(
            matching(remaining, user_id=user_id, tag="pr")
        )
    stats = await connection.request("stats")
    assert (stats["records"], stats["users"]) == (len(remaining), len(users))
    for metric in ("qps", "perc_lat_50"):
        check_overview(await connection.request("overview", metric=metric), remaining, metric)


def stored_derived_keys(database: Path) -> tuple[dict[bytes, int], set[bytes]]:
    """The (closed) database's counts, and the keys of its user, test, tag and metric index entries."""
    db = plyvel.DB(str(database))
    try:
        counts = {key: int(value) for key, value in db.iterator(prefix=layout.COUNT_PREFIX)}
        entries = {
            key
            for prefix in (
                layout.USER_INDEX_PREFIX,
                layout.TEST_INDEX_PREFIX,
                layout.TAG_INDEX_PREFIX,
                layout.METRIC_INDEX_PREFIX,
            )
            for key in db.iterator(prefix=prefix, include_value=False)
        }
        return counts, entries
    finally:
        db.close()


def expected_counts(records: list[dict[str, Any]]) -> dict[bytes, int]:
    """The per-user, per-test and per-tag counts of these records, by count key."""
    counts: dict[bytes, int] = {}
    for r in records:
        for count_key in layout.record_counts(r["user_id"], r["test_name"], r["tag"]):
            counts[count_key] = counts.get(count_key, 0) + 1
    return counts


def expected_index_entries(records: list[dict[str, Any]]) -> set[bytes]:
    """The keys of these records' index entries."""
    return {
        key
        for r in records
        for key, _ in layout.record_index_entries(r["record_id"], r["user_id"], r["test_name"], r["tag"], r["metrics"])
    }


async def test_deleting_keeps_reads_totals_counts_and_overview_equal_to_brute_force(tmp_path: Path) -> None:
    async with perfdb(tmp_path) as (server, _), connect(server) as c, connect(server) as other:
        written = await write_burst(c, 1200, seed=11)
        users = sorted({r["user_id"] for r in written})
        chooser = random.Random(5)
        # Every record of the rare test, and a third of the others, with many records of the
        # same tests stored meanwhile on another connection (added to the overview while the
        # tests the deletions made stale are rebuilt).
        doomed = {r["record_id"] for r in written if r["test_name"] == "rare" or chooser.random() < 0.33}
        deleting = asyncio.ensure_future(
            send_burst(c, [{"op": "delete_record", "admin_key": ADMIN_KEY, "record_id": rid} for rid in doomed])
        )
        more = await write_burst(other, 400, seed=12)
        assert all(reply["deleted"] for reply in await deleting)
        # Both connections' records, in id (time) order, as reads return them.
        remaining = sorted(
            [r for r in written if r["record_id"] not in doomed] + more, key=lambda r: str(r["record_id"])
        )
        await check_reads(c, remaining, users)

        # The last records of the rare test: it leaves the overview and its count goes.
        last_rare = ids(matching(remaining, test_name="rare"))
        assert last_rare
        for record_id in last_rare:
            assert (await c.request("delete_record", record_id=record_id, admin_key=ADMIN_KEY))["deleted"]
        remaining = [r for r in remaining if r["test_name"] != "rare"]
        # A whole user, with its per-user count.
        gone = users[0]
        reply = await c.request("delete_user", admin_key=ADMIN_KEY, user_id=gone)
        assert (reply["deleted"], reply["records"]) == (True, len(matching(remaining, user_id=gone)))
        remaining = [r for r in remaining if r["user_id"] != gone]
        await check_reads(c, remaining, users[1:])

    # Reopened: the counts are as stored, the overview is built afresh from the records.
    async with perfdb(tmp_path) as (server, _), connect(server) as c:
        await check_reads(c, remaining, users[1:])

    counts, entries = stored_derived_keys(tmp_path / "db")
    assert counts == expected_counts(remaining)  # no count left at zero, none off by one
    assert entries == expected_index_entries(remaining)


class FakeSnapshot:
    """What rebuild_stale reads: the rows stored when it was taken."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = list(rows)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_an_overview_rebuild_keeps_what_the_writer_adds_and_deletes_meanwhile() -> None:
    stored: list[Row] = [("t", "u1", {"qps": 5.0}), ("t", "u2", {"qps": 9.0}), ("other", "u1", {"qps": 1.0})]
    overview = Overview()
    overview.add(stored)
    # The writer deletes the best value of "t": it cannot be taken back, so "t" goes stale.
    overview.batch_writing()
    stored.remove(("t", "u2", {"qps": 9.0}))
    overview.batch_written((), {"t"})
    assert overview.has_stale
    snapshots: list[FakeSnapshot] = []

    def take_snapshot() -> FakeSnapshot:
        snapshots.append(FakeSnapshot(stored))
        return snapshots[-1]

    def rows_of(snapshot: FakeSnapshot, test_name: str) -> Iterator[Row]:
        rows = [row for row in snapshot.rows if row[0] == test_name]
        yield rows[0]
        if len(snapshots) == 1:
            # Half-way through the rebuild the writer commits a batch that adds to "t" and
            # another that deletes from it.
            added = ("t", "u3", {"qps": 7.0})
            overview.batch_writing()
            stored.append(added)
            overview.batch_written([added], ())
            overview.batch_writing()
            stored.remove(("t", "u1", {"qps": 5.0}))
            overview.batch_written((), {"t"})
        yield from rows[1:]

    def brute_force(test_name: str | None) -> dict[str, Any]:
        fresh = Overview()
        fresh.add(stored)
        return fresh.report(test_name, "qps")

    assert overview.rebuild_stale(take_snapshot, rows_of) == 1
    assert snapshots[0].closed
    # The addition made during the rebuild is in; the deletion made it stale again.
    assert overview.report("t", "qps")["tests"]["t"]["users"] == {
        "u1": {"count": 1, "best": 5.0},
        "u3": {"count": 1, "best": 7.0},
    }
    assert overview.has_stale
    assert overview.rebuild_stale(take_snapshot, rows_of) == 1
    assert not overview.has_stale
    assert overview.report(None, "qps") == brute_force(None)
    assert overview.rebuild_stale(take_snapshot, rows_of) == 0  # nothing stale: no snapshot taken
    assert len(snapshots) == 2 and snapshots[1].closed
