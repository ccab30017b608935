"""The group-commit writer alone: CPU time of its thread per record, apart from the event loop.

    python benchmarks/writer.py [--records N] [--batch B] [--rounds R]

Opens a store on a fresh database in a temporary folder, parses the benchmark's records into drafts
(before the clock starts), queues them all at once (one `record` each, or `record_batch`es of B), and
reads the writer thread's own CPU clock around their commits: the figure the server's writer costs a
record, without the event loop, the load generator or the machine's other load in between (they still
share the cores, so compare runs made back to back). Prints one JSON object; each round on a new database.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import USERS, record_lines, token_for

from perfdb.config import Config
from perfdb.records.profiles import Profile
from perfdb.records.schema import RecordDraft, parse_record
from perfdb.server import build_store


class Countdown:
    """Settleable (see writer.py) that sets an event once every record is settled."""

    def __init__(self, records: int, done: asyncio.Event) -> None:
        self.left = records
        self.done_event = done
        self.errors = 0

    def done(self) -> bool:
        return False

    def set_result(self, result: Any, /) -> None:
        self._count(1)

    def set_exception(self, exception: BaseException, /) -> None:
        self.errors += 1
        self._count(1)

    def _count(self, records: int) -> None:
        self.left -= records
        if self.left <= 0:
            self.done_event.set()


async def one_round(database: Path, drafts: list[tuple[Profile, RecordDraft]], batch: int) -> float:
    """Seconds of writer-thread CPU to commit every draft."""
    store = build_store(Config(database=database))
    store.open(asyncio.get_running_loop())
    try:
        writer = store.writer
        known_requests = getattr(writer, "known_requests", None)  # absent before the idempotency filter
        if known_requests is not None:
            known_requests.wait_filled(60)
        thread_id = writer._thread.ident
        assert thread_id is not None
        clock = time.pthread_getcpuclockid(thread_id)
        done = asyncio.Event()
        if batch > 1:
            futures = []
            started = time.clock_gettime(clock)
            for first in range(0, len(drafts), batch):
                chunk = drafts[first : first + batch]
                # One user a batch line, as a record_batch has: the first record's.
                futures.append(writer.submit_batch(chunk[0][0], [draft for _, draft in chunk]))
            await asyncio.gather(*futures)
        else:
            countdown = Countdown(len(drafts), done)
            started = time.clock_gettime(clock)
            for profile, draft in drafts:
                writer.submit_to(profile, draft, countdown)
            await asyncio.wait_for(done.wait(), 600)
            if countdown.errors:
                raise RuntimeError(f"{countdown.errors} records were refused")
        return time.clock_gettime(clock) - started
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=1, help="records a record_batch (1: one record a line)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    profiles = {
        token_for(user): Profile.create(f"static:bench-{user:04d}", {"name": f"bench {user}"}) for user in range(USERS)
    }
    drafts = []
    for line in record_lines(args.records):
        token, draft = parse_record(orjson.loads(line))
        drafts.append((profiles[token], draft))
    seconds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="perfdb-writer-") as work:
            seconds.append(asyncio.run(one_round(Path(work) / "db", drafts, args.batch)))
    per_record = sorted(value / args.records * 1e6 for value in seconds)
    print(orjson.dumps({"records": args.records, "batch": args.batch, "writer_cpu_us_per_record": per_record}).decode())


if __name__ == "__main__":
    main()
