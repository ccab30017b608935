"""A result's stored verdicts on its page, and two results picked in the results table compared by id, against a
real perfdb started with --regression-detection: one series of a dozen steady results, then a drop (a regression),
and one imported result (never judged)."""

from __future__ import annotations

import dataclasses
import random
import re
import secrets
import urllib.parse
from collections.abc import Iterator
from html import unescape
from typing import Any

import pytest

from perfdb.client import Client
from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.web.queries import CompareView, QueryError, picked_pair
from tests.support import static_token_server
from tests.web.conftest import ARTIFACTS, dashboard_client, dashboard_process
from tests.web.parse import table_rows, text_of
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS

TOKEN = "judged-" + secrets.token_hex(16)
ADMIN_KEY = "admin-" + secrets.token_hex(16)
TEST = "cpp_protobuf_sync_unary_ping_pong_secure"
IMPORTED_TEST = "go_generic_sync_streaming_ping_pong"


@dataclasses.dataclass(frozen=True)
class JudgedPerfdb:
    address: str
    acks: list[dict[str, Any]]  # the record replies, oldest first; the last one a regression of qps
    imported_id: str


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JudgedPerfdb]:
    directory = tmp_path_factory.mktemp("perfdb-judged")
    admin_key_file = directory / "admin.key"
    admin_key_file.write_text(ADMIN_KEY)
    with static_token_server(
        directory, TOKEN, "ci", "--regression-detection", f"--admin-key-file={admin_key_file}", name="CI"
    ) as address:
        rng = random.Random(41)
        values = [(1000 * (1 + rng.gauss(0, 0.01)), 250 * (1 + rng.gauss(0, 0.01))) for _ in range(12)]
        values.append((800.0, 252.0))
        records = [
            {"access_token": TOKEN, "test_name": TEST, "tag": "main", "metrics": {"qps": qps, "perc_lat_99": p99}}
            for qps, p99 in values
        ]
        micros = now_micros() - 60_000_000
        imported_id = make_record_id(micros, 0)
        imported = {"record_id": imported_id, "user_id": "static:ci", "timestamp": format_micros(micros),
                    "test_name": IMPORTED_TEST, "metrics": {"qps": 40_000.0}}  # fmt: skip
        with Client(address) as client:
            acks = list(client.record_many(records))
            assert all(ack["ok"] for ack in acks), acks[:1]
            # Acknowledged after the records' replies, the import is committed after their verdicts.
            reply = client.call("import", admin_key=ADMIN_KEY, records=[imported], users={"static:ci": {}})
            assert reply["imported"] == 1, reply
        yield JudgedPerfdb(address, acks, imported_id)


async def test_a_result_page_shows_the_verdicts_perfdb_stored(judged: JudgedPerfdb) -> None:
    regression = judged.acks[-1]
    async with dashboard_client(judged.address) as client:
        html = await (await client.get(f"/results/{regression['record_id']}")).text()
        api = await (await client.get(f"/api/results/{regression['record_id']}")).json()
        first = await (await client.get(f"/results/{judged.acks[0]['record_id']}")).text()
    assert api["verdicts"] == regression["verdicts"]
    rows = {re.search(r'data-metric="([^"]+)"', row).group(1): row for row in table_rows(html, "verdicts-table")}  # type: ignore[union-attr]
    assert list(rows) == ["qps", "perc_lat_99"]
    qps = next(item for item in regression["verdicts"] if item["metric"] == "qps")
    assert qps["status"] == "regression"
    row = rows["qps"]
    assert '<span class="chip status-regression">regression</span>' in row
    assert f'class="num change status-regression">{qps["change_percent"]:+.1f}%' in row
    text = text_of(row)
    threshold = qps["threshold"]
    assert (
        text.startswith("QPS regression 800 12 ")
        and f"({threshold['percent']:.1f} %, {threshold['governed_by']})" in text
    )
    assert "window 30 · min 5 · 3 sigmas · 5 %" in text
    assert f'title="{qps["baseline"]["mean"]!r}"' in row and f'title="{qps["baseline"]["stddev"]!r}"' in row
    assert "status-row-no_change" in rows["perc_lat_99"] and "no change" in text_of(rows["perc_lat_99"])
    # The first result of the series was judged too, against nothing yet.
    assert [text_of(row).split()[1:3] for row in table_rows(first, "verdicts-table")] == [["too", "few"]] * 2
    assert 'id="no-verdicts"' not in html


