"""The real tools, run here on tiny benchmarks: their output goes through `perfdb submit` to a real
server and is read back, and every stored value equals the tool's own figure (units converted
exactly). A missing tool skips its test with the reason, unless PERFDB_REQUIRE_TOOLS=1 (CI),
where it fails."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from perfdb.client.blocking import Client
from tests import test_cli
from tests.support import FIXTURES

SOURCES = FIXTURES / "tools" / "sources"
TOOL_TIMEOUT = 120.0  # a generous bound for a loaded machine: each run takes seconds


def require_tool(present: bool, what: str) -> None:
    if present:
        return
    reason = f"{what} is not installed (apt-get install it, or pip install it into .venv; see .ci/run)"
    if os.environ.get("PERFDB_REQUIRE_TOOLS") == "1":
        pytest.fail(f"PERFDB_REQUIRE_TOOLS=1 but {reason}")
    pytest.skip(reason)


# The environment without pytest-xdist's worker variables: pytest-benchmark, run inside a worker of
# this suite, would read them and turn itself off.
OUTSIDE_XDIST = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}


def run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False, env=env
    )
    assert completed.returncode == 0, f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr}"
    return completed.stdout


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> test_cli.Secrets:
    return test_cli.make_secrets(tmp_path_factory.mktemp("secrets"))


@pytest.fixture
def server(secrets: test_cli.Secrets, tmp_path: Path) -> Iterator[test_cli.RunningServer]:
    with test_cli.serving(secrets, tmp_path / "db") as running:
        yield running


def submit_and_read(server: test_cli.RunningServer, path: Path, count: int) -> dict[str, dict[str, Any]]:
    """Submit a tool's file with `perfdb submit` (twice: the second stores nothing) and read the
    records back, samples included, by test name."""
    token = ("--token-file", str(server.bot_token_file))
    first = test_cli.ok("submit", str(path), *token, server=server)
    assert len(test_cli.stored_ids(first.lines(), str(path))) == count
    assert first.err.endswith(f": {count} stored, 0 duplicate, 0 refused\n"), first.err
    again = test_cli.ok("submit", str(path), *token, server=server)
    assert len(test_cli.stored_ids(again.lines(), str(path), "duplicate")) == count
    with Client(server.address) as client:
        page = client.call("get_user", user_id=test_cli.BOT_USER, samples=True)
    records = {record["test_name"]: record for record in page["records"]}
    assert len(records) == count
    return records


def test_google_benchmark(server: test_cli.RunningServer, tmp_path: Path) -> None:
    require_tool(shutil.which("g++") is not None, "g++")
    require_tool(Path("/usr/include/benchmark/benchmark.h").exists(), "Google Benchmark (libbenchmark-dev)")
    binary = tmp_path / "gbench"
    run("g++", "-O1", str(SOURCES / "gbench.cc"), "-o", str(binary), "-lbenchmark", "-lpthread", cwd=tmp_path)
    out = tmp_path / "gbench.json"
    run(
        str(binary),
        "--benchmark_min_time=0.005",
        "--benchmark_repetitions=3",
        f"--benchmark_out={out}",
        "--benchmark_out_format=json",
        cwd=tmp_path,
    )
    rows = json.loads(out.read_text())["benchmarks"]
    records = submit_and_read(server, out, 3)
    for name, record in records.items():
        mine = [row for row in rows if row["run_name"] == name]
        mean = next(row for row in mine if row.get("aggregate_name") == "mean")
        stddev = next(row for row in mine if row.get("aggregate_name") == "stddev")
        assert record["metrics"]["real_time"] == mean["real_time"]
        assert record["metrics"]["cpu_time"] == mean["cpu_time"]
        assert record["metrics"]["cpu_time_stddev"] == stddev["cpu_time"]
        assert record["units"]["real_time"] == mean["time_unit"]
        repetitions = [row for row in mine if row["run_type"] == "iteration"]
        assert record["samples"]["cpu_time"] == [row["cpu_time"] for row in repetitions]
        assert record["run_time"].endswith("Z") and record["sys_info"]["num_cpus"] >= 1


def test_pytest_benchmark(server: test_cli.RunningServer, tmp_path: Path) -> None:
    require_tool(importlib.util.find_spec("pytest_benchmark") is not None, "pytest-benchmark")
    shutil.copy(SOURCES / "pytest_benchmark_tiny.py", tmp_path / "test_tiny.py")
    out = tmp_path / "pyb.json"
    run(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path),
        "test_tiny.py", f"--benchmark-json={out}", "--benchmark-min-rounds=5", "--benchmark-max-time=0.0001",
        cwd=tmp_path, env=OUTSIDE_XDIST,
    )  # fmt: skip
    document = json.loads(out.read_text())
    records = submit_and_read(server, out, 3)
    for bench in document["benchmarks"]:
        record = records[bench["fullname"]]
        for field in ("mean", "median", "min", "max", "stddev", "ops", "rounds"):
            assert record["metrics"][field] == bench["stats"][field]
        assert record["samples"] == {"time": bench["stats"]["data"]}
        assert record["sys_info"]["python_version"] == document["machine_info"]["python_version"]


def test_pyperf(server: test_cli.RunningServer, tmp_path: Path) -> None:
    require_tool(importlib.util.find_spec("pyperf") is not None, "pyperf")
    import pyperf  # type: ignore[import-untyped]

    out = tmp_path / "pyperf.json"
    run(sys.executable, str(SOURCES / "pyperf_tiny.py"), "-p", "2", "-n", "2", "-l", "10", "-w", "0", "-o", str(out),
        "-q", cwd=tmp_path)  # fmt: skip
    suite = pyperf.BenchmarkSuite.load(str(out))
    records = submit_and_read(server, out, 2)
    for bench in suite.get_benchmarks():
        record = records[bench.get_name()]
        assert record["metrics"]["mean"] == bench.mean()
        assert record["metrics"]["median"] == bench.median()
        assert record["metrics"]["stdev"] == bench.stdev()
        assert record["samples"] == {"time": list(bench.get_values())}
        assert record["units"]["mean"] == "s"


def test_hyperfine(server: test_cli.RunningServer, tmp_path: Path) -> None:
    require_tool(shutil.which("hyperfine") is not None, "hyperfine")
    out = tmp_path / "hyperfine.json"
    run("hyperfine", "-N", "--runs", "3", "--export-json", str(out), "true", "sleep 0.001", cwd=tmp_path)
    results = json.loads(out.read_text())["results"]
    records = submit_and_read(server, out, 2)
    for result in results:
        record = records[result["command"]]
        for field in ("mean", "stddev", "median", "user", "system", "min", "max"):
            assert record["metrics"][field] == result[field]
        assert record["samples"] == {"time": result["times"]}


GO_RESULT = re.compile(r"^(Benchmark\S+?)-\d+\s+\d+\s+(.*)$")


def test_go(server: test_cli.RunningServer, tmp_path: Path) -> None:
    require_tool(shutil.which("go") is not None, "go (golang-go)")
    (tmp_path / "go.mod").write_text("module example.com/tinybench\n\ngo 1.19\n")
    shutil.copy(SOURCES / "tiny_test.go", tmp_path / "tiny_test.go")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "GOPATH": str(tmp_path / "gopath")}
    env.setdefault("GOCACHE", str(Path.home() / ".cache" / "go-build"))
    output = run("go", "test", "-run", "^$", "-bench", ".", "-benchmem", "-benchtime", "200x", cwd=tmp_path, env=env)
    out = tmp_path / "go_bench.txt"
    out.write_text(output)
    records = submit_and_read(server, out, 3)
    lines = [GO_RESULT.match(line) for line in output.splitlines()]
    for found in filter(None, lines):
        record = records[found.group(1)]
        fields = found.group(2).split()
        figures = dict(zip(fields[1::2], fields[0::2], strict=True))
        assert record["metrics"]["time"] == float(figures["ns/op"])
        assert record["metrics"]["bytes_per_op"] == float(figures["B/op"])
        assert record["metrics"]["allocs_per_op"] == float(figures["allocs/op"])
        if "MB/s" in figures:
            assert record["metrics"]["throughput"] == float(Decimal(figures["MB/s"]) * 1_000_000)
            assert record["metrics"]["widgets_per_op"] == float(figures["widgets/op"])
        assert record["sys_info"]["goos"] and record["units"]["time"] == "ns"


def test_a_missing_tool_skips_unless_tools_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERFDB_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="frobnicator is not installed"):
        require_tool(False, "frobnicator")
    monkeypatch.setenv("PERFDB_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="PERFDB_REQUIRE_TOOLS=1 but frobnicator is not installed"):
        require_tool(False, "frobnicator")
    require_tool(True, "frobnicator")  # present: nothing happens
