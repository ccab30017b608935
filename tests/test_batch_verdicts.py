"""The server's fast verdicts (SeriesWindow summaries, RecordVerdicts encoding, RegressionDetector.judge_batch)
against the reference: `judge(...).to_json()` per metric, judged record by record."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest

from perfdb.regression.direction import direction_of
from perfdb.regression.series import SeriesKey, SeriesWindow, SeriesWindows
from perfdb.regression.thresholds import BaselineSummary, ThresholdConfig, ThresholdModel, ThresholdRule, judge
from perfdb.regression.verdicts import VerdictShapeCache
from perfdb.storage.detection import CommittedRecord, RegressionDetector
from tests.support import RecordVerdicts

SMALL = ThresholdModel(window=6, min_points=3, sigmas=2.0, min_change=0.1)


def reference_summary(values: list[float]) -> tuple[int, float, float, float, float, float]:
    summary = BaselineSummary.of(values)
    return summary.n, summary.mean, summary.stddev, summary.median, summary.min, summary.max


def awkward_value(rng: random.Random) -> float:
    return rng.choice(
        [
            rng.uniform(-1e6, 1e6),
            rng.gauss(1000.0, 10.0),
            100.0,
            0.0,
            -0.0,
            float(rng.randrange(-3, 4)),
            rng.uniform(0, 1) * 1e-300,
            rng.uniform(1, 2) * 1e150,
        ]
    )


def test_a_window_summary_equals_the_two_pass_summary_of_its_points() -> None:
    rng = random.Random(1)
    for _ in range(400):
        window = SeriesWindow(rng.randrange(2, 31))
        for index in range(rng.randrange(1, 80)):
            window.append(str(index), awkward_value(rng))
            n, mean, stddev, median, low, high = window.summary()
            expected = reference_summary([point.value for point in window.points])
            # The median, min and max are the same floats, the mean agrees to its last bits; the stddev agrees to
            # rounding (the two-pass reference rounds its mean first, so allow for the spread being tiny next to the
            # level).
            assert (n, median, low, high) == (expected[0], *expected[3:])
            assert mean == pytest.approx(expected[1], rel=1e-12)
            assert math.isclose(stddev, expected[2], rel_tol=1e-6, abs_tol=1e-9 * max(abs(low), abs(high)))


def test_a_window_of_identical_points_has_a_stddev_of_exactly_zero() -> None:
    window = SeriesWindow(5)
    for index, value in enumerate([3.0, 1e-7, 0.1, 0.1, 0.1, 0.1, 0.1]):
        window.append(str(index), value)
    assert window.summary() == (5, 0.1, 0.0, 0.1, 0.1, 0.1)


def test_a_window_of_tiny_and_huge_values_is_summarised_past_the_float_range_of_its_sums() -> None:
    values = [1e-300, 1e150, 2e150, 3e-290]
    window = SeriesWindow(4)
    for index, value in enumerate(values):
        window.append(str(index), value)
    n, mean, stddev, *rest = window.summary()
    expected = reference_summary(values)
    assert (n, *rest) == (expected[0], *expected[3:])
    assert mean == pytest.approx(expected[1], rel=1e-12)
    assert stddev == pytest.approx(expected[2], rel=1e-12)


def test_a_window_whose_sum_leaves_the_float_range_still_has_a_finite_mean_and_stddev() -> None:
    window = SeriesWindow(4)
    for index, value in enumerate([1e308, 1.5e308, 1.7e308]):
        window.append(str(index), value)
    n, mean, stddev, median, low, high = window.summary()
    assert (n, median, low, high) == (3, 1.5e308, 1e308, 1.7e308)
    assert mean == pytest.approx(1.4e308, rel=1e-12)
    assert stddev == pytest.approx(math.sqrt((0.4**2 + 0.1**2 + 0.3**2) / 2) * 1e308, rel=1e-12)


def test_a_series_met_several_times_in_a_batch_is_summarised_as_each_record_left_it() -> None:
    """Queued in one batch: each summary sees the values queued before it and none after, baseline tag included."""
    windows = SeriesWindows(10)
    group, other = ("alice", "unary", ""), ("alice", "unary", "exp")
    values = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    starts = [windows.queue(group, None, f"{index:03d}", ["qps"], [value], [4]) for index, value in enumerate(values)]
    against = windows.queue(other, group, "100", ["qps"], [1000.0], [4])
    counts, summaries = windows.summaries()
    assert starts == list(range(len(values))) and against == len(values)

    def summary(position: int) -> tuple[float, ...]:
        return (int(counts[position]), *summaries[position].tolist())

    assert counts[starts[0]] == 0  # a new series: no baseline
    for index in range(1, len(values)):
        kept = values[max(0, index - 4) : index]
        assert summary(starts[index]) == pytest.approx(reference_summary(kept), rel=1e-12)
    assert summary(against) == pytest.approx(reference_summary(values[-4:]), rel=1e-12)
    assert windows.values(SeriesKey(*group, "qps")) == values[-4:]
    assert windows.values(SeriesKey(*other, "qps")) == [1000.0]


def test_a_window_summary_depends_only_on_the_points_it_keeps() -> None:
    """So a window rebuilt from the database judges exactly as the live one did."""
    rng = random.Random(2)
    for _ in range(200):
        live = SeriesWindow(10)
        for index in range(rng.randrange(10, 60)):
            live.append(str(index), awkward_value(rng))
        rebuilt = SeriesWindow(10, live.points)
        assert rebuilt.summary() == live.summary()


def test_series_windows_resize_a_window_keeping_its_newest_points() -> None:
    windows = SeriesWindows(10)
    key = SeriesKey("alice", "unary", "", "qps")
    for index in range(8):
        windows.append(key, str(index), float(index), 8)
    windows.append(key, "8", 8.0, 4)
    series = windows.get(key)
    assert series is not None and series.summary() == reference_summary([5.0, 6.0, 7.0, 8.0])


@pytest.mark.parametrize("metric", ["qps", "perc_lat_99", "frames", 'odd %s "quoted" metric, ünïcode'])
@pytest.mark.parametrize("model", [ThresholdModel(), SMALL])
def test_encoded_verdicts_are_byte_for_byte_the_verdicts_to_json(metric: str, model: ThresholdModel) -> None:
    rng = random.Random(3)
    shapes = VerdictShapeCache()
    direction = direction_of(metric, {"frames": "higher"})
    for _ in range(300):
        baseline = [awkward_value(rng) for _ in range(rng.randrange(0, model.window + 1))]
        values = [awkward_value(rng), 100.0, 110.0]
        verdicts = RecordVerdicts()
        for value in values:
            summary = reference_summary(baseline) if baseline else None
            verdicts.add(shapes.shapes(direction, model), value, summary)
        expected = [judge(value, baseline, direction, model).to_json() for value in values]
        assert verdicts.encode() == orjson.dumps(expected)


def test_a_record_without_metrics_has_an_empty_array_and_a_non_finite_value_is_refused() -> None:
    assert RecordVerdicts().encode() == b"[]"
    with pytest.raises(ValueError, match="finite"):
        RecordVerdicts().add(VerdictShapeCache().shapes(direction_of("qps"), SMALL), math.inf, None)


def record(index: int, test_name: str, metrics: dict[str, float], **fields: Any) -> CommittedRecord:
    values: dict[str, Any] = {"user_id": "alice", "tag": "", "better": None, "baseline_tag": None, "judged": True}
    values.update(fields)
    return CommittedRecord(record_id=f"{index:012d}", test_name=test_name, metrics=metrics, **values)


def judged_one_by_one(records: list[CommittedRecord], config: ThresholdConfig) -> list[list[dict[str, Any]] | None]:
    """The reference: each record's metrics judged with `judge` against plain lists, then joined."""
    windows: dict[SeriesKey, list[tuple[str, float]]] = {}
    results: list[list[dict[str, Any]] | None] = []
    for entry in records:
        verdicts = []
        judged_tag = entry.tag if entry.baseline_tag is None else entry.baseline_tag
        for metric, value in entry.metrics.items():
            model = config.model_for(entry.test_name, metric)
            baseline = [point for _, point in windows.get(SeriesKey("alice", entry.test_name, judged_tag, metric), [])]
            if entry.judged:
                verdicts.append(judge(value, baseline, direction_of(metric, entry.better), model).to_json())
            points = windows.setdefault(SeriesKey("alice", entry.test_name, entry.tag, metric), [])
            if not points or points[-1][0] < entry.record_id:
                points.append((entry.record_id, float(value)))
                del points[: -model.window]
        results.append(verdicts if entry.judged else None)
    return results


