"""The importers on real output of each tool (tests/fixtures/tools/, see its README): one record per
benchmark with the tool's own figures, units, samples, machine, commit and date; detection by
content; and a clear error, naming the file and the formats tried, for anything else."""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path
from typing import Any

import orjson
import pytest

from perfdb.importers import FORMATS, ImportFormatError, import_file
from perfdb.records.schema import MAX_SAMPLES, parse_record
from tests.support import FIXTURES

TOOLS = FIXTURES / "tools"
EVERY_FILE = {
    "google-benchmark": ["plain.json", "repetitions.json"],
    "pytest-benchmark": ["parametrized.json"],
    "pyperf": ["timeit.json"],
    "hyperfine": ["commands.json", "parameters.json"],
    "go": ["benchmem.txt"],
    "criterion": ["many.txt", "throughput.txt"],
    "jmh": ["latency.json", "throughput.json"],
}
FIXTURE_FILES = [(tool, TOOLS / tool / name) for tool, names in EVERY_FILE.items() for name in names]


def imported(path: Path, file_format: str = "auto") -> list[dict[str, Any]]:
    found_format, records = import_file(path.read_bytes(), str(path), file_format)
    assert found_format == path.parent.name
    return records


def raw(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.mark.parametrize(("tool", "path"), FIXTURE_FILES, ids=[f"{t}/{p.name}" for t, p in FIXTURE_FILES])
def test_every_fixture_is_detected_and_every_record_passes_the_servers_checks(tool: str, path: Path) -> None:
    detected, records = import_file(path.read_bytes(), str(path))
    assert detected == tool
    assert records == import_file(path.read_bytes(), str(path), tool)[1]  # the same as naming the format
    assert records
    for fields in records:
        parse_record({"op": "record", "access_token": "t", **fields})  # raises on anything the server refuses
        assert set(fields["units"]) <= set(fields["metrics"]) | set(fields.get("samples", {}))


def test_a_gzip_compressed_file_reads_as_its_content() -> None:
    path = TOOLS / "pyperf" / "timeit.json"
    assert import_file(gzip.compress(path.read_bytes()), "timeit.json.gz") == ("pyperf", imported(path))


# -- each tool's figures ------------------------------------------------------------------------


def test_google_benchmark_one_record_per_benchmark_with_its_counters_and_context() -> None:
    path = TOOLS / "google-benchmark" / "plain.json"
    document = raw(path)
    records = imported(path)
    assert [r["test_name"] for r in records] == [row["name"] for row in document["benchmarks"]]
    for record, row in zip(records, document["benchmarks"], strict=True):
        assert record["metrics"]["real_time"] == row["real_time"]
        assert record["metrics"]["cpu_time"] == row["cpu_time"]
        assert record["units"]["real_time"] == record["units"]["cpu_time"] == row["time_unit"]
        assert record["metrics"]["iterations"] == row["iterations"]
        if "bytes_per_second" in row:
            assert record["metrics"]["bytes_per_second"] == row["bytes_per_second"]
            assert record["units"]["bytes_per_second"] == "B/s"
            assert record["metrics"]["items"] == row["items"]  # a user counter
        assert "samples" not in record  # one run: nothing beyond the figures
        assert record["run_time"] == "2026-12-07T16:55:38.000000Z"
        assert record["sys_info"]["num_cpus"] == document["context"]["num_cpus"]
        assert "date" not in record["sys_info"]
        assert record["better"]["real_time"] == "lower"


def test_google_benchmark_aggregates_are_statistics_of_one_record_and_repetitions_its_samples() -> None:
    path = TOOLS / "google-benchmark" / "repetitions.json"
    rows = raw(path)["benchmarks"]
    records = imported(path)
    assert [r["test_name"] for r in records] == ["BM_StringCopy/8", "BM_StringCopy/512", "BM_VectorPush"]
    for record in records:
        mine = [row for row in rows if row["run_name"] == record["test_name"]]
        aggregate = {row["aggregate_name"]: row for row in mine if row["run_type"] == "aggregate"}
        repetitions = [row for row in mine if row["run_type"] == "iteration"]
        metrics = record["metrics"]
        assert metrics["real_time"] == aggregate["mean"]["real_time"]
        assert metrics["real_time_median"] == aggregate["median"]["real_time"]
        assert metrics["cpu_time_stddev"] == aggregate["stddev"]["cpu_time"]
        assert metrics["real_time_cv"] == aggregate["cv"]["real_time"]
        assert record["units"]["real_time_cv"] == "1" and record["units"]["real_time_stddev"] == "ns"
        assert record["samples"] == {
            "real_time": [row["real_time"] for row in repetitions],
            "cpu_time": [row["cpu_time"] for row in repetitions],
        }
        assert "iterations" not in metrics  # an aggregate's iterations count repetitions, not iterations


def test_pytest_benchmark_statistics_samples_machine_commit_and_date() -> None:
    path = TOOLS / "pytest-benchmark" / "parametrized.json"
    document = raw(path)
    records = imported(path)
    assert [r["test_name"] for r in records] == [
        "test_tiny.py::test_sum[10]",
        "test_tiny.py::test_sum[1000]",
        "test_tiny.py::test_join",
    ]
    for record, bench in zip(records, document["benchmarks"], strict=True):
        stats = bench["stats"]
        for field in ("min", "max", "mean", "stddev", "median", "iqr", "ops", "rounds", "iterations"):
            assert record["metrics"][field] == stats[field], field
        assert record["units"]["mean"] == "s" and record["units"]["ops"] == "ops/s"
        assert record["samples"] == {"time": stats["data"]}
        assert record["sys_info"] == document["machine_info"]
        assert record["run_time"] == document["datetime"].replace("+00:00", "Z")
        assert record["source"] == {
            "commit": document["commit_info"]["id"],
            "branch": document["commit_info"]["branch"],
            "commit_time": document["commit_info"]["time"].replace("+00:00", ".000000Z"),
            "repository": document["commit_info"]["project"],
        }
        assert record["better"]["ops"] == "higher" and record["better"]["mean"] == "lower"
    assert records[2]["metrics"]["extra.items"] == 4


def test_pyperf_statistics_as_pyperf_computes_them() -> None:
    path = TOOLS / "pyperf" / "timeit.json"
    document = raw(path)
    records = imported(path)
    assert [r["test_name"] for r in records] == ["sort_list", "sum_range"]
    for record, bench in zip(records, document["benchmarks"], strict=True):
        values = [value for run in bench["runs"] for value in run.get("values", [])]
        assert record["samples"] == {"time": values}
        assert record["metrics"]["mean"] == statistics.mean(values)
        assert record["metrics"]["stdev"] == statistics.stdev(values)
        assert record["metrics"]["median"] == statistics.median(values)
        assert (record["metrics"]["min"], record["metrics"]["max"]) == (min(values), max(values))
        assert record["units"]["mean"] == "s"
        assert record["sys_info"]["cpu_count"] == document["metadata"]["cpu_count"]
        assert record["run_time"].startswith("2026-12-07T")


def test_hyperfine_one_record_per_command_with_its_runs() -> None:
    path = TOOLS / "hyperfine" / "parameters.json"
    results = raw(path)["results"]
    records = imported(path)
    assert [r["test_name"] for r in records] == ["sleep 0.001", "sleep 0.002"]
    for record, result in zip(records, results, strict=True):
        for field in ("mean", "stddev", "median", "user", "system", "min", "max"):
            assert record["metrics"][field] == result[field]
            assert record["units"][field] == "s"
        assert record["samples"] == {"time": result["times"]}
        assert "run_time" not in record and "sys_info" not in record  # hyperfine writes neither


def test_go_benchmem_columns_custom_units_and_counted_runs() -> None:
    path = TOOLS / "go" / "benchmem.txt"
    records = {r["test_name"]: r for r in imported(path)}
    assert list(records) == ["BenchmarkJoin", "BenchmarkSprintf/size=1", "BenchmarkSprintf/size=64"]
    join = records["BenchmarkJoin"]
    assert join["samples"]["time"] == [98.59, 260.3]  # -count 2: each run ...
    assert join["metrics"]["time"] == statistics.mean([98.59, 260.3])  # ... and their mean
    assert join["metrics"]["bytes_per_op"] == 8 and join["units"]["bytes_per_op"] == "B/op"
    assert join["metrics"]["allocs_per_op"] == 1 and join["units"]["allocs_per_op"] == "allocs/op"
    sprintf = records["BenchmarkSprintf/size=64"]
    assert sprintf["samples"]["throughput"] == [53_500_000, 109_380_000]  # MB/s is 10^6 B/s, converted exactly
    assert sprintf["units"]["throughput"] == "B/s"
    assert sprintf["metrics"]["widgets_per_op"] == 128.0 and sprintf["units"]["widgets_per_op"] == "widgets/op"
    assert sprintf["sys_info"] == {
        "goos": "linux",
        "goarch": "amd64",
        "pkg": "example.com/tinybench",
        "cpu": "AMD EPYC",
        "gomaxprocs": 2,
    }


def test_go_keeps_the_procs_suffix_when_a_file_runs_a_benchmark_under_several_cpu_values() -> None:
    text = (
        "pkg: example.com/x\n"
        "BenchmarkLock-1   \t 1000\t 10.5 ns/op\n"
        "BenchmarkLock-4   \t 1000\t 30.25 ns/op\n"
        "BenchmarkOnly-4   \t 1000\t 7 ns/op\n"
    )
    _, records = import_file(text.encode(), "cpu.txt")
    assert [(r["test_name"], r["metrics"]["time"]) for r in records] == [
        ("BenchmarkLock-1", 10.5),
        ("BenchmarkLock-4", 30.25),
        ("BenchmarkOnly", 7),
    ]


def test_criterion_estimates_in_ns_whatever_unit_it_printed() -> None:
    records = {r["test_name"]: r for r in imported(TOOLS / "criterion" / "many.txt")}
    assert list(records) == [
        "file",
        "rolling_file",
        "tracing_file",
        "tracing_rolling_file",
        "benchmark: name with spaces",
    ]
    assert records["file"]["metrics"] == {"time_lower": 0.32062, "time": 0.3239, "time_upper": 0.32755}  # ps
    assert records["tracing_file"]["metrics"] == {"time_lower": 16652, "time": 18019, "time_upper": 19562}  # µs
    assert records["benchmark: name with spaces"]["metrics"]["time"] == 20.93
    assert all(unit == "ns" for record in records.values() for unit in record["units"].values())


def test_criterion_long_names_on_their_own_line_and_throughput() -> None:
    records = imported(TOOLS / "criterion" / "throughput.txt")
    assert [r["test_name"] for r in records] == [
        "execution/naive/select_1_column/10",
        "execution/naive/select_1_column/100",
    ]
    assert records[0]["metrics"]["time"] == 7715.2
    assert records[0]["metrics"]["throughput"] == 1_296_100  # 1.2961 Melem/s
    assert records[1]["metrics"]["throughput_upper"] == 3_235_200
    assert records[0]["units"]["throughput"] == "elem/s"
    assert records[0]["better"]["throughput"] == "higher"


def test_criterion_byte_throughput_prefixes_are_binary_or_decimal_as_printed() -> None:
    text = "copy   time:   [1.0000 ms 2.0000 ms 3.0000 ms]\n        thrpt:  [1.5000 KiB/s 2.0000 MB/s 1.0000 GiB/s]\n"
    [record] = import_file(text.encode(), "bytes.txt")[1]
    assert record["metrics"]["throughput_lower"] == 1536
    assert record["metrics"]["throughput"] == 2_000_000
    assert record["metrics"]["throughput_upper"] == 1024**3
    assert record["metrics"]["time"] == 2_000_000  # ms in ns


def test_jmh_score_error_percentiles_and_iterations() -> None:
    path = TOOLS / "jmh" / "throughput.json"
    [entry] = raw(path)
    [record] = imported(path)
    primary = entry["primaryMetric"]
    assert record["test_name"] == "org.openjdk.jmh.samples.JMHSample_01_HelloWorld.wellHelloThere"
    assert record["metrics"]["score"] == primary["score"]
    assert record["metrics"]["score_error"] == primary["scoreError"]
    assert record["metrics"]["score_p99.9"] == primary["scorePercentiles"]["99.9"]
    assert record["metrics"]["score_p0"] == primary["scorePercentiles"]["0.0"]
    assert record["units"]["score"] == "ops/s" and record["better"]["score"] == "higher"
    assert record["samples"] == {"score": primary["rawData"][0]}
    assert record["sys_info"]["jdkVersion"] == "1.8.0_202"
    [latency] = imported(TOOLS / "jmh" / "latency.json")
    assert latency["units"]["score"] == "s/op" and latency["better"]["score"] == "lower"


def test_jmh_parameters_are_part_of_the_test_name() -> None:
    entry = raw(TOOLS / "jmh" / "throughput.json")[0]
    entry["params"] = {"computeType": "Caffeine", "size": "10"}
    [record] = import_file(orjson.dumps([entry]), "params.json")[1]
    assert record["test_name"] == f"{entry['benchmark']}[computeType=Caffeine,size=10]"


def test_samples_beyond_the_servers_bound_are_left_out_and_the_statistics_kept() -> None:
    document = raw(TOOLS / "hyperfine" / "commands.json")
    document["results"][0]["times"] = [0.001] * (MAX_SAMPLES + 1)
    records = import_file(orjson.dumps(document), "long.json")[1]
    assert "samples" not in records[0] and records[0]["metrics"]["mean"] == document["results"][0]["mean"]
    assert "samples" in records[1]


# -- what is not a known format ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"QPS: 1000 (not a benchmark format)\n", "no benchmark format recognised"),
        (b'{"hello": "world"}', "a JSON document of no known shape"),
        (b"[1, 2, 3]", "a JSON document of no known shape"),
    ],
)
def test_unknown_input_names_the_file_and_the_formats_tried(content: bytes, expected: str) -> None:
    with pytest.raises(ImportFormatError) as raised:
        import_file(content, "results.out")
    message = str(raised.value)
    assert message.startswith("results.out: ") and expected in message
    if expected != "empty":
        assert "formats tried: " + ", ".join(FORMATS) in message


