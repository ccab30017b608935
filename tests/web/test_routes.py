"""Every dashboard route through aiohttp's test client, against a real perfdb server holding
two months of results from several users and the real gRPC result files."""

from __future__ import annotations

import html
import itertools
import json
import re
from typing import Any

import orjson
import pytest

from perfdb import PROTOCOL_VERSION
from perfdb.client import AsyncClient
from perfdb.records.units import CORE_METRIC_NAMES
from perfdb.web import source as source_module
from perfdb.web.assets import BUNDLES, STATIC_DIR
from perfdb.web.pages import PAGE_CHART_POINTS
from tests.web.conftest import SeededPerfdb, dashboard_client, newest_first
from tests.web.parse import Page, parse_page
from tests.web.seed import DAY, GRPC_USER, GRPC_USER_NAME, HOSTILE_TAG, USERS

NIGHTLY = "static:nightly-ci"
UNARY = "cpp_protobuf_async_unary_qps_unconstrained_insecure"
GO_PING_PONG = "go_generic_sync_streaming_ping_pong"


async def _page(client: Any, url: str, status: int = 200) -> tuple[Page, str]:
    response = await client.get(url)
    text = await response.text()
    assert response.status == status, (url, response.status, text[:500])
    assert response.content_type == "text/html"
    return parse_page(text), text


async def _json(client: Any, url: str, status: int = 200) -> Any:
    response = await client.get(url)
    assert response.status == status, (url, response.status, await response.text())
    assert response.content_type == "application/json"
    return await response.json()


def _embedded(text: str, element_id: str) -> Any:
    """The JSON a page carries in its `<script type="application/json">` block of that id."""
    found = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', text, re.DOTALL)
    assert found is not None, element_id
    return json.loads(found.group(1))


async def _all_stored(seeded: SeededPerfdb) -> list[dict[str, Any]]:
    """Every record as perfdb itself returns it, newest first."""
    async with AsyncClient(seeded.address) as client:
        return newest_first([record async for record in client.get_all()])


# -- the results table ---------------------------------------------------------------------


async def test_results_table_shows_the_newest_results_in_readable_units(seeded: SeededPerfdb) -> None:
    stored = await _all_stored(seeded)
    async with dashboard_client(seeded.address) as client:
        page, text = await _page(client, "/")
    assert page.record_ids == [record["record_id"] for record in stored[:50]]
    assert page.headers == ["time", "user", "test", "tag", *CORE_METRIC_NAMES]
    assert page.sorted_header == ("time", "descending")
    # The real gRPC result, in the units people read (values from the fixture file).
    unary = page.rows[page.record_ids.index(seeded.data.grpc_record_ids[0])]
    cells = dict(zip(page.headers, unary.cells, strict=True))
    assert cells["test"].text == UNARY
    assert cells["test"].links == [f"/results/{seeded.data.grpc_record_ids[0]}"]
    assert cells["user"].text == GRPC_USER_NAME
    assert cells["user"].links == ["/users/static%3Agrpc-bench"]
    assert (cells["qps"].text, cells["qps_per_core"].text) == ("221,994", "18,500")
    assert [cells[name].text for name in ("perc_lat_50", "perc_lat_99", "perc_lat_99_point_9")] == [
        "28.6 ms",
        "55.2 ms",
        "70.2 ms",
    ]
    assert (cells["server_system_time"].text, cells["client_user_time"].text) == ("131.2%", "391.0%")
    assert cells["qps"].value == "221994.3080820922"
    # A result without CPU times (the cheri files) shows a dash, not a zero.
    cheri = page.rows[page.record_ids.index(seeded.data.grpc_record_ids[1])]
    assert dict(zip(page.headers, cheri.cells, strict=True))["server_user_time"].text == "-"
    # Microsecond latencies of the synthetic results.
    assert any(cell.text.endswith(" µs") for cell in page.column("perc_lat_50"))
    assert "next" in page.links and "prev" not in page.links
    assert "Traceback" not in text


