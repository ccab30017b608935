"""The asyncio client: pipelined requests over one connection, replies matched in order."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from perfdb.client.common import (
    NO_RETRY,
    TIMEOUT,
    ClientSettings,
    PerfdbClientError,
    RecordWindow,
    RunSelector,
    batch_fields,
    check_reply,
    compare_fields,
    connection_failed,
    encode_request,
    may_resend,
    order_fields,
    result_outcome,
    with_request_id,
)
from perfdb.protocol.limits import MAX_BATCH_RECORDS


class _ReplyStream(asyncio.Protocol):
    """One connection: each request written gets the next reply line, in order."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.Event()  # set once the transport is gone
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        start = 0
        while (newline := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[start:newline])
            start = newline + 1
            if not self._waiters:
                self._fail(ConnectionError("the server sent a reply nobody asked for"))
                return
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(line)
        del self._buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("the server closed the connection"))
        self._closed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _fail(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(str(exc)))
                # Whoever awaits it still gets the error; one nobody awaits is not worth a warning.
                waiter.exception()
        self._writable.set()
        if self._transport is not None:
            self._transport.abort()

    def send(self, data: bytes) -> asyncio.Future[bytes]:
        if self.lost is not None or self._transport is None or self._transport.is_closing():
            raise ConnectionError(str(self.lost or "the connection is closing"))
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._transport.write(data)
        return waiter

    async def drain(self) -> None:
        await self._writable.wait()
        if self.lost is not None:
            raise ConnectionError(str(self.lost))

    async def close(self, timeout: float = 2.0) -> None:
        """Close, and wait (within `timeout`) until the transport is gone: TLS needs a round trip."""
        if self._transport is not None:
            self._transport.close()
            try:
                async with asyncio.timeout(timeout):
                    await self._closed.wait()
            except TimeoutError:
                self._transport.abort()


