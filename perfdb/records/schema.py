"""What a valid request looks like: record submissions, read queries, and privacy scrubbing.

Every check raises a bad_request PerfdbError whose message starts with the offending field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import re
import sys
from typing import Annotated, Any

import msgspec
import orjson

from perfdb.protocol.errors import ErrorCode, PerfdbError, bad_request, quote_input
from perfdb.protocol.limits import MAX_BATCH_RECORDS
from perfdb.records.record_ids import is_record_id, record_id_micros
from perfdb.records.scenario import map_scenario_result
from perfdb.records.timestamps import format_micros, now_micros, parse_rfc3339
from perfdb.records.units import CORE_METRIC_UNITS, UNITS, is_unit

# Size bounds, documented in protocol_spec.md.
MAX_ACCESS_TOKEN_CHARS = 4096
MAX_NAME_CHARS = 256  # test_name, tag
MAX_REQUEST_ID_CHARS = 128
MAX_USER_ID_CHARS = 256  # whole user ids, the static-token prefix included
MAX_METRICS = 256
MAX_METRIC_NAME_CHARS = 128
MAX_SYS_INFO_BYTES = 16 * 1024
MAX_CONFIG_BYTES = 64 * 1024
MAX_CURSOR_CHARS = 64
MAX_NESTING = 32  # objects and arrays inside sys_info, the configs and the scenario
MAX_FUTURE_SKEW_MICROS = 300 * 1_000_000  # an imported record may be dated this far ahead
MAX_SAMPLES = 10_000  # raw values in one record's samples, all metrics together
MAX_SAMPLE_BYTES = 256 * 1024  # the samples object's JSON
MAX_SOURCE_CHARS = 256  # each string of a record's source
SOURCE_FIELDS = ("commit", "branch", "commit_time", "repository")

_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

ENVELOPE_FIELDS = frozenset({"op", "id"})
RECORD_FIELDS = ENVELOPE_FIELDS | frozenset(
    {
        "access_token",
        "test_name",
        "tag",
        "sys_info",
        "metrics",
        "client_config",
        "server_config",
        "request_id",
        "scenario_result",
        "baseline_tag",
        "better",
        "units",
        "run_time",
        "source",
        "samples",
    }
)
# A record inside record_batch: a record request's fields without the envelope and the token.
BATCH_RECORD_FIELDS = RECORD_FIELDS - ENVELOPE_FIELDS - {"access_token"}
RECORD_BATCH_FIELDS = ENVELOPE_FIELDS | frozenset({"access_token", "records"})
ADMIN_FIELDS = frozenset({"admin_key"})
OWNER_FIELDS = frozenset({"access_token", "admin_key"})  # ops the owner's token or the admin key may do
MAX_NOTE_CHARS = 1000  # exclusion and alert notes
READ_FIELDS = frozenset({"read_key", "admin_key"})
IMPORT_FIELDS = ENVELOPE_FIELDS | ADMIN_FIELDS | frozenset({"records", "users", "tombstones", "force"})
DELETE_RECORD_FIELDS = ENVELOPE_FIELDS | ADMIN_FIELDS | frozenset({"record_id", "access_token"})
DELETE_USER_FIELDS = ENVELOPE_FIELDS | ADMIN_FIELDS | frozenset({"user_id"})
AUDIT_LOG_FIELDS = ENVELOPE_FIELDS | ADMIN_FIELDS | frozenset({"limit", "cursor"})
QUERY_FIELDS = ENVELOPE_FIELDS | frozenset({"test_name", "tag", "since", "until", "limit", "cursor"})
ORDER_FIELDS = frozenset({"reverse", "sort", "order"})  # get_user and get_all only
SAMPLES_FIELDS = frozenset({"samples"})  # get_user and get_all: attach each record's samples
OVERVIEW_FIELDS = ENVELOPE_FIELDS | READ_FIELDS | frozenset({"test_name", "metric", "user_id"})
SERIES_FIELDS = (
    ENVELOPE_FIELDS
    | READ_FIELDS
    | frozenset({"metric", "test_name", "user_id", "tag", "since", "until", "buckets", "by", "columns"})
)
# A series reply holds at most MAX_SERIES_METRICS x MAX_SERIES_BUCKETS points.
DEFAULT_SERIES_BUCKETS = 1000
MAX_SERIES_BUCKETS = 4000
MAX_SERIES_METRICS = 16
# A series "by": "test" reply holds at most this many tests: those run most recently in the range.
MAX_SERIES_TESTS = 64
SORT_ORDERS = ("desc", "asc")
COMPARE_FIELDS = ENVELOPE_FIELDS | READ_FIELDS | frozenset({"base", "head", "test_name", "user_id"})
SELECTOR_FIELDS = frozenset({"tag", "record_ids", "commit", "since", "until", "test_name", "user_id"})
_COMMIT_PREFIX = re.compile(r"[0-9a-f]{7,64}")  # a commit's sha, or the start of it (7 digits at least)
MAX_COMPARE_RECORD_IDS = 1000  # record ids one compare selector may list


class RecordDraft(msgspec.Struct):
    """A validated, scrubbed result waiting for its user, id and timestamp. A Struct rather than a
    dataclass: made once per record on the event loop, in a third of the time."""

    test_name: str
    tag: str
    sys_info: str | dict[str, Any]
    metrics: dict[str, int | float]
    client_config: dict[str, Any]
    server_config: dict[str, Any]
    request_id: str | None = None
    scenario: dict[str, Any] | None = None
    better: dict[str, str] | None = None  # which way is better for custom metrics; stored with the record
    baseline_tag: str | None = None  # judge against this tag's series instead of the record's own; not stored
    units: dict[str, str] | None = None  # metric (or samples series) -> unit
    run_time: str | None = None  # when the benchmark ran (RFC 3339, canonical form), beside the server's timestamp
    source: dict[str, str] | None = None  # the code measured: commit, branch, commit_time, repository
    samples: dict[str, list[int | float]] | None = None  # raw values; stored under their own key


@dataclasses.dataclass(frozen=True, slots=True)
class Query:
    """A validated read: whose records, which ones, and where the page starts."""

    user_id: str | None
    test_name: str | None
    tag: str | None
    since: int | None  # microseconds since the epoch, inclusive
    until: int | None  # microseconds since the epoch, exclusive
    limit: int
    cursor: str | None
    reverse: bool = False  # newest first
    sort: str | None = None  # a metric name: the page is the top `limit` records by it
    descending: bool = True  # with sort: highest values first
    samples: bool = False  # attach each record's samples


@dataclasses.dataclass(frozen=True, slots=True)
class SeriesQuery:
    """A validated series request: which records, which metrics, and how finely to bucket them."""

    metrics: tuple[str, ...]
    test_name: str | None  # None: grouped by test (then user_id is set)
    user_id: str | None
    tag: str | None
    since: int | None  # microseconds since the epoch, inclusive
    until: int | None  # microseconds since the epoch, exclusive
    buckets: int
    columns: bool = False  # each series' buckets as columns (arrays) rather than point objects

    @property
    def by_test(self) -> bool:
        return self.test_name is None

    def as_query(self) -> Query:
        """The same filters as a read query (for choosing the index to walk)."""
        return Query(self.user_id, self.test_name, self.tag, self.since, self.until, limit=1, cursor=None)


@dataclasses.dataclass(frozen=True, slots=True)
class Selector:
    """One side of a compare: a tag, a list of record ids or a time window, optionally narrowed."""

    tag: str | None
    record_ids: tuple[str, ...] | None  # newest first
    commit: str | None  # records whose source.commit starts with this
    since: int | None  # microseconds since the epoch, inclusive
    until: int | None  # microseconds since the epoch, exclusive
    user_id: str | None
    test_name: str | None

    def as_query(self) -> Query:
        """The same filters as a read query (for choosing the index to walk)."""
        return Query(self.user_id, self.test_name, self.tag, self.since, self.until, limit=1, cursor=None)

    def admits(self, user_id: str, test_name: str) -> bool:
        """Whether the narrowing admits a record of this user and test (record_ids selectors)."""
        return (self.user_id is None or self.user_id == user_id) and (
            self.test_name is None or self.test_name == test_name
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CompareQuery:
    """A validated compare request: the two sides and how many records each may hold."""

    base: Selector
    head: Selector
    max_records: int  # per side; past it a side holds its newest max_records


# -- field checks -----------------------------------------------------------------------


def check_fields(request: dict[str, Any], allowed: frozenset[str]) -> None:
    if request.keys() <= allowed:
        return
    unknown = next(name for name in request if name not in allowed)
    raise bad_request(quote_input(unknown), "unknown field for this op")


def required_string(request: dict[str, Any], field: str, max_chars: int) -> str:
    value = request.get(field)
    if value is None:
        raise bad_request(field, "is required")
    return _string(field, value, max_chars, allow_empty=False)


def optional_string(request: dict[str, Any], field: str, max_chars: int) -> str | None:
    value = request.get(field)
    if value is None:
        return None
    return _string(field, value, max_chars, allow_empty=False)


def _string(field: str, value: Any, max_chars: int, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise bad_request(field, f"must be a string, got {_json_type(value)}")
    if len(value) > max_chars:
        raise bad_request(field, f"longer than {max_chars} characters")
    if not allow_empty and not value.strip():
        raise bad_request(field, "must not be empty")
    if _CONTROL_CHARS.search(value):
        raise bad_request(field, "must not contain control characters")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _bounded_object(field: str, value: Any, max_bytes: int) -> bytes:
    """Check that `value` is an object of at most `max_bytes` of JSON, nested at most
    MAX_NESTING deep; returns that JSON."""
    if not isinstance(value, dict):
        raise bad_request(field, f"must be a JSON object, got {_json_type(value)}")
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise bad_request(field, f"nested deeper than {MAX_NESTING} levels") from None
    if len(encoded) > max_bytes:
        raise bad_request(field, f"larger than {max_bytes} bytes of JSON")
    # Counting brackets is cheap; only an object with many gets its depth measured.
    if encoded.count(b"{") + encoded.count(b"[") > MAX_NESTING and nesting_depth(value) > MAX_NESTING:
        raise bad_request(field, f"nested deeper than {MAX_NESTING} levels")
    return encoded


def nesting_depth(value: Any) -> int:
    """How many objects and arrays deep `value` goes (a scalar is 0)."""
    depth = 0
    level = [value]
    while level:
        containers = [item for item in level if isinstance(item, (dict, list))]
        if not containers:
            break
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def _config(field: str, value: Any) -> dict[str, Any]:
    """An optional configuration object, bounded, with its host fields removed."""
    if value is None:
        return {}
    encoded = _bounded_object(field, value, MAX_CONFIG_BYTES)
    # Walk the object only when its JSON names a field to remove (rarely): the walk copies it.
    if _HOST_KEY.search(encoded):
        value = remove_host_fields(value)
    result: dict[str, Any] = value
    return result


def check_metrics(value: Any, field: str = "metrics") -> dict[str, int | float]:
    if not isinstance(value, dict):
        raise bad_request(field, f"must be an object of metric name to number, got {_json_type(value)}")
    if not value:
        raise bad_request(field, "needs at least one metric")
    if len(value) > MAX_METRICS:
        raise bad_request(field, f"more than {MAX_METRICS} metrics")
    for name, number in value.items():
        if name not in _valid_metric_names:
            if len(name) > MAX_METRIC_NAME_CHARS or not _METRIC_NAME.fullmatch(name):
                raise bad_request(
                    f"{field}.{quote_input(name)}",
                    f"metric names are 1-{MAX_METRIC_NAME_CHARS} characters of letters, digits, '_', '.', '-'",
                )
            if len(_valid_metric_names) < _MAX_REMEMBERED_NAMES:
                _valid_metric_names.add(name)
        kind = type(number)  # exact types: bool is an int subclass and is refused
        if kind is float:
            if not math.isfinite(number):
                raise bad_request(f"{field}.{name}", "must be a finite number")
        elif kind is not int:
            raise bad_request(f"{field}.{name}", f"must be a number, got {_json_type(number)}")
    return value


# Metric names already checked: most submissions repeat the same few dozen.
_valid_metric_names: set[str] = set()
_MAX_REMEMBERED_NAMES = 4096


# -- privacy ---------------------------------------------------------------------------

IP_REPLACEMENT = "[redacted]"
# Candidates only: each match is confirmed by the ipaddress module, so "16:19:53" survives.
_IP_CANDIDATE = re.compile(
    # IPv6 ending in an embedded IPv4 address (::ffff:10.1.2.3), before the plain forms.
    r"(?<![0-9A-Fa-f.:])(?:[0-9A-Fa-f]{0,4}:){2,6}\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)"
    # IPv4, not inside a longer dotted run such as a version number; a ":port" may follow.
    r"|(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d]|\.\d)"
    # IPv6 (with an optional zone), not inside a longer run of hex, colons and dots.
    r"|(?<![0-9A-Fa-f.:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?(?![\w:]|\.\d)"
)
_CONFIG_KEYS_REMOVED = frozenset({"host", "server_targets", "serverTargets"})
_HOST_KEY = re.compile(rb'"(?:host|server_targets|serverTargets)"')
# A cheap necessary condition for any valid address (four dotted numbers, or two colons with
# hex between them, or '::'): four times faster than the full pattern on text without one.
_IP_HINT = r"\d\.\d{1,3}\.\d|[0-9A-Fa-f]:[0-9A-Fa-f]*:|::"
_IP_HINT_TEXT = re.compile(_IP_HINT)
_IP_HINT_BYTES = re.compile(_IP_HINT.encode())


def _replace_ip(match: re.Match[str]) -> str:
    candidate = match.group(0).split("%", 1)[0]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return match.group(0)
    return IP_REPLACEMENT


def scrub_ips(value: Any) -> Any:
    """Replace every IP address inside strings (keys included) with IP_REPLACEMENT."""
    if isinstance(value, str):
        return _IP_CANDIDATE.sub(_replace_ip, value) if _IP_HINT_TEXT.search(value) else value
    if isinstance(value, dict):
        return {scrub_ips(key): scrub_ips(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_ips(item) for item in value]
    return value


def remove_host_fields(config: Any) -> Any:
    """Drop host and server-target fields at any depth: they name the benchmark machines."""
    if isinstance(config, dict):
        return {key: remove_host_fields(item) for key, item in config.items() if key not in _CONFIG_KEYS_REMOVED}
    if isinstance(config, list):
        return [remove_host_fields(item) for item in config]
    return config


# -- the typed fast path ---------------------------------------------------------------------
# A record's types and bounds are checked in one C pass by msgspec, converting the decoded
# request into the Structs below; what Python still does per record is what msgspec cannot
# say (metric names, through the set of names already seen, and the bounded, scrubbed objects).
# The Structs accept only what the checks further down accept: anything they refuse, and any
# later check that fails, sends the request through those checks, so an error is always theirs,
# word for word (tests/test_record_fast_path.py holds the two to that). A scenario_result is
# not declared here: such records always take the full path.

_TagText = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
# Finite: NaN and the infinities fail both bounds (orjson never decodes one; a Python caller may pass one).
_FiniteFloat = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]


class _RecordFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One record's fields: a record_batch's record, and the body of a record request. Strings
    are checked for control characters after conversion: msgspec's `pattern` costs about 1 µs a
    string, str.isprintable a tenth of that."""

    test_name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    metrics: Annotated[dict[str, int | _FiniteFloat], msgspec.Meta(min_length=1, max_length=MAX_METRICS)]
    tag: _TagText | None = None
    # sys_info a string or an object, the configs objects: checked by _free_form_objects. Typed
    # here, msgspec would copy each one (the largest part of convert's time in a profile).
    sys_info: Any = None
    client_config: Any = None
    server_config: Any = None
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID_CHARS)] | None = None
    baseline_tag: _TagText | None = None
    # Rarely sent; checked by their own validators below.
    better: Any = None
    units: Any = None
    run_time: Any = None
    source: Any = None
    samples: Any = None


