"""A batch of records' verdicts as the server sends and stores them, built fast: the same JSON as
`judge(...).to_json()` of each metric, byte for byte, without building a Verdict, its dataclasses and dicts per
metric.

Per record the server adds only its metrics' shapes and values (`VerdictBatch.add_record`), and their baseline
summaries come as arrays for the whole batch (SeriesWindows.summaries); the decisions of the whole batch are then
made at once with numpy (`decide_all`: the same float operations as `decide`), and every number of every verdict
goes through one of two orjson calls (so each reads exactly as orjson writes it in a Verdict's dict) and is spliced
into a %-template of its metric: the constant parts (name, model, direction) and those that take
one of a few values (status, governed_by, changed) are encoded once per template, at most 14 a metric and model.

What is stored is not that JSON (about 470 bytes a metric) but the numbers it was built from (packed, 55 bytes a
core metric: its name, direction and model, the models' parameters once, the baseline summary and value);
`unpack_verdicts` gives the JSON back through the same batch, so it is byte for byte what the ack carried.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import numpy.typing as npt
import orjson

from perfdb.records.units import CORE_METRIC_NAMES
from perfdb.regression.direction import Better, MetricDirection, direction_of
from perfdb.regression.thresholds import IMPROVEMENT, NO_CHANGE, REGRESSION, ThresholdModel, decide_all

# A template's key: a decision's code (status * 4 + governed_by_sigmas * 2 + changed), _UNDECIDED (too few points)
# or _EMPTY (no baseline).
_UNDECIDED, _EMPTY = 15, 16
_STATUS_TEXT = {NO_CHANGE: b'"no_change"', REGRESSION: b'"regression"', IMPROVEMENT: b'"improvement"'}
_WORSE_SIGNS = {Better.HIGHER: -1.0, Better.LOWER: 1.0, None: 0.0}
# The numbers of a verdict, in its JSON's order (mean, stddev, median, min, max, value, change, change_percent,
# bound, percent, sigma_bound, min_change_bound): a template takes those from `first` to `last` of its shape.
_COLUMNS = 12
_VALUE_COLUMN, _BASELINE_COLUMNS = 5, 6


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class VerdictShapes:
    """One metric's verdicts under one model and direction: %b templates in Verdict.to_json's field order."""

    direction: MetricDirection
    model: ThresholdModel
    # sigmas, min_change, min_points and the sign of a worse change (1: higher is worse, -1: lower, 0: unknown)
    parameters: tuple[float, float, float, float]
    packed_head: bytes  # the direction and name in the packed form (see pack)
    head: bytes  # %-escaped, up to the status
    model_json: bytes  # %-escaped, the model member
    tail: bytes  # %-escaped, the direction member, up to "changed"
    templates: dict[int, bytes]  # by key, made on first use: at most 14

    @classmethod
    def of(cls, direction: MetricDirection, model: ThresholdModel) -> VerdictShapes:
        def text(value: object) -> bytes:
            return orjson.dumps(value).replace(b"%", b"%%")

        worse_sign = _WORSE_SIGNS[direction.better]
        return cls(
            direction,
            model,
            (model.sigmas, model.min_change, model.min_points, worse_sign),
            _packed_head(direction),
            head=b'{"metric":' + text(direction.metric) + b',"status":',
            model_json=b',"model":' + text(model.to_json()),
            tail=b',"direction":' + text(direction.to_json()) + b',"changed":',
            templates={},
        )

    def template(self, key: int) -> bytes:
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = self._template(key)
        return template

    def _template(self, key: int) -> bytes:
        """The template of a key: the baseline's n, then the numbers a verdict of its shape holds."""
        undecided_rest = b',"change":null,"change_percent":null,"threshold":null' + self.tail + b"false}"
        if key == _EMPTY:
            return (
                self.head
                + b'"insufficient_data"'
                + self.model_json
                + b',"baseline":{"n":%b},"value":%b'
                + (undecided_rest)
            )
        baseline = b',"baseline":{"n":%b,"mean":%b,"stddev":%b,"median":%b,"min":%b,"max":%b},"value":%b'
        if key == _UNDECIDED:
            return self.head + b'"insufficient_data"' + self.model_json + baseline + undecided_rest
        status, governed_by_sigmas, changed = key >> 2, key >> 1 & 1, key & 1
        return (
            self.head + _STATUS_TEXT[status] + self.model_json + baseline + b',"change":%b,"change_percent":%b,'
            b'"threshold":{"bound":%b,"percent":%b,"sigma_bound":%b,"min_change_bound":%b,"governed_by":'
            + (b'"sigmas"' if governed_by_sigmas else b'"min_change"')
            + b"}"
            + self.tail
            + (b"true}" if changed else b"false}")
        )


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


