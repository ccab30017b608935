"""Counters the server keeps about itself, reported by the stats op and the metrics endpoint."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

# The outcome of a request answered successfully; error replies are counted under their error code.
OK_OUTCOME = "ok"
# The op label of replies to lines whose op was not one of the command table (bad JSON, unknown
# op, too long, refused connections, timeouts): one label, so a client cannot grow the counters.
UNKNOWN_OP = "unknown"


class ServerStats:
    """Request, reply and connection counters; updated on the event loop only."""

    __slots__ = (
        "connections_open",
        "connections_refused",
        "connections_total",
        "errors",
        "observe_latency",
        "outcomes",
        "requests",
        "started",
    )

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests: collections.Counter[str] = collections.Counter()  # by op of the command table
        self.errors: collections.Counter[str] = collections.Counter()  # by error code
        # Replies by (op of the command table or UNKNOWN_OP, error code or OK_OUTCOME): bounded by
        # the command table times the error codes.
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.connections_open = 0
        self.connections_total = 0
        self.connections_refused = 0
        # Told (op, seconds from request line to reply) for each request of a known op, when
        # something (the server's metrics) wants latencies; None costs the hot path nothing.
        self.observe_latency: Callable[[str, float], None] | None = None

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started

    def count_reply(self, op: str | None, code: str | None) -> None:
        """Count one reply: op None when the line's op was not in the command table, code None for ok."""
        if code is not None:
            self.errors[code] += 1
        self.outcomes[op or UNKNOWN_OP, code or OK_OUTCOME] += 1
