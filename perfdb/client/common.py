"""What both clients share: request encoding, reply checking, retry policy, TLS set-up."""

from __future__ import annotations

import collections
import dataclasses
import random
import ssl
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from perfdb.protocol.addresses import parse_address
from perfdb.protocol.errors import ErrorCode

# Client-side codes, beside the server's (perfdb.protocol.errors.ErrorCode): the request may or may
# not have reached the server, so both are retryable for idempotent requests.
CONNECTION_FAILED = "connection_failed"
TIMEOUT = "timeout"
PROTOCOL_ERROR = "protocol_error"

# Ops that are safe to send again: reads, imports, deletions (a repeat finds the record or user
# gone and says so), exclusions (a repeat sets the same state), and records that carry a request_id.
IDEMPOTENT_OPS = frozenset(
    {
        "hello",
        "ping",
        "stats",
        "get_user",
        "get_all",
        "overview",
        "series",
        "compare",
        "export",
        "import",
        "delete_record",
        "delete_user",
        "audit_log",
        "get_record",
        "regressions",
        "exclude_record",
    }
)
# Ops that carry the read key when the client has one.
READ_OPS = frozenset({"stats", "get_user", "get_all", "overview", "series", "compare", "get_record", "regressions"})


class ClientSettings:
    """Where and how a client connects; shared by AsyncClient and the blocking Client.

    address: "host:port"; ssl_context: TLS (see tls_context) or None for plain TCP;
    connect_timeout, request_timeout: seconds; retry: backoff for retryable failures;
    read_key: sent with get_user, get_all, overview, series and stats to a server that requires one.
    """

    def __init__(
        self,
        address: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        read_key: str | None = None,
    ) -> None:
        self.host, self.port = parse_address(address)
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._retry = retry or RetryPolicy()
        self._read_key = read_key  # sent with the read ops when the server wants one
        self._init_connection_state()

    def _init_connection_state(self) -> None:
        """Set up the (not yet open) connection; each client kind has its own."""

    def _connect_timed_out(self) -> PerfdbClientError:
        return PerfdbClientError(
            TIMEOUT, f"no connection to {self.host}:{self.port} within {self._connect_timeout}s", True
        )


