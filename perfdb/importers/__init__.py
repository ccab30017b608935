"""Importers: other benchmark tools' output as perfdb record requests.

Each module is pure: the bytes of one file in, the fields of its record requests out (those of
a `record` request without op and access_token; see protocol_spec.md section 4), or an
ImportFormatError naming the file and what was expected. `import_file` picks the importer, by
name or by detecting the format from the content, and reads gzip-compressed files too.
"""

from __future__ import annotations

import zlib
from types import ModuleType
from typing import Any

import orjson

from perfdb.importers import criterion, go, google_benchmark, grpc, hyperfine, jmh, pyperf, pytest_benchmark
from perfdb.importers.common import ImportFormatError

# In detection order: the JSON formats by their distinctive keys, then the text formats.
IMPORTERS: dict[str, ModuleType] = {
    module.FORMAT: module
    for module in (grpc, google_benchmark, pytest_benchmark, pyperf, hyperfine, jmh, go, criterion)
}
FORMATS = tuple(IMPORTERS)
AUTO = "auto"
_GZIP_MAGIC = b"\x1f\x8b"
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024

__all__ = ["AUTO", "FORMATS", "IMPORTERS", "ImportFormatError", "import_file"]


def import_file(data: bytes, name: str, file_format: str = AUTO) -> tuple[str, list[dict[str, Any]]]:
    """(the format, the record requests' fields) of one file's content; raises ImportFormatError."""
    data = _decompressed(data, name)
    if file_format != AUTO:
        if file_format not in IMPORTERS:
            raise ImportFormatError(f"{name}: unknown format {file_format!r}; formats: {', '.join(FORMATS)}")
        return file_format, IMPORTERS[file_format].parse(data, name)
    if not data.strip():
        raise ImportFormatError(f"{name}: empty: expected one of {', '.join(FORMATS)}")
    json_error = None
    try:
        document: Any = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        document = None  # a text format, a JSON file cut short, or one JSON document per line
        json_error = exc
    failures: list[str] = []
    for candidate, module in IMPORTERS.items():
        if module.looks_like(data, document):
            try:
                return candidate, module.parse(data, name, document)
            except ImportFormatError as error:
                failures.append(str(error).removeprefix(f"{name}: "))
    tried = ", ".join(FORMATS)
    if failures:
        raise ImportFormatError(f"{name}: {'; '.join(failures)} (formats tried: {tried}; or give --format)")
    if document is not None:
        what = "a JSON document of no known shape"
    elif data.lstrip()[:1] in (b"{", b"["):
        what = f"JSON that does not parse, perhaps cut short ({json_error})"
    else:
        what = "text of no known shape"
    raise ImportFormatError(
        f"{name}: no benchmark format recognised, {what} (formats tried: {tried}; or give --format)"
    )


def _decompressed(data: bytes, name: str) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        return data
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        plain = decompressor.decompress(data, MAX_DECOMPRESSED_BYTES)
    except zlib.error as exc:
        raise ImportFormatError(f"{name}: a damaged gzip file ({exc})") from None
    if decompressor.unconsumed_tail:
        raise ImportFormatError(f"{name}: decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes")
    if not decompressor.eof:
        raise ImportFormatError(f"{name}: a truncated gzip file")
    return plain
