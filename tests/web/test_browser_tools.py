"""Results of other benchmark tools in headless Chromium: Google Benchmark series charted with
their y axes in the metrics' own units, and a pytest-benchmark result page with its source, its
run time and the distribution of its samples, checked against the tool's own statistics."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from perfdb.client import Client
from perfdb.importers import import_file
from tests.support import FIXTURES, static_token_server
from tests.web.conftest import DashboardProcess, dashboard_process
from tests.web.test_browser import CHROMIUM, BrowserPage, browser, opened_tab, wait_for_charts  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)

TOOLS = FIXTURES / "tools"
TOKEN = "tools-ci-" + secrets.token_hex(16)
GOOGLE_BENCHMARK_RUNS = 4
BENCHMARK_REPOSITORY = "https://github.com/example/stringlib"
BENCHMARK_COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Each chart of the page: its title (the metric), its y axis label (the unit it is shown in) and
# the tick label the axis would write at the top of its scale (uPlot draws both on the canvas).
CHART_AXES = """() => window.perfdbCharts.map((chart) => ({
  title: document.querySelector(`section[data-chart="${chart.id}"] h2`).textContent,
  label: chart.plot.axes[1].label,
  top: chart.plot.axes[1].values(chart.plot, [chart.plot.scales.y.max])[0],
}))"""


@dataclasses.dataclass(frozen=True)
class ToolsPerfdb:
    address: str
    google_benchmark_ids: list[list[str]]  # per run, the record id of each benchmark, as in plain.json
    pytest_benchmark_ids: dict[str, str]  # benchmark name -> record id


@pytest.fixture(scope="module")
def tools_perfdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolsPerfdb]:
    """A perfdb server holding real tools' outputs, submitted through their importers."""
    directory = tmp_path_factory.mktemp("perfdb-tools")
    with static_token_server(directory, TOKEN, "tools-ci") as address:
        _, google_benchmark = import_file((TOOLS / "google-benchmark/plain.json").read_bytes(), "plain.json")
        _, pytest_benchmark = import_file(
            (TOOLS / "pytest-benchmark/parametrized.json").read_bytes(), "parametrized.json"
        )
        with Client(address) as client:
            runs = []
            for run in range(GOOGLE_BENCHMARK_RUNS):
                ids = []
                for fields in google_benchmark:
                    if run == GOOGLE_BENCHMARK_RUNS - 1:  # the newest run names its commit in a web repository
                        fields = {**fields, "source": {"commit": BENCHMARK_COMMIT, "repository": BENCHMARK_REPOSITORY}}
                    ids.append(client.record(access_token=TOKEN, **fields)["record_id"])
                runs.append(ids)
            pytest_ids = {
                fields["test_name"]: client.record(access_token=TOKEN, **fields)["record_id"]
                for fields in pytest_benchmark
            }
        yield ToolsPerfdb(address, runs, pytest_ids)


@pytest.fixture(scope="module")
def tools_dashboard(tools_perfdb: ToolsPerfdb) -> Iterator[DashboardProcess]:
    with dashboard_process(tools_perfdb.address) as process:
        yield process


@pytest.fixture
def tools_tab(browser: Any, tools_dashboard: DashboardProcess) -> Iterator[BrowserPage]:  # noqa: F811
    with opened_tab(browser, tools_dashboard.url) as opened:
        yield opened


def _chart_axes(tab: BrowserPage, test: str) -> dict[str, dict[str, Any]]:
    tab.goto("/tests/" + test.replace("/", "%2F"))
    wait_for_charts(tab)
    axes: list[dict[str, Any]] = tab.page.evaluate(CHART_AXES)
    return {axis["title"]: axis for axis in axes}


def test_a_google_benchmark_series_shows_each_y_axis_in_its_metrics_unit(tools_tab: BrowserPage) -> None:
    # plain.json: BM_StringCopy/512 copies in about 127 ns at about 11e9 B/s; BM_VectorPush takes 1950 ns.
    copy = _chart_axes(tools_tab, "BM_StringCopy/512")
    assert set(copy) == {"bytes_per_second", "cpu_time", "items", "iterations", "real_time"}, copy
    assert copy["real_time"]["label"] == "ns" and copy["cpu_time"]["label"] == "ns"
    assert copy["bytes_per_second"]["label"] == "GiB/s"
    assert copy["iterations"]["label"] == ""  # a plain count
    # The ticks are plain numbers of that unit: about 127 (ns) and 10.3 (GiB/s), not 1.27e-7 or 11G.
    assert 100 <= float(copy["real_time"]["top"]) < 1000, copy["real_time"]
    assert 1 <= float(copy["bytes_per_second"]["top"]) < 100, copy["bytes_per_second"]
    tools_tab.screenshot("tools-google-benchmark-string-copy.png")
    push = _chart_axes(tools_tab, "BM_VectorPush")
    assert push["real_time"]["label"] == "µs" and push["cpu_time"]["label"] == "ns"
    assert 1 <= float(push["real_time"]["top"]) < 10, push["real_time"]  # about 1.95 µs
    # Every run is on the chart: four results of the test.
    assert "4 results" in tools_tab.page.inner_text("#chart-summary")
    assert not tools_tab.errors


