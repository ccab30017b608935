"""The time charts in headless Chromium against the dense perfdb (20,000 results of one test):
bands and medians drawn, the extremes and the pause kept in the drawn data, single results that
open on a click, and a drag that zooms into a finer grid. Screenshots go to test-artifacts/web/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.web.conftest import DashboardProcess, dashboard_process
from tests.web.dense import BIG_TEST, DENSE_USER, HIGHEST_QPS, LOWEST_QPS, SPARSE_TEST, DensePerfdb
from tests.web.test_browser import CHROMIUM, BrowserPage, browser, opened_tab, wait_for_charts  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)

# The drawn data of one line of a chart: uPlot's own arrays, as the canvas was drawn from them.
DRAWN_LINE = """([chartId, test]) => {
  const chart = window.perfdbCharts.find((c) => c.id === chartId);
  const line = chart.lines.find((l) => l.line.test === test);
  const data = chart.plot.data;
  return {
    median: data[line.index.median].map((v) => (v === undefined ? "spanned" : v)),
    min: data[line.index.min].filter((v) => v != null),
    max: data[line.index.max].filter((v) => v != null),
    grid: chart.grid,
    points: data[0].length,
  };
}"""

# Where a line's bucket of several results is drawn, about the middle of the chart.
MANY_POINT = """([chartId, test]) => {
  const chart = window.perfdbCharts.find((c) => c.id === chartId);
  const line = chart.lines.find((l) => l.line.test === test);
  const u = chart.plot;
  let index = Math.floor(line.median.length / 2);
  while (line.median[index] == null || line.line.count[line.row[index]] < 2) index += 1;
  const box = u.over.getBoundingClientRect();
  return {
    x: box.left + u.valToPos(u.data[0][index], "x"),
    y: box.top + u.valToPos(line.median[index], "y"),
  };
}"""

# Bytes the page and its API calls took on the wire, compressed as sent.
TRANSFERRED = """() => {
  const entries = [...performance.getEntriesByType("navigation"), ...performance.getEntriesByType("resource")];
  return entries
    .filter((entry) => !new URL(entry.name).pathname.startsWith("/static/"))
    .reduce((total, entry) => total + (entry.transferSize || entry.encodedBodySize), 0);
}"""

# Where on the page a line's single result is drawn, and which result it is.
SINGLE_POINT = """([chartId, test, nth]) => {
  const chart = window.perfdbCharts.find((c) => c.id === chartId);
  const line = chart.lines.find((l) => l.line.test === test);
  const u = chart.plot;
  const singles = [];
  line.row.forEach((row, index) => {
    if (row !== undefined && line.line.record_id[row] != null) singles.push(index);
  });
  const index = singles[nth];
  const box = u.over.getBoundingClientRect();
  return {
    x: box.left + u.valToPos(u.data[0][index], "x"),
    y: box.top + u.valToPos(u.data[line.index.median][index], "y"),
    recordId: line.line.record_id[line.row[index]],
  };
}"""


@pytest.fixture(scope="module")
def dense_dashboard(dense_perfdb: DensePerfdb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardProcess]:
    with dashboard_process(dense_perfdb.address) as process:
        yield process


@pytest.fixture
def dense_tab(browser: Any, dense_dashboard: DashboardProcess) -> Iterator[BrowserPage]:  # noqa: F811
    with opened_tab(browser, dense_dashboard.url) as opened:
        yield opened


def test_a_dense_user_page_draws_bands_keeps_extremes_and_opens_a_single_result(
    dense_tab: BrowserPage, dense_perfdb: DensePerfdb
) -> None:
    dense_tab.goto(f"/users/{DENSE_USER}")
    wait_for_charts(dense_tab)
    assert dense_tab.page.locator("#charts canvas").count() == 5
    for chart in ("qps", "qps_per_core", "latency", "server_cpu", "client_cpu"):
        assert dense_tab.coloured_pixels(f"#chart-{chart} canvas") > 300, chart
    drawn = dense_tab.page.evaluate(DRAWN_LINE, ["qps", BIG_TEST])
    # The dip and the spike among 20,000 results are drawn, as the band's edges.
    assert min(drawn["min"]) == LOWEST_QPS and max(drawn["max"]) == HIGHEST_QPS
    # The five-day pause breaks the line: one null in the drawn medians, none elsewhere.
    assert drawn["median"].count(None) == 1
    assert drawn["points"] <= 2000
    summary = dense_tab.page.inner_text("#chart-summary")
    assert re.match(r"^2[0-9],[0-9]{3} results of 9 tests", summary), summary
    dense_tab.screenshot("user-dense.png")
    assert dense_tab.errors == []
    # What the page and its chart data cost on the wire (static files are cached for good).
    for path in (f"/users/{DENSE_USER}", f"/users/{DENSE_USER}?test={BIG_TEST}"):
        dense_tab.goto(path)
        wait_for_charts(dense_tab)
        assert dense_tab.page.evaluate(TRANSFERRED) < 300_000, path

    # A single result of the sparse test is a dot: hovering it names it, a click opens it.
    dense_tab.goto(f"/users/{DENSE_USER}?test={SPARSE_TEST}")
    wait_for_charts(dense_tab)
    point = dense_tab.page.evaluate(SINGLE_POINT, ["qps", SPARSE_TEST, 2])
    dense_tab.page.mouse.move(point["x"] + 2, point["y"] + 2)
    dense_tab.page.mouse.move(point["x"], point["y"])
    tooltip = dense_tab.page.locator("#chart-tooltip")
    tooltip.wait_for(state="visible")
    assert "Click to open this result" in tooltip.inner_text()
    dense_tab.page.mouse.click(point["x"], point["y"])
    dense_tab.page.wait_for_url(re.compile(r"/results/[0-9a-f]{20}$"))
    assert dense_tab.page.url.endswith(f"/results/{point['recordId']}")
    assert point["recordId"] == dense_perfdb.of(DENSE_USER, SPARSE_TEST)[2]["record_id"]
    assert dense_tab.errors == []


def test_dragging_across_a_chart_zooms_into_a_finer_grid_and_back(dense_tab: BrowserPage) -> None:
    dense_tab.goto(f"/users/{DENSE_USER}?test={BIG_TEST}")
    wait_for_charts(dense_tab)
    before = dense_tab.page.evaluate(DRAWN_LINE, ["qps", BIG_TEST])
    box = dense_tab.page.locator("#chart-qps .u-over").bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    dense_tab.page.mouse.move(box["x"] + box["width"] * 0.87, y)  # within the last three days: dense
    dense_tab.page.mouse.down()
    dense_tab.page.mouse.move(box["x"] + box["width"] * 0.97, y, steps=5)
    dense_tab.page.mouse.up()
    dense_tab.page.wait_for_url(re.compile(r"wfrom="))
    wait_for_charts(dense_tab)
    after = dense_tab.page.evaluate(DRAWN_LINE, ["qps", BIG_TEST])
    assert after["grid"][1] < before["grid"][1] / 5  # buckets several times narrower
    assert re.search(r"[?&]from=20\d\d-", dense_tab.page.url)
    assert dense_tab.coloured_pixels("#chart-qps canvas") > 300
    dense_tab.screenshot("user-zoomed.png")
    # The link keeps the zoom; the button goes back to the whole range.
    dense_tab.page.reload()
    wait_for_charts(dense_tab)
    assert dense_tab.page.evaluate(DRAWN_LINE, ["qps", BIG_TEST])["grid"] == after["grid"]
    dense_tab.page.click("#zoom-out")
    dense_tab.page.wait_for_url(re.compile(r"^(?!.*wfrom=)"))
    wait_for_charts(dense_tab)
    assert dense_tab.page.evaluate(DRAWN_LINE, ["qps", BIG_TEST])["grid"] == before["grid"]
    # A click on a moment of many results lists them in the table.
    bucket = dense_tab.page.evaluate(MANY_POINT, ["qps", BIG_TEST])
    dense_tab.page.mouse.move(bucket["x"], bucket["y"])
    dense_tab.page.locator("#chart-tooltip").wait_for(state="visible")
    text = dense_tab.page.inner_text("#chart-tooltip")
    assert "Click to list these results" in text
    # The pointer may land on a neighbouring bucket (they are about 2 pixels apart): the tooltip says which.
    count = int(re.search(r"([0-9,]+) results", text).group(1).replace(",", ""))  # type: ignore[union-attr]
    dense_tab.page.mouse.click(bucket["x"], bucket["y"])
    dense_tab.page.wait_for_url(re.compile(r"/\?user="))
    assert f"test={BIG_TEST}" in dense_tab.page.url and "from=" in dense_tab.page.url
    rows = dense_tab.page.locator("#results-table tbody tr").count()
    assert rows == min(50, count) and count > 1
    assert dense_tab.errors == []


def test_a_test_across_users_charts_on_its_own_page(dense_tab: BrowserPage) -> None:
    dense_tab.goto(f"/tests/{BIG_TEST}")
    wait_for_charts(dense_tab)
    assert dense_tab.page.inner_text("h1") == BIG_TEST
    for chart in ("qps", "latency"):
        assert dense_tab.coloured_pixels(f"#chart-{chart} canvas") > 300, chart
    assert dense_tab.page.inner_text("#chart-summary").startswith("22,000 results of 1 test")
    dense_tab.screenshot("test-dense.png")
    assert dense_tab.errors == []


def test_the_page_formats_values_as_the_server_does(dense_tab: BrowserPage) -> None:
    from perfdb.records.units import format_value

    dense_tab.goto(f"/tests/{BIG_TEST}")
    wait_for_charts(dense_tab)
    samples = [(value, unit) for unit in ("qps", "us", "percent") for value in (0.5, 42.26, 999.4, 1234.6, 2_500_000.0)]
    samples += [(value, "") for value in (1_403_434.0, 1234.5, 250_000.7, 42.0)]  # counts of unknown metrics
    # Records' own units (Google Benchmark, pytest-benchmark, ...), scaled as the server scales them.
    samples += [
        (value, unit)
        for unit in ("ns", "s", "ms/op", "ps", "ops/s", "ops/ms", "B", "B/s", "elem/s", "allocs/op", "1")
        for value in (0.5, 42.26, 999.7, 1234.6, 2_500_000.0)
    ]
    samples += [(2.08e-7, "s"), (3e-10, "s")]
    shown = dense_tab.page.evaluate("(samples) => samples.map(([v, u]) => window.perfdbFormatValue(v, u))", samples)
    assert shown == [format_value(value, unit) for value, unit in samples]
