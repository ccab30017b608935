"""What a series is here (finite floats, oldest first, as a list or a numpy array) and the bounded windows of
recent points the server keeps per series."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float64]
SeriesLike: TypeAlias = Sequence[float] | npt.NDArray[np.floating] | npt.NDArray[np.integer]


def as_series(series: SeriesLike) -> FloatArray:
    """A 1-D float64 array of the series; lists, tuples and numpy arrays of any numeric dtype are all fine."""
    array = np.asarray(series, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"a series must be one-dimensional, not of shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("a series must hold finite numbers only (drop NaN and infinities first)")
    return array


# -- the in-memory windows the server keeps ----------------------------------------------------------------------


class SeriesKey(NamedTuple):
    user_id: str
    test_name: str
    tag: str
    metric: str


class SeriesPoint(NamedTuple):
    record_id: str
    value: float


class SeriesWindows:
    """The last `window` points of each series, for at most `max_series` series (least recently used evicted).

    `append` is O(1). The server rebuilds this at start by appending each series' recent points, oldest first.
    """

    __slots__ = ("_series", "evictions", "max_series")

    def __init__(self, max_series: int) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, not {max_series}")
        self.max_series = max_series
        self.evictions = 0
        self._series: collections.OrderedDict[SeriesKey, collections.deque[SeriesPoint]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def __iter__(self) -> Iterator[SeriesKey]:
        return iter(self._series)

    def points(self, key: SeriesKey) -> tuple[SeriesPoint, ...]:
        """The series' kept points, oldest first (empty if unknown); does not count as a use."""
        points = self._series.get(key)
        return () if points is None else tuple(points)

    def newest_record_id(self, key: SeriesKey) -> str | None:
        """The record id of the series' newest kept point (None if none); does not count as a use."""
        points = self._series.get(key)
        return points[-1].record_id if points else None

    def values(self, key: SeriesKey) -> list[float]:
        """The kept values, oldest first: the baseline to `judge` the series' next value against."""
        points = self._series.get(key)
        return [] if points is None else [point.value for point in points]

    def append(self, key: SeriesKey, record_id: str, value: float, window: int) -> None:
        """Add the newest point; keeps `window` points (a changed window for the series takes effect now)."""
        points = self._series.get(key)
        if points is None:
            points = self._series[key] = collections.deque(maxlen=window)
            if len(self._series) > self.max_series:
                self._series.popitem(last=False)
                self.evictions += 1
        else:
            self._series.move_to_end(key)
            if points.maxlen != window:
                points = self._series[key] = collections.deque(points, maxlen=window)
        points.append(SeriesPoint(record_id, float(value)))

    def discard(self, key: SeriesKey) -> None:
        self._series.pop(key, None)
