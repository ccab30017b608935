"""How long the `series` op takes over one heavy user: the dashboard's user page.

Fills a temporary database, through ResultStore as the server does (not synced), with one user's
20,000 records in 5 tests (gRPC-shaped: the 11 core metrics, configurations and sys_info) among
other users' records, then times the store's `series` for every test of the user at once (the
user page's one grouped call) and for one test (the detail chart), each run on the store's reader
threads as the op runs them, the median and the slowest of --runs.

    python benchmarks/series_user.py [--records 20000] [--others 20000] [--runs 9] [--perfdb DIR]

--perfdb: the checkout whose perfdb package to measure (default: this one), so that the same
script times another branch's code, e.g. an extracted copy of main.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = [f"cpp_async_{kind}_qps_unconstrained" for kind in ("unary", "streaming", "ping_pong", "latency", "bulk")]
HEAVY_USER = "static:heavy"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="the heavy user's records")
    parser.add_argument("--others", type=int, default=20_000, help="other users' records, in the same tests")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--perfdb", type=Path, default=HERE.parent)
    return parser.parse_args()


async def fill(store: Any, profiles: dict[str, Any], records: int, others: int) -> None:
    from workload import CLIENT_CONFIG, SERVER_CONFIG, SYS_INFO, record_request

    from perfdb.records.schema import RecordDraft

    rng = random.Random(7)
    owners = [HEAVY_USER] * records + [f"static:other-{n % 50}" for n in range(others)]
    rng.shuffle(owners)  # the heavy user's records interleaved with the others', in every test
    pending = []
    for index, user_id in enumerate(owners):
        metrics = record_request(index, 0, rng)["metrics"]
        draft = RecordDraft(TESTS[index % len(TESTS)], "nightly", SYS_INFO, metrics, CLIENT_CONFIG, SERVER_CONFIG)
        pending.append(store.submit(profiles[user_id], draft))
        if len(pending) == 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def timed(store: Any, query: Any, runs: int) -> tuple[float, float, float, dict[str, Any]]:
    """The median and slowest of `runs` calls and their median CPU time (the process's, which
    does nothing else meanwhile: on a shared machine it moves less than the elapsed time), in
    ms, after one call to warm the cache; and a reply."""
    reply = await store.series(query)
    times, cpu_times = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        reply = await store.series(query)
        times.append((time.perf_counter() - started) * 1000)
        cpu_times.append((time.process_time() - cpu_started) * 1000)
    return statistics.median(times), max(times), statistics.median(cpu_times), reply


async def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(args.perfdb.resolve()))
    import perfdb
    from perfdb.config import Config
    from perfdb.records.profiles import Profile
    from perfdb.records.schema import SeriesQuery
    from perfdb.server import build_store
    from perfdb.web.charts import CHART_POINTS, DETAIL_METRICS, LINE_METRICS

    with tempfile.TemporaryDirectory(prefix="perfdb-series-") as directory:
        store = build_store(Config(database=Path(directory) / "db", sync=False))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, store.open, loop)
        try:
            user_ids = [HEAVY_USER, *(f"static:other-{n}" for n in range(50))]
            profiles = {user_id: Profile.create(user_id, {}) for user_id in user_ids}
            started = time.perf_counter()
            await fill(store, profiles, args.records, args.others)
            filled = time.perf_counter() - started
            line_buckets = max(1, CHART_POINTS // (len(TESTS) * len(LINE_METRICS)))
            every_test = SeriesQuery(LINE_METRICS, None, HEAVY_USER, None, None, None, line_buckets)
            one_test = SeriesQuery((*LINE_METRICS, *DETAIL_METRICS), TESTS[0], HEAVY_USER, None, None, None, 1000)
            grouped = await timed(store, every_test, args.runs)
            single = await timed(store, one_test, args.runs)
        finally:
            await loop.run_in_executor(None, store.close)
    print(f"perfdb from {Path(perfdb.__file__).parent}")
    print(f"filled {args.records:,} records of {HEAVY_USER} and {args.others:,} others in {filled:.1f} s")
    for name, (median, slowest, cpu, reply) in (("every test", grouped), ("one test", single)):
        print(
            f"series, {name:10}: median {median:6.1f} ms, slowest {slowest:6.1f} ms, CPU {cpu:6.1f} ms "
            f"({reply['records']:,} records, {reply['examined']:,} examined)"
        )


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
