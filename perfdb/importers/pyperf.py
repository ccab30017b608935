"""pyperf's JSON (python bench.py -o FILE, or pyperf's own tools), plain or gzip-compressed.

One record per benchmark: mean, median, stdev, min and max of every value of every run, as
pyperf itself computes them (the statistics module), the values as samples, the suite's and the
benchmark's metadata as sys_info and the first run's date as run_time (pyperf writes local time
without an offset: it is read as this machine's local time).
"""

from __future__ import annotations

import statistics
from typing import Any

from perfdb.importers.common import load_json, number, parse_time, record, require, test_name

FORMAT = "pyperf"
EXPECTED = "pyperf JSON"
_UNITS = {"second": "s", "byte": "B", "integer": "1"}
# Metadata that is about one run or the measurement itself, not the machine.
_NOT_SYS_INFO = frozenset({"name", "date", "duration", "loops", "inner_loops", "unit", "uptime", "load_avg_1min"})


def looks_like(data: bytes, document: object) -> bool:
    return (
        isinstance(document, dict)
        and isinstance(document.get("benchmarks"), list)
        and "version" in document
        and "machine_info" not in document
    )


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    document = load_json(data, name, EXPECTED, document)
    require(looks_like(data, document), name, EXPECTED, 'expected an object with "version" and "benchmarks"')
    suite_metadata = document.get("metadata")
    suite_metadata = suite_metadata if isinstance(suite_metadata, dict) else {}
    require(bool(document["benchmarks"]), name, EXPECTED, "no benchmarks in it")
    records = []
    for index, bench in enumerate(document["benchmarks"]):
        entry = f"benchmarks[{index}]"
        require(isinstance(bench, dict) and isinstance(bench.get("runs"), list), name, EXPECTED, f"{entry} has no runs")
        own = bench.get("metadata")
        metadata = {**suite_metadata, **(own if isinstance(own, dict) else {})}
        test = test_name(str(metadata.get("name") or ""), name, entry)
        values: list[float] = []
        dates: list[str] = []
        for run in bench["runs"]:
            require(isinstance(run, dict), name, EXPECTED, f"{entry} has a run that is not an object")
            run_values = run.get("values", [])
            require(
                isinstance(run_values, list) and all(number(value) is not None for value in run_values),
                name,
                EXPECTED,
                f"{entry} ({test}) has a run whose values are not numbers",
            )
            values.extend(float(value) for value in run_values)
            run_metadata = run.get("metadata")
            if isinstance(run_metadata, dict) and isinstance(run_metadata.get("date"), str):
                dates.append(run_metadata["date"])
        require(bool(values), name, EXPECTED, f"{entry} ({test}) has no values (only calibration runs)")
        unit = _UNITS.get(str(metadata.get("unit", "second")), "1")
        metrics: dict[str, int | float] = {
            "mean": statistics.mean(values),
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "values": len(values),
        }
        if len(values) > 1:
            metrics["stdev"] = statistics.stdev(values)
        units = {metric: unit for metric in metrics} | {"values": "1", "time": unit}
        sys_info = {
            key: value
            for key, value in metadata.items()
            if key not in _NOT_SYS_INFO and not key.startswith("timeit_") and isinstance(value, (str, int, float))
        }
        records.append(
            record(
                test,
                metrics,
                units,
                samples={"time": values},
                sys_info=sys_info,
                run_time=parse_time(min(dates)) if dates else None,
            )
        )
    return records
