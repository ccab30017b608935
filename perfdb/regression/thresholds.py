"""The per-point verdict: is a new value a regression against the last `window` values of its series?

A value is a regression when it moved the worse way by more than BOTH `sigmas` standard deviations of the
baseline AND `min_change` of the baseline mean, so neither a very quiet series (tiny stddev) nor a very noisy
one (stddev beyond 5 %) raises alarms for moves nobody would act on. The same move the better way is an
improvement. Inputs are finite floats (the record schema refuses NaN and infinities); `judge` raises ValueError
on any other.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from perfdb.regression.direction import MetricDirection
from perfdb.regression.series import FloatArray, SeriesLike, as_series

Status = Literal["regression", "improvement", "no_change", "insufficient_data"]
MODEL_NAME = "sigmas_and_min_change"


@dataclasses.dataclass(frozen=True, slots=True)
class ThresholdModel:
    """The verdict model's parameters; these defaults are the only place they are set."""

    window: int = 30  # baseline = the last `window` points of the series
    min_points: int = 5  # fewer baseline points: insufficient_data
    sigmas: float = 3.0  # the move must exceed this many baseline standard deviations...
    min_change: float = 0.05  # ...and this fraction of the baseline mean (0.05 = 5 %)

    def __post_init__(self) -> None:
        problem = _model_problem(self.window, self.min_points, self.sigmas, self.min_change)
        if problem:
            raise ValueError(problem)

    def to_json(self) -> dict[str, object]:
        """The same (shared, not to be changed) dict each time: every verdict of a record ack carries it."""
        cached = _MODEL_JSON.get(self)
        if cached is None:
            cached = _MODEL_JSON[self] = self._json()
        return cached

    def _json(self) -> dict[str, object]:
        return {
            "name": MODEL_NAME,
            "window": self.window,
            "min_points": self.min_points,
            "sigmas": self.sigmas,
            "min_change": self.min_change,
        }


def _model_problem(window: int, min_points: int, sigmas: float, min_change: float) -> str:
    if window < 2:
        return f"window must be at least 2, not {window}"
    if not 2 <= min_points <= window:
        return f"min_points must be between 2 and window ({window}), not {min_points}"
    if not (math.isfinite(sigmas) and sigmas >= 0):
        return f"sigmas must be a finite number >= 0, not {sigmas}"
    if not (math.isfinite(min_change) and 0 <= min_change <= 1):
        return f"min_change must be a fraction between 0 and 1 (0.05 = 5 %), not {min_change}"
    return ""


_MODEL_JSON: dict[ThresholdModel, dict[str, object]] = {}  # few models: the defaults and the override file's
DEFAULT_MODEL = ThresholdModel()


