"""RFC 3339 timestamps on the wire, integer microseconds since the epoch inside."""

from __future__ import annotations

import datetime
import functools
import re
import time

_UTC = datetime.UTC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)


def now_micros() -> int:
    """The current wall-clock time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def format_micros(micros: int) -> str:
    """Format as RFC 3339 UTC with exactly six fractional digits, e.g. 2026-01-02T03:04:05.000006Z."""
    seconds, fraction = divmod(micros, 1_000_000)
    return f"{_second_prefix(seconds)}.{fraction:06d}Z"


@functools.lru_cache(maxsize=64)
def _second_prefix(seconds: int) -> str:
    # Records come in bursts within the same second: format each second once.
    return f"{_EPOCH + datetime.timedelta(seconds=seconds):%Y-%m-%dT%H:%M:%S}"


_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 date-time (offset required) into microseconds since the epoch.

    Fractions beyond microseconds are truncated; a leap second (:60) counts as :59.999999.
    Raises ValueError for anything else.
    """
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError("not an RFC 3339 date-time with an offset, e.g. 2026-01-31T12:00:00Z")
    date, hour, minute, second, fraction, offset = match.groups()
    leap = second == "60"
    micros_text = (fraction or "").ljust(6, "0")[:6]
    moment = datetime.datetime.fromisoformat(
        f"{date}T{hour}:{minute}:{'59' if leap else second}.{'999999' if leap else micros_text}"
        f"{'+00:00' if offset in 'Zz' else offset}"
    )
    delta = moment - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if micros < 0:
        raise ValueError("timestamps before 1970 are not supported")
    return micros
