"""What the pages compute from what perfdb returns: the overview's histogram and leaderboard from
perfdb's aggregates, and which metrics the time charts draw. Pure functions, tested without a server."""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Mapping
from typing import Any

from perfdb.records.units import display_scale, format_value
from perfdb.web.queries import METRICS_BY_NAME
from perfdb.web.source import display_name

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


def axis_scale(unit: str, values: list[float]) -> dict[str, Any]:
    """How a chart axis shows a unit: one scale for all its values (latencies in µs, ms or s,
    a record's ns in ns, µs, ms or s, bytes in B, KiB or MiB, rates with k or M), chosen by the
    largest of them, so every series on the axis reads alike."""
    if unit == "qps":
        return {"label": "queries/s", "divisor": 1}
    scale = display_scale(unit, max((abs(value) for value in values), default=0.0))
    return {"label": scale.label, "divisor": scale.divisor}


# perfdb's overview histogram: fixed buckets, eight per decade (protocol_spec.md section 3.10).
BUCKETS_PER_DECADE = 8
# The leaderboard shows this many users; each needs its profile read for a name.
LEADERBOARD_SIZE = 25


def merge_aggregates(aggregates: list[dict[str, Any]]) -> dict[str, Any]:
    """One test's aggregates from several tests' (the overview of all tests): counts and buckets
    add up, extremes take the extreme. Per-user bests are not merged: they compare unlike tests."""
    buckets: dict[tuple[float | None, float | None], int] = collections.Counter()
    for aggregate in aggregates:
        for lower, upper, count in aggregate["histogram"]:
            buckets[(lower, upper)] += count
    ordered = sorted(buckets.items(), key=lambda item: -math.inf if item[0][0] is None else item[0][0])
    return {
        "records": sum(aggregate["records"] for aggregate in aggregates),
        "count": sum(aggregate["count"] for aggregate in aggregates),
        "min": min((aggregate["min"] for aggregate in aggregates), default=0.0),
        "max": max((aggregate["max"] for aggregate in aggregates), default=0.0),
        "histogram": [[lower, upper, count] for (lower, upper), count in ordered],
        "users": {user_id: {} for aggregate in aggregates for user_id in aggregate["users"]},
    }


def _bucket_index(lower: float | None, upper: float | None) -> int:
    """Which of perfdb's buckets this is: k for the bucket [10^(k/8), 10^((k+1)/8))."""
    if lower is None:
        assert upper is not None
        return round(math.log10(upper) * BUCKETS_PER_DECADE) - 1
    return round(math.log10(lower) * BUCKETS_PER_DECADE)


def overview_histogram(aggregate: dict[str, Any], metric: str) -> dict[str, Any]:
    """perfdb's buckets as chart bins, lowest first: empty buckets between filled ones are drawn
    too (a gap is information), and the outer edges are the smallest and largest values."""
    unit = METRICS_BY_NAME[metric].unit
    filled = {_bucket_index(lower, upper): count for lower, upper, count in aggregate["histogram"]}
    if not filled:
        return {"scale": "log", "bins": [], "count": 0}
    first, last = min(filled), max(filled)
    bins = []
    for index in range(first, last + 1):
        low = aggregate["min"] if index == first else 10 ** (index / BUCKETS_PER_DECADE)
        high = aggregate["max"] if index == last else 10 ** ((index + 1) / BUCKETS_PER_DECADE)
        bins.append(
            {
                "low": low,
                "high": high,
                "count": filled.get(index, 0),
                "label": f"{format_value(low, unit)} \u2013 {format_value(high, unit)}",
            }
        )
    return {"scale": "log", "bins": bins, "count": aggregate["count"]}


@dataclasses.dataclass(frozen=True, slots=True)
class LeaderboardEntry:
    rank: int
    user_id: str
    user_name: str
    value: float
    text: str
    results: int  # this user's results of the test that have the metric


def ranked_users(aggregate: dict[str, Any], better: str) -> list[tuple[str, dict[str, Any]]]:
    """A test's users by their best value, best first; ties in user id order."""
    sign = -1 if better == "higher" else 1
    return sorted(aggregate["users"].items(), key=lambda item: (sign * item[1]["best"], item[0]))


def leaderboard(
    ranked: list[tuple[str, dict[str, Any]]], profiles: Mapping[str, dict[str, Any] | None], metric: str
) -> list[LeaderboardEntry]:
    """Leaderboard rows from users ranked by ranked_users, named from their profiles."""
    unit = METRICS_BY_NAME[metric].unit
    return [
        LeaderboardEntry(
            rank=rank,
            user_id=user_id,
            user_name=display_name(user_id, profiles.get(user_id)),
            value=entry["best"],
            text=format_value(entry["best"], unit),
            results=entry["count"],
        )
        for rank, (user_id, entry) in enumerate(ranked, start=1)
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class SampleSummary:
    """What a box plot draws of one series of samples."""

    count: int
    low: float  # the smallest sample
    first_quartile: float
    median: float
    third_quartile: float
    high: float  # the largest sample


def sample_summary(samples: list[float]) -> SampleSummary:
    """Five numbers and the count of a non-empty series. Quartiles by the two textbook rules
    (Wikipedia's "Quartile", methods 1 and 3): for an even count, the medians of the lower and
    the upper half; for an odd count, a weighted mean of the two values around a quarter of the
    way in, so that the quartiles match what pytest-benchmark reports for the same rounds."""
    ordered = sorted(samples)
    count = len(ordered)
    if count == 1:
        only = ordered[0]
        return SampleSummary(1, only, only, only, only, only)
    half = count // 2
    if count % 2 == 0:
        first, third = statistics.median(ordered[:half]), statistics.median(ordered[half:])
    else:
        quarter = count // 4
        if count % 4 == 1:  # n = 4q + 1
            first = 0.25 * ordered[quarter - 1] + 0.75 * ordered[quarter]
            third = 0.75 * ordered[3 * quarter] + 0.25 * ordered[3 * quarter + 1]
        else:  # n = 4q + 3
            first = 0.75 * ordered[quarter] + 0.25 * ordered[quarter + 1]
            third = 0.25 * ordered[3 * quarter + 1] + 0.75 * ordered[3 * quarter + 2]
    return SampleSummary(count, ordered[0], first, statistics.median(ordered), third, ordered[-1])


def metric_unit(record: dict[str, Any], name: str) -> str:
    """The unit a metric (or samples series) of a record is shown in: a core metric's fixed one,
    else the one the record gives it ("" when it gives none)."""
    if name in METRICS_BY_NAME:
        return METRICS_BY_NAME[name].unit
    unit = (record.get("units") or {}).get(name, "")
    return unit if isinstance(unit, str) else ""
