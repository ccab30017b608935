"""Verdicts stored packed (the numbers they were built from) and rebuilt on read byte for byte as the ack carried
them; verdicts a database holds in the earlier JSON form still read; detection's lazy imports load before the
server listens. Real servers on loopback, real LevelDB in tmp folders."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import orjson
import plyvel
import pytest

from perfdb.regression.direction import direction_of
from perfdb.regression.thresholds import BaselineSummary, ThresholdConfig, ThresholdModel, ThresholdRule
from perfdb.regression.verdicts import VerdictShapeCache, unpack_verdicts
from perfdb.storage import layout
from perfdb.storage.detection import CommittedRecord, RegressionDetector
from tests.support import RecordVerdicts, connect, perfdb_with_provider, record_request
from tests.test_batch_verdicts import awkward_value
from tests.test_stored_verdicts import DETECTING, record_all, stored_verdicts, two_metrics

SMALL = ThresholdModel(window=6, min_points=3, sigmas=2.0, min_change=0.1)
METRICS = ["qps", "perc_lat_99", "client_user_time", "frames", 'odd %s "quoted" metric, ünïcode', "x" * 300]


def test_packed_verdicts_unpack_to_exactly_the_json_encoded() -> None:
    rng = random.Random(5)
    shapes = VerdictShapeCache()
    for _ in range(300):
        verdicts = RecordVerdicts()
        for metric in rng.sample(METRICS, rng.randrange(0, len(METRICS) + 1)):
            model = rng.choice([ThresholdModel(), SMALL, ThresholdModel(sigmas=2, min_change=0)])  # ints: as written
            direction = direction_of(metric, {"frames": rng.choice(["higher", "lower"])})
            baseline = [awkward_value(rng) for _ in range(rng.randrange(0, model.window + 1))]
            summary = BaselineSummary.of(baseline)
            numbers = (summary.n, summary.mean, summary.stddev, summary.median, summary.min, summary.max)
            verdicts.add(shapes.shapes(direction, model), awkward_value(rng), numbers if baseline else None)
        packed = verdicts.pack()
        assert unpack_verdicts(packed) == verdicts.encode()
        assert layout.verdicts_json(layout.verdicts_value(packed)) == verdicts.encode()


def test_a_judged_record_packs_into_a_ninth_of_its_json() -> None:
    """11 core metrics with full windows: the benchmark's records (benchmarks/verdicts.py measures the same)."""
    rng = random.Random(6)
    config = ThresholdConfig(rules=(ThresholdRule("unary", "qps", SMALL),))
    detector = RegressionDetector(config, 1000)
    metrics = ["qps", "qps_per_core", "perc_lat_50", "perc_lat_90", "perc_lat_95", "perc_lat_99",
               "perc_lat_99_point_9", "server_system_time", "server_user_time", "client_system_time",
               "client_user_time"]  # fmt: skip

    def values() -> dict[str, float]:
        return {metric: rng.gauss(100.0, 2.0) for metric in metrics}

    records = [CommittedRecord("alice", f"{index:012d}", "unary", "", values(), None, None, True) for index in range(9)]
    judged = detector.judge_committed(records)
    expected = RegressionDetector(config, 1000).judge_batch(records)  # the same windows, the JSON alone
    assert [verdicts.json if verdicts else None for verdicts in judged] == expected
    last = judged[-1]
    assert last is not None and unpack_verdicts(last.packed) == last.json
    assert len(orjson.loads(last.json)) == 11 and len(last.packed) * 8 < len(last.json)


