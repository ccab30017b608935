"""perfdb load benchmarks: every figure, against this machine's limits measured in the same run.

    python benchmarks/run.py [--quick] [--json FILE]
    python benchmarks/run.py --web [--quick] [--json FILE]    (the dashboard: benchmarks/web.py)
    python benchmarks/run.py --get-all RECORDS [--database DIR]    (only the get_all figures)

The server runs as its own process on a fresh database; the load generator (loadgen.py) is
another process. Baselines, in the same run and on the same records: the store's own write
limit (store_baseline.py) and the load generator against a trivial echo server
(echo_server.py). benchmarks/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import plyvel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from loadgen import SENDING  # noqa: E402
from workload import USERS, write_tokens_file  # noqa: E402

GET_USER_ID = USERS - 1  # the user who gets 10,000 records of their own
# The half-load ingest beside the get_user reads is sized for this long (its lines are made up
# front); the reads take seconds.
READS_UNDER_LOAD_MAX_SECONDS = 60
LISTENING = re.compile(r"listening on [^\s:]+:(\d+)|listening on \[[^\]]+\]:(\d+)")


@dataclasses.dataclass(frozen=True)
class Sizes:
    ingest_records: int  # records per saturated-ingest measurement
    paced_seconds: float  # length of the half-load latency measurement
    user_records: int  # records of the get_user user
    user_read_rounds: int
    big_records: int  # database size for get_all, peak RSS and growth


QUICK = Sizes(ingest_records=30_000, paced_seconds=3.0, user_records=10_000, user_read_rounds=5, big_records=100_000)
FULL = Sizes(
    ingest_records=200_000, paced_seconds=10.0, user_records=10_000, user_read_rounds=30, big_records=1_000_000
)

# Targets on this 2-core machine; figure -> (comparison, bound).
TARGETS: dict[str, tuple[str, float]] = {
    "ingest_ratio": (">=", 0.5),
    "ack_p99_ms": ("<=", 5.0),
    "get_user_p99_ms": ("<=", 20.0),
    "get_all_rps": (">=", 150_000),
    "server_peak_rss_mb": ("<=", 200.0),
    "growth_ratio": (">=", 0.8),
    "ingest_detect_ratio": (">=", 0.9),
    "ingest_batch_ratio": (">=", 0.8),
    "cpu_ratio": ("<=", 2.0),
}
BATCH_RECORDS = 100  # records per record_batch line in the batch figure


def progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def run_json(command: list[str], timeout: float = 900) -> dict[str, Any]:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    result: dict[str, Any] = orjson.loads(completed.stdout.strip().splitlines()[-1])
    return result


class Process:
    """A server process whose log goes to a file; knows its port once it listens."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            self.port = self._wait_listening()
        except BaseException:
            self.stop()  # a server that never listened would otherwise outlive the run, holding its database
            raise

    def _wait_listening(self, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1) or match.group(2))
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("server did not start listening")

    def memory_mb(self, field: str) -> float:
        """A /proc status figure: VmHWM (peak resident set) or RssAnon (private memory now)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"{field}:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else float("nan")

    def cpu_seconds(self) -> float:
        """CPU time the process has used so far: every thread, and any child it has reaped."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime: fields 14-17 of stat(5), counted after the ")".
        return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@contextlib.contextmanager
def perfdb_server(work: Path, database: Path, *flags: str) -> Iterator[Process]:
    command = python(
        str(ROOT / "run_perf_db_server.py"),
        "--address=127.0.0.1:0",
        f"--database={database}",
        f"--tokens-file={work / 'tokens.json'}",
        "--userinfo-url=http://127.0.0.1:9/userinfo",
        "--user-rate=0",  # the load is many records per user, on purpose
        *flags,
    )
    server = Process(command, work / f"server-{time.monotonic_ns()}.log")
    try:
        yield server
    finally:
        server.stop()


def loadgen(mode: str, port: int, *args: str) -> dict[str, Any]:
    return run_json(python(str(HERE / "loadgen.py"), mode, "--port", str(port), *args))


def ingest(port: int, records: int, start: int, *extra: str, window: int = 256) -> dict[str, Any]:
    result = loadgen("ingest", port, "--records", str(records), "--start", str(start),
                     "--connections", "16", "--window", str(window), *extra)  # fmt: skip
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} of {records} records were refused: the figures would be wrong")
    return result


# Longest compact() waits for LevelDB's own compactions to settle the levels.
SETTLE_SECONDS = 300


