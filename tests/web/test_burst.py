"""The dashboard over HTTP after a burst: 24,000 results sent within seconds, six to a
microsecond. Every page is checked against a brute-force computation over the same records."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest

from perfdb.client import AsyncClient
from perfdb.storage import store as store_module
from perfdb.web import source as source_module
from tests.support import perfdb_with_provider
from tests.web.burst import BURST_TESTS, BURST_USERS, SHARED_MICROSECOND, build_burst
from tests.web.conftest import ADMIN_KEY, BurstPerfdb, dashboard_client
from tests.web.parse import Page, parse_page

TEST = BURST_TESTS[3]


async def _page(client: Any, url: str) -> tuple[Page, str]:
    response = await client.get(url)
    text = await response.text()
    assert response.status == 200, (url, response.status, text[:500])
    return parse_page(text), text


def _ids(records: list[dict[str, Any]]) -> list[str]:
    return [record["record_id"] for record in records]


async def test_the_table_shows_the_newest_results_of_a_burst_and_counts_them(burst: BurstPerfdb) -> None:
    async with dashboard_client(burst.address) as client:
        page, _ = await _page(client, "/?per_page=100")
        by_test, _ = await _page(client, f"/?test={TEST}&per_page=100")
        by_two, _ = await _page(client, f"/?test={TEST}&tag=nightly&user=burst-user-04&per_page=100")
    assert page.record_ids == _ids(burst.data.newest_first()[:100])
    assert page.ids["summary"].startswith(f"{len(burst.data.records):,} results in all.")
    assert by_test.record_ids == _ids(burst.data.newest_first(test_name=TEST)[:100])
    assert by_test.ids["summary"].startswith(f"{len(burst.data.newest_first(test_name=TEST)):,} results in all.")
    expected = burst.data.newest_first(test_name=TEST, tag="nightly", user_id="burst-user-04")
    assert expected and by_two.record_ids == _ids(expected[:100])


async def test_paging_forwards_then_backwards_returns_the_same_rows(burst: BurstPerfdb) -> None:
    newest = _ids(burst.data.newest_first())
    async with dashboard_client(burst.address) as client:
        for start, expected in (("/?per_page=25", newest), ("/?per_page=25&order=asc", newest[::-1])):
            forwards: list[list[str]] = []
            page, _ = await _page(client, start)
            for _ in range(6):
                forwards.append(page.record_ids)
                page, _ = await _page(client, page.links["next"])
            forwards.append(page.record_ids)
            assert [record_id for ids in forwards for record_id in ids] == expected[: 25 * 7]
            backwards = [page.record_ids]
            while "prev" in page.links:
                page, _ = await _page(client, page.links["prev"])
                backwards.append(page.record_ids)
            assert backwards[::-1] == forwards
        # The far end: the oldest 25, reached in one read.
        last, _ = await _page(client, "/?per_page=25&last=1")
        assert last.record_ids == newest[-25:]


async def test_sorting_by_qps_ranks_the_whole_burst(burst: BurstPerfdb) -> None:
    ranked = _ids(burst.data.by_qps())
    async with dashboard_client(burst.address) as client:
        first, text = await _page(client, "/?sort=qps&per_page=100")
        second, _ = await _page(client, first.links["next"])
        third, _ = await _page(client, second.links["next"])
        back, _ = await _page(client, third.links["prev"])
        of_test, _ = await _page(client, f"/?sort=qps&per_page=50&test={TEST}")
        slowest, _ = await _page(client, "/?sort=perc_lat_99&order=desc&per_page=50")
    # The true top, the oldest result of the burst, comes first.
    assert first.record_ids[0] == burst.data.records[0]["record_id"]
    assert first.record_ids + second.record_ids + third.record_ids == ranked[:300]
    assert back.record_ids == second.record_ids
    assert "perfdb ranked only" not in text
    assert of_test.record_ids == _ids(burst.data.by_qps(test_name=TEST)[:50])
    worst = sorted(burst.data.records, key=lambda record: (-record["metrics"]["perc_lat_99"], record["record_id"]))
    assert slowest.record_ids == _ids(worst[:50])


async def test_the_overview_counts_every_result_and_each_users_best(burst: BurstPerfdb) -> None:
    records = burst.data.records
    async with dashboard_client(burst.address) as client:
        response = await client.get(f"/api/overview?test={TEST}")
        data = await response.json()
        everything = await (await client.get("/api/overview?test=")).json()
        page, _ = await _page(client, f"/overview?test={TEST}")
    of_test = [record for record in records if record["test_name"] == TEST]
    assert data["results"] == len(of_test) == sum(item["count"] for item in data["histogram"]["bins"])
    assert everything["results"] == len(records)
    assert {test["name"]: test["count"] for test in everything["tests"]} == collections.Counter(
        record["test_name"] for record in records
    )
    best: dict[str, float] = {}
    for record in of_test:
        best[record["user_id"]] = max(best.get(record["user_id"], 0.0), record["metrics"]["qps"])
    board = [(entry["user_id"], entry["value"]) for entry in data["leaderboard"]["entries"]]
    assert board == sorted(best.items(), key=lambda item: (-item[1], item[0]))
    assert data["leaderboard"]["entries"][0]["user_name"] == BURST_USERS[board[0][0]]["name"]
    assert page.ids["stat-results"] == f"{len(of_test):,}" and page.ids["stat-users"] == str(len(best))


async def test_a_result_is_found_among_those_sharing_its_microsecond(burst: BurstPerfdb) -> None:
    middle = len(burst.data.records) // 2 // SHARED_MICROSECOND * SHARED_MICROSECOND
    async with dashboard_client(burst.address) as client:
        for record in burst.data.records[middle : middle + SHARED_MICROSECOND]:
            data = await (await client.get(f"/api/results/{record['record_id']}")).json()
            assert data["record"]["record_id"] == record["record_id"]
            assert data["record"]["metrics"] == record["metrics"]
            assert data["user"] == {"user_id": record["user_id"], **BURST_USERS[record["user_id"]]}
        # An id between two stored ones, in the same microsecond, is not found.
        missing = burst.data.records[middle]["record_id"][:14] + "0000ff"
        assert (await client.get(f"/results/{missing}")).status == 404


async def test_a_search_stays_bounded_and_says_so(burst: BurstPerfdb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "SEARCH_BUDGET", 2000)
    wanted = [record for record in burst.data.newest_first() if record["user_id"] == "burst-user-07"]
    async with dashboard_client(burst.address) as client:
        # Few results match "user 07 nightly": a page examines at most 2,000 before it stops.
        page, text = await _page(client, "/?q=user+07+nightly&per_page=500")
        expected = [record for record in wanted if record["tag"] == "nightly"]
        examined = set(_ids(burst.data.newest_first()[:2000]))  # two perfdb pages of 1,000
        assert "The search is done by the dashboard, not by perfdb: this page examined 2,000 results" in text
        assert page.record_ids == [r["record_id"] for r in expected if r["record_id"] in examined]
        assert 0 < len(page.record_ids) < 500
        # The next page goes on from where this one stopped: no result is skipped.
        following, _ = await _page(client, page.links["next"])
        assert following.record_ids[0] == _ids(expected)[len(page.record_ids)]
        # Sorted with a search, each page examines one block of perfdb's ranking.
        ranked, text = await _page(client, "/?q=user+07&sort=qps&per_page=50")
        block = [r for r in burst.data.by_qps()[:500] if r["user_id"] == "burst-user-07"]
        assert ranked.record_ids == _ids(block)
        assert "among results 1 to 500 by QPS" in text


async def test_a_cut_ranking_says_so_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = build_burst(600)
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY)
    async with perfdb_with_provider(tmp_path, admin_key_file=key_file, max_sort_examined=400) as (server, _):
        address = f"127.0.0.1:{server.port}"
        async with AsyncClient(address) as perfdb:
            users = {record["user_id"]: BURST_USERS[record["user_id"]] for record in data.records}
            await perfdb.call("import", admin_key=ADMIN_KEY, records=data.records[:500], users=users)
            await perfdb.call("import", admin_key=ADMIN_KEY, records=data.records[500:], users=users)
        async with dashboard_client(address) as client:
            indexed, indexed_text = await _page(client, "/?sort=qps&per_page=25")
            # Ranked by reading records (as perfdb does for small filters), the bound cuts it.
            monkeypatch.setattr(store_module, "_walks_metric_index", lambda *_: False)
            page, text = await _page(client, "/?sort=qps&per_page=25")
            narrow, narrow_text = await _page(client, f"/?sort=qps&per_page=25&test={TEST}")
    # Through the qps index perfdb ranks all 600 exactly, whatever the bound.
    assert "perfdb ranked only" not in indexed_text
    assert indexed.record_ids == _ids(sorted(data.records, key=lambda r: (-r["metrics"]["qps"], r["record_id"]))[:25])
    # perfdb ranked the newest 400 only: the page says so, and its top is theirs.
    assert "perfdb ranked only the newest 400 results of these filters" in text
    assert page.record_ids == _ids(
        sorted(data.records[-400:], key=lambda r: (-r["metrics"]["qps"], r["record_id"]))[:25]
    )
    assert "perfdb ranked only" not in narrow_text
    assert narrow.record_ids == _ids(data.by_qps(test_name=TEST)[:25])
