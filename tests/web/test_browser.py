"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright,
against perfdb-web started as a process. Screenshots of every page go to test-artifacts/web/."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from perfdb.web.pages import PAGE_CHART_POINTS
from tests.support import closed_port
from tests.web.burst import BURST_TESTS
from tests.web.conftest import ARTIFACTS, BurstPerfdb, DashboardProcess, SeededPerfdb, dashboard_process
from tests.web.seed import TESTS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GO_PING_PONG = "go_generic_sync_streaming_ping_pong"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)

# How many strongly coloured pixels a canvas holds: lines and bars are coloured, axes and grid grey.
COLOURED_PIXELS = """(canvas) => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let coloured = 0;
  for (let i = 0; i < data.length; i += 4) {
    const high = Math.max(data[i], data[i + 1], data[i + 2]);
    const low = Math.min(data[i], data[i + 1], data[i + 2]);
    if (data[i + 3] > 128 && high - low > 60) coloured += 1;
  }
  return coloured;
}"""


@dataclasses.dataclass
class BrowserPage:
    """A browser tab that remembers every console error and uncaught exception."""

    page: Any
    base_url: str
    errors: list[str]

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base_url + path)

    def screenshot(self, name: str, *, full_page: bool = True) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)

    def coloured_pixels(self, selector: str) -> int:
        count: int = self.page.eval_on_selector(selector, COLOURED_PIXELS)
        return count


@pytest.fixture(scope="module")
def dashboard(seeded: SeededPerfdb) -> Iterator[DashboardProcess]:
    with dashboard_process(seeded.address) as process:
        yield process


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
            env={**os.environ, "TZ": "UTC"},
        )
        context.set_default_timeout(10_000)
        try:
            yield context
        finally:
            context.close()


