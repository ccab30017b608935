"""The perfdb command line: submit results, read them back, delete them, export and import a database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import getpass
import hashlib
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from perfdb import __version__
from perfdb.client import AsyncClient, PerfdbClientError, tls_context
from perfdb.client.common import CONNECTION_FAILED, TIMEOUT
from perfdb.config import DEFAULT_ADDRESS, positive_int
from perfdb.importers import AUTO, FORMATS, ImportFormatError, import_file
from perfdb.protocol.addresses import AddressError
from perfdb.protocol.limits import MAX_BATCH_RECORDS
from perfdb.records.sysinfo import collect_sys_info
from perfdb.records.units import CORE_METRICS, format_value

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_REFUSED = 1  # the server refused a request (or some submissions)
EXIT_USAGE = 2  # bad command line
EXIT_UNREACHABLE = 3  # no connection, or no reply in time
EXIT_BAD_INPUT = 4  # an input file could not be read or understood

# Version 2 added tombstone lines (deleted record ids); version 1 dumps import as before.
DUMP_HEADER = {"format": "perfdb-dump", "version": 2}
DUMP_VERSIONS = (1, 2)
IMPORT_BATCH_RECORDS = 1000  # records, or tombstones, per import request: the server's bound


class CliError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class InputError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BAD_INPUT)


# -- progress ----------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None = None, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._label = label
        self._total = total
        self._done = 0
        self._drawn = 0.0
        self._started = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self._done += count
        now = time.monotonic()
        if self._enabled and now - self._drawn >= 0.1:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self._done / max(now - self._started, 1e-6)
        if self._total:
            fraction = min(self._done / self._total, 1.0)
            bar = "#" * int(fraction * 30)
            text = f"{self._label} [{bar:<30}] {self._done}/{self._total} {fraction:4.0%} {rate:,.0f}/s"
        else:
            text = f"{self._label} {self._done} {rate:,.0f}/s"
        self._stream.write("\r" + text + "\x1b[K")
        self._stream.flush()

    def finish(self) -> None:
        if self._enabled and self._drawn:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()


# -- inputs ------------------------------------------------------------------------------


def read_secret(path: str | None, env_var: str, prompt: str, what: str) -> str:
    """A secret from a file, else the environment, else a prompt that does not echo."""
    if path is not None:
        try:
            secret = Path(path).read_text().strip()
        except OSError as exc:
            raise InputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    elif os.environ.get(env_var):
        secret = os.environ[env_var].strip()
    elif sys.stdin.isatty():
        secret = getpass.getpass(prompt).strip()
    else:
        raise CliError(f"no {what}: use --{what.replace(' ', '-')}-file or {env_var}", EXIT_USAGE)
    if not secret:
        raise InputError(f"the {what} is empty")
    return secret


def content_request_id(fields: dict[str, Any]) -> str:
    """The same submission always gets the same key, so submitting a file twice stores it once."""
    digest = hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return "sha256-" + digest[:32]


# -- output ------------------------------------------------------------------------------

CSV_COLUMNS = ("record_id", "user_id", "timestamp", "test_name", "tag", *(m.name for m in CORE_METRICS))


class RecordWriter:
    """Writes records as a table, JSON, NDJSON or CSV, one at a time (constant memory)."""

    def __init__(self, output_format: str, out: IO[str]) -> None:
        self._format = output_format
        self._out = out
        self._count = 0
        self._csv = csv.writer(out) if output_format == "csv" else None

    def start(self) -> None:
        if self._format == "json":
            self._out.write("[")
        elif self._csv is not None:
            self._csv.writerow(CSV_COLUMNS)
        elif self._format == "table":
            self._out.write(self._table_row(["time (UTC)", "user", "test", "tag", *(m.label for m in CORE_METRICS)]))

    def write(self, record: dict[str, Any]) -> None:
        if self._format == "json":
            self._out.write(("," if self._count else "") + "\n" + orjson.dumps(record).decode())
        elif self._format == "ndjson":
            self._out.write(orjson.dumps(record).decode() + "\n")
        elif self._csv is not None:
            metrics = record.get("metrics", {})
            self._csv.writerow(
                [*(record.get(c, "") for c in CSV_COLUMNS[:5]), *(metrics.get(c, "") for c in CSV_COLUMNS[5:])]
            )
        else:
            metrics = record.get("metrics", {})
            cells = [
                record["timestamp"][:19].replace("T", " "),
                record["user_id"],
                record["test_name"],
                record["tag"],
                *(format_value(metrics.get(m.name), m.unit) for m in CORE_METRICS),
            ]
            self._out.write(self._table_row(cells))
        self._count += 1

    def finish(self) -> None:
        if self._format == "json":
            self._out.write("\n]\n" if self._count else "]\n")
        elif self._format == "table" and not self._count:
            self._out.write("(no records)\n")
        self._out.flush()

    @staticmethod
    def _table_row(cells: list[str]) -> str:
        widths = (19, 16, 28, 12, *([10] * len(CORE_METRICS)))
        parts = [_fit(cell, width) for cell, width in zip(cells, widths, strict=True)]
        return "  ".join(parts).rstrip() + "\n"


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


# -- commands ----------------------------------------------------------------------------


def make_client(args: argparse.Namespace) -> AsyncClient:
    context = tls_context(args.ca_file) if args.tls or args.ca_file else None
    read_key = None
    if args.read_key_file is not None or os.environ.get("PERFDB_READ_KEY"):
        read_key = read_secret(args.read_key_file, "PERFDB_READ_KEY", "", "read key")
    try:
        return AsyncClient(
            args.server,
            ssl_context=context,
            connect_timeout=min(args.timeout, 5.0),
            request_timeout=args.timeout,
            read_key=read_key,
        )
    except AddressError as exc:
        raise CliError(f"--server: the address {exc}", EXIT_USAGE) from None


async def cmd_submit(args: argparse.Namespace) -> int:
    token = read_secret(args.token_file, "PERFDB_ACCESS_TOKEN", "perfdb access token: ", "token")
    overrides: dict[str, Any] = {}
    if args.test_name is not None:
        overrides["test_name"] = args.test_name
    if args.tag is not None:
        overrides["tag"] = args.tag
    if args.sys_info == "auto":
        overrides["sys_info"] = collect_sys_info()
    if args.baseline_tag is not None:
        overrides["baseline_tag"] = args.baseline_tag
    refused = unreadable = regressed = 0
    async with make_client(args) as client:
        for name in args.files:
            try:
                # The whole file is understood before anything is sent: bad input stores nothing.
                file_format, requests = await asyncio.to_thread(_submission_requests, name, args.format, overrides)
            except InputError as exc:
                unreadable += 1
                print(f"perfdb: {exc}", file=sys.stderr)
                continue
            progress = Progress(f"submitting {name}", len(requests))
            counts = {"stored": 0, "duplicate": 0, "refused": 0}
            batch_size = min(MAX_BATCH_RECORDS, args.window)
            try:
                outcomes = client.record_batches(
                    token, requests, batch_size=batch_size, window=max(1, args.window // batch_size)
                )
                async for outcome in outcomes:
                    progress.advance()
                    if isinstance(outcome, PerfdbClientError):
                        counts["refused"] += 1
                        where = _entry(requests, outcome.index)
                        print(f"perfdb: {name}{where}: {outcome.code}: {outcome.message}", file=sys.stderr)
                    else:
                        state = "duplicate" if outcome["duplicate"] else "stored"
                        counts[state] += 1
                        print(f"{name}: {outcome['record_id']} {state}", flush=False)
                        for verdict in outcome.get("verdicts", ()):
                            if verdict["status"] == "regression":
                                regressed += 1
                                print(f"{name}: {outcome['record_id']} {describe_regression(verdict)}", flush=False)
            except PerfdbClientError as exc:
                if exc.code in (CONNECTION_FAILED, TIMEOUT):
                    raise
                counts["refused"] += len(requests) - counts["stored"] - counts["duplicate"]
                print(f"perfdb: {name}: {exc.code}: {exc.message}", file=sys.stderr)
            finally:
                progress.finish()
                sys.stdout.flush()
            refused += counts["refused"]
            summary = ", ".join(f"{count} {state}" for state, count in counts.items())
            print(f"perfdb: {name}: {file_format}: {summary}", file=sys.stderr)
    if unreadable:
        return EXIT_BAD_INPUT
    if regressed and args.fail_on_regression:
        print(f"perfdb: {regressed} metric(s) regressed", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_REFUSED if refused else EXIT_OK


def describe_regression(verdict: dict[str, Any]) -> str:
    """One line of evidence: the value, the baseline it was judged against, and the bound it crossed."""
    baseline, threshold = verdict["baseline"], verdict["threshold"]
    change = verdict["change_percent"]
    moved = f"{change:+.1f} %" if change is not None else f"{verdict['change']:+g}"
    bound = f"{threshold['percent']:.1f} %" if threshold.get("percent") is not None else f"{threshold['bound']:g}"
    return (
        f"REGRESSION {verdict['metric']}: {verdict['value']:g} against a baseline of {baseline['mean']:g} "
        f"(stddev {baseline['stddev']:g}, n={baseline['n']}): {moved}, beyond the {bound} threshold "
        f"({threshold['governed_by']}; {verdict['direction']} is better)"
    )


def _submission_requests(name: str, file_format: str, overrides: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(the file's format, its records' fields, as record_batch takes them); runs off the event loop
    (it reads the file)."""
    with _open_input(name) as stream:
        try:
            data = stream.read()
        except OSError as exc:
            raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        found_format, entries = import_file(data, name, file_format)
    except ImportFormatError as exc:
        raise InputError(str(exc)) from None
    requests = []
    for entry in entries:
        fields = {**entry, **overrides}
        if fields.get("request_id") is None:  # absent or null: derive it from the content
            fields["request_id"] = content_request_id({k: v for k, v in fields.items() if k != "request_id"})
        requests.append(fields)
    return found_format, requests


