"""pytest-benchmark's JSON (pytest --benchmark-json=FILE).

One record per benchmark: its statistics in seconds, its operations per second, its rounds,
each round's time as samples, the machine_info as sys_info, the commit_info as source and the
file's datetime as run_time. Numbers in extra_info become metrics `extra.<name>`.
"""

from __future__ import annotations

from typing import Any

from perfdb.importers.common import load_json, metric_name, number, parse_time, record, require, test_name
from perfdb.records.schema import MAX_SOURCE_CHARS

FORMAT = "pytest-benchmark"
EXPECTED = "pytest-benchmark JSON (--benchmark-json)"
_SECONDS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr", "total")
_COUNTS = ("rounds", "iterations", "iqr_outliers", "stddev_outliers")


def looks_like(data: bytes, document: object) -> bool:
    return (
        isinstance(document, dict)
        and isinstance(document.get("benchmarks"), list)
        and ("machine_info" in document or "commit_info" in document)
    )


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    document = load_json(data, name, EXPECTED, document)
    require(looks_like(data, document), name, EXPECTED, 'expected an object with "machine_info" and "benchmarks"')
    require(bool(document["benchmarks"]), name, EXPECTED, "no benchmark results in it")
    machine = document.get("machine_info")
    sys_info = machine if isinstance(machine, dict) else None
    run_time = parse_time(document.get("datetime"))
    source = _source(document.get("commit_info"))
    records = []
    for index, bench in enumerate(document["benchmarks"]):
        entry = f"benchmarks[{index}]"
        require(isinstance(bench, dict), name, EXPECTED, f"{entry} is not an object")
        stats = bench.get("stats")
        require(isinstance(stats, dict), name, EXPECTED, f"{entry} has no stats")
        test = test_name(str(bench.get("fullname") or bench.get("name") or ""), name, entry)
        metrics: dict[str, int | float] = {}
        units: dict[str, str] = {}
        for field, unit in (*((f, "s") for f in _SECONDS), ("ops", "ops/s"), *((f, "1") for f in _COUNTS)):
            value = number(stats.get(field))
            if value is not None:
                metrics[field], units[field] = value, unit
        extra = bench.get("extra_info")
        for key, value in extra.items() if isinstance(extra, dict) else ():
            if number(value) is not None:
                metrics["extra." + metric_name(key)], units["extra." + metric_name(key)] = value, "1"
        require("mean" in metrics, name, EXPECTED, f"{entry} ({test}) has no mean time")
        data_points = stats.get("data")
        samples = {}
        if isinstance(data_points, list) and all(number(value) is not None for value in data_points):
            samples["time"] = [float(value) for value in data_points]
            units["time"] = "s"
        records.append(
            record(test, metrics, units, samples=samples, sys_info=sys_info, run_time=run_time, source=source)
        )
    return records


def _source(commit_info: Any) -> dict[str, str] | None:
    """commit_info (id, branch, time, project) as a record's source."""
    if not isinstance(commit_info, dict):
        return None
    source = {
        "commit": commit_info.get("id"),
        "branch": commit_info.get("branch"),
        "commit_time": parse_time(commit_info.get("time")),
        "repository": commit_info.get("project"),
    }
    kept = {key: value[:MAX_SOURCE_CHARS] for key, value in source.items() if isinstance(value, str) and value}
    return kept or None
