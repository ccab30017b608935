"""Unit tests of the connection layer (LineProtocol, its ReplyQueue and FlowControl) against a
fake transport, handler and tracker."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from perfdb.config import Config
from perfdb.protocol.connection import ConnectionLimits, LineProtocol
from perfdb.protocol.errors import ErrorCode
from perfdb.protocol.flow_control import FlowControl, ReadPause
from perfdb.protocol.replies import DeferredReply, PendingReply, Reply, ReplyQueue
from perfdb.server import connection_limits

LIMIT = 16  # max_line_bytes for the tests about over-long lines
TOO_LONG = b"E:too-long\n"
INTERNAL = b"E:internal\n"
PEER = ("127.0.0.1", 5555)


def reply_for(line: bytes) -> bytes:
    return b"R(" + line + b")\n"


def replies_for(lines: Iterable[bytes]) -> bytes:
    return b"".join(reply_for(line) for line in lines)


# -- fakes -------------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records everything the protocol does to it, in order: written bytes, and the strings
    "pause", "resume", "close", "abort". Refuses pause/resume twice in a row."""

    def __init__(self, peername: Any = PEER) -> None:
        super().__init__()
        self._peername = peername
        self.events: list[str | bytes] = []
        self.reading = True
        self.closing = False
        self.on_write: Callable[[bytes], None] | None = None  # e.g. to call pause_writing like asyncio does

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        if name == "socket":
            return None
        return default

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self.events.append(bytes(data))
        if self.on_write is not None:
            self.on_write(bytes(data))

    def pause_reading(self) -> None:
        # Raising here fails the test whether the call came from the test or from a loop callback.
        if not self.reading:
            raise AssertionError("pause_reading called while reading is already paused")
        self.reading = False
        self.events.append("pause")

    def resume_reading(self) -> None:
        if self.reading:
            raise AssertionError("resume_reading called while reading is not paused")
        self.reading = True
        self.events.append("resume")

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.events.append("eof")

    @property
    def eof_sent(self) -> bool:
        return "eof" in self.events

    @property
    def writes(self) -> list[bytes]:
        return [event for event in self.events if isinstance(event, bytes)]

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)

    @property
    def flow(self) -> list[str]:
        return [event for event in self.events if event in ("pause", "resume")]

    @property
    def closed(self) -> bool:
        return "close" in self.events

    def written_after_close(self) -> list[bytes]:
        """Bytes written after end-of-stream or close: there must never be any."""
        ends = [index for index, event in enumerate(self.events) if event in ("close", "eof")]
        if not ends:
            return []
        return [event for event in self.events[ends[0] :] if isinstance(event, bytes)]


class FakeHandler:
    """A LineHandler: lines starting with b"slow" get a future the test settles, lines the test
    put in `deferred` get that DeferredReply; any other line is answered at once with
    reply_for(line)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.peers: list[str] = []
        self.futures: dict[bytes, asyncio.Future[bytes]] = {}
        self.deferred: dict[bytes, DeferredReply] = {}
        self.too_long_replies = 0
        self.internal_error_replies = 0
        self.other_errors: list[tuple[ErrorCode, str]] = []

    def handle_line(self, line: bytes, peer: str) -> Reply:
        self.lines.append(line)
        self.peers.append(peer)
        if line in self.deferred:
            return self.deferred[line]
        if line.startswith(b"slow"):
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.futures[line] = future
            return future
        return reply_for(line)

    def error_reply(self, code: ErrorCode, message: str) -> bytes:
        if code is ErrorCode.LINE_TOO_LONG:
            self.too_long_replies += 1
            return TOO_LONG
        if code is ErrorCode.INTERNAL:
            self.internal_error_replies += 1
            return INTERNAL
        self.other_errors.append((code, message))
        return f"E({code.value})\n".encode()

    def resolve(self, *lines: bytes) -> None:
        for line in lines:
            self.futures[line].set_result(reply_for(line))


class FakeTracker:
    def __init__(self, accepting: bool = True) -> None:
        self.events: list[tuple[str, LineProtocol]] = []
        self.accepting = accepting

    def connection_opened(self, connection: LineProtocol) -> bool:
        self.events.append(("opened", connection))
        return self.accepting

    def connection_closed(self, connection: LineProtocol) -> None:
        self.events.append(("closed", connection))


@dataclasses.dataclass
class Connection:
    protocol: LineProtocol
    transport: FakeTransport
    handler: FakeHandler
    tracker: FakeTracker

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.data_received(chunk)


LINGER = 0.05
IDLE, LINE, WRITE = 100.0, 10.0, 20.0  # deadlines, driven by check_deadlines(now) in the tests


def connect(*, max_line_bytes: int = 64, max_inflight: int = 64, peername: Any = PEER) -> Connection:
    """A connected LineProtocol; call from inside the running loop."""
    handler = FakeHandler()
    tracker = FakeTracker()
    limits = ConnectionLimits(
        max_line_bytes=max_line_bytes,
        max_inflight=max_inflight,
        linger=LINGER,
        idle_timeout=IDLE,
        line_timeout=LINE,
        write_timeout=WRITE,
        drain_quiet=0.0,
    )
    protocol = LineProtocol(handler, tracker, limits)
    transport = FakeTransport(peername)
    protocol.connection_made(transport)
    return Connection(protocol, transport, handler, tracker)


async def run_callbacks(rounds: int = 5) -> None:
    """Let done-callbacks and the flushes they schedule run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def complete_lines(stream: bytes) -> list[bytes]:
    """The request lines a correct framer finds in a stream prefix (reference implementation)."""
    lines = stream.split(b"\n")[:-1]  # the last piece is unterminated
    stripped = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return [line for line in stripped if line]


