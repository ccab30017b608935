"""The alert webhook: POSTs each new alert as JSON to --alert-webhook, from a bounded queue, retried with
backoff, on one long-lived session with short timeouts; a slow or failing endpoint never delays ingest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

log = logging.getLogger("perfdb.webhook")

MAX_QUEUED_ALERTS = 1000  # past this, new alerts are dropped (and counted) rather than held without bound
MAX_ATTEMPTS = 8
FIRST_BACKOFF = 0.5  # seconds; doubles after each failure, capped at MAX_BACKOFF
MAX_BACKOFF = 30.0
TIMEOUT = aiohttp.ClientTimeout(total=10.0, connect=3.0)


class AlertWebhook:
    """One sender task that delivers alerts in order; see the module docstring."""

    def __init__(self, url: str, *, first_backoff: float = FIRST_BACKOFF, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.url = url
        self._first_backoff = first_backoff
        self._max_attempts = max_attempts
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED_ALERTS)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.dropped = 0  # queue full, or every attempt failed

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        self._task = asyncio.get_running_loop().create_task(self._send_all(), name="perfdb-webhook")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    def post(self, alert: dict[str, Any]) -> None:
        """Queue the alert for delivery; never waits."""
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("alert webhook queue full; alert %s not posted", alert.get("alert_id"))

    async def _send_all(self) -> None:
        while True:
            alert = await self._queue.get()
            await self._deliver(alert)

    async def _deliver(self, alert: dict[str, Any]) -> None:
        assert self._session is not None
        backoff = self._first_backoff
        for attempt in range(1, self._max_attempts + 1):
            try:
                async with self._session.post(self.url, json=alert) as response:
                    if response.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            log.warning("alert webhook attempt %d for %s failed: %s", attempt, alert.get("alert_id"), problem)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        self.dropped += 1
        log.error("alert %s not posted after %d attempts", alert.get("alert_id"), self._max_attempts)