def _entry(requests: list[dict[str, Any]], index: int | None) -> str:
    """Which entry of a file a refusal is about: its position and, when it has one, its test name."""
    if index is None:
        return ""
    test_name = requests[index].get("test_name")
    return f" (record {index + 1}: {test_name})" if isinstance(test_name, str) else f" (record {index + 1})"


@contextlib.contextmanager
def _open_input(name: str) -> Iterator[IO[bytes]]:
    """A named file, or stdin for '-'."""
    if name == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = open(name, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    with stream:
        yield stream


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"test_name": args.test_name, "tag": args.tag, "since": args.since, "until": args.until}


async def _print_records(args: argparse.Namespace, records: AsyncIterator[dict[str, Any]]) -> int:
    output_format = args.format or ("table" if sys.stdout.isatty() else "ndjson")
    writer = RecordWriter(output_format, sys.stdout)
    writer.start()
    async for record in records:
        writer.write(record)
    writer.finish()
    return EXIT_OK


async def cmd_get_user(args: argparse.Namespace) -> int:
    async with make_client(args) as client:
        return await _print_records(args, client.get_user(args.user_id, **_filters(args)))


async def cmd_get_all(args: argparse.Namespace) -> int:
    async with make_client(args) as client:
        return await _print_records(args, client.get_all(**_filters(args)))


