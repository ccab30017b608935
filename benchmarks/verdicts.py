"""CPU per record of judging regression verdicts, as the server's verdict thread does it, and as it did before.

    python benchmarks/verdicts.py [--records N] [--batch N]

Both judge the benchmark workload's 11-metric records against windows already full (30 points each) and encode
the verdicts as the record's ack and stored value need them. `per_record` is the earlier way: one `judge` and one
`Verdict.to_json` per metric, the verdicts encoded twice (ack and stored value). `batch` is the server's:
RegressionDetector.judge_committed on committed batches, the JSON for the ack and the packed numbers to store.
CPU time (time.process_time), not wall time: the machine is shared. Also the bytes stored per record, packed and
as the JSON array stored before. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from workload import record_request  # noqa: E402

from perfdb.regression.direction import direction_of  # noqa: E402
from perfdb.regression.series import SeriesKey  # noqa: E402
from perfdb.regression.thresholds import ThresholdConfig, judge  # noqa: E402
from perfdb.storage import layout  # noqa: E402
from perfdb.storage.detection import CommittedRecord, RegressionDetector  # noqa: E402

USERS = 20  # x 7 test names: 140 series of each metric, all with full windows
WARM_RECORDS = 140 * 31


def records(count: int, start: int) -> list[CommittedRecord]:
    rng = random.Random(start)
    made = []
    for index in range(start, start + count):
        request = record_request(index, index % USERS, rng)
        user_id = f"bench-{index % USERS:04d}"
        made.append(
            CommittedRecord(
                user_id, f"{index:016d}", request["test_name"], request["tag"], request["metrics"], None, None, True
            )
        )
    return made


def warmed() -> RegressionDetector:
    detector = RegressionDetector(ThresholdConfig(), 100_000)
    detector.judge_batch(records(WARM_RECORDS, 0))
    return detector


def per_record(detector: RegressionDetector, batch: list[CommittedRecord]) -> None:
    """The earlier verdict path: dataclasses and dicts per metric, encoded for the ack and again to store."""
    for record in batch:
        verdicts = []
        metrics: Mapping[str, float] = record.metrics
        for metric, value in metrics.items():
            model = detector.thresholds.model_for(record.test_name, metric)
            key = SeriesKey(record.user_id, record.test_name, record.tag, metric)
            verdict = judge(value, detector.windows.values(key), direction_of(metric, record.better), model)
            verdicts.append(verdict.to_json())
            detector.windows.append(key, record.record_id, value, model.window)
        orjson.dumps({"ok": True, "verdicts": tuple(verdicts)})
        layout.verdicts_value(verdicts)


def batched(detector: RegressionDetector, batch: list[CommittedRecord]) -> None:
    """The server's: judge_committed on the batch, the JSON in each ack, the packed numbers stored."""
    for verdicts in detector.judge_committed(batch):
        assert verdicts is not None
        orjson.dumps({"ok": True, "verdicts": orjson.Fragment(verdicts.json)})
        layout.verdicts_value(verdicts.packed)


def stored_bytes(count: int) -> dict[str, float]:
    """Bytes a record's verdicts take stored, packed and (as before the packed form) as their JSON array."""
    detector = warmed()
    judged = [verdicts for verdicts in detector.judge_committed(records(count, WARM_RECORDS)) if verdicts]
    return {
        "stored_packed_bytes_per_record": sum(len(layout.verdicts_value(v.packed)) for v in judged) / len(judged),
        "stored_json_bytes_per_record": sum(len(layout.verdicts_value(v.json)) for v in judged) / len(judged),
    }


def measure(count: int, batch_size: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"records": count, "batch": batch_size}
    for name, judge_all in (("per_record", per_record), ("batch", batched)):
        detector = warmed()
        work = records(count, WARM_RECORDS)
        batches = [work[start : start + batch_size] for start in range(0, count, batch_size)]
        started = time.process_time()
        for batch in batches:
            judge_all(detector, batch)
        figures[f"{name}_cpu_us_per_record"] = round((time.process_time() - started) / count * 1e6, 1)
    figures["speedup"] = round(figures["per_record_cpu_us_per_record"] / figures["batch_cpu_us_per_record"], 2)
    figures.update((name, round(size, 1)) for name, size in stored_bytes(1000).items())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=200, help="records per committed batch")
    arguments = parser.parse_args()
    print(orjson.dumps(measure(arguments.records, arguments.batch)).decode())


if __name__ == "__main__":
    main()
