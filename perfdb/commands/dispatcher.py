"""Command dispatch: one request line in, one reply line out.

Parses the JSON, checks the envelope, looks the op up in the command table, validates its
fields, calls the services (token resolution, storage) and encodes the reply. Failures
become coded error replies; nothing raised here reaches the framing layer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson

from perfdb import PROTOCOL_VERSION, SERVER_NAME, __version__
from perfdb.auth.tokens import TokenResolver, key_matches
from perfdb.commands.ratelimit import UserRateLimiter
from perfdb.commands.stats import ServerStats
from perfdb.config import Config
from perfdb.protocol.errors import ErrorCode, PerfdbError, bad_request, quote_input
from perfdb.protocol.replies import DeferredReply, PendingReply, Reply
from perfdb.records.profiles import Profile, profile_from_document, public_profile
from perfdb.records.record_ids import is_record_id
from perfdb.records.schema import (
    ADMIN_FIELDS,
    DELETE_RECORD_FIELDS,
    ENVELOPE_FIELDS,
    IMPORT_FIELDS,
    MAX_ACCESS_TOKEN_CHARS,
    MAX_NOTE_CHARS,
    MAX_USER_ID_CHARS,
    ORDER_FIELDS,
    OWNER_FIELDS,
    READ_FIELDS,
    SAMPLES_FIELDS,
    Query,
    RecordDraft,
    access_token,
    check_fields,
    check_request_id,
    optional_string,
    parse_audit_page,
    parse_compare,
    parse_delete_user,
    parse_force,
    parse_import_records,
    parse_overview,
    parse_query,
    parse_record,
    parse_record_batch,
    parse_series,
    parse_tombstones,
    required_record_id,
)
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.storage import BatchAck, ImportAck, Page, RecordAck, RecordDeletionAck, ResultStore, UserDeletionAck
from perfdb.storage.alerts import ALERT_STATES, AlertQuery

log = logging.getLogger("perfdb.commands")

Fields = dict[str, Any]


class Deferred:
    """A command's work that the framing layer starts when the connection is ready for its
    (possibly large) reply; see protocol.replies.DeferredReply."""

    __slots__ = ("start",)

    def __init__(self, start: Callable[[], Coroutine[Any, Any, Fields]]) -> None:
        self.start = start


# A command answers at once, or later through a future, a pending reply, a coroutine or deferred work.
Outcome = Fields | PendingReply | asyncio.Future[Any] | Coroutine[Any, Any, Fields] | Deferred


async def _fields_of(pending: Awaitable[ImportAck | RecordDeletionAck | UserDeletionAck]) -> Fields:
    return (await pending).to_fields()


Command = Callable[[dict[str, Any], str], Outcome]
_R = TypeVar("_R", bound=Reply)

_ENCODE = orjson.OPT_APPEND_NEWLINE


def error_fields(code: ErrorCode, message: str) -> Fields:
    """The `error` object of an error reply (and of a refused record inside record_batch's results)."""
    return {"code": code.value, "message": message, "retryable": code.retryable}


def encode_error(request_id: Any, code: ErrorCode, message: str) -> bytes:
    return orjson.dumps({"id": request_id, "ok": False, "error": error_fields(code, message)}, option=_ENCODE)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _DuplicateKeyError
    return document


class _DuplicateKeyError(ValueError):
    pass


_DUPLICATE_CHECKER = json.JSONDecoder(object_pairs_hook=_refuse_duplicates)


def has_duplicate_keys(line: bytes) -> bool:
    """Whether some object in this (valid) JSON text names the same key twice."""
    try:
        _DUPLICATE_CHECKER.decode(line.decode())
    except _DuplicateKeyError:
        return True
    except (ValueError, RecursionError):
        return False  # orjson accepted it; the stricter parse failing is not a duplicate
    return False


def _page_counts(page: Page) -> Fields:
    """A read reply's optional counts: total (first pages, when cheap), examined and complete
    (sorted reads)."""
    counts: Fields = {}
    if page.total is not None:
        counts["total"] = page.total
    if page.examined is not None:
        counts["examined"] = page.examined
        counts["complete"] = page.complete
    return counts


def _result_fields(outcome: RecordAck | PerfdbError) -> Fields:
    """One record's entry in record_batch's results."""
    if isinstance(outcome, PerfdbError):
        return {"error": error_fields(outcome.code, outcome.message)}
    return outcome.to_fields()


def _json_array(documents: list[bytes | memoryview]) -> orjson.Fragment:
    """Splice stored JSON documents into the reply without decoding them."""
    return orjson.Fragment(b"[" + b",".join(documents) + b"]")


class _RecordReply(PendingReply):
    """The reply to one `record`, filled straight from the writer's group commit: no future and
    no loop callback per record (see Settleable), which profiles showed to cost as much as
    validating the record."""

    __slots__ = ("_dispatcher", "_peer", "_request_id", "_started")

    def __init__(self, dispatcher: CommandDispatcher, request_id: Any, peer: str) -> None:
        super().__init__()
        self._dispatcher = dispatcher
        self._request_id = request_id
        self._peer = peer
        self._started = time.perf_counter() if dispatcher._stats.observe_latency is not None else 0.0

    def done(self) -> bool:
        return self.value is not None

    def set_result(self, ack: RecordAck, /) -> None:
        self._filled(self._dispatcher._ok("record", self._request_id, ack.to_fields()))

    def set_exception(self, error: BaseException, /) -> None:
        self._filled(self._dispatcher._failure("record", self._request_id, self._peer, error))

    def _filled(self, reply: bytes) -> None:
        observe = self._dispatcher._stats.observe_latency
        if observe is not None:
            observe("record", time.perf_counter() - self._started)
        self.fill(reply)


class CommandDispatcher:
    """Implements the framing layer's LineHandler on top of the services."""

    def __init__(
        self,
        config: Config,
        store: ResultStore,
        resolver: TokenResolver,
        stats: ServerStats,
        *,
        admin_key: str | None = None,
        read_key: str | None = None,
    ) -> None:
        self._config = config
        self._admin_key = admin_key
        self._read_key = read_key
        self._rate_limiter = UserRateLimiter(config.user_rate, config.user_burst)
        self._store = store
        self._resolver = resolver
        self._stats = stats
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Future[Any]] = set()
        self.draining = False
        # The command table, built once from the op_* methods.
        self._commands: dict[str, Command] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")
        }

    @property
    def ops(self) -> list[str]:
        return sorted(self._commands)

    # -- LineHandler -------------------------------------------------------------------------

    def handle_line(self, line: bytes, peer: str) -> Reply:
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return self._error(None, None, ErrorCode.BAD_JSON, f"the line is not valid UTF-8 JSON ({exc})")
        if not isinstance(request, dict):
            return self._error(None, None, ErrorCode.BAD_REQUEST, "a request must be a JSON object")
        # Compact JSON that re-encodes to the same bytes cannot hide a duplicate key (the
        # common case, and what perfdb's clients send); anything else gets the exact check.
        try:
            reencoded = orjson.dumps(request)
        except orjson.JSONEncodeError:  # orjson writes at most 254 levels, though it reads more
            return self._error(None, None, ErrorCode.BAD_REQUEST, "the request is nested too deeply")
        if reencoded != line and has_duplicate_keys(line):
            return self._error(None, None, ErrorCode.BAD_JSON, "the request repeats a key inside one object")
        request_id = request.get("id")
        try:
            check_request_id(request_id)
        except PerfdbError as exc:
            return self._error(None, None, exc.code, exc.message)
        op = request.get("op")
        if not isinstance(op, str):
            return self._error(None, request_id, ErrorCode.BAD_REQUEST, "op: is required and must be a string")
        command = self._commands.get(op)
        if command is None:
            return self._error(
                None, request_id, ErrorCode.UNKNOWN_OP, f"unknown op {quote_input(op)}; see hello for the ops"
            )
        self._stats.requests[op] += 1
        if self._stats.observe_latency is None:
            return self._execute(command, request, request_id, peer, op)
        started = time.perf_counter()
        reply = self._execute(command, request, request_id, peer, op)
        if isinstance(reply, DeferredReply):
            start = reply.start
            # Timed from when the framing layer starts it, not while it waits its turn.
            return DeferredReply(lambda: self._timed(op, time.perf_counter(), start()))
        return self._timed(op, started, reply)

    def _execute(self, command: Command, request: dict[str, Any], request_id: Any, peer: str, op: str) -> Reply:
        if self.draining:
            return self._error(op, request_id, ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        try:
            outcome = command(request, peer)
        except PerfdbError as exc:
            return self._error(op, request_id, exc.code, exc.message)
        except Exception:
            log.exception("%s: op %s failed", peer, op, extra={"peer": peer, "op": op})
            return self._error(op, request_id, ErrorCode.INTERNAL, "internal server error")
        if isinstance(outcome, dict):
            return self._ok(op, request_id, outcome)
        if isinstance(outcome, PendingReply):
            return outcome
        if isinstance(outcome, Deferred):
            start = outcome.start
            return DeferredReply(lambda: self._follow(start(), request_id, peer, op))
        return self._follow(outcome, request_id, peer, op)

    def _timed(self, op: str, started: float, reply: _R) -> _R:
        """Report the op's latency once its reply is ready (a pending reply reports its own)."""
        observe = self._stats.observe_latency
        if observe is not None:
            if isinstance(reply, bytes):
                observe(op, time.perf_counter() - started)
            elif isinstance(reply, asyncio.Future):
                reply.add_done_callback(lambda _reply: observe(op, time.perf_counter() - started))
        return reply

    def _follow(
        self,
        outcome: asyncio.Future[Any] | Coroutine[Any, Any, Fields],
        request_id: Any,
        peer: str,
        op: str,
    ) -> asyncio.Future[bytes]:
        """A future of the reply line for work that finishes later."""
        reply: asyncio.Future[bytes] = self._loop.create_future()
        if isinstance(outcome, asyncio.Future):
            future: asyncio.Future[Any] = outcome
        else:
            future = self._loop.create_task(outcome)
            self._tasks.add(future)
            future.add_done_callback(self._tasks.discard)
        future.add_done_callback(functools.partial(self._settle, reply, request_id, peer, op))
        return reply

    def error_reply(self, code: ErrorCode, message: str) -> bytes:
        return self._error(None, None, code, message)

    # -- replies -----------------------------------------------------------------------------

    def _ok(self, op: str, request_id: Any, fields: Fields) -> bytes:
        self._stats.count_reply(op, None)
        return orjson.dumps({"id": request_id, "ok": True, **fields}, option=_ENCODE)

    def _error(self, op: str | None, request_id: Any, code: ErrorCode, message: str) -> bytes:
        """An error reply, counted under op (None: the line's op is not in the command table)."""
        self._stats.count_reply(op, code.value)
        return encode_error(request_id, code, message)

    def _settle(
        self, reply: asyncio.Future[bytes], request_id: Any, peer: str, op: str, outcome: asyncio.Future[Any]
    ) -> None:
        if outcome.cancelled():
            reply.set_result(self._error(op, request_id, ErrorCode.SHUTTING_DOWN, "the request was cancelled"))
            return
        error = outcome.exception()
        if error is None:
            result = outcome.result()
            fields = result if isinstance(result, dict) else result.to_fields()
            reply.set_result(self._ok(op, request_id, fields))
        else:
            reply.set_result(self._failure(op, request_id, peer, error))

    def _failure(self, op: str, request_id: Any, peer: str, error: BaseException) -> bytes:
        """The reply to an op that failed later: its coded error, or `internal` (logged) for anything else."""
        if isinstance(error, PerfdbError):
            return self._error(op, request_id, error.code, error.message)
        log.error("%s: op %s failed", peer, op, exc_info=error, extra={"peer": peer, "op": op})
        return self._error(op, request_id, ErrorCode.INTERNAL, "internal server error")

    # -- ops (method name op_<name> puts it in the command table) ----------------------------

    def op_hello(self, request: dict[str, Any], peer: str) -> Fields:
        check_fields(request, ENVELOPE_FIELDS)
        config = self._config
        return {
            "server": SERVER_NAME,
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "ops": self.ops,
            "limits": {
                "max_line_bytes": config.max_line_bytes,
                "max_inflight": config.max_inflight,
                "default_page_size": config.default_page_size,
                "max_page_size": config.max_page_size,
                "max_sort_examined": config.max_sort_examined,
            },
            "features": {"regression_detection": config.regression_detection},
        }

    def op_ping(self, request: dict[str, Any], peer: str) -> Fields:
        check_fields(request, ENVELOPE_FIELDS)
        return {}

    def op_record(self, request: dict[str, Any], peer: str) -> Outcome:
        token, draft = parse_record(request)
        resolved = self._resolver.resolve(token)
        if isinstance(resolved, Profile):
            # The common case (a known token): the writer fills the reply itself.
            self._check_rate(resolved)
            reply = _RecordReply(self, request.get("id"), peer)
            self._store.submit_to(resolved, draft, reply)
            return reply
        return self._record_once_resolved(resolved, draft)

    async def _record_once_resolved(self, profile_future: asyncio.Future[Profile], draft: RecordDraft) -> Fields:
        # Other requests may share the lookup: shield it from this one being cancelled.
        profile = await asyncio.shield(profile_future)
        ack: RecordAck = await self._store_record(profile, draft)
        return ack.to_fields()

    def op_record_batch(self, request: dict[str, Any], peer: str) -> Outcome:
        token, drafts = parse_record_batch(request)
        resolved = self._resolver.resolve(token)
        if isinstance(resolved, Profile):
            return self._store_batch(resolved, drafts)
        return self._batch_once_resolved(resolved, drafts)

    async def _batch_once_resolved(
        self, profile_future: asyncio.Future[Profile], drafts: list[RecordDraft | PerfdbError]
    ) -> Fields:
        profile = await asyncio.shield(profile_future)
        stored = self._store_batch(profile, drafts)
        return stored if isinstance(stored, dict) else await stored

    def _store_batch(
        self, profile: Profile, drafts: list[RecordDraft | PerfdbError]
    ) -> Fields | Coroutine[Any, Any, Fields]:
        """Store a batch's valid records (each takes one of the user's rate-limit tokens; those past
        what the bucket holds are refused alone, as overloaded); refused records keep their place."""
        limited = PerfdbError(ErrorCode.OVERLOADED, "this user is storing records faster than the server allows")
        entries: list[RecordDraft | PerfdbError] = [
            entry if isinstance(entry, PerfdbError) or self._rate_limiter.allow(profile.user_id) else limited
            for entry in drafts
        ]
        valid = [entry for entry in entries if isinstance(entry, RecordDraft)]
        if not valid:
            return {"results": [_result_fields(entry) for entry in entries if isinstance(entry, PerfdbError)]}
        return self._batch_results(entries, self._store.submit_batch(profile, valid))

    async def _batch_results(self, entries: list[RecordDraft | PerfdbError], stored: Awaitable[BatchAck]) -> Fields:
        """The results in the batch's order: each stored record's ack where its draft was."""
        acks = iter((await stored).outcomes)
        return {
            "results": [_result_fields(next(acks) if isinstance(entry, RecordDraft) else entry) for entry in entries]
        }

    def _store_record(self, profile: Profile, draft: RecordDraft) -> asyncio.Future[RecordAck]:
        self._check_rate(profile)
        return self._store.submit(profile, draft)

    def _check_rate(self, profile: Profile) -> None:
        if not self._rate_limiter.allow(profile.user_id):
            raise PerfdbError(ErrorCode.OVERLOADED, "this user is storing records faster than the server allows")

    def _require_read(self, request: dict[str, Any]) -> None:
        """Reads are open unless the server has a read key; the admin key opens them too."""
        if self._read_key is None:
            return
        presented = request.get("read_key")
        if key_matches(self._read_key, presented):
            return
        if self._admin_key is not None and key_matches(self._admin_key, request.get("admin_key", presented)):
            return
        raise PerfdbError(ErrorCode.FORBIDDEN, "read_key: missing or wrong; this server requires one for reads")

    def _require_admin(self, request: dict[str, Any]) -> None:
        if self._admin_key is None:
            raise PerfdbError(ErrorCode.FORBIDDEN, "this server has no admin key configured (--admin-key-file)")
        if not key_matches(self._admin_key, request.get("admin_key")):
            raise PerfdbError(ErrorCode.FORBIDDEN, "admin_key: missing or wrong")

    def _query(self, request: dict[str, Any], *, with_user: bool, extra_fields: frozenset[str] = frozenset()) -> Query:
        return parse_query(
            request,
            with_user=with_user,
            default_limit=self._config.default_page_size,
            max_limit=self._config.max_page_size,
            extra_fields=extra_fields,
        )

    def op_get_user(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_read(request)
        query = self._query(request, with_user=True, extra_fields=READ_FIELDS | ORDER_FIELDS | SAMPLES_FIELDS)
        return Deferred(lambda: self._get_user(query))

    async def _get_user(self, query: Query) -> Fields:
        profile, page = await self._store.get_user(query)
        return {
            "user": public_profile(profile, self._config.expose_emails),
            "records": _json_array(page.records),
            "next_cursor": page.next_cursor,
            **_page_counts(page),
        }

    def op_get_all(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_read(request)
        query = self._query(request, with_user=False, extra_fields=READ_FIELDS | ORDER_FIELDS | SAMPLES_FIELDS)
        return Deferred(lambda: self._get_all(query))

    async def _get_all(self, query: Query) -> Fields:
        page: Page = await self._store.get_all(query)
        expose = self._config.expose_emails
        return {
            "users": {user_id: public_profile(profile, expose) for user_id, profile in page.profiles.items()},
            "records": _json_array(page.records),
            "next_cursor": page.next_cursor,
            **_page_counts(page),
        }

    def op_overview(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_read(request)
        test_name, metric, user_id = parse_overview(request)
        return self._store.overview(test_name, metric, user_id)

    def op_series(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_read(request)
        series = parse_series(request)
        # Deferred like a page: a reply of thousands of points waits for the client to read.
        return Deferred(lambda: self._store.series(series))

    def op_compare(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_read(request)
        query = parse_compare(request, max_records=self._config.max_compare_records)
        # Deferred like a page: one row per test and metric can make a large reply.
        return Deferred(lambda: self._store.compare(query))

    def op_get_record(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_read(request)
        check_fields(request, ENVELOPE_FIELDS | READ_FIELDS | frozenset({"record_id"}))
        return self._store.get_record(required_record_id(request))

    def op_exclude_record(self, request: dict[str, Any], peer: str) -> Outcome:
        check_fields(request, ENVELOPE_FIELDS | OWNER_FIELDS | frozenset({"record_id", "excluded", "note"}))
        record_id = required_record_id(request)
        excluded = request.get("excluded", True)
        if not isinstance(excluded, bool):
            raise bad_request("excluded", "must be true or false")
        note = optional_string(request, "note", MAX_NOTE_CHARS) or ""
        return self._exclude(request, record_id, excluded, note)

    async def _exclude(self, request: dict[str, Any], record_id: str, excluded: bool, note: str) -> Fields:
        owner = await self._owner_or_admin(request)
        exclusion = {"note": note, "excluded_by": owner or "admin", "excluded_at": format_micros(now_micros())}
        return await self._store.set_exclusion(record_id, exclusion if excluded else None, owner)

    async def _owner_or_admin(self, request: dict[str, Any]) -> str | None:
        """The user id of the request's access_token, or None when it presents the admin key instead."""
        if request.get("admin_key") is not None:
            self._require_admin(request)
            return None
        token = request.get("access_token")
        if not isinstance(token, str) or not token or len(token) > MAX_ACCESS_TOKEN_CHARS:
            raise bad_request("access_token", "is required (the owner's token), or send the admin_key")
        resolved = self._resolver.resolve(token)
        profile = resolved if isinstance(resolved, Profile) else await asyncio.shield(resolved)
        return profile.user_id

    def op_regressions(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_read(request)
        query = self._query(request, with_user=False, extra_fields=READ_FIELDS | frozenset({"user_id", "state"}))
        state = request.get("state")
        if state is not None and state not in ALERT_STATES:
            raise bad_request("state", f"must be one of {', '.join(ALERT_STATES)}")
        cursor = query.cursor
        if cursor is not None and not is_record_id(cursor):
            raise bad_request("cursor", "is not a cursor this op returned")
        alerts = AlertQuery(
            user_id=optional_string(request, "user_id", MAX_USER_ID_CHARS),
            test_name=query.test_name,
            tag=query.tag,
            state=state,
            since=query.since,
            until=query.until,
            limit=query.limit,
            cursor=cursor,
        )
        return Deferred(lambda: self._store.list_alerts(alerts))

    def op_update_alert(self, request: dict[str, Any], peer: str) -> Outcome:
        check_fields(request, ENVELOPE_FIELDS | OWNER_FIELDS | frozenset({"alert_id", "state", "note"}))
        alert_id = required_record_id(request, "alert_id")
        state = request.get("state")
        if state not in ALERT_STATES:
            raise bad_request("state", f"is required: one of {', '.join(ALERT_STATES)}")
        note = optional_string(request, "note", MAX_NOTE_CHARS) or ""
        return self._update_alert(request, alert_id, state, note)

    async def _update_alert(self, request: dict[str, Any], alert_id: str, state: str, note: str) -> Fields:
        owner = await self._owner_or_admin(request)
        return await self._store.update_alert(alert_id, state, note, owner)

    def op_export(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_admin(request)
        # A dump carries each record's samples, so that import restores them.
        query = dataclasses.replace(self._query(request, with_user=False, extra_fields=ADMIN_FIELDS), samples=True)
        return Deferred(lambda: self._export(query))

    async def _export(self, query: Query) -> Fields:
        page: Page = await self._store.export(query)
        return {
            "users": page.profiles,
            "records": _json_array(page.records),
            "tombstones": page.tombstones,
            "next_cursor": page.next_cursor,
        }

    def op_import(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_admin(request)
        check_fields(request, IMPORT_FIELDS)
        tombstones = parse_tombstones(request.get("tombstones"))
        records = parse_import_records(request.get("records"), optional=bool(tombstones))
        force = parse_force(request.get("force"))
        if tombstones and records:
            restored = {record.record_id for record in records}
            for index, record_id in enumerate(tombstones):
                if record_id in restored:
                    raise bad_request(f"tombstones[{index}]", "is also the record_id of one of the records")
        users = request.get("users")
        if users is None and not records:
            users = {}
        if not isinstance(users, dict):
            raise bad_request("users", "must be an object of user id to profile")
        profiles: dict[str, Profile] = {}
        for record in records:
            if record.user_id not in profiles:
                try:
                    profiles[record.user_id] = profile_from_document(record.user_id, users.get(record.user_id))
                except ValueError as exc:
                    raise bad_request(f"users.{quote_input(record.user_id)}", str(exc)) from None
        return _fields_of(self._store.restore(records, profiles, tombstones, force=force))

    def op_delete_record(self, request: dict[str, Any], peer: str) -> Outcome:
        if request.get("admin_key") is not None:
            self._require_admin(request)
            check_fields(request, DELETE_RECORD_FIELDS)
            if request.get("access_token") is not None:
                raise bad_request("access_token", "cannot be combined with admin_key")
            return _fields_of(self._store.delete_record(required_record_id(request), None))
        check_fields(request, DELETE_RECORD_FIELDS)
        if request.get("access_token") is None:
            raise bad_request("access_token", "is required (the record's owner's), or admin_key")
        token = access_token(request)
        record_id = required_record_id(request)
        resolved = self._resolver.resolve(token)
        if isinstance(resolved, Profile):
            return _fields_of(self._store.delete_record(record_id, resolved.user_id))
        return self._delete_once_resolved(resolved, record_id)

    async def _delete_once_resolved(self, profile_future: asyncio.Future[Profile], record_id: str) -> Fields:
        profile = await asyncio.shield(profile_future)  # the lookup may be shared, as for record
        ack = await self._store.delete_record(record_id, profile.user_id)
        return ack.to_fields()

    def op_delete_user(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_admin(request)
        return _fields_of(self._store.delete_user(parse_delete_user(request)))

    def op_audit_log(self, request: dict[str, Any], peer: str) -> Outcome:
        self._require_admin(request)
        limit, cursor = parse_audit_page(
            request, default_limit=self._config.default_page_size, max_limit=self._config.max_page_size
        )
        return Deferred(lambda: self._audit_log(limit, cursor))

    async def _audit_log(self, limit: int, cursor: str | None) -> Fields:
        page = await self._store.audit_log(limit, cursor)
        return {"entries": _json_array(list(page.entries)), "next_cursor": page.next_cursor}

    def op_stats(self, request: dict[str, Any], peer: str) -> Fields:
        self._require_read(request)
        check_fields(request, ENVELOPE_FIELDS | READ_FIELDS)
        stats, writer, cache = self._stats, self._store.writer, self._resolver.cache
        return {
            "users": writer.user_count,
            "records": writer.record_count,
            "uptime_seconds": round(stats.uptime_seconds, 3),
            "connections": {
                "open": stats.connections_open,
                "total": stats.connections_total,
                "refused": stats.connections_refused,
            },
            "requests": dict(stats.requests),
            "errors": dict(stats.errors),
            "commits": {
                "batches": writer.batches,
                "records": writer.batched_records,
                "mean_batch_size": round(writer.batched_records / writer.batches, 2) if writer.batches else 0.0,
                "failed_batches": writer.failed_batches,
                "reopens": writer.reopens,
                "sync": self._config.sync,
            },
            "token_cache": {
                "hits": cache.hits,
                "misses": cache.misses,
                "entries": len(cache),
                "upstream_requests": self._resolver.upstream_requests,
            },
            "corrupt_records": self._store.corrupt_records,
        }