# -- connection set-up ---------------------------------------------------------------------


async def test_tracker_is_told_of_open_and_close_and_handler_gets_the_peer() -> None:
    conn = connect()
    assert conn.tracker.events == [("opened", conn.protocol)]
    assert conn.protocol.peer == "127.0.0.1:5555"
    conn.feed(b"hello\n")
    assert conn.handler.peers == ["127.0.0.1:5555"]
    conn.protocol.connection_lost(None)
    assert conn.tracker.events == [("opened", conn.protocol), ("closed", conn.protocol)]


async def test_ipv6_peer_is_bracketed() -> None:
    conn = connect(peername=("::1", 5555, 0, 0))
    conn.feed(b"hello\n")
    assert conn.protocol.peer == "[::1]:5555"
    assert conn.handler.peers == ["[::1]:5555"]


# -- framing -------------------------------------------------------------------------------

STREAM = b'alpha\nbeta\r\n\n\r\ngamma delta\n{"op":"ping"}\r\n'
STREAM_LINES = [b"alpha", b"beta", b"gamma delta", b'{"op":"ping"}']


async def test_requests_split_at_every_pair_of_byte_boundaries() -> None:
    assert complete_lines(STREAM) == STREAM_LINES
    for i in range(len(STREAM) + 1):
        for j in range(i, len(STREAM) + 1):
            conn = connect()
            for end, chunk in ((i, STREAM[:i]), (j, STREAM[i:j]), (len(STREAM), STREAM[j:])):
                if chunk:
                    conn.feed(chunk)
                # Each line is handled (and its immediate reply written) as soon as it is complete.
                assert conn.handler.lines == complete_lines(STREAM[:end]), (i, j)
                assert conn.transport.output == replies_for(complete_lines(STREAM[:end])), (i, j)
            assert conn.handler.too_long_replies == 0


async def test_requests_fed_one_byte_at_a_time() -> None:
    conn = connect()
    for index in range(len(STREAM)):
        conn.feed(STREAM[index : index + 1])
        assert conn.handler.lines == complete_lines(STREAM[: index + 1])
    assert conn.handler.lines == STREAM_LINES
    assert conn.transport.output == replies_for(STREAM_LINES)


async def test_many_requests_in_one_chunk_are_answered_in_order_in_one_write() -> None:
    lines = [b"request-%d" % n for n in range(500)]
    conn = connect(max_inflight=1024)
    conn.feed(b"".join(line + b"\n" for line in lines))
    assert conn.handler.lines == lines
    assert conn.transport.writes == [replies_for(lines)]


async def test_crlf_is_accepted_and_empty_lines_are_ignored() -> None:
    conn = connect()
    conn.feed(b"\n\r\n\n\r\none\r\ntwo\n\n\r\nthree\r\n\n")
    assert conn.handler.lines == [b"one", b"two", b"three"]
    assert conn.transport.output == replies_for([b"one", b"two", b"three"])


async def test_partial_line_waits_for_its_newline() -> None:
    conn = connect()
    conn.feed(b"first\nsec")
    assert conn.handler.lines == [b"first"]
    conn.feed(b"ond")
    assert conn.handler.lines == [b"first"]
    conn.feed(b"\r")
    assert conn.handler.lines == [b"first"]
    conn.feed(b"\n")
    assert conn.handler.lines == [b"first", b"second"]


# -- reply order and batching ------------------------------------------------------------


async def test_replies_follow_request_order_when_a_later_future_finishes_first() -> None:
    conn = connect()
    conn.feed(b"slow1\nslow2\nslow3\n")
    conn.handler.resolve(b"slow3")
    await run_callbacks()
    assert conn.transport.writes == []
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.writes == [reply_for(b"slow1")]
    conn.handler.resolve(b"slow2")
    await run_callbacks()
    assert conn.transport.writes == [reply_for(b"slow1"), replies_for([b"slow2", b"slow3"])]


async def test_immediate_reply_waits_behind_an_earlier_future() -> None:
    conn = connect()
    conn.feed(b"fast1\nslow2\nfast3\n")
    # fast1 goes out at once, inside data_received; fast3 must wait for slow2.
    assert conn.transport.writes == [reply_for(b"fast1")]
    await run_callbacks()
    assert conn.transport.writes == [reply_for(b"fast1")]
    conn.handler.resolve(b"slow2")
    await run_callbacks()
    assert conn.transport.writes == [reply_for(b"fast1"), replies_for([b"slow2", b"fast3"])]


