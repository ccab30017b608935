"""What the pages compute from scanned results: sort orders, histograms and leaderboards, and
which metrics the time charts draw. Pure functions of rows, so they are tested without a server."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

from perfdb.records.units import format_value
from perfdb.web.queries import METRICS_BY_NAME, higher_is_better
from perfdb.web.source import ResultRow, display_name

# The user page's charts: which metrics each one draws, in one unit.
CHARTS = (
    {"id": "qps", "title": "QPS", "metrics": ["qps"], "unit": "qps"},
    {"id": "qps_per_core", "title": "QPS per core", "metrics": ["qps_per_core"], "unit": "qps"},
    {
        "id": "latency",
        "title": "Latency percentiles",
        "metrics": ["perc_lat_50", "perc_lat_90", "perc_lat_95", "perc_lat_99", "perc_lat_99_point_9"],
        "unit": "us",
    },
    {
        "id": "server_cpu",
        "title": "Server CPU time",
        "metrics": ["server_system_time", "server_user_time"],
        "unit": "percent",
    },
    {
        "id": "client_cpu",
        "title": "Client CPU time",
        "metrics": ["client_system_time", "client_user_time"],
        "unit": "percent",
    },
)


def sort_rows(
    rows: list[ResultRow], column: str, descending: bool, users: dict[str, dict[str, Any]]
) -> list[ResultRow]:
    """Rows in the order of one column; results without that metric always come last."""
    newest_first = sorted(rows, key=lambda row: row.record_id, reverse=True)  # ties: newest first
    if column == "time":
        return newest_first if descending else newest_first[::-1]
    if column in ("user", "test", "tag"):

        def text(row: ResultRow) -> str:
            if column == "user":
                return display_name(row.user_id, users.get(row.user_id)).casefold()
            return (row.test_name if column == "test" else row.tag).casefold()

        return sorted(newest_first, key=text, reverse=descending)
    present = [row for row in newest_first if column in row.metrics]
    missing = [row for row in newest_first if column not in row.metrics]
    return sorted(present, key=lambda row: row.metrics[column], reverse=descending) + missing


def count_tests(rows: list[ResultRow]) -> list[tuple[str, int]]:
    """Tests and how many results each has, the most frequent first."""
    counts = collections.Counter(row.test_name for row in rows)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def axis_scale(unit: str, values: list[float]) -> dict[str, Any]:
    """How a chart axis shows a unit: latencies in µs, ms or s depending on their size."""
    if unit == "us":
        peak = max((abs(value) for value in values), default=0.0)
        if peak >= 1_000_000:
            return {"label": "s", "divisor": 1_000_000}
        if peak >= 1000:
            return {"label": "ms", "divisor": 1000}
        return {"label": "µs", "divisor": 1}
    return {"label": {"qps": "queries/s", "percent": "%"}.get(unit, ""), "divisor": 1}


@dataclasses.dataclass(frozen=True, slots=True)
class Bin:
    low: float
    high: float
    count: int
    users: int
    label: str


def histogram(rows: list[ResultRow], metric: str, bins: int) -> dict[str, Any]:
    """The distribution of one metric over the rows: equal-width bins, or equal-ratio bins when the
    values span two orders of magnitude (latencies usually do)."""
    unit = METRICS_BY_NAME[metric].unit
    points = [
        (float(row.metrics[metric]), row.user_id)
        for row in rows
        if metric in row.metrics and math.isfinite(row.metrics[metric])
    ]
    if not points:
        return {"scale": "linear", "bins": [], "count": 0}
    low, high = min(value for value, _ in points), max(value for value, _ in points)
    logarithmic = low > 0 and high / low >= 100
    if high == low:
        edges = [low, high]
    elif logarithmic:
        low_log, step = math.log10(low), (math.log10(high) - math.log10(low)) / bins
        edges = [10 ** (low_log + step * index) for index in range(bins)] + [high]
    else:
        step = (high - low) / bins
        edges = [low + step * index for index in range(bins)] + [high]
    counts = [0] * (len(edges) - 1)
    users: list[set[str]] = [set() for _ in counts]
    for value, user_id in points:
        index = _bin_index(value, edges, logarithmic)
        counts[index] += 1
        users[index].add(user_id)
    result = [
        Bin(
            low=edges[index],
            high=edges[index + 1],
            count=counts[index],
            users=len(users[index]),
            label=f"{format_value(edges[index], unit)} \u2013 {format_value(edges[index + 1], unit)}",
        )
        for index in range(len(counts))
    ]
    return {
        "scale": "log" if logarithmic else "linear",
        "bins": [dataclasses.asdict(item) for item in result],
        "count": len(points),
    }


def _bin_index(value: float, edges: list[float], logarithmic: bool) -> int:
    bins = len(edges) - 1
    if bins == 1 or value >= edges[-1]:
        return bins - 1
    if logarithmic:
        position = (math.log10(value) - math.log10(edges[0])) / (math.log10(edges[-1]) - math.log10(edges[0]))
    else:
        position = (value - edges[0]) / (edges[-1] - edges[0])
    return min(bins - 1, max(0, int(position * bins)))


@dataclasses.dataclass(frozen=True, slots=True)
class LeaderboardEntry:
    rank: int
    user_id: str
    user_name: str
    value: float
    text: str
    record_id: str
    timestamp: str
    tag: str
    results: int  # this user's results of the test in the range


def leaderboard(
    rows: list[ResultRow], users: dict[str, dict[str, Any]], test: str, metric: str
) -> list[LeaderboardEntry]:
    """Each user's best result of one test for one metric, best user first. Ties go to whoever
    got there first."""
    better_is_higher = higher_is_better(metric)
    best: dict[str, ResultRow] = {}
    results: collections.Counter[str] = collections.Counter()
    for row in sorted(rows, key=lambda row: row.record_id):
        if row.test_name != test or metric not in row.metrics:
            continue
        results[row.user_id] += 1
        current = best.get(row.user_id)
        value = row.metrics[metric]
        if current is None or (
            value > current.metrics[metric] if better_is_higher else value < current.metrics[metric]
        ):
            best[row.user_id] = row
    ranked = sorted(
        best.values(),
        key=lambda row: (-row.metrics[metric] if better_is_higher else row.metrics[metric], row.record_id),
    )
    unit = METRICS_BY_NAME[metric].unit
    return [
        LeaderboardEntry(
            rank=rank,
            user_id=row.user_id,
            user_name=display_name(row.user_id, users.get(row.user_id)),
            value=row.metrics[metric],
            text=format_value(row.metrics[metric], unit),
            record_id=row.record_id,
            timestamp=row.timestamp,
            tag=row.tag,
            results=results[row.user_id],
        )
        for rank, row in enumerate(ranked, start=1)
    ]
