"""The core metrics and how to show them to people: one place for names, units and formats."""

from __future__ import annotations

import dataclasses
import math


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