class _RecordRequest(_RecordFields, kw_only=True):
    """A record request (op and id are the dispatcher's to check)."""

    access_token: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ACCESS_TOKEN_CHARS)]
    op: Any = None
    id: Any = None


def _clean_text(value: str | None) -> bool:
    """No control characters (the common case: printable, which excludes them)."""
    return value is None or value.isprintable() or not _CONTROL_CHARS.search(value)


def _typed_draft(fields: _RecordFields) -> RecordDraft:
    """The draft of fields msgspec accepted. Raises PerfdbError when a check msgspec cannot make
    fails: the caller then runs the full checks, for their exact error."""
    metrics = fields.metrics
    if not metrics.keys() <= _valid_metric_names:
        check_metrics(metrics)  # names not seen before
    test_name, request_id = fields.test_name, fields.request_id
    if not (
        _clean_text(test_name)
        and _clean_text(fields.tag)
        and _clean_text(request_id)
        and _clean_text(fields.baseline_tag)
        and not test_name.isspace()
        and (request_id is None or not request_id.isspace())
    ):
        raise PerfdbError(ErrorCode.BAD_REQUEST, "see the full checks")
    samples = None if fields.samples is None else _samples(fields.samples)
    sys_info, client_config, server_config = _free_form_objects(fields)
    return RecordDraft(
        test_name=test_name,
        tag=fields.tag or "",
        sys_info=sys_info,
        metrics=metrics,
        client_config=client_config,
        server_config=server_config,
        request_id=request_id,
        better=None if fields.better is None else _better(fields.better, metrics),
        baseline_tag=fields.baseline_tag,
        units=None if fields.units is None else _units(fields.units, metrics, samples),
        run_time=None if fields.run_time is None else _run_time(fields.run_time),
        source=None if fields.source is None else _source(fields.source),
        samples=samples,
    )