async def cmd_export(args: argparse.Namespace) -> int:
    admin_key = read_secret(args.admin_key_file, "PERFDB_ADMIN_KEY", "perfdb admin key: ", "admin key")
    out = sys.stdout.buffer
    async with make_client(args) as client:
        # The admin key opens reads too, on a server that wants a read key.
        total = (await client.call("stats", admin_key=admin_key))["records"] if sys.stderr.isatty() else None
        progress = Progress("exporting", total)
        users_written: set[str] = set()
        pages = client.pages("export", admin_key=admin_key, since=args.since, until=args.until, limit=args.page_size)
        header_written = False
        async for page in pages:
            lines = []
            if not header_written:  # only once the server has accepted the export
                lines.append(orjson.dumps(DUMP_HEADER))
                header_written = True
            for record in page["records"]:
                user_id = record["user_id"]
                if user_id not in users_written:
                    users_written.add(user_id)
                    lines.append(b'{"user":' + orjson.dumps(page["users"][user_id]) + b"}")
                # Wrapped by hand: one more level of nesting could exceed what orjson will write.
                lines.append(b'{"record":' + orjson.dumps(record) + b"}")
            for record_id in page.get("tombstones", ()):
                lines.append(orjson.dumps({"tombstone": record_id}))
            out.write(b"\n".join(lines) + b"\n" if lines else b"")
            progress.advance(len(page["records"]))
        out.flush()
        progress.finish()
    return EXIT_OK


async def cmd_import(args: argparse.Namespace) -> int:
    admin_key = read_secret(args.admin_key_file, "PERFDB_ADMIN_KEY", "perfdb admin key: ", "admin key")
    totals = {"imported": 0, "duplicates": 0, "tombstoned": 0, "removed": 0}
    force = True if args.force else None
    async with make_client(args) as client:
        # Keep each import request well inside the server's line limit.
        budget = (await client.hello())["limits"]["max_line_bytes"] // 2
        progress = Progress("importing")
        users: dict[str, Any] = {}
        batch: list[dict[str, Any]] = []
        batch_bytes = 0
        tombstones: list[str] = []

        async def send() -> None:
            nonlocal batch, batch_bytes
            needed = {record["user_id"]: users[record["user_id"]] for record in batch}
            reply = await client.call("import", admin_key=admin_key, records=batch, users=needed, force=force)
            for name in totals:
                totals[name] += reply.get(name, 0)
            progress.advance(len(batch))
            batch, batch_bytes = [], 0

        async def send_tombstones() -> None:
            reply = await client.call("import", admin_key=admin_key, tombstones=tombstones)
            totals["removed"] += reply.get("removed", 0)
            tombstones.clear()

        with _open_input(args.file) as stream:
            header_seen = False
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                if not header_seen:
                    _check_dump_header(line, args.file)
                    header_seen = True
                    continue
                item = _dump_item(line, args.file, number)
                if item is None:
                    continue
                if "user" in item:
                    users[item["user"]["user_id"]] = item["user"]
                    continue
                if "tombstone" in item:
                    tombstones.append(item["tombstone"])
                    if len(tombstones) == IMPORT_BATCH_RECORDS:
                        await send_tombstones()
                    continue
                record = item["record"]
                if record.get("user_id") not in users:
                    raise InputError(f"{args.file}: line {number}: record of a user not listed before it")
                if batch and (batch_bytes + len(line) > budget or len(batch) >= IMPORT_BATCH_RECORDS):
                    await send()
                batch.append(record)
                batch_bytes += len(line)
            if batch:
                await send()
            if tombstones:
                await send_tombstones()
        progress.finish()
    print(f"imported {totals['imported']} records ({totals['duplicates']} were already present)")
    if totals["tombstoned"]:
        print(f"left out {totals['tombstoned']} records deleted on this server (--force brings them back)")
    if totals["removed"]:
        print(f"removed {totals['removed']} records that the dump lists as deleted")
    return EXIT_OK