def test_a_batch_is_judged_as_its_records_would_be_one_by_one_in_commit_order() -> None:
    """Records of one series repeated in a batch, another tag judged against the main one, imports joining in
    between (one older than the window's newest, which stays out) and a per-test model: all as the reference."""
    rng = random.Random(4)
    config = ThresholdConfig(rules=(ThresholdRule("streaming", "qps", SMALL),))
    detector = RegressionDetector(config, 1000)
    history: list[CommittedRecord] = []
    statuses: set[str] = set()
    for batch_number in range(30):
        batch: list[CommittedRecord] = []
        for _ in range(rng.randrange(1, 12)):
            index = len(history) + len(batch) + 1
            level = 1000.0 if batch_number < 20 else 1300.0  # a step: regressions and improvements
            metrics = {
                "qps": rng.gauss(level, 15.0),
                "perc_lat_99": rng.gauss(level / 10, 1.0),
                "frames": float(rng.randrange(50, 53)),
            }
            fields: dict[str, Any] = {"better": rng.choice([None, {"frames": "higher"}])}
            kind = rng.random()
            if kind < 0.15:
                fields.update(tag="probe", baseline_tag="")
            elif kind < 0.25:
                fields.update(judged=False)
            elif kind < 0.3:
                index = 1  # an import of a record older than the windows' newest
                fields.update(judged=False)
            batch.append(record(index, rng.choice(["unary", "streaming"]), metrics, **fields))
        encoded = detector.judge_batch(batch)
        expected = judged_one_by_one(history + batch, config)[len(history) :]
        history += batch
        assert len(encoded) == len(batch)
        for got, want in zip(encoded, expected, strict=True):
            if want is None:
                assert got is None
                continue
            assert got is not None
            assert_same_verdicts(orjson.loads(got), want)
            statuses.update(verdict["status"] for verdict in want)
    assert statuses == {"insufficient_data", "no_change", "regression", "improvement"}  # every path was taken


