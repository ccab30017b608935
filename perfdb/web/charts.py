"""The time charts' data (user and test pages): every line downsampled by perfdb's series op to
about one point per two pixel columns, so a chart of 200,000 results costs what one of 200 does.

Each line is a band (min..max of each time bucket) around its median, in columns. A bucket of one
result names it, so the chart can open it. A line breaks (a null row) across a stretch with no
results that is long both in buckets and against the line's usual spacing, so it never bridges
a pause in the runs, while daily or weekly runs still draw as a line.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

from perfdb.records.timestamps import parse_rfc3339
from perfdb.records.units import CORE_METRIC_NAMES, CORE_METRICS
from perfdb.web.analysis import CHARTS, axis_scale, metric_unit
from perfdb.web.queries import QueryError
from perfdb.web.source import Edges, RecordQuery, ResultSource

# Points per line when the page does not say how wide its charts are, and the bounds of what it
# may ask for (the pages ask for one point per two pixels of their widest charts).
DEFAULT_POINTS = 600
MIN_POINTS, MAX_POINTS = 50, 2000
# The lines of one chart together hold at most this many points, so a user with many tests gets
# a page of a few hundred kilobytes, not megabytes.
CHART_POINTS = 4000
# A line breaks across more than GAP_BUCKETS empty buckets that are also more than GAP_SPACINGS
# times the line's median spacing between points.
GAP_BUCKETS = 3
GAP_SPACINGS = 4
# Bucket statistics are drawn, not read: five significant digits are plenty (the axis shows three).
SIGNIFICANT_DIGITS = 5

METRIC_LABELS = {metric.name: {"label": metric.label, "unit": metric.unit} for metric in CORE_METRICS}
# Charts of one metric draw a line per test; the others (percentiles, CPU time) one test at a time.
LINE_METRICS = tuple(metric for chart in CHARTS if len(chart["metrics"]) == 1 for metric in chart["metrics"])
# Tests are listed (with their number of results) if they have one of these.
CHART_TEST_METRICS = ("qps", "perc_lat_50")
DETAIL_METRICS = tuple(metric for chart in CHARTS if len(chart["metrics"]) > 1 for metric in chart["metrics"])
# One test's page also charts the other metrics of its newest result (those of Google Benchmark,
# pytest-benchmark, ...), each in the unit that result gives it: at most one series call's worth.
MAX_OTHER_METRICS = 16


@dataclasses.dataclass(frozen=True, slots=True)
class ChartRequest:
    """Which results to chart and how finely."""

    query: RecordQuery  # user (or everyone), test (or every test), tag, since/until
    tests: list[tuple[str, int]]  # the tests to draw a line for when no test is chosen, most results first
    detail: str | None  # with every test: the one whose percentile and CPU charts are shown
    points: int  # points per line, about the charts' width in pixels


def points_param(raw: str) -> int:
    """The `points` query parameter: points per line."""
    if raw == "":
        return DEFAULT_POINTS
    if not raw.isdigit() or not MIN_POINTS <= int(raw) <= MAX_POINTS:
        raise QueryError(f"points: must be a whole number from {MIN_POINTS} to {MAX_POINTS}")
    return int(raw)


async def chart_data(source: ResultSource, request: ChartRequest, edges: Edges | None) -> dict[str, Any]:
    """The charts' data: one downsampled line per test and metric, on one time grid per chart;
    `edges` are the query's (source.edges), asked for beside the other reads of the page."""
    query = request.query
    shown = [query.test_name] if query.test_name else [name for name, _ in request.tests]
    detail = query.test_name or (request.detail if request.detail in shown else (shown[0] if shown else None))
    empty = {
        "range": None,
        "lines": [],
        "detail": detail,
        "charts": _charts([], {}),
        "metrics": METRIC_LABELS,
        "results": 0,
        "complete": True,
    }
    if edges is None or not shown or detail is None:
        return empty
    # The grid spans the results actually found, so the buckets are as fine as they can be.
    since, until = edges.oldest, edges.newest + 1
    calls = []
    other_units = other_metric_units(edges.newest_record) if query.test_name else {}
    if query.test_name:
        calls.append((detail, [*LINE_METRICS, *DETAIL_METRICS], request.points))
        if other_units:
            calls.append((detail, list(other_units), request.points))
        line_buckets = 0
    else:
        line_buckets = max(MIN_POINTS, min(request.points, CHART_POINTS // max(1, len(shown) * len(LINE_METRICS))))
        if query.user_id is None:  # everyone's results: grouping is per user only, so one call per test
            calls += [(test, list(LINE_METRICS), line_buckets) for test in shown]
        calls.append((detail, list(DETAIL_METRICS), request.points))
    grouped = not query.test_name and query.user_id is not None
    single_replies, grouped_reply = await asyncio.gather(
        asyncio.gather(
            *(
                source.series(metrics, test, query, since=since, until=until, buckets=buckets)
                for test, metrics, buckets in calls
            )
        ),
        _every_test(source, query, since, until, line_buckets) if grouped else _nothing(),
    )
    replies: list[tuple[str, list[str], dict[str, Any]]] = []
    if grouped_reply is not None:
        # One read for every test's line metrics; tests beyond the reply's bound draw no line.
        for test in shown:
            per_metric = grouped_reply["tests"].get(test)
            if per_metric is not None:
                replies.append((test, list(LINE_METRICS), {**grouped_reply, "series": per_metric}))
    drawn_tests = len(replies)
    replies += [(test, metrics, reply) for (test, metrics, _), reply in zip(calls, single_replies, strict=True)]
    lines = []
    results = grouped_reply["records"] if grouped_reply is not None else 0
    complete = True
    if grouped_reply is not None:  # cut short, or the bound on tests left out a test the page lists
        complete = grouped_reply["complete"] and not (grouped_reply["tests_truncated"] and drawn_tests < len(shown))
    for test, metrics, reply in replies:
        # Each test's results are counted once: from the call that holds its line metrics.
        if "tests" not in reply and metrics[: len(LINE_METRICS)] == list(LINE_METRICS):
            results += reply["records"]
        complete = complete and reply["complete"]
        for metric in metrics:
            if reply["series"][metric]["count"]:
                lines.append(encode_line(test, metric, reply))
    return {
        "range": [
            (query.since if query.since is not None else since) / 1e6,
            (query.until if query.until is not None else until) / 1e6,
        ],
        "lines": lines,
        "detail": detail,
        "charts": _charts(lines, other_units),
        "metrics": {**METRIC_LABELS, **{name: {"label": name, "unit": unit} for name, unit in other_units.items()}},
        "results": results,
        "complete": complete,  # False: perfdb's bound cut a line short (to its newest results)
    }


async def _every_test(
    source: ResultSource, query: RecordQuery, since: int, until: int, buckets: int
) -> dict[str, Any] | None:
    assert query.user_id is not None
    return await source.series_by_test(
        list(LINE_METRICS), query.user_id, query, since=since, until=until, buckets=buckets
    )


async def _nothing() -> None:
    return None


def encode_line(test: str, metric: str, reply: dict[str, Any]) -> dict[str, Any]:
    """One metric of one series reply (asked for as columns) as the page draws it: columns of
    buckets, with a null row where the line must break."""
    series = reply["series"][metric]
    given = series["columns"]
    buckets = np.asarray(given["bucket"], dtype=np.int64)
    steps = np.diff(buckets)
    spacing = float(np.median(steps)) if len(steps) else 1.0
    longest_bridge = max(GAP_BUCKETS + 1, GAP_SPACINGS * spacing)
    breaks = (np.flatnonzero(steps > longest_bridge) + 1).tolist()  # a null row goes before each
    # A single result's value is exact, as perfdb gave it (it opens that result); bucket
    # statistics are rounded.
    statistics = np.array([given["min"], given["median"], given["max"]], dtype=np.float64)
    single = (np.asarray(given["count"], dtype=np.int64) == 1).tolist()
    low, median, high = (
        [value if alone else shown for value, shown, alone in zip(given[name], rounded_row, single, strict=True)]
        for name, rounded_row in zip(("min", "median", "max"), rounded(statistics).tolist(), strict=True)
    )
    nulls = [None] * len(breaks)
    columns: dict[str, list[Any]] = {
        "bucket": _broken(given["bucket"], breaks, [given["bucket"][at - 1] + 1 for at in breaks]),
        "count": _broken(given["count"], breaks, [0] * len(breaks)),
        "min": _broken(low, breaks, nulls),
        "median": _broken(median, breaks, nulls),
        "max": _broken(high, breaks, nulls),
        "record_id": _broken(given["record_id"], breaks, nulls),
        "timestamp": _broken(given["timestamp"], breaks, nulls),
    }
    return {
        "test": test,
        "metric": metric,
        # Bucket i covers [start + i * width, start + (i + 1) * width) seconds.
        "grid": [parse_rfc3339(reply["since"]) / 1e6, reply["bucket_micros"] / 1e6],
        **columns,
        "results": series["count"],
        "lowest": series["min"],
        "highest": series["max"],
        "exact_medians": series["exact_medians"],
        # Change points (alerts) of this series, drawn as vertical markers at their first record.
        "marks": [
            {
                "time": parse_rfc3339(mark["record_timestamp"]) / 1e6,
                "record_id": mark["record_id"],
                "alert_id": mark["alert_id"],
                "state": mark["state"],
                "change_percent": mark["change_percent"],
            }
            for mark in series.get("marks", [])
        ],
    }


def _broken(values: list[Any], breaks: list[int], fillers: list[Any]) -> list[Any]:
    """`values` with fillers[i] inserted before position breaks[i]."""
    if not breaks:
        return values
    pieces: list[Any] = []
    previous = 0
    for at, filler in zip(breaks, fillers, strict=True):
        pieces += values[previous:at]
        pieces.append(filler)
        previous = at
    pieces += values[previous:]
    return pieces


# 10 ** k for every k up to the largest finite power of ten (a value that needs more decimal
# places than that, below about 1e-304, is kept as it is); a table look-up, not a power per value.
_POWERS_OF_TEN = 10.0 ** np.arange(309)


def rounded(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each value to SIGNIFICANT_DIGITS significant digits at numpy's speed, by a scaling with a
    power of ten, rounded: as float(f"{value:.5g}") gives it where those powers are exact (values
    from about 1e-17 to 1e26), within a unit in the last place beyond; values below about 1e-304,
    inf and NaN as they are. Any shape."""
    result = values.copy()
    finite = np.isfinite(values) & (values != 0)
    shown = values[finite]
    places = SIGNIFICANT_DIGITS - 1 - np.floor(np.log10(np.abs(shown))).astype(np.int64)
    with np.errstate(all="ignore"):
        up = (places >= 0) & (places < len(_POWERS_OF_TEN))
        scale = _POWERS_OF_TEN[places[up]]
        shown[up] = np.round(shown[up] * scale) / scale
        down = places < 0
        scale = _POWERS_OF_TEN[-places[down]]
        shown[down] = np.round(shown[down] / scale) * scale
    result[finite] = shown
    return result


def other_metric_units(record: dict[str, Any]) -> dict[str, str]:
    """A result's metrics other than the core ones, by name, each with the unit the result gives
    it ("" when it gives none)."""
    metrics = record.get("metrics") or {}
    names = sorted(name for name in metrics if name not in CORE_METRIC_NAMES)[:MAX_OTHER_METRICS]
    return {name: metric_unit(record, name) for name in names}


def _charts(lines: list[dict[str, Any]], other_units: dict[str, str]) -> list[dict[str, Any]]:
    """The charts, each with an axis in units that suit its values: the core metrics' charts, then
    one per other metric. A test with other metrics leaves out the core charts it has nothing for."""
    charts = []
    others = [
        {"id": f"metric-{index}", "title": name, "metrics": [name], "unit": unit}
        for index, (name, unit) in enumerate(other_units.items())
    ]
    specs = [*CHARTS, *others]
    for chart in specs:
        drawn = [line["max"] for line in lines if line["metric"] in chart["metrics"]]
        values = [value for highs in drawn for value in highs if value is not None]
        if not values and other_units and chart in CHARTS:
            continue
        charts.append({**chart, "axis": axis_scale(str(chart["unit"]), values), "empty": not values})
    return charts
