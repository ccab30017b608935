"""The regressions and compare pages, against a real perfdb started with --regression-detection that
holds a sustained drop (one alert) and two tags of one long-named test, 10 % slower in the second."""

from __future__ import annotations

import dataclasses
import random
import re
import secrets
import time
from collections.abc import Iterator
from html import unescape
from typing import Any

import pytest

from perfdb.client import Client
from tests.support import static_token_server
from tests.web.conftest import ARTIFACTS, dashboard_client, dashboard_process
from tests.web.parse import table_rows, text_of

TOKEN = "ci-" + secrets.token_hex(16)
USER = "static:ci"
SHIFTED_TEST = "unary"
LONG_TEST = "cpp_protobuf_async_streaming_from_server_qps_unconstrained_insecure_64b"
MESSAGES = 1_403_434  # a count that must show as 1,403,434, not 1.40343e+06
ALERT_DEADLINE = 60.0  # seconds: the analysis runs in the background, on a loaded machine


@dataclasses.dataclass(frozen=True)
class DetectingPerfdb:
    address: str
    alert: dict[str, Any]


def _noisy(rng: random.Random, level: float, count: int) -> list[float]:
    return [level * (1 + rng.gauss(0, 0.01)) for _ in range(count)]


def _wait_for_alert(client: Client) -> dict[str, Any]:
    """The first alert, polled until the background analysis has raised it."""
    deadline = time.monotonic() + ALERT_DEADLINE
    while time.monotonic() < deadline:
        alerts = list(client.regressions())
        if alerts:
            return alerts[0]
        time.sleep(0.2)
    raise AssertionError(f"no alert within {ALERT_DEADLINE} s")


@pytest.fixture(scope="module")
def detecting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DetectingPerfdb]:
    directory = tmp_path_factory.mktemp("perfdb-detecting")
    with static_token_server(directory, TOKEN, "ci", "--regression-detection", name="CI") as address:
        rng = random.Random(8)
        records = [
            {"access_token": TOKEN, "test_name": SHIFTED_TEST, "tag": "main", "metrics": {"qps": value}}
            for value in _noisy(rng, 1000.0, 40) + _noisy(rng, 850.0, 30)
        ]
        for tag, level in (("v1", 50_000.0), ("v2", 45_000.0)):
            records += [
                {
                    "access_token": TOKEN,
                    "test_name": LONG_TEST,
                    "tag": tag,
                    "metrics": {"qps": value, "messages": MESSAGES},
                }
                for value in _noisy(rng, level, 6)
            ]
        with Client(address) as client:
            acks = list(client.record_many(records))
            assert all(ack["ok"] for ack in acks), acks[:1]
            alert = _wait_for_alert(client)
        yield DetectingPerfdb(address, alert)


def _title(row: str) -> str:
    found = re.search(r'<span class="name[^"]*" title="([^"]*)"', row)
    assert found is not None, row
    return unescape(found.group(1))


async def test_regressions_page_lists_the_open_alert_with_its_links(detecting: DetectingPerfdb) -> None:
    alert = detecting.alert
    async with dashboard_client(detecting.address) as client:
        response = await client.get("/regressions")
        assert response.status == 200
        html = await response.text()
        api = await (await client.get("/api/regressions")).json()
        acknowledged = await (await client.get("/regressions?state=acknowledged")).text()
        bad = await client.get("/api/regressions?state=closed")
        bad_body = await bad.json()
    rows = table_rows(html, "alerts-table")
    assert len(rows) == 1 and f'data-alert-id="{alert["alert_id"]}"' in rows[0]
    row = rows[0]
    text = text_of(row)
    assert SHIFTED_TEST in text and "qps" in text and USER in text and "main" in text and "open" in text
    assert f"{alert['change_percent']:+.1f}%" in text and alert["change_percent"] < -10
    assert 'class="num change status-regression"' in row
    assert f'href="/results/{alert["record_id"]}"' in row
    assert f'href="/users/static%3Aci?test={SHIFTED_TEST}&amp;tag=main"' in row
    assert '<a href="/regressions" aria-current="page">' in html
    assert "<form" in html and 'method="post"' not in html
    assert [item["alert_id"] for item in api["alerts"]] == [alert["alert_id"]] and api["state"] == "open"
    assert 'id="no-alerts"' in acknowledged
    assert bad.status == 400 and bad_body["error"]["code"] == "bad_query"


