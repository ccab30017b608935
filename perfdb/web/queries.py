"""What a dashboard URL means: query strings parsed into typed views, and views written back as
canonical URLs, so every page state is a link that can be shared."""

from __future__ import annotations

import dataclasses
import datetime
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from perfdb.records.record_ids import is_record_id
from perfdb.records.timestamps import format_micros, now_micros, parse_rfc3339
from perfdb.records.units import CORE_METRIC_NAMES, CORE_METRICS, Metric

MICROS_PER_DAY = 86_400 * 1_000_000
# Field bounds of the perfdb protocol (test_name, tag, user_id): longer values could never match.
MAX_FIELD_CHARS = 256
MAX_SEARCH_CHARS = 200
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# perfdb ranks by time or by a metric; text columns are filters, not orders.
SORT_KEYS = ("time", *CORE_METRIC_NAMES)
# Columns a reader may hide; time and test identify a row, so they always show.
OPTIONAL_COLUMNS = ("user", "tag", *CORE_METRIC_NAMES)
PER_PAGE_CHOICES = (25, 50, 100, 200, 500)
DEFAULT_PER_PAGE = 50
METRICS_BY_NAME: dict[str, Metric] = {metric.name: metric for metric in CORE_METRICS}
# A sorted table keeps the cursors of the pages before it in its URL (to page back exactly);
# past this many pages the URL would grow too long, so paging on stops there.
MAX_SORTED_PAGES = 100
_SORT_CURSOR = re.compile(r"[0-9a-f]{20}:[-+.0-9e]{0,40}")
QUICK_RANGES = (("7 days", 7), ("30 days", 30), ("90 days", 90), ("1 year", 365))


class QueryError(ValueError):
    """A query-string value the dashboard cannot use; shown to the reader as a 400 page."""


def higher_is_better(metric: str) -> bool:
    """Throughput: more is better. Latency and CPU time: less is better."""
    return METRICS_BY_NAME[metric].unit == "qps" if metric in METRICS_BY_NAME else False


def default_descending(column: str) -> bool:
    """The first click on a column header shows the newest, or the best, first."""
    return column == "time" or higher_is_better(column)


# -- single values -----------------------------------------------------------------------


def _text(params: Mapping[str, str], name: str, limit: int = MAX_FIELD_CHARS) -> str:
    value = params.get(name, "").strip()
    if len(value) > limit:
        raise QueryError(f"{name}: at most {limit} characters")
    if _CONTROL_CHARS.search(value):
        raise QueryError(f"{name}: must not contain control characters")
    return value


def _choice(params: Mapping[str, str], name: str, choices: tuple[Any, ...], default: Any) -> Any:
    raw = params.get(name, "")
    if raw == "":
        return default
    for choice in choices:
        if str(choice) == raw:
            return choice
    raise QueryError(f"{name}: must be one of {', '.join(str(choice) for choice in choices)}")


def _position(params: Mapping[str, str], name: str) -> str | None:
    raw = params.get(name, "")
    if raw == "":
        return None
    if not is_record_id(raw):
        raise QueryError(f"{name}: not a result id (20 hexadecimal digits)")
    return raw


