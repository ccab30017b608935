"""Every server setting in one place, and the command line that fills it in."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import typing
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from perfdb import __version__

GOOGLE_USERINFO_URL = "https://openidconnect.googleapis.com/v1/userinfo"
DEFAULT_ADDRESS = "localhost:50052"
DEFAULT_DATABASE = "./perfdb-data"


class ConfigError(ValueError):
    """A setting that cannot work; reported as one line before the server starts."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Server settings; the defaults are the documented ones."""

    # Network
    host: str = "localhost"
    port: int = 50052
    # Storage
    database: Path = Path(DEFAULT_DATABASE)
    sync: bool = True
    paranoid_checks: bool = False
    max_batch_records: int = 4096
    # Wire limits
    max_line_bytes: int = 1024 * 1024
    max_inflight: int = 1024
    default_page_size: int = 1000
    max_page_size: int = 5000
    max_connections: int = 1000
    idle_timeout: float = 300.0
    line_timeout: float = 30.0
    write_timeout: float = 30.0
    # TLS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_handshake_timeout: float = 10.0
    # Write rate limit per user (records per second, and burst); 0 turns it off
    user_rate: float = 1000.0
    user_burst: int = 20_000
    # Token resolution
    userinfo_url: str = GOOGLE_USERINFO_URL
    tokens_file: Path | None = None
    token_cache_ttl: float = 300.0
    token_negative_ttl: float = 10.0
    token_cache_size: int = 100_000
    auth_timeout: float = 5.0
    auth_max_connections: int = 32
    # Privacy and access
    expose_emails: bool = False
    admin_key_file: Path | None = None
    read_key_file: Path | None = None
    # Lifecycle and runtime
    shutdown_timeout: float = 10.0
    loop: str = "auto"
    log_level: str = "info"

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