async def test_paging_by_time_visits_every_result_once_both_ways(seeded: SeededPerfdb) -> None:
    stored = await _all_stored(seeded)
    expected = [record["record_id"] for record in stored]
    async with dashboard_client(seeded.address) as client:
        for start, order in (("/?per_page=100", expected), ("/?per_page=100&order=asc", expected[::-1])):
            pages: list[list[str]] = []
            url: str | None = start
            while url is not None:
                page, _ = await _page(client, url)
                pages.append(page.record_ids)
                url = page.links.get("next")
            assert [record_id for ids in pages for record_id in ids] == order
            assert [len(ids) for ids in pages] == [100, 100, 100, len(order) - 300]
            # And back again from the last page: the same pages in reverse, ending at the first.
            backwards = [pages[-1]]
            while "prev" in page.links:
                page, _ = await _page(client, page.links["prev"])
                backwards.append(page.record_ids)
            assert backwards[::-1] == pages
            assert "first" not in page.links
            # The far end in one step: the last full page of the order, with no further link.
            last, _ = await _page(client, page.links["last"])
            assert last.record_ids == order[-100:] and "next" not in last.links and "last" not in last.links
            before_last, _ = await _page(client, last.links["prev"])
            assert before_last.record_ids == order[-200:-100]


async def test_a_position_outside_the_date_range_is_an_empty_page(seeded: SeededPerfdb) -> None:
    newest = seeded.data.grpc_record_ids[-1]
    oldest = seeded.data.records[0]["record_id"]
    async with dashboard_client(seeded.address) as client:
        for url in (f"/?order=asc&after={newest}&to=2000-01-01", f"/?before={oldest}&from=2030-01-01"):
            page, text = await _page(client, url)
            assert page.rows == [] and "No results match these filters." in text, url


async def test_sorting_by_a_metric_ranks_every_result_of_the_range(seeded: SeededPerfdb) -> None:
    stored = await _all_stored(seeded)
    qps = sorted((record["metrics"]["qps"] for record in stored), reverse=True)
    async with dashboard_client(seeded.address) as client:
        page, text = await _page(client, "/?sort=qps&per_page=200")
        values = [float(cell.value or "nan") for cell in page.column("qps")]
        assert values == qps[:200]
        assert page.sorted_header == ("qps", "descending")
        assert "highest (best) first" in text
        second, _ = await _page(client, page.links["next"])
        assert [float(cell.value or "nan") for cell in second.column("qps")] == qps[200:]
        # The header of the sorted column flips the order; latency starts with the lowest.
        ascending, _ = await _page(client, page.header_links["qps"])
        assert ascending.sorted_header == ("qps", "ascending")
        assert float(ascending.column("qps")[0].value or "nan") == qps[-1]
        latency, _ = await _page(client, page.header_links["perc_lat_99"])
        p99 = sorted(record["metrics"]["perc_lat_99"] for record in stored)
        assert float(latency.column("perc_lat_99")[0].value or "nan") == p99[0]
        # Results without the metric come last, whichever the order.
        for order in ("asc", "desc"):
            last, _ = await _page(client, f"/?sort=client_user_time&order={order}&per_page=500")
            assert last.column("client_user_time")[-1].text == "-"
            assert last.column("client_user_time")[0].text != "-"
        # Pages go back exactly: the trail of cursors in the URL leads to the page before.
        back, _ = await _page(client, second.links["prev"])
        assert back.record_ids == page.record_ids and "prev" not in back.links
        assert "last" not in page.links  # a ranking has no cheap far end
        # perfdb ranks by time and metrics: text columns are filters, so their headers do not sort.
        assert set(page.header_links) == {"time", *CORE_METRIC_NAMES}
        assert "sort=user" not in text


