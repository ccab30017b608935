"""The LevelDB key layout and value encoding; the one place that knows how bytes are laid out.

    m:schema                     -> schema version (ASCII integer)
    m:records, m:users           -> counters (ASCII integers), updated in the same batch
    m:heal                       -> empty; rewritten to test the database after a failed write
    m:upgrade                    -> the last record key an unfinished schema upgrade indexed
    p:<user_id>                  -> the user's profile (JSON)
    r:<record_id><user_id>       -> the record (checksummed JSON); record ids sort by time
    u:<user_id>\\0<record_id>     -> [test_name, tag, [core metric values], {metric: number}] (JSON):
                                    per-user index with its filter fields and the record's numeric
                                    metrics (schema 3; see EntryMetrics)
    t:<test_name>\\0<record_id>   -> [user_id, tag, [core metric values], {metric: number}] (JSON):
                                    per-test index (schema 2; its metrics since schema 3)
    g:<tag>\\0<record_id>         -> [user_id, test_name] (JSON): per-tag index (schema 2)
    s:<metric>\\0<value><record_id> -> [user_id, test_name, tag] (JSON): per-core-metric index
                                    (schema 2): <value> is 8 bytes that sort as the numbers do
                                    (sortable_number)
    s:<metric>\\1<record_id>     -> [user_id, test_name, tag] (JSON): the records lacking that
                                    core metric (or holding a non-number there), in id order
    c:u<user_id>, c:t<test_name>, c:g<tag>
                                 -> how many records each index holds under that name (ASCII integer)
    i:<user_id>\\0<request_id>    -> {"record_id", "timestamp"} (JSON): idempotency index
    d:<record_id>                -> {"time", "user_id"} (JSON): tombstone of a deleted record and
                                    whose it was (user_id null if unknown: imported); older
                                    tombstones hold only the deletion time (RFC 3339)
    a:<audit_id>                 -> an audit entry (JSON) of a deletion; ids sort by time like record ids
    e:<record_id>                -> {"note", "excluded_at", "excluded_by"} (JSON): the record is left out of
                                    baselines and alerts (the record itself is never rewritten)
    w:<alert_id>                 -> the alert (JSON); alert ids sort by creation time like record ids
    x:<record_id>                -> the record's samples (checksummed JSON), when it has any: kept out of
                                    the record so that table reads never decode them
    n:<user_id>\\0<test_name>\\0<tag>\\0<metric>\\0<record_id>
                                 -> alert_id: the change point at that record already has its alert
    v:<record_id>                -> the verdicts its record reply carried (checksummed): the numbers they were
                                    built from, packed (perfdb/regression/verdicts.py; verdicts_json gives
                                    the JSON back), or, if stored before that form, the JSON array; written in a
                                    write batch after the record's

Record ids (perfdb.records.record_ids) sort by time and are unique across users, so the record
keyspace is the time index, and each index lists its records in time order too. Each index entry
carries the other filter fields, so a combined filter is decided without fetching the record; the
user and test index entries also carry every metric of the record whose value is a number (an int
or a float, not a bool), so series and sorted reads over them read no record (decoding an entry
takes 1-2 us, fetching and decoding the record 20-40 us). The core metrics are held by position
(in CORE_METRIC_NAMES order; null where the record has no number), which keeps each entry about
120 bytes long where the metrics by name took 260.
Every key derived from a record comes from record_index_entries, record_keys and record_counts,
the one place used to write a record, delete it, upgrade an older database and repair one, so a
new index is removed with its record. The idempotency entry is not among them: it is written only
for a user's first use of a request_id, so it is removed with a record only when it names it.
A deletion leaves a tombstone (d:) and an audit entry (a:); tombstones travel with exports.

Schema history: 1 had the user index only; 2 added the test, tag and core-metric indexes, the
test and tag counts, tombstones and audit entries (an older database is upgraded when opened, see
ResultStore; it has no tombstones or audit entries, and the upgrade leaves those prefixes alone);
3 added the numeric metrics to the user and test index entries (the upgrade from 2 rewrites those
entries and nothing else).
Exclusions (e:), alerts (w:), alerted change points (n:) and verdicts (v:) need no schema change:
the upgrade leaves them alone, and repair only drops verdicts whose record is gone. A record's
verdicts are among record_keys, so they are removed with it.
"""