def parse_address(text: str) -> tuple[str, int]:
    """Split "hostname:port" (or "[v6]:port") into host and port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--address must be hostname:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--address port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--address port must be 0-65535, got {port}")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_userinfo_url(url: str) -> None:
    """Tokens travel to this URL, so it must be https unless the provider is on this machine."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--userinfo-url must be an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError("--userinfo-url must use https (plain http is allowed only for loopback hosts)")
    if parts.username or parts.password:
        raise ConfigError("--userinfo-url must not carry credentials")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """Command-line mistakes are one line on stderr (and exit 2), like every other start-up failure."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = OneLineErrorParser(
        prog="run_perf_db_server",
        description=(
            "perfdb server: stores gRPC-style benchmark results in LevelDB and serves them "
            "over newline-delimited JSON on TCP (see protocol_spec.md)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"perfdb {__version__}")
    net = parser.add_argument_group("network")
    net.add_argument("--address", default=DEFAULT_ADDRESS, help="hostname:port to listen on (port 0 picks a free one)")
    net.add_argument(
        "--max-line-bytes",
        type=positive_int,
        default=defaults.max_line_bytes,
        help="longest request line accepted, newline excluded",
    )
    net.add_argument(
        "--max-inflight",
        type=positive_int,
        default=defaults.max_inflight,
        help="pipelined requests per connection before reading pauses (resumes at half)",
    )
    net.add_argument(
        "--max-page-size",
        type=positive_int,
        default=defaults.max_page_size,
        help="largest 'limit' accepted by get_user/get_all",
    )
    net.add_argument(
        "--max-connections",
        type=positive_int,
        default=defaults.max_connections,
        help="connections served at once; more are sent an 'overloaded' error and closed",
    )
    net.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=defaults.idle_timeout,
        help="seconds a connection may sit with no request and nothing owed before it is closed",
    )
    net.add_argument(
        "--line-timeout",
        type=positive_float,
        default=defaults.line_timeout,
        help="seconds a started request line has to arrive in full (defeats slow-drip clients)",
    )
    net.add_argument(
        "--write-timeout",
        type=positive_float,
        default=defaults.write_timeout,
        help="seconds a client may leave its replies unread (our send buffer full) before it is dropped",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls-cert", default=None, help="PEM certificate chain; with --tls-key, serve TLS 1.2+ only")
    tls.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    tls.add_argument(
        "--tls-handshake-timeout",
        type=positive_float,
        default=defaults.tls_handshake_timeout,
        help="seconds allowed for a TLS handshake",
    )
    store = parser.add_argument_group("storage")
    store.add_argument("--database", default=DEFAULT_DATABASE, help="LevelDB directory (created if missing)")
    store.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="acknowledge a write once LevelDB has it, without fsync: survives a process "
        "crash but not a power loss or kernel crash",
    )
    store.add_argument(
        "--paranoid-checks",
        action="store_true",
        help="have LevelDB verify checksums aggressively and stop at the first sign of damage "
        "(see 'perfdb repair' in the README)",
    )
    store.add_argument(
        "--max-batch-records",
        type=positive_int,
        default=defaults.max_batch_records,
        help="most records committed in one group-commit write batch",
    )
    auth = parser.add_argument_group("authentication")
    auth.add_argument(
        "--userinfo-url",
        default=defaults.userinfo_url,
        help="OIDC userinfo endpoint that resolves access tokens (https, or http on loopback)",
    )
    auth.add_argument(
        "--tokens-file", default=None, help="JSON file of static tokens (SHA-256 hashes) for CI bots; see README"
    )
    auth.add_argument(
        "--token-cache-ttl",
        type=positive_float,
        default=defaults.token_cache_ttl,
        help="seconds a resolved token stays cached",
    )
    auth.add_argument(
        "--token-negative-ttl",
        type=positive_float,
        default=defaults.token_negative_ttl,
        help="seconds a token the provider rejected stays rejected without asking again",
    )
    auth.add_argument(
        "--token-cache-size",
        type=positive_int,
        default=defaults.token_cache_size,
        help="most tokens kept in the cache",
    )
    auth.add_argument(
        "--auth-timeout",
        type=positive_float,
        default=defaults.auth_timeout,
        help="seconds allowed for one userinfo request, connect included",
    )
    auth.add_argument(
        "--auth-max-connections",
        type=positive_int,
        default=defaults.auth_max_connections,
        help="most simultaneous connections to the userinfo endpoint",
    )
    privacy = parser.add_argument_group("privacy and access")
    privacy.add_argument("--expose-emails", action="store_true", help="include e-mail addresses in public profiles")
    privacy.add_argument(
        "--read-key-file",
        default=None,
        help="file holding a key (16+ characters) that get_user, get_all and stats must present; "
        "without it reads are open to anyone who can connect",
    )
    privacy.add_argument(
        "--user-rate",
        type=float,
        default=defaults.user_rate,
        help="records per second one user may store, sustained (0: no limit); over it: 'overloaded'",
    )
    privacy.add_argument(
        "--user-burst",
        type=positive_int,
        default=defaults.user_burst,
        help="records one user may store at once above --user-rate before it applies",
    )
    privacy.add_argument(
        "--admin-key-file",
        default=None,
        help="file holding the admin key (16+ characters) that export and import must present; "
        "without it those ops are refused",
    )
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--shutdown-timeout",
        type=positive_float,
        default=defaults.shutdown_timeout,
        help="seconds to finish in-flight requests on SIGTERM/SIGINT before closing connections",
    )
    runtime.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default=defaults.loop,
        help="event loop: uvloop when importable (auto), or force one",
    )
    runtime.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=defaults.log_level,
        help="logging threshold (logs go to stderr)",
    )
    return parser


_PATH_SETTINGS = ("database", "tokens_file", "admin_key_file", "read_key_file", "tls_cert", "tls_key")


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    """Parse the command line; raises ConfigError for settings that cannot work."""
    values = vars(build_parser().parse_args(argv))
    host, port = parse_address(values.pop("address"))
    check_userinfo_url(values["userinfo_url"])
    for name in _PATH_SETTINGS:
        if values[name] is not None:
            values[name] = Path(values[name])
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not (math.isfinite(values["user_rate"]) and values["user_rate"] >= 0):
        raise ConfigError("--user-rate must be 0 (no limit) or a positive number")
    values["default_page_size"] = min(Config().default_page_size, values["max_page_size"])
    return Config(host=host, port=port, **values)
