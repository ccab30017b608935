"""The text `cargo bench` prints with Criterion.rs.

One record per benchmark: the middle of Criterion's time estimate as `time` and the interval's
ends as `time_lower` and `time_upper`, all in ns whatever unit Criterion chose to print (ps, ns,
µs, ms, s: converted exactly); a throughput line likewise as `throughput` (elem/s, or B/s for
bytes: KiB, MiB and GiB are binary, KB, MB and GB decimal). Criterion prints no samples, date or
machine.
"""

from __future__ import annotations

import decimal
import re
from typing import Any

from perfdb.importers.common import record, require, scaled, test_name

FORMAT = "criterion"
EXPECTED = "Criterion.rs `cargo bench` output"
_NUMBER = r"([-+]?[0-9.]+(?:[eE][-+]?\d+)?)"
_ESTIMATE = rf"\[{_NUMBER} (\S+) {_NUMBER} (\S+) {_NUMBER} (\S+)\]"
_TIME_LINE = re.compile(rf"^(.*?)\s*time:\s+{_ESTIMATE}\s*$")
_THROUGHPUT_LINE = re.compile(rf"^\s*thrpt:\s+{_ESTIMATE}\s*$")
_TO_NS: dict[str, int | decimal.Decimal] = {
    "ps": decimal.Decimal("0.001"),
    "ns": 1,
    "µs": 1000,
    "us": 1000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
}
_PREFIXES = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}
_BINARY = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _throughput_unit(text: str) -> tuple[str, int] | None:
    """Criterion's throughput unit as (perfdb unit, factor)."""
    if text.endswith("elem/s") and text[: -len("elem/s")] in _PREFIXES:
        return "elem/s", _PREFIXES[text[: -len("elem/s")]]
    if text.endswith("B/s"):
        prefix = text[: -len("B/s")]
        if prefix in _BINARY:
            return "B/s", _BINARY[prefix]
        if prefix in _PREFIXES:
            return "B/s", _PREFIXES[prefix]
    return None


def looks_like(data: bytes, document: object) -> bool:
    return document is None and any(_TIME_LINE.match(line) for line in _lines(data))


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines()


def parse(data: bytes, name: str, document: Any = None) -> list[dict[str, Any]]:
    """`document` is unused: the format is text."""
    lines = _lines(data)
    records = []
    for number, line in enumerate(lines):
        found = _TIME_LINE.match(line)
        if found is None:
            continue
        bench = found.group(1).strip()
        if not bench:  # a long name goes on the line before
            bench = lines[number - 1].strip() if number else ""
        test = test_name(bench, name, f"line {number + 1}")
        estimate = found.groups()[1:]
        metrics: dict[str, int | float] = {}
        units: dict[str, str] = {}
        for metric, (text, unit) in zip(("time_lower", "time", "time_upper"), _pairs(estimate), strict=True):
            require(unit in _TO_NS, name, EXPECTED, f"line {number + 1}: unknown time unit {unit!r}")
            metrics[metric], units[metric] = scaled(text, _TO_NS[unit]), "ns"
        following = lines[number + 1] if number + 1 < len(lines) else ""
        throughput = _THROUGHPUT_LINE.match(following)
        if throughput:
            for metric, (text, unit) in zip(
                ("throughput_lower", "throughput", "throughput_upper"), _pairs(throughput.groups()), strict=True
            ):
                known = _throughput_unit(unit)
                require(known is not None, name, EXPECTED, f"line {number + 2}: unknown throughput unit {unit!r}")
                assert known is not None
                metrics[metric], units[metric] = scaled(text, known[1]), known[0]
        records.append(record(test, metrics, units))
    require(bool(records), name, EXPECTED, "no Criterion `time: [...]` lines in it")
    return records


def _pairs(groups: tuple[str | Any, ...]) -> list[tuple[str, str]]:
    return [(groups[index], groups[index + 1]) for index in range(0, 6, 2)]
