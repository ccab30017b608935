"""Regression detection's state in the server: the verdict windows, the series waiting for change-point analysis,
and reading a series' points back from the database.

The writer's verdict thread judges each new record after its batch is durable (before its ack resolves) against the
window BEFORE the record joins it, and hands the verdicts back to the writer to store (StoredVerdicts); a record
sent with `baseline_tag` is judged against that tag's window and joins its own tag's. The windows are rebuilt from
the database at start and, for one series, after an exclusion, an `expected` alert or a deletion (`forget_records`).
Every method is safe from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson
import plyvel

from perfdb.regression.direction import direction_of
from perfdb.regression.series import SeriesKey, SeriesWindows
from perfdb.regression.thresholds import ThresholdConfig
from perfdb.regression.verdicts import VerdictBatch, VerdictShapeCache, VerdictShapes, packed_head
from perfdb.storage import layout

log = logging.getLogger("perfdb.detection")

# A series read for a rebuild or an analysis walks at most this many of its user's index entries.
SERIES_SCAN_BUDGET = 200_000
_MAX_PLANS = 10_000
DEFAULT_MAX_SERIES = 100_000  # windows of 30 points: about 100 MB at this many series


@dataclasses.dataclass(frozen=True, slots=True)
class StoredPoint:
    """One record of a series as stored: its id, its metrics and the directions it declared."""

    record_id: str
    metrics: Mapping[str, Any]
    better: Mapping[str, Any] | None


class CommittedRecord(NamedTuple):
    """A durable record for the verdict windows: `judged` ones get verdicts and join, the rest (imports) join."""

    user_id: str
    record_id: str
    test_name: str
    tag: str
    metrics: Mapping[str, float]
    better: Mapping[str, object] | None
    baseline_tag: str | None
    judged: bool


@dataclasses.dataclass(slots=True)
class StoredVerdicts:
    """The verdicts of judged batches, handed to the writer to store (it is the only writer) as one write item:
    (record id, user id, layout.verdicts_value) each, and how many batches that removed records the writer had
    committed when the first of those batches was (a record can only be gone if another has been since). Nobody
    waits for it: a crash before it is committed leaves those records without stored verdicts."""

    entries: list[tuple[str, str, bytes]]
    removals_seen: int

    @classmethod
    def of(cls, judged: Iterable[tuple[str, str, JudgedVerdicts | None]], removals_seen: int) -> StoredVerdicts | None:
        """The verdicts to store of judged records ((record id, user id, their verdicts as judge_committed gave
        them) each; a record without verdicts, such as a duplicate resend, has none). None if none."""
        entries = [
            (record_id, user_id, layout.verdicts_value(verdicts.packed))
            for record_id, user_id, verdicts in judged
            if verdicts is not None
        ]
        return cls(entries, removals_seen) if entries else None


# A judged record's queued metrics, as VerdictBatch.add_record takes them: their verdict shapes, their values, where
# their baseline summaries will be in what SeriesWindows.summaries gives, and the packed head (None: not made yet).
_QueuedRecord = tuple[list[VerdictShapes], list[float], int, bytes | None]
# A record's plan (RegressionDetector._plan): its metrics' verdict shapes, their packed head, their windows and
# the plan's key.
_Plan = tuple[list[VerdictShapes], bytes | None, list[int], tuple[str, ...] | None]


class JudgedVerdicts(NamedTuple):
    """A record's verdicts: the JSON array its ack carries, and the packed numbers stored (about a ninth of it)."""

    json: bytes
    packed: bytes


