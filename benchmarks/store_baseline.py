"""The store's own limit: one Python process writing the benchmark's records straight into
plyvel, in WriteBatches of 1,000 records with sync=True.

Each record is written as the server writes it (perfdb.storage.layout): the checksummed
record under its time-ordered key, every index entry layout.record_index_entries derives from
it (user, test, tag and the per-metric sort indexes), its idempotency entry, and each batch's
counts, all encoded before the clock starts, so only LevelDB and the batch calls are timed.
It reports the process's CPU time over the writes too (every thread: LevelDB's compactions run
in one of its own), for the server's CPU per record to be compared with.

    python benchmarks/store_baseline.py --records N --database DIR
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import plyvel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workload import record_lines

from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.storage import layout

BATCH = 1000
STORED = ("test_name", "tag", "sys_info", "metrics", "client_config", "server_config", "request_id")


def encoded_entries(count: int) -> list[tuple[list[tuple[bytes, bytes]], list[bytes]]]:
    """Per record: its (key, value) pairs and the count keys it adds one to."""
    start = now_micros()
    entries = []
    for index, line in enumerate(record_lines(count)):
        request: dict[str, Any] = orjson.loads(line)
        user_id = "static:bench-" + request["access_token"][12:16]
        record_id = make_record_id(start + index, 0)
        timestamp = format_micros(start + index)
        document = {"record_id": record_id, "user_id": user_id, "timestamp": timestamp}
        document.update((key, request[key]) for key in STORED)
        test_name, tag = request["test_name"], request["tag"]
        pairs = [
            (layout.record_key(record_id, user_id), layout.seal(orjson.dumps(document))),
            *layout.record_index_entries(record_id, user_id, test_name, tag, request["metrics"]),
            (
                layout.idempotency_key(user_id, request["request_id"]),
                orjson.dumps({"record_id": record_id, "timestamp": timestamp}),
            ),
        ]
        entries.append((pairs, layout.record_counts(user_id, test_name, tag)))
    return entries


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all of the process's threads
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--database", required=True)
    args = parser.parse_args()
    entries = encoded_entries(args.records)
    # The server's LevelDB options, so the comparison is like for like.
    db = plyvel.DB(args.database, create_if_missing=True, bloom_filter_bits=10,
                   lru_cache_size=64 * 1024 * 1024, write_buffer_size=64 * 1024 * 1024)  # fmt: skip
    counts: dict[bytes, int] = {}
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for first in range(0, len(entries), BATCH):
        with db.write_batch(sync=True) as batch:
            touched: set[bytes] = set()
            for pairs, count_keys in entries[first : first + BATCH]:
                for key, value in pairs:
                    batch.put(key, value)
                for count_key in count_keys:
                    counts[count_key] = counts.get(count_key, 0) + 1
                touched.update(count_keys)
            for count_key in touched:
                batch.put(count_key, str(counts[count_key]).encode())
            batch.put(layout.RECORD_COUNT_KEY, str(first + BATCH).encode())
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    db.close()
    figures = {"records": len(entries), "seconds": elapsed, "rps": len(entries) / elapsed, "cpu_seconds": cpu}
    sys.stdout.write(orjson.dumps(figures).decode())
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
