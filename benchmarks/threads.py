"""CPU per record of each of the server's threads during one saturated durable ingest, with and without detection.

    python benchmarks/threads.py [--records N] [--detection-only]

Starts a server on a fresh database (as run.py does), reads utime + stime of every thread from
/proc/PID/task/*/stat before and after `loadgen.py ingest` of N records (default 30,000), and prints one JSON
line per server: µs of CPU per record for each thread (by its Python name, threads of one name summed; `leveldb`:
the threads Python did not start), the records/s, and the verdicts stored per record in bytes (v: values).
Python 3.11 gives its threads no OS names, so the server runs under this script (`--serve`), which has each
thread write its native id and name to a file as it starts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import runpy
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import plyvel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import ROOT, Process, ingest  # noqa: E402
from workload import write_tokens_file  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")
_NAMES_FILE = "PERFDB_THREAD_NAMES"  # environment variable: where the served process writes its threads' names


def serve(arguments: list[str]) -> None:
    """Run the server here, each Python thread writing "native id name" to the names file as it starts."""
    names = open(os.environ[_NAMES_FILE], "a", buffering=1)  # noqa: SIM115 - open while the server runs
    names.write(f"{threading.get_native_id()} event-loop\n")
    started = threading.Thread.run

    def run_named(thread: threading.Thread) -> None:
        names.write(f"{threading.get_native_id()} {thread.name.split()[0]}\n")
        started(thread)

    threading.Thread.run = run_named  # type: ignore[method-assign,assignment]
    sys.path.insert(0, str(ROOT))  # this checkout's perfdb, as running the script itself would import
    sys.argv = [str(ROOT / "run_perf_db_server.py"), *arguments]
    runpy.run_path(sys.argv[0], run_name="__main__")


@contextlib.contextmanager
def named_server(work: Path, database: Path, *flags: str) -> Iterator[tuple[Process, Path]]:
    names = work / f"names-{database.name}.txt"
    os.environ[_NAMES_FILE] = str(names)
    command = [sys.executable, __file__, "--serve", "--address=127.0.0.1:0", f"--database={database}",
               f"--tokens-file={work / 'tokens.json'}", "--userinfo-url=http://127.0.0.1:9/userinfo",
               "--user-rate=0", *flags]  # fmt: skip
    server = Process(command, work / f"server-{database.name}.log")
    try:
        yield server, names
    finally:
        server.stop()


def thread_cpu(pid: int, names_file: Path) -> dict[str, float]:
    """CPU seconds so far of each live thread of `pid`, summed per Python thread name (`leveldb`: the others,
    which only LevelDB starts)."""
    names = dict(line.split(" ", 1) for line in names_file.read_text().splitlines())
    seconds: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        # Executor threads are numbered (asyncio_0, perfdb-read_1): summed by kind.
        name = names.get(task.name, "leveldb").rstrip("0123456789").rstrip("_")
        fields = stat.rsplit(")", 1)[1].split()
        seconds[name] += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14-15 of stat(5)
    return seconds


def stored_verdict_bytes(database: Path) -> tuple[int, int]:
    """(values, bytes) of the stored verdicts (the server stopped)."""
    db = plyvel.DB(str(database))
    try:
        sizes = [len(value) for _, value in db.iterator(prefix=b"v:")]
    finally:
        db.close()
    return len(sizes), sum(sizes)


def measure(work: Path, records: int, *flags: str) -> dict[str, object]:
    database = work / f"db{len(flags)}"
    with named_server(work, database, *flags) as (server, names):
        before = thread_cpu(server.process.pid, names)
        rps = ingest(server.port, records, 0)["rps"]
        after = thread_cpu(server.process.pid, names)
    per_thread = {
        name: round((after[name] - before.get(name, 0.0)) / records * 1e6, 1)
        for name in sorted(after, key=lambda name: before.get(name, 0.0) - after[name])
    }
    figures: dict[str, object] = {"flags": list(flags), "records_per_s": round(rps), "cpu_us_per_record": per_thread}
    figures["total_cpu_us_per_record"] = round(sum(per_thread.values()), 1)
    count, size = stored_verdict_bytes(database)
    if count:
        figures["stored_verdict_bytes_per_record"] = round(size / count, 1)
    return figures


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--detection-only", action="store_true", help="skip the server without detection")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="perfdb-threads-") as folder:
        work = Path(folder)
        write_tokens_file(work / "tokens.json")
        runs = [("--regression-detection",)] if arguments.detection_only else [("--regression-detection",), ()]
        for flags in runs:
            print(orjson.dumps(measure(work, arguments.records, *flags)).decode(), flush=True)


if __name__ == "__main__":
    main()
