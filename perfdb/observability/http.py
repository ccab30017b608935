"""Metrics over HTTP with aiohttp: the exposition handler, request metrics for an aiohttp
application, and the server's operator listener (/metrics, /healthz, /readyz)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.registry import Collector

from perfdb.protocol.addresses import format_address

# Seconds; from a cached page (a millisecond) to a bulk scan of perfdb (seconds).
HTTP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED_ROUTE = "unmatched"


def process_registry() -> CollectorRegistry:
    """A registry for one perfdb process, with prometheus_client's process and Python metrics."""
    # Without this every counter and histogram also exports a *_created gauge: noise for
    # Prometheus' text format. The setting is global, and these are our processes.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # (unannotated upstream)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


async def render(collector: Collector) -> bytes:
    """The text exposition of everything `collector` yields, rendered on a worker thread: the
    process collector reads /proc, which is file I/O the event loop must not do."""
    return await asyncio.get_running_loop().run_in_executor(None, generate_latest, collector)


def metrics_response(body: bytes) -> web.Response:
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Cache-Control"] = "no-store"
    return response


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve_metrics(_request: web.Request) -> web.Response:
        return metrics_response(await render(registry))

    return serve_metrics


class HttpRequestMetrics:
    """Requests an aiohttp application answered, by route and status, and how long they took.

    The route label is the route's pattern (/users/{user_id}), never the requested path, and
    requests no route matches share one label value, so clients cannot add series at will.
    """

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self._requests = Counter(
            f"{prefix}_http_requests",
            "HTTP requests answered, by route pattern and status code",
            ["route", "code"],
            registry=registry,
        )
        self._seconds = Histogram(
            f"{prefix}_http_request_duration_seconds",
            "Time to answer an HTTP request, by route pattern",
            ["route"],
            buckets=HTTP_SECONDS_BUCKETS,
            registry=registry,
        )

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500  # an exception that escapes every handler becomes aiohttp's 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            route = _route_pattern(request)
            self._requests.labels(route, str(status)).inc()
            self._seconds.labels(route).observe(time.perf_counter() - started)


def _route_pattern(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None or request.match_info.http_exception is not None:
        return UNMATCHED_ROUTE
    return resource.canonical


class OperatorEndpoints:
    """An HTTP listener for operators: /metrics (Prometheus text format), /healthz (the process
    answers: 200) and /readyz (200 when ready for work, else 503 with the reason as JSON)."""

    def __init__(self, exposition: Callable[[], Awaitable[bytes]], readiness_problem: Callable[[], str | None]) -> None:
        self._exposition = exposition
        self._readiness_problem = readiness_problem
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.address = ""

    async def start(self, host: str, port: int) -> None:
        """Listen; raises OSError when the address cannot be bound (the listener is then closed)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.address = format_address(bound_host, bound_port)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        return metrics_response(await self._exposition())

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        problem = self._readiness_problem()
        if problem is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": problem}, status=503)
