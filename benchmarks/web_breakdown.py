"""Where a dashboard page's time goes: the user pages and the overview in Chromium, split up.

    python benchmarks/web_breakdown.py [--database DIR] [--full] [--ingest] [--visits N] [--json FILE]

Loads web.py's --quick data (100,000 results; with --full its 1,000,000, the heavy user's 20,000
among them) into DIR, or reuses DIR when it holds them already,
so that the code before and after a change can be measured in turns on the same data. Then runs
perfdb and perfdb-web from this checkout and opens each page as web.py does (a fresh browser
context per first visit, two repeat visits in it, 1600x1000, the browser's own clock), with
perfdb idle or, with --ingest, while web.py's background process stores 2,000 results/s. Per page
and kind of visit, medians of: the page's time until its main content is drawn; when its HTML
was in (the chart pages carry their data: perfdb's reads and perfdb-web's work on them); from
then to the page drawn (the static files and the browser's work); and the renderer main
thread's busy time and script time (CDP Performance.getMetrics).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import web  # noqa: E402
from run import perfdb_server, progress  # noqa: E402
from workload import write_tokens_file  # noqa: E402

PAGES = [
    ("user page, all tests", f"/users/{web.HEAVY_USER}", "#charts[data-ready=true]"),
    ("user page, one test", f"/users/{web.HEAVY_USER}?test={web.TESTS[2]}", "#charts[data-ready=true]"),
    ("overview", "/overview", "#histogram[data-ready=true]"),
]
REPEATS_PER_CONTEXT = 2
# What the page's own clock says once its main content is drawn (see web.SHOWN_WATCH).
TIMINGS = """() => ({
  shown_ms: window.__perfdbShown.ms,
  html_end_ms: performance.getEntriesByType("navigation")[0].responseEnd,
})"""


@dataclasses.dataclass(frozen=True)
class Visit:
    shown_ms: float  # from the navigation's start to the first frame with the main content
    html_end_ms: float  # the page's HTML received
    renderer_busy_ms: float  # the renderer's main thread, from the document's start
    script_ms: float


def visit(page: Any, cdp: Any, url: str, selector: str) -> Visit:
    page.context.add_init_script(f"window.__perfdbSelector = {json.dumps(selector + ', .error-panel')};")
    page.goto(url, wait_until="commit", timeout=90_000)
    page.wait_for_function("() => window.__perfdbShown !== null", timeout=90_000)
    timings = page.evaluate(TIMINGS)
    metrics = {metric["name"]: metric["value"] for metric in cdp.send("Performance.getMetrics")["metrics"]}
    return Visit(
        shown_ms=timings["shown_ms"],
        html_end_ms=timings["html_end_ms"],
        renderer_busy_ms=1000 * metrics["TaskDuration"],
        script_ms=1000 * metrics["ScriptDuration"],
    )


def summary(visits: list[Visit]) -> dict[str, float]:
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    return {
        "page_ms": median([v.shown_ms for v in visits]),
        "html_ms": median([v.html_end_ms for v in visits]),
        "after_html_ms": median([v.shown_ms - v.html_end_ms for v in visits]),
        "renderer_busy_ms": median([v.renderer_busy_ms for v in visits]),
        "script_ms": median([v.script_ms for v in visits]),
    }


def measure(browser: Any, base: str, first_visits: int) -> dict[str, dict[str, dict[str, float]]]:
    figures = {}
    for name, path, selector in PAGES:
        first: list[Visit] = []
        repeat: list[Visit] = []
        for _ in range(first_visits):
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            context.add_init_script(web.SHOWN_WATCH)
            try:
                page = context.new_page()
                cdp = context.new_cdp_session(page)
                cdp.send("Performance.enable")
                first.append(visit(page, cdp, base + path, selector))
                repeat += [visit(page, cdp, base + path, selector) for _ in range(REPEATS_PER_CONTEXT)]
            finally:
                context.close()
        figures[name] = {"first": summary(first), "repeat": summary(repeat)}
    return figures


@contextmanager
def maybe_ingest(ingest: bool, port: int, work: Path) -> Iterator[None]:
    if not ingest:
        yield
        return
    with web.background_ingest(port, work):
        yield


def table(figures: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        f"{'page':<22} {'visit':<7} {'page':>6} {'html in':>8} {'after html':>11} {'renderer':>9} {'script':>7}"
        "   (ms, medians)"
    ]
    for name, kinds in figures.items():
        for kind, row in kinds.items():
            lines.append(
                f"{name:<22} {kind:<7} {row['page_ms']:>6.0f} {row['html_ms']:>8.0f} {row['after_html_ms']:>11.0f}"
                f" {row['renderer_busy_ms']:>9.0f} {row['script_ms']:>7.0f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=Path, help="where the data is, or goes (default: a temporary folder)")
    parser.add_argument("--full", action="store_true", help="load web.py's full data (when DIR is new)")
    parser.add_argument("--ingest", action="store_true", help="measure while 2,000 results/s are stored")
    parser.add_argument("--visits", type=int, default=3, help="first visits per page (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if not web.CHROMIUM.exists():
        sys.exit("benchmarks/web_breakdown.py needs Debian's chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    database = args.database or Path(tempfile.mkdtemp(prefix="perfdb-web-breakdown-")) / "db"
    work = database.parent
    work.mkdir(parents=True, exist_ok=True)
    write_tokens_file(work / "tokens.json")
    (work / "admin.key").write_text(web.ADMIN_KEY)
    fresh = not database.exists()
    with perfdb_server(work, database, "--no-sync", f"--admin-key-file={work / 'admin.key'}") as server:
        if fresh:
            sizes = web.FULL if args.full else web.QUICK
            progress(f"loading web.py's {'full' if args.full else '--quick'} data into {database}")
            asyncio.run(web.load(server.port, sizes))
        # Also after a restart on loaded data: LevelDB may still be compacting it.
        progress(f"perfdb quiet after {web.wait_quiet(server):.0f} s")
        with web.dashboard(server.port, work) as base, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(web.CHROMIUM), args=web.CHROMIUM_ARGS)
            try:
                with maybe_ingest(args.ingest, server.port, work):
                    figures = measure(browser, base, args.visits)
            finally:
                browser.close()
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