class AsyncClient(ClientSettings):
    """A perfdb client for asyncio code. Use `async with AsyncClient("host:port") as client:`."""

    def _init_connection_state(self) -> None:
        self._stream: _ReplyStream | None = None
        self._connecting = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection now rather than on the first request."""
        await self._connection()

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    async def _connection(self) -> _ReplyStream:
        async with self._connecting:
            if self._stream is not None and self._stream.lost is None:
                return self._stream
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, stream = await loop.create_connection(
                        _ReplyStream,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None,
                    )
            except TimeoutError:
                raise self._connect_timed_out() from None
            except (OSError, ssl.SSLError) as exc:
                raise connection_failed(exc) from None
            self._stream = stream
            return stream

    def _drop(self, stream: _ReplyStream | None = None) -> None:
        """Abandon `stream` (by default the current one); a late failure of an older one is ignored."""
        stream = stream or self._stream
        if stream is not None:
            stream._fail(ConnectionResetError("connection abandoned by the client"))
            if stream is self._stream:
                self._stream = None

    async def _await_reply(self, stream: _ReplyStream, waiter: asyncio.Future[bytes]) -> bytes:
        try:
            async with asyncio.timeout(self._request_timeout):
                return await waiter
        except TimeoutError:
            # The reply may still come; the connection's order can no longer be trusted.
            self._drop(stream)
            raise PerfdbClientError(TIMEOUT, f"no reply within {self._request_timeout}s", True) from None
        except ConnectionError as exc:
            self._drop(stream)
            raise connection_failed(exc) from None

    async def _roundtrip(self, data: bytes) -> dict[str, Any]:
        stream = await self._connection()
        try:
            waiter = stream.send(data)
            await stream.drain()
        except ConnectionError as exc:
            self._drop(stream)
            raise connection_failed(exc) from None
        return check_reply(await self._await_reply(stream, waiter))

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; retries reads and keyed records on retryable errors."""
        request = encode_request(op, fields, self._read_key)
        delays = (self._retry if may_resend(op, fields) else NO_RETRY).delays()
        while True:
            try:
                return await self._roundtrip(request)
            except PerfdbClientError as error:
                delay = next(delays, None) if error.retryable else None
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    # -- ops -------------------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return await self.call("hello")

    async def ping(self) -> None:
        await self.call("ping")

    async def stats(self) -> dict[str, Any]:
        return await self.call("stats")

    async def record(self, **fields: Any) -> dict[str, Any]:
        """Store one result; a request_id is generated when none is given, so retries are safe. The ack's
        `verdicts` judge each metric against its series (or `baseline_tag`'s; `better` declares custom metrics)."""
        return await self.call("record", **with_request_id(fields))

    async def record_batch(self, access_token: str, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store up to 1000 results of one token in one request and one write batch; returns one
        result per record, in order: its ack, or {"error": {...}} for a record refused alone.
        Records without a request_id get one, so the batch is resent safely."""
        reply = await self.call("record_batch", **batch_fields(access_token, records))
        results: list[dict[str, Any]] = reply["results"]
        return results

    async def record_batches(
        self,
        access_token: str,
        records: Iterable[dict[str, Any]],
        *,
        batch_size: int = MAX_BATCH_RECORDS,
        window: int = 4,
    ) -> AsyncIterator[dict[str, Any] | PerfdbClientError]:
        """Store many results of one token as record_batch requests of `batch_size`, up to `window`
        of them in flight; yields one outcome per record in input order: its ack, or its error
        (with `.index`). Records without a request_id get one, so that resending is safe: a batch
        that fails whole with a retryable error is sent again, and so are the records a batch
        refused with a retryable error (overloaded), each as the client's RetryPolicy allows."""
        keyed = [with_request_id(record) for record in records]
        chunks = [range(first, min(first + batch_size, len(keyed))) for first in range(0, len(keyed), batch_size)]
        sending: collections.deque[asyncio.Task[list[dict[str, Any] | PerfdbClientError]]] = collections.deque()
        try:
            for chunk in chunks:
                sending.append(asyncio.ensure_future(self._send_batch(access_token, keyed, chunk)))
                if len(sending) >= window:
                    for outcome in await sending.popleft():
                        yield outcome
            while sending:
                for outcome in await sending.popleft():
                    yield outcome
        finally:
            for task in sending:
                task.cancel()

    async def _send_batch(
        self, access_token: str, records: list[dict[str, Any]], indexes: range
    ) -> list[dict[str, Any] | PerfdbClientError]:
        outcomes: dict[int, dict[str, Any] | PerfdbClientError] = {}
        waiting = list(indexes)
        delays = self._retry.delays()
        while waiting:
            results = await self.record_batch(access_token, [records[index] for index in waiting])
            retry = []
            for index, result in zip(waiting, results, strict=True):
                outcome = outcomes[index] = result_outcome(result, index)
                if isinstance(outcome, PerfdbClientError) and outcome.retryable:
                    retry.append(index)
            delay = next(delays, None) if retry else None
            if delay is None:
                break
            await asyncio.sleep(delay)
            waiting = retry
        return [outcomes[index] for index in indexes]

    async def record_many(
        self, records: Iterable[dict[str, Any]], *, window: int = 256
    ) -> AsyncIterator[dict[str, Any]]:
        """Store many results with up to `window` in flight; yields their acks in input order.

        Raises PerfdbClientError, with `.index` set, at the first record the server refused.
        Records after it may have been stored: to submit them again without duplicates, give
        each record its own request_id rather than relying on generated ones.
        """
        async for outcome in self.record_outcomes(records, window=window):
            if isinstance(outcome, PerfdbClientError):
                raise outcome
            yield outcome

    async def record_outcomes(
        self, records: Iterable[dict[str, Any]], *, window: int = 256
    ) -> AsyncIterator[dict[str, Any] | PerfdbClientError]:
        """Like record_many, but a refused record yields its error (with `.index`) and the rest go on."""
        pipeline = RecordWindow(iter(records), window, self._retry)
        waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        while not pipeline.finished:
            try:
                requests = pipeline.to_send()
                if not pipeline.awaiting_replies:
                    break  # the source ran dry and every outcome is out
                stream = await self._connection()
                for request in requests:
                    waiters.append(stream.send(request))
                await stream.drain()
                line = await self._await_reply(stream, waiters.popleft())
            except (PerfdbClientError, ConnectionError) as exc:
                error = exc if isinstance(exc, PerfdbClientError) else connection_failed(exc)
                if not error.retryable:
                    raise
                self._drop()
                waiters.clear()
                await asyncio.sleep(pipeline.on_disconnect(error))
                continue
            pause = pipeline.on_reply(line)
            for outcome in pipeline.outcomes():
                yield outcome
            if pause:
                await asyncio.sleep(pause)

    async def pages(self, op: str, **query: Any) -> AsyncIterator[dict[str, Any]]:
        """Every page of a get_user/get_all query, following next_cursor."""
        while True:
            page = await self.call(op, **query)
            yield page
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    async def get_user(
        self,
        user_id: str,
        *,
        reverse: bool = False,
        sort: str | None = None,
        order: str | None = None,
        **filters: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """One user's records across as many pages as it takes: oldest first, newest first with
        reverse=True, or by a metric with sort= (order "desc", the default, or "asc")."""
        async for page in self.pages("get_user", user_id=user_id, **order_fields(reverse, sort, order), **filters):
            for record in page["records"]:
                yield record

    async def get_all(
        self, *, reverse: bool = False, sort: str | None = None, order: str | None = None, **filters: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Every user's records across as many pages as it takes, ordered as for get_user."""
        async for page in self.pages("get_all", **order_fields(reverse, sort, order), **filters):
            for record in page["records"]:
                yield record

    async def overview(self, metric: str, test_name: str | None = None, user_id: str | None = None) -> dict[str, Any]:
        """The server's aggregates of one metric, for one test or (by default) every test, with
        every user's best value or (given user_id) only that user's."""
        return await self.call("overview", metric=metric, test_name=test_name, user_id=user_id)

    async def compare(
        self,
        base: RunSelector,
        head: RunSelector,
        *,
        test_name: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        """Compare two runs per test and metric (see the compare op). Each side is a tag (a string) or a
        selector: {"tag": ...}, {"record_ids": [...]} or {"since": ..., "until": ...}, optionally with
        its own test_name and user_id; `test_name` and `user_id` here narrow both sides."""
        return await self.call("compare", **compare_fields(base, head, test_name, user_id))

    async def series(
        self,
        metric: str | Sequence[str],
        test_name: str | None = None,
        *,
        by: str | None = None,
        user_id: str | None = None,
        tag: str | None = None,
        since: str | None = None,
        until: str | None = None,
        buckets: int | None = None,
    ) -> dict[str, Any]:
        """One test's values of a metric (or of several, given a list) over time, downsampled by
        the server into at most `buckets` time buckets (its default: 1000); see the series op.
        `by="test"` instead of a test_name (user_id required): every test of the user in one read,
        on one grid; the reply's `tests` maps test name -> series by metric."""
        return await self.call(
            "series",
            metric=metric if isinstance(metric, str) else list(metric),
            test_name=test_name,
            by=by,
            user_id=user_id,
            tag=tag,
            since=since,
            until=until,
            buckets=buckets,
        )

    async def delete_record(
        self, record_id: str, *, access_token: str | None = None, admin_key: str | None = None
    ) -> dict[str, Any]:
        """Delete a record, as its owner (access_token) or the admin (admin_key). The reply's
        `deleted` is false when it was already deleted; a record that never existed is not_found."""
        return await self.call("delete_record", record_id=record_id, access_token=access_token, admin_key=admin_key)

    async def delete_user(self, user_id: str, *, admin_key: str) -> dict[str, Any]:
        """Delete every record of a user and the profile (admin); `records` says how many went."""
        return await self.call("delete_user", user_id=user_id, admin_key=admin_key)

    async def audit_log(self, *, admin_key: str, limit: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The audit entries of deletions, newest first, across as many pages as it takes."""
        async for page in self.pages("audit_log", admin_key=admin_key, limit=limit):
            for entry in page["entries"]:
                yield entry

    # -- regression detection --------------------------------------------------------------

    async def get_record(self, record_id: str) -> dict[str, Any]:
        """One record by id, with `"excluded": true` and its exclusion when it is excluded."""
        reply = await self.call("get_record", record_id=record_id)
        record: dict[str, Any] = reply["record"]
        return record

    async def exclude_record(
        self,
        record_id: str,
        *,
        excluded: bool = True,
        note: str | None = None,
        access_token: str | None = None,
        admin_key: str | None = None,
    ) -> dict[str, Any]:
        """Leave the record out of baselines and alerts (or, excluded=False, count it again); the owner's
        access_token or the admin key."""
        return await self.call(
            "exclude_record", record_id=record_id, excluded=excluded, note=note,
            access_token=access_token, admin_key=admin_key,
        )  # fmt: skip

    async def regressions(self, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        """Every alert that matches the filters (user_id, test_name, tag, state, since, until), newest first,
        across as many pages as it takes."""
        async for page in self.pages("regressions", **filters):
            for alert in page["alerts"]:
                yield alert

    async def update_alert(
        self,
        alert_id: str,
        state: str,
        *,
        note: str | None = None,
        access_token: str | None = None,
        admin_key: str | None = None,
    ) -> dict[str, Any]:
        """Move an alert to open, acknowledged, expected or resolved; returns the alert as stored."""
        reply = await self.call(
            "update_alert", alert_id=alert_id, state=state, note=note, access_token=access_token, admin_key=admin_key
        )
        alert: dict[str, Any] = reply["alert"]
        return alert
