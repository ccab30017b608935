"""Per-test, per-metric aggregates (count, min, max, sum, a log-bucket histogram, each user's
range), kept in memory so an overview costs per test, not per record.

They are derived data: rebuilt from the records when the store opens (one pass, in the thread
that opens it) and updated by the writer after each committed batch, so they can never disagree
with what is stored after a crash, and the record layout needs no second copy of the metrics.
Memory grows with tests x metrics x (non-empty buckets + users), not with records.

A deletion cannot be taken back from a min, a max or a user's best, so the writer marks the tests
it removed records from as stale, and rebuild_stale recomputes each from the test's index in a
snapshot taken between two batches; what the writer adds meanwhile is added again on top.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from perfdb.records.units import CORE_METRICS

# Histogram buckets: 8 per decade from 1e-3 to 1e12 (each about 1.33 times the one before);
# bucket 0 holds everything below 1e-3 (zero and negatives too), the last one 1e12 and above.
BUCKETS_PER_DECADE = 8
_LOWEST_EXPONENT, _HIGHEST_EXPONENT = -3, 12
BUCKET_BOUNDS: tuple[float, ...] = tuple(
    10 ** (step / BUCKETS_PER_DECADE)
    for step in range(_LOWEST_EXPONENT * BUCKETS_PER_DECADE, _HIGHEST_EXPONENT * BUCKETS_PER_DECADE + 1)
)

# Which way is better: throughput up, latency and CPU time down; metrics we do not know, up.
_LOWER_IS_BETTER = frozenset(metric.name for metric in CORE_METRICS if metric.unit in ("us", "percent"))


def better_direction(metric: str) -> str:
    return "lower" if metric in _LOWER_IS_BETTER else "higher"


_BOUNDS = np.array(BUCKET_BOUNDS)
# Rows wait in a list until a report needs them or this many have come, then are added in bulk:
# per value, numpy's reductions cost a small fraction of adding them one by one in Python.
PENDING_ROWS = 10_000


def bucket_range(bucket: int) -> tuple[float | None, float | None]:
    """[lower, upper) of a bucket; None for the open ends."""
    lower = BUCKET_BOUNDS[bucket - 1] if bucket > 0 else None
    upper = BUCKET_BOUNDS[bucket] if bucket < len(BUCKET_BOUNDS) else None
    return lower, upper


class MetricSummary:
    """One metric of one test: the aggregates of every value recorded for it. Each user's count,
    min and max sit in arrays indexed by the test's user index (see _TestAggregates)."""

    __slots__ = ("buckets", "count", "maximum", "minimum", "total", "user_counts", "user_highs", "user_lows")

    def __init__(self) -> None:
        self.count = 0
        self.minimum = math.inf
        self.maximum = -math.inf
        self.total: float = 0
        self.buckets: dict[int, int] = {}  # bucket -> values in it; only non-empty ones
        self.user_counts = np.zeros(0, dtype=np.int64)
        self.user_lows = np.zeros(0)
        self.user_highs = np.zeros(0)

    def add_values(self, values: npt.NDArray[np.float64], users: npt.NDArray[np.intp], known_users: int) -> None:
        """Add values (none missing), each of the user at that place of `users` (indexes below known_users)."""
        self.count += int(values.size)
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        self.total += float(values.sum())
        buckets = np.bincount(np.searchsorted(_BOUNDS, values, side="right"))
        for bucket in np.flatnonzero(buckets).tolist():
            self.buckets[bucket] = self.buckets.get(bucket, 0) + int(buckets[bucket])
        grown = known_users - self.user_counts.size
        if grown > 0:
            self.user_counts = np.concatenate((self.user_counts, np.zeros(grown, dtype=np.int64)))
            self.user_lows = np.concatenate((self.user_lows, np.full(grown, np.inf)))
            self.user_highs = np.concatenate((self.user_highs, np.full(grown, -np.inf)))
        self.user_counts += np.bincount(users, minlength=known_users)
        np.minimum.at(self.user_lows, users, values)
        np.maximum.at(self.user_highs, users, values)

    def counts_user(self, index: int | None) -> bool:
        """Whether the user at this index of the test's users has a value of this metric."""
        return index is not None and index < self.user_counts.size and bool(self.user_counts[index])

    def to_fields(self, better: str, user_ids: list[str], only: int | None = None) -> dict[str, Any]:
        """The overview's fields for this metric; user_ids names the test's user indexes, `only`
        is the one user index to list, one that counts_user (None: every user with a value)."""
        best = self.user_lows if better == "lower" else self.user_highs
        chosen = np.flatnonzero(self.user_counts).tolist() if only is None else [only]
        counts, values = self.user_counts[chosen].tolist(), best[chosen].tolist()
        users = {
            user_ids[index]: {"count": count, "best": value}
            for index, count, value in zip(chosen, counts, values, strict=True)
        }
        return {
            "count": self.count,
            "min": self.minimum,
            "max": self.maximum,
            "sum": self.total,
            "mean": self.total / self.count,
            "histogram": [[*bucket_range(bucket), self.buckets[bucket]] for bucket in sorted(self.buckets)],
            "users": dict(sorted(users.items())),
        }


