"""The typed fast path (msgspec Structs) against the full record checks, over many generated
requests, valid and invalid: wherever the fast path gives a result, the full checks give the same
result; wherever it declines, parse_record gives what the full checks give, error and all."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfdb.importers import import_file
from perfdb.protocol.errors import PerfdbError
from perfdb.records.scenario import map_scenario_result
from perfdb.records.schema import (
    BATCH_RECORD_FIELDS,
    MAX_ACCESS_TOKEN_CHARS,
    MAX_CONFIG_BYTES,
    MAX_METRIC_NAME_CHARS,
    MAX_METRICS,
    MAX_NAME_CHARS,
    MAX_NESTING,
    MAX_REQUEST_ID_CHARS,
    MAX_SYS_INFO_BYTES,
    RECORD_BATCH_FIELDS,
    RECORD_FIELDS,
    RecordDraft,
    _RecordFields,
    _RecordRequest,
    access_token,
    check_fields,
    parse_record,
    parse_record_batch,
    record_draft,
    typed_record,
    typed_record_draft,
)
from tests.support import FIXTURES, GRPC_RESULT_FILES, grpc_result

Outcome = tuple[str, RecordDraft] | tuple[str, str]  # (token, draft) or (error code, message)


def full_checks(request: dict[str, Any]) -> Outcome:
    """parse_record without the fast path: the checks whose errors are the wire contract."""
    try:
        check_fields(request, RECORD_FIELDS)
        return access_token(request), record_draft(request)
    except PerfdbError as error:
        return error.code.value, error.message


def parsed(request: dict[str, Any]) -> Outcome:
    try:
        return parse_record(request)
    except PerfdbError as error:
        return error.code.value, error.message


def over_the_wire(request: dict[str, Any]) -> dict[str, Any]:
    """The request as the server gets it: encoded, then decoded by orjson."""
    decoded: dict[str, Any] = orjson.loads(orjson.dumps(request))
    return decoded


class Tally:
    def __init__(self) -> None:
        self.fast = self.declined = self.refused = 0


def check_agreement(request: dict[str, Any], tally: Tally) -> None:
    """The fast path gives the full checks' result or declines, for a record and for a batch's record."""
    expected = full_checks(request)
    fast = typed_record(request)
    refused = not isinstance(expected[1], RecordDraft)
    if fast is not None:
        assert not refused, f"the fast path accepted what the checks refuse ({expected}): {request!r:.300}"
        assert fast == expected
        tally.fast += 1
    elif refused:
        tally.refused += 1
    else:
        tally.declined += 1
    assert parsed(request) == expected
    # The same fields as one of a record_batch's records (no envelope, no token).
    fields = {name: value for name, value in request.items() if name not in ("op", "id", "access_token")}
    try:
        check_fields(fields, BATCH_RECORD_FIELDS)
        batch_expected: RecordDraft | None = record_draft(fields)
    except PerfdbError:
        batch_expected = None
    batch_fast = typed_record_draft(fields)
    if batch_fast is not None:
        assert batch_fast == batch_expected


# -- valid requests: the benchmark workload, the importers' output on real tool files, gRPC results --


def importer_requests(per_file: int) -> list[dict[str, Any]]:
    requests = []
    for path in sorted((FIXTURES / "tools").glob("*/*")):
        if path.parent.name == "sources" or path.suffix not in (".json", ".txt"):
            continue
        _, records = import_file(path.read_bytes(), str(path))
        requests += [{"op": "record", "access_token": "tok", **fields} for fields in records[:per_file]]
    return requests


def grpc_requests() -> list[dict[str, Any]]:
    """Each gRPC result twice: as sent (scenario_result: never the fast path) and as metrics with
    the scenario's own configurations (host fields and server targets with addresses included)."""
    requests = []
    for name in GRPC_RESULT_FILES:
        result = grpc_result(name)
        mapped = map_scenario_result(result)
        scenario = result["scenario"]
        requests.append({"op": "record", "access_token": "tok", "tag": "grpc", "scenario_result": result})
        requests.append(
            {
                "op": "record",
                "id": name,
                "access_token": "tok",
                "test_name": mapped.name or "grpc",
                "metrics": mapped.metrics,
                "client_config": scenario.get("clientConfig") | {"serverTargets": ["10.0.0.2:10010"]},
                "server_config": scenario.get("serverConfig") | {"host": "bench-2"},
                "sys_info": {"host_ip": "192.168.7.20", "kernel": "6.1.0", "cores": 12},
            }
        )
    return requests


SIDES = ("server", "client")


