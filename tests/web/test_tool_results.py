"""Results with units, a source, a run time and samples, through the dashboard in-process: the
result page and its API, hostile source fields shown as text, and the chart data of a test with
only its own metrics."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from perfdb.client import Client
from tests.support import static_token_server
from tests.web.conftest import dashboard_client

TOKEN = "tool-results-" + secrets.token_hex(16)
HOSTILE = '<img src=x onerror="window.hacked=1">'


@dataclasses.dataclass(frozen=True)
class ToolRecords:
    address: str
    hostile_id: str  # a source whose every field is HTML, and a repository that is no web address
    plain_id: str  # no source, run time nor samples
    latency_id: str  # samples of a core metric


@pytest.fixture(scope="module")
def tool_records(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolRecords]:
    directory: Path = tmp_path_factory.mktemp("perfdb-tool-results")
    with static_token_server(directory, TOKEN, "tool-bot") as address:
        with Client(address) as client:
            hostile = client.record(
                access_token=TOKEN,
                test_name="BM_Parse",
                metrics={"real_time": 2_500_000.0, "allocations": 12},
                units={"real_time": "ns", "allocations": "allocs/op", "wall": "ms"},
                samples={"wall": [2.4, 2.5, 2.6, 2.7]},
                run_time="2026-01-02T03:04:05Z",
                source={"commit": HOSTILE, "branch": HOSTILE, "repository": "javascript:alert(1)"},
            )["record_id"]
            plain = client.record(access_token=TOKEN, test_name="BM_Parse", metrics={"real_time": 900.0})["record_id"]
            latency = client.record(
                access_token=TOKEN,
                test_name="grpc_unary",
                metrics={"qps": 1000.0, "perc_lat_50": 950.0},
                samples={"perc_lat_50": [900.0, 950.0, 1200.0]},
            )["record_id"]
        yield ToolRecords(address, hostile, plain, latency)


async def test_source_fields_are_text_and_only_a_web_repository_is_linked(tool_records: ToolRecords) -> None:
    async with dashboard_client(tool_records.address) as client:
        response = await client.get(f"/results/{tool_records.hostile_id}")
        assert response.status == 200
        html = await response.text()
    assert HOSTILE not in html and "&lt;img src=x" in html
    assert 'id="source-commit-link"' not in html and 'href="javascript:' not in html
    assert 'data-field="repository">javascript:alert(1)<' in html
    assert 'id="run-time"' in html and 'datetime="2026-01-02T03:04:05.000000Z"' in html
    # Values in their units: 2,500,000 ns reads as ms; a tool's own counter keeps its unit.
    assert ">2.5 ms<" in html and ">12 allocs/op<" in html
    # The samples' series has the unit the record gives it, one scale for all its numbers.
    assert 'data-series="wall"' in html and "in ms" in html
    assert 'data-stat="median" data-value="2.55"' in html and ">2.55 ms<" in html


async def test_a_result_without_source_or_samples_shows_neither(tool_records: ToolRecords) -> None:
    async with dashboard_client(tool_records.address) as client:
        html = await (await client.get(f"/results/{tool_records.plain_id}")).text()
        api = await (await client.get(f"/api/results/{tool_records.plain_id}")).json()
    assert 'id="source"' not in html and 'id="distributions"' not in html and 'id="run-time"' not in html
    assert "samples" not in api["record"]
    assert ">900 ns<" not in html  # no unit given: a plain number, not a guess
    assert ">900<" in html


async def test_samples_of_a_core_metric_are_in_its_fixed_unit_and_in_the_api(tool_records: ToolRecords) -> None:
    async with dashboard_client(tool_records.address) as client:
        html = await (await client.get(f"/results/{tool_records.latency_id}")).text()
        api = await (await client.get(f"/api/results/{tool_records.latency_id}")).json()
    assert api["record"]["samples"] == {"perc_lat_50": [900.0, 950.0, 1200.0]}
    assert 'data-series="perc_lat_50"' in html
    # 900 to 1200 µs: one scale (ms) for the whole series.
    assert ">0.9 ms<" in html and ">1.2 ms<" in html and 'data-stat="count" data-value="3"' in html


async def test_a_test_with_only_its_own_metrics_is_charted_in_their_units(tool_records: ToolRecords) -> None:
    async with dashboard_client(tool_records.address) as client:
        response = await client.get("/api/tests/BM_Parse/series")
        assert response.status == 200
        data = await response.json()
        missing = await client.get("/api/tests/BM_Nothing/series")
        assert missing.status == 404
    # The newest result (no units) decides the charts: real_time without a unit.
    charts = {chart["title"]: chart for chart in data["charts"]}
    assert set(charts) == {"real_time"}
    assert charts["real_time"]["axis"] == {"label": "", "divisor": 1.0}
    assert data["results"] == 2
    assert {line["metric"] for line in data["lines"]} == {"real_time"}
