"""The perfdb command line end to end: the real CLI in a child process against a real server in
another, with static tokens and an admin key, the way a CI job or an operator runs them."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import http.server
import io
import os
import platform
import random
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from perfdb.cli import Progress
from perfdb.records.record_ids import record_id_micros
from perfdb.records.timestamps import format_micros
from tests.support import (
    FIXTURES,
    GRPC_RESULT_FILES,
    REPO_ROOT,
    ServerProcess,
    closed_port,
    closed_port_url,
    grpc_result,
    silent_port,
    token_hash,
)

BOT_TOKEN = "ci-bot-" + secrets.token_hex(16)
BOT_USER = "static:ci-bot"
LAB_TOKEN = "perf-lab-" + secrets.token_hex(16)
LAB_USER = "static:perf-lab"
ADMIN_KEY = "admin-" + secrets.token_hex(16)
CONSOLE_SCRIPT = REPO_ROOT / ".venv" / "bin" / "perfdb"
CLI_TIMEOUT = 30.0
COMMANDS = (
    "submit", "get-user", "get-all", "compare", "export", "import", "repair", "stats", "ping", "delete-record",
    "delete-user", "audit", "regressions", "alert",
)  # fmt: skip
RECORD_ID = r"[0-9a-f]{20}"
SUBMIT_SUMMARY = re.compile(r"perfdb: .+: [a-z-]+: (\d+) stored, (\d+) duplicate, (\d+) refused$")
CSV_HEADER = [
    "record_id", "user_id", "timestamp", "test_name", "tag", "qps", "qps_per_core", "perc_lat_50", "perc_lat_90",
    "perc_lat_95", "perc_lat_99", "perc_lat_99_point_9", "server_system_time", "server_user_time",
    "client_system_time", "client_user_time",
]  # fmt: skip

# ScenarioResult summary field -> (perfdb metric, divisor), written out here rather than taken
# from perfdb.records.scenario so that a wrong mapping there fails these tests.
SUMMARY_MAPPING = {
    "qps": ("qps", 1),
    "qpsPerServerCore": ("qps_per_core", 1),
    "latency50": ("perc_lat_50", 1000),
    "latency90": ("perc_lat_90", 1000),
    "latency95": ("perc_lat_95", 1000),
    "latency99": ("perc_lat_99", 1000),
    "latency999": ("perc_lat_99_point_9", 1000),
    "serverSystemTime": ("server_system_time", 1),
    "serverUserTime": ("server_user_time", 1),
    "clientSystemTime": ("client_system_time", 1),
    "clientUserTime": ("client_user_time", 1),
}
CPU_TIME_METRICS = ("server_system_time", "server_user_time", "client_system_time", "client_user_time")


# -- running things ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()

    def lines(self) -> list[str]:
        return self.out.splitlines()

    def error_line(self) -> str:
        """The one line a failing command writes to stderr (besides submit's summary of each file)."""
        lines = [line for line in self.err.splitlines() if not SUBMIT_SUMMARY.match(line)]
        assert len(lines) == 1, f"expected one line on stderr from {self.args}, got:\n{self.err}"
        assert lines[0].startswith("perfdb: "), lines[0]
        return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI run: no PERFDB_* settings unless the test gives them."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PERFDB_")}
    env.update(extra)
    return env


def perfdb(
    *args: str,
    server: RunningServer | None = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    console_script: bool = False,
) -> CliResult:
    """Run the CLI; `server` appends --server. No run may print a traceback, whatever its outcome."""
    program = [str(CONSOLE_SCRIPT)] if console_script else [sys.executable, "-m", "perfdb.cli"]
    argv = (*args, "--server", server.address) if server is not None else args
    completed = subprocess.run(
        [*program, *argv],
        input=stdin if stdin is not None else b"",  # never a terminal: no prompts, no progress bars
        capture_output=True,
        cwd=REPO_ROOT,
        env=env if env is not None else clean_env(),
        timeout=CLI_TIMEOUT,
        check=False,
    )
    result = CliResult(tuple(argv), completed.returncode, completed.stdout, completed.stderr)
    assert "Traceback" not in result.err, f"perfdb {' '.join(argv)} printed a traceback:\n{result.err}"
    return result


def ok(*args: str, **kwargs: Any) -> CliResult:
    result = perfdb(*args, **kwargs)
    assert result.returncode == 0, f"perfdb {' '.join(result.args)} exited {result.returncode}:\n{result.err}"
    return result


@dataclasses.dataclass(frozen=True)
class Secrets:
    directory: Path
    tokens_file: Path
    admin_key_file: Path

    def token_file(self, token: str, name: str) -> Path:
        path = self.directory / name
        path.write_text(token + "\n")
        return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    return make_secrets(tmp_path_factory.mktemp("secrets"))


def make_secrets(directory: Path) -> Secrets:
    """The bot's and the lab's static tokens and the admin key, in files in `directory`."""
    tokens_file = directory / "tokens.json"
    tokens_file.write_bytes(
        orjson.dumps(
            {
                "tokens": [
                    {"sha256": token_hash(BOT_TOKEN), "user_id": "ci-bot", "name": "CI bot"},
                    {"sha256": token_hash(LAB_TOKEN), "user_id": "perf-lab", "name": "Perf lab"},
                ]
            }
        )
    )
    admin_key_file = directory / "admin.key"
    admin_key_file.write_text(ADMIN_KEY + "\n")
    return Secrets(directory, tokens_file, admin_key_file)


@dataclasses.dataclass(frozen=True)
class RunningServer:
    process: ServerProcess
    address: str
    bot_token_file: Path
    lab_token_file: Path
    admin_key_file: Path