_FreeFormObjects = tuple[str | dict[str, Any], dict[str, Any], dict[str, Any]]


def _free_form_objects(fields: _RecordFields) -> _FreeFormObjects:
    """sys_info, client_config and server_config, bounded and scrubbed. A machine sends the same
    three with every result of a benchmark, so their JSON, once found clean (within bounds, no
    address, no host field: the checks change nothing), is remembered: one orjson.dumps and a set
    lookup then stand for three encodings, the address search (about 2 µs) and the host-field
    searches."""
    sys_info, client_config, server_config = fields.sys_info, fields.client_config, fields.server_config
    # Absent and null are {}, and check as {} does: one entry for both.
    as_sent: _FreeFormObjects = (
        {} if sys_info is None else sys_info,
        {} if client_config is None else client_config,
        {} if server_config is None else server_config,
    )
    try:
        encoded = orjson.dumps(as_sent)
    except orjson.JSONEncodeError:  # nested too deeply: the checks below say so
        encoded = b""
    if encoded in _clean_free_form_objects:
        return as_sent
    checked = (_sys_info(sys_info), _config("client_config", client_config), _config("server_config", server_config))
    if checked == as_sent and 0 < len(encoded) <= _MAX_REMEMBERED_OBJECTS_BYTES:
        if len(_clean_free_form_objects) >= _MAX_REMEMBERED_OBJECTS:
            _clean_free_form_objects.clear()  # start over with the machines and benchmarks seen from now on
        _clean_free_form_objects.add(encoded)
    return checked