class PerfdbClientError(Exception):
    """A request failed: the server's error code, message and retryability, or a client-side one."""

    def __init__(self, code: str, message: str, retryable: bool, *, index: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.index = index  # position in a record_many stream, when that is where it failed


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; attempts counts the first try."""

    attempts: int = 6
    first_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, failures: int) -> float | None:
        """The pause before trying again after `failures` failed tries; None once they are used up."""
        if failures >= self.attempts:
            return None
        pause: float = min(self.first_delay * 2 ** (failures - 1), self.max_delay)
        return pause * random.uniform(0.5, 1.0)

    def delays(self) -> Iterator[float]:
        """The pauses before each retry (attempts - 1 of them)."""
        for failures in range(1, self.attempts):
            delay = self.delay(failures)
            assert delay is not None
            yield delay


NO_RETRY = RetryPolicy(attempts=1)


def new_request_id() -> str:
    return uuid.uuid4().hex


def with_request_id(fields: dict[str, Any]) -> dict[str, Any]:
    """The record's fields with a request_id, generated when it is missing or null."""
    if fields.get("request_id") is None:
        return {**fields, "request_id": new_request_id()}
    return fields


def may_resend(op: str, fields: dict[str, Any]) -> bool:
    """Whether sending this request again cannot do anything twice: reads, and keyed records."""
    if op == "record_batch":
        records = fields.get("records")
        return isinstance(records, list) and all(
            isinstance(record, dict) and record.get("request_id") is not None for record in records
        )
    return op in IDEMPOTENT_OPS or (op == "record" and fields.get("request_id") is not None)


def result_outcome(result: dict[str, Any], index: int) -> dict[str, Any] | PerfdbClientError:
    """One entry of record_batch's results as a record outcome: the ack, or its error with `index`."""
    error = result.get("error")
    if error is None:
        return result
    return PerfdbClientError(error["code"], error["message"], error["retryable"], index=index)


def batch_fields(access_token: str, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A record_batch request's fields: each record with a request_id (generated where missing),
    so that resending the batch stores nothing twice."""
    return {"access_token": access_token, "records": [with_request_id(record) for record in records]}


def order_fields(reverse: bool, sort: str | None, order: str | None) -> dict[str, Any]:
    """The ordering options of get_user/get_all as request fields; defaults are left out, so a
    plain read stays a protocol-version-1 request."""
    fields: dict[str, Any] = {}
    if reverse:
        fields["reverse"] = True
    if sort is not None:
        fields["sort"] = sort
    if order is not None:
        fields["order"] = order
    return fields


RunSelector = str | Mapping[str, Any]


def compare_fields(base: RunSelector, head: RunSelector, test_name: str | None, user_id: str | None) -> dict[str, Any]:
    """A compare request's fields; a side given as a string is a tag."""
    return {
        "base": {"tag": base} if isinstance(base, str) else dict(base),
        "head": {"tag": head} if isinstance(head, str) else dict(head),
        "test_name": test_name,
        "user_id": user_id,
    }


def encode_request(op: str, fields: dict[str, Any], read_key: str | None = None) -> bytes:
    """One request line; fields that are None are left out, and reads carry the read key."""
    request = {"op": op, **{key: value for key, value in fields.items() if value is not None}}
    if read_key is not None and op in READ_OPS:
        request.setdefault("read_key", read_key)
    return orjson.dumps(request, option=orjson.OPT_APPEND_NEWLINE)


def check_reply(line: bytes) -> dict[str, Any]:
    """Decode a reply line; raises PerfdbClientError for an error reply or garbage."""
    try:
        reply = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise PerfdbClientError(PROTOCOL_ERROR, "the server sent a line that is not JSON", False) from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise PerfdbClientError(PROTOCOL_ERROR, "the server sent a reply without 'ok'", False)
    if reply["ok"] is not True:
        error = reply.get("error") or {}
        raise PerfdbClientError(
            str(error.get("code", ErrorCode.INTERNAL.value)),
            str(error.get("message", "")),
            bool(error.get("retryable", False)),
        )
    return reply


def connection_failed(exc: BaseException) -> PerfdbClientError:
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return PerfdbClientError(CONNECTION_FAILED, f"connection to the server failed: {detail}", True)


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the server's certificate (TLS 1.2 or newer)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclasses.dataclass(slots=True)
class _Pending:
    index: int
    request: bytes
    outcome: dict[str, Any] | PerfdbClientError | None = None
    failures: int = 0


class RecordWindow:
    """Sans-I/O bookkeeping for pipelined record submission with retries.

    Keeps up to `size` records in flight. Replies arrive in the order requests were sent; acks
    leave in the order records came in. A record whose reply is a retryable error, and every
    record outstanding when a connection drops, is sent again with the same request_id, so
    the server stores it once. Gives up after `policy.attempts` consecutive failures.
    """

    def __init__(self, records: Iterator[dict[str, Any]], size: int, policy: RetryPolicy) -> None:
        if size < 1:
            raise ValueError("the window must hold at least one record")
        self._source = records
        self._size = size
        self._policy = policy
        self._window: collections.deque[_Pending] = collections.deque()  # input order
        self._sent: collections.deque[_Pending] = collections.deque()  # reply order
        self._unsent: list[_Pending] = []
        self._next_index = 0
        self._exhausted = False

    @property
    def finished(self) -> bool:
        return self._exhausted and not self._window

    @property
    def awaiting_replies(self) -> int:
        return len(self._sent)

    def to_send(self) -> list[bytes]:
        """Requests to write now: resends first, then new records up to the window size."""
        while not self._exhausted and len(self._window) < self._size:
            record = next(self._source, None)
            if record is None:
                self._exhausted = True
                break
            fields = with_request_id({key: value for key, value in record.items() if key != "op"})
            pending = _Pending(self._next_index, encode_request("record", fields))
            self._next_index += 1
            self._window.append(pending)
            self._unsent.append(pending)
        batch, self._unsent = self._unsent, []
        self._sent.extend(batch)
        return [pending.request for pending in batch]

    def on_reply(self, line: bytes) -> float:
        """Take the next reply; returns how long to wait before sending again (0 for no wait).

        A refusal (a non-retryable error) becomes that record's outcome, with .index set.
        """
        pending = self._sent.popleft()
        try:
            pending.outcome = check_reply(line)
        except PerfdbClientError as error:
            if not error.retryable:
                error.index = pending.index
                pending.outcome = error
                return 0.0
            self._unsent.append(pending)
            return self._backoff(error, [pending])
        return 0.0

    def on_disconnect(self, error: PerfdbClientError) -> float:
        """The connection is gone: everything awaiting a reply goes again. Returns the pause."""
        outstanding = list(self._sent)
        self._unsent = sorted(self._unsent + outstanding, key=lambda pending: pending.index)
        self._sent.clear()
        return self._backoff(error, outstanding or self._unsent[:1])

    def _backoff(self, error: PerfdbClientError, failed: list[_Pending]) -> float:
        """Count one more failure for each record in `failed`; the pause, or raise when used up."""
        worst: _Pending | None = None
        for pending in failed:
            pending.failures += 1
            if worst is None or pending.failures > worst.failures:
                worst = pending
        delay = self._policy.delay(worst.failures if worst else 1)
        if delay is None:
            error.index = worst.index if worst else None
            raise error
        return delay

    def outcomes(self) -> Iterator[dict[str, Any] | PerfdbClientError]:
        """The acks and refusals that are ready, in input order."""
        window = self._window
        while window and window[0].outcome is not None:
            outcome = window.popleft().outcome
            assert outcome is not None
            yield outcome