def test_a_google_benchmark_result_links_its_commit_to_the_repository(
    tools_tab: BrowserPage, tools_perfdb: ToolsPerfdb
) -> None:
    newest = tools_perfdb.google_benchmark_ids[-1][1]  # BM_StringCopy/512
    tools_tab.goto(f"/results/{newest}")
    link = tools_tab.page.locator("#source-commit-link")
    assert link.get_attribute("href") == f"{BENCHMARK_REPOSITORY}/commit/{BENCHMARK_COMMIT}"
    assert link.inner_text() == BENCHMARK_COMMIT[:12]
    # The metrics table shows each value with its unit.
    rows = dict(
        tools_tab.page.eval_on_selector_all(
            "#metrics tbody tr", "rows => rows.map(r => [r.cells[0].innerText, r.cells[1].innerText])"
        )
    )
    assert rows["real_time"] == "127 ns" and rows["bytes_per_second"] == "10.3 GiB/s"
    assert rows["iterations"] == "294,687"
    # The older runs name no commit: no source card.
    tools_tab.goto(f"/results/{tools_perfdb.google_benchmark_ids[0][1]}")
    assert tools_tab.page.locator("#source").count() == 0
    assert not tools_tab.errors


def test_a_pytest_benchmark_result_shows_its_source_run_time_and_sample_distribution(
    tools_tab: BrowserPage, tools_perfdb: ToolsPerfdb
) -> None:
    document = json.loads((TOOLS / "pytest-benchmark/parametrized.json").read_text())
    for bench in document["benchmarks"]:
        record_id = tools_perfdb.pytest_benchmark_ids[bench["fullname"]]
        tools_tab.goto(f"/results/{record_id}")
        commit = document["commit_info"]
        source = tools_tab.page.locator("#source")
        assert source.locator("[data-field=commit] code").get_attribute("title") == commit["id"]
        assert source.locator("[data-field=branch]").inner_text() == commit["branch"]
        assert source.locator("[data-field=repository]").inner_text() == commit["project"]
        assert source.locator("[data-field='commit time'] time").get_attribute("datetime") == (
            "2026-12-07T16:56:46.000000Z"
        )
        assert tools_tab.page.locator("#source-commit-link").count() == 0  # "pyb" is no web address
        # The run time (the file's datetime) beside the time perfdb stored the result.
        assert tools_tab.page.locator("#run-time time").get_attribute("datetime") == "2026-12-07T16:56:57.649258Z"
        assert tools_tab.page.locator("#stored-time time").count() == 1
        stats = bench["stats"]
        figure = tools_tab.page.locator("#distributions figure[data-series=time]")
        assert "in s" in figure.locator("figcaption").inner_text()
        values = dict(
            figure.locator("td[data-stat]").evaluate_all(
                "cells => cells.map(c => [c.dataset.stat, Number(c.dataset.value)])"
            )
        )
        assert values["count"] == stats["rounds"] == len(stats["data"])
        for stat, expected in (("min", "min"), ("q1", "q1"), ("median", "median"), ("q3", "q3"), ("max", "max")):
            assert values[stat] == pytest.approx(stats[expected], rel=1e-9), (bench["name"], stat)
        assert figure.locator("circle.sample").count() == stats["rounds"]
        assert figure.locator("rect.box").count() == 1
    tools_tab.screenshot("tools-pytest-benchmark-result.png")
    # test_sum[10], as people read it: its round times in ns, all in one scale.
    tools_tab.goto(f"/results/{tools_perfdb.pytest_benchmark_ids['test_tiny.py::test_sum[10]']}")
    texts = dict(
        tools_tab.page.locator("#distributions figure[data-series=time] td[data-stat]").evaluate_all(
            "cells => cells.map(c => [c.dataset.stat, c.innerText])"
        )
    )
    assert texts == {"count": "5", "min": "192 ns", "q1": "208 ns", "median": "228 ns", "q3": "258 ns", "max": "270 ns"}
    # test_join's rounds lie within 1% of each other: shown with the digits that tell them apart.
    tools_tab.goto(f"/results/{tools_perfdb.pytest_benchmark_ids['test_tiny.py::test_join']}")
    joins = tools_tab.page.locator("#distributions figure[data-series=time] td[data-stat]").evaluate_all(
        "cells => cells.map(c => c.innerText)"
    )
    assert joins[1:] == ["175.76 ns", "175.8 ns", "176.58 ns", "176.88 ns", "176.96 ns"], joins
    assert not tools_tab.errors
