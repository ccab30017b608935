"""The dashboard's window on perfdb: one long-lived client, exact pages read with perfdb's own
filters, cursors and rankings, its series and overview aggregates for the charts, and perfdb
failures turned into messages a reader can act on."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Sequence
from typing import Any

from perfdb.client import AsyncClient, PerfdbClientError, RetryPolicy
from perfdb.client.common import CONNECTION_FAILED, PROTOCOL_ERROR, TIMEOUT
from perfdb.records.record_ids import record_id_micros
from perfdb.records.timestamps import format_micros
from perfdb.records.units import CORE_METRIC_NAMES

# Records per perfdb request. Every handler shares one pipelined connection, so a page must be
# small enough that its reply never holds up the others for long.
PAGE_LIMIT = 1000
# A free-text search is matched here, not by perfdb: one table page examines at most this many
# results, then says where it stopped and links on from there.
SEARCH_BUDGET = 5000
# perfdb examines at most 50,000 index entries per request; a page whose filters intersect
# thinly reads on for at most this many requests before it says it stopped.
MAX_REQUESTS_PER_PAGE = 8
# Server errors that mean "perfdb cannot answer right now" rather than "perfdb says no".
UNAVAILABLE_CODES = frozenset({CONNECTION_FAILED, TIMEOUT, "shutting_down", "overloaded", "timeout"})


class PerfdbError(Exception):
    """perfdb could not answer the dashboard: unreachable, too slow, or it refused the read."""

    def __init__(self, code: str, message: str, *, unavailable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.unavailable = unavailable  # True: retrying later may work (shown with a retry hint)

    @classmethod
    def from_client_error(cls, error: PerfdbClientError, address: str) -> PerfdbError:
        if error.code == CONNECTION_FAILED:
            return cls(
                error.code, f"The perfdb server at {address} cannot be reached ({error.message}).", unavailable=True
            )
        if error.code == TIMEOUT:
            return cls(error.code, f"The perfdb server at {address} did not answer in time.", unavailable=True)
        if error.code == "shutting_down":
            return cls(error.code, f"The perfdb server at {address} is restarting.", unavailable=True)
        if error.code == "forbidden":
            return cls(
                error.code,
                f"The perfdb server at {address} refused to read: {error.message}. "
                "Start perfdb-web with --read-key-file holding the server's read key.",
                unavailable=False,
            )
        if error.code == PROTOCOL_ERROR:
            return cls(
                error.code, f"{address} does not answer like a perfdb server ({error.message}).", unavailable=False
            )
        return cls(
            error.code,
            f"The perfdb server at {address} answered {error.code}: {error.message}",
            unavailable=error.code in UNAVAILABLE_CODES or error.retryable,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ResultRow:
    """One result as the table shows it: identity, labels and core metrics."""

    record_id: str
    user_id: str
    timestamp: str
    test_name: str
    tag: str
    metrics: dict[str, float]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ResultRow:
        # Only the core metrics are kept: configs and system info can be kilobytes per record.
        metrics = record.get("metrics") or {}
        return cls(
            record_id=record["record_id"],
            user_id=record["user_id"],
            timestamp=record["timestamp"],
            test_name=record["test_name"],
            tag=record.get("tag", ""),
            metrics={name: metrics[name] for name in CORE_METRIC_NAMES if name in metrics},
        )


def display_name(user_id: str, profile: dict[str, Any] | None) -> str:
    name = (profile or {}).get("name")
    return name if isinstance(name, str) and name.strip() else user_id


@dataclasses.dataclass(frozen=True, slots=True)
class RecordQuery:
    """Which records to read: perfdb's own filters plus a free-text search done here."""

    user_id: str | None = None
    test_name: str | None = None
    tag: str | None = None
    since: int | None = None  # microseconds, inclusive
    until: int | None = None  # microseconds, exclusive
    search_words: tuple[str, ...] = ()  # each must occur in the test, tag, user id or user name

    def accepts(self, row: ResultRow, profile: dict[str, Any] | None) -> bool:
        if not self.search_words:
            return True
        haystack = f"{row.test_name}\n{row.tag}\n{row.user_id}\n{display_name(row.user_id, profile)}".casefold()
        return all(word in haystack for word in self.search_words)


