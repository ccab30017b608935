"""What a series is here (finite floats, oldest first, as a list or a numpy array) and the bounded windows of
recent points the server keeps per series."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
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


# (n, mean, stddev, median, min, max) of a baseline, as SeriesWindow.summary gives it.
Summary: TypeAlias = tuple[int, float, float, float, float, float]
IntArray: TypeAlias = npt.NDArray[np.intp]
ObjectArray: TypeAlias = npt.NDArray[np.object_]

# A series' number across the pools of windows: its pool's number * _STRIDE + its row in that pool.
_STRIDE = 1 << 32
_NONE = -1  # no series: no baseline, or a point that does not join
_MAX_ROW_PLANS = 100_000


def _grown(array: np.ndarray, size: int, fill: object) -> np.ndarray:
    grown = np.full((size, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


class _WindowRows:
    """The windows of one width, a row each: ring buffers of values and of record ids (a row's next point goes to
    its `next_slots`), and per row its count of points and when it was last used."""

    __slots__ = ("_free", "_next_unused", "counts", "ids", "next_slots", "number", "used", "values", "width")

    def __init__(self, width: int, number: int = 0) -> None:
        self.width = width
        self.number = number
        self.values: FloatArray = np.zeros((4, width))
        self.ids: ObjectArray = np.full((4, width), None, dtype=object)
        self.counts: IntArray = np.zeros(4, dtype=np.intp)
        self.next_slots: IntArray = np.zeros(4, dtype=np.intp)
        self.used: npt.NDArray[np.int64] = np.zeros(4, dtype=np.int64)
        self._free: list[int] = []
        self._next_unused = 0

    def allocate(self) -> int:
        if self._free:
            return self._free.pop()
        row = self._next_unused
        if row == len(self.values):  # doubling: the copies cost O(1) a row
            size = 2 * row
            self.values = _grown(self.values, size, 0.0)
            self.ids = _grown(self.ids, size, None)
            self.counts = _grown(self.counts, size, 0)
            self.next_slots = _grown(self.next_slots, size, 0)
            self.used = _grown(self.used, size, 0)
        self._next_unused = row + 1
        return row

    def release(self, row: int) -> None:
        self.counts[row] = self.next_slots[row] = 0
        self.ids[row] = None  # the record ids go now, not when the row is next used
        self._free.append(row)

    def append(self, row: int, record_id: str, value: float) -> None:
        slot = int(self.next_slots[row])
        self.values[row, slot] = value
        self.ids[row, slot] = record_id
        self.next_slots[row] = (slot + 1) % self.width
        self.counts[row] = min(int(self.counts[row]) + 1, self.width)

    def write(self, rows: IntArray, record_ids: ObjectArray, values: FloatArray) -> None:
        """append() to many rows at once, each at most once."""
        slots = self.next_slots[rows]
        self.values[rows, slots] = values
        self.ids[rows, slots] = record_ids
        self.next_slots[rows] = (slots + 1) % self.width
        self.counts[rows] = np.minimum(self.counts[rows] + 1, self.width)

    def newest_ids(self, rows: IntArray) -> ObjectArray:
        """The rows' newest record ids, the last appended ("" for an empty row: it sorts before every id)."""
        last = self.ids[rows, (self.next_slots[rows] - 1) % self.width]
        return np.where(self.counts[rows] > 0, last, "")

    def ordered(self, row: int) -> tuple[FloatArray, list[str]]:
        """A row's values (a copy) and record ids, oldest first."""
        count, slot = int(self.counts[row]), int(self.next_slots[row])
        if count < self.width:
            return self.values[row, :count].copy(), self.ids[row, :count].tolist()
        return np.roll(self.values[row], -slot), np.roll(self.ids[row], -slot).tolist()

    def latest_values(self, rows: IntArray, most: IntArray) -> tuple[FloatArray, IntArray]:
        """The rows' newest `most` values at most (each row's own): the rows, in which they are the first of as many
        as the counts given (in any order, as _summary_columns takes them)."""
        counts = self.counts[rows]
        kept = np.minimum(counts, most)
        if (kept == counts).all():  # the usual case: a window as wide as asked; a row keeps its first `count` slots
            return self.values[rows], kept
        slots = (self.next_slots[rows][:, None] - 1 - np.arange(self.width)) % self.width
        return self.values[rows[:, None], slots], kept  # newest first


