"""Routes: the pages, the JSON API behind them, and the error pages every failure becomes."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from perfdb import __version__
from perfdb.records.record_ids import is_record_id
from perfdb.web import pages
from perfdb.web.analysis import count_tests, histogram, leaderboard, sort_rows
from perfdb.web.charts import CHART_TEST_METRICS, ChartRequest, chart_data, points_param
from perfdb.web.markup import Markup
from perfdb.web.pages import COLUMN_LABELS
from perfdb.web.queries import (
    METRICS_BY_NAME,
    Filters,
    OneTestView,
    OverviewView,
    QueryError,
    TableView,
    UserView,
    build_url,
    higher_is_better,
)
from perfdb.web.source import PerfdbError, RecentScans, RecordQuery, ResultRow, ResultSource, Scan, display_name

log = logging.getLogger("perfdb.web")

# Response headers for every page: no inline script or style, nothing loaded from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
RETRY_AFTER_SECONDS = 5


class NotFoundError(Exception):
    """A result or user that perfdb does not have; shown as a 404 page."""


@dataclasses.dataclass(slots=True)
class Dashboard:
    """Everything the handlers share: the perfdb source, recent scans and page settings."""

    source: ResultSource
    scans: RecentScans
    site: pages.Site
    scan_limit: int  # results a bulk scan (charts, overview, sorting by a metric) keeps at most

    def page_budget(self, per_page: int) -> int:
        """Records one table page may read while a search filters most of them out."""
        return max(self.scan_limit, 20 * per_page)

    async def newest(self, query: RecordQuery) -> Scan:
        """The newest `scan_limit` results of a query, from the recent-scans cache when possible."""

        async def produce() -> Scan:
            # A search may discard most of what is read: reading stops at three times the limit.
            return await self.source.scan_newest(query, wanted=self.scan_limit, budget=3 * self.scan_limit)

        return await self.scans.get(query, produce)

    def truncation_note(self, scan: Scan) -> str | None:
        """What a page says when its results are not the whole range."""
        if not scan.more:
            return None
        if len(scan.rows) < self.scan_limit:
            return (
                f"The search matched {len(scan.rows):,} of the newest {scan.examined:,} results in this range; "
                "older ones were not searched. Narrow the date range to search all of it."
            )
        return (
            f"This range holds more than {self.scan_limit:,} results; only the newest {self.scan_limit:,} are "
            "included. Narrow the date range or the filters to include them all."
        )


DASHBOARD = web.AppKey("dashboard", Dashboard)


def record_query(filters: Filters, *, with_test: bool = True) -> RecordQuery:
    return RecordQuery(
        user_id=filters.user or None,
        test_name=(filters.test or None) if with_test else None,
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
    return web.Response(text=markup, status=status, content_type="text/html", charset="utf-8")


def json_response(data: Any, status: int = 200) -> web.Response:
    response = web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status, content_type="application/json"
    )
    response.enable_compression()
    return response


# -- the results table -------------------------------------------------------------------


async def build_table_page(dashboard: Dashboard, view: TableView) -> pages.TablePage:
    if view.by_time:
        return await _time_page(dashboard, view)
    return await _sorted_page(dashboard, view)


async def _time_page(dashboard: Dashboard, view: TableView) -> pages.TablePage:
    """Time order: pages found by position, each one a short read whatever the database size.

    "Back" is toward the start of the order (newer results when newest first), "forward" away from
    it. A page is the `per_page` results forward from one position, or back from one.
    """
    source, query, wanted, budget = (
        dashboard.source,
        record_query(view.filters),
        view.per_page,
        dashboard.page_budget(view.per_page),
    )
    start = view.first_page()
    back_from = view.after if view.descending else view.before
    forward_from = view.before if view.descending else view.after

    async def forward(position: str | None) -> Scan:
        if view.descending:
            return await source.scan_newest(query, wanted=wanted, budget=budget, before=position)
        return await source.scan_forward(query, wanted=wanted, budget=budget, after=position)

    async def backward(position: str) -> Scan:
        if view.descending:
            return await source.scan_forward(query, wanted=wanted, budget=budget, after=position)
        return await source.scan_newest(query, wanted=wanted, budget=budget, before=position)

    def back_view(edge: str) -> TableView:
        return start.first_page(after=edge) if view.descending else start.first_page(before=edge)

    def forward_view(edge: str) -> TableView:
        return start.first_page(before=edge) if view.descending else start.first_page(after=edge)

    at_start = back_from is None and forward_from is None
    went_back = False
    if back_from is not None:
        scan = await backward(back_from)
        went_back = scan.more
        at_start = not scan.more  # reached the start: show the first page in full
    if at_start:
        scan = await forward(None)
    elif forward_from is not None:
        scan = await forward(forward_from)
    rows = scan.rows[::-1] if view.descending else scan.rows  # scans return oldest first
    previous: TableView | None
    next_view: TableView | None
    if went_back:
        assert back_from is not None and scan.resume is not None
        previous = back_view(scan.resume)
        next_view = forward_view(rows[-1].record_id if rows else back_from)
    else:
        previous = None if at_start else (back_view(rows[0].record_id) if rows else start)
        next_view = forward_view(scan.resume) if scan.more and scan.resume is not None else None
    order = "newest first" if view.descending else "oldest first"
    summary = f"{len(rows):,} result{'s' if len(rows) != 1 else ''} on this page, {order}."
    note = None
    if scan.truncated:
        note = (
            f"Read {scan.examined:,} results without filling the page: the search matches few of them. "
            "Go on to the next page, or narrow the date range."
        )
    return pages.TablePage(rows, scan.users, previous, next_view, None if at_start else start, summary, note)


async def _sorted_page(dashboard: Dashboard, view: TableView) -> pages.TablePage:
    """Any other order: the newest results of the range (bounded), sorted here, paged by number."""
    scan = await dashboard.newest(record_query(view.filters))
    ordered = sort_rows(scan.rows, view.sort, view.descending, scan.users)
    page_count = max(1, math.ceil(len(ordered) / view.per_page))
    page = min(view.page, page_count)
    rows = ordered[(page - 1) * view.per_page : page * view.per_page]
    label = COLUMN_LABELS[view.sort]
    if view.sort in METRICS_BY_NAME:
        best = higher_is_better(view.sort) == view.descending
        direction = ("highest" if view.descending else "lowest") + (" (best)" if best else "") + " first"
    else:
        direction = "Z to A" if view.descending else "A to Z"
    summary = f"{len(ordered):,} results sorted by {label}, {direction} · page {page} of {page_count}."
    return pages.TablePage(
        rows=rows,
        users=scan.users,
        previous=dataclasses.replace(view, page=page - 1) if page > 1 else None,
        next=dataclasses.replace(view, page=page + 1) if page < page_count else None,
        first=dataclasses.replace(view, page=1) if page > 1 else None,
        summary=summary,
        truncated_note=dashboard.truncation_note(scan),
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
            "links": {
                "page": view.url("/"),
                "first": page.first.url("/api/results") if page.first else None,
                "previous": page.previous.url("/api/results") if page.previous else None,
                "next": page.next.url("/api/results") if page.next else None,
            },
        }
    )


# -- one result --------------------------------------------------------------------------


async def _find_result(request: web.Request) -> tuple[dict[str, Any], dict[str, Any] | None]:
    record_id = request.match_info["record_id"]
    if not is_record_id(record_id):
        raise NotFoundError(f"{record_id[:40]!r} is not a result id: result ids are 20 hexadecimal digits.")
    found = await request.app[DASHBOARD].source.find_record(record_id)
    if found is None:
        raise NotFoundError(f"perfdb has no result {record_id}.")
    return found


async def result_handler(request: web.Request) -> web.Response:
    record, profile = await _find_result(request)
    return html_response(pages.result_page(request.app[DASHBOARD].site, record, profile))


async def api_result(request: web.Request) -> web.Response:
    record, profile = await _find_result(request)
    return json_response({"record": record, "user": profile})


# -- one user ----------------------------------------------------------------------------


async def _user(request: web.Request) -> tuple[UserView, dict[str, Any]]:
    view = UserView.from_params(request.match_info["user_id"], request.query)
    profile = await request.app[DASHBOARD].source.profile(view.user_id)
    if profile is None:
        raise NotFoundError(f"perfdb has no user {view.user_id[:100]!r}.")
    return view, profile


async def user_handler(request: web.Request) -> web.Response:
    view, profile = await _user(request)
    return html_response(pages.user_page(request.app[DASHBOARD].site, view, profile))


async def api_user_series(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view, profile = await _user(request)
    tests = await dashboard.source.test_counts(view.user_id, CHART_TEST_METRICS)
    data = await _chart_data(dashboard, request, record_query(view.filters), tests)
    return json_response(
        {
            "user": profile,
            "user_id": view.user_id,
            "test": view.filters.test,
            **data,
            "links": {"page": view.url(), "table": build_url("/", [("user", view.user_id), *view.params()])},
        }
    )


# -- one test across users -------------------------------------------------------------------


def _one_test_view(request: web.Request) -> OneTestView:
    return OneTestView.from_params(request.match_info["test_name"], request.query)


async def one_test_handler(request: web.Request) -> web.Response:
    return html_response(pages.one_test_page(request.app[DASHBOARD].site, _one_test_view(request)))


async def api_one_test_series(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view = _one_test_view(request)
    tests = await dashboard.source.test_counts(None, CHART_TEST_METRICS)
    if view.filters.test not in tests:
        raise NotFoundError(f"perfdb has no results of a test named {view.filters.test[:100]!r}.")
    data = await _chart_data(dashboard, request, record_query(view.filters), tests)
    return json_response({"test": view.filters.test, **data, "links": {"page": view.url(), "table": view.url("/")}})


async def _chart_data(
    dashboard: Dashboard, request: web.Request, query: RecordQuery, tests: dict[str, int]
) -> dict[str, Any]:
    """The time charts of a query, downsampled for the page's width (`points`); `detail` picks the
    test of the percentile and CPU charts when every test is shown."""
    ranked = sorted(tests.items(), key=lambda item: (-item[1], item[0]))
    chart_request = ChartRequest(
        query=query,
        tests=ranked,
        detail=request.query.get("detail") or None,
        points=points_param(request.query.get("points", "")),
    )
    data = await chart_data(dashboard.source, chart_request)
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
    """The overview of a range. Without a `test` in the URL it shows the range's most frequent
    test (distributions of different tests mix unlike things); `test=` (empty) shows them all."""
    everything = await dashboard.newest(record_query(view.filters, with_test=False))
    tests = count_tests(everything.rows)
    if not test_given and tests:
        view = dataclasses.replace(view, filters=dataclasses.replace(view.filters, test=tests[0][0]))
    scan = await dashboard.newest(record_query(view.filters)) if view.filters.test else everything
    board_test = view.filters.test or (tests[0][0] if tests else "")
    board_scan = scan if view.filters.test else everything
    entries = leaderboard(board_scan.rows, board_scan.users, board_test, view.metric) if board_test else []
    page = pages.OverviewPage(
        tests=tests,
        leaderboard_test=board_test,
        leaderboard=entries,
        results=len(scan.rows),
        users=len({row.user_id for row in scan.rows}),
        truncated_note=dashboard.truncation_note(scan),
    )
    return view, page, histogram(scan.rows, view.metric, view.bins)


async def overview_handler(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view = OverviewView.from_params(request.query)
    view, page, _ = await _overview(dashboard, view, test_given="test" in request.query)
    return html_response(pages.overview_page(dashboard.site, view, page))


async def api_overview(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    view = OverviewView.from_params(request.query)
    view, page, distribution = await _overview(dashboard, view, test_given="test" in request.query)
    metric = METRICS_BY_NAME[view.metric]
    return json_response(
        {
            "metric": {
                "name": metric.name,
                "label": metric.label,
                "unit": metric.unit,
                "higher_is_better": higher_is_better(metric.name),
            },
            "test": view.filters.test,
            "from": view.filters.date_from,
            "to": view.filters.date_to,
            "results": page.results,
            "users": page.users,
            "tests": [{"name": name, "count": count} for name, count in page.tests],
            "histogram": distribution,
            "leaderboard": {"test": page.leaderboard_test, "entries": page.leaderboard},
            "truncated": page.truncated_note is not None,
            "note": page.truncated_note,
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


@web.middleware
async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a readable page (or a JSON error under /api/), never a stack trace."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        title = "Page not found" if exc.status == 404 else exc.reason
        message = "There is no such page here." if exc.status == 404 else exc.reason
        return _error(request, exc.status, exc.reason.lower().replace(" ", "_"), title, message)
    except QueryError as exc:
        return _error(request, 400, "bad_query", "That link does not work", str(exc))
    except NotFoundError as exc:
        return _error(request, 404, "not_found", "Not found", str(exc))
    except PerfdbError as exc:
        if exc.unavailable:
            log.warning("perfdb unavailable for %s: %s", request.path, exc.message)
            response = _error(request, 503, exc.code, "perfdb is not answering", exc.message, retry=True)
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        log.warning("perfdb refused %s: %s", request.path, exc.message)
        return _error(request, 502, exc.code, "perfdb refused the request", exc.message)
    except Exception:
        log.exception("unexpected error serving %s", request.path)
        return _error(
            request,
            500,
            "internal",
            "Something went wrong",
            "The dashboard hit an unexpected error; its log has the details.",
        )


def _error(
    request: web.Request, status: int, code: str, title: str, message: str, *, retry: bool = False
) -> web.Response:
    if request.path.startswith("/api/"):
        return json_response({"error": {"code": code, "message": message, "retryable": retry}}, status=status)
    site = request.app[DASHBOARD].site
    return html_response(
        pages.error_page(
            site, status=status, title=title, message=message, retry_url=str(request.rel_url) if retry else None
        ),
        status=status,
    )


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
    app.router.add_get("/api", api_index, name="api")
    app.router.add_get("/api/results", api_results, name="api-results")
    app.router.add_get("/api/results/{record_id}", api_result, name="api-result")
    app.router.add_get("/api/users/{user_id}/series", api_user_series, name="api-user-series")
    app.router.add_get("/api/tests/{test_name}/series", api_one_test_series, name="api-test-series")
    app.router.add_get("/api/overview", api_overview, name="api-overview")
    app.router.add_get("/api/health", api_health, name="api-health")