# The JSON of [sys_info, client_config, server_config] found clean, as _free_form_objects encodes them.
_clean_free_form_objects: set[bytes] = set()
_MAX_REMEMBERED_OBJECTS = 1024
_MAX_REMEMBERED_OBJECTS_BYTES = 4096


def typed_record(request: dict[str, Any]) -> tuple[str, RecordDraft] | None:
    """parse_record's result for a request the fast path accepts, else None (the request may still
    be valid). request: a JSON object as orjson decodes it, of plain dicts, lists, strings, numbers,
    booleans and null (msgspec takes a subclass, such as an IntEnum, for its base type)."""
    try:
        typed = msgspec.convert(request, _RecordRequest)
        token = typed.access_token
        if not (token.isascii() and token.isprintable()):
            return None
        return token, _typed_draft(typed)
    except (msgspec.ValidationError, PerfdbError):
        return None


def typed_record_draft(fields: dict[str, Any]) -> RecordDraft | None:
    """record_draft's result for one of a record_batch's records the fast path accepts, else None."""
    try:
        return _typed_draft(msgspec.convert(fields, _RecordFields))
    except (msgspec.ValidationError, PerfdbError):
        return None


# -- requests ----------------------------------------------------------------------------


def parse_record(request: dict[str, Any]) -> tuple[str, RecordDraft]:
    """Validate a record request; returns the access token and the scrubbed draft."""
    typed = typed_record(request)
    if typed is not None:
        return typed
    check_fields(request, RECORD_FIELDS)
    return access_token(request), record_draft(request)


def parse_record_batch(request: dict[str, Any]) -> tuple[str, list[RecordDraft | PerfdbError]]:
    """Validate a record_batch request: the access token, and each record's draft or the error
    that refuses that record alone (the others are unaffected)."""
    check_fields(request, RECORD_BATCH_FIELDS)
    token = access_token(request)
    records = request.get("records")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_BATCH_RECORDS:
        raise bad_request("records", f"must be a list of 1 to {MAX_BATCH_RECORDS} records")
    drafts: list[RecordDraft | PerfdbError] = []
    for fields in records:
        try:
            if not isinstance(fields, dict):
                raise bad_request("record", f"must be an object, got {_json_type(fields)}")
            typed = typed_record_draft(fields)
            if typed is not None:
                drafts.append(typed)
                continue
            check_fields(fields, BATCH_RECORD_FIELDS)
            drafts.append(record_draft(fields))
        except PerfdbError as exc:
            drafts.append(exc)
    return token, drafts