async def test_replies_ready_together_are_written_in_one_write() -> None:
    lines = [b"slow%d" % n for n in range(6)]
    conn = connect()
    conn.feed(b"".join(line + b"\n" for line in lines) + b"fast\n")
    conn.handler.resolve(*reversed(lines))
    await run_callbacks()
    assert conn.transport.writes == [replies_for([*lines, b"fast"])]


async def test_replies_completed_by_separate_callbacks_in_one_iteration_share_a_write() -> None:
    # Like a group commit: one callback settles slow1 and schedules the settling of slow2, which
    # then runs in the same loop iteration as the protocol's done-callback for slow1.
    conn = connect()
    conn.feed(b"slow1\nslow2\n")
    loop = asyncio.get_running_loop()

    def settle_batch() -> None:
        conn.handler.resolve(b"slow1")
        loop.call_soon(conn.handler.resolve, b"slow2")

    loop.call_soon(settle_batch)
    await run_callbacks()
    assert conn.transport.writes == [replies_for([b"slow1", b"slow2"])]


async def test_failed_or_cancelled_future_becomes_internal_error_in_its_place() -> None:
    conn = connect()
    conn.feed(b"slow1\nslow2\nslow3\nfast4\n")
    conn.handler.futures[b"slow3"].set_result(reply_for(b"slow3"))
    conn.handler.futures[b"slow2"].set_exception(RuntimeError("handler broke its promise"))
    await run_callbacks()
    assert conn.transport.writes == []
    conn.handler.futures[b"slow1"].cancel()
    await run_callbacks()
    assert conn.transport.output == INTERNAL + INTERNAL + reply_for(b"slow3") + reply_for(b"fast4")
    assert conn.handler.internal_error_replies == 2


# -- the reply queue on its own ------------------------------------------------------------


class QueueUnderTest:
    """A ReplyQueue with its callbacks recorded."""

    def __init__(self) -> None:
        self.settled: list[object] = []
        self.failures = 0
        self.queue = ReplyQueue(self.settled.append, self.failed_reply)

    def failed_reply(self) -> bytes:
        self.failures += 1
        return INTERNAL


def future() -> asyncio.Future[bytes]:
    return asyncio.get_running_loop().create_future()


async def test_reply_queue_gives_ready_replies_only_in_request_order() -> None:
    replies = QueueUnderTest()
    first, third = future(), future()
    for reply in (b"zero\n", first, b"second\n", third, b"fourth\n"):
        replies.queue.append(reply)
    assert len(replies.queue) == 5
    assert replies.queue.take_ready() == [b"zero\n"]
    third.set_result(b"third\n")
    await run_callbacks()
    assert replies.settled == [third]
    assert replies.queue.take_ready() == []  # third waits behind first
    first.set_result(b"first\n")
    await run_callbacks()
    assert replies.settled == [third, first]
    assert replies.queue.take_ready() == [b"first\n", b"second\n", b"third\n", b"fourth\n"]
    assert len(replies.queue) == 0 and replies.queue.take_ready() == []


def test_a_pending_reply_holds_the_replies_behind_it_until_filled_and_is_told_once() -> None:
    replies = QueueUnderTest()
    pending, later = PendingReply(), PendingReply()
    for reply in (b"zero\n", pending, b"second\n", later):
        replies.queue.append(reply)
    later.fill(b"third\n")  # filled out of order: told at once, written in order
    assert replies.settled == [later]
    assert replies.queue.take_ready() == [b"zero\n"]
    pending.fill(b"first\n")
    pending.fill(b"again\n")  # a second fill changes nothing and tells nobody
    assert replies.settled == [later, pending]
    assert replies.queue.take_ready() == [b"first\n", b"second\n", b"third\n"]
    assert len(replies.queue) == 0


async def test_reply_queue_puts_the_failure_reply_in_place_of_a_failed_or_cancelled_future() -> None:
    replies = QueueUnderTest()
    failed, cancelled = future(), future()
    for reply in (failed, b"between\n", cancelled):
        replies.queue.append(reply)
    failed.set_exception(RuntimeError("broken promise"))
    cancelled.cancel()
    await run_callbacks()
    assert replies.queue.take_ready() == [INTERNAL, b"between\n", INTERNAL]
    assert replies.failures == 2


async def test_reply_queue_starts_deferred_work_only_at_the_head_and_only_when_asked() -> None:
    replies = QueueUnderTest()
    started: list[str] = []
    page_future = future()

    def start_page1() -> asyncio.Future[bytes]:
        started.append("page1")
        return page_future

    def start_page2() -> bytes:
        started.append("page2")
        return b"page2\n"

    for reply in (b"before\n", DeferredReply(start_page1), DeferredReply(start_page2), b"after\n"):
        replies.queue.append(reply)
    assert not replies.queue.start_deferred()  # the head is a plain reply
    assert replies.queue.take_ready() == [b"before\n"]  # stops at the deferred work, unstarted
    assert started == []
    assert replies.queue.start_deferred()
    assert not replies.queue.start_deferred()  # the head is now page1's future, still running
    assert started == ["page1"] and replies.queue.take_ready() == []
    page_future.set_result(b"page1\n")
    await run_callbacks()
    assert replies.settled == [page_future]  # a started future reports its end like any other
    assert replies.queue.take_ready() == [b"page1\n"]
    assert replies.queue.start_deferred() and started == ["page1", "page2"]
    assert replies.queue.take_ready() == [b"page2\n", b"after\n"]