async def test_filters_narrow_the_table_to_what_they_name(seeded: SeededPerfdb) -> None:
    records = seeded.data.records
    first_day = records[0]["timestamp"][:10]

    def expected(select: Any) -> list[str]:
        return [record["record_id"] for record in newest_first([record for record in records if select(record)])]

    cases = {
        f"test={GO_PING_PONG}": expected(lambda record: record["test_name"] == GO_PING_PONG),
        "tag=nightly": expected(lambda record: record["tag"] == "nightly"),
        "user=209876543210987654321": expected(lambda record: record["user_id"] == "209876543210987654321"),
        "q=ada+unary": expected(
            lambda record: record["user_id"] == "108234567890123456789" and "unary" in record["test_name"]
        ),
        "q=RELEASE": expected(lambda record: record["tag"] == "release-1.6x"),
        f"from={first_day}&to={first_day}": expected(lambda record: record["timestamp"].startswith(first_day)),
        f"tag=nightly&test={UNARY}&from=2000-01-01": expected(
            lambda record: record["tag"] == "nightly" and record["test_name"] == UNARY
        ),
    }
    async with dashboard_client(seeded.address) as client:
        for query, ids in cases.items():
            assert ids, query
            for order in ("", "&sort=qps"):
                page, text = await _page(client, f"/?{query}&per_page=500{order}")
                assert sorted(page.record_ids) == sorted(ids), query
                if not order:
                    assert page.record_ids == ids, query
            # The filters survive in the form and in the paging and sorting links.
            assert "next" not in page.links
            assert all("per_page=500" in link for link in page.header_links.values())
        empty, text = await _page(client, "/?test=no-such-test")
        assert empty.rows == [] and "No results match these filters." in text


async def test_a_search_that_matches_little_goes_on_page_by_page_without_gaps(
    seeded: SeededPerfdb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_module, "SEARCH_BUDGET", 60)
    monkeypatch.setattr(source_module, "PAGE_LIMIT", 30)
    hostile = next(record for record in seeded.data.records if record["user_id"] == "hostile")  # the oldest
    async with dashboard_client(seeded.address) as client:
        found: list[str] = []
        empty_pages: list[str] = []
        url: str | None = "/?q=mallory"
        while url is not None:
            page, text = await _page(client, url)
            found += page.record_ids
            if not page.record_ids:
                assert "The search is done by the dashboard, not by perfdb: this page examined 60 results" in text
                empty_pages.append(url)
            url = page.links.get("next")
        assert found == [hostile["record_id"]]
        assert len(empty_pages) > 3
        # Back from an empty page goes on searching toward the newest, and ends at the first page.
        page, _ = await _page(client, empty_pages[2])
        steps = 0
        while "prev" in page.links:
            page, _ = await _page(client, page.links["prev"])
            assert page.record_ids == []
            steps += 1
        assert 1 <= steps <= 3


async def test_columns_can_be_chosen(seeded: SeededPerfdb) -> None:
    async with dashboard_client(seeded.address) as client:
        page, _ = await _page(client, "/?cols=qps,perc_lat_99")
        assert page.headers == ["time", "test", "qps", "perc_lat_99"]
        assert all(len(row.cells) == 4 for row in page.rows)
        # The checkboxes send one `cols` each, after an empty one (so that none at all means none).
        boxes, _ = await _page(client, "/?cols=&cols=user&cols=perc_lat_50")
        assert boxes.headers == ["time", "user", "test", "perc_lat_50"]
        none, _ = await _page(client, "/?cols=")
        assert none.headers == ["time", "test"]
        # Sorting keeps the choice.
        assert "cols=user%2Cperc_lat_50" in boxes.header_links["perc_lat_50"]
        bad, _ = await _page(client, "/?cols=qps,bogus", status=400)
        assert bad.ids["error-message"] == "cols: unknown column 'bogus'"