def _check_dump_header(line: bytes, name: str) -> None:
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError:
        header = None
    if not (
        isinstance(header, dict)
        and header.keys() == DUMP_HEADER.keys()
        and header["format"] == DUMP_HEADER["format"]
        and header["version"] in DUMP_VERSIONS
    ):
        raise InputError(f"{name}: not a perfdb dump (version 1 or 2); the first line must be {DUMP_HEADER}")


def _dump_item(line: bytes, name: str, number: int) -> dict[str, Any] | None:
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{name}: line {number}: not JSON ({exc})") from None
    if not isinstance(item, dict) or not (
        (isinstance(item.get("user"), dict) and isinstance(item["user"].get("user_id"), str))
        or isinstance(item.get("record"), dict)
        or isinstance(item.get("tombstone"), str)
    ):
        raise InputError(f"{name}: line {number}: expected a user, a record or a tombstone")
    return item


async def cmd_delete_record(args: argparse.Namespace) -> int:
    if args.admin_key_file is not None:
        credentials = {"admin_key": read_secret(args.admin_key_file, "PERFDB_ADMIN_KEY", "", "admin key")}
    else:
        token = read_secret(args.token_file, "PERFDB_ACCESS_TOKEN", "perfdb access token: ", "token")
        credentials = {"access_token": token}
    refused = 0
    async with make_client(args) as client:
        for record_id in args.record_ids:
            try:
                reply = await client.delete_record(record_id, **credentials)
            except PerfdbClientError as exc:
                if exc.code in (CONNECTION_FAILED, TIMEOUT):
                    raise
                refused += 1  # reported, and the other ids still go
                print(f"perfdb: {record_id}: {exc.code}: {exc.message}", file=sys.stderr)
                continue
            print(f"{record_id} {'deleted' if reply['deleted'] else 'was already deleted'}", flush=True)
    return EXIT_REFUSED if refused else EXIT_OK


async def cmd_delete_user(args: argparse.Namespace) -> int:
    admin_key = read_secret(args.admin_key_file, "PERFDB_ADMIN_KEY", "perfdb admin key: ", "admin key")
    async with make_client(args) as client:
        reply = await client.delete_user(args.user_id, admin_key=admin_key)
    if reply["deleted"]:
        print(f"user {args.user_id} deleted with {reply['records']} records")
    else:
        print(f"user {args.user_id}: nothing to delete")
    return EXIT_OK


AUDIT_COLUMNS = ("time", "actor", "op", "user_id", "records", "complete", "record_ids")


async def cmd_audit(args: argparse.Namespace) -> int:
    admin_key = read_secret(args.admin_key_file, "PERFDB_ADMIN_KEY", "perfdb admin key: ", "admin key")
    output_format = args.format or ("table" if sys.stdout.isatty() else "ndjson")
    out = sys.stdout
    if output_format == "table":
        out.write(_audit_row(list(AUDIT_COLUMNS)))
    shown = 0
    async with make_client(args) as client:
        async for entry in client.audit_log(admin_key=admin_key):  # pages of the server's default size
            if args.limit is not None and shown == args.limit:
                break
            if output_format == "ndjson":
                out.write(orjson.dumps(entry).decode() + "\n")
            else:
                cells = [
                    entry["time"][:19].replace("T", " "),
                    entry["actor"],
                    entry["op"],
                    entry.get("user_id", ""),
                    str(entry["records"]),
                    "yes" if entry["complete"] else "no",
                    " ".join(entry.get("record_ids", [])),
                ]
                out.write(_audit_row(cells))
            shown += 1
    if output_format == "table" and not shown:
        out.write("(no deletions)\n")
    out.flush()
    return EXIT_OK


def _audit_row(cells: list[str]) -> str:
    widths = (19, 5, 13, 24, 7, 8, 66)
    return "  ".join(_fit(cell, width) for cell, width in zip(cells, widths, strict=True)).rstrip() + "\n"


async def cmd_repair(args: argparse.Namespace) -> int:
    # Imported here: the other commands need no LevelDB on the client machine.
    from perfdb.storage import StoreOpenError
    from perfdb.storage.repair import repair_database

    try:
        report = await asyncio.to_thread(repair_database, Path(args.database), drop_damaged=args.drop_damaged)
    except StoreOpenError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
    print(f"{report.records} good records, {report.users} users")
    print(f"indexes and counts rebuilt for {report.indexed} records")
    for record_id in report.damaged:
        print(f"damaged record {record_id}{' (dropped)' if report.dropped else ''}")
    for record_id in report.resurrected:
        print(f"deleted record {record_id} was back (removed again)")
    print(f"{report.dangling_index_entries} index entries without their record{' (dropped)' if report.dropped else ''}")
    if report.counters_wrong:
        print(f"the stored counters were wrong{' (rewritten)' if report.dropped else ''}")
    damage = report.damaged or report.dangling_index_entries or report.counters_wrong
    if damage and not report.dropped:
        print("run again with --drop-damaged to delete them and fix the counters")
        return EXIT_REFUSED
    return EXIT_OK


# -- compare ----------------------------------------------------------------------------

