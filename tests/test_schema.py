"""Validation and privacy scrubbing of requests, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from perfdb.protocol.errors import PerfdbError
from perfdb.records.schema import (
    IP_REPLACEMENT,
    MAX_CONFIG_BYTES,
    MAX_SYS_INFO_BYTES,
    parse_query,
    parse_record,
    remove_host_fields,
    scrub_ips,
)
from perfdb.records.timestamps import format_micros, parse_rfc3339


def record(**fields: Any) -> dict[str, Any]:
    return {"op": "record", "access_token": "tok", "test_name": "t", "metrics": {"qps": 1}, **fields}


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("addr 192.168.1.20 up", "addr [redacted] up"),
        ("v6 2001:db8:0:0:1::5 and ::1.", "v6 [redacted] and [redacted]."),
        ("link fe80::a00:27ff:fe4e:66a1%eth0 here", "link [redacted] here"),
        ("time 16:19:53 date 2024-02-16", "time 16:19:53 date 2024-02-16"),
        ("version 1.2.3.4.5 and 999.1.1.1", "version 1.2.3.4.5 and 999.1.1.1"),
        ("mac 00:1a:2b:3c:4d:5e", "mac 00:1a:2b:3c:4d:5e"),
        ("10.0.0.1:8080", "[redacted]:8080"),
    ],
)
def test_ip_addresses_are_scrubbed_from_strings(text: str, kept: str) -> None:
    assert scrub_ips(text) == kept.replace("[redacted]", IP_REPLACEMENT)


def test_ip_addresses_are_scrubbed_throughout_objects() -> None:
    info = {"hosts": ["10.0.0.1", {"inner": "gw 172.16.0.1"}], "10.9.9.9": 1, "cores": 8}
    assert scrub_ips(info) == {
        "hosts": [IP_REPLACEMENT, {"inner": f"gw {IP_REPLACEMENT}"}],
        IP_REPLACEMENT: 1,
        "cores": 8,
    }


def test_host_fields_are_removed_at_any_depth() -> None:
    config = {"host": "a", "server_targets": ["b"], "inner": {"serverTargets": [], "keep": [{"host": 1, "x": 2}]}}
    assert remove_host_fields(config) == {"inner": {"keep": [{"x": 2}]}}


def test_parse_record_returns_token_and_scrubbed_draft() -> None:
    token, draft = parse_record(record(sys_info="ip 10.1.1.1", client_config={"host": "h"}, tag="nightly"))
    assert token == "tok"
    assert draft.sys_info == f"ip {IP_REPLACEMENT}"
    assert draft.client_config == {}
    assert (draft.test_name, draft.tag, draft.request_id) == ("t", "nightly", None)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"access_token": 5}, "access_token"),
        ({"access_token": ""}, "access_token"),
        ({"access_token": "é"}, "access_token"),
        ({"test_name": "a\nb"}, "test_name"),
        ({"test_name": "x" * 300}, "test_name"),
        ({"sys_info": "x" * (MAX_SYS_INFO_BYTES + 1)}, "sys_info"),
        ({"sys_info": {"x": "y" * MAX_SYS_INFO_BYTES}}, "sys_info"),
        ({"client_config": {"x": "y" * MAX_CONFIG_BYTES}}, "client_config"),
        ({"metrics": {f"m{n}": n for n in range(300)}}, "metrics"),
        ({"metrics": {"m" * 200: 1}}, "metrics"),
        ({"metrics": {"qps": float("nan")}}, "metrics.qps"),
        ({"metrics": {"qps": None}}, "metrics.qps"),
        ({"metrics": {"qps": 1}, "scenario_result": {"summary": {"qps": 1}}}, "metrics"),
    ],
)
def test_parse_record_refusals_name_the_field(request_fields: dict[str, Any], field: str) -> None:
    with pytest.raises(PerfdbError) as caught:
        parse_record(record(**request_fields))
    assert caught.value.code.value == "bad_request"
    assert caught.value.message.startswith(field)


def test_access_token_is_never_quoted_in_errors() -> None:
    secret = "ya29.secret-token-é-value"
    with pytest.raises(PerfdbError) as caught:
        parse_record(record(access_token=secret))
    assert secret not in caught.value.message
    assert "secret" not in caught.value.message


def test_parse_query_defaults_and_bounds() -> None:
    query = parse_query({"op": "get_all"}, with_user=False, default_limit=100, max_limit=500)
    assert (query.limit, query.user_id, query.since, query.until, query.cursor) == (100, None, None, None, None)
    ranged = parse_query(
        {"op": "get_user", "user_id": "u", "since": "2026-01-01T00:00:00+01:00", "until": "2026-01-02T00:00:00Z"},
        with_user=True,
        default_limit=100,
        max_limit=500,
    )
    assert ranged.since == parse_rfc3339("2025-12-31T23:00:00Z")
    with pytest.raises(PerfdbError):
        parse_query({"op": "get_all", "limit": 501}, with_user=False, default_limit=100, max_limit=500)


def test_timestamps_round_trip_with_microseconds() -> None:
    micros = 1_764_403_200_123_456
    text = format_micros(micros)
    assert text == "2025-11-29T08:00:00.123456Z"
    assert parse_rfc3339(text) == micros
    for bad in ("2025-11-29", "2025-11-29T08:00:00", "nonsense", "1969-12-31T23:59:59Z"):
        with pytest.raises(ValueError, match=r"."):
            parse_rfc3339(bad)


def test_wrong_but_falsy_config_types_are_refused() -> None:
    wrong: list[Any] = ["", 0, False, []]
    for value in wrong:
        with pytest.raises(PerfdbError, match=r"^client_config"):
            parse_record(record(client_config=value))
    _, draft = parse_record(record(client_config=None))
    assert draft.client_config == {}


def test_null_limit_means_the_default() -> None:
    query = parse_query({"op": "get_all", "limit": None}, with_user=False, default_limit=100, max_limit=500)
    assert query.limit == 100


def test_ipv4_mapped_ipv6_is_scrubbed_whole() -> None:
    assert scrub_ips("a ::ffff:10.1.2.3 b") == f"a {IP_REPLACEMENT} b"


@pytest.mark.parametrize(
    "text", ["2026-01-31T12:00Z", "20260131T120000Z", "2026-01-31T12:00:00+0100", "2026-W05-1T00:00:00Z"]
)
def test_timestamps_that_are_not_rfc3339_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_rfc3339(text)


def test_rfc3339_lower_case_nanoseconds_and_leap_seconds() -> None:
    assert format_micros(parse_rfc3339("2026-01-31t12:00:00.1234567z")) == "2026-01-31T12:00:00.123456Z"
    assert format_micros(parse_rfc3339("2016-12-31T23:59:60Z")) == "2016-12-31T23:59:59.999999Z"
