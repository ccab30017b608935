"""Alerts: change points in the worse direction, found by analysing series that received records, stored under
their own prefix (a:) with their state, never twice for the same change point (n:).

Everything here runs on the store's reader threads (LevelDB reads, the analysis, alert writes); the alert
monitor (perfdb.storage.monitor) decides when. An alert is created only from records read from the database,
so it never points at a record that was not stored.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import plyvel

from perfdb.protocol.errors import ErrorCode, PerfdbError
from perfdb.records.record_ids import RecordIdClock, record_id_micros
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.regression.changepoints import ChangePointAnalysis, analyse, extend_analysis
from perfdb.regression.direction import direction_of
from perfdb.regression.series import SeriesKey
from perfdb.storage import layout
from perfdb.storage.detection import RegressionDetector, StoredPoint, read_series

log = logging.getLogger("perfdb.alerts")

ALERT_STATES = ("open", "acknowledged", "expected", "resolved")
# A series is analysed over at most its newest this many records: bounds the time one series takes
# (the analysis is O(n * window): about 10 ms for 500 points).
ANALYSIS_HISTORY = 500
# An alerts page examines at most this many alerts.
ALERT_SCAN_BUDGET = 50_000
_MAX_HISTORY = 20  # state changes kept per alert
# What a chart mark says of an alert (the series op's `marks`).
MARK_FIELDS = (
    "alert_id", "record_id", "record_timestamp", "user_id", "tag", "state", "before_mean", "after_mean",
    "change_percent",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class AlertQuery:
    user_id: str | None
    test_name: str | None
    tag: str | None
    state: str | None
    since: int | None  # microseconds, inclusive, on the alert's creation time
    until: int | None  # exclusive
    limit: int
    cursor: str | None  # the last alert id of the previous page

    def admits(self, alert: dict[str, Any]) -> bool:
        return (
            (self.user_id is None or alert["user_id"] == self.user_id)
            and (self.test_name is None or alert["test_name"] == self.test_name)
            and (self.tag is None or alert["tag"] == self.tag)
            and (self.state is None or alert["state"] == self.state)
        )


def series_of(alert: dict[str, Any]) -> SeriesKey:
    return SeriesKey(alert["user_id"], alert["test_name"], alert["tag"], alert["metric"])


class AlertBook:
    """The stored alerts' bookkeeping: per-state counts (for the metrics gauge), alert ids, and the previous
    analysis of each series (so a new record re-tests only the windows it reaches)."""

    def __init__(self, detector: RegressionDetector, excluded: Callable[[str], bool]) -> None:
        self._detector = detector
        self._excluded = excluded
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter({state: 0 for state in ALERT_STATES})
        self._clock = RecordIdClock(None)
        # series -> (first record id analysed, the analysis); bounded like the windows
        self._analyses: dict[SeriesKey, tuple[str, ChangePointAnalysis]] = {}

    def load(self, db: plyvel.DB) -> None:
        """At open: count alerts by state, continue alert ids, restart the baselines of `expected` alerts."""
        with db.iterator(prefix=layout.ALERT_PREFIX) as alerts:
            for key, value in alerts:
                try:
                    alert = orjson.loads(value)
                except orjson.JSONDecodeError:
                    log.error("alert %r is damaged; left out", key[:80])
                    continue
                self.counts[alert["state"]] += 1
                self._clock.advance_past(alert["alert_id"])
                if alert["state"] == "expected":
                    self._detector.set_baseline_start(series_of(alert), alert["record_id"])

    # -- analysis -------------------------------------------------------------------------------------------

    def analyse(self, db: plyvel.DB, keys: Iterable[SeriesKey]) -> list[dict[str, Any]]:
        """Analyse these series (the metrics of one user, test and tag read together); store and return the
        alerts of change points not alerted before."""
        groups: dict[tuple[str, str, str], list[SeriesKey]] = {}
        for key in keys:
            groups.setdefault((key.user_id, key.test_name, key.tag), []).append(key)
        created = []
        for members in groups.values():
            try:
                created.extend(self._analyse_group(db, members))
            except Exception:  # one bad series must not stop the others
                log.exception("change-point analysis of %s failed", members[0][:3])
        return created

    def _analyse_group(self, db: plyvel.DB, members: list[SeriesKey]) -> list[dict[str, Any]]:
        starts = {key: self._detector.baseline_start(key) for key in members}
        snapshot = db.snapshot()
        try:
            points = read_series(
                snapshot, members[0], self._excluded, limit=ANALYSIS_HISTORY, start=min(starts.values()),
                metrics=[key.metric for key in members],
            )  # fmt: skip
        finally:
            snapshot.close()
        created = []
        for key in members:
            series = [point for point in points if point.record_id >= starts[key] and key.metric in point.metrics]
            if series:
                created.extend(self._analyse_series(db, key, series))
        return created

    def _analyse_series(self, db: plyvel.DB, key: SeriesKey, points: list[StoredPoint]) -> list[dict[str, Any]]:
        values = [float(point.metrics[key.metric]) for point in points]
        previous = self._analyses.get(key)
        if previous is not None and previous[0] == points[0].record_id and previous[1].length <= len(values):
            analysis = extend_analysis(previous[1], values)
        else:
            analysis = analyse(values)
        if len(self._analyses) >= self._detector.windows.max_series:
            self._analyses.clear()
        self._analyses[key] = (points[0].record_id, analysis)
        direction = direction_of(key.metric, points[-1].better)
        min_change = self._detector.thresholds.model_for(key.test_name, key.metric).min_change * 100.0
        created = []
        for change in analysis.change_points:
            if change.status(direction) != "regression":
                continue
            if change.change_percent is not None and abs(change.change_percent) < min_change:
                continue
            record_id = points[change.index].record_id
            point_key = layout.alerted_point_key(*key, record_id)
            if db.get(point_key) is not None:
                continue
            alert = self._new_alert(key, record_id, change.before.mean, change.after.mean)
            alert["change_percent"] = change.change_percent
            alert["pvalue"] = change.adjusted_pvalue
            with db.write_batch(sync=True) as batch:
                batch.put(layout.alert_key(alert["alert_id"]), orjson.dumps(alert))
                batch.put(point_key, alert["alert_id"].encode())
            with self._lock:
                self.counts["open"] += 1
            created.append(alert)
        return created

    def _new_alert(self, key: SeriesKey, record_id: str, before: float, after: float) -> dict[str, Any]:
        with self._lock:
            alert_id, micros = self._clock.next()
        return {
            "alert_id": alert_id,
            "user_id": key.user_id,
            "test_name": key.test_name,
            "tag": key.tag,
            "metric": key.metric,
            "record_id": record_id,
            "record_timestamp": format_micros(record_id_micros(record_id)),
            "before_mean": before,
            "after_mean": after,
            "change_percent": None,
            "pvalue": None,
            "state": "open",
            "created": format_micros(micros),
            "history": [],
        }

    # -- reads and state changes ----------------------------------------------------------------------------

    def get(self, db: plyvel.DB, alert_id: str) -> dict[str, Any]:
        value = db.get(layout.alert_key(alert_id))
        if value is None:
            raise PerfdbError(ErrorCode.NOT_FOUND, "no such alert")
        alert: dict[str, Any] = orjson.loads(value)
        return alert

    def update(
        self,
        db: plyvel.DB,
        alert_id: str,
        state: str,
        note: str,
        owner: str | None,
        rebuild: Callable[[SeriesKey], None],
    ) -> dict[str, Any]:
        """Move the alert to `state` (the series owner, or the admin when `owner` is None). `expected` restarts the
        series' verdict window at the alert's record; leaving `expected` lets the whole history count again."""
        with self._lock:  # one state change at a time, so counts and history stay exact
            alert = self.get(db, alert_id)
            if owner is not None and owner != alert["user_id"]:
                raise PerfdbError(
                    ErrorCode.FORBIDDEN, "only the series' owner (or the admin key) may change this alert"
                )
            previous = alert["state"]
            change = {"state": state, "note": note, "by": owner or "admin", "at": format_micros(now_micros())}
            alert["history"] = [*alert.get("history", []), change][-_MAX_HISTORY:]
            alert["state"] = state
            alert["note"] = note
            alert["updated_by"], alert["updated_at"] = change["by"], change["at"]
            db.put(layout.alert_key(alert_id), orjson.dumps(alert), sync=True)
            self.counts[previous] -= 1
            self.counts[state] += 1
        if (previous == "expected") != (state == "expected"):
            key = series_of(alert)
            self._detector.set_baseline_start(key, alert["record_id"] if state == "expected" else None)
            rebuild(key)
        return alert

    def page(self, db: plyvel.DB, query: AlertQuery) -> tuple[list[dict[str, Any]], str | None]:
        """One page of alerts, newest first, and the cursor of the next page (None on the last)."""
        stop = layout.alert_key(query.cursor) if query.cursor else layout.prefix_end(layout.ALERT_PREFIX)
        if query.until is not None:
            stop = min(stop, layout.ALERT_PREFIX + layout.time_bound(query.until))
        start = layout.ALERT_PREFIX + (layout.time_bound(query.since) if query.since is not None else b"")
        alerts: list[dict[str, Any]] = []
        last_key = b""
        more = False
        with db.iterator(start=start, stop=stop, reverse=True) as entries:
            for scanned, (key, value) in enumerate(entries):
                if scanned == ALERT_SCAN_BUDGET or len(alerts) == query.limit:
                    more = True
                    break
                last_key = key
                alert = orjson.loads(value)
                if query.admits(alert):
                    alerts.append(alert)
        cursor = last_key[len(layout.ALERT_PREFIX) :].decode() if more and last_key else None
        return alerts, cursor

    def marks(
        self,
        db: plyvel.DB | plyvel.Snapshot,
        test_name: str,
        metrics: Iterable[str],
        user_id: str | None,
        tag: str | None,
    ) -> dict[str, list[dict[str, Any]]]:
        """The change points of a test's series as chart marks, by metric, oldest first: every alert (bar
        resolved ones) of the test for these metrics, of one user and tag or of all. Reads at most
        ALERT_SCAN_BUDGET alerts, newest first."""
        wanted = set(metrics)
        found: dict[str, list[dict[str, Any]]] = {}
        with db.iterator(prefix=layout.ALERT_PREFIX, reverse=True) as entries:
            for scanned, (_, value) in enumerate(entries):
                if scanned == ALERT_SCAN_BUDGET:
                    break
                alert = orjson.loads(value)
                if (
                    alert["test_name"] != test_name
                    or alert["metric"] not in wanted
                    or alert["state"] == "resolved"
                    or (user_id is not None and alert["user_id"] != user_id)
                    or (tag is not None and alert["tag"] != tag)
                ):
                    continue
                found.setdefault(alert["metric"], []).append({name: alert[name] for name in MARK_FIELDS})
        for marks in found.values():
            marks.sort(key=lambda mark: mark["record_id"])
        return found

    def resolve_for_records(self, db: plyvel.DB, user_id: str, record_ids: set[str] | None) -> list[dict[str, Any]]:
        """Resolve the alerts that point at these (deleted) records of the user (None: at any of theirs)."""
        resolved = []
        with db.iterator(prefix=layout.ALERT_PREFIX) as entries:
            found = [orjson.loads(value) for _, value in entries]
        for alert in found:
            pointed_at = record_ids is None or alert["record_id"] in record_ids
            if alert["user_id"] == user_id and pointed_at and alert["state"] != "resolved":
                resolved.append(
                    self.update(db, alert["alert_id"], "resolved", "the record was deleted", None, lambda key: None)
                )
        return resolved
