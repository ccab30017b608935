"""A metric's values over time, downsampled into equal time buckets while the records stream by.

The store walks the records of a series newest first, so each metric has one open bucket at a
time: memory holds the finished points and the open bucket's values, never the whole series.
Count, min, max and mean of a bucket are exact; its median is exact up to MEDIAN_SAMPLE values and
beyond that the median of a uniform random sample of MEDIAN_SAMPLE of them (reservoir sampling,
seeded per request so a repeated request gives the same answer). Every bucket keeps its min and
max, so the range's extreme values always survive; a bucket of one record names that record.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from typing import Any

from perfdb.records.timestamps import format_micros

# Values of one bucket kept for its median; past this, a uniform sample of this many.
MEDIAN_SAMPLE = 2048
_SAMPLE_SEED = 20_151_117


@dataclasses.dataclass(frozen=True, slots=True)
class BucketGrid:
    """Equal time buckets: bucket i covers [start + i * width, start + (i + 1) * width), the last
    one cut at `end`."""

    start: int  # microseconds, inclusive
    end: int  # microseconds, exclusive
    width: int  # microseconds, at least 1

    @classmethod
    def spanning(cls, start: int, end: int, buckets: int) -> BucketGrid:
        """At most `buckets` buckets over [start, end), as narrow as that allows."""
        return cls(start, end, max(1, -(-(end - start) // buckets)))

    @property
    def count(self) -> int:
        return -(-(self.end - self.start) // self.width)

    def bucket_of(self, micros: int) -> int:
        return (micros - self.start) // self.width

    def bounds(self, bucket: int) -> tuple[int, int]:
        low = self.start + bucket * self.width
        return low, min(self.end, low + self.width)


# The smallest or largest value of a series: (value, record id, microseconds).
Extreme = tuple[int | float, str, int]


def _extreme_fields(extreme: Extreme | None) -> dict[str, Any] | None:
    if extreme is None:
        return None
    value, record_id, micros = extreme
    return {"value": value, "record_id": record_id, "timestamp": format_micros(micros)}


class MetricSeries:
    """One metric's points, built from values added newest first. `add` runs once per value of
    every record walked, so it is written for speed: plain attributes, no calls on the common path."""

    __slots__ = (
        "_bucket",
        "_count",
        "_maximum",
        "_minimum",
        "_only",
        "_random",
        "_sample",
        "_start",
        "_total",
        "_width",
        "count",
        "exact_medians",
        "first",
        "grid",
        "highest",
        "last",
        "lowest",
        "points",
    )

    def __init__(self, grid: BucketGrid) -> None:
        self.grid = grid
        self._start = grid.start
        self._width = grid.width
        self.points: list[dict[str, Any]] = []  # finished buckets, newest first
        self.count = 0
        self.first: int | None = None  # microseconds of the oldest value added
        self.last: int | None = None  # ... and of the newest
        self.lowest: Extreme | None = None  # ties: the oldest record
        self.highest: Extreme | None = None
        self.exact_medians = True
        self._random = random.Random(_SAMPLE_SEED)
        self._bucket: int | None = None  # the open bucket
        self._count = 0
        self._total: float = 0
        self._minimum: int | float = 0
        self._maximum: int | float = 0
        self._sample: list[int | float] = []
        self._only: tuple[str, int] | None = None  # record id and time of the bucket's first value

    def add(self, value: int | float, record_id: str, micros: int) -> None:
        """Add a value; each call's record must not be newer than the previous call's."""
        bucket = (micros - self._start) // self._width
        if bucket != self._bucket:
            self._close()
            self._bucket = bucket
            self._count = 0
            self._total = 0
            self._minimum = self._maximum = value
            self._sample = []
            self._only = (record_id, micros)
            if self.last is None:
                self.last = micros
        count = self._count = self._count + 1
        self._total += value
        if value < self._minimum:
            self._minimum = value
        elif value > self._maximum:
            self._maximum = value
        if count <= MEDIAN_SAMPLE:
            self._sample.append(value)
        else:
            self.exact_medians = False
            slot = self._random.randrange(count)
            if slot < MEDIAN_SAMPLE:
                self._sample[slot] = value
        self.count += 1
        self.first = micros
        lowest, highest = self.lowest, self.highest
        if lowest is None or value <= lowest[0]:
            self.lowest = (value, record_id, micros)
        if highest is None or value >= highest[0]:
            self.highest = (value, record_id, micros)

    def _close(self) -> None:
        if self._bucket is None:
            return
        since, until = self.grid.bounds(self._bucket)
        point: dict[str, Any] = {
            "bucket": self._bucket,
            "since": format_micros(since),
            "until": format_micros(until),
            "count": self._count,
            "min": self._minimum,
            "median": statistics.median(self._sample),
            "max": self._maximum,
            "mean": self._total / self._count,
        }
        if self._count == 1 and self._only is not None:
            record_id, micros = self._only
            point.update(record_id=record_id, timestamp=format_micros(micros), value=self._minimum)
        self.points.append(point)
        self._bucket = None

    def to_fields(self) -> dict[str, Any]:
        """The series' reply fields; closes the open bucket."""
        self._close()
        return {
            "count": self.count,
            "first": None if self.first is None else format_micros(self.first),
            "last": None if self.last is None else format_micros(self.last),
            "min": _extreme_fields(self.lowest),
            "max": _extreme_fields(self.highest),
            "exact_medians": self.exact_medians,
            "points": self.points[::-1],
        }
