"""What a series is here (finite floats, oldest first, as a list or a numpy array) and the bounded windows of
recent points the server keeps per series."""

from __future__ import annotations

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


# (n, mean, stddev, median, min, max) of a baseline, as SeriesWindow.summary gives it.
Summary: TypeAlias = tuple[int, float, float, float, float, float]


class _WindowRows:
    """The values of the windows of one width: a row each, a ring buffer (slot `appended % width` is next)."""

    __slots__ = ("_free", "_next_unused", "values", "width")

    def __init__(self, width: int) -> None:
        self.width = width
        self.values: FloatArray = np.zeros((4, width))
        self._free: list[int] = []
        self._next_unused = 0

    def allocate(self) -> int:
        if self._free:
            return self._free.pop()
        row = self._next_unused
        if row == len(self.values):  # doubling: the copies cost O(1) a row
            grown = np.zeros((2 * row, self.width))
            grown[:row] = self.values
            self.values = grown
        self._next_unused = row + 1
        return row

    def release(self, row: int) -> None:
        self._free.append(row)


class SeriesWindow:
    """One series' last `maxlen` points: the record ids in a deque, the values in a row of a 2-D ring buffer shared
    by the windows of one width (SeriesWindows gathers a batch's windows from it to summarise them at once).

    A summary is computed from the row sorted, so it depends only on the points kept, not on their order (a window
    rebuilt from the database gives the same verdicts as the live one).
    """

    __slots__ = ("_batch_appends", "_next_slot", "_row", "_rows", "record_ids")

    def __init__(self, maxlen: int, points: Iterable[SeriesPoint] = (), rows: _WindowRows | None = None) -> None:
        self._rows = _WindowRows(maxlen) if rows is None else rows
        self._row = self._rows.allocate()
        self._next_slot = 0
        self._batch_appends = 0  # appends queued in SeriesWindows' current batch, not yet in the row
        self.record_ids: collections.deque[str] = collections.deque(maxlen=maxlen)
        for point in points:
            self.append(point.record_id, point.value)

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def maxlen(self) -> int:
        return self._rows.width

    @property
    def points(self) -> tuple[SeriesPoint, ...]:
        """The kept points, oldest first."""
        return tuple(map(SeriesPoint._make, zip(self.record_ids, self.ordered_values().tolist(), strict=True)))

    def ordered_values(self) -> FloatArray:
        """The kept values, oldest first (a copy)."""
        row = self._rows.values[self._row]
        count = len(self.record_ids)
        return row[:count].copy() if count < self._rows.width else np.roll(row, -self._next_slot)

    def append(self, record_id: str, value: float) -> None:
        self._rows.values[self._row, self._take_slot(record_id)] = value

    def _take_slot(self, record_id: str) -> int:
        """The slot the point's value goes to; its record id joins now."""
        slot = self._next_slot
        self._next_slot = 0 if slot + 1 == self._rows.width else slot + 1
        self.record_ids.append(record_id)
        return slot

    def summary(self) -> Summary:
        """(n, mean, stddev, median, min, max) of the kept points, as BaselineSummary.of gives them (the mean and
        stddev up to their last bits); stddev is the sample one (n - 1), 0.0 for one point. Not for an empty
        window."""
        counts = np.array([len(self.record_ids)])
        return _summaries(self._rows.values[[self._row]], counts)[0]

    def release(self) -> None:
        """The window is dropped: its row may go to another."""
        self._rows.release(self._row)


