"""The time charts' routes (user and test pages and their JSON API) against real perfdb servers:
the seeded one (two months, a few results a day) and the dense one (20,000 results of one test)."""

from __future__ import annotations

import gzip
import math
import random
from typing import Any

import numpy as np

from perfdb.records.timestamps import format_micros, parse_rfc3339
from perfdb.web.charts import GAP_BUCKETS, SIGNIFICANT_DIGITS, encode_line, rounded
from perfdb.web.pages import PAGE_CHART_POINTS
from tests.web.conftest import SeededPerfdb, dashboard_client
from tests.web.dense import (
    BIG_TEST,
    DENSE_USER,
    HIGHEST_QPS,
    LIGHT_TESTS,
    LOWEST_QPS,
    OTHER_USER,
    SPARSE_TEST,
    DensePerfdb,
)
from tests.web.seed import TESTS

NIGHTLY = "static:nightly-ci"
ADA = "108234567890123456789"
UNARY = "cpp_protobuf_async_unary_qps_unconstrained_insecure"


async def _json(client: Any, url: str, status: int = 200) -> Any:
    response = await client.get(url)
    assert response.status == status, (url, response.status, await response.text())
    assert response.content_type == "application/json"
    return await response.json()


def _line(data: dict[str, Any], test: str, metric: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [line for line in data["lines"] if (line["test"], line["metric"]) == (test, metric)]
    assert len(found) == 1, (test, metric)
    return found[0]


def _micros(record: dict[str, Any]) -> int:
    return int(record["record_id"][:14], 16)


def _check_buckets(line: dict[str, Any], records: list[dict[str, Any]], metric: str) -> None:
    """Each bucket of the line holds exactly the records whose time falls in it."""
    start, width = round(line["grid"][0] * 1e6), round(line["grid"][1] * 1e6)
    inside: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        inside.setdefault((_micros(record) - start) // width, []).append(record)
    rows = [row for row, count in enumerate(line["count"]) if count]
    assert [line["bucket"][row] for row in rows] == sorted(inside)
    for row in rows:
        members = inside[line["bucket"][row]]
        values = [record["metrics"][metric] for record in members]
        assert line["count"][row] == len(members)
        # Bucket statistics are rounded for drawing; a single result's value is exact.
        low, high = min(values), max(values)
        if len(members) > 1:
            low, high = float(f"{low:.{SIGNIFICANT_DIGITS}g}"), float(f"{high:.{SIGNIFICANT_DIGITS}g}")
        assert (line["min"][row], line["max"][row]) == (low, high)
        assert line["min"][row] <= line["median"][row] <= line["max"][row]
        assert line["record_id"][row] == (members[0]["record_id"] if len(members) == 1 else None)
        assert line["timestamp"][row] == (members[0]["timestamp"] if len(members) == 1 else None)


async def test_user_charts_are_downsampled_lines_per_test(seeded: SeededPerfdb) -> None:
    nightly = seeded.data.of_user(NIGHTLY)
    async with dashboard_client(seeded.address) as client:
        text = await (await client.get("/users/static:nightly-ci")).text()
        data = await _json(client, "/api/users/static:nightly-ci/series?points=400")
    assert f'data-api="/api/users/static%3Anightly-ci/series?points={PAGE_CHART_POINTS}"' in text
    assert "charts.js" in text
    assert data["user"] == {"name": "Nightly CI", "user_id": NIGHTLY}
    assert {test["name"]: test["count"] for test in data["tests"]} == dict.fromkeys(TESTS, 60)
    assert data["results"] == len(nightly) and data["complete"] is True
    # A line per test for QPS, and the first test's percentiles and CPU times.
    assert {(line["test"], line["metric"]) for line in data["lines"]} == {
        *((test, metric) for test in TESTS for metric in ("qps", "qps_per_core")),
        *((data["detail"], metric) for chart in data["charts"][2:] for metric in chart["metrics"]),
    }
    assert data["detail"] == data["tests"][0]["name"]
    for test in TESTS:
        line = _line(data, test, "qps")
        _check_buckets(line, [record for record in nightly if record["test_name"] == test], "qps")
        # One run a day is a line, not a row of dots: no break anywhere.
        assert None not in line["median"]
    assert [chart["id"] for chart in data["charts"]] == ["qps", "qps_per_core", "latency", "server_cpu", "client_cpu"]
    assert data["charts"][2]["axis"] == {"label": "ms", "divisor": 1000}  # p99.9 reaches milliseconds
    assert data["range"] == [_micros(nightly[0]) / 1e6, (_micros(nightly[-1]) + 1) / 1e6]


async def test_one_test_and_the_detail_test_follow_the_query(seeded: SeededPerfdb) -> None:
    ada = [record for record in seeded.data.of_user(ADA) if record["test_name"] == UNARY]
    async with dashboard_client(seeded.address) as client:
        one = await _json(client, f"/api/users/{ADA}/series?test={UNARY}")
        detail = await _json(client, f"/api/users/{NIGHTLY}/series?detail=go_generic_sync_streaming_ping_pong")
        ignored = await _json(client, f"/api/users/{NIGHTLY}/series?detail=no-such-test")
        junk = await _json(client, f"/api/users/{NIGHTLY}/series?points=junk", status=400)
        too_many = await _json(client, f"/api/users/{NIGHTLY}/series?points=5000", status=400)
        last_day = ada[-1]["timestamp"][:10]
        recent = await _json(client, f"/api/users/{ADA}/series?test={UNARY}&from={last_day}&to={last_day}")
    assert {line["metric"] for line in one["lines"]} == {metric for c in one["charts"] for metric in c["metrics"]}
    assert {line["test"] for line in one["lines"]} == {UNARY} and one["results"] == len(ada)
    assert len(one["tests"]) == 2  # the selector still offers every test of the user
    assert {line["test"] for line in detail["lines"] if line["metric"] == "perc_lat_99"} == {
        "go_generic_sync_streaming_ping_pong"
    }
    assert ignored["detail"] == ignored["tests"][0]["name"]
    assert (
        junk["error"]
        == too_many["error"]
        == {
            "code": "bad_query",
            "message": "points: must be a whole number from 50 to 2000",
            "retryable": False,
        }
    )
    [single] = [record for record in ada if record["timestamp"].startswith(last_day)]
    assert _line(recent, UNARY, "qps")["record_id"] == [single["record_id"]]
    assert recent["range"][0] == parse_rfc3339(f"{last_day}T00:00:00Z") / 1e6


async def test_a_dense_test_keeps_its_extremes_breaks_at_the_pause_and_stays_small(dense_perfdb: DensePerfdb) -> None:
    big = dense_perfdb.of(DENSE_USER, BIG_TEST)
    async with dashboard_client(dense_perfdb.address) as client:
        page = await client.get(f"/users/{DENSE_USER}", headers={"Accept-Encoding": "gzip"})
        api = await client.get(f"/api/users/{DENSE_USER}/series?points=700", headers={"Accept-Encoding": "gzip"})
        data = await api.json()
        body = await api.read()
        page_body = await page.read()
    # Sent compressed; page and charts' data together stay far below a megabyte.
    assert api.headers["Content-Encoding"] == "gzip"
    assert len(page_body) + len(gzip.compress(body)) < 300_000
    line = _line(data, BIG_TEST, "qps")
    assert line["results"] == len(big) == 20_000 and len(line["bucket"]) <= 700
    _check_buckets(line, big, "qps")
    # The dip and the spike among 20,000 results survive, and name their results.
    assert min(value for value in line["min"] if value is not None) == LOWEST_QPS
    assert max(value for value in line["max"] if value is not None) == HIGHEST_QPS
    assert line["lowest"]["record_id"] == dense_perfdb.lowest_id
    assert line["highest"]["record_id"] == dense_perfdb.highest_id
    # Five days without a run: the line breaks there (one null row), and nowhere else.
    breaks = [row for row, median in enumerate(line["median"]) if median is None]
    assert len(breaks) == 1
    [row] = breaks
    start, width = line["grid"]
    pause_start = start + line["bucket"][row] * width
    assert line["bucket"][row + 1] - line["bucket"][row - 1] > GAP_BUCKETS
    assert max(_micros(r) for r in big if _micros(r) / 1e6 < pause_start) / 1e6 < pause_start
    # A test of five results: five single buckets, each naming its result.
    sparse = _line(data, SPARSE_TEST, "qps")
    assert sparse["record_id"] == [record["record_id"] for record in dense_perfdb.of(DENSE_USER, SPARSE_TEST)]
    assert sparse["count"] == [1] * 5
    assert {line["test"] for line in data["lines"]} == {BIG_TEST, SPARSE_TEST, *LIGHT_TESTS}


async def test_zooming_in_loads_a_finer_grid_of_the_range(dense_perfdb: DensePerfdb) -> None:
    big = dense_perfdb.of(DENSE_USER, BIG_TEST)
    since, until = _micros(big[5000]), _micros(big[5400])
    window = [record for record in big if since <= _micros(record) < until]
    async with dashboard_client(dense_perfdb.address) as client:
        whole = await _json(client, f"/api/users/{DENSE_USER}/series?test={BIG_TEST}&points=300")
        zoomed = await _json(
            client,
            f"/api/users/{DENSE_USER}/series?test={BIG_TEST}&points=300"
            f"&from={format_micros(since)}&to={format_micros(until)}",
        )
    coarse, fine = _line(whole, BIG_TEST, "qps"), _line(zoomed, BIG_TEST, "qps")
    assert fine["grid"][1] < coarse["grid"][1] / 20
    assert zoomed["range"] == [since / 1e6, until / 1e6]
    assert fine["results"] == len(window) == zoomed["results"]
    _check_buckets(fine, window, "qps")


async def test_a_test_across_users_has_its_own_page(dense_perfdb: DensePerfdb) -> None:
    everyone = dense_perfdb.of(test_name=BIG_TEST)
    async with dashboard_client(dense_perfdb.address) as client:
        page = await client.get(f"/tests/{BIG_TEST}")
        text = await page.text()
        data = await _json(client, f"/api/tests/{BIG_TEST}/series?tag=burst")
        missing = await _json(client, "/api/tests/no-such-test/series", status=404)
        result = await (await client.get(f"/results/{dense_perfdb.lowest_id}")).text()
    assert page.status == 200 and f'data-api="/api/tests/{BIG_TEST}/series?points={PAGE_CHART_POINTS}"' in text
    assert {line["test"] for line in data["lines"]} == {BIG_TEST}
    assert data["results"] == len(everyone) == 22_000
    qps = _line(data, BIG_TEST, "qps")
    assert qps["results"] == len(everyone) and qps["lowest"]["record_id"] == dense_perfdb.lowest_id
    assert data["links"]["table"] == f"/?test={BIG_TEST}&tag=burst"
    assert missing["error"]["code"] == "not_found"
    assert f'href="/tests/{BIG_TEST}" id="test-chart-link"' in result
    assert OTHER_USER in {record["user_id"] for record in everyone}


def _reply(points: list[tuple[int, int]], value: float = 1.0) -> dict[str, Any]:
    """A series reply (as columns) holding buckets (index, count) of one value."""
    single = [count == 1 for _, count in points]
    return {
        "since": "2026-01-01T00:00:00Z",
        "bucket_micros": 1_000_000,
        "series": {
            "qps": {
                "count": sum(count for _, count in points),
                "min": None,
                "max": None,
                "exact_medians": True,
                "columns": {
                    "bucket": [bucket for bucket, _ in points],
                    "count": [count for _, count in points],
                    **{name: [value] * len(points) for name in ("min", "median", "max", "mean")},
                    "record_id": [
                        f"{bucket:020x}" if alone else None for (bucket, _), alone in zip(points, single, strict=True)
                    ],
                    "timestamp": ["2026-01-01T00:00:00Z" if alone else None for alone in single],
                },
            }
        },
    }


def test_bucket_statistics_are_rounded_as_text_would_round_them() -> None:
    chooser = random.Random(5)
    # Where the powers of ten are exact doubles (up to 1e22): exactly as the text rounds.
    values = [chooser.choice((-1, 1)) * chooser.uniform(1, 10) * 10 ** chooser.randint(-17, 20) for _ in range(20_000)]
    values += [0.0, -0.0, 1.0, -2.5, 99_999.5, 123_456_789.0, 1e-5]
    assert rounded(np.array(values)).tolist() == [float(f"{value:.{SIGNIFICANT_DIGITS}g}") for value in values]
    # Beyond, within a unit in the last place or so.
    wide = [chooser.uniform(-1, 1) * 10 ** chooser.randint(-300, 307) for _ in range(20_000)]
    wide += [1.234567e-250, 1.7e308, -1.7976931348623157e308]
    text = np.array([float(f"{value:.{SIGNIFICANT_DIGITS}g}") for value in wide])
    assert np.allclose(rounded(np.array(wide)), text, rtol=4e-16, atol=0)
    # Beyond what a scaling by a finite power of ten reaches, and what is no number: as they are.
    odd = np.array([5e-324, 1.234567e-310, math.inf, -math.inf, math.nan])
    assert np.array_equal(rounded(odd), odd, equal_nan=True)
    # Any shape: a chart line's min, median and max rows at once.
    rows = np.array([[1.234567, 2.345678], [1234567.0, math.inf]])
    assert rounded(rows).tolist() == [[1.2346, 2.3457], [1234600.0, math.inf]]


def test_a_single_results_value_is_sent_as_perfdb_gave_it() -> None:
    # A bucket of one result, then one of three, of a whole number too big for five digits.
    line = encode_line("t", "qps", _reply([(0, 1), (10, 3)], value=1_234_567))
    assert [type(value) for value in line["median"]] == [int, float]
    assert [line[name][0] for name in ("min", "median", "max")] == [1_234_567] * 3
    assert [line[name][1] for name in ("min", "median", "max")] == [1_234_600.0] * 3


def test_a_line_breaks_only_across_a_long_pause() -> None:
    # Buckets every 10 (a daily run at this grain): spans of 10, 20 or 30 are its rhythm.
    steady = encode_line("t", "qps", _reply([(0, 2), (10, 2), (20, 1), (40, 3), (50, 2)]))
    assert None not in steady["median"]
    # A pause of more than four times the usual spacing breaks it, with a null row after the last point.
    paused = encode_line("t", "qps", _reply([(0, 2), (10, 2), (20, 1), (30, 3), (200, 2), (210, 2)]))
    assert paused["bucket"] == [0, 10, 20, 30, 31, 200, 210]
    assert paused["median"] == [1.0, 1.0, 1.0, 1.0, None, 1.0, 1.0]
    assert paused["count"][4] == 0 and paused["record_id"] == [None, None, f"{20:020x}", None, None, None, None]
    # Dense buckets: more than GAP_BUCKETS empty ones already count as a pause.
    dense = encode_line("t", "qps", _reply([(0, 5), (1, 5), (2, 5), (3, 5), (3 + GAP_BUCKETS + 1, 5)]))
    assert None not in dense["median"]
    dense = encode_line("t", "qps", _reply([(0, 5), (1, 5), (2, 5), (3, 5), (3 + GAP_BUCKETS + 2, 5)]))
    assert dense["median"].count(None) == 1
    assert encode_line("t", "qps", _reply([(7, 1)]))["grid"] == [parse_rfc3339("2026-01-01T00:00:00Z") / 1e6, 1.0]
