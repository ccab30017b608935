"""The dashboard's static files as browsers get them: each page's scripts, and all its styles,
joined into one file each (one request, not five), gzipped once at start-up, at URLs that change
with their content so that browsers keep them for good."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent / "static"
BUNDLE_PREFIX = "/static/bundle/"
# Each bundle's parts, in the order the browser ran them as separate files.
BUNDLES: Mapping[str, tuple[str, ...]] = {
    "dashboard.css": ("vendor/uplot/uPlot.min.css", "dashboard.css"),
    "dashboard.js": ("dashboard.js",),  # every page
    "charts.js": ("dashboard.js", "vendor/uplot/uPlot.iife.min.js", "charts.js"),  # pages with charts
}
CONTENT_TYPES = {".css": "text/css", ".js": "text/javascript"}


@dataclasses.dataclass(frozen=True, slots=True)
class Bundle:
    body: bytes
    gzipped: bytes
    content_type: str
    url: str  # with a hash of the content


def asset_urls(static_dir: Path = STATIC_DIR) -> dict[str, str]:
    """Each static file's URL with a hash of its content, so a new version is never served stale."""
    urls = {}
    for path in sorted(static_dir.rglob("*")):
        if path.is_file():
            name = path.relative_to(static_dir).as_posix()
            urls[name] = f"/static/{name}?v={_digest(path.read_bytes())}"
    return urls


def build_bundles(static_dir: Path = STATIC_DIR) -> dict[str, Bundle]:
    """The bundles, each its parts' bytes joined (a JavaScript part ends with a `;` line, so that
    no part runs on into the next), by bundle name."""
    bundles = {}
    for name, parts in BUNDLES.items():
        suffix = Path(name).suffix
        separator = b"\n;\n" if suffix == ".js" else b"\n"
        body = separator.join((static_dir / part).read_bytes().rstrip() for part in parts) + b"\n"
        bundles[name] = Bundle(
            body=body,
            gzipped=gzip.compress(body, compresslevel=9, mtime=0),
            content_type=CONTENT_TYPES[suffix],
            url=f"{BUNDLE_PREFIX}{name}?v={_digest(body)}",
        )
    return bundles


def bundle_handler(bundles: Mapping[str, Bundle]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Serves the bundles from memory, gzipped to a client that takes it."""

    async def serve_bundle(request: web.Request) -> web.Response:
        bundle = bundles.get(request.match_info["name"])
        if bundle is None:
            raise web.HTTPNotFound()
        response = web.Response(content_type=bundle.content_type, charset="utf-8")
        response.headers["Vary"] = "Accept-Encoding"
        if accepts_gzip(request):
            response.body = bundle.gzipped
            response.headers["Content-Encoding"] = "gzip"
        else:
            response.body = bundle.body
        return response

    return serve_bundle


def accepts_gzip(request: web.Request) -> bool:
    """Whether the client takes gzip: named in Accept-Encoding (or `*`) without q=0."""
    for item in request.headers.get("Accept-Encoding", "").lower().split(","):
        coding, _, parameters = item.partition(";")
        if coding.strip() not in ("gzip", "*"):
            continue
        weight = parameters.strip().removeprefix("q=")
        try:
            return not parameters.strip() or float(weight) > 0
        except ValueError:
            return False
    return False


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:12]
