"""Dashboard benchmark: every page in headless Chromium over a database of 1,000,000 results.

    python benchmarks/web.py [--quick] [--json FILE]     (or: python benchmarks/run.py --web)

Loads the results through `import` with explicit timestamps: history spread over a year from
100 users (one of them with 20,000 results), 30 tests and 5 tags, then a burst of 200,000
within 20 seconds, several to a microsecond. Waits for perfdb to go quiet (LevelDB compacts the
import for a minute or more, using a core). Then measures, in Debian's Chromium driven by
Playwright, how long each page takes until its main content is on screen, on a first visit
(fresh browser cache) and on repeat visits, with perfdb idle and while a background process
stores 2,000 results/s through `record`; then the JSON API's times and what a user page
transfers. The user pages' main content is the charts in the 1600x1000 viewport, drawn from their
data (`#charts[data-ready=true]`); charts below it are drawn as they come near it, so, like the
largest contentful paint, the measure counts what is on screen. benchmarks/README.md explains the
figures and holds the last run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from run import Process, machine, perfdb_server, progress, python  # noqa: E402
from workload import USERS as BENCH_USERS  # noqa: E402
from workload import record_request, write_tokens_file  # noqa: E402

from perfdb.client import AsyncClient  # noqa: E402
from perfdb.records.record_ids import make_record_id  # noqa: E402
from perfdb.records.timestamps import format_micros, now_micros  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
ADMIN_KEY = "web-benchmark-admin-key-0123456789abcdef"
DAY = 86_400 * 1_000_000
HEAVY_USER = "web-user-000"
TESTS = [f"{lang}_{kind}_{mode}" for lang in ("cpp", "go", "java") for kind in ("unary", "streaming")
         for mode in ("qps_unconstrained", "ping_pong", "qps_secure", "latency", "throughput")]  # fmt: skip
TAGS = ["nightly", "release", "pr", "canary", ""]
PAGE_TARGET_S = 1.0
API_TARGET_MS = 300.0
TRANSFER_TARGET_KB = 300.0
# perfdb counts as quiet after a load once it uses under QUIET_CPU of a core for QUIET_SECONDS.
QUIET_CPU = 0.05
QUIET_SECONDS = 3.0
SETTLE_LIMIT_S = 600
INGEST_RATE = 2000


@dataclasses.dataclass(frozen=True)
class Sizes:
    history: int  # results spread over the last year
    heavy: int  # of which this many belong to HEAVY_USER
    burst: int  # results within 20 seconds, just before the measurement
    first_visits: int  # per page and condition, each in a fresh browser context
    repeat_visits: int
    api_calls: int


FULL = Sizes(history=800_000, heavy=20_000, burst=200_000, first_visits=3, repeat_visits=6, api_calls=10)
QUICK = Sizes(history=80_000, heavy=5_000, burst=20_000, first_visits=2, repeat_visits=4, api_calls=5)
# The dashboard waits this long for perfdb (its default is 10 s), so that slow reads are
# measured rather than cut off.
DASHBOARD_TIMEOUT_S = 60


# -- the data -------------------------------------------------------------------------------


def _metrics(rng: random.Random, test_index: int) -> dict[str, float]:
    qps = round(rng.lognormvariate(math.log(10_000 * (1 + test_index % 7)), 0.4), 1)
    p50 = round(rng.lognormvariate(math.log(200 + 50 * (test_index % 5)), 0.5), 2)
    return {
        "qps": qps,
        "qps_per_core": round(qps / 8, 1),
        "perc_lat_50": p50,
        "perc_lat_90": round(p50 * 1.5, 2),
        "perc_lat_95": round(p50 * 1.8, 2),
        "perc_lat_99": round(p50 * 3.1, 2),
        "perc_lat_99_point_9": round(p50 * 6.0, 2),
        "server_system_time": round(rng.uniform(20, 80), 1),
        "server_user_time": round(rng.uniform(100, 400), 1),
        "client_system_time": round(rng.uniform(20, 60), 1),
        "client_user_time": round(rng.uniform(80, 300), 1),
    }


def _record(micros: int, sequence: int, user: str, rng: random.Random, heavy_tests: bool = False) -> dict[str, Any]:
    test_index = rng.randrange(5) if heavy_tests else rng.randrange(len(TESTS))
    return {
        "record_id": make_record_id(micros, sequence),
        "user_id": user,
        "timestamp": format_micros(micros),
        "test_name": TESTS[test_index],
        "tag": TAGS[rng.randrange(len(TAGS))],
        "sys_info": {"cpu": "Intel Xeon 2.20GHz", "cores": 8, "os": "Debian 12"},
        "metrics": _metrics(rng, test_index),
        "client_config": {"client_type": "ASYNC_CLIENT", "outstanding_rpcs_per_channel": 100},
        "server_config": {"server_type": "ASYNC_SERVER", "threads_per_cq": 3},
    }


def history_batches(sizes: Sizes, now: int, batch: int = 1000) -> Iterator[list[dict[str, Any]]]:
    """The year's results, oldest first, in import-sized batches."""
    rng = random.Random(5)
    start = now - 365 * DAY
    span = 365 * DAY - 3600 * 1_000_000  # up to an hour before the burst
    moments = sorted(start + rng.randrange(span) for _ in range(sizes.history))
    heavy = set(rng.sample(range(sizes.history), sizes.heavy))
    records = []
    for index, micros in enumerate(moments):
        if index in heavy:
            records.append(_record(micros, index % 16, HEAVY_USER, rng, heavy_tests=True))
        else:
            records.append(_record(micros, index % 16, f"web-user-{1 + rng.randrange(99):03d}", rng))
        if len(records) == batch:
            yield records
            records = []
    if records:
        yield records