from __future__ import annotations

import functools
import operator
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import orjson

from perfdb.records.record_ids import RECORD_ID_CHARS, make_record_id
from perfdb.records.units import CORE_METRIC_NAMES
from perfdb.regression.verdicts import unpack_verdicts

SCHEMA_VERSION = 3

SCHEMA_KEY = b"m:schema"
RECORD_COUNT_KEY = b"m:records"
USER_COUNT_KEY = b"m:users"
HEAL_PROBE_KEY = b"m:heal"  # written (empty) to test LevelDB's health after a failed write
UPGRADE_RESUME_KEY = b"m:upgrade"
PROFILE_PREFIX = b"p:"
RECORD_PREFIX = b"r:"
USER_INDEX_PREFIX = b"u:"
IDEMPOTENCY_PREFIX = b"i:"
TEST_INDEX_PREFIX = b"t:"
TAG_INDEX_PREFIX = b"g:"
METRIC_INDEX_PREFIX = b"s:"
COUNT_PREFIX = b"c:"
TOMBSTONE_PREFIX = b"d:"
AUDIT_PREFIX = b"a:"
EXCLUSION_PREFIX = b"e:"
ALERT_PREFIX = b"w:"  # not a: (the audit log's)
ALERTED_POINT_PREFIX = b"n:"
VERDICTS_PREFIX = b"v:"
SAMPLES_PREFIX = b"x:"
SEPARATOR = b"\x00"

_CHECKSUM = struct.Struct(">I")
_DOUBLE = struct.Struct(">d")
_BITS = struct.Struct(">Q")
_SIGN_BIT = 1 << 63
_ALL_BITS = (1 << 64) - 1
SORTABLE_NUMBER_BYTES = _BITS.size
INDEXED_METRICS = CORE_METRIC_NAMES  # the metrics with an index each (sorted reads walk it)
# The user and test index entries hold the core metrics by position in this order (see EntryMetrics):
# part of the stored format, so a new core metric goes at the end.
_CORE = CORE_METRIC_NAMES
_CORE_POSITIONS = {name: position for position, name in enumerate(_CORE)}
_NUMBER_TYPES = frozenset((float, int))  # by type(), so not bool
_LACKING = b"\x01"  # after SEPARATOR: a metric index's entries of records without the metric


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


def test_index_prefix(test_name: str) -> bytes:
    return TEST_INDEX_PREFIX + test_name.encode() + SEPARATOR


def tag_index_prefix(tag: str) -> bytes:
    return TAG_INDEX_PREFIX + tag.encode() + SEPARATOR


def metric_index_prefix(metric: str) -> bytes:
    """The prefix of a core metric's index entries of records that have the metric."""
    return METRIC_INDEX_PREFIX + metric.encode() + SEPARATOR


def metric_lacking_prefix(metric: str) -> bytes:
    """The prefix of a core metric's index entries of records that lack it."""
    return METRIC_INDEX_PREFIX + metric.encode() + _LACKING


def sortable_number(value: float) -> bytes:
    """8 bytes that compare as the numbers do: the IEEE double with its sign bit set for a
    positive number and every bit flipped for a negative one (-0.0 is stored as 0.0)."""
    bits: int = _BITS.unpack(_DOUBLE.pack(float(value) + 0.0))[0]
    return _BITS.pack(bits ^ _ALL_BITS if bits & _SIGN_BIT else bits | _SIGN_BIT)


def sortable_number_value(encoded: bytes) -> float:
    """The number that sortable_number encoded."""
    bits: int = _BITS.unpack(encoded)[0]
    value: float = _DOUBLE.unpack(_BITS.pack(bits ^ _SIGN_BIT if bits & _SIGN_BIT else bits ^ _ALL_BITS))[0]
    return value


# (metric, prefix of its entries, prefix of the entries of records that lack it), per indexed metric.
_METRIC_INDEX_PREFIXES = tuple(
    (metric, metric_index_prefix(metric), metric_lacking_prefix(metric)) for metric in INDEXED_METRICS
)