@dataclasses.dataclass(frozen=True, slots=True)
class Edges:
    """Where a query's results start and end (record times in microseconds), and its newest result."""

    oldest: int
    newest: int
    newest_record: dict[str, Any]


@dataclasses.dataclass(slots=True)
class TimeRead:
    """Results read in one time direction from a position, in the order read."""

    rows: list[ResultRow]
    users: dict[str, dict[str, Any]]
    more: bool  # matching results may lie beyond `resume`
    resume: str | None  # the record id to read on from, in the same direction
    examined: int
    total: int | None = None  # perfdb's exact count of the query, when it gives one
    cut: bool = False  # stopped by the search budget, not because the page was full


@dataclasses.dataclass(slots=True)
class SortedRead:
    """One page of results ranked by perfdb, best first in the order asked for."""

    rows: list[ResultRow]  # those that pass the free-text search, if any
    users: dict[str, dict[str, Any]]
    read: int  # results perfdb returned, before the search
    next_cursor: str | None
    total: int | None
    examined: int
    complete: bool  # False: perfdb ranked only the newest `examined` of the filtered set


class ResultSource:
    """Reads results from perfdb over one long-lived, pipelined connection shared by all requests.

    The client reconnects by itself after the server restarts; timeouts are short so that a page
    reports a dead server within seconds instead of hanging.
    """

    def __init__(
        self,
        address: str,
        *,
        read_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 2.0,
        request_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.address = address
        self._client = AsyncClient(
            address,
            ssl_context=ssl_context,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            # Enough to ride over a reconnect, short enough to report a dead server quickly.
            retry=retry or RetryPolicy(attempts=3, first_delay=0.1, max_delay=0.5),
            read_key=read_key,
        )
        self._page_limit: int | None = None

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        try:
            return await self._client.call(op, **fields)
        except PerfdbClientError as error:
            raise PerfdbError.from_client_error(error, self.address) from None

    async def hello(self) -> dict[str, Any]:
        return await self._call("hello")

    async def page_limit(self) -> int:
        """Records per request: PAGE_LIMIT, or less if the server allows less."""
        if self._page_limit is None:
            limits = (await self.hello()).get("limits", {})
            self._page_limit = max(1, min(PAGE_LIMIT, int(limits.get("max_page_size", PAGE_LIMIT))))
        return self._page_limit

    async def profile(self, user_id: str) -> dict[str, Any] | None:
        """A user's public profile, or None if perfdb has no such user."""
        try:
            page = await self._call("get_user", user_id=user_id, limit=1)
        except PerfdbError as error:
            if error.code == "not_found":
                return None
            raise
        profile: dict[str, Any] = page["user"]
        return profile

    async def edges(self, query: RecordQuery) -> Edges | None:
        """The times of the oldest and the newest result a query matches (search words aside),
        and that newest result, from two one-record reads; None when it matches none."""
        fields: dict[str, Any] = {
            "test_name": query.test_name,
            "tag": query.tag,
            "since": format_micros(query.since) if query.since is not None else None,
            "until": format_micros(query.until) if query.until is not None else None,
            "limit": 1,
        }
        op = "get_all"
        if query.user_id is not None:
            op, fields["user_id"] = "get_user", query.user_id
        try:
            oldest, newest = await asyncio.gather(self._call(op, **fields), self._call(op, reverse=True, **fields))
        except PerfdbError as error:
            if error.code == "not_found":
                return None
            raise
        if not oldest["records"] or not newest["records"]:
            return None
        newest_record: dict[str, Any] = newest["records"][0]
        return Edges(
            oldest=record_id_micros(oldest["records"][0]["record_id"]),
            newest=record_id_micros(newest_record["record_id"]),
            newest_record=newest_record,
        )

    async def series(
        self, metrics: list[str], test_name: str, query: RecordQuery, *, since: int, until: int, buckets: int
    ) -> dict[str, Any]:
        """perfdb's series of some metrics of one test over [since, until), in `buckets` buckets."""
        return await self._call(
            "series",
            metric=metrics,
            test_name=test_name,
            user_id=query.user_id,
            tag=query.tag,
            since=format_micros(since),
            until=format_micros(until),
            buckets=buckets,
            columns=True,
        )

    async def series_by_test(
        self, metrics: list[str], user_id: str, query: RecordQuery, *, since: int, until: int, buckets: int
    ) -> dict[str, Any]:
        """perfdb's series of some metrics of every test of one user over [since, until), in one read."""
        return await self._call(
            "series",
            metric=metrics,
            by="test",
            user_id=user_id,
            tag=query.tag,
            since=format_micros(since),
            until=format_micros(until),
            buckets=buckets,
            columns=True,
        )

    async def test_counts(self, user_id: str | None, metrics: tuple[str, ...]) -> dict[str, int]:
        """Test name -> results (of the user, or of everyone) that have one of these metrics, of
        all time, from perfdb's in-memory overview: nothing is read from disk."""
        counts: dict[str, int] = {}
        # Asked for one user, perfdb lists only that user's tests and counts.
        calls = (self._call("overview", metric=metric, user_id=user_id) for metric in metrics)
        for reply in await asyncio.gather(*calls):
            for test_name, summary in reply["tests"].items():
                mine = summary["users"].get(user_id, {}) if user_id is not None else {"count": summary["records"]}
                count = mine.get("count", 0)
                if count:
                    counts[test_name] = max(count, counts.get(test_name, 0))
        return counts

    async def find_record(self, record_id: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """One record and its user's profile, or None, in one read: `get_record` returns no
        profile, but `get_all` does, and a record id starts with its commit time and is a cursor,
        so reading one record oldest first from just before it, within its microsecond, finds it
        or proves it absent."""
        micros = record_id_micros(record_id)
        fields: dict[str, Any] = {
            "since": format_micros(micros),
            "until": format_micros(micros + 1),
            "limit": 1,
        }
        number = int(record_id, 16)
        if number > 0:
            fields["cursor"] = f"{number - 1:020x}"
        page = await self._call("get_all", **fields)
        for record in page["records"]:
            if record["record_id"] == record_id:
                return record, page["users"].get(record["user_id"])
        return None

    async def _record_reply(self, record_id: str) -> dict[str, Any] | None:
        """perfdb's get_record reply (the record and its stored verdicts), or None when it has no such record
        (or is a perfdb without get_record)."""
        try:
            return await self._call("get_record", record_id=record_id)
        except PerfdbError as error:
            if error.code in ("not_found", "unknown_op"):
                return None
            raise

    async def stored_extras(self, record_id: str) -> tuple[list[dict[str, Any]] | None, dict[str, list[float]]]:
        """What get_record returns beside the record as every read does: the verdicts perfdb stored
        when it judged the record (None when it stored none) and the record's samples ({} if none)."""
        reply = await self._record_reply(record_id)
        verdicts = None if reply is None else reply.get("verdicts")
        samples = None if reply is None else reply["record"].get("samples")
        return (verdicts if isinstance(verdicts, list) else None), (samples if isinstance(samples, dict) else {})

    async def regressions(
        self, *, state: str | None, limit: int, cursor: str | None = None, **filters: str | None
    ) -> dict[str, Any]:
        """One page of perfdb's alerts, newest first (`alerts`, `next_cursor`)."""
        return await self._call("regressions", state=state, limit=limit, cursor=cursor, **filters)

    async def compare(self, base: dict[str, Any], head: dict[str, Any], test_name: str | None) -> dict[str, Any]:
        """perfdb's comparison of the records `base` selects (before) with those `head` selects (perfdb's
        selectors: {"tag": ...} or {"record_ids": [...]})."""
        return await self._call("compare", base=base, head=head, test_name=test_name or None)

    async def records_by_id(self, record_ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Each of these records, or None for one perfdb does not have (read in one pipelined go)."""
        replies = await asyncio.gather(*map(self._record_reply, record_ids))
        return {
            record_id: None if reply is None else reply["record"]
            for record_id, reply in zip(record_ids, replies, strict=True)
        }

    async def overview(self, metric: str, test_name: str | None = None) -> dict[str, Any]:
        """perfdb's per-test aggregates of one metric (count, min, max, histogram, each user's best)."""
        fields: dict[str, Any] = {"metric": metric}
        if test_name is not None:
            fields["test_name"] = test_name
        return await self._call("overview", **fields)

    async def _query_page(self, query: RecordQuery, **fields: Any) -> dict[str, Any]:
        """One get_user/get_all page of a query; a user perfdb does not know has an empty one."""
        fields.update(
            {
                "test_name": query.test_name,
                "tag": query.tag,
                "since": format_micros(query.since) if query.since is not None else None,
                "until": format_micros(query.until) if query.until is not None else None,
            }
        )
        if query.user_id is None:
            return await self._call("get_all", **fields)
        try:
            page = await self._call("get_user", user_id=query.user_id, **fields)
        except PerfdbError as error:
            if error.code == "not_found":
                return {"users": {}, "records": [], "next_cursor": None, "total": 0}
            raise
        page["users"] = {query.user_id: page["user"]}
        return page

    async def read_in_time_order(
        self, query: RecordQuery, *, wanted: int, newest_first: bool, cursor: str | None = None
    ) -> TimeRead:
        """The first `wanted` matching results after `cursor` (a record id) in one time direction.

        perfdb filters by user, test, tag and dates itself (from its indexes), so without a search
        this is one short read. A free-text search is done here, so it reads on until the page is
        full but examines at most SEARCH_BUDGET results per page: the reply says where it stopped.
        """
        searching = bool(query.search_words)
        rows: list[ResultRow] = []
        users: dict[str, dict[str, Any]] = {}
        examined = requests = 0
        total: int | None = None
        position = cursor
        while True:
            ask = await self.page_limit() if searching else min(await self.page_limit(), wanted + 1 - len(rows))
            fields: dict[str, Any] = {"limit": ask, "cursor": position}
            if newest_first:
                fields["reverse"] = True
            page = await self._query_page(query, **fields)
            if requests == 0:
                total = page.get("total")
            requests += 1
            for record in page["records"]:
                examined += 1
                row = ResultRow.from_record(record)
                profile = page["users"].get(row.user_id)
                if not query.accepts(row, profile):
                    continue
                rows.append(row)
                users[row.user_id] = profile or {}
                if len(rows) > wanted:  # one more than shown: the read goes on past the page
                    shown = rows[:wanted]
                    return TimeRead(shown, users, more=True, resume=shown[-1].record_id, examined=examined, total=total)
            position = page["next_cursor"]
            if not position:
                return TimeRead(rows, users, more=False, resume=None, examined=examined, total=total)
            if (searching and examined >= SEARCH_BUDGET) or requests >= MAX_REQUESTS_PER_PAGE:
                # The cursor is the last record id perfdb examined: the next page goes on from it.
                return TimeRead(rows, users, more=True, resume=position, examined=examined, total=total, cut=True)

    async def read_sorted(
        self, query: RecordQuery, *, metric: str, descending: bool, limit: int, cursor: str | None = None
    ) -> SortedRead:
        """One page of the query's results ranked by a metric, exactly as perfdb ranks them over
        the whole filtered set (up to its max_sort_examined bound, which the reply reports)."""
        fields: dict[str, Any] = {"sort": metric, "order": "desc" if descending else "asc", "limit": limit}
        if cursor is not None:
            fields["cursor"] = cursor
        page = await self._query_page(query, **fields)
        rows, users = [], {}
        for record in page["records"]:
            row = ResultRow.from_record(record)
            profile = page["users"].get(row.user_id)
            if query.accepts(row, profile):
                rows.append(row)
                users[row.user_id] = profile or {}
        return SortedRead(
            rows=rows,
            users=users,
            read=len(page["records"]),
            next_cursor=page.get("next_cursor"),
            total=page.get("total"),
            examined=page.get("examined", 0),
            complete=page.get("complete", True),
        )
