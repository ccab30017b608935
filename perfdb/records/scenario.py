"""Mapping of a gRPC ScenarioResult (as qps_json_driver writes it) onto a perfdb record.

proto3 JSON quirks handled here: lowerCamelCase or original snake_case names, int64 values
as strings, "Infinity"/"NaN" as strings, and absent fields meaning zero/unknown. Latencies
arrive in nanoseconds and are stored in microseconds, as the 2015 database did.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from perfdb.protocol.errors import bad_request

# summary field (both JSON spellings) -> (perfdb core metric, divisor: nanoseconds to microseconds)
_CORE_SUMMARY_FIELDS: dict[str, tuple[str, int]] = {}
for _camel, _snake, _metric, _divisor in (
    ("qps", "qps", "qps", 1),
    ("qpsPerServerCore", "qps_per_server_core", "qps_per_core", 1),
    ("latency50", "latency_50", "perc_lat_50", 1000),
    ("latency90", "latency_90", "perc_lat_90", 1000),
    ("latency95", "latency_95", "perc_lat_95", 1000),
    ("latency99", "latency_99", "perc_lat_99", 1000),
    ("latency999", "latency_999", "perc_lat_99_point_9", 1000),
    ("serverSystemTime", "server_system_time", "server_system_time", 1),
    ("serverUserTime", "server_user_time", "server_user_time", 1),
    ("clientSystemTime", "client_system_time", "client_system_time", 1),
    ("clientUserTime", "client_user_time", "client_user_time", 1),
):
    _CORE_SUMMARY_FIELDS[_camel] = _CORE_SUMMARY_FIELDS[_snake] = (_metric, _divisor)

# Summary fields that are times of day, not measurements.
_TIME_FIELDS = {"startTime": "start_time", "start_time": "start_time", "endTime": "end_time", "end_time": "end_time"}

# Scenario settings worth keeping beside the configs: (camelCase, snake_case) -> stored name.
_SCENARIO_FIELDS = (
    ("numClients", "num_clients"),
    ("numServers", "num_servers"),
    ("warmupSeconds", "warmup_seconds"),
    ("benchmarkSeconds", "benchmark_seconds"),
    ("spawnLocalWorkerCount", "spawn_local_worker_count"),
)
_RESULT_FIELDS = (
    ("serverCores", "server_cores"),
    ("clientSuccess", "client_success"),
    ("serverSuccess", "server_success"),
)
_MAX_LIST_ITEMS = 1024
_CORE_METRIC_NAMES = frozenset(metric for metric, _ in _CORE_SUMMARY_FIELDS.values())
_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


@dataclasses.dataclass(frozen=True, slots=True)
class MappedScenario:
    name: str | None
    metrics: dict[str, int | float]
    client_config: Any
    server_config: Any
    scenario: dict[str, Any]


def _pick(obj: dict[str, Any], camel: str, snake: str) -> Any:
    return obj[camel] if camel in obj else obj.get(snake)


def proto_number(value: Any) -> int | float | None:
    """A proto3 JSON number (possibly an int64 string); None when absent, non-finite or not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and 0 < len(value) <= 40:
        try:
            integer = int(value)
        except ValueError:
            pass
        else:
            # JSON readers (and the store) keep integers to 64 bits; larger ones become floats.
            return integer if _INT64_MIN <= integer <= _UINT64_MAX else float(integer)
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def map_scenario_result(result: Any) -> MappedScenario:
    """Map a ScenarioResult object; raises bad_request naming the scenario_result field at fault."""
    if not isinstance(result, dict):
        raise bad_request("scenario_result", "must be a gRPC ScenarioResult JSON object")
    summary = result.get("summary")
    if not isinstance(summary, dict):
        raise bad_request("scenario_result.summary", "is required and must be an object")

    metrics: dict[str, int | float] = {}
    scenario_meta: dict[str, Any] = {}
    for field, raw in summary.items():
        if field in _TIME_FIELDS:
            if isinstance(raw, str) and len(raw) <= 64:
                scenario_meta[_TIME_FIELDS[field]] = raw
            continue
        number = proto_number(raw)
        if number is None:
            continue  # "Infinity", "NaN" and non-numbers carry no measurement
        core = _CORE_SUMMARY_FIELDS.get(field)
        if core is None:
            # A custom metric keeps its name, unless that name is a core metric's: its unit
            # would be wrong (latencies in ns, not us).
            if field not in _CORE_METRIC_NAMES:
                metrics[field] = number
        else:
            metric, divisor = core
            metrics[metric] = number / divisor if divisor != 1 else number
    if not metrics:
        raise bad_request("scenario_result.summary", "holds no finite metric")

    scenario = result.get("scenario")
    if scenario is None:
        scenario = {}
    if not isinstance(scenario, dict):
        raise bad_request("scenario_result.scenario", "must be an object")
    name = scenario.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_request("scenario_result.scenario.name", "must be a string")
    for camel, snake in _SCENARIO_FIELDS:
        number = proto_number(_pick(scenario, camel, snake))
        if number is not None:
            scenario_meta[snake] = number
    for camel, snake in _RESULT_FIELDS:
        values = _pick(result, camel, snake)
        if isinstance(values, list) and len(values) <= _MAX_LIST_ITEMS:
            scenario_meta[snake] = [v for v in values if isinstance(v, (bool, int, float, str))]
    if name:
        scenario_meta["name"] = name

    client_config = _pick(scenario, "clientConfig", "client_config")
    server_config = _pick(scenario, "serverConfig", "server_config")
    return MappedScenario(
        name=name or None,
        metrics=metrics,
        client_config=client_config if client_config is not None else {},
        server_config=server_config if server_config is not None else {},
        scenario=scenario_meta,
    )