@contextlib.contextmanager
def serving(keys: Secrets, database: Path, userinfo_url: str | None = None, *options: str) -> Iterator[RunningServer]:
    """run_perf_db_server in a child process; stopped with SIGTERM, which must end it cleanly.
    Without a userinfo_url, the provider is unreachable: static tokens only."""
    with ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={database}",
        f"--tokens-file={keys.tokens_file}",
        f"--admin-key-file={keys.admin_key_file}",
        f"--userinfo-url={userinfo_url or closed_port_url()}",
        *options,
    ) as process:
        port = process.wait_listening()
        yield RunningServer(
            process,
            f"127.0.0.1:{port}",
            keys.token_file(BOT_TOKEN, "bot.token"),
            keys.token_file(LAB_TOKEN, "lab.token"),
            keys.admin_key_file,
        )
        code, stderr = process.stop()
    assert code == 0 and "Traceback" not in stderr, stderr


@pytest.fixture
def server(keys: Secrets, tmp_path: Path) -> Iterator[RunningServer]:
    """A fresh server with an empty database."""
    with serving(keys, tmp_path / "db") as running:
        yield running


@pytest.fixture
def detecting_server(keys: Secrets, tmp_path: Path) -> Iterator[RunningServer]:
    """A fresh server with regression detection on (verdicts and alerts)."""
    with serving(keys, tmp_path / "db", None, "--regression-detection") as running:
        yield running


def stats(server: RunningServer) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(ok("stats", server=server).stdout)
    return document


def records_of(result: CliResult) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = orjson.loads(result.stdout)
    assert isinstance(records, list)
    return records


def stored_ids(lines: list[str], name: str, state: str = "stored") -> list[str]:
    """Record ids from submit's `<file>: <record_id> <state>` lines, checking every line's shape."""
    ids: list[str] = []
    for line in lines:
        match = re.fullmatch(rf"{re.escape(name)}: ({RECORD_ID}) {state}", line)
        assert match, f"unexpected submit output line {line!r}"
        ids.append(match.group(1))
    return ids


def table_cells(line: str) -> list[str]:
    """The cells of a table row: columns are separated by two or more spaces."""
    return [cell for cell in re.split(r"\s{2,}", line.strip()) if cell]


def perfdb_records(count: int, *, tag: str, first: int = 0) -> bytes:
    """NDJSON of perfdb records (not ScenarioResults), each different."""
    return b"".join(
        orjson.dumps(
            {
                "test_name": f"bulk-{i % 3}",
                "tag": tag,
                "metrics": {"qps": 1000 + i, "perc_lat_50": 100.5 + i},
                "client_config": {"index": i},
            }
        )
        + b"\n"
        for i in range(first, first + count)
    )


# -- a populated server, shared by the read-only tests ------------------------------------------

# Records of the perf-lab bot: small latencies (shown in µs) and CPU times (shown in %).
LAB_RECORDS: list[dict[str, Any]] = [
    {
        "test_name": "unary-small",
        "tag": "lab-a",
        "metrics": {
            "qps": 1234567.0,
            "qps_per_core": 45.5,
            "perc_lat_50": 850.0,
            "perc_lat_90": 912.25,
            "perc_lat_95": 1500.0,
            "perc_lat_99": 2_500_000.0,
            "perc_lat_99_point_9": 3_750_000.0,
            "server_user_time": 97.25,
        },
    },
    {"test_name": "unary-small", "tag": "lab-b", "metrics": {"qps": 2000.0, "perc_lat_50": 90.0}},
    {"test_name": "streaming-small", "tag": "lab-a", "metrics": {"qps": 3000.0, "perc_lat_50": 95.0}},
    {"test_name": "unary-small", "tag": "lab-a", "metrics": {"qps": 4000.0, "perc_lat_50": 99.0}},
]


@dataclasses.dataclass(frozen=True)
class Populated:
    server: RunningServer
    records: list[dict[str, Any]]  # every record, oldest first, as get-all --format json gives them
    grpc_ids: dict[str, str]  # fixture file name -> record id


@pytest.fixture(scope="module")
def populated(keys: Secrets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Populated]:
    """The three real gRPC results (ci-bot, tag nightly), then four perfdb records (perf-lab)."""
    with serving(keys, tmp_path_factory.mktemp("populated") / "db") as running:
        paths = [str(FIXTURES / name) for name in GRPC_RESULT_FILES]
        submitted = ok(
            "submit", *paths, "--tag", "nightly", "--token-file", str(running.bot_token_file), server=running
        )
        grpc_ids: dict[str, str] = {}
        for name, path, line in zip(GRPC_RESULT_FILES, paths, submitted.lines(), strict=True):
            grpc_ids[name] = stored_ids([line], path)[0]
        lab = b"".join(orjson.dumps(record) + b"\n" for record in LAB_RECORDS)
        ok("submit", "-", "--token-file", str(running.lab_token_file), stdin=lab, server=running)
        records = records_of(ok("get-all", "--format", "json", server=running))
        assert len(records) == len(GRPC_RESULT_FILES) + len(LAB_RECORDS)
        yield Populated(running, records, grpc_ids)


# -- help and usage ------------------------------------------------------------------------------


def test_program_help_lists_every_command_and_the_exit_codes() -> None:
    result = ok("--help", console_script=True)
    assert result.out.startswith("usage: perfdb")
    for command in COMMANDS:
        assert command in result.out
    assert "Exit codes" in result.out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = ok(command, "--help")
    assert result.out.startswith(f"usage: perfdb {command}"), result.out
    # repair works on a database directory offline; every other command talks to a server.
    assert ("--database" if command == "repair" else "--server") in result.out
    assert result.err == ""


def test_unknown_or_missing_command_is_a_usage_error() -> None:
    unknown = perfdb("frobnicate")
    assert unknown.returncode == 2
    assert "invalid choice: 'frobnicate'" in unknown.err
    assert unknown.out == ""
    missing = perfdb()
    assert missing.returncode == 2
    assert "required" in missing.err
    bad_option = perfdb("ping", "--timeout", "soon")
    assert bad_option.returncode == 2
    assert "--timeout" in bad_option.err


def test_bad_server_address_is_a_usage_error() -> None:
    result = perfdb("ping", "--server", "no-port-here")
    assert result.returncode == 2
    assert "no-port-here" in result.error_line()


