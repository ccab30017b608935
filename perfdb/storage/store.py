"""The result store: opens and locks the database, hands writes to the writer thread, and
serves paged reads from snapshots on a small thread pool, never on the event loop."""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import functools
import heapq
import itertools
import logging
import operator
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import plyvel

from perfdb.protocol.errors import ErrorCode, PerfdbError
from perfdb.records.profiles import Profile
from perfdb.records.record_ids import RECORD_ID_CHARS, is_record_id, record_id_micros
from perfdb.records.schema import (
    MAX_SERIES_TESTS,
    CompareQuery,
    ImportedRecord,
    Query,
    RecordDraft,
    Selector,
    SeriesQuery,
)
from perfdb.records.timestamps import format_micros
from perfdb.regression.compare import DEFAULT_MODEL as COMPARE_MODEL
from perfdb.regression.runs import RunSample, compare_runs
from perfdb.regression.series import SeriesKey
from perfdb.storage import layout
from perfdb.storage.alerts import AlertBook, AlertQuery
from perfdb.storage.dbstats import DatabaseStats, read_database_stats
from perfdb.storage.detection import RegressionDetector
from perfdb.storage.overview import Overview, Row
from perfdb.storage.series import (
    BucketBounds,
    BucketGrid,
    CachedIndex,
    IndexColumns,
    RowGatherer,
    SeriesCache,
    SeriesColumns,
    empty_series,
    index_columns,
    metric_fields,
)
from perfdb.storage.upgrade import UPGRADABLE_VERSIONS, upgrade_schema
from perfdb.storage.writer import (
    BatchAck,
    GroupCommitWriter,
    ImportAck,
    RecordAck,
    RecordDeletionAck,
    Settleable,
    UserDeletionAck,
)

log = logging.getLogger("perfdb.storage")

LOCK_FILE_NAME = "perfdb.lock"
# A page examines at most this many index entries, so a filter that matches little
# cannot turn one request into a scan of the whole database.
SCAN_BUDGET = 50_000
# A page also stops once its records add up to this many bytes, whatever the limit, so one
# reply (and the memory behind it) stays bounded.
PAGE_BYTES = 8 * 1024 * 1024
# What a sorted read costs per entry it examines, in microseconds of CPU on one reader thread
# (see _walks_metric_index): ranking a user or test index entry by the metrics it carries (11
# core metrics); ranking a tag index entry or a record, which reads and decodes the record (14 us
# with every record in the block cache, 20-40 us over a 1,000,000-record database); walking a
# core metric's index, which decodes each entry's fields to match the filters. Measured on the
# shared 2-core machine over 40,000 gRPC-shaped records; only their ratios matter.
RANK_ENTRY_MICROS = 6.5
RANK_RECORD_MICROS = 25.0
METRIC_WALK_MICROS = 4.0
# Records that tie on a metric are read back in id order; a tie group up to this size is
# buffered from the descending walk, a larger one read forward on its own.
_TIE_BUFFER = 256
_READ_THREADS = 4
_OVERVIEW_LOAD_BATCH = 10_000
# Index entries a series read decodes at once when it reads an index into columns.
_INDEX_CHUNK = 32_768


_T = TypeVar("_T")
_A = TypeVar("_A")


class StoreOpenError(Exception):
    """The database cannot be opened; the message is meant for the operator."""


