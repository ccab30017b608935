"""Server wiring: builds the services, listens, tracks connections, and shuts down in order."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from perfdb import __version__
from perfdb.auth.tokens import TokenResolver, load_key, load_static_tokens
from perfdb.commands.dispatcher import CommandDispatcher
from perfdb.commands.stats import ServerStats
from perfdb.commands.webhook import AlertWebhook
from perfdb.config import Config, ConfigError, config_from_args
from perfdb.observability.http import OperatorEndpoints
from perfdb.observability.operator import start_operator_endpoints
from perfdb.protocol.addresses import format_address, parse_address
from perfdb.protocol.connection import ConnectionLimits, LineProtocol
from perfdb.regression.significance import preload_scipy
from perfdb.regression.thresholds import DEFAULT_MODEL, ThresholdConfig, ThresholdModel, load_threshold_config
from perfdb.runtime import LoopUnavailableError, configure_logging, freeze_startup_objects, run_event_loop
from perfdb.storage import ResultStore, StoreOpenError
from perfdb.storage.detection import RegressionDetector
from perfdb.storage.monitor import AlertMonitor
from perfdb.web.supervisor import (
    DashboardAddressError,
    DashboardSupervisor,
    dashboard_command,
    reserve_listen_address,
)

log = logging.getLogger("perfdb.server")

_MAX_BACKLOG = 1024  # the listen backlog: the most connections the kernel can be holding
_SWEEP_INTERVAL = 1.0  # seconds between deadline checks; timeouts are enforced to within this
_CLOSE_LINGER = 2.0  # how long a client has to close after our end-of-stream, at most


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer with the given certificate; raises ValueError for the operator."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS certificate {cert} and key {key}: {exc}") from None
    return context


def threshold_config(config: Config) -> ThresholdConfig:
    """The verdict model from the options, with --regression-config's overrides; raises ValueError (one line)."""
    base = ThresholdModel(
        window=config.regression_window,
        min_points=min(DEFAULT_MODEL.min_points, config.regression_window),
        sigmas=config.regression_sigmas,
        min_change=config.regression_min_change,
    )
    if config.regression_config is None:
        return ThresholdConfig(base)
    return load_threshold_config(config.regression_config, base)


class StartupError(Exception):
    """The server cannot start; the message is one line for the operator."""


def build_store(config: Config) -> ResultStore:
    """The store the settings describe (not yet open)."""
    return ResultStore(
        config.database,
        sync=config.sync,
        max_batch=config.max_batch_records,
        paranoid_checks=config.paranoid_checks,
        max_sort_examined=config.max_sort_examined,
        series_cache_bytes=config.series_cache_mb * 1024 * 1024,
        upgrade_batch=config.upgrade_batch_records,
        upgrade_pause=config.upgrade_pause,
        # The thresholds from --regression-config are read at start (off the event loop).
        detector=RegressionDetector(
            ThresholdConfig(), config.regression_max_series, enabled=config.regression_detection
        ),
    )


def connection_limits(config: Config) -> ConnectionLimits:
    """Each client connection's limits, from the settings."""
    return ConnectionLimits(
        max_line_bytes=config.max_line_bytes,
        max_inflight=config.max_inflight,
        idle_timeout=config.idle_timeout,
        line_timeout=config.line_timeout,
        write_timeout=config.write_timeout,
        # A client has this long to close after our end-of-stream, within the shutdown's bound.
        linger=min(_CLOSE_LINGER, config.shutdown_timeout),
    )