# -- submit: real gRPC results ---------------------------------------------------------------


def test_submit_real_grpc_results_and_read_them_back(server: RunningServer) -> None:
    paths = [str(FIXTURES / name) for name in GRPC_RESULT_FILES]
    result = ok("submit", *paths, "--tag", "nightly", "--token-file", str(server.bot_token_file), server=server)
    lines = result.lines()
    assert len(lines) == len(paths), result.out
    ids = [stored_ids([line], path)[0] for line, path in zip(lines, paths, strict=True)]
    assert len(set(ids)) == len(ids)
    assert result.err.splitlines() == [f"perfdb: {path}: grpc: 1 stored, 0 duplicate, 0 refused" for path in paths]

    listed = records_of(ok("get-user", BOT_USER, "--format", "json", server=server))
    # Oldest first: results whose summary says when they ran (2024) are filed then, before the others.
    assert [record["record_id"] for record in listed] == sorted(ids)
    by_id = {record["record_id"]: record for record in listed}
    records = [by_id[record_id] for record_id in ids]
    cpu_times_seen = 0
    for name, record in zip(GRPC_RESULT_FILES, records, strict=True):
        scenario_result = grpc_result(name)
        summary = scenario_result["summary"]
        assert record["user_id"] == BOT_USER
        assert record["test_name"] == scenario_result["scenario"]["name"]
        assert record["tag"] == "nightly"
        metrics = record["metrics"]
        for field, (metric, divisor) in SUMMARY_MAPPING.items():
            if field in summary:
                assert metrics[metric] == summary[field] / divisor, (name, metric)
            else:
                assert metric not in metrics, (name, metric)
        cpu_times_seen += sum(metric in metrics for metric in CPU_TIME_METRICS)
        # Non-finite summary values ("Infinity") carry no measurement and are dropped.
        for field, value in summary.items():
            if value in ("Infinity", "NaN"):
                assert field not in metrics, (name, field)
    assert cpu_times_seen == len(CPU_TIME_METRICS)  # only grpc_scenario_result.json has them
    unary = records[GRPC_RESULT_FILES.index("grpc_scenario_result.json")]["metrics"]
    assert unary["perc_lat_50"] == pytest.approx(28564.97, abs=0.01)
    assert unary["server_user_time"] == pytest.approx(504.005, abs=0.001)


def test_test_name_option_overrides_the_scenario_name(server: RunningServer) -> None:
    path = str(FIXTURES / GRPC_RESULT_FILES[1])
    ok("submit", path, "--test-name", "renamed", "--token-file", str(server.bot_token_file), server=server)
    (record,) = records_of(ok("get-user", BOT_USER, "--format", "json", server=server))
    assert record["test_name"] == "renamed"
    assert record["tag"] == ""


def test_submitting_the_same_file_again_stores_nothing_new(server: RunningServer) -> None:
    path = str(FIXTURES / "grpc_scenario_result.json")
    token = ("--token-file", str(server.bot_token_file))
    (first,) = stored_ids(ok("submit", path, *token, server=server).lines(), path)
    assert stats(server)["records"] == 1
    # The token from the environment this time: the same content is the same submission.
    again = ok("submit", path, server=server, env=clean_env(PERFDB_ACCESS_TOKEN=BOT_TOKEN))
    assert stored_ids(again.lines(), path, "duplicate") == [first]
    assert stats(server)["records"] == 1
    # Different content (another tag) is a different result.
    (tagged,) = stored_ids(ok("submit", path, "--tag", "rerun", *token, server=server).lines(), path)
    assert tagged != first
    assert stats(server)["records"] == 2


def test_sys_info_auto_describes_the_machine_without_naming_it(server: RunningServer) -> None:
    path = str(FIXTURES / GRPC_RESULT_FILES[2])
    submitted = ok("submit", path, "--sys-info", "auto", "--token-file", str(server.bot_token_file), server=server)
    stored_ids(submitted.lines(), path)
    output = ok("get-user", BOT_USER, "--format", "json", server=server)
    (record,) = records_of(output)
    sys_info = record["sys_info"]
    assert sys_info["cpu_cores"] == os.cpu_count()
    assert sys_info["python"] == platform.python_version()
    assert sys_info["architecture"] == platform.machine()
    assert isinstance(sys_info["os"], str) and sys_info["os"]
    for key in sys_info:
        assert not any(word in key.lower() for word in ("host", "node", "ip", "addr")), key
    text = orjson.dumps(sys_info).decode()
    assert "[redacted]" not in text  # nothing had to be scrubbed: no address was sent
    assert not re.search(r"(?<![\d.])\d{1,3}(\.\d{1,3}){3}(?![\d.])", text), text
    names = {socket.gethostname(), socket.getfqdn()}
    for name in names:
        word = rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])"
        assert not re.search(word, output.out, re.IGNORECASE), f"host name {name!r} stored in {output.out}"


# -- submit: perfdb records in bulk, and input errors -----------------------------------------


def test_ndjson_file_and_stdin_submit_hundreds_of_records(server: RunningServer, tmp_path: Path) -> None:
    token = ("--token-file", str(server.bot_token_file))
    path = tmp_path / "records.ndjson"
    path.write_bytes(perfdb_records(300, tag="file"))
    from_file = stored_ids(ok("submit", str(path), *token, server=server).lines(), str(path))
    assert len(from_file) == 300 and len(set(from_file)) == 300

    from_stdin = stored_ids(
        ok("submit", "-", *token, stdin=perfdb_records(200, tag="stdin", first=300), server=server).lines(), "-"
    )
    assert len(from_stdin) == 200 and not set(from_stdin) & set(from_file)
    assert stats(server)["records"] == 500

    # The file's content again, through stdin: the same submissions, so nothing new.
    repeated = ok("submit", "-", *token, stdin=path.read_bytes(), server=server)
    assert stored_ids(repeated.lines(), "-", "duplicate") == from_file
    assert stats(server)["records"] == 500

    lines = ok("get-all", "--tag", "stdin", "--format", "ndjson", server=server).lines()
    records = [orjson.loads(line) for line in lines]
    assert [record["record_id"] for record in records] == from_stdin
    assert [record["metrics"]["qps"] for record in records] == list(range(1300, 1500))