async def test_reply_queue_clear_drops_everything_owed() -> None:
    replies = QueueUnderTest()
    pending = future()
    replies.queue.append(pending)
    replies.queue.append(b"ready\n")
    replies.queue.clear()
    assert len(replies.queue) == 0
    pending.set_result(b"late\n")
    await run_callbacks()
    assert replies.queue.take_ready() == []


# -- line-length limit -------------------------------------------------------------------


async def test_complete_line_over_the_limit_is_answered_with_an_error_and_never_handled() -> None:
    conn = connect(max_line_bytes=LIMIT)
    conn.feed(
        b"A" * LIMIT
        + b"\n"  # exactly the limit: fine
        + b"slowB"
        + b"B" * (LIMIT - 4)
        + b"\n"  # one over
        + b"C" * LIMIT
        + b"\r\n"  # the '\r' does not count
        + b"D" * (LIMIT + 1)
        + b"\r\n"  # one over, with CRLF
        + b"ok\n"
    )
    assert conn.handler.lines == [b"A" * LIMIT, b"C" * LIMIT, b"ok"]
    assert conn.transport.output == (
        reply_for(b"A" * LIMIT) + TOO_LONG + reply_for(b"C" * LIMIT) + TOO_LONG + reply_for(b"ok")
    )
    assert conn.handler.too_long_replies == 2


HIDDEN = b'{"op":"ping"}'  # looks like a request, but is the tail of an over-long line


async def test_overlong_unterminated_tail_sent_at_once_is_discarded_up_to_its_newline() -> None:
    conn = connect(max_line_bytes=LIMIT)
    conn.feed(b"first\n" + b"X" * (3 * LIMIT))
    # Answered as soon as the tail is over the limit, before its newline arrives.
    assert conn.transport.output == reply_for(b"first") + TOO_LONG
    conn.feed(HIDDEN)
    conn.feed(b"\n" + HIDDEN + b"\n")
    assert len(HIDDEN) <= LIMIT
    assert conn.handler.lines == [b"first", HIDDEN]  # only the copy after the newline
    assert conn.handler.too_long_replies == 1
    assert conn.transport.output == reply_for(b"first") + TOO_LONG + reply_for(HIDDEN)


async def test_overlong_tail_with_hidden_request_in_the_same_chunk() -> None:
    conn = connect(max_line_bytes=LIMIT)
    conn.feed(b"X" * (2 * LIMIT) + HIDDEN)
    conn.feed(b"\nok\n")
    assert conn.handler.lines == [b"ok"]
    assert conn.transport.output == TOO_LONG + reply_for(b"ok")


@pytest.mark.parametrize("chunk_size", [1, 2, 5, LIMIT, LIMIT + 3])
@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
async def test_overlong_tail_trickled_gets_one_error_and_bounded_buffer(chunk_size: int, terminator: bytes) -> None:
    conn = connect(max_line_bytes=LIMIT)
    stream = b"X" * (3 * LIMIT) + HIDDEN + b"X" * LIMIT + HIDDEN + terminator + b"ok" + terminator
    for start in range(0, len(stream), chunk_size):
        conn.feed(stream[start : start + chunk_size])
        # One spare byte for a '\r'; never the whole over-long line.
        assert len(conn.protocol._framer._buffer) <= LIMIT + 1
        assert conn.handler.too_long_replies <= 1
    assert conn.handler.lines == [b"ok"]
    assert conn.handler.too_long_replies == 1
    assert conn.transport.output == TOO_LONG + reply_for(b"ok")


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
async def test_line_of_exactly_the_limit_trickled_is_accepted(terminator: bytes) -> None:
    conn = connect(max_line_bytes=LIMIT)
    stream = b"A" * LIMIT + terminator
    for index in range(len(stream)):
        conn.feed(stream[index : index + 1])
    assert conn.handler.lines == [b"A" * LIMIT]
    assert conn.handler.too_long_replies == 0


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
async def test_line_one_byte_over_the_limit_trickled_gets_exactly_one_error(terminator: bytes) -> None:
    conn = connect(max_line_bytes=LIMIT)
    stream = b"A" * (LIMIT + 1) + terminator + b"ok\n"
    for index in range(len(stream)):
        conn.feed(stream[index : index + 1])
    assert conn.handler.lines == [b"ok"]
    assert conn.handler.too_long_replies == 1
    assert conn.transport.output == TOO_LONG + reply_for(b"ok")


# -- in-flight cap -------------------------------------------------------------------------


