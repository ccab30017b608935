"""The connection: asyncio transport callbacks that turn a TCP stream into request lines and
replies, with limits, deadlines and flow control.

This layer knows nothing about what a request means. LineFramer (framer.py) cuts the stream into
lines and enforces the line-length limit; each line goes to a LineHandler, and its reply joins a
ReplyQueue (replies.py) that keeps request order; FlowControl (flow_control.py) pauses reading
while the connection owes too much or the client is not reading. It never imports storage or HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import logging
import socket
import sys
import termios
import typing
from typing import Protocol as TypingProtocol

from perfdb.protocol.addresses import format_address
from perfdb.protocol.errors import ErrorCode
from perfdb.protocol.flow_control import FlowControl, ReadPause
from perfdb.protocol.framer import Frame, FramingError, LineFramer
from perfdb.protocol.replies import Reply, ReplyQueue

log = logging.getLogger("perfdb.protocol")


class LineHandler(TypingProtocol):
    """What the framing layer needs from the command layer."""

    def handle_line(self, line: bytes, peer: str) -> Reply:
        """Answer one complete request line (terminator stripped). Must not raise."""
        ...

    def error_reply(self, code: ErrorCode, message: str) -> bytes:
        """An error reply the framing layer sends on its own (id null): over-long lines,
        timeouts, refused connections, reply futures that failed."""
        ...


class ConnectionTracker(TypingProtocol):
    """Where the server keeps its open connections, so shutdown and the deadline sweep find them."""

    def connection_opened(self, connection: LineProtocol) -> bool:
        """Register the connection; False refuses it (too many connections)."""
        ...

    def connection_closed(self, connection: LineProtocol) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection limits; protocol_spec.md documents each one."""

    # The server's settings (Config holds their defaults).
    max_line_bytes: int
    max_inflight: int
    idle_timeout: float  # no request and nothing owed for this long: close
    line_timeout: float  # a started line must be complete within this
    write_timeout: float  # a client that reads nothing for this long is dropped
    linger: float  # after our end-of-stream, how long the client has to close
    # While draining, end the stream only after this long without input, so that requests
    # already on their way are answered rather than cut off.
    drain_quiet: float = 0.1