class RegressionDetector:
    """See the module docstring. `enabled` False (no --regression-detection, the default): no verdicts, no windows."""

    def __init__(self, thresholds: ThresholdConfig, max_series: int, *, enabled: bool = True) -> None:
        self._thresholds = thresholds
        self.enabled = enabled
        self.windows = SeriesWindows(max_series)
        self._shapes = VerdictShapeCache()
        # (test name, *metric names) -> the verdict shapes of each metric and their packed head, for records
        # declaring no directions
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._lock = threading.Lock()
        # (user_id, test_name, tag) -> metrics of it that received records, oldest group first
        self._dirty: dict[tuple[str, str, str], set[str]] = {}
        # Series whose baseline restarts at a record (an `expected` alert): record ids before it are left out.
        self._baseline_starts: dict[SeriesKey, str] = {}
        # Told (on the verdict thread) when a committed batch made some series dirty; the alert monitor sets it.
        self.dirty_listener: Callable[[], None] | None = None

    @property
    def thresholds(self) -> ThresholdConfig:
        return self._thresholds

    @thresholds.setter
    def thresholds(self, thresholds: ThresholdConfig) -> None:
        """Set at start, from the override file; the models cached per test go with the old ones."""
        with self._lock:
            self._thresholds = thresholds
            self._plans.clear()
            self.windows.forget_plans()

    def window_for(self, test_name: str, metric: str) -> int:
        return self.thresholds.model_for(test_name, metric).window

    # -- the writer's verdict thread --------------------------------------------------------------------------------

    def judge_batch(self, records: Sequence[CommittedRecord]) -> list[bytes | None]:
        """Each committed record's verdicts, in order, as the JSON array to send (one per metric, in the record's
        order; None for a record only joining, or whose verdicts failed), each judged against its windows as the
        records before it left them, then joining its own. One lock for the whole batch."""
        return [None if verdicts is None else verdicts.json for verdicts in self.judge_committed(records)]

    def judge_committed(self, records: Sequence[CommittedRecord]) -> list[JudgedVerdicts | None]:
        """judge_batch, with each record's verdicts packed to store too (the writer's verdict thread). Each record's
        points are queued on the windows in commit order (its baselines, then its points joining); the windows make
        the batch's summaries at once (SeriesWindows.summaries), then the verdicts are decided and encoded at once
        (VerdictBatch)."""
        if not self.enabled:
            return [None] * len(records)
        queued: list[_QueuedRecord | None] = []  # None: a record that only joined, or whose metrics failed
        with self._lock:
            for record in records:
                try:
                    if record.judged:
                        queued.append(self._queue_record(record))
                        continue
                    queued.append(None)
                    self._join_all(record)
                except Exception:  # the record is durable: a failed verdict must not fail its ack
                    failed = "verdicts of record %s failed" if record.judged else "record %s did not join its windows"
                    log.exception(failed, record.record_id)
                    if record.judged:
                        queued.append(None)
            counts, summaries = self.windows.summaries()
        try:
            batch = VerdictBatch()
            for entry in queued:
                if entry is not None:
                    batch.add_record(*entry)
            finished = iter(batch.finish(counts, summaries))
        except Exception:  # the records are durable and joined their windows: acknowledged without verdicts
            log.exception("verdicts of a batch of %d records failed", len(records))
            return [None] * len(records)
        return [None if entry is None else JudgedVerdicts(*next(finished)) for entry in queued]

    def _queue_record(self, record: CommittedRecord) -> _QueuedRecord:
        """Queue the record's baselines and points; what its verdicts are made of then."""
        group = (record.user_id, record.test_name, record.tag)
        metrics = record.metrics
        judged_tag = None if record.baseline_tag is None or record.baseline_tag == record.tag else record.baseline_tag
        shapes, packed, windows, plan = self._plan(record.test_name, metrics, record.better)
        values = list(map(float, metrics.values()))
        baseline_group = None if judged_tag is None else (record.user_id, record.test_name, judged_tag)
        try:
            if all(map(math.isfinite, values)):
                start = self.windows.queue(group, baseline_group, record.record_id, metrics, values, windows, plan=plan)
            else:  # judged before it joins: a bad value stays out of the window, the metrics before it join
                bad = next(index for index, value in enumerate(values) if not math.isfinite(value))
                names = list(metrics)[:bad]
                self.windows.queue(group, None, record.record_id, names, values[:bad], windows[:bad], summarise=False)
                raise ValueError(f"the value judged must be a finite number, not {values[bad]}")
        finally:  # the metrics that joined before a failure are new points for the analysis too
            self._mark_all(group, metrics)
        return shapes, values, start, packed

    def _plan(self, test_name: str, metrics: Mapping[str, float], better: Mapping[str, object] | None) -> _Plan:
        """Each metric's verdict shapes (model and direction) in the record's order, the packed verdicts' head of
        them, each metric's window and the plan's key: the same for every record of a test with the same metrics
        and no declared directions, so those are made once (for the others the batch makes the head, and the
        windows look their series up each time: the key is None)."""
        key = (test_name, *metrics)
        plan = self._plans.get(key) if better is None else None
        if plan is None:
            model_for, shapes = self.thresholds.model_for, self._shapes.shapes
            made = [shapes(direction_of(metric, better), model_for(test_name, metric)) for metric in metrics]
            windows = [shape.model.window for shape in made]
            if better is not None:
                return made, None, windows, None
            if len(self._plans) >= _MAX_PLANS:  # many test names: start again rather than grow without end
                self._plans.clear()
            plan = self._plans[key] = (made, packed_head(made), windows, key)
        return plan

    def _join_all(self, record: CommittedRecord) -> None:
        # An import may restore a record older than the window's newest: it stays out of the window until the
        # series is next rebuilt (at start, say), since a window holds the newest records in time order. Queued
        # like a judged record's points (a batch may hold both); in the windows at the next summaries().
        _, _, windows, plan = self._plan(record.test_name, record.metrics, None)
        values = list(map(float, record.metrics.values()))
        group = (record.user_id, record.test_name, record.tag)
        self.windows.queue(group, None, record.record_id, record.metrics, values, windows, summarise=False, plan=plan)
        self._mark_all(group, record.metrics)

    def batch_committed(self) -> None:
        """Called by the writer after the judged records' acks are on their way."""
        listener = self.dirty_listener
        if listener is not None and self._dirty:
            listener()

    def _mark_all(self, group: tuple[str, str, str], metrics: Iterable[str]) -> None:
        dirty = self._dirty.get(group)
        if dirty is None:
            self._dirty[group] = set(metrics)
        else:
            dirty.update(metrics)

    def _mark(self, key: SeriesKey) -> None:
        metrics = self._dirty.get(key[:3])
        if metrics is None:
            self._dirty[key[:3]] = {key.metric}
        else:
            metrics.add(key.metric)

    # -- the alert monitor ------------------------------------------------------------------------------------

    def take_dirty(self, most: int) -> list[SeriesKey]:
        """About `most` of the series that received records since they were last taken, whole users' tests and
        tags at a time (they are read together), those dirty longest first; the rest stay for the next call."""
        taken: list[SeriesKey] = []
        with self._lock:
            while self._dirty and len(taken) < most:
                group = next(iter(self._dirty))
                taken.extend(SeriesKey(*group, metric) for metric in sorted(self._dirty.pop(group)))
        return taken

    @property
    def dirty_count(self) -> int:
        """Users' tests and tags with series waiting."""
        return len(self._dirty)

    def mark_dirty(self, keys: Iterable[SeriesKey]) -> None:
        with self._lock:
            for key in keys:
                self._mark(key)

    # -- rebuilding (executor threads) --------------------------------------------------------------------------

    def set_baseline_start(self, key: SeriesKey, record_id: str | None) -> None:
        with self._lock:
            if record_id is None:
                self._baseline_starts.pop(key, None)
            else:
                self._baseline_starts[key] = max(record_id, self._baseline_starts.get(key, ""))

    def baseline_start(self, key: SeriesKey) -> str:
        with self._lock:
            return self._baseline_starts.get(key, "")

    def load(self, db: plyvel.DB, excluded: Callable[[str], bool]) -> None:
        """Fill the windows from the database at start: the newest `window` unexcluded records of each series,
        for the `max_series` series written most recently. One pass over the records, newest first."""
        if not self.enabled:
            return
        collected: dict[SeriesKey, list[tuple[str, float]]] = {}
        with db.iterator(prefix=layout.RECORD_PREFIX, reverse=True, fill_cache=False) as records:
            for key, value in records:
                record_id, user_id = layout.split_record_key(key)
                if excluded(record_id):
                    continue
                document = _decode(value)
                if document is None:
                    continue
                test_name, tag = document.get("test_name"), document.get("tag", "")
                metrics = document.get("metrics")
                if not isinstance(test_name, str) or not isinstance(metrics, dict):
                    continue
                for metric, metric_value in metrics.items():
                    series = SeriesKey(user_id, test_name, tag, metric)
                    points = collected.get(series)
                    if points is None:
                        if len(collected) >= self.windows.max_series:
                            continue
                        points = collected[series] = []
                    if len(points) < self.window_for(test_name, metric) and record_id >= self._baseline_starts.get(
                        series, ""
                    ):
                        points.append((record_id, float(metric_value)))
        with self._lock:
            # Oldest series first, so the least recently written are the first evicted later.
            for series, points in sorted(collected.items(), key=lambda item: item[1][0][0] if item[1] else ""):
                window = self.window_for(series.test_name, series.metric)
                for record_id, metric_value in reversed(points):
                    self.windows.append(series, record_id, metric_value, window)

    def rebuild(self, db: plyvel.DB, keys: Iterable[SeriesKey], excluded: Callable[[str], bool]) -> None:
        """Re-read these series' windows from the database (after an exclusion, an expected alert, a deletion).

        Records committed while the series is read stay in the window: the newer points of the old window are
        kept on top of what was read, unless `excluded` (or before the baseline start).
        """
        if not self.enabled:
            return
        for key in keys:
            window = self.window_for(key.test_name, key.metric)
            snapshot = db.snapshot()
            try:
                stored = read_series(snapshot, key, excluded, limit=window, start=self.baseline_start(key))
            finally:
                snapshot.close()
            with self._lock:
                newest_read = stored[-1].record_id if stored else ""
                start = self._baseline_starts.get(key, "")
                later = [
                    point
                    for point in self.windows.points(key)
                    if point.record_id > newest_read and point.record_id >= start and not excluded(point.record_id)
                ]
                self.windows.discard(key)
                for stored_point in stored:
                    self.windows.append(key, stored_point.record_id, float(stored_point.metrics[key.metric]), window)
                for point in later:
                    self.windows.append(key, point.record_id, point.value, window)
                self._mark(key)

    def forget_user(self, user_id: str) -> None:
        """Drop every window of a deleted user (their records are all gone)."""
        with self._lock:
            for key in [key for key in self.windows if key.user_id == user_id]:
                self.windows.discard(key)

    def series_of_records(self, user_id: str, record_ids: Iterable[str]) -> set[SeriesKey]:
        """The windowed series of this user that hold any of these records."""
        wanted = set(record_ids)
        with self._lock:
            return {
                key
                for key in self.windows
                if key.user_id == user_id and any(point.record_id in wanted for point in self.windows.points(key))
            }


