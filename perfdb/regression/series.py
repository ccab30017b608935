"""What a series is here (finite floats, oldest first, as a list or a numpy array) and the bounded windows of
recent points the server keeps per series."""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, TypeAlias, cast

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


class SeriesWindow:
    """One series' last `maxlen` points, with what judging its next value needs kept up to date as points come
    and go, so a summary is O(1) and an append O(window) at worst (a list insert) instead of passes over the
    window: the values in order (median, min and max) and the exact sums of the values and of their squares.

    The sums are integers: every value is an integer multiple of 2**floor (floor: the lowest exponent met, so
    the integers stay near 53 bits for a series of similar values), so adding and removing points never rounds,
    and the summary depends only on the points kept (a window rebuilt from the database gives the same verdicts
    as the live one). The mean is exactly what math.fsum(values) / n gives; the stddev differs from the
    two-pass sum of squared deviations only in its last bits (it is the exact variance, rounded once).
    """

    __slots__ = ("_floor", "_ordered", "_squares", "_sum", "points")

    def __init__(self, maxlen: int, points: Iterable[SeriesPoint] = ()) -> None:
        self.points: collections.deque[SeriesPoint] = collections.deque(maxlen=maxlen)
        self._ordered: list[float] = []
        self._floor = _NO_FLOOR
        self._sum = self._squares = 0
        for point in points:
            self.append(point.record_id, point.value)

    def __len__(self) -> int:
        return len(self.points)

    @property
    def maxlen(self) -> int:
        maxlen = self.points.maxlen
        assert maxlen is not None  # always made with one
        return maxlen

    def append(self, record_id: str, value: float) -> None:
        points = self.points
        if len(points) == points.maxlen:
            old = points[0].value
            ordered = self._ordered
            del ordered[bisect.bisect_left(ordered, old)]
            fraction, exponent = math.frexp(old)
            if fraction:  # a zero's exponent may be below the floor
                scaled = int(fraction * _TWO_53) << (exponent - 53 - self._floor)
                self._sum -= scaled
                self._squares -= scaled * scaled
        points.append(_new_tuple(SeriesPoint, (record_id, value)))  # SeriesPoint(...) costs twice as much
        bisect.insort(self._ordered, value)
        fraction, exponent = math.frexp(value)  # value == int(fraction * 2**53) * 2**(exponent - 53) exactly
        if not fraction:
            return
        exponent -= 53
        if exponent < self._floor:
            shift = self._floor - exponent
            self._sum <<= shift
            self._squares <<= 2 * shift
            self._floor = exponent
        scaled = int(fraction * _TWO_53) << (exponent - self._floor)
        self._sum += scaled
        self._squares += scaled * scaled

    def summary(self) -> tuple[int, float, float, float, float, float]:
        """(n, mean, stddev, median, min, max) of the kept points, as BaselineSummary.of gives them (the stddev up
        to its last bits); stddev is the sample one (n - 1), 0.0 for one point. Not for an empty window."""
        ordered = self._ordered
        n = len(ordered)
        floor, total = self._floor, self._sum
        try:
            # float(int) rounds once, correctly, and ldexp is exact: the exact sum rounded, as math.fsum gives it.
            mean = math.ldexp(float(total), floor) / n
            stddev = 0.0
            if n > 1:  # the exact n (n - 1) times the variance, rounded once
                stddev = math.sqrt(math.ldexp(float(n * self._squares - total * total), 2 * floor) / (n * (n - 1)))
        except OverflowError:  # integers past the float range (a window with tiny and huge values): slower
            mean, stddev = self._exact_mean_and_stddev(n)
        middle = n // 2
        median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return n, mean, stddev, median, ordered[0], ordered[-1]

    def _exact_mean_and_stddev(self, n: int) -> tuple[float, float]:
        floor, total = self._floor, self._sum
        # int / int rounds once, correctly, however large the integers.
        mean = (total / (1 << -floor) if floor < 0 else float(total << floor)) / n
        if n == 1:
            return mean, 0.0
        spread, scale = n * self._squares - total * total, n * (n - 1)
        return mean, math.sqrt(spread / (scale << -2 * floor) if floor < 0 else float(spread << 2 * floor) / scale)


