"""The dashboard tests' data: two months of results from several users, imported with their
original times, plus the real gRPC ScenarioResult files submitted as a CI bot would."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

from perfdb.client import Client
from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from tests.support import FIXTURES, GRPC_RESULT_FILES, grpc_result

DAY = 86_400 * 1_000_000
HOUR = 3600 * 1_000_000

USERS: dict[str, dict[str, Any]] = {
    "static:nightly-ci": {"user_id": "static:nightly-ci", "name": "Nightly CI"},
    "108234567890123456789": {"user_id": "108234567890123456789", "name": "Ada Lovelace", "locale": "en"},
    "209876543210987654321": {"user_id": "209876543210987654321", "name": "Grace Hopper"},
    "static:perf-lab": {"user_id": "static:perf-lab", "name": "Perf Lab"},
    # Someone whose name and tag are HTML: every page must show them as text.
    "hostile": {"user_id": "hostile", "name": "<script>window.hacked=1</script>Mallory"},
}
GRPC_USER = "static:grpc-bench"
GRPC_USER_NAME = "gRPC benchmarks"
HOSTILE_TAG = '<img src=x onerror="window.hacked=1">'

# Test name -> (QPS, median latency in µs, server cores): the shape of each benchmark.
TESTS = {
    "cpp_protobuf_async_unary_qps_unconstrained_insecure": (210_000.0, 280.0, 12),
    "cpp_protobuf_async_streaming_qps_unconstrained_secure": (75_000.0, 410.0, 8),
    "go_generic_sync_streaming_ping_pong": (41_000.0, 22.0, 1),
    "java_protobuf_async_unary_ping_pong_insecure": (9_500.0, 95.0, 1),
}
DAYS = 60


@dataclasses.dataclass(frozen=True)
class SeedData:
    records: list[dict[str, Any]]  # as imported (grpc records not included), oldest first
    users: dict[str, dict[str, Any]]
    grpc_record_ids: list[str]  # the real gRPC results, submitted last (newest)

    def of_user(self, user_id: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["user_id"] == user_id]


def _configs() -> tuple[dict[str, Any], dict[str, Any]]:
    scenario = json.loads((FIXTURES / "test-infra_go_example_scenario.json").read_text())["scenarios"][0]
    return scenario["client_config"], scenario["server_config"]


def _metrics(rng: random.Random, test: str, day: int, user_factor: float) -> dict[str, float]:
    qps_base, latency_base, cores = TESTS[test]
    trend = 1.0 + 0.004 * day  # a slow improvement over the two months
    qps = qps_base * trend * user_factor * rng.uniform(0.93, 1.07)
    p50 = latency_base / trend / user_factor * rng.uniform(0.92, 1.1)
    return {
        "qps": round(qps, 1),
        "qps_per_core": round(qps / cores, 1),
        "perc_lat_50": round(p50, 2),
        "perc_lat_90": round(p50 * rng.uniform(1.5, 1.7), 2),
        "perc_lat_95": round(p50 * rng.uniform(1.9, 2.2), 2),
        "perc_lat_99": round(p50 * rng.uniform(3.0, 3.6), 2),
        "perc_lat_99_point_9": round(p50 * rng.uniform(5.5, 7.5), 2),
        "server_system_time": round(rng.uniform(20, 45) * cores / 4, 1),
        "server_user_time": round(rng.uniform(60, 95) * cores / 4, 1),
        "client_system_time": round(rng.uniform(15, 30), 1),
        "client_user_time": round(rng.uniform(50, 80), 1),
    }


def build_records(now: int | None = None, seed: int = 7) -> list[dict[str, Any]]:
    """The imported records: deterministic apart from where "now" is."""
    rng = random.Random(seed)
    today = (now or now_micros()) // DAY * DAY
    start = today - DAYS * DAY
    client_config, server_config = _configs()
    sys_info = {"cpu_model": "Intel(R) Xeon(R) Platinum 8375C", "cpu_cores": 32, "os": "Debian GNU/Linux 12"}
    runs: list[tuple[int, str, str, str, float]] = []  # micros, user, test, tag, factor
    tests = list(TESTS)
    for day in range(DAYS):
        midnight = start + day * DAY
        for index, test in enumerate(tests):
            runs.append((midnight + 2 * HOUR + index * 600_000_000, "static:nightly-ci", test, "nightly", 1.0))
        if day % 3 == 0:
            for index, test in enumerate(tests[:2]):
                tag = f"pr-{4100 + day}"
                runs.append((midnight + 14 * HOUR + index * 60_000_000, "108234567890123456789", test, tag, 1.08))
        if day % 7 not in (5, 6):
            runs.append((midnight + 16 * HOUR, "209876543210987654321", tests[2], "", 0.9))
        if day % 7 == 3:
            for index, test in enumerate(tests):
                runs.append((midnight + 11 * HOUR + index * 1_000_000, "static:perf-lab", test, "release-1.6x", 1.15))
    # The hostile user ran once, at the very start, so the newest pages never show it.
    runs.append((start - DAY, "hostile", tests[0], HOSTILE_TAG, 1.0))
    runs.sort()
    records = []
    for micros, user_id, test, tag, factor in runs:
        day = (micros - start) // DAY
        records.append(
            {
                "record_id": make_record_id(micros, 0),
                "user_id": user_id,
                "timestamp": format_micros(micros),
                "test_name": test,
                "tag": tag,
                "sys_info": sys_info,
                "metrics": _metrics(rng, test, day, factor),
                "client_config": client_config,
                "server_config": server_config,
            }
        )
    return records


def seed(client: Client, admin_key: str, grpc_token: str) -> SeedData:
    """Import the synthetic results, then submit the real gRPC files (stamped now)."""
    records = build_records()
    for start in range(0, len(records), 500):
        batch = records[start : start + 500]
        users = {record["user_id"]: USERS[record["user_id"]] for record in batch}
        reply = client.call("import", admin_key=admin_key, records=batch, users=users)
        assert reply["imported"] == len(batch), reply
    grpc_ids = []
    for index, name in enumerate(GRPC_RESULT_FILES):
        ack = client.record(
            access_token=grpc_token,
            scenario_result=grpc_result(name),
            tag="grpc-fixture",
            request_id=f"fixture-{index}",
            # As if they ran just now: the newest results (else those whose summary carries its
            # start time, in 2024, would be filed then).
            run_time=format_micros(now_micros()),
        )
        grpc_ids.append(ack["record_id"])
    return SeedData(records=records, users=USERS, grpc_record_ids=grpc_ids)
