"""The blocking client: the same calls as AsyncClient over a plain socket, no event loop."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
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
    with_request_id,
)

_READ_CHUNK = 256 * 1024


class Client(ClientSettings):
    """A perfdb client for code without an event loop (the web frontend, scripts).

    Not thread-safe: give each thread its own Client.
    """

    def _init_connection_state(self) -> None:
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def connect(self) -> None:
        self._connection()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buffer.clear()
        if sock is not None:
            sock.close()

    def _drop_if_stale(self) -> None:
        """Call when no reply is owed: a connection with something to read then was closed by
        the server (idle timeout, shutdown) or sent a line nobody asked for; start afresh."""
        if self._sock is not None and (self._buffer or select.select([self._sock], [], [], 0)[0]):
            self.close()

    def _connection(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
        except TimeoutError:
            raise self._connect_timed_out() from None
        except (OSError, ssl.SSLError) as exc:
            raise connection_failed(exc) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self._request_timeout)
        self._sock = sock
        return sock

    @contextlib.contextmanager
    def _socket_failures(self, timed_out: str) -> Iterator[None]:
        """Socket errors become PerfdbClientError, and the connection (its order lost) is closed."""
        try:
            yield
        except TimeoutError:
            self.close()
            raise PerfdbClientError(TIMEOUT, f"{timed_out} within {self._request_timeout}s", True) from None
        except OSError as exc:
            self.close()
            raise connection_failed(exc) from None

    def _send(self, data: bytes) -> None:
        with self._socket_failures("could not send"):
            self._connection().sendall(data)

    def _read_line(self) -> bytes:
        sock = self._connection()
        searched = 0  # the buffer up to here holds no newline: a page of megabytes is searched once, not per read
        while (newline := self._buffer.find(b"\n", searched)) < 0:
            searched = len(self._buffer)
            with self._socket_failures("no reply"):
                chunk = sock.recv(_READ_CHUNK)
            if not chunk:
                self.close()
                raise connection_failed(ConnectionResetError("the server closed the connection"))
            self._buffer += chunk
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return line

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; retries reads and keyed records on retryable errors."""
        request = encode_request(op, fields, self._read_key)
        delays = (self._retry if may_resend(op, fields) else NO_RETRY).delays()
        while True:
            try:
                self._drop_if_stale()
                self._send(request)
                return check_reply(self._read_line())
            except PerfdbClientError as error:
                delay = next(delays, None) if error.retryable else None
                if delay is None:
                    raise
                time.sleep(delay)

    # -- ops -------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def ping(self) -> None:
        self.call("ping")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def record(self, **fields: Any) -> dict[str, Any]:
        """Store one result; a request_id is generated when none is given, so retries are safe. The ack's
        `verdicts` judge each metric against its series (or `baseline_tag`'s; `better` declares custom metrics)."""
        return self.call("record", **with_request_id(fields))

    def record_batch(self, access_token: str, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store up to 1000 results of one token in one request and one write batch; returns one
        result per record, in order: its ack, or {"error": {...}} for a record refused alone.
        Records without a request_id get one, so the batch is resent safely."""
        reply = self.call("record_batch", **batch_fields(access_token, records))
        results: list[dict[str, Any]] = reply["results"]
        return results

    def record_many(self, records: Iterable[dict[str, Any]], *, window: int = 64) -> Iterator[dict[str, Any]]:
        """Store many results with up to `window` in flight; yields their acks in input order.

        Raises PerfdbClientError, with `.index` set, at the first record the server refused.
        """
        for outcome in self.record_outcomes(records, window=window):
            if isinstance(outcome, PerfdbClientError):
                raise outcome
            yield outcome

    def record_outcomes(
        self, records: Iterable[dict[str, Any]], *, window: int = 64
    ) -> Iterator[dict[str, Any] | PerfdbClientError]:
        """Like record_many, but a refused record yields its error (with `.index`) and the rest go on."""
        pipeline = RecordWindow(iter(records), window, self._retry)
        self._drop_if_stale()
        try:
            while not pipeline.finished:
                try:
                    requests = pipeline.to_send()
                    if not pipeline.awaiting_replies:
                        break  # the source ran dry and every outcome is out
                    if requests:
                        self._send(b"".join(requests))
                    line = self._read_line()
                except PerfdbClientError as error:
                    if not error.retryable:
                        raise
                    self.close()
                    time.sleep(pipeline.on_disconnect(error))
                    continue
                pause = pipeline.on_reply(line)
                yield from pipeline.outcomes()
                if pause:
                    time.sleep(pause)
        finally:
            if pipeline.awaiting_replies:
                # Replies still owed would be read by the next call as its own: start afresh.
                self.close()

    def pages(self, op: str, **query: Any) -> Iterator[dict[str, Any]]:
        """Every page of a get_user/get_all query, following next_cursor."""
        while True:
            page = self.call(op, **query)
            yield page
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    def get_user(
        self,
        user_id: str,
        *,
        reverse: bool = False,
        sort: str | None = None,
        order: str | None = None,
        **filters: Any,
    ) -> Iterator[dict[str, Any]]:
        """One user's records across as many pages as it takes: oldest first, newest first with
        reverse=True, or by a metric with sort= (order "desc", the default, or "asc")."""
        for page in self.pages("get_user", user_id=user_id, **order_fields(reverse, sort, order), **filters):
            yield from page["records"]

    def get_all(
        self, *, reverse: bool = False, sort: str | None = None, order: str | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Every user's records across as many pages as it takes, ordered as for get_user."""
        for page in self.pages("get_all", **order_fields(reverse, sort, order), **filters):
            yield from page["records"]

    def overview(self, metric: str, test_name: str | None = None, user_id: str | None = None) -> dict[str, Any]:
        """The server's aggregates of one metric, for one test or (by default) every test, with
        every user's best value or (given user_id) only that user's."""
        return self.call("overview", metric=metric, test_name=test_name, user_id=user_id)

    def compare(
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
        return self.call("compare", **compare_fields(base, head, test_name, user_id))

    def series(
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
        return self.call(
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

    def delete_record(
        self, record_id: str, *, access_token: str | None = None, admin_key: str | None = None
    ) -> dict[str, Any]:
        """Delete a record, as its owner (access_token) or the admin (admin_key). The reply's
        `deleted` is false when it was already deleted; a record that never existed is not_found."""
        return self.call("delete_record", record_id=record_id, access_token=access_token, admin_key=admin_key)

    def delete_user(self, user_id: str, *, admin_key: str) -> dict[str, Any]:
        """Delete every record of a user and the profile (admin); `records` says how many went."""
        return self.call("delete_user", user_id=user_id, admin_key=admin_key)

    def audit_log(self, *, admin_key: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The audit entries of deletions, newest first, across as many pages as it takes."""
        for page in self.pages("audit_log", admin_key=admin_key, limit=limit):
            yield from page["entries"]

    # -- regression detection --------------------------------------------------------------

    def get_record(self, record_id: str) -> dict[str, Any]:
        """One record by id, with `"excluded": true` and its exclusion when it is excluded."""
        reply = self.call("get_record", record_id=record_id)
        record: dict[str, Any] = reply["record"]
        return record

    def exclude_record(
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
        return self.call(
            "exclude_record", record_id=record_id, excluded=excluded, note=note,
            access_token=access_token, admin_key=admin_key,
        )  # fmt: skip

    def regressions(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every alert that matches the filters (user_id, test_name, tag, state, since, until), newest first,
        across as many pages as it takes."""
        for page in self.pages("regressions", **filters):
            yield from page["alerts"]

    def update_alert(
        self,
        alert_id: str,
        state: str,
        *,
        note: str | None = None,
        access_token: str | None = None,
        admin_key: str | None = None,
    ) -> dict[str, Any]:
        """Move an alert to open, acknowledged, expected or resolved; returns the alert as stored."""
        reply = self.call(
            "update_alert", alert_id=alert_id, state=state, note=note, access_token=access_token, admin_key=admin_key
        )
        alert: dict[str, Any] = reply["alert"]
        return alert