async def test_inflight_cap_pauses_reading_at_n_and_resumes_at_half() -> None:
    conn = connect(max_inflight=4)
    conn.feed(b"slow1\nslow2\nslow3\n")
    assert conn.transport.flow == []
    conn.feed(b"slow4\n")
    assert conn.transport.flow == ["pause"]
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.output == reply_for(b"slow1")
    assert conn.transport.flow == ["pause"]  # 3 pending: still over half
    conn.handler.resolve(b"slow2")
    await run_callbacks()
    assert conn.transport.flow == ["pause", "resume"]  # 2 pending = N/2
    assert conn.transport.reading


async def test_inflight_cap_holds_back_buffered_lines_and_dispatches_them_in_order() -> None:
    conn = connect(max_inflight=4)
    first = [b"slow1", b"slow2", b"slow3", b"slow4"]
    held = [b"fast5", b"slow6", b"fast7", b"slow8"]
    conn.feed(b"".join(line + b"\n" for line in first + held) + b"slow9")
    assert conn.handler.lines == first
    assert not conn.transport.reading
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.handler.lines == first  # 3 pending: nothing more dispatched
    assert not conn.transport.reading
    conn.handler.resolve(b"slow2")
    await run_callbacks()
    # Down to N/2: held-back lines are dispatched, in order, until the cap is reached again.
    assert conn.handler.lines == [*first, b"fast5", b"slow6"]
    assert not conn.transport.reading
    conn.handler.resolve(b"slow3", b"slow4")
    await run_callbacks()
    assert conn.handler.lines == first + held
    assert conn.transport.reading  # buffer holds only the partial line now
    conn.handler.resolve(b"slow6", b"slow8")
    await run_callbacks()
    assert conn.transport.output == replies_for(first + held)
    conn.feed(b"\n")
    assert conn.handler.lines == [*first, *held, b"slow9"]


async def test_lines_arriving_while_inflight_full_are_not_dispatched() -> None:
    conn = connect(max_inflight=2)
    conn.feed(b"slow1\nslow2\n")
    assert not conn.transport.reading
    conn.feed(b"fast3\n")  # a transport may still hand over what it had already read
    assert conn.handler.lines == [b"slow1", b"slow2"]
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.handler.lines == [b"slow1", b"slow2", b"fast3"]


async def test_many_immediate_replies_under_a_small_inflight_cap() -> None:
    # A client pipelining small requests: 64 KiB of "{}\n" in one read, max_inflight=4.
    count = 65536 // 3
    conn = connect(max_inflight=4)
    conn.feed(b"{}\n" * count)
    assert len(conn.handler.lines) == count
    assert conn.transport.output == reply_for(b"{}") * count
    assert conn.transport.reading


# -- flow control --------------------------------------------------------------------------


async def test_pause_writing_pauses_reading_and_resume_writing_resumes_it() -> None:
    conn = connect()
    conn.protocol.pause_writing()
    assert conn.transport.flow == ["pause"]
    conn.protocol.resume_writing()
    assert conn.transport.flow == ["pause", "resume"]


async def test_resume_writing_does_not_resume_while_inflight_is_full() -> None:
    conn = connect(max_inflight=2)
    conn.feed(b"slow1\nslow2\n")
    conn.protocol.pause_writing()
    conn.protocol.resume_writing()
    assert conn.transport.flow == ["pause"]
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.flow == ["pause", "resume"]


async def test_inflight_release_does_not_resume_while_writing_is_paused() -> None:
    conn = connect(max_inflight=2)
    conn.feed(b"slow1\nslow2\n")
    conn.protocol.pause_writing()
    conn.handler.resolve(b"slow1", b"slow2")
    await run_callbacks()
    assert conn.transport.flow == ["pause"]
    conn.protocol.resume_writing()
    assert conn.transport.flow == ["pause", "resume"]


async def test_write_that_fills_the_transport_pauses_reading() -> None:
    # asyncio transports call pause_writing from inside write() once over the high-water mark.
    conn = connect()
    conn.transport.on_write = lambda _data: conn.protocol.pause_writing()
    conn.feed(b"fast1\n")
    assert conn.transport.events == [reply_for(b"fast1"), "pause"]
    conn.transport.on_write = None
    conn.feed(b"fast2\n")  # data the transport had already read is answered once the client reads
    assert conn.handler.lines == [b"fast1"]
    conn.protocol.resume_writing()
    assert conn.transport.events == [reply_for(b"fast1"), "pause", "resume", reply_for(b"fast2")]


async def test_pause_and_resume_alternate_under_random_interleavings() -> None:
    rng = random.Random(20240611)
    for _ in range(40):
        conn = connect(max_inflight=4)
        write_paused = False
        sent: list[bytes] = []
        for step in range(60):
            action = rng.choice(["slow", "fast", "resolve", "writing"])
            if action == "writing":
                if write_paused:
                    conn.protocol.resume_writing()
                else:
                    conn.protocol.pause_writing()
                write_paused = not write_paused
            elif action == "resolve":
                unresolved = [line for line, future in conn.handler.futures.items() if not future.done()]
                if unresolved:
                    conn.handler.resolve(rng.choice(unresolved))
                await run_callbacks(2)
            else:
                line = b"%s%d" % (action.encode(), step)
                sent.append(line)
                conn.feed(line + b"\n")
            # The fake transport raises on a repeated pause or resume; check the record too.
            flow = conn.transport.flow
            assert all(a != b for a, b in itertools.pairwise(flow))
        if write_paused:
            conn.protocol.resume_writing()
        while any(not future.done() for future in conn.handler.futures.values()):
            conn.handler.resolve(*[line for line, future in conn.handler.futures.items() if not future.done()])
            await run_callbacks()
        assert conn.handler.lines == sent
        assert conn.transport.output == replies_for(sent)
        assert conn.transport.reading