def assert_same_verdicts(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """The same verdicts, numbers that derive from the stddev equal up to float rounding."""
    assert [verdict["metric"] for verdict in got] == [verdict["metric"] for verdict in want]
    for mine, theirs in zip(got, want, strict=True):
        assert mine.keys() == theirs.keys()
        for field in ("status", "model", "value", "change", "change_percent", "direction", "changed"):
            assert mine[field] == theirs[field], (field, mine, theirs)
        assert mine["baseline"].keys() == theirs["baseline"].keys()
        for name, number in theirs["baseline"].items():
            assert mine["baseline"][name] == pytest.approx(number, rel=1e-9)
        if theirs["threshold"] is None:
            assert mine["threshold"] is None
            continue
        assert mine["threshold"]["governed_by"] == theirs["threshold"]["governed_by"]
        for name in ("bound", "percent", "sigma_bound", "min_change_bound"):
            assert mine["threshold"][name] == pytest.approx(theirs["threshold"][name], rel=1e-9)


def test_a_failing_record_in_a_batch_gets_no_verdicts_and_the_others_theirs() -> None:
    detector = RegressionDetector(ThresholdConfig(), 1000)
    batch = [
        record(1, "unary", {"qps": 1000.0}),
        record(2, "unary", {"qps": math.nan}),
        record(3, "unary", {"qps": 1001.0}),
    ]
    first, failed, third = detector.judge_batch(batch)
    assert failed is None and first is not None and third is not None
    assert orjson.loads(third)[0]["baseline"]["n"] == 1


def test_a_disabled_detector_judges_nothing() -> None:
    detector = RegressionDetector(ThresholdConfig(), 1000, enabled=False)
    assert detector.judge_batch([record(1, "unary", {"qps": 1.0})]) == [None]
    assert len(detector.windows) == 0


def test_new_thresholds_apply_to_the_next_batch() -> None:
    """The detector caches each test's models; setting its thresholds (the server does at start) drops them."""
    detector = RegressionDetector(ThresholdConfig(), 1000)
    first = detector.judge_batch([record(1, "unary", {"qps": 1000.0})])[0]
    assert first is not None and orjson.loads(first)[0]["model"]["window"] == 30
    detector.thresholds = ThresholdConfig(default=SMALL)
    second = detector.judge_batch([record(2, "unary", {"qps": 1000.0})])[0]
    assert second is not None and orjson.loads(second)[0]["model"] == SMALL.to_json()


def _summary_at(summaries: tuple[Any, Any], position: int) -> tuple[float, ...]:
    counts, numbers = summaries
    return (int(counts[position]), *numbers[position].tolist())


def test_a_baseline_kept_wider_than_its_window_counts_only_its_newest_points() -> None:
    """A baseline tag's series kept with 8 points, judged with a model of 4: the newest 4 count."""
    windows = SeriesWindows(10)
    wide, narrow = ("alice", "unary", "nightly"), ("alice", "unary", "pr")
    for index in range(8):
        windows.append(SeriesKey(*wide, "qps"), f"{index:03d}", float(index), 8)
    start = windows.queue(narrow, wide, "100", ["qps"], [50.0], [4])
    assert _summary_at(windows.summaries(), start) == pytest.approx(reference_summary([4.0, 5.0, 6.0, 7.0]))
    assert windows.values(SeriesKey(*wide, "qps")) == [float(index) for index in range(8)]


def test_points_of_records_older_than_their_series_newest_stay_out_in_any_order() -> None:
    """Queued out of id order (an import of old records beside new ones): each point joins only if newer than its
    series' newest so far, and each baseline sees the points that joined before it."""
    windows = SeriesWindows(10)
    group = ("alice", "unary", "")
    key = SeriesKey(*group, "qps")
    windows.append(key, "050", 1.0, 30)
    starts = [
        windows.queue(group, None, record_id, ["qps"], [value], [30])
        for record_id, value in (("060", 2.0), ("040", 99.0), ("070", 3.0), ("065", 98.0))
    ]
    summaries = windows.summaries()
    assert windows.values(key) == [1.0, 2.0, 3.0]
    assert [point.record_id for point in windows.points(key)] == ["050", "060", "070"]
    seen = [_summary_at(summaries, start)[0] for start in starts]
    assert seen == [1, 2, 2, 3]


def test_series_windows_evict_a_hundredth_of_their_series_at_a_time() -> None:
    def key(n: int) -> SeriesKey:
        return SeriesKey(f"user{n}", "unary", "", "qps")

    windows = SeriesWindows(max_series=200)
    for n in range(200):
        windows.append(key(n), "id", 1.0, window=30)
    windows.append(key(0), "id2", 2.0, window=30)  # used last: it stays
    windows.append(key(200), "id", 1.0, window=30)
    assert (len(windows), windows.evictions) == (199, 2)
    assert key(0) in windows and key(200) in windows and key(1) not in windows and key(2) not in windows


def test_a_baseline_series_made_after_a_plan_was_looked_up_is_found() -> None:
    """The series looked up for a plan are looked up again once a series is made: a record judged against a tag
    that had no series yet is judged against it once it has one."""
    windows = SeriesWindows(10)
    pull, nightly = ("alice", "unary", "pr"), ("alice", "unary", "nightly")
    first = windows.queue(pull, nightly, "001", ["qps"], [1.0], [30], plan="unary qps")
    windows.queue(nightly, None, "002", ["qps"], [5.0], [30], plan="unary qps")
    again = windows.queue(pull, nightly, "003", ["qps"], [1.0], [30], plan="unary qps")
    summaries = windows.summaries()
    assert _summary_at(summaries, first)[0] == 0
    assert _summary_at(summaries, again) == pytest.approx((1, 5.0, 0.0, 5.0, 5.0, 5.0))


@pytest.mark.parametrize("one_batch", [False, True])
def test_eviction_never_hands_a_series_row_to_another_while_its_points_are_queued(one_batch: bool) -> None:
    """At max_series, a record with new metrics makes new series: the series it and the queued records name keep
    their rows (the eviction waits for the batch to be written), and a looked-up plan keeps naming the right ones."""
    windows = SeriesWindows(max_series=3)
    group = ("alice", "unary", "")
    queued = [
        ("r01", ["a", "b"], [1.0, 2.0]),
        ("r02", ["c"], [3.0]),
        ("r03", ["a", "d", "e"], [10.0, 20.0, 30.0]),
        ("r04", ["a", "d", "e"], [11.0, 21.0, 31.0]),
    ]
    for record_id, metrics, values in queued:
        windows.queue(group, None, record_id, metrics, values, [30] * len(values), plan=tuple(metrics))
        if not one_batch:
            windows.summaries()
    windows.summaries()
    kept = {key.metric: windows.values(key) for key in windows}
    assert kept == {"a": [1.0, 10.0, 11.0], "d": [20.0, 21.0], "e": [30.0, 31.0]}
    assert windows.evictions == 2