# For record_index_entries' path of records with every indexed metric, none negative.
_ALL_DOUBLES = struct.Struct(f">{len(INDEXED_METRICS)}d")
_ALL_SIGN_BITS = sum(_SIGN_BIT << (64 * place) for place in range(len(INDEXED_METRICS)))
_PRESENT_PREFIXES = tuple(
    (place * SORTABLE_NUMBER_BYTES, present) for place, (_, present, _) in enumerate(_METRIC_INDEX_PREFIXES)
)


def metric_number(metrics: object, metric: str) -> int | float | None:
    """A record's value of a metric if it is a number (bools are not), else None."""
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    return value if type(value) in (int, float) else None


def user_count_key(user_id: str) -> bytes:
    return COUNT_PREFIX + b"u" + user_id.encode()


def test_count_key(test_name: str) -> bytes:
    return COUNT_PREFIX + b"t" + test_name.encode()


def tag_count_key(tag: str) -> bytes:
    return COUNT_PREFIX + b"g" + tag.encode()


@functools.lru_cache(maxsize=4096)
def _index_heads(user_id: str, test_name: str, tag: str) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes]:
    """What a record's index entries share with every record of the same user, test and tag: the
    user, test and tag index prefixes, each followed by its entries' value (for the user and test
    entries its index_entry_head, the array left open for the record's numbers), then the metric entries'
    value. Cached: a writer's batch holds many records of few such triples."""
    return (
        user_index_prefix(user_id),
        index_entry_head(test_name, tag),
        test_index_prefix(test_name),
        index_entry_head(user_id, tag),
        tag_index_prefix(tag),
        orjson.dumps([user_id, test_name]),
        orjson.dumps([user_id, test_name, tag]),
    )


def record_index_entries(
    record_id: str, user_id: str, test_name: str, tag: str, metrics: object
) -> list[tuple[bytes, bytes]]:
    """The index entries (key, value) of a record: the one place that derives them. `metrics` is
    the record's metrics object (anything else: it lacks every metric)."""
    rid = record_id.encode()
    user_prefix, user_head, test_prefix, test_head, tag_prefix, tag_value, fields = _index_heads(
        user_id, test_name, tag
    )
    values: dict[str, Any] = metrics if isinstance(metrics, dict) else {}
    # The numbers encoded once for the user and test entries and spliced into each array; type()
    # not isinstance(): a bool is no number.
    core = list(map(values.get, _CORE))
    every_core_number = _NUMBER_TYPES.issuperset(map(type, core))
    if not every_core_number:  # a core metric missing, or not a number
        core = [value if type(value) is float or type(value) is int else None for value in core]
    others = {}
    if len(values) > len(core) - core.count(None):  # metrics besides the core ones' numbers
        others = {
            name: value
            for name, value in values.items()
            if name not in _CORE_POSITIONS and (type(value) is float or type(value) is int)
        }
    numbers_tail = orjson.dumps(core) + b"," + orjson.dumps(others) + b"]"
    entries = [
        (user_prefix + rid, user_head + numbers_tail),
        (test_prefix + rid, test_head + numbers_tail),
        (tag_prefix + rid, tag_value),
    ]
    append = entries.append
    # The common record has every core metric, each a number of at least zero: its sortable numbers
    # come from one pack of all of them and one XOR setting their sign bits (as sortable_number does
    # for such a number), rather than three struct calls a metric.
    if every_core_number:
        packed = int.from_bytes(_ALL_DOUBLES.pack(*core))  # every int fits: JSON parsing keeps them to 64 bits
        if not packed & _ALL_SIGN_BITS:  # none negative, nor -0.0 (stored as 0.0)
            sortable = (packed | _ALL_SIGN_BITS).to_bytes(_ALL_DOUBLES.size)
            for offset, present in _PRESENT_PREFIXES:
                append((present + sortable[offset : offset + SORTABLE_NUMBER_BYTES] + rid, fields))
            return entries
    get = values.get
    # sortable_number inlined, with the prefixes computed once.
    pack_double, unpack_bits, pack_bits = _DOUBLE.pack, _BITS.unpack, _BITS.pack
    for metric, present, lacking in _METRIC_INDEX_PREFIXES:
        number: Any = get(metric)
        kind = type(number)
        if kind is float or kind is int:
            bits: int = unpack_bits(pack_double(number + 0.0))[0]
            append((present + pack_bits(bits ^ _ALL_BITS if bits & _SIGN_BIT else bits | _SIGN_BIT) + rid, fields))
        else:
            append((lacking + rid, fields))
    return entries


