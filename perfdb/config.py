"""Every server setting in one place, and the command line that fills it in."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perfdb import __version__
from perfdb.protocol.addresses import AddressError, format_address, is_loopback_host, parse_address

GOOGLE_USERINFO_URL = "https://openidconnect.googleapis.com/v1/userinfo"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 50052
DEFAULT_ADDRESS = format_address(DEFAULT_HOST, DEFAULT_PORT)
DEFAULT_DATABASE = "./perfdb-data"
NO_PROVIDER = "none"  # --userinfo-url value that turns the identity provider off
# --log-level and --log-format, of the server and of the dashboard alike.
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"


class ConfigError(ValueError):
    """A setting that cannot work; reported as one line before the server starts."""


def setting(default: Any, help: str, group: str, **argument: Any) -> Any:
    """A Config field that is also a command-line option.

    `help` and `group` go to --help; `argument` holds what argparse needs beyond what the field's
    default implies: `flag` (default: --field-name), `type`, `choices`, `metavar`, and `text`, the
    default as --help shows it when its str() differs (a Path drops './'). A bool that
    defaults to False becomes a switch; one that defaults to True needs a `flag` such as --no-sync.
    """
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **argument})


def non_negative_float(text: str) -> float:
    """For settings where 0 means something (no pause, no limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Server settings; the defaults are the documented ones. Each is written here once."""

    # The listening address comes from --address, the one setting split in two.
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # Derived from max_page_size, never set on its own.
    default_page_size: int = 1000

    # Network
    max_line_bytes: int = setting(1024 * 1024, "longest request line accepted, newline excluded", "network")
    max_inflight: int = setting(
        1024, "pipelined requests per connection before reading pauses (resumes at half)", "network"
    )
    max_page_size: int = setting(5000, "largest 'limit' accepted by get_user/get_all", "network")
    max_connections: int = setting(
        1000, "connections served at once; more are sent an 'overloaded' error and closed", "network"
    )
    idle_timeout: float = setting(
        300.0, "seconds a connection may sit with no request and nothing owed before it is closed", "network"
    )
    line_timeout: float = setting(
        30.0, "seconds a started request line has to arrive in full (defeats slow-drip clients)", "network"
    )
    write_timeout: float = setting(
        30.0,
        "seconds a client may leave its replies unread (our send buffer full) before it is dropped",
        "network",
    )
    # TLS
    tls_cert: Path | None = setting(
        None, "PEM certificate chain; with --tls-key, serve TLS 1.2+ only", "TLS", type=Path
    )
    tls_key: Path | None = setting(None, "PEM private key for --tls-cert", "TLS", type=Path)
    tls_handshake_timeout: float = setting(10.0, "seconds allowed for a TLS handshake", "TLS")
    # Storage
    database: Path = setting(
        Path(DEFAULT_DATABASE), "LevelDB directory (created if missing)", "storage", type=Path, text=DEFAULT_DATABASE
    )
    sync: bool = setting(
        True,
        "acknowledge a write once LevelDB has it, without fsync: survives a process "
        "crash but not a power loss or kernel crash",
        "storage",
        flag="--no-sync",
    )
    paranoid_checks: bool = setting(
        False,
        "have LevelDB verify checksums aggressively and stop at the first sign of damage "
        "(see 'perfdb repair' in the README)",
        "storage",
    )
    max_batch_records: int = setting(4096, "most records committed in one group-commit write batch", "storage")
    max_sort_examined: int = setting(
        250_000,
        "most entries one sorted get_user/get_all, or one series, examines (newest first); "
        "past it the reply says complete: false",
        "storage",
    )
    series_cache_mb: int = setting(
        128,
        "memory (MiB) for the columns of the user and test indexes that series reads (the "
        "dashboard's charts) keep between reads, least recently read out first",
        "storage",
    )
    max_compare_records: int = setting(
        10_000,
        "most records each side of a compare holds; past it the side holds its newest and the reply says truncated",
        "storage",
    )
    upgrade_batch_records: int = setting(
        10_000, "records indexed per synced write while an older database is upgraded at start-up", "storage"
    )
    upgrade_pause: float = setting(
        0.0,
        "seconds to wait between upgrade batches; for tests that interrupt an upgrade, never needed otherwise",
        "storage",
        type=non_negative_float,
    )
    # Token resolution
    userinfo_url: str | None = setting(
        GOOGLE_USERINFO_URL,
        "OIDC userinfo endpoint that resolves access tokens (https, or http on loopback); "
        f"'{NO_PROVIDER}': no identity provider, only the static tokens of --tokens-file are accepted",
        "authentication",
    )
    tokens_file: Path | None = setting(
        None, "JSON file of static tokens (SHA-256 hashes) for CI bots; see README", "authentication", type=Path
    )
    token_cache_ttl: float = setting(300.0, "seconds a resolved token stays cached", "authentication")
    token_negative_ttl: float = setting(
        10.0, "seconds a token the provider rejected stays rejected without asking again", "authentication"
    )
    token_cache_size: int = setting(100_000, "most tokens kept in the cache", "authentication")
    auth_timeout: float = setting(5.0, "seconds allowed for one userinfo request, connect included", "authentication")
    auth_max_connections: int = setting(32, "most simultaneous connections to the userinfo endpoint", "authentication")
    # Privacy and access
    expose_emails: bool = setting(False, "include e-mail addresses in public profiles", "privacy and access")
    read_key_file: Path | None = setting(
        None,
        "file holding a key (16+ characters) that get_user, get_all, overview, series and stats must present; "
        "without it reads are open to anyone who can connect",
        "privacy and access",
        type=Path,
    )
    # Write rate limit per user (records per second, and burst); 0 turns it off
    user_rate: float = setting(
        1000.0,
        "records per second one user may store, sustained (0: no limit); over it: 'overloaded'",
        "privacy and access",
        type=non_negative_float,
    )
    user_burst: int = setting(
        20_000, "records one user may store at once above --user-rate before it applies", "privacy and access"
    )
    admin_key_file: Path | None = setting(
        None,
        "file holding the admin key (16+ characters) that export, import, delete_user and audit_log must "
        "present, and delete_record accepts in place of the owner's token; without it those ops are refused",
        "privacy and access",
        type=Path,
    )
    # The dashboard, run by the server as a child process
    web_address: str | None = setting(
        None,
        "host:port to serve the dashboard on too: the server runs 'python -m perfdb.web' as a child once it "
        "listens, restarts it if it dies and stops it on shutdown; port 0 picks a free port (logged); "
        "off unless given",
        "dashboard",
        type=str,
        metavar="HOST:PORT",
    )
    web_ca_file: Path | None = setting(
        None,
        "with --tls-cert: CA bundle the dashboard verifies this server's certificate with "
        "(default: the --tls-cert file itself, right for a self-signed certificate)",
        "dashboard",
        type=Path,
    )
    # Regression detection: verdicts in record acks, change-point alerts
    # Off by default: judging every record costs CPU on the ingest path (benchmarks/README.md).
    regression_detection: bool = setting(
        False,
        "judge every record against its series' history in the record reply (verdicts), and watch series "
        "for change points (alerts); costs CPU on the ingest path: see benchmarks/README.md",
        "regression detection",
    )
    regression_window: int = setting(
        30, "a record is judged against the last this many records of its series", "regression detection",
    )  # fmt: skip
    regression_sigmas: float = setting(
        3.0, "a regression moves the worse way by more than this many baseline standard deviations...",
        "regression detection", type=float,
    )  # fmt: skip
    regression_min_change: float = setting(
        0.05, "...and by more than this fraction of the baseline mean (0.05 = 5 %%)", "regression detection",
        type=float,
    )  # fmt: skip
    regression_config: Path | None = setting(
        None,
        "TOML or JSON file of per-test/per-metric threshold overrides (see README 'Catching regressions'); "
        "its [default] table overrides the three options above",
        "regression detection",
        type=Path,
        metavar="FILE",
    )
    regression_max_series: int = setting(
        100_000, "most series whose verdict windows are kept in memory (least recently written dropped)",
        "regression detection",
    )  # fmt: skip
    alert_webhook: str | None = setting(
        None,
        "URL each new alert is POSTed to as JSON (retried with backoff; never delays ingest); off unless given",
        "regression detection",
        type=str,
        metavar="URL",
    )
    # Lifecycle and runtime
    shutdown_timeout: float = setting(
        10.0, "seconds to finish in-flight requests on SIGTERM/SIGINT before closing connections", "runtime"
    )
    loop: str = setting(
        "auto",
        "event loop: uvloop when importable (auto), or force one",
        "runtime",
        choices=("auto", "uvloop", "asyncio"),
    )
    log_level: str = setting(DEFAULT_LOG_LEVEL, "logging threshold (logs go to stderr)", "runtime", choices=LOG_LEVELS)
    log_format: str = setting(
        DEFAULT_LOG_FORMAT,
        "log lines as text, or as one JSON object each (time, level, logger, message, peer, op, exception)",
        "runtime",
        choices=LOG_FORMATS,
    )
    # Observability
    metrics_address: str | None = setting(
        None,
        "host:port of an HTTP listener for operators: /metrics (Prometheus), /healthz and /readyz; "
        "off unless given (port 0 picks a free port, logged)",
        "observability",
        type=str,
    )

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where it tells something: not to a help text that states its
    default already, not when there is none, and not to a switch (it takes no value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.nargs == 0 or action.default is None or "(default:" in help_text:
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """Command-line mistakes are one line on stderr (and exit 2), like every other start-up failure."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# The type a setting's values take on the command line when its field names none.
_DEFAULT_TYPES: dict[type, Callable[[str], Any]] = {int: positive_int, float: positive_float, str: str}


def build_parser() -> argparse.ArgumentParser:
    """The server's command line, generated from the Config fields' metadata."""
    parser = OneLineErrorParser(
        prog="run_perf_db_server",
        description=(
            "perfdb server: stores gRPC-style benchmark results in LevelDB and serves them "
            "over newline-delimited JSON on TCP (see protocol_spec.md)."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"perfdb {__version__}")
    groups = {"network": parser.add_argument_group("network")}
    groups["network"].add_argument(
        "--address", default=DEFAULT_ADDRESS, help="hostname:port to listen on (port 0 picks a free one)"
    )
    for field in dataclasses.fields(Config):
        meta = field.metadata
        if "help" not in meta:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        if field.default is True or field.default is False:
            action = "store_true" if field.default is False else "store_false"
            groups[meta["group"]].add_argument(flag, dest=field.name, action=action, help=meta["help"])
            continue
        value_type = meta.get("type") or _DEFAULT_TYPES[type(field.default)]
        groups[meta["group"]].add_argument(
            flag,
            dest=field.name,
            type=value_type,
            # argparse converts a text default with `type`; --help shows it as written.
            default=meta.get("text", field.default),
            choices=meta.get("choices"),
            metavar=meta.get("metavar"),
            help=meta["help"],
        )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    """Parse the command line; raises ConfigError for settings that cannot work."""
    values = vars(build_parser().parse_args(argv))
    try:
        host, port = parse_address(values.pop("address"))
    except AddressError as exc:
        raise ConfigError(f"--address {exc}") from None
    if values["metrics_address"] is not None:
        try:
            parse_address(values["metrics_address"])
        except AddressError as exc:
            raise ConfigError(f"--metrics-address {exc}") from None
    if values["userinfo_url"] == NO_PROVIDER:
        values["userinfo_url"] = None
    else:
        check_userinfo_url(values["userinfo_url"])
    if values["web_address"] is not None:
        try:
            web_host, web_port = parse_address(values["web_address"])
        except AddressError as exc:
            raise ConfigError(f"--web-address {exc}") from None
        if web_port != 0 and (web_host, web_port) == (host, port):
            raise ConfigError("--web-address must differ from --address")
    if values["web_ca_file"] is not None and values["tls_cert"] is None:
        raise ConfigError("--web-ca-file needs --tls-cert (the dashboard verifies the server's certificate with it)")
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not (math.isfinite(values["regression_sigmas"]) and values["regression_sigmas"] >= 0):
        raise ConfigError("--regression-sigmas must be a number >= 0")
    if not (math.isfinite(values["regression_min_change"]) and 0 <= values["regression_min_change"] <= 1):
        raise ConfigError("--regression-min-change must be a fraction between 0 and 1 (0.05 = 5 %)")
    if values["regression_window"] < 5:
        raise ConfigError("--regression-window must be at least 5 (the fewest points a verdict is judged on)")
    if values["alert_webhook"] is not None and not values["alert_webhook"].startswith(("http://", "https://")):
        raise ConfigError("--alert-webhook must be an http:// or https:// URL")
    values["default_page_size"] = min(Config().default_page_size, values["max_page_size"])
    return Config(host=host, port=port, **values)