def record_draft(fields: dict[str, Any]) -> RecordDraft:
    """The draft of one record's fields (a record request's, or one of a record_batch's records)."""
    baseline_tag = None
    if fields.get("baseline_tag") is not None:
        baseline_tag = _string("baseline_tag", fields["baseline_tag"], MAX_NAME_CHARS, allow_empty=True)
    if "scenario_result" not in fields:
        draft = _draft(fields)
        draft.baseline_tag = baseline_tag
        return draft
    for field in ("metrics", "client_config", "server_config"):
        if field in fields:
            raise bad_request(field, "cannot be combined with scenario_result")
    mapped = map_scenario_result(fields["scenario_result"])
    mapped_fields = {
        **fields,
        "metrics": mapped.metrics,
        "client_config": mapped.client_config,
        "server_config": mapped.server_config,
    }
    if fields.get("test_name") is None and mapped.name:
        mapped_fields["test_name"] = mapped.name
    if fields.get("run_time") is None:
        # When the benchmark ran, from the ScenarioResult itself (its summary's start time), if usable.
        started = (mapped.scenario or {}).get("start_time")
        with contextlib.suppress(PerfdbError):
            mapped_fields["run_time"] = _run_time(started) if isinstance(started, str) else None
    draft = _draft(mapped_fields, scenario=mapped.scenario)
    draft.baseline_tag = baseline_tag
    return draft


def access_token(request: dict[str, Any]) -> str:
    """The request's access_token, checked (and never quoted: it is a secret even when malformed)."""
    token = request.get("access_token")
    if token is None:
        raise bad_request("access_token", "is required")
    if (
        not isinstance(token, str)
        or not token
        or len(token) > MAX_ACCESS_TOKEN_CHARS
        or not (token.isascii() and token.isprintable())
    ):
        raise bad_request(
            "access_token",
            f"must be 1-{MAX_ACCESS_TOKEN_CHARS} printable ASCII characters",
        )
    return token


def required_record_id(request: dict[str, Any], field: str = "record_id") -> str:
    value = request.get(field)
    if value is None:
        raise bad_request(field, "is required")
    if not isinstance(value, str) or not is_record_id(value):
        raise bad_request(field, "must be a record id (20 lowercase hex digits)")
    return value


def parse_delete_user(request: dict[str, Any]) -> str:
    """The user id of a delete_user request."""
    check_fields(request, DELETE_USER_FIELDS)
    return required_string(request, "user_id", MAX_USER_ID_CHARS)


def parse_audit_page(request: dict[str, Any], *, default_limit: int, max_limit: int) -> tuple[int, str | None]:
    """The limit and cursor of an audit_log request."""
    check_fields(request, AUDIT_LOG_FIELDS)
    return _limit(request, default_limit, max_limit), optional_string(request, "cursor", MAX_CURSOR_CHARS)


