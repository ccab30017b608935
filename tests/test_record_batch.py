"""record_batch: many records of one token in one request, each validated on its own, stored in
one write batch, answered in order. Real server, real LevelDB, real userinfo provider."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from perfdb.protocol.limits import MAX_BATCH_RECORDS
from tests.support import (
    Connection,
    all_records_pages,
    connect,
    error_code,
    page_through,
    perfdb_with_provider,
)


def batch_record(index: int, rng: random.Random, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "test_name": f"batch_test_{index % 7}",
        "tag": "nightly",
        "request_id": f"batch-{index}",
        "metrics": {"qps": rng.uniform(1e3, 1e6), "perc_lat_99": rng.uniform(10, 1e4), "seq": index},
        "sys_info": {"cores": 8},
        "client_config": {"client_type": "ASYNC_CLIENT"},
    }
    record.update(fields)
    return record


async def stored_records(conn: Connection, user_id: str = "alice") -> dict[str, dict[str, Any]]:
    """request_id -> stored record, every record of the user."""
    records = all_records_pages(await page_through(conn, "get_user", user_id=user_id, limit=1000))
    return {record.get("request_id", record["record_id"]): record for record in records}


async def test_a_batch_stores_its_good_records_and_refuses_each_bad_one_alone(tmp_path: Path) -> None:
    rng = random.Random(5)
    records: list[Any] = [batch_record(index, rng) for index in range(300)]
    bad = {
        3: ("bad_request", "metrics", {**records[3], "metrics": {"qps": "fast"}}),
        40: ("bad_request", "test_name", {key: value for key, value in records[40].items() if key != "test_name"}),
        41: ("bad_request", "'colour'", {**records[41], "colour": "red"}),
        150: ("bad_request", "record", ["not", "an", "object"]),
        151: ("bad_request", "'access_token'", {**records[151], "access_token": "user-bob"}),
        299: ("bad_request", "better", {**records[299], "better": {"qps": "sideways"}}),
    }
    for index, (_, _, record) in bad.items():
        records[index] = record
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request("record_batch", id="b1", access_token="user-alice", records=records)
        assert reply["ok"] and reply["id"] == "b1", reply
        results = reply["results"]
        assert len(results) == len(records)
        for index, result in enumerate(results):
            if index in bad:
                code, field, _ = bad[index]
                assert result["error"]["code"] == code and result["error"]["message"].startswith(field), result
                assert result["error"]["retryable"] is False and "record_id" not in result
            else:
                assert set(result) == {"record_id", "user_id", "timestamp", "duplicate"}, result
                assert result["user_id"] == "alice" and result["duplicate"] is False
        # Record ids follow the batch's order: one commit, in order.
        ids = [result["record_id"] for index, result in enumerate(results) if index not in bad]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        stored = await stored_records(conn)
        assert (await conn.request("ping"))["ok"]  # the connection goes on
    assert len(stored) == len(records) - len(bad)
    for index, result in enumerate(results):
        if index in bad:
            continue
        record = stored[f"batch-{index}"]
        assert record["record_id"] == result["record_id"] and record["timestamp"] == result["timestamp"]
        assert record["metrics"] == records[index]["metrics"] and record["test_name"] == records[index]["test_name"]


async def test_a_batch_is_one_commit_even_past_the_batch_size_limit(tmp_path: Path) -> None:
    rng = random.Random(6)
    async with perfdb_with_provider(tmp_path, max_batch_records=10) as (server, _), connect(server) as conn:
        before = (await conn.request("stats"))["commits"]
        records = [batch_record(index, rng) for index in range(MAX_BATCH_RECORDS)]
        reply = await conn.request("record_batch", access_token="user-alice", records=records)
        after = (await conn.request("stats"))["commits"]
    assert reply["ok"] and all("record_id" in result for result in reply["results"])
    assert after["batches"] - before["batches"] == 1
    assert after["records"] - before["records"] == MAX_BATCH_RECORDS


async def test_a_malformed_batch_is_refused_whole_and_stores_nothing(tmp_path: Path) -> None:
    rng = random.Random(7)
    good = batch_record(0, rng)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"records": [good] * (MAX_BATCH_RECORDS + 1)}, "bad_request", "records"),
        ({"records": []}, "bad_request", "records"),
        ({"records": good}, "bad_request", "records"),
        ({}, "bad_request", "records"),
        ({"records": [good], "tag": "x"}, "bad_request", "'tag'"),
        ({"records": [good], "access_token": None}, "bad_request", "access_token"),
        ({"records": [good], "access_token": "nobody-knows-me"}, "unauthenticated", ""),
    ]
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        for fields, code, field in cases:
            request: dict[str, Any] = {"access_token": "user-alice", **fields}
            if request["access_token"] is None:
                del request["access_token"]
            reply = await conn.request("record_batch", **request)
            assert error_code(reply) == code, (fields.keys(), reply)
            assert reply["error"]["message"].startswith(field), reply
        assert (await conn.request("get_all"))["records"] == []
        stats = await conn.request("stats")
    assert stats["records"] == 0


async def test_request_ids_make_a_batch_idempotent_within_and_across_sends(tmp_path: Path) -> None:
    rng = random.Random(8)
    records = [batch_record(index, rng) for index in range(50)]
    records.append(dict(records[10]))  # the same request_id twice in one batch
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        first = (await conn.request("record_batch", access_token="user-alice", records=records))["results"]
        assert first[-1] == {**first[10], "duplicate": True}
        again = (await conn.request("record_batch", access_token="user-alice", records=records))["results"]
        assert [result["record_id"] for result in again] == [result["record_id"] for result in first]
        assert all(result["duplicate"] for result in again)
        # A single record with one of those request_ids is the same record too.
        single = await conn.request("record", access_token="user-alice", **records[20])
        stored = await stored_records(conn)
    assert single["record_id"] == first[20]["record_id"] and single["duplicate"] is True
    assert len(stored) == 50


async def test_the_rate_limit_refuses_the_records_past_the_users_tokens_alone(tmp_path: Path) -> None:
    rng = random.Random(9)
    records = [batch_record(index, rng) for index in range(8)]
    records[1]["metrics"] = {}  # refused as bad: it takes no token
    async with perfdb_with_provider(tmp_path, user_rate=0.001, user_burst=5) as (server, _), connect(server) as conn:
        results = (await conn.request("record_batch", access_token="user-alice", records=records))["results"]
        later = (await conn.request("record_batch", access_token="user-alice", records=records[:1]))["results"]
        stored = await stored_records(conn)
    assert "record_id" in results[0] and results[1]["error"]["code"] == "bad_request"
    assert all("record_id" in result for result in results[2:6])
    assert [result["error"]["code"] for result in results[6:]] == ["overloaded", "overloaded"]
    assert all(result["error"]["retryable"] for result in results[6:])
    assert later[0]["error"]["code"] == "overloaded"  # the bucket is empty: as for a single record
    assert set(stored) == {f"batch-{index}" for index in (0, 2, 3, 4, 5)}


async def test_with_detection_each_record_of_a_batch_gets_its_verdicts_in_order(tmp_path: Path) -> None:
    rng = random.Random(10)
    steady = [
        batch_record(index, rng, test_name="steady", metrics={"qps": 10_000 * (1 + rng.gauss(0, 0.01))})
        for index in range(30)
    ]
    dropped = batch_record(30, rng, test_name="steady", metrics={"qps": 8_500.0})
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as conn:
        results = (await conn.request("record_batch", access_token="user-alice", records=[*steady, dropped]))["results"]
        # A write acknowledged after the batch is committed after its verdicts (section 3.17).
        assert (await conn.request("record", access_token="user-alice", test_name="barrier", metrics={"x": 1}))["ok"]
        kept = await conn.request("get_record", record_id=results[30]["record_id"])
    statuses = [result["verdicts"][0]["status"] for result in results]
    # Judged one after another: each against the records before it, in the batch too.
    assert statuses[:5] == ["insufficient_data"] * 5
    assert [result["verdicts"][0]["baseline"]["n"] for result in results[5:30]] == list(range(5, 30))
    assert set(statuses[5:30]) <= {"no_change", "improvement", "regression"}
    assert statuses[30] == "regression" and results[30]["verdicts"][0]["metric"] == "qps"
    assert kept["verdicts"] == results[30]["verdicts"]  # stored as the batch's reply gave them


async def test_a_batch_record_takes_every_field_a_record_takes(tmp_path: Path) -> None:
    record = {
        "test_name": "BM_Sort/1024",
        "metrics": {"real_time": 1520.5, "iterations": 44800},
        "units": {"real_time": "ns"},
        "samples": {"real_time": [1500.25, 1520.5, 1541.0]},
        "run_time": "2026-01-02T03:04:05.000000Z",  # stored as the server writes times
        "source": {"commit": "0123456789abcdef0123456789abcdef01234567", "branch": "main"},
        "better": {"real_time": "lower"},
    }
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        [result] = (await conn.request("record_batch", access_token="user-alice", records=[record]))["results"]
        stored = (await conn.request("get_record", record_id=result["record_id"]))["record"]
    for field, value in record.items():
        assert stored[field] == value, field
