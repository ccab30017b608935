"""gRPC results as `perfdb submit` always took them: ScenarioResult JSON (what qps_json_driver
writes) or perfdb record documents, one per file or one per line."""

from __future__ import annotations

from typing import Any

import orjson

from perfdb.importers.common import ImportFormatError
from perfdb.records.schema import BATCH_RECORD_FIELDS

FORMAT = "grpc"
EXPECTED = "a gRPC ScenarioResult or perfdb record (JSON, or one per line)"


def looks_like(data: bytes, document: object) -> bool:
    if isinstance(document, dict):
        return _is_grpc(document) or "scenarios" in document
    if document is None:  # not one JSON document: perhaps one per line
        first = data.lstrip().split(b"\n", 1)[0]
        try:
            line = orjson.loads(first)
        except orjson.JSONDecodeError:
            return False
        return isinstance(line, dict) and _is_grpc(line)
    return False


def _is_grpc(document: dict[str, Any]) -> bool:
    return "summary" in document or "metrics" in document or "scenario_result" in document


def documents(data: bytes, name: str, whole: Any = None) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects in a file with their line numbers: one document (pretty-printed or not,
    line 1; `whole` when the caller already decoded it), or one per line."""
    try:
        whole = orjson.loads(data) if whole is None else whole
    except orjson.JSONDecodeError:
        whole = None
    else:
        if not isinstance(whole, dict):
            raise ImportFormatError(f"{name}: not {EXPECTED}: expected a JSON object")
        return [(1, whole)]
    found: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            where = f"{name}: line {number}" if found or number > 1 else name
            raise ImportFormatError(f"{where}: not JSON ({exc})") from None
        if not isinstance(document, dict):
            raise ImportFormatError(f"{name}: line {number}: expected a JSON object")
        found.append((number, document))
    if not found:
        raise ImportFormatError(f"{name}: empty: expected {EXPECTED}")
    return found


def record_fields(document: dict[str, Any], where: str) -> dict[str, Any]:
    """Request fields for one document: a gRPC ScenarioResult or a perfdb record."""
    if "summary" in document and "metrics" not in document:
        return {"scenario_result": document}
    if "scenarios" in document:
        raise ImportFormatError(f"{where}: a scenario input file (what qps_json_driver reads), not a result")
    if "metrics" in document or "scenario_result" in document:
        # A batch record's fields: the token comes from the command line.
        return {key: value for key, value in document.items() if key in BATCH_RECORD_FIELDS}
    raise ImportFormatError(f"{where}: neither a gRPC ScenarioResult nor a perfdb record (no summary or metrics)")


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    found = documents(data, name, document)
    if len(found) == 1:
        return [record_fields(found[0][1], name)]
    return [record_fields(document, f"{name}: line {number}") for number, document in found]