def workload_request(index: int) -> dict[str, Any]:
    """A record shaped like the load benchmark's (benchmarks/workload.py): 11 core metrics, configs, sys_info."""
    rng = random.Random(index)
    qps, p50 = round(rng.uniform(5_000, 250_000), 1), round(rng.uniform(100, 30_000), 2)
    latencies = {"perc_lat_50": p50, "perc_lat_90": p50 * 1.4, "perc_lat_95": p50 * 1.6, "perc_lat_99": p50 * 1.9}
    times = {f"{side}_{kind}_time": rng.uniform(50, 600) for side in SIDES for kind in ("system", "user")}
    return {
        "op": "record",
        "access_token": f"bench-token-{index % 300:04d}-{'x' * 24}",
        "request_id": f"bench-{index:09d}",
        "test_name": f"cpp_async_unary_qps_{index % 7}",
        "tag": "bench",
        "sys_info": {"cpu": "Intel Xeon 2.20GHz", "cores": 12, "os": "Debian 12"},
        "metrics": {"qps": qps, "qps_per_core": qps / 12, **latencies, "perc_lat_99_point_9": p50 * 2.4, **times},
        "client_config": {"client_type": "ASYNC_CLIENT", "outstanding_rpcs_per_channel": 100, "client_channels": 64},
        "server_config": {"server_type": "ASYNC_SERVER", "threads_per_cq": 3},
    }


WORKLOAD = [workload_request(index) for index in range(20)]
HANDWRITTEN = [
    {"op": "record", "access_token": "tok", "test_name": "t", "metrics": {"qps": 1}},
    {
        "op": "record",
        "id": "u1",
        "access_token": "ci-secret-token-0123456789",
        "test_name": "BM_StringCopy/512",
        "metrics": {"real_time": 126.6, "cpu_time": 46.4, "bytes_per_second": 11032809135.1, "iterations": 294687},
        "units": {"real_time": "ns", "cpu_time": "ns", "bytes_per_second": "B/s", "iterations": "1"},
        "better": {"real_time": "lower", "cpu_time": "lower", "bytes_per_second": "higher"},
        "baseline_tag": "main",
        "run_time": "2026-12-07T16:55:38+00:00",
        "source": {
            "commit": "06ecda3be7692cd2ac877520cfa2cb212fb99b2c",
            "branch": "main",
            "commit_time": "2026-12-07T16:50:02+01:00",
        },
        "samples": {"real_time": [120.1, 126.6, 133.9]},
        "sys_info": "Linux bench-1 10.128.0.7 6.1.0",
        "request_id": "run-7",
    },
]
VALID = [*WORKLOAD, *importer_requests(per_file=5), *grpc_requests(), *HANDWRITTEN]
# Every field's pool is tried on a request of each kind: the workload's, each tool's, gRPC's, by hand.
MUTATED = [WORKLOAD[0], *importer_requests(per_file=1), *grpc_requests(), *HANDWRITTEN]


# -- what the mutations put in a field ------------------------------------------------------------


def nested(depth: int, leaf: Any = 1) -> Any:
    """An object `depth` levels deep (the object itself counting as the first)."""
    value = leaf
    for _ in range(depth):
        value = {"n": value}
    return value


def texts(limit: int) -> list[Any]:
    """Strings around a field's bounds: lengths, whitespace, control and non-ASCII characters."""
    return [
        "",
        " ",
        "\t",
        "\u2003",
        "a\u2003",
        "\u0085",
        "\u00a0x",
        "x\x7f",
        "a\nb",
        "a\x00",
        "a\x1fb",
        "é",
        "🙂",
        "ok name",
        "x" * limit,
        "x" * (limit + 1),
        "é" * limit,
        "é" * (limit + 1),
        "🙂" * limit,
        "🙂" * (limit + 1),
        " " * limit,
        "a" + "\u2003" * (limit - 1),
    ]


METRIC_VALUES: tuple[Any, ...] = (
    0,
    -1,
    1.5,
    True,
    False,
    None,
    "1",
    [1],
    {},
    2**64 - 1,
    -(2**63),
    1e308,
    -1e308,
    5e-324,
)
ANY_JSON: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    2**63,
    2**64 - 1,
    -(2**63),
    1e308,
    5e-324,
    "",
    "s",
    [],
    [1],
    {},
    {"a": 1},
]