@dataclasses.dataclass(frozen=True, slots=True)
class BaselineSummary:
    n: int
    mean: float
    stddev: float  # sample standard deviation (n - 1); 0.0 for a single point
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> BaselineSummary:
        """In plain Python: the server judges every metric of every record as it commits, and for a window of
        30 points this takes about 5 us where numpy's mean, std and median calls take 100-200 us."""
        n = len(values)
        if not n:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(values)
        mean = math.fsum(values) / n
        stddev = math.sqrt(math.fsum([(value - mean) ** 2 for value in values]) / (n - 1)) if n > 1 else 0.0
        middle = n // 2
        median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return cls(n, mean, stddev, median, ordered[0], ordered[-1])

    def to_json(self) -> dict[str, object]:
        if self.n == 0:
            return {"n": 0}
        # Spelt out: dataclasses.asdict deep-copies, and every record ack carries one of these per metric.
        return {
            "n": self.n, "mean": self.mean, "stddev": self.stddev, "median": self.median, "min": self.min,
            "max": self.max,
        }  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Threshold:
    """The bound a value was held to: |value - mean| must exceed `bound` (the larger of the two bounds)."""

    bound: float  # in the metric's units
    percent: float | None  # the bound as a percent of the baseline mean; None when the mean is 0
    sigma_bound: float  # sigmas * stddev
    min_change_bound: float  # min_change * |mean|
    governed_by: Literal["sigmas", "min_change"]

    def to_json(self) -> dict[str, object]:
        return {
            "bound": self.bound, "percent": self.percent, "sigma_bound": self.sigma_bound,
            "min_change_bound": self.min_change_bound, "governed_by": self.governed_by,
        }  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """One value judged against its baseline, with every number that decided it."""

    metric: str
    status: Status
    model: ThresholdModel
    baseline: BaselineSummary
    value: float
    change: float | None  # value - baseline mean; None when insufficient_data
    change_percent: float | None  # None when insufficient_data or the baseline mean is 0
    threshold: Threshold | None  # None when insufficient_data
    direction: MetricDirection
    changed: bool  # beyond the threshold either way; with an unknown direction the status stays no_change

    def to_json(self) -> dict[str, object]:
        """`direction` is "higher"/"lower" (which way is better) or null when unknown; with an unknown
        direction a move beyond the threshold is reported as status no_change with `changed: true`."""
        return {
            "metric": self.metric,
            "status": self.status,
            "model": self.model.to_json(),
            "baseline": self.baseline.to_json(),
            "value": self.value,
            "change": self.change,
            "change_percent": self.change_percent,
            "threshold": None if self.threshold is None else self.threshold.to_json(),
            "direction": self.direction.to_json(),
            "changed": self.changed,
        }


def percent_change(value: float, mean: float) -> float | None:
    """(value - mean) as a percent of |mean|; None when the mean is 0 (no scale to measure against)."""
    return None if mean == 0 else (value - mean) / abs(mean) * 100.0


def judge(
    value: float, baseline: SeriesLike, direction: MetricDirection, model: ThresholdModel = DEFAULT_MODEL
) -> Verdict:
    """Judge `value` against the last `model.window` points of `baseline` (oldest first, `value` not included).

    Identical baseline points (stddev 0): the `min_change` bound governs alone. Baseline mean 0: the percent
    bound is 0 and the sigma bound governs; `change_percent` is None. A value exactly on the bound is no change.
    A NaN or infinite value or baseline point raises ValueError (the record schema refuses them before this).
    """
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"the value judged must be a finite number, not {value}")
    summary = BaselineSummary.of(_recent_points(baseline, model.window))
    if summary.n < model.min_points:
        return Verdict(direction.metric, "insufficient_data", model, summary, value, None, None, None, direction, False)
    decision = decide(value, summary.mean, summary.stddev, direction, model)
    status, change, change_percent, bound, percent, sigma_bound, min_change_bound, governed_by, changed = decision
    threshold = Threshold(bound, percent, sigma_bound, min_change_bound, governed_by)
    return Verdict(
        direction.metric, status, model, summary, value, change, change_percent, threshold, direction, changed
    )


Decision: TypeAlias = tuple[
    Status, float, float | None, float, float | None, float, float, Literal["sigmas", "min_change"], bool
]


def decide(value: float, mean: float, stddev: float, direction: MetricDirection, model: ThresholdModel) -> Decision:
    """The decision of `judge` once the baseline has enough points: (status, change, change_percent, and the
    threshold's bound, percent, sigma_bound, min_change_bound and governed_by, then changed). `decide_all` is the
    same decision over arrays, for the server's batch judging (perfdb/regression/verdicts.py)."""
    sigma_bound = model.sigmas * stddev
    min_change_bound = model.min_change * abs(mean)
    bound = max(sigma_bound, min_change_bound)
    change = value - mean
    changed = abs(change) > bound
    worse = direction.is_worse(change)
    status: Status = "no_change" if not changed or worse is None else "regression" if worse else "improvement"
    return (
        status,
        change,
        percent_change(value, mean),
        bound,
        None if mean == 0 else bound / abs(mean) * 100.0,
        sigma_bound,
        min_change_bound,
        "sigmas" if sigma_bound > min_change_bound else "min_change",
        changed,
    )


# decide_all's status codes
NO_CHANGE, REGRESSION, IMPROVEMENT = 0, 1, 2


