"""The load generator, run as its own process: raw pipelined NDJSON over many connections.

It sends pre-encoded request lines over plain asyncio Protocols on uvloop and counts reply
lines by their newlines, which is faster than the perfdb client library (it parses nothing
on the hot path), so the server, not the generator, is what gets measured.

    python benchmarks/loadgen.py ingest --port P --records N --connections C --window W [--batch B]
    python benchmarks/loadgen.py paced  --port P --records N --rate R --connections C
    python benchmarks/loadgen.py read-user --port P --user-id U --rounds K --page-size S
    python benchmarks/loadgen.py read-all --port P --page-size S

Each prints one JSON object with its figures on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import USERS, batch_lines, record_lines, single_user_lines

_ERROR_MARKER = b'"error":'


class Pipeline(asyncio.Protocol):
    """Keeps up to `window` requests in flight on one connection; counts replies."""

    def __init__(self, lines: list[bytes], window: int, done: asyncio.Future[None]) -> None:
        self.lines = lines
        self.window = window
        self.done = done
        self.sent = 0
        self.replies = 0
        self.errors = 0
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send(min(self.window, len(self.lines)))
        if not self.lines and not self.done.done():
            self.done.set_result(None)

    def _send(self, count: int) -> None:
        assert self.transport is not None
        end = min(self.sent + count, len(self.lines))
        if end > self.sent:
            self.transport.write(b"".join(self.lines[self.sent : end]))
            self.sent = end

    def data_received(self, data: bytes) -> None:
        # An '"ok":false' split across reads is found in the joined tail; keeping one byte
        # less than the marker means no marker is ever counted twice.
        chunk = self.tail + data
        count = data.count(b"\n")
        self.errors += chunk.count(_ERROR_MARKER)
        self.tail = chunk[-(len(_ERROR_MARKER) - 1) :]
        self.replies += count
        self._send(count)
        if self.replies >= len(self.lines) and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost after {self.replies} replies: {exc}"))


async def ingest(port: int, lines: list[bytes], connections: int, window: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    shares = [lines[i::connections] for i in range(connections)]
    pipes: list[Pipeline] = []
    futures = []
    started = time.perf_counter()
    for share in shares:
        done: asyncio.Future[None] = loop.create_future()
        _, pipe = await loop.create_connection(functools.partial(Pipeline, share, window, done), "127.0.0.1", port)
        pipes.append(pipe)
        futures.append(done)
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    for pipe in pipes:
        assert pipe.transport is not None
        pipe.transport.close()
    return {
        "records": len(lines),
        "seconds": elapsed,
        "rps": len(lines) / elapsed,
        "errors": sum(p.errors for p in pipes),
    }


class Paced(asyncio.Protocol):
    """Sends when told to and measures each reply's latency from its scheduled send time."""

    def __init__(self) -> None:
        self.scheduled: collections.deque[float] = collections.deque()
        self.latencies: list[float] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        for _ in range(data.count(b"\n")):
            self.latencies.append(now - self.scheduled.popleft())


SENDING = "paced: sending"


async def paced(port: int, lines: list[bytes], rate: float, connections: int) -> dict[str, Any]:
    """Open-loop load at `rate` requests/s, each request's latency counted from when it was due.

    Every millisecond the requests that have come due are sent, one write per connection; the
    first second is warm-up and is left out of the percentiles.
    """
    loop = asyncio.get_running_loop()
    pipes = []
    for _ in range(connections):
        _, pipe = await loop.create_connection(Paced, "127.0.0.1", port)
        pipes.append(pipe)
    # For a driver that runs other work beside this load: it starts now.
    sys.stderr.write(f"{SENDING}\n")
    sys.stderr.flush()
    started = time.perf_counter()
    sent = 0
    total = len(lines)
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        batches: list[list[bytes]] = [[] for _ in pipes]
        while sent < due:
            pipe_index = sent % connections
            pipes[pipe_index].scheduled.append(started + sent / rate)
            batches[pipe_index].append(lines[sent])
            sent += 1
        for pipe, batch in zip(pipes, batches, strict=True):
            if batch:
                assert pipe.transport is not None
                pipe.transport.write(b"".join(batch))
        await asyncio.sleep(0.001)
    deadline = time.perf_counter() + 30
    # Polling is fine here: the measurement is over, only stragglers are awaited.
    while sum(len(p.latencies) for p in pipes) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    warm_up = int(rate)  # the first second's requests
    latencies = sorted(latency for pipe in pipes for latency in pipe.latencies[warm_up // connections :])
    answered = sum(len(pipe.latencies) for pipe in pipes)
    for pipe in pipes:
        assert pipe.transport is not None
        pipe.transport.close()
    return {
        "records": total,
        "answered": answered,
        "rate": rate,
        "achieved_rps": answered / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
    }


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(fraction * len(values)))]