class PerfdbServer:
    """One perfdb server: storage, token resolution, commands and the TCP listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = ServerStats()
        self.store = build_store(config)
        self.resolver: TokenResolver | None = None
        self.dispatcher: CommandDispatcher | None = None
        self._listener: asyncio.Server | None = None
        self._connections: set[LineProtocol] = set()
        self._all_closed = asyncio.Event()
        self._shutdown_started = False
        self._sweeper: asyncio.Task[None] | None = None
        self._new_connection: Callable[[], LineProtocol] | None = None
        self._tls: ssl.SSLContext | None = None
        self.operator_endpoints: OperatorEndpoints | None = None  # --metrics-address
        self.alert_monitor: AlertMonitor | None = None
        self.webhook: AlertWebhook | None = None  # --alert-webhook

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, start the resolver and listen. Raises StartupError."""
        loop = asyncio.get_running_loop()
        config = self.config
        static_tokens = {}
        admin_key = read_key = None
        tls = None
        try:
            if config.tokens_file is not None:
                static_tokens = await loop.run_in_executor(None, load_static_tokens, config.tokens_file)
            if config.admin_key_file is not None:
                admin_key = await loop.run_in_executor(None, load_key, config.admin_key_file, "admin key")
            if config.read_key_file is not None:
                read_key = await loop.run_in_executor(None, load_key, config.read_key_file, "read key")
            if config.tls_cert is not None and config.tls_key is not None:
                tls = await loop.run_in_executor(None, server_tls_context, config.tls_cert, config.tls_key)
            self.store.detector.thresholds = await loop.run_in_executor(None, threshold_config, config)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        # Detection's lazy imports (scipy: about a second of CPU) load beside the database's opening and before the
        # listener opens, not on the executor while the first records arrive (and are frozen out of the collector).
        preloading = loop.run_in_executor(None, preload_scipy) if config.regression_detection else None
        try:
            await loop.run_in_executor(None, self.store.open, loop)
        except StoreOpenError as exc:
            raise StartupError(str(exc)) from None
        finally:
            if preloading is not None:
                await preloading
        if config.userinfo_url is None and not static_tokens:
            log.warning("no identity provider and no static tokens: every record request will be refused")
        self.resolver = TokenResolver(
            userinfo_url=config.userinfo_url,
            static_tokens=static_tokens,
            cache_ttl=config.token_cache_ttl,
            negative_ttl=config.token_negative_ttl,
            cache_size=config.token_cache_size,
            timeout=config.auth_timeout,
            max_connections=config.auth_max_connections,
        )
        await self.resolver.start()
        self.dispatcher = CommandDispatcher(
            config, self.store, self.resolver, self.stats, admin_key=admin_key, read_key=read_key
        )
        dispatcher = self.dispatcher
        if config.regression_detection:
            if config.alert_webhook is not None:
                self.webhook = AlertWebhook(config.alert_webhook)
                await self.webhook.start()
            self.alert_monitor = AlertMonitor(self.store, on_alert=None if self.webhook is None else self.webhook.post)
            self.alert_monitor.start()
        if config.metrics_address is not None:
            await self._start_operator_endpoints(config.metrics_address)
        limits = connection_limits(config)
        self._new_connection = lambda: LineProtocol(dispatcher, self, limits)
        self._tls = tls
        try:
            self._listener = await loop.create_server(
                self._new_connection,
                config.host,
                config.port,
                backlog=_MAX_BACKLOG,
                ssl=tls,
                ssl_handshake_timeout=config.tls_handshake_timeout if tls else None,
            )
        except OSError as exc:
            await self._close_services()
            raise StartupError(_listen_error(config.address, config.host, exc)) from None
        self._sweeper = loop.create_task(self._sweep_deadlines(), name="perfdb-deadlines")
        log.info(
            "perfdb %s listening on %s (database %s, %s)",
            __version__,
            self.address,
            config.database,
            "sync commits" if config.sync else "no-sync commits",
        )

    async def _start_operator_endpoints(self, address: str) -> None:
        assert self.resolver is not None and self.dispatcher is not None
        host, port = parse_address(address)
        try:
            self.operator_endpoints = await start_operator_endpoints(
                host,
                port,
                stats=self.stats,
                store=self.store,
                resolver=self.resolver,
                ops=self.dispatcher.ops,
                shutting_down=lambda: self._shutdown_started,
            )
        except OSError as exc:
            await self._close_services()
            raise StartupError(f"--metrics-address: {_listen_error(address, host, exc)}") from None
        log.info("metrics served at http://%s/metrics (and /healthz, /readyz)", self.operator_endpoints.address)

    @property
    def address(self) -> str:
        """The bound address, with the real port when the configured one was 0."""
        assert self._listener is not None
        host, port = self._listener.sockets[0].getsockname()[:2]
        return format_address(host, port)

    @property
    def port(self) -> int:
        assert self._listener is not None
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    # -- ConnectionTracker ----------------------------------------------------------------

    def connection_opened(self, connection: LineProtocol) -> bool:
        if len(self._connections) >= self.config.max_connections:
            self.stats.connections_refused += 1
            return False
        self._connections.add(connection)
        self.stats.connections_open = len(self._connections)
        self.stats.connections_total += 1
        if self._shutdown_started:
            connection.begin_shutdown()  # accepted just before the listener closed
        return True

    def connection_closed(self, connection: LineProtocol) -> None:
        self._connections.discard(connection)
        self.stats.connections_open = len(self._connections)
        if not self._connections:
            self._all_closed.set()

    async def _sweep_deadlines(self) -> None:
        """Once a second, let each connection enforce its idle, line and write timeouts."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = loop.time()
            for connection in list(self._connections):
                connection.check_deadlines(now)

    # -- shutdown -------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, answer what was received, commit, and close everything, in that order."""
        if self._shutdown_started:
            return
        self._shutdown_started = True
        log.info("shutting down: %d connection(s) open", len(self._connections))
        if self._listener is not None:
            await self._take_up_backlog()
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.dispatcher is not None:
            self.dispatcher.draining = True
        for connection in list(self._connections):
            connection.begin_shutdown()
        if self._connections:
            self._all_closed.clear()
            try:
                await asyncio.wait_for(self._all_closed.wait(), self.config.shutdown_timeout)
            except TimeoutError:
                log.warning(
                    "%d connection(s) still busy after %.1fs; closing them",
                    len(self._connections),
                    self.config.shutdown_timeout,
                )
                for connection in list(self._connections):
                    connection.abort()
        await self._close_services()
        log.info("shut down cleanly")

    async def _take_up_backlog(self) -> None:
        """Accept the connections the kernel has completed but the loop has not yet taken up.

        Closing a listener resets those, so a client whose requests arrived before the signal
        would see a reset instead of its replies; taken up here, they are answered (or told
        shutting_down) like every other open connection.
        """
        assert self._listener is not None and self._new_connection is not None
        loop = asyncio.get_running_loop()
        new_connection = self._new_connection
        waiting: list[socket.socket] = []
        for listening in self._listener.sockets:
            # A duplicate of the listening descriptor: accepting on it takes from the same queue.
            with socket.fromfd(listening.fileno(), listening.family, listening.type) as queue:
                while len(waiting) < _MAX_BACKLOG:
                    try:
                        connection, _ = queue.accept()
                    except OSError:  # BlockingIOError: the queue is empty
                        break
                    waiting.append(connection)
        if not waiting:
            return
        log.info("taking up %d connection(s) that were waiting to be accepted", len(waiting))
        handshake_timeout = self.config.tls_handshake_timeout if self._tls else None
        outcomes = await asyncio.gather(
            *(
                loop.connect_accepted_socket(
                    new_connection, connection, ssl=self._tls, ssl_handshake_timeout=handshake_timeout
                )
                for connection in waiting
            ),
            return_exceptions=True,
        )
        for connection, outcome in zip(waiting, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                connection.close()

    async def _close_services(self) -> None:
        loop = asyncio.get_running_loop()
        if self.alert_monitor is not None:
            await self.alert_monitor.stop()
        # Flushes the last write batch and stops the writer thread before LevelDB closes.
        await loop.run_in_executor(None, self.store.close)
        if self.resolver is not None:
            await self.resolver.close()
        # Last, so /readyz answers 503 for as long as the shutdown lasts.
        if self.operator_endpoints is not None:
            await self.operator_endpoints.close()
        if self.webhook is not None:
            await self.webhook.close()


def _listen_error(address: str, host: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {address}: address already in use"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {address}: unknown host {host!r}"
    return f"cannot listen on {address}: {exc.strerror or exc}"


async def serve(config: Config) -> None:
    """Run a server (and its dashboard) until SIGTERM or SIGINT, then shut it down cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server = PerfdbServer(config)
    dashboard: DashboardSupervisor | None = None
    # Handlers first: a signal that arrives while starting must still shut down cleanly.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        web_listen = await _reserve_web_address(config)
        await server.start()
        freeze_startup_objects()
        if web_listen is not None:
            command = dashboard_command(config, server.port, web_listen)
            dashboard = DashboardSupervisor(command, web_listen, config.shutdown_timeout)
            dashboard.start()
        await stop.wait()
        await asyncio.gather(server.shutdown(), *([dashboard.stop()] if dashboard is not None else []))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _reserve_web_address(config: Config) -> str | None:
    """Where the dashboard will listen, checked before anything starts so a taken port fails in one line."""
    if config.web_address is None:
        return None
    try:
        return await reserve_listen_address(config.web_address)
    except DashboardAddressError as exc:
        raise StartupError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of run_perf_db_server, python -m perfdb and run_perf_db_server.py."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"run_perf_db_server: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        run_event_loop(serve(config), config.loop)
    except (StartupError, LoopUnavailableError) as exc:
        print(f"run_perf_db_server: error: {exc}", file=sys.stderr)
        return 1
    return 0
