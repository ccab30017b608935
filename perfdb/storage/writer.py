"""The group-commit writer: one thread turns every pending submission into one durable WriteBatch.

Being the only writer makes it the point where order is decided: it assigns record ids and
timestamps, checks idempotency keys and compares profiles without races, and acknowledges a
submission only after the batch that holds it has been written (fsync'd unless sync is off).
Deletions go the same way: each removes a record with every index entry and count derived from
it (layout.record_keys, layout.record_counts), leaves a tombstone and writes an audit entry in one
batch, and marks the tests it removed records from as stale in the overview (see overview.py); a
user's records go a chunk per batch, so no batch grows without bound and other writes are
committed between the chunks.
With regression detection on, a second thread judges each written batch's records (in commit
order, before their acks) while the writer goes on to the next batch, and hands the verdicts back
as one write item (StoredVerdicts) that rides along with the next batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson
import plyvel

from perfdb.protocol.errors import ErrorCode, PerfdbError
from perfdb.records.profiles import Profile
from perfdb.records.record_ids import SEQUENCE_LIMIT, RecordIdClock, make_record_id
from perfdb.records.schema import ImportedRecord, RecordDraft
from perfdb.records.timestamps import format_micros, now_micros, parse_rfc3339
from perfdb.storage import layout
from perfdb.storage.detection import CommittedRecord, RegressionDetector, StoredVerdicts
from perfdb.storage.known_requests import KnownRequests
from perfdb.storage.overview import Overview, Row

log = logging.getLogger("perfdb.storage")

# Keys past every key perfdb writes: compacting this empty range only renews the log.
_HEAL_RANGE_START = b"\xfe"
_HEAL_RANGE_STOP = b"\xfe\x00"
_ROOM_TO_REOPEN = 4 * 1024 * 1024  # free bytes below which reopening would fail anyway

# Profiles kept in memory to skip re-reading ones that did not change; past this many the
# cache is emptied and refills from the database as users come back.
_MAX_CACHED_PROFILES = 100_000

# A record that ran longer ago than this is filed at its run_time (see GroupCommitWriter._place);
# one that ran more recently, at its commit time, so that live submissions keep commit order.
RUN_TIME_SLACK_MICROS = 60 * 1_000_000

# Records a delete_user removes per write batch (fewer if --max-batch-records is smaller): a
# chunk of 1000 commits in milliseconds, so writes queued behind it wait no longer than that.
USER_DELETION_CHUNK = 1000
# A chunk also ends once the records it read add up to this many bytes, so that a user with
# large records (up to some 200 KiB each) does not hold hundreds of MiB in the writer.
USER_DELETION_BYTES = 8 * 1024 * 1024


class Settleable(Protocol):
    """What a write item's outcome is handed to, on the event loop: an asyncio future, or
    anything with the same three methods (the dispatcher's pending record replies)."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclasses.dataclass(slots=True)
class RecordAck:
    """What the client is told once its record is durable. Never changed once made; not frozen, as a
    frozen dataclass's __init__ (a setattr through object per field) was 4% of the writer's samples."""

    record_id: str
    user_id: str
    timestamp: str
    duplicate: bool
    # The JSON array of one Verdict.to_json() per metric, judged once the record was durable, encoded once for
    # the reply and the stored verdicts; empty for a duplicate resend (its verdicts went to the first send) or a
    # failed judgement; None (no member in the reply) when detection is off.
    verdicts: orjson.Fragment | tuple[()] | None = None

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "record_id": self.record_id,
            "user_id": self.user_id,
            "timestamp": self.timestamp,
            "duplicate": self.duplicate,
        }
        if self.verdicts is not None:
            fields["verdicts"] = self.verdicts
        return fields


