"""`perfdb compare` end to end: the real CLI in a child process against a real server in another,
exiting 1 on a regression so that CI can gate on it; its output formats, and colour on a terminal only."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pty
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from perfdb.cli import elide_middle, write_compare_table
from perfdb.client import Client
from tests.support import REPO_ROOT, ServerProcess, closed_port_url, token_hash
from tests.test_cli import CLI_TIMEOUT, CliResult, clean_env, perfdb

TOKEN = "compare-bot-token-0123456789abcdef"
USER = "static:compare-bot"
LONG_TEST = "cpp_protobuf_async_streaming_from_client_qps_unconstrained_secure"
RUN_SIZE = 10
RED, GREEN = "\x1b[31m", "\x1b[32m"


@dataclasses.dataclass(frozen=True)
class Runs:
    address: str
    ids: dict[str, list[str]]  # tag -> record ids
    starts: dict[str, str]  # tag -> the timestamp of its first record (the runs were stored one after another)


# Each run's source commit, as an importer records it.
COMMITS = {tag: f"{digit}" * 7 + "abcdef" * 5 + "0" for tag, digit in (("v1", 1), ("v2", 2), ("v3", 3))}


def run(tag: str, unary_qps: float, seed: int) -> list[dict[str, Any]]:
    """RUN_SIZE results each of `unary` (at about `unary_qps`) and of a long-named test at about 5000
    qps, with 1 % seeded noise."""
    noise = random.Random(seed)
    return [
        {
            "test_name": test_name,
            "tag": tag,
            "metrics": {"qps": mean * noise.gauss(1, 0.01)},
            "source": {"commit": COMMITS[tag], "branch": "main"},
        }
        for _ in range(RUN_SIZE)
        for test_name, mean in (("unary", unary_qps), (LONG_TEST, 5000.0))
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    directory = tmp_path_factory.mktemp("compare")
    tokens_file = directory / "tokens.json"
    tokens_file.write_bytes(orjson.dumps({"tokens": [{"sha256": token_hash(TOKEN), "user_id": "compare-bot"}]}))
    with ServerProcess(
        "--address=127.0.0.1:0",
        f"--database={directory / 'db'}",
        f"--tokens-file={tokens_file}",
        f"--userinfo-url={closed_port_url()}",
    ) as process:
        address = f"127.0.0.1:{process.wait_listening()}"
        ids: dict[str, list[str]] = {}
        timestamps: dict[str, str] = {}
        with Client(address) as client:
            for tag, qps, seed in (("v1", 10_000.0, 1), ("v2", 9_000.0, 2), ("v3", 10_000.0, 3)):
                acks = [client.record(access_token=TOKEN, **fields) for fields in run(tag, qps, seed)]
                ids[tag] = [ack["record_id"] for ack in acks]
                timestamps[tag] = acks[0]["timestamp"]
        yield Runs(address, ids, timestamps)
        code, stderr = process.stop()
    assert code == 0 and "Traceback" not in stderr, stderr


def compare(runs: Runs, *args: str, env: dict[str, str] | None = None) -> CliResult:
    return perfdb("compare", *args, "--server", runs.address, env=env)


def test_a_regression_exits_1_and_comes_first(runs: Runs) -> None:
    result = compare(runs, "--base", "v1", "--head", "v2")
    assert result.returncode == 1, result.err
    header, first, second, blank, summary = result.lines()
    assert header.split() == ["test", "metric", "status", "change", "base", "mean", "±", "sd", "head", "mean", "±",
                              "sd", "base", "n", "head", "n", "p-value"]  # fmt: skip
    assert first.split()[:3] == ["unary", "qps", "regression"]
    assert first.split()[3].endswith("%") and -11.5 < float(first.split()[3][:-1]) < -8.5  # about -10 %
    assert second.split()[1:3] == ["qps", "no_change"]
    # The long name keeps its distinguishing tail; the columns line up under the header.
    assert second.startswith("cpp_protobuf_as…_client_qps_unconstrained_secure  ")
    assert len({len(line) for line in (header, first, second)}) == 1
    assert first.index("regression") == header.index("status")
    assert blank == "" and summary == "regressions: 1, improvements: 0, no change: 1, insufficient data: 0 " \
        "(base 20 records, head 20 records)"  # fmt: skip
    assert "\x1b[" not in result.out  # not a terminal: no colour
    assert result.err == ""


def test_no_regression_exits_0(runs: Runs) -> None:
    result = compare(runs, "--base", "v1", "--head", "v3", "--test", "unary", "--user", USER)
    assert result.returncode == 0, result.err
    assert [line.split()[:3] for line in result.lines()[1:2]] == [["unary", "qps", "no_change"]]
    improvement = compare(runs, "--base", "v2", "--head", "v1", "--test", "unary")
    assert improvement.returncode == 0 and improvement.lines()[1].split()[2] == "improvement"


def test_csv_and_json_output_parse(runs: Runs) -> None:
    as_csv = compare(runs, "--base", "v1", "--head", "v2", "--format", "csv")
    as_json = compare(runs, "--base", "v1", "--head", "v2", "--format", "json")
    assert as_csv.returncode == as_json.returncode == 1
    rows = list(csv.DictReader(io.StringIO(as_csv.out)))
    reply = orjson.loads(as_json.stdout)
    assert [(r["test_name"], r["status"]) for r in rows] == [("unary", "regression"), (LONG_TEST, "no_change")]
    assert [(r["test_name"], r["status"]) for r in reply["rows"]] == [(r["test_name"], r["status"]) for r in rows]
    unary = rows[0]
    assert int(unary["base_n"]) == int(unary["head_n"]) == RUN_SIZE
    assert float(unary["change_percent"]) == pytest.approx(reply["rows"][0]["change_percent"])
    assert float(unary["pvalue"]) < 0.05 and unary["test"] == "welch_t+mann_whitney_u"
    assert reply["base"]["records"] == reply["head"]["records"] == 2 * RUN_SIZE
    assert "id" not in reply and "ok" not in reply


def test_record_ids_and_windows_select_the_runs(runs: Runs) -> None:
    by_ids = compare(runs, "--base-records", ",".join(runs.ids["v1"]), "--head-records", ",".join(runs.ids["v2"]))
    v1_window = ("--base-until", runs.starts["v2"])
    v2_window = ("--head-since", runs.starts["v2"], "--head-until", runs.starts["v3"])
    by_window = compare(runs, *v1_window, *v2_window, "--test", "unary", "--format", "json")
    assert by_ids.returncode == 1 and by_ids.lines()[1].split()[:3] == ["unary", "qps", "regression"]
    assert by_window.returncode == 1
    reply = orjson.loads(by_window.stdout)
    assert reply["base"]["records"] == reply["head"]["records"] == RUN_SIZE
    assert [(r["metric"], r["status"]) for r in reply["rows"]] == [("qps", "regression")]


def test_commits_select_the_runs(runs: Runs) -> None:
    result = compare(runs, "--base-commit", COMMITS["v1"][:7], "--head-commit", COMMITS["v2"], "--format", "json")
    assert result.returncode == 1, result.err
    reply = orjson.loads(result.stdout)
    assert reply["base"]["records"] == reply["head"]["records"] == 2 * RUN_SIZE
    assert reply["rows"][0]["test_name"] == "unary" and reply["rows"][0]["status"] == "regression"


def test_a_selector_that_matches_nothing_is_no_regression(runs: Runs) -> None:
    result = compare(runs, "--base", "v1", "--head", "no-such-tag")
    assert result.returncode == 0
    assert result.out == "(no test and metric on both sides: base 20 records, head 0 records)\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--head", "v2"), "base: give exactly one of --base TAG"),
        (("--base", "v1", "--base-records", "x", "--head", "v2"), "base: give exactly one of"),
        (("--base", "v1", "--head", "v2", "--head-since", "2026-01-01T00:00:00Z"), "head: give exactly one of"),
        (("--base-records", ",,", "--head", "v2"), "--base-records: no record ids"),
        (("--base-records", "abc", "--head", "v2"), "base: record_ids[0]: is not a perfdb record id"),
        (("--base-commit", "xyz", "--head", "v2"), "base: commit: must be a commit sha"),
        (("--base", "v1", "--base-commit", "1111111", "--head", "v2"), "base: give exactly one of"),
        (("--base-since", "yesterday", "--head", "v2"), "base: since: must be an RFC 3339 timestamp"),
    ],
)
def test_usage_errors_exit_2(runs: Runs, args: tuple[str, ...], message: str) -> None:
    result = compare(runs, *args)
    assert result.returncode == 2
    assert message in result.error_line()
    assert result.out == ""


def test_colour_on_a_terminal_only(runs: Runs) -> None:
    on_terminal = on_a_pty("--server", runs.address, "--base", "v1", "--head", "v2")
    assert RED in on_terminal and "\x1b[0m" in on_terminal
    regression_line = next(line for line in on_terminal.splitlines() if "regression" in line and RED in line)
    assert regression_line.startswith(RED + "unary")
    assert not any(GREEN in line or RED in line for line in on_terminal.splitlines() if "no_change" in line)
    improvement = on_a_pty("--server", runs.address, "--base", "v2", "--head", "v1", "--test", "unary")
    assert GREEN + "unary" in improvement
    assert "\x1b[" not in on_a_pty("--server", runs.address, "--base", "v1", "--head", "v2", no_color=True)
    forced = compare(runs, "--base", "v1", "--head", "v2", "--color", "always")
    assert forced.lines()[1].startswith(RED + "unary")
    assert "\x1b[" not in compare(runs, "--base", "v1", "--head", "v2", "--color", "never").out


def on_a_pty(*args: str, no_color: bool = False) -> str:
    """The CLI's stdout when stdout is a terminal."""
    controller, terminal = pty.openpty()
    env = clean_env()
    env.pop("NO_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    with subprocess.Popen(
        [sys.executable, "-m", "perfdb.cli", "compare", *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
    ) as process:
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(controller)
        _, stderr = process.communicate(timeout=CLI_TIMEOUT)
    assert process.returncode in (0, 1) and b"Traceback" not in stderr, stderr
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_the_table_formats_large_counts_and_elides_long_names() -> None:
    side = {"n": 1_403_434, "mean": 1_403_434.4, "stddev": 12_345.6, "median": 1_400_000.0}
    reply = {
        "base": {"records": 1_403_434},
        "head": {"records": 2_000_000},
        "rows": [
            {
                "test_name": "t", "metric": "custom_count", "status": "no_change", "change_percent": 0.0,
                "base": side, "head": side, "pvalue": 1.0,
            }
        ],
    }  # fmt: skip
    out = io.StringIO()
    write_compare_table(reply, out, colour=False)
    row = out.getvalue().splitlines()[1].split()
    assert row == ["t", "custom_count", "no_change", "+0.0%", "1,403,434", "12,346", "1,403,434", "12,346",
                   "1,403,434", "1,403,434", "1"]  # fmt: skip
    assert "(base 1,403,434 records, head 2,000,000 records)" in out.getvalue()
    assert elide_middle("short", 10) == "short"
    assert elide_middle("abcdefghijklmnopqrstuvwxyz", 10) == "abc…uvwxyz"
    assert len(elide_middle(LONG_TEST, 48)) == 48 and elide_middle(LONG_TEST, 48).endswith("unconstrained_secure")


def test_help_names_every_option() -> None:
    result = perfdb("compare", "--help")
    assert result.returncode == 0
    for option in ("--base", "--head", "--base-records", "--head-since", "--base-until", "--test", "--user",
                   "--format", "--color"):  # fmt: skip
        assert option in result.out
