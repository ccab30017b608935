"""The idempotency filter: a Bloom filter that spares the writer a read per request_id, its false
positives (which must cost a read, never a wrong answer) and its filling while the writer runs."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perfdb.storage import layout
from perfdb.storage.known_requests import MIN_CAPACITY, BloomFilter, KnownRequests
from tests.support import connect, make_config, record_request, running_server, userinfo_server

FILL_DEADLINE = 30.0


def test_bloom_filter_keeps_every_key_and_claims_few_others() -> None:
    # Three times what the first layer was sized for: the later keys go to layers of their own.
    stored = [b"i:user\x00stored-%d" % n for n in range(3 * MIN_CAPACITY)]
    bloom = BloomFilter(expected_keys=0)
    for first in range(0, len(stored), 1000):
        bloom.add(stored[first : first + 1000])
    assert bloom.contains(stored).all()
    assert all(key in bloom for key in stored[:100])
    assert bloom.keys == len(stored)
    others = [b"i:user\x00other-%d" % n for n in range(20_000)]
    false_positives = int(bloom.contains(others).sum())
    # About 0.24% a layer when full; three layers, the last half full: well under 1%.
    assert false_positives < 0.01 * len(others)
    # 2 bytes a key a layer has room for; the layers have room for under 4 times the keys held.
    assert bloom.size_bytes < 2 * 4 * len(stored)


def test_every_key_may_exist_until_the_filling_is_done_and_none_is_lost() -> None:
    release = threading.Event()

    def stored_keys() -> Iterator[bytes]:
        yield b"i:u\x00before-1"
        release.wait(FILL_DEADLINE)
        yield b"i:u\x00before-2"

    known = KnownRequests(expected_keys=2)
    known.start_filling(stored_keys())
    # Still filling: nothing can be ruled out, so the writer reads every key.
    assert known.may_exist(b"i:u\x00never-stored")
    known.add([b"i:u\x00stored-meanwhile"])
    assert not known.ready
    release.set()
    assert known.wait_filled(FILL_DEADLINE)
    assert known.may_exist(b"i:u\x00before-1") and known.may_exist(b"i:u\x00before-2")
    assert known.may_exist(b"i:u\x00stored-meanwhile")  # the key stored while it filled was kept for it
    assert known.ready
    known.add([b"i:u\x00stored-after"])
    assert known.may_exist(b"i:u\x00stored-after")
    # Now it answers: keys never stored are ruled out (but for a rare false positive).
    assert sum(known.may_exist(b"i:u\x00never-stored-%d" % n) for n in range(1000)) < 10


def test_a_filling_that_fails_or_is_stopped_leaves_every_key_a_maybe() -> None:
    def broken() -> Iterator[bytes]:
        yield b"i:u\x00one"
        raise RuntimeError("the database went away")

    known = KnownRequests(expected_keys=1)
    known.start_filling(broken())
    assert known.wait_filled(FILL_DEADLINE)
    known.add([b"i:u\x00two"])
    assert not known.ready
    assert known.may_exist(b"i:u\x00anything")

    stopped = KnownRequests(expected_keys=1)
    stopped.start_filling(itertools.repeat(b"i:u\x00endless"))
    stopped.stop_filling()
    assert not stopped.ready and stopped.may_exist(b"i:u\x00anything")


def false_positive_request_ids(known: KnownRequests, user_id: str, count: int) -> list[str]:
    """Request ids the filter claims though it was never given them."""
    found: list[str] = []
    for n in itertools.count():
        request_id = f"fresh-{n}"
        if known.may_exist(layout.idempotency_key(user_id, request_id)):
            found.append(request_id)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


def batch_of(request_ids: list[str]) -> dict[str, Any]:
    """A record_batch: one write item, so the writer asks the filter about all its request ids at once."""
    assert len(request_ids) >= KnownRequests.MIN_KEYS  # fewer are read without asking the filter
    records = [
        {"test_name": "unary", "request_id": request_id, "metrics": {"qps": 1000.0 + n}}
        for n, request_id in enumerate(request_ids)
    ]
    return {"op": "record_batch", "access_token": "user-alice", "records": records}


async def test_a_false_positive_costs_a_read_and_stores_the_record_as_new(tmp_path: Path) -> None:
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url)
        async with running_server(config) as server, connect(server) as conn:
            first = await conn.request(**record_request(request_id="first"))
            user_id = first["user_id"]
            # A filter full of other keys, so that some request ids are (wrongly) claimed by it.
            crowded = KnownRequests(expected_keys=0)
            crowded.start_filling(b"i:someone\x00k%d" % n for n in range(MIN_CAPACITY))
            assert crowded.wait_filled(FILL_DEADLINE)
            crowded.add([layout.idempotency_key(user_id, "first")])  # what the writer's filter knows
            claimed = false_positive_request_ids(crowded, user_id, 3)
            # New ids the filter rules out (at this crowding it claims a few in a hundred of those too).
            others = [f"other-{n}" for n in range(200)]
            ruled_out = [o for o in others if not crowded.may_exist(layout.idempotency_key(user_id, o))][:40]
            request_ids = [*claimed, "first", *ruled_out]
            keys = [layout.idempotency_key(user_id, request_id) for request_id in request_ids]
            # The filter rules out every new request id but the claimed ones: those (and "first") are read.
            assert crowded.absent(keys) == set(keys[4:])
            # The writer's own filter is done reading the database before it is replaced (no write is in flight).
            assert server.store.writer.known_requests.wait_filled(FILL_DEADLINE)
            server.store.writer.known_requests = crowded
            fresh = (await conn.request(**batch_of(request_ids)))["results"]
            resent = (await conn.request(**batch_of(request_ids)))["results"]
            stats = await conn.request("stats")
    assert fresh[3]["record_id"] == first["record_id"] and fresh[3]["duplicate"] is True
    new = fresh[:3] + fresh[4:]
    assert all(result["duplicate"] is False for result in new), fresh
    assert len({result["record_id"] for result in new} | {first["record_id"]}) == len(request_ids)
    assert [result["record_id"] for result in resent] == [result["record_id"] for result in fresh]
    assert all(result["duplicate"] is True for result in resent)
    assert stats["records"] == len(request_ids)


async def test_request_ids_stored_before_a_restart_are_found_by_the_filter(tmp_path: Path) -> None:
    request_ids = [f"r{n}" for n in range(50)]
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url)
        async with running_server(config) as server, connect(server) as conn:
            stored = (await conn.request(**batch_of(request_ids)))["results"]
        async with running_server(config) as server, connect(server) as conn:
            known = server.store.writer.known_requests
            assert known.wait_filled(FILL_DEADLINE)
            # Stored before the restart, then new twice within one batch.
            again = (await conn.request(**batch_of([*request_ids, "new", "new"])))["results"]
            assert known.ready
            keys = [layout.idempotency_key(stored[0]["user_id"], request_id) for request_id in request_ids]
            assert known.absent(keys) == set()
            stats = await conn.request("stats")
    assert [result["record_id"] for result in again[:50]] == [result["record_id"] for result in stored]
    assert all(result["duplicate"] is True for result in again[:50])
    assert again[50]["duplicate"] is False
    assert again[51] == {**again[50], "duplicate": True}
    assert stats["records"] == 51
