"""The result store: opens and locks the database, hands writes to the writer thread, and
serves paged reads from snapshots on a small thread pool, never on the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import plyvel

from perfdb.protocol.errors import ErrorCode, PerfdbError
from perfdb.records.profiles import Profile
from perfdb.records.record_ids import RECORD_ID_CHARS, is_record_id
from perfdb.records.schema import ImportedRecord, Query, RecordDraft
from perfdb.storage import layout
from perfdb.storage.writer import GroupCommitWriter, ImportAck, RecordAck, RecordDeletionAck, UserDeletionAck

log = logging.getLogger("perfdb.storage")

LOCK_FILE_NAME = "perfdb.lock"
# A page examines at most this many index entries, so a filter that matches little
# cannot turn one request into a scan of the whole database.
SCAN_BUDGET = 50_000
# A page also stops once its records add up to this many bytes, whatever the limit, so one
# reply (and the memory behind it) stays bounded.
PAGE_BYTES = 8 * 1024 * 1024
_READ_THREADS = 4


_T = TypeVar("_T")
_Q = TypeVar("_Q")


class StoreOpenError(Exception):
    """The database cannot be opened; the message is meant for the operator."""


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """One page of records, each already JSON, in record-id (time) order."""

    records: list[bytes | memoryview]
    profiles: dict[str, dict[str, Any]]  # stored profiles of the users in the page, by id
    next_cursor: str | None
    tombstones: list[str] = dataclasses.field(default_factory=list)  # deleted ids in the page's range


@dataclasses.dataclass(frozen=True, slots=True)
class AuditPage:
    """Audit entries, each already JSON, newest first."""

    entries: list[bytes]
    next_cursor: str | None


class DatabaseLock:
    """Our own exclusive lock on a database directory, by its resolved path.

    LevelDB's in-process lock check compares path text, so two spellings of one directory
    would both open it; flock on a file inside it conflicts whatever the spelling, in this
    process or another.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self, *, create: bool = True) -> Path:
        """Lock the directory (creating it if allowed); returns its real path. Raises StoreOpenError."""
        if not create and not self._path.is_dir():
            raise StoreOpenError(f"no database directory at {self._path}")
        try:
            self._path.mkdir(parents=True, exist_ok=True)
            real_path = self._path.resolve(strict=True)
            fd = os.open(real_path / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreOpenError(f"database path {self._path} is not writable: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                owner = f" (pid {holder})" if holder.isdigit() else ""
                raise StoreOpenError(
                    f"database {real_path} is already in use by another perfdb process{owner}"
                ) from None
            raise StoreOpenError(f"cannot lock database {real_path}: {exc.strerror or exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return real_path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class HandleGuard:
    """Readers share the LevelDB handle; replacing it waits until no read is using it.

    plyvel frees LevelDB's memory on close, so closing under a running read would crash the
    process rather than raise. Reads are bounded (SCAN_BUDGET, PAGE_BYTES), so the wait is short.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._replacing = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            while self._replacing:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def replacing(self) -> Iterator[None]:
        with self._condition:
            self._replacing = True
            while self._readers:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._replacing = False
                self._condition.notify_all()


class ResultStore:
    """LevelDB-backed storage of profiles and records; see layout.py for the keys."""

    def __init__(self, path: Path, *, sync: bool, max_batch: int, paranoid_checks: bool = False) -> None:
        self._path = path
        self._sync = sync
        self._paranoid_checks = paranoid_checks
        self._max_batch = max_batch
        self._lock = DatabaseLock(path)
        self._guard = HandleGuard()
        self._closed = False
        self._db: plyvel.DB | None = None
        self._writer: GroupCommitWriter | None = None
        self._readers = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="perfdb-read")
        self.corrupt_records = 0

    # -- lifecycle ------------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Lock, open and check the database, then start the writer. Blocking; raises StoreOpenError."""
        self._real_path = self._lock.acquire()
        try:
            self._db = self._open_leveldb()
        except plyvel.Error as exc:
            self._lock.release()
            raise StoreOpenError(f"cannot open database {self._path}: {exc}") from None
        try:
            self._check_schema()
            try:
                record_count = int(self._db.get(layout.RECORD_COUNT_KEY, b"0"))
                user_count = int(self._db.get(layout.USER_COUNT_KEY, b"0"))
            except ValueError:
                raise StoreOpenError(f"database {self._path} has damaged counters; run 'perfdb repair'") from None
            last_record_id = self._last_key_id(layout.RECORD_PREFIX)
            last_audit_id = self._last_key_id(layout.AUDIT_PREFIX)
        except BaseException:
            self._db.close()
            self._lock.release()
            raise
        self._writer = GroupCommitWriter(
            self._db,
            loop,
            directory=self._real_path,
            reopen=self._reopen,
            sync=self._sync,
            max_batch=self._max_batch,
            record_count=record_count,
            user_count=user_count,
            last_record_id=last_record_id,
            last_audit_id=last_audit_id,
        )
        self._writer.start()

    def _open_leveldb(self) -> plyvel.DB:
        return plyvel.DB(
            str(self._real_path),
            create_if_missing=True,
            bloom_filter_bits=10,
            lru_cache_size=64 * 1024 * 1024,
            # Large memtables flush less often: each flush's compaction slows the fsyncs
            # of concurrent commits (ack p99 at 8k records/s: 16 ms with 4 MiB, 3.4 ms with 64).
            write_buffer_size=64 * 1024 * 1024,
            paranoid_checks=self._paranoid_checks,
        )

    def _reopen(self) -> plyvel.DB:
        """Close and reopen LevelDB (writer thread; see GroupCommitWriter._heal), once the reads
        in progress are done; reads that come meanwhile wait. Raises plyvel.Error."""
        with self._guard.replacing():
            old, self._db = self._db, None
            if old is not None:
                old.close()
            self._db = self._open_leveldb()
        log.warning("database reopened after a failed write")
        return self._db

    def _check_schema(self) -> None:
        assert self._db is not None
        version = self._db.get(layout.SCHEMA_KEY)
        if version is None:
            with self._db.iterator(include_value=False) as keys:
                if next(keys, None) is not None:
                    raise StoreOpenError(f"{self._path} holds a LevelDB database that is not a perfdb database")
            self._db.put(layout.SCHEMA_KEY, str(layout.SCHEMA_VERSION).encode(), sync=True)
        elif version != str(layout.SCHEMA_VERSION).encode():
            raise StoreOpenError(
                f"database {self._path} has schema version {version.decode(errors='replace')}, "
                f"this server reads version {layout.SCHEMA_VERSION}"
            )

    def _last_key_id(self, prefix: bytes) -> str | None:
        """The greatest record id (or audit id) under `prefix`, which such keys begin with."""
        assert self._db is not None
        with self._db.iterator(prefix=prefix, reverse=True, include_value=False) as keys:
            last = next(keys, None)
        return None if last is None else last[len(prefix) : len(prefix) + RECORD_ID_CHARS].decode()

    def close(self) -> None:
        """Commit what is queued, stop the writer, let running reads finish, close LevelDB and
        release the lock. Blocking."""
        if self._writer is not None:
            self._writer.stop()
        self._readers.shutdown(wait=True)
        self._closed = True
        if self._db is not None:
            self._db.close()
            self._db = None
        self._lock.release()

    # -- writes ---------------------------------------------------------------------------

    @property
    def writer(self) -> GroupCommitWriter:
        assert self._writer is not None, "store is not open"
        return self._writer

    def submit(self, profile: Profile, draft: RecordDraft) -> asyncio.Future[RecordAck]:
        return self.writer.submit(profile, draft)

    def restore(
        self,
        records: list[ImportedRecord],
        profiles: dict[str, Profile],
        tombstones: list[str] | None = None,
        *,
        force: bool = False,
    ) -> asyncio.Future[ImportAck]:
        return self.writer.restore(records, profiles, tombstones, force=force)

    def delete_record(self, record_id: str, owner: str | None) -> asyncio.Future[RecordDeletionAck]:
        return self.writer.delete_record(record_id, owner)

    def delete_user(self, user_id: str) -> asyncio.Future[UserDeletionAck]:
        return self.writer.delete_user(user_id)

    # -- reads ----------------------------------------------------------------------------

    async def get_user(self, query: Query) -> tuple[dict[str, Any], Page]:
        """The user's stored profile and one page of their records; not_found for unknown users."""
        return await self._read(self._read_user_page, query)

    async def get_all(self, query: Query) -> Page:
        """One page of every user's records, in time order."""
        return await self._read(self._read_all_page, query)

    async def export(self, query: Query) -> Page:
        """A page of get_all, plus the tombstones of the deleted records in its range of ids."""
        return await self._read(self._read_export_page, query)

    async def audit_log(self, limit: int, cursor: str | None) -> AuditPage:
        """A page of audit entries, newest first, starting after `cursor` (an audit id)."""
        return await self._read(self._read_audit_page, (limit, cursor))

    async def _read(self, read: Callable[[_Q], _T], query: _Q) -> _T:
        """Run a read on the reader threads; LevelDB failures become storage_error."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, read, query)
        except (plyvel.Error, RuntimeError) as exc:  # RuntimeError: the handle closed under the read
            log.error("read failed: %s", exc)
            raise PerfdbError(ErrorCode.STORAGE_ERROR, "the database could not be read; retry later") from None

    def _database(self) -> plyvel.DB:
        if self._db is None and not self._closed:
            raise PerfdbError(ErrorCode.STORAGE_ERROR, "the database is being reopened after a failed write")
        if self._db is None:
            raise PerfdbError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        return self._db

    def _read_user_page(self, query: Query) -> tuple[dict[str, Any], Page]:
        with self._guard.reading():
            return self._read_user_page_guarded(query)

    def _read_all_page(self, query: Query) -> Page:
        with self._guard.reading():
            return self._read_all_page_guarded(query)

    def _read_export_page(self, query: Query) -> Page:
        with self._guard.reading():
            return self._read_all_page_guarded(query, with_tombstones=True)

    def _read_audit_page(self, page: tuple[int, str | None]) -> AuditPage:
        limit, cursor = page
        if cursor is not None and not is_record_id(cursor):
            raise PerfdbError(ErrorCode.BAD_REQUEST, "cursor: not a cursor this server returned")
        with self._guard.reading():
            snapshot = self._database().snapshot()
            try:
                stop = layout.audit_key(cursor) if cursor is not None else layout.prefix_end(layout.AUDIT_PREFIX)
                entries: list[bytes] = []
                page_bytes = 0
                more = False
                last_id: str | None = None
                with snapshot.iterator(start=layout.AUDIT_PREFIX, stop=stop, reverse=True) as items:
                    for key, value in items:
                        if len(entries) == limit or page_bytes >= PAGE_BYTES:
                            more = True
                            break
                        entries.append(value)
                        page_bytes += len(value)
                        last_id = key[len(layout.AUDIT_PREFIX) :].decode()
                return AuditPage(entries, last_id if more else None)
            finally:
                snapshot.close()

    def _read_user_page_guarded(self, query: Query) -> tuple[dict[str, Any], Page]:
        assert query.user_id is not None
        user_id = query.user_id
        snapshot = self._database().snapshot()
        try:
            stored_profile = snapshot.get(layout.profile_key(user_id))
            if stored_profile is None:
                raise PerfdbError(ErrorCode.NOT_FOUND, "no such user")
            prefix = layout.user_index_prefix(user_id)
            start, include_start = self._page_start(prefix, query)
            stop = prefix + layout.time_bound(query.until) if query.until is not None else layout.prefix_end(prefix)
            records: list[bytes | memoryview] = []
            last_seen: str | None = None
            more = False
            scanned = 0
            with snapshot.iterator(start=start, stop=stop, include_start=include_start) as entries:
                page_bytes = 0
                for key, filter_fields in entries:
                    record_id = key[len(prefix) :].decode()
                    if len(records) == query.limit or scanned == SCAN_BUDGET or page_bytes >= PAGE_BYTES:
                        more = True
                        break
                    scanned += 1
                    last_seen = record_id
                    if not _matches_fields(query, orjson.loads(filter_fields)):
                        continue
                    record_key = layout.record_key(record_id, user_id)
                    document = self._checked(snapshot.get(record_key), record_key)
                    if document is not None:
                        records.append(document)
                        page_bytes += len(document)
            page = Page(records, {}, last_seen if more else None)
            return orjson.loads(stored_profile), page
        finally:
            snapshot.close()

    def _read_all_page_guarded(self, query: Query, *, with_tombstones: bool = False) -> Page:
        snapshot = self._database().snapshot()
        try:
            start, include_start = self._page_start(layout.RECORD_PREFIX, query)
            stop = (
                layout.RECORD_PREFIX + layout.time_bound(query.until)
                if query.until is not None
                else layout.prefix_end(layout.RECORD_PREFIX)
            )
            filtered = query.test_name is not None or query.tag is not None
            records: list[bytes | memoryview] = []
            user_ids: set[bytes] = set()
            record_keys: list[bytes] = []  # of the records in the page, kept only for an export
            last_key = b""
            more = False
            scanned = 0
            id_end = layout.RECORD_ID_END
            # The hot loop of a full export: no decoding, no copies. A scan of history should
            # not push recent data out of LevelDB's block cache, hence fill_cache=False.
            with snapshot.iterator(start=start, stop=stop, include_start=include_start, fill_cache=False) as entries:
                page_bytes = 0
                for key, value in entries:
                    if len(records) == query.limit or scanned == SCAN_BUDGET or page_bytes >= PAGE_BYTES:
                        more = True
                        break
                    scanned += 1
                    last_key = key
                    document = self._checked(value, key)
                    if document is None:
                        continue
                    if filtered:
                        fields = orjson.loads(document)
                        if not _matches_fields(query, (fields.get("test_name"), fields.get("tag"))):
                            continue
                    records.append(document)
                    page_bytes += len(document)
                    user_ids.add(key[id_end:])
                    if with_tombstones:
                        record_keys.append(key)
            next_cursor = layout.split_record_key(last_key)[0] if more else None
            tombstones: list[str] = []
            if with_tombstones:
                budget = max(SCAN_BUDGET - scanned, SCAN_BUDGET // 10)
                tombstones, cut = _tombstones_in(
                    snapshot, start[len(layout.RECORD_PREFIX) :], next_cursor, query, budget
                )
                if cut is not None:
                    # Too many tombstones for this page: it ends at the last one sent.
                    cut_key = layout.RECORD_PREFIX + cut.encode() + b"\xff"
                    kept = [bytes(key) for key in record_keys if key < cut_key]
                    records = records[: len(kept)]
                    user_ids = {key[id_end:] for key in kept}
                    next_cursor = cut
            profiles = {}
            for user_id in sorted(user_ids):
                stored = snapshot.get(layout.PROFILE_PREFIX + user_id)
                if stored is not None:
                    profiles[user_id.decode()] = orjson.loads(stored)
            return Page(records, profiles, next_cursor, tombstones)
        finally:
            snapshot.close()

    @staticmethod
    def _page_start(prefix: bytes, query: Query) -> tuple[bytes, bool]:
        """Where a page's scan begins: just after the cursor, else at `since`, else the prefix."""
        if query.cursor is not None:
            if not is_record_id(query.cursor):
                raise PerfdbError(ErrorCode.BAD_REQUEST, "cursor: not a cursor this server returned")
            start = prefix + query.cursor.encode()
            if query.since is not None:
                start = max(start, prefix + layout.time_bound(query.since))
            # The cursor names the last record id seen; every record key with it sorts at or
            # after it, so skip past all of them (user ids never contain 0xff).
            return start + b"\xff", True
        if query.since is not None:
            return prefix + layout.time_bound(query.since), True
        return prefix, True

    def _checked(self, value: bytes | None, record_key: bytes) -> memoryview | None:
        """The record's JSON, or None (logged and counted) if it is missing or damaged."""
        if value is None:
            self.corrupt_records += 1
            log.error("record %s is indexed but missing", layout.split_record_key(record_key)[0])
            return None
        try:
            return layout.unseal(value)
        except layout.CorruptValueError as exc:
            self.corrupt_records += 1
            log.error("record %s is damaged (%s); skipped", layout.split_record_key(record_key)[0], exc)
            return None


def _matches_fields(query: Query, fields: Any) -> bool:
    test_name, tag = fields
    return (query.test_name is None or query.test_name == test_name) and (query.tag is None or query.tag == tag)


def _tombstones_in(
    snapshot: Any, start: bytes, last_seen: str | None, query: Query, budget: int
) -> tuple[list[str], str | None]:
    """The ids of the tombstones from `start` (record-id bytes, as a page starts) up to and
    including `last_seen` (else the query's end), and the id to cut the page at if more than
    `budget` of them lie there (else None). Tombstones hold no content, so the test_name and tag
    filters do not apply to them."""
    prefix = layout.TOMBSTONE_PREFIX
    if last_seen is not None:
        stop = prefix + last_seen.encode() + b"\xff"
    elif query.until is not None:
        stop = prefix + layout.time_bound(query.until)
    else:
        stop = layout.prefix_end(prefix)
    tombstones: list[str] = []
    with snapshot.iterator(start=prefix + start, stop=stop, include_value=False) as keys:
        for key in keys:
            if len(tombstones) == budget:
                return tombstones, tombstones[-1]
            tombstones.append(key[len(prefix) :].decode())
    return tombstones, None