class SeriesWindow:
    """One series' last `maxlen` points: a row of the _WindowRows shared by the windows of one width (its own when
    none is given), so that SeriesWindows summarises and fills a batch's windows with a few numpy calls.

    A summary is computed from the values sorted, so it depends only on the points kept, not on their order (a
    window rebuilt from the database gives the same verdicts as the live one).
    """

    __slots__ = ("row", "rows")

    def __init__(self, maxlen: int, points: Iterable[SeriesPoint] = (), rows: _WindowRows | None = None) -> None:
        self.rows = _WindowRows(maxlen) if rows is None else rows
        self.row = self.rows.allocate()
        for point in points:
            self.append(point.record_id, point.value)

    def __len__(self) -> int:
        return int(self.rows.counts[self.row])

    @property
    def maxlen(self) -> int:
        return self.rows.width

    @property
    def number(self) -> int:
        """The series' number across the pools of windows."""
        return self.rows.number * _STRIDE + self.row

    @property
    def points(self) -> tuple[SeriesPoint, ...]:
        """The kept points, oldest first."""
        values, record_ids = self.rows.ordered(self.row)
        return tuple(map(SeriesPoint._make, zip(record_ids, values.tolist(), strict=True)))

    def ordered_values(self) -> FloatArray:
        """The kept values, oldest first (a copy)."""
        return self.rows.ordered(self.row)[0]

    def append(self, record_id: str, value: float) -> None:
        self.rows.append(self.row, record_id, value)

    def summary(self) -> Summary:
        """(n, mean, stddev, median, min, max) of the kept points, as BaselineSummary.of gives them (the mean and
        stddev up to their last bits); stddev is the sample one (n - 1), 0.0 for one point. Not for an empty
        window."""
        counts = np.array([len(self)])
        return _summaries(self.rows.values[[self.row]], counts)[0]

    def release(self) -> None:
        """The window is dropped: its row may go to another."""
        self.rows.release(self.row)


def _summaries(rows: FloatArray, counts: IntArray) -> list[Summary]:
    """The summary of each row's first `counts` values (see _summary_columns)."""
    columns = (column.tolist() for column in _summary_columns(rows, counts))
    return list(zip(counts.tolist(), *columns, strict=True))