@pytest.mark.parametrize(("tool", "path"), [f for f in FIXTURE_FILES if f[1].suffix == ".json"], ids=str)
def test_a_truncated_json_file_is_refused_whole(tool: str, path: Path) -> None:
    content = path.read_bytes()
    with pytest.raises(ImportFormatError) as raised:
        import_file(content[: len(content) // 2], "cut.json")
    assert str(raised.value).startswith("cut.json: no benchmark format recognised, JSON that does not parse")
    with pytest.raises(ImportFormatError, match=r"^cut.json: not .*not JSON"):
        import_file(content[: len(content) // 2], "cut.json", tool)


def test_a_truncated_gzip_file_is_refused() -> None:
    packed = gzip.compress((TOOLS / "pyperf" / "timeit.json").read_bytes())
    with pytest.raises(ImportFormatError, match=r"^t.json.gz: a truncated gzip file"):
        import_file(packed[: len(packed) // 2], "t.json.gz")


def test_a_file_of_the_right_shape_with_a_bad_entry_names_the_entry_and_stores_nothing() -> None:
    document = raw(TOOLS / "google-benchmark" / "plain.json")
    document["benchmarks"][1]["time_unit"] = "fortnights"
    with pytest.raises(ImportFormatError) as raised:
        import_file(orjson.dumps(document), "gb.json")
    message = str(raised.value)
    assert "BM_StringCopy/512" in message and "fortnights" in message and "formats tried" in message


def test_the_wrong_format_named_explicitly_says_what_was_expected() -> None:
    path = TOOLS / "hyperfine" / "commands.json"
    with pytest.raises(ImportFormatError, match=r"not Google Benchmark JSON"):
        import_file(path.read_bytes(), "h.json", "google-benchmark")
    with pytest.raises(ImportFormatError, match=r"no Benchmark result lines"):
        import_file(path.read_bytes(), "h.json", "go")
    with pytest.raises(ImportFormatError, match=r"unknown format 'nope'"):
        import_file(path.read_bytes(), "h.json", "nope")


def test_grpc_ndjson_with_a_bad_line_is_refused_whole_naming_the_line() -> None:
    lines = [orjson.dumps({"test_name": f"t{i}", "metrics": {"qps": i}}) for i in range(3)]
    lines.insert(2, b"{not json")
    with pytest.raises(ImportFormatError, match=r"^many.ndjson: line 3: not JSON"):
        import_file(b"\n".join(lines), "many.ndjson")
