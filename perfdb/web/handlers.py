"""Routes: the pages, the JSON API behind them, and the error pages every failure becomes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import orjson
from aiohttp import web
from isal import isal_zlib
from multidict import MultiMapping

from perfdb import __version__
from perfdb.records.record_ids import is_record_id
from perfdb.web import pages
from perfdb.web.analysis import (
    LEADERBOARD_SIZE,
    leaderboard,
    merge_aggregates,
    overview_histogram,
    ranked_users,
)
from perfdb.web.assets import accepts_gzip
from perfdb.web.charts import CHART_TEST_METRICS, ChartRequest, chart_data, points_param
from perfdb.web.markup import Markup
from perfdb.web.pages import COLUMN_LABELS
from perfdb.web.queries import (
    ALERTS_PER_PAGE,
    MAX_SORTED_PAGES,
    METRICS_BY_NAME,
    CompareView,
    Filters,
    OneTestView,
    OverviewView,
    QueryError,
    RegressionsView,
    TableView,
    UserView,
    build_url,
    higher_is_better,
    picked_pair,
)
from perfdb.web.source import (
    Edges,
    PerfdbError,
    RecordQuery,
    ResultRow,
    ResultSource,
    TimeRead,
    display_name,
)

log = logging.getLogger("perfdb.web")

# Response headers for every page: no inline style or script, nothing loaded from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
RETRY_AFTER_SECONDS = 5
GZIP_WBITS = 16 + 15  # a gzip stream with zlib's largest window
# A sorted table with a free-text search examines this many ranked results per page.
SORTED_SEARCH_BLOCK = 500


class NotFoundError(Exception):
    """A result or user that perfdb does not have; shown as a 404 page."""


@dataclasses.dataclass(slots=True)
class Dashboard:
    """Everything the handlers share: the perfdb source and the site's page settings."""

    source: ResultSource
    site: pages.Site


DASHBOARD = web.AppKey("dashboard", Dashboard)


def record_query(filters: Filters) -> RecordQuery:
    return RecordQuery(
        user_id=filters.user or None,
        test_name=filters.test or None,
        tag=filters.tag or None,
        since=filters.since,
        until=filters.until,
        search_words=filters.search_words,
    )


def flat_query(query: MultiMapping[str]) -> dict[str, str]:
    """A query string as one value per name; repeated `cols` (checkboxes) join with commas."""
    flat = {name: query[name] for name in query}
    if "cols" in query:
        flat["cols"] = ",".join(query.getall("cols"))
    return flat


def html_response(markup: Markup, status: int = 200) -> web.Response:
    response = web.Response(text=markup, status=status, content_type="text/html", charset="utf-8")
    response.enable_compression()
    return response