def burst_batches(sizes: Sizes, now: int, batch: int = 1000) -> Iterator[list[dict[str, Any]]]:
    """The burst: `sizes.burst` results over 20 seconds ending a minute ago, four to a microsecond."""
    rng = random.Random(6)
    per_micro = 4
    step = 20_000_000 // (sizes.burst // per_micro)
    start = now - 80_000_000
    records = []
    for index in range(sizes.burst):
        micros = start + (index // per_micro) * step
        records.append(_record(micros, index % per_micro, f"web-user-{1 + rng.randrange(99):03d}", rng))
        if len(records) == batch:
            yield records
            records = []
    if records:
        yield records


PROFILES = {f"web-user-{index:03d}": {"name": f"Web User {index:03d}"} for index in range(100)}
PROFILES[HEAVY_USER] = {"name": "Heavy CI"}


async def load(port: int, sizes: Sizes) -> dict[str, Any]:
    """Import history then burst, four requests in flight; returns what it stored and how fast."""
    now = now_micros()
    started = time.monotonic()
    imported = 0
    async with AsyncClient(f"127.0.0.1:{port}", request_timeout=120) as client:
        in_flight: set[asyncio.Task[dict[str, Any]]] = set()

        async def drain(limit: int) -> None:
            nonlocal imported
            while len(in_flight) > limit:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    in_flight.discard(task)
                    imported += task.result()["imported"]

        for batches in (history_batches(sizes, now), burst_batches(sizes, now)):
            for records in batches:
                users = {record["user_id"]: PROFILES[record["user_id"]] for record in records}
                call = client.call("import", admin_key=ADMIN_KEY, records=records, users=users)
                in_flight.add(asyncio.ensure_future(call))
                await drain(3)
                if imported and imported % 100_000 < 1000:
                    progress(f"  {imported:,} imported")
        await drain(0)
        newest = await client.call("get_all", reverse=True, limit=1)
    seconds = time.monotonic() - started
    return {"imported": imported, "seconds": seconds, "rps": imported / seconds,
            "burst_record": newest["records"][0]["record_id"]}  # fmt: skip


# -- the background ingest ------------------------------------------------------------------


async def ingest_in_background(port: int, rate: int, seconds: float) -> dict[str, Any]:
    """Store `rate` results/s through `record` until SIGTERM or `seconds`; print what was stored."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    rng = random.Random(9)
    tick = 0.1
    per_tick = max(1, int(rate * tick))
    stored = 0
    started = time.monotonic()
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        while not stop.is_set() and time.monotonic() - started < seconds:
            due = started + (stored // per_tick + 1) * tick
            batch = []
            for index in range(stored, stored + per_tick):
                fields = record_request(index, index % BENCH_USERS, rng)
                del fields["op"]
                fields["request_id"] = f"web-bench-{index:09d}"
                batch.append(fields)
            async for _ in client.record_many(batch, window=256):
                stored += 1
            with_rest = due - time.monotonic()
            if with_rest > 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), with_rest)
    elapsed = time.monotonic() - started
    return {"stored": stored, "seconds": elapsed, "rps": stored / elapsed}


@contextmanager
def background_ingest(port: int, work: Path) -> Iterator[Path]:
    """A separate process storing INGEST_RATE results/s; its figures land in the yielded file."""
    result = work / "ingest.json"
    with open(result, "wb") as out:
        process = subprocess.Popen(
            python(str(Path(__file__)), "--background-ingest", str(port), "--rate", str(INGEST_RATE)),
            stdout=out,
            cwd=ROOT,
        )
        try:
            time.sleep(2)  # let it reach its pace before anything is measured
            yield result
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


# -- the dashboard and the browser ----------------------------------------------------------


@contextmanager
def dashboard(perfdb_port: int, work: Path) -> Iterator[str]:
    log_path = work / "perfdb-web.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            python("-m", "perfdb.web", "--server", f"127.0.0.1:{perfdb_port}", "--listen", "127.0.0.1:0",
                   "--timeout", str(DASHBOARD_TIMEOUT_S), "--log-level", "info"),
            stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            text = log_path.read_text()
            found = re.search(r"listening on (http://\S+?)/? ", text)
            if found:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"perfdb-web did not start: {text[-2000:]}")
            time.sleep(0.05)
        yield found.group(1).rstrip("/")
    finally:
        process.terminate()
        process.wait(timeout=30)


TABLE = "#results-table tbody tr, #no-results"


def pages_to_measure(burst_record: str) -> list[tuple[str, str, str]]:
    """(name, path, selector of the main content)."""
    return [
        ("results table", "/", TABLE),
        ("results filtered by test", f"/?test={TESTS[3]}", TABLE),
        ("results sorted by QPS", "/?sort=qps", TABLE),
        ("results last page", "/?last=1", TABLE),
        ("user page, all tests", f"/users/{HEAVY_USER}", "#charts[data-ready=true]"),
        ("user page, one test", f"/users/{HEAVY_USER}?test={TESTS[2]}", "#charts[data-ready=true]"),
        ("overview", "/overview", "#histogram[data-ready=true]"),
        ("result page", f"/results/{burst_record}", "#metrics"),
    ]


def apis_to_measure(burst_record: str) -> list[tuple[str, str]]:
    return [
        ("results table", "/api/results"),
        ("results filtered by test", f"/api/results?test={TESTS[3]}"),
        ("results sorted by QPS", "/api/results?sort=qps"),
        ("results last page", "/api/results?last=1"),
        ("user series, all tests", f"/api/users/{HEAVY_USER}/series"),
        ("user series, one test", f"/api/users/{HEAVY_USER}/series?test={TESTS[2]}"),
        ("overview", "/api/overview"),
        ("one result", f"/api/results/{burst_record}"),
    ]


# Installed in every page before its own scripts: notes the browser's time (milliseconds since
# the navigation started) of the first frame drawn after the main content, or an error page,
# entered the document. Measured inside the browser, so the driver's round trips do not count.
SHOWN_WATCH = """
(() => {
  window.__perfdbShown = null;
  const check = () => {
    if (window.__perfdbShown !== null || !window.__perfdbSelector) return false;
    const found = document.querySelector(window.__perfdbSelector);
    if (!found) return false;
    const error = found.matches(".error-panel");
    requestAnimationFrame(() => { window.__perfdbShown = { ms: performance.now(), error }; });
    return true;
  };
  const observer = new MutationObserver(() => { if (check()) observer.disconnect(); });
  observer.observe(document, { childList: true, subtree: true });
})();
"""


def _visit(page: Any, url: str, selector: str) -> float:
    """Seconds from the start of navigation until the first frame with the main content, as the
    browser measures it; an error page (perfdb too slow for the dashboard's timeout) counts as
    infinitely slow and is reported."""
    page.context.add_init_script(f"window.__perfdbSelector = {json.dumps(selector + ', .error-panel')};")
    page.goto(url, wait_until="commit", timeout=90_000)
    page.wait_for_function("() => window.__perfdbShown !== null", timeout=90_000)
    shown = page.evaluate("() => window.__perfdbShown")
    if shown["error"]:
        progress(f"  {url} showed an error after {shown['ms'] / 1000:.1f} s: {page.inner_text('#error-message')[:200]}")
        return math.inf
    return float(shown["ms"]) / 1000


def measure_pages(browser: Any, base: str, burst_record: str, sizes: Sizes) -> dict[str, dict[str, float]]:
    figures = {}
    for name, path, selector in pages_to_measure(burst_record):
        first, repeat = [], []
        for _ in range(sizes.first_visits):
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            context.add_init_script(SHOWN_WATCH)
            try:
                page = context.new_page()
                first.append(_visit(page, base + path, selector))
                for _ in range(math.ceil(sizes.repeat_visits / sizes.first_visits)):
                    repeat.append(_visit(page, base + path, selector))
            finally:
                context.close()
        figures[name] = {
            "first_p50_s": statistics.median(first),
            "first_max_s": max(first),
            "repeat_p50_s": statistics.median(repeat),
            "repeat_p95_s": _p95(repeat),
        }
        progress(f"  {name}: first {figures[name]['first_p50_s']:.2f} s, repeat {figures[name]['repeat_p50_s']:.2f} s")
    return figures


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def measure_apis(base: str, burst_record: str, sizes: Sizes) -> dict[str, dict[str, float]]:
    figures = {}
    for name, path in apis_to_measure(burst_record):
        times, size = [], 0
        for _ in range(sizes.api_calls):
            request = urllib.request.Request(base + path, headers={"Accept-Encoding": "gzip"})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=90) as response:
                    size = len(response.read())
                times.append(time.perf_counter() - started)
            except urllib.error.HTTPError as error:
                progress(f"  {path} answered {error.code} after {time.perf_counter() - started:.1f} s")
                times.append(math.inf)
        figures[name] = {"p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * _p95(times), "kb": size / 1024}
    return figures


def wait_quiet(server: Process) -> float:
    """Seconds perfdb stayed busy (LevelDB's compaction of the import, in its own thread) before
    its CPU use fell under QUIET_CPU of a core for QUIET_SECONDS, so that "idle" means idle; it
    waits at most SETTLE_LIMIT_S."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_LIMIT_S:
        before = server.cpu_seconds()
        time.sleep(QUIET_SECONDS)
        if server.cpu_seconds() - before < QUIET_CPU * QUIET_SECONDS:
            return time.monotonic() - started - QUIET_SECONDS
    progress(f"perfdb still busy after {SETTLE_LIMIT_S} s: measuring anyway")
    return time.monotonic() - started


def user_page_transfer(browser: Any, base: str) -> dict[str, float]:
    """Bytes a first visit of the heavy user's page receives (bodies as sent, compressed where
    the dashboard compresses, plus headers), in all and for the page itself (its HTML carries the
    chart data)."""
    context = browser.new_context()
    context.add_init_script(SHOWN_WATCH)
    try:
        page = context.new_page()
        finished: list[Any] = []
        page.on("requestfinished", lambda request: finished.append(request))
        _visit(page, f"{base}/users/{HEAVY_USER}", "#charts[data-ready=true]")
        total = html = 0
        for request in finished:
            sizes = request.sizes()
            received = sizes["responseBodySize"] + sizes["responseHeadersSize"]
            total += received
            if request.resource_type == "document":
                html += received
        return {"total_kb": total / 1024, "html_kb": html / 1024, "requests": len(finished)}
    finally:
        context.close()


def run(sizes: Sizes, work: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    figures: dict[str, Any] = {"machine": machine(), "sizes": dataclasses.asdict(sizes)}
    write_tokens_file(work / "tokens.json")
    (work / "admin.key").write_text(ADMIN_KEY)
    with perfdb_server(work, work / "db", "--no-sync", f"--admin-key-file={work / 'admin.key'}") as server:
        total = sizes.history + sizes.burst
        progress(f"loading {total:,} results through import (history over a year, then a burst of {sizes.burst:,})")
        loaded = asyncio.run(load(server.port, sizes))
        figures["load"] = loaded
        progress(f"loaded {loaded['imported']:,} in {loaded['seconds']:.0f} s ({loaded['rps']:,.0f}/s)")
        figures["settle_seconds"] = wait_quiet(server)
        progress(f"perfdb quiet {figures['settle_seconds']:.0f} s after the load (LevelDB compacting it)")
        with dashboard(server.port, work) as base, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                figures["user_page_transfer"] = user_page_transfer(browser, base)
                for condition in ("idle", "ingest"):
                    with contextlib_ingest(condition, server.port, work) as ingest_file:
                        progress(f"pages in Chromium, perfdb {condition}")
                        figures[f"pages_{condition}"] = measure_pages(browser, base, loaded["burst_record"], sizes)
                        progress(f"JSON API, perfdb {condition}")
                        figures[f"api_{condition}"] = measure_apis(base, loaded["burst_record"], sizes)
                    if ingest_file is not None:
                        figures["background_ingest"] = json.loads(ingest_file.read_text())
                    # What is measured so far survives a failure later on.
                    (work.parent / f"{work.name}-partial.json").write_text(json.dumps(figures, indent=2))
            finally:
                browser.close()
    return figures


@contextmanager
def contextlib_ingest(condition: str, port: int, work: Path) -> Iterator[Path | None]:
    if condition == "idle":
        yield None
        return
    with background_ingest(port, work) as result:
        yield result


# -- the report -------------------------------------------------------------------------------


def _mark(met: bool) -> str:
    return "" if met else "  NOT MET"


def table(figures: dict[str, Any]) -> str:
    lines = [
        f"Page until main content, seconds (target p95 <= {PAGE_TARGET_S:g} s); first visit p50/max, repeat p50/p95",
        f"{'page':<28} {'idle first':>12} {'idle repeat':>12} {'ingest first':>13} {'ingest repeat':>14}",
    ]
    for name in figures["pages_idle"]:
        cells, met = [], True
        for condition in ("idle", "ingest"):
            page = figures[f"pages_{condition}"][name]
            cells.append(f"{page['first_p50_s']:.2f}/{page['first_max_s']:.2f}")
            cells.append(f"{page['repeat_p50_s']:.2f}/{page['repeat_p95_s']:.2f}")
            met = met and max(page["first_max_s"], page["repeat_p95_s"]) <= PAGE_TARGET_S
        lines.append(f"{name:<28} {cells[0]:>12} {cells[1]:>12} {cells[2]:>13} {cells[3]:>14}{_mark(met)}")
    lines += [
        "",
        f"JSON API, milliseconds p50/p95 (target p95 <= {API_TARGET_MS:g} ms), and reply size (gzip where sent)",
        f"{'endpoint':<28} {'idle':>14} {'ingest':>14} {'size':>10}",
    ]
    for name in figures["api_idle"]:
        idle, busy = figures["api_idle"][name], figures["api_ingest"][name]
        met = max(idle["p95_ms"], busy["p95_ms"]) <= API_TARGET_MS
        lines.append(
            f"{name:<28} {idle['p50_ms']:>6.0f}/{idle['p95_ms']:<7.0f} {busy['p50_ms']:>6.0f}/{busy['p95_ms']:<7.0f}"
            f" {idle['kb']:>7.1f} kB{_mark(met)}"
        )
    transfer = figures["user_page_transfer"]
    ingest = figures.get("background_ingest", {})
    lines += [
        "",
        f"user page transfer, first visit: {transfer['total_kb']:,.0f} kB in {transfer['requests']} requests, "
        f"of which the page with its chart data {transfer['html_kb']:,.0f} kB (target <= {TRANSFER_TARGET_KB:g} kB)"
        f"{_mark(transfer['total_kb'] <= TRANSFER_TARGET_KB)}",
        f"loaded {figures['load']['imported']:,} results in {figures['load']['seconds']:.0f} s, then perfdb was busy "
        f"compacting them for {figures['settle_seconds']:.0f} s; background ingest "
        f"{ingest.get('rps', 0):,.0f} results/s during the ingest rows",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 results and fewer visits; a couple of minutes")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (database, logs)")
    parser.add_argument("--background-ingest", metavar="PORT", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=INGEST_RATE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.background_ingest is not None:
        # The helper process: bounded to 20 minutes even if nobody stops it.
        result = asyncio.run(ingest_in_background(args.background_ingest, args.rate, 1200.0))
        print(json.dumps(result), flush=True)
        return
    if not CHROMIUM.exists():
        sys.exit("benchmarks/web.py needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    work = Path(tempfile.mkdtemp(prefix="perfdb-web-bench-"))
    started = time.monotonic()
    try:
        figures = run(QUICK if args.quick else FULL, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures["seconds"] = time.monotonic() - started
    print(table(figures))
    described = figures["machine"]
    print(f"\n{described['cores']} cores, {described['cpu']}, Python {described['python']}; {figures['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
