"""Counters the server keeps about itself, reported by the stats op."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class ServerStats:
    """Request, error and connection counters; updated on the event loop only."""

    __slots__ = (
        "connections_open",
        "connections_refused",
        "connections_total",
        "errors",
        "observe_latency",
        "requests",
        "started",
    )

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests: collections.Counter[str] = collections.Counter()  # by op
        self.errors: collections.Counter[str] = collections.Counter()  # by error code
        self.connections_open = 0
        self.connections_total = 0
        self.connections_refused = 0
        # Told (op, seconds from request line to reply) for each request of a known op, when
        # something (the server's metrics) wants latencies; None costs the hot path nothing.
        self.observe_latency: Callable[[str, float], None] | None = None

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started