def record_keys(record_id: str, user_id: str, test_name: str, tag: str, metrics: object) -> list[bytes]:
    """Every key a record owns: the record itself, its verdicts, its index entries, then its
    samples' key (the verdicts' and samples' keys hold nothing when it has none); not its
    idempotency key, which only records with a request_id have (see idempotency_key)."""
    entries = record_index_entries(record_id, user_id, test_name, tag, metrics)
    return [
        record_key(record_id, user_id),
        verdicts_key(record_id),
        *(key for key, _ in entries),
        samples_key(record_id),
    ]


def record_keys_by_id(record_id: str, user_id: str) -> list[bytes]:
    """The keys of a record that its id and user alone give: what is removed of a record too
    damaged to say its test, tag and metrics (perfdb repair rebuilds the rest)."""
    return [
        record_key(record_id, user_id),
        user_index_prefix(user_id) + record_id.encode(),
        verdicts_key(record_id),
        samples_key(record_id),
    ]


def samples_key(record_id: str) -> bytes:
    return SAMPLES_PREFIX + record_id.encode()


def record_counts(user_id: str, test_name: str, tag: str) -> list[bytes]:
    """The count keys a record adds one to (and its removal takes one from)."""
    return [user_count_key(user_id), test_count_key(test_name), tag_count_key(tag)]


def index_fields(prefix: bytes, value: bytes) -> tuple[str, str, str]:
    """(user_id, test_name, tag) of a record, from one of its index entries and the index's prefix
    (user_index_prefix, test_index_prefix or tag_index_prefix of the name it is filed under, or
    any prefix of a metric index)."""
    user_id, test_name, tag, _ = index_entry(prefix, value)
    return user_id, test_name, tag


class EntryMetrics:
    """A record's numeric metrics as a user or test index entry holds them: the core metrics by
    position in CORE_METRIC_NAMES (None where the record has no number; a core metric added to the
    end of that list later is among the others in older entries), the other metrics by name."""

    __slots__ = ("_core", "_others")

    def __init__(self, core: list[int | float | None], others: dict[str, int | float]) -> None:
        self._core = core
        self._others = others

    def get(self, name: str) -> int | float | None:
        position = _CORE_POSITIONS.get(name)
        if position is not None and position < len(self._core):
            return self._core[position]
        return self._others.get(name)


# (user_id, test_name, tag, numeric metrics or None) of a record, from one of its index entries.
IndexEntry = tuple[str, str, str, EntryMetrics | None]


def index_entry(prefix: bytes, value: bytes) -> IndexEntry:
    """(user_id, test_name, tag, numeric metrics) of a record from one of its index entries, as
    index_fields; the metrics are None where the entry does not carry them (a tag or metric index
    entry), and then only the record has them. Raises ValueError or TypeError if it is damaged."""
    return index_entry_reader(prefix)(value)


def index_entry_reader(prefix: bytes) -> Callable[[bytes], IndexEntry]:
    """index_entry for the entries under one prefix, with what the prefix says worked out once:
    a walk calls it for every entry."""
    loads = orjson.loads
    if prefix.startswith(METRIC_INDEX_PREFIX):

        def metric_entry(value: bytes) -> IndexEntry:
            user_id, test_name, tag = loads(value)
            return user_id, test_name, tag, None

        return metric_entry
    name = prefix[2:-1].decode()
    if prefix.startswith(TAG_INDEX_PREFIX):

        def tag_entry(value: bytes) -> IndexEntry:
            user_id, test_name = loads(value)
            return user_id, test_name, name, None

        return tag_entry
    by_user = prefix.startswith(USER_INDEX_PREFIX)

    def user_or_test_entry(value: bytes) -> IndexEntry:
        first, second, *rest = loads(value)  # rest: [core values, {other metrics}] (schema 3), or nothing
        numbers = None
        if len(rest) == 2 and type(rest[0]) is list and type(rest[1]) is dict:
            numbers = EntryMetrics(rest[0], rest[1])
        return (name, first, second, numbers) if by_user else (first, name, second, numbers)

    return user_or_test_entry


