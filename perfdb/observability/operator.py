"""The server's operator endpoints: its metrics, health and readiness on one HTTP listener."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from perfdb.auth.tokens import TokenResolver
from perfdb.commands.stats import ServerStats
from perfdb.observability.http import OperatorEndpoints
from perfdb.observability.metrics import ServerMetrics
from perfdb.storage import ResultStore


def readiness_problem(store: ResultStore, *, shutting_down: bool) -> str | None:
    """Why the server should not be sent work now, or None when it is ready."""
    if shutting_down:
        return "the server is shutting down"
    if not store.is_open:
        return "the database is not open"
    writer = store.writer
    if not writer.running:
        return "the writer thread has stopped"
    if not writer.healthy:
        # Nothing is written while the server is reported unready, so probing drives recovery.
        writer.request_heal()
        return "the last write failed and LevelDB has not accepted a write since"
    return None


async def start_operator_endpoints(
    host: str,
    port: int,
    *,
    stats: ServerStats,
    store: ResultStore,
    resolver: TokenResolver,
    ops: Sequence[str],
    shutting_down: Callable[[], bool],
) -> OperatorEndpoints:
    """Start measuring (hooks into the stats and the writer) and serve /metrics, /healthz and
    /readyz on host:port. Raises OSError when the address cannot be bound."""
    metrics = ServerMetrics(stats, store, resolver, ops)
    endpoints = OperatorEndpoints(metrics.exposition, lambda: readiness_problem(store, shutting_down=shutting_down()))
    await endpoints.start(host, port)
    stats.observe_latency = metrics.observe_request
    store.writer.commit_observer = metrics.observe_commit
    return endpoints
