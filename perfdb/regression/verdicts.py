"""A record's verdicts as the server sends and stores them, encoded fast: the same JSON as `judge(...).to_json()`
of each metric, byte for byte, without building a Verdict, its four dataclasses and their dicts per metric.

Per metric and model the constant parts (the metric's name, the model object, the direction) are encoded once into
a %-template; per record, every number of all its verdicts goes through one orjson call (so each reads exactly as
orjson writes it in a Verdict's dict) and is spliced into its metric's template. Profiles of the server judging
every metric of every record showed building and encoding the verdict dicts to cost as much as judging them.
"""

from __future__ import annotations

import dataclasses
import math

import orjson

from perfdb.regression.direction import Better, MetricDirection
from perfdb.regression.thresholds import ThresholdModel, decide

# (n, mean, stddev, median, min, max) of a baseline, as SeriesWindow.summary gives it.
Summary = tuple[int, float, float, float, float, float]


@dataclasses.dataclass(frozen=True, slots=True)
class VerdictShapes:
    """One metric's verdict under one model and direction, as %b templates in Verdict.to_json's field order."""

    direction: MetricDirection
    model: ThresholdModel
    # status, the 6 baseline numbers, value, change, change_percent, the threshold's 5 fields, changed
    decided: bytes
    # insufficient_data with a baseline: the 6 baseline numbers, value
    undecided: bytes
    # insufficient_data without a baseline: value
    empty: bytes

    @classmethod
    def of(cls, direction: MetricDirection, model: ThresholdModel) -> VerdictShapes:
        def text(value: object) -> bytes:
            return orjson.dumps(value).replace(b"%", b"%%")

        head = b'{"metric":' + text(direction.metric) + b',"status":'
        model_json = b',"model":' + text(model.to_json())
        tail = b',"direction":' + text(direction.to_json()) + b',"changed":'
        baseline = b',"baseline":{"n":%b,"mean":%b,"stddev":%b,"median":%b,"min":%b,"max":%b},"value":%b'
        undecided_rest = b',"change":null,"change_percent":null,"threshold":null' + tail + b"false}"
        return cls(
            direction,
            model,
            decided=head + b"%b" + model_json + baseline + b',"change":%b,"change_percent":%b,"threshold":{"bound":%b,'
            b'"percent":%b,"sigma_bound":%b,"min_change_bound":%b,"governed_by":%b}' + tail + b"%b}",
            undecided=head + b'"insufficient_data"' + model_json + baseline + undecided_rest,
            empty=head + b'"insufficient_data"' + model_json + b',"baseline":{"n":0},"value":%b' + undecided_rest,
        )


_DECIDED_COUNT, _UNDECIDED_COUNT, _EMPTY_COUNT = 16, 7, 1


class VerdictShapeCache:
    """The shapes of each (metric, direction, model) met so far: few, since models and directions are few."""

    __slots__ = ("_shapes",)

    def __init__(self) -> None:
        self._shapes: dict[tuple[str, Better | None, int], VerdictShapes] = {}

    def shapes(self, direction: MetricDirection, model: ThresholdModel) -> VerdictShapes:
        # id(model): hashing the frozen dataclass costs more than the lookup; the entry keeps the model alive.
        key = (direction.metric, direction.better, id(model))
        shapes = self._shapes.get(key)
        if shapes is None or shapes.model is not model:
            shapes = self._shapes[key] = VerdictShapes.of(direction, model)
        return shapes


class RecordVerdicts:
    """One record's verdicts, judged metric by metric in the record's order, then encoded at once."""

    __slots__ = ("_templates", "_values")

    def __init__(self) -> None:
        self._templates: list[tuple[bytes, int]] = []
        self._values: list[object] = []

    def add(self, shapes: VerdictShapes, value: float, summary: Summary | None) -> None:
        """Judge `value` against the baseline `summary` (None: no baseline) as `judge` does; ValueError unless
        `value` is finite."""
        if not math.isfinite(value):
            raise ValueError(f"the value judged must be a finite number, not {value}")
        if summary is None or summary[0] == 0:
            self._templates.append((shapes.empty, _EMPTY_COUNT))
            self._values.append(value)
            return
        if summary[0] < shapes.model.min_points:
            self._templates.append((shapes.undecided, _UNDECIDED_COUNT))
            self._values.extend(summary)
            self._values.append(value)
            return
        status, change, change_percent, bound, percent, sigma_bound, min_change_bound, governed_by, changed = decide(
            value, summary[1], summary[2], shapes.direction, shapes.model
        )
        self._templates.append((shapes.decided, _DECIDED_COUNT))
        values = self._values
        values.append(status)
        values.extend(summary)
        values += (value, change, change_percent, bound, percent, sigma_bound, min_change_bound, governed_by, changed)

    def encode(self) -> bytes:
        """The JSON array of the verdicts. No number orjson writes holds a comma, nor does a status or
        governed_by, so splitting the one encoded list at its commas gives each value's text in turn."""
        if not self._templates:
            return b"[]"
        pieces = orjson.dumps(self._values)[1:-1].split(b",")
        verdicts = []
        start = 0
        for template, count in self._templates:
            verdicts.append(template % tuple(pieces[start : start + count]))
            start += count
        return b"[" + b",".join(verdicts) + b"]"