class Decisions(NamedTuple):
    """decide's results for many values, as arrays: status codes (NO_CHANGE...), and NaN for a None."""

    status: npt.NDArray[np.int64]
    change: FloatArray
    change_percent: FloatArray
    bound: FloatArray
    percent: FloatArray
    sigma_bound: FloatArray
    min_change_bound: FloatArray
    governed_by_sigmas: npt.NDArray[np.bool_]
    changed: npt.NDArray[np.bool_]


def decide_all(
    value: FloatArray, mean: FloatArray, stddev: FloatArray, sigmas: FloatArray, min_change: FloatArray,
    worse_sign: FloatArray,
) -> Decisions:  # fmt: skip
    """`decide` of each value at once: the same float operations in the same order, element by element, so the
    same numbers. `worse_sign` is 1 where higher is worse (a latency), -1 where lower is worse, 0 if unknown."""
    with np.errstate(all="ignore"):  # as Python floats: inf past the float range, and no mean no percent
        sigma_bound = sigmas * stddev
        scale = np.abs(mean)
        min_change_bound = min_change * scale
        bound = np.maximum(sigma_bound, min_change_bound)
        change = value - mean
        changed = np.abs(change) > bound
        worse = worse_sign * change > 0
        status = np.where(changed & (worse_sign != 0), np.where(worse, REGRESSION, IMPROVEMENT), NO_CHANGE)
        no_scale = mean == 0
        change_percent = np.where(no_scale, np.nan, change / scale * 100.0)
        percent = np.where(no_scale, np.nan, bound / scale * 100.0)
    governed_by_sigmas = sigma_bound > min_change_bound
    return Decisions(status, change, change_percent, bound, percent, sigma_bound, min_change_bound,
                     governed_by_sigmas, changed)  # fmt: skip


def _recent_points(baseline: SeriesLike, window: int) -> list[float]:
    """The last `window` points as floats, checked finite (a list, as the server passes, skips numpy)."""
    if isinstance(baseline, list):
        recent = baseline[-window:]
        try:
            finite = math.isfinite(math.fsum(recent))  # one NaN or infinity makes the sum so
        except (TypeError, OverflowError):  # not numbers, or a sum past the float range: as_series decides
            finite = False
        if finite:
            return recent
    points: list[float] = as_series(baseline)[-window:].tolist()
    return points


# -- per-test, per-metric overrides ------------------------------------------------------------------------------

_MODEL_FIELDS = ("window", "min_points", "sigmas", "min_change")


class ThresholdConfigError(ValueError):
    """The override file cannot be used; the message is one line, fit for the server's start-up error."""


@dataclasses.dataclass(frozen=True, slots=True)
class ThresholdRule:
    test: str  # fnmatch pattern over test names; "*" for all
    metric: str | None  # an exact metric name, or None for all
    model: ThresholdModel  # the file's default with the rule's fields set

    def matches(self, test_name: str, metric: str) -> bool:
        return (self.metric is None or self.metric == metric) and fnmatch.fnmatchcase(test_name, self.test)

    def specificity(self) -> tuple[bool, bool, int]:
        """A metric beats no metric; an exact test name beats a pattern; a longer literal part beats a shorter."""
        wildcards = sum(self.test.count(char) for char in "*?[")
        return (self.metric is not None, wildcards == 0, len(self.test) - wildcards)


@dataclasses.dataclass(frozen=True, slots=True)
class ThresholdConfig:
    """A default model plus override rules. The most specific matching rule wins whole: its fields replace the
    default's and no other rule's apply, so every model a lookup can give was checked when the file was loaded."""

    default: ThresholdModel = DEFAULT_MODEL
    rules: tuple[ThresholdRule, ...] = ()

    def model_for(self, test_name: str, metric: str) -> ThresholdModel:
        best: ThresholdRule | None = None
        for rule in self.rules:  # equal specificity: the later rule in the file wins
            if rule.matches(test_name, metric) and (best is None or rule.specificity() >= best.specificity()):
                best = rule
        return self.default if best is None else best.model