class VerdictBatch:
    """The verdicts of a batch of records, each record's metrics in its order; `finish` decides and encodes them
    all at once, given the batch's baseline summaries (as SeriesWindows.summaries gives them)."""

    __slots__ = ("_heads", "_lengths", "_shapes", "_starts", "_values")

    def __init__(self) -> None:
        self._shapes: list[VerdictShapes] = []
        self._values: list[float] = []
        self._starts: list[int] = []  # where each record's baseline summaries start
        self._lengths: list[int] = []  # each record's number of metrics
        self._heads: list[bytes | None] = []  # each record's packed head, if its caller had it made already

    def add_record(
        self, shapes: list[VerdictShapes], values: list[float], start: int, packed_head: bytes | None = None
    ) -> None:
        """A record's metrics: their shapes and values (finite: the caller checked, before they joined their
        windows), each judged as `judge` does against its baseline summary, the record's being those from `start`
        on; `packed_head` is `packed_head(shapes)`, if known."""
        self._shapes += shapes
        self._values += values
        self._starts.append(start)
        self._lengths.append(len(shapes))
        self._heads.append(packed_head)

    def finish(self, counts: npt.NDArray[np.intp], summaries: npt.NDArray[np.float64]) -> list[tuple[bytes, bytes]]:
        """Each record's verdicts: the JSON array of them, and their numbers packed. `counts` and `summaries` hold
        each baseline's n (0: none) and its mean, stddev, median, min and max (0.0s without one)."""
        shapes = self._shapes
        count = len(shapes)
        lengths = np.array(self._lengths, dtype=np.intp)
        firsts = np.cumsum(lengths) - lengths
        entries = np.repeat(np.array(self._starts, dtype=np.intp) - firsts, lengths) + np.arange(count)
        numbers = np.empty((count, _BASELINE_COLUMNS), dtype="<f8")
        numbers[:, :_VALUE_COLUMN] = summaries[entries]
        numbers[:, _VALUE_COLUMN] = self._values
        taken = counts[entries].astype(np.int64)
        encoded = self._encode(shapes, numbers, taken) if count else []
        packed_counts = taken.astype("<u4")
        finished = []
        for first, length, head in zip(firsts.tolist(), self._lengths, self._heads, strict=True):
            end = first + length
            if head is None:
                head = packed_head(shapes[first:end])
            packed = head + packed_counts[first:end].tobytes() + numbers[first:end].tobytes()
            finished.append((b"[" + b",".join(encoded[first:end]) + b"]", packed))
        return finished

    @staticmethod
    def _encode(shapes: list[VerdictShapes], numbers: np.ndarray, counts: np.ndarray) -> list[bytes]:
        sigmas, min_change, min_points, worse_sign = np.array([shape.parameters for shape in shapes]).T
        mean, stddev, value = numbers[:, 0], numbers[:, 1], numbers[:, _VALUE_COLUMN]
        decisions = decide_all(value, mean, stddev, sigmas, min_change, worse_sign)
        empty, decided = counts == 0, counts >= min_points
        codes = decisions.status * 4 + decisions.governed_by_sigmas * 2 + decisions.changed
        keys = np.where(empty, _EMPTY, np.where(decided, codes, _UNDECIDED))
        table = np.empty((len(shapes), _COLUMNS))
        table[:, :_BASELINE_COLUMNS] = numbers
        table[:, _BASELINE_COLUMNS:] = np.column_stack(
            (decisions.change, decisions.change_percent, decisions.bound, decisions.percent, decisions.sigma_bound,
             decisions.min_change_bound)
        )  # fmt: skip
        # One orjson call for the floats (NaN, a None, is written null), one for the counts; no number holds a comma.
        pieces = orjson.dumps(table.ravel(), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
        counted = orjson.dumps(counts, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
        starts = np.arange(0, len(shapes) * _COLUMNS, _COLUMNS)
        firsts = starts + np.where(empty, _VALUE_COLUMN, 0)
        lasts = starts + np.where(decided, _COLUMNS, _BASELINE_COLUMNS)
        return [
            (shape.templates.get(key) or shape.template(key)) % (n, *pieces[first:last])
            for shape, key, n, first, last in zip(
                shapes, keys.tolist(), counted, firsts.tolist(), lasts.tolist(), strict=True
            )
        ]


# The packed form of a record's verdicts, little-endian:
#   version (B, 1); models (B), each: window (I), min_points (I), sigmas (d), min_change (d), flags (B: which of
#   those two were ints); metrics (H), each:
#   direction (B: 0 unknown, 1 higher, 2 lower); name: its index in CORE_METRIC_NAMES (B), or 255, length (H)
#   and UTF-8; the index of its model (B). Then each metric's baseline n (I, 0: none), then each metric's baseline
#   mean, stddev, median, min, max (0.0 without a baseline) and value (6d).
# A stored value of the earlier form is the JSON array itself, whose first byte is "[".
_PACKED_VERSION = 1
_OTHER_NAME = 255
_CORE_INDEX = {name: index for index, name in enumerate(CORE_METRIC_NAMES)}
_DIRECTION_CODES = {None: 0, Better.HIGHER: 1, Better.LOWER: 2}
_DIRECTIONS = {code: better for better, code in _DIRECTION_CODES.items()}
_MODEL = struct.Struct("<IIddB")
# A model's flags: its sigmas or min_change was an int (a model made in code), which its JSON writes as one.
_INT_SIGMAS, _INT_MIN_CHANGE = 1, 2


def _packed_head(direction: MetricDirection) -> bytes:
    code = bytes([_DIRECTION_CODES[direction.better]])
    core = _CORE_INDEX.get(direction.metric)
    if core is not None:
        return code + bytes([core])
    name = direction.metric.encode()
    return code + bytes([_OTHER_NAME]) + struct.pack("<H", len(name)) + name


def packed_head(shapes: list[VerdictShapes]) -> bytes:
    """What the packed verdicts of a record with these shapes, in order, start with: the same for every record
    of a test (without declared directions), so the server makes it once per test and metrics."""
    models: dict[int, int] = {}  # id(model) -> its index
    parameters = []
    heads = []
    for shape in shapes:
        model = shape.model
        index = models.get(id(model))
        if index is None:
            index = models[id(model)] = len(models)
            flags = (_INT_SIGMAS if isinstance(model.sigmas, int) else 0) | (
                _INT_MIN_CHANGE if isinstance(model.min_change, int) else 0
            )
            parameters.append(_MODEL.pack(model.window, model.min_points, model.sigmas, model.min_change, flags))
        heads.append(shape.packed_head + bytes([index]))
    if len(models) > 255 or len(shapes) > 65535:
        raise ValueError("too many models or metrics to pack")
    return b"".join([bytes([_PACKED_VERSION, len(models)]), *parameters, struct.pack("<H", len(shapes)), *heads])


def unpack_verdicts(packed: bytes | memoryview) -> bytes:
    """The JSON array of the verdicts packed (see above), exactly as the batch that packed them encoded them.
    ValueError if `packed` is not such a value."""
    try:
        return _unpack(memoryview(packed))
    except (struct.error, IndexError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"packed verdicts are malformed: {error}") from None


def _unpack(packed: memoryview) -> bytes:
    version, model_count = packed[0], packed[1]
    if version != _PACKED_VERSION:
        raise ValueError(f"packed verdicts of an unknown version {version}")
    offset = 2
    models = []
    for _ in range(model_count):
        window, min_points, sigmas, min_change, flags = _MODEL.unpack_from(packed, offset)
        models.append(
            ThresholdModel(
                window,
                min_points,
                int(sigmas) if flags & _INT_SIGMAS else sigmas,
                int(min_change) if flags & _INT_MIN_CHANGE else min_change,
            )
        )
        offset += _MODEL.size
    (metric_count,) = struct.unpack_from("<H", packed, offset)
    offset += 2
    shape_cache = VerdictShapeCache()
    shapes = []
    for _ in range(metric_count):
        better, name_index = _DIRECTIONS[packed[offset]], packed[offset + 1]
        offset += 2
        if name_index == _OTHER_NAME:
            (length,) = struct.unpack_from("<H", packed, offset)
            metric = bytes(packed[offset + 2 : offset + 2 + length]).decode()
            offset += 2 + length
            direction = MetricDirection(metric, better, "stored")
        else:
            direction = direction_of(CORE_METRIC_NAMES[name_index])
            if direction.better is not better:
                raise ValueError(f"the stored direction of {direction.metric} is not its own")
        shapes.append(shape_cache.shapes(direction, models[packed[offset]]))
        offset += 1
    if len(packed) != offset + metric_count * (4 + 8 * _BASELINE_COLUMNS):
        raise ValueError("packed verdicts of the wrong length for their metrics")
    # The numbers go back into the batch as they came out of it (0.0s where there was no baseline).
    counts = np.frombuffer(packed, dtype="<u4", count=metric_count, offset=offset).astype(np.intp)
    numbers = np.frombuffer(
        packed, dtype="<f8", count=metric_count * _BASELINE_COLUMNS, offset=offset + 4 * metric_count
    )
    numbers = numbers.reshape(metric_count, _BASELINE_COLUMNS)
    batch = VerdictBatch()
    batch.add_record(shapes, numbers[:, _VALUE_COLUMN].tolist(), 0)
    ((json, _),) = batch.finish(counts, numbers[:, :_VALUE_COLUMN])
    return json