class _TestAggregates:
    """One test's aggregates: its record count, its users' indexes, and a summary per metric."""

    __slots__ = ("metrics", "records", "user_ids", "user_index")

    def __init__(self) -> None:
        self.records = 0
        self.user_index: dict[str, int] = {}
        self.user_ids: list[str] = []  # index -> user id
        self.metrics: dict[str, MetricSummary] = {}

    def indexes_of(self, user_ids: list[str]) -> npt.NDArray[np.intp]:
        index = self.user_index
        codes = []
        for user_id in user_ids:
            code = index.get(user_id)
            if code is None:
                code = index[user_id] = len(self.user_ids)
                self.user_ids.append(user_id)
            codes.append(code)
        return np.array(codes, dtype=np.intp)


Row = tuple[str, str, Mapping[str, Any]]  # a record as the overview sees it: (test_name, user_id, metrics)


class _Snapshot(Protocol):
    def close(self) -> None: ...


_S = TypeVar("_S", bound=_Snapshot)


class Overview:
    """Aggregates by test name, then metric name; safe to read while the writer adds to it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._tests: dict[str, _TestAggregates] = {}
        self._pending: list[Row] = []  # rows added but not yet in the aggregates (see _fold)
        self._writing = False  # a batch is being written: its rows are in the database, not here yet
        self._stale: set[str] = set()  # tests whose aggregates a deletion left wrong
        self._rebuilding: dict[str, list[Row]] = {}  # test -> rows added since its rebuild's snapshot
        self._rebuild_lock = threading.Lock()  # one rebuild at a time, and reports wait for it

    @property
    def has_stale(self) -> bool:
        """Whether some test waits for a rebuild or is being rebuilt (a report should wait for it)."""
        return bool(self._stale or self._rebuilding)

    def add(self, rows: Iterable[Row]) -> None:
        """Count records given as (test_name, user_id, metrics)."""
        with self._lock:
            self._add(rows)

    def batch_writing(self) -> None:
        """The writer is about to write a batch (see batch_written)."""
        with self._lock:
            self._writing = True

    def batch_written(self, rows: Iterable[Row], removed_from: Iterable[str]) -> None:
        """The writer's batch is written (or failed: no rows then): count the records it added, and
        mark the tests it removed records from as stale."""
        with self._lock:
            self._add(rows)
            self._stale.update(removed_from)
            self._writing = False
            self._lock.notify_all()

    def rebuild_stale(self, take_snapshot: Callable[[], _S], rows_of: Callable[[_S, str], Iterable[Row]]) -> int:
        """Recompute every stale test from `rows_of(snapshot, test_name)`, with a snapshot taken
        between two batches; returns how many tests it rebuilt. Blocking: call it off the event loop."""
        with self._rebuild_lock:
            with self._lock:
                if not self._stale:
                    return 0
                while self._writing:
                    self._lock.wait()
                self._fold()  # rows from before the snapshot: the rebuild replaces them
                snapshot = take_snapshot()
                tests, self._stale = self._stale, set()
                self._rebuilding.update((name, []) for name in tests)
            fresh = Overview()
            try:
                for name in tests:
                    fresh.add(rows_of(snapshot, name))
            except BaseException:
                with self._lock:
                    self._stale.update(tests)
                    for name in tests:
                        del self._rebuilding[name]
                raise
            finally:
                snapshot.close()
            fresh._fold()
            with self._lock:
                self._fold()  # rows added since the snapshot: their tests get them again below
                for name in tests:
                    added_since = self._rebuilding.pop(name)
                    self._tests.pop(name, None)
                    if name in fresh._tests:
                        self._tests[name] = fresh._tests[name]
                    self._add(added_since)
            return len(tests)

    def _add(self, rows: Iterable[Row]) -> None:
        """add, with the lock held: the rows wait in _pending (see PENDING_ROWS)."""
        if self._rebuilding:
            rows = list(rows)
            for row in rows:
                added_since = self._rebuilding.get(row[0])
                if added_since is not None:
                    added_since.append(row)
        self._pending.extend(rows)
        if len(self._pending) >= PENDING_ROWS:
            self._fold()

    def _fold(self) -> None:
        """Add the pending rows to the aggregates, with the lock held."""
        rows, self._pending = self._pending, []
        by_test: dict[str, list[Row]] = {}
        for row in rows:
            group = by_test.get(row[0])
            if group is None:
                by_test[row[0]] = [row]
            else:
                group.append(row)
        for test_name, group in by_test.items():
            aggregates = self._tests.get(test_name)
            if aggregates is None:
                aggregates = self._tests[test_name] = _TestAggregates()
            aggregates.records += len(group)
            users = aggregates.indexes_of([user_id for _, user_id, _ in group])
            known_users = len(aggregates.user_ids)
            metrics = [row[2] for row in group]
            names = sorted(set().union(*metrics))
            if not names:
                continue
            table = _table(names, metrics)
            for column, metric in enumerate(names):
                if table is not None:
                    values, whose = table[:, column], users
                else:
                    values = _numbers(metric, metrics)
                    present = ~np.isnan(values)
                    if not present.any():
                        continue
                    values, whose = values[present], users[present]
                summary = aggregates.metrics.get(metric)
                if summary is None:
                    summary = aggregates.metrics[metric] = MetricSummary()
                summary.add_values(values, whose, known_users)

    def report(self, test_name: str | None, metric: str, user_id: str | None = None) -> dict[str, Any]:
        """The overview reply's fields: every test (or just `test_name`) that has `metric`; with
        user_id, only the tests where that user has it, each listing only that user."""
        better = better_direction(metric)
        with self._lock:
            self._fold()
            names = sorted(self._tests) if test_name is None else [test_name]
            tests: dict[str, Any] = {}
            for name in names:
                aggregates = self._tests.get(name)
                summary = aggregates.metrics.get(metric) if aggregates is not None else None
                if aggregates is None or summary is None:
                    continue
                only = None if user_id is None else aggregates.user_index.get(user_id)
                if user_id is not None and not summary.counts_user(only):
                    continue
                fields = summary.to_fields(better, aggregates.user_ids, only)
                tests[name] = {"records": aggregates.records, **fields}
        return {"metric": metric, "better": better, "tests": tests}


def _table(names: list[str], metrics: list[Mapping[str, Any]]) -> npt.NDArray[np.float64] | None:
    """Every row's values of every metric named, a row each, when every row has them all (the
    common case: one harness writes one test's records); otherwise None."""
    if len(names) == 1:
        get = operator.itemgetter(names[0])
        try:
            return np.array([[get(row)] for row in metrics], dtype=np.float64)
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
    getter = operator.itemgetter(*names)
    try:
        table = np.array([getter(row) for row in metrics], dtype=np.float64)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return table if table.ndim == 2 and not np.isnan(table).any() else None


def _numbers(metric: str, metrics: list[Mapping[str, Any]]) -> npt.NDArray[np.float64]:
    """Each row's value of the metric as a float; NaN where it has none (or not a number)."""
    try:
        return np.array([row.get(metric, math.nan) for row in metrics], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # stored metrics are numbers; be sure
        return np.array([_as_float(row.get(metric)) for row in metrics], dtype=np.float64)


def _as_float(value: Any) -> float:
    if type(value) not in (int, float):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an integer past the largest double
        return math.nan
