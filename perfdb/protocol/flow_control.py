"""Flow control for one connection: reading is paused while any reason holds, and each reason is
set and cleared on its own, so that pausing twice or resuming twice is harmless."""

from __future__ import annotations

import asyncio
import enum


class ReadPause(enum.Enum):
    """Why reading from a connection is paused."""

    INFLIGHT_CAP = "max_inflight replies are owed"
    CLIENT_NOT_READING = "the send buffer is full: the client is not reading its replies"
    STOPPED = "nothing more is read from this connection"


class FlowControl:
    """Pauses a transport's reading exactly while at least one ReadPause holds: the transport
    sees one pause_reading when the first reason appears and one resume_reading when the last
    one goes."""

    __slots__ = ("_reasons", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.ReadTransport | None = None
        self._reasons: set[ReadPause] = set()

    def attach(self, transport: asyncio.ReadTransport) -> None:
        self._transport = transport

    def detach(self) -> None:
        """The connection is gone: keep track of the reasons, but touch the transport no more."""
        self._transport = None

    def paused_for(self, reason: ReadPause) -> bool:
        return reason in self._reasons

    def pause(self, reason: ReadPause) -> None:
        if reason in self._reasons:
            return
        self._reasons.add(reason)
        if len(self._reasons) == 1 and self._transport is not None:
            self._transport.pause_reading()

    def resume(self, reason: ReadPause) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons and self._transport is not None:
            self._transport.resume_reading()
