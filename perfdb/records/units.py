"""The core metrics and how to show them to people: one place for names, units and formats."""

from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True, slots=True)
class Metric:
    name: str  # as stored
    label: str  # column heading
    unit: str  # "qps", "us" or "percent"


# The 2015 performance database's metrics, in display order.
CORE_METRICS = (
    Metric("qps", "QPS", "qps"),
    Metric("qps_per_core", "QPS/core", "qps"),
    Metric("perc_lat_50", "p50", "us"),
    Metric("perc_lat_90", "p90", "us"),
    Metric("perc_lat_95", "p95", "us"),
    Metric("perc_lat_99", "p99", "us"),
    Metric("perc_lat_99_point_9", "p99.9", "us"),
    Metric("server_system_time", "srv sys", "percent"),
    Metric("server_user_time", "srv user", "percent"),
    Metric("client_system_time", "cli sys", "percent"),
    Metric("client_user_time", "cli user", "percent"),
)
CORE_METRIC_NAMES = tuple(metric.name for metric in CORE_METRICS)


def format_value(value: object, unit: str) -> str:
    """A metric value for people: 221,994 QPS; 28.6 ms or 850 µs; 131.2%."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    if unit == "qps":
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    if unit == "us":
        if abs(value) >= 1_000_000:
            return f"{value / 1_000_000:.3g} s"
        if abs(value) >= 1000:
            return f"{value / 1000:.3g} ms"
        return f"{value:.3g} µs"
    if unit == "percent":
        return f"{value:.1f}%"
    if abs(value) >= 1000:
        # Counts stay whole and grouped (1,403,434), never in exponent form (1.40343e+06).
        return f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100_000 else f"{value:,.2f}"
    return f"{value:g}"


# -- units of submitted metrics (a record's optional "units") ------------------------------

# The units a record may give its metrics, documented in protocol_spec.md section 4. Times are
# per operation (iteration) unless the metric's name says otherwise; "1" is a plain count or ratio.
UNIT_NAMES = frozenset(
    {
        "ps", "ns", "us", "ms", "s",  # durations
        "ns/op", "us/op", "ms/op", "s/op",  # JMH's average-time units
        "ops/s", "ops/ms", "ops/us", "ops/ns",  # throughput
        "B", "B/s", "B/op", "allocs/op", "elem/s",
        "percent", "1",
    }
)  # fmt: skip
# Besides those, a tool's own counter unit "<name>/op" or "<name>/s" (Go's b.ReportMetric units).
_CUSTOM_UNIT = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,31}/(?:op|s)")
# The core metrics' units are fixed: a record may restate them, never change them.
CORE_METRIC_UNITS = {
    metric.name: {"qps": "ops/s", "us": "us", "percent": "percent"}[metric.unit] for metric in CORE_METRICS
}


def is_unit(text: object) -> bool:
    """Whether `text` is a unit a record may give a metric."""
    return isinstance(text, str) and (text in UNIT_NAMES or _CUSTOM_UNIT.fullmatch(text) is not None)