def parse_tombstones(value: Any) -> list[str]:
    """The tombstones of an import: ids of records deleted where the export came from."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_IMPORT_RECORDS:
        raise bad_request("tombstones", f"must be a list of at most {MAX_IMPORT_RECORDS} record ids")
    for index, record_id in enumerate(value):
        if not isinstance(record_id, str) or not is_record_id(record_id):
            raise bad_request(f"tombstones[{index}]", "must be a record id (20 lowercase hex digits)")
    return value


def parse_force(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request("force", f"must be a boolean, got {_json_type(value)}")
    return value


def _draft(fields: dict[str, Any], scenario: dict[str, Any] | None = None) -> RecordDraft:
    """The checks and scrubbing shared by submitted and imported records."""
    if "metrics" not in fields:
        raise bad_request("metrics", "is required (or send scenario_result)")
    metrics = check_metrics(fields["metrics"])
    client_config = _config("client_config", fields.get("client_config"))
    server_config = _config("server_config", fields.get("server_config"))
    test_name = required_string(fields, "test_name", MAX_NAME_CHARS)
    tag = _optional_tag(fields) or ""
    sys_info = _sys_info(fields.get("sys_info"))
    if scenario is not None:
        _bounded_object("scenario", scenario, MAX_CONFIG_BYTES)
    samples = _samples(fields.get("samples"))
    return RecordDraft(
        test_name=test_name,
        tag=tag,
        sys_info=sys_info,
        metrics=metrics,
        client_config=client_config,
        server_config=server_config,
        request_id=optional_string(fields, "request_id", MAX_REQUEST_ID_CHARS),
        scenario=scenario,
        better=_better(fields.get("better"), metrics),
        units=_units(fields.get("units"), metrics, samples),
        run_time=_run_time(fields.get("run_time")),
        source=_source(fields.get("source")),
        samples=samples,
    )


def _sys_info(value: Any) -> str | dict[str, Any]:
    """`sys_info`, bounded and with its IP addresses replaced (absent: {})."""
    if value is None:
        return {}
    if isinstance(value, str):
        # Bounds apply to what is stored, after scrubbing, so an export always imports again.
        text: str = scrub_ips(value)
        if len(text.encode()) > MAX_SYS_INFO_BYTES:
            raise bad_request("sys_info", f"larger than {MAX_SYS_INFO_BYTES} bytes")
        return text
    if not isinstance(value, dict):
        raise bad_request("sys_info", f"must be a string or an object, got {_json_type(value)}")
    # Walk the object only when its JSON holds something shaped like an address.
    if _IP_HINT_BYTES.search(_bounded_object("sys_info", value, MAX_SYS_INFO_BYTES)):
        value = scrub_ips(value)
        _bounded_object("sys_info", value, MAX_SYS_INFO_BYTES)
    scrubbed: dict[str, Any] = value
    return scrubbed


def _better(value: Any, metrics: dict[str, int | float]) -> dict[str, str] | None:
    """`better`: {metric: "higher"|"lower"} for metrics of this record (the core metrics' direction is fixed)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("better", f'must be an object of metric name to "higher" or "lower", got {_json_type(value)}')
    for metric, direction in value.items():
        if metric not in metrics:
            raise bad_request(f"better.{quote_input(metric)}", "names no metric of this record")
        if direction not in ("higher", "lower"):
            raise bad_request(f"better.{quote_input(metric)}", 'must be "higher" or "lower"')
    return value or None


def _units(
    value: Any, metrics: dict[str, int | float], samples: dict[str, list[int | float]] | None
) -> dict[str, str] | None:
    """`units`: {metric or samples series: unit} from the documented set; a core metric's unit is fixed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("units", f"must be an object of metric name to unit, got {_json_type(value)}")
    for metric, unit in value.items():
        field = f"units.{quote_input(metric)}"
        if metric not in metrics and (samples is None or metric not in samples):
            raise bad_request(field, "names no metric (or samples series) of this record")
        if not is_unit(unit):
            raise bad_request(
                field,
                f"must be a unit: {', '.join(UNITS)}, or <name>/op, <name>/s",
            )
        core_unit = CORE_METRIC_UNITS.get(metric)
        if core_unit is not None and unit != core_unit:
            raise bad_request(field, f"a core metric's unit is fixed: {core_unit}")
    return value or None


def _run_time(value: Any) -> str | None:
    """`run_time`: when the benchmark ran, kept in the canonical form of the server's timestamps."""
    micros = _timestamp({"run_time": value}, "run_time")
    if micros is None:
        return None
    if micros > now_micros() + MAX_FUTURE_SKEW_MICROS:
        raise bad_request("run_time", "is in the future")
    return format_micros(micros)


def _source(value: Any) -> dict[str, str] | None:
    """`source`: {commit, branch, commit_time, repository}, each an optional bounded string."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("source", f"must be an object with {', '.join(SOURCE_FIELDS)}, got {_json_type(value)}")
    for field in value:
        if field not in SOURCE_FIELDS:
            raise bad_request(f"source.{quote_input(field)}", f"unknown field; use {', '.join(SOURCE_FIELDS)}")
    source = {}
    try:
        for field in SOURCE_FIELDS:
            text = optional_string(value, field, MAX_SOURCE_CHARS)
            if field == "commit_time" and text is not None:
                text = format_micros(_timestamp(value, field) or 0)
            if text is not None:
                source[field] = text
    except PerfdbError as error:
        raise PerfdbError(ErrorCode.BAD_REQUEST, f"source.{error.message}") from None
    return source or None


def _samples(value: Any) -> dict[str, list[int | float]] | None:
    """`samples`: {name: [finite numbers]}, at most MAX_SAMPLES values and MAX_SAMPLE_BYTES of JSON."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("samples", f"must be an object of metric name to a list of numbers, got {_json_type(value)}")
    if len(value) > MAX_METRICS:
        raise bad_request("samples", f"more than {MAX_METRICS} series")
    count = 0
    for name, values in value.items():
        field = f"samples.{quote_input(name)}"
        if not isinstance(name, str) or len(name) > MAX_METRIC_NAME_CHARS or not _METRIC_NAME.fullmatch(name):
            raise bad_request(
                field, f"names are 1-{MAX_METRIC_NAME_CHARS} characters of letters, digits, '_', '.', '-'"
            )
        if not isinstance(values, list):
            raise bad_request(field, f"must be a list of numbers, got {_json_type(values)}")
        if not values:
            raise bad_request(field, "must hold at least one number")
        count += len(values)
        if count > MAX_SAMPLES:
            raise bad_request("samples", f"more than {MAX_SAMPLES} values")
        for index, number in enumerate(values):
            kind = type(number)
            if kind is not int and (kind is not float or not math.isfinite(number)):
                raise bad_request(f"{field}[{index}]", "must be a finite number")
    if len(orjson.dumps(value)) > MAX_SAMPLE_BYTES:
        raise bad_request("samples", f"larger than {MAX_SAMPLE_BYTES} bytes of JSON")
    return value or None


@dataclasses.dataclass(frozen=True, slots=True)
class ImportedRecord:
    """A record restored from an export, keeping its identity."""

    record_id: str
    user_id: str
    timestamp: str
    draft: RecordDraft


STORED_RECORD_FIELDS = frozenset(
    {
        "record_id", "user_id", "timestamp", "test_name", "tag", "sys_info", "metrics",
        "client_config", "server_config", "request_id", "scenario", "better", "units", "run_time", "source",
        "samples",
    }
)  # fmt: skip
MAX_IMPORT_RECORDS = 1000


def parse_import_records(value: Any, *, optional: bool = False) -> list[ImportedRecord]:
    """Validate the records of an import request: stored records exactly as export gives them.
    optional: the request carries tombstones, so it may come without records."""
    if optional and (value is None or value == []):
        return []
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_IMPORT_RECORDS:
        raise bad_request("records", f"must be a list of 1 to {MAX_IMPORT_RECORDS} records")
    return [_imported_record(document, index) for index, document in enumerate(value)]


def _imported_record(document: Any, index: int) -> ImportedRecord:
    where = f"records[{index}]"
    if not isinstance(document, dict):
        raise bad_request(where, "must be a record object")
    try:
        check_fields(document, STORED_RECORD_FIELDS)
        record_id = required_string(document, "record_id", 32)
        if not is_record_id(record_id):
            raise bad_request("record_id", "is not a perfdb record id")
        user_id = required_string(document, "user_id", MAX_USER_ID_CHARS)
        stamped, filed_at = _timestamp(document, "timestamp"), record_id_micros(record_id)
        if stamped is None:
            raise bad_request("timestamp", "is required")
        # A record is filed at its commit time, or at its run_time when it ran long before it was stored.
        ran = _timestamp(document, "run_time")
        if filed_at not in (stamped, ran):
            raise bad_request("timestamp", "does not match the record id")
        if max(stamped, filed_at) > now_micros() + MAX_FUTURE_SKEW_MICROS:
            # New records must sort after it, so a future date would stall the server's clock.
            raise bad_request("timestamp", "is in the future")
        timestamp = format_micros(stamped)  # stored in the one canonical form
        draft = _draft(document, scenario=document.get("scenario"))  # _draft bounds the scenario
    except PerfdbError as error:
        raise bad_request(where, error.message) from None
    return ImportedRecord(record_id, user_id, timestamp, draft)


def parse_query(
    request: dict[str, Any],
    *,
    with_user: bool,
    default_limit: int,
    max_limit: int,
    extra_fields: frozenset[str] = frozenset(),
) -> Query:
    """Validate the filters shared by get_user, get_all and export."""
    check_fields(request, QUERY_FIELDS | extra_fields | ({"user_id"} if with_user else frozenset()))
    user_id = required_string(request, "user_id", MAX_USER_ID_CHARS) if with_user else None
    since = _timestamp(request, "since")
    until = _timestamp(request, "until")
    if since is not None and until is not None and until <= since:
        raise bad_request("until", "must be later than since")
    limit = _limit(request, default_limit, max_limit)
    cursor = optional_string(request, "cursor", MAX_CURSOR_CHARS)
    reverse = request.get("reverse")
    if reverse is None:
        reverse = False
    if not isinstance(reverse, bool):
        raise bad_request("reverse", f"must be a boolean, got {_json_type(reverse)}")
    sort = request.get("sort")
    if sort is not None:
        sort = _metric_name("sort", sort)
        if reverse:
            raise bad_request("reverse", "cannot be combined with sort (use order)")
    order = request.get("order")
    if order is not None:
        if sort is None:
            raise bad_request("order", "needs sort")
        if order not in SORT_ORDERS:
            raise bad_request("order", "must be 'desc' or 'asc'")
    samples = request.get("samples")
    if samples is not None and not isinstance(samples, bool):
        raise bad_request("samples", f"must be a boolean, got {_json_type(samples)}")
    return Query(
        user_id=user_id,
        test_name=optional_string(request, "test_name", MAX_NAME_CHARS),
        tag=_optional_tag(request),
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
        reverse=reverse,
        sort=sort,
        descending=order != "asc",
        samples=bool(samples),
    )


def parse_overview(request: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """Validate an overview request; returns (test_name or None for all tests, metric, user_id or
    None for every user)."""
    check_fields(request, OVERVIEW_FIELDS)
    metric = request.get("metric")
    if metric is None:
        raise bad_request("metric", "is required")
    test_name = optional_string(request, "test_name", MAX_NAME_CHARS)
    return test_name, _metric_name("metric", metric), optional_string(request, "user_id", MAX_USER_ID_CHARS)


def parse_series(request: dict[str, Any]) -> SeriesQuery:
    """Validate a series request."""
    check_fields(request, SERIES_FIELDS)
    metric = request.get("metric")
    if metric is None:
        raise bad_request("metric", "is required")
    if isinstance(metric, list):
        if not 1 <= len(metric) <= MAX_SERIES_METRICS:
            raise bad_request("metric", f"must list 1 to {MAX_SERIES_METRICS} metric names")
        metrics = tuple(_metric_name(f"metric[{index}]", name) for index, name in enumerate(metric))
        if len(set(metrics)) != len(metrics):
            raise bad_request("metric", "names a metric twice")
    else:
        metrics = (_metric_name("metric", metric),)
    by = request.get("by")
    if by is None:
        test_name: str | None = required_string(request, "test_name", MAX_NAME_CHARS)
        user_id = optional_string(request, "user_id", MAX_USER_ID_CHARS)
    elif by != "test":
        raise bad_request(
            "by", f'must be "test", got {by!r}' if isinstance(by, str) else f"must be a string, got {_json_type(by)}"
        )
    elif request.get("test_name") is not None:
        raise bad_request("test_name", 'must be left out with "by": "test" (the reply holds every test)')
    else:
        test_name = None
        user_id = required_string(request, "user_id", MAX_USER_ID_CHARS)
    since = _timestamp(request, "since")
    until = _timestamp(request, "until")
    if since is not None and until is not None and until <= since:
        raise bad_request("until", "must be later than since")
    buckets = request.get("buckets")
    if buckets is None:
        buckets = DEFAULT_SERIES_BUCKETS
    if isinstance(buckets, bool) or not isinstance(buckets, int):
        raise bad_request("buckets", f"must be an integer, got {_json_type(buckets)}")
    if not 1 <= buckets <= MAX_SERIES_BUCKETS:
        raise bad_request("buckets", f"must be between 1 and {MAX_SERIES_BUCKETS}")
    columns = request.get("columns", False)
    if not isinstance(columns, bool):
        raise bad_request("columns", f"must be a boolean, got {_json_type(columns)}")
    return SeriesQuery(metrics, test_name, user_id, _optional_tag(request), since, until, buckets, columns)


def parse_compare(request: dict[str, Any], *, max_records: int) -> CompareQuery:
    """Validate a compare request; a top-level test_name or user_id narrows both sides."""
    check_fields(request, COMPARE_FIELDS)
    shared = {
        "test_name": optional_string(request, "test_name", MAX_NAME_CHARS),
        "user_id": optional_string(request, "user_id", MAX_USER_ID_CHARS),
    }
    return CompareQuery(_selector(request, "base", shared), _selector(request, "head", shared), max_records=max_records)


def _selector(request: dict[str, Any], side: str, shared: dict[str, str | None]) -> Selector:
    value = request.get(side)
    if value is None:
        raise bad_request(side, "is required: an object with tag, record_ids, commit, or since and/or until")
    if not isinstance(value, dict):
        raise bad_request(side, f"must be an object, got {_json_type(value)}")
    try:
        unknown = next((name for name in value if name not in SELECTOR_FIELDS), None)
        if unknown is not None:
            raise bad_request(
                quote_input(unknown),
                "unknown selector field; use tag, record_ids, commit, since, until, test_name, user_id",
            )
        kinds = [kind for kind, present in _selector_kinds(value).items() if present]
        if len(kinds) != 1:
            given = " and ".join(kinds) if kinds else "none"
            raise PerfdbError(
                ErrorCode.BAD_REQUEST,
                f"needs exactly one of tag, record_ids, commit, or a window (since/until); got {given}",
            )
        narrowing = {
            "test_name": optional_string(value, "test_name", MAX_NAME_CHARS),
            "user_id": optional_string(value, "user_id", MAX_USER_ID_CHARS),
        }
        for field, own in narrowing.items():
            if own is not None and shared[field] is not None:
                raise bad_request(field, "is given both here and at the top level of the request")
        since = _timestamp(value, "since")
        until = _timestamp(value, "until")
        if since is not None and until is not None and until <= since:
            raise bad_request("until", "must be later than since")
        record_ids = None if value.get("record_ids") is None else _record_ids(value["record_ids"])
        commit = None if value.get("commit") is None else _commit_prefix(value["commit"])
        tag = _optional_tag(value)
    except PerfdbError as error:
        raise bad_request(side, error.message) from None
    return Selector(
        tag=tag,
        record_ids=record_ids,
        commit=commit,
        since=since,
        until=until,
        user_id=narrowing["user_id"] or shared["user_id"],
        test_name=narrowing["test_name"] or shared["test_name"],
    )


def _selector_kinds(value: dict[str, Any]) -> dict[str, bool]:
    return {
        "tag": value.get("tag") is not None,
        "record_ids": value.get("record_ids") is not None,
        "commit": value.get("commit") is not None,
        "window": value.get("since") is not None or value.get("until") is not None,
    }


def _commit_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _COMMIT_PREFIX.fullmatch(value):
        raise bad_request("commit", "must be a commit sha or its first 7 or more digits (lowercase hex)")
    return value


def _record_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise bad_request("record_ids", f"must be a list of record ids, got {_json_type(value)}")
    if not 1 <= len(value) <= MAX_COMPARE_RECORD_IDS:
        raise bad_request("record_ids", f"must list 1 to {MAX_COMPARE_RECORD_IDS} record ids, got {len(value)}")
    for index, record_id in enumerate(value):
        if not isinstance(record_id, str) or not is_record_id(record_id):
            raise bad_request(f"record_ids[{index}]", "is not a perfdb record id")
    if len(set(value)) != len(value):
        raise bad_request("record_ids", "lists a record id twice")
    return tuple(sorted(value, reverse=True))  # record ids sort by time: newest first


def _metric_name(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise bad_request(field, f"must be a metric name (string), got {_json_type(value)}")
    if len(value) > MAX_METRIC_NAME_CHARS or not _METRIC_NAME.fullmatch(value):
        raise bad_request(
            field, f"must be a metric name: 1-{MAX_METRIC_NAME_CHARS} characters of letters, digits, '_', '.', '-'"
        )
    return value


def _limit(request: dict[str, Any], default_limit: int, max_limit: int) -> int:
    limit = request.get("limit")
    if limit is None:
        return default_limit
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise bad_request("limit", f"must be an integer, got {_json_type(limit)}")
    if not 1 <= limit <= max_limit:
        raise bad_request("limit", f"must be between 1 and {max_limit}")
    return limit


def _optional_tag(request: dict[str, Any]) -> str | None:
    value = request.get("tag")
    return None if value is None else _string("tag", value, MAX_NAME_CHARS, allow_empty=True)


def _timestamp(request: dict[str, Any], field: str) -> int | None:
    value = request.get(field)
    if value is None:
        return None
    try:
        return parse_rfc3339(value)
    except (ValueError, TypeError, OverflowError):
        raise bad_request(field, "must be an RFC 3339 timestamp with an offset, e.g. 2026-01-31T12:00:00Z") from None


def check_request_id(value: Any) -> None:
    """The echoed 'id' must be a JSON scalar of modest size."""
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS:
        return
    raise bad_request(
        "id", f"must be a string of at most {MAX_REQUEST_ID_CHARS} characters, a number, a boolean or null"
    )
