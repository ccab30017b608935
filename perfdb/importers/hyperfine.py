"""hyperfine's JSON (hyperfine --export-json FILE).

One record per command: mean, stddev, median, user, system, min and max in seconds, each run's
time as samples. hyperfine records no date and no machine: run_time and sys_info stay unset.
"""

from __future__ import annotations

from typing import Any

from perfdb.importers.common import load_json, number, record, require, test_name

FORMAT = "hyperfine"
EXPECTED = "hyperfine JSON (--export-json)"
_SECONDS = ("mean", "stddev", "median", "user", "system", "min", "max")


def looks_like(data: bytes, document: object) -> bool:
    results = document.get("results") if isinstance(document, dict) else None
    return isinstance(results, list) and all(isinstance(result, dict) and "command" in result for result in results)


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    document = load_json(data, name, EXPECTED, document)
    require(looks_like(data, document), name, EXPECTED, 'expected an object with "results" naming commands')
    require(bool(document["results"]), name, EXPECTED, "no results in it")
    records = []
    for index, result in enumerate(document["results"]):
        entry = f"results[{index}]"
        test = test_name(str(result.get("command") or ""), name, entry)
        metrics: dict[str, int | float] = {}
        for field in _SECONDS:
            value = number(result.get(field))
            if value is not None:  # stddev is null after a single run
                metrics[field] = value
        require("mean" in metrics, name, EXPECTED, f"{entry} ({test}) has no mean time")
        times = result.get("times")
        samples = {}
        if isinstance(times, list) and all(number(value) is not None for value in times):
            samples["time"] = [float(value) for value in times]
        units = dict.fromkeys([*metrics, "time"], "s")
        records.append(record(test, metrics, units, samples=samples))
    return records