async def test_a_result_without_stored_verdicts_says_so(judged: JudgedPerfdb) -> None:
    async with dashboard_client(judged.address) as client:
        html = await (await client.get(f"/results/{judged.imported_id}")).text()
        api = await (await client.get(f"/api/results/{judged.imported_id}")).json()
    assert 'id="no-verdicts"' in html and "No verdict stored for this result" in html
    assert 'id="verdicts-table"' not in html
    assert api["verdicts"] is None and api["record"]["record_id"] == judged.imported_id


async def test_two_picked_results_are_compared_by_id(judged: JudgedPerfdb) -> None:
    older, newer = judged.acks[3]["record_id"], judged.acks[-1]["record_id"]
    async with dashboard_client(judged.address) as client:
        table = await (await client.get("/?test=" + TEST)).text()
        # Picked in any order, the older is the base; the canonical URL names each side.
        picked = await client.get(f"/compare?pick={newer}&pick={older}", allow_redirects=False)
        html = await (await client.get(picked.headers["Location"])).text()
        api = await (await client.get(f"/api/compare?base_ids={older}&head_ids={newer}")).json()
        mixed = await (await client.get(f"/compare?base=main&head_ids={newer}")).text()
    assert 'id="compare-picks"' in table and 'action="/compare"' in table
    boxes = re.findall(
        r'<input type="checkbox" class="pick" name="pick" value="([0-9a-f]{20})" form="compare-picks"', table
    )
    assert set(boxes) == {ack["record_id"] for ack in judged.acks}
    assert picked.status == 303 and picked.headers["Location"] == f"/compare?base_ids={older}&head_ids={newer}"
    # What is compared: each side's result, linked.
    compared = re.search(r'<section class="card compared" id="compared">.*?</section>', html, re.S)
    assert compared is not None
    assert f'<li data-record-id="{older}"><a href="/results/{older}">' in compared.group(0)
    assert f'<li data-record-id="{newer}"><a href="/results/{newer}">' in compared.group(0)
    assert re.search(
        r'id="compared-base">.*?' + older + r".*?id=\"compared-head\">.*?" + newer, compared.group(0), re.S
    )
    assert "1 picked result against 1 picked result" in text_of(html)
    rows = {text_of(row).split()[1]: row for row in table_rows(html, "compare-table")}
    assert set(rows) == {"qps", "perc_lat_99"}
    base_qps = next(item for item in judged.acks[3]["verdicts"] if item["metric"] == "qps")["value"]
    change = (800.0 - base_qps) / base_qps * 100
    # One result a side is too few to judge, but the difference shows, uncoloured.
    assert "too few values" in text_of(rows["qps"]) and f">{change:+.1f}%</td>" in rows["qps"]
    assert 'class="num change status-insufficient_data"' in rows["qps"]
    assert 'name="base_ids"' in html and f'value="{older}"' in html and 'name="base"' not in html
    assert (api["base_ids"], api["head_ids"], api["base_tag"]) == ([older], [newer], None)
    assert api["base"]["records"] == 1 and api["head"]["missing"] == 0
    assert "13 results under main against 1 picked result" in text_of(mixed)
    assert 'id="compared-base"><h3>Base (before)</h3><p>Every result under the tag' in mixed