def load_threshold_config(path: str | Path, base: ThresholdModel = DEFAULT_MODEL) -> ThresholdConfig:
    """Read the override file (`.toml`, else JSON) at start-up; any problem is one ThresholdConfigError line.
    `base` is the model the file's `default` table changes (the server's options)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ThresholdConfigError(f"{path}: cannot read: {error}") from None
    return parse_threshold_config(text, "toml" if path.suffix == ".toml" else "json", source=str(path), base=base)


def parse_threshold_config(
    text: str, syntax: Literal["toml", "json"], source: str = "<thresholds>", base: ThresholdModel = DEFAULT_MODEL
) -> ThresholdConfig:
    """Parse the override file's text.

    Shape (JSON has the same keys)::

        [default]             # optional: changes the built-in defaults
        sigmas = 3.0
        [[rule]]              # any number; each needs `test` or `metric`, plus at least one model field
        test = "streaming_*"  # fnmatch pattern, default "*"
        metric = "perc_lat_99"  # exact metric name, default all metrics
        sigmas = 4
        min_change = 0.1      # a fraction: 0.1 = 10 %
    """
    try:
        document = tomllib.loads(text) if syntax == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as error:
        raise ThresholdConfigError(f"{source}: not valid {syntax.upper()}: {_one_line(error)}") from None
    if not isinstance(document, dict):
        raise ThresholdConfigError(f"{source}: the top level must be a table/object with `default` and `rule`")
    unknown = sorted(set(document) - {"default", "rule"})
    if unknown:
        raise ThresholdConfigError(f"{source}: unknown key {unknown[0]!r} (expected `default` and `rule`)")
    default_table = document.get("default", {})
    if not isinstance(default_table, dict):
        raise ThresholdConfigError(f"{source}: `default` must be a table/object")
    default_fields = _model_fields(default_table, f"{source}: default", allowed=set(_MODEL_FIELDS))
    default = _checked_model(base, default_fields, f"{source}: default")
    rule_tables = document.get("rule", [])
    if not isinstance(rule_tables, list):
        raise ThresholdConfigError(f"{source}: `rule` must be an array of tables/objects")
    rules = []
    for number, table in enumerate(rule_tables, 1):
        where = f"{source}: rule {number}"
        if not isinstance(table, dict):
            raise ThresholdConfigError(f"{where}: must be a table/object")
        test, metric = table.get("test", "*"), table.get("metric")
        if not isinstance(test, str) or not test:
            raise ThresholdConfigError(f"{where}: `test` must be a non-empty string (an fnmatch pattern)")
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ThresholdConfigError(f"{where}: `metric` must be a non-empty string")
        if "test" not in table and metric is None:
            raise ThresholdConfigError(f"{where}: needs `test` or `metric` (use `default` for all series)")
        overrides = _model_fields(table, where, allowed={"test", "metric", *_MODEL_FIELDS})
        if not overrides:
            raise ThresholdConfigError(f"{where}: sets none of {', '.join(_MODEL_FIELDS)}")
        rules.append(ThresholdRule(test, metric, _checked_model(default, overrides, where)))
    return ThresholdConfig(default, tuple(rules))


def _model_fields(table: Mapping[str, object], where: str, allowed: set[str]) -> dict[str, float | int]:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ThresholdConfigError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})")
    fields: dict[str, float | int] = {}
    for name in _MODEL_FIELDS:
        if name not in table:
            continue
        value = table[name]
        integral = name in ("window", "min_points")
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            kind = "an integer" if integral else "a number"
            raise ThresholdConfigError(f"{where}: {name} must be {kind}, not {value!r:.40}")
        fields[name] = value if integral else float(value)
    return fields


def _checked_model(base: ThresholdModel, fields: Mapping[str, float | int], where: str) -> ThresholdModel:
    try:
        return dataclasses.replace(base, **fields)  # type: ignore[arg-type]
    except ValueError as error:
        raise ThresholdConfigError(f"{where}: {error}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
