"""A record's verdicts as the server sends and stores them, encoded fast: the same JSON as `judge(...).to_json()`
of each metric, byte for byte, without building a Verdict, its four dataclasses and their dicts per metric.

Per metric and model the constant parts (the metric's name, the model object, the direction) are encoded once into
a %-template; per record, every number of all its verdicts goes through one orjson call (so each reads exactly as
orjson writes it in a Verdict's dict) and is spliced into its metric's template. Profiles of the server judging
every metric of every record showed building and encoding the verdict dicts to cost as much as judging them.

What is stored is not that JSON (about 470 bytes a metric) but the numbers it was built from (`RecordVerdicts.pack`,
about 55 bytes a metric: each metric's name, direction and baseline summary and value, each model's parameters once);
`unpack_verdicts` gives the JSON back through the same `add` and `encode`, so it is byte for byte what the ack
carried (the decision is recomputed by `decide`, a pure function of those numbers).
"""

from __future__ import annotations

import dataclasses
import math
import struct

import orjson

from perfdb.records.units import CORE_METRIC_NAMES
from perfdb.regression.direction import Better, MetricDirection, direction_of
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
    # The packed form's per-metric head for each shape (empty, undecided, decided): the shape and direction in one
    # byte, then the name (see RecordVerdicts.pack); with the struct format of the head and the numbers after it.
    packed_heads: tuple[tuple[bytes, str], ...]

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
            packed_heads=tuple(
                (head, f"{len(head)}sB{numbers}")
                for head, numbers in zip(_packed_heads(direction), _PACKED_NUMBERS, strict=True)
            ),
        )


# The packed form of a record's verdicts (RecordVerdicts.pack), little-endian:
#   version (B, 1); models (B), each: window (I), min_points (I), sigmas (d), min_change (d); metrics (H), each:
#   shape << 2 | direction (B); name: its index in CORE_METRIC_NAMES (B), or 255, length (H) and UTF-8;
#   the index of its model (B); then the value (d) for a metric without a baseline, else the baseline's
#   n (I), mean, stddev, median, min, max (5d) and the value (d).
# A stored value of the earlier form is the JSON array itself, whose first byte is "[".
_PACKED_VERSION = 1
_PACKED_NUMBERS = ("d", "I6d", "I6d")  # by shape: empty, undecided, decided
_EMPTY, _UNDECIDED, _DECIDED = range(3)
_CORE_INDEX = {name: index for index, name in enumerate(CORE_METRIC_NAMES)}
_OTHER_NAME = 255
_DIRECTION_CODES = {None: 0, Better.HIGHER: 1, Better.LOWER: 2}
_DIRECTIONS = {code: better for better, code in _DIRECTION_CODES.items()}
_MODEL = struct.Struct("<IIdd")


def _packed_heads(direction: MetricDirection) -> list[bytes]:
    core = _CORE_INDEX.get(direction.metric)
    if core is None:
        name = direction.metric.encode()
        encoded_name = bytes([_OTHER_NAME]) + struct.pack("<H", len(name)) + name
    else:
        encoded_name = bytes([core])
    code = _DIRECTION_CODES[direction.better]
    return [bytes([shape << 2 | code]) + encoded_name for shape in (_EMPTY, _UNDECIDED, _DECIDED)]


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

    __slots__ = ("_shapes", "_templates", "_values")

    def __init__(self) -> None:
        self._templates: list[tuple[bytes, int]] = []
        self._values: list[object] = []
        self._shapes: list[VerdictShapes] = []  # each metric's, for pack

    def add(self, shapes: VerdictShapes, value: float, summary: Summary | None) -> None:
        """Judge `value` against the baseline `summary` (None: no baseline) as `judge` does; ValueError unless
        `value` is finite."""
        if not math.isfinite(value):
            raise ValueError(f"the value judged must be a finite number, not {value}")
        self._shapes.append(shapes)
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

    def pack(self) -> bytes:
        """The numbers the verdicts were built from, packed (the layout is above `_packed_heads`): what is stored."""
        models: dict[int, int] = {}  # id(model) -> its index
        parameters: list[object] = []
        format_parts = ["<BB", ""]
        arguments: list[object] = [_PACKED_VERSION, 0, len(self._shapes)]
        values = self._values
        start = 0
        for shapes, (_, count) in zip(self._shapes, self._templates, strict=True):
            model = shapes.model
            index = models.get(id(model))
            if index is None:
                index = models[id(model)] = len(models)
                parameters += (model.window, model.min_points, model.sigmas, model.min_change)
            if count == _EMPTY_COUNT:
                head, numbers_format = shapes.packed_heads[_EMPTY]
                arguments += (head, index, values[start])
            else:
                head, numbers_format = shapes.packed_heads[_DECIDED if count == _DECIDED_COUNT else _UNDECIDED]
                first = start + 1 if count == _DECIDED_COUNT else start  # after the status
                arguments += (head, index, *values[first : first + 7])
            format_parts.append(numbers_format)
            start += count
        if len(models) > 255 or len(self._shapes) > 65535:
            raise ValueError("too many models or metrics to pack")
        arguments[1] = len(models)
        format_parts[1] = "IIdd" * len(models) + "H"
        return struct.pack("".join(format_parts), *arguments[:2], *parameters, *arguments[2:])


def unpack_verdicts(packed: bytes | memoryview) -> bytes:
    """The JSON array of the verdicts `RecordVerdicts.pack` packed, exactly as `encode` gave it then. ValueError if
    `packed` is not such a value."""
    try:
        return _unpack(memoryview(packed))
    except (struct.error, IndexError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"packed verdicts are malformed: {error}") from None


def _unpack(packed: memoryview) -> bytes:
    version, model_count = struct.unpack_from("<BB", packed)
    if version != _PACKED_VERSION:
        raise ValueError(f"packed verdicts of an unknown version {version}")
    offset = 2
    models = []
    for _ in range(model_count):
        models.append(ThresholdModel(*_MODEL.unpack_from(packed, offset)))
        offset += _MODEL.size
    (metric_count,) = struct.unpack_from("<H", packed, offset)
    offset += 2
    shape_cache = VerdictShapeCache()
    verdicts = RecordVerdicts()
    for _ in range(metric_count):
        shape, code = packed[offset] >> 2, packed[offset] & 3
        name_index = packed[offset + 1]
        offset += 2
        if name_index == _OTHER_NAME:
            (length,) = struct.unpack_from("<H", packed, offset)
            metric = bytes(packed[offset + 2 : offset + 2 + length]).decode()
            offset += 2 + length
        else:
            metric = CORE_METRIC_NAMES[name_index]
        model = models[packed[offset]]
        offset += 1
        better = _DIRECTIONS[code]
        direction = direction_of(metric) if name_index != _OTHER_NAME else MetricDirection(metric, better, "stored")
        if direction.better is not better:
            raise ValueError(f"the stored direction of {metric} is not its own")
        shapes = shape_cache.shapes(direction, model)
        if shape == _EMPTY:
            (value,) = struct.unpack_from("<d", packed, offset)
            offset += 8
            verdicts.add(shapes, value, None)
            continue
        if shape not in (_UNDECIDED, _DECIDED):
            raise ValueError(f"unknown verdict shape {shape}")
        n, mean, stddev, median, low, high, value = struct.unpack_from("<I6d", packed, offset)
        offset += 52
        verdicts.add(shapes, value, (n, mean, stddev, median, low, high))
    if offset != len(packed):
        raise ValueError("packed verdicts have bytes after their last metric")
    return verdicts.encode()
