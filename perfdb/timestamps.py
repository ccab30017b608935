"""RFC 3339 timestamps on the wire, integer microseconds since the epoch inside."""

from __future__ import annotations

import datetime
import time

_UTC = datetime.UTC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)


def now_micros() -> int:
    """The current wall-clock time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def format_micros(micros: int) -> str:
    """Format as RFC 3339 UTC with exactly six fractional digits, e.g. 2026-01-02T03:04:05.000006Z."""
    seconds, fraction = divmod(micros, 1_000_000)
    moment = _EPOCH + datetime.timedelta(seconds=seconds)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction:06d}Z"


def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 timestamp with an explicit offset into microseconds since the epoch.

    Raises ValueError for anything else (no offset, not a date, out of range).
    """
    if not isinstance(text, str) or len(text) > 40:
        raise ValueError("not an RFC 3339 timestamp")
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None or "T" not in text.upper():
        raise ValueError("an RFC 3339 timestamp needs a date, a time and an offset (Z or +hh:mm)")
    delta = moment - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if micros < 0:
        raise ValueError("timestamps before 1970 are not supported")
    return micros