def _json_bytes(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


def json_response(data: Any, status: int = 200) -> web.Response:
    response = web.Response(body=_json_bytes(data), status=status, content_type="application/json")
    response.enable_compression()
    return response


# -- the results table -------------------------------------------------------------------


async def build_table_page(dashboard: Dashboard, view: TableView) -> pages.TablePage:
    if view.by_time:
        return await _time_page(dashboard, view)
    if view.filters.search_words:
        return await _sorted_search_page(dashboard, view)
    return await _sorted_page(dashboard, view)


def _count_text(count: int, noun: str = "result", plural: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


async def _time_page(dashboard: Dashboard, view: TableView) -> pages.TablePage:
    """Time order: each page one read from a position, exact at any density.

    "Back" is toward the start of the order (newer results when newest first), "forward" away
    from it. perfdb takes a record id as a cursor in both directions, so a page is the `per_page`
    results forward from the last row of the page before, or back from the first row of the page
    after; `last` reads back from the far end.
    """
    source, query, wanted = dashboard.source, record_query(view.filters), view.per_page
    start = view.first_page()
    back_from = view.after if view.descending else view.before
    forward_from = view.before if view.descending else view.after

    async def read(cursor: str | None, *, forward: bool) -> TimeRead:
        # Forward in a newest-first table is backwards in time, and so on.
        return await source.read_in_time_order(
            query, wanted=wanted, newest_first=view.descending == forward, cursor=cursor
        )

    def back_view(edge: str) -> TableView:
        return start.first_page(after=edge) if view.descending else start.first_page(before=edge)

    def forward_view(edge: str) -> TableView:
        return start.first_page(before=edge) if view.descending else start.first_page(after=edge)

    previous: TableView | None = None
    next_view: TableView | None = None
    last: TableView | None = start.first_page(last=True)
    found: TimeRead | None = None
    if view.last or back_from is not None:
        found = await read(None if view.last else back_from, forward=False)
        rows = found.rows[::-1]
        if not found.more and not view.last and not found.cut:
            found = None  # reached the start of the order: show the first page in full
        else:
            if found.more and found.resume is not None:
                previous = back_view(found.resume) if found.cut else back_view(rows[0].record_id)
            if view.last:
                last = None
            elif rows:
                next_view = forward_view(rows[-1].record_id)
            elif back_from is not None:  # a search found nothing here: the next page includes back_from
                next_view = forward_view(_beside(back_from, newer=view.descending))
    if found is None:
        found = await read(forward_from, forward=True)
        rows = found.rows
        if forward_from is not None:
            # Back from this page's first row; from an empty page, back to and including forward_from.
            previous = back_view(rows[0].record_id if rows else _beside(forward_from, newer=not view.descending))
        if found.more and found.resume is not None:
            next_view = forward_view(found.resume)
        else:
            last = None  # this is the last page already
    at_start = previous is None
    order = "newest first" if view.descending else "oldest first"
    summary = f"{_count_text(len(rows))} on this page, {order}."
    if found.total is not None and at_start:
        summary = f"{_count_text(found.total)} in all. {summary}"
    note = None
    if found.cut:
        if view.filters.search_words:
            note = (
                f"The search is done by the dashboard, not by perfdb: this page examined {found.examined:,} "
                f"results and found {_count_text(len(rows), 'match', 'matches')}. "
                "The next page searches on from where this one stopped; a test, tag, user or date filter narrows "
                "what is searched."
            )
        else:
            note = (
                f"These filters match few of the results perfdb examined ({found.examined:,} on this page). "
                "The next page reads on from where this one stopped."
            )
    return pages.TablePage(
        rows, found.users, previous, next_view, None if at_start else start, summary, note, last=last
    )


def _beside(record_id: str, *, newer: bool) -> str:
    """The record id just after (newer) or just before this one: a cursor that includes it."""
    number = int(record_id, 16) + (1 if newer else -1)
    return f"{min(max(number, 0), 16**20 - 1):020x}"


def _sorted_direction(view: TableView) -> str:
    best = higher_is_better(view.sort) == view.descending
    return ("highest" if view.descending else "lowest") + (" (best)" if best else "") + " first"


def _incomplete_note(examined: int) -> str:
    return (
        f"perfdb ranked only the newest {examined:,} results of these filters (its per-read bound): "
        "an older result may rank higher. Choose a test, tag, user or date range to rank all of them."
    )


async def _sorted_page(dashboard: Dashboard, view: TableView) -> pages.TablePage:
    """Sorted by a metric: perfdb ranks the whole filtered set and pages it by cursor; the cursors
    of the earlier pages ride in the URL, so "previous" returns exactly the page before."""
    found = await dashboard.source.read_sorted(
        record_query(view.filters),
        metric=view.sort,
        descending=view.descending,
        limit=view.per_page,
        cursor=view.trail[-1] if view.trail else None,
    )
    number = view.page_number
    label = COLUMN_LABELS[view.sort]
    summary = f"Sorted by {label}, {_sorted_direction(view)} · page {number:,}."
    if found.total is not None:
        summary = f"{_count_text(found.total)} in all. {summary}"
    note = None if found.complete else _incomplete_note(found.examined)
    next_view = None
    if found.next_cursor:
        if number < MAX_SORTED_PAGES:
            next_view = dataclasses.replace(view, trail=(*view.trail, found.next_cursor))
        else:
            note = (
                f"A sorted table pages through its top {MAX_SORTED_PAGES} pages; "
                "narrow the filters to see the results beyond them."
            )
    return pages.TablePage(
        rows=found.rows,
        users=found.users,
        previous=dataclasses.replace(view, trail=view.trail[:-1]) if view.trail else None,
        next=next_view,
        first=view.first_page() if view.trail else None,
        summary=summary,
        truncated_note=note,
    )


async def _sorted_search_page(dashboard: Dashboard, view: TableView) -> pages.TablePage:
    """Sorted by a metric with a free-text search: perfdb ranks, the dashboard matches the words.
    Each page examines one block of ranked results and shows every match in it, so the search
    stays bounded and the cursor stays exact."""
    block = min(SORTED_SEARCH_BLOCK, await dashboard.source.page_limit())
    found = await dashboard.source.read_sorted(
        record_query(view.filters),
        metric=view.sort,
        descending=view.descending,
        limit=block,
        cursor=view.trail[-1] if view.trail else None,
    )
    number = view.page_number
    summary = (
        f"{_count_text(len(found.rows), 'match', 'matches')} among results {(number - 1) * block + 1:,} to "
        f"{(number - 1) * block + found.read:,} by {COLUMN_LABELS[view.sort]}, {_sorted_direction(view)}."
    )
    note = (
        f"The search is done by the dashboard, not by perfdb: each page examines the next {block:,} results "
        "in this order and shows those that match."
    )
    if not found.complete:
        note += " " + _incomplete_note(found.examined)
    has_next = found.next_cursor is not None and number < MAX_SORTED_PAGES
    return pages.TablePage(
        rows=found.rows,
        users=found.users,
        previous=dataclasses.replace(view, trail=view.trail[:-1]) if view.trail else None,
        next=dataclasses.replace(view, trail=(*view.trail, str(found.next_cursor))) if has_next else None,
        first=view.first_page() if view.trail else None,
        summary=summary,
        truncated_note=note,
    )


async def results_handler(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view = TableView.from_params(flat_query(request.query))
    page = await build_table_page(dashboard, view)
    return html_response(pages.results_page(dashboard.site, view, page))


def row_json(row: ResultRow, users: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "record_id": row.record_id,
        "user_id": row.user_id,
        "user_name": display_name(row.user_id, users.get(row.user_id)),
        "timestamp": row.timestamp,
        "test_name": row.test_name,
        "tag": row.tag,
        "metrics": row.metrics,
    }


async def api_results(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view = TableView.from_params(flat_query(request.query))
    page = await build_table_page(dashboard, view)
    return json_response(
        {
            "results": [row_json(row, page.users) for row in page.rows],
            "sort": view.sort,
            "order": "desc" if view.descending else "asc",
            "columns": view.visible_columns,
            "summary": page.summary,
            "truncated": page.truncated_note is not None,
            "note": page.truncated_note,
            "links": {
                "page": view.url("/"),
                "first": page.first.url("/api/results") if page.first else None,
                "previous": page.previous.url("/api/results") if page.previous else None,
                "next": page.next.url("/api/results") if page.next else None,
                "last": page.last.url("/api/results") if page.last else None,
            },
        }
    )


# -- one result --------------------------------------------------------------------------


async def _find_result(
    request: web.Request,
) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The record (with its samples), its user's profile and its stored verdicts (read at once)."""
    record_id = request.match_info["record_id"]
    if not is_record_id(record_id):
        raise NotFoundError(f"{record_id[:40]!r} is not a result id: result ids are 20 hexadecimal digits.")
    source = request.app[DASHBOARD].source
    found, (verdicts, samples) = await asyncio.gather(source.find_record(record_id), source.stored_extras(record_id))
    if found is None:
        raise NotFoundError(f"perfdb has no result {record_id}.")
    record, profile = found
    # Reads of many records leave samples out; get_record has them, as the record holds them.
    return ({**record, "samples": samples} if samples else record), profile, verdicts


async def result_handler(request: web.Request) -> web.Response:
    record, profile, verdicts = await _find_result(request)
    return html_response(pages.result_page(request.app[DASHBOARD].site, record, profile, verdicts))


async def api_result(request: web.Request) -> web.Response:
    record, profile, verdicts = await _find_result(request)
    return json_response({"record": record, "user": profile, "verdicts": verdicts})


# -- one user ----------------------------------------------------------------------------


async def _user(request: web.Request) -> tuple[UserView, dict[str, Any]]:
    view = UserView.from_params(request.match_info["user_id"], request.query)
    profile = await request.app[DASHBOARD].source.profile(view.user_id)
    if profile is None:
        raise NotFoundError(f"perfdb has no user {view.user_id[:100]!r}.")
    return view, profile


async def _user_series(
    request: web.Request, view: UserView, points: int, *, profile: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The user page's charts' data (`/api/users/{id}/series`); the profile is read beside the
    other reads unless it is given."""
    dashboard = request.app[DASHBOARD]
    query = record_query(view.filters)
    # Independent reads at once: on a busy server each waits its turn on perfdb's threads.
    read_profile = dashboard.source.profile(view.user_id) if profile is None else _given(profile)
    profile, tests, edges = await asyncio.gather(
        read_profile, dashboard.source.test_counts(view.user_id, CHART_TEST_METRICS), dashboard.source.edges(query)
    )
    if profile is None:
        raise NotFoundError(f"perfdb has no user {view.user_id[:100]!r}.")
    data = await _chart_data(dashboard, request, query, tests, edges, points)
    links = {"page": view.url(), "table": build_url("/", [("user", view.user_id), *view.params()])}
    return {"user": profile, "user_id": view.user_id, "test": view.filters.test, **data, "links": links}


async def _given(value: dict[str, Any]) -> dict[str, Any] | None:
    return value


async def user_handler(request: web.Request) -> web.StreamResponse:
    view, profile = await _user(request)  # an unknown user is a 404, before any of the page goes out
    page = pages.user_page(request.app[DASHBOARD].site, view, profile)
    return await _chart_page(request, page, _user_series(request, view, pages.PAGE_CHART_POINTS, profile=profile))


async def api_user_series(request: web.Request) -> web.Response:
    view = UserView.from_params(request.match_info["user_id"], request.query)
    return json_response(await _user_series(request, view, points_param(request.query.get("points", ""))))


async def _chart_data_block(request: web.Request, series: Coroutine[Any, Any, dict[str, Any]]) -> Markup:
    """The page's charts' data (what their API answers), or the error that read met (as the API
    would say it), for the page's script to show rather than ask the API again and wait as long."""
    try:
        data = await series
    except ConnectionError:  # the client went away
        raise
    except Exception as exc:
        data = {"error": failure_of(request, exc).body()}
    return pages.chart_data_block(_json_bytes(data))


async def _chart_page(
    request: web.Request, page: Markup, series: Coroutine[Any, Any, dict[str, Any]]
) -> web.StreamResponse:
    """A chart page in two parts: everything before its charts' data at once, so that the browser
    fetches and compiles the page's script while perfdb reads, then the data (`series`, the API's
    reply) and the rest. Gzipped, flushed after the first part, when the client takes it."""
    before, after = pages.split_at_chart_data(page)
    response = web.StreamResponse(headers={"Content-Type": "text/html; charset=utf-8", "Vary": "Accept-Encoding"})
    gzip_stream = None
    if accepts_gzip(request):
        gzip_stream = isal_zlib.compressobj(isal_zlib.Z_DEFAULT_COMPRESSION, isal_zlib.DEFLATED, GZIP_WBITS)
        response.headers["Content-Encoding"] = "gzip"

    def encoded(text: str, flush_mode: int) -> bytes:
        body = text.encode()
        return body if gzip_stream is None else gzip_stream.compress(body) + gzip_stream.flush(flush_mode)

    if request.method == "HEAD":  # the headers only, and nothing read
        series.close()
        await response.prepare(request)
        await response.write_eof()
        return response
    await response.prepare(request)
    await response.write(encoded(before, isal_zlib.Z_SYNC_FLUSH))
    # Whatever the read meets, the page ends whole: its data or the error in its place.
    data = await _chart_data_block(request, series)
    await response.write(encoded(data + after, isal_zlib.Z_FINISH))
    await response.write_eof()
    return response


# -- one test across users -------------------------------------------------------------------


def _one_test_view(request: web.Request) -> OneTestView:
    return OneTestView.from_params(request.match_info["test_name"], request.query)


async def _one_test_series(request: web.Request, view: OneTestView, points: int) -> dict[str, Any]:
    """The test page's charts' data (`/api/tests/{name}/series`)."""
    dashboard = request.app[DASHBOARD]
    query = record_query(view.filters)
    tests, edges = await asyncio.gather(
        dashboard.source.test_counts(None, CHART_TEST_METRICS), dashboard.source.edges(query)
    )
    data = await _chart_data(dashboard, request, query, tests, edges, points)
    # A test without the core metrics (another tool's benchmark) is charted if perfdb has it at all;
    # only an empty chart asks whether it has any outside the range.
    test = view.filters.test
    if (
        test not in tests
        and data["range"] is None
        and await dashboard.source.edges(RecordQuery(test_name=test)) is None
    ):
        raise NotFoundError(f"perfdb has no results of a test named {view.filters.test[:100]!r}.")
    return {"test": view.filters.test, **data, "links": {"page": view.url(), "table": view.url("/")}}


async def one_test_handler(request: web.Request) -> web.StreamResponse:
    view = _one_test_view(request)
    page = pages.one_test_page(request.app[DASHBOARD].site, view)
    return await _chart_page(request, page, _one_test_series(request, view, pages.PAGE_CHART_POINTS))


async def api_one_test_series(request: web.Request) -> web.Response:
    view = _one_test_view(request)
    return json_response(await _one_test_series(request, view, points_param(request.query.get("points", ""))))


async def _chart_data(
    dashboard: Dashboard,
    request: web.Request,
    query: RecordQuery,
    tests: dict[str, int],
    edges: Edges | None,
    points: int,
) -> dict[str, Any]:
    """The time charts of a query, downsampled to `points` a line (about the charts' width in
    pixels); `detail` picks the test of the percentile and CPU charts when every test is shown."""
    ranked = sorted(tests.items(), key=lambda item: (-item[1], item[0]))
    chart_request = ChartRequest(
        query=query,
        tests=ranked,
        detail=request.query.get("detail") or None,
        points=points,
    )
    data = await chart_data(dashboard.source, chart_request, edges)
    note = None
    if not data["complete"]:
        note = (
            "Some lines hold more results than perfdb examines for one chart; they show the newest of them. "
            "Narrow the date range to see all of it."
        )
    return {**data, "tests": [{"name": name, "count": count} for name, count in ranked], "note": note}


# -- overview ----------------------------------------------------------------------------


async def _overview(
    dashboard: Dashboard, view: OverviewView, *, test_given: bool
) -> tuple[OverviewView, pages.OverviewPage, dict[str, Any]]:
    """The overview from perfdb's per-test aggregates: one request whatever the number of results,
    plus one short read per leaderboard user for their name. Without a `test` in the URL it shows
    the test with the most results (distributions of different tests mix unlike things);
    `test=` (empty) shows them all."""
    source = dashboard.source
    reply = await source.overview(view.metric)
    aggregates: dict[str, dict[str, Any]] = reply["tests"]
    tests = sorted(((name, item["records"]) for name, item in aggregates.items()), key=lambda t: (-t[1], t[0]))
    if not test_given and tests:
        view = dataclasses.replace(view, test=tests[0][0])
    if view.test:
        shown = merge_aggregates([aggregates[view.test]] if view.test in aggregates else [])
    else:
        shown = merge_aggregates(list(aggregates.values()))
    board_test = view.test or (tests[0][0] if tests else "")
    ranked = ranked_users(aggregates[board_test], reply["better"]) if board_test in aggregates else []
    top = ranked[:LEADERBOARD_SIZE]
    profiles = await asyncio.gather(*(source.profile(user_id) for user_id, _ in top))
    page = pages.OverviewPage(
        tests=tests,
        leaderboard_test=board_test,
        leaderboard=leaderboard(top, dict(zip([user_id for user_id, _ in top], profiles, strict=True)), view.metric),
        leaderboard_users=len(ranked),
        results=shown["count"],
        users=len(shown["users"]),
    )
    return view, page, overview_histogram(shown, view.metric)


async def overview_handler(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view = OverviewView.from_params(request.query)
    view, page, distribution = await _overview(dashboard, view, test_given="test" in request.query)
    # The histogram's data goes in the page, so that it draws without asking perfdb a second time.
    embedded = _json_bytes(_overview_json(view, page, distribution))
    return html_response(pages.overview_page(dashboard.site, view, page, embedded))


async def api_overview(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view = OverviewView.from_params(request.query)
    view, page, distribution = await _overview(dashboard, view, test_given="test" in request.query)
    return json_response(_overview_json(view, page, distribution))


def _overview_json(view: OverviewView, page: pages.OverviewPage, distribution: dict[str, Any]) -> dict[str, Any]:
    """The overview API's reply; the overview page carries it too."""
    metric = METRICS_BY_NAME[view.metric]
    return {
        "metric": {
            "name": metric.name,
            "label": metric.label,
            "unit": metric.unit,
            "higher_is_better": higher_is_better(metric.name),
        },
        "test": view.test,
        "results": page.results,
        "users": page.users,
        "tests": [{"name": name, "count": count} for name, count in page.tests],
        "histogram": distribution,
        "leaderboard": {
            "test": page.leaderboard_test,
            "users": page.leaderboard_users,
            "entries": page.leaderboard,
        },
        "links": {"page": view.url()},
    }


# -- regressions and compare -------------------------------------------------------------------


async def _alerts(request: web.Request) -> tuple[RegressionsView, dict[str, Any]]:
    view = RegressionsView.from_params(request.query)
    reply = await request.app[DASHBOARD].source.regressions(
        state=None if view.state == "all" else view.state,
        limit=ALERTS_PER_PAGE,
        cursor=view.cursor,
        user_id=view.user or None,
        test_name=view.test or None,
        tag=view.tag or None,
    )
    return view, reply


async def regressions_handler(request: web.Request) -> web.Response:
    view, reply = await _alerts(request)
    return html_response(
        pages.regressions_page(request.app[DASHBOARD].site, view, reply["alerts"], reply["next_cursor"])
    )


async def api_regressions(request: web.Request) -> web.Response:
    view, reply = await _alerts(request)
    next_cursor = reply["next_cursor"]
    return json_response(
        {
            "state": view.state,
            "alerts": reply["alerts"],
            "links": {
                "page": view.url(),
                "next": view.url("/api/regressions", cursor=next_cursor) if next_cursor else None,
            },
        }
    )


async def _comparison(request: web.Request) -> tuple[CompareView, dict[str, Any] | None]:
    view = CompareView.from_params(request.query)
    if not view.ready:
        return view, None
    source = request.app[DASHBOARD].source
    return view, await source.compare(view.selector("base"), view.selector("head"), view.test)


async def compare_handler(request: web.Request) -> web.Response:
    picks = request.query.getall("pick", [])
    if picks:
        # Two results ticked in a table: the older is the base. The canonical URL names them by side.
        base_id, head_id = picked_pair(picks)
        raise web.HTTPSeeOther(CompareView(base_ids=(base_id,), head_ids=(head_id,)).url())
    view, reply = await _comparison(request)
    picked = [*view.base_ids, *view.head_ids]
    records = await request.app[DASHBOARD].source.records_by_id(picked) if reply is not None and picked else {}
    return html_response(pages.compare_page(request.app[DASHBOARD].site, view, reply, records))


async def api_compare(request: web.Request) -> web.Response:
    view, reply = await _comparison(request)
    if reply is None:
        raise QueryError("base and head: each needs a tag (base, head) or result ids (base_ids, head_ids)")
    return json_response(
        {
            "base_tag": view.base or None,
            "head_tag": view.head or None,
            "base_ids": list(view.base_ids) or None,
            "head_ids": list(view.head_ids) or None,
            "test": view.test or None,
            "model": reply["model"],
            "base": reply["base"],
            "head": reply["head"],
            "rows": reply["rows"],
            "links": {"page": view.url()},
        }
    )


# -- health and the API index --------------------------------------------------------------


async def api_health(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    hello = await dashboard.source.hello()
    return json_response(
        {
            "perfdb": "ok",
            "server": dashboard.source.address,
            "version": hello.get("version"),
            "protocol_version": hello.get("protocol_version"),
            "dashboard_version": __version__,
        }
    )


async def api_index(request: web.Request) -> web.Response:
    return html_response(pages.api_index_page(request.app[DASHBOARD].site))


# -- errors --------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """What a failed request tells whoever asked: a page, a JSON error, or a chart page's data."""

    status: int
    code: str
    title: str
    message: str
    retry: bool = False  # perfdb is away: the same request may work in a moment

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retry}


def failure_of(request: web.Request, exc: Exception) -> Failure:
    """The Failure an exception of a handler stands for, logged as it deserves."""
    if isinstance(exc, web.HTTPException):
        title = "Page not found" if exc.status == 404 else exc.reason
        message = "There is no such page here." if exc.status == 404 else exc.reason
        return Failure(exc.status, exc.reason.lower().replace(" ", "_"), title, message)
    if isinstance(exc, QueryError):
        return Failure(400, "bad_query", "That link does not work", str(exc))
    if isinstance(exc, NotFoundError):
        return Failure(404, "not_found", "Not found", str(exc))
    if isinstance(exc, PerfdbError):
        if exc.unavailable:
            log.warning("perfdb unavailable for %s: %s", request.path, exc.message)
            return Failure(503, exc.code, "perfdb is not answering", exc.message, retry=True)
        log.warning("perfdb refused %s: %s", request.path, exc.message)
        return Failure(502, exc.code, "perfdb refused the request", exc.message)
    log.exception("unexpected error serving %s", request.path, exc_info=exc)
    return Failure(
        500, "internal", "Something went wrong", "The dashboard hit an unexpected error; its log has the details."
    )


@web.middleware
async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a readable page (or a JSON error under /api/), never a stack trace."""
    try:
        return await handler(request)
    except ConnectionError:  # the client went away: there is no one to answer
        raise
    except Exception as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise
        return _error(request, failure_of(request, exc))


def _error(request: web.Request, failure: Failure) -> web.Response:
    if request.path.startswith("/api/"):
        response = json_response({"error": failure.body()}, status=failure.status)
    else:
        site = request.app[DASHBOARD].site
        retry_url = str(request.rel_url) if failure.retry else None
        page = pages.error_page(
            site, status=failure.status, title=failure.title, message=failure.message, retry_url=retry_url
        )
        response = html_response(page, status=failure.status)
    if failure.retry:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Security headers everywhere; versioned static files are cached for good, the rest never."""
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/static/") and "v" in request.query and response.status == 200:
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    elif not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", results_handler, name="results")
    app.router.add_get("/results/{record_id}", result_handler, name="result")
    app.router.add_get("/users/{user_id}", user_handler, name="user")
    app.router.add_get("/tests/{test_name}", one_test_handler, name="test")
    app.router.add_get("/overview", overview_handler, name="overview")
    app.router.add_get("/regressions", regressions_handler, name="regressions")
    app.router.add_get("/compare", compare_handler, name="compare")
    app.router.add_get("/api", api_index, name="api")
    app.router.add_get("/api/regressions", api_regressions, name="api-regressions")
    app.router.add_get("/api/compare", api_compare, name="api-compare")
    app.router.add_get("/api/results", api_results, name="api-results")
    app.router.add_get("/api/results/{record_id}", api_result, name="api-result")
    app.router.add_get("/api/users/{user_id}/series", api_user_series, name="api-user-series")
    app.router.add_get("/api/tests/{test_name}/series", api_one_test_series, name="api-test-series")
    app.router.add_get("/api/overview", api_overview, name="api-overview")
    app.router.add_get("/api/health", api_health, name="api-health")
