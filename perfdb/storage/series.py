"""A metric's values over time, downsampled into equal time buckets.

A series read gathers the records it admits into columns (SeriesColumns: times, record ids, test
names and each metric's values, oldest first) and buckets them with numpy in one pass per metric:
count, min, max, mean and the exact median of each bucket. Every bucket keeps its min and max, so
the range's extreme values always survive; a bucket of one record names that record.

The columns of a user's or a test's index (the entries carry their records' numbers, layout.py)
are kept in memory once read (SeriesCache), within a byte budget, least recently used first out:
the next read of that user or test reads only the entries written since (a user's page over
20,000 results then costs the bucketing, not 20,000 LevelDB reads). Appending is the only change
the cache follows; a write that changes an index anywhere else (a deletion, a record filed at an
earlier time) makes every cached index be read again (SeriesCache.epoch).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from perfdb.records.record_ids import RECORD_ID_CHARS
from perfdb.records.timestamps import format_micros
from perfdb.records.units import CORE_METRIC_NAMES

Floats = npt.NDArray[np.float64]
Flags = npt.NDArray[np.bool_]
Codes = npt.NDArray[np.int32]
Micros = npt.NDArray[np.int64]

# Bytes a cached index entry takes in memory: time, record id, three name codes, and each core
# metric's value and kind (SeriesCache counts other metrics at their own size).
_ROW_BYTES = 8 + RECORD_ID_CHARS + 3 * 4 + len(CORE_METRIC_NAMES) * 9
_CORE_COUNT = len(CORE_METRIC_NAMES)


@dataclasses.dataclass(frozen=True, slots=True)
class BucketGrid:
    """Equal time buckets: bucket i covers [start + i * width, start + (i + 1) * width), the last
    one cut at `end`."""

    start: int  # microseconds, inclusive
    end: int  # microseconds, exclusive
    width: int  # microseconds, at least 1

    @classmethod
    def spanning(cls, start: int, end: int, buckets: int) -> BucketGrid:
        """At most `buckets` buckets over [start, end), as narrow as that allows."""
        return cls(start, end, max(1, -(-(end - start) // buckets)))

    @property
    def count(self) -> int:
        return -(-(self.end - self.start) // self.width)

    def bucket_of(self, micros: int) -> int:
        return (micros - self.start) // self.width

    def bounds(self, bucket: int) -> tuple[int, int]:
        low = self.start + bucket * self.width
        return low, min(self.end, low + self.width)


class BucketBounds:
    """Each bucket's `since` and `until` as RFC 3339, formatted once a read for all its series."""

    __slots__ = ("_formatted", "grid")

    def __init__(self, grid: BucketGrid) -> None:
        self.grid = grid
        self._formatted: dict[int, tuple[str, str]] = {}

    def __call__(self, bucket: int) -> tuple[str, str]:
        formatted = self._formatted.get(bucket)
        if formatted is None:
            since, until = self.grid.bounds(bucket)
            formatted = self._formatted[bucket] = (format_micros(since), format_micros(until))
        return formatted


@dataclasses.dataclass(frozen=True, slots=True)
class MetricColumn:
    """One metric's value in each row: NaN where the record has no number; `integral` says which
    numbers were stored as JSON integers, so that a value goes back out as it came in."""

    values: Floats
    integral: Flags

    def take(self, rows: npt.NDArray[np.intp]) -> MetricColumn:
        return MetricColumn(self.values[rows], self.integral[rows])


@dataclasses.dataclass(frozen=True, slots=True)
class SeriesColumns:
    """The records of a series read, oldest first: time, record id, test and metric values."""

    micros: Micros
    record_ids: npt.NDArray[np.bytes_]
    tests: Codes  # codes into test_names
    test_names: list[str]
    metrics: Mapping[str, MetricColumn]

    def __len__(self) -> int:
        return len(self.micros)

    def take(self, rows: npt.NDArray[np.intp], metrics: Iterable[str]) -> SeriesColumns:
        """These rows (in this order) with these metrics."""
        return SeriesColumns(
            self.micros[rows],
            self.record_ids[rows],
            self.tests[rows],
            self.test_names,
            {metric: self.metrics[metric].take(rows) for metric in metrics if metric in self.metrics},
        )

    def by_test(self, max_tests: int) -> tuple[dict[str, SeriesColumns], bool]:
        """Each test's rows, of the `max_tests` tests whose newest record is newest, and whether
        any test was left out."""
        rows = {code: np.flatnonzero(self.tests == code) for code in np.unique(self.tests).tolist()}
        kept = sorted(rows, key=lambda code: -rows[code][-1])[:max_tests]  # rows are oldest first
        metrics = list(self.metrics)
        return {self.test_names[code]: self.take(rows[code], metrics) for code in kept}, len(kept) < len(rows)