def read_series(
    snapshot: plyvel.Snapshot,
    key: SeriesKey,
    excluded: Callable[[str], bool],
    *,
    limit: int,
    start: str = "",
    metrics: Collection[str] = (),
) -> list[StoredPoint]:
    """The newest `limit` stored records of the series that have its metric (or any of `metrics`, to read
    several series of one user, test and tag at once), oldest first; excluded records and records before
    `start` (a record id) left out. Walks the user's index, at most SERIES_SCAN_BUDGET entries."""
    wanted_metrics = set(metrics) or {key.metric}
    user_prefix = layout.user_index_prefix(key.user_id)
    wanted = layout.index_entry_head(key.test_name, key.tag)
    points: list[StoredPoint] = []
    lower = user_prefix + start.encode() if start else user_prefix
    scanned = 0
    with snapshot.iterator(start=lower, stop=layout.prefix_end(user_prefix), reverse=True) as entries:
        for index_key, index_value in entries:
            scanned += 1
            if scanned > SERIES_SCAN_BUDGET or len(points) == limit:
                break
            if not index_value.startswith(wanted):
                continue
            record_id = layout.index_record_id(index_key)
            if excluded(record_id):
                continue
            document = _decode(snapshot.get(layout.record_key(record_id, key.user_id)))
            if document is None:
                continue
            values = document.get("metrics")
            if isinstance(values, dict) and not wanted_metrics.isdisjoint(values):
                better = document.get("better")
                points.append(StoredPoint(record_id, values, better if isinstance(better, dict) else None))
    points.reverse()
    return points


def _decode(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        document = orjson.loads(layout.unseal(value))
    except (layout.CorruptValueError, orjson.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None
