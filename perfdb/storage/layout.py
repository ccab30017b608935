"""The LevelDB key layout and value encoding; the one place that knows how bytes are laid out.

    m:schema                     -> schema version (ASCII integer)
    m:records, m:users           -> counters (ASCII integers), updated in the same batch
    m:heal                       -> empty; rewritten to test the database after a failed write
    p:<user_id>                  -> the user's profile (JSON)
    r:<record_id><user_id>       -> the record (checksummed JSON); record ids sort by time
    u:<user_id>\\0<record_id>     -> [test_name, tag] (JSON): per-user index with its filter fields
    i:<user_id>\\0<request_id>    -> {"record_id", "timestamp"} (JSON): idempotency index
    d:<record_id>                -> deletion time (RFC 3339): tombstone of a deleted record
    a:<audit_id>                 -> an audit entry (JSON) of a deletion; ids sort by time like record ids

Record ids (perfdb.records.record_ids) sort by time, so the record keyspace is the time index.
A record's own key and every index entry derived from it come from record_entries(), the one
place used both to write a record and to delete it, so a new index is removed with its record.
The idempotency entry is not among them: it is written only for a user's first use of a
request_id, so it is removed with a record only when it names that record.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from typing import Any

import orjson

from perfdb.records.record_ids import RECORD_ID_CHARS, make_record_id

SCHEMA_VERSION = 1

SCHEMA_KEY = b"m:schema"
RECORD_COUNT_KEY = b"m:records"
USER_COUNT_KEY = b"m:users"
HEAL_PROBE_KEY = b"m:heal"  # written (empty) to test LevelDB's health after a failed write
PROFILE_PREFIX = b"p:"
RECORD_PREFIX = b"r:"
USER_INDEX_PREFIX = b"u:"
IDEMPOTENCY_PREFIX = b"i:"
TOMBSTONE_PREFIX = b"d:"
AUDIT_PREFIX = b"a:"
SEPARATOR = b"\x00"

_CHECKSUM = struct.Struct(">I")


class CorruptValueError(ValueError):
    """A stored value whose checksum does not match its bytes."""


def time_bound(micros: int) -> bytes:
    """The smallest record id (as bytes) at or after `micros`."""
    return make_record_id(micros, 0).encode()


def profile_key(user_id: str) -> bytes:
    return PROFILE_PREFIX + user_id.encode()


def record_key(record_id: str, user_id: str) -> bytes:
    return RECORD_PREFIX + record_id.encode() + user_id.encode()


RECORD_ID_END = len(RECORD_PREFIX) + RECORD_ID_CHARS  # record key bytes up to here are prefix and id


def split_record_key(key: bytes) -> tuple[str, str]:
    """(record_id, user_id) of a record key."""
    start = len(RECORD_PREFIX)
    return key[start : start + RECORD_ID_CHARS].decode(), key[start + RECORD_ID_CHARS :].decode()


def user_index_prefix(user_id: str) -> bytes:
    return USER_INDEX_PREFIX + user_id.encode() + SEPARATOR


def record_entries(record_id: str, record: Mapping[str, Any], sealed: bytes) -> list[tuple[bytes, bytes]]:
    """Every key the layout derives from a record, with its value: the record itself (`sealed`,
    see seal) first, then its index entries. `record` is the stored record document (at least
    user_id, test_name and tag). Writing a record puts all of them; deleting it removes all of them."""
    user_id = record["user_id"]
    return [
        (record_key(record_id, user_id), sealed),
        (user_index_prefix(user_id) + record_id.encode(), orjson.dumps([record["test_name"], record["tag"]])),
    ]


def record_keys(record_id: str, record: Mapping[str, Any]) -> list[bytes]:
    """The keys of record_entries, for deleting a record."""
    return [key for key, _ in record_entries(record_id, record, b"")]


def tombstone_key(record_id: str) -> bytes:
    return TOMBSTONE_PREFIX + record_id.encode()


def audit_key(audit_id: str) -> bytes:
    return AUDIT_PREFIX + audit_id.encode()


def idempotency_key(user_id: str, request_id: str) -> bytes:
    return IDEMPOTENCY_PREFIX + user_id.encode() + SEPARATOR + request_id.encode()


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (prefixes here never end in 0xff)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def seal(document: bytes) -> bytes:
    """Prefix a value with the CRC-32 of its bytes, so damage is detected on read."""
    return _CHECKSUM.pack(zlib.crc32(document)) + document


def unseal(value: bytes) -> memoryview:
    """The document inside a sealed value, without copying it; raises CorruptValueError if damaged."""
    if len(value) < _CHECKSUM.size:
        raise CorruptValueError("value shorter than its checksum")
    document = memoryview(value)[_CHECKSUM.size :]
    if _CHECKSUM.unpack_from(value)[0] != zlib.crc32(document):
        raise CorruptValueError("checksum mismatch")
    return document