def _summary_columns(
    rows: FloatArray, counts: IntArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """The mean, stddev, median, min and max of each row's first `counts` values (at least one; their order does not
    matter): one pass of numpy calls for all of them.

    The rows are sorted first (the min, max and median are read off them) and summed in that order, so a summary
    depends only on the values. The sum is compensated (_compensated_sums), so the mean is math.fsum(values) / n
    but in the rare case where the exact sum lies within a rounding error or so of halfway between two floats (it
    may then differ in its last bit); the stddev is the two-pass one around that mean, so identical values give
    their value and a stddev of exactly 0.0.
    """
    width = rows.shape[1]
    full = bool((counts == width).all())  # as a batch's windows mostly are: no slot to leave out
    valid = np.arange(width) < counts[:, None]
    ordered = np.sort(rows if full else np.where(valid, rows, np.inf), axis=1)
    kept = ordered if full else np.where(valid, ordered, 0.0)
    picked = np.arange(len(rows))
    low, high = ordered[:, 0], ordered[picked, counts - 1]
    below, above = ordered[picked, (counts - 1) // 2], ordered[picked, counts // 2]
    with np.errstate(over="ignore", invalid="ignore"):  # sums past the float range: see below
        median = np.where(counts % 2 == 1, above, (below + above) / 2)
        mean = _compensated_sums(kept) / counts
        deviations = kept - mean[:, None]
        if not full:
            deviations[~valid] = 0.0
        stddev = np.sqrt(np.square(deviations).sum(axis=1) / np.maximum(counts - 1, 1))
    unfit = ~(np.isfinite(mean) & np.isfinite(stddev))
    if unfit.any():
        for index in np.flatnonzero(unfit).tolist():
            mean[index], stddev[index] = _scaled_mean_and_stddev(kept[index, : counts[index]])
    return mean, stddev, median, low, high


def _compensated_sums(rows: FloatArray) -> FloatArray:
    """Each row's sum, added up pairwise (columns 0 and 1, 2 and 3, ..., then the sums likewise) with the rounding
    error of each addition found exactly (Knuth's two-sum) and added back at the end: as accurate as a sum in twice
    the precision, in a few numpy calls a level rather than a few a column."""
    errors = np.zeros(len(rows))
    while rows.shape[1] > 1:
        if rows.shape[1] % 2:
            rows = np.concatenate((rows, np.zeros((len(rows), 1))), axis=1)
        left, right = rows[:, 0::2], rows[:, 1::2]
        summed = left + right
        virtual = summed - left
        errors += ((left - (summed - virtual)) + (right - virtual)).sum(axis=1)
        rows = summed
    return rows[:, 0] + errors


def _scaled_mean_and_stddev(values: FloatArray) -> tuple[float, float]:
    """The mean and stddev of values whose sums left the float range (huge values), from the values scaled down."""
    scale = float(np.max(np.abs(values)))
    scaled = values / scale
    count = len(values)
    mean = math.fsum(scaled.tolist()) / count
    stddev = 0.0 if count == 1 else math.sqrt(math.fsum(((scaled - mean) ** 2).tolist()) / (count - 1)) * scale
    return mean * scale, stddev


class SeriesWindows:
    """The last `window` points of each series, for at most `max_series` series (the least recently used evicted).

    The verdict thread `queue`s each record's points: each metric's baseline (the window of its series, or of the
    same metric in another tag) as the points queued before leave it, then the point joining its own series.
    `summaries` then makes the batch's baseline summaries and writes its points with a few numpy calls a round (a
    series met k times in the batch takes k rounds). The series of a record's points are looked up once per user,
    test, tag and plan of metrics (the caller's `plan` key), not metric by metric, until a series is made or
    dropped. The server rebuilds this at start by appending each series' recent points, oldest first.
    """

    __slots__ = (
        "_clock", "_joins", "_made", "_made_entries", "_pool_list", "_pools", "_reads", "_record_ids", "_row_plans",
        "_series", "_spans", "_values", "_windows", "evictions", "max_series",
    )  # fmt: skip

    def __init__(self, max_series: int) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, not {max_series}")
        self.max_series = max_series
        self.evictions = 0
        # Keyed by SeriesKey; looked up with plain tuples of its fields too (equal, same hash, cheaper to make).
        self._series: dict[tuple[str, str, str, str], SeriesWindow] = {}
        self._pools: dict[int, _WindowRows] = {}  # by width
        self._pool_list: list[_WindowRows] = []  # by number
        self._clock = 0  # counts uses: a series' last use is the clock's reading then
        # (group, baseline group, summarise, plan) -> the numbers of the series each metric joins and is judged by
        self._row_plans: dict[tuple[object, ...], tuple[list[int], list[int]]] = {}
        # The queued batch, an entry per point: the series it joins and the series whose window is its baseline
        # (numbers, or _NONE), the most points its baseline counts, its value; each record's id and point count.
        self._joins: list[int] = []
        self._reads: list[int] = []
        self._windows: list[int] = []
        self._values: list[float] = []
        self._record_ids: list[str] = []
        self._spans: list[int] = []
        self._made: list[tuple[IntArray, FloatArray]] = []  # the batch's summaries made so far, and how many
        self._made_entries = 0

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def __iter__(self) -> Iterator[SeriesKey]:
        return cast(Iterator[SeriesKey], iter(self._series))

    def points(self, key: SeriesKey) -> tuple[SeriesPoint, ...]:
        """The series' kept points, oldest first (empty if unknown); does not count as a use."""
        self._flush()
        series = self._series.get(key)
        return () if series is None else series.points

    def values(self, key: SeriesKey) -> list[float]:
        """The kept values, oldest first: the baseline to `judge` the series' next value against."""
        self._flush()
        series = self._series.get(key)
        return [] if series is None else series.ordered_values().tolist()

    def get(self, key: SeriesKey) -> SeriesWindow | None:
        """The series' window, to summarise (None if unknown); does not count as a use."""
        self._flush()
        return self._series.get(key)

    def append(self, key: SeriesKey, record_id: str, value: float, window: int) -> None:
        """Add the newest point; keeps `window` points (a changed window for the series takes effect now). The
        series is now the most recently used; past `max_series`, the least recently used are evicted."""
        self._flush()
        series = self._series.get(key)
        if series is None:
            series = self._made_series(key, window)
        elif series.maxlen != window:
            series = self._resized(key, series, window)
        series.append(record_id, float(value))
        series.rows.used[series.row] = self._tick()
        self._evict_past_limit()

    def discard(self, key: SeriesKey) -> None:
        self._flush()  # a row is freed only with no point queued that names it
        series = self._series.pop(key, None)
        if series is not None:
            series.release()
            self._row_plans.clear()

    def forget_plans(self) -> None:
        """The callers' plans changed (their windows, say): the series looked up for them are looked up again."""
        self._row_plans.clear()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _rows_of(self, width: int) -> _WindowRows:
        rows = self._pools.get(width)
        if rows is None:
            rows = self._pools[width] = _WindowRows(width, len(self._pool_list))
            self._pool_list.append(rows)
        return rows

    def _made_series(
        self, key: tuple[str, str, str, str], window: int, points: Iterable[SeriesPoint] = ()
    ) -> SeriesWindow:
        """A new window for the series (nothing is evicted here: the numbers of the series a record or a queued
        point names must stay theirs until the batch is written)."""
        series = self._series[key] = SeriesWindow(window, points, self._rows_of(window))
        series.rows.used[series.row] = self._tick()
        self._row_plans.clear()
        return series

    def _resized(self, key: tuple[str, str, str, str], series: SeriesWindow, window: int) -> SeriesWindow:
        self._flush()  # the resized window is made of its values, queued ones included
        points = series.points
        series.release()
        return self._made_series(key, window, points)

    def _evict_past_limit(self) -> None:
        """With no point queued (a batch written, or a point appended), evict what is past max_series: the windows
        hold a batch's new series beyond it only until the batch is written."""
        if len(self._series) > self.max_series:
            self._evict(len(self._series) - self.max_series)

    def _evict(self, overflow: int) -> None:
        """Drop the least recently used series: `overflow` of them, or a hundredth of max_series when that is more,
        so that a stream of new series does not look for the oldest one each time."""
        keys = list(self._series)
        count = min(len(keys), max(overflow, self.max_series // 100))
        used = np.fromiter(
            (series.rows.used[series.row] for series in self._series.values()), dtype=np.int64, count=len(keys)
        )
        oldest = np.argpartition(used, count - 1)[:count] if count < len(keys) else np.arange(len(keys))
        for index in oldest.tolist():
            self._series.pop(keys[index]).release()
        self.evictions += count
        self._row_plans.clear()

    def queue(
        self, group: tuple[str, str, str], baseline_group: tuple[str, str, str] | None, record_id: str,
        metrics: Iterable[str], values: Sequence[float], windows: Sequence[int], *, summarise: bool = True,
        plan: Hashable | None = None,
    ) -> int:  # fmt: skip
        """Queue a record's points, metric by metric: the summary of the last `window` points of the metric's
        series in `baseline_group` (user, test name, tag; `group` when None), as the points queued before left it,
        then the value joining its series in `group` unless that holds a record as new or newer (an import of an
        old record: it stays out until the series is rebuilt, as a window holds the newest records in time order).
        Returns where the record's summaries start in what `summaries` gives, one per metric (without
        `summarise`, all without a baseline). `plan` names the metrics and windows (the same plan, the same
        metrics and windows), so that their series are looked up once. The verdict thread's one call per record."""
        found = None if plan is None else self._row_plans.get((group, baseline_group, summarise, plan))
        if found is None:
            found = self._series_of(group, baseline_group, metrics, windows, summarise)
            if plan is not None:
                if len(self._row_plans) >= _MAX_ROW_PLANS:
                    self._row_plans.clear()
                self._row_plans[(group, baseline_group, summarise, plan)] = found
        joins, reads = found
        start = self._made_entries + len(self._values)
        self._joins += joins
        self._reads += reads
        self._windows += windows
        self._values += values
        self._record_ids.append(record_id)
        self._spans.append(len(joins))
        return start

    def _series_of(
        self, group: tuple[str, str, str], baseline_group: tuple[str, str, str] | None, metrics: Iterable[str],
        windows: Sequence[int], summarise: bool,
    ) -> tuple[list[int], list[int]]:  # fmt: skip
        """The numbers of the series each metric joins (made or resized as needed) and is judged against."""
        joins: list[int] = []
        reads: list[int] = []
        for metric, window in zip(metrics, windows, strict=True):
            key = (*group, metric)
            series = self._series.get(key)
            if series is None:
                series = self._made_series(SeriesKey(*key), window)
            elif series.maxlen != window:
                series = self._resized(key, series, window)
            joins.append(series.number)
            judged = series if baseline_group is None else self._series.get((*baseline_group, metric))
            reads.append(judged.number if summarise and judged is not None else _NONE)
        return joins, reads

    def summaries(self) -> tuple[IntArray, FloatArray]:
        """The baseline summaries of the points queued since the last call, one per point in the order `queue`
        numbered them: each baseline's n (0: no baseline) and its mean, stddev, median, min and max (0.0 without
        one). The points are in the windows now."""
        self._flush()
        self._evict_past_limit()
        made, self._made, self._made_entries = self._made, [], 0
        if len(made) == 1:
            return made[0]
        if not made:
            return np.zeros(0, dtype=np.intp), np.zeros((0, 5))
        return np.concatenate([counts for counts, _ in made]), np.concatenate([numbers for _, numbers in made])

    def _flush(self) -> None:
        """Make the queued summaries and write the queued points, round by round: round r summarises the baselines
        whose series had r points of earlier records queued, then writes each series' (r + 1)th queued point."""
        if not self._values:
            return
        joins = np.array(self._joins, dtype=np.int64)
        reads = np.array(self._reads, dtype=np.int64)
        windows = np.array(self._windows, dtype=np.intp)
        values = np.array(self._values, dtype=np.float64)
        record_ids = np.array(self._record_ids, dtype=object)
        spans = np.array(self._spans, dtype=np.intp)
        self._joins, self._reads, self._windows, self._values, self._record_ids, self._spans = [], [], [], [], [], []
        records = len(record_ids)
        record_of = np.repeat(np.arange(records), spans)
        entry_ids = record_ids[record_of]
        joins = self._joining(joins, entry_ids, record_ids)

        # A join's round: the joins of its series queued before it. A read's: the joins of its series by earlier
        # records (a record's own point joins after its baseline is read).
        joined = np.flatnonzero(joins != _NONE)
        order = joined[np.argsort(joins[joined], kind="stable")]
        ordered_series = joins[order]
        firsts = np.flatnonzero(np.concatenate(([True], ordered_series[1:] != ordered_series[:-1])))
        join_rounds = np.zeros(len(values), dtype=np.intp)
        if len(order):
            join_rounds[order] = np.arange(len(order)) - np.repeat(firsts, np.diff(np.append(firsts, len(order))))
        read = np.flatnonzero(reads != _NONE)
        joined_keys = ordered_series * records + record_of[order]  # sorted: a series' joins are in queue order
        read_keys = reads[read] * records
        read_rounds = np.searchsorted(joined_keys, read_keys + record_of[read]) - np.searchsorted(
            joined_keys, read_keys
        )
        rounds = 1 + max(int(join_rounds.max(initial=0)), int(read_rounds.max(initial=0)))

        counts = np.zeros(len(values), dtype=np.intp)
        numbers = np.zeros((len(values), 5))
        for round_number in range(rounds):
            chosen = read if rounds == 1 else read[read_rounds == round_number]
            self._summarise(chosen, reads, windows, counts, numbers)
            written = joined if rounds == 1 else joined[join_rounds[joined] == round_number]
            self._write(written, joins, entry_ids, values)
        self._made.append((counts, numbers))
        self._made_entries += len(values)

    def _joining(
        self, joins: npt.NDArray[np.int64], entry_ids: ObjectArray, record_ids: ObjectArray
    ) -> npt.NDArray[np.int64]:
        """`joins` without the points that stay out: a window holds its series' newest records in time order, so a
        point of a record as old as its series' newest (an import of an old record, a record filed at a past
        run_time) stays out until the series is next rebuilt."""
        joined = np.flatnonzero(joins != _NONE)
        newest = np.empty(len(joined), dtype=object)
        for pool, positions, rows in self._by_pool(joins[joined]):
            newest[positions] = pool.newest_ids(rows)
        if len(record_ids) == 1 or bool(np.all(record_ids[1:] > record_ids[:-1])):
            # Records in id order, as nearly always: a point joins if newer than its series' newest before.
            keep = entry_ids[joined] > newest
        else:  # one by one, each against its series' newest so far
            keep = np.zeros(len(joined), dtype=bool)
            newest_so_far: dict[int, str] = {}
            for position, (number, record_id, before) in enumerate(
                zip(joins[joined].tolist(), entry_ids[joined].tolist(), newest.tolist(), strict=True)
            ):
                if record_id > newest_so_far.get(number, before):
                    keep[position] = True
                    newest_so_far[number] = record_id
        if keep.all():
            return joins
        kept = joins.copy()
        kept[joined[~keep]] = _NONE
        return kept

    def _summarise(
        self, chosen: IntArray, reads: npt.NDArray[np.int64], windows: IntArray, counts: IntArray, numbers: FloatArray
    ) -> None:
        """The summaries of the chosen entries' baselines, into `counts` and `numbers`."""
        for pool, positions, rows in self._by_pool(reads[chosen]):
            entries = chosen[positions]
            values, kept = pool.latest_values(rows, windows[entries])
            some = kept > 0
            if not some.all():
                entries, values, kept = entries[some], values[some], kept[some]
            if len(entries):
                counts[entries] = kept
                numbers[entries] = np.column_stack(_summary_columns(values, kept))

    def _write(
        self, written: IntArray, joins: npt.NDArray[np.int64], entry_ids: ObjectArray, values: FloatArray
    ) -> None:
        now = self._tick()
        for pool, positions, rows in self._by_pool(joins[written]):
            entries = written[positions]
            pool.write(rows, entry_ids[entries], values[entries])
            pool.used[rows] = now

    def _by_pool(self, numbers: npt.NDArray[np.int64]) -> list[tuple[_WindowRows, IntArray, IntArray]]:
        """Series numbers by the pool they are in: (pool, their positions in `numbers`, their rows)."""
        if not len(numbers):
            return []
        pools = numbers // _STRIDE
        rows = (numbers % _STRIDE).astype(np.intp)
        first = int(pools[0])
        if len(self._pool_list) == 1 or bool((pools == first).all()):
            return [(self._pool_list[first], np.arange(len(numbers)), rows)]
        grouped = []
        for number in np.unique(pools).tolist():
            positions = np.flatnonzero(pools == number)
            grouped.append((self._pool_list[number], positions, rows[positions]))
        return grouped
