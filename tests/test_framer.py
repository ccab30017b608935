"""Unit tests of the line framer: bytes fed in split and merged chunks, with no transport."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from perfdb.protocol.framer import Frame, FramingError, LineFramer

LIMIT = 16
TOO_LONG = FramingError.LINE_TOO_LONG
HIDDEN = b'{"op":"ping"}'  # looks like a request, but is the tail of an over-long line


def held_bytes(framer: LineFramer) -> int:
    """Bytes of the unfinished line the framer holds (its memory bound is what is tested)."""
    return len(framer._buffer)


def feed_all(limit: int, chunks: Iterable[bytes]) -> list[Frame]:
    framer = LineFramer(limit)
    frames: list[Frame] = []
    for chunk in chunks:
        frames += framer.feed_data(chunk)
        # Never more than the limit and the spare byte for a CR, however the stream is cut.
        assert held_bytes(framer) <= limit + 1
    return frames


def expected_frames(stream: bytes, limit: int) -> list[Frame]:
    """What protocol_spec.md 1.2 asks for, written independently of the framer: every complete
    line (CR before LF dropped, empty lines skipped, over-long ones an error), then an error for
    an unterminated tail already longer than the limit plus a spare byte."""
    *lines, tail = stream.split(b"\n")
    frames: list[Frame] = []
    for line in lines:
        line = line.removesuffix(b"\r")
        if len(line) > limit:
            frames.append(TOO_LONG)
        elif line:
            frames.append(line)
    if len(tail) > limit + 1:
        frames.append(TOO_LONG)
    return frames


def chunked(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    return [stream[start:end] for start, end in itertools.pairwise([0, *sorted(cuts), len(stream)])]


# -- lines, split and merged -------------------------------------------------------------------

STREAM = b'alpha\nbeta\r\n\n\r\ngamma delta\n{"op":"ping"}\r\n'
STREAM_LINES: list[Frame] = [b"alpha", b"beta", b"gamma delta", b'{"op":"ping"}']


def test_stream_split_at_every_pair_of_byte_boundaries_gives_the_same_lines() -> None:
    assert expected_frames(STREAM, 64) == STREAM_LINES
    for i in range(len(STREAM) + 1):
        for j in range(i, len(STREAM) + 1):
            assert feed_all(64, [STREAM[:i], STREAM[i:j], STREAM[j:]]) == STREAM_LINES, (i, j)


def test_each_line_comes_out_of_the_feed_that_completes_it() -> None:
    framer = LineFramer(64)
    frames: list[Frame] = []
    for index in range(len(STREAM)):
        frames += framer.feed_data(STREAM[index : index + 1])
        assert frames == expected_frames(STREAM[: index + 1], 64), index
    assert not framer.has_partial_line


def test_many_lines_in_one_chunk_come_out_in_order() -> None:
    lines = [b"request-%d" % n for n in range(500)]
    framer = LineFramer(64)
    assert framer.feed_data(b"".join(line + b"\n" for line in lines)) == lines
    assert held_bytes(framer) == 0


def test_crlf_is_stripped_and_empty_lines_are_skipped() -> None:
    framer = LineFramer(64)
    assert framer.feed_data(b"\n\r\n\n\r\none\r\ntwo\n\n\r\nthree\r\n\n") == [b"one", b"two", b"three"]


def test_only_a_cr_right_before_the_lf_is_removed() -> None:
    framer = LineFramer(64)
    assert framer.feed_data(b"a\rb\n\rc\n  \nd\r\r\n") == [b"a\rb", b"\rc", b"  ", b"d\r"]


def test_partial_line_is_held_until_its_newline() -> None:
    framer = LineFramer(64)
    assert framer.feed_data(b"first\nsec") == [b"first"]
    assert framer.has_partial_line and held_bytes(framer) == 3
    assert framer.feed_data(b"ond") == []
    assert framer.feed_data(b"\r") == []
    assert framer.feed_data(b"\n") == [b"second"]
    assert not framer.has_partial_line


def test_ended_line_tells_whether_the_held_partial_line_began_in_the_last_feed() -> None:
    framer = LineFramer(64)
    framer.feed_data(b"par")
    assert not framer.ended_line  # a line began, none ended
    framer.feed_data(b"tial")
    assert not framer.ended_line
    framer.feed_data(b"\nnext")
    assert framer.ended_line and framer.has_partial_line
    framer.feed_data(b"\n")
    assert framer.ended_line and not framer.has_partial_line
    framer.feed_data(b"X" * 100)  # over the limit: discarded up to its newline
    assert not framer.ended_line and framer.has_partial_line
    framer.feed_data(b"XX\nab")
    assert framer.ended_line and held_bytes(framer) == 2  # "ab" began in this feed


# -- the line-length limit --------------------------------------------------------------------


def test_complete_line_over_the_limit_is_an_error_in_its_place() -> None:
    framer = LineFramer(LIMIT)
    frames = framer.feed_data(
        b"A" * LIMIT
        + b"\n"  # exactly the limit: fine
        + b"B" * (LIMIT + 1)
        + b"\n"  # one over
        + b"C" * LIMIT
        + b"\r\n"  # the CR does not count
        + b"D" * (LIMIT + 1)
        + b"\r\n"  # one over, with CRLF
        + b"ok\n"
    )
    assert frames == [b"A" * LIMIT, TOO_LONG, b"C" * LIMIT, TOO_LONG, b"ok"]


def test_overlong_unterminated_tail_is_an_error_at_once_and_is_discarded_up_to_its_newline() -> None:
    framer = LineFramer(LIMIT)
    assert framer.feed_data(b"first\n" + b"X" * (3 * LIMIT)) == [b"first", TOO_LONG]
    assert held_bytes(framer) == 0 and framer.has_partial_line  # still inside the over-long line
    assert framer.feed_data(HIDDEN) == []
    assert framer.feed_data(b"\n" + HIDDEN + b"\n") == [HIDDEN]  # only the copy after the newline
    assert not framer.has_partial_line


def test_overlong_tail_with_a_hidden_request_in_the_same_chunk() -> None:
    framer = LineFramer(LIMIT)
    assert framer.feed_data(b"X" * (2 * LIMIT) + HIDDEN) == [TOO_LONG]
    assert framer.feed_data(b"\nok\n") == [b"ok"]


def test_overlong_tail_trickled_gets_one_error_and_a_bounded_buffer() -> None:
    stream = b"X" * (3 * LIMIT) + HIDDEN + b"X" * LIMIT + HIDDEN + b"\r\nok\r\n"
    for chunk_size in (1, 2, 5, LIMIT, LIMIT + 3):
        chunks = (stream[start : start + chunk_size] for start in range(0, len(stream), chunk_size))
        assert feed_all(LIMIT, chunks) == [TOO_LONG, b"ok"], chunk_size


def test_tail_of_the_limit_plus_a_spare_byte_waits_for_its_newline() -> None:
    # The spare byte is for a CR: with it the line is within the limit, without it one over.
    framer = LineFramer(LIMIT)
    assert framer.feed_data(b"A" * LIMIT + b"\r") == []
    assert framer.feed_data(b"\n") == [b"A" * LIMIT]
    assert framer.feed_data(b"B" * (LIMIT + 1)) == []
    assert framer.feed_data(b"\n") == [TOO_LONG]
    assert framer.feed_data(b"C" * (LIMIT + 2)) == [TOO_LONG]


def test_clear_forgets_the_partial_line_and_the_discarding() -> None:
    framer = LineFramer(LIMIT)
    framer.feed_data(b"X" * (2 * LIMIT))
    framer.clear()
    assert not framer.has_partial_line
    assert framer.feed_data(b"ok\n") == [b"ok"]
    framer.feed_data(b"part")
    framer.clear()
    assert framer.feed_data(b"ial\n") == [b"ial"]


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    stream=st.lists(st.sampled_from([b"a", b"bb", b"\r", b"\n", b"\r\n", b"x" * 7]), max_size=60).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_chunking_gives_what_the_spec_asks_for(stream: bytes, cuts: list[int]) -> None:
    chunks = chunked(stream, (cut for cut in cuts if cut <= len(stream)))
    assert feed_all(8, chunks) == expected_frames(stream, 8)