async def test_compare_page_colours_the_regression_and_formats_counts(detecting: DetectingPerfdb) -> None:
    async with dashboard_client(detecting.address) as client:
        html = await (await client.get("/compare?base=v1&head=v2")).text()
        api = await (await client.get("/api/compare?base=v1&head=v2&test=" + LONG_TEST)).json()
        empty_form = await (await client.get("/compare")).text()
        missing = await client.get("/api/compare?base=v1")
        missing_body = await missing.json()
    rows = {(_title(row), text_of(row).split()[1]): row for row in table_rows(html, "compare-table")}
    qps = rows[(LONG_TEST, "qps")]
    assert '<span class="chip status-regression">regression</span>' in qps
    assert re.search(r'class="num change status-regression">-\d', qps)
    assert "1 regression, 0 improvements, 1 unchanged" in html
    assert "e+" not in html and "1,403,434" in text_of(rows[(LONG_TEST, "messages")])
    # The long name keeps its distinguishing tail; the full name is the tooltip.
    shown = text_of(qps).split()[0]
    assert shown.endswith("_unconstrained_insecure_64b") and "\u2026" in shown and len(shown) < len(LONG_TEST)
    assert [(row["test_name"], row["status"]) for row in api["rows"] if row["metric"] == "qps"] == [
        (LONG_TEST, "regression")
    ]
    assert api["rows"][0]["pvalue"] <= 0.05
    assert 'id="compare-form"' in empty_form and 'id="compare-table"' not in empty_form
    assert missing.status == 400 and missing_body["error"]["code"] == "bad_query"


async def test_user_chart_lines_carry_the_change_point(detecting: DetectingPerfdb) -> None:
    alert = detecting.alert
    async with dashboard_client(detecting.address) as client:
        response = await client.get(f"/api/users/static%3Aci/series?test={SHIFTED_TEST}&tag=main")
        assert response.status == 200
        data = await response.json()
    qps = [line for line in data["lines"] if line["metric"] == "qps"]
    assert len(qps) == 1
    assert [(mark["alert_id"], mark["record_id"]) for mark in qps[0]["marks"]] == [
        (alert["alert_id"], alert["record_id"])
    ]
    since, until = data["range"]
    assert since <= qps[0]["marks"][0]["time"] <= until
    latency = [line for line in data["lines"] if line["metric"] != "qps"]
    assert all(line["marks"] == [] for line in latency)


def test_regressions_and_compare_in_a_browser(detecting: DetectingPerfdb) -> None:
    from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with dashboard_process(detecting.address) as dashboard, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.goto(dashboard.url + "/regressions")
            assert page.locator("#alerts-table tbody tr").count() == 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "regressions.png"), full_page=True)
            page.click("nav a[href='/compare']")
            page.fill("#f-base", "v1")
            page.fill("#f-head", "v2")
            page.click("#compare-form button[type=submit]")
            page.wait_for_selector("#compare-table")
            colour = page.eval_on_selector("#compare-table .chip.status-regression", "e => getComputedStyle(e).color")
            assert colour == "rgb(180, 35, 24)"
            page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
            # The user chart with its change point draws without errors.
            page.goto(dashboard.url + f"/users/static%3Aci?test={SHIFTED_TEST}&tag=main")
            page.wait_for_selector("#charts canvas")
            page.screenshot(path=str(ARTIFACTS / "user-change-point.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