class RowGatherer:
    """Builds SeriesColumns from records met one at a time (a walk that reads tag index entries or
    records), newest first, keeping only the metrics asked for."""

    def __init__(self, metrics: Iterable[str]) -> None:
        self._metrics = list(metrics)
        self._record_ids: list[str] = []
        self._tests: list[int] = []
        self._test_codes: dict[str, int] = {}
        self._values: list[list[Any]] = [[] for _ in metrics]

    def add(self, record_id: str, test_name: str, numbers: Any) -> None:
        """A record's id, test and numeric metrics (anything with .get(name))."""
        self._record_ids.append(record_id)
        code = self._test_codes.get(test_name)
        if code is None:
            code = self._test_codes[test_name] = len(self._test_codes)
        self._tests.append(code)
        for values, metric in zip(self._values, self._metrics, strict=True):
            values.append(numbers.get(metric))

    def columns(self) -> SeriesColumns:
        record_ids = np.array(self._record_ids[::-1], dtype=f"S{RECORD_ID_CHARS}")
        return SeriesColumns(
            _micros_of(record_ids),
            record_ids,
            np.array(self._tests[::-1], dtype=np.int32),
            list(self._test_codes),
            {metric: _metric_column(values[::-1]) for metric, values in zip(self._metrics, self._values, strict=True)},
        )


_HEX_PLACES = 16 ** np.arange(13, -1, -1, dtype=np.int64)


def _micros_of(record_ids: npt.NDArray[np.bytes_]) -> Micros:
    """The time part of each record id: its first 14 hex digits (perfdb.records.record_ids)."""
    digits = np.frombuffer(record_ids.tobytes(), dtype=np.uint8).reshape(len(record_ids), RECORD_ID_CHARS)[:, :14]
    values = np.where(digits >= ord("a"), digits - (ord("a") - 10), digits - ord("0")).astype(np.int64)
    return values @ _HEX_PLACES


