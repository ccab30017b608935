"""The group-commit writer: one thread turns every pending submission into one durable WriteBatch.

Being the only writer makes it the point where order is decided: it assigns record ids and
timestamps, checks idempotency keys and compares profiles without races, and acknowledges a
submission only after the batch that holds it has been written (fsync'd unless sync is off).
With regression detection on, a second thread judges each written batch's records (in commit
order, before their acks) while the writer goes on to the next batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import plyvel

from perfdb.protocol.errors import ErrorCode, PerfdbError
from perfdb.records.profiles import Profile
from perfdb.records.record_ids import RecordIdClock
from perfdb.records.schema import ImportedRecord, RecordDraft
from perfdb.records.timestamps import format_micros
from perfdb.storage import layout
from perfdb.storage.detection import RegressionDetector
from perfdb.storage.overview import Overview

log = logging.getLogger("perfdb.storage")

# Keys past every key perfdb writes: compacting this empty range only renews the log.
_HEAL_RANGE_START = b"\xfe"
_HEAL_RANGE_STOP = b"\xfe\x00"
_ROOM_TO_REOPEN = 4 * 1024 * 1024  # free bytes below which reopening would fail anyway

# Profiles kept in memory to skip re-reading ones that did not change; past this many the
# cache is emptied and refills from the database as users come back.
_MAX_CACHED_PROFILES = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class RecordAck:
    """What the client is told once its record is durable."""

    record_id: str
    user_id: str
    timestamp: str
    duplicate: bool
    # One Verdict.to_json() per metric, judged once the record was durable; empty for a duplicate resend
    # (its verdicts went to the first send) and when detection is off.
    verdicts: tuple[dict[str, object], ...] = ()

    def to_fields(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "user_id": self.user_id,
            "timestamp": self.timestamp,
            "duplicate": self.duplicate,
            "verdicts": self.verdicts,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ImportAck:
    """What an import of a batch of restored records did."""

    imported: int
    duplicates: int
    stored_ids: frozenset[str] = frozenset()  # the records this import stored (not sent to the client)

    def to_fields(self) -> dict[str, Any]:
        return {"imported": self.imported, "duplicates": self.duplicates}


@dataclasses.dataclass(slots=True)
class Submission:
    """A new record from a client."""

    profile: Profile
    draft: RecordDraft
    future: asyncio.Future[Any]


@dataclasses.dataclass(slots=True)
class Restoration:
    """Records restored from an export, keeping their ids, timestamps and users."""

    records: list[ImportedRecord]
    profiles: dict[str, Profile]
    future: asyncio.Future[Any]


Outcome = tuple[asyncio.Future[Any], RecordAck | ImportAck | PerfdbError]


class _Batch:
    """One write batch being built, with the state it will change staged beside it."""

    def __init__(self, writer: GroupCommitWriter) -> None:
        self.writer = writer
        self.db = writer._db
        self.batch = writer._db.write_batch(sync=writer._sync)
        self.requests: dict[bytes, RecordAck] = {}
        self.records: set[str] = set()  # ids of the records staged in this batch
        self.profiles: dict[str, bytes] = {}
        self.new_users = 0
        self.new_records = 0
        self.write_seconds = 0.0  # LevelDB's write of the batch, fsync included
        self.counts: dict[bytes, int] = {}  # count key -> records this batch adds to it
        self.overview_rows: list[tuple[str, str, dict[str, int | float]]] = []

    def earlier_request(self, request_key: bytes, user_id: str) -> RecordAck | None:
        return self.requests.get(request_key) or _stored_ack(self.db.get(request_key), user_id, request_key)

    def add_record(
        self,
        record_id: str,
        user_id: str,
        timestamp: str,
        draft: RecordDraft,
        document: bytes,
        *,
        request_checked: bool,
    ) -> RecordAck:
        """Stage a record whose stored JSON is `document` (see _record_document).

        request_checked: the caller already found no earlier record with this request_id.
        """
        key = layout.record_key(record_id, user_id)
        self.batch.put(key, layout.seal(document))
        for index_key, index_value in layout.record_index_entries(record_id, user_id, draft.test_name, draft.tag):
            self.batch.put(index_key, index_value)
        for count_key in layout.record_counts(user_id, draft.test_name, draft.tag):
            self.counts[count_key] = self.counts.get(count_key, 0) + 1
        self.overview_rows.append((draft.test_name, user_id, draft.metrics))
        self.records.add(record_id)
        ack = RecordAck(record_id, user_id, timestamp, duplicate=False)
        if draft.request_id is not None:
            request_key = layout.idempotency_key(user_id, draft.request_id)
            if request_checked or self.earlier_request(request_key, user_id) is None:
                self.batch.put(request_key, orjson.dumps({"record_id": record_id, "timestamp": timestamp}))
                self.requests[request_key] = ack
        self.new_records += 1
        return ack

    def has_record(self, record_id: str) -> bool:
        """Whether a record with this id exists, whoever it belongs to."""
        if record_id in self.records:
            return True
        with self.db.iterator(prefix=layout.RECORD_PREFIX + record_id.encode(), include_value=False) as keys:
            return next(keys, None) is not None

    def add_profile(self, profile: Profile, *, replace: bool = True) -> None:
        """Write the profile when it is new, or changed and `replace` allows it."""
        user_id = profile.user_id
        known = self.profiles.get(user_id) or self.writer._profiles.get(user_id)
        if known == profile.stored:
            return
        if known is None:
            known = self.db.get(layout.profile_key(user_id))
            if known is None:
                self.new_users += 1
        if known is None or (replace and known != profile.stored):
            self.batch.put(layout.profile_key(user_id), profile.stored)
            self.profiles[user_id] = profile.stored
        else:
            self.profiles[user_id] = known

    def commit(self) -> None:
        writer = self.writer
        if self.new_records:
            self.batch.put(layout.RECORD_COUNT_KEY, str(writer.record_count + self.new_records).encode())
        if self.new_users:
            self.batch.put(layout.USER_COUNT_KEY, str(writer.user_count + self.new_users).encode())
        # The writer is the only one to change counts, so what the database holds is current.
        for count_key, added in self.counts.items():
            self.batch.put(count_key, str(layout.read_count(self.db.get(count_key)) + added).encode())
        if writer.write_batch_hook is not None:
            writer.write_batch_hook()
        started = time.perf_counter()
        self.batch.write()
        self.write_seconds = time.perf_counter() - started
        writer.overview.add(self.overview_rows)
        writer.record_count += self.new_records
        writer.user_count += self.new_users
        if len(writer._profiles) + len(self.profiles) > _MAX_CACHED_PROFILES:
            writer._profiles.clear()
        writer._profiles.update(self.profiles)
        writer.batches += 1
        writer.batched_records += self.new_records


class GroupCommitWriter:
    """Owns all writes to the database; see the module docstring."""

    _STOP = object()
    _HEAL = object()  # retry renewing the log after a failed write, with nothing to write

    def __init__(
        self,
        db: plyvel.DB,
        loop: asyncio.AbstractEventLoop,
        *,
        directory: Path,
        reopen: Callable[[], plyvel.DB],
        sync: bool,
        max_batch: int,
        record_count: int,
        user_count: int,
        last_record_id: str | None,
        overview: Overview,
        detector: RegressionDetector,
    ) -> None:
        self._db = db
        self.detector = detector  # judges each new record once its batch is durable
        self.overview = overview  # brought up to date after each committed batch
        self._directory = directory
        self._reopen = reopen
        self._needs_heal = False  # a write failed: LevelDB's log may hold a torn record
        self._loop = loop
        self._sync = sync
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._clock = RecordIdClock(last_record_id)
        self._profiles: dict[str, bytes] = {}
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="perfdb-writer", daemon=True)
        # Durable batches waiting for their verdicts; one thread judges them in commit order.
        self._verdict_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._verdict_thread = threading.Thread(target=self._run_verdicts, name="perfdb-verdicts", daemon=True)
        # Read by stats from the event loop; plain ints, written only by the writer thread.
        self.record_count = record_count
        self.user_count = user_count
        self.batches = 0
        self.batched_records = 0
        self.failed_batches = 0
        self.reopens = 0
        self._heal_requested = False
        # Test seam: replaces the batch write to inject storage faults.
        self.write_batch_hook: Callable[[], None] | None = None
        # Told (records taken in, seconds LevelDB took to write them) after each committed
        # batch, on the writer thread; the server's metrics set it.
        self.commit_observer: Callable[[int, float], None] | None = None

    @property
    def queue_depth(self) -> int:
        """Submissions waiting for the writer thread."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """False from a failed write until LevelDB accepts writes again."""
        return not self._needs_heal

    def request_heal(self) -> None:
        """After a failed write, have the writer retry renewing LevelDB's log even if no write
        comes (a server reported unready gets none). Without a failure, does nothing."""
        if self._needs_heal and not self._heal_requested and self._accepting:
            self._heal_requested = True
            self._queue.put(self._HEAL)

    def start(self) -> None:
        self._thread.start()
        self._verdict_thread.start()

    def submit(self, profile: Profile, draft: RecordDraft) -> asyncio.Future[RecordAck]:
        """Queue a record; the future resolves once it is durable (or fails with PerfdbError)."""
        future: asyncio.Future[RecordAck] = self._loop.create_future()
        self._enqueue(Submission(profile, draft, future))
        return future

    def restore(self, records: list[ImportedRecord], profiles: dict[str, Profile]) -> asyncio.Future[ImportAck]:
        """Queue restored records; records already present are counted as duplicates, not rewritten."""
        future: asyncio.Future[ImportAck] = self._loop.create_future()
        self._enqueue(Restoration(records, profiles, future))
        return future

    def _enqueue(self, item: Submission | Restoration) -> None:
        if not self._accepting:
            raise PerfdbError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        self._queue.put(item)

    def stop(self) -> None:
        """Commit what is queued, then end the thread. Blocks: call it off the event loop."""
        self._accepting = False
        self._queue.put(self._STOP)
        self._thread.join()
        self._verdict_queue.put(self._STOP)  # after the writer's last batch
        self._verdict_thread.join()

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is self._STOP:
                break
            if first is self._HEAL:
                self._retry_heal()
                continue
            batch = [first]
            records = _record_count(first)
            while records < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is self._STOP:
                    stopping = True
                    break
                if item is self._HEAL:
                    continue  # committing the batch heals first anyway
                batch.append(item)
                records += _record_count(item)
            self._commit(batch)
        self._refuse_leftovers()

    def _refuse_leftovers(self) -> None:
        """Answer anything that slipped in behind the stop marker, so no future is left hanging."""
        leftovers: list[Outcome] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not self._STOP and item is not self._HEAL:
                leftovers.append((item.future, PerfdbError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")))
        if leftovers:
            self._loop.call_soon_threadsafe(_settle, leftovers)

    def _commit(self, items: list[Submission | Restoration]) -> None:
        outcomes: list[Outcome]
        write_seconds: float | None = None
        try:
            if self._needs_heal:
                self._heal()
            outcomes, write_seconds = self._write(items)
        except Exception as exc:  # any failure of the batch fails every submission in it
            self.failed_batches += 1
            self._needs_heal = True
            log.error("write batch of %d submissions failed: %s", len(items), exc)
            error = PerfdbError(ErrorCode.STORAGE_ERROR, "the database could not store the record; retry later")
            outcomes = [(item.future, error) for item in items]
        if write_seconds is not None and self.detector.enabled:
            # Judged on the verdict thread while this one writes the next batch (the fsync frees the GIL).
            self._verdict_queue.put((items, outcomes))
        else:
            self._loop.call_soon_threadsafe(_settle, outcomes)
        if write_seconds is not None and self.commit_observer is not None:
            self.commit_observer(sum(map(_record_count, items)), write_seconds)

    def _run_verdicts(self) -> None:
        """The verdict thread: judges each durable batch in commit order, then hands out its outcomes."""
        while True:
            work = self._verdict_queue.get()
            if work is self._STOP:
                return
            items, outcomes = work
            self._loop.call_soon_threadsafe(_settle, self._judge(items, outcomes))

    def _retry_heal(self) -> None:
        self._heal_requested = False
        if not self._needs_heal:
            return
        try:
            self._heal()
        except Exception as exc:
            log.warning("database still refuses writes: %s", exc)

    def _heal(self) -> None:
        """Make LevelDB start a fresh log before writing again (raises while it cannot).

        A failed append can leave a torn record in the log, and at the next recovery LevelDB
        drops every record after it in that log: later acknowledged writes would be lost.
        Compacting an empty key range makes LevelDB flush its memtable and switch logs, with
        reads carrying on. A failed flush makes LevelDB refuse every later write on this
        handle; once there is room again, the database is reopened to clear that.
        """
        try:
            self._db.compact_range(start=_HEAL_RANGE_START, stop=_HEAL_RANGE_STOP)
            # The flush runs in LevelDB's background thread and reports no error here: a
            # durable probe write shows whether LevelDB is healthy again.
            self._db.put(layout.HEAL_PROBE_KEY, b"", sync=True)
        except (plyvel.Error, RuntimeError):  # RuntimeError: a reopen failed and left it closed
            if not self._has_room():
                raise
            self._db = self._reopen()
            self.reopens += 1
            # Recovery may have replayed a batch whose write reported failure: count afresh.
            self.record_count = int(self._db.get(layout.RECORD_COUNT_KEY, b"0"))
            self.user_count = int(self._db.get(layout.USER_COUNT_KEY, b"0"))
        self._needs_heal = False
        log.warning("database log renewed after a failed write; writes resume")

    def _has_room(self) -> bool:
        try:
            stats = os.statvfs(self._directory)
        except OSError:
            return False
        return stats.f_bavail * stats.f_frsize >= _ROOM_TO_REOPEN

    def _write(self, items: list[Submission | Restoration]) -> tuple[list[Outcome], float]:
        """Stage and commit the batch; its outcomes and the seconds LevelDB took to write it."""
        batch = _Batch(self)
        outcomes: list[Outcome] = []
        for item in items:
            if isinstance(item, Submission):
                outcomes.append((item.future, self._add_submission(batch, item)))
            else:
                outcomes.append((item.future, self._add_restoration(batch, item)))
        batch.commit()
        return outcomes, batch.write_seconds

    def _judge(self, items: list[Submission | Restoration], outcomes: list[Outcome]) -> list[Outcome]:
        """The committed records join the verdict windows; new submissions get their verdicts, each judged
        against its window before it joined, in commit order."""
        detector = self.detector
        if not detector.enabled:
            return outcomes
        judged: list[Outcome] = []
        for item, (future, outcome) in zip(items, outcomes, strict=True):
            if isinstance(item, Submission):
                if isinstance(outcome, RecordAck) and not outcome.duplicate:
                    draft = item.draft
                    try:
                        verdicts = detector.judge_and_join(
                            outcome.user_id, outcome.record_id, draft.test_name, draft.tag, draft.metrics,
                            better=draft.better, baseline_tag=draft.baseline_tag,
                        )  # fmt: skip
                    except Exception:  # the record is durable: a failed verdict must not fail its ack
                        log.exception("verdicts of record %s failed", outcome.record_id)
                        verdicts = []
                    outcome = dataclasses.replace(outcome, verdicts=tuple(verdicts))
            elif isinstance(outcome, ImportAck):
                for record in item.records:
                    if record.record_id in outcome.stored_ids:
                        draft = record.draft
                        try:
                            detector.join(record.user_id, record.record_id, draft.test_name, draft.tag, draft.metrics)
                        except Exception:
                            log.exception("record %s did not join its verdict windows", record.record_id)
            judged.append((future, outcome))
        detector.batch_committed()
        return judged

    def _add_submission(self, batch: _Batch, submission: Submission) -> RecordAck | PerfdbError:
        profile, draft = submission.profile, submission.draft
        if draft.request_id is not None:
            earlier = batch.earlier_request(layout.idempotency_key(profile.user_id, draft.request_id), profile.user_id)
            if earlier is not None:
                return dataclasses.replace(earlier, duplicate=True, verdicts=())
        record_id, micros = self._clock.next()
        timestamp = format_micros(micros)
        try:
            document = _record_document(record_id, profile.user_id, timestamp, draft)
        except orjson.JSONEncodeError as exc:
            # Only this record fails, not the batch it shares with others.
            return PerfdbError(ErrorCode.BAD_REQUEST, f"the record cannot be stored as JSON ({exc})")
        ack = batch.add_record(record_id, profile.user_id, timestamp, draft, document, request_checked=True)
        batch.add_profile(profile)
        return ack

    def _add_restoration(self, batch: _Batch, restoration: Restoration) -> ImportAck | PerfdbError:
        """All of a restoration's new records go into the batch, or none of them do."""
        staged: list[tuple[ImportedRecord, bytes]] = []
        staged_ids: set[str] = set()
        duplicates = 0
        for record in restoration.records:
            if record.record_id in staged_ids or batch.has_record(record.record_id):
                duplicates += 1
                continue
            staged_ids.add(record.record_id)
            try:
                document = _record_document(record.record_id, record.user_id, record.timestamp, record.draft)
            except orjson.JSONEncodeError as exc:
                return PerfdbError(ErrorCode.BAD_REQUEST, f"record {record.record_id} cannot be stored as JSON ({exc})")
            staged.append((record, document))
        for record, document in staged:
            self._clock.advance_past(record.record_id)
            batch.add_record(
                record.record_id, record.user_id, record.timestamp, record.draft, document, request_checked=False
            )
            # A restored profile never replaces the newer one a user's own submissions wrote.
            batch.add_profile(restoration.profiles[record.user_id], replace=False)
        return ImportAck(len(staged), duplicates, frozenset(record.record_id for record, _ in staged))