def compact(database: Path) -> None:
    """Compact the whole keyspace (server stopped), so no background compaction competes with
    what is measured next.

    LevelDB's compact_range moves everything down to the deepest level that held files, which
    then holds more than that level's size budget (10 MiB for level 1, ten times more a level
    down): the next server to open the database would spend its first minutes compacting it
    further, during the measurement. So this waits, the database open, until LevelDB's own
    compactions have brought every level within its budget and nothing has moved for a second
    (LevelDB prints sizes rounded to whole MiB, so a level shown at its budget is within it; and
    after SETTLE_SECONDS it goes on regardless, saying so)."""
    db = plyvel.DB(str(database))
    try:
        db.compact_range()
        previous = None
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            levels = _level_sizes_mb(db)
            if levels == previous and all(size <= 10 * 10 ** (level - 1) for level, size in levels if level > 0):
                return
            if time.monotonic() > deadline:
                progress(f"LevelDB's levels did not settle within {SETTLE_SECONDS} s: {levels}; going on")
                return
            previous = levels
            time.sleep(1.0)
    finally:
        db.close()


def _level_sizes_mb(db: plyvel.DB) -> list[tuple[int, float]]:
    """(level, MiB) of each level that holds files, from LevelDB's stats table."""
    stats = (db.get_property(b"leveldb.stats") or b"").decode()
    return [
        (int(fields[0]), float(fields[2]))
        for fields in map(str.split, stats.splitlines())
        if fields[:1] != [] and fields[0].isdigit()
    ]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}


def measure_get_all(work: Path, big: Path, records: int) -> dict[str, Any]:
    """get_all_rps, server_peak_rss_mb and server_peak_anon_mb: a fresh server process streams
    the database at `big` to one reader through get_all pages of 5,000."""
    progress(f"get_all: streaming {records:,} records in pages of 5,000, fresh server process")
    with perfdb_server(work, big) as server:
        peak_anon = 0.0
        stop_sampling = threading.Event()

        def sample_anon() -> None:
            nonlocal peak_anon
            while not stop_sampling.wait(0.02):
                peak_anon = max(peak_anon, server.memory_mb("RssAnon"))

        sampler = threading.Thread(target=sample_anon)
        sampler.start()
        try:
            result = loadgen("read-all", server.port, "--page-size", "5000")
        finally:
            stop_sampling.set()
            sampler.join()
        return {
            "get_all_rps": result["rps"],
            "get_all_records": result["records"],
            "server_peak_rss_mb": server.memory_mb("VmHWM"),
            "server_peak_anon_mb": peak_anon,
        }


def run_get_all(records: int, work: Path, database: Path | None) -> dict[str, Any]:
    """Only the get_all figures, over `records` records: loaded (no-sync) and compacted as in the
    full run, into `database` when given and not there yet, so that runs can be repeated on it."""
    figures: dict[str, Any] = {"machine": machine(), "sizes": {"big_records": records}}
    write_tokens_file(work / "tokens.json")
    big = database if database is not None else work / "db-big"
    if not (big / "CURRENT").exists():
        progress(f"filling a database with {records:,} records (no-sync)")
        with perfdb_server(work, big, "--no-sync") as server:
            for start in range(0, records, 250_000):
                ingest(server.port, min(250_000, records - start), start)
        progress("compacting the database")
        compact(big)
    figures.update(measure_get_all(work, big, records))
    return figures


