"""Error codes shared by every layer, and the exception that carries one to the client."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Stable, machine-readable error codes; protocol_spec.md documents each one."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    LINE_TOO_LONG = "line_too_long"
    UNAUTHENTICATED = "unauthenticated"
    AUTH_UNAVAILABLE = "auth_unavailable"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    OVERLOADED = "overloaded"
    STORAGE_ERROR = "storage_error"
    SHUTTING_DOWN = "shutting_down"
    TIMEOUT = "timeout"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again later may succeed."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.AUTH_UNAVAILABLE,
        ErrorCode.OVERLOADED,
        ErrorCode.STORAGE_ERROR,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.TIMEOUT,
    }
)

# Error messages quote at most this much client input, so a hostile line cannot
# make the server echo (or log) megabytes back.
MAX_ECHO_CHARS = 100


def quote_input(value: object) -> str:
    """Render client input for an error message, truncated to MAX_ECHO_CHARS."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > MAX_ECHO_CHARS:
        text = text[:MAX_ECHO_CHARS] + "..."
    return repr(text) if isinstance(value, str) else text


class PerfdbError(Exception):
    """A failure that is reported to the client as an error response."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"PerfdbError({self.code.value!r}, {self.message!r})"


def bad_request(field: str, problem: str) -> PerfdbError:
    """A bad_request error whose message names the offending field first."""
    return PerfdbError(ErrorCode.BAD_REQUEST, f"{field}: {problem}")