_NO_FLOOR = 1 << 20  # above any float's exponent: the first nonzero value sets the floor


_TWO_53 = 9007199254740992.0  # times a frexp fraction: the whole mantissa as an integer
_new_tuple = tuple.__new__


class SeriesWindows:
    """The last `window` points of each series, for at most `max_series` series (least recently used evicted).

    `append` is O(window) at worst, `get(key).summary()` O(1). The server rebuilds this at start by appending
    each series' recent points, oldest first.
    """

    __slots__ = ("_series", "evictions", "max_series")

    def __init__(self, max_series: int) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, not {max_series}")
        self.max_series = max_series
        self.evictions = 0
        # Keyed by SeriesKey; looked up with plain tuples of its fields too (equal, same hash, cheaper to make).
        self._series: collections.OrderedDict[tuple[str, str, str, str], SeriesWindow] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def __iter__(self) -> Iterator[SeriesKey]:
        return cast(Iterator[SeriesKey], iter(self._series))

    def points(self, key: SeriesKey) -> tuple[SeriesPoint, ...]:
        """The series' kept points, oldest first (empty if unknown); does not count as a use."""
        series = self._series.get(key)
        return () if series is None else tuple(series.points)

    def newest_record_id(self, key: SeriesKey) -> str | None:
        """The record id of the series' newest kept point (None if none); does not count as a use."""
        series = self._series.get(key)
        return series.points[-1].record_id if series else None

    def values(self, key: SeriesKey) -> list[float]:
        """The kept values, oldest first: the baseline to `judge` the series' next value against."""
        series = self._series.get(key)
        return [] if series is None else [point.value for point in series.points]

    def get(self, key: SeriesKey) -> SeriesWindow | None:
        """The series' window, to summarise (None if unknown); does not count as a use."""
        return self._series.get(key)

    def append(self, key: SeriesKey, record_id: str, value: float, window: int) -> None:
        """Add the newest point; keeps `window` points (a changed window for the series takes effect now)."""
        self.used(key, window).append(record_id, float(value))

    def used(self, key: SeriesKey, window: int) -> SeriesWindow:
        """The series' window, made (evicting the least recently used series past `max_series`) or resized to
        `window` points as needed, and now the most recently used; `append` to it."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = SeriesWindow(window)
            if len(self._series) > self.max_series:
                self._series.popitem(last=False)
                self.evictions += 1
        else:
            self._series.move_to_end(key)
            if series.maxlen != window:
                series = self._series[key] = SeriesWindow(window, series.points)
        return series

    def summarise_and_append(
        self, key: tuple[str, str, str, str], baseline: tuple[str, str, str, str] | None, record_id: str,
        value: float, window: int,
    ) -> tuple[int, float, float, float, float, float] | None:  # fmt: skip
        """The summary of the last `window` points of `baseline`'s window (`key`'s when None; None if it has no
        window), then the point joins `key`'s window unless that holds a record as new or newer (an import of an
        old record: it stays out until the series is rebuilt, as a window holds the newest records in time
        order). The verdict thread's one call per metric; `key` may be a plain tuple (SeriesKey's fields)."""
        series = self._series.get(key)
        judged = series if baseline is None else self._series.get(baseline)
        summary = None
        if judged is not None:
            summary = (
                judged.summary() if len(judged.points) <= window else SeriesWindow(window, judged.points).summary()
            )
        if series is None or series.maxlen != window:
            if series is None or series.points[-1].record_id < record_id:
                self.used(SeriesKey(*key), window).append(record_id, value)
        elif series.points[-1].record_id < record_id:
            self._series.move_to_end(key)
            series.append(record_id, value)
        return summary

    def discard(self, key: SeriesKey) -> None:
        self._series.pop(key, None)
