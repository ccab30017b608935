"""A dense perfdb for the chart tests: one user with 20,000 results of one test (bursts, a five-day
pause, one planted dip and one spike), a few lighter tests and one of five results, and a second
user sharing the big test. Imported with their times, into run_perf_db_server in a child process."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from perfdb.client import Client
from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from tests.support import server_for_imports

DAY = 86_400 * 1_000_000
DENSE_USER = "static:dense-lab"
OTHER_USER = "static:dense-other"
BIG_TEST = "dense_unary"
SPARSE_TEST = "dense_sparse"
LIGHT_TESTS = tuple(f"dense_t{index:02d}" for index in range(1, 8))
BIG_RESULTS = 20_000
LOWEST_QPS, HIGHEST_QPS = 0.5, 9_900_000.0  # exact in five significant digits
# The big test runs from 20 to 8 days ago and from 3 days ago to now: a pause of five days.
PAUSE = (8, 3)
ADMIN_KEY = "dense-admin-key-0123456789"


@dataclasses.dataclass(frozen=True)
class DensePerfdb:
    address: str
    records: list[dict[str, Any]]  # oldest first
    lowest_id: str  # the record holding LOWEST_QPS
    highest_id: str

    def of(self, user_id: str | None = None, test_name: str | None = None) -> list[dict[str, Any]]:
        return [
            record
            for record in self.records
            if (user_id is None or record["user_id"] == user_id)
            and (test_name is None or record["test_name"] == test_name)
        ]


def _metrics(rng: random.Random, qps: float) -> dict[str, float]:
    p50 = round(rng.uniform(200, 300), 2)
    return {
        "qps": qps,
        "qps_per_core": round(qps / 8, 1),
        "perc_lat_50": p50,
        "perc_lat_90": round(p50 * 1.6, 2),
        "perc_lat_95": round(p50 * 2.1, 2),
        "perc_lat_99": round(p50 * 3.3, 2),
        "perc_lat_99_point_9": round(p50 * 6.5, 2),
        "server_system_time": round(rng.uniform(20, 45), 1),
        "server_user_time": round(rng.uniform(60, 95), 1),
        "client_system_time": round(rng.uniform(15, 30), 1),
        "client_user_time": round(rng.uniform(50, 80), 1),
    }


def build_dense_records(now: int, seed: int = 5) -> tuple[list[dict[str, Any]], str, str]:
    rng = random.Random(seed)
    start = now - 20 * DAY
    pause_start, pause_end = now - PAUSE[0] * DAY, now - PAUSE[1] * DAY
    runs: list[tuple[int, str, str]] = []
    for _ in range(BIG_RESULTS):
        # Bursts: most results land in a few minutes around one of 40 moments.
        base = start + rng.randrange(40) * (pause_start - start) // 40
        micros = base + rng.randrange(600 * 1_000_000)
        if rng.random() < 0.3:
            micros = pause_end + rng.randrange(now - pause_end - 1)
        runs.append((micros, DENSE_USER, BIG_TEST))
    for test in LIGHT_TESTS:
        runs += [(start + rng.randrange(now - start - 1), DENSE_USER, test) for _ in range(300)]
    runs += [(start + (index + 1) * 3 * DAY, DENSE_USER, SPARSE_TEST) for index in range(5)]
    runs += [(start + rng.randrange(now - start - 1), OTHER_USER, BIG_TEST) for _ in range(2000)]
    runs.sort()
    records: list[dict[str, Any]] = []
    for sequence, (micros, user_id, test) in enumerate(runs):
        # The sparse test runs slower than the others, so that its dots stand apart.
        qps = round(rng.uniform(45_000, 55_000) if test == SPARSE_TEST else rng.uniform(90_000, 110_000), 1)
        records.append(
            {
                "record_id": make_record_id(micros, sequence % 1_000_000),
                "user_id": user_id,
                "timestamp": format_micros(micros),
                "test_name": test,
                "tag": "burst",
                "metrics": _metrics(rng, qps),
            }
        )
    big = [record for record in records if record["user_id"] == DENSE_USER and record["test_name"] == BIG_TEST]
    lowest, highest = big[len(big) // 3], big[-len(big) // 5]
    lowest["metrics"]["qps"], highest["metrics"]["qps"] = LOWEST_QPS, HIGHEST_QPS
    return records, lowest["record_id"], highest["record_id"]


@pytest.fixture(scope="session")
def dense_perfdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DensePerfdb]:
    with server_for_imports(tmp_path_factory.mktemp("perfdb-dense"), ADMIN_KEY) as address:
        records, lowest_id, highest_id = build_dense_records(now_micros() - 60_000_000)
        users = {
            user: {"user_id": user, "name": name} for user, name in ((DENSE_USER, "Dense Lab"), (OTHER_USER, "Other"))
        }
        with Client(address, request_timeout=60.0) as client:
            for first in range(0, len(records), 1000):
                batch = records[first : first + 1000]
                reply = client.call("import", admin_key=ADMIN_KEY, records=batch, users=users)
                assert reply["imported"] == len(batch), orjson.dumps(reply)[:200]
        yield DensePerfdb(address, records, lowest_id, highest_id)