def _summaries(rows: FloatArray, counts: npt.NDArray[np.intp]) -> list[Summary]:
    """The summary of each row's first `counts` values (a ring buffer's row holds its window's values in its first
    count slots until it is full, and their order does not matter): one pass of numpy calls for all of them.

    The rows are sorted first (the min, max and median are read off them) and summed in that order, so a summary
    depends only on the values. The sum is compensated (each addition's rounding error, found exactly, is added
    up too), so the mean is math.fsum(values) / n but in the rare case where the exact sum lies within a rounding
    error or so of halfway between two floats (it may then differ in its last bit); the stddev is the two-pass
    one around that mean, so identical values give their value and a stddev of exactly 0.0.
    """
    width = rows.shape[1]
    valid = np.arange(width) < counts[:, None]
    ordered = np.sort(np.where(valid, rows, np.inf), axis=1)
    kept = np.where(valid, ordered, 0.0)
    picked = np.arange(len(rows))
    low, high = ordered[:, 0], ordered[picked, counts - 1]
    below, above = ordered[picked, (counts - 1) // 2], ordered[picked, counts // 2]
    with np.errstate(over="ignore", invalid="ignore"):  # sums past the float range: see below
        median = np.where(counts % 2 == 1, above, (below + above) / 2)
        columns = np.ascontiguousarray(kept.T)
        total, errors = columns[0].copy(), np.zeros(len(rows))
        for column in columns[1:]:  # Knuth's two-sum: the rounding error of each addition, exactly
            summed = total + column
            virtual = summed - total
            errors += (total - (summed - virtual)) + (column - virtual)
            total = summed
        mean = (total + errors) / counts
        deviations = np.where(valid, kept - mean[:, None], 0.0)
        stddev = np.sqrt(np.square(deviations).sum(axis=1) / np.maximum(counts - 1, 1))
    summaries = list(
        zip(counts.tolist(), mean.tolist(), stddev.tolist(), median.tolist(), low.tolist(), high.tolist(), strict=True)
    )
    if not (np.isfinite(mean).all() and np.isfinite(stddev).all()):
        for index in np.flatnonzero(~(np.isfinite(mean) & np.isfinite(stddev))).tolist():
            summaries[index] = _scaled_summary(kept[index, : counts[index]], summaries[index])
    return summaries


def _scaled_summary(values: FloatArray, summary: Summary) -> Summary:
    """A summary whose sums left the float range (huge values): the mean and stddev of the values scaled down."""
    scale = float(np.max(np.abs(values)))
    scaled = values / scale
    count = len(values)
    mean = math.fsum(scaled.tolist()) / count
    stddev = 0.0 if count == 1 else math.sqrt(math.fsum(((scaled - mean) ** 2).tolist()) / (count - 1)) * scale
    return count, mean * scale, stddev, *summary[3:]


class SeriesWindows:
    """The last `window` points of each series, for at most `max_series` series (least recently used evicted).

    The verdict thread `queue`s a batch's points, each summarised against a window as the points before it left
    it, then takes the summaries (`summaries`): the windows' values live in 2-D ring buffers (one a width), so
    the batch's windows are gathered and summarised with a few numpy calls a round and its values scattered in,
    a series met k times in the batch taking k rounds. The server rebuilds this at start by appending each
    series' recent points, oldest first.
    """

    __slots__ = (
        "_counted", "_read_count", "_read_round", "_read_row", "_read_rows", "_results", "_retired", "_rows",
        "_series", "_write_round", "_write_row", "_write_rows", "_write_slot", "_write_value", "evictions",
        "max_series",
    )  # fmt: skip

    def __init__(self, max_series: int) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, not {max_series}")
        self.max_series = max_series
        self.evictions = 0
        # Keyed by SeriesKey; looked up with plain tuples of its fields too (equal, same hash, cheaper to make).
        self._series: collections.OrderedDict[tuple[str, str, str, str], SeriesWindow] = collections.OrderedDict()
        self._rows: dict[int, _WindowRows] = {}  # by width
        # The queued batch, a column a list: the summaries to make (the ring buffer, row, count of values and
        # round of each; their results are the last ones of _results), the values to write (ring buffer, row,
        # slot, value, round), the summaries (None: not made yet), the windows with queued appends, and the
        # windows dropped meanwhile (their rows are freed once the batch is done).
        self._read_rows: list[_WindowRows] = []
        self._read_row: list[int] = []
        self._read_count: list[int] = []
        self._read_round: list[int] = []
        self._write_rows: list[_WindowRows] = []
        self._write_row: list[int] = []
        self._write_slot: list[int] = []
        self._write_value: list[float] = []
        self._write_round: list[int] = []
        self._results: list[Summary | None] = []
        self._counted: list[SeriesWindow] = []
        self._retired: list[SeriesWindow] = []

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
        """Add the newest point; keeps `window` points (a changed window for the series takes effect now)."""
        self._flush()
        self.used(key, window).append(record_id, float(value))

    def used(self, key: SeriesKey, window: int) -> SeriesWindow:
        """The series' window, made (evicting the least recently used series past `max_series`) or resized to
        `window` points as needed, and now the most recently used; `append` to it (no batch queued)."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = SeriesWindow(window, rows=self._rows_of(window))
            if len(self._series) > self.max_series:
                self._retire(self._series.popitem(last=False)[1])
                self.evictions += 1
        else:
            self._series.move_to_end(key)
            if series.maxlen != window:
                self._flush()  # the resized window is made of its values, queued ones included
                self._retire(series)
                series = self._series[key] = SeriesWindow(window, series.points, self._rows_of(window))
        return series

    def _rows_of(self, width: int) -> _WindowRows:
        rows = self._rows.get(width)
        if rows is None:
            rows = self._rows[width] = _WindowRows(width)
        return rows

    def _retire(self, series: SeriesWindow) -> None:
        """A dropped window's row is freed, once no queued summary or append needs it."""
        if self._read_row or self._write_value:
            self._retired.append(series)
        else:
            series.release()

    def queue(
        self, group: tuple[str, str, str], baseline_group: tuple[str, str, str] | None, record_id: str,
        metrics: Iterable[str], values: Iterable[float], windows: Iterable[int], *, summarise: bool = True,
    ) -> list[int | None]:  # fmt: skip
        """Queue a record's points, metric by metric: the summary of the last `window` points of the metric's
        series in `baseline_group` (user, test name, tag; `group` when None), as the points queued before left it,
        then the value joining its series in `group` unless that holds a record as new or newer (an import of an
        old record: it stays out until the series is rebuilt, as a window holds the newest records in time
        order). Each summary's index in what `summaries` returns (None: no window, or not `summarise`). The
        verdict thread's one call per record."""
        series_of = self._series.get
        results = self._results
        read_rows, read_row, read_count, read_round = (
            self._read_rows, self._read_row, self._read_count, self._read_round
        )  # fmt: skip
        indexes: list[int | None] = []
        for metric, value, window in zip(metrics, values, windows, strict=True):
            key = (*group, metric)
            series = series_of(key)
            index = None
            if summarise:
                judged = series if baseline_group is None else series_of((*baseline_group, metric))
                if judged is not None:
                    index = len(results)
                    count = len(judged.record_ids)
                    if count <= window:
                        results.append(None)
                        read_rows.append(judged._rows)
                        read_row.append(judged._row)
                        read_count.append(count)
                        read_round.append(judged._batch_appends)
                    else:  # a baseline kept with a longer window (a changed model): summarised now, rarely
                        self._flush()
                        results.append(SeriesWindow(window, judged.points).summary())
            indexes.append(index)
            if series is None or series._rows.width != window:
                if series is None or series.record_ids[-1] < record_id:
                    series = self.used(SeriesKey(*key), window)
                else:
                    continue
            elif series.record_ids[-1] < record_id:
                self._series.move_to_end(key)
            else:
                continue
            appends = series._batch_appends
            if not appends:
                self._counted.append(series)
            series._batch_appends = appends + 1
            slot = series._take_slot(record_id)
            self._write_rows.append(series._rows)
            self._write_row.append(series._row)
            self._write_slot.append(slot)
            self._write_value.append(value)
            self._write_round.append(appends)
        return indexes

    def summaries(self) -> list[Summary | None]:
        """The summaries of the points queued since the last call, by the indexes `queue` gave; their values are
        in the windows now."""
        self._flush()
        results, self._results = self._results, []
        return results

    def _flush(self) -> None:
        """Make the queued summaries and write the queued values, round by round: round r summarises the
        windows that had r appends queued before, then writes each window's (r + 1)th queued value."""
        if not self._read_row and not self._write_value:
            return
        read_rows, read_row, read_count, read_round = (
            self._read_rows, self._read_row, self._read_count, self._read_round
        )  # fmt: skip
        write_rows, write_row, write_slot, write_value, write_round = (
            self._write_rows, self._write_row, self._write_slot, self._write_value, self._write_round
        )  # fmt: skip
        self._read_rows, self._read_row, self._read_count, self._read_round = [], [], [], []
        self._write_rows, self._write_row, self._write_slot, self._write_value, self._write_round = [], [], [], [], []
        results = self._results
        first_pending = len(results) - len(read_row)  # summaries made earlier precede the queued ones
        reads = np.arange(len(read_row))
        writes = np.arange(len(write_value))
        rounds = 1 + max(max(read_round, default=0), max(write_round, default=0))
        read_rounds, write_rounds = np.array(read_round, dtype=np.intp), np.array(write_round, dtype=np.intp)
        rows_arrays = np.array(read_row, dtype=np.intp), np.array(read_count, dtype=np.intp)
        written_rows, slots = np.array(write_row, dtype=np.intp), np.array(write_slot, dtype=np.intp)
        values = np.array(write_value, dtype=np.float64)
        read_pools, write_pools = _distinct_pools(read_rows), _distinct_pools(write_rows)
        for round_number in range(rounds):
            in_round = reads if rounds == 1 else reads[read_rounds == round_number]
            for rows, chosen in _by_pool(read_pools, in_round):
                made = _summaries(rows.values[rows_arrays[0][chosen]], rows_arrays[1][chosen])
                for position, summary in zip(chosen.tolist(), made, strict=True):
                    results[first_pending + position] = summary
            written = writes if rounds == 1 else writes[write_rounds == round_number]
            for rows, chosen in _by_pool(write_pools, written):
                rows.values[written_rows[chosen], slots[chosen]] = values[chosen]
        for series in self._counted:
            series._batch_appends = 0
        self._counted.clear()
        for series in self._retired:
            series.release()
        self._retired.clear()

    def discard(self, key: SeriesKey) -> None:
        series = self._series.pop(key, None)
        if series is not None:
            self._retire(series)


_Pools: TypeAlias = tuple[list[_WindowRows], npt.NDArray[np.intp] | None]


def _distinct_pools(pools: list[_WindowRows]) -> _Pools:
    """The distinct ring buffers of the entries and which one each entry is in (None: all in the one, as
    nearly always)."""
    if not pools or all(pool is pools[0] for pool in pools):
        return pools[:1], None
    numbers: dict[int, int] = {}
    distinct: list[_WindowRows] = []
    for pool in pools:
        if id(pool) not in numbers:
            numbers[id(pool)] = len(distinct)
            distinct.append(pool)
    return distinct, np.array([numbers[id(pool)] for pool in pools], dtype=np.intp)


def _by_pool(pools: _Pools, chosen: npt.NDArray[np.intp]) -> list[tuple[_WindowRows, npt.NDArray[np.intp]]]:
    """The chosen entries grouped by the ring buffer they are in."""
    distinct, numbers = pools
    if not len(chosen):
        return []
    if numbers is None:
        return [(distinct[0], chosen)]
    chosen_numbers = numbers[chosen]
    groups = [(pool, chosen[chosen_numbers == number]) for number, pool in enumerate(distinct)]
    return [(pool, entries) for pool, entries in groups if len(entries)]