@contextlib.contextmanager
def opened_tab(browser: Any, base_url: str) -> Iterator[BrowserPage]:
    """A new tab on the dashboard at `base_url` that collects console errors; closed after."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    try:
        yield BrowserPage(page, base_url, errors)
    finally:
        page.close()


# Scrolls each chart into view until it is drawn (those off screen are drawn as they come near),
# then back to the top; gives up after `deadline` ms.
DRAW_EVERY_CHART = """async (deadline) => {
  const until = performance.now() + deadline;
  for (const plot of document.querySelectorAll("#charts .chart")) {
    plot.scrollIntoView({ block: "center" });
    while (plot.dataset.drawn !== "true") {
      if (performance.now() > until) throw new Error(`${plot.id} was not drawn once in view`);
      await new Promise((resolve) => requestAnimationFrame(resolve));
    }
  }
  window.scrollTo(0, 0);
}"""


def wait_for_charts(tab: BrowserPage, *, every: bool = True) -> None:
    """Until the page's time charts are drawn from their data: those on screen (the page is
    ready), and with `every` the others too."""
    tab.page.wait_for_selector("#charts[data-ready=true]", timeout=60_000)
    if every:
        tab.page.evaluate(DRAW_EVERY_CHART, 30_000)


@pytest.fixture
def tab(browser: Any, dashboard: DashboardProcess) -> Iterator[BrowserPage]:
    with opened_tab(browser, dashboard.url) as opened:
        yield opened


def _cell_values(tab: BrowserPage, column: str) -> list[str]:
    values: list[str] = tab.page.eval_on_selector_all(
        f"#results-table tbody td:nth-child({_column_index(tab, column) + 1})", "cells => cells.map(c => c.innerText)"
    )
    return values


def _column_index(tab: BrowserPage, column: str) -> int:
    columns: list[str] = tab.page.eval_on_selector_all("#results-table th", "ths => ths.map(th => th.dataset.column)")
    return columns.index(column)


def _numbers(tab: BrowserPage, column: str) -> list[float]:
    raw: list[str] = tab.page.eval_on_selector_all(
        f"#results-table tbody td:nth-child({_column_index(tab, column) + 1})",
        "cells => cells.map(c => c.dataset.value)",
    )
    return [float(value) for value in raw]


def test_results_table_sorts_filters_and_pages(tab: BrowserPage, seeded: SeededPerfdb) -> None:
    tab.goto("/")
    assert tab.page.locator("#results-table tbody tr").count() == 50
    tab.screenshot("results.png", full_page=False)  # the first screenful, as a reader sees it

    tab.page.click("#results-table th[data-column=qps] a")
    tab.page.wait_for_url(re.compile(r"sort=qps"))
    values = _numbers(tab, "qps")
    assert values == sorted(values, reverse=True)
    assert values[0] == max(record["metrics"]["qps"] for record in seeded.data.records)
    assert tab.page.get_attribute("#results-table th[data-column=qps]", "aria-sort") == "descending"
    tab.page.click("#results-table th[data-column=qps] a")
    tab.page.wait_for_url(re.compile(r"order=asc"))
    ascending = _numbers(tab, "qps")
    assert ascending == sorted(ascending) and ascending[0] < values[-1]

    # Filtering: the form leaves empty fields out of the URL, so the link stays short.
    tab.goto("/")
    tab.page.fill("#f-test", GO_PING_PONG)
    tab.page.click("#filters button[type=submit]")
    tab.page.wait_for_url(re.compile(r"test=go_generic"))
    assert tab.page.url == f"{tab.base_url}/?test={GO_PING_PONG}"
    assert set(_cell_values(tab, "test")) == {GO_PING_PONG}
    # Paging on: the next page holds older results, none of this page's.
    first_page = tab.page.eval_on_selector_all("#results-table tbody tr", "rows => rows.map(r => r.dataset.recordId)")
    tab.page.click("a[data-pager=next]")
    tab.page.wait_for_url(re.compile(r"before="))
    second_page = tab.page.eval_on_selector_all("#results-table tbody tr", "rows => rows.map(r => r.dataset.recordId)")
    assert second_page and not set(first_page) & set(second_page) and max(second_page) < min(first_page)
    assert set(_cell_values(tab, "test")) == {GO_PING_PONG}  # the filter holds on every page

    tab.page.fill("#f-q", "grace")
    tab.page.press("#f-q", "Enter")
    tab.page.wait_for_url(re.compile(r"q=grace"))
    assert set(_cell_values(tab, "user")) == {"Grace Hopper"}
    assert tab.errors == []


def test_columns_can_be_hidden_from_the_table(tab: BrowserPage) -> None:
    tab.goto("/")
    assert "perc_lat_50" in tab.page.eval_on_selector_all(
        "#results-table th", "ths => ths.map(th => th.dataset.column)"
    )
    tab.page.click("details.columns summary")
    tab.page.uncheck("input[name=cols][value=perc_lat_50]")  # takes effect at once
    tab.page.wait_for_url(re.compile(r"cols="))
    columns = tab.page.eval_on_selector_all("#results-table th", "ths => ths.map(th => th.dataset.column)")
    assert "perc_lat_50" not in columns and "perc_lat_99" in columns
    tab.page.click("details.columns summary")
    tab.page.check("input[name=cols][value=perc_lat_50]")
    tab.page.wait_for_url(re.compile(r"/\??$"))  # all columns again: the default, so no cols in the URL
    assert tab.errors == []


def test_user_page_draws_charts_and_a_click_on_a_point_opens_the_result(tab: BrowserPage) -> None:
    tab.goto("/users/static:nightly-ci")
    wait_for_charts(tab)
    canvases = tab.page.locator("#charts canvas")
    assert canvases.count() == 5
    for chart in ("qps", "qps_per_core", "latency", "server_cpu", "client_cpu"):
        assert tab.coloured_pixels(f"#chart-{chart} canvas") > 300, chart
    options = tab.page.eval_on_selector_all("#f-test option", "options => options.map(o => o.value)")
    assert sorted(options) == sorted(["", *TESTS])

    # Hover a result of the first line (a day's run is a bucket of one): the tooltip names its
    # test and value.
    point = tab.page.evaluate(
        """() => {
          const chart = window.perfdbCharts.find((c) => c.id === "qps");
          const u = chart.plot;
          const line = chart.lines[0];
          let index = Math.floor(line.median.length * 0.8);
          while (line.median[index] == null || line.line.record_id[line.row[index]] == null) index -= 1;
          const box = u.over.getBoundingClientRect();
          return {
            x: box.left + u.valToPos(u.data[0][index], "x"),
            y: box.top + u.valToPos(line.median[index], "y"),
            recordId: line.line.record_id[line.row[index]],
            test: line.line.test,
          };
        }"""
    )
    tab.page.mouse.move(point["x"], point["y"])
    tooltip = tab.page.locator("#chart-tooltip")
    tooltip.wait_for(state="visible")
    text = tooltip.inner_text()
    assert point["test"] in text and "QPS" in text and "Click to open this result" in text
    tab.screenshot("user.png")

    # The full-page screenshot resized the view: point again, then click.
    tab.page.mouse.move(point["x"] + 3, point["y"] + 3)
    tab.page.mouse.move(point["x"], point["y"])
    tooltip.wait_for(state="visible")
    tab.page.mouse.click(point["x"], point["y"])
    tab.page.wait_for_url(re.compile(r"/results/[0-9a-f]{20}$"))
    assert tab.page.url.endswith(f"/results/{point['recordId']}")
    assert tab.page.inner_text("h1") == point["test"]
    assert "Nightly CI" in tab.page.inner_text(".lede")
    assert tab.page.locator("#metrics tbody tr").count() >= 11
    tab.screenshot("result.png")
    assert tab.errors == []


def test_user_page_percentile_charts_follow_the_chosen_test(tab: BrowserPage) -> None:
    tab.goto("/users/static:nightly-ci")
    wait_for_charts(tab)
    latency = "window.perfdbCharts.find((c) => c.id === 'latency')"
    metrics = tab.page.evaluate(f"() => {latency}.lines.map((l) => l.line.metric)")
    assert metrics == ["perc_lat_50", "perc_lat_90", "perc_lat_95", "perc_lat_99", "perc_lat_99_point_9"]
    legend = tab.page.eval_on_selector_all("#chart-latency .legend-item", "items => items.map((i) => i.innerText)")
    assert legend == ["p50", "p90", "p95", "p99", "p99.9"]
    tests_shown = f"() => [...new Set({latency}.lines.map((l) => l.line.test))]"
    first = tab.page.evaluate(tests_shown)
    tab.page.select_option("#detail-test", GO_PING_PONG)  # loads that test's lines
    tab.page.wait_for_function(f"() => ({tests_shown})()[0] === {GO_PING_PONG!r}")
    wait_for_charts(tab)
    assert tab.page.evaluate(tests_shown) == [GO_PING_PONG] != first
    assert tab.coloured_pixels("#chart-latency canvas") > 300
    assert f"detail={GO_PING_PONG}" in tab.page.url
    # The choice is part of the link: opening it again shows the same test.
    tab.page.reload()
    wait_for_charts(tab)
    assert tab.page.evaluate(tests_shown) == [GO_PING_PONG]
    # A legend entry hides its line and band, and shows them again.
    tab.page.click("#chart-latency .legend-item >> nth=4")
    hidden = f"() => {latency}.plot.series.filter((s) => !s.show).length"
    assert tab.page.evaluate(hidden) == 3
    tab.page.click("#chart-latency .legend-item >> nth=4")
    assert tab.page.evaluate(hidden) == 0
    assert tab.errors == []


def test_overview_draws_the_histogram_and_the_leaderboard(tab: BrowserPage) -> None:
    tab.goto("/overview")
    tab.page.wait_for_selector("#histogram[data-ready=true]")
    assert tab.coloured_pixels("#histogram canvas") > 2000  # bars are filled
    assert tab.page.locator("#leaderboard tbody tr").count() == 3
    box = tab.page.locator("#histogram .u-over").bounding_box()
    assert box is not None
    tab.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tab.page.locator("#chart-tooltip").wait_for(state="visible")
    assert re.search(r"^\d[\d,]* results?$", tab.page.inner_text("#chart-tooltip").splitlines()[-1])
    tab.page.mouse.move(0, 0)
    tab.screenshot("overview.png")
    tab.page.select_option("#f-metric", "perc_lat_99")  # takes effect at once
    tab.page.wait_for_url(re.compile(r"metric=perc_lat_99"))
    tab.page.wait_for_selector("#histogram[data-ready=true]")
    assert "Best p99" in tab.page.text_content("#leaderboard thead")
    assert tab.errors == []


def test_perfdb_down_shows_a_readable_page_that_retries(browser: Any) -> None:
    perfdb_address = f"127.0.0.1:{closed_port()}"
    with dashboard_process(perfdb_address) as down, opened_tab(browser, down.url) as tab:
        response = tab.goto("/")
        assert response.status == 503
        message = tab.page.inner_text("#error-message")
        assert message.startswith(f"The perfdb server at {perfdb_address} cannot be reached")
        assert "Retrying by itself in" in tab.page.inner_text("#retry-countdown")
        tab.screenshot("perfdb-down.png")
        # The only console error is the browser noting the 503 itself.
        assert [error for error in tab.errors if "503" not in error] == []


# -- after a burst: 24,000 results within seconds ---------------------------------------------


@pytest.fixture(scope="module")
def burst_dashboard(burst: BurstPerfdb) -> Iterator[DashboardProcess]:
    with dashboard_process(burst.address) as process:
        yield process


@pytest.fixture
def burst_tab(browser: Any, burst_dashboard: DashboardProcess) -> Iterator[BrowserPage]:
    with opened_tab(browser, burst_dashboard.url) as opened:
        yield opened


def _row_ids(tab: BrowserPage) -> list[str]:
    ids: list[str] = tab.page.eval_on_selector_all(
        "#results-table tbody tr", "rows => rows.map(r => r.dataset.recordId)"
    )
    return ids


def test_after_a_burst_the_table_shows_the_newest_and_sorting_finds_the_true_top(
    burst_tab: BrowserPage, burst: BurstPerfdb
) -> None:
    tab = burst_tab
    tab.goto("/")
    newest = [record["record_id"] for record in burst.data.newest_first()]
    assert _row_ids(tab) == newest[:50]
    assert tab.page.inner_text("#summary").startswith("24,000 results in all.")
    tab.screenshot("burst-results.png", full_page=False)

    tab.page.click("#results-table th[data-column=qps] a")
    tab.page.wait_for_url(re.compile(r"sort=qps"))
    ranked = burst.data.by_qps()
    assert _row_ids(tab) == [record["record_id"] for record in ranked[:50]]
    assert _numbers(tab, "qps")[0] == max(record["metrics"]["qps"] for record in burst.data.records)
    tab.page.click("a[data-pager=next]")
    tab.page.wait_for_url(re.compile(r"trail="))
    assert _row_ids(tab) == [record["record_id"] for record in ranked[50:100]]
    tab.page.click("a[data-pager=prev]")
    tab.page.wait_for_url(re.compile(r"sort=qps$"))
    assert _row_ids(tab) == [record["record_id"] for record in ranked[:50]]
    assert tab.errors == []


def test_after_a_burst_the_filtered_table_and_the_overview_are_filled(
    burst_tab: BrowserPage, burst: BurstPerfdb
) -> None:
    tab = burst_tab
    test = BURST_TESTS[5]
    tab.goto("/")
    tab.page.fill("#f-test", test)
    tab.page.click("#filters button[type=submit]")
    tab.page.wait_for_url(re.compile(r"test=burst_test_5"))
    assert _row_ids(tab) == [record["record_id"] for record in burst.data.newest_first(test_name=test)[:50]]
    assert set(_cell_values(tab, "test")) == {test}

    tab.goto(f"/overview?test={test}")
    tab.page.wait_for_selector("#histogram[data-ready=true]")
    assert tab.coloured_pixels("#histogram canvas") > 2000
    users = {record["user_id"] for record in burst.data.records if record["test_name"] == test}
    assert tab.page.locator("#leaderboard tbody tr").count() == len(users)
    count = sum(1 for record in burst.data.records if record["test_name"] == test)
    assert tab.page.inner_text("#stat-results") == f"{count:,}"
    tab.screenshot("burst-overview.png")
    assert tab.errors == []


def test_after_a_burst_paging_forwards_then_backwards_returns_the_same_rows(
    burst_tab: BrowserPage, burst: BurstPerfdb
) -> None:
    tab = burst_tab
    tab.goto("/?per_page=100")
    forwards = [_row_ids(tab)]
    for _ in range(4):
        tab.page.click("a[data-pager=next]")
        tab.page.wait_for_function(
            "(first) => document.querySelector('#results-table tbody tr').dataset.recordId !== first",
            arg=forwards[-1][0],
        )
        forwards.append(_row_ids(tab))
    newest = [record["record_id"] for record in burst.data.newest_first()]
    assert [record_id for ids in forwards for record_id in ids] == newest[:500]
    backwards = [forwards[-1]]
    for _ in range(4):
        tab.page.click("a[data-pager=prev]")
        tab.page.wait_for_function(
            "(first) => document.querySelector('#results-table tbody tr').dataset.recordId !== first",
            arg=backwards[-1][0],
        )
        backwards.append(_row_ids(tab))
    assert backwards[::-1] == forwards
    assert tab.page.locator("a[data-pager=prev]").count() == 0  # back at the newest page
    assert tab.errors == []


# Per chart of the page: whether it is drawn, and whether it lies in the viewport or near it.
CHART_PLACES = """(margin) => [...document.querySelectorAll("#charts .chart")].map((plot) => {
  const box = plot.getBoundingClientRect();
  return {
    id: plot.id,
    drawn: plot.dataset.drawn === "true",
    canvas: plot.querySelector("canvas") !== null,
    listed: window.perfdbCharts.some((chart) => `chart-${chart.id}` === plot.id),
    onScreen: box.bottom > 0 && box.top < window.innerHeight,
    near: box.bottom > -margin && box.top < window.innerHeight + margin,
  };
})"""


def test_user_page_draws_from_its_own_data_and_draws_charts_as_they_come_near(
    browser: Any, dashboard: DashboardProcess
) -> None:
    with opened_tab(browser, dashboard.url) as tab:
        tab.page.set_viewport_size({"width": 1200, "height": 500})
        requested: list[str] = []
        tab.page.on("request", lambda request: requested.append(request.url) if "/api/" in request.url else None)
        tab.goto("/users/static:nightly-ci")
        wait_for_charts(tab, every=False)
        # The page carried its data: nothing is asked of the API to draw it.
        assert requested == []

        # The page is ready with the charts on screen drawn; those far below are not, yet.
        places = tab.page.evaluate(CHART_PLACES, 400)
        assert len(places) == 5
        assert all(place["drawn"] and place["canvas"] for place in places if place["onScreen"]), places
        waiting = [place["id"] for place in places if not place["near"]]
        assert waiting and not any(place["drawn"] or place["canvas"] for place in places if not place["near"]), places
        assert all(place["listed"] == place["drawn"] for place in places), places

        # Scrolled into view, each is drawn (with its lines), and no data is asked for again.
        for plot in waiting:
            tab.page.locator(f"#{plot}").scroll_into_view_if_needed()
            tab.page.wait_for_selector(f"#{plot}[data-drawn=true] canvas", timeout=30_000)
            assert tab.coloured_pixels(f"#{plot} canvas") > 300, plot
        assert requested == []

        # Another test's percentiles come from the API, at the page's resolution.
        tab.page.select_option("#detail-test", GO_PING_PONG)
        tab.page.wait_for_function(f"() => window.perfdbCharts.some((c) => c.lines[0].line.test === {GO_PING_PONG!r})")
        wait_for_charts(tab, every=False)
        [series_url] = requested
        assert "/api/users/static%3Anightly-ci/series?" in series_url
        assert f"points={PAGE_CHART_POINTS}" in series_url and "detail=" in series_url
        assert tab.errors == []
