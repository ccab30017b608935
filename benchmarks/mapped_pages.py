"""How much of LevelDB's memory-mapped table files a full scan of the records leaves resident, and
what two ways of keeping them out of the resident set would cost (an experiment; the server does
neither, see benchmarks/README.md, "Peak RSS").

    python benchmarks/mapped_pages.py --database DIR [--mode plain|madvise|max-open-files]

DIR is a perfdb database (the server stopped; run.py --get-all RECORDS --database DIR makes one).
Opens it with the server's LevelDB options in this process, reads every record in runs of 5,000
(as get_all pages do), and prints one JSON line: records/s, VmHWM, RssAnon and RssFile in MiB,
and µs per random get of 20,000 records. `madvise`: after each run, MADV_DONTNEED on every mapped
.ldb range of the database (found in /proc/self/maps). `max-open-files`: LevelDB's smallest table
cache (max_open_files=74: 64 tables mapped at most).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import itertools
import random
import re
import time
from pathlib import Path

import orjson
import plyvel

RECORD_PREFIX = b"r:"
MADV_DONTNEED = 4
_RUN = 5000


def memory_mb() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {
        field: int(match.group(1)) / 1024
        for field in ("VmHWM", "RssAnon", "RssFile")
        if (match := re.search(rf"{field}:\s+(\d+) kB", status))
    }


def drop_table_pages(madvise: ctypes._NamedFuncPointer, folder: str) -> None:
    """MADV_DONTNEED on each mapped table file of the database. Only safe here, where nothing
    else runs: a range LevelDB unmaps meanwhile could be reused by another mapping."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(".ldb") and folder in line:
            low, high = (int(bound, 16) for bound in line.split(None, 1)[0].split("-"))
            madvise(low, high - low, MADV_DONTNEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=Path, required=True)
    parser.add_argument("--mode", choices=("plain", "madvise", "max-open-files"), default="plain")
    args = parser.parse_args()
    folder = str(args.database.resolve())
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    db = plyvel.DB(
        folder,
        bloom_filter_bits=10,
        lru_cache_size=64 * 1024 * 1024,
        max_open_files=74 if args.mode == "max-open-files" else 1000,
    )
    try:
        records = 0
        keys: list[bytes] = []
        started = time.perf_counter()
        with db.iterator(prefix=RECORD_PREFIX, fill_cache=False) as entries:
            while run := list(itertools.islice(entries, _RUN)):
                records += len(run)
                keys.extend(key for key, _ in run[::50])
                if args.mode == "madvise":
                    drop_table_pages(madvise, folder)
        scan_seconds = time.perf_counter() - started
        scanned = memory_mb()
        sample = random.Random(7).sample(keys, min(20_000, len(keys)))
        started = time.perf_counter()
        for key in sample:
            db.get(key)
        get_micros = (time.perf_counter() - started) / max(1, len(sample)) * 1e6
    finally:
        db.close()
    figures = {"mode": args.mode, "records": records, "records_per_s": round(records / scan_seconds)}
    figures.update({f"{field}_after_scan_mb": round(value, 1) for field, value in scanned.items()})
    figures["random_get_us"] = round(get_micros, 1)
    print(orjson.dumps(figures).decode(), flush=True)


if __name__ == "__main__":
    main()