async def test_api_results_is_the_table_as_json(seeded: SeededPerfdb) -> None:
    async with dashboard_client(seeded.address) as client:
        page, _ = await _page(client, "/?per_page=25&tag=nightly")
        data = await _json(client, "/api/results?per_page=25&tag=nightly")
        assert [row["record_id"] for row in data["results"]] == page.record_ids
        assert {row["tag"] for row in data["results"]} == {"nightly"}
        assert data["results"][0]["user_name"] == "Nightly CI"
        assert set(data["results"][0]["metrics"]) == set(CORE_METRIC_NAMES)
        assert (data["sort"], data["order"]) == ("time", "desc")
        following = await _json(client, data["links"]["next"])
        next_page, _ = await _page(client, page.links["next"])
        assert [row["record_id"] for row in following["results"]] == next_page.record_ids
        assert data["links"]["next"].startswith("/api/results?")
        last = await _json(client, data["links"]["last"])
        nightly = newest_first([record for record in seeded.data.records if record["tag"] == "nightly"])
        assert [row["record_id"] for row in last["results"]] == [record["record_id"] for record in nightly[-25:]]
        assert last["links"]["last"] is None and last["links"]["next"] is None and last["note"] is None


# -- one result ------------------------------------------------------------------------------


async def test_result_page_shows_metrics_configuration_and_raw_json(seeded: SeededPerfdb) -> None:
    record_id = seeded.data.grpc_record_ids[0]
    stored = {record["record_id"]: record for record in await _all_stored(seeded)}[record_id]
    async with dashboard_client(seeded.address) as client:
        page, text = await _page(client, f"/results/{record_id}")
        data = await _json(client, f"/api/results/{record_id}")
    assert data["record"] == stored
    assert data["user"] == {"name": GRPC_USER_NAME, "user_id": GRPC_USER}
    assert page.ids["raw-json"] and orjson.loads(page.ids["raw-json"]) == stored
    metrics = page.ids["metrics"]
    for expected in ("QPS", "221,994", "p99.9", "70.2 ms", "srv user", "504.0%", "successfulRequestsPerSecond"):
        assert expected in metrics
    assert "ASYNC_CLIENT" in page.ids["client-config"] and "clientType" in page.ids["client-config"]
    assert "ASYNC_SERVER" in page.ids["server-config"]
    assert "server_cores" in page.ids["scenario"] and "12" in page.ids["scenario"]
    assert f'href="/users/static%3Agrpc-bench?test={UNARY}"' in text
    assert UNARY in re.search(r"<h1>(.*?)</h1>", text).group(1)  # type: ignore[union-attr]


