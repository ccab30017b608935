"""Offline repair: LevelDB's own repair, then a check of every record against its checksum and
its tombstone, a rebuild of the test, tag and metric indexes, of the user index entries (with the
metrics they carry since schema 3) and of every count from the good records, and a check of the
remaining index entries against their records. Run with the server stopped."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson
import plyvel

from perfdb.storage import layout
from perfdb.storage.store import DatabaseLock, StoreOpenError
from perfdb.storage.upgrade import UPGRADABLE_VERSIONS

log = logging.getLogger("perfdb.repair")

_REBUILD_BATCH = 10_000  # index entries written (or deleted) per write


@dataclasses.dataclass
class RepairReport:
    records: int = 0  # records whose checksum holds
    users: int = 0
    damaged: list[str] = dataclasses.field(default_factory=list)  # ids of records that fail it
    # Ids of records that were deleted (they have a tombstone) and were there again, removed with
    # every key derived from them: LevelDB's repair can bring back an older copy when the table
    # holding the deletion was lost.
    resurrected: list[str] = dataclasses.field(default_factory=list)
    # user-index, idempotency or stored-verdicts entries without their record
    dangling_index_entries: int = 0
    counters_wrong: bool = False  # the stored record or user count disagrees with what is there
    indexed: int = 0  # records whose index entries and counts were rewritten
    dropped: bool = False


def repair_database(path: Path, *, drop_damaged: bool) -> RepairReport:
    """Repair the database at `path`, always removing deleted records that are back; with
    drop_damaged, also delete damaged records and dangling index entries and rewrite the
    counters. Raises StoreOpenError if it is in use or unreadable."""
    lock = DatabaseLock(path)
    real_path = lock.acquire(create=False)
    if not (real_path / "CURRENT").is_file():
        lock.release()
        raise StoreOpenError(f"{path} holds no LevelDB database")
    try:
        _refuse_foreign(real_path)
        try:
            plyvel.repair_db(str(real_path))
            db = plyvel.DB(str(real_path))
        except plyvel.Error as exc:
            raise StoreOpenError(f"cannot repair database {path}: {exc}") from None
        try:
            return _check(db, drop_damaged)
        except plyvel.Error as exc:
            raise StoreOpenError(f"cannot read database {path}: {exc}") from None
        finally:
            db.close()
    finally:
        lock.release()


def _refuse_foreign(real_path: Path) -> None:
    """Refuse, before changing anything, a LevelDB that opens and is not a perfdb database."""
    try:
        db = plyvel.DB(str(real_path))
    except plyvel.Error:
        return  # too damaged to open: repairing it is the point
    try:
        if db.get(layout.SCHEMA_KEY) is None:
            raise StoreOpenError(f"{real_path} holds a LevelDB database that is not a perfdb database")
    finally:
        db.close()


def _drop_derived(db: plyvel.DB) -> None:
    """Delete the test, tag and metric index entries and every count; they are rebuilt from the records."""
    for prefix in (layout.TEST_INDEX_PREFIX, layout.TAG_INDEX_PREFIX, layout.METRIC_INDEX_PREFIX, layout.COUNT_PREFIX):
        batch = db.write_batch(sync=False)
        for deleted, key in enumerate(db.iterator(prefix=prefix, include_value=False), 1):
            batch.delete(key)
            if deleted % _REBUILD_BATCH == 0:
                batch.write()
                batch = db.write_batch(sync=False)
        batch.write()


def _remove_resurrected(db: plyvel.DB, batch: Any, key: bytes, document: Any) -> None:
    """Stage the removal of a tombstoned record that is back with every key derived from it
    (the keys its id and user give, if its document is too damaged to say its test and tag)."""
    record_id, user_id = layout.split_record_key(key)
    test_name, tag = (document.get("test_name"), document.get("tag")) if isinstance(document, dict) else (None, None)
    if isinstance(test_name, str) and isinstance(tag, str):
        doomed = layout.record_keys(record_id, user_id, test_name, tag, document.get("metrics"))
    else:
        doomed = layout.record_keys_by_id(record_id, user_id)
    for doomed_key in doomed:
        batch.delete(doomed_key)
    request_id = document.get("request_id") if isinstance(document, dict) else None
    if isinstance(request_id, str):
        # Its request_id is forgotten with it, unless the entry names another record.
        request_key = layout.idempotency_key(user_id, request_id)
        try:
            named = orjson.loads(db.get(request_key) or b"{}").get("record_id")
        except (orjson.JSONDecodeError, AttributeError):
            named = None  # damaged: the check of idempotency entries below finds it dangling
        if named == record_id:
            batch.delete(request_key)


def _check(db: plyvel.DB, drop_damaged: bool) -> RepairReport:
    report = RepairReport()
    schema = db.get(layout.SCHEMA_KEY)
    if schema != str(layout.SCHEMA_VERSION).encode() and schema not in UPGRADABLE_VERSIONS:
        raise StoreOpenError("not a perfdb database of this version (schema key missing or different)")
    good: set[str] = set()
    doomed: list[bytes] = []
    tombstones = layout.TOMBSTONE_PREFIX
    deleted = {key[len(tombstones) :].decode() for key in db.iterator(prefix=tombstones, include_value=False)}
    _drop_derived(db)
    counts: dict[bytes, int] = {}
    batch = db.write_batch(sync=False)
    for key, value in db.iterator(prefix=layout.RECORD_PREFIX):
        record_id, user_id = layout.split_record_key(key)
        try:
            document = orjson.loads(layout.unseal(value))
            test_name, tag = document["test_name"], document["tag"]
        except (layout.CorruptValueError, orjson.JSONDecodeError, KeyError, TypeError):
            document = test_name = tag = None
        if record_id in deleted:
            # A deleted record is never data to keep, damaged or not: it goes now, with or
            # without drop_damaged. (The counts and the test and tag indexes are rebuilt
            # without it.)
            report.resurrected.append(record_id)
            _remove_resurrected(db, batch, key, document)
            continue
        if document is None:
            report.damaged.append(record_id)
            doomed.append(key)
            continue
        good.add(record_id)
        for index_key, index_value in layout.record_index_entries(
            record_id, user_id, test_name, tag, document.get("metrics")
        ):
            batch.put(index_key, index_value)
        for count_key in layout.record_counts(user_id, test_name, tag):
            counts[count_key] = counts.get(count_key, 0) + 1
        report.indexed += 1
        if report.indexed % _REBUILD_BATCH == 0:
            batch.write()
            batch = db.write_batch(sync=False)
    for count_key, count in counts.items():
        batch.put(count_key, str(count).encode())
    # The indexes are whole now: an interrupted upgrade is finished.
    batch.put(layout.SCHEMA_KEY, str(layout.SCHEMA_VERSION).encode())
    batch.delete(layout.UPGRADE_RESUME_KEY)
    batch.write()
    db.put(layout.HEAL_PROBE_KEY, b"", sync=True)  # makes every write above durable
    report.records = len(good)
    for key in db.iterator(prefix=layout.USER_INDEX_PREFIX, include_value=False):
        if key.rsplit(layout.SEPARATOR, 1)[1].decode() not in good:
            report.dangling_index_entries += 1
            doomed.append(key)
    for key, value in db.iterator(prefix=layout.IDEMPOTENCY_PREFIX):
        try:
            target = orjson.loads(value).get("record_id")
        except (orjson.JSONDecodeError, AttributeError):
            target = None  # a damaged entry points nowhere
        if not isinstance(target, str) or target not in good:
            report.dangling_index_entries += 1
            doomed.append(key)
    for key in db.iterator(prefix=layout.VERDICTS_PREFIX, include_value=False):
        if key[len(layout.VERDICTS_PREFIX) :].decode(errors="replace") not in good:
            report.dangling_index_entries += 1
            doomed.append(key)
    report.users = sum(1 for _ in db.iterator(prefix=layout.PROFILE_PREFIX, include_value=False))
    report.counters_wrong = (
        db.get(layout.RECORD_COUNT_KEY) != str(report.records).encode()
        or db.get(layout.USER_COUNT_KEY) != str(report.users).encode()
    )
    if drop_damaged:
        with db.write_batch(sync=True) as batch:
            for key in doomed:
                batch.delete(key)
            batch.put(layout.RECORD_COUNT_KEY, str(report.records).encode())
            batch.put(layout.USER_COUNT_KEY, str(report.users).encode())
        report.dropped = True
    for record_id in report.damaged:
        log.warning("record %s is damaged%s", record_id, " and was dropped" if drop_damaged else "")
    for record_id in report.resurrected:
        log.warning("record %s was deleted but is back; it was removed again", record_id)
    return report