@dataclasses.dataclass(slots=True)
class Page:
    """One page of records, each already JSON, in the order the query asked for."""

    records: list[bytes | memoryview]
    profiles: dict[str, dict[str, Any]]  # get_all: stored profiles of the users in the page, by id
    next_cursor: str | None
    user_ids: set[bytes] = dataclasses.field(default_factory=set)  # of the page's records
    total: int | None = None  # records matching the query, when cheap to know (see _read_page)
    examined: int | None = None  # sorted reads: entries examined
    complete: bool | None = None  # sorted reads: whether every matching entry was examined
    tombstones: list[str] = dataclasses.field(default_factory=list)  # export: deleted ids in the page's range


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
        except (FileExistsError, NotADirectoryError):
            raise StoreOpenError(self._not_a_directory()) from None
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

    def _not_a_directory(self) -> str:
        """Name what is in the way: the path itself, or a file where one of its parents should be."""
        for path in (*reversed(self._path.parents), self._path):
            if path.exists() and not path.is_dir():
                if path == self._path:
                    return f"database path {self._path} is not a directory"
                return f"database path {self._path} cannot be created: {path} is not a directory"
        return f"database path {self._path} is not a directory"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class HandleGuard:
    """Readers share the LevelDB handle; replacing it waits until no read is using it.

    plyvel frees LevelDB's memory on close, so closing under a running read would crash the
    process rather than raise. Reads are bounded (SCAN_BUDGET, PAGE_BYTES, and max_sort_examined
    for sorted reads), so the wait is short: at most seconds, for a sorted read at its bound.
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

    def __init__(
        self,
        path: Path,
        *,
        sync: bool,
        max_batch: int,
        paranoid_checks: bool,
        max_sort_examined: int,
        upgrade_batch: int,
        upgrade_pause: float,
        detector: RegressionDetector,
        series_cache_bytes: int = 128 * 1024 * 1024,
    ) -> None:
        """The settings come from Config (--max-sort-examined and so on), where their defaults are.

        A sorted read examines at most max_sort_examined entries: about 12-30 us each when it
        ranks a filter's records (decoding the record is most of it), a few us each when it walks
        a core metric's index. upgrade_batch records are indexed per synced write when an
        older database is upgraded at open, upgrade_pause seconds apart."""
        self._path = path
        self.detector = detector
        # record id -> its exclusion ({"note", "excluded_at", "excluded_by"}); few, so kept whole in memory.
        self.exclusions: dict[str, dict[str, Any]] = {}
        self.alerts = AlertBook(self.detector, self.is_excluded)
        self._sync = sync
        self._paranoid_checks = paranoid_checks
        self._max_batch = max_batch
        self._max_sort_examined = max_sort_examined
        self._upgrade_batch = upgrade_batch
        self._upgrade_pause = upgrade_pause
        self._overview = Overview()
        self.series_cache = SeriesCache(series_cache_bytes)
        self._lock = DatabaseLock(path)
        self._guard = HandleGuard()
        self._closed = False
        self._db: plyvel.DB | None = None
        self._writer: GroupCommitWriter | None = None
        self._readers = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="perfdb-read")
        self._overview_rebuild_queued = False  # a rebuild of stale overview tests waits for a reader thread
        self.corrupt_records = 0

    # -- lifecycle ------------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Lock, open, check (and upgrade) the database, load the overview, then start the writer.
        Blocking, and as long as one pass over the records; raises StoreOpenError."""
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
            self._load_overview()
            self._load_exclusions()
            self.alerts.load(self._db)  # first: an `expected` alert restarts its series' window
            self.detector.load(self._db, self.is_excluded)
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
            overview=self._overview,
            detector=self.detector,
        )
        self._writer.overview_stale_observer = self._queue_overview_rebuild
        self._writer.history_observer = self.series_cache.invalidate
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
        elif version in UPGRADABLE_VERSIONS:
            try:
                upgrade_schema(self._db, version, batch_records=self._upgrade_batch, pause=self._upgrade_pause)
            except plyvel.Error as exc:
                raise StoreOpenError(f"cannot upgrade database {self._path}: {exc}") from None
        elif version != str(layout.SCHEMA_VERSION).encode():
            raise StoreOpenError(
                f"database {self._path} has schema version {version.decode(errors='replace')}, "
                f"this server reads version {layout.SCHEMA_VERSION}"
            )

    def _load_overview(self) -> None:
        """Aggregate every stored record into the overview (one pass; see overview.py)."""
        assert self._db is not None
        started = time.monotonic()
        rows: list[tuple[str, str, dict[str, Any]]] = []
        with self._db.iterator(prefix=layout.RECORD_PREFIX, fill_cache=False) as records:
            for key, value in records:
                try:
                    document = orjson.loads(layout.unseal(value))
                    rows.append((document["test_name"], document["user_id"], document["metrics"]))
                except (layout.CorruptValueError, orjson.JSONDecodeError, KeyError, TypeError):
                    log.error("record %s is damaged; left out of the overview", layout.split_record_key(key)[0])
                if len(rows) == _OVERVIEW_LOAD_BATCH:
                    self._overview.add(rows)
                    rows.clear()
        self._overview.add(rows)
        elapsed = time.monotonic() - started
        if elapsed >= 1.0:  # only worth a line when it visibly delays the start
            log.info("overview of the stored records built in %.1f s", elapsed)

    def _load_exclusions(self) -> None:
        assert self._db is not None
        with self._db.iterator(prefix=layout.EXCLUSION_PREFIX) as entries:
            for key, value in entries:
                try:
                    self.exclusions[key[len(layout.EXCLUSION_PREFIX) :].decode()] = orjson.loads(value)
                except orjson.JSONDecodeError:
                    log.error("exclusion entry %r is damaged; the record counts again", key[:80])

    def is_excluded(self, record_id: str) -> bool:
        return record_id in self.exclusions

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

    @property
    def is_open(self) -> bool:
        """Opened, not closed, and not between handles while the writer reopens LevelDB."""
        return self._db is not None and not self._closed

    async def database_stats(self) -> DatabaseStats:
        """LevelDB's size, memory and per-level numbers, read on the reader threads."""
        return await self._read(self._read_database_stats, None)

    def _read_database_stats(self, _query: None) -> DatabaseStats:
        with self._guard.reading():
            return read_database_stats(self._database())

    # -- writes ---------------------------------------------------------------------------

    @property
    def writer(self) -> GroupCommitWriter:
        assert self._writer is not None, "store is not open"
        return self._writer

    def submit(self, profile: Profile, draft: RecordDraft) -> asyncio.Future[RecordAck]:
        return self.writer.submit(profile, draft)

    def submit_to(self, profile: Profile, draft: RecordDraft, outcome: Settleable) -> None:
        self.writer.submit_to(profile, draft, outcome)

    def submit_batch(self, profile: Profile, drafts: list[RecordDraft]) -> asyncio.Future[BatchAck]:
        return self.writer.submit_batch(profile, drafts)

    async def restore(
        self,
        records: list[ImportedRecord],
        profiles: dict[str, Profile],
        tombstones: list[str] | None = None,
        *,
        force: bool = False,
    ) -> ImportAck:
        ack = await self.writer.restore(records, profiles, tombstones, force=force)
        # Records its tombstones removed leave the verdict windows and alerts too, as for delete_record.
        removed: dict[str, list[str]] = {}
        for user_id, record_id in ack.removed_records:
            removed.setdefault(user_id, []).append(record_id)
        for user_id, record_ids in removed.items():
            await self._forget_deleted(user_id, record_ids)
        return ack

    async def delete_record(self, record_id: str, owner: str | None) -> RecordDeletionAck:
        ack = await self.writer.delete_record(record_id, owner)
        if ack.deleted and ack.user_id is not None:
            # Committed: the verdict windows and alerts let go of the record too.
            await self._forget_deleted(ack.user_id, [record_id])
        return ack

    async def delete_user(self, user_id: str) -> UserDeletionAck:
        ack = await self.writer.delete_user(user_id)
        if ack.deleted:
            await self._forget_deleted(user_id, None)
        return ack

    async def _forget_deleted(self, user_id: str, record_ids: list[str] | None) -> None:
        try:
            await self.forget_records(user_id, record_ids)
        except Exception:  # the deletion is committed: its reply says so even if detection lags behind
            log.exception("regression detection could not forget the deleted records of %s", user_id)

    # -- reads ----------------------------------------------------------------------------

    async def get_user(self, query: Query) -> tuple[dict[str, Any], Page]:
        """The user's stored profile and one page of their records; not_found for unknown users."""
        return await self._read(self._read_user_page, query)

    async def get_all(self, query: Query) -> Page:
        """One page of every user's records."""
        return await self._read(self._read_all_page, query)

    async def overview(self, test_name: str | None, metric: str, user_id: str | None = None) -> dict[str, Any]:
        """The aggregates of `metric` for one test or all of them (see overview.py), each with
        every user's best value or just user_id's, with the tests that deletions made stale
        rebuilt first."""
        return await self._read(self._read_overview, (test_name, metric, user_id))

    def _read_overview(self, request: tuple[str | None, str, str | None]) -> dict[str, Any]:
        self._rebuild_overview()
        return self._overview.report(*request)

    def _queue_overview_rebuild(self) -> None:
        """Writer thread, after a batch that made overview tests stale: rebuild them on a reader
        thread. One queued rebuild takes every test made stale before it starts, so no more are queued
        meanwhile (the flag is cleared before the rebuild claims the stale tests)."""
        if not self._overview_rebuild_queued:
            self._overview_rebuild_queued = True
            self._readers.submit(self._rebuild_overview_queued)

    def _rebuild_overview_queued(self) -> None:
        self._overview_rebuild_queued = False
        try:
            self._rebuild_overview()
        except (PerfdbError, plyvel.Error, RuntimeError) as exc:  # the next overview request tries again
            log.warning("overview not rebuilt after a deletion: %s", exc)
        except Exception:  # nothing awaits this future: say so here, or nobody would
            log.exception("overview rebuild after a deletion failed")

    def _rebuild_overview(self) -> None:
        """Recompute the overview's stale tests from the test index (reader threads only)."""
        if not self._overview.has_stale:
            return
        with self._guard.reading():
            started = time.monotonic()
            rebuilt = self._overview.rebuild_stale(self._database().snapshot, self._test_rows)
            elapsed = time.monotonic() - started
            if elapsed >= 1.0:
                log.info("overview of %d tests rebuilt after deletions in %.1f s", rebuilt, elapsed)

    def _test_rows(self, snapshot: plyvel.Snapshot, test_name: str) -> Iterator[Row]:
        """The overview's rows of every record filed under the test."""
        prefix = layout.test_index_prefix(test_name)
        read_entry = layout.index_entry_reader(prefix)
        with snapshot.iterator(prefix=prefix, fill_cache=False) as entries:
            for key, value in entries:
                try:
                    user_id = read_entry(value)[0]
                except (ValueError, TypeError):  # orjson's decode error is a ValueError
                    log.error("index entry %r is damaged; left out of the overview", key[:80])
                    continue
                record_key = layout.record_key(layout.index_record_id(key), user_id)
                document = self._checked(snapshot.get(record_key), record_key)
                if document is None:
                    continue
                try:
                    metrics = orjson.loads(document)["metrics"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    log.error("record %s is damaged; left out of the overview", layout.index_record_id(key))
                    continue
                if isinstance(metrics, dict):
                    yield test_name, user_id, metrics

    async def export(self, query: Query) -> Page:
        """A page of get_all, plus the tombstones of the deleted records in its range of ids."""
        return await self._read(self._read_export_page, query)

    async def audit_log(self, limit: int, cursor: str | None) -> AuditPage:
        """A page of audit entries, newest first, starting after `cursor` (an audit id)."""
        return await self._read(self._read_audit_page, (limit, cursor))

    async def series(self, request: SeriesQuery) -> dict[str, Any]:
        """The series reply's fields: the request's metrics bucketed over time (see series.py)."""
        return await self._read(self._read_series, request)

    async def compare(self, query: CompareQuery) -> dict[str, Any]:
        """The compare reply's fields: both sides read from one snapshot, then compared per test and
        metric (the statistics run on the reader thread too: scipy is not for the event loop)."""
        return await self._read(self._compare, query)

    async def get_record(self, record_id: str) -> dict[str, Any]:
        """The get_record reply's fields: the record (with its exclusion and samples, if any) and its stored
        verdicts, if any; not_found if unknown."""
        return await self._read(self._read_record_reply, record_id)

    def _read_record_reply(self, record_id: str) -> dict[str, Any]:
        _owner, document = self._read_record(record_id)
        reply: dict[str, Any] = {"record": orjson.Fragment(bytes(document))}
        with self._guard.reading():
            verdicts = self._database().get(layout.verdicts_key(record_id))
        if verdicts is not None:
            try:
                reply["verdicts"] = orjson.Fragment(layout.verdicts_json(verdicts))
            except layout.CorruptValueError as exc:  # the record itself is fine: it is answered without them
                log.error("verdicts of record %s are damaged (%s); left out", record_id, exc)
        return reply

    def _read_record(self, record_id: str) -> tuple[str, bytes | memoryview]:
        with self._guard.reading():
            db = self._database()
            prefix = layout.RECORD_PREFIX + record_id.encode()
            with db.iterator(prefix=prefix) as records:
                found = next(records, None)
            document = None if found is None else self._checked(found[1], found[0])
            if found is None or document is None:
                raise PerfdbError(ErrorCode.NOT_FOUND, "no such record")
            return layout.split_record_key(found[0])[1], _with_samples(document, record_id, db)

    async def set_exclusion(
        self, record_id: str, exclusion: dict[str, Any] | None, owner: str | None
    ) -> dict[str, Any]:
        """Exclude the record from baselines and alerts (`exclusion` is its note, who and when), or count it
        again (None); `owner` given: only that user's record (else forbidden). Its series' windows are rebuilt."""
        return await self._read(self._write_exclusion, (record_id, exclusion, owner))

    def _write_exclusion(self, request: tuple[str, dict[str, Any] | None, str | None]) -> dict[str, Any]:
        record_id, exclusion, owner = request
        user_id, document = self._read_record(record_id)
        if owner is not None and owner != user_id:
            raise PerfdbError(ErrorCode.FORBIDDEN, "only the record's owner (or the admin key) may exclude it")
        with self._guard.reading():
            db = self._database()
            if exclusion is None:
                db.delete(layout.exclusion_key(record_id), sync=True)
                self.exclusions.pop(record_id, None)
            else:
                db.put(layout.exclusion_key(record_id), orjson.dumps(exclusion), sync=True)
                self.exclusions[record_id] = exclusion
            fields = orjson.loads(document)
            keys = [
                SeriesKey(user_id, fields["test_name"], fields.get("tag", ""), metric) for metric in fields["metrics"]
            ]
            self._rebuild(db, keys)
        return {"record_id": record_id, "excluded": exclusion is not None}

    # -- regression detection (reader threads) ------------------------------------------------------------------

    async def analyse_series(self, keys: list[SeriesKey]) -> list[dict[str, Any]]:
        """Change-point analysis of these series; the alerts it created (stored before this returns)."""
        return await self._read(self._with_database, lambda db: self.alerts.analyse(db, keys))

    async def update_alert(self, alert_id: str, state: str, note: str, owner: str | None) -> dict[str, Any]:
        def update(db: plyvel.DB) -> dict[str, Any]:
            return self.alerts.update(db, alert_id, state, note, owner, lambda key: self._rebuild(db, [key]))

        return {"alert": await self._read(self._with_database, update)}

    async def list_alerts(self, query: AlertQuery) -> dict[str, Any]:
        alerts, cursor = await self._read(self._with_database, lambda db: self.alerts.page(db, query))
        return {"alerts": alerts, "next_cursor": cursor}

    async def forget_records(self, user_id: str, record_ids: list[str] | None) -> None:
        """Detection's side of deleting records (None: all the user's): called once the deletion is
        committed. Their series' windows are rebuilt without them (a deleted user's are dropped) and
        the alerts that point at them are resolved."""
        forgotten = None if record_ids is None else set(record_ids)

        def forget(db: plyvel.DB) -> None:
            if forgotten is None:
                self.detector.forget_user(user_id)
            else:
                keys = self.detector.series_of_records(user_id, forgotten)
                self.detector.rebuild(db, keys, lambda record_id: record_id in forgotten or self.is_excluded(record_id))
            self.alerts.resolve_for_records(db, user_id, forgotten)

        await self._read(self._with_database, forget)

    def _rebuild(self, db: plyvel.DB, keys: list[SeriesKey]) -> None:
        self.detector.rebuild(db, keys, self.is_excluded)

    def _with_database(self, work: Callable[[plyvel.DB], _T]) -> _T:
        with self._guard.reading():
            return work(self._database())

    async def _read(self, read: Callable[[_A], _T], query: _A) -> _T:
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
        assert query.user_id is not None
        with self._guard.reading():
            snapshot = self._database().snapshot()
            try:
                stored_profile = snapshot.get(layout.profile_key(query.user_id))
                if stored_profile is None:
                    raise PerfdbError(ErrorCode.NOT_FOUND, "no such user")
                return orjson.loads(stored_profile), self._read_page(snapshot, query)
            finally:
                snapshot.close()

    def _read_all_page(self, query: Query) -> Page:
        with self._guard.reading():
            snapshot = self._database().snapshot()
            try:
                return self._read_page(snapshot, query)
            finally:
                snapshot.close()

    def _read_export_page(self, query: Query) -> Page:
        with self._guard.reading():
            snapshot = self._database().snapshot()
            try:
                # Tombstones first: when too many lie ahead, the page ends at the last one sent.
                tombstones, cut = _tombstones_in(snapshot, query, SCAN_BUDGET)
                page = self._read_page(snapshot, query, through=cut)
                if page.next_cursor is not None:
                    tombstones = [record_id for record_id in tombstones if record_id <= page.next_cursor]
                elif cut is not None:
                    page.next_cursor = cut
                page.tombstones = tombstones
                return page
            finally:
                snapshot.close()

    def _read_audit_page(self, page: tuple[int, str | None]) -> AuditPage:
        limit, cursor = page
        if cursor is not None and not is_record_id(cursor):
            raise PerfdbError(ErrorCode.BAD_REQUEST, "cursor: not a cursor this server returned")
        with self._guard.reading():
            snapshot = self._database().snapshot()
            try:
                stop = layout.audit_key(cursor) if cursor is not None else layout.prefix_end(layout.AUDIT_PREFIX)
                entries, more = _key_page(snapshot, layout.AUDIT_PREFIX, stop, reverse=True, limit=limit)
                last_id = entries[-1][0][len(layout.AUDIT_PREFIX) :].decode() if more else None
                return AuditPage([value for _, value in entries], last_id)
            finally:
                snapshot.close()

    def _read_page(self, snapshot: plyvel.Snapshot, query: Query, *, through: str | None = None) -> Page:
        """A page of the query; `through`: a record id past which a time-ordered page does not go."""
        source = _choose_source(snapshot, query)
        if _walks_metric_index(snapshot, source, query, self._max_sort_examined):
            page = self._read_by_metric_index(snapshot, query)
        elif query.sort is not None:
            page = self._read_sorted(snapshot, source, query)
        else:
            page = self._read_in_time_order(snapshot, source, query, through)
        if query.samples:
            page.records = [
                _with_samples(document, _document_record_id(document), snapshot) for document in page.records
            ]
        if query.user_id is None:  # get_all: the profiles of the page's users
            for user_id in sorted(page.user_ids):
                stored = snapshot.get(layout.PROFILE_PREFIX + user_id)
                if stored is not None:
                    page.profiles[user_id.decode()] = orjson.loads(stored)
        if query.cursor is None and query.since is None and query.until is None and _filter_count(query) <= 1:
            page.total = source.count  # the one filter's index count, or every record's
        return page

    def _skip_damaged_entry(self, key: bytes) -> None:
        self.corrupt_records += 1
        log.error("index entry %r is damaged; skipped (perfdb repair rebuilds it)", key[:80])

    def _entry_readers(self, snapshot: plyvel.Snapshot, source: _Source, query: Query) -> tuple[_Admits, _Fetch]:
        """How to read the source's entries: `admits` gives the user id of an entry's record if the
        query's filters admit it (else None), without reading the record; `fetch` gives the
        record's JSON (None if it is damaged or missing)."""
        if source.prefix == layout.RECORD_PREFIX:
            id_end = layout.RECORD_ID_END
            return (lambda key, value: key[id_end:]), (lambda key, value, user_id: self._checked(value, key))
        read_entry = layout.index_entry_reader(source.prefix)

        def admits(key: bytes, value: bytes) -> bytes | None:
            try:
                user_id, test_name, tag, _ = read_entry(value)
            except (ValueError, TypeError):  # orjson's decode error is a ValueError
                self._skip_damaged_entry(key)
                return None
            return user_id.encode() if _matches(query, user_id, test_name, tag) else None

        def fetch(key: bytes, value: bytes, user_id: bytes) -> memoryview | None:
            record_key = layout.RECORD_PREFIX + key[-RECORD_ID_CHARS:] + user_id
            return self._checked(snapshot.get(record_key), record_key)

        return admits, fetch

    def _entry_numbers(self, snapshot: plyvel.Snapshot, source: _Source, query: Query) -> _Numbers:
        """How to read the numbers of the source's entries: (user id, test name, numeric metrics)
        of an entry's record if the query's filters admit it, else None. They come from the entry
        itself where it carries them (the user and test indexes), else from the record."""
        _, fetch = self._entry_readers(snapshot, source, query)
        if source.prefix == layout.RECORD_PREFIX:

            def from_record(key: bytes, value: bytes) -> tuple[bytes, str, _Metrics] | None:
                document = fetch(key, value, b"")
                return None if document is None else _record_numbers(key[layout.RECORD_ID_END :], document)

            return from_record
        read_entry = layout.index_entry_reader(source.prefix)
        # The entry's first field, when the query filters on it, is matched on the undecoded bytes:
        # a user's series of one test skips the other tests' entries without decoding them.
        first_field = query.test_name if source.prefix.startswith(layout.USER_INDEX_PREFIX) else query.user_id
        head = None if first_field is None or not source.carries_metrics else layout.index_entry_head(first_field)

        def from_entry(key: bytes, value: bytes) -> tuple[bytes, str, _Metrics] | None:
            if head is not None and not value.startswith(head):
                return None
            try:
                user_id, test_name, tag, numbers = read_entry(value)
            except (ValueError, TypeError):  # orjson's decode error is a ValueError
                self._skip_damaged_entry(key)
                return None
            if not _matches(query, user_id, test_name, tag):
                return None
            owner = user_id.encode()
            if numbers is not None:
                return owner, test_name, numbers
            document = fetch(key, value, owner)  # a tag index entry: the record has the metrics
            return None if document is None else _record_numbers(owner, document)

        return from_entry

    def _read_in_time_order(
        self, snapshot: plyvel.Snapshot, source: _Source, query: Query, through: str | None = None
    ) -> Page:
        start, stop = _key_range(source.prefix, query, after_cursor=True)
        if through is not None:
            stop = max(start, min(stop, source.prefix + through.encode() + b"\xff"))
        # A scan of history should not push recent data out of LevelDB's block cache.
        fill_cache = source.prefix != layout.RECORD_PREFIX
        if source.prefix == layout.RECORD_PREFIX or _only_filter_is_user(source, query):
            with _entries(snapshot, start, stop, reverse=query.reverse, fill_cache=fill_cache) as entries:
                page = self._run_page(snapshot, source, query, entries)
            if page is not None:
                return page
            # A damaged record or entry: read entry by entry below, which skips and reports it.
        admits, fetch = self._entry_readers(snapshot, source, query)
        records: list[bytes | memoryview] = []
        user_ids: set[bytes] = set()
        last_key = b""  # the cursor: every entry up to here was examined
        more = full = False
        scanned = 0
        page_bytes = 0
        with _entries(snapshot, start, stop, reverse=query.reverse, fill_cache=fill_cache) as entries:
            for key, value in entries:
                if scanned == SCAN_BUDGET:
                    more = True
                    break
                scanned += 1
                user_id = admits(key, value)
                if user_id is None:
                    last_key = key
                    continue
                if full:  # a full page looks on to the next admitted entry, so the last page has no cursor
                    more = True
                    break
                last_key = key
                document = fetch(key, value, user_id)
                if document is not None:
                    records.append(document)
                    user_ids.add(user_id)
                    page_bytes += len(document)
                    full = len(records) == query.limit or page_bytes >= PAGE_BYTES
        return Page(records, {}, source.record_id(last_key) if more else None, user_ids=user_ids)

    def _run_page(
        self, snapshot: plyvel.Snapshot, source: _Source, query: Query, entries: Iterator[tuple[bytes, bytes]]
    ) -> Page | None:
        """The page _read_in_time_order makes where every entry is admitted: records read straight
        from the record keyspace, or a user's index read for that user alone. Built with C calls
        over the whole run rather than Python code per record; None if a record is damaged or
        missing."""
        limit = min(query.limit, SCAN_BUDGET)
        run = list(itertools.islice(entries, limit))
        keys = list(map(_KEY, run))
        owner = None if query.user_id is None else query.user_id.encode()
        if owner is None:
            values = list(map(_VALUE, run))
        else:
            record_keys = [layout.RECORD_PREFIX + key[-RECORD_ID_CHARS:] + owner for key in keys]
            values = list(map(snapshot.get, record_keys))
        documents = None if None in values else layout.unseal_all(values)
        if documents is None:
            return None
        page_bytes = list(itertools.accumulate(map(len, documents)))
        taken = len(documents)
        if page_bytes and page_bytes[-1] >= PAGE_BYTES:  # the page ends with the record that reaches the bound
            taken = bisect.bisect_left(page_bytes, PAGE_BYTES) + 1
            del keys[taken:], documents[taken:]
        more = taken < len(run) or (taken == limit and next(entries, None) is not None)
        if self.exclusions:
            for index, key in enumerate(keys):
                exclusion = self.exclusions.get(source.record_id(key))
                if exclusion is not None:
                    documents[index] = memoryview(with_exclusion(documents[index], exclusion))
        next_cursor = source.record_id(keys[-1]) if more else None
        user_ids = set(map(_RECORD_KEY_USER, keys)) if owner is None else ({owner} if keys else set())
        return Page(documents, {}, next_cursor, user_ids=user_ids)

    def _read_sorted(self, snapshot: plyvel.Snapshot, source: _Source, query: Query) -> Page:
        """The top `limit` of the query's records by a metric, after the cursor's place in that
        order; examines at most max_sort_examined entries, newest first, holding `limit` rows.
        Over the user or test index the ranks come from the entries and only the page's records
        are read; over the tag index or the records, each record is read to rank it."""
        assert query.sort is not None
        metric, descending = query.sort, query.descending
        after = None if query.cursor is None else _parse_sort_cursor(query.cursor)
        start, stop = _key_range(source.prefix, query, after_cursor=False)
        numbers = self._entry_numbers(snapshot, source, query)
        record_id_of = source.record_id
        walk = _BoundedWalk(self._max_sort_examined)
        candidates = 0

        def ranked() -> Iterator[tuple[_Rank, bytes, bytes]]:
            nonlocal candidates
            with _entries(snapshot, start, stop, reverse=True) as entries:
                for key, (user_id, _, metrics) in walk.admitted(entries, numbers):
                    rank = _rank(metrics.get(metric), descending, record_id_of(key))
                    if after is not None and rank <= after:
                        continue
                    candidates += 1
                    yield rank, key, user_id

        # nsmallest keeps a heap of `limit` items, whatever the number of candidates.
        top = heapq.nsmallest(query.limit, ranked(), key=operator.itemgetter(0))
        records: list[bytes | memoryview] = []
        user_ids: set[bytes] = set()
        page_bytes = taken = 0
        last_rank: _Rank | None = None
        for rank, _, user_id in top:
            if page_bytes >= PAGE_BYTES:
                break
            taken += 1
            last_rank = rank  # past it even if it is gone: the next page must not offer it again
            record_key = layout.record_key(rank[2], user_id.decode())
            document = self._checked(snapshot.get(record_key), record_key)
            if document is None:
                continue
            records.append(document)
            user_ids.add(user_id)
            page_bytes += len(document)
        more = candidates > taken and last_rank is not None
        next_cursor = _sort_cursor(last_rank) if more and last_rank is not None else None
        return Page(records, {}, next_cursor, user_ids=user_ids, examined=walk.examined, complete=walk.complete)

    def _read_by_metric_index(self, snapshot: plyvel.Snapshot, query: Query) -> Page:
        """The query's records ranked by a core metric, after the cursor's place in that order,
        walking the metric's index from the best end: filters and the time range are decided
        from each entry, and only the records of the page are read. Examines at most
        max_sort_examined entries; a page cut short there ends at the last entry examined."""
        assert query.sort is not None
        after = None if query.cursor is None else _parse_sort_cursor(query.cursor)
        low = None if query.since is None else layout.time_bound(query.since)
        high = None if query.until is None else layout.time_bound(query.until)
        id_start = -RECORD_ID_CHARS
        records: list[bytes | memoryview] = []
        user_ids: set[bytes] = set()
        page_bytes = examined = 0
        last_key: bytes | None = None
        more = full = False
        complete = True
        rank_of = _MetricRanks(query.sort, query.descending)
        read_entry = layout.index_entry_reader(layout.METRIC_INDEX_PREFIX)
        for key, value in _metric_walk(snapshot, query.sort, query.descending, after):
            if examined == self._max_sort_examined:
                more = True
                complete = full  # a full page is exact; only whether more follow was not seen
                break
            examined += 1
            record_id = key[id_start:]
            if (low is not None and record_id < low) or (high is not None and record_id >= high):
                last_key = key  # the next page starts past entries this one skipped
                continue
            try:
                user_id, test_name, tag, _ = read_entry(value)
            except (ValueError, TypeError):  # orjson's decode error is a ValueError
                self._skip_damaged_entry(key)
                last_key = key
                continue
            if not _matches(query, user_id, test_name, tag):
                last_key = key  # the next page starts past entries this one skipped
                continue
            if full:  # looks on to the next admitted entry, so the last page has no cursor
                more = True
                break
            last_key = key
            owner = user_id.encode()
            record_key = layout.RECORD_PREFIX + record_id + owner
            document = self._checked(snapshot.get(record_key), record_key)
            if document is not None:
                records.append(document)
                user_ids.add(owner)
                page_bytes += len(document)
                full = len(records) == query.limit or page_bytes >= PAGE_BYTES
        next_cursor = _sort_cursor(rank_of(last_key)) if more and last_key is not None else None
        return Page(records, {}, next_cursor, user_ids=user_ids, examined=examined, complete=complete)

    def _read_series(self, request: SeriesQuery) -> dict[str, Any]:
        """The series' records newest first over the smallest index, at most max_sort_examined
        entries, bucketed on a grid over since..until (an open end: the oldest or newest record
        found). Over the user or test index the numbers come from its cached columns; no record is
        read."""
        if request.by_test:
            return self._read_series_by_test(request)
        with self._series_snapshot() as (snapshot, epoch):
            columns, examined, complete = self._series_rows(snapshot, request, epoch)
            bounds = _series_bounds(request, columns)
            fields = _series_fields(request, bounds, columns, examined=examined, complete=complete)
            return self._with_marks(snapshot, request, fields)

    def _read_series_by_test(self, request: SeriesQuery) -> dict[str, Any]:
        """One user's series of every test in one read, on one grid. The MAX_SERIES_TESTS tests
        run most recently in the range are kept; others are left out and the reply says
        `tests_truncated`."""
        with self._series_snapshot() as (snapshot, epoch):
            columns, examined, complete = self._series_rows(snapshot, request, epoch)
            bounds = _series_bounds(request, columns)
            tests, truncated = columns.by_test(MAX_SERIES_TESTS)
            kept = sum(len(rows) for rows in tests.values())
            fields = _series_head(bounds, records=kept, examined=examined, complete=complete)
            fields["tests_truncated"] = truncated
            fields["tests"] = {}
            for test_name in sorted(tests):
                one = _series_fields(request, bounds, tests[test_name], examined=0, complete=True)
                fields["tests"][test_name] = self._with_marks(snapshot, request, one, test_name)["series"]
            return fields

    @contextlib.contextmanager
    def _series_snapshot(self) -> Iterator[tuple[plyvel.Snapshot, int]]:
        """A snapshot for a series read, and the series cache's epoch taken before it."""
        with self._guard.reading():
            epoch = self.series_cache.epoch
            snapshot = self._database().snapshot()
            try:
                yield snapshot, epoch
            finally:
                snapshot.close()

    def _series_rows(
        self, snapshot: plyvel.Snapshot, request: SeriesQuery, epoch: int
    ) -> tuple[SeriesColumns, int, bool]:
        """(the records the request admits, oldest first; entries examined; complete)."""
        query = request.as_query()
        source = _choose_source(snapshot, query)
        if source.carries_metrics and self.series_cache.fits(source.count):
            index = self._index_columns(snapshot, source, epoch)
            if index is not None:
                return index.select(
                    query.user_id, query.test_name, query.tag, query.since, query.until, self._max_sort_examined,
                    request.metrics,
                )  # fmt: skip
        start, stop = _key_range(source.prefix, query, after_cursor=False)
        numbers = self._entry_numbers(snapshot, source, query)
        walk = _BoundedWalk(self._max_sort_examined)
        gathered = RowGatherer(request.metrics)
        with _entries(snapshot, start, stop, reverse=True) as entries:
            for key, (_, test_name, metrics) in walk.admitted(entries, numbers):
                gathered.add(source.record_id(key), test_name, metrics)
        return gathered.columns(), walk.examined, walk.complete

    def _index_columns(self, snapshot: plyvel.Snapshot, source: _Source, epoch: int) -> IndexColumns | None:
        """Every entry of a user's or test's index as columns: the cached ones and those written
        since, or the whole index read again. None if its entries do not carry the metrics."""
        prefix = source.prefix
        cached = self.series_cache.get(prefix, epoch)
        if cached is not None:
            newer = self._index_columns_from(snapshot, source, cached.last_key + b"\x00")
            if newer is not None and cached.columns.entries + newer[0].entries == source.count:
                if newer[0].entries == 0:
                    return cached.columns
                columns = cached.columns.extended(newer[0])
                self.series_cache.put(prefix, CachedIndex(columns, newer[1], epoch))
                return columns
        whole = self._index_columns_from(snapshot, source, prefix)
        if whole is None:
            return None
        columns, last_key = whole
        if last_key:
            self.series_cache.put(prefix, CachedIndex(columns, last_key, epoch))
        return columns

    def _index_columns_from(
        self, snapshot: plyvel.Snapshot, source: _Source, start: bytes
    ) -> tuple[IndexColumns, bytes] | None:
        """The columns of the index's entries from `start` on, and the last entry's key (b"" if none)."""
        prefix = source.prefix
        by_user = prefix.startswith(layout.USER_INDEX_PREFIX)
        name = prefix[len(layout.USER_INDEX_PREFIX) : -len(layout.SEPARATOR)].decode()
        parts: list[IndexColumns] = []
        last_key = b""
        with snapshot.iterator(start=start, stop=layout.prefix_end(prefix), fill_cache=False) as entries:
            for chunk in iter(lambda: list(itertools.islice(entries, _INDEX_CHUNK)), []):
                columns = index_columns(chunk, by_user, name, self._skip_damaged_entry)
                if columns is None:
                    return None
                parts.append(columns)
                last_key = chunk[-1][0]
        if not parts:  # nothing past `start`
            empty = index_columns([], by_user, name, self._skip_damaged_entry)
            assert empty is not None
            return empty, last_key
        return functools.reduce(IndexColumns.extended, parts), last_key

    def _compare(self, query: CompareQuery) -> dict[str, Any]:
        with self._guard.reading():
            snapshot = self._database().snapshot()
            try:
                base = self._read_sample(snapshot, query.base, query.max_records)
                head = self._read_sample(snapshot, query.head, query.max_records)
            finally:
                snapshot.close()
        rows = compare_runs(base, head, COMPARE_MODEL)
        return {
            "model": COMPARE_MODEL.to_json(),
            "max_records": query.max_records,
            "base": base.to_fields(),
            "head": head.to_fields(),
            "rows": [row.to_json() for row in rows],
        }

    def _read_sample(self, snapshot: plyvel.Snapshot, selector: Selector, max_records: int) -> RunSample:
        """The selector's records, newest first, at most max_records of them; a walk over an index
        examines at most max_sort_examined entries."""
        sample = RunSample()
        if selector.record_ids is not None:
            sample.missing = 0
            for record_id in selector.record_ids:  # newest first
                if sample.records == max_records:
                    sample.truncated = True
                    break
                sample.examined += 1
                document = self._record_by_id(snapshot, record_id)
                if document is None or not selector.admits(document["user_id"], document["test_name"]):
                    sample.missing += 1
                    continue
                sample.add(document, _stored_samples(snapshot, record_id))
            return sample
        query = selector.as_query()
        source = _choose_source(snapshot, query)
        start, stop = _key_range(source.prefix, query, after_cursor=False)
        admits, fetch = self._entry_readers(snapshot, source, query)
        walk = _BoundedWalk(self._max_sort_examined)
        with _entries(snapshot, start, stop, reverse=True) as entries:
            for _, _, stored in walk.documents(entries, admits, fetch):
                document = _of_commit(stored, selector.commit) if selector.commit else orjson.loads(stored)
                if document is None:
                    continue
                if sample.records == max_records:  # one more matches: the side is cut
                    sample.truncated = True
                    break
                sample.add(document, _stored_samples(snapshot, document["record_id"]))
        sample.examined, sample.complete = walk.examined, walk.complete
        return sample

    def _record_by_id(self, snapshot: plyvel.Snapshot, record_id: str) -> dict[str, Any] | None:
        """A record by its id alone (ids are unique across users; the key ends in the user id)."""
        with snapshot.iterator(prefix=layout.RECORD_PREFIX + record_id.encode()) as records:
            found = next(records, None)
        if found is None:
            return None
        sealed = self._checked(found[1], found[0])
        if sealed is None:
            return None
        record: dict[str, Any] = orjson.loads(sealed)
        return record

    def _with_marks(
        self, snapshot: plyvel.Snapshot, request: SeriesQuery, fields: dict[str, Any], test_name: str | None = None
    ) -> dict[str, Any]:
        """Each series gets `marks`: the alerts (change points) of its records in the range."""
        test_name = test_name or request.test_name
        assert test_name is not None
        marks = self.alerts.marks(snapshot, test_name, request.metrics, request.user_id, request.tag)
        since, until = request.since, request.until
        for metric, series in fields["series"].items():
            series["marks"] = [
                mark
                for mark in marks.get(metric, ())
                if (since is None or record_id_micros(mark["record_id"]) >= since)
                and (until is None or record_id_micros(mark["record_id"]) < until)
            ]
        return fields

    def _checked(self, value: bytes | None, record_key: bytes) -> memoryview | None:
        """The record's JSON, or None (logged and counted) if it is missing or damaged."""
        if value is None:
            self.corrupt_records += 1
            log.error("record %s is indexed but missing", layout.split_record_key(record_key)[0])
            return None
        try:
            document = layout.unseal(value)
        except layout.CorruptValueError as exc:
            self.corrupt_records += 1
            log.error("record %s is damaged (%s); skipped", layout.split_record_key(record_key)[0], exc)
            return None
        if self.exclusions:
            exclusion = self.exclusions.get(layout.split_record_key(record_key)[0])
            if exclusion is not None:
                return memoryview(with_exclusion(document, exclusion))
        return document


_KEY = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)
_RECORD_KEY_USER = operator.itemgetter(slice(layout.RECORD_ID_END, None))
_Admits = Callable[[bytes, bytes], bytes | None]
_Fetch = Callable[[bytes, bytes, bytes], memoryview | None]
# A record's metrics, as its user or test index entry holds them or as the record does: read with get().
_Metrics = layout.EntryMetrics | dict[str, Any]
# (user id, test name, metrics) of an entry's record, None if the read does not admit it.
_Numbers = Callable[[bytes, bytes], tuple[bytes, str, _Metrics] | None]
# Where a record stands in a sorted read: (lacks the metric, value signed so smaller comes
# first, record id); records lacking the metric come last, ties go by record id.
_Rank = tuple[int, int | float, str]


