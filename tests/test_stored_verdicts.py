"""Verdicts kept: each record's verdicts stored beside it (get_record returns exactly what its ack carried), removed
with it, kept across restarts and repair; and deletions by an import's tombstones leave the verdict windows too.
Real servers on loopback, real LevelDB in tmp folders."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plyvel
import pytest

from perfdb.config import Config
from perfdb.records.profiles import Profile
from perfdb.records.record_ids import make_record_id
from perfdb.records.schema import RecordDraft
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.server import build_store
from perfdb.storage import RecordAck, layout
from perfdb.storage.repair import repair_database
from tests.support import Connection, connect, perfdb_with_provider, record_request
from tests.test_detection import ADMIN_KEY, admin_key_file, noisy, send_values, verdict

DETECTING = {"regression_detection": True}


def two_metrics(rng: random.Random, count: int) -> list[dict[str, Any]]:
    return [
        record_request(metrics={"qps": qps, "perc_lat_99": latency})
        for qps, latency in zip(noisy(rng, 1000.0, count), noisy(rng, 500.0, count), strict=True)
    ]


async def record_all(connection: Connection, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    await connection.send(*requests)
    acks = await connection.replies(len(requests))
    assert all(ack["ok"] for ack in acks), [ack for ack in acks if not ack["ok"]][:1]
    return acks


async def settle_verdicts(connection: Connection) -> None:
    """A record's verdicts are stored in a write batch after its ack; a write acknowledged later is committed
    after them. (The barrier record's own verdicts may still be on their way.)"""
    await record_all(connection, [record_request(test_name="barrier", metrics={"qps": 1.0})])


async def stored_verdicts(connection: Connection, record_id: str) -> list[dict[str, Any]] | None:
    reply = await connection.request("get_record", record_id=record_id)
    assert reply["ok"], reply
    verdicts: list[dict[str, Any]] | None = reply.get("verdicts")
    return verdicts


def verdict_keys(database: Path) -> set[str]:
    """The record ids with stored verdicts, read straight from LevelDB (the server stopped)."""
    db = plyvel.DB(str(database))
    try:
        prefix = layout.VERDICTS_PREFIX
        return {key[len(prefix) :].decode() for key in db.iterator(prefix=prefix, include_value=False)}
    finally:
        db.close()


async def test_get_record_returns_exactly_the_verdicts_the_ack_carried(tmp_path: Path) -> None:
    rng = random.Random(31)
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        acks = await record_all(connection, two_metrics(rng, 12))
        dropped = await record_all(connection, [record_request(metrics={"qps": 800.0}, request_id="drop")])
        await settle_verdicts(connection)
        for ack in [*acks, *dropped]:
            assert await stored_verdicts(connection, ack["record_id"]) == ack["verdicts"], ack["record_id"]
        assert [item["status"] for item in acks[0]["verdicts"]] == ["insufficient_data"] * 2
        assert verdict(dropped[0], "qps")["status"] == "regression"
        # A resend of the same request_id is judged no more: the first send's verdicts stay as they were.
        (resent,) = await record_all(connection, [record_request(metrics={"qps": 1000.0}, request_id="drop")])
        assert resent["duplicate"] is True and resent["verdicts"] == []
        await settle_verdicts(connection)
        assert await stored_verdicts(connection, dropped[0]["record_id"]) == dropped[0]["verdicts"]


async def test_records_judged_by_no_one_have_no_verdicts_member(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        (ack,) = await record_all(connection, [record_request()])
        assert "verdicts" not in ack
        await settle_verdicts(connection)
        reply = await connection.request("get_record", record_id=ack["record_id"])
        assert reply["ok"] and "verdicts" not in reply, reply
    # Detection on now: an imported record is not judged either.
    micros = now_micros() - 1_000_000
    imported_id = make_record_id(micros, 0)
    restored = {"record_id": imported_id, "user_id": "alice", "timestamp": format_micros(micros),
                "test_name": "unary", "metrics": {"qps": 1.0}}  # fmt: skip
    overrides = {"admin_key_file": admin_key_file(tmp_path), **DETECTING}
    async with perfdb_with_provider(tmp_path, **overrides) as (server, _), connect(server) as connection:
        imported = await connection.request("import", admin_key=ADMIN_KEY, records=[restored], users={"alice": {}})
        assert imported["ok"] and imported["imported"] == 1, imported
        await settle_verdicts(connection)
        for record_id in (ack["record_id"], imported_id):
            reply = await connection.request("get_record", record_id=record_id)
            assert reply["ok"] and "verdicts" not in reply, reply


async def test_verdicts_survive_a_restart_even_of_the_last_records(tmp_path: Path) -> None:
    rng = random.Random(32)
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        acks = await record_all(connection, two_metrics(rng, 8))
        # No barrier: the server stops right after the acks, and stores the verdicts still on their way.
    assert verdict_keys(tmp_path / "db") == {ack["record_id"] for ack in acks}
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        for ack in acks:
            assert await stored_verdicts(connection, ack["record_id"]) == ack["verdicts"]


async def test_the_writer_stopping_behind_judged_records_still_stores_their_verdicts(tmp_path: Path) -> None:
    """The stop is queued right behind the records, so the writer meets it before their verdicts come back from
    the verdict thread: it waits for them and stores them before it ends."""
    rng = random.Random(36)
    store = build_store(Config(database=tmp_path / "db", sync=False, regression_detection=True))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, store.open, loop)
    profile = Profile.create("static:ci", {})
    drafts = [RecordDraft("unary", "", {}, {"qps": value}, {}, {}) for value in noisy(rng, 1000.0, 20)]
    pending = [store.submit(profile, draft) for draft in drafts]
    await loop.run_in_executor(None, store.close)
    acks = await asyncio.gather(*pending)
    assert all(ack.verdicts for ack in acks)
    assert verdict_keys(tmp_path / "db") == {ack.record_id for ack in acks}


async def test_deleting_records_deletes_their_verdicts(tmp_path: Path) -> None:
    rng = random.Random(33)
    overrides = {"admin_key_file": admin_key_file(tmp_path), **DETECTING}
    async with perfdb_with_provider(tmp_path, **overrides) as (server, _), connect(server) as connection:
        alice = await record_all(connection, two_metrics(rng, 4))
        bob = await record_all(connection, [record_request(token="user-bob") for _ in range(3)])
        await settle_verdicts(connection)
        doomed = alice[1]["record_id"]
        assert await stored_verdicts(connection, doomed) == alice[1]["verdicts"]
        deleted = await connection.request("delete_record", record_id=doomed, access_token="user-alice")
        assert deleted["ok"] and deleted["deleted"] is True, deleted
        imported = await connection.request("import", admin_key=ADMIN_KEY, tombstones=[alice[2]["record_id"]])
        assert imported["ok"] and imported["removed"] == 1, imported
        # A user deleted right behind a record of theirs, in one pipeline: the record goes, and its verdicts,
        # judged after the record's batch, find it gone and are not stored.
        await connection.send(record_request(token="user-bob"), {"op": "delete_user", "user_id": "bob",
                                                                   "admin_key": ADMIN_KEY})  # fmt: skip
        last_bob, gone = await connection.replies(2)
        assert last_bob["ok"] and gone["ok"] and gone["records"] == len(bob) + 1, gone
        await settle_verdicts(connection)
        kept = {alice[0]["record_id"], alice[3]["record_id"]}
        for ack in alice:
            reply = await connection.request("get_record", record_id=ack["record_id"])
            assert reply["ok"] is (ack["record_id"] in kept), reply
    stored = verdict_keys(tmp_path / "db")
    gone_ids = {doomed, alice[2]["record_id"], last_bob["record_id"], *(ack["record_id"] for ack in bob)}
    assert kept <= stored and not stored & gone_ids


async def test_repair_keeps_verdicts_and_drops_those_without_a_record(tmp_path: Path) -> None:
    rng = random.Random(34)
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        acks = await record_all(connection, two_metrics(rng, 3))
    database = tmp_path / "db"
    orphan = make_record_id(now_micros(), 7)
    db = plyvel.DB(str(database))
    try:
        db.put(layout.verdicts_key(orphan), layout.verdicts_value([{"metric": "qps"}]), sync=True)
    finally:
        db.close()
    report = repair_database(database, drop_damaged=False)
    assert report.records == 3 and report.dangling_index_entries == 1 and not report.dropped
    report = repair_database(database, drop_damaged=True)
    assert report.dropped
    assert verdict_keys(database) == {ack["record_id"] for ack in acks}
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        assert await stored_verdicts(connection, acks[0]["record_id"]) == acks[0]["verdicts"]
        assert (await connection.request("ping"))["ok"]


def _flip_one_bit(stored: bytes) -> bytes:
    damaged = bytearray(stored)
    damaged[len(damaged) // 2] ^= 0x01
    return bytes(damaged)


def _newer_form(stored: bytes) -> bytes:
    """Sealed, but a form of packed verdicts this server cannot read (say a newer server's)."""
    return layout.verdicts_value(b"\x02later form")


@pytest.mark.parametrize("damage", [_flip_one_bit, _newer_form])
async def test_damaged_stored_verdicts_are_left_out_of_the_reply_not_the_record(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    rng = random.Random(37)
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        acks = await record_all(connection, two_metrics(rng, 2))
    db = plyvel.DB(str(tmp_path / "db"))
    try:
        key = layout.verdicts_key(acks[0]["record_id"])
        db.put(key, damage(db.get(key)), sync=True)
    finally:
        db.close()
    async with perfdb_with_provider(tmp_path, **DETECTING) as (server, _), connect(server) as connection:
        damaged = await connection.request("get_record", record_id=acks[0]["record_id"])
        assert damaged["ok"] and damaged["record"]["record_id"] == acks[0]["record_id"], damaged
        assert "verdicts" not in damaged
        assert await stored_verdicts(connection, acks[1]["record_id"]) == acks[1]["verdicts"]


async def test_a_record_removed_by_an_imported_tombstone_leaves_the_baseline(tmp_path: Path) -> None:
    rng = random.Random(35)
    overrides = {"admin_key_file": admin_key_file(tmp_path), **DETECTING}
    async with perfdb_with_provider(tmp_path, **overrides) as (server, _), connect(server) as connection:
        acks = await send_values(connection, "qps", noisy(rng, 1000.0, 10))
        probe = {"tag": "probe", "baseline_tag": ""}
        before = verdict((await send_values(connection, "qps", [1000.0], **probe))[0], "qps")
        assert before["baseline"]["n"] == 10
        gone = [acks[3]["record_id"], acks[7]["record_id"]]
        imported = await connection.request("import", admin_key=ADMIN_KEY, tombstones=gone)
        assert imported["ok"] and imported["removed"] == 2, imported
        after = verdict((await send_values(connection, "qps", [1000.0], **probe))[0], "qps")
        assert after["baseline"]["n"] == 8, after
        windowed = {point.record_id for key in server.store.detector.windows
                    for point in server.store.detector.windows.points(key)}  # fmt: skip
        assert windowed and not windowed & set(gone)


async def test_a_resend_in_the_same_batch_as_its_record_gets_no_verdicts(tmp_path: Path) -> None:
    """Both in one record_batch, so one commit: the resend's ack names the first record's id, and only the first
    carries (and stores) its verdicts."""
    store = build_store(Config(database=tmp_path / "db", sync=False, regression_detection=True))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, store.open, loop)
    try:
        profile = Profile.create("static:ci", {})
        drafts = [RecordDraft("unary", "", {}, {"qps": 1000.0}, {}, {}, request_id="same") for _ in range(2)]
        first, resent = (await store.submit_batch(profile, drafts)).outcomes
    finally:
        await loop.run_in_executor(None, store.close)
    assert isinstance(first, RecordAck) and isinstance(resent, RecordAck)
    assert resent.duplicate and resent.record_id == first.record_id
    assert resent.verdicts == () and first.verdicts
    assert verdict_keys(tmp_path / "db") == {first.record_id}
