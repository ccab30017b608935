"""Google Benchmark's JSON (--benchmark_format=json or --benchmark_out=FILE).

One record per benchmark run name. With --benchmark_repetitions the aggregate rows (_mean,
_median, _stddev, _cv, ...) become statistics of that record: the mean is the metric itself,
the others are `<metric>_<aggregate>`; each repetition's times are the record's samples.
"""

from __future__ import annotations

from typing import Any

from perfdb.importers.common import (
    ImportFormatError,
    load_json,
    metric_name,
    number,
    parse_time,
    record,
    require,
    test_name,
)

FORMAT = "google-benchmark"
EXPECTED = "Google Benchmark JSON (--benchmark_format=json)"
_TIME_UNITS = {"ns": "ns", "us": "us", "ms": "ms", "s": "s"}
_KNOWN_UNITS = {"bytes_per_second": "B/s", "items_per_second": "items/s", "iterations": "1"}
# Row fields that describe the row rather than measure the benchmark.
_NOT_METRICS = frozenset({"family_index", "per_family_instance_index", "repetitions", "repetition_index", "threads"})
_SAMPLED = ("real_time", "cpu_time")


def looks_like(data: bytes, document: object) -> bool:
    return (
        isinstance(document, dict)
        and isinstance(document.get("context"), dict)
        and isinstance(document.get("benchmarks"), list)
    )


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    document = load_json(data, name, EXPECTED, document)
    require(looks_like(data, document), name, EXPECTED, 'expected an object with "context" and "benchmarks"')
    context: dict[str, Any] = document["context"]
    run_time = parse_time(context.get("date"))
    sys_info = {key: value for key, value in context.items() if key != "date"}
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for index, row in enumerate(document["benchmarks"]):
        entry = f"benchmarks[{index}]"
        require(isinstance(row, dict), name, EXPECTED, f"{entry} is not an object")
        if row.get("error_occurred"):
            continue  # the benchmark failed (SkipWithError): it measured nothing
        run_name = row.get("run_name", row.get("name"))
        require(isinstance(run_name, str), name, EXPECTED, f"{entry} has no name")
        groups.setdefault(run_name, []).append((index, row))
    require(bool(groups), name, EXPECTED, "no benchmark results in it")
    return [_record(run_name, rows, name, sys_info, run_time) for run_name, rows in groups.items()]


def _record(
    run_name: str, rows: list[tuple[int, dict[str, Any]]], name: str, sys_info: dict[str, Any], run_time: str | None
) -> dict[str, Any]:
    test = test_name(run_name, name, f"benchmarks[{rows[0][0]}]")
    iterations = [row for _, row in rows if row.get("run_type", "iteration") == "iteration"]
    aggregates = {str(row.get("aggregate_name")): row for _, row in rows if row.get("run_type") == "aggregate"}
    base = aggregates.pop("mean", None) or (iterations[0] if len(iterations) == 1 else None)
    if base is None:
        base = aggregates.pop("median", None) or (iterations[0] if iterations else None)
    metrics: dict[str, int | float] = {}
    units: dict[str, str] = {}
    if base is not None:
        _add_row(base, "", metrics, units, name, test)
    for aggregate, row in aggregates.items():
        _add_row(row, "_" + metric_name(aggregate), metrics, units, name, test)
    require(bool(metrics), name, EXPECTED, f"benchmark {test!r} has no numbers")
    samples: dict[str, list[float]] = {}
    if len(iterations) > 1:
        for field in _SAMPLED:
            values = [number(row.get(field)) for row in iterations]
            if all(value is not None for value in values):
                samples[field] = [float(value) for value in values if value is not None]
    return record(test, metrics, units, samples=samples, sys_info=sys_info, run_time=run_time)


def _add_row(
    row: dict[str, Any], suffix: str, metrics: dict[str, int | float], units: dict[str, str], name: str, test: str
) -> None:
    time_unit = row.get("time_unit", "ns")
    if time_unit not in _TIME_UNITS:
        raise ImportFormatError(f"{name}: not {EXPECTED}: benchmark {test!r} has an unknown time_unit {time_unit!r}")
    # A cv aggregate is a ratio whatever the field; so is any aggregate the library marks "percentage".
    ratio = row.get("aggregate_unit") == "percentage"
    aggregate = row.get("run_type") == "aggregate"
    for field, value in row.items():
        measured = number(value)
        if measured is None or field in _NOT_METRICS or (aggregate and field == "iterations"):
            continue  # an aggregate's "iterations" counts repetitions
        metric = metric_name(field) + suffix
        metrics[metric] = measured
        if ratio:
            units[metric] = "1"
        elif field in ("real_time", "cpu_time"):
            units[metric] = _TIME_UNITS[time_unit]
        else:
            units[metric] = _KNOWN_UNITS.get(field, "1")