@dataclasses.dataclass(frozen=True, slots=True)
class ImportAck:
    """What an import of a batch of restored records did."""

    imported: int
    duplicates: int
    tombstoned: int = 0  # records not written because their id was deleted here before
    removed: int = 0  # stored records removed by the import's tombstones
    stored_ids: frozenset[str] = frozenset()  # the records this import stored (not sent to the client)
    # (user id, record id) of the records its tombstones removed (not sent: detection forgets them by owner)
    removed_records: tuple[tuple[str, str], ...] = ()

    def to_fields(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "duplicates": self.duplicates,
            "tombstoned": self.tombstoned,
            "removed": self.removed,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class RecordDeletionAck:
    """What a delete_record did: removed the record now, or found it already deleted."""

    record_id: str
    deleted: bool
    user_id: str | None = None  # whose record was removed now (not sent: detection forgets it by owner)

    def to_fields(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "deleted": self.deleted}


@dataclasses.dataclass(frozen=True, slots=True)
class UserDeletionAck:
    """What a delete_user removed: `records` of the user's records, and whether anything at all."""

    user_id: str
    deleted: bool
    records: int

    def to_fields(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "deleted": self.deleted, "records": self.records}


@dataclasses.dataclass(slots=True)
class Submission:
    """A new record from a client."""

    profile: Profile
    draft: RecordDraft
    future: Settleable


@dataclasses.dataclass(slots=True)
class BatchSubmission:
    """A client's record_batch: its records, stored in one write batch (never split)."""

    profile: Profile
    drafts: list[RecordDraft]
    future: asyncio.Future[Any]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchAck:
    """Each record of a record_batch: its ack, or the error that refused it alone."""

    outcomes: tuple[RecordAck | PerfdbError, ...]


@dataclasses.dataclass(slots=True)
class Restoration:
    """Records restored from an export, keeping their ids, timestamps and users."""

    records: list[ImportedRecord]
    profiles: dict[str, Profile]
    future: asyncio.Future[Any]
    tombstones: list[str] = dataclasses.field(default_factory=list)  # ids deleted where the export came from
    force: bool = False  # store records even where a tombstone says they were deleted


@dataclasses.dataclass(slots=True)
class RecordRemoval:
    """A delete_record, by the record's owner (owner = their user id) or the admin (owner None)."""

    record_id: str
    owner: str | None
    future: asyncio.Future[Any]


@dataclasses.dataclass(slots=True)
class UserRemoval:
    """A delete_user; it goes through the writer a chunk at a time and keeps its progress here."""

    user_id: str
    future: asyncio.Future[Any]
    audit_id: str | None = None  # its audit entry, rewritten with the progress by every chunk
    started: str = ""  # the time of the first chunk that removed something
    removed: int = 0  # records removed so far
    profile_removed: bool = False
    # Where the next chunk starts in the user index (then the idempotency entries): just after the
    # last key earlier chunks reached, not at the prefix, where it would step over every key
    # deleted so far (LevelDB keeps deleted keys until compaction: O(N^2) for the deletion).
    index_resume: bytes | None = None
    requests_resume: bytes | None = None

    def index_key_added(self, key: bytes) -> None:
        """A record of the user was stored meanwhile (an import may give it an older id than the
        chunks reached): the next chunk starts at it, so it goes too."""
        if self.index_resume is not None and key < self.index_resume:
            self.index_resume = key


WriteItem = Submission | BatchSubmission | Restoration | RecordRemoval | UserRemoval | StoredVerdicts
AnsweredItem = Submission | BatchSubmission | Restoration | RecordRemoval | UserRemoval
Ack = RecordAck | BatchAck | ImportAck | RecordDeletionAck | UserDeletionAck
Outcome = tuple[Settleable, Ack | PerfdbError]
_DAMAGED: dict[str, Any] = {}  # stands for a stored record whose checksum fails


class _Batch:
    """One write batch being built, with the state it will change staged beside it."""

    def __init__(self, writer: GroupCommitWriter, *, sync: bool) -> None:
        self.writer = writer
        self.db = writer._db
        self.batch = writer._db.write_batch(sync=sync)
        self.requests: dict[bytes, RecordAck] = {}  # idempotency key -> ack, for the keys put in this batch
        self.absent: set[bytes] = set()  # idempotency keys certainly not stored before this batch
        self.staged: dict[str, dict[str, Any]] = {}  # record id -> document, for records put in this batch
        self.deleted: set[str] = set()  # ids of the records this batch deletes (and does not put again)
        self.tombstones: dict[str, bytes | None] = {}  # record id -> tombstone put (its value) or deleted (None) here
        self.profiles: dict[str, bytes] = {}
        self.deleted_profiles: set[str] = set()
        self.new_users = 0
        self.new_records = 0
        self.removed_users = 0
        self.removed_records = 0
        self.write_seconds = 0.0  # LevelDB's write of the batch, fsync included
        self.counts: dict[bytes, int] = {}  # count key -> records this batch adds to it (or takes away)
        # (user id, test name, tag) -> records put here under those names, not yet in counts: many records
        # share their names, so their count keys are made once a batch (see _count_added).
        self.added_names: dict[tuple[str, str, str], int] = {}
        self.count_bases: dict[bytes, int] = {}  # count key -> its value before counts, if not the stored one
        self.overview_rows: list[Row] = []
        # The commit time of the records this batch adds: their ids take it with their own sequence numbers.
        self.now = now_micros()
        self._timestamps: dict[int, str] = {}  # commit time (microseconds) -> its RFC 3339 form
        self.overview_removed: set[str] = set()  # tests this batch removes records from
        # Whether it changes an index other than by appending to it: a removal, or a record filed
        # before the newest (see GroupCommitWriter.history_observer).
        self.rewrites_history = False

    def timestamp(self, micros: int) -> str:
        """A record's commit time in RFC 3339, formatted once a batch."""
        formatted = self._timestamps.get(micros)
        if formatted is None:
            formatted = self._timestamps[micros] = format_micros(micros)
        return formatted

    def earlier_request(self, request_key: bytes, user_id: str) -> RecordAck | None:
        earlier = self.requests.get(request_key)
        if earlier is not None or request_key in self.absent:
            return earlier  # the database is read only for a request_id it may hold
        return _stored_ack(self.db.get(request_key), user_id, request_key)

    def add_record(
        self,
        record_id: str,
        user_id: str,
        timestamp: str,
        draft: RecordDraft,
        record: tuple[dict[str, Any], bytes],
        *,
        request_key: bytes | None,
        request_checked: bool,
    ) -> RecordAck:
        """Stage a record: its document and that document's JSON (see _record_document).

        request_key: its idempotency key (None: it has no request_id); request_checked: the caller
        already found no earlier record with this request_id.
        """
        document, encoded = record
        put = self.batch.put
        put(layout.record_key(record_id, user_id), layout.seal(encoded))
        if draft.samples is not None:
            put(layout.samples_key(record_id), layout.seal(orjson.dumps(draft.samples)))
        test_name, tag = draft.test_name, draft.tag
        for index_key, index_value in layout.record_index_entries(record_id, user_id, test_name, tag, draft.metrics):
            put(index_key, index_value)
        names = (user_id, test_name, tag)
        self.added_names[names] = self.added_names.get(names, 0) + 1
        if self.writer._user_removals:
            removal = self.writer._user_removals.get(user_id)
            if removal is not None:
                removal.index_key_added(layout.user_index_prefix(user_id) + record_id.encode())
        self.overview_rows.append((test_name, user_id, draft.metrics))
        self.staged[record_id] = document
        if self.deleted:
            self.deleted.discard(record_id)
        ack = RecordAck(record_id, user_id, timestamp, duplicate=False)
        if request_key is not None and (request_checked or self.earlier_request(request_key, user_id) is None):
            put(request_key, orjson.dumps({"record_id": record_id, "timestamp": timestamp}))
            self.requests[request_key] = ack
        self.new_records += 1
        return ack

    def has_record(self, record_id: str) -> bool:
        """Whether a record with this id exists, whoever it belongs to, as this batch leaves it."""
        if record_id in self.staged:
            return True
        if record_id in self.deleted:
            return False
        with self.db.iterator(prefix=layout.RECORD_PREFIX + record_id.encode(), include_value=False) as keys:
            return next(keys, None) is not None

    def find_record(self, record_id: str) -> tuple[str, dict[str, Any]] | None:
        """(user id, stored document) of the record with this id, as this batch leaves it, or None.
        The document is _DAMAGED when its checksum fails."""
        staged = self.staged.get(record_id)
        if staged is not None:
            return staged["user_id"], staged
        if record_id in self.deleted:
            return None
        with self.db.iterator(prefix=layout.RECORD_PREFIX + record_id.encode()) as entries:
            entry = next(entries, None)
        if entry is None:
            return None
        key, value = entry
        return layout.split_record_key(key)[1], _stored_document(key, value)

    def tombstone(self, record_id: str) -> bytes | None:
        """The record's tombstone as this batch leaves it, or None."""
        if record_id in self.tombstones:
            return self.tombstones[record_id]
        value: bytes | None = self.db.get(layout.tombstone_key(record_id))
        return value

    def is_tombstoned(self, record_id: str) -> bool:
        return self.tombstone(record_id) is not None

    def put_tombstone(self, record_id: str, deleted_at: str, owner: str | None) -> None:
        value = layout.tombstone_value(deleted_at, owner)
        self.batch.put(layout.tombstone_key(record_id), value)
        self.tombstones[record_id] = value

    def delete_tombstone(self, record_id: str) -> None:
        self.batch.delete(layout.tombstone_key(record_id))
        self.tombstones[record_id] = None

    def remove_record(self, record_id: str, user_id: str, document: dict[str, Any], deleted_at: str) -> None:
        """Stage the removal of a record with every key derived from it, taking it from every
        count it added to, its idempotency entry if that names it, and put its tombstone."""
        fields = _filter_fields(document) or self._indexed_fields(record_id, user_id)
        if fields is None:
            # Neither the record nor its user-index entry says its test and tag: remove what its
            # id and user give; perfdb repair rebuilds the test and tag indexes and counts.
            log.warning("record %s is damaged; removing it by its id", record_id)
            for key in layout.record_keys_by_id(record_id, user_id):
                self.batch.delete(key)
            self._count([layout.user_count_key(user_id)], -1)
        else:
            test_name, tag = fields
            # A damaged document cannot say its metric values: those entries stay until perfdb
            # repair rebuilds the metric indexes (reads skip an entry whose record is gone).
            for key in layout.record_keys(record_id, user_id, test_name, tag, document.get("metrics")):
                self.batch.delete(key)
            self._count(layout.record_counts(user_id, test_name, tag), -1)
            self.overview_removed.add(test_name)
        request_id = document.get("request_id")
        if isinstance(request_id, str):
            # The request_id is forgotten with the record, unless it names another record.
            request_key = layout.idempotency_key(user_id, request_id)
            earlier = self.earlier_request(request_key, user_id)
            if earlier is not None and earlier.record_id == record_id:
                self.batch.delete(request_key)
                self.requests.pop(request_key, None)
        self.put_tombstone(record_id, deleted_at, user_id)
        self.staged.pop(record_id, None)
        self.deleted.add(record_id)
        self.removed_records += 1
        self.rewrites_history = True

    def add_verdicts(self, stored: StoredVerdicts) -> None:
        """Store judged records' verdicts, each only if its record is still there (a deletion committed
        since would leave them behind; one later in this batch deletes them after this put). The records
        are looked up only if some were removed since they were committed."""
        removed_since = stored.removals_seen != self.writer.removals_committed
        for record_id, user_id, value in stored.entries:
            if record_id in self.deleted:
                continue
            if (
                not removed_since
                or record_id in self.staged
                or self.db.get(layout.record_key(record_id, user_id)) is not None
            ):
                self.batch.put(layout.verdicts_key(record_id), value)

    def _indexed_fields(self, record_id: str, user_id: str) -> tuple[str, str] | None:
        """(test_name, tag) of a record as its user-index entry has them, or None."""
        value = self.db.get(layout.user_index_prefix(user_id) + record_id.encode())
        try:
            _, test_name, tag = layout.index_fields(layout.user_index_prefix(user_id), value or b"")
        except (ValueError, TypeError):  # orjson's decode error is a ValueError
            return None
        return (test_name, tag) if isinstance(test_name, str) and isinstance(tag, str) else None

    def _count(self, count_keys: list[bytes], change: int) -> None:
        for count_key in count_keys:
            self.counts[count_key] = self.counts.get(count_key, 0) + change

    def _count_added(self) -> None:
        for (user_id, test_name, tag), records in self.added_names.items():
            self._count(layout.record_counts(user_id, test_name, tag), records)
        self.added_names.clear()

    def clear_count(self, count_key: bytes) -> None:
        """Count from zero under this key: whatever the database holds there is gone."""
        self._count_added()  # records added before this point count in what is cleared
        self.count_bases[count_key] = 0
        self.counts[count_key] = 0

    def profile_exists(self, user_id: str) -> bool:
        if user_id in self.profiles:
            return True
        if user_id in self.deleted_profiles:
            return False
        return user_id in self.writer._profiles or self.db.get(layout.profile_key(user_id)) is not None

    def remove_profile(self, user_id: str) -> bool:
        """Stage the removal of the user's profile; False if there is none."""
        if not self.profile_exists(user_id):
            return False
        self.batch.delete(layout.profile_key(user_id))
        self.profiles.pop(user_id, None)
        self.deleted_profiles.add(user_id)
        self.removed_users += 1
        return True

    def add_audit_entry(self, audit_id: str, entry: dict[str, Any]) -> None:
        self.batch.put(layout.audit_key(audit_id), orjson.dumps({"audit_id": audit_id, **entry}))

    def add_profile(self, profile: Profile, *, replace: bool = True) -> None:
        """Write the profile when it is new, or changed and `replace` allows it."""
        user_id = profile.user_id
        removed = user_id in self.deleted_profiles  # by a deletion earlier in this batch
        known = self.profiles.get(user_id) or (None if removed else self.writer._profiles.get(user_id))
        if known == profile.stored:
            return
        if known is None:
            known = None if removed else self.db.get(layout.profile_key(user_id))
            if known is None:
                self.new_users += 1
        if known is None or (replace and known != profile.stored):
            self.batch.put(layout.profile_key(user_id), profile.stored)
            self.profiles[user_id] = profile.stored
        else:
            self.profiles[user_id] = known

    def commit(self) -> None:
        writer = self.writer
        record_change = self.new_records - self.removed_records
        user_change = self.new_users - self.removed_users
        if self.new_records or self.removed_records:
            self.batch.put(layout.RECORD_COUNT_KEY, str(writer.record_count + record_change).encode())
        if self.new_users or self.removed_users:
            self.batch.put(layout.USER_COUNT_KEY, str(writer.user_count + user_change).encode())
        # The writer is the only one to change counts, so what the database holds is current.
        self._count_added()
        for count_key, change in self.counts.items():
            base = self.count_bases.get(count_key)
            count = (layout.read_count(self.db.get(count_key)) if base is None else base) + change
            if count > 0:
                self.batch.put(count_key, str(count).encode())
            else:  # no record left under that name
                self.batch.delete(count_key)
        writer.known_requests.add(self.requests.keys())  # if the write fails, they are false positives
        if writer.write_batch_hook is not None:
            writer.write_batch_hook()
        writer.overview.batch_writing()
        if self.removed_records:
            # Counted before the write: one that reports failure may still be in the database (see _heal).
            writer.removals_committed += 1
        started = time.perf_counter()
        try:
            self.batch.write()
        except BaseException:
            writer.overview.batch_written((), ())
            raise
        self.write_seconds = time.perf_counter() - started
        writer.overview.batch_written(self.overview_rows, self.overview_removed)
        if self.overview_removed and writer.overview_stale_observer is not None:
            writer.overview_stale_observer()
        if self.rewrites_history and writer.history_observer is not None:
            writer.history_observer()
        writer.record_count += record_change
        writer.user_count += user_change
        for user_id in self.deleted_profiles:
            writer._profiles.pop(user_id, None)
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
        last_audit_id: str | None,
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
        self._audit_clock = RecordIdClock(last_audit_id)  # audit ids: the same form, their own sequence
        self._user_chunk = min(USER_DELETION_CHUNK, max_batch)
        self._user_removals: dict[str, UserRemoval] = {}  # user deletions between two chunks, by user
        self._profiles: dict[str, bytes] = {}
        # Which request_ids may be stored, so that a new one costs no read (filled when the writer starts).
        self.known_requests = KnownRequests(expected_keys=record_count)
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
        self.removals_committed = 0  # batches written (or tried) that removed records (see StoredVerdicts)
        self.failed_batches = 0
        self.reopens = 0
        self._heal_requested = False
        # Test seam: replaces the batch write to inject storage faults.
        self.write_batch_hook: Callable[[], None] | None = None
        # Told (records taken in, seconds LevelDB took to write them) after each committed
        # batch, on the writer thread; the server's metrics set it.
        self.commit_observer: Callable[[int, float], None] | None = None
        # Told, on the writer thread, after a batch that made overview tests stale (a deletion):
        # the store has them rebuilt off the event loop.
        self.overview_stale_observer: Callable[[], None] | None = None
        # Told, on the writer thread, after a batch that changed an index other than by appending
        # to it (a removal, a record filed at its past run_time, a restored record): the series
        # cache follows appends only.
        self.history_observer: Callable[[], None] | None = None

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
        # The snapshot is taken before the writer stores anything: each key stored later reaches the filter
        # from the writer itself.
        self.known_requests.start_filling(_snapshot_keys(self._db.snapshot(), layout.IDEMPOTENCY_PREFIX))
        self._thread.start()
        self._verdict_thread.start()

    def submit(self, profile: Profile, draft: RecordDraft) -> asyncio.Future[RecordAck]:
        """Queue a record; the future resolves once it is durable (or fails with PerfdbError)."""
        future: asyncio.Future[RecordAck] = self._loop.create_future()
        self._enqueue(Submission(profile, draft, future))
        return future

    def submit_to(self, profile: Profile, draft: RecordDraft, outcome: Settleable) -> None:
        """Queue a record whose RecordAck (or PerfdbError) goes to `outcome` once it is durable,
        on the event loop: submit without a future of its own, for the ingest path."""
        self._enqueue(Submission(profile, draft, outcome))

    def submit_batch(self, profile: Profile, drafts: list[RecordDraft]) -> asyncio.Future[BatchAck]:
        """Queue a record_batch's records; they are committed together, in one write batch."""
        future: asyncio.Future[BatchAck] = self._loop.create_future()
        self._enqueue(BatchSubmission(profile, drafts, future))
        return future

    def restore(
        self,
        records: list[ImportedRecord],
        profiles: dict[str, Profile],
        tombstones: list[str] | None = None,
        *,
        force: bool = False,
    ) -> asyncio.Future[ImportAck]:
        """Queue restored records and tombstones; records already present are counted as
        duplicates, not rewritten, and records with a tombstone are left out unless `force`."""
        future: asyncio.Future[ImportAck] = self._loop.create_future()
        self._enqueue(Restoration(records, profiles, future, tombstones or [], force))
        return future

    def delete_record(self, record_id: str, owner: str | None) -> asyncio.Future[RecordDeletionAck]:
        """Queue a record's deletion by its owner (their user id) or the admin (None); the future
        resolves once it is durable, or fails with not_found or forbidden."""
        future: asyncio.Future[RecordDeletionAck] = self._loop.create_future()
        self._enqueue(RecordRemoval(record_id, owner, future))
        return future

    def delete_user(self, user_id: str) -> asyncio.Future[UserDeletionAck]:
        """Queue the deletion of a user's records and profile; resolves once all of it is durable."""
        future: asyncio.Future[UserDeletionAck] = self._loop.create_future()
        self._enqueue(UserRemoval(user_id, future))
        return future

    def _enqueue(self, item: WriteItem) -> None:
        if not self._accepting:
            raise PerfdbError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        self._queue.put(item)

    def stop(self) -> None:
        """Commit what is queued, then end the threads (the writer ends the verdict thread after its last
        batch). Blocks: call it off the event loop."""
        self._accepting = False
        self._queue.put(self._STOP)
        self._thread.join()
        self.known_requests.stop_filling()  # before the database it reads is closed
        if self._verdict_thread.is_alive():  # the writer thread died without ending it
            self._verdict_queue.put(self._STOP)
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
            records = self._record_count(first)
            for item in _waiting(self._queue) if records < self._max_batch else ():
                if item is self._STOP:
                    stopping = True
                    break
                if item is self._HEAL:
                    continue  # committing the batch heals first anyway
                batch.append(item)
                records += self._record_count(item)
                if records >= self._max_batch:
                    break
            self._commit(batch)
        self._refuse_leftovers()

    def _refuse_leftovers(self) -> None:
        """Answer anything that slipped in behind the stop marker, so no future is left hanging. The verdict
        thread judges the last batches first, and the verdicts it hands back are still stored."""
        self._verdict_queue.put(self._STOP)
        if self._verdict_thread.is_alive():
            self._verdict_thread.join()
        leftovers: list[Outcome] = []
        verdicts: list[WriteItem] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, StoredVerdicts):
                verdicts.append(item)
            elif item is not self._STOP and item is not self._HEAL:
                leftovers.append((item.future, PerfdbError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")))
        if verdicts:
            self._commit(verdicts)
        if leftovers:
            self._loop.call_soon_threadsafe(_settle, leftovers)

    def _record_count(self, item: WriteItem) -> int:
        """How much of a batch's --max-batch-records an item takes."""
        if isinstance(item, Restoration):
            return len(item.records) + len(item.tombstones)
        if isinstance(item, StoredVerdicts):
            return 0  # small puts riding along: they never keep a record out of a batch
        if isinstance(item, BatchSubmission):
            return len(item.drafts)
        return self._user_chunk if isinstance(item, UserRemoval) else 1

    def _commit(self, items: list[WriteItem]) -> None:
        outcomes: list[Outcome]
        unfinished: list[UserRemoval] = []
        write_seconds: float | None = None
        removals_seen = self.removals_committed  # before this batch's own: it may remove what it adds
        try:
            if self._needs_heal:
                self._heal()
            outcomes, unfinished, write_seconds = self._write(items)
        except Exception as exc:  # any failure of the batch fails every submission in it
            self.failed_batches += 1
            self._needs_heal = True
            log.error("write batch of %d submissions failed: %s", len(items), exc)
            error = PerfdbError(ErrorCode.STORAGE_ERROR, "the database could not store the record; retry later")
            outcomes = [(item.future, error) for item in items if not isinstance(item, StoredVerdicts)]
            for item in items:
                if isinstance(item, UserRemoval):
                    self._user_removals.pop(item.user_id, None)  # it ends here; sent again, it starts afresh
        if write_seconds is not None and self.detector.enabled:
            # Judged on the verdict thread while this one writes the next batch (the fsync frees the GIL).
            # A user deletion still going has no outcome yet, stored verdicts none at all: only the answered
            # items go along.
            answered = [
                item
                for item in items
                if not isinstance(item, StoredVerdicts) and all(item is not removal for removal in unfinished)
            ]
            if answered:
                self._verdict_queue.put((answered, outcomes, removals_seen))
        elif outcomes:
            self._loop.call_soon_threadsafe(_settle, outcomes)
        for removal in unfinished:
            # Behind whatever came meanwhile; after a stop marker it is refused with shutting_down.
            self._queue.put(removal)
        if write_seconds is not None and self.commit_observer is not None:
            self.commit_observer(sum(map(self._record_count, items)), write_seconds)

    def _run_verdicts(self) -> None:
        """The verdict thread: judges the durable batches in commit order, then hands out their outcomes. The
        batches waiting when it comes round are judged together: a bigger batch costs less a record (numpy's
        calls are made once for all of it), so a verdict thread that falls behind catches up."""
        stopping = False
        while not stopping:
            work = self._verdict_queue.get()
            if work is self._STOP:
                return
            items, outcomes, removals_seen = list(work[0]), list(work[1]), work[2]
            for more in _waiting(self._verdict_queue):
                if more is self._STOP:
                    stopping = True
                    break
                items += more[0]
                outcomes += more[1]
            judged, verdicts = self._judge(items, outcomes, removals_seen)
            # Queued before the acks go out: a write acknowledged after them is committed after these verdicts.
            if verdicts is not None:
                self._queue.put(verdicts)
            self._loop.call_soon_threadsafe(_settle, judged)

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
            self.known_requests.stop_filling()  # it reads the handle about to be closed
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

    def _write(self, items: list[WriteItem]) -> tuple[list[Outcome], list[UserRemoval], float]:
        """Stage and commit one batch: the outcomes to send, the user deletions still going, and
        the seconds LevelDB took to write it."""
        # A batch of verdicts alone is not synced: the next synced batch makes it durable, and its records
        # were acknowledged without waiting for it.
        sync = self._sync and not all(isinstance(item, StoredVerdicts) for item in items)
        batch = _Batch(self, sync=sync)
        # Each new submission's idempotency key, made once, and one look at the filter for all of them
        # rather than a read each.
        request_keys = {
            id(draft): layout.idempotency_key(item.profile.user_id, draft.request_id)
            for item in items
            if isinstance(item, (Submission, BatchSubmission))
            for draft in ((item.draft,) if isinstance(item, Submission) else item.drafts)
            if draft.request_id is not None
        }
        batch.absent = self.known_requests.absent(list(request_keys.values()))
        outcomes: list[Outcome] = []
        unfinished: list[UserRemoval] = []
        for item in items:
            if isinstance(item, StoredVerdicts):
                batch.add_verdicts(item)
            elif isinstance(item, Submission):
                draft = item.draft
                added = self._add_submission(batch, item.profile, draft, request_keys.get(id(draft)))
                outcomes.append((item.future, added))
            elif isinstance(item, BatchSubmission):
                profile = item.profile
                acks = tuple(
                    self._add_submission(batch, profile, draft, request_keys.get(id(draft)), add_profile=False)
                    for draft in item.drafts
                )
                if any(isinstance(ack, RecordAck) and not ack.duplicate for ack in acks):
                    batch.add_profile(profile)  # once for all its records
                outcomes.append((item.future, BatchAck(acks)))
            elif isinstance(item, Restoration):
                outcomes.append((item.future, self._add_restoration(batch, item)))
            elif isinstance(item, RecordRemoval):
                outcomes.append((item.future, self._add_record_removal(batch, item)))
            else:
                ack = self._add_user_chunk(batch, item)
                if ack is None:
                    unfinished.append(item)
                else:
                    outcomes.append((item.future, ack))
        batch.commit()
        return outcomes, unfinished, batch.write_seconds

    def _audit_id(self) -> tuple[str, str]:
        """A new audit id and its time."""
        audit_id, micros = self._audit_clock.next()
        return audit_id, format_micros(micros)

    def _add_record_removal(self, batch: _Batch, removal: RecordRemoval) -> RecordDeletionAck | PerfdbError:
        found = batch.find_record(removal.record_id)
        if found is None:
            tombstone = batch.tombstone(removal.record_id)
            # A user learns only of their own deleted records: another user's is not_found, as
            # is one whose tombstone does not say whose it was (older or imported).
            if tombstone is not None and (removal.owner is None or layout.tombstone_owner(tombstone) == removal.owner):
                return RecordDeletionAck(removal.record_id, deleted=False)
            return PerfdbError(ErrorCode.NOT_FOUND, "no such record")
        user_id, document = found
        if removal.owner is not None and removal.owner != user_id:
            return PerfdbError(ErrorCode.FORBIDDEN, "record_id: the record belongs to another user")
        audit_id, now = self._audit_id()
        batch.remove_record(removal.record_id, user_id, document, now)
        batch.add_audit_entry(
            audit_id,
            {
                "time": now,
                "actor": "admin" if removal.owner is None else "owner",
                "op": "delete_record",
                "user_id": user_id,
                "record_ids": [removal.record_id],
                "records": 1,
                "complete": True,
            },
        )
        return RecordDeletionAck(removal.record_id, deleted=True, user_id=user_id)

    def _add_user_chunk(self, batch: _Batch, removal: UserRemoval) -> UserDeletionAck | None:
        """Stage the next chunk of a user's deletion; its ack once the last chunk is staged, else None."""
        user_id = removal.user_id
        chunk = self._user_chunk
        # Records put earlier in this very batch are not in the database's index yet.
        doomed = {record_id: document for record_id, document in batch.staged.items() if document["user_id"] == user_id}
        dangling: list[bytes] = []
        loaded = 0  # bytes of the stored records read for this chunk

        def full() -> bool:
            return len(doomed) + len(dangling) >= chunk or loaded >= USER_DELETION_BYTES

        finished = True
        prefix = layout.user_index_prefix(user_id)
        stop = layout.prefix_end(prefix)
        with self._db.iterator(start=removal.index_resume or prefix, stop=stop, include_value=False) as keys:
            for key in keys:
                if full():
                    finished = False
                    break
                removal.index_resume = key + b"\x00"  # the first key after it
                record_id = key[len(prefix) :].decode()
                if record_id in batch.deleted or record_id in doomed:
                    continue
                record_key = layout.record_key(record_id, user_id)
                value = self._db.get(record_key)
                if value is None:
                    dangling.append(key)  # an index entry without its record: drop it too
                else:
                    doomed[record_id] = _stored_document(record_key, value)
                    loaded += len(value)
        if finished:
            # What a damaged past may have left behind: request ids whose records are gone.
            # (Those naming a record removed now go with it.)
            requests = layout.idempotency_key(user_id, "")
            stop = layout.prefix_end(requests)
            with self._db.iterator(start=removal.requests_resume or requests, stop=stop) as entries:
                for key, value in entries:
                    if full():
                        finished = False
                        break
                    removal.requests_resume = key + b"\x00"
                    named = _stored_ack(value, user_id, key)
                    if named is None or named.record_id not in doomed:
                        dangling.append(key)
        deleted_at = format_micros(now_micros())
        for record_id, document in doomed.items():
            batch.remove_record(record_id, user_id, document, deleted_at)
        for key in dangling:
            batch.batch.delete(key)
        removal.removed += len(doomed)
        if finished:
            removal.profile_removed = batch.remove_profile(user_id)
            batch.clear_count(layout.user_count_key(user_id))  # even if damage left it off
        if removal.audit_id is None and (doomed or removal.profile_removed):
            removal.audit_id, removal.started = self._audit_id()
        if removal.audit_id is not None:
            # One entry per request, rewritten with each chunk: it always says what is gone.
            batch.add_audit_entry(
                removal.audit_id,
                {
                    "time": removal.started,
                    "actor": "admin",
                    "op": "delete_user",
                    "user_id": user_id,
                    "records": removal.removed,
                    "complete": finished,
                },
            )
        if not finished:
            self._user_removals[user_id] = removal
            return None
        self._user_removals.pop(user_id, None)
        return UserDeletionAck(user_id, removal.audit_id is not None, removal.removed)

    def _judge(
        self, items: list[AnsweredItem], outcomes: list[Outcome], removals_seen: int
    ) -> tuple[list[Outcome], StoredVerdicts | None]:
        """The committed records join the verdict windows; new submissions get their verdicts, each judged
        against its window before it joined, in commit order, all in one call (see RegressionDetector.judge_batch).
        Also the verdicts to store, packed."""
        detector = self.detector
        if not detector.enabled:
            return outcomes, None
        committed: list[CommittedRecord] = []
        for item, (_, outcome) in zip(items, outcomes, strict=True):
            if isinstance(item, Submission) and isinstance(outcome, RecordAck) and not outcome.duplicate:
                committed.append(_judged_record(outcome, item.draft))
            elif isinstance(item, BatchSubmission) and isinstance(outcome, BatchAck):
                acks = zip(outcome.outcomes, item.drafts, strict=True)
                committed += [
                    _judged_record(ack, draft)
                    for ack, draft in acks
                    if isinstance(ack, RecordAck) and not ack.duplicate
                ]
            elif isinstance(item, Restoration) and isinstance(outcome, ImportAck):
                restored = [record for record in item.records if record.record_id in outcome.stored_ids]
                committed += [_joined_record(record) for record in restored]
        encoded = detector.judge_committed(committed)
        verdicts_of = {
            record.record_id: None if verdicts is None else verdicts.json
            for record, verdicts in zip(committed, encoded, strict=True)
            if record.judged
        }
        judged: list[Outcome] = []
        for future, outcome in outcomes:
            if isinstance(outcome, RecordAck):
                outcome = _with_verdicts(outcome, verdicts_of)
            elif isinstance(outcome, BatchAck):
                outcome = BatchAck(tuple(_with_verdicts(ack, verdicts_of) for ack in outcome.outcomes))
            judged.append((future, outcome))
        detector.batch_committed()
        stored = StoredVerdicts.of(
            ((record.record_id, record.user_id, verdicts) for record, verdicts in zip(committed, encoded, strict=True)),
            removals_seen,
        )
        return judged, stored

    def _add_submission(
        self,
        batch: _Batch,
        profile: Profile,
        draft: RecordDraft,
        request_key: bytes | None,
        *,
        add_profile: bool = True,
    ) -> RecordAck | PerfdbError:
        """Stage a new record (request_key: its idempotency key, None without a request_id), or answer
        for the earlier one its request_id names; and its submitter's profile, unless add_profile is False."""
        if request_key is not None:
            earlier = batch.earlier_request(request_key, profile.user_id)
            if earlier is not None:
                return dataclasses.replace(earlier, duplicate=True, verdicts=() if self.detector.enabled else None)
        record_id, micros = self._place(batch, draft.run_time)
        timestamp = batch.timestamp(micros)
        try:
            record = _record_document(record_id, profile.user_id, timestamp, draft)
        except orjson.JSONEncodeError as exc:
            # Only this record fails, not the batch it shares with others.
            return PerfdbError(ErrorCode.BAD_REQUEST, f"the record cannot be stored as JSON ({exc})")
        ack = batch.add_record(
            record_id, profile.user_id, timestamp, draft, record, request_key=request_key, request_checked=True
        )
        if add_profile:
            batch.add_profile(profile)
        return ack

    def _place(self, batch: _Batch, run_time: str | None) -> tuple[str, int]:
        """A new record's id and its commit time (microseconds). Ids sort by time: by when the
        benchmark ran for a record whose run_time is older than RUN_TIME_SLACK_MICROS (an
        imported history charts over the time it ran, and reads filter and order it so), by
        commit time otherwise. A past id gets a random sequence number, checked unused."""
        record_id, micros = self._clock.next_at(batch.now)
        if run_time is None:
            return record_id, micros
        ran = parse_rfc3339(run_time)
        if ran >= micros - RUN_TIME_SLACK_MICROS:
            return record_id, micros
        for _ in range(8):
            candidate = make_record_id(ran, secrets.randbelow(SEQUENCE_LIMIT))
            if not batch.has_record(candidate) and not batch.is_tombstoned(candidate):
                batch.rewrites_history = True
                return candidate, micros
        return record_id, micros  # that microsecond is crowded beyond belief: commit order it is

    def _add_restoration(self, batch: _Batch, restoration: Restoration) -> ImportAck | PerfdbError:
        """All of a restoration's new records and tombstones go into the batch, or none of them do."""
        staged: list[tuple[ImportedRecord, tuple[dict[str, Any], bytes]]] = []
        staged_ids: set[str] = set()
        duplicates = tombstoned = 0
        for record in restoration.records:
            if record.record_id in staged_ids or batch.has_record(record.record_id):
                duplicates += 1
                continue
            if batch.is_tombstoned(record.record_id) and not restoration.force:
                tombstoned += 1  # deleted here once: an old export must not bring it back
                continue
            staged_ids.add(record.record_id)
            try:
                document = _record_document(record.record_id, record.user_id, record.timestamp, record.draft)
            except orjson.JSONEncodeError as exc:
                return PerfdbError(ErrorCode.BAD_REQUEST, f"record {record.record_id} cannot be stored as JSON ({exc})")
            staged.append((record, document))
        removed = self._add_tombstones(batch, restoration.tombstones)
        batch.rewrites_history = batch.rewrites_history or bool(staged)
        for record, document in staged:
            self._clock.advance_past(record.record_id)
            if restoration.force and batch.is_tombstoned(record.record_id):
                batch.delete_tombstone(record.record_id)
            draft = record.draft
            request_key = None if draft.request_id is None else layout.idempotency_key(record.user_id, draft.request_id)
            batch.add_record(
                record.record_id,
                record.user_id,
                record.timestamp,
                draft,
                document,
                request_key=request_key,
                request_checked=False,
            )
            # A restored profile never replaces the newer one a user's own submissions wrote.
            batch.add_profile(restoration.profiles[record.user_id], replace=False)
        return ImportAck(
            len(staged),
            duplicates,
            tombstoned,
            len(removed),
            frozenset(record.record_id for record, _ in staged),
            tuple(removed),
        )

    def _add_tombstones(self, batch: _Batch, record_ids: list[str]) -> list[tuple[str, str]]:
        """Remember imported deletions; a record still stored here under such an id is removed,
        with an audit entry. Returns (user id, record id) of the records removed."""
        if not record_ids:
            return []
        deleted_at = format_micros(now_micros())
        removed: list[tuple[str, str]] = []
        for record_id in record_ids:
            found = batch.find_record(record_id)
            if found is not None:
                batch.remove_record(record_id, found[0], found[1], deleted_at)
                removed.append((found[0], record_id))
            elif not batch.is_tombstoned(record_id):
                batch.put_tombstone(record_id, deleted_at, None)  # whose it was is not known here
        if removed:
            audit_id, now = self._audit_id()
            batch.add_audit_entry(
                audit_id,
                {
                    "time": now,
                    "actor": "admin",
                    "op": "import",
                    "record_ids": [record_id for _, record_id in removed],
                    "records": len(removed),
                    "complete": True,
                },
            )
        return removed


def _record_document(record_id: str, user_id: str, timestamp: str, draft: RecordDraft) -> tuple[dict[str, Any], bytes]:
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
    # The samples live under their own key.
    if draft.units is not None:
        document["units"] = draft.units
    if draft.run_time is not None:
        document["run_time"] = draft.run_time
    if draft.source is not None:
        document["source"] = draft.source
    return document, orjson.dumps(document)


def _snapshot_keys(snapshot: Any, prefix: bytes) -> Iterator[bytes]:
    """The keys under `prefix` in a LevelDB snapshot, which is released when the iteration ends or is closed."""
    try:
        with snapshot.iterator(prefix=prefix, include_value=False, fill_cache=False) as keys:
            yield from keys
    finally:
        snapshot.close()


def _stored_document(key: bytes, value: bytes) -> dict[str, Any]:
    """A stored record's document, or _DAMAGED if it fails its checksum or is not a JSON object."""
    try:
        document = orjson.loads(layout.unseal(value))
    except (layout.CorruptValueError, orjson.JSONDecodeError):
        document = None
    if not isinstance(document, dict):
        log.error("record %s is damaged", layout.split_record_key(key)[0])
        return _DAMAGED
    return document


def _filter_fields(document: dict[str, Any]) -> tuple[str, str] | None:
    """(test_name, tag) of a stored record's document, or None if it lacks them."""
    test_name, tag = document.get("test_name"), document.get("tag")
    return (test_name, tag) if isinstance(test_name, str) and isinstance(tag, str) else None


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


def _waiting(work: queue.SimpleQueue[Any]) -> Iterator[Any]:
    """The items in the queue now, one by one, without waiting for more (the caller may stop taking them)."""
    while True:
        try:
            yield work.get_nowait()
        except queue.Empty:
            return


def _judged_record(ack: RecordAck, draft: RecordDraft) -> CommittedRecord:
    return CommittedRecord(
        ack.user_id, ack.record_id, draft.test_name, draft.tag, draft.metrics, draft.better, draft.baseline_tag, True
    )


def _joined_record(record: ImportedRecord) -> CommittedRecord:
    draft = record.draft
    return CommittedRecord(
        record.user_id, record.record_id, draft.test_name, draft.tag, draft.metrics, None, None, False
    )


def _with_verdicts(ack: RecordAck | PerfdbError, verdicts_of: dict[str, bytes | None]) -> RecordAck | PerfdbError:
    """A new record's ack with its verdicts (a failed judgement: none); others as they are."""
    if not isinstance(ack, RecordAck) or ack.duplicate or ack.record_id not in verdicts_of:
        return ack  # a resend keeps its empty verdicts, even when the record it repeats is in the same batch
    verdicts = verdicts_of[ack.record_id]
    return RecordAck(
        ack.record_id, ack.user_id, ack.timestamp, ack.duplicate, () if verdicts is None else orjson.Fragment(verdicts)
    )


def _settle(outcomes: list[Outcome]) -> None:
    """Runs on the event loop: hand each submitter its outcome."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, PerfdbError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
