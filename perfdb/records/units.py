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


def format_value(value: object, unit: str, *, peak: float | None = None, digits: int = 3) -> str:
    """A metric value for people: 221,994 QPS; 28.6 ms or 850 µs; 131.2%; 1.2 MiB/s; 3.4 M ops/s.

    `unit` is a core metric's ("qps", "us", "percent"), a record's (section 4.2 of
    protocol_spec.md) or "" (unknown). Times, byte sizes and rates are scaled to suit the value,
    or to suit `peak` (the largest magnitude of a set of values shown side by side, in one scale),
    with `digits` significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    if unit == "qps":
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    if unit == "percent":
        return f"{value:.1f}%"
    if unit in ("", "1"):
        if abs(value) >= 1000:
            # Counts stay whole and grouped (1,403,434), never in exponent form (1.40343e+06).
            return f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100_000 else f"{value:,.2f}"
        return f"{value:g}"
    scale = display_scale(unit, abs(value) if peak is None else peak)
    # Never in exponent form: 999.7 ns to three digits is "1,000 ns", not "1e+03 ns".
    shown = float(f"{value / scale.divisor:.{digits}g}")
    return f"{shown:,.0f} {scale.label}" if abs(shown) >= 1000 else f"{shown:g} {scale.label}"


@dataclasses.dataclass(frozen=True, slots=True)
class DisplayScale:
    """How values of a unit are shown: divided by `divisor`, followed by `label`."""

    label: str  # "ms", "MiB/s", "k ops/s"
    divisor: float


# Durations in picoseconds (whole numbers, so that divisors come out exact), and the ones values
# are shown in (a value's own unit below a nanosecond).
_PICOSECONDS = {"ps": 1, "ns": 10**3, "us": 10**6, "ms": 10**9, "s": 10**12}
_SHOWN_DURATIONS = (("s", 10**12), ("ms", 10**9), ("µs", 10**6), ("ns", 10**3))
# Throughputs in operations per second.
_PER_SECOND = {"ops/s": 1.0, "ops/ms": 1e3, "ops/us": 1e6, "ops/ns": 1e9}
_SI_PREFIXES = (("G", 1e9), ("M", 1e6), ("k", 1e3))
_BINARY_PREFIXES = (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0))


def display_scale(unit: str, peak: float) -> DisplayScale:
    """The scale that shows values of `unit` up to `peak` (a magnitude) with few digits: one
    scale for a whole chart axis, so every series on it reads alike. Durations go to ns, µs,
    ms or s; operation rates to ops/s with k, M or G; bytes to B, KiB, MiB or GiB."""
    base, _, per = unit.partition("/")
    suffix = f"/{per}" if per else ""
    if base in _PICOSECONDS and per in ("", "op"):  # 12 ns, 1.5 ms/op
        picoseconds = peak * _PICOSECONDS[base]
        for label, size in _SHOWN_DURATIONS:
            if picoseconds >= size:
                return DisplayScale(label + suffix, size / _PICOSECONDS[base])
        if picoseconds == 0 or base == "ps":  # nothing to scale by, or already finer than ns
            return DisplayScale(("µs" if base == "us" else base) + suffix, 1.0)
        return DisplayScale("ns" + suffix, 10**3 / _PICOSECONDS[base])  # under a nanosecond
    if unit in _PER_SECOND:
        per_second = _PER_SECOND[unit]
        return _prefixed(peak * per_second, "ops/s", per_second)
    if base == "B":  # B, B/s, B/op
        for prefixed_label, bytes_size in _BINARY_PREFIXES:
            if peak >= bytes_size:
                return DisplayScale(prefixed_label + suffix, bytes_size)
        return DisplayScale(unit, 1.0)
    if unit == "percent":
        return DisplayScale("%", 1.0)
    if unit in ("", "1"):
        return DisplayScale("", 1.0)
    return _prefixed(peak, unit, 1.0)  # elem/s, allocs/op, a tool's own <name>/op


def _prefixed(peak: float, label: str, per_unit: float) -> DisplayScale:
    """A count or rate with an SI prefix: 3.4 M ops/s, 12 k elem/s."""
    for prefix, size in _SI_PREFIXES:
        if peak >= size:
            return DisplayScale(f"{prefix} {label}", size / per_unit)
    return DisplayScale(label, 1.0 / per_unit)


# -- units of submitted metrics (a record's optional "units") ------------------------------

# The units a record may give its metrics, documented in protocol_spec.md section 4. Times are
# per operation (iteration) unless the metric's name says otherwise; "1" is a plain count or ratio.
UNITS = (
    "ps", "ns", "us", "ms", "s",  # durations
    "ns/op", "us/op", "ms/op", "s/op",  # JMH's average-time units
    "ops/s", "ops/ms", "ops/us", "ops/ns",  # throughput
    "B", "B/s", "B/op", "allocs/op", "elem/s",
    "percent", "1",
)  # fmt: skip
UNIT_NAMES = frozenset(UNITS)
# Besides those, a tool's own counter unit "<name>/op" or "<name>/s" (Go's b.ReportMetric units).
_CUSTOM_UNIT = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,31}/(?:op|s)")
# The core metrics' units are fixed: a record may restate them, never change them.
CORE_METRIC_UNITS = {
    metric.name: {"qps": "ops/s", "us": "us", "percent": "percent"}[metric.unit] for metric in CORE_METRICS
}


def is_unit(text: object) -> bool:
    """Whether `text` is a unit a record may give a metric."""
    return isinstance(text, str) and (text in UNIT_NAMES or _CUSTOM_UNIT.fullmatch(text) is not None)
