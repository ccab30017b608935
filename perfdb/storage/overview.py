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

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

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


def bucket_of(value: float) -> int:
    """The histogram bucket of a value: bucket i covers [BUCKET_BOUNDS[i-1], BUCKET_BOUNDS[i])."""
    return bisect.bisect_right(BUCKET_BOUNDS, value)


def bucket_range(bucket: int) -> tuple[float | None, float | None]:
    """[lower, upper) of a bucket; None for the open ends."""
    lower = BUCKET_BOUNDS[bucket - 1] if bucket > 0 else None
    upper = BUCKET_BOUNDS[bucket] if bucket < len(BUCKET_BOUNDS) else None
    return lower, upper


class MetricSummary:
    """One metric of one test: the aggregates of every value recorded for it."""

    __slots__ = ("buckets", "count", "maximum", "minimum", "total", "users")

    def __init__(self) -> None:
        self.count = 0
        self.minimum = math.inf
        self.maximum = -math.inf
        self.total: float = 0
        self.buckets: dict[int, int] = {}  # bucket -> values in it; only non-empty ones
        self.users: dict[str, list[Any]] = {}  # user -> [count, min, max]

    def add(self, user_id: str, value: float) -> None:
        self.count += 1
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        self.total += value
        bucket = bucket_of(value)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
        mine = self.users.get(user_id)
        if mine is None:
            self.users[user_id] = [1, value, value]
        else:
            mine[0] += 1
            mine[1] = min(mine[1], value)
            mine[2] = max(mine[2], value)

    def to_fields(self, better: str) -> dict[str, Any]:
        return {
            "count": self.count,
            "min": self.minimum,
            "max": self.maximum,
            "sum": self.total,
            "mean": self.total / self.count,
            "histogram": [[*bucket_range(bucket), self.buckets[bucket]] for bucket in sorted(self.buckets)],
            "users": {
                user_id: {"count": count, "best": low if better == "lower" else high}
                for user_id, (count, low, high) in sorted(self.users.items())
            },
        }


Row = tuple[str, str, Mapping[str, Any]]  # a record as the overview sees it: (test_name, user_id, metrics)


class _Snapshot(Protocol):
    def close(self) -> None: ...


_S = TypeVar("_S", bound=_Snapshot)


class Overview:
    """Aggregates by test name, then metric name; safe to read while the writer adds to it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._tests: dict[str, dict[str, MetricSummary]] = {}
        self._records: dict[str, int] = {}  # records per test, whatever their metrics
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
            with self._lock:
                for name in tests:
                    added_since = self._rebuilding.pop(name)
                    self._tests.pop(name, None)
                    self._records.pop(name, None)
                    if name in fresh._records:
                        self._tests[name] = fresh._tests[name]
                        self._records[name] = fresh._records[name]
                    self._add(added_since)
            return len(tests)

    def _add(self, rows: Iterable[Row]) -> None:
        """add, with the lock held."""
        for test_name, user_id, metrics in rows:
            added_since = self._rebuilding.get(test_name)
            if added_since is not None:
                added_since.append((test_name, user_id, metrics))
            self._records[test_name] = self._records.get(test_name, 0) + 1
            summaries = self._tests.get(test_name)
            if summaries is None:
                summaries = self._tests[test_name] = {}
            for metric, value in metrics.items():
                if type(value) not in (int, float):  # stored metrics are numbers; be sure
                    continue
                summary = summaries.get(metric)
                if summary is None:
                    summary = summaries[metric] = MetricSummary()
                summary.add(user_id, value)

    def report(self, test_name: str | None, metric: str) -> dict[str, Any]:
        """The overview reply's fields: every test (or just `test_name`) that has `metric`."""
        better = better_direction(metric)
        with self._lock:
            names = sorted(self._tests) if test_name is None else [test_name]
            tests: dict[str, Any] = {}
            for name in names:
                summary = self._tests.get(name, {}).get(metric)
                if summary is not None:
                    tests[name] = {"records": self._records[name], **summary.to_fields(better)}
        return {"metric": metric, "better": better, "tests": tests}