COMPARE_CSV_COLUMNS = (
    "test_name", "metric", "status", "direction", "change_percent",
    "base_n", "base_mean", "base_stddev", "base_median", "head_n", "head_mean", "head_stddev", "head_median",
    "test", "pvalue", "welch_pvalue", "mann_whitney_pvalue",
)  # fmt: skip
COMPARE_TABLE_HEADINGS = (
    "test", "metric", "status", "change", "base mean", "± sd", "head mean", "± sd", "base n", "head n", "p-value",
)  # fmt: skip
TEST_NAME_WIDTH = 48  # longer test names are elided in the middle, keeping their distinguishing tail
METRIC_WIDTH = 24
_STATUS_COLOURS = {"regression": "\x1b[31m", "improvement": "\x1b[32m"}  # red, green
_RESET = "\x1b[0m"
_UNITS = {metric.name: metric.unit for metric in CORE_METRICS}


def compare_selector(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """One side of a compare from --SIDE, --SIDE-records or --SIDE-since/--SIDE-until; exactly one kind."""
    tag = getattr(args, side)
    record_ids = getattr(args, f"{side}_records")
    commit = getattr(args, f"{side}_commit")
    since, until = getattr(args, f"{side}_since"), getattr(args, f"{side}_until")
    kinds = (("tag", tag), ("records", record_ids), ("commit", commit), ("window", since or until))
    given = [kind for kind, value in kinds if value]
    if tag is not None and "tag" not in given:
        given.insert(0, "tag")  # an empty tag is a tag too
    if len(given) != 1:
        raise CliError(
            f"{side}: give exactly one of --{side} TAG, --{side}-records ID,ID, --{side}-commit SHA "
            f"or --{side}-since/--{side}-until",
            EXIT_USAGE,
        )
    if tag is not None:
        return {"tag": tag}
    if commit:
        return {"commit": commit}
    if record_ids:
        ids = [record_id.strip() for record_id in record_ids.split(",") if record_id.strip()]
        if not ids:
            raise CliError(f"--{side}-records: no record ids", EXIT_USAGE)
        return {"record_ids": ids}
    return {key: value for key, value in (("since", since), ("until", until)) if value}


async def cmd_compare(args: argparse.Namespace) -> int:
    base, head = compare_selector(args, "base"), compare_selector(args, "head")
    async with make_client(args) as client:
        try:
            reply = await client.compare(base, head, test_name=args.test, user_id=args.user)
        except PerfdbClientError as exc:
            if exc.code == "bad_request":  # the request is made of the options alone
                raise CliError(exc.message, EXIT_USAGE) from None
            raise
    for envelope in ("id", "ok"):
        reply.pop(envelope, None)
    rows: list[dict[str, Any]] = reply["rows"]
    for side in ("base", "head"):
        _warn_about_side(side, reply[side], reply["max_records"])
    if args.format == "json":
        sys.stdout.write(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.format == "csv":
        write_compare_csv(rows, sys.stdout)
    else:
        colour = args.color == "always" or (
            args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        )
        write_compare_table(reply, sys.stdout, colour=colour)
    sys.stdout.flush()
    return EXIT_REFUSED if any(row["status"] == "regression" for row in rows) else EXIT_OK


def _warn_about_side(side: str, counts: dict[str, Any], max_records: int) -> None:
    if counts["truncated"]:
        print(f"perfdb: {side}: more than {max_records:,} records matched; compared the newest {max_records:,}",
              file=sys.stderr)  # fmt: skip
    if not counts["complete"]:
        print(f"perfdb: {side}: the server stopped after examining {counts['examined']:,} entries; "
              "older records were not compared", file=sys.stderr)  # fmt: skip
    if counts.get("missing"):
        print(f"perfdb: {side}: {counts['missing']:,} of the record ids given matched no record", file=sys.stderr)


def write_compare_csv(rows: list[dict[str, Any]], out: IO[str]) -> None:
    writer = csv.writer(out)
    writer.writerow(COMPARE_CSV_COLUMNS)
    for row in rows:
        flat = {**row}
        for side in ("base", "head"):
            for field in ("n", "mean", "stddev", "median"):
                flat[f"{side}_{field}"] = row[side].get(field)
        writer.writerow(["" if flat.get(column) is None else flat[column] for column in COMPARE_CSV_COLUMNS])


def write_compare_table(reply: dict[str, Any], out: IO[str], *, colour: bool) -> None:
    """Aligned columns, one row per test and metric; on a terminal regressions red, improvements green."""
    rows: list[dict[str, Any]] = reply["rows"]
    base, head = reply["base"], reply["head"]
    if not rows:
        out.write(
            f"(no test and metric on both sides: base {base['records']:,} records, head {head['records']:,} records)\n"
        )
        return
    cells = [_compare_cells(row) for row in rows]
    widths = [max(len(heading), *(len(line[column]) for line in cells)) for column, heading in
              enumerate(COMPARE_TABLE_HEADINGS)]  # fmt: skip
    left_aligned = 3  # test, metric, status; the numbers align right
    out.write(_aligned(COMPARE_TABLE_HEADINGS, widths, left_aligned) + "\n")
    for row, line in zip(rows, cells, strict=True):
        text = _aligned(line, widths, left_aligned)
        start = _STATUS_COLOURS.get(row["status"]) if colour else None
        out.write((start + text + _RESET if start else text) + "\n")
    counts = {label: sum(row["status"] == status for row in rows) for status, label in _STATUS_LABELS.items()}
    summary = ", ".join(f"{label}: {count:,}" for label, count in counts.items())
    out.write(f"\n{summary} (base {base['records']:,} records, head {head['records']:,} records)\n")


_STATUS_LABELS = {
    "regression": "regressions",
    "improvement": "improvements",
    "no_change": "no change",
    "insufficient_data": "insufficient data",
}


def _aligned(cells: Sequence[str], widths: list[int], left_aligned: int) -> str:
    parts = [
        cell.ljust(width) if column < left_aligned else cell.rjust(width)
        for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(parts).rstrip()


def _compare_cells(row: dict[str, Any]) -> list[str]:
    unit = _UNITS.get(row["metric"], "")
    base, head = row["base"], row["head"]
    change = row["change_percent"]
    return [
        elide_middle(row["test_name"], TEST_NAME_WIDTH),
        elide_middle(row["metric"], METRIC_WIDTH),
        row["status"],
        "-" if change is None else f"{change:+.1f}%",
        _number(base.get("mean"), unit),
        _number(base.get("stddev"), unit),
        _number(head.get("mean"), unit),
        _number(head.get("stddev"), unit),
        f"{base['n']:,}",
        f"{head['n']:,}",
        "-" if row["pvalue"] is None else f"{row['pvalue']:.2g}",
    ]


def _number(value: Any, unit: str) -> str:
    """Core metrics in their readable units; other numbers with thousands separators (1,403,434)."""
    if unit:
        return format_value(value, unit)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def elide_middle(text: str, width: int) -> str:
    """`text` in at most `width` characters: a third from its start, '…', the rest from its end,
    where names of one family (cpp_protobuf_async_..._secure) differ."""
    if len(text) <= width:
        return text
    start = (width - 1) // 3
    return text[:start] + "…" + text[len(text) - (width - 1 - start) :]


async def cmd_regressions(args: argparse.Namespace) -> int:
    filters = {**_filters(args), "user_id": args.user_id, "state": args.state}
    output_format = args.format or ("table" if sys.stdout.isatty() else "ndjson")
    if output_format == "csv":
        raise CliError("--format csv is for records; alerts print as table, json or ndjson", EXIT_USAGE)
    async with make_client(args) as client:
        alerts = [alert async for alert in client.regressions(**filters)]
    if output_format == "table":
        print(f"{'ALERT':20}  {'STATE':12}  {'CHANGE':>8}  {'RECORD':20}  SERIES (user/test/tag/metric)")
        for alert in alerts:
            change = alert.get("change_percent")
            shown = f"{change:+.1f}%" if change is not None else "-"
            series = f"{alert['user_id']}/{alert['test_name']}/{alert['tag']}/{alert['metric']}"
            print(f"{alert['alert_id']:20}  {alert['state']:12}  {shown:>8}  {alert['record_id']:20}  {series}")
    elif output_format == "json":
        sys.stdout.write(orjson.dumps(alerts, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for alert in alerts:
            sys.stdout.write(orjson.dumps(alert).decode() + "\n")
    return EXIT_OK


async def cmd_alert(args: argparse.Namespace) -> int:
    credentials: dict[str, str] = {}
    if args.admin_key_file is not None or os.environ.get("PERFDB_ADMIN_KEY"):
        credentials["admin_key"] = read_secret(args.admin_key_file, "PERFDB_ADMIN_KEY", "", "admin key")
    else:
        credentials["access_token"] = read_secret(
            args.token_file, "PERFDB_ACCESS_TOKEN", "perfdb access token: ", "token"
        )
    async with make_client(args) as client:
        alert = await client.update_alert(args.alert_id, args.state, note=args.note, **credentials)
    print(f"alert {alert['alert_id']}: {alert['state']} (by {alert.get('updated_by')}, {alert.get('updated_at')})")
    return EXIT_OK


async def cmd_stats(args: argparse.Namespace) -> int:
    async with make_client(args) as client:
        stats = await client.stats()
    for envelope in ("id", "ok"):
        stats.pop(envelope, None)
    sys.stdout.write(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


async def cmd_ping(args: argparse.Namespace) -> int:
    async with make_client(args) as client:
        started = time.perf_counter()
        await client.ping()
        elapsed = time.perf_counter() - started
    print(f"pong from {args.server} in {elapsed * 1000:.1f} ms")
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------


ALERT_STATES = ("open", "acknowledged", "expected", "resolved")  # the server's alert states (protocol_spec.md)


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=os.environ.get("PERFDB_SERVER", DEFAULT_ADDRESS),
        help="perfdb server host:port (default: $PERFDB_SERVER or %(default)s)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server's certificate")
    group.add_argument("--ca-file", help="CA bundle to verify the server's certificate with (implies --tls)")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply (default: 30)")
    group.add_argument(
        "--read-key-file", help="file holding the server's read key, if it requires one (else $PERFDB_READ_KEY)"
    )

    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters")
    group.add_argument("--test-name", help="only records of this test")
    group.add_argument("--tag", help="only records with this tag")
    group.add_argument("--since", help="only records at or after this RFC 3339 time, e.g. 2026-01-31T00:00:00Z")
    group.add_argument("--until", help="only records before this RFC 3339 time")
    group.add_argument(
        "--format",
        choices=("table", "json", "ndjson", "csv"),
        help="output format (default: table on a terminal, ndjson otherwise)",
    )

    parser = argparse.ArgumentParser(
        prog="perfdb",
        description="Submit benchmark results to a perfdb server, read them back, delete them, "
        "export and import databases.",
        epilog="Exit codes: 0 success, 1 the server refused a request (compare: a regression), 2 bad command line, "
        "3 server unreachable or too slow, 4 unreadable input (takes precedence over 1).",
    )
    parser.add_argument("--version", action="version", version=f"perfdb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        parents=[connection],
        help="store results: gRPC ScenarioResult files, perfdb records, or other benchmark tools' output",
        description="Store results. Each FILE is a gRPC ScenarioResult (qps_json_driver --scenario_result_file), "
        "a perfdb record as JSON, NDJSON of records, or another benchmark tool's output (see --format); "
        "'-' reads stdin; gzip-compressed files are read too. Each benchmark in a file becomes one record. "
        "Prints one line per stored record and, on stderr, a summary per file (stored, duplicate, refused). "
        "Submitting the same content twice stores it once.",
    )
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.add_argument(
        "--format",
        choices=(AUTO, *FORMATS),
        default=AUTO,
        help="what the files hold: auto (the default) detects it from the content; grpc (ScenarioResult or "
        "perfdb records), google-benchmark (--benchmark_format=json), pytest-benchmark (--benchmark-json), "
        "pyperf (its JSON), hyperfine (--export-json), go (go test -bench text, -benchmem too), criterion "
        "(cargo bench text), jmh (-rf json)",
    )
    submit.add_argument(
        "--token-file", help="file holding the OAuth access token (else $PERFDB_ACCESS_TOKEN, else a prompt)"
    )
    submit.add_argument("--test-name", help="test name for every record (default: the file's own)")
    submit.add_argument("--tag", help="tag for every record")
    submit.add_argument(
        "--sys-info", choices=("auto",), help="'auto' attaches this machine's CPU, memory, OS and Python"
    )
    submit.add_argument(
        "--window",
        type=positive_int,
        default=4000,
        help="records in flight at once, sent as record_batch requests of up to 1000 (default: 4000)",
    )
    submit.add_argument(
        "--baseline-tag",
        metavar="TAG",
        help="judge each record against this tag's history (e.g. main) instead of its own",
    )
    submit.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 1 when a verdict says regression (the regressed metrics are printed with their evidence)",
    )
    submit.set_defaults(handler=cmd_submit)

    regressions = commands.add_parser(
        "regressions", parents=[connection, filters], help="list regression alerts, newest first"
    )
    regressions.add_argument("--user-id", help="only alerts of this user's series")
    regressions.add_argument("--state", choices=ALERT_STATES, help="only alerts in this state")
    regressions.set_defaults(handler=cmd_regressions)

    alert = commands.add_parser(
        "alert",
        parents=[connection],
        help="change an alert's state (the series owner's token, or the admin key)",
        description="Move an alert to another state: acknowledged (being looked at), expected (an intended change: "
        "the series' verdicts are judged from the change on), resolved, or open again.",
    )
    alert.add_argument("alert_id", metavar="ALERT_ID")
    alert.add_argument("--state", required=True, choices=ALERT_STATES)
    alert.add_argument("--note", help="why (kept with the alert, with who and when)")
    alert.add_argument("--token-file", help="file holding your access token (else $PERFDB_ACCESS_TOKEN, else a prompt)")
    alert.add_argument("--admin-key-file", help="use the admin key in this file (or $PERFDB_ADMIN_KEY) instead")
    alert.set_defaults(handler=cmd_alert)

    get_user = commands.add_parser("get-user", parents=[connection, filters], help="print one user's records")
    get_user.add_argument("user_id", metavar="USER_ID")
    get_user.set_defaults(handler=cmd_get_user)

    get_all = commands.add_parser("get-all", parents=[connection, filters], help="print every user's records")
    get_all.set_defaults(handler=cmd_get_all)

    export = commands.add_parser(
        "export",
        parents=[connection],
        help="write a complete, restorable NDJSON dump to stdout (admin)",
        description="Write every user and record (or those in --since/--until) to stdout as NDJSON, streaming.",
    )
    export.add_argument("--admin-key-file", help="file holding the server's admin key (else $PERFDB_ADMIN_KEY)")
    export.add_argument("--since", help="only records at or after this RFC 3339 time")
    export.add_argument("--until", help="only records before this RFC 3339 time")
    export.add_argument("--page-size", type=positive_int, default=1000, help="records per request (default: 1000)")
    export.set_defaults(handler=cmd_export)

    restore = commands.add_parser(
        "import",
        parents=[connection],
        help="restore a dump written by export (admin); safe to run twice",
        description="Restore users and records from a perfdb export, keeping record ids, timestamps and users. "
        "Records already present are skipped.",
    )
    restore.add_argument("file", metavar="DUMP", help="the dump file, or '-' for stdin")
    restore.add_argument("--admin-key-file", help="file holding the server's admin key (else $PERFDB_ADMIN_KEY)")
    restore.add_argument(
        "--force",
        action="store_true",
        help="also restore records that were deleted on this server (by default their tombstones keep them out)",
    )
    restore.set_defaults(handler=cmd_import)

    delete_record = commands.add_parser(
        "delete-record",
        parents=[connection],
        help="delete records: your own (with your token), or anyone's (admin)",
        description="Delete each RECORD_ID, as its owner (the access token it was stored with) or with the "
        "admin key. Deleting an already deleted record succeeds; an id that never existed is refused (not_found).",
    )
    delete_record.add_argument("record_ids", nargs="+", metavar="RECORD_ID")
    delete_record.add_argument(
        "--token-file", help="file holding the owner's access token (else $PERFDB_ACCESS_TOKEN, else a prompt)"
    )
    delete_record.add_argument("--admin-key-file", help="file holding the server's admin key: delete as the admin")
    delete_record.set_defaults(handler=cmd_delete_record)

    delete_user = commands.add_parser(
        "delete-user",
        parents=[connection],
        help="delete a user's records and profile (admin); safe to run again",
        description="Delete every record of USER_ID and the profile. If it is interrupted, running it again "
        "finishes the deletion.",
    )
    delete_user.add_argument("user_id", metavar="USER_ID")
    delete_user.add_argument("--admin-key-file", help="file holding the server's admin key (else $PERFDB_ADMIN_KEY)")
    delete_user.set_defaults(handler=cmd_delete_user)

    audit = commands.add_parser(
        "audit",
        parents=[connection],
        help="print the audit log of deletions, newest first (admin)",
        description="Print who deleted what and when, newest first: one entry per deletion, naming record "
        "ids and user ids, never content.",
    )
    audit.add_argument("--admin-key-file", help="file holding the server's admin key (else $PERFDB_ADMIN_KEY)")
    audit.add_argument("--limit", type=positive_int, help="only the newest N entries")
    audit.add_argument(
        "--format", choices=("table", "ndjson"), help="output format (default: table on a terminal, ndjson otherwise)"
    )
    audit.set_defaults(handler=cmd_audit)

    repair = commands.add_parser(
        "repair",
        help="repair a database directory offline (server stopped), and check every record's checksum",
        description="Run LevelDB's repair on the database, then check every record against its checksum "
        "and its tombstone (a deleted record must stay deleted), rebuild the test, tag and metric indexes, the "
        "user index entries and every count from the good records, and check every other index entry against "
        "its record. "
        "Exits 1 if damage remains.",
    )
    repair.add_argument("--database", required=True, help="the server's --database directory")
    repair.add_argument(
        "--drop-damaged",
        action="store_true",
        help="delete damaged records, deleted records that came back, and dangling index entries",
    )
    repair.set_defaults(handler=cmd_repair)

    compare = commands.add_parser(
        "compare",
        parents=[connection],
        help="compare two runs per test and metric; exits 1 when any regressed",
        description="Compare two runs (each a tag, a list of record ids, a commit or a time window) per test and "
        "metric (on the records' raw samples where both sides have them): "
        "Welch's t-test, plus Mann-Whitney U under 20 results a side. Prints one row per test and metric "
        "found on both sides, regressions first. Exits 1 if any row is a regression, 0 otherwise, 2 on a bad "
        "command line, so a CI job can gate on it.",
    )
    for side in ("base", "head"):
        group = compare.add_argument_group(f"{side} run (give one of these)")
        group.add_argument(f"--{side}", metavar="TAG", help=f"the {side} run is the records with this tag")
        group.add_argument(
            f"--{side}-records", metavar="ID,ID", help=f"the {side} run is these records (comma-separated ids)"
        )
        group.add_argument(
            f"--{side}-commit",
            metavar="SHA",
            help=f"the {side} run is the records whose source commit is SHA (or starts with it, 7+ digits)",
        )
        group.add_argument(f"--{side}-since", metavar="TIME", help=f"the {side} run starts at this RFC 3339 time")
        group.add_argument(f"--{side}-until", metavar="TIME", help=f"the {side} run ends before this RFC 3339 time")
    compare.add_argument("--test", metavar="NAME", help="only this test, on both sides")
    compare.add_argument("--user", metavar="USER", help="only this user's records, on both sides")
    compare.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format (default: table)"
    )
    compare.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour regressions red and improvements green: auto (default) on a terminal unless $NO_COLOR is set",
    )
    compare.set_defaults(handler=cmd_compare)

    stats = commands.add_parser("stats", parents=[connection], help="print the server's counters as JSON")
    stats.set_defaults(handler=cmd_stats)
    ping = commands.add_parser("ping", parents=[connection], help="check that the server answers")
    ping.set_defaults(handler=cmd_ping)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except CliError as exc:
        print(f"perfdb: {exc}", file=sys.stderr)
        return exc.exit_code
    except PerfdbClientError as exc:
        unreachable = exc.code in (CONNECTION_FAILED, TIMEOUT)
        print(f"perfdb: {args.server}: {exc.message if unreachable else f'{exc.code}: {exc.message}'}", file=sys.stderr)
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`); that is not an error.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