FIELD_VALUES: dict[str, list[Any]] = {
    "access_token": [
        "t",
        " ",
        "tok en",
        "~",
        "x" * MAX_ACCESS_TOKEN_CHARS,
        "x" * (MAX_ACCESS_TOKEN_CHARS + 1),
        "é",
        "\x7f",
        "a\x1f",
        "\u00a0",
        "a\tb",
    ],
    "test_name": texts(MAX_NAME_CHARS),
    "tag": texts(MAX_NAME_CHARS),
    "baseline_tag": texts(MAX_NAME_CHARS),
    "request_id": texts(MAX_REQUEST_ID_CHARS),
    "metrics": [{"qps": value} for value in METRIC_VALUES]
    + [
        {name: 1}
        for name in (
            "",
            "1a",
            "a b",
            "a" * MAX_METRIC_NAME_CHARS,
            "a" * (MAX_METRIC_NAME_CHARS + 1),
            "é",
            "_x",
            "a.b-c",
            "a/b",
            "ok\n",
        )
    ]
    + [
        {f"m{n}": n for n in range(MAX_METRICS)},
        {f"m{n}": n for n in range(MAX_METRICS + 1)},
        {"qps": 1, "qps_per_core": 2.5, "perc_lat_99": 3},
    ],
    "sys_info": [
        "ip 10.1.1.1 up",
        "16:19:53",
        "x" * MAX_SYS_INFO_BYTES,
        "x" * (MAX_SYS_INFO_BYTES + 1),
        "10.0.0.1 " + "x" * (MAX_SYS_INFO_BYTES - 10),
        "é" * (MAX_SYS_INFO_BYTES // 2 + 1),
        {"ip": "10.0.0.1"},
        {"10.0.0.1": 1},
        {"v6": "fe80::1%eth0", "list": ["::1", "2001:db8::5"]},
        {"cpu": "Intel Xeon 2.20GHz", "cores": 12},
        {"os": "Linux 6.1.0-13"},
        nested(MAX_NESTING),
        nested(MAX_NESTING + 1),
        nested(MAX_NESTING, "10.1.2.3"),
        {"x": "y" * (MAX_SYS_INFO_BYTES - 8)},
        {"x": "y" * (MAX_SYS_INFO_BYTES - 7)},
        {"x": "10.0.0.1" + "y" * (MAX_SYS_INFO_BYTES - 16)},
    ],
    "client_config": [
        {"host": "h"},
        {"a": {"server_targets": ["10.0.0.1:1"]}},
        {"serverTargets": []},
        {"hostname": "kept"},
        {"x": "y" * (MAX_CONFIG_BYTES - 8)},
        {"x": "y" * (MAX_CONFIG_BYTES - 7)},
        nested(MAX_NESTING),
        nested(MAX_NESTING + 1),
        [{"host": 1}],
        "",
        0,
        False,
        {"list": [{"host": "h", "keep": 1}], "nested": nested(MAX_NESTING - 3, {"host": 1})},
    ],
    "better": [{"qps": "higher"}, {"nope": "lower"}, {"qps": "up"}, {"custom": "lower"}],
    "units": [
        {"qps": "ops/s"},
        {"qps": "ns"},
        {"x": "ns"},
        {"qps": "fortnights"},
        {"custom": "B/op"},
        {"real_time": "ns"},
    ],
    "run_time": ["2026-12-07T16:55:38+00:00", "2026-12-07 16:55:38", "9999-01-01T00:00:00Z", "2026-01-31t12:00:00z"],
    "source": [
        {"commit": "abc"},
        {"sha": "x"},
        {"commit_time": "bad"},
        {"commit_time": "2026-12-07T16:50:02+01:00"},
        {"branch": ""},
        {"commit": "x" * 257},
        {"repository": "a\nb"},
    ],
    "samples": [
        {"qps": [1, 2.5]},
        {"qps": []},
        {"bad name": [1]},
        {"qps": [1, "2"]},
        {"qps": [True]},
        {"x": list(range(10_001))},
        {"custom": [1e308, -1]},
        {"qps": [None]},
    ],
}
FIELD_VALUES["server_config"] = FIELD_VALUES["client_config"]
EXTRA_FIELDS: list[dict[str, Any]] = [
    {"extra": 1},
    {"Test_name": "x"},
    {"scenario_result": {"summary": {"qps": 1}}},
    {"scenario_result": None},
    {"custom": 1},  # not a field: a metric's name at the top level
]


def mutations(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request with one field removed, or set to each value of its pool and of ANY_JSON."""
    mutated = []
    for field in sorted(RECORD_FIELDS - {"op", "id", "scenario_result"}):
        without = {name: value for name, value in request.items() if name != field}
        mutated.append(without)
        for value in FIELD_VALUES.get(field, []) + ANY_JSON:
            mutated.append({**without, field: value})
    mutated += [{**request, **extra} for extra in EXTRA_FIELDS]
    return mutated


# -- the tests ----------------------------------------------------------------------------------


def test_the_structs_declare_exactly_the_record_fields() -> None:
    """A field the Structs declare but the protocol does not would let the fast path take an unknown field."""
    assert set(_RecordRequest.__struct_fields__) == RECORD_FIELDS - {"scenario_result"}
    assert set(_RecordFields.__struct_fields__) == BATCH_RECORD_FIELDS - {"scenario_result"}


def test_every_valid_request_without_a_scenario_result_takes_the_fast_path() -> None:
    tally = Tally()
    for request in map(over_the_wire, VALID):
        check_agreement(request, tally)
        if "scenario_result" in request:
            assert typed_record(request) is None
        else:
            assert typed_record(request) is not None, f"declined: {request!r:.300}"
    assert tally.refused == 0
    assert tally.fast == sum("scenario_result" not in request for request in VALID)


def test_single_mutations_of_valid_requests_agree_with_the_full_checks() -> None:
    tally = Tally()
    for base in MUTATED:
        for request in mutations(base):
            check_agreement(over_the_wire(request), tally)
    # Both kinds of outcome were exercised in numbers: the comparison is not vacuous.
    assert tally.fast > 1000
    assert tally.refused > 1000


def test_random_combinations_of_mutations_agree_with_the_full_checks() -> None:
    rng = random.Random(2026)
    pool = [(field, value) for field, values in FIELD_VALUES.items() for value in values]
    tally = Tally()
    for _ in range(3000):
        request = dict(rng.choice(VALID))
        for field, value in rng.sample(pool, rng.randint(2, 4)):
            request[field] = value
        if rng.random() < 0.2:
            del request[rng.choice(sorted(request))]
        check_agreement(over_the_wire(request), tally)
    assert tally.fast > 100
    assert tally.refused > 100


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(
    base=st.sampled_from(VALID),
    changes=st.dictionaries(st.sampled_from([*sorted(RECORD_FIELDS - {"op"}), "other"]), JSON_VALUES, max_size=3),
)
def test_arbitrary_json_in_any_field_agrees_with_the_full_checks(base: dict[str, Any], changes: dict[str, Any]) -> None:
    check_agreement(over_the_wire({**base, **changes}), Tally())


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_numbers_json_cannot_carry_are_refused_by_name_from_python_callers_too(number: float) -> None:
    request = {"op": "record", "access_token": "t", "test_name": "t", "metrics": {"qps": 1, "p99": number}}
    assert typed_record(request) is None
    assert parsed(request) == ("bad_request", "metrics.p99: must be a finite number")


def test_addresses_are_scrubbed_by_the_fast_path_every_time_not_only_the_first() -> None:
    request = over_the_wire({"op": "record", "access_token": "t", "test_name": "t", "metrics": {"qps": 1}})
    clean = typed_record({**request, "sys_info": {"cpu": "Xeon 2.20GHz", "cores": 4}})
    for _ in range(2):  # the second time, the clean sys_info is one the server has seen
        assert clean is not None and clean[1].sys_info == {"cpu": "Xeon 2.20GHz", "cores": 4}
        clean = typed_record({**request, "sys_info": {"cpu": "Xeon 2.20GHz", "cores": 4}})
        with_address = typed_record({**request, "sys_info": {"cpu": "Xeon 2.20GHz", "ip": "10.1.2.3"}})
        assert with_address is not None and with_address[1].sys_info == {"cpu": "Xeon 2.20GHz", "ip": "[redacted]"}


def test_a_batch_keeps_each_records_own_error_and_order() -> None:
    good = {"test_name": "t", "metrics": {"qps": 1}}
    request = over_the_wire(
        {
            "op": "record_batch",
            "access_token": "tok",
            "records": [good, {**good, "metrics": {"bad name": 1}}, {**good, "tag": "x" * 300}, good, 5],
        }
    )
    assert set(request) <= RECORD_BATCH_FIELDS
    token, drafts = parse_record_batch(request)
    assert token == "tok"
    outcomes = [
        draft.test_name if isinstance(draft, RecordDraft) else (draft.code.value, draft.message) for draft in drafts
    ]
    assert outcomes == [
        "t",
        ("bad_request", "metrics.'bad name': metric names are 1-128 characters of letters, digits, '_', '.', '-'"),
        ("bad_request", "tag: longer than 256 characters"),
        "t",
        ("bad_request", "record: must be an object, got number"),
    ]
