"""The store's own limit: one Python process writing the benchmark's records straight into
plyvel, in WriteBatches of 1,000 records with sync=True.

Each record is written as the server writes it (perfdb.storage.layout): the checksummed
record under its time-ordered key, the per-user index entry and the idempotency entry, all
encoded before the clock starts, so only LevelDB and the batch calls are timed.

    python benchmarks/store_baseline.py --records N --database DIR
"""

from __future__ import annotations

import argparse
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


def encoded_entries(count: int) -> list[tuple[bytes, bytes, bytes, bytes, bytes, bytes]]:
    start = now_micros()
    entries = []
    for index, line in enumerate(record_lines(count)):
        request: dict[str, Any] = orjson.loads(line)
        user_id = "static:bench-" + request["access_token"][12:16]
        record_id = make_record_id(start + index, 0)
        timestamp = format_micros(start + index)
        document = {"record_id": record_id, "user_id": user_id, "timestamp": timestamp}
        document.update((key, request[key]) for key in STORED)
        entries.append(
            (
                layout.record_key(record_id, user_id),
                layout.seal(orjson.dumps(document)),
                layout.user_index_prefix(user_id) + record_id.encode(),
                orjson.dumps([request["test_name"], request["tag"]]),
                layout.idempotency_key(user_id, request["request_id"]),
                orjson.dumps({"record_id": record_id, "timestamp": timestamp}),
            )
        )
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--database", required=True)
    args = parser.parse_args()
    entries = encoded_entries(args.records)
    # The server's LevelDB options, so the comparison is like for like.
    db = plyvel.DB(args.database, create_if_missing=True, bloom_filter_bits=10,
                   lru_cache_size=64 * 1024 * 1024, write_buffer_size=64 * 1024 * 1024)  # fmt: skip
    started = time.perf_counter()
    for first in range(0, len(entries), BATCH):
        with db.write_batch(sync=True) as batch:
            for record_key, record, index_key, index, request_key, request in entries[first : first + BATCH]:
                batch.put(record_key, record)
                batch.put(index_key, index)
                batch.put(request_key, request)
    elapsed = time.perf_counter() - started
    db.close()
    sys.stdout.write(
        orjson.dumps({"records": len(entries), "seconds": elapsed, "rps": len(entries) / elapsed}).decode()
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