@dataclasses.dataclass(frozen=True, slots=True)
class _Source:
    """The keys a read walks: an index's entries under one name, or the records themselves."""

    prefix: bytes
    count: int  # entries under the prefix, from its stored count

    @property
    def carries_metrics(self) -> bool:
        """Whether its entries hold their records' numeric metrics (see layout.index_entry)."""
        return self.prefix.startswith((layout.USER_INDEX_PREFIX, layout.TEST_INDEX_PREFIX))

    def record_id(self, key: bytes) -> str:
        if self.prefix == layout.RECORD_PREFIX:
            return layout.split_record_key(key)[0]
        return layout.index_record_id(key)


class _BoundedWalk:
    """How far a newest-first walk over the records a query admits went: at most `limit`
    entries are examined (admitted or not), and `complete` says whether that was the range."""

    __slots__ = ("_limit", "complete", "examined")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.examined = 0
        self.complete = True

    def admitted(
        self, entries: Iterator[tuple[bytes, bytes]], read: Callable[[bytes, bytes], _T | None]
    ) -> Iterator[tuple[bytes, _T]]:
        """(key, what `read` made of it) of each entry among `entries` it made something of."""
        for key, value in entries:
            if self.examined == self._limit:
                self.complete = False
                return
            self.examined += 1
            found = read(key, value)
            if found is not None:
                yield key, found

    def documents(
        self, entries: Iterator[tuple[bytes, bytes]], admits: _Admits, fetch: _Fetch
    ) -> Iterator[tuple[bytes, bytes, memoryview]]:
        """(key, user id, record JSON) of each admitted, readable record among `entries`."""

        def read(key: bytes, value: bytes) -> tuple[bytes, memoryview] | None:
            user_id = admits(key, value)
            document = None if user_id is None else fetch(key, value, user_id)
            return None if document is None or user_id is None else (user_id, document)

        for key, (user_id, document) in self.admitted(entries, read):
            yield key, user_id, document