def run(sizes: Sizes, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"machine": machine(), "sizes": dataclasses.asdict(sizes)}
    write_tokens_file(work / "tokens.json")
    next_record = 0

    def take(count: int) -> int:
        nonlocal next_record
        first, next_record = next_record, next_record + count
        return first

    progress(f"store baseline: {sizes.ingest_records:,} records into plyvel, batches of 1,000, sync")
    store = run_json(python(str(HERE / "store_baseline.py"), "--records", str(sizes.ingest_records),
                            "--database", str(work / "store-baseline")))  # fmt: skip
    figures["store_limit_rps"] = store["rps"]
    figures["store_cpu_us_per_record"] = store["cpu_seconds"] / store["records"] * 1e6

    progress("echo baseline: the load generator against a trivial NDJSON echo server")
    echo = Process(python(str(HERE / "echo_server.py")), work / "echo.log")
    try:
        figures["echo_rps"] = ingest(echo.port, sizes.ingest_records, 0)["rps"]
    finally:
        echo.stop()

    progress("durable ingest at saturation (sync commits)")
    with perfdb_server(work, work / "db-durable") as server:
        cpu_before = server.cpu_seconds()
        figures["ingest_durable_rps"] = ingest(server.port, sizes.ingest_records, take(sizes.ingest_records))["rps"]
        cpu = server.cpu_seconds() - cpu_before
        figures["server_cpu_us_per_record"] = cpu / sizes.ingest_records * 1e6
        rate = figures["ingest_durable_rps"] / 2
        progress(f"ack latency at half load: {rate:,.0f} records/s for {sizes.paced_seconds:g}s")
        count = int(rate * sizes.paced_seconds)
        paced = loadgen("paced", server.port, "--records", str(count), "--start", str(take(count)),
                        "--rate", str(rate), "--connections", "16")  # fmt: skip
        figures.update(ack_p50_ms=paced["p50_ms"], ack_p99_ms=paced["p99_ms"], ack_max_ms=paced["max_ms"])
        progress(f"get_user: one user with {sizes.user_records:,} records, read in full pages of 1,000, "
                 f"while {rate:,.0f} records/s are stored")  # fmt: skip
        ingest(server.port, sizes.user_records, take(sizes.user_records), "--single-user", str(GET_USER_ID))
        # The half-load ingest (of the other users' records) runs until the reads are done, and
        # is stopped then: its count only needs to outlast them. The reads start once it sends.
        count = int(rate * READS_UNDER_LOAD_MAX_SECONDS)
        paced_beside = subprocess.Popen(
            python(str(HERE / "loadgen.py"), "paced", "--port", str(server.port), "--records", str(count),
                   "--start", str(take(count)), "--rate", str(rate), "--connections", "16",
                   "--users", str(GET_USER_ID)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            assert paced_beside.stderr is not None
            if paced_beside.stderr.readline().strip() != SENDING:
                raise RuntimeError("the half-load ingest beside the get_user reads did not start")
            reads = loadgen("read-user", server.port, "--user-id", f"static:bench-{GET_USER_ID:04d}",
                            "--rounds", str(sizes.user_read_rounds), "--page-size", "1000")  # fmt: skip
            ingest_went_on = paced_beside.poll() is None
        finally:
            paced_beside.kill()
            paced_beside.wait()
        if not ingest_went_on:
            raise RuntimeError("the half-load ingest ended before the get_user reads: the figures would be idle ones")
        figures.update(
            get_user_p50_ms=reads["page_p50_ms"],
            get_user_p99_ms=reads["page_p99_ms"],
            get_user_full_read_ms=reads["full_read_median_ms"],
            get_user_records=reads["records_per_read"],
        )

    progress(f"durable ingest at saturation, {BATCH_RECORDS} records a line (record_batch)")
    with perfdb_server(work, work / "db-batch") as server:
        cpu_before = server.cpu_seconds()
        result = ingest(server.port, sizes.ingest_records, take(sizes.ingest_records),
                        "--batch", str(BATCH_RECORDS), window=4)  # fmt: skip
        figures["ingest_batch_rps"] = result["rps"]
        figures["server_batch_cpu_us_per_record"] = (server.cpu_seconds() - cpu_before) / sizes.ingest_records * 1e6

    progress("durable ingest with regression detection (--regression-detection), for the ratio")
    with perfdb_server(work, work / "db-detect", "--regression-detection") as server:
        figures["ingest_detect_rps"] = ingest(server.port, sizes.ingest_records, take(sizes.ingest_records))["rps"]

    progress("no-sync ingest at saturation")
    big = work / "db-big"
    with perfdb_server(work, big, "--no-sync") as server:
        result = ingest(server.port, sizes.ingest_records, take(sizes.ingest_records))
        figures["ingest_nosync_rps"] = result["rps"]
        remaining = sizes.big_records - sizes.ingest_records
        progress(f"filling the database to {sizes.big_records:,} records (no-sync)")
        while remaining > 0:
            step = min(remaining, 250_000)
            ingest(server.port, step, take(step))
            remaining -= step

    progress("compacting the database, as one that grew over weeks would be")
    compact(big)

    figures.update(measure_get_all(work, big, sizes.big_records))

    progress(f"durable ingest with {sizes.big_records:,} records already stored")
    with perfdb_server(work, big) as server:
        figures["ingest_durable_full_rps"] = ingest(server.port, sizes.ingest_records, take(sizes.ingest_records))[
            "rps"
        ]

    progress("durable ingest on plain asyncio (the rest ran on uvloop)")
    with perfdb_server(work, work / "db-asyncio", "--loop=asyncio") as server:
        figures["ingest_asyncio_rps"] = ingest(server.port, sizes.ingest_records, take(sizes.ingest_records))["rps"]

    figures["ingest_ratio"] = figures["ingest_durable_rps"] / figures["store_limit_rps"]
    figures["ingest_batch_ratio"] = figures["ingest_batch_rps"] / figures["store_limit_rps"]
    figures["cpu_ratio"] = figures["server_cpu_us_per_record"] / figures["store_cpu_us_per_record"]
    figures["echo_ratio"] = figures["ingest_durable_rps"] / figures["echo_rps"]
    figures["growth_ratio"] = figures["ingest_durable_full_rps"] / figures["ingest_durable_rps"]
    # Durable ingest with verdicts computed (--regression-detection) against the same without them (the default).
    figures["ingest_detect_ratio"] = figures["ingest_detect_rps"] / figures["ingest_durable_rps"]
    figures["uvloop_speedup"] = figures["ingest_durable_rps"] / figures["ingest_asyncio_rps"]
    return figures


ROWS: list[tuple[str, str, str | None]] = [
    # figure, unit, baseline figure it is a ratio of
    ("ingest_durable_rps", "records/s", "store_limit_rps"),
    ("ingest_nosync_rps", "records/s", "store_limit_rps"),
    ("ingest_durable_rps", "records/s", "echo_rps"),
    ("ingest_ratio", "", None),
    ("ingest_batch_rps", "records/s", "store_limit_rps"),
    ("ingest_batch_ratio", "", None),
    ("server_cpu_us_per_record", "us", "store_cpu_us_per_record"),
    ("server_batch_cpu_us_per_record", "us", "store_cpu_us_per_record"),
    ("cpu_ratio", "", None),
    ("ingest_detect_rps", "records/s", "ingest_durable_rps"),
    ("ingest_detect_ratio", "", None),
    ("ack_p50_ms", "ms", None),
    ("ack_p99_ms", "ms", None),
    ("get_user_p99_ms", "ms", None),
    ("get_user_full_read_ms", "ms", None),
    ("get_all_rps", "records/s", None),
    ("server_peak_rss_mb", "MiB", None),
    ("server_peak_anon_mb", "MiB", None),
    ("ingest_durable_full_rps", "records/s", "ingest_durable_rps"),
    ("growth_ratio", "", None),
    ("ingest_durable_rps", "records/s", "ingest_asyncio_rps"),
]


GET_ALL_ROWS = [row for row in ROWS if row[0] in ("get_all_rps", "server_peak_rss_mb", "server_peak_anon_mb")]


def table(figures: dict[str, Any], rows: list[tuple[str, str, str | None]]) -> str:
    lines = [f"{'figure':<26} {'value':>14} {'baseline':>28} {'ratio':>7}  target"]
    for name, unit, baseline in rows:
        value = figures[name]
        base = f"{figures[baseline]:,.0f} ({baseline})" if baseline else ""
        ratio = f"{value / figures[baseline]:.2f}" if baseline else ""
        target = ""
        if name in TARGETS:
            comparison, bound = TARGETS[name]
            met = value >= bound if comparison == ">=" else value <= bound
            target = f"{comparison} {bound:g}  {'met' if met else 'NOT MET'}"
        shown = f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"
        lines.append(f"{name:<26} {shown + ' ' + unit:>14} {base:>28} {ratio:>7}  {target}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes; under a minute")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (databases, server logs)")
    parser.add_argument(
        "--web",
        action="store_true",
        help="run the dashboard benchmark (benchmarks/web.py: 1,000,000 results, pages in Chromium) instead",
    )
    parser.add_argument(
        "--get-all",
        type=int,
        metavar="RECORDS",
        help="only the get_all figures (get_all_rps, server_peak_rss_mb, server_peak_anon_mb) over RECORDS records",
    )
    parser.add_argument(
        "--database",
        type=Path,
        metavar="DIR",
        help="with --get-all: the database to read, filled first if DIR holds none (kept, for repeated runs)",
    )
    args = parser.parse_args()
    if args.web:
        extra = [flag for flag, given in (("--quick", args.quick), ("--keep", args.keep)) if given]
        extra += ["--json", args.json] if args.json else []
        sys.exit(subprocess.call(python(str(HERE / "web.py"), *extra), cwd=ROOT))
    if args.database is not None and args.get_all is None:
        parser.error("--database goes with --get-all")
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="perfdb-bench-"))
    started = time.monotonic()
    try:
        figures = run_get_all(args.get_all, work, args.database) if args.get_all is not None else run(sizes, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures["seconds"] = time.monotonic() - started
    print(table(figures, GET_ALL_ROWS if args.get_all is not None else ROWS))
    print(f"\n{figures['machine']['cores']} cores, {figures['machine']['cpu']}; {figures['seconds']:.0f}s")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