def _record_document(record_id: str, user_id: str, timestamp: str, draft: RecordDraft) -> bytes:
    document: dict[str, Any] = {
        "record_id": record_id,
        "user_id": user_id,
        "timestamp": timestamp,
        "test_name": draft.test_name,
        "tag": draft.tag,
        "sys_info": draft.sys_info,
        "metrics": draft.metrics,
        "client_config": draft.client_config,
        "server_config": draft.server_config,
    }
    if draft.request_id is not None:
        document["request_id"] = draft.request_id
    if draft.scenario is not None:
        document["scenario"] = draft.scenario
    if draft.better is not None:
        document["better"] = draft.better
    return orjson.dumps(document)


def _stored_ack(value: bytes | None, user_id: str, request_key: bytes) -> RecordAck | None:
    if value is None:
        return None
    try:
        document = orjson.loads(value)
        record_id, timestamp = document["record_id"], document["timestamp"]
        if not (isinstance(record_id, str) and isinstance(timestamp, str)):
            raise TypeError("not strings")
        return RecordAck(record_id, user_id, timestamp, duplicate=True)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        # Damaged: treat the request as new (its entry is rewritten) rather than fail the batch.
        log.error("idempotency entry %r is damaged; treating the request as new", request_key[:80])
        return None


def _record_count(item: Submission | Restoration) -> int:
    return 1 if isinstance(item, Submission) else len(item.records)


def _settle(outcomes: list[Outcome]) -> None:
    """Runs on the event loop: hand each submitter its outcome."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, PerfdbError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