# -- the flow-control helper on its own -------------------------------------------------------


def pause_reasons(flow: FlowControl) -> set[ReadPause]:
    return {reason for reason in ReadPause if flow.paused_for(reason)}


def attached_flow() -> tuple[FlowControl, FakeTransport]:
    flow, transport = FlowControl(), FakeTransport()
    flow.attach(transport)
    return flow, transport


def test_flow_control_pause_and_resume_twice_are_harmless() -> None:
    flow, transport = attached_flow()
    flow.pause(ReadPause.INFLIGHT_CAP)
    flow.pause(ReadPause.INFLIGHT_CAP)  # the fake transport raises on a second pause_reading
    assert transport.flow == ["pause"] and pause_reasons(flow) == {ReadPause.INFLIGHT_CAP}
    flow.resume(ReadPause.INFLIGHT_CAP)
    flow.resume(ReadPause.INFLIGHT_CAP)
    assert transport.flow == ["pause", "resume"] and not pause_reasons(flow)
    flow.resume(ReadPause.CLIENT_NOT_READING)  # never paused for it: nothing to do
    assert transport.flow == ["pause", "resume"]


def test_flow_control_reads_again_only_when_the_last_reason_goes_and_says_which_remain() -> None:
    flow, transport = attached_flow()
    assert pause_reasons(flow) == set()
    flow.pause(ReadPause.CLIENT_NOT_READING)
    flow.pause(ReadPause.INFLIGHT_CAP)
    assert pause_reasons(flow) == {ReadPause.CLIENT_NOT_READING, ReadPause.INFLIGHT_CAP}
    assert flow.paused_for(ReadPause.INFLIGHT_CAP) and not flow.paused_for(ReadPause.STOPPED)
    flow.resume(ReadPause.CLIENT_NOT_READING)
    assert pause_reasons(flow) == {ReadPause.INFLIGHT_CAP}
    assert transport.flow == ["pause"]
    flow.resume(ReadPause.INFLIGHT_CAP)
    assert transport.flow == ["pause", "resume"]


def test_flow_control_leaves_a_detached_transport_alone() -> None:
    flow, transport = attached_flow()
    flow.pause(ReadPause.INFLIGHT_CAP)
    flow.detach()
    flow.resume(ReadPause.INFLIGHT_CAP)
    flow.pause(ReadPause.STOPPED)
    assert transport.flow == ["pause"]
    assert pause_reasons(flow) == {ReadPause.STOPPED}  # still known, for the connection's own checks


# -- shutdown ------------------------------------------------------------------------------


async def test_begin_shutdown_answers_every_line_then_ends_the_stream_and_lingers() -> None:
    conn = connect(max_inflight=2)
    conn.feed(b"slow1\nslow2\nfast3\nslow4\npart")
    assert conn.handler.lines == [b"slow1", b"slow2"]  # the cap holds the rest back
    assert conn.transport.flow == ["pause"]
    conn.protocol.begin_shutdown()
    # The held-back lines are dispatched (the handler decides what to answer) and reading
    # resumes, so that nothing unread is left in the kernel when the connection closes.
    assert conn.handler.lines == [b"slow1", b"slow2", b"fast3", b"slow4"]
    assert conn.transport.flow == ["pause", "resume"]
    conn.feed(b"ial\nlate\n")  # lines completed or sent while draining are answered too
    assert conn.handler.lines[-2:] == [b"partial", b"late"]
    conn.handler.resolve(b"slow1", b"slow4")
    await run_callbacks()
    assert conn.transport.output == reply_for(b"slow1")
    assert not conn.transport.eof_sent
    conn.handler.resolve(b"slow2")
    await run_callbacks()
    expected = [b"slow1", b"slow2", b"fast3", b"slow4", b"partial", b"late"]
    assert conn.transport.output == replies_for(expected)
    # Every reply is out: end-of-stream, then input is discarded unrun until the client closes.
    assert conn.transport.eof_sent and not conn.transport.closed
    conn.feed(b"after-eof\n")
    assert conn.handler.lines == expected
    await asyncio.sleep(LINGER * 3)
    assert conn.transport.closed  # the client did not close: the linger ran out
    assert conn.transport.written_after_close() == []
    assert "abort" not in conn.transport.events