def test_a_file_that_is_not_json_exits_4_naming_it(server: RunningServer, tmp_path: Path) -> None:
    path = tmp_path / "results.txt"
    path.write_text("QPS: 1000 (this is not JSON)\n")
    result = perfdb("submit", str(path), "--token-file", str(server.bot_token_file), server=server)
    assert result.returncode == 4
    assert str(path) in result.error_line()
    assert result.out == ""
    missing = perfdb("submit", str(tmp_path / "nope.json"), "--token-file", str(server.bot_token_file), server=server)
    assert missing.returncode == 4
    assert str(tmp_path / "nope.json") in missing.error_line()
    assert stats(server)["records"] == 0


def test_a_json_file_of_no_known_format_exits_4_naming_the_formats_tried(server: RunningServer, tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_bytes(orjson.dumps({"name": "my benchmark", "seconds": 1.5}))
    result = perfdb("submit", str(path), "--token-file", str(server.bot_token_file), server=server)
    assert result.returncode == 4
    line = result.error_line()
    assert line.startswith(f"perfdb: {path}: no benchmark format recognised"), line
    assert "formats tried: grpc, google-benchmark, pytest-benchmark, pyperf, hyperfine, jmh, go, criterion" in line
    assert "test_name" not in line
    wrong = FIXTURES / "tools" / "hyperfine" / "commands.json"
    named = perfdb("submit", str(wrong), "--format", "jmh", "--token-file", str(server.bot_token_file), server=server)
    assert named.returncode == 4
    assert named.error_line().startswith(f"perfdb: {wrong}: not JMH JSON (-rf json): expected a list"), named.err
    assert stats(server)["records"] == 0


def test_a_tools_file_is_submitted_one_record_per_benchmark_and_once(server: RunningServer) -> None:
    path = str(FIXTURES / "tools" / "criterion" / "many.txt")
    token = ("--token-file", str(server.bot_token_file))
    first = ok("submit", path, "--tag", "nightly", *token, server=server)
    ids = stored_ids(first.lines(), path)
    assert len(ids) == 5
    assert first.err == f"perfdb: {path}: criterion: 5 stored, 0 duplicate, 0 refused\n"
    again = ok("submit", path, "--tag", "nightly", "--format", "criterion", *token, server=server)
    assert stored_ids(again.lines(), path, "duplicate") == ids
    assert again.err == f"perfdb: {path}: criterion: 0 stored, 5 duplicate, 0 refused\n"
    records = records_of(ok("get-user", BOT_USER, "--format", "json", server=server))
    assert [record["test_name"] for record in records] == [
        "file", "rolling_file", "tracing_file", "tracing_rolling_file", "benchmark: name with spaces",
    ]  # fmt: skip
    assert records[2]["metrics"] == {"time_lower": 16652.0, "time": 18019.0, "time_upper": 19562.0}
    assert records[2]["units"] == {"time_lower": "ns", "time": "ns", "time_upper": "ns"}
    assert all(record["tag"] == "nightly" for record in records)


def test_submit_help_lists_the_formats() -> None:
    text = " ".join(ok("submit", "--help").out.split())
    assert "--format {auto,grpc,google-benchmark,pytest-benchmark,pyperf,hyperfine,jmh,go,criterion}" in text


def test_a_scenario_input_file_exits_4_naming_it(server: RunningServer) -> None:
    path = str(FIXTURES / "test-infra_cxx_example_scenario.json")
    result = perfdb("submit", path, "--token-file", str(server.bot_token_file), server=server)
    assert result.returncode == 4
    line = result.error_line()
    assert path in line and "scenario" in line
    assert stats(server)["records"] == 0


def test_bad_input_does_not_stop_the_other_files_and_wins_the_exit_code(server: RunningServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused = tmp_path / "refused.json"
    refused.write_bytes(orjson.dumps({"test_name": "t", "metrics": {}}))
    good = str(FIXTURES / "grpc_scenario_result.json")
    result = perfdb("submit", str(bad), good, str(refused), "--token-file", str(server.bot_token_file), server=server)
    assert result.returncode == 4  # unreadable input takes precedence over a refusal
    stored_ids(result.lines(), good)
    errors = [line for line in result.err.splitlines() if not SUBMIT_SUMMARY.match(line)]
    assert len(errors) == 2, result.err
    assert str(bad) in errors[0] and str(refused) in errors[1]
    summaries = [line for line in result.err.splitlines() if SUBMIT_SUMMARY.match(line)]
    assert summaries == [
        f"perfdb: {good}: grpc: 1 stored, 0 duplicate, 0 refused",
        f"perfdb: {refused}: grpc: 0 stored, 0 duplicate, 1 refused",
    ]
    assert stats(server)["records"] == 1


def test_a_record_the_server_refuses_exits_1_with_its_code(server: RunningServer, tmp_path: Path) -> None:
    path = tmp_path / "empty-metrics.json"
    path.write_bytes(orjson.dumps({"test_name": "unary", "metrics": {}}))
    result = perfdb("submit", str(path), "--token-file", str(server.bot_token_file), server=server)
    assert result.returncode == 1
    line = result.error_line()
    assert line.startswith(f"perfdb: {path} (record 1: unary): bad_request: metrics"), line
    assert result.out == ""
    assert stats(server)["records"] == 0


def test_a_refusal_inside_a_file_reports_exactly_what_was_stored(server: RunningServer, tmp_path: Path) -> None:
    """submit promises one output line per stored record, also when a later record is refused."""
    records = [{"test_name": "mixed", "metrics": {} if i == 2 else {"qps": 1000 + i}} for i in range(6)]
    path = tmp_path / "mixed.ndjson"
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    result = perfdb("submit", str(path), "--token-file", str(server.bot_token_file), server=server)
    assert result.returncode == 1
    assert result.error_line().startswith(f"perfdb: {path} (record 3: mixed): bad_request: metrics"), result.err
    printed = stored_ids(result.lines(), str(path))
    assert len(printed) >= 2  # the records before the refused one
    stored = [record["record_id"] for record in records_of(ok("get-user", BOT_USER, "--format", "json", server=server))]
    assert stored == printed, f"stored {len(stored)} records but reported {len(printed)} as stored"


class _RejectingUserinfo(http.server.BaseHTTPRequestHandler):
    """An identity provider that knows no token."""

    def do_GET(self) -> None:
        body = b'{"error": "invalid_token"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean


@contextlib.contextmanager
def rejecting_provider() -> Iterator[str]:
    provider = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RejectingUserinfo)
    thread = threading.Thread(target=provider.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{provider.server_address[1]}/userinfo"
    finally:
        provider.shutdown()
        provider.server_close()
        thread.join(timeout=5)


def test_a_wrong_token_exits_1_unauthenticated(keys: Secrets, tmp_path: Path) -> None:
    path = str(FIXTURES / "grpc_scenario_result.json")
    with rejecting_provider() as userinfo_url, serving(keys, tmp_path / "db", userinfo_url) as running:
        wrong = keys.token_file("not-" + BOT_TOKEN, "wrong.token")
        result = perfdb("submit", path, "--token-file", str(wrong), server=running)
        assert result.returncode == 1
        # The token is the whole file's (one record_batch): the refusal names the file, not a record.
        assert result.error_line().startswith(f"perfdb: {path}: unauthenticated: "), result.err
        assert BOT_TOKEN not in result.err
        assert result.out == ""
        assert stats(running)["records"] == 0


def test_an_unknown_token_with_no_provider_reachable_exits_1(server: RunningServer) -> None:
    """Static tokens need no provider; any other token does, so the server cannot judge it."""
    path = str(FIXTURES / "grpc_scenario_result.json")
    result = perfdb("submit", path, server=server, env=clean_env(PERFDB_ACCESS_TOKEN="someone-else"))
    assert result.returncode == 1
    assert result.error_line().startswith(f"perfdb: {path}: auth_unavailable: "), result.err
    assert stats(server)["records"] == 0


def test_submit_without_a_usable_token(server: RunningServer, tmp_path: Path) -> None:
    path = str(FIXTURES / "grpc_scenario_result.json")
    none = perfdb("submit", path, server=server)
    assert none.returncode == 2
    assert "--token-file" in none.error_line() and "PERFDB_ACCESS_TOKEN" in none.err
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    assert perfdb("submit", path, "--token-file", str(empty), server=server).returncode == 4
    missing = perfdb("submit", path, "--token-file", str(tmp_path / "absent.token"), server=server)
    assert missing.returncode == 4
    assert str(tmp_path / "absent.token") in missing.error_line()
    assert stats(server)["records"] == 0


# -- reading: formats and filters ---------------------------------------------------------------


def test_json_output_parses_to_a_list(populated: Populated) -> None:
    everything = records_of(ok("get-all", "--format", "json", server=populated.server))
    assert everything == populated.records
    bot = records_of(ok("get-user", BOT_USER, "--format", "json", server=populated.server))
    assert [record["record_id"] for record in bot] == sorted(populated.grpc_ids.values())  # oldest first
    nothing = ok("get-all", "--tag", "no-such-tag", "--format", "json", server=populated.server)
    assert orjson.loads(nothing.stdout) == []


def test_ndjson_output_is_one_object_per_line_and_the_default_off_a_terminal(populated: Populated) -> None:
    result = ok("get-all", "--format", "ndjson", server=populated.server)
    assert [orjson.loads(line) for line in result.lines()] == populated.records
    assert ok("get-all", server=populated.server).stdout == result.stdout
    lab = ok("get-user", LAB_USER, "--format", "ndjson", server=populated.server).lines()
    assert [orjson.loads(line)["metrics"]["qps"] for line in lab] == [r["metrics"]["qps"] for r in LAB_RECORDS]


def test_csv_output_has_the_core_metric_columns(populated: Populated) -> None:
    rows = list(csv.reader(io.StringIO(ok("get-all", "--format", "csv", server=populated.server).out)))
    assert rows[0] == CSV_HEADER
    assert len(rows) == 1 + len(populated.records)
    for row, record in zip(rows[1:], populated.records, strict=True):
        cells = dict(zip(CSV_HEADER, row, strict=True))
        assert cells["record_id"] == record["record_id"]
        assert cells["user_id"] == record["user_id"]
        assert cells["test_name"] == record["test_name"]
        assert cells["tag"] == record["tag"]
        for metric in CSV_HEADER[5:]:
            value = record["metrics"].get(metric)
            assert cells[metric] == ("" if value is None else str(value)), metric
    lab = list(csv.reader(io.StringIO(ok("get-user", LAB_USER, "--format", "csv", server=populated.server).out)))
    assert lab[0] == CSV_HEADER
    assert [row[1] for row in lab[1:]] == [LAB_USER] * len(LAB_RECORDS)


def test_table_output_shows_readable_units(populated: Populated) -> None:
    table = ok("get-all", "--format", "table", server=populated.server).lines()
    assert len(table) == 1 + len(populated.records)
    for heading in ("time (UTC)", "user", "test", "tag", "QPS", "QPS/core", "p50", "p99.9", "srv sys", "cli user"):
        assert heading in table[0]
    unary = table[1 + sorted(populated.grpc_ids.values()).index(populated.grpc_ids["grpc_scenario_result.json"])]
    for cell in ("221,994", "18,500", "28.6 ms", "70.2 ms", "131.2%", "504.0%", "89.3%", "391.0%"):
        assert cell in table_cells(unary), (cell, unary)
    lab = ok("get-user", LAB_USER, "--format", "table", server=populated.server).lines()
    assert len(lab) == 1 + len(LAB_RECORDS)
    cells = table_cells(lab[1])
    for cell in ("1,234,567", "45.50", "850 µs", "912 µs", "1.5 ms", "2.5 s", "3.75 s", "97.2%"):
        assert cell in cells, (cell, lab[1])
    assert "-" in cells  # metrics a record does not have
    empty = ok("get-all", "--tag", "no-such-tag", "--format", "table", server=populated.server).lines()
    assert empty[1:] == ["(no records)"]


def test_filters_narrow_the_output(populated: Populated) -> None:
    def ids(*args: str) -> list[str]:
        return [record["record_id"] for record in records_of(ok(*args, "--format", "json", server=populated.server))]

    records = populated.records
    by_name = ids("get-all", "--test-name", "unary-small")
    assert by_name == [r["record_id"] for r in records if r["test_name"] == "unary-small"]
    assert len(by_name) == 3
    by_tag = ids("get-all", "--tag", "nightly")
    assert by_tag == sorted(populated.grpc_ids.values())
    both = ids("get-user", LAB_USER, "--test-name", "unary-small", "--tag", "lab-a")
    assert both == [r["record_id"] for r in records if r["test_name"] == "unary-small" and r["tag"] == "lab-a"]
    assert len(both) == 2

    # Times filter on when a record is filed: its commit time, or its run time (section 4.1).
    def filed(record: dict[str, Any]) -> str:
        return format_micros(record_id_micros(record["record_id"]))

    since, until = filed(records[2]), filed(records[5])
    window = ids("get-all", "--since", since, "--until", until)
    assert window == [r["record_id"] for r in records if since <= filed(r) < until]
    assert records[2]["record_id"] in window and records[5]["record_id"] not in window
    assert ids("get-all", "--since", since) == [r["record_id"] for r in records if filed(r) >= since]
    until_second = ids("get-user", BOT_USER, "--until", filed(records[1]))
    assert until_second == [r["record_id"] for r in records[:3] if filed(r) < filed(records[1])]
    assert records[0]["record_id"] in until_second and records[1]["record_id"] not in until_second


def test_a_query_the_server_refuses_exits_1(populated: Populated) -> None:
    result = perfdb("get-all", "--since", "yesterday", server=populated.server)
    assert result.returncode == 1
    assert "bad_request" in result.error_line() and "since" in result.err
    assert result.out == ""


# -- export and import ---------------------------------------------------------------------------


def test_export_import_export_round_trip(populated: Populated, server: RunningServer, tmp_path: Path) -> None:
    admin = ("--admin-key-file", str(populated.server.admin_key_file))
    first = ok("export", *admin, server=populated.server).stdout
    lines = first.splitlines()
    assert orjson.loads(lines[0]) == {"format": "perfdb-dump", "version": 2}
    items = [orjson.loads(line) for line in lines[1:]]
    assert [item["user"]["user_id"] for item in items if "user" in item] == [BOT_USER, LAB_USER]
    assert [item["record"] for item in items if "record" in item] == populated.records
    dump = tmp_path / "dump.ndjson"
    dump.write_bytes(first)

    count = len(populated.records)
    imported = ok("import", str(dump), *admin, server=server)
    assert imported.out == f"imported {count} records (0 were already present)\n"
    second = ok("export", server=server, env=clean_env(PERFDB_ADMIN_KEY=ADMIN_KEY)).stdout
    assert second == first
    assert ok("get-all", server=server).stdout == ok("get-all", server=populated.server).stdout

    again = ok("import", "-", *admin, stdin=first, server=server)
    assert again.out == f"imported 0 records ({count} were already present)\n"
    after = stats(server)
    assert (after["records"], after["users"]) == (count, 2)


def test_export_and_import_need_the_admin_key(server: RunningServer, keys: Secrets, tmp_path: Path) -> None:
    ok("submit", str(FIXTURES / GRPC_RESULT_FILES[0]), "--token-file", str(server.bot_token_file), server=server)
    no_key = perfdb("export", server=server)
    assert no_key.returncode == 2
    assert "--admin-key-file" in no_key.error_line() and "PERFDB_ADMIN_KEY" in no_key.err
    assert no_key.out == ""

    wrong = keys.token_file("wrong-" + ADMIN_KEY, "wrong.key")
    refused = perfdb("export", "--admin-key-file", str(wrong), server=server)
    assert refused.returncode == 1
    assert "forbidden" in refused.error_line()
    assert ADMIN_KEY not in refused.err

    dump = tmp_path / "dump.ndjson"
    dump.write_bytes(ok("export", "--admin-key-file", str(server.admin_key_file), server=server).stdout)
    refused_import = perfdb("import", str(dump), "--admin-key-file", str(wrong), server=server)
    assert refused_import.returncode == 1
    assert "forbidden" in refused_import.error_line()
    assert perfdb("import", str(dump), server=server).returncode == 2
    assert stats(server)["records"] == 1


def test_a_refused_export_writes_no_dump(server: RunningServer, keys: Secrets) -> None:
    """`perfdb export > dump` with a wrong key must not leave a dump that imports as empty."""
    wrong = keys.token_file("wrong-" + ADMIN_KEY, "wrong.key")
    refused = perfdb("export", "--admin-key-file", str(wrong), server=server)
    assert refused.returncode == 1
    assert refused.stdout == b"", f"a refused export wrote {refused.stdout!r}"


def test_import_of_something_that_is_not_a_dump_exits_4(server: RunningServer) -> None:
    path = str(FIXTURES / "grpc_scenario_result.json")
    result = perfdb("import", path, "--admin-key-file", str(server.admin_key_file), server=server)
    assert result.returncode == 4
    assert path in result.error_line() and "dump" in result.err
    assert stats(server)["records"] == 0


# -- deleting -------------------------------------------------------------------------------------


def test_delete_record_as_owner_and_the_exit_codes(server: RunningServer, keys: Secrets) -> None:
    stdin = perfdb_records(3, tag="doomed")
    ids = stored_ids(
        ok("submit", "-", "--token-file", str(server.bot_token_file), stdin=stdin, server=server).lines(), "-"
    )
    owner = ("--token-file", str(server.bot_token_file))

    assert ok("delete-record", ids[0], *owner, server=server).out == f"{ids[0]} deleted\n"
    assert ok("delete-record", ids[0], *owner, server=server).out == f"{ids[0]} was already deleted\n"
    forbidden = perfdb("delete-record", ids[1], "--token-file", str(server.lab_token_file), server=server)
    assert forbidden.returncode == 1 and "forbidden" in forbidden.error_line()
    assert LAB_TOKEN not in forbidden.err
    never = perfdb("delete-record", "0" * 20, *owner, server=server)
    assert never.returncode == 1 and "not_found" in never.error_line()
    malformed = perfdb("delete-record", "not-an-id", *owner, server=server)
    assert malformed.returncode == 1 and "bad_request" in malformed.error_line()
    no_token = perfdb("delete-record", ids[1], server=server)
    assert no_token.returncode == 2 and "--token-file" in no_token.error_line()
    by_admin = perfdb("delete-record", "0" * 20, ids[1], "--admin-key-file", str(server.admin_key_file), server=server)
    # A refused id is reported and the others still go; the exit code says something was refused.
    assert by_admin.returncode == 1 and "not_found" in by_admin.error_line()
    assert by_admin.out == f"{ids[1]} deleted\n"
    assert [record["record_id"] for record in records_of(ok("get-all", "--format", "json", server=server))] == [ids[2]]
    assert stats(server)["records"] == 1


def test_delete_user_and_the_audit_log(server: RunningServer, keys: Secrets) -> None:
    lab = ("--token-file", str(server.lab_token_file))
    ok("submit", "-", *lab, stdin=perfdb_records(5, tag="lab"), server=server)
    ok("submit", "-", "--token-file", str(server.bot_token_file), stdin=perfdb_records(2, tag="bot"), server=server)
    admin = ("--admin-key-file", str(server.admin_key_file))

    assert ok("delete-user", LAB_USER, *admin, server=server).out == f"user {LAB_USER} deleted with 5 records\n"
    assert ok("delete-user", LAB_USER, *admin, server=server).out == f"user {LAB_USER}: nothing to delete\n"
    assert perfdb("get-user", LAB_USER, server=server).returncode == 1
    assert (stats(server)["records"], stats(server)["users"]) == (2, 1)
    no_key = perfdb("delete-user", BOT_USER, server=server)
    assert no_key.returncode == 2 and "--admin-key-file" in no_key.error_line()
    wrong = keys.token_file("wrong-" + ADMIN_KEY, "wrong.key")
    refused = perfdb("delete-user", BOT_USER, "--admin-key-file", str(wrong), server=server)
    assert refused.returncode == 1 and "forbidden" in refused.error_line()

    entries = [orjson.loads(line) for line in ok("audit", *admin, server=server).lines()]
    assert [(e["actor"], e["op"], e["user_id"], e["records"], e["complete"]) for e in entries] == [
        ("admin", "delete_user", LAB_USER, 5, True)
    ]
    assert b"bulk-" not in ok("audit", *admin, server=server).stdout  # no content, only ids
    table = ok("audit", *admin, "--format", "table", server=server).lines()
    assert table_cells(table[0]) == ["time", "actor", "op", "user_id", "records", "complete", "record_ids"]
    assert table_cells(table[1])[1:] == ["admin", "delete_user", LAB_USER, "5", "yes"]
    bot_record = records_of(ok("get-all", "--format", "json", server=server))[0]["record_id"]
    ok("delete-record", bot_record, "--token-file", str(server.bot_token_file), server=server)
    newest = ok("audit", *admin, "--limit", "1", server=server).lines()
    assert [orjson.loads(line)["record_ids"] for line in newest] == [[bot_record]]
    assert len(ok("audit", *admin, server=server).lines()) == 2
    assert perfdb("audit", "--admin-key-file", str(wrong), server=server).returncode == 1


def test_export_keeps_deletions_and_import_force_brings_them_back(
    server: RunningServer, keys: Secrets, tmp_path: Path
) -> None:
    admin = ("--admin-key-file", str(server.admin_key_file))
    submitted = ok(
        "submit", "-", "--token-file", str(server.bot_token_file), stdin=perfdb_records(3, tag="x"), server=server
    )
    ids = stored_ids(submitted.lines(), "-")
    old_dump = tmp_path / "old.ndjson"
    old_dump.write_bytes(ok("export", *admin, server=server).stdout)
    ok("delete-record", ids[1], *admin, server=server)
    new_dump = ok("export", *admin, server=server).stdout
    assert {"tombstone": ids[1]} in [orjson.loads(line) for line in new_dump.splitlines()]

    stale = ok("import", str(old_dump), *admin, server=server)
    assert stale.lines() == [
        "imported 0 records (2 were already present)",
        "left out 1 records deleted on this server (--force brings them back)",
    ]
    assert ids[1] not in ok("get-all", server=server).out
    with serving(keys, tmp_path / "copy") as copy:
        # A copy made before the deletion learns of it from the new dump's tombstone.
        assert ok("import", str(old_dump), *admin, server=copy).lines() == [
            "imported 3 records (0 were already present)"
        ]
        assert ok("import", "-", *admin, stdin=new_dump, server=copy).lines() == [
            "imported 0 records (2 were already present)",
            "removed 1 records that the dump lists as deleted",
        ]
        assert ok("export", *admin, server=copy).stdout == new_dump
        # A dump from before tombstones (version 1) still imports, and is held to them too.
        version_1 = old_dump.read_bytes().replace(b'"version":2', b'"version":1', 1)
        assert "left out 1" in ok("import", "-", *admin, stdin=version_1, server=copy).out
        forced = ok("import", str(old_dump), "--force", *admin, server=copy)
        assert forced.lines() == ["imported 1 records (2 were already present)"]
        assert ok("export", *admin, server=copy).stdout == old_dump.read_bytes()


# -- stats and ping --------------------------------------------------------------------------------


def test_stats_prints_json_with_the_counts(populated: Populated) -> None:
    document = stats(populated.server)
    assert document["records"] == len(populated.records)
    assert document["users"] == 2
    assert document["corrupt_records"] == 0


def test_ping_answers_pong(server: RunningServer) -> None:
    result = ok("ping", server=server, console_script=True)
    assert re.fullmatch(rf"pong from {re.escape(server.address)} in \d+\.\d ms\n", result.out), result.out
    from_env = ok("ping", console_script=True, env=clean_env(PERFDB_SERVER=server.address))
    assert from_env.out.startswith(f"pong from {server.address} ")


def test_an_unreachable_server_exits_3_with_one_line(keys: Secrets) -> None:
    address = f"127.0.0.1:{closed_port()}"
    token = ("--token-file", str(keys.token_file(BOT_TOKEN, "bot.token")))
    admin = ("--admin-key-file", str(keys.admin_key_file))
    for command in (
        ("ping",),
        ("stats",),
        ("get-all",),
        ("get-user", BOT_USER),
        ("submit", str(FIXTURES / "grpc_scenario_result.json"), *token),
        ("export", *admin),
    ):
        result = perfdb(*command, "--server", address, "--timeout", "0.5")
        assert result.returncode == 3, (command, result.err)
        assert result.error_line().startswith(f"perfdb: {address}: "), result.err
        assert result.out == ""


def test_a_server_that_never_answers_exits_3(keys: Secrets) -> None:
    token = str(keys.token_file(BOT_TOKEN, "bot.token"))
    with silent_port() as port:
        address = f"127.0.0.1:{port}"
        pinged = perfdb("ping", "--server", address, "--timeout", "0.1")
        submitted = perfdb(
            "submit",
            str(FIXTURES / GRPC_RESULT_FILES[0]),
            "--token-file",
            token,
            "--server",
            address,
            "--timeout",
            "0.1",
        )
    for result in (pinged, submitted):
        assert result.returncode == 3, result.err
        assert result.error_line() == f"perfdb: {address}: no reply within 0.1s"
        assert result.out == ""


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_is_drawn_on_a_terminal_and_nowhere_else() -> None:
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = Progress("submitting", total=4, stream=stream)
        for _ in range(4):
            progress.advance()
            time.sleep(0.11)  # the bar redraws at most ten times a second
        progress.finish()
    assert pipe.getvalue() == ""
    drawn = terminal.getvalue()
    assert drawn.startswith("\rsubmitting [") and drawn.endswith("\n")
    assert "4/4 100%" in drawn


# -- regression detection ----------------------------------------------------------------------


def qps_records(values: list[float], tag: str = "main") -> bytes:
    """NDJSON of perfdb records of one series (test ci-bench), one per qps value, each with its own request id."""
    return b"".join(
        orjson.dumps(
            {"test_name": "ci-bench", "tag": tag, "metrics": {"qps": value}, "request_id": secrets.token_hex(8)}
        )
        + b"\n"
        for value in values
    )


def steady_qps(count: int, level: float = 1000.0, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, 0.01)) for _ in range(count)]