def _metric_column(values: list[Any]) -> MetricColumn:
    """A column from Python values: numbers (not bools) kept, anything else missing."""
    kept = [value if type(value) in (int, float) else None for value in values]
    return MetricColumn(
        np.array(kept, dtype=np.float64),
        np.fromiter((type(value) is int for value in kept), dtype=np.bool_, count=len(kept)),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class IndexColumns:
    """Every entry of a user's or a test's index, oldest first, with the fields a read filters on:
    the series a read takes from it with `select`."""

    series: SeriesColumns
    users: Codes
    user_names: list[str]
    tags: Codes
    tag_names: list[str]
    entries: int  # entries read, damaged ones included: the index's count when nothing was missed

    @property
    def bytes(self) -> int:
        extra = sum(column.values.nbytes * 2 for name, column in self.series.metrics.items() if name not in _CORE_SET)
        return len(self.series) * _ROW_BYTES + extra

    def select(
        self, user_id: str | None, test_name: str | None, tag: str | None, since: int | None, until: int | None,
        limit: int, metrics: Iterable[str],
    ) -> tuple[SeriesColumns, int, bool]:  # fmt: skip
        """(the matching rows within since..until, entries examined, complete) as a walk newest
        first over the index would find them, examining at most `limit` entries of the range."""
        micros = self.series.micros
        low = 0 if since is None else int(np.searchsorted(micros, since, side="left"))
        high = len(micros) if until is None else int(np.searchsorted(micros, until, side="left"))
        examined = high - low
        complete = examined <= limit
        if not complete:
            low, examined = high - limit, limit
        admitted = np.ones(high - low, dtype=np.bool_)
        for codes, names, wanted in (
            (self.users, self.user_names, user_id),
            (self.series.tests, self.series.test_names, test_name),
            (self.tags, self.tag_names, tag),
        ):
            if wanted is not None:
                admitted &= codes[low:high] == _code(names, wanted)
        rows = np.flatnonzero(admitted) + low
        return self.series.take(rows, metrics), examined, complete

    def extended(self, newer: IndexColumns) -> IndexColumns:
        """These entries followed by `newer`'s (read after the last of these)."""
        users, user_names = _merged_codes(self.users, self.user_names, newer.users, newer.user_names)
        tags, tag_names = _merged_codes(self.tags, self.tag_names, newer.tags, newer.tag_names)
        tests, test_names = _merged_codes(
            self.series.tests, self.series.test_names, newer.series.tests, newer.series.test_names
        )
        metrics: dict[str, MetricColumn] = {}
        for name in {*self.series.metrics, *newer.series.metrics}:
            metrics[name] = MetricColumn(
                np.concatenate([_column(self.series, name).values, _column(newer.series, name).values]),
                np.concatenate([_column(self.series, name).integral, _column(newer.series, name).integral]),
            )
        series = SeriesColumns(
            np.concatenate([self.series.micros, newer.series.micros]),
            np.concatenate([self.series.record_ids, newer.series.record_ids]),
            tests,
            test_names,
            metrics,
        )
        return IndexColumns(series, users, user_names, tags, tag_names, self.entries + newer.entries)


_CORE_SET = frozenset(CORE_METRIC_NAMES)


def _code(names: list[str], name: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        return -1  # matches no row


def _merged_codes(codes: Codes, names: list[str], more: Codes, more_names: list[str]) -> tuple[Codes, list[str]]:
    merged = list(names)
    positions = {name: position for position, name in enumerate(merged)}
    for name in more_names:
        if name not in positions:
            positions[name] = len(merged)
            merged.append(name)
    renumber = np.array([positions[name] for name in more_names] or [0], dtype=np.int32)
    return np.concatenate([codes, renumber[more] if len(more) else more]), merged


def _column(series: SeriesColumns, name: str) -> MetricColumn:
    column = series.metrics.get(name)
    if column is not None:
        return column
    return MetricColumn(np.full(len(series), np.nan), np.zeros(len(series), dtype=np.bool_))


def index_columns(
    entries: list[tuple[bytes, bytes]], by_user: bool, name: str, skip_damaged: Callable[[bytes], None]
) -> IndexColumns | None:
    """The columns of user (by_user) or test index entries of `name`, oldest first, decoded in one
    orjson call; None if an entry does not carry its record's metrics (then only the record has
    them). A damaged entry is passed to skip_damaged and left out."""
    try:
        decoded = orjson.loads(b"[" + b",".join(value for _, value in entries) + b"]")
    except orjson.JSONDecodeError:
        decoded = None
    kept_keys: list[bytes] = []
    rows: list[list[Any]] = []
    if decoded is not None and len(decoded) == len(entries):
        pairs: Iterable[tuple[bytes, Any]] = zip((key for key, _ in entries), decoded, strict=True)
    else:  # find the damaged ones
        pairs = _decoded_one_by_one(entries, skip_damaged)
    for key, row in pairs:
        if not (type(row) is list and len(row) == 4 and type(row[0]) is str and type(row[1]) is str):
            if type(row) is list and len(row) == 2:
                return None  # an entry from before its index carried metrics
            skip_damaged(key)
            continue
        if type(row[2]) is not list or type(row[3]) is not dict:
            skip_damaged(key)
            continue
        kept_keys.append(key)
        rows.append(row)
    record_ids = np.array([key[-RECORD_ID_CHARS:] for key in kept_keys], dtype=f"S{RECORD_ID_CHARS}")
    firsts, first_names = _codes_of([row[0] for row in rows])
    tags, tag_names = _codes_of([row[1] for row in rows])
    owner = np.zeros(len(rows), dtype=np.int32)
    metrics = _core_columns([row[2] for row in rows])
    others: dict[str, list[Any]] = {}
    for position, row in enumerate(rows):
        for metric, value in row[3].items():
            column = others.get(metric)
            if column is None:
                column = others[metric] = [None] * len(rows)
            column[position] = value
    for metric, values in others.items():
        metrics.setdefault(metric, _metric_column(values))
    tests, test_names = (firsts, first_names) if by_user else (owner, [name])
    users, user_names = (owner, [name]) if by_user else (firsts, first_names)
    series = SeriesColumns(_micros_of(record_ids), record_ids, tests, test_names, metrics)
    return IndexColumns(series, users, user_names, tags, tag_names, len(entries))


def _decoded_one_by_one(
    entries: list[tuple[bytes, bytes]], skip_damaged: Callable[[bytes], None]
) -> Iterable[tuple[bytes, Any]]:
    for key, value in entries:
        try:
            yield key, orjson.loads(value)
        except orjson.JSONDecodeError:
            skip_damaged(key)


def _codes_of(names: list[str]) -> tuple[Codes, list[str]]:
    positions: dict[str, int] = {}
    codes = np.fromiter(
        (positions.setdefault(name, len(positions)) for name in names), dtype=np.int32, count=len(names)
    )
    return codes, list(positions)


def _core_columns(cores: list[Any]) -> dict[str, MetricColumn]:
    """The core metrics' columns from each entry's values by position (shorter lists: missing)."""
    rows = len(cores)
    if not all(type(core) is list and len(core) == _CORE_COUNT for core in cores):
        padding = [None] * _CORE_COUNT
        cores = [(core + padding)[:_CORE_COUNT] if type(core) is list else padding for core in cores]
    flat = [value if type(value) in (int, float) else None for core in cores for value in core]
    values = np.array(flat, dtype=np.float64).reshape(rows, _CORE_COUNT)
    integral = np.fromiter((type(value) is int for value in flat), dtype=np.bool_, count=len(flat))
    integral = integral.reshape(rows, _CORE_COUNT)
    return {
        metric: MetricColumn(np.ascontiguousarray(values[:, position]), np.ascontiguousarray(integral[:, position]))
        for position, metric in enumerate(CORE_METRIC_NAMES)
    }


def metric_fields(
    columns: SeriesColumns, metric: str, bounds: BucketBounds, *, as_columns: bool = False
) -> dict[str, Any]:
    """One metric's series reply fields (protocol_spec.md section 3.14) over the grid of `bounds`:
    its non-empty buckets as point objects, or (as_columns) as one array per statistic."""
    column = columns.metrics.get(metric)
    rows = np.zeros(0, dtype=np.intp) if column is None else np.flatnonzero(~np.isnan(column.values))
    if column is None or len(rows) == 0:
        return empty_series(as_columns)
    values, integral = column.values[rows], column.integral[rows]
    micros = columns.micros[rows]
    grid = bounds.grid
    buckets = (micros - grid.start) // grid.width
    starts = np.flatnonzero(np.concatenate(([True], buckets[1:] != buckets[:-1])))
    counts = np.diff(np.append(starts, len(values)))
    ends = starts + counts
    order = bucket_order(values, buckets, starts, counts)
    ranked, ranked_integral = values[order], integral[order]
    odd = counts % 2 == 1
    upper = starts + counts // 2
    lower = upper - 1 + odd
    medians = np.where(odd, ranked[upper], (ranked[lower] + ranked[upper]) / 2)
    lows = _numbers(ranked[starts], ranked_integral[starts])
    highs = _numbers(ranked[ends - 1], ranked_integral[ends - 1])
    statistics = {
        "bucket": buckets[starts].tolist(),
        "count": counts.tolist(),
        "min": lows,
        "median": _numbers(medians, odd & ranked_integral[upper]),
        "max": highs,
        "mean": (np.add.reduceat(values, starts) / counts).tolist(),
    }
    singles = np.flatnonzero(counts == 1)
    single_ids = columns.record_ids[rows[starts[singles]]].tolist()
    single_times = formatted_micros(micros[starts[singles]])
    fields: dict[str, Any] = {
        "count": len(values),
        "first": format_micros(int(micros[0])),
        "last": format_micros(int(micros[-1])),
        "min": _extreme(columns, rows, column, int(np.argmin(values))),  # the first: the oldest on a tie
        "max": _extreme(columns, rows, column, int(np.argmax(values))),
        "exact_medians": True,
    }
    if as_columns:
        record_ids: list[str | None] = [None] * len(starts)
        timestamps: list[str | None] = [None] * len(starts)
        for position, record_id, timestamp in zip(singles.tolist(), single_ids, single_times, strict=True):
            record_ids[position] = record_id.decode()
            timestamps[position] = timestamp
        fields["columns"] = {**statistics, "record_id": record_ids, "timestamp": timestamps}
        return fields
    points: list[dict[str, Any]] = []
    for bucket, count, low, median, high, mean in zip(
        statistics["bucket"], statistics["count"], lows, statistics["median"], highs, statistics["mean"], strict=True
    ):
        since, until = bounds(bucket)
        points.append(
            {"bucket": bucket, "since": since, "until": until, "count": count, "min": low, "median": median,
             "max": high, "mean": mean}
        )  # fmt: skip
    for position, record_id, timestamp in zip(singles.tolist(), single_ids, single_times, strict=True):
        points[position].update(record_id=record_id.decode(), timestamp=timestamp, value=lows[position])
    fields["points"] = points
    return fields


def bucket_order(values: Floats, buckets: npt.NDArray[np.int64], starts: Micros, counts: Micros) -> Micros:
    """The positions of `values` bucket by bucket, each bucket's by value (equal values oldest first): what
    np.lexsort((values, buckets)) gives for buckets in order. A bucket rarely holds more than a few records, so
    they are sorted as the rows of a matrix as wide as the fullest bucket: lexsort took half of a series read,
    and this takes less than half of lexsort's time on a year's chart. A bucket far fuller than the others (a
    burst) would make that matrix too big: lexsort then."""
    widest = int(counts.max())
    if widest * len(counts) > 4 * len(values) + 4096:
        return np.lexsort((values, buckets))
    rows = np.repeat(np.arange(len(counts)), counts)
    columns = np.arange(len(values)) - np.repeat(starts, counts)
    padded = np.full((len(counts), widest), np.inf)  # the values are finite: the padding sorts last
    padded[rows, columns] = values
    ranked = np.argsort(padded, axis=1, kind="stable")
    return (starts[:, None] + ranked)[np.arange(widest) < counts[:, None]]


def formatted_micros(micros: npt.NDArray[np.int64]) -> list[str]:
    """format_micros of each moment, in one numpy call: a year's chart has a single result in most of
    its buckets, and formatting their times one by one took half of a series read."""
    text = np.datetime_as_string(micros.astype("datetime64[us]"), unit="us")
    return [moment + "Z" for moment in text.tolist()]


def _numbers(values: Floats, integral: Flags) -> list[int | float]:
    """The values, those that were JSON integers as ints again."""
    if not integral.any():  # the usual case: measurements with a fraction
        listed: list[int | float] = values.tolist()
        return listed
    return [int(value) if whole else value for value, whole in zip(values.tolist(), integral.tolist(), strict=True)]


def _extreme(columns: SeriesColumns, rows: npt.NDArray[np.intp], column: MetricColumn, at: int) -> dict[str, Any]:
    row = rows[at]
    value = column.values[row].item()
    return {
        "value": int(value) if column.integral[row] else value,
        "record_id": columns.record_ids[row].decode(),
        "timestamp": format_micros(int(columns.micros[row])),
    }


_EMPTY_COLUMNS = ("bucket", "count", "min", "median", "max", "mean", "record_id", "timestamp")


def empty_series(as_columns: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"count": 0, "first": None, "last": None, "min": None, "max": None, "exact_medians": True}
    if as_columns:
        fields["columns"] = {name: [] for name in _EMPTY_COLUMNS}
    else:
        fields["points"] = []
    return fields


@dataclasses.dataclass(frozen=True, slots=True)
class CachedIndex:
    columns: IndexColumns
    last_key: bytes  # the newest entry read
    epoch: int


class SeriesCache:
    """The columns of the user and test indexes read lately, at most `max_bytes` of them.

    `epoch` moves whenever a write changes an index other than by appending to it (the writer
    calls invalidate after committing it); an entry read under another epoch is read again. A read
    takes the epoch before its snapshot, so an entry it stores can only be older than the epoch."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[bytes, CachedIndex] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.epoch = 0
        self.hits = 0
        self.misses = 0

    def invalidate(self) -> None:
        with self._lock:
            self.epoch += 1
            self._entries.clear()
            self._bytes = 0

    def fits(self, entries: int) -> bool:
        """Whether an index of this many entries is worth caching (at most a quarter of the budget)."""
        return entries * _ROW_BYTES * 4 <= self.max_bytes

    def get(self, prefix: bytes, epoch: int) -> CachedIndex | None:
        with self._lock:
            cached = self._entries.get(prefix)
            if cached is None or cached.epoch != epoch:
                self.misses += 1
                return None
            self._entries.move_to_end(prefix)
            self.hits += 1
            return cached

    def put(self, prefix: bytes, cached: CachedIndex) -> None:
        size = cached.columns.bytes
        with self._lock:
            if cached.epoch != self.epoch or size * 4 > self.max_bytes:
                return
            old = self._entries.pop(prefix, None)
            if old is not None:
                self._bytes -= old.columns.bytes
                if old.columns.entries > cached.columns.entries:  # a read from an older snapshot
                    cached = old
                    size = old.columns.bytes
            self._entries[prefix] = cached
            self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.columns.bytes

    @property
    def cached_bytes(self) -> int:
        return self._bytes