class LineProtocol(asyncio.Protocol):
    """One client connection speaking newline-delimited requests."""

    __slots__ = (
        "_closed",
        "_closing",
        "_draining",
        "_flow",
        "_flush_scheduled",
        "_framer",
        "_handler",
        "_held_lines",
        "_last_activity",
        "_last_received",
        "_limits",
        "_linger",
        "_loop",
        "_max_inflight",
        "_max_line_bytes",
        "_partial_since",
        "_peer",
        "_peer_done",
        "_quiet_check",
        "_replies",
        "_tracker",
        "_transport",
        "_write_paused_since",
    )

    def __init__(self, handler: LineHandler, tracker: ConnectionTracker, limits: ConnectionLimits) -> None:
        # Collaborators and limits
        self._handler = handler
        self._tracker = tracker
        self._limits = limits
        self._max_line_bytes = limits.max_line_bytes
        self._max_inflight = limits.max_inflight
        self._loop = asyncio.get_running_loop()
        # Deadlines, checked by the server's periodic sweep (loop.time() values)
        self._last_activity = self._last_received = self._loop.time()
        self._partial_since: float | None = None  # an incomplete line has been waiting since
        self._write_paused_since: float | None = None
        # Per-connection state
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._framer = LineFramer(limits.max_line_bytes)
        # Lines received but not yet handed on: the in-flight cap is reached or the client is
        # not reading its replies. Bounded by what the transport read before it paused.
        self._held_lines: collections.deque[Frame] = collections.deque()
        # Replies in request order; the head is written as soon as it is ready.
        self._replies = ReplyQueue(self._on_reply_done, self._internal_error)
        self._flush_scheduled = False
        # Why reading is paused; ReadPause.STOPPED (a timeout fired, or a TLS client ended its
        # stream) is for good: owed replies go out, nothing new is read.
        self._flow = FlowControl()
        # Lifetime: draining (answer what was received, then end the stream), closing (our
        # end-of-stream is sent; input is discarded from here on), closed.
        self._draining = False
        self._closing = False
        self._closed = False
        self._peer_done = False  # the client sent end-of-stream
        self._linger: asyncio.TimerHandle | None = None
        self._quiet_check: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> str:
        return self._peer

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Set up the connection and register it with the server."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = typing.cast(asyncio.Transport, transport)
        self._flow.attach(self._transport)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self._peer = format_address(str(peername[0]), peername[1])
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are small and latency matters; OSError means the peer already left.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._tracker.connection_opened(self):
            log.warning("%s: refused: too many connections", self._peer, extra={"peer": self._peer})
            self._closing = True
            self._transport.write(self._handler.error_reply(ErrorCode.OVERLOADED, "too many connections; retry later"))
            self._transport.close()
            return
        log.debug("%s: connected", self._peer, extra={"peer": self._peer})

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; replies still being computed are dropped when they finish."""
        self._closed = True
        self._flow.detach()
        for timer in (self._linger, self._quiet_check):
            if timer is not None:
                timer.cancel()
        self._held_lines.clear()
        self._framer.clear()
        self._replies.clear()
        self._tracker.connection_closed(self)
        log.debug("%s: disconnected%s", self._peer, f" ({exc})" if exc else "", extra={"peer": self._peer})

    def data_received(self, data: bytes) -> None:
        """Frame the new bytes into lines and hand each complete one on."""
        if self._closing or self._closed or self._reading_stopped:
            return  # after our end-of-stream nothing more is answered, so nothing more is run
        self._last_activity = self._last_received = self._loop.time()
        self._held_lines.extend(self._framer.feed_data(data))
        self._process_lines(line_ended=self._framer.ended_line)

    def eof_received(self) -> bool:
        """The client finished sending: answer what it sent, then close."""
        self._peer_done = True
        if self._transport is not None and self._transport.get_extra_info("sslcontext") is not None:
            # TLS cannot stay half-open: the transport closes whatever we return. Lines not
            # yet started are dropped unrun; the client learns nothing of the ones in flight
            # and must resend them with their request_ids (protocol_spec.md, shutdown).
            self._flow.pause(ReadPause.STOPPED)
            self._held_lines.clear()
            self._framer.clear()
            return False
        if self._closing and self._transport is not None:
            self._transport.close()  # both sides have ended the stream: no need to linger
            return True
        self._drain()
        self._framer.clear()  # an unterminated last line is not a request
        return True  # keep the write side open until the replies are out

    def pause_writing(self) -> None:
        """The transport's write buffer is full: stop reading new requests."""
        self._write_paused_since = self._loop.time()
        self._flow.pause(ReadPause.CLIENT_NOT_READING)

    def resume_writing(self) -> None:
        """The write buffer drained: read again, and take up the requests held back."""
        self._write_paused_since = None
        self._flow.resume(ReadPause.CLIENT_NOT_READING)
        if not self._closing:
            self._process_lines()  # lines and deferred work held back while the client was not reading

    # -- lines in, replies out -------------------------------------------------------------

    def _process_lines(self, *, line_ended: bool = False) -> None:
        """Dispatch the lines held, up to the in-flight cap, and write what is ready."""
        held = self._held_lines
        replies = self._replies
        handle_line = self._handler.handle_line
        while True:
            for _ in range(min(len(held), self._dispatch_room())):
                frame = held.popleft()
                if isinstance(frame, bytes):
                    replies.append(handle_line(frame, self._peer))
                elif frame is FramingError.LINE_TOO_LONG:
                    replies.append(self._line_too_long())
            self._write_ready()
            # Replies answered at once free their places; keep going in this loop, not by recursion.
            if not held or not self._dispatch_room():
                break
        # The line deadline runs while an incomplete line waits for the client, not for us;
        # a line that starts in the same read that ended the previous one starts a new clock.
        if not self._dispatch_room() or not self._framer.has_partial_line:
            self._partial_since = None
        elif self._partial_since is None or line_ended:
            self._partial_since = self._loop.time()
        # While draining, reading goes on: each late line gets a quick refusal, and the
        # kernel holds no unread input that would turn our close into a reset.
        if len(replies) >= self._max_inflight and not self._draining:
            self._flow.pause(ReadPause.INFLIGHT_CAP)
        self._close_if_done()

    def _dispatch_room(self) -> int:
        """How many more lines may be started now (0: they wait). A client that is not reading
        its replies gets no new work done either; while draining, every line is answered.
        Asked once per batch of lines, not per line: it is the hot path of pipelined ingest."""
        if self._draining:
            return sys.maxsize
        if self._flow.paused_for(ReadPause.CLIENT_NOT_READING):
            return 0
        return max(0, self._max_inflight - len(self._replies))

    @property
    def _reading_stopped(self) -> bool:
        return self._flow.paused_for(ReadPause.STOPPED)

    def _line_too_long(self) -> bytes:
        return self._handler.error_reply(
            ErrorCode.LINE_TOO_LONG, f"request line longer than {self._max_line_bytes} bytes; discarded"
        )

    def _internal_error(self) -> bytes:
        """The reply in place of a reply future that failed or was cancelled."""
        return self._handler.error_reply(ErrorCode.INTERNAL, "internal server error")

    def _on_reply_done(self, _settled: object) -> None:
        # Many replies complete in one loop iteration (a group commit); write them together.
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the replies that became ready; read again once half the in-flight places are free."""
        self._flush_scheduled = False
        if self._closed:
            return
        self._write_ready()
        if self._flow.paused_for(ReadPause.INFLIGHT_CAP) and len(self._replies) <= self._max_inflight // 2:
            self._flow.resume(ReadPause.INFLIGHT_CAP)
            self._process_lines()  # requests that arrived while we were paused
            return
        self._close_if_done()

    def _write_ready(self) -> None:
        """Write the replies at the head of the queue that are ready, as one write; start deferred
        work that has reached the head."""
        while not self._closed and self._transport is not None:
            ready = self._replies.take_ready()
            if ready:
                # Hand what is ready to the transport before starting deferred work: if that
                # fills its buffer, pause_writing() comes now, before another page is produced.
                self._transport.write(b"".join(ready))
                self._last_activity = self._loop.time()
            if (
                self._closed
                or self._flow.paused_for(ReadPause.CLIENT_NOT_READING)
                or not self._replies.start_deferred()
            ):
                return  # nothing more is ready, or the client is not reading: produce nothing yet

    # -- shutdown and deadlines ----------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Answer what was received (new lines get the handler's shutting-down reply), then close."""
        self._drain()

    def _drain(self) -> None:
        if self._draining or self._closed:
            return
        self._draining = True
        # Reading may have been paused (in-flight cap, a full send buffer): input may be
        # waiting unread, so the quiet period counts from now.
        self._last_received = self._loop.time()
        self._flow.resume(ReadPause.INFLIGHT_CAP)
        self._process_lines()  # with _draining set, the in-flight cap no longer holds lines back

    def _close_if_done(self) -> None:
        """Once draining and every reply is out: end our side of the stream."""
        transport = self._transport
        if not self._draining or self._replies or self._closing or self._closed or transport is None:
            return
        close_at_once = self._peer_done or self._reading_stopped  # nothing more will be read
        if not close_at_once:
            # Requests the client sent just before we began draining may still be in flight;
            # end the stream only once the connection has been quiet for a moment.
            quiet_for = self._loop.time() - self._last_received
            unread = self._unread_bytes()
            if quiet_for < self._limits.drain_quiet or unread:
                if self._quiet_check is None:
                    wait = self._limits.drain_quiet if unread else self._limits.drain_quiet - quiet_for
                    self._quiet_check = self._loop.call_later(wait, self._recheck_close)
                return
        self._closing = True
        if close_at_once or not transport.can_write_eof():
            transport.close()  # sends what is buffered, then closes
            return
        # Closing with unread input would make the kernel reset the connection and could
        # destroy replies still in flight; send end-of-stream and let the client close.
        transport.write_eof()
        self._linger = self._loop.call_later(self._limits.linger, transport.close)

    def _unread_bytes(self) -> int:
        """Bytes the kernel holds for us that we have not read yet (0 if it cannot tell)."""
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None:
            return 0
        try:
            available = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return int.from_bytes(available, sys.byteorder)

    def _recheck_close(self) -> None:
        self._quiet_check = None
        self._close_if_done()

    def check_deadlines(self, now: float) -> None:
        """Enforce the write, line and idle timeouts (called about once a second by the server)."""
        if self._closed or self._transport is None:
            return
        limits = self._limits
        # The write timeout holds in every state: a client that reads nothing is dropped.
        if self._write_paused_since is not None and now - self._write_paused_since > limits.write_timeout:
            log.warning(
                "%s: not reading its replies for %.0fs; dropped",
                self._peer,
                limits.write_timeout,
                extra={"peer": self._peer},
            )
            self._transport.abort()
            return
        if self._closing or self._reading_stopped:
            return
        if self._partial_since is not None and now - self._partial_since > limits.line_timeout:
            log.info(
                "%s: request line not completed within %.0fs; closing",
                self._peer,
                limits.line_timeout,
                extra={"peer": self._peer},
            )
            self._give_up(f"request line not completed within {limits.line_timeout:g}s; closing")
        elif not self._replies and self._partial_since is None and now - self._last_activity > limits.idle_timeout:
            log.debug("%s: idle for %.0fs; closing", self._peer, limits.idle_timeout, extra={"peer": self._peer})
            self._give_up(f"idle for {limits.idle_timeout:g}s; closing")

    def _give_up(self, message: str) -> None:
        """Stop reading, answer what is owed and then why, then close."""
        self._flow.pause(ReadPause.STOPPED)
        self._held_lines.clear()
        self._framer.clear()
        self._replies.append(self._handler.error_reply(ErrorCode.TIMEOUT, message))
        # No end-of-stream and linger: a client this late or this idle gets a plain close once
        # it has its replies (should it still be sending, it may see a reset after them).
        self._draining = True
        self._write_ready()
        self._close_if_done()

    def abort(self) -> None:
        """Close at once, dropping unsent replies (shutdown grace period is over)."""
        if self._transport is not None and not self._closed:
            self._transport.abort()