def _record_numbers(user_id: bytes, document: memoryview) -> tuple[bytes, str, _Metrics]:
    """(user id, test name, metrics) of a record's JSON, as _Numbers reads them."""
    record = orjson.loads(document)
    metrics = record["metrics"]
    return user_id, record["test_name"], metrics if isinstance(metrics, dict) else {}


@contextlib.contextmanager
def _entries(
    snapshot: plyvel.Snapshot, start: bytes, stop: bytes, *, reverse: bool, fill_cache: bool = False
) -> Iterator[Iterator[tuple[bytes, bytes]]]:
    """The entries in [start, stop), oldest or newest first."""
    with snapshot.iterator(start=start, stop=stop, reverse=reverse, fill_cache=fill_cache) as entries:
        yield _with_lone_start(snapshot, entries, start, stop) if reverse else entries


def _with_lone_start(
    snapshot: plyvel.Snapshot, entries: Iterator[tuple[bytes, bytes]], start: bytes, stop: bytes
) -> Iterator[tuple[bytes, bytes]]:
    """plyvel 1.5's reverse iterator yields nothing when the range's only key equals `start`
    (a time range starting at a record's exact time): when it yields nothing, look forward."""
    found = False
    for entry in entries:
        found = True
        yield entry
    if not found:
        with snapshot.iterator(start=start, stop=stop, fill_cache=False) as forward:
            yield from forward


