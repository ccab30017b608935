"""Two runs side by side: the values each side's records hold, and one comparison per test and metric of both."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from perfdb.regression.compare import DEFAULT_MODEL, CompareModel, Comparison, compare
from perfdb.regression.direction import direction_of

WELCH = "welch_t"
WELCH_AND_MANN_WHITNEY = "welch_t+mann_whitney_u"


@dataclasses.dataclass(slots=True)
class RunSample:
    """What one side of a comparison selected: its values by (test, metric), and how the reading went."""

    values: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)
    # (test, series) -> the raw samples the records carried (protocol section 3.3), pooled.
    samples: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)
    # Per test, the first "better" declaration seen (see direction.direction_of).
    declared: dict[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
    records: int = 0
    truncated: bool = False  # more records matched than the side may hold: these are the newest
    complete: bool = True  # False: the walk stopped at its examination bound before the end
    examined: int = 0  # index entries (or record ids) looked at
    missing: int | None = None  # record_ids selectors: ids with no record (or not admitted by the narrowing)

    def add(self, document: Mapping[str, Any], samples: Mapping[str, Any] | None = None) -> None:
        """Add one stored record's numeric metrics, and its samples if it has any."""
        test_name = document["test_name"]
        for metric, value in document["metrics"].items():
            if type(value) in (int, float) and math.isfinite(value):
                self.values.setdefault((test_name, metric), []).append(float(value))
        for series, raw in (samples or {}).items():
            if isinstance(raw, list):
                numbers = [float(x) for x in raw if type(x) in (int, float) and math.isfinite(x)]
                self.samples.setdefault((test_name, series), []).extend(numbers)
        better = document.get("better")
        if isinstance(better, dict):
            self.declared.setdefault(test_name, better)
        self.records += 1

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "records": self.records,
            "truncated": self.truncated,
            "complete": self.complete,
            "examined": self.examined,
        }
        if self.missing is not None:
            fields["missing"] = self.missing
        return fields


@dataclasses.dataclass(frozen=True, slots=True)
class RunComparison:
    """One test's metric compared between the two runs."""

    test_name: str
    comparison: Comparison
    on: str  # "samples": the records' raw samples were compared; "records": one value per record

    def sort_key(self) -> tuple[bool, str, str]:
        """Regressions first, then by test and metric."""
        return (self.comparison.status != "regression", self.test_name, self.comparison.metric)

    def to_json(self) -> dict[str, Any]:
        result = self.comparison
        return {
            "test_name": self.test_name,
            "metric": result.metric,
            "on": self.on,
            "status": result.status,
            "direction": result.direction.to_json(),
            "base": result.base.to_json(),
            "head": result.head.to_json(),
            "change_percent": result.change_percent,
            "test": _test_used(result),
            "pvalue": result.pvalue,
            "welch_pvalue": result.welch_pvalue,
            "mann_whitney_pvalue": result.mann_whitney_pvalue,
            "significant": result.significant,
        }


def _test_used(result: Comparison) -> str | None:
    if result.welch_pvalue is None:
        return None  # insufficient data: no test ran
    return WELCH if result.mann_whitney_pvalue is None else WELCH_AND_MANN_WHITNEY


def compare_runs(base: RunSample, head: RunSample, model: CompareModel = DEFAULT_MODEL) -> list[RunComparison]:
    """One comparison per (test, metric) that both runs hold, regressions first, then by test and metric.

    Where both sides' records carry raw samples of a metric (or of a series of their own), those
    samples are compared, pooled per side; otherwise one value per record. A metric's direction
    comes from the core metrics, else from what head's records declare, else base's.
    """
    rows = []
    for key in (base.values.keys() | base.samples.keys()) & (head.values.keys() | head.samples.keys()):
        test_name, metric = key
        declared = head.declared.get(test_name) or base.declared.get(test_name)
        direction = direction_of(metric, declared)
        if base.samples.get(key) and head.samples.get(key):
            on, before, after = "samples", base.samples[key], head.samples[key]
        elif key in base.values and key in head.values:
            on, before, after = "records", base.values[key], head.values[key]
        else:
            continue
        rows.append(RunComparison(test_name, compare(before, after, direction, model), on))
    rows.sort(key=RunComparison.sort_key)
    return rows