def _trail(params: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = params.get(name, "")
    if raw == "":
        return ()
    cursors = tuple(raw.split(","))
    if len(cursors) >= MAX_SORTED_PAGES:
        raise QueryError(f"{name}: at most {MAX_SORTED_PAGES - 1} positions")
    if not all(_SORT_CURSOR.fullmatch(cursor) for cursor in cursors):
        raise QueryError(f"{name}: not a list of positions in a sorted table")
    return cursors


def parse_moment(text: str, name: str, *, end_of_day: bool) -> int:
    """A date (2026-01-31, a whole UTC day) or an RFC 3339 time, in microseconds since the epoch.

    A day given as the end of a range includes that whole day.
    """
    if _DAY.fullmatch(text):
        try:
            day = datetime.date.fromisoformat(text)
        except ValueError:
            raise QueryError(f"{name}: {text!r} is not a date") from None
        if day.year < 1970:
            raise QueryError(f"{name}: dates before 1970 are not supported")
        micros = (day - datetime.date(1970, 1, 1)).days * MICROS_PER_DAY
        return micros + MICROS_PER_DAY if end_of_day else micros
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise QueryError(f"{name}: expected a date like 2026-01-31 or a time like 2026-01-31T12:00:00Z") from None


def day_text(micros: int) -> str:
    """The UTC day of a moment, as a date input shows it."""
    return format_micros(micros)[:10]


def quick_range(days: int, today_micros: int | None = None) -> tuple[str, str]:
    """from/to values for the last `days` days, today included."""
    today = (today_micros if today_micros is not None else now_micros()) // MICROS_PER_DAY * MICROS_PER_DAY
    return day_text(today - (days - 1) * MICROS_PER_DAY), day_text(today)


# -- filters shared by every page --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Filters:
    """Which results a page is about. Empty strings mean "any"."""

    test: str = ""
    tag: str = ""
    user: str = ""
    search: str = ""
    date_from: str = ""  # as the reader gave it: a day or an RFC 3339 time
    date_to: str = ""
    since: int | None = None  # microseconds, inclusive
    until: int | None = None  # microseconds, exclusive

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Filters:
        date_from, date_to = _text(params, "from", 64), _text(params, "to", 64)
        since = parse_moment(date_from, "from", end_of_day=False) if date_from else None
        until = parse_moment(date_to, "to", end_of_day=True) if date_to else None
        if since is not None and until is not None and until <= since:
            raise QueryError("to: must be later than from")
        return cls(
            test=_text(params, "test"),
            tag=_text(params, "tag"),
            user=_text(params, "user"),
            search=_text(params, "q", MAX_SEARCH_CHARS),
            date_from=date_from,
            date_to=date_to,
            since=since,
            until=until,
        )

    def with_dates(self, date_from: str, date_to: str) -> Filters:
        """These filters over another date range (values already known to be valid)."""
        since = parse_moment(date_from, "from", end_of_day=False) if date_from else None
        until = parse_moment(date_to, "to", end_of_day=True) if date_to else None
        return dataclasses.replace(self, date_from=date_from, date_to=date_to, since=since, until=until)

    @property
    def search_words(self) -> tuple[str, ...]:
        return tuple(self.search.casefold().split())

    def params(self) -> list[tuple[str, str]]:
        pairs = [
            ("test", self.test),
            ("tag", self.tag),
            ("user", self.user),
            ("q", self.search),
            ("from", self.date_from),
            ("to", self.date_to),
        ]
        return [(name, value) for name, value in pairs if value]


def build_url(path: str, params: list[tuple[str, str]]) -> str:
    query = urllib.parse.urlencode(params)
    return f"{path}?{query}" if query else path


# -- the results table -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TableView:
    """The results table: filters, sort, visible columns and where in the results the page is.

    Sorted by time, a page is found by position: `before`/`after` a result id (perfdb takes a
    record id as a cursor in either direction), or `last` for the far end of the order. Sorted by
    a metric, perfdb ranks the whole filtered set and pages by cursor; `trail` holds the cursors
    that end each earlier page, so going back a page is as exact as going forward.
    """

    filters: Filters = Filters()
    sort: str = "time"
    descending: bool = True
    columns: tuple[str, ...] = OPTIONAL_COLUMNS
    per_page: int = DEFAULT_PER_PAGE
    before: str | None = None
    after: str | None = None
    last: bool = False
    trail: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TableView:
        """The view a query string asks for; `cols` lists the optional columns to show, comma-separated."""
        sort = _choice(params, "sort", SORT_KEYS, "time")
        order = _choice(params, "order", ("asc", "desc"), "")
        columns = OPTIONAL_COLUMNS
        chosen = [name for name in params.get("cols", "").split(",") if name]
        if "cols" in params:
            unknown = [name for name in chosen if name not in OPTIONAL_COLUMNS]
            if unknown:
                raise QueryError(f"cols: unknown column {unknown[0][:40]!r}")
            columns = tuple(name for name in OPTIONAL_COLUMNS if name in chosen)
        before, after = _position(params, "before"), _position(params, "after")
        last = _choice(params, "last", ("1",), "") == "1"
        if sum((before is not None, after is not None, last)) > 1:
            raise QueryError("before, after, last: give one of them, not several")
        return cls(
            filters=Filters.from_params(params),
            sort=sort,
            descending=default_descending(sort) if order == "" else order == "desc",
            columns=columns,
            per_page=_choice(params, "per_page", PER_PAGE_CHOICES, DEFAULT_PER_PAGE),
            before=before,
            after=after,
            last=last,
            trail=_trail(params, "trail"),
        )

    @property
    def by_time(self) -> bool:
        return self.sort == "time"

    @property
    def page_number(self) -> int:
        """Of a sorted table: how many pages from the top this one is."""
        return len(self.trail) + 1

    @property
    def visible_columns(self) -> list[str]:
        """The table's columns, left to right."""
        columns = ["time", *(["user"] if "user" in self.columns else []), "test"]
        return columns + [name for name in ("tag", *CORE_METRIC_NAMES) if name in self.columns]

    def params(self) -> list[tuple[str, str]]:
        pairs = self.filters.params()
        if self.sort != "time":
            pairs.append(("sort", self.sort))
        if self.descending != default_descending(self.sort):
            pairs.append(("order", "desc" if self.descending else "asc"))
        if self.columns != OPTIONAL_COLUMNS:
            # An empty value still counts as given: no optional column at all.
            pairs.append(("cols", ",".join(self.columns)))
        if self.per_page != DEFAULT_PER_PAGE:
            pairs.append(("per_page", str(self.per_page)))
        if self.by_time:
            if self.before:
                pairs.append(("before", self.before))
            if self.after:
                pairs.append(("after", self.after))
            if self.last:
                pairs.append(("last", "1"))
        elif self.trail:
            pairs.append(("trail", ",".join(self.trail)))
        return pairs

    def url(self, path: str = "/", **changes: Any) -> str:
        return build_url(path, dataclasses.replace(self, **changes).params())

    def first_page(self, **changes: Any) -> TableView:
        """The same view at its first page (after a change of filters or sort)."""
        return dataclasses.replace(self, **{"before": None, "after": None, "last": False, "trail": (), **changes})

    def sorted_by(self, column: str) -> TableView:
        """The view a click on a column header opens: that column, flipped if it is already the sort."""
        descending = not self.descending if column == self.sort else default_descending(column)
        return self.first_page(sort=column, descending=descending)


# -- the user page -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class UserView:
    user_id: str
    filters: Filters

    @classmethod
    def from_params(cls, user_id: str, params: Mapping[str, str]) -> UserView:
        if not user_id.strip() or len(user_id) > MAX_FIELD_CHARS or _CONTROL_CHARS.search(user_id):
            raise QueryError("user: not a user id")
        filters = Filters.from_params(params)
        return cls(user_id=user_id, filters=dataclasses.replace(filters, user=user_id, search=""))

    @property
    def path(self) -> str:
        return "/users/" + urllib.parse.quote(self.user_id, safe="")

    def params(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in self.filters.params() if name != "user"]

    def url(self, **filter_changes: Any) -> str:
        filters = dataclasses.replace(self.filters, **filter_changes)
        return build_url(self.path, [(n, v) for n, v in filters.params() if n != "user"])

    def api_url(self, points: int) -> str:
        """The charts' data, at `points` a line."""
        path = self.path.replace("/users/", "/api/users/", 1) + "/series"
        return build_url(path, [*self.params(), ("points", str(points))])


# -- one test across users -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class OneTestView:
    """Everyone's results of one test over time."""

    filters: Filters

    @classmethod
    def from_params(cls, test_name: str, params: Mapping[str, str]) -> OneTestView:
        if not test_name.strip() or len(test_name) > MAX_FIELD_CHARS or _CONTROL_CHARS.search(test_name):
            raise QueryError("test: not a test name")
        filters = Filters.from_params(params)
        return cls(filters=dataclasses.replace(filters, test=test_name, user="", search=""))

    @property
    def path(self) -> str:
        return "/tests/" + urllib.parse.quote(self.filters.test, safe="")

    def params(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in self.filters.params() if name != "test"]

    def url(self, path: str | None = None, **filter_changes: Any) -> str:
        filters = dataclasses.replace(self.filters, **filter_changes)
        if path is not None:  # another page of the same results, e.g. the table
            return build_url(path, filters.params())
        return build_url(self.path, [(n, v) for n, v in filters.params() if n != "test"])

    def api_url(self, points: int) -> str:
        """The charts' data, at `points` a line."""
        return build_url("/api" + self.path + "/series", [*self.params(), ("points", str(points))])


# -- the overview ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class OverviewView:
    """The overview: one metric over every stored result, of one test or of all of them.

    It is drawn from perfdb's running aggregates (the overview op), which cover all time and
    every tag: that keeps its cost per test rather than per result, so it takes no date or tag.
    """

    metric: str = "qps"
    test: str = ""

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> OverviewView:
        return cls(metric=_choice(params, "metric", CORE_METRIC_NAMES, "qps"), test=_text(params, "test"))

    def params(self) -> list[tuple[str, str]]:
        # The test is always written, empty included: an empty one means "all tests", while a
        # missing one means the default (the test with the most results).
        return [("metric", self.metric), ("test", self.test)]

    def url(self, path: str = "/overview", **changes: Any) -> str:
        return build_url(path, dataclasses.replace(self, **changes).params())


# -- regressions and compare -----------------------------------------------------------------

ALERT_STATES = ("open", "acknowledged", "expected", "resolved")
ALERTS_PER_PAGE = 50


@dataclasses.dataclass(frozen=True, slots=True)
class RegressionsView:
    """The alerts list: one state (or "all"), optional series filters, and a page cursor."""

    state: str = "open"
    user: str = ""
    test: str = ""
    tag: str = ""
    cursor: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> RegressionsView:
        return cls(
            state=_choice(params, "state", ("all", *ALERT_STATES), "open"),
            user=_text(params, "user"),
            test=_text(params, "test"),
            tag=_text(params, "tag"),
            cursor=_text(params, "cursor", 64) or None,
        )

    def params(self) -> list[tuple[str, str]]:
        pairs = [("state", self.state if self.state != "open" else ""), ("user", self.user), ("test", self.test)]
        pairs += [("tag", self.tag), ("cursor", self.cursor or "")]
        return [(name, value) for name, value in pairs if value]

    def url(self, path: str = "/regressions", **changes: Any) -> str:
        return build_url(path, dataclasses.replace(self, **changes).params())


# Result ids one side of /compare may name: enough for any selection by hand, and a URL of a few KB at most.
MAX_COMPARE_IDS = 50


def _record_ids(params: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of distinct result ids, in the order given."""
    raw = params.get(name, "").strip()
    if raw == "":
        return ()
    ids = tuple(part.strip() for part in raw.split(","))
    if len(ids) > MAX_COMPARE_IDS:
        raise QueryError(f"{name}: at most {MAX_COMPARE_IDS} result ids")
    for record_id in ids:
        if not is_record_id(record_id):
            raise QueryError(f"{name}: {record_id[:40]!r} is not a result id (20 hexadecimal digits)")
    if len(set(ids)) != len(ids):
        raise QueryError(f"{name}: names a result twice")
    return ids


def picked_pair(picks: list[str]) -> tuple[str, str]:
    """Two results picked in a table (their ids): (base, head), the older one first."""
    if len(picks) != 2 or len(set(picks)) != 2:
        raise QueryError(f"pick: tick two results to compare, not {len(set(picks))}")
    for record_id in picks:
        if not is_record_id(record_id):
            raise QueryError(f"pick: {record_id[:40]!r} is not a result id (20 hexadecimal digits)")
    older, newer = sorted(picks)  # result ids sort by time
    return older, newer


@dataclasses.dataclass(frozen=True, slots=True)
class CompareView:
    """Two runs to compare, base (before) and head (after), each a tag or a list of result ids, and optionally
    one test."""

    base: str = ""
    head: str = ""
    test: str = ""
    base_ids: tuple[str, ...] = ()
    head_ids: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> CompareView:
        view = cls(
            base=_text(params, "base"),
            head=_text(params, "head"),
            test=_text(params, "test"),
            base_ids=_record_ids(params, "base_ids"),
            head_ids=_record_ids(params, "head_ids"),
        )
        for side, tag, ids in (("base", view.base, view.base_ids), ("head", view.head, view.head_ids)):
            if tag and ids:
                raise QueryError(f"{side}: give a tag or result ids ({side}_ids), not both")
        return view

    @property
    def ready(self) -> bool:
        return bool((self.base or self.base_ids) and (self.head or self.head_ids))

    def selector(self, side: str) -> dict[str, Any]:
        """perfdb's compare selector for one side ("base" or "head")."""
        ids = self.base_ids if side == "base" else self.head_ids
        if ids:
            return {"record_ids": list(ids)}
        return {"tag": self.base if side == "base" else self.head}

    def params(self) -> list[tuple[str, str]]:
        pairs = [("base", self.base), ("base_ids", ",".join(self.base_ids)), ("head", self.head)]
        pairs += [("head_ids", ",".join(self.head_ids)), ("test", self.test)]
        return [(name, value) for name, value in pairs if value]

    def url(self, path: str = "/compare") -> str:
        return build_url(path, self.params())
