"""The dashboard as a child of the server (--web-address): started once the server listens,
restarted with backoff when it dies, stopped with the server.

The child is `python -m perfdb.web`, the same program an operator runs to read a remote server,
so the dashboard never shares the server's event loop: a slow page cannot delay a write. Nothing
here imports aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import site
import socket
import sys
from pathlib import Path

import perfdb
from perfdb.config import Config
from perfdb.protocol.addresses import format_address, parse_address

log = logging.getLogger("perfdb.dashboard")

FIRST_RESTART_DELAY = 0.5  # seconds before the first restart; doubled after each quick death
MAX_RESTART_DELAY = 30.0
# A child that ran this long before dying was healthy: its next restart waits FIRST_RESTART_DELAY again.
HEALTHY_RUN_SECONDS = 60.0
STDERR_FILENO = 2
PACKAGE_ROOT = Path(perfdb.__file__).resolve().parent.parent
# Tells `python -m perfdb.web` which server started it, so it can stop when that server dies.
PARENT_PID_VARIABLE = "PERFDB_WEB_PARENT_PID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class DashboardAddressError(Exception):
    """The dashboard's address cannot be listened on; the message is one line for the operator."""


async def reserve_listen_address(address: str) -> str:
    """Check that `address` can be listened on (as the dashboard will: SO_REUSEADDR, every address
    the host resolves to) and return it with port 0 replaced by the free port found.

    The port is released again for the child; a fixed one is what the operator chose, and one
    picked for port 0 stays the dashboard's across restarts.
    """
    host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    try:
        probe = await loop.create_server(asyncio.Protocol, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif isinstance(exc, socket.gaierror):
            reason = f"unknown host {host!r}"
        else:
            reason = exc.strerror or str(exc)
        raise DashboardAddressError(f"cannot listen on --web-address {address}: {reason}") from None
    try:
        if port != 0:
            return address
        bound_host, bound_port = probe.sockets[0].getsockname()[:2]
        return format_address(bound_host, bound_port)
    finally:
        probe.close()
        await probe.wait_closed()


def connect_host(listen_host: str) -> str:
    """The host a local client reaches a server listening on `listen_host` by: the same name (so
    a TLS certificate's name matches), or loopback for a wildcard address."""
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:
        return listen_host
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return listen_host


def dashboard_command(config: Config, server_port: int, listen: str) -> list[str]:
    """The child's command line: this interpreter running perfdb.web against this server."""
    command = [
        sys.executable,
        "-m",
        "perfdb.web",
        "--server",
        format_address(connect_host(config.host), server_port),
        "--listen",
        listen,
        "--log-level",
        config.log_level,
        "--log-format",
        config.log_format,
    ]
    if config.read_key_file is not None:
        command += ["--read-key-file", str(config.read_key_file)]
    if config.tls_cert is not None:
        command += ["--tls", "--ca-file", str(config.web_ca_file or config.tls_cert)]
    return command


def child_environment() -> dict[str, str]:
    """This environment, plus perfdb's folder on PYTHONPATH when perfdb did not come from
    site-packages (a checkout run as ./run_perf_db_server.py), so the child runs this same perfdb."""
    environment = dict(os.environ, **{PARENT_PID_VARIABLE: str(os.getpid())})
    if str(PACKAGE_ROOT) not in site.getsitepackages():
        paths = [str(PACKAGE_ROOT), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
        environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def stop_with_parent() -> None:
    """In the dashboard child: have Linux send it SIGTERM when the server that started it dies, so
    even a server killed with SIGKILL leaves no dashboard behind holding its port."""
    parent = os.environ.pop(PARENT_PID_VARIABLE, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes  # here, not at the top: only the child needs it, and the server starts faster without

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the server: %s", os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != int(parent):
        raise SystemExit("perfdb-web: error: the server that started it has already exited")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class DashboardSupervisor:
    """Keeps one dashboard child running until stop(); its output goes to the server's stderr."""

    def __init__(self, command: list[str], listen: str, stop_timeout: float) -> None:
        self._command = command
        self._listen = listen
        self._stop_timeout = stop_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The running child's process id."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="perfdb-dashboard")

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = FIRST_RESTART_DELAY
        while not self._stopping:
            started = loop.time()
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *self._command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=STDERR_FILENO,  # stderr is inherited too: one stream of logs
                    env=child_environment(),
                )
            except OSError as exc:
                log.error("cannot start the dashboard (%s); retrying in %.1f s", exc.strerror or exc, delay)
            else:
                log.info("dashboard (pid %d) starting on http://%s/", self._process.pid, self._listen)
                returncode = await self._process.wait()
                if self._stopping:
                    return
                if loop.time() - started >= HEALTHY_RUN_SECONDS:
                    delay = FIRST_RESTART_DELAY
                log.warning(
                    "dashboard (pid %d) %s; restarting it in %.1f s",
                    self._process.pid,
                    describe_exit(returncode),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)

    async def stop(self) -> None:
        """SIGTERM the child, SIGKILL it if it is still there after the stop timeout; no restart."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), self._stop_timeout)
        except TimeoutError:
            log.warning("dashboard (pid %d) still running after SIGTERM; killing it", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        log.info("dashboard (pid %d) stopped", process.pid)
