"""Bringing a database written by an older perfdb up to the current schema, at open.

Schema 1 -> 3 files every record under the test, tag and core-metric indexes, rewrites its user
index entry, and counts the records of each user, test and tag (layout.record_index_entries,
layout.record_counts). Schema 2 -> 3 rewrites each record's user and test index entries, which now
carry its numeric metrics; every other entry and count is already there. Either walks the records
in key order in bounded batches; each batch is one synced write that also records the last record
key it covered (layout.UPGRADE_RESUME_KEY), so a process killed during the upgrade leaves a
database that opens and carries on from there (the stored schema version says which upgrade it
was). The schema version changes only once every record is indexed, in the same write that
removes the resume key.
"""

from __future__ import annotations

import logging
import time

import orjson
import plyvel

from perfdb.storage import layout

log = logging.getLogger("perfdb.storage")

UPGRADABLE_VERSIONS = (b"1", b"2")
# The index entries a schema 2 database lacks in their schema 3 form (their values gained the metrics).
_REWRITTEN_FROM_2 = (layout.USER_INDEX_PREFIX, layout.TEST_INDEX_PREFIX)


def upgrade_schema(db: plyvel.DB, version: bytes, *, batch_records: int, pause: float) -> None:
    """Index every record not yet indexed, then set the current schema version. Blocking.

    version: the stored one (one of UPGRADABLE_VERSIONS). pause: seconds to wait after each batch
    (a test seam: lets a test interrupt an upgrade).
    """
    from_schema_1 = version == b"1"
    resume = db.get(layout.UPGRADE_RESUME_KEY)
    total = layout.read_count(db.get(layout.RECORD_COUNT_KEY))
    done = 0
    log.info(
        "upgrading the database from schema %s to %d: indexing %d records%s",
        version.decode(),
        layout.SCHEMA_VERSION,
        total,
        " (resuming an interrupted upgrade)" if resume is not None else "",
    )
    start = resume + b"\xff" if resume is not None else layout.RECORD_PREFIX  # past the last one done
    stop = layout.prefix_end(layout.RECORD_PREFIX)
    with db.iterator(start=start, stop=stop, fill_cache=False) as records:
        while True:
            batch_done, last_key = _index_batch(db, records, batch_records, from_schema_1=from_schema_1)
            if last_key is None:
                break
            done += batch_done
            log.info("schema upgrade: %d more records indexed (%d this run)", batch_done, done)
            if pause:
                time.sleep(pause)
    with db.write_batch(sync=True) as batch:
        batch.put(layout.SCHEMA_KEY, str(layout.SCHEMA_VERSION).encode())
        batch.delete(layout.UPGRADE_RESUME_KEY)
    log.info("database upgraded to schema %d", layout.SCHEMA_VERSION)


def _index_batch(
    db: plyvel.DB, records: plyvel.Iterator, limit: int, *, from_schema_1: bool
) -> tuple[int, bytes | None]:
    """Index up to `limit` more records in one synced write; (records indexed, last key seen).
    From schema 1 every entry is written and counted, from 2 the user and test entries rewritten."""
    counts: dict[bytes, int] = {}
    last_key = None
    indexed = 0
    with db.write_batch(sync=True) as batch:
        for key, value in records:
            last_key = key
            record_id, user_id = layout.split_record_key(key)
            try:
                document = orjson.loads(layout.unseal(value))
                test_name, tag, metrics = document["test_name"], document["tag"], document.get("metrics")
            except (layout.CorruptValueError, orjson.JSONDecodeError, KeyError, TypeError):
                # Reads skip it as they always did; perfdb repair reports or drops it.
                log.error("record %s is damaged; not indexed", record_id)
            else:
                for index_key, index_value in layout.record_index_entries(record_id, user_id, test_name, tag, metrics):
                    if from_schema_1 or index_key.startswith(_REWRITTEN_FROM_2):
                        batch.put(index_key, index_value)
                if from_schema_1:
                    for count_key in layout.record_counts(user_id, test_name, tag):
                        counts[count_key] = counts.get(count_key, 0) + 1
                indexed += 1
            if indexed == limit:
                break
        if last_key is None:
            return 0, None
        for count_key, added in counts.items():
            batch.put(count_key, str(layout.read_count(db.get(count_key)) + added).encode())
        batch.put(layout.UPGRADE_RESUME_KEY, last_key)
    return indexed, last_key