def test_submit_fail_on_regression_exits_1_with_the_evidence(detecting_server: RunningServer) -> None:
    server = detecting_server
    token = ("--token-file", str(server.bot_token_file))
    ok("submit", "-", *token, server=server, stdin=qps_records(steady_qps(30)))
    steady = ok("submit", "-", *token, "--fail-on-regression", server=server, stdin=qps_records([1001.0]))
    assert "REGRESSION" not in steady.out
    dropped = perfdb("submit", "-", *token, "--fail-on-regression", server=server, stdin=qps_records([850.0]))
    assert dropped.returncode == 1, dropped.err
    (evidence,) = [line for line in dropped.lines() if "REGRESSION" in line]
    assert "qps: 850 against a baseline of" in evidence and "n=30" in evidence and "higher is better" in evidence
    assert "1 metric(s) regressed" in dropped.err
    # Without the flag the verdict is printed but the exit code stays 0; --baseline-tag judges against main.
    pull_request = ok("submit", "-", *token, "--baseline-tag", "main", server=server, stdin=qps_records([850.0], "pr"))
    assert "REGRESSION qps" in pull_request.out


def test_regressions_lists_alerts_and_alert_changes_their_state(detecting_server: RunningServer) -> None:
    server = detecting_server
    token = ("--token-file", str(server.bot_token_file))
    shift = steady_qps(40) + steady_qps(30, 850.0, seed=2)
    ok("submit", "-", *token, server=server, stdin=qps_records(shift))
    server.process.wait_for_log(re.compile(r"alert [0-9a-f]{20}: static:ci-bot/ci-bench/main qps"), timeout=30)
    (alert,) = [orjson.loads(line) for line in ok("regressions", server=server).lines()]
    assert alert["state"] == "open" and alert["metric"] == "qps" and alert["user_id"] == BOT_USER
    table = ok("regressions", "--format", "table", "--test-name", "ci-bench", server=server).lines()
    assert table_cells(table[1])[:2] == [alert["alert_id"], "open"]
    lab = perfdb("alert", alert["alert_id"], "--state", "resolved", "--token-file", str(server.lab_token_file),
                 server=server)  # fmt: skip
    assert lab.returncode == 1 and "forbidden" in lab.err
    changed = ok("alert", alert["alert_id"], "--state", "acknowledged", "--note", "bisecting", *token, server=server)
    assert f"alert {alert['alert_id']}: acknowledged (by {BOT_USER}" in changed.out
    (acknowledged,) = [
        orjson.loads(line) for line in ok("regressions", "--state", "acknowledged", server=server).lines()
    ]
    assert acknowledged["note"] == "bisecting"
    admin = ok("alert", alert["alert_id"], "--state", "resolved", env=clean_env(PERFDB_ADMIN_KEY=ADMIN_KEY),
               server=server)  # fmt: skip
    assert "resolved (by admin" in admin.out