class _MetricRanks:
    """The rank (see _Rank) of a metric index entry, from its key."""

    def __init__(self, metric: str, descending: bool) -> None:
        self._number_start = len(layout.metric_index_prefix(metric))
        self._descending = descending

    def __call__(self, key: bytes) -> _Rank:
        record_id = key[-RECORD_ID_CHARS:].decode()
        if key[self._number_start - 1] != layout.SEPARATOR[0]:
            return (1, 0, record_id)  # an entry of a record lacking the metric
        start = self._number_start
        number = layout.sortable_number_value(key[start : start + layout.SORTABLE_NUMBER_BYTES])
        return (0, -number if self._descending else number, record_id)


def _walks_metric_index(snapshot: plyvel.Snapshot, source: _Source, query: Query, max_examined: int) -> bool:
    """Whether a sorted read walks its metric's index rather than rank the records its filters
    (a time range counts) admit, by what each costs. Ranking costs the same whatever the values:
    the filter's entries (its count; within a time range, its keys there, counted) times the cost
    of ranking one. The walk stops once the page is full, after few entries when the filter's
    records are spread along the index, but it examines the whole index (up to max_examined) when
    they all rank last, as one slow machine's results do sorted by qps; so it is chosen only when
    ranking would cost more than that, or could not rank the whole filter within max_examined."""
    if query.sort not in layout.INDEXED_METRICS:
        return False
    total = layout.read_count(snapshot.get(layout.RECORD_COUNT_KEY))
    walk_micros = min(total, max_examined) * METRIC_WALK_MICROS
    rank_micros = RANK_ENTRY_MICROS if source.carries_metrics else RANK_RECORD_MICROS
    most_ranked = min(max_examined, int(walk_micros / rank_micros))  # the largest filter ranked
    if query.since is None and query.until is None:
        return source.count > most_ranked
    start, stop = _key_range(source.prefix, query, after_cursor=False)
    with snapshot.iterator(start=start, stop=stop, include_value=False, fill_cache=False) as keys:
        return sum(1 for _ in itertools.islice(keys, most_ranked + 1)) > most_ranked


