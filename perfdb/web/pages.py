"""The dashboard's HTML: one function per page, all values escaped by perfdb.web.markup."""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from perfdb import __version__
from perfdb.records.units import CORE_METRICS, format_value
from perfdb.web.analysis import LeaderboardEntry, metric_unit, sample_summary
from perfdb.web.markup import Markup, concat, json_data_block, render
from perfdb.web.queries import (
    ALERT_STATES,
    DEFAULT_PER_PAGE,
    METRICS_BY_NAME,
    OPTIONAL_COLUMNS,
    PER_PAGE_CHOICES,
    QUICK_RANGES,
    SORT_KEYS,
    CompareView,
    Filters,
    OneTestView,
    OverviewView,
    RegressionsView,
    TableView,
    UserView,
    build_url,
    higher_is_better,
    quick_range,
)
from perfdb.web.source import ResultRow, display_name

# <main>'s max-width and horizontal padding in dashboard.css. The chart pages carry their data at
# about one point per two pixels of that width, the widest their charts get.
MAIN_MAX_WIDTH_PX = 1760
MAIN_PADDING_PX = 2 * 24
PAGE_CHART_POINTS = (MAIN_MAX_WIDTH_PX - MAIN_PADDING_PX) // 2

COLUMN_LABELS = {
    "time": "Time (UTC)",
    "user": "User",
    "test": "Test",
    "tag": "Tag",
    **{metric.name: metric.label for metric in CORE_METRICS},
}
# Longer descriptions for headers' tooltips and the result page.
METRIC_DESCRIPTIONS = {
    "qps": "queries per second",
    "qps_per_core": "queries per second per server core",
    "perc_lat_50": "median latency",
    "perc_lat_90": "90th percentile latency",
    "perc_lat_95": "95th percentile latency",
    "perc_lat_99": "99th percentile latency",
    "perc_lat_99_point_9": "99.9th percentile latency",
    "server_system_time": "server system CPU time",
    "server_user_time": "server user CPU time",
    "client_system_time": "client system CPU time",
    "client_user_time": "client user CPU time",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Site:
    """What every page needs to know about the dashboard itself."""

    server_address: str
    assets: Mapping[str, str]  # static file name -> URL with a content hash, so caches never go stale


def user_url(user_id: str) -> str:
    return "/users/" + urllib.parse.quote(user_id, safe="")


def result_url(record_id: str) -> str:
    return "/results/" + record_id


def short_time(timestamp: str) -> str:
    """2026-11-29T08:21:31.356665Z -> 2026-11-29 08:21"""
    return timestamp[:16].replace("T", " ")


ELIDE_NAMES_OVER = 56  # characters; longer test names are shortened in the middle in tables


def elided_name(name: str, limit: int = ELIDE_NAMES_OVER) -> Markup:
    """A test name for a table cell: a long one loses its middle, not its distinguishing tail
    (`..._unconstrained_insecure_64b`); the full name is the tooltip."""
    if len(name) <= limit:
        return render('<span class="name" title="{name}">{name}</span>', name=name)
    head = limit * 2 // 5
    tail = limit - head - 1
    return render(
        '<span class="name elided" title="{name}">{head}\u2026{tail}</span>',
        name=name,
        head=name[:head],
        tail=name[-tail:],
    )


def time_cell(timestamp: str) -> Markup:
    return render('<time datetime="{full}" title="{full}">{short}</time>', full=timestamp, short=short_time(timestamp))


def layout(
    site: Site,
    *,
    title: str,
    active: str,
    body: Markup,
    script: str = "dashboard.js",
) -> Markup:
    """The page around `body`, with its one script (dashboard.js, or the charts' bundle that holds it)."""
    nav = concat(
        render('<a href="{href}"{current}>{label}</a>', href=href, label=label, current=_current(name == active))
        for name, href, label in (
            ("results", "/", "Results"),
            ("overview", "/overview", "Overview"),
            ("regressions", "/regressions", "Regressions"),
            ("compare", "/compare", "Compare"),
        )
    )
    script_tag = render('<script src="{src}" defer></script>', src=site.assets[script])
    return render(
        """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · perfdb</title>
<link rel="icon" href="{favicon}">
<link rel="stylesheet" href="{css}">
{script}
</head>
<body data-page="{active}">
<header class="topbar">
  <a class="brand" href="/"><span class="logo" aria-hidden="true"></span>perfdb</a>
  <nav aria-label="Pages">{nav}</nav>
  <span class="server" title="perfdb server this dashboard reads from">{server}</span>
</header>
<main>
{body}
</main>
<footer>perfdb {version} · reading from {server} · <a href="/api">JSON API</a></footer>
</body>
</html>
""",
        title=title,
        active=active,
        nav=nav,
        body=body,
        server=site.server_address,
        version=__version__,
        favicon=site.assets["favicon.svg"],
        css=site.assets["dashboard.css"],
        script=script_tag,
    )


def _current(is_current: bool) -> Markup:
    return Markup(' aria-current="page"') if is_current else Markup("")


def _selected(is_selected: bool) -> Markup:
    return Markup(" selected") if is_selected else Markup("")


def _checked(is_checked: bool) -> Markup:
    return Markup(" checked") if is_checked else Markup("")


def _date_input(name: str, label: str, value: str) -> Markup:
    # A plain day gets the browser's date picker; a full RFC 3339 time stays editable as text.
    kind = "date" if value == "" or len(value) == 10 else "text"
    return render(
        '<div class="field"><label for="f-{name}">{label}</label>'
        '<input id="f-{name}" name="{name}" type="{kind}" value="{value}" placeholder="2026-01-31"></div>',
        name=name,
        label=label,
        kind=kind,
        value=value,
    )


def _text_input(name: str, label: str, value: str, *, datalist: str = "", placeholder: str = "") -> Markup:
    return render(
        '<div class="field"><label for="f-{name}">{label}</label>'
        '<input id="f-{name}" name="{name}" value="{value}" placeholder="{placeholder}"{list}></div>',
        name=name,
        label=label,
        value=value,
        placeholder=placeholder,
        list=render(' list="{id}"', id=datalist) if datalist else Markup(""),
    )


def _datalist(element_id: str, values: Iterable[str]) -> Markup:
    options = concat(render('<option value="{value}">', value=value) for value in sorted(set(values)) if value)
    return render('<datalist id="{id}">{options}</datalist>', id=element_id, options=options)


def _quick_ranges(url_for_range: Any, filters: Filters) -> Markup:
    """Links to common date ranges; the current one is marked."""
    links = []
    for label, days in QUICK_RANGES:
        date_from, date_to = quick_range(days)
        current = (filters.date_from, filters.date_to) == (date_from, date_to)
        links.append(
            render(
                '<a href="{href}"{current}>{label}</a>',
                href=url_for_range(date_from, date_to),
                label=label,
                current=_current(current),
            )
        )
    all_time = not filters.date_from and not filters.date_to
    links.append(
        render('<a href="{href}"{current}>All time</a>', href=url_for_range("", ""), current=_current(all_time))
    )
    return render(
        '<nav class="quick-ranges" aria-label="Date range"><span>Range:</span>{links}</nav>', links=concat(links)
    )


def notice(text: str, kind: str = "info") -> Markup:
    return render('<p class="notice notice-{kind}" role="status">{text}</p>', kind=kind, text=text)


# -- results table -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TablePage:
    """One page of the results table, as the handler found it."""

    rows: list[ResultRow]  # in display order
    users: dict[str, dict[str, Any]]
    previous: TableView | None  # toward the start of the order
    next: TableView | None  # further along the order
    first: TableView | None  # the start of the order, when this page is not it
    summary: str
    truncated_note: str | None = None
    last: TableView | None = None  # the far end of the order, when this page is not it


def results_page(site: Site, view: TableView, page: TablePage) -> Markup:
    filters = view.filters
    columns = view.visible_columns
    hidden = concat(
        render('<input type="hidden" name="{name}" value="{value}">', name=name, value=value)
        for name, value in view.params()
        if name in ("sort", "order")
    )
    column_boxes = concat(
        render(
            '<label><input type="checkbox" name="cols" value="{name}"{checked}> {label}</label>',
            name=name,
            label=COLUMN_LABELS[name],
            checked=_checked(name in view.columns),
        )
        for name in OPTIONAL_COLUMNS
    )
    per_page = concat(
        render('<option value="{n}"{sel}>{n}</option>', n=n, sel=_selected(n == view.per_page))
        for n in PER_PAGE_CHOICES
    )
    form = render(
        """<form class="filters" method="get" action="/" id="filters">
  {test}{tag}{user}{search}{date_from}{date_to}
  <div class="field"><label for="f-per_page">Per page</label>
    <select id="f-per_page" name="per_page" data-default="{default_per_page}">{per_page}</select></div>
  {hidden}
  <details class="columns"><summary>Columns</summary><input type="hidden" name="cols" value="">
    <div class="column-boxes">{column_boxes}</div></details>
  <div class="actions"><button type="submit">Apply</button><a class="button-link" href="/">Reset</a></div>
</form>
{lists}""",
        test=_text_input("test", "Test", filters.test, datalist="tests-list", placeholder="any test"),
        tag=_text_input("tag", "Tag", filters.tag, datalist="tags-list", placeholder="any tag"),
        user=_text_input("user", "User id", filters.user, datalist="users-list", placeholder="any user"),
        search=_text_input("q", "Search", filters.search, placeholder="words in test, tag or user"),
        date_from=_date_input("from", "From", filters.date_from),
        date_to=_date_input("to", "To", filters.date_to),
        per_page=per_page,
        default_per_page=DEFAULT_PER_PAGE,
        hidden=hidden,
        column_boxes=column_boxes,
        lists=concat(
            [
                _datalist("tests-list", (row.test_name for row in page.rows)),
                _datalist("tags-list", (row.tag for row in page.rows)),
                _datalist("users-list", (row.user_id for row in page.rows)),
            ]
        ),
    )
    ranges = _quick_ranges(
        lambda date_from, date_to: view.first_page(filters=filters.with_dates(date_from, date_to)).url(), filters
    )
    head = concat(_header_cell(view, column) for column in columns)
    body_rows = concat(_result_row(row, columns, page.users) for row in page.rows)
    if page.rows:
        table = render(
            '<form class="compare-bar" method="get" action="/compare" id="compare-picks">'
            '<button type="submit" id="compare-picked">Compare picked</button>'
            '<span class="hint" id="compare-hint" aria-live="polite">Tick two results to compare them '
            "(the older one is the base).</span></form>"
            '<div class="table-wrap"><table class="results" id="results-table">'
            "<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>",
            head=head,
            rows=body_rows,
        )
    else:
        table = render(
            '<div class="empty" id="no-results"><p>No results match these filters.</p>'
            '<p><a href="{reset}">Show all results</a></p></div>',
            reset="/",
        )
    pager = _pager(view, page)
    body = render(
        """<section class="page-head">
  <h1>Results</h1>
  <p class="lede">Every benchmark result in perfdb. A test opens the full result; a user opens their charts;
    ticking two results compares them.</p>
</section>
{form}
{ranges}
<p class="summary" id="summary">{summary}</p>
{truncated}
{table}
{pager}""",
        form=form,
        ranges=ranges,
        summary=page.summary,
        truncated=notice(page.truncated_note, "warn") if page.truncated_note else Markup(""),
        table=table,
        pager=pager,
    )
    return layout(site, title="Results", active="results", body=body)


def _header_cell(view: TableView, column: str) -> Markup:
    if column not in SORT_KEYS:
        # perfdb ranks by time and by metrics; a text column is narrowed with the filters instead.
        return render(
            '<th scope="col" class="text" data-column="{column}" aria-sort="none">{label}</th>',
            column=column,
            label=COLUMN_LABELS[column],
        )
    sorted_here = view.sort == column
    aria = ("descending" if view.descending else "ascending") if sorted_here else "none"
    arrow = ("▼" if view.descending else "▲") if sorted_here else ""
    numeric = column in METRICS_BY_NAME
    title = METRIC_DESCRIPTIONS.get(column, "") + (
        " (higher is better)" if numeric and higher_is_better(column) else " (lower is better)" if numeric else ""
    )
    return render(
        '<th scope="col" class="{cls}" data-column="{column}" aria-sort="{aria}" title="{title}">'
        '<a href="{href}">{label}<span class="arrow" aria-hidden="true">{arrow}</span></a></th>',
        cls="num" if numeric else "text",
        column=column,
        aria=aria,
        title=title.strip(),
        href=view.sorted_by(column).url(),
        label=COLUMN_LABELS[column],
        arrow=arrow,
    )


def _result_row(row: ResultRow, columns: list[str], users: dict[str, dict[str, Any]]) -> Markup:
    cells = []
    for column in columns:
        if column == "time":
            # The box that picks the result for a comparison (form compare-picks) leads the row.
            cells.append(
                render(
                    '<td class="time"><input type="checkbox" class="pick" name="pick" value="{id}" '
                    'form="compare-picks" aria-label="Pick this result to compare">{time}</td>',
                    id=row.record_id,
                    time=time_cell(row.timestamp),
                )
            )
        elif column == "user":
            cells.append(
                render(
                    '<td class="user"><a href="{href}" title="{user_id}">{name}</a></td>',
                    href=user_url(row.user_id),
                    user_id=row.user_id,
                    name=display_name(row.user_id, users.get(row.user_id)),
                )
            )
        elif column == "test":
            cells.append(
                render(
                    '<td class="test"><a href="{href}">{name}</a></td>',
                    href=result_url(row.record_id),
                    name=elided_name(row.test_name),
                )
            )
        elif column == "tag":
            cells.append(
                render(
                    '<td class="tag">{chip}</td>',
                    chip=render('<span class="chip">{tag}</span>', tag=row.tag) if row.tag else "",
                )
            )
        else:
            value = row.metrics.get(column)
            unit = METRICS_BY_NAME[column].unit
            cells.append(
                render(
                    '<td class="num" data-value="{raw}" title="{raw}">{text}</td>',
                    raw="" if value is None else repr(value),
                    text=format_value(value, unit),
                )
            )
    return render('<tr data-record-id="{id}">{cells}</tr>', id=row.record_id, cells=concat(cells))


def _pager(view: TableView, page: TablePage) -> Markup:
    if view.by_time:
        toward_start, further = ("Newer", "Older") if view.descending else ("Earlier", "Later")
        first, last = ("Newest", "Oldest") if view.descending else ("Oldest", "Newest")
    else:
        toward_start, further, first, last = "Previous", "Next", "First", ""
    links = [
        _pager_link(page.first, f"⇤ {first}", "first"),
        _pager_link(page.previous, f"← {toward_start}", "prev"),
        _pager_link(page.next, f"{further} →", "next"),
    ]
    if view.by_time:
        links.append(_pager_link(page.last, f"{last} ⇥", "last"))
    return render('<nav class="pager" aria-label="Pages">{links}</nav>', links=concat(links))


def _pager_link(view: TableView | None, label: str, rel: str) -> Markup:
    if view is None:
        return render('<span class="disabled">{label}</span>', label=label)
    return render('<a href="{url}" rel="{rel}" data-pager="{rel}">{label}</a>', url=view.url(), rel=rel, label=label)


# -- user page ---------------------------------------------------------------------------


# Where a chart page's data goes (it cannot come from a value: every `<` of one is escaped).
CHART_DATA_SLOT = Markup("<!--chart-data-->")


def chart_data_block(series: bytes) -> Markup:
    """The charts' first data (their API's reply, or the error the read met), for CHART_DATA_SLOT."""
    return json_data_block("chart-data", series)


def split_at_chart_data(page: Markup) -> tuple[Markup, Markup]:
    """A chart page's markup before and after its CHART_DATA_SLOT."""
    before, after = page.split(CHART_DATA_SLOT, 1)
    return Markup(before), Markup(after)


def user_page(site: Site, view: UserView, profile: dict[str, Any]) -> Markup:
    filters = view.filters
    name = display_name(view.user_id, profile)
    test_options = render('<option value="">All tests (one line each)</option>')
    if filters.test:
        test_options = concat([test_options, render('<option value="{t}" selected>{t}</option>', t=filters.test)])
    form = render(
        """<form class="filters" method="get" action="{action}" id="filters">
  <div class="field wide"><label for="f-test">Test</label>
    <select id="f-test" name="test" data-current="{test}">{options}</select></div>
  {tag}{date_from}{date_to}
  <div class="actions"><button type="submit">Apply</button><a class="button-link" href="{action}">Reset</a></div>
</form>""",
        action=view.path,
        test=filters.test,
        options=test_options,
        tag=_text_input("tag", "Tag", filters.tag, placeholder="any tag"),
        date_from=_date_input("from", "From", filters.date_from),
        date_to=_date_input("to", "To", filters.date_to),
    )
    ranges = _quick_ranges(lambda date_from, date_to: view.url(**_dates(filters, date_from, date_to)), filters)
    table_link = build_url("/", [("user", view.user_id), *view.params()])
    body = render(
        """<section class="page-head">
  <h1>{name}</h1>
  <p class="lede"><code>{user_id}</code> · <a href="{table}">these results as a table</a></p>
</section>
{form}
{ranges}
<p class="summary" id="chart-summary" aria-live="polite">Loading results…</p>
<div class="charts" id="charts" data-api="{api}"></div>
<div class="chart-tooltip" id="chart-tooltip" hidden></div>
{data}""",
        data=CHART_DATA_SLOT,
        name=name,
        user_id=view.user_id,
        table=table_link,
        form=form,
        ranges=ranges,
        api=view.api_url(PAGE_CHART_POINTS),
    )
    return layout(site, title=name, active="user", body=body, script="charts.js")


def one_test_url(test_name: str) -> str:
    return "/tests/" + urllib.parse.quote(test_name, safe="")


def one_test_page(site: Site, view: OneTestView) -> Markup:
    filters = view.filters
    form = render(
        """<form class="filters" method="get" action="{action}" id="filters">
  {tag}{date_from}{date_to}
  <div class="actions"><button type="submit">Apply</button><a class="button-link" href="{action}">Reset</a></div>
</form>""",
        action=view.path,
        tag=_text_input("tag", "Tag", filters.tag, placeholder="any tag"),
        date_from=_date_input("from", "From", filters.date_from),
        date_to=_date_input("to", "To", filters.date_to),
    )
    ranges = _quick_ranges(lambda date_from, date_to: view.url(**_dates(filters, date_from, date_to)), filters)
    body = render(
        """<section class="page-head">
  <h1>{test}</h1>
  <p class="lede">Everyone's results of this test over time · <a href="{table}">these results as a table</a></p>
</section>
{form}
{ranges}
<p class="summary" id="chart-summary" aria-live="polite">Loading results…</p>
<div class="charts" id="charts" data-api="{api}"></div>
<div class="chart-tooltip" id="chart-tooltip" hidden></div>
{data}""",
        data=CHART_DATA_SLOT,
        test=filters.test,
        table=view.url("/"),
        form=form,
        ranges=ranges,
        api=view.api_url(PAGE_CHART_POINTS),
    )
    return layout(site, title=filters.test, active="test", body=body, script="charts.js")


def _dates(filters: Filters, date_from: str, date_to: str) -> dict[str, Any]:
    changed = filters.with_dates(date_from, date_to)
    return {"date_from": changed.date_from, "date_to": changed.date_to, "since": changed.since, "until": changed.until}


# -- overview ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class OverviewPage:
    tests: list[tuple[str, int]]  # every test with the metric, most results first
    leaderboard_test: str
    leaderboard: list[LeaderboardEntry]  # the top of it
    leaderboard_users: int  # users with the metric in that test
    results: int  # results with the metric, of the test shown (or all)
    users: int


def overview_page(site: Site, view: OverviewView, page: OverviewPage, data: bytes) -> Markup:
    """The overview; `data` is its API reply, which the histogram draws from."""
    metric = METRICS_BY_NAME[view.metric]
    metric_options = concat(
        render('<option value="{name}"{sel}>{label} — {desc}</option>', name=m.name, label=m.label,
               desc=METRIC_DESCRIPTIONS[m.name], sel=_selected(m.name == view.metric))
        for m in CORE_METRICS
    )  # fmt: skip
    tests = list(page.tests)
    if view.test and view.test not in {name for name, _ in tests}:
        tests.insert(0, (view.test, 0))
    test_options = concat(
        [
            render('<option value="">All tests</option>'),
            *(
                render('<option value="{t}"{sel}>{t} ({n})</option>', t=name, n=count, sel=_selected(name == view.test))
                for name, count in tests
            ),
        ]
    )
    form = render(
        """<form class="filters" method="get" action="/overview" id="filters">
  <div class="field wide"><label for="f-metric">Metric</label>
    <select id="f-metric" name="metric">{metrics}</select></div>
  <div class="field wide"><label for="f-test">Test</label><select id="f-test" name="test">{tests}</select></div>
  <div class="actions"><button type="submit">Apply</button><a class="button-link" href="/overview">Reset</a></div>
</form>""",
        metrics=metric_options,
        tests=test_options,
    )
    better = "highest" if higher_is_better(view.metric) else "lowest"
    scope = f"of {view.test}" if view.test else "of all tests"
    body = render(
        """<section class="page-head">
  <h1>Overview</h1>
  <p class="lede">How {metric} is distributed across every result stored, and who holds the best one.
    perfdb keeps these totals as results arrive, so they cover all time and every tag.</p>
</section>
{form}
<div class="stat-cards">
  <div class="stat"><span class="stat-value" id="stat-results">{results}</span>
    <span class="stat-label">results</span></div>
  <div class="stat"><span class="stat-value" id="stat-users">{users}</span>
    <span class="stat-label">users</span></div>
  <div class="stat"><span class="stat-value" id="stat-tests">{test_count}</span>
    <span class="stat-label">tests</span></div>
</div>
<section class="card">
  <h2>Distribution of {metric} {scope}</h2>
  <div class="chart histogram" id="histogram" data-api="{api}" data-unit="{unit}"></div>
  <p class="chart-note" id="histogram-note"></p>
  {data}
</section>
{leaderboard}
<div class="chart-tooltip" id="chart-tooltip" hidden></div>""",
        metric=metric.label,
        scope=scope,
        form=form,
        results=f"{page.results:,}",
        users=f"{page.users:,}",
        test_count=f"{len(page.tests):,}",
        api=view.url("/api/overview"),
        unit=metric.unit,
        leaderboard=_leaderboard(view, page, better),
        data=json_data_block("histogram-data", data),
    )
    return layout(site, title="Overview", active="overview", body=body, script="charts.js")


def _leaderboard(view: OverviewView, page: OverviewPage, better: str) -> Markup:
    metric = METRICS_BY_NAME[view.metric]
    if not page.leaderboard_test:
        return render('<section class="card"><h2>Leaderboard</h2><p class="empty">No results yet.</p></section>')
    why = "" if view.test else " (the test with the most results; choose another above)"
    order = [] if higher_is_better(view.metric) else [("order", "asc")]
    rows = concat(
        render(
            '<tr><td class="num rank">{rank}</td>'
            '<td class="user"><a href="{user_href}" title="{user_id}">{user}</a></td>'
            '<td class="num best"><a href="{best_href}" title="this user\'s results of the test, best first">'
            "{value}</a></td>"
            '<td class="num">{results}</td></tr>',
            rank=entry.rank,
            user_href=build_url(user_url(entry.user_id), [("test", page.leaderboard_test)]),
            user_id=entry.user_id,
            user=entry.user_name,
            best_href=build_url(
                "/",
                [("test", page.leaderboard_test), ("user", entry.user_id), ("sort", view.metric), *order],
            ),
            value=entry.text,
            results=f"{entry.results:,}",
        )
        for entry in page.leaderboard
    )
    shown = len(page.leaderboard)
    count = f"the top {shown} of {page.leaderboard_users:,} users" if shown < page.leaderboard_users else "every user"
    return render(
        """<section class="card">
  <h2>Leaderboard: best {metric} per user</h2>
  <p class="chart-note">Test <a href="{test_href}"><strong>{test}</strong></a>{why}; {better} first, {count}.</p>
  <div class="table-wrap"><table class="results leaderboard" id="leaderboard">
    <thead><tr><th class="num">#</th><th>User</th><th class="num">Best {metric}</th>
      <th class="num">Results</th></tr></thead>
    <tbody>{rows}</tbody>
  </table></div>
</section>""",
        metric=metric.label,
        test=page.leaderboard_test,
        test_href=build_url("/", [("test", page.leaderboard_test), ("sort", view.metric), *order]),
        why=why,
        better=better,
        count=count,
        rows=rows,
    )


# -- result page -------------------------------------------------------------------------


def result_page(
    site: Site, record: dict[str, Any], profile: dict[str, Any] | None, verdicts: list[dict[str, Any]] | None
) -> Markup:
    user_id = str(record["user_id"])
    metrics: dict[str, Any] = record.get("metrics") or {}
    core_rows = concat(
        render(
            '<tr><th scope="row">{label}</th><td class="num">{text}</td>'
            '<td class="desc">{desc}</td><td class="raw">{raw}</td></tr>',
            label=m.label,
            text=format_value(metrics[m.name], m.unit),
            desc=METRIC_DESCRIPTIONS[m.name],
            raw=repr(metrics[m.name]),
        )
        for m in CORE_METRICS
        if m.name in metrics
    )
    custom_rows = concat(
        render(
            '<tr><th scope="row">{name}</th><td class="num">{text}</td>'
            '<td class="desc">{desc}</td><td class="raw">{raw}</td></tr>',
            name=name,
            text=format_value(value, metric_unit(record, name)),
            desc=_custom_description(record, name),
            raw=repr(value),
        )
        for name, value in sorted(metrics.items())
        if name not in METRICS_BY_NAME
    )
    sections = [
        render(
            '<section class="card"><h2>Metrics</h2><div class="table-wrap"><table class="kv metrics" id="metrics">'
            '<thead><tr><th>Metric</th><th class="num">Value</th><th>Meaning</th><th>As stored</th></tr></thead>'
            "<tbody>{core}{custom}</tbody></table></div></section>",
            core=core_rows,
            custom=custom_rows,
        ),
        verdicts_card(verdicts, record),
        source_card(record),
        distributions_card(record),
    ]
    for key, title in (
        ("scenario", "Scenario"),
        ("client_config", "Client configuration"),
        ("server_config", "Server configuration"),
        ("sys_info", "System info"),
    ):
        if key in record:
            sections.append(_structure_card(key, title, record[key]))
    raw = orjson.dumps(record, option=orjson.OPT_INDENT_2).decode()
    sections.append(
        render(
            '<section class="card"><h2>Raw JSON</h2><p class="chart-note">As perfdb stores it; also at '
            '<a href="{api}">{api}</a>.</p><pre class="json" id="raw-json">{raw}</pre></section>',
            api="/api/results/" + str(record["record_id"]),
            raw=raw,
        )
    )
    tag = str(record.get("tag", ""))
    test = str(record["test_name"])
    body = render(
        """<section class="page-head">
  <p class="crumbs"><a href="/">Results</a> &rsaquo; result <code>{record_id}</code></p>
  <h1>{test}</h1>
  <p class="lede">by <a href="{user_href}" title="{user_id}">{user}</a> · {time}{run_time}{tag}</p>
  <p class="links"><a href="{user_test_href}" id="user-test-link">This user's results of this test over time</a> ·
    <a href="{test_href}">everyone's results of this test</a>
    (<a href="{test_chart_href}" id="test-chart-link">over time</a>)</p>
</section>
<div class="result-grid">{sections}</div>""",
        record_id=record["record_id"],
        test=test,
        user_href=user_url(user_id),
        user_id=user_id,
        user=display_name(user_id, profile),
        time=render(
            '<span id="stored-time" title="when perfdb stored it">stored {time}</span>',
            time=time_cell(str(record["timestamp"])),
        ),
        run_time=render(
            ' · <span id="run-time" title="when it ran, by the benchmark tool\'s clock">ran {time}</span>',
            time=time_cell(str(record["run_time"])),
        )
        if isinstance(record.get("run_time"), str)
        else "",
        tag=render(' · tag <span class="chip">{tag}</span>', tag=tag) if tag else "",
        user_test_href=build_url(user_url(user_id), [("test", test)]),
        test_href=build_url("/", [("test", test)]),
        test_chart_href=one_test_url(test),
        sections=concat(sections),
    )
    return layout(site, title=test, active="result", body=body)


def _custom_description(record: dict[str, Any], name: str) -> str:
    unit = metric_unit(record, name)
    better = (record.get("better") or {}).get(name)
    return "custom metric" + (f", in {unit}" if unit else "") + (f", {better} is better" if better else "")


def source_card(record: dict[str, Any]) -> Markup:
    """The code the result measured, as the record names it: commit, branch, commit time, repository."""
    source = record.get("source")
    if not isinstance(source, dict) or not source:
        return Markup("")
    commit, branch = source.get("commit"), source.get("branch")
    repository, commit_time = source.get("repository"), source.get("commit_time")
    rows: list[tuple[str, object]] = []
    if isinstance(commit, str):
        web_repository = isinstance(repository, str) and repository.startswith(("https://", "http://"))
        commit_text = render('<code title="{commit}">{short}</code>', commit=commit, short=commit[:12])
        if web_repository:
            assert isinstance(repository, str)
            href = repository.rstrip("/").removesuffix(".git") + "/commit/" + urllib.parse.quote(commit, safe="")
            commit_text = render('<a href="{href}" id="source-commit-link">{text}</a>', href=href, text=commit_text)
        rows.append(("commit", commit_text))
    if isinstance(branch, str):
        rows.append(("branch", render('<span class="chip">{branch}</span>', branch=branch)))
    if isinstance(commit_time, str):
        rows.append(("commit time", time_cell(commit_time)))
    if isinstance(repository, str):
        rows.append(("repository", repository))
    return render(
        '<section class="card" id="source"><h2>Source</h2><div class="table-wrap"><table class="kv">'
        "<tbody>{rows}</tbody></table></div></section>",
        rows=concat(
            render('<tr><th scope="row">{name}</th><td data-field="{name}">{value}</td></tr>', name=name, value=value)
            for name, value in rows
        ),
    )


def distributions_card(record: dict[str, Any]) -> Markup:
    """Each series of samples the result carries, as a box plot over its samples with its
    count, extremes, quartiles and median, in the series' unit."""
    samples = record.get("samples")
    if not isinstance(samples, dict) or not samples:
        return Markup("")
    figures = concat(
        _distribution(name, values, metric_unit(record, name))
        for name, values in sorted(samples.items())
        if isinstance(values, list) and values
    )
    return render(
        '<section class="card wide" id="distributions"><h2>Distributions</h2>'
        '<p class="chart-note">The raw samples the result carries (each repetition or round), '
        "one box plot per series: the box spans the quartiles, the bar is the median, the whiskers reach "
        "the smallest and the largest sample, and each dot is a sample.</p>{figures}</section>",
        figures=figures,
    )


# The box plots' drawing, in SVG user units.
BOX_PLOT_WIDTH, BOX_PLOT_HEIGHT, BOX_PLOT_MARGIN = 600, 64, 16
# Series with more samples than this draw no dots (the box says enough, the page stays small).
MAX_DOTS = 500


def _distribution(name: str, values: list[float], unit: str) -> Markup:
    summary = sample_summary(values)
    peak = max(abs(summary.low), abs(summary.high))
    span = summary.high - summary.low
    # Enough digits that samples a hair apart (176.0 to 177.2 ns) do not all read the same.
    digits = min(6, max(3, math.ceil(math.log10(peak / span)) + 2)) if span > 0 else 3
    inner = BOX_PLOT_WIDTH - 2 * BOX_PLOT_MARGIN

    def x(value: float) -> str:
        fraction = (value - summary.low) / span if span > 0 else 0.5
        return f"{BOX_PLOT_MARGIN + fraction * inner:.1f}"

    middle = 24
    dots = (
        concat(
            render('<circle class="sample" cx="{x}" cy="{y}" r="2.5"></circle>', x=x(value), y=middle + 18)
            for value in values
        )
        if len(values) <= MAX_DOTS
        else ""
    )
    stats = (
        ("n", "count", summary.count),
        ("min", "min", summary.low),
        ("q1", "q1", summary.first_quartile),
        ("median", "median", summary.median),
        ("q3", "q3", summary.third_quartile),
        ("max", "max", summary.high),
    )
    return render(
        """<figure class="distribution" data-series="{name}">
<figcaption><strong>{name}</strong>{unit_note}</figcaption>
<svg class="box-plot" viewBox="0 0 {width} {height}" role="img" aria-label="{label}">
<line class="whisker" x1="{low}" y1="{middle}" x2="{high}" y2="{middle}"></line>
<line class="whisker-end" x1="{low}" y1="{top}" x2="{low}" y2="{bottom}"></line>
<line class="whisker-end" x1="{high}" y1="{top}" x2="{high}" y2="{bottom}"></line>
<rect class="box" x="{q1}" y="{box_top}" width="{box_width}" height="24"></rect>
<line class="median" x1="{median}" y1="{box_top}" x2="{median}" y2="{box_bottom}"></line>
{dots}</svg>
<table class="kv distribution-stats"><thead><tr>{heads}</tr></thead><tbody><tr>{cells}</tr></tbody></table>
</figure>""",
        name=name,
        unit_note=render(' <span class="muted">in {unit}</span>', unit=unit) if unit else "",
        width=BOX_PLOT_WIDTH,
        height=BOX_PLOT_HEIGHT,
        label=f"{name}: {summary.count} samples from {format_value(summary.low, unit, peak=peak)} "
        f"to {format_value(summary.high, unit, peak=peak)}, median {format_value(summary.median, unit, peak=peak)}",
        low=x(summary.low),
        high=x(summary.high),
        q1=x(summary.first_quartile),
        median=x(summary.median),
        box_width=f"{float(x(summary.third_quartile)) - float(x(summary.first_quartile)):.1f}",
        middle=middle,
        top=middle - 8,
        bottom=middle + 8,
        box_top=middle - 12,
        box_bottom=middle + 12,
        dots=dots,
        heads=concat(render('<th scope="col">{label}</th>', label=label) for label, _, _ in stats),
        cells=concat(
            render(
                '<td class="num" data-stat="{stat}" data-value="{raw}" title="{raw}">{text}</td>',
                stat=stat,
                raw=repr(value),
                text=str(value) if stat == "count" else format_value(value, unit, peak=peak, digits=digits),
            )
            for _, stat, value in stats
        ),
    )


def verdicts_card(verdicts: list[dict[str, Any]] | None, record: dict[str, Any]) -> Markup:
    """The verdicts perfdb gave the result when it stored it, with the numbers behind each."""
    if not verdicts:
        return render(
            '<section class="card wide" id="verdicts"><h2>Verdicts</h2>'
            '<p class="empty" id="no-verdicts">No verdict stored for this result. perfdb judges a result against '
            "its series' history as it stores it when it runs with <code>--regression-detection</code>; results "
            "stored without it, imported results, and results whose verdicts a crash lost have none.</p></section>"
        )
    return render(
        '<section class="card wide" id="verdicts"><h2>Verdicts</h2>'
        '<p class="chart-note">Each metric against the last results of its series (this user, test and tag), '
        "judged when perfdb stored it.</p>"
        '<div class="table-wrap"><table class="kv verdicts" id="verdicts-table"><thead><tr>'
        '<th>Metric</th><th>Status</th><th class="num">Value</th><th class="num">Baseline n</th>'
        '<th class="num">Mean</th><th class="num">Std dev</th><th class="num">Change</th>'
        "<th>Threshold</th><th>Model</th></tr></thead><tbody>{rows}</tbody></table></div></section>",
        rows=concat(verdict_row(verdict, record) for verdict in verdicts),
    )


def verdict_row(verdict: dict[str, Any], record: dict[str, Any]) -> Markup:
    """One metric's verdict, its numbers in the metric's unit (a custom metric's as the record gives it)."""
    name = str(verdict.get("metric", ""))
    metric = METRICS_BY_NAME.get(name)
    unit = metric_unit(record, name)
    status = str(verdict.get("status", ""))
    baseline = verdict.get("baseline") or {}
    model = verdict.get("model") or {}
    direction = verdict.get("direction")
    return render(
        '<tr class="status-row-{status}" data-metric="{name}"><th scope="row" title="{better}">{label}</th>'
        '<td><span class="chip status-{status}">{status_label}</span></td>'
        '<td class="num" title="{value_raw}">{value}</td><td class="num">{n}</td>'
        '<td class="num" title="{mean_raw}">{mean}</td><td class="num" title="{stddev_raw}">{stddev}</td>'
        '{change}<td class="threshold" title="{threshold_title}">{threshold}</td>'
        '<td class="model" title="{model_name}">{model}</td></tr>',
        status=status,
        name=name,
        better=f"{direction} is better" if direction else "which way is better is unknown",
        label=metric.label if metric is not None else name,
        status_label=STATUS_LABELS.get(status, status),
        value_raw=repr(verdict.get("value")),
        value=format_value(verdict.get("value"), unit),
        n=format_value(baseline.get("n", 0), ""),
        mean_raw=repr(baseline.get("mean")) if "mean" in baseline else "",
        mean=format_value(baseline.get("mean"), unit),
        stddev_raw=repr(baseline.get("stddev")) if "stddev" in baseline else "",
        stddev=format_value(baseline.get("stddev"), unit),
        change=change_cell(verdict.get("change_percent"), status),
        threshold_title=_threshold_title(verdict.get("threshold"), unit),
        threshold=_threshold_text(verdict.get("threshold"), unit),
        model_name=str(model.get("name", "")),
        model=_model_text(model),
    )


def _threshold_text(threshold: dict[str, Any] | None, unit: str) -> str:
    """The bound the move had to exceed: ±50.1 (5.0 %, min_change)."""
    if not threshold:
        return "-"
    percent = threshold.get("percent")
    share = "" if percent is None else f"{percent:.1f} %, "
    return f"±{format_value(threshold.get('bound'), unit)} ({share}{threshold.get('governed_by', '')})"


def _threshold_title(threshold: dict[str, Any] | None, unit: str) -> str:
    if not threshold:
        return "too few results in the baseline for a threshold"
    return (
        f"the larger of sigmas times the stddev ({format_value(threshold.get('sigma_bound'), unit)}) and "
        f"min_change times the mean ({format_value(threshold.get('min_change_bound'), unit)})"
    )


def _model_text(model: dict[str, Any]) -> str:
    """window 30 · min 5 · 3 sigmas · 5 %"""
    parts = []
    if "window" in model:
        parts.append(f"window {model['window']}")
    if "min_points" in model:
        parts.append(f"min {model['min_points']}")
    if "sigmas" in model:
        parts.append(f"{model['sigmas']:g} sigmas")
    if "min_change" in model:
        parts.append(f"{model['min_change'] * 100:g} %")
    return " · ".join(parts) or "-"


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested JSON as (path, scalar) pairs: {"a": {"b": [1, 2]}} -> [("a.b", "1, 2")]."""
    if isinstance(value, dict):
        if not value:
            return [(prefix, "{}")] if prefix else []
        pairs: list[tuple[str, Any]] = []
        for key, item in value.items():
            pairs.extend(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return pairs
    if isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value):
            return [(prefix, ", ".join(_scalar_text(item) for item in value) or "[]")]
        pairs = []
        for index, item in enumerate(value):
            pairs.extend(flatten(item, f"{prefix}[{index}]"))
        return pairs
    return [(prefix, value)]


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _structure_card(key: str, title: str, value: Any) -> Markup:
    if isinstance(value, str):
        content = render('<pre class="text">{text}</pre>', text=value)
    else:
        pairs = flatten(value)
        if not pairs:
            content = render('<p class="empty">None recorded.</p>')
        else:
            content = render(
                '<div class="table-wrap"><table class="kv"><tbody>{rows}</tbody></table></div>',
                rows=concat(
                    render('<tr><th scope="row">{path}</th><td>{value}</td></tr>', path=path, value=_scalar_text(item))
                    for path, item in pairs
                ),
            )
    return render(
        '<section class="card" id="{key}"><h2>{title}</h2>{content}</section>',
        key=key.replace("_", "-"),
        title=title,
        content=content,
    )


# -- errors and the API index --------------------------------------------------------------


def error_page(site: Site, *, status: int, title: str, message: str, retry_url: str | None) -> Markup:
    retry = (
        render(
            '<p class="retry">The dashboard reconnects by itself once perfdb is back. '
            '<a class="button-link" href="{url}" id="retry">Retry</a></p>',
            url=retry_url,
        )
        if retry_url
        else Markup("")
    )
    body = render(
        """<section class="error-panel" data-status="{status}">
  <h1>{title}</h1>
  <p class="error-message" id="error-message">{message}</p>
  {retry}
  <p><a href="/">Back to the results</a></p>
</section>""",
        status=status,
        title=title,
        message=message,
        retry=retry,
    )
    return layout(site, title=title, active="error", body=body)


API_ENDPOINTS = (
    ("/api/results", "A page of the results table; takes the table's query parameters and follows its links."),
    ("/api/results/{record_id}", "One stored result, its user's public profile and the verdicts stored with it."),
    (
        "/api/users/{user_id}/series",
        "One user's results over time, downsampled for charts (test, tag, from, to, detail, points).",
    ),
    ("/api/tests/{test_name}/series", "Everyone's results of one test over time, downsampled (tag, from, to, points)."),
    ("/api/overview", "Histogram and leaderboard of one metric over all results (metric, test)."),
    ("/api/regressions", "Alerts of perfdb's regression detection, newest first (state, test, tag, user, cursor)."),
    (
        "/api/compare",
        "Two runs compared test by test and metric by metric: each a tag or result ids "
        "(base or base_ids, head or head_ids, test).",
    ),
    ("/api/health", "Whether perfdb answers, and its version."),
)


def api_index_page(site: Site) -> Markup:
    rows = concat(
        render("<tr><td><code>GET {path}</code></td><td>{text}</td></tr>", path=path, text=text)
        for path, text in API_ENDPOINTS
    )
    body = render(
        """<section class="page-head"><h1>JSON API</h1>
<p class="lede">The endpoints behind the charts. Every page's query parameters work here too; errors come
as <code>{{"error": {{"code": ..., "message": ...}}}}</code>.</p></section>
<section class="card"><table class="kv"><tbody>{rows}</tbody></table></section>""",
        rows=rows,
    )
    return layout(site, title="JSON API", active="api", body=body)


# -- regressions -------------------------------------------------------------------------------


def change_cell(change_percent: float | None, status: str, *, title: str = "") -> Markup:
    """A change of a mean in percent, coloured by whether it is a regression or an improvement."""
    text = "-" if change_percent is None else f"{change_percent:+.1f}%"
    return render(
        '<td class="num change status-{status}"{title}>{text}</td>',
        status=status,
        text=text,
        title=render(' title="{title}"', title=title) if title else "",
    )


def alert_row(alert: dict[str, Any]) -> Markup:
    chart = build_url(
        user_url(alert["user_id"]), [("test", alert["test_name"]), *([("tag", alert["tag"])] if alert["tag"] else [])]
    )
    return render(
        '<tr data-alert-id="{alert_id}"><td class="time">{time}</td>'
        '<td class="test"><a href="{chart}">{test}</a></td><td>{metric}</td>'
        '<td class="user"><a href="{user_href}">{user}</a></td><td class="tag">{tag}</td>{change}'
        '<td><span class="chip state-{state}">{state}</span></td>'
        '<td><a href="{result}">result</a> · <a href="{chart}">chart</a></td></tr>',
        alert_id=alert["alert_id"],
        time=time_cell(alert["created"]),
        chart=chart,
        test=elided_name(alert["test_name"]),
        metric=alert["metric"],
        user_href=user_url(alert["user_id"]),
        user=alert["user_id"],
        tag=render('<span class="chip">{tag}</span>', tag=alert["tag"]) if alert["tag"] else "",
        change=change_cell(alert.get("change_percent"), "regression"),
        state=alert["state"],
        result=result_url(alert["record_id"]),
    )


def regressions_page(
    site: Site, view: RegressionsView, alerts: list[dict[str, Any]], next_cursor: str | None
) -> Markup:
    states = concat(
        render('<option value="{value}"{sel}>{value}</option>', value=state, sel=_selected(state == view.state))
        for state in (*ALERT_STATES, "all")
    )
    form = render(
        """<form class="filters" method="get" action="/regressions" id="alert-filters">
  <div class="field"><label for="f-state">State</label><select id="f-state" name="state">{states}</select></div>
  {test}{tag}{user}
  <div class="actions"><button type="submit">Apply</button><a class="button-link" href="/regressions">Reset</a></div>
</form>""",
        states=states,
        test=_text_input("test", "Test", view.test, placeholder="any test"),
        tag=_text_input("tag", "Tag", view.tag, placeholder="any tag"),
        user=_text_input("user", "User id", view.user, placeholder="any user"),
    )
    if alerts:
        table = render(
            '<div class="table-wrap"><table class="results" id="alerts-table"><thead><tr>'
            "<th>Raised (UTC)</th><th>Test</th><th>Metric</th><th>User</th><th>Tag</th><th>Change</th>"
            "<th>State</th><th>Links</th></tr></thead><tbody>{rows}</tbody></table></div>",
            rows=concat(alert_row(alert) for alert in alerts),
        )
    else:
        table = render(
            '<div class="empty" id="no-alerts"><p>No {state} alerts match these filters.</p></div>',
            state="" if view.state == "all" else view.state,
        )
    pager = (
        render(
            '<nav class="pager"><a rel="next" href="{href}">Older alerts</a></nav>', href=view.url(cursor=next_cursor)
        )
        if next_cursor
        else Markup("")
    )
    body = render(
        """<section class="page-head">
  <h1>Regressions</h1>
  <p class="lede">Change points the worse way that perfdb found in a series (user, test, tag and metric),
  newest first. States are changed with <code>perfdb alert ALERT_ID --state ...</code>, not here.</p>
</section>
{form}
{table}
{pager}""",
        form=form,
        table=table,
        pager=pager,
    )
    return layout(site, title="Regressions", active="regressions", body=body)


# -- compare -----------------------------------------------------------------------------------

STATUS_LABELS = {
    "regression": "regression",
    "improvement": "improvement",
    "no_change": "no change",
    "insufficient_data": "too few values",
}


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _pvalue_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value >= 0.001 else "< 0.001"


def compare_row(row: dict[str, Any]) -> Markup:
    metric = METRICS_BY_NAME.get(row["metric"])
    unit = metric.unit if metric is not None else ""
    change = row["change_percent"]
    change_title = ""
    if change is None and row["status"] == "insufficient_data" and row["base"].get("mean"):
        # One result a side (two picked from a table) is too few to judge, but the difference still shows.
        change = (row["head"]["mean"] - row["base"]["mean"]) / abs(row["base"]["mean"]) * 100
        change_title = "head mean against base mean; too few values to judge whether it is significant"
    return render(
        '<tr class="status-row-{status}"><td class="test">{test}</td><td>{metric}</td>'
        '<td><span class="chip status-{status}">{label}</span></td>'
        '<td class="num">{base_n}</td><td class="num" title="{base_raw}">{base_mean}</td>'
        '<td class="num">{head_n}</td><td class="num" title="{head_raw}">{head_mean}</td>'
        '{change}<td class="num" title="{pvalue_raw}">{pvalue}</td></tr>',
        status=row["status"],
        label=STATUS_LABELS.get(row["status"], row["status"]),
        test=elided_name(row["test_name"]),
        metric=row["metric"],
        base_n=format_value(row["base"]["n"], ""),
        base_raw=repr(row["base"]["mean"]),
        base_mean=format_value(row["base"]["mean"], unit),
        head_n=format_value(row["head"]["n"], ""),
        head_raw=repr(row["head"]["mean"]),
        head_mean=format_value(row["head"]["mean"], unit),
        change=change_cell(change, row["status"], title=change_title),
        pvalue_raw="" if row["pvalue"] is None else repr(row["pvalue"]),
        pvalue=_pvalue_text(row["pvalue"]),
    )


def _side_text(tag: str, ids: tuple[str, ...], records: int) -> str:
    """What one side of a comparison holds: "12 results under v1.2", or "1 picked result"."""
    if ids:
        return f"{_plural(records, 'picked result')}"
    return f"{_plural(records, 'result')} under {tag or '(no tag)'}"


def _side_input(side: str, label: str, tag: str, ids: tuple[str, ...], placeholder: str) -> Markup:
    """A side of the form: its tag, or the result ids it names when it names some."""
    if ids:
        return _text_input(f"{side}_ids", f"{label}: result ids", ",".join(ids), placeholder="ids, comma-separated")
    return _text_input(side, f"{label} tag", tag, placeholder=placeholder)


def compared_results(view: CompareView, records: Mapping[str, dict[str, Any] | None]) -> Markup:
    """The results a comparison by id holds, side by side: what is being compared."""

    def listing(side: str, label: str, ids: tuple[str, ...], tag: str) -> Markup:
        if not ids:
            return render(
                '<div class="side" id="compared-{side}"><h3>{label}</h3><p>Every result under the tag '
                '<span class="chip">{tag}</span></p></div>',
                side=side,
                label=label,
                tag=tag,
            )
        items = []
        for record_id in ids:
            record = records.get(record_id)
            if record is None:
                items.append(render("<li><code>{id}</code>: perfdb has no such result</li>", id=record_id))
                continue
            items.append(
                render(
                    '<li data-record-id="{id}"><a href="{href}">{test}</a> · {time} · '
                    '<a href="{user_href}">{user}</a>{tag}</li>',
                    id=record_id,
                    href=result_url(record_id),
                    test=elided_name(str(record.get("test_name", ""))),
                    time=time_cell(str(record.get("timestamp", ""))),
                    user_href=user_url(str(record.get("user_id", ""))),
                    user=record.get("user_id", ""),
                    tag=render(' · <span class="chip">{tag}</span>', tag=record["tag"]) if record.get("tag") else "",
                )
            )
        return render(
            '<div class="side" id="compared-{side}"><h3>{label}</h3><ul>{items}</ul></div>',
            side=side,
            label=label,
            items=concat(items),
        )

    return render(
        '<section class="card compared" id="compared"><h2>Compared</h2><div class="sides">{base}{head}</div></section>',
        base=listing("base", "Base (before)", view.base_ids, view.base),
        head=listing("head", "Head (after)", view.head_ids, view.head),
    )


def compare_page(
    site: Site,
    view: CompareView,
    reply: dict[str, Any] | None,
    records: Mapping[str, dict[str, Any] | None] | None = None,
) -> Markup:
    """The comparison of two runs; `records` holds the results that a side names by id."""
    form = render(
        """<form class="filters" method="get" action="/compare" id="compare-form">
  {base}{head}{test}
  <div class="actions"><button type="submit">Compare</button>{tags_link}</div>
</form>""",
        base=_side_input("base", "Base (before)", view.base, view.base_ids, "e.g. v1.2"),
        head=_side_input("head", "Head (after)", view.head, view.head_ids, "e.g. v1.3"),
        test=_text_input("test", "Test", view.test, placeholder="all tests"),
        tags_link=render('<a class="button-link" href="/compare">Compare tags instead</a>')
        if view.base_ids or view.head_ids
        else "",
    )
    compared = compared_results(view, records or {}) if reply is not None and (view.base_ids or view.head_ids) else ""
    if reply is None:
        result = notice(
            "Give two tags to compare the results of one with the other's, test by test and metric by metric, "
            "or tick two results in the results table and press Compare."
        )
    elif not reply["rows"]:
        result = render(
            '<div class="empty" id="no-rows"><p>Nothing to compare: {base} against {head}, '
            "and no test and metric both hold.</p></div>",
            base=_side_text(view.base, view.base_ids, reply["base"]["records"]),
            head=_side_text(view.head, view.head_ids, reply["head"]["records"]),
        )
    else:
        counts = {status: sum(1 for row in reply["rows"] if row["status"] == status) for status in STATUS_LABELS}
        result = render(
            '<p class="summary" id="summary">{base} against {head}: '
            "{regressions}, {improvements}, {unchanged} unchanged.</p>"
            '<div class="table-wrap"><table class="results" id="compare-table"><thead><tr>'
            "<th>Test</th><th>Metric</th><th>Status</th><th>Base n</th><th>Base mean</th><th>Head n</th>"
            '<th>Head mean</th><th>Change</th><th title="the p-value the verdict used">p-value</th></tr></thead>'
            "<tbody>{rows}</tbody></table></div>",
            base=_side_text(view.base, view.base_ids, reply["base"]["records"]),
            head=_side_text(view.head, view.head_ids, reply["head"]["records"]),
            regressions=_plural(counts["regression"], "regression"),
            improvements=_plural(counts["improvement"], "improvement"),
            unchanged=counts["no_change"] + counts["insufficient_data"],
            rows=concat(compare_row(row) for row in reply["rows"]),
        )
    body = render(
        """<section class="page-head">
  <h1>Compare</h1>
  <p class="lede">Two runs' results, test by test: a change counts when it is significant and at least 5 %.</p>
</section>
{form}
{compared}
{result}""",
        form=form,
        compared=compared,
        result=result,
    )
    return layout(site, title="Compare", active="compare", body=body)
