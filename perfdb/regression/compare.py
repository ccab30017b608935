"""Two samples of one metric (base, head): did head regress?

The test: Welch's t-test on the means (benchmark samples are small and their variances differ between builds,
which Student's test would assume away), and, when either side has fewer than `rank_test_below` points, also the
Mann-Whitney U test, which does not assume normal noise and is not swung by one outlier; the verdict then needs
both to agree (the larger p-value is the one reported). With 2-3 points a side Mann-Whitney cannot reach p 0.05
at all (its smallest two-sided p is 2/C(n1+n2, n1)), so such samples give no_change unless both sides are constant
and differ: small samples should not raise regressions. A significant change must also reach
`min_change` of the base mean, so a tiny but real difference is not called a regression.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

from perfdb.regression.direction import MetricDirection
from perfdb.regression.series import SeriesLike, as_series
from perfdb.regression.significance import welch_t_test
from perfdb.regression.thresholds import Status, percent_change

MODEL_NAME = "welch_mann_whitney"


@dataclasses.dataclass(frozen=True, slots=True)
class CompareModel:
    """The comparison's parameters; these defaults are the only place they are set."""

    significance: float = 0.05  # the largest p-value that counts as a change
    min_change: float = 0.05  # and the change must reach this fraction of the base mean (0.05 = 5 %)
    min_points: int = 2  # per side; fewer: insufficient_data
    rank_test_below: int = 20  # add Mann-Whitney U when either side has fewer points than this

    def __post_init__(self) -> None:
        if not 0 < self.significance < 1:
            raise ValueError(f"significance must be between 0 and 1, not {self.significance}")
        if not (math.isfinite(self.min_change) and 0 <= self.min_change <= 1):
            raise ValueError(f"min_change must be a fraction between 0 and 1, not {self.min_change}")
        if self.min_points < 2:
            raise ValueError(f"min_points must be at least 2, not {self.min_points}")

    def to_json(self) -> dict[str, object]:
        return {"name": MODEL_NAME, **dataclasses.asdict(self)}


DEFAULT_MODEL = CompareModel()


@dataclasses.dataclass(frozen=True, slots=True)
class SampleSummary:
    n: int
    mean: float
    stddev: float  # sample standard deviation (n - 1); 0.0 for one point
    median: float

    @classmethod
    def of(cls, values: Sequence[float]) -> SampleSummary:
        if not values:
            return cls(0, math.nan, math.nan, math.nan)
        stddev = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(len(values), statistics.fmean(values), stddev, statistics.median(values))

    def to_json(self) -> dict[str, object]:
        return {"n": 0} if self.n == 0 else dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    metric: str
    status: Status
    model: CompareModel
    base: SampleSummary
    head: SampleSummary
    change_percent: float | None  # head mean against base mean; None if insufficient or the base mean is 0
    welch_pvalue: float | None
    mann_whitney_pvalue: float | None  # None when not run (both sides large enough) or insufficient data
    pvalue: float | None  # the one the verdict used: the larger of those run
    significant: bool  # pvalue <= significance, whether or not the change reaches min_change
    changed: bool  # significant and at least min_change; with an unknown direction the status stays no_change
    direction: MetricDirection

    def to_json(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "status": self.status,
            "model": self.model.to_json(),
            "base": self.base.to_json(),
            "head": self.head.to_json(),
            "change_percent": self.change_percent,
            "pvalue": self.pvalue,
            "welch_pvalue": self.welch_pvalue,
            "mann_whitney_pvalue": self.mann_whitney_pvalue,
            "significant": self.significant,
            "changed": self.changed,
            "direction": self.direction.to_json(),
        }


def compare(
    base: SeriesLike, head: SeriesLike, direction: MetricDirection, model: CompareModel = DEFAULT_MODEL
) -> Comparison:
    """Compare the raw results of two builds (finite numbers; lists or numpy arrays)."""
    base_values, head_values = as_series(base).tolist(), as_series(head).tolist()
    base_summary, head_summary = SampleSummary.of(base_values), SampleSummary.of(head_values)
    if min(len(base_values), len(head_values)) < model.min_points:
        return Comparison(
            direction.metric, "insufficient_data", model, base_summary, head_summary,
            None, None, None, None, False, False, direction,
        )  # fmt: skip
    welch = welch_t_test(
        base_summary.n, base_summary.mean, base_summary.stddev**2,
        head_summary.n, head_summary.mean, head_summary.stddev**2,
    ).pvalue  # fmt: skip
    rank: float | None = None
    if min(len(base_values), len(head_values)) < model.rank_test_below:
        rank = _mann_whitney_pvalue(base_values, head_values)
    pvalue = welch if rank is None else max(welch, rank)
    delta = head_summary.mean - base_summary.mean
    significant = pvalue <= model.significance
    changed = significant and abs(delta) > model.min_change * abs(base_summary.mean)
    worse = direction.is_worse(delta)
    status: Status = "no_change" if not changed or worse is None else "regression" if worse else "improvement"
    return Comparison(
        direction.metric, status, model, base_summary, head_summary,
        percent_change(head_summary.mean, base_summary.mean), welch, rank, pvalue, significant, changed,
        direction,
    )  # fmt: skip


def _mann_whitney_pvalue(base: list[float], head: list[float]) -> float:
    if len(set(base)) == 1 and len(set(head)) == 1:  # scipy gives nan when every value is equal
        return 0.0 if base[0] != head[0] else 1.0
    from scipy import stats  # imported on first use: see significance.preload_scipy

    result = stats.mannwhitneyu(base, head, alternative="two-sided", method="auto")
    return float(result.pvalue)