async def test_result_page_finds_an_imported_result_among_its_neighbours(seeded: SeededPerfdb) -> None:
    # Old results have thousands of newer ones after them: the lookup must not depend on that.
    for record in (seeded.data.records[0], seeded.data.records[len(seeded.data.records) // 2]):
        async with dashboard_client(seeded.address) as client:
            data = await _json(client, f"/api/results/{record['record_id']}")
        assert data["record"]["record_id"] == record["record_id"]
        assert data["record"]["metrics"] == record["metrics"]


async def test_unknown_or_malformed_result_ids_are_readable_404s(seeded: SeededPerfdb) -> None:
    async with dashboard_client(seeded.address) as client:
        page, _ = await _page(client, "/results/00000000000000000000", status=404)
        assert page.ids["error-message"] == "perfdb has no result 00000000000000000000."
        page, _ = await _page(client, "/results/not-an-id", status=404)
        assert "result ids are 20 hexadecimal digits" in page.ids["error-message"]
        error = await _json(client, "/api/results/0661660d462d38000000", status=404)
        assert error["error"]["code"] == "not_found"


# -- users ---------------------------------------------------------------------------------


# The user page's charts: tests/web/test_charts.py.


async def test_unknown_user_is_a_readable_404(seeded: SeededPerfdb) -> None:
    async with dashboard_client(seeded.address) as client:
        page, _ = await _page(client, "/users/nobody-here", status=404)
        assert page.ids["error-message"] == "perfdb has no user 'nobody-here'."
        error = await _json(client, "/api/users/nobody-here/series", status=404)
        assert error["error"]["code"] == "not_found"


# -- the overview ------------------------------------------------------------------------------


def _best_per_user(records: list[dict[str, Any]], test: str, metric: str, highest: bool) -> list[tuple[str, float]]:
    best: dict[str, float] = {}
    for record in records:
        if record["test_name"] == test and metric in record["metrics"]:
            value = record["metrics"][metric]
            if record["user_id"] not in best or (value > best[record["user_id"]]) == highest:
                best[record["user_id"]] = value
    return sorted(best.items(), key=lambda item: -item[1] if highest else item[1])


async def test_overview_histogram_and_leaderboard_of_a_test(seeded: SeededPerfdb) -> None:
    records = seeded.data.records
    streaming = "cpp_protobuf_async_streaming_qps_unconstrained_secure"
    async with dashboard_client(seeded.address) as client:
        for metric, highest in (("qps", True), ("perc_lat_99", False)):
            data = await _json(client, f"/api/overview?metric={metric}&test={streaming}&from=&to=")
            of_test = [record for record in records if record["test_name"] == streaming]
            histogram = data["histogram"]
            assert sum(item["count"] for item in histogram["bins"]) == len(of_test) == data["results"]
            assert histogram["bins"][0]["low"] == min(record["metrics"][metric] for record in of_test)
            assert histogram["bins"][-1]["high"] == max(record["metrics"][metric] for record in of_test)
            board = data["leaderboard"]
            assert board["test"] == streaming
            assert [(entry["user_id"], entry["value"]) for entry in board["entries"]] == _best_per_user(
                records, streaming, metric, highest
            )
            assert data["metric"]["higher_is_better"] is highest
        api = await _json(client, f"/api/overview?metric=qps&test={streaming}&from=&to=")
        page, text = await _page(client, f"/overview?metric=qps&test={streaming}&from=&to=")
    # The page carries the API's reply, so its histogram draws without a second request.
    assert _embedded(text, "histogram-data") == api
    names = re.findall(r'<td class="user"><a href="[^"]*" title="[^"]*">([^<]*)</a>', text)
    assert names == [USERS[user_id]["name"] for user_id, _ in _best_per_user(records, streaming, "qps", True)]
    assert len(names) == 3
    assert 'data-api="/api/overview?metric=qps&amp;test=' in text
    assert page.ids["stat-results"] == str(len([r for r in records if r["test_name"] == streaming]))


async def test_overview_defaults_to_the_most_frequent_test_over_all_time(seeded: SeededPerfdb) -> None:
    async with dashboard_client(seeded.address) as client:
        data = await _json(client, "/api/overview")
        everything = await _json(client, "/api/overview?test=")
        latency = await _json(client, "/api/overview?metric=perc_lat_99&test=")
        page, text = await _page(client, "/overview")
    # Grace runs the Go ping-pong on weekdays on top of the nightly run: it is the most frequent.
    assert data["test"] == GO_PING_PONG and data["leaderboard"]["test"] == GO_PING_PONG
    assert data["results"] == len([r for r in seeded.data.records if r["test_name"] == GO_PING_PONG])
    assert everything["test"] == "" and everything["leaderboard"]["test"] == GO_PING_PONG
    total = len(seeded.data.records) + len(seeded.data.grpc_record_ids)
    assert everything["results"] == total and sum(item["count"] for item in everything["histogram"]["bins"]) == total
    assert everything["users"] == len(USERS) + 1
    # Latencies span microseconds (ping-pong) to hundreds of milliseconds (the cheri files).
    bins = latency["histogram"]["bins"]
    assert bins[0]["low"] < 100 and bins[-1]["high"] > 100_000
    assert all(low["high"] == pytest.approx(high["low"]) for low, high in itertools.pairwise(bins))
    assert f'<option value="{GO_PING_PONG}" selected>' in text
    assert page.ids["stat-tests"] == "6"
    # Each leaderboard row links to that user's results of the test, best first.
    assert f'href="/?test={GO_PING_PONG}&amp;user=209876543210987654321&amp;sort=qps"' in text


# -- safety and plumbing ---------------------------------------------------------------------


async def test_names_and_tags_holding_html_are_shown_as_text(seeded: SeededPerfdb) -> None:
    hostile = next(record for record in seeded.data.records if record["user_id"] == "hostile")
    async with dashboard_client(seeded.address) as client:
        pages = [
            await _page(client, "/?user=hostile"),
            await _page(client, f"/results/{hostile['record_id']}"),
            await _page(client, "/users/hostile"),
            await _page(client, f"/overview?test={UNARY}&from=&to=&tag={HOSTILE_TAG}"),
        ]
    for _, text in pages:
        assert "<script>window.hacked" not in text and "<img src=x" not in text
        assert "&lt;script&gt;window.hacked=1&lt;/script&gt;Mallory" in text or "&lt;img src=x" in text
    # The overview's embedded data holds the hostile name as JSON text, whole, ending no element.
    overview = _embedded(pages[3][1], "histogram-data")
    names = [entry["user_name"] for entry in overview["leaderboard"]["entries"]]
    assert "<script>window.hacked=1</script>Mallory" in names
    table, _ = pages[0]
    assert table.column("tag")[0].text == HOSTILE_TAG
    assert table.column("user")[0].text == "<script>window.hacked=1</script>Mallory"


async def test_bad_query_values_are_explained_not_crashed_on(seeded: SeededPerfdb) -> None:
    cases = {
        "/?from=yesterday": "from: expected a date like 2026-01-31",
        "/?from=2026-02-30": "from: '2026-02-30' is not a date",
        "/?from=2026-02-01&to=2026-01-01": "to: must be later than from",
        "/?sort=shoe_size": "sort: must be one of time, qps, qps_per_core",
        "/?sort=user": "sort: must be one of time, qps",
        "/?sort=qps&trail=0661660d462d38000000": "trail: not a list of positions in a sorted table",
        "/?per_page=7": "per_page: must be one of 25, 50, 100, 200, 500",
        "/?before=xyz": "before: not a result id",
        "/?before=0661660d462d38000000&after=0661660d462d38000000": "give one of them, not several",
        "/overview?metric=shoe_size": "metric: must be one of qps",
        "/?test=" + "x" * 300: "test: at most 256 characters",
    }
    async with dashboard_client(seeded.address) as client:
        for url, message in cases.items():
            page, text = await _page(client, url, status=400)
            assert message in page.ids["error-message"], (url, page.ids)
            assert "Traceback" not in text
        error = await _json(client, "/api/results?from=yesterday", status=400)
        assert error["error"]["code"] == "bad_query" and error["error"]["message"].startswith("from:")
        missing, _ = await _page(client, "/no/such/page", status=404)
        assert missing.ids["error-message"] == "There is no such page here."


async def test_health_api_index_and_security_headers(seeded: SeededPerfdb) -> None:
    async with dashboard_client(seeded.address) as client:
        health = await _json(client, "/api/health")
        assert (health["perfdb"], health["server"], health["protocol_version"]) == (
            "ok",
            seeded.address,
            PROTOCOL_VERSION,
        )
        _, text = await _page(client, "/api")
        for path in ("/api/results", "/api/results/{record_id}", "/api/users/{user_id}/series", "/api/overview"):
            assert f"GET {path}" in text
        response = await client.get("/")
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_chart_pages_carry_their_api_data_and_no_inline_script(seeded: SeededPerfdb) -> None:
    async with dashboard_client(seeded.address) as client:
        for path in ("/users/static:nightly-ci", "/users/static:nightly-ci?detail=" + GO_PING_PONG,
                     f"/tests/{GO_PING_PONG}", "/", "/overview"):  # fmt: skip
            response = await client.get(path, headers={"Accept-Encoding": "gzip"})
            text = await response.text()
            assert response.headers["Content-Encoding"] == "gzip"
            policy = response.headers["Content-Security-Policy"]
            assert policy.split("script-src", 1)[1].split(";", 1)[0].strip() == "'self'"
            # Scripts in the page other than JSON data blocks and files: none.
            assert re.findall(r"<script(?![^>]*(?:\bsrc=|application/json))", text) == [], path
            if path in ("/", "/overview"):
                assert 'id="chart-data"' not in text
                continue
            # The charts' data is the API's reply, at the widest charts' resolution.
            block = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', text, re.S)
            api = re.search(r'id="charts" data-api="([^"]+)"', text)
            assert block is not None and api is not None, path
            query = path.partition("?")[2]
            url = html.unescape(api.group(1))
            assert f"points={PAGE_CHART_POINTS}" in url
            url += f"&{query}" if query else ""
            reply = await client.get(url)
            assert reply.status == 200 and json.loads(block.group(1)) == await reply.json(), path


async def test_static_assets_come_from_the_package_with_the_uplot_licence(seeded: SeededPerfdb) -> None:
    assert "MIT License" in (STATIC_DIR / "vendor" / "uplot" / "LICENSE").read_text()
    async with dashboard_client(seeded.address) as client:
        _, text = await _page(client, "/users/static:nightly-ci")
        assets = [asset.replace("&amp;", "&") for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', text)]
        # One stylesheet and one script: each a bundle of the files the page needs.
        assert [asset.split("?")[0] for asset in assets] == [
            "/static/favicon.svg",
            "/static/bundle/dashboard.css",
            "/static/bundle/charts.js",
        ]
        for asset in assets:
            response = await client.get(asset)  # the test client takes gzip and decodes it
            assert response.status == 200, asset
            assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            body = await response.read()
            path = asset.split("?")[0].removeprefix("/static/")
            if not path.startswith("bundle/"):
                assert body == (STATIC_DIR / path).read_bytes()
                continue
            assert response.headers["Content-Encoding"] == "gzip" and response.headers["Vary"] == "Accept-Encoding"
            parts = [(STATIC_DIR / part).read_bytes().rstrip() for part in BUNDLES[path.removeprefix("bundle/")]]
            positions = [body.index(part) for part in parts]  # each whole, in order
            assert positions == sorted(positions) and len(body) < sum(map(len, parts)) + 16
            plain = await client.get(asset, headers={"Accept-Encoding": "identity"})
            assert "Content-Encoding" not in plain.headers and await plain.read() == body
        licence = await client.get("/static/vendor/uplot/LICENSE")
        assert "Leon Sorokin" in await licence.text()
        # Pages without charts load no charting code.
        _, table = await _page(client, "/")
        assert re.findall(r'<script src="(/static/[^"?]+)', table) == ["/static/bundle/dashboard.js"]
        missing = await client.get("/static/bundle/nothing.js")
        assert missing.status == 404
    # No page refers to anything outside the dashboard: it works offline.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', text)


async def test_no_page_reads_a_bounded_scan(seeded: SeededPerfdb) -> None:
    stored = await _all_stored(seeded)
    async with dashboard_client(seeded.address) as client:
        page, _text = await _page(client, "/?sort=qps&per_page=500")
        data = await _json(client, "/api/users/static:nightly-ci/series")
        overview = await _json(client, "/api/overview?test=")
        by_time, _ = await _page(client, "/?per_page=200")
    # Sorting ranks every result and the overview counts every one: perfdb does both.
    qps = sorted((record["metrics"]["qps"] for record in stored), reverse=True)
    assert [float(cell.value or "nan") for cell in page.column("qps")] == qps[:500]
    assert overview["results"] == len(stored)
    # Charts are downsampled by perfdb instead: every result is in them.
    assert data["results"] == len(seeded.data.of_user(NIGHTLY)) and data["note"] is None
    # Paging by time is not bounded that way: a page of 200 is a page of 200.
    assert len(by_time.record_ids) == 200


async def test_dates_of_the_seed_span_two_months(seeded: SeededPerfdb) -> None:
    # Guards the other tests' assumptions about the data they read.
    first, last = seeded.data.records[1], seeded.data.records[-1]
    span = int(last["record_id"][:14], 16) - int(first["record_id"][:14], 16)
    assert 58 * DAY < span < 61 * DAY