def test_a_record_failing_part_way_leaves_the_batch_aligned() -> None:
    """Its first metric was added to the batch before the second failed: dropped with it, and the records after it
    get their own verdicts, as judged one by one; those declaring directions (no cached plan) pack theirs too."""

    def judged_record(index: int, qps: float, frames: float, better: dict[str, str] | None) -> CommittedRecord:
        metrics = {"qps": qps, "frames": frames}
        return CommittedRecord("alice", f"{index:012d}", "unary", "", metrics, better, None, True)

    batch = [
        judged_record(1, 1000.0, 5.0, None),
        judged_record(2, 1001.0, math.nan, None),
        judged_record(3, 999.0, 6.0, {"frames": "higher"}),
    ]
    judged = RegressionDetector(ThresholdConfig(), 1000).judge_committed(batch)
    assert judged[1] is None
    one_by_one = RegressionDetector(ThresholdConfig(), 1000)
    for record, verdicts in zip(batch, judged, strict=True):
        (alone,) = one_by_one.judge_batch([record])
        if verdicts is None:
            continue
        assert verdicts.json == alone and unpack_verdicts(verdicts.packed) == alone
    last = judged[2]
    assert last is not None
    assert [verdict["baseline"]["n"] for verdict in orjson.loads(last.json)] == [2, 1]
    assert orjson.loads(last.json)[1]["direction"] == "higher"


@pytest.mark.parametrize(
    "damage",
    [
        lambda packed: packed[:-1],  # cut short
        lambda packed: packed + b"\x00",  # a byte too many
        lambda packed: b"\x09" + packed[1:],  # an unknown version
        lambda packed: packed[:2] + b"\x00" * 25 + packed[27:],  # a model no one could have judged with
    ],
)
def test_malformed_packed_verdicts_are_a_value_error(damage: object) -> None:
    verdicts = RecordVerdicts()
    verdicts.add(VerdictShapeCache().shapes(direction_of("qps"), SMALL), 1.0, (3, 1.0, 0.0, 1.0, 1.0, 1.0))
    assert callable(damage)
    with pytest.raises(ValueError, match=r"packed verdicts|window"):
        unpack_verdicts(damage(verdicts.pack()))
    with pytest.raises(layout.CorruptValueError):
        layout.verdicts_json(layout.verdicts_value(damage(verdicts.pack())))


async def test_verdicts_stored_as_json_by_an_earlier_server_still_read(tmp_path: Path) -> None:
    """A database whose verdicts the earlier server stored (the sealed JSON array), beside packed ones."""
    rng = random.Random(7)
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        acks = await record_all(connection, two_metrics(rng, 10))
    db = plyvel.DB(str(tmp_path / "db"))
    try:
        for ack in acks:
            stored = bytes(layout.unseal(db.get(layout.verdicts_key(ack["record_id"]))))
            assert stored[:1] != b"[" and len(stored) * 3 < len(orjson.dumps(ack["verdicts"]))
        for ack in acks[::2]:  # as the earlier server wrote them
            db.put(layout.verdicts_key(ack["record_id"]), layout.verdicts_value(ack["verdicts"]), sync=True)
    finally:
        db.close()
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        for ack in acks:
            assert await stored_verdicts(connection, ack["record_id"]) == ack["verdicts"], ack["record_id"]
        (later,) = await record_all(connection, [record_request(metrics={"qps": 1000.0, "perc_lat_99": 500.0})])
        assert [verdict["baseline"]["n"] for verdict in later["verdicts"]] == [10, 10]


LISTENING_CHECK = """
import asyncio, sys
from pathlib import Path
from perfdb.config import Config
from perfdb.server import PerfdbServer

async def main() -> None:
    detecting = sys.argv[2] == "on"
    config = Config(host="127.0.0.1", port=0, database=Path(sys.argv[1]), userinfo_url=None,
                    regression_detection=detecting)
    server = PerfdbServer(config)
    await server.start()  # listening from here on
    print("scipy.stats" in sys.modules, flush=True)
    await server.shutdown()

asyncio.run(main())
"""


@pytest.mark.parametrize("detection", ["on", "off"])
def test_detection_loads_scipy_before_the_server_listens(tmp_path: Path, detection: str) -> None:
    """A fresh interpreter, so no other test's import counts; without detection scipy stays for first use."""
    checked = subprocess.run(
        [sys.executable, "-c", LISTENING_CHECK, str(tmp_path / "db"), detection],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert checked.stdout.strip() == str(detection == "on"), checked.stderr[-2000:]
