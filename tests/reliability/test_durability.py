"""Durability of acknowledged records, against the real server in a child process: SIGKILL under
pipelined load, a newest LevelDB log cut short, SIGTERM under 200 writers, a full disk, and SIGKILL
while deleting. After each, the server is restarted on the same database and every record it
acknowledged must be there, intact and once (or, for deletions, whole or gone, and gone if its
deletion was acknowledged).

Each test prints its figures (`pytest -s` shows them) and repeats them in its assertion messages.
The random choices come from one seed per test, printed first; PERFDB_DURABILITY_SEED=<seed>
replays it. `pytest --long` runs five to ten times as many rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import itertools
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import plyvel
import pytest

from perfdb.client import AsyncClient
from perfdb.client.common import PerfdbClientError, RetryPolicy
from perfdb.records.timestamps import format_micros
from perfdb.storage import layout
from tests.support import REPO_ROOT, Connection, ServerProcess, ServerStartError, Spawn, closed_port_url, token_hash
from tests.test_deletion import expected_counts, expected_index_entries, stored_derived_keys

SEED_VARIABLE = "PERFDB_DURABILITY_SEED"
BOT_NAMES = ("durability-bot-a", "durability-bot-b", "durability-bot-c", "durability-bot-d")
BOT_TOKENS = {f"{name}-token-0123456789": f"static:{name}" for name in BOT_NAMES}  # token -> user id
TOKENS = tuple(BOT_TOKENS)
SERVER_LOOPS = ("uvloop", "asyncio")  # alternated from round to round
HOST = "127.0.0.1"

# Bounds on every wait (a server's start and exit have theirs in tests.support).
CONNECT_SECONDS = 5.0
STREAMS_END_SECONDS = 20.0  # for the clients to see the end of a killed or stopped server
READ_BACK_SECONDS = 60.0  # paging through a whole database
REPAIR_SECONDS = 60.0
PAGE_SIZE = 5000
MAX_PAGES = 1000
# pytest-timeout's 60 s fits the default rounds; --long runs take minutes, so the tests that
# scale with it carry their own limit. Every wait inside is bounded on its own as well.
LONG_RUN_TIMEOUT = 3600

# LevelDB's write-ahead log is a sequence of 32 KiB blocks of records, each behind a 7-byte header.
LOG_BLOCK_BYTES = 32768
LOG_RECORD_HEADER_BYTES = 7

# The fields of a record request that are stored as sent (protocol_spec.md 4.1; nothing here
# holds an IP address or a host field, so privacy scrubbing leaves it alone).
STORED_AS_SENT = ("test_name", "tag", "sys_info", "metrics", "client_config", "server_config", "request_id")


# -- the server as a child process -----------------------------------------------------------


class ServerLauncher:
    """Starts servers with the bots' static tokens; none outlives the test."""

    def __init__(self, directory: Path, spawn: Spawn) -> None:
        self._spawn = spawn
        self.tokens_file = directory / "tokens.json"
        entries = [
            {"sha256": token_hash(token), "user_id": user_id.removeprefix("static:"), "name": f"Bot {user_id[-1]}"}
            for token, user_id in BOT_TOKENS.items()
        ]
        self.tokens_file.write_bytes(orjson.dumps({"tokens": entries}))
        self._started: list[ServerProcess] = []

    def start(
        self, database: Path, *, sync: bool = True, loop: str = "auto", extra: Iterable[str] = ()
    ) -> ServerProcess:
        """A server on `database`, listening; restart() starts it again with the same options."""
        args = [
            f"--address={HOST}:0",
            f"--database={database}",
            f"--tokens-file={self.tokens_file}",
            f"--userinfo-url={closed_port_url()}",
            f"--loop={loop}",
            # The per-user write rate limit is not under test; its refusals would blur the counts.
            "--user-rate=0",
        ]
        if not sync:
            args.append("--no-sync")
        args.extend(extra)
        server = self._spawn(*args)
        self._started.append(server)
        server.wait_listening()
        return server

    def close_all(self) -> None:
        """Kill every server started so far, before the end of the test."""
        for server in self._started:
            server.kill()


@pytest.fixture
def servers(tmp_path: Path, spawn: Spawn) -> ServerLauncher:
    return ServerLauncher(tmp_path, spawn)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """The test's random source; its seed is printed so that a failure can be replayed."""
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))
    print(f"\n{request.node.name}: seed {seed} (replay: {SEED_VARIABLE}={seed})")
    return random.Random(seed)


# -- load: pipelined record requests over raw sockets ------------------------------------------


def record_requests(
    rng: random.Random, prefix: str, client: int, *, padding: tuple[int, int] = (0, 600)
) -> Iterator[dict[str, Any]]:
    """Endless record requests for one client, each with its own request_id and content."""
    token = TOKENS[client % len(TOKENS)]
    for seq in itertools.count():
        yield {
            "op": "record",
            "id": seq,
            "access_token": token,
            "test_name": f"durability_{prefix.split('-')[0]}",
            "tag": prefix,
            "request_id": f"{prefix}-c{client}-{seq}",
            "metrics": {
                "qps": rng.uniform(1e3, 1e6),
                "perc_lat_50": rng.uniform(1.0, 1e4),
                "perc_lat_99": rng.uniform(1e4, 1e5),
                "seq": seq,
                "client": client,
            },
            "sys_info": {"kernel": "Linux 6.1", "cores": 8, "padding": "p" * rng.randint(*padding)},
            "client_config": {"client_type": "ASYNC_CLIENT", "outstanding_rpcs_per_channel": seq % 100},
            "server_config": {"server_type": "ASYNC_SERVER", "async_server_threads": client},
        }


@dataclasses.dataclass(slots=True)
class Sent:
    """A request written (or being written) and the reply paired with it, if one came."""

    request: dict[str, Any]
    reply: dict[str, Any] | None = None

    @property
    def request_id(self) -> str:
        request_id: str = self.request["request_id"]
        return request_id

    @property
    def acknowledged(self) -> bool:
        return self.reply is not None and self.reply["ok"] is True