async def request_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=256 * 1024 * 1024)


async def read_user(port: int, user_id: str, rounds: int, page_size: int) -> dict[str, Any]:
    """Full paged reads of one user's records: the latency of each page and of each full read."""
    reader, writer = await request_stream(port)
    page_latencies: list[float] = []
    full_reads: list[float] = []
    records = 0
    for _ in range(rounds):
        cursor = None
        started = time.perf_counter()
        records = 0
        while True:
            request: dict[str, Any] = {"op": "get_user", "user_id": user_id, "limit": page_size}
            if cursor:
                request["cursor"] = cursor
            sent = time.perf_counter()
            writer.write(orjson.dumps(request) + b"\n")
            reply = orjson.loads(await reader.readline())
            page_latencies.append(time.perf_counter() - sent)
            assert reply["ok"], reply
            records += len(reply["records"])
            cursor = reply["next_cursor"]
            if not cursor:
                break
        full_reads.append(time.perf_counter() - started)
    writer.close()
    page_latencies.sort()
    return {
        "records_per_read": records,
        "pages": len(page_latencies),
        "page_p50_ms": percentile(page_latencies, 0.5) * 1000,
        "page_p99_ms": percentile(page_latencies, 0.99) * 1000,
        "full_read_median_ms": statistics.median(full_reads) * 1000,
    }


_NEXT_CURSOR = re.compile(rb'"next_cursor":(null|"([0-9a-f]+)")[,}]')


class LineReader(asyncio.Protocol):
    """The reply lines of one connection, each joined once from the reads that carried it: a
    StreamReader's readline copies a line of megabytes three or four times, which was a fifth of
    the reader's CPU in read_all."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []  # the line being received
        self.lines: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            self.parts.append(data[start:newline])
            self.lines.append(b"".join(self.parts))
            self.parts.clear()
            start = newline + 1
        if start < len(data):
            self.parts.append(data[start:] if start else data)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = ConnectionError(f"connection lost: {exc}")
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done() and (self.lines or self.lost):
            self.waiter.set_result(None)

    async def readline(self) -> bytes:
        """The next line, without its newline."""
        while not self.lines:
            if self.lost is not None:
                raise self.lost
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.lines.popleft()


async def read_all(port: int, page_size: int) -> dict[str, Any]:
    """Stream every record through get_all pages, decoding each page as a reader must.

    The next page is requested before this one is decoded (its cursor is read from the end
    of the line), so the server's work and the reader's overlap, as a streaming reader's would.
    """
    _, lines = await asyncio.get_running_loop().create_connection(LineReader, "127.0.0.1", port)
    assert lines.transport is not None
    records = 0
    started = time.perf_counter()
    lines.transport.write(orjson.dumps({"op": "get_all", "limit": page_size}) + b"\n")
    while True:
        line = await lines.readline()
        match = _NEXT_CURSOR.search(line[-200:])
        assert match is not None, line[-200:]
        cursor = match.group(2)
        if cursor:
            lines.transport.write(b'{"op":"get_all","limit":%d,"cursor":"%s"}\n' % (page_size, cursor))
        reply = orjson.loads(line)
        assert reply["ok"], reply
        records += len(reply["records"])
        if not cursor:
            break
    elapsed = time.perf_counter() - started
    lines.transport.close()
    return {"records": records, "seconds": elapsed, "rps": records / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("ingest", "paced", "read-user", "read-all"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0, help="index of the first record (request ids stay unique)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--single-user", type=int, default=None, metavar="USER", help="every record belongs to USER")
    parser.add_argument("--user-id", default="static:bench-0000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1, help="ingest: records per line (record_batch when > 1)")
    args = parser.parse_args()

    async def run() -> dict[str, Any]:
        if args.mode in ("ingest", "paced"):
            if args.single_user is not None:
                lines = single_user_lines(args.records, args.single_user, start=args.start)
            else:
                lines = record_lines(args.records, start=args.start, users=args.users)
            if args.mode == "ingest":
                if args.batch > 1:
                    # Counted in records: the figure compares with one record per line.
                    result = await ingest(args.port, batch_lines(lines, args.batch), args.connections, args.window)
                    result.update(records=args.records, rps=args.records / result["seconds"])
                    return result
                return await ingest(args.port, lines, args.connections, args.window)
            return await paced(args.port, lines, args.rate, args.connections)
        if args.mode == "read-user":
            return await read_user(args.port, args.user_id, args.rounds, args.page_size)
        return await read_all(args.port, args.page_size)

    result = uvloop.run(run())
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
