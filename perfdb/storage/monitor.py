"""The alert monitor: a background task that has the series which received records analysed for change points,
one pass at a time on the store's reader threads, never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from perfdb.storage.store import ResultStore

log = logging.getLogger("perfdb.alerts")

# Seconds between passes at most once per this: under a steady stream of records a pass takes every series
# written meanwhile at once, instead of re-analysing a series for each of its records.
DEFAULT_PASS_INTERVAL = 0.5
# Series analysed per pass at most (more are left dirty for the next): bounds one pass to about a second.
SERIES_PER_PASS = 256


class AlertMonitor:
    """Wakes when the writer commits records of some series; `on_alert` hears each new alert (on the loop)."""

    def __init__(
        self,
        store: ResultStore,
        *,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        pass_interval: float = DEFAULT_PASS_INTERVAL,
    ) -> None:
        self._store = store
        self._on_alert = on_alert
        self._pass_interval = pass_interval
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self.passes = 0  # analysis passes finished (tests wait on it)
        self.passed = asyncio.Condition()

    def start(self) -> None:
        self._store.detector.dirty_listener = self._wake_from_thread
        self._task = self._loop.create_task(self._run(), name="perfdb-alerts")

    async def stop(self) -> None:
        self._store.detector.dirty_listener = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for_pass(self, after: int) -> None:
        """Until more than `after` passes have finished (for tests and tools that wait on the analysis)."""
        async with self.passed:
            await self.passed.wait_for(lambda: self.passes > after)

    def _wake_from_thread(self) -> None:
        """Called on the verdict thread after a batch that made series dirty."""
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        # scipy, which the analysis imports on first use, was loaded before the server listened (Server.start).
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = self._loop.time()
            keys = self._store.detector.take_dirty(SERIES_PER_PASS)
            if self._store.detector.dirty_count:
                self._wake.set()  # more than one pass's worth: carry on after the pause
            if keys:
                try:
                    created = await self._store.analyse_series(keys)
                except Exception:
                    log.exception("change-point pass over %d series failed", len(keys))
                    created = []
                for alert in created:
                    log.info(
                        "alert %s: %s/%s/%s %s changed %.1f %% at record %s",
                        alert["alert_id"], alert["user_id"], alert["test_name"], alert["tag"], alert["metric"],
                        alert["change_percent"] or 0.0, alert["record_id"],
                    )  # fmt: skip
                    if self._on_alert is not None:
                        self._on_alert(alert)
            self.passes += 1
            async with self.passed:
                self.passed.notify_all()
            # The analysis shares the interpreter with ingest: pause at least four times as long as the pass
            # took, so it takes at most a fifth of one core however many series are dirty.
            await asyncio.sleep(max(self._pass_interval, 4 * (self._loop.time() - started)))
