"""Record ids: 20 lowercase hex digits, 14 of server time in microseconds then 6 of a sequence
number, so that byte order is time order."""

from __future__ import annotations

import re

from perfdb.records.timestamps import now_micros

RECORD_ID_CHARS = 20
SEQUENCE_LIMIT = 1 << 24
_RECORD_ID = re.compile(r"[0-9a-f]{20}")


def make_record_id(micros: int, sequence: int) -> str:
    return f"{micros:014x}{sequence:06x}"


def record_id_micros(record_id: str) -> int:
    return int(record_id[:14], 16)


def is_record_id(text: str) -> bool:
    return bool(_RECORD_ID.fullmatch(text))


class RecordIdClock:
    """Strictly increasing record ids whose time part never goes back, even if the clock does."""

    __slots__ = ("_micros", "_sequence")

    def __init__(self, last_record_id: str | None) -> None:
        self._micros, self._sequence = -1, 0
        if last_record_id is not None:
            self.advance_past(last_record_id)

    def advance_past(self, record_id: str) -> None:
        """Make every later id sort after `record_id` (one restored from elsewhere, say)."""
        micros, sequence = record_id_micros(record_id), int(record_id[14:], 16)
        if (micros, sequence) > (self._micros, self._sequence):
            self._micros, self._sequence = micros, sequence

    def next(self) -> tuple[str, int]:
        return self.next_at(now_micros())

    def next_at(self, now: int) -> tuple[str, int]:
        """The next id at `now` (microseconds), read once for many ids; ids still never go back."""
        if now > self._micros:
            self._micros, self._sequence = now, 0
        else:
            self._sequence += 1
            if self._sequence >= SEQUENCE_LIMIT:  # 16M ids in one microsecond: borrow the next one
                self._micros, self._sequence = self._micros + 1, 0
        return make_record_id(self._micros, self._sequence), self._micros