def index_entry_head(*leading: str) -> bytes:
    """The bytes every user or test index entry value whose first fields are these begins with (a
    user index entry's test name and tag, a test index entry's user id): a walk matches a filter by
    it before decoding the entry. (A JSON string ends at its first unescaped quote, so no other
    fields begin the same way.)"""
    return orjson.dumps(list(leading))[:-1] + b","


def index_record_id(key: bytes) -> str:
    """The record id at the end of an index entry's key."""
    return key[-RECORD_ID_CHARS:].decode()


def read_count(value: bytes | None) -> int:
    """A stored count; a damaged one reads as 0 (perfdb repair rewrites it)."""
    try:
        return int(value or b"0")
    except ValueError:
        return 0


def tombstone_key(record_id: str) -> bytes:
    return TOMBSTONE_PREFIX + record_id.encode()


def tombstone_value(deleted_at: str, user_id: str | None) -> bytes:
    """A tombstone: when the record was deleted and whose it was (None: not known here)."""
    return orjson.dumps({"time": deleted_at, "user_id": user_id})


def tombstone_owner(value: bytes) -> str | None:
    """The user id a tombstone says owned the deleted record; None for an older tombstone (the
    bare deletion time), one that does not know, or a damaged one."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    owner = document.get("user_id") if isinstance(document, dict) else None
    return owner if isinstance(owner, str) else None


def audit_key(audit_id: str) -> bytes:
    return AUDIT_PREFIX + audit_id.encode()


def idempotency_key(user_id: str, request_id: str) -> bytes:
    return IDEMPOTENCY_PREFIX + user_id.encode() + SEPARATOR + request_id.encode()


def exclusion_key(record_id: str) -> bytes:
    return EXCLUSION_PREFIX + record_id.encode()


def alert_key(alert_id: str) -> bytes:
    return ALERT_PREFIX + alert_id.encode()


def alerted_point_key(user_id: str, test_name: str, tag: str, metric: str, record_id: str) -> bytes:
    return ALERTED_POINT_PREFIX + SEPARATOR.join(part.encode() for part in (user_id, test_name, tag, metric, record_id))


def verdicts_key(record_id: str) -> bytes:
    return VERDICTS_PREFIX + record_id.encode()


def verdicts_value(verdicts: bytes | Sequence[Mapping[str, object]]) -> bytes:
    """A record's verdicts as stored, sealed: packed (perfdb/regression/verdicts.py; what the server stores), or, as
    before the packed form, the JSON array of them (given encoded, or to encode)."""
    return seal(verdicts if isinstance(verdicts, bytes) else orjson.dumps(verdicts))


def verdicts_json(value: bytes) -> bytes:
    """The JSON array of the verdicts a stored value holds, packed or JSON; CorruptValueError if damaged."""
    document = unseal(value)
    if document[:1].tobytes() == b"[":  # stored before the packed form
        return document.tobytes()
    try:
        return unpack_verdicts(document)
    except ValueError as exc:  # sealed, so written so: by a newer server, say
        raise CorruptValueError(str(exc)) from None


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


_AFTER_CHECKSUM = operator.itemgetter(slice(_CHECKSUM.size, None))
_VIEW = cast("Callable[[bytes], memoryview]", memoryview)  # for map(): typeshed's memoryview is generic
_STORED_CHECKSUM = operator.itemgetter(0)


def unseal_all(values: Sequence[bytes]) -> list[bytes | memoryview] | None:
    """The documents inside sealed values, without copying them, each checked as unseal checks
    it; None if any of them is damaged (unseal each to know which). One pass of C calls over the
    values rather than Python code per value: a full scan's pages of thousands of records."""
    documents: list[bytes | memoryview] = list(map(_AFTER_CHECKSUM, map(_VIEW, values)))
    try:
        stored = map(_STORED_CHECKSUM, map(_CHECKSUM.unpack_from, values))
        intact = all(map(operator.eq, stored, map(zlib.crc32, documents)))
    except struct.error:  # a value shorter than its checksum
        return None
    return documents if intact else None
