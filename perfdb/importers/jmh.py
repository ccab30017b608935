"""JMH's JSON (java -jar benchmarks.jar -rf json -rff FILE).

One record per benchmark and parameter set (`<benchmark>[<param>=<value>,...]`): the primary
metric's score in its own unit (ops/s, ops/ms, ..., or s/op, ms/op, us/op, ns/op), its error
and percentiles (`score_error`, `score_p50`, ...), every iteration's score as samples, each
secondary metric under its own name, and the JVM and run settings as sys_info. JMH records no
date.
"""

from __future__ import annotations

from typing import Any

from perfdb.importers.common import load_json, metric_name, number, record, require, test_name
from perfdb.records.units import is_unit

FORMAT = "jmh"
EXPECTED = "JMH JSON (-rf json)"
_SYS_INFO_FIELDS = (
    "jmhVersion", "mode", "threads", "forks", "jvm", "jvmArgs", "jdkVersion", "vmName", "vmVersion",
    "warmupIterations", "warmupTime", "warmupBatchSize", "measurementIterations", "measurementTime",
    "measurementBatchSize",
)  # fmt: skip


def looks_like(data: bytes, document: object) -> bool:
    return (
        isinstance(document, list)
        and bool(document)
        and all(isinstance(entry, dict) and "benchmark" in entry and "primaryMetric" in entry for entry in document)
    )


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    document = load_json(data, name, EXPECTED, document)
    shape = 'expected a list of objects with "benchmark" and "primaryMetric"'
    require(looks_like(data, document), name, EXPECTED, shape)
    records = []
    for index, entry in enumerate(document):
        where = f"[{index}]"
        params = entry.get("params")
        shown = str(entry.get("benchmark") or "")
        if isinstance(params, dict) and params:
            shown += "[" + ",".join(f"{key}={value}" for key, value in params.items()) + "]"
        test = test_name(shown, name, where)
        primary = entry["primaryMetric"]
        require(isinstance(primary, dict), name, EXPECTED, f"{where} ({test}): primaryMetric is not an object")
        metrics: dict[str, int | float] = {}
        units: dict[str, str] = {}
        samples: dict[str, list[float]] = {}
        _add_metric("score", primary, metrics, units, samples)
        require("score" in metrics, name, EXPECTED, f"{where} ({test}) has no score")
        secondary = entry.get("secondaryMetrics")
        for label, result in secondary.items() if isinstance(secondary, dict) else ():
            if isinstance(result, dict):
                _add_metric(metric_name(label), result, metrics, units, samples)
        sys_info = {field: entry[field] for field in _SYS_INFO_FIELDS if field in entry}
        records.append(record(test, metrics, units, samples=samples, sys_info=sys_info))
    return records


def _add_metric(
    metric: str,
    result: dict[str, Any],
    metrics: dict[str, int | float],
    units: dict[str, str],
    samples: dict[str, list[float]],
) -> None:
    score = number(result.get("score"))
    if score is None:
        return
    tool_unit = result.get("scoreUnit")
    unit = tool_unit if isinstance(tool_unit, str) and is_unit(tool_unit) else "1"
    metrics[metric], units[metric] = score, unit
    error = number(result.get("scoreError"))
    if error is not None:
        metrics[metric + "_error"], units[metric + "_error"] = error, unit
    percentiles = result.get("scorePercentiles")
    for percentile, value in percentiles.items() if isinstance(percentiles, dict) else ():
        if number(value) is not None:
            label = f"{metric}_p{percentile.removesuffix('.0')}"
            metrics[label], units[label] = value, unit
    raw = result.get("rawData")
    if isinstance(raw, list):
        flat = [value for fork in raw if isinstance(fork, list) for value in fork]
        if flat and all(number(value) is not None for value in flat):
            samples[metric] = [float(value) for value in flat]
