"""`go test -bench` text output, with -benchmem columns and b.ReportMetric units.

One record per benchmark (per package): the name without its -GOMAXPROCS suffix (kept when one
file runs a benchmark under several -cpu values), ns/op as `time` (ns), MB/s as `throughput`
(B/s: Go's MB is 10^6 bytes), B/op as `bytes_per_op`, allocs/op as `allocs_per_op`, and a
custom `<x>/op` or `<x>/s` unit as `<x>_per_op` or `<x>_per_s`. With -count N the metric is the
mean of the N runs and the runs are the samples. goos, goarch, pkg and cpu go into sys_info.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from perfdb.importers.common import ImportFormatError, metric_name, record, require, scaled, test_name
from perfdb.records.units import is_unit

FORMAT = "go"
EXPECTED = "`go test -bench` output"
_RESULT = re.compile(r"^(Benchmark\S*)\s+(\d+)((?:\s+[-+0-9.eE]+\s+\S+)+)\s*$")
_HEADER = re.compile(r"^(goos|goarch|pkg|cpu):\s*(.*)$")
_PROCS = re.compile(r"^(.*?)-(\d+)$")
# Go's unit -> (metric, perfdb unit, factor to that unit)
_KNOWN = {
    "ns/op": ("time", "ns", 1),
    "MB/s": ("throughput", "B/s", 1_000_000),
    "B/op": ("bytes_per_op", "B/op", 1),
    "allocs/op": ("allocs_per_op", "allocs/op", 1),
}


def looks_like(data: bytes, document: object) -> bool:
    return document is None and any(_RESULT.match(line) for line in _lines(data)[:2000])


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines()


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    """`document` is unused: the format is text."""
    header: dict[str, str] = {}
    runs: dict[tuple[str, str, str], list[dict[str, float]]] = {}  # (pkg, name, procs) -> each run's values
    units: dict[tuple[str, str, str], dict[str, str]] = {}
    machines: dict[tuple[str, str, str], dict[str, str]] = {}
    for number, line in enumerate(_lines(data), start=1):
        found = _HEADER.match(line)
        if found:
            header[found.group(1)] = found.group(2).strip()
            continue
        result = _RESULT.match(line)
        if result is None:
            continue
        full_name, _iterations, columns = result.groups()
        procs_match = _PROCS.match(full_name)
        bench, procs = (procs_match.group(1), procs_match.group(2)) if procs_match else (full_name, "")
        key = (header.get("pkg", ""), bench, procs)
        values, run_units = _columns(columns.split(), name, number)
        runs.setdefault(key, []).append(values)
        units.setdefault(key, {}).update(run_units)
        machines[key] = dict(header)
    require(bool(runs), name, EXPECTED, "no Benchmark result lines in it")
    procs_seen: dict[tuple[str, str], set[str]] = {}
    for pkg, bench, procs in runs:
        procs_seen.setdefault((pkg, bench), set()).add(procs)
    records = []
    for key, measured in runs.items():
        pkg, bench, procs = key
        shown = f"{bench}-{procs}" if procs and len(procs_seen[(pkg, bench)]) > 1 else bench
        test = test_name(shown, name, bench)
        metrics: dict[str, int | float] = {}
        samples: dict[str, list[float]] = {}
        for metric in units[key]:
            series = [run[metric] for run in measured if metric in run]
            metrics[metric] = series[0] if len(series) == 1 else statistics.mean(series)
            if len(series) > 1:
                samples[metric] = series
        sys_info: dict[str, Any] = {**machines[key], **({"gomaxprocs": int(procs)} if procs else {})}
        records.append(record(test, metrics, dict(units[key]), samples=samples, sys_info=sys_info))
    return records


def _columns(fields: list[str], name: str, line: int) -> tuple[dict[str, float], dict[str, str]]:
    """A result line's value-unit pairs as (metric -> value, metric -> unit)."""
    values: dict[str, float] = {}
    units: dict[str, str] = {}
    for index in range(0, len(fields), 2):
        text, go_unit = fields[index], fields[index + 1]
        if go_unit in _KNOWN:
            metric, unit, factor = _KNOWN[go_unit]
        else:
            per = go_unit.rsplit("/", 1)
            metric = metric_name(per[0]) + ("_per_" + metric_name(per[1]) if len(per) == 2 else "")
            unit, factor = (go_unit if is_unit(go_unit) else "1"), 1
        try:
            values[metric] = scaled(text, factor)
        except ArithmeticError:
            raise ImportFormatError(f"{name}: line {line}: not {EXPECTED}: {text!r} is not a number") from None
        units[metric] = unit
    return values, units
