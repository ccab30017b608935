"""perfdb-web: settings, the aiohttp application and the command line that starts it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from isal import isal_zlib

from perfdb import __version__
from perfdb.client import tls_context
from perfdb.config import (
    DEFAULT_ADDRESS,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    positive_float,
)
from perfdb.observability.http import HttpRequestMetrics, metrics_handler, process_registry
from perfdb.protocol.addresses import AddressError, format_address, parse_address
from perfdb.runtime import configure_logging, run_event_loop
from perfdb.web import handlers, pages
from perfdb.web.assets import BUNDLE_PREFIX, STATIC_DIR, asset_urls, build_bundles, bundle_handler
from perfdb.web.source import PerfdbError, ResultSource

DEFAULT_LISTEN = "localhost:8080"
log = logging.getLogger("perfdb.web")


@dataclasses.dataclass(frozen=True, slots=True)
class WebConfig:
    """Every dashboard setting; the defaults are the documented ones."""

    server: str = DEFAULT_ADDRESS  # the perfdb server, host:port
    listen: str = DEFAULT_LISTEN  # where the dashboard serves HTTP
    read_key: str | None = None  # sent with every read when the server requires one
    tls: bool = False
    ca_file: str | None = None
    timeout: float = 10.0  # seconds to wait for one perfdb reply
    connect_timeout: float = 2.0
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = DEFAULT_LOG_FORMAT  # or "json": one object per line


def build_app(config: WebConfig) -> web.Application:
    """The dashboard as an aiohttp application; perfdb is connected to on first use."""
    parse_address(config.server)  # fail now, not on the first page
    # Replies are compressed with ISA-L's zlib (process-wide: aiohttp has one backend): a user
    # page's chart data (465 kB of JSON) takes 1.2 ms of CPU at about the size zlib's default
    # level gives in 23 ms.
    aiohttp.set_zlib_backend(isal_zlib)
    registry = process_registry()
    request_metrics = HttpRequestMetrics(registry, "perfdb_web")
    # Outermost, so it counts the status the error pages settle on.
    app = web.Application(middlewares=[request_metrics.middleware, handlers.error_pages])
    source = ResultSource(
        config.server,
        read_key=config.read_key,
        ssl_context=tls_context(config.ca_file) if config.tls or config.ca_file else None,
        connect_timeout=min(config.connect_timeout, config.timeout),
        request_timeout=config.timeout,
    )
    bundles = build_bundles()
    app[handlers.DASHBOARD] = handlers.Dashboard(
        source=source,
        # A bundle stands in for the file of its name in the pages.
        site=pages.Site(
            server_address=config.server, assets={**asset_urls(), **{name: b.url for name, b in bundles.items()}}
        ),
    )
    handlers.add_routes(app)
    app.router.add_get("/metrics", metrics_handler(registry), name="metrics")
    # Before the static files, whose prefix it shares.
    app.router.add_get(BUNDLE_PREFIX + "{name}", bundle_handler(bundles), name="bundle")
    app.router.add_static("/static", STATIC_DIR, name="static")
    app.on_response_prepare.append(handlers.add_headers)
    app.cleanup_ctx.append(_close_source)
    return app


async def _close_source(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[handlers.DASHBOARD].source.close()


# -- the command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfdb-web",
        description="The perfdb dashboard: a web server that shows the results stored in a perfdb server.",
        epilog="Open http://LISTEN/ in a browser. The dashboard keeps working when perfdb restarts: "
        "pages show a retry hint while perfdb is down. Prometheus metrics are at http://LISTEN/metrics.",
    )
    parser.add_argument("--version", action="version", version=f"perfdb-web {__version__}")
    parser.add_argument(
        "--server",
        default=os.environ.get("PERFDB_SERVER", DEFAULT_ADDRESS),
        help="perfdb server host:port to read from (default: $PERFDB_SERVER or %(default)s)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help="host:port to serve the dashboard on; port 0 picks a free port, which is logged (default: %(default)s)",
    )
    parser.add_argument(
        "--read-key-file",
        help="file holding the perfdb server's read key, if it requires one (else $PERFDB_READ_KEY)",
    )
    parser.add_argument("--tls", action="store_true", help="connect to perfdb with TLS, verifying its certificate")
    parser.add_argument("--ca-file", help="CA bundle to verify the perfdb server's certificate with (implies --tls)")
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds to wait for each perfdb reply; connecting waits at most 2 s (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=DEFAULT_LOG_LEVEL,
        help="logs go to stderr (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=DEFAULT_LOG_FORMAT,
        help="log lines as text, or as one JSON object each (time, level, logger, message, exception) "
        "(default: %(default)s)",
    )
    return parser


def read_key_from(path: str | None) -> str | None:
    """The read key from its file, else $PERFDB_READ_KEY, else None (the server has none)."""
    if path is None:
        key = os.environ.get("PERFDB_READ_KEY", "").strip()
        return key or None
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --read-key-file {path}: {exc.strerror or exc}") from None
    if not key:
        raise ConfigError(f"--read-key-file {path} is empty")
    return key


def config_from_args(argv: Sequence[str] | None = None) -> WebConfig:
    args = build_parser().parse_args(argv)
    for option, value in (("--server", args.server), ("--listen", args.listen)):
        try:
            parse_address(value)
        except AddressError as exc:
            raise ConfigError(f"{option} {exc}") from None
    return WebConfig(
        server=args.server,
        listen=args.listen,
        read_key=read_key_from(args.read_key_file),
        tls=args.tls,
        ca_file=args.ca_file,
        timeout=args.timeout,
        log_level=args.log_level,
        log_format=args.log_format,
    )


async def serve(config: WebConfig) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and close."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = build_app(config)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    try:
        host, port = parse_address(config.listen)
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
        for address in runner.addresses:
            log.info("perfdb-web listening on http://%s/ (perfdb at %s)", format_address(*address[:2]), config.server)
            log.info("metrics served at http://%s/metrics", format_address(*address[:2]))
        await _check_perfdb(app)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _check_perfdb(app: web.Application) -> None:
    """Say at start-up whether perfdb answers; the dashboard starts either way."""
    try:
        hello = await app[handlers.DASHBOARD].source.hello()
    except PerfdbError as exc:
        log.warning("%s Pages will show this until it answers.", exc.message)
    else:
        log.info("perfdb %s answers at %s", hello.get("version"), app[handlers.DASHBOARD].source.address)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the perfdb-web console script and `python -m perfdb.web`."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"perfdb-web: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        run_event_loop(serve(config))
    except ConfigError as exc:
        print(f"perfdb-web: error: {exc}", file=sys.stderr)
        return 1
    except socket.gaierror as exc:
        print(f"perfdb-web: error: cannot listen on {config.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
