"""The reply queue: one connection's replies in request order, and which of them can be written now."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class DeferredReply:
    """Work whose reply may be large (a page of records): started only when every reply before
    it is written and the client is reading, so one connection holds at most one such reply."""

    __slots__ = ("start",)

    def __init__(self, start: Callable[[], bytes | asyncio.Future[bytes]]) -> None:
        self.start = start


class PendingReply:
    """A reply that other code fills in later, without an asyncio future: the writer's group
    commit fills the replies of thousands of records in one loop callback, and each connection
    hears of it once (see ReplyQueue). Filled once; a later fill is ignored."""

    __slots__ = ("_listener", "value")

    def __init__(self) -> None:
        self.value: bytes | None = None
        self._listener: Callable[[PendingReply], object] | None = None

    def fill(self, value: bytes) -> None:
        if self.value is not None:
            return
        self.value = value
        if self._listener is not None:
            self._listener(self)


# A reply is ready (bytes), will be (a future that resolves to bytes, or a pending reply), or is
# yet to be started.
Reply = bytes | PendingReply | asyncio.Future[bytes] | DeferredReply


class ReplyQueue:
    """Replies owed on one connection, oldest first. Only the head may be written: a reply that
    is ready waits behind every earlier one that is not."""

    __slots__ = ("_failed_reply", "_on_settled", "_replies")

    def __init__(self, on_settled: Callable[[object], object], failed_reply: Callable[[], bytes]) -> None:
        """on_settled is called when a queued future finishes or a pending reply is filled;
        failed_reply gives the reply that stands in for a future that failed or was cancelled."""
        self._replies: collections.deque[Reply] = collections.deque()
        self._on_settled = on_settled
        self._failed_reply = failed_reply

    def __len__(self) -> int:
        """Replies owed, written or not started alike: what the in-flight cap counts."""
        return len(self._replies)

    def append(self, reply: Reply) -> None:
        self._replies.append(reply)
        if isinstance(reply, PendingReply):
            reply._listener = self._on_settled
        elif isinstance(reply, asyncio.Future):
            reply.add_done_callback(self._on_settled)

    def take_ready(self) -> list[bytes]:
        """Remove and return the replies at the head that are ready, in order; stop at the first
        that is still being computed or not started."""
        replies = self._replies
        ready: list[bytes] = []
        while replies:
            head = replies[0]
            if isinstance(head, bytes):
                ready.append(head)
            elif isinstance(head, PendingReply):
                if head.value is None:
                    break
                ready.append(head.value)
            elif isinstance(head, DeferredReply) or not head.done():
                break
            elif head.cancelled() or head.exception() is not None:
                ready.append(self._failed_reply())
            else:
                ready.append(head.result())
            replies.popleft()
        return ready

    def start_deferred(self) -> bool:
        """Start the deferred work at the head, if that is what the head is; True if it was."""
        if not self._replies or not isinstance(head := self._replies[0], DeferredReply):
            return False
        started = head.start()
        self._replies[0] = started
        if isinstance(started, asyncio.Future):
            started.add_done_callback(self._on_settled)
        return True

    def clear(self) -> None:
        """Drop every reply; futures still running call on_settled when they finish."""
        self._replies.clear()