def test_a_comparison_by_id_is_a_link_that_reads_back_the_same() -> None:
    older, newer, other = "06620c6e0087c6000000", "06620c6e0087c7000000", "06620c6e0087c8000000"
    assert picked_pair([newer, older]) == (older, newer)
    view = CompareView.from_params({"base_ids": f" {older} , {other}", "head": "v2", "test": TEST})
    assert (view.base_ids, view.head, view.ready) == ((older, other), "v2", True)
    assert view.selector("base") == {"record_ids": [older, other]} and view.selector("head") == {"tag": "v2"}
    assert CompareView.from_params(dict(urllib.parse.parse_qsl(view.url().split("?", 1)[1]))) == view
    assert not CompareView.from_params({"base_ids": older}).ready
    with pytest.raises(QueryError, match="at most 50 result ids"):
        CompareView.from_params({"head_ids": ",".join(f"{n:020x}" for n in range(51))})


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("pick=06620c6e0087c6000000", "pick: tick two results to compare, not 1"),
        ("pick=06620c6e0087c6000000&pick=06620c6e0087c6000000", "pick: tick two results to compare, not 1"),
        ("pick=nope&pick=06620c6e0087c6000000", "pick: 'nope' is not a result id"),
        ("base=main&base_ids=06620c6e0087c6000000&head=x", "base: give a tag or result ids (base_ids), not both"),
        ("base_ids=06620c6e0087c6000000,zz&head=x", "base_ids: 'zz' is not a result id"),
        ("base_ids=06620c6e0087c6000000,06620c6e0087c6000000&head=x", "base_ids: names a result twice"),
    ],
)
async def test_bad_compare_links_are_refused_clearly(judged: JudgedPerfdb, query: str, message: str) -> None:
    async with dashboard_client(judged.address) as client:
        page = await client.get("/compare?" + query)
        page_text = unescape(await page.text())
        api = await client.get("/api/compare?" + query)
        api_body = await api.json()
        assert (await client.get("/api/health")).status == 200  # and the dashboard carries on
    assert page.status == 400 and message in page_text
    if not query.startswith("pick"):
        assert (
            api.status == 400 and api_body["error"]["code"] == "bad_query" and message in api_body["error"]["message"]
        )


def test_verdicts_and_picking_two_results_in_a_browser(judged: JudgedPerfdb) -> None:
    if not CHROMIUM.exists():
        pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    regression = judged.acks[-1]["record_id"]
    with dashboard_process(judged.address) as dashboard, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(15_000)
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            ARTIFACTS.mkdir(parents=True, exist_ok=True)

            page.goto(f"{dashboard.url}/results/{regression}")
            chip = "#verdicts-table tr[data-metric=qps] .chip"
            assert page.inner_text(chip) == "regression"
            assert page.eval_on_selector(chip, "e => getComputedStyle(e).color") == "rgb(180, 35, 24)"
            assert page.locator("#verdicts-table tbody tr").count() == 2
            page.screenshot(path=str(ARTIFACTS / "result-verdicts.png"), full_page=True)
            page.goto(f"{dashboard.url}/results/{judged.imported_id}")
            assert "No verdict stored" in page.inner_text("#no-verdicts")

            # The table: the button waits for two ticks, a third box cannot be ticked, and Compare opens them.
            page.goto(f"{dashboard.url}/?test={TEST}")
            button = page.locator("#compare-picked")
            assert button.is_disabled()
            boxes = page.locator("#results-table input.pick")
            assert boxes.count() == len(judged.acks)
            boxes.nth(0).check()  # the newest: the regression
            assert button.is_disabled() and "1 more result" in page.inner_text("#compare-hint")
            boxes.nth(5).check()
            assert button.is_enabled() and boxes.nth(2).is_disabled()
            page.screenshot(path=str(ARTIFACTS / "results-picked.png"), full_page=False)
            button.click()
            page.wait_for_selector("#compare-table")
            base = judged.acks[-6]["record_id"]
            assert page.url == f"{dashboard.url}/compare?base_ids={base}&head_ids={regression}"
            assert page.locator(f"#compared-base li[data-record-id='{base}']").count() == 1
            assert page.locator(f"#compared-head li[data-record-id='{regression}']").count() == 1
            assert page.locator("#compare-table tbody tr").count() == 2
            page.screenshot(path=str(ARTIFACTS / "compare-picked.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
