"""Where a get_all scan spends its time: CPU per record of each server thread and of the reader.

    python benchmarks/run.py --get-all 250000 --database /tmp/db250k    # make (and measure) a database once
    python benchmarks/get_all_profile.py --database /tmp/db250k [--profile FOLDER]

Starts a server on the database (as run.py does, with its threads named as in threads.py), reads
utime + stime of every server thread from /proc/PID/task/*/stat before and after one reader
streams every record through get_all pages (loadgen.py's read_all, run in this process), and
prints one JSON line: records/s, µs of CPU per record for each server thread (by name) and for
the reader. With --profile, every server thread and the reader run under cProfile, and their
statistics go to FOLDER (one .pstats file a thread; read them with `python -m pstats`); cProfile
slows Python code down several times, so the rates of a profiled run are not the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import read_all  # noqa: E402
from run import Process, python  # noqa: E402
from threads import serve, thread_cpu  # noqa: E402
from workload import write_tokens_file  # noqa: E402

_PROFILE_DIR = "PERFDB_PROFILE_DIR"  # environment variable: where the served process writes its profiles


def serve_profiled(arguments: list[str], folder: Path) -> None:
    """serve() with every thread under its own cProfile, each dumped to FOLDER as the thread ends."""
    started = threading.Thread.run

    def run_profiled(thread: threading.Thread) -> None:
        profile = cProfile.Profile()
        try:
            profile.runcall(started, thread)
        finally:
            profile.dump_stats(folder / f"{thread.name.split()[0]}-{threading.get_native_id()}.pstats")

    threading.Thread.run = run_profiled  # type: ignore[method-assign,assignment]
    profile = cProfile.Profile()
    try:
        profile.runcall(serve, arguments)
    finally:
        profile.dump_stats(folder / "event-loop.pstats")


def measure(work: Path, database: Path, page_size: int, profile_folder: Path | None) -> dict[str, object]:
    names = work / "names.txt"
    os.environ["PERFDB_THREAD_NAMES"] = str(names)
    if profile_folder is not None:
        profile_folder.mkdir(parents=True, exist_ok=True)
        os.environ[_PROFILE_DIR] = str(profile_folder)
    command = python(__file__, "--serve", "--address=127.0.0.1:0", f"--database={database}",
                     f"--tokens-file={work / 'tokens.json'}", "--userinfo-url=http://127.0.0.1:9/userinfo",
                     "--user-rate=0")  # fmt: skip
    server = Process(command, work / "server.log")
    try:
        before = thread_cpu(server.process.pid, names)
        reader_before = resource.getrusage(resource.RUSAGE_SELF)
        profile = cProfile.Profile()
        started = time.perf_counter()
        if profile_folder is not None:
            profile.enable()
        result = uvloop.run(read_all(server.port, page_size))
        if profile_folder is not None:
            profile.disable()
            profile.dump_stats(profile_folder / "reader.pstats")
        elapsed = time.perf_counter() - started
        reader_after = resource.getrusage(resource.RUSAGE_SELF)
        after = thread_cpu(server.process.pid, names)
    finally:
        server.stop()
    records = result["records"]
    per_thread = {
        name: round((after[name] - before.get(name, 0.0)) / records * 1e6, 2)
        for name in sorted(after, key=lambda name: before.get(name, 0.0) - after[name])
    }
    reader_cpu = (reader_after.ru_utime + reader_after.ru_stime) - (reader_before.ru_utime + reader_before.ru_stime)
    return {
        "records": records,
        "records_per_s": round(records / elapsed),
        "server_cpu_us_per_record": per_thread,
        "server_total_us_per_record": round(sum(per_thread.values()), 2),
        "reader_cpu_us_per_record": round(reader_cpu / records * 1e6, 2),
        "elapsed_us_per_record": round(elapsed / records * 1e6, 2),
    }


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        folder = os.environ.get(_PROFILE_DIR)
        if folder is None:
            serve(sys.argv[2:])
        else:
            serve_profiled(sys.argv[2:], Path(folder))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=Path, required=True, help="a database run.py --get-all filled")
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--profile", type=Path, metavar="FOLDER", help="cProfile every thread, statistics to FOLDER")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="perfdb-get-all-") as folder:
        work = Path(folder)
        write_tokens_file(work / "tokens.json")
        figures = measure(work, arguments.database, arguments.page_size, arguments.profile)
    print(orjson.dumps(figures).decode(), flush=True)


if __name__ == "__main__":
    main()