def _metric_walk(
    snapshot: plyvel.Snapshot, metric: str, descending: bool, after: _Rank | None
) -> Iterator[tuple[bytes, bytes]]:
    """A core metric's index entries in the order of a sorted read, from just after `after`: the
    records with the metric by value (ties in id order), then those without it in id order."""
    valued = layout.metric_index_prefix(metric)
    number_end = len(valued) + layout.SORTABLE_NUMBER_BYTES
    lacking = layout.metric_lacking_prefix(metric)
    lacking_start = lacking
    if after is not None and after[0]:
        lacking_start = lacking + after[2].encode() + b"\x00"  # just past the cursor's record
    elif descending:
        high = layout.prefix_end(valued)
        if after is not None:  # first the rest of the cursor's tie group, then below it
            group = valued + layout.sortable_number(-after[1])
            yield from _forward(snapshot, group + after[2].encode() + b"\x00", group + b"\xff")
            high = group
        yield from _descending(snapshot, valued, high, number_end)
    else:
        start = valued if after is None else valued + layout.sortable_number(after[1]) + after[2].encode() + b"\x00"
        yield from _forward(snapshot, start, layout.prefix_end(valued))
    yield from _forward(snapshot, lacking_start, layout.prefix_end(lacking))


def _forward(snapshot: plyvel.Snapshot, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
    with snapshot.iterator(start=start, stop=stop, fill_cache=False) as entries:
        yield from entries


def _descending(snapshot: plyvel.Snapshot, low: bytes, high: bytes, number_end: int) -> Iterator[tuple[bytes, bytes]]:
    """The metric index entries in [low, high), highest value first and ties in id order: a
    reverse walk holds each tie group back until it ends, and reads a large one forward instead."""
    while True:
        group = b""
        tied: list[tuple[bytes, bytes]] = []
        with snapshot.iterator(start=low, stop=high, reverse=True, fill_cache=False) as entries:
            for key, value in entries:
                if not group or not key.startswith(group):
                    yield from reversed(tied)
                    group, tied = key[:number_end], []
                elif len(tied) == _TIE_BUFFER:
                    break
                tied.append((key, value))
            else:
                yield from reversed(tied)
                return
        yield from _forward(snapshot, group, group + b"\xff")
        high = group


def _choose_source(snapshot: plyvel.Snapshot, query: Query) -> _Source:
    """The smallest index that holds every record the query's filters admit; the record
    keyspace when there is no filter."""
    candidates = []
    if query.user_id is not None:
        candidates.append((layout.user_count_key(query.user_id), layout.user_index_prefix(query.user_id)))
    if query.test_name is not None:
        candidates.append((layout.test_count_key(query.test_name), layout.test_index_prefix(query.test_name)))
    if query.tag is not None:
        candidates.append((layout.tag_count_key(query.tag), layout.tag_index_prefix(query.tag)))
    if not candidates:
        return _Source(layout.RECORD_PREFIX, layout.read_count(snapshot.get(layout.RECORD_COUNT_KEY)))
    return min(
        (_Source(prefix, layout.read_count(snapshot.get(count_key))) for count_key, prefix in candidates),
        key=lambda source: source.count,
    )


def _series_bounds(request: SeriesQuery, columns: SeriesColumns) -> BucketBounds | None:
    """The buckets over since..until; an open end is the oldest (newest) record read. None when
    the range is open and no record matched."""
    if len(columns) == 0 and (request.since is None or request.until is None):
        return None
    low = request.since if request.since is not None else int(columns.micros[0])
    high = request.until if request.until is not None else int(columns.micros[-1]) + 1
    return BucketBounds(BucketGrid.spanning(low, high, request.buckets))


def _series_head(bounds: BucketBounds | None, *, records: int, examined: int, complete: bool) -> dict[str, Any]:
    """A series reply's fields about its grid and its walk."""
    grid = None if bounds is None else bounds.grid
    return {
        "since": None if grid is None else format_micros(grid.start),
        "until": None if grid is None else format_micros(grid.end),
        "bucket_micros": None if grid is None else grid.width,
        "buckets": 0 if grid is None else grid.count,
        "records": records,
        "examined": examined,
        "complete": complete,
    }


def _series_fields(
    request: SeriesQuery, bounds: BucketBounds | None, columns: SeriesColumns, *, examined: int, complete: bool
) -> dict[str, Any]:
    """A series reply's fields over `columns`: the head and each metric's series."""
    return {
        **_series_head(bounds, records=len(columns), examined=examined, complete=complete),
        "series": {
            metric: empty_series(request.columns)
            if bounds is None
            else metric_fields(columns, metric, bounds, as_columns=request.columns)
            for metric in request.metrics
        },
    }


def _only_filter_is_user(source: _Source, query: Query) -> bool:
    """Whether the source is the query's user's index and the query has no other filter: then
    every entry is admitted and names a record of that user."""
    return (
        query.user_id is not None
        and query.test_name is None
        and query.tag is None
        and source.prefix == layout.user_index_prefix(query.user_id)
    )


def _filter_count(query: Query) -> int:
    return (query.user_id is not None) + (query.test_name is not None) + (query.tag is not None)


def _matches(query: Query, user_id: str, test_name: str, tag: str) -> bool:
    return (
        (query.user_id is None or query.user_id == user_id)
        and (query.test_name is None or query.test_name == test_name)
        and (query.tag is None or query.tag == tag)
    )


def _key_range(prefix: bytes, query: Query, *, after_cursor: bool) -> tuple[bytes, bytes]:
    """[start, stop) of the keys under `prefix` within since/until and, when asked, past the
    cursor in the read's direction (keys end in, or after their prefix start with, a record id)."""
    start = prefix + layout.time_bound(query.since) if query.since is not None else prefix
    stop = prefix + layout.time_bound(query.until) if query.until is not None else layout.prefix_end(prefix)
    if after_cursor and query.cursor is not None:
        if not is_record_id(query.cursor):
            raise PerfdbError(ErrorCode.BAD_REQUEST, "cursor: not a cursor this server returned")
        cursor = prefix + query.cursor.encode()
        if query.reverse:
            stop = min(stop, cursor)  # every key of the cursor's record sorts at or after it
        else:
            start = max(start, cursor + b"\xff")  # ... and before this (user ids never hold 0xff)
    return start, max(start, stop)


def _tombstones_in(snapshot: plyvel.Snapshot, query: Query, budget: int) -> tuple[list[str], str | None]:
    """The ids of the tombstones in the range of an export page (past its cursor, within
    since/until), at most `budget` of them, and the last of them if more lie beyond (else None).
    Tombstones hold no content, so the test_name and tag filters do not apply to them."""
    start, stop = _key_range(layout.TOMBSTONE_PREFIX, query, after_cursor=True)
    entries, more = _key_page(snapshot, start, stop, reverse=False, limit=budget, max_bytes=None)
    tombstones = [layout.index_record_id(key) for key, _ in entries]
    return tombstones, tombstones[-1] if more else None


def _key_page(
    snapshot: plyvel.Snapshot,
    start: bytes,
    stop: bytes,
    *,
    reverse: bool,
    limit: int,
    max_bytes: int | None = PAGE_BYTES,
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """A page of the entries in [start, stop) taken as they are (no filter): at most `limit`,
    ending early once their values add up to `max_bytes`; and whether more lie beyond, so the
    next page starts past the last key taken."""
    taken: list[tuple[bytes, bytes]] = []
    page_bytes = 0
    with _entries(snapshot, start, stop, reverse=reverse) as entries:
        for key, value in entries:
            if len(taken) == limit or (max_bytes is not None and page_bytes >= max_bytes):
                return taken, True
            taken.append((key, value))
            page_bytes += len(value)
    return taken, False


def _rank(value: Any, descending: bool, record_id: str) -> _Rank:
    if type(value) not in (int, float):
        return (1, 0, record_id)
    return (0, -value if descending else value, record_id)


def _sort_cursor(rank: _Rank) -> str:
    """A sorted read's cursor: the last record's id and its value (repr round-trips floats)."""
    missing, signed, record_id = rank
    return f"{record_id}:" if missing else f"{record_id}:{signed!r}"


_SORT_CURSOR = re.compile(r"([0-9a-f]{20}):(?:(-?[0-9]+)|(-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?))?")


def _parse_sort_cursor(cursor: str) -> _Rank:
    match = _SORT_CURSOR.fullmatch(cursor)
    if match is None:
        raise PerfdbError(ErrorCode.BAD_REQUEST, "cursor: not a cursor this server returned for a sorted read")
    record_id, whole, fractional = match.groups()
    if whole is not None:
        return (0, int(whole), record_id)
    if fractional is not None:
        return (0, float(fractional), record_id)
    return (1, 0, record_id)


_RECORD_ID_FIELD = b'{"record_id":"'  # how every stored record's JSON begins (see writer._record_document)


def _document_record_id(document: bytes | memoryview) -> str:
    head = bytes(document[: len(_RECORD_ID_FIELD) + RECORD_ID_CHARS])
    if head.startswith(_RECORD_ID_FIELD):
        return head[len(_RECORD_ID_FIELD) :].decode()
    record_id: str = orjson.loads(document)["record_id"]
    return record_id


def _of_commit(stored: bytes | memoryview, commit: str) -> dict[str, Any] | None:
    """The record's document if its source.commit starts with `commit`, else None. The raw JSON is
    searched first, so that a walk over many records decodes only the likely ones."""
    raw = stored if isinstance(stored, bytes) else bytes(stored)  # a memoryview has no substring search
    if b'"commit":"' + commit.encode() not in raw:
        return None
    document: dict[str, Any] = orjson.loads(raw)
    source = document.get("source")
    found = source.get("commit") if isinstance(source, dict) else None
    return document if isinstance(found, str) and found.startswith(commit) else None


def _samples_json(source: Any, record_id: str) -> memoryview | None:
    """A record's samples as stored JSON, or None if it has none or they are damaged (logged);
    `source`: the database or a snapshot."""
    stored = source.get(layout.samples_key(record_id))
    if stored is None:
        return None
    try:
        return layout.unseal(stored)
    except layout.CorruptValueError as exc:
        log.error("samples of record %s are damaged (%s); left out", record_id, exc)
        return None


def _stored_samples(snapshot: plyvel.Snapshot, record_id: str) -> dict[str, Any] | None:
    """A record's samples (series name -> values), or None if it has none."""
    stored = _samples_json(snapshot, record_id)
    samples = None if stored is None else orjson.loads(stored)
    return samples if isinstance(samples, dict) else None


def _with_samples(document: bytes | memoryview, record_id: str, source: Any) -> bytes | memoryview:
    """A record's JSON with `"samples"` added when it has any (`source`: the database or a snapshot)."""
    samples = _samples_json(source, record_id)
    if samples is None:
        return document
    return bytes(document[:-1]) + b',"samples":' + bytes(samples) + b"}"


def with_exclusion(document: bytes | memoryview, exclusion: dict[str, Any]) -> bytes:
    """A stored record's JSON as reads show an excluded record: with `"excluded": true` and the note."""
    fields = orjson.loads(document)
    fields["excluded"] = True
    fields["exclusion"] = exclusion
    return orjson.dumps(fields)
