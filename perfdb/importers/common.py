"""What every importer shares: its error, JSON loading, exact unit conversion and the record it builds."""

from __future__ import annotations

import datetime
import decimal
import math
import re
from typing import Any

import orjson

from perfdb.records.schema import MAX_NAME_CHARS, MAX_SAMPLE_BYTES, MAX_SAMPLES

_METRIC_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


class ImportFormatError(ValueError):
    """A file that is not what its importer expects; the message names the file and what was expected."""


def load_json(data: bytes, name: str, expected: str, document: Any = None) -> Any:
    """The one JSON document in `data` (`document` when the caller already decoded it), or an error
    naming the file and the format expected."""
    if document is not None:
        return document
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ImportFormatError(f"{name}: not {expected}: not JSON ({exc})") from None


def require(condition: bool, name: str, expected: str, problem: str) -> None:
    if not condition:
        raise ImportFormatError(f"{name}: not {expected}: {problem}")


def number(value: Any) -> int | float | None:
    """A finite JSON number (bools are not numbers), else None."""
    if type(value) is int:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    return None


def scaled(text: str, factor: int | decimal.Decimal) -> float:
    """`text` (a decimal number as the tool printed it) times `factor`, rounded once: the exact
    value in the new unit, correctly rounded to a float (1.2961 Melem/s is 1296100.0 elem/s)."""
    return float(decimal.Decimal(text) * factor)


def metric_name(text: str) -> str:
    """A tool's counter name as a perfdb metric name: anything outside [A-Za-z0-9_.-] becomes '_'."""
    name = _METRIC_NAME_UNSAFE.sub("_", text).strip("_") or "value"
    return name if name[0].isalpha() or name[0] == "_" else "_" + name


def test_name(text: str, name: str, entry: str) -> str:
    text = text.strip()
    require(bool(text), name, "a benchmark", f"{entry} has no name")
    require(
        len(text) <= MAX_NAME_CHARS,
        name,
        "a benchmark",
        f"{entry}: the name {text[:60]!r}... is longer than {MAX_NAME_CHARS} characters",
    )
    return text


def rfc3339(moment: datetime.datetime) -> str:
    """An aware datetime as RFC 3339 in UTC with microseconds, the form perfdb stores."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> str | None:
    """A tool's ISO 8601 date-time as RFC 3339 UTC; None when absent or unparseable. A date-time
    without an offset is taken as local time on this machine (the tools write local time)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return rfc3339(moment if moment.tzinfo else moment.astimezone())


def samples_within_bounds(samples: dict[str, list[float]]) -> dict[str, list[float]] | None:
    """The samples when they fit the server's bounds (MAX_SAMPLES values, MAX_SAMPLE_BYTES of
    JSON); otherwise None: the record keeps its statistics and leaves the raw values out."""
    kept = {metric: values for metric, values in samples.items() if values}
    if not kept:
        return None
    if sum(len(values) for values in kept.values()) > MAX_SAMPLES or len(orjson.dumps(kept)) > MAX_SAMPLE_BYTES:
        return None
    return kept


def record(
    test: str,
    metrics: dict[str, int | float],
    units: dict[str, str],
    *,
    samples: dict[str, list[float]] | None = None,
    sys_info: dict[str, Any] | None = None,
    run_time: str | None = None,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The fields of one record request; empty optional parts are left out."""
    fields: dict[str, Any] = {"test_name": test, "metrics": metrics, "units": units}
    if samples:
        bounded = samples_within_bounds(samples)
        if bounded:
            fields["samples"] = bounded
    if sys_info:
        fields["sys_info"] = sys_info
    if run_time:
        fields["run_time"] = run_time
    if source:
        fields["source"] = source
    directions = {metric: way for metric in metrics if (way := direction(metric, units.get(metric))) is not None}
    if directions:
        fields["better"] = directions
    return fields


_LOWER_UNITS = frozenset({"ps", "ns", "us", "ms", "s", "ns/op", "us/op", "ms/op", "s/op", "B/op", "allocs/op"})
_HIGHER_UNITS = frozenset({"ops/s", "ops/ms", "ops/us", "ops/ns", "B/s", "elem/s"})
_SPREAD = re.compile(r"(?:^|_)(?:stddev|stdev|cv|iqr|error|outliers)(?:$|_)")


def direction(metric: str, unit: str | None) -> str | None:
    """Which way is better for an imported metric: a spread (stddev, cv, ...) lower; a time or a
    cost per operation lower; a rate higher; a plain count nobody knows."""
    if unit is None or unit == "1":
        return None
    if _SPREAD.search(metric):
        return "lower"
    if unit in _LOWER_UNITS:
        return "lower"
    if unit in _HIGHER_UNITS:
        return "higher"
    return None  # a tool's own counter (widgets/op): its meaning is the tool's
