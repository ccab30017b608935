"""Process set-up shared by perfdb's programs (server, dashboard): logging and the event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from perfdb.observability.logformat import log_formatter


class LoopUnavailableError(RuntimeError):
    """The event loop asked for cannot be had (uvloop not installed)."""


def configure_logging(level: str, log_format: str = "text") -> None:
    """Logs go to stderr, one line each: text with the logger's name, or a JSON object."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def run_event_loop(main: Coroutine[Any, Any, None], loop_choice: str = "auto") -> None:
    """Run a coroutine on uvloop when available ("auto") or required ("uvloop"), else asyncio."""
    if loop_choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop_choice == "uvloop":
                main.close()
                raise LoopUnavailableError("--loop=uvloop was requested but uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def freeze_startup_objects() -> None:
    """Move everything alive once the program has started (modules, the overview and verdict
    windows rebuilt from the store, caches) out of the garbage collector's reach: a full
    collection would otherwise walk all of it again and again while requests allocate. Profiled
    under saturated ingest, collections were 16% of the event loop's samples before this.
    (No collection first: it would pause the loop once for all that, to free little.)"""
    gc.freeze()
