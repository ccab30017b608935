"""Real gRPC ScenarioResult files submitted as scenario_result and read back mapped."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from perfdb.protocol.errors import PerfdbError
from perfdb.records.record_ids import record_id_micros
from perfdb.records.scenario import map_scenario_result, proto_number
from perfdb.records.timestamps import parse_rfc3339
from tests.support import GRPC_RESULT_FILES, connect, grpc_result, perfdb_with_provider

# Expected mapping, written out from SOURCES.txt rather than derived from the code under test.
CORE_FROM_SUMMARY = {
    "qps": ("qps", 1),
    "qps_per_core": ("qpsPerServerCore", 1),
    "perc_lat_50": ("latency50", 1000),
    "perc_lat_90": ("latency90", 1000),
    "perc_lat_95": ("latency95", 1000),
    "perc_lat_99": ("latency99", 1000),
    "perc_lat_99_point_9": ("latency999", 1000),
    "server_system_time": ("serverSystemTime", 1),
    "server_user_time": ("serverUserTime", 1),
    "client_system_time": ("clientSystemTime", 1),
    "client_user_time": ("clientUserTime", 1),
}


def expected_metrics(summary: dict[str, Any]) -> dict[str, float]:
    expected: dict[str, float] = {}
    for metric, (field, divisor) in CORE_FROM_SUMMARY.items():
        if field in summary:
            expected[metric] = summary[field] / divisor
    return expected


async def test_real_grpc_results_round_trip(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        acks = []
        for index, name in enumerate(GRPC_RESULT_FILES):
            reply = await conn.request(
                "record",
                id=index,
                access_token="user-grpc",
                tag="from-file",
                scenario_result=grpc_result(name),
            )
            assert reply["ok"], reply
            acks.append(reply)
        by_id = {r["record_id"]: r for r in (await conn.request("get_user", user_id="grpc"))["records"]}
    # Each is read back; those whose summary says when they ran are filed at that time.
    records = [by_id[ack["record_id"]] for ack in acks]
    for name, record in zip(GRPC_RESULT_FILES, records, strict=True):
        source = grpc_result(name)
        summary = source["summary"]
        scenario = source["scenario"]
        assert record["test_name"] == scenario["name"]
        assert record["tag"] == "from-file"
        metrics = record["metrics"]
        for metric, value in expected_metrics(summary).items():
            assert metrics[metric] == value, (name, metric)
        # Latencies arrive in nanoseconds and are stored in microseconds.
        assert math.isclose(metrics["perc_lat_50"] * 1000, summary["latency50"])
        # Fields that are not core metrics stay under their own names, when finite.
        for field, value in summary.items():
            if field in ("startTime", "endTime") or field in {f for f, _ in CORE_FROM_SUMMARY.values()}:
                continue
            if isinstance(value, str):
                assert field not in metrics  # "Infinity" carries no measurement
            else:
                assert metrics[field] == value
        assert record["client_config"] == _without_targets(scenario["clientConfig"])
        assert record["server_config"] == scenario["serverConfig"]
        assert record["scenario"]["name"] == scenario["name"]
        assert record["scenario"]["server_cores"] == source["serverCores"]
        assert record["scenario"]["benchmark_seconds"] == scenario["benchmarkSeconds"]
        if "startTime" in summary:
            assert record["scenario"]["start_time"] == summary["startTime"]
            assert record["scenario"]["end_time"] == summary["endTime"]
            ran = parse_rfc3339(summary["startTime"])
            assert parse_rfc3339(record["run_time"]) == ran == record_id_micros(record["record_id"])
        else:
            assert "run_time" not in record


def _without_targets(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("serverTargets", "server_targets", "host")}


def test_cheri_files_have_no_cpu_times_and_infinite_ratios() -> None:
    summary = grpc_result(GRPC_RESULT_FILES[1])["summary"]
    mapped = map_scenario_result(grpc_result(GRPC_RESULT_FILES[1]))
    assert summary["serverQueriesPerCpuSec"] == "Infinity"
    assert "serverQueriesPerCpuSec" not in mapped.metrics
    for absent in ("server_system_time", "server_user_time", "client_system_time", "client_user_time"):
        assert absent not in mapped.metrics
    assert mapped.metrics["messageCount"] == 1265307
    assert mapped.metrics["perc_lat_99_point_9"] == summary["latency999"] / 1000


def test_upstream_file_maps_all_eleven_core_metrics() -> None:
    mapped = map_scenario_result(grpc_result(GRPC_RESULT_FILES[0]))
    assert set(CORE_FROM_SUMMARY) <= set(mapped.metrics)
    assert mapped.metrics["qps"] == 221994.3080820922
    assert mapped.metrics["perc_lat_50"] == 28564969.95592918 / 1000
    assert mapped.metrics["serverCpuUsage"] == 97.5689991636465


def test_snake_case_names_and_int64_strings_are_understood() -> None:
    mapped = map_scenario_result(
        {
            "summary": {"qps": "1500", "latency_50": "2000000", "qps_per_server_core": 12.5, "latency_99": "NaN"},
            "scenario": {"name": "snake", "client_config": {"client_type": "SYNC"}, "num_clients": "2"},
        }
    )
    assert mapped.metrics == {"qps": 1500, "perc_lat_50": 2000.0, "qps_per_core": 12.5}
    assert mapped.client_config == {"client_type": "SYNC"}
    assert mapped.scenario["num_clients"] == 2
    assert mapped.name == "snake"


@pytest.mark.parametrize(
    ("result", "field"),
    [
        ([], "scenario_result"),
        ({}, "scenario_result.summary"),
        ({"summary": []}, "scenario_result.summary"),
        ({"summary": {"qps": "Infinity"}}, "scenario_result.summary"),
        ({"summary": {"qps": 1}, "scenario": 3}, "scenario_result.scenario"),
        ({"summary": {"qps": 1}, "scenario": {"name": 3}}, "scenario_result.scenario.name"),
    ],
)
def test_malformed_scenario_results_name_the_field(result: Any, field: str) -> None:
    with pytest.raises(PerfdbError) as caught:
        map_scenario_result(result)
    assert caught.value.code.value == "bad_request"
    assert caught.value.message.startswith(field + ":")


@pytest.mark.parametrize(
    ("raw", "number"),
    [
        (5, 5),
        (2.5, 2.5),
        ("42", 42),
        ("-7", -7),
        ("1e3", 1000.0),
        ("Infinity", None),
        ("NaN", None),
        ("-Infinity", None),
        ("abc", None),
        (True, None),
        (None, None),
        ([1], None),
        (float("inf"), None),
    ],
)
def test_proto_numbers(raw: Any, number: float | None) -> None:
    assert proto_number(raw) == number


async def test_scenario_without_name_needs_a_test_name(tmp_path: Path) -> None:
    result = {"summary": {"qps": 10}}
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        refused = await conn.request("record", access_token="user-a", scenario_result=result)
        named = await conn.request("record", access_token="user-a", scenario_result=result, test_name="given")
        stored = (await conn.request("get_all"))["records"]
    assert refused["ok"] is False and refused["error"]["message"].startswith("test_name")
    assert named["ok"] is True
    assert [r["test_name"] for r in stored] == ["given"]


def test_huge_int64_strings_become_floats_and_core_names_win() -> None:
    mapped = map_scenario_result({"summary": {"qps": "1" * 30, "perc_lat_50": 5, "latency50": 7000}})
    assert mapped.metrics["qps"] == float("1" * 30)
    assert mapped.metrics["perc_lat_50"] == 7.0  # from latency50, not the clashing custom field