class RecordStream:
    """One connection pipelining record requests, at most `window` of them unanswered; replies are
    paired with requests by position. It reads with sock_recv, which hands over every byte the
    kernel received before it reports a reset, so no reply that arrived is missed. Like any sane
    client it sends nothing more once told shutting_down, and then reads to the server's end."""

    def __init__(self, sock: socket.socket, requests: Iterator[dict[str, Any]], window: int) -> None:
        self.sock = sock
        self._requests = requests
        self._window = window
        self.sent: list[Sent] = []
        self.written = 0  # requests whose every byte the kernel has taken
        self.answered = 0
        self.extra_replies: list[bytes] = []
        self.tail = b""  # bytes after the last newline when the connection ended
        self.server_eof = False
        self.broken: str | None = None
        self.refusals = 0  # error replies
        self.stop_after_refusals: int | None = None  # send nothing more after this many
        self.shutting_down = False  # a shutting_down reply came: the server will end the stream
        self._stopped = False
        self._writing_done = False
        self._wake = asyncio.Event()

    @classmethod
    async def open(cls, port: int, requests: Iterator[dict[str, Any]], window: int) -> RecordStream:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                await loop.sock_connect(sock, (HOST, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return cls(sock, requests, window)

    def unacknowledged_bytes(self) -> int:
        """Bytes written that the server's TCP has not acknowledged yet (Linux SIOCOUTQ), -1 if
        unknown. 0 means every request written sits in the server's receive queue (or was read)."""
        try:
            answer = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return -1
        queued: int = struct.unpack("i", answer)[0]
        return queued

    def stop(self) -> None:
        """Send nothing more; run() returns once every request sent is answered."""
        self._stopped = True
        self._wake.set()

    def close(self) -> None:
        self.sock.close()

    async def run(self) -> None:
        """Write requests until stopped, out of requests, or the connection ends; read every reply."""
        reader = asyncio.create_task(self._read())
        try:
            await self._write()
        finally:
            self._writing_done = True
            if self.answered == len(self.sent) and not self.shutting_down:
                reader.cancel()  # nothing more is owed: stop waiting for bytes
            await asyncio.wait({reader})
        failure = None if reader.cancelled() else reader.exception()
        if failure is not None:
            raise failure

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not (self._stopped or self.server_eof or self.broken):
                if len(self.sent) - self.answered >= self._window:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                request = next(self._requests, None)
                if request is None:
                    return
                self.sent.append(Sent(request))
                await loop.sock_sendall(self.sock, orjson.dumps(request) + b"\n")
                self.written += 1
        except OSError as exc:
            self.broken = self.broken or f"send failed: {exc!r}"

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = b""
        try:
            while True:
                chunk = await loop.sock_recv(self.sock, 1 << 16)
                if not chunk:
                    self.server_eof = True
                    return
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    if self.answered < len(self.sent):
                        reply = orjson.loads(line)
                        self.sent[self.answered].reply = reply
                        self.answered += 1
                        if reply.get("ok") is not True:
                            self.refusals += 1
                            if self.stop_after_refusals is not None and self.refusals >= self.stop_after_refusals:
                                self._stopped = True
                            if reply.get("error", {}).get("code") == "shutting_down":
                                self.shutting_down = self._stopped = True
                    else:
                        self.extra_replies.append(line)
                self._wake.set()
                if self._writing_done and self.answered == len(self.sent) and not self.shutting_down:
                    return
        except OSError as exc:
            self.broken = f"receive failed: {exc!r}"
        finally:
            self.tail = buffer
            self._wake.set()


async def run_streams(streams: list[RecordStream], timeout: float = STREAMS_END_SECONDS) -> None:
    """Wait (bounded) for every stream's run() to end, then close the sockets."""
    tasks = [asyncio.create_task(stream.run()) for stream in streams]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for stream in streams:
            stream.close()


async def write_all(port: int, requests: list[dict[str, Any]], *, window: int = 64) -> list[Sent]:
    """Send every request on one connection and wait for every reply."""
    stream = await RecordStream.open(port, iter(requests), window)
    await run_streams([stream], timeout=READ_BACK_SECONDS)
    assert stream.answered == len(requests), (
        f"{len(requests) - stream.answered} of {len(requests)} requests unanswered ({stream.broken})"
    )
    return stream.sent


# -- reading a database back ------------------------------------------------------------------


@dataclasses.dataclass
class StoredState:
    """Every record a full get_all paging returned, and the stats read after it."""

    records: list[dict[str, Any]]
    stats: dict[str, Any]
    per_user: dict[str, list[str]]  # user id -> record ids from get_user, when asked for

    @functools.cached_property
    def by_request_id(self) -> dict[str, dict[str, Any]]:
        return {record["request_id"]: record for record in self.records if "request_id" in record}

    @functools.cached_property
    def request_id_counts(self) -> Counter[str]:
        return Counter(record.get("request_id", "") for record in self.records)

    @functools.cached_property
    def record_ids(self) -> list[str]:
        return [record["record_id"] for record in self.records]


async def page_through(connection: Connection, op: str, **query: Any) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await connection.request(op, limit=PAGE_SIZE, cursor=cursor, **query)
        assert page["ok"], page
        records.extend(page["records"])
        cursor = page["next_cursor"]
        if cursor is None:
            return records
    raise AssertionError(f"{op} {query} still had pages after {MAX_PAGES}")


async def read_back(port: int, *, per_user: bool = False) -> StoredState:
    """All records (get_all, every page), optionally each bot's (get_user), then stats."""
    async with asyncio.timeout(READ_BACK_SECONDS):
        connection = await Connection.open(port)
        try:
            records = await page_through(connection, "get_all")
            users: dict[str, list[str]] = {}
            if per_user:
                for user_id in BOT_TOKENS.values():
                    reply = await connection.request("get_user", user_id=user_id, limit=1)
                    if reply["ok"]:
                        users[user_id] = [
                            r["record_id"] for r in await page_through(connection, "get_user", user_id=user_id)
                        ]
            stats = await connection.request("stats")
        finally:
            await connection.close()
    assert stats["ok"], stats
    return StoredState(records, stats, users)


def expected_record(request: dict[str, Any], ack: dict[str, Any] | None) -> dict[str, Any]:
    """The stored form of a record request (protocol_spec.md 4.1); record_id and timestamp come
    from the ack, and are left out without one."""
    stored = {field: request[field] for field in STORED_AS_SENT}
    stored["user_id"] = BOT_TOKENS[request["access_token"]]
    if ack is not None:
        stored["record_id"] = ack["record_id"]
        stored["timestamp"] = ack["timestamp"]
    return stored


def without_server_fields(record: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in record.items() if name not in ("record_id", "timestamp")}


@dataclasses.dataclass
class Verdict:
    """What a restarted server holds, compared with what was sent and acknowledged."""

    sent: int = 0
    acknowledged: int = 0
    lost: int = 0  # acknowledged, then missing or different after the restart
    stored_unacknowledged: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def verify(sent: Iterable[Sent], state: StoredState, *, unacknowledged_may_be_stored: bool) -> Verdict:
    """Every acknowledged record stored exactly as sent; nothing stored twice or from elsewhere;
    unacknowledged records stored at most once, intact (or not at all); stats agree."""
    verdict = Verdict()
    requests: dict[str, Sent] = {}
    for item in sent:
        requests[item.request_id] = item
        verdict.sent += 1
        if item.reply is not None and item.reply["id"] != item.request["id"]:
            verdict.problems.append(f"reply paired with {item.request_id} carries id {item.reply['id']!r}")
    stored = state.by_request_id
    acknowledged = [item for item in requests.values() if item.acknowledged]
    verdict.acknowledged = len(acknowledged)
    lost: list[str] = []
    for item in acknowledged:
        assert item.reply is not None
        if item.reply["user_id"] != BOT_TOKENS[item.request["access_token"]]:
            verdict.problems.append(f"{item.request_id} was acknowledged for user {item.reply['user_id']!r}")
        record = stored.get(item.request_id)
        if record != expected_record(item.request, item.reply):
            lost.append(f"{item.request_id}: acknowledged {item.reply}, stored {record}")
    verdict.lost = len(lost)
    if lost:
        verdict.problems.append(f"{len(lost)} acknowledged records lost or altered, e.g. {lost[:2]}")
    twice = [request_id for request_id, count in state.request_id_counts.items() if count > 1]
    if twice:
        verdict.problems.append(f"{len(twice)} request_ids stored more than once, e.g. {twice[:3]}")
    foreign = [request_id for request_id in state.request_id_counts if request_id not in requests]
    if foreign:
        verdict.problems.append(f"{len(foreign)} stored records were never sent, e.g. {foreign[:3]}")
    unacknowledged = [
        request_id for request_id in stored if request_id in requests and not requests[request_id].acknowledged
    ]
    verdict.stored_unacknowledged = len(unacknowledged)
    if unacknowledged and not unacknowledged_may_be_stored:
        verdict.problems.append(
            f"{len(unacknowledged)} records were stored but never acknowledged, e.g. {unacknowledged[:3]}"
        )
    damaged = [
        request_id
        for request_id in unacknowledged
        if without_server_fields(stored[request_id]) != expected_record(requests[request_id].request, None)
    ]
    if damaged:
        verdict.problems.append(f"{len(damaged)} unacknowledged records stored with other content: {damaged[:3]}")
    record_ids = state.record_ids
    if len(set(record_ids)) != len(record_ids):
        verdict.problems.append("get_all returned a record_id twice")
    if record_ids != sorted(record_ids):
        verdict.problems.append("get_all did not return records in record_id order")
    if state.stats["records"] != len(set(record_ids)):
        verdict.problems.append(f"stats.records is {state.stats['records']}, get_all found {len(set(record_ids))}")
    if state.stats["corrupt_records"] != 0:
        verdict.problems.append(f"stats.corrupt_records is {state.stats['corrupt_records']}")
    return verdict


def unacknowledged_and_a_sample(sent: list[Sent], rng: random.Random, sample: int = 50) -> list[Sent]:
    acknowledged = [item for item in sent if item.acknowledged]
    return [item for item in sent if not item.acknowledged] + rng.sample(acknowledged, min(sample, len(acknowledged)))


async def resend_and_check(port: int, again: list[Sent], state: StoredState) -> list[str]:
    """Send these requests again, with the same request_ids, through AsyncClient as a retrying
    client would: the stored ones must come back as duplicates of their stored record, the others
    must be stored now."""
    stored = state.by_request_id
    problems: list[str] = []
    new_records = 0
    async with asyncio.timeout(READ_BACK_SECONDS):
        async with AsyncClient(f"{HOST}:{port}", retry=RetryPolicy(attempts=3)) as client:
            outcomes = [outcome async for outcome in client.record_outcomes(item.request for item in again)]
            stats = await client.stats()
    for item, outcome in zip(again, outcomes, strict=True):
        if isinstance(outcome, PerfdbClientError):
            problems.append(f"resending {item.request_id} failed: {outcome}")
            continue
        record = stored.get(item.request_id)
        if record is None:
            new_records += 1
            if outcome["duplicate"]:
                problems.append(f"{item.request_id} is not stored, yet resending it was answered as a duplicate")
        elif not outcome["duplicate"] or (outcome["record_id"], outcome["timestamp"]) != (
            record["record_id"],
            record["timestamp"],
        ):
            problems.append(
                f"resending stored {item.request_id} answered {outcome}, not its record {record['record_id']}"
            )
    if stats["records"] != len(state.records) + new_records:
        problems.append(
            f"after resending, stats.records is {stats['records']}, expected {len(state.records)} + {new_records}"
        )
    return problems


# -- 1. SIGKILL under load ---------------------------------------------------------------------

KILL_CLIENTS = 4
KILL_WINDOW = 64  # unanswered requests per client
KILL_DELAY = (0.1, 0.5)  # seconds of load before the SIGKILL


async def load_until_killed(server: ServerProcess, rng: random.Random, prefix: str, delay: float) -> list[Sent]:
    streams = [
        await RecordStream.open(server.port, record_requests(random.Random(rng.random()), prefix, client), KILL_WINDOW)
        for client in range(KILL_CLIENTS)
    ]

    async def kill_later() -> None:
        await asyncio.sleep(delay)
        server.process.send_signal(signal.SIGKILL)

    killer = asyncio.create_task(kill_later())
    try:
        await run_streams(streams, timeout=delay + STREAMS_END_SECONDS)
    finally:
        killer.cancel()
        await asyncio.wait({killer})
    assert killer.done() and not killer.cancelled(), "the load ended before the kill"
    for stream in streams:
        assert not stream.extra_replies, stream.extra_replies[:3]
    return [item for stream in streams for item in stream.sent]


@pytest.mark.timeout(LONG_RUN_TIMEOUT)
@pytest.mark.parametrize(("sync", "rounds", "long_rounds"), [(True, 20, 200), (False, 8, 80)], ids=["sync", "no-sync"])
def test_sigkill_under_load_loses_no_acknowledged_record(
    sync: bool,
    rounds: int,
    long_rounds: int,
    long_run: bool,
    rng: random.Random,
    servers: ServerLauncher,
    tmp_path: Path,
) -> None:
    total_rounds = long_rounds if long_run else rounds
    figures = Verdict()
    problems: list[str] = []
    started = time.monotonic()
    for number in range(total_rounds):
        database = tmp_path / f"db-{number}"
        loop = SERVER_LOOPS[number % len(SERVER_LOOPS)]
        delay = rng.uniform(*KILL_DELAY)
        server = servers.start(database, sync=sync, loop=loop)
        sent = asyncio.run(load_until_killed(server, rng, f"kill-r{number}", delay))
        server.kill()
        unexpected = Counter(item.reply["error"]["code"] for item in sent if item.reply and not item.reply["ok"])

        server.restart()
        server.wait_listening()
        state = asyncio.run(read_back(server.port))
        verdict = verify(sent, state, unacknowledged_may_be_stored=True)
        resend_problems = asyncio.run(resend_and_check(server.port, unacknowledged_and_a_sample(sent, rng), state))
        code, stderr = server.stop()

        round_problems = [*verdict.problems, *resend_problems]
        if unexpected:
            round_problems.append(f"error replies before the kill: {dict(unexpected)}")
        if code != 0 or "Traceback" in stderr:
            round_problems.append(f"the restarted server exited {code}:\n{stderr}")
        figures.sent += verdict.sent
        figures.acknowledged += verdict.acknowledged
        figures.lost += verdict.lost
        figures.stored_unacknowledged += verdict.stored_unacknowledged
        print(
            f"round {number} ({loop}, kill after {delay:.3f}s): {verdict.sent} sent, "
            f"{verdict.acknowledged} acknowledged, "
            f"{verdict.stored_unacknowledged} stored unacknowledged, {verdict.lost} lost"
        )
        if round_problems:
            problems.append(f"round {number} (database {database}): {round_problems}")
        else:
            shutil.rmtree(database)
    summary = (
        f"{'sync' if sync else 'no-sync'}: {total_rounds} rounds in {time.monotonic() - started:.1f}s, "
        f"{figures.sent} sent, "
        f"{figures.acknowledged} acknowledged, {figures.stored_unacknowledged} stored unacknowledged, "
        f"{figures.lost} lost"
    )
    print(summary)
    assert not problems, f"{summary}\n" + "\n".join(problems)
    assert figures.lost == 0, summary
    assert figures.acknowledged > 0, summary


# -- 2. A truncated newest log -------------------------------------------------------------

TRUNCATION_RECORDS = 600
EARLIER_RECORDS = 20  # stored, and compacted into a table, before the records whose log is cut

# Each case gives the size the newest log is cut to, from its size and the random source.
TRUNCATIONS: dict[str, Callable[[int, random.Random], int]] = {
    "a few bytes": lambda size, rng: size - rng.randint(1, 16),
    "a random amount": lambda size, rng: rng.randint(LOG_RECORD_HEADER_BYTES + 1, size - 17),
    "half": lambda size, rng: size // 2,
    "to a block boundary": lambda size, rng: max(LOG_BLOCK_BYTES, (size - 1) // LOG_BLOCK_BYTES * LOG_BLOCK_BYTES),
    "all but the first record header": lambda size, rng: LOG_RECORD_HEADER_BYTES,
    "everything": lambda size, rng: 0,
}


def newest_log(database: Path) -> Path:
    logs = sorted(database.glob("*.log"), key=lambda path: int(path.stem))
    assert logs, f"no LevelDB log in {database}: {sorted(p.name for p in database.iterdir())}"
    return logs[-1]


def repair(database: Path) -> subprocess.CompletedProcess[str]:
    """`perfdb repair --database DIR`, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "perfdb.cli", "repair", "--database", str(database)],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=REPAIR_SECONDS,
        check=False,
    )


def truncation_round(
    servers: ServerLauncher, database: Path, case: str, rng: random.Random
) -> tuple[str, list[str], int, int]:
    """Write, SIGKILL, cut the newest log, restart. A summary line, problems, acked, lost."""
    # An established database: a first session stores a few records and stops cleanly; the
    # next open moves them into a table, so the newest log holds only the records below.
    server = servers.start(database)
    earlier = asyncio.run(
        write_all(server.port, list(itertools.islice(record_requests(rng, "early", 0), EARLIER_RECORDS)))
    )
    code, stderr = server.stop()
    assert code == 0, stderr

    server.restart()
    server.wait_listening()
    sources = [record_requests(random.Random(rng.random()), "trunc", client) for client in range(2)]
    requests = [next(sources[index % 2]) for index in range(TRUNCATION_RECORDS)]
    sent = asyncio.run(write_all(server.port, requests, window=32))
    server.kill()  # no clean close: the log is left as the writes made it
    acknowledged = sorted(
        (item for item in sent if item.acknowledged), key=lambda item: item.reply["record_id"] if item.reply else ""
    )
    assert len(acknowledged) == len(sent), [item.reply for item in sent if not item.acknowledged][:3]

    log = newest_log(database)
    size = log.stat().st_size
    new_size = TRUNCATIONS[case](size, rng)
    os.truncate(log, new_size)

    # How the server meets the cut log: LevelDB's recovery (paranoid checks off, the default)
    # reads the log up to the cut and takes a torn last record for the end of the log. Seen so
    # far (perfdb 0.1.0, plyvel 1.5.1): the server starts on its own after every cut here, from
    # a few bytes to the whole log, keeping exactly the write batches before the cut, counters
    # and indexes included (they share the records' batches). Should the server refuse to start,
    # `perfdb repair` is the documented remedy: a database it brings back is accepted (and the
    # refusal printed), one that still does not open fails the test.
    note = ""
    server.restart()
    try:
        server.wait_listening()
    except ServerStartError as refusal:
        repaired = repair(database)
        note = (
            f"; refused to start ({str(refusal).strip().splitlines()[-1]}), `perfdb repair` exit {repaired.returncode}"
        )
        try:
            server.restart()
            server.wait_listening()
        except ServerStartError as again:
            raise AssertionError(
                f"{case}: the server refuses to start even after `perfdb repair`{note}:\n{repaired.stdout}"
                f"{repaired.stderr}\n{again}"
            ) from None
        note += ", then it started"
    state = asyncio.run(read_back(server.port, per_user=True))
    problems: list[str] = []
    all_sent = [*earlier, *acknowledged]
    verdict = verify(all_sent, state, unacknowledged_may_be_stored=False)
    problems += [p for p in verdict.problems if "lost or altered" not in p]
    # What survives must be exactly a prefix of the commit order.
    stored_ids = [record["record_id"] for record in state.records if record["tag"] == "trunc"]
    acknowledged_ids = [item.reply["record_id"] for item in acknowledged if item.reply]
    kept = len(stored_ids)
    if stored_ids != acknowledged_ids[:kept]:
        problems.append(f"the {kept} records kept are not the first {kept} in commit order")
    missing_earlier = [item.request_id for item in earlier if item.request_id not in state.by_request_id]
    if missing_earlier:
        problems.append(f"{len(missing_earlier)} records from the earlier session (in a table) are gone")
    present = set(state.record_ids)
    altered = [
        item.request_id
        for item in all_sent
        if item.reply is not None
        and item.reply["record_id"] in present
        and state.by_request_id.get(item.request_id) != expected_record(item.request, item.reply)
    ]
    if altered:
        problems.append(f"{len(altered)} surviving records differ from what was acknowledged: {altered[:3]}")
    by_user = sorted(record_id for ids in state.per_user.values() for record_id in ids)
    if by_user != sorted(state.record_ids):
        problems.append(f"get_user pages hold {len(by_user)} records, get_all {len(state.records)}")
    problems += asyncio.run(resend_and_check(server.port, acknowledged, state))
    code, stderr = server.stop()
    if code != 0 or "Traceback" in stderr:
        problems.append(f"the restarted server exited {code}:\n{stderr}")
    lost_by_cut = len(acknowledged) - kept
    line = (
        f"{case}: log {log.name} {size} -> {new_size} bytes; {kept} of {len(acknowledged)} acknowledged records kept "
        f"({lost_by_cut} cut off with the log){note}"
    )
    return line, problems, len(acknowledged), lost_by_cut


@pytest.mark.timeout(LONG_RUN_TIMEOUT)
def test_truncated_newest_log_keeps_a_prefix_of_commit_order(
    long_run: bool, rng: random.Random, servers: ServerLauncher, tmp_path: Path
) -> None:
    repetitions = 10 if long_run else 1
    problems: list[str] = []
    acknowledged = cut = rounds = 0
    for repetition, case in itertools.product(range(repetitions), TRUNCATIONS):
        database = tmp_path / f"db-{rounds}"
        line, round_problems, round_acknowledged, round_cut = truncation_round(servers, database, case, rng)
        rounds += 1
        acknowledged += round_acknowledged
        cut += round_cut
        print(line)
        if round_problems:
            problems.append(f"{case} (repetition {repetition}, database {database}): {round_problems}")
        else:
            shutil.rmtree(database)
    summary = (
        f"{rounds} truncations, {acknowledged} records acknowledged, {cut} cut off with the log (expected: the log "
        f"held them), 0 damaged records allowed"
    )
    print(summary)
    assert not problems, f"{summary}\n" + "\n".join(problems)


# -- 3. SIGTERM under 200 writers ------------------------------------------------------------

TERM_CONNECTIONS = 200
TERM_DELAY = (0.2, 0.5)


@dataclasses.dataclass(frozen=True)
class TermPlan:
    """One round's server loop and options, and how many requests each client keeps unanswered.
    Windows stay small (at most 32 lines of under 1 KB, far less than a socket buffer), so every
    request a client has written is already in the server's receive queue: the server has it
    before it sees the signal."""

    loop: str
    options: tuple[str, ...]
    window: int

    def describe(self) -> str:
        return f"{self.loop}, {' '.join(self.options) or 'default options'}, window {self.window}"


# The capped plans hold lines back by the in-flight pause (cap below the window) when the signal
# comes; protocol_spec.md 1.7 says those are answered shutting_down. Of the caps and windows
# tried, these most often met the signal with such lines still unread. The default run takes
# the first three plans; --long cycles through all of them.
TERM_PLANS = (
    TermPlan("asyncio", ("--max-inflight=16",), 32),
    TermPlan("uvloop", (), 8),
    TermPlan("asyncio", ("--max-inflight=8",), 16),
    TermPlan("uvloop", ("--max-inflight=16",), 32),
    TermPlan("asyncio", (), 8),
    TermPlan("uvloop", ("--max-inflight=8",), 16),
)


def term_plan(number: int) -> TermPlan:
    return TERM_PLANS[number % len(TERM_PLANS)]


def start_term_server(servers: ServerLauncher, database: Path, plan: TermPlan) -> ServerProcess:
    return servers.start(database, loop=plan.loop, extra=plan.options)


async def load_until_terminated(
    server: ServerProcess, rng: random.Random, prefix: str, delay: float, window: int
) -> tuple[list[RecordStream], list[int]]:
    """200 pipelining connections; SIGTERM after `delay`. The streams, and how many requests each
    had delivered when the signal was sent: written in full, and acknowledged by the server's TCP
    (-1 for a connection with bytes still on their way, which no claim is made about)."""
    streams = list(
        await asyncio.gather(
            *(
                RecordStream.open(server.port, record_requests(random.Random(rng.random()), prefix, client), window)
                for client in range(TERM_CONNECTIONS)
            )
        )
    )
    written_at_signal: list[int] = []

    async def terminate_later() -> None:
        await asyncio.sleep(delay)
        written_at_signal.extend(stream.written if stream.unacknowledged_bytes() == 0 else -1 for stream in streams)
        server.process.send_signal(signal.SIGTERM)

    terminator = asyncio.create_task(terminate_later())
    try:
        await run_streams(streams, timeout=delay + STREAMS_END_SECONDS)
    finally:
        terminator.cancel()
        await asyncio.wait({terminator})
    assert len(written_at_signal) == len(streams), "the load ended before the signal"
    return streams, written_at_signal


def judge_terminated_streams(
    streams: list[RecordStream], written_at_signal: list[int]
) -> tuple[Counter[str], int, list[str]]:
    """Every request delivered before the signal answered, in order, with ok or shutting_down, and
    each connection ended by the server's end-of-stream. Outcomes, how many requests delivered
    before the signal went unanswered, problems."""
    outcomes: Counter[str] = Counter()
    unanswered_before_signal = 0
    problems: list[str] = []
    for index, (stream, written) in enumerate(zip(streams, written_at_signal, strict=True)):
        for item in stream.sent:
            reply = item.reply
            outcomes["unanswered" if reply is None else "ok" if reply["ok"] else reply["error"]["code"]] += 1
        if stream.answered < written:
            unanswered_before_signal += written - stream.answered
            problems.append(
                f"connection {index}: {written} requests delivered before SIGTERM, {stream.answered} answered, then "
                f"the server's end-of-stream (first unanswered {stream.sent[stream.answered].request_id})"
            )
        if stream.broken or not stream.server_eof:
            problems.append(f"connection {index} did not end with the server's end-of-stream: {stream.broken}")
        if stream.tail or stream.extra_replies:
            problems.append(f"connection {index} ended inside a reply or got extra replies")
    if set(outcomes) - {"ok", "shutting_down", "unanswered"}:
        problems.append(f"replies other than ok and shutting_down: {dict(outcomes)}")
    return outcomes, unanswered_before_signal, problems


@pytest.mark.timeout(LONG_RUN_TIMEOUT)
def test_sigterm_under_200_writers_answers_everything_and_keeps_it(
    long_run: bool, rng: random.Random, servers: ServerLauncher, tmp_path: Path
) -> None:
    total_rounds = 15 if long_run else 3
    database = tmp_path / "db"
    everything: list[Sent] = []
    problems: list[str] = []
    outcomes: Counter[str] = Counter()
    unanswered_before_signal = lost = 0
    server = start_term_server(servers, database, term_plan(0))
    for number in range(total_rounds):
        plan = term_plan(number)
        delay = rng.uniform(*TERM_DELAY)
        streams, written_at_signal = asyncio.run(
            load_until_terminated(server, rng, f"term-r{number}", delay, plan.window)
        )
        code, stderr = server.wait_exit()
        round_outcomes, round_unanswered, round_problems = judge_terminated_streams(streams, written_at_signal)
        if code != 0 or "Traceback" in stderr:
            round_problems.append(f"the server exited {code} after SIGTERM:\n{stderr[-3000:]}")
        everything += [item for stream in streams for item in stream.sent]
        outcomes += round_outcomes
        unanswered_before_signal += round_unanswered

        # This server checks the round (and all before it), then serves the next one.
        server = start_term_server(servers, database, term_plan(number + 1))
        state = asyncio.run(read_back(server.port))
        verdict = verify(everything, state, unacknowledged_may_be_stored=False)
        round_problems += verdict.problems
        lost = verdict.lost
        print(
            f"round {number} ({plan.describe()}; SIGTERM after {delay:.3f}s): {dict(round_outcomes)}; "
            f"{round_unanswered} delivered before the signal and unanswered "
            f"({sum(written < 0 for written in written_at_signal)} connections with bytes in flight, not judged); "
            f"{verdict.acknowledged} acknowledged so far, {len(state.records)} stored, {verdict.lost} lost"
        )
        if round_problems:
            shown = "\n  ".join(round_problems[:10])
            more = len(round_problems) - 10
            problems.append(
                f"round {number} ({plan.describe()}):\n  {shown}" + (f"\n  ... {more} more" if more > 0 else "")
            )
    code, stderr = server.stop()
    summary = (
        f"{total_rounds} rounds of {TERM_CONNECTIONS} connections: {sum(outcomes.values())} sent, "
        f"{outcomes['ok']} acknowledged, {outcomes['shutting_down']} shutting_down, "
        f"{outcomes['unanswered']} unanswered ({unanswered_before_signal} of them delivered before the signal), "
        f"{lost} lost"
    )
    print(summary)
    assert not problems, f"{summary}\n" + "\n".join(problems)
    assert code == 0, stderr
    assert outcomes["ok"] > 0 and outcomes["shutting_down"] + outcomes["unanswered"] > 0, (
        f"no SIGTERM mid-stream: {summary}"
    )


# -- 4. A full disk --------------------------------------------------------------------------

DISK_SIZE = "2m"
DISK_LARGER = "64m"
FILLER_BYTES = 384 * 1024
FILL_PADDING = (3000, 5000)  # bytes of sys_info per record: a few hundred fill the disk
FILL_LIMIT = 3000  # records, an upper bound far beyond what 2 MiB holds
FAILURES_TO_SEE = 20  # storage_error replies to collect before calling the disk full
RECOVERY_SECONDS = 10.0


@contextlib.contextmanager
def small_tmpfs(directory: Path) -> Iterator[Path]:
    directory.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        failure = mounted.stderr.strip() if mounted.returncode != 0 else ""
    except OSError as exc:  # no mount(8) at all
        failure = str(exc)
    if failure:
        pytest.skip(f"cannot mount a {DISK_SIZE} tmpfs to fill (needs root): {failure}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True, timeout=30, check=False)


def remount_larger(directory: Path) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={DISK_LARGER}", str(directory)], capture_output=True, timeout=30, check=True
    )


async def fill_until_failing(port: int, rng: random.Random) -> list[Sent]:
    """Record until FAILURES_TO_SEE writes have failed (or FILL_LIMIT records were sent)."""
    source = itertools.islice(record_requests(rng, "fill", 0, padding=FILL_PADDING), FILL_LIMIT)
    stream = await RecordStream.open(port, source, window=8)
    stream.stop_after_refusals = FAILURES_TO_SEE
    await run_streams([stream], timeout=READ_BACK_SECONDS)
    assert stream.answered == len(stream.sent), f"{len(stream.sent) - stream.answered} unanswered ({stream.broken})"
    return stream.sent


async def answers_reads(port: int) -> list[str]:
    problems = []
    async with asyncio.timeout(CONNECT_SECONDS):
        connection = await Connection.open(port)
    try:
        ping = await connection.request("ping", id="still-there")
        if ping != {"id": "still-there", "ok": True}:
            problems.append(f"ping on a full disk answered {ping}")
        page = await connection.request("get_all", limit=10)
        if not page["ok"] or not page["records"]:
            problems.append(f"get_all on a full disk answered {str(page)[:300]}")
    finally:
        await connection.close()
    return problems


async def retry_until_stored(port: int, requests: list[dict[str, Any]], seconds: float) -> tuple[list[Sent], float]:
    """Send the requests; resend the refused ones (same request_id) until all are stored or time
    is up. The last reply of each, and how long it took."""
    started = time.monotonic()
    last: dict[str, Sent] = {}
    waiting = list(requests)
    delay = 0.05
    while waiting:
        for item in await write_all(port, waiting):
            last[item.request_id] = item
        waiting = [item.request for item in last.values() if not item.acknowledged]
        if not waiting or time.monotonic() - started > seconds:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
    return list(last.values()), time.monotonic() - started


def test_full_disk_refuses_writes_retryably_then_recovers(
    rng: random.Random, servers: ServerLauncher, tmp_path: Path
) -> None:
    """Fill a 2 MiB tmpfs: the writes that do not fit are refused with retryable storage_error and
    not stored; reads go on; once space returns (the filler deleted and the disk enlarged: the
    server needs room to flush its memtable and start a fresh log before it writes again) the
    refused records can be stored on retry; and after a restart every record acknowledged
    before and after the disk was full is there."""
    problems: list[str] = []
    with small_tmpfs(tmp_path / "disk") as disk:
        filler = disk / "filler"
        filler.write_bytes(os.urandom(FILLER_BYTES))
        database = disk / "db"
        server = servers.start(database)
        try:
            filled = asyncio.run(fill_until_failing(server.port, rng))
            before = [item for item in filled if item.acknowledged]
            refused = [item for item in filled if item.reply is not None and not item.acknowledged]
            refusals = Counter(
                (item.reply["error"]["code"], item.reply["error"]["retryable"]) for item in refused if item.reply
            )
            if not refused:
                problems.append(f"{len(before)} records of ~4 KB fitted on a {DISK_SIZE} disk: it never filled")
            if set(refusals) - {("storage_error", True)}:
                problems.append(
                    f"writes on a full disk were refused with {dict(refusals)}, not retryable storage_error"
                )
            problems += asyncio.run(answers_reads(server.port))

            # Make room; send the refused records again (same request_ids), and some new ones.
            filler.unlink()
            remount_larger(disk)
            fresh = list(itertools.islice(record_requests(rng, "after", 1), 20))
            retried, seconds = asyncio.run(
                retry_until_stored(server.port, [item.request for item in refused] + fresh, RECOVERY_SECONDS)
            )
            after = [item for item in retried if item.acknowledged]
            still_refused = Counter(
                item.reply["error"]["code"] for item in retried if item.reply and not item.reply["ok"]
            )
            if still_refused:
                problems.append(
                    f"after {FILLER_BYTES // 1024} KiB were freed, {sum(still_refused.values())} of {len(retried)} "
                    f"writes were still refused ({dict(still_refused)}) after {seconds:.1f}s of retries"
                )
            refused_ids = {item.request_id for item in refused}
            stored_anyway = [
                item.request_id
                for item in after
                if item.request_id in refused_ids and item.reply and item.reply["duplicate"]
            ]
            if stored_anyway:
                problems.append(
                    f"{len(stored_anyway)} records refused with storage_error had been stored: {stored_anyway[:3]}"
                )
            code, stderr = server.stop()
            if code != 0 or "Traceback" in stderr:
                problems.append(f"the server exited {code} after SIGTERM:\n{stderr[-3000:]}")

            server.restart()
            server.wait_listening()
            state = asyncio.run(read_back(server.port, per_user=True))
            retried_ids = {item.request_id for item in retried}
            verdict = verify(
                [item for item in filled if item.request_id not in retried_ids] + retried,
                state,
                unacknowledged_may_be_stored=False,
            )
            problems += verdict.problems
            stored = state.by_request_id
            lost_before = sum(1 for item in before if item.request_id not in stored)
            lost_after = sum(1 for item in after if item.request_id not in stored)
            if lost_after:
                problems.append(
                    f"{lost_after} of the {len(after)} records acknowledged after the disk had been full "
                    f"(fsync'd, duplicate: false) are gone after the restart; see LevelDB's LOG:\n"
                    + "".join(
                        line for line in (database / "LOG").read_text().splitlines(keepends=True) if "rror" in line
                    )
                )
            code, stderr = server.stop()
            if code != 0 or "Traceback" in stderr:
                problems.append(f"the restarted server exited {code}:\n{stderr[-3000:]}")
        finally:
            servers.close_all()  # nothing may hold the tmpfs when it is unmounted
    summary = (
        f"full disk: {len(before)} acknowledged before it was full, {len(refused)} refused {dict(refusals)}, "
        f"{len(after)} of {len(retried)} acknowledged after {FILLER_BYTES // 1024} KiB were freed; after the restart "
        f"{lost_before + lost_after} lost ({lost_before} from before, {lost_after} from after the full disk)"
    )
    print(summary)
    assert not problems, f"{summary}\n" + "\n".join(problems)


# -- 5. SIGKILL while deleting -------------------------------------------------------------------

DELETION_ADMIN_KEY = "durability-admin-key-0123456789"
DELETION_RECORDS_PER_BOT = 5000  # each bot's imported records
# Attempts (each on a fresh database) at killing the server between two chunks of a delete_user;
# the kill comes as soon as a read shows the first chunk committed, so the first usually lands.
DELETION_ATTEMPTS = 5
DELETION_WINDOW = 64
DELETION_FIRST_MICROS = 1_700_000_000_000_000  # 2023-11-14: imported records lie in the past


def deletion_seed(user_id: str, bot: int, count: int) -> list[dict[str, Any]]:
    """A bot's records in their stored form, to import, each with content of its own."""
    records = []
    for n in range(count):
        micros = DELETION_FIRST_MICROS + bot * 10_000_000 + n
        records.append(
            {
                "record_id": f"{micros:014x}{0:06x}",
                "user_id": user_id,
                "timestamp": format_micros(micros),
                "test_name": f"deletion_{bot}",
                "tag": f"t{n % 7}",
                "sys_info": {"kernel": "Linux 6.1", "n": n},
                "metrics": {"qps": 1000.0 + n, "perc_lat_99": float(bot)},
                "client_config": {"client_type": "ASYNC_CLIENT"},
                "server_config": {"server_type": "ASYNC_SERVER"},
                "request_id": f"deletion-{bot}-{n}",
            }
        )
    return records


async def import_seed(port: int, records: list[dict[str, Any]]) -> None:
    connection = await Connection.open(port)
    try:
        for start in range(0, len(records), 1000):
            chunk = records[start : start + 1000]
            users = {record["user_id"]: {"name": record["user_id"]} for record in chunk}
            reply = await connection.request("import", admin_key=DELETION_ADMIN_KEY, records=chunk, users=users)
            assert reply["ok"] and reply["imported"] == len(chunk), reply
    finally:
        await connection.close()


async def delete_until_killed(
    server: ServerProcess, rng: random.Random, doomed_user: str, doomed_records: list[str]
) -> tuple[RecordStream, RecordStream]:
    """One connection deletes a whole user, another deletes records one by one (pipelined); the
    server is killed once the first chunk of the user's deletion is committed."""
    whole = iter([{"op": "delete_user", "admin_key": DELETION_ADMIN_KEY, "user_id": doomed_user}])
    order = rng.sample(doomed_records, len(doomed_records))
    singles = ({"op": "delete_record", "admin_key": DELETION_ADMIN_KEY, "record_id": rid} for rid in order)
    streams = [
        await RecordStream.open(server.port, whole, 1),
        await RecordStream.open(server.port, singles, DELETION_WINDOW),
    ]

    async def kill_once_deleting() -> None:
        # The user's count (the total of get_user) falls by a chunk with each committed chunk.
        connection = await Connection.open(server.port)
        try:
            while True:
                reply = await connection.request("get_user", user_id=doomed_user, limit=1)
                if not reply["ok"] or reply["total"] < DELETION_RECORDS_PER_BOT:
                    break
        finally:
            server.process.send_signal(signal.SIGKILL)
            await connection.close()

    killer = asyncio.create_task(kill_once_deleting())
    try:
        await run_streams(streams, timeout=STREAMS_END_SECONDS)
    finally:
        killer.cancel()
        await asyncio.wait({killer})
    return streams[0], streams[1]


def judge_deletions(
    seeded: dict[str, dict[str, Any]],
    state: StoredState,
    user_deleted: bool,
    deleted_ids: set[str],
    doomed_user: str,
) -> list[str]:
    """Each seeded record is there whole or not at all; reads and counters agree; what was
    acknowledged as deleted is gone."""
    problems = []
    present = {record["record_id"]: record for record in state.records}
    for record_id, record in present.items():
        if seeded.get(record_id) != record:
            problems.append(f"record {record_id} came back different: {record} (seeded {seeded.get(record_id)})")
    for user_id in {record["user_id"] for record in seeded.values()}:
        from_all = sorted(rid for rid, record in present.items() if record["user_id"] == user_id)
        from_user = sorted(state.per_user.get(user_id, []))
        if from_all != from_user:
            problems.append(f"{user_id}: get_all has {len(from_all)} records, get_user {len(from_user)}")
    if state.stats["records"] != len(present):
        problems.append(f"stats counts {state.stats['records']} records, reads find {len(present)}")
    if state.stats["users"] != len(state.per_user):
        problems.append(f"stats counts {state.stats['users']} users, get_user finds {len(state.per_user)}")
    if user_deleted and (doomed_user in state.per_user):
        problems.append(f"{doomed_user} was deleted (acknowledged) but get_user still finds them")
    back = deleted_ids & present.keys()
    if back:
        problems.append(f"{len(back)} records acknowledged as deleted are back, e.g. {sorted(back)[:3]}")
    return problems


async def counted_by_the_server(port: int, records: list[dict[str, Any]]) -> list[str]:
    """Where the server's per-test and per-tag totals and its overview disagree with the records
    a full read returned (the counts and indexes go in the same batches as the records)."""
    problems = []
    connection = await Connection.open(port)
    try:
        overview = await connection.request("overview", metric="qps")
        for field in ("test_name", "tag"):
            for name, expected in sorted(Counter(record[field] for record in records).items()):
                reply = await connection.request("get_all", limit=1, **{field: name})
                if reply.get("total") != expected:
                    problems.append(f"get_all {field}={name} total {reply.get('total')}, reads find {expected}")
    finally:
        await connection.close()
    per_test = Counter(record["test_name"] for record in records)
    overview_records = {name: test["records"] for name, test in overview["tests"].items()}
    if overview_records != dict(per_test):
        problems.append(f"overview counts {overview_records}, reads find {dict(per_test)}")
    return problems


def stored_index_problems(database: Path) -> list[str]:
    """What the (closed) database holds that its records do not account for, by brute force over
    its records: every user, test and tag index entry has its record and every record its
    entries, and every count (per user, test and tag, records, users) is what the records give."""
    db = plyvel.DB(str(database))
    try:
        records, damaged = [], 0
        for value in db.iterator(prefix=layout.RECORD_PREFIX, include_key=False):
            try:
                records.append(orjson.loads(layout.unseal(value)))
            except (layout.CorruptValueError, orjson.JSONDecodeError):
                damaged += 1
        record_count = db.get(layout.RECORD_COUNT_KEY)
        user_count = db.get(layout.USER_COUNT_KEY)
        users = sum(1 for _ in db.iterator(prefix=layout.PROFILE_PREFIX, include_value=False))
    finally:
        db.close()
    counts, entries = stored_derived_keys(database)
    expected_entries = expected_index_entries(records)
    problems = []
    if damaged:
        problems.append(f"{damaged} damaged records")
    if entries - expected_entries:
        problems.append(f"{len(entries - expected_entries)} index entries without their record")
    if expected_entries - entries:
        problems.append(f"{len(expected_entries - entries)} index entries missing for their records")
    if counts != expected_counts(records):
        wrong = {key: value for key, value in counts.items() if expected_counts(records).get(key) != value}
        problems.append(f"counts differ from the records: {dict(itertools.islice(wrong.items(), 5))}")
    if (record_count, user_count) != (str(len(records)).encode(), str(users).encode()):
        problems.append(f"stored record/user counts {record_count!r}/{user_count!r}, there are {len(records)}/{users}")
    return problems


@pytest.mark.timeout(LONG_RUN_TIMEOUT)
def test_sigkill_while_deleting_leaves_each_record_whole_or_gone(
    long_run: bool, rng: random.Random, servers: ServerLauncher, tmp_path: Path
) -> None:
    total_rounds = 20 if long_run else 3
    key_file = tmp_path / "admin.key"
    key_file.write_text(DELETION_ADMIN_KEY + "\n")
    extra = [f"--admin-key-file={key_file}"]
    user_ids = list(BOT_TOKENS.values())
    doomed_user, single_user, bystander = user_ids[0], user_ids[1], user_ids[2]
    problems: list[str] = []
    partial_rounds = attempts = 0
    for number in range(total_rounds):
        for attempt in range(DELETION_ATTEMPTS):
            attempts += 1
            round_problems, left = deletion_round(
                rng,
                servers,
                tmp_path / f"deleting-{number}-{attempt}",
                number,
                extra,
                doomed_user,
                single_user,
                bystander,
            )
            if round_problems:
                problems.append(f"round {number}, attempt {attempt}: {round_problems}")
            if 0 < left < DELETION_RECORDS_PER_BOT:
                partial_rounds += 1
                break
    print(f"{total_rounds} rounds in {attempts} attempts, {partial_rounds} killed half-way through delete_user")
    assert not problems, "\n".join(problems)
    assert partial_rounds == total_rounds, f"only {partial_rounds} of {total_rounds} rounds killed mid-deletion"


def deletion_round(
    rng: random.Random,
    servers: ServerLauncher,
    database: Path,
    number: int,
    extra: list[str],
    doomed_user: str,
    single_user: str,
    bystander: str,
) -> tuple[list[str], int]:
    """One kill during deletions, then a restart that finishes them: the problems found, and how
    many of the doomed user's records the kill left."""
    loop = SERVER_LOOPS[number % len(SERVER_LOOPS)]
    seeded_list = [
        *deletion_seed(doomed_user, 0, DELETION_RECORDS_PER_BOT),
        *deletion_seed(single_user, 1, DELETION_RECORDS_PER_BOT),
        *deletion_seed(bystander, 2, 100),
    ]
    seeded = {record["record_id"]: record for record in seeded_list}
    singles = [record["record_id"] for record in seeded_list if record["user_id"] == single_user]
    server = servers.start(database, loop=loop, extra=extra)
    asyncio.run(import_seed(server.port, seeded_list))
    whole, one_by_one = asyncio.run(delete_until_killed(server, rng, doomed_user, singles))
    server.kill()
    user_deleted = bool(whole.sent and whole.sent[0].acknowledged)
    deleted_ids = {item.request["record_id"] for item in one_by_one.sent if item.acknowledged}
    round_problems = [f"after the kill: {problem}" for problem in stored_index_problems(database)]

    restarted = servers.start(database, loop=loop, extra=extra)
    state = asyncio.run(read_back(restarted.port, per_user=True))
    round_problems += judge_deletions(seeded, state, user_deleted, deleted_ids, doomed_user)
    round_problems += asyncio.run(counted_by_the_server(restarted.port, state.records))
    left = len(state.per_user.get(doomed_user, []))

    # Sending delete_user again finishes what the kill interrupted.
    async def finish(port: int) -> dict[str, Any]:
        connection = await Connection.open(port)
        try:
            await connection.send({"op": "delete_user", "admin_key": DELETION_ADMIN_KEY, "user_id": doomed_user})
            return await connection.reply(timeout=READ_BACK_SECONDS)
        finally:
            await connection.close()

    again = asyncio.run(finish(restarted.port))
    if not again["ok"] or again["records"] != left:
        round_problems.append(f"delete_user again removed {again} with {left} records left")
    after = asyncio.run(read_back(restarted.port, per_user=True))
    if doomed_user in after.per_user or any(r["user_id"] == doomed_user for r in after.records):
        round_problems.append(f"{doomed_user} still has records after the second delete_user")
    round_problems += asyncio.run(counted_by_the_server(restarted.port, after.records))
    for read in (state, after):
        if read.stats["corrupt_records"] != 0:
            round_problems.append(f"stats.corrupt_records is {read.stats['corrupt_records']}")
    if sorted(after.per_user.get(bystander, [])) != sorted(
        r for r, rec in seeded.items() if rec["user_id"] == bystander
    ):
        round_problems.append(f"{bystander}, never deleted, lost records")
    code, stderr = restarted.stop()
    if code != 0 or "Traceback" in stderr:
        round_problems.append(f"the restarted server exited {code}:\n{stderr}")
    round_problems += [f"after the second delete_user: {problem}" for problem in stored_index_problems(database)]
    print(
        f"round {number} ({loop}): delete_user "
        f"{'acknowledged' if user_deleted else 'unanswered'}, {left} of its records left; "
        f"{len(deleted_ids)} delete_record acknowledged, "
        f"{sum(1 for r in singles if r not in {x['record_id'] for x in state.records})} records of that user gone"
    )
    if not round_problems:
        shutil.rmtree(database)
    return round_problems, left


async def test_a_record_batch_survives_kill_9_whole_once_acknowledged_and_is_never_half_stored(
    tmp_path: Path, servers: ServerLauncher, rng: random.Random
) -> None:
    """Batches are pipelined and the server is killed once some are acknowledged: after the
    restart every acknowledged batch is stored whole under the record ids it was told, and every
    other batch is stored whole or not at all (one write batch each)."""
    server = servers.start(tmp_path / "db")
    token = TOKENS[0]
    batch_size = 200
    batches: list[list[dict[str, Any]]] = [
        [
            {
                "test_name": f"batch_kill_{index % 3}",
                "request_id": f"kill-{number}-{index}",
                "metrics": {"qps": rng.uniform(1e3, 1e6), "batch": number, "index": index},
                "sys_info": {"padding": "p" * rng.randint(0, 400)},
            }
            for index in range(batch_size)
        ]
        for number in range(80)
    ]
    reader, writer = await asyncio.open_connection(HOST, server.port)
    acknowledged: dict[int, list[str]] = {}

    async def send_all() -> None:
        for number, records in enumerate(batches):
            request = {"op": "record_batch", "id": number, "access_token": token, "records": records}
            writer.write(orjson.dumps(request) + b"\n")
            await writer.drain()

    sending = asyncio.create_task(send_all())
    async with asyncio.timeout(STREAMS_END_SECONDS * 3):
        while len(acknowledged) < 5:
            reply = orjson.loads(await reader.readline())
            assert reply["ok"], reply
            acknowledged[reply["id"]] = [result["record_id"] for result in reply["results"]]
        server.kill()
        # Replies already on their way count as acknowledged too (until the end or a reset).
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                with contextlib.suppress(orjson.JSONDecodeError):  # a line cut short by the kill
                    reply = orjson.loads(line)
                    acknowledged[reply["id"]] = [result["record_id"] for result in reply["results"]]
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await sending
    writer.close()
    assert len(acknowledged) < len(batches), "every batch was acknowledged before the kill: nothing was tested"
    server.restart()
    server.wait_listening()
    connection = await Connection.open(server.port)
    try:
        async with asyncio.timeout(READ_BACK_SECONDS):
            records = await page_through(connection, "get_user", user_id=BOT_TOKENS[token])
        stored = {record["request_id"]: record for record in records}
    finally:
        await connection.close()
    for number, records in enumerate(batches):
        present: list[dict[str, Any] | None] = [stored.get(record["request_id"]) for record in records]
        if number in acknowledged:
            assert [record["record_id"] if record else None for record in present] == acknowledged[number]
        else:
            assert all(present) or not any(present), f"batch {number} is half stored"
        for record, sent in zip(present, records, strict=True):
            assert record is None or record["metrics"] == sent["metrics"]