async def test_begin_shutdown_with_nothing_owed_ends_the_stream_at_once() -> None:
    conn = connect()
    conn.feed(b"fast1\nfast2\npart")
    conn.protocol.begin_shutdown()
    assert conn.transport.eof_sent
    assert conn.transport.output == replies_for([b"fast1", b"fast2"])
    assert conn.transport.written_after_close() == []
    assert conn.handler.lines == [b"fast1", b"fast2"]
    conn.protocol.connection_lost(None)  # the client closed in answer
    await asyncio.sleep(LINGER * 3)
    assert not conn.transport.closed  # no close call after the connection is gone


async def test_begin_shutdown_while_discarding_an_overlong_line() -> None:
    conn = connect(max_line_bytes=LIMIT)
    conn.feed(b"X" * (2 * LIMIT))
    conn.feed(HIDDEN)  # still inside the over-long line
    conn.protocol.begin_shutdown()
    assert conn.handler.lines == []
    assert conn.transport.output == TOO_LONG
    assert conn.transport.eof_sent


async def test_eof_received_answers_what_was_sent_then_closes() -> None:
    conn = connect()
    conn.feed(b"slow1\nfast2\npartial")
    assert conn.protocol.eof_received() is True
    assert conn.handler.lines == [b"slow1", b"fast2"]
    assert not conn.transport.closed
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.output == replies_for([b"slow1", b"fast2"])
    assert conn.transport.closed
    assert conn.transport.written_after_close() == []
    assert conn.handler.lines == [b"slow1", b"fast2"]


async def test_eof_received_with_nothing_owed_closes_at_once() -> None:
    conn = connect()
    conn.feed(b"fast\n")
    assert conn.protocol.eof_received() is True
    assert conn.transport.closed
    assert conn.transport.output == reply_for(b"fast")


async def test_eof_after_begin_shutdown_changes_nothing() -> None:
    conn = connect()
    conn.feed(b"slow1\n")
    conn.protocol.begin_shutdown()
    assert conn.protocol.eof_received() is True
    assert conn.handler.lines == [b"slow1"]
    assert not conn.transport.closed
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.output == reply_for(b"slow1")
    assert conn.transport.closed


# -- connection lost and abort -------------------------------------------------------------


async def test_nothing_is_written_after_connection_lost() -> None:
    conn = connect()
    conn.feed(b"slow1\nslow2\nfast3\n")
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.output == reply_for(b"slow1")
    conn.protocol.connection_lost(ConnectionResetError("peer went away"))
    assert conn.tracker.events == [("opened", conn.protocol), ("closed", conn.protocol)]
    conn.handler.resolve(b"slow2")
    await run_callbacks()
    conn.feed(b"fast4\n")
    conn.protocol.pause_writing()
    conn.protocol.resume_writing()
    conn.protocol.begin_shutdown()
    conn.protocol.abort()
    assert conn.transport.events == [reply_for(b"slow1")]
    assert conn.handler.lines == [b"slow1", b"slow2", b"fast3"]


async def test_abort_closes_at_once_without_writing_owed_replies() -> None:
    conn = connect()
    conn.feed(b"slow1\n")
    conn.protocol.abort()
    assert conn.transport.events == ["abort"]
    conn.protocol.connection_lost(None)
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.events == ["abort"]


async def test_client_end_of_stream_after_ours_closes_without_lingering() -> None:
    conn = connect()
    conn.protocol.begin_shutdown()
    assert conn.transport.eof_sent and not conn.transport.closed
    assert conn.protocol.eof_received() is True
    assert conn.transport.closed  # at once, not after the linger


# -- deadlines and refusal ------------------------------------------------------------------


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_refused_connection_gets_overloaded_and_is_closed() -> None:
    handler, tracker = FakeHandler(), FakeTracker(accepting=False)
    protocol = LineProtocol(handler, tracker, connection_limits(Config()))
    transport = FakeTransport()
    protocol.connection_made(transport)
    assert [code for code, _ in handler.other_errors] == [ErrorCode.OVERLOADED]
    assert transport.output == b"E(overloaded)\n" and transport.closed
    protocol.data_received(b"ping\n")
    assert handler.lines == []  # nothing a refused client sends is run


async def test_incomplete_line_past_the_line_timeout_is_refused_and_closed() -> None:
    conn = connect()
    conn.feed(b"slow1\npartial-request")
    conn.protocol.check_deadlines(now() + LINE / 2)
    assert not conn.transport.closed
    conn.feed(b"-still-going")  # a slow drip does not reset the deadline
    conn.protocol.check_deadlines(now() + LINE + 1)
    assert [code for code, _ in conn.handler.other_errors] == [ErrorCode.TIMEOUT]
    assert not conn.transport.closed  # a reply is still owed: it goes out first
    conn.feed(b"\nfast\n")
    assert conn.handler.lines == [b"slow1"]  # nothing more is read or run
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert conn.transport.output == reply_for(b"slow1") + b"E(timeout)\n"
    assert conn.transport.closed


async def test_busy_client_whose_reads_end_mid_line_is_not_timed_out() -> None:
    conn = connect()
    conn.feed(b"fast1\nfa")
    for number in range(2, 40):
        conn.protocol.check_deadlines(now() + LINE / 2)
        conn.feed(b"st" + str(number).encode() + b"\nfa")  # every read completes a line and starts one
    assert not conn.transport.closed
    assert len(conn.handler.lines) == 39


