"""Which way is better for a metric: the core metrics know; others say so in the record, or nobody knows."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from perfdb.records.units import CORE_METRIC_NAMES


class Better(enum.Enum):
    HIGHER = "higher"
    LOWER = "lower"


# Throughput is better higher; latencies and CPU times are better lower.
_CORE_HIGHER = frozenset({"qps", "qps_per_core"})
CORE_DIRECTIONS: Mapping[str, Better] = {
    name: Better.HIGHER if name in _CORE_HIGHER else Better.LOWER for name in CORE_METRIC_NAMES
}


@dataclasses.dataclass(frozen=True, slots=True)
class MetricDirection:
    """A metric and which way is better for it; `better` is None when unknown (a change, never a regression)."""

    metric: str
    better: Better | None
    source: str  # "core", "declared" or "unknown": where `better` came from

    def is_worse(self, delta: float) -> bool | None:
        """Whether moving by `delta` (new minus old) is a move the wrong way; None if the direction is unknown."""
        if self.better is None:
            return None
        return delta < 0 if self.better is Better.HIGHER else delta > 0

    def to_json(self) -> str | None:
        return None if self.better is None else self.better.value


def direction_of(metric: str, declared: Mapping[str, object] | None = None) -> MetricDirection:
    """The direction of `metric`: fixed for the core metrics, else the record's `"better": {metric: "higher"|"lower"}`.

    A core metric ignores what a record declares (a record cannot turn a latency drop into a regression); an
    undeclared or malformed declaration gives an unknown direction.
    """
    core = _CORE_METRIC_DIRECTIONS.get(metric)
    if core is not None:
        return core
    if declared is not None:
        value = declared.get(metric)
        if value == Better.HIGHER.value:
            return MetricDirection(metric, Better.HIGHER, "declared")
        if value == Better.LOWER.value:
            return MetricDirection(metric, Better.LOWER, "declared")
    return MetricDirection(metric, None, "unknown")


# Made once: every metric of every record asks.
_CORE_METRIC_DIRECTIONS = {
    metric: MetricDirection(metric, better, "core") for metric, better in CORE_DIRECTIONS.items()
}
