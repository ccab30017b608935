"""The group-commit writer: one thread turns every pending submission into one durable WriteBatch.

Being the only writer makes it the point where order is decided: it assigns record ids and
timestamps, checks idempotency keys and compares profiles without races, and acknowledges a
submission only after the batch that holds it has been written (fsync'd unless sync is off).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import orjson
import plyvel

from perfdb.auth import Profile
from perfdb.errors import ErrorCode, PerfdbError
from perfdb.schema import RecordDraft
from perfdb.storage import layout
from perfdb.timestamps import format_micros, now_micros

log = logging.getLogger("perfdb.storage")

# Kept in memory to skip re-reading profiles that did not change; cleared when it grows past this.
_MAX_CACHED_PROFILES = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class RecordAck:
    """What the client is told once its record is durable."""

    record_id: str
    user_id: str
    timestamp: str
    duplicate: bool

    def to_fields(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "user_id": self.user_id,
            "timestamp": self.timestamp,
            "duplicate": self.duplicate,
        }


@dataclasses.dataclass(slots=True)
class Submission:
    profile: Profile
    draft: RecordDraft
    future: asyncio.Future[RecordAck]


class RecordIdClock:
    """Strictly increasing record ids whose time part never goes back, even if the clock does."""

    __slots__ = ("_micros", "_sequence")

    def __init__(self, last_record_id: str | None) -> None:
        if last_record_id is None:
            self._micros, self._sequence = -1, 0
        else:
            self._micros = layout.record_id_micros(last_record_id)
            self._sequence = int(last_record_id[14:], 16)

    def next(self) -> tuple[str, int]:
        now = now_micros()
        if now > self._micros:
            self._micros, self._sequence = now, 0
        else:
            self._sequence += 1
            if self._sequence >= 1 << 24:  # 16M ids in one microsecond: borrow the next one
                self._micros, self._sequence = self._micros + 1, 0
        return layout.make_record_id(self._micros, self._sequence), self._micros


class GroupCommitWriter:
    """Owns all writes to the database; see the module docstring."""

    _STOP = object()

    def __init__(
        self,
        db: plyvel.DB,
        loop: asyncio.AbstractEventLoop,
        *,
        sync: bool,
        max_batch: int,
        record_count: int,
        user_count: int,
        last_record_id: str | None,
    ) -> None:
        self._db = db
        self._loop = loop
        self._sync = sync
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._clock = RecordIdClock(last_record_id)
        self._profiles: dict[str, bytes] = {}
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="perfdb-writer", daemon=True)
        # Read by stats from the event loop; plain ints, written only by the writer thread.
        self.record_count = record_count
        self.user_count = user_count
        self.batches = 0
        self.batched_records = 0
        self.failed_batches = 0
        # Test seam: replaces the batch write to inject storage faults.
        self.write_batch_hook: Callable[[], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, profile: Profile, draft: RecordDraft) -> asyncio.Future[RecordAck]:
        """Queue a record; the future resolves once it is durable (or fails with PerfdbError)."""
        if not self._accepting:
            raise PerfdbError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        future: asyncio.Future[RecordAck] = self._loop.create_future()
        self._queue.put(Submission(profile, draft, future))
        return future

    def stop(self) -> None:
        """Commit what is queued, then end the thread. Blocks: call it off the event loop."""
        self._accepting = False
        self._queue.put(self._STOP)
        self._thread.join()

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is self._STOP:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is self._STOP:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, submissions: list[Submission]) -> None:
        outcomes: list[tuple[asyncio.Future[RecordAck], RecordAck | PerfdbError]] = []
        try:
            outcomes = self._write(submissions)
        except Exception as exc:  # any failure of the batch fails every submission in it
            self.failed_batches += 1
            log.error("write batch of %d records failed: %s", len(submissions), exc)
            error = PerfdbError(ErrorCode.STORAGE_ERROR, "the database could not store the record; retry later")
            outcomes = [(submission.future, error) for submission in submissions]
        self._loop.call_soon_threadsafe(_settle, outcomes)

    def _write(self, submissions: list[Submission]) -> list[tuple[asyncio.Future[RecordAck], RecordAck | PerfdbError]]:
        db = self._db
        batch = db.write_batch(sync=self._sync)
        # Staged state, applied to self only once the batch is on disk.
        seen_requests: dict[bytes, RecordAck] = {}
        new_profiles: dict[str, bytes] = {}
        new_users = 0
        new_records = 0
        outcomes: list[tuple[asyncio.Future[RecordAck], RecordAck | PerfdbError]] = []
        for submission in submissions:
            profile, draft = submission.profile, submission.draft
            user_id = profile.user_id
            request_key = b""
            if draft.request_id is not None:
                request_key = layout.idempotency_key(user_id, draft.request_id)
                earlier = seen_requests.get(request_key) or _stored_ack(db.get(request_key), user_id)
                if earlier is not None:
                    outcomes.append((submission.future, dataclasses.replace(earlier, duplicate=True)))
                    continue
            record_id, micros = self._clock.next()
            timestamp = format_micros(micros)
            batch.put(
                layout.record_key(record_id, user_id),
                layout.seal(_record_document(record_id, user_id, timestamp, draft)),
            )
            batch.put(
                layout.user_index_prefix(user_id) + record_id.encode(), orjson.dumps([draft.test_name, draft.tag])
            )
            ack = RecordAck(record_id, user_id, timestamp, duplicate=False)
            if request_key:
                batch.put(request_key, orjson.dumps({"record_id": record_id, "timestamp": timestamp}))
                seen_requests[request_key] = ack
            new_records += 1
            # The profile is written only when it is new or changed.
            known = new_profiles.get(user_id) or self._profiles.get(user_id)
            if known != profile.stored:
                if known is None:
                    known = db.get(layout.profile_key(user_id))
                    if known is None:
                        new_users += 1
                if known != profile.stored:
                    batch.put(layout.profile_key(user_id), profile.stored)
                new_profiles[user_id] = profile.stored
            outcomes.append((submission.future, ack))
        if new_records:
            batch.put(layout.RECORD_COUNT_KEY, str(self.record_count + new_records).encode())
        if new_users:
            batch.put(layout.USER_COUNT_KEY, str(self.user_count + new_users).encode())
        if self.write_batch_hook is not None:
            self.write_batch_hook()
        batch.write()
        self.record_count += new_records
        self.user_count += new_users
        if len(self._profiles) + len(new_profiles) > _MAX_CACHED_PROFILES:
            self._profiles.clear()
        self._profiles.update(new_profiles)
        self.batches += 1
        self.batched_records += new_records
        return outcomes


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
    return orjson.dumps(document)


def _stored_ack(value: bytes | None, user_id: str) -> RecordAck | None:
    if value is None:
        return None
    document = orjson.loads(value)
    return RecordAck(document["record_id"], user_id, document["timestamp"], duplicate=True)


def _settle(outcomes: list[tuple[asyncio.Future[RecordAck], RecordAck | PerfdbError]]) -> None:
    """Runs on the event loop: hand each submitter its outcome."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, PerfdbError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