async def test_requests_wait_while_the_client_is_not_reading() -> None:
    conn = connect()
    conn.protocol.pause_writing()
    conn.feed(b"fast1\nfast2\n")
    assert conn.handler.lines == []  # no new work while our replies pile up unread
    conn.protocol.resume_writing()
    assert conn.handler.lines == [b"fast1", b"fast2"]
    assert conn.transport.output == replies_for([b"fast1", b"fast2"])


async def test_line_deadline_restarts_with_each_line_and_ignores_lines_held_back_by_us() -> None:
    conn = connect(max_inflight=1)
    conn.feed(b"pa")
    conn.feed(b"rt\nsecond-par")  # the first line completed; the second starts its own clock
    started = now()
    conn.protocol.check_deadlines(started + LINE - 1)
    assert not conn.transport.closed
    conn.feed(b"t\nslow3\nslow4\n")
    # slow lines wait on us (the in-flight cap), not on the client: no line deadline
    conn.protocol.check_deadlines(now() + LINE * 3)
    assert not conn.transport.closed


async def test_idle_connection_is_closed_only_when_nothing_is_owed() -> None:
    conn = connect()
    conn.feed(b"slow1\n")
    conn.protocol.check_deadlines(now() + IDLE * 2)
    assert not conn.transport.closed  # a reply is still owed
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    conn.protocol.check_deadlines(now() + IDLE / 2)
    assert not conn.transport.closed
    conn.protocol.check_deadlines(now() + IDLE + 1)
    assert conn.transport.closed
    assert conn.transport.output == reply_for(b"slow1") + b"E(timeout)\n"


async def test_client_that_does_not_read_is_dropped_after_the_write_timeout() -> None:
    conn = connect()
    conn.protocol.pause_writing()
    conn.protocol.check_deadlines(now() + WRITE / 2)
    assert "abort" not in conn.transport.events
    conn.protocol.resume_writing()
    conn.protocol.check_deadlines(now() + WRITE * 2)  # resumed: the clock stopped
    assert "abort" not in conn.transport.events
    conn.protocol.pause_writing()
    conn.protocol.check_deadlines(now() + WRITE + 1)
    assert "abort" in conn.transport.events


async def test_drain_waits_for_a_quiet_moment_before_ending_the_stream() -> None:
    handler, tracker = FakeHandler(), FakeTracker()
    protocol = LineProtocol(
        handler, tracker, dataclasses.replace(connection_limits(Config()), drain_quiet=0.05, linger=LINGER)
    )
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"fast1\n")
    protocol.begin_shutdown()
    assert not transport.eof_sent  # input arrived just now: more may be on its way
    await asyncio.sleep(0.02)
    protocol.data_received(b"fast2\n")  # and it was: answered, and the quiet clock restarts
    await asyncio.sleep(0.035)
    assert not transport.eof_sent
    await asyncio.sleep(0.05)
    assert transport.eof_sent
    assert handler.lines == [b"fast1", b"fast2"]
    assert transport.output == replies_for([b"fast1", b"fast2"])


async def test_deferred_work_starts_at_the_head_and_only_while_the_client_reads() -> None:
    conn = connect()
    started: list[str] = []

    def deferred(name: str) -> DeferredReply:
        def start() -> bytes:
            started.append(name)
            return reply_for(name.encode())

        return DeferredReply(start)

    conn.handler.deferred = {b"page1": deferred("page1"), b"page2": deferred("page2")}
    conn.feed(b"slow1\npage1\nslow2\npage2\n")
    assert started == []  # a reply before it is still owed
    conn.handler.resolve(b"slow1")
    await run_callbacks()
    assert started == ["page1"]
    conn.protocol.pause_writing()
    conn.handler.resolve(b"slow2")
    await run_callbacks()
    assert started == ["page1"]  # the client is not reading: nothing more is produced for it
    conn.protocol.resume_writing()
    assert started == ["page1", "page2"]
    assert conn.transport.output == replies_for([b"slow1", b"page1", b"slow2", b"page2"])


async def test_a_page_that_fills_the_send_buffer_stops_the_next_page_from_starting() -> None:
    conn = connect()
    conn.transport.on_write = lambda _data: conn.protocol.pause_writing()  # every write fills it
    started: list[str] = []
    first_page: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def start_first() -> asyncio.Future[bytes]:
        started.append("page1")
        return first_page

    def start_second() -> bytes:
        started.append("page2")
        return reply_for(b"page2")

    conn.handler.deferred = {b"page1": DeferredReply(start_first), b"page2": DeferredReply(start_second)}
    conn.feed(b"page1\npage2\n")
    assert started == ["page1"]
    first_page.set_result(reply_for(b"page1"))
    await run_callbacks()
    # page1 went to the transport, which filled up: page2 waits until the client reads.
    assert started == ["page1"]
    assert conn.transport.output == reply_for(b"page1")
    conn.transport.on_write = None
    conn.protocol.resume_writing()
    assert started == ["page1", "page2"]
