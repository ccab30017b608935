"""The compare op: two runs selected by tag, record ids or time window, compared per test and metric,
over real sockets against a real server and LevelDB."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from perfdb.client import AsyncClient, Client, PerfdbClientError
from perfdb.records.record_ids import record_id_micros
from perfdb.records.schema import MAX_COMPARE_RECORD_IDS, SELECTOR_FIELDS
from perfdb.records.timestamps import format_micros
from tests.support import Connection, connect, error_code, perfdb_with_provider, record_request, send_burst

RUN_SIZE = 10


def run_requests(tag: str, qps: float, seed: int, *, token: str = "user-alice") -> list[dict[str, Any]]:
    """RUN_SIZE results each of two tests: `unary` at about `qps`, `streaming` at about 5000 whatever
    the run, both with 1 % seeded noise."""
    noise = random.Random(seed)
    requests = []
    for _ in range(RUN_SIZE):
        for test_name, mean in (("unary", qps), ("streaming", 5000.0)):
            metrics = {"qps": mean * noise.gauss(1, 0.01), "perc_lat_50": 100 * noise.gauss(1, 0.01)}
            requests.append(record_request(token=token, test_name=test_name, tag=tag, metrics=metrics))
    return requests


async def store(conn: Connection, requests: list[dict[str, Any]]) -> list[str]:
    acks = await send_burst(conn, requests)
    assert all(ack["ok"] for ack in acks), acks
    return [ack["record_id"] for ack in acks]


def row(reply: dict[str, Any], test_name: str, metric: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [r for r in reply["rows"] if (r["test_name"], r["metric"]) == (test_name, metric)]
    assert len(found) == 1, (test_name, metric, reply["rows"])
    return found[0]


async def test_a_ten_percent_qps_drop_between_tags_is_a_regression(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await store(conn, run_requests("v1", 10_000.0, seed=1))
        await store(conn, run_requests("v2", 9_000.0, seed=2))
        await store(conn, run_requests("v3", 10_000.0, seed=3, token="user-bob"))
        reply = await conn.request("compare", id=7, base={"tag": "v1"}, head={"tag": "v2"})
        # The other way round it is an improvement; a top-level test_name narrows both sides.
        back = await conn.request("compare", base={"tag": "v2"}, head={"tag": "v1"}, test_name="unary")
        # bob's v3 against alice's v2, each side narrowed by its own user_id.
        bob = await conn.request(
            "compare", base={"tag": "v2", "user_id": "alice"}, head={"tag": "v3", "user_id": "bob"}
        )
        nobody = await conn.request("compare", base={"tag": "v1"}, head={"tag": "v1", "user_id": "carol"})
    assert reply["ok"] and reply["id"] == 7, reply
    assert reply["base"] == {"records": 20, "truncated": False, "complete": True, "examined": 20}
    assert reply["head"]["records"] == 20 and reply["max_records"] == 10_000
    assert reply["model"]["name"] == "welch_mann_whitney"
    assert [(r["test_name"], r["metric"]) for r in reply["rows"]] == [
        ("unary", "qps"),  # the regression first
        ("streaming", "perc_lat_50"),
        ("streaming", "qps"),
        ("unary", "perc_lat_50"),
    ]
    drop = row(reply, "unary", "qps")
    assert drop["status"] == "regression" and drop["direction"] == "higher"
    assert drop["change_percent"] == pytest.approx(-10, abs=1.5)
    assert drop["base"]["n"] == drop["head"]["n"] == RUN_SIZE
    assert drop["base"]["mean"] == pytest.approx(10_000, rel=0.02)
    assert drop["head"]["median"] == pytest.approx(9_000, rel=0.02)
    assert drop["base"]["stddev"] > 0
    # Ten points a side: Welch's t-test and Mann-Whitney U both ran; the larger p-value decides.
    assert drop["test"] == "welch_t+mann_whitney_u"
    assert drop["pvalue"] == max(drop["welch_pvalue"], drop["mann_whitney_pvalue"]) < 0.05
    for unchanged in ("streaming", "qps"), ("streaming", "perc_lat_50"), ("unary", "perc_lat_50"):
        assert row(reply, *unchanged)["status"] == "no_change", unchanged
    assert row(reply, "unary", "perc_lat_50")["direction"] == "lower"

    assert [(r["test_name"], r["metric"], r["status"]) for r in back["rows"]] == [
        ("unary", "perc_lat_50", "no_change"),
        ("unary", "qps", "improvement"),
    ]
    assert back["base"]["records"] == back["head"]["records"] == RUN_SIZE
    assert row(bob, "unary", "qps")["status"] == "improvement" and bob["head"]["records"] == 20
    # A selector that matches nothing is no error: no rows, and the counts say why.
    assert nobody["ok"] and nobody["rows"] == [] and nobody["head"]["records"] == 0
    assert nobody["base"]["records"] == 20


async def test_record_id_selectors_and_time_windows(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        base_ids = await store(conn, run_requests("", 10_000.0, seed=4))
        head_ids = await store(conn, run_requests("", 9_000.0, seed=5))
        by_ids = await conn.request("compare", base={"record_ids": base_ids}, head={"record_ids": head_ids})
        # Ids of the wrong test, or of no record at all, are counted as missing.
        unknown_id = head_ids[-1][:-4] + "ffff"
        narrowed = await conn.request(
            "compare",
            base={"record_ids": base_ids},
            head={"record_ids": [*head_ids, unknown_id]},
            test_name="unary",
        )
        # The same runs as time windows: base up to the first head record, head from it on.
        window = await conn.request(
            "compare",
            base={"until": timestamp_of(head_ids[0])},
            head={"since": timestamp_of(head_ids[0]), "until": "2999-01-01T00:00:00Z"},
        )
    assert by_ids["base"]["records"] == by_ids["head"]["records"] == 2 * RUN_SIZE
    assert by_ids["base"]["missing"] == 0
    assert row(by_ids, "unary", "qps")["status"] == "regression"
    assert row(by_ids, "streaming", "qps")["status"] == "no_change"
    assert narrowed["head"] == {
        "records": RUN_SIZE, "truncated": False, "complete": True, "examined": 2 * RUN_SIZE + 1,
        "missing": RUN_SIZE + 1,
    }  # fmt: skip
    assert {r["test_name"] for r in narrowed["rows"]} == {"unary"}
    assert window["rows"] == by_ids["rows"]
    assert "missing" not in window["base"]


def timestamp_of(record_id: str) -> str:
    return format_micros(record_id_micros(record_id))


async def test_a_side_past_the_bound_holds_its_newest_records(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path, max_compare_records=5) as (server, _), connect(server) as conn:
        values = [float(1000 + n) for n in range(8)]
        ids = await store(conn, [record_request(tag="a", metrics={"qps": value}) for value in values])
        await store(conn, [record_request(tag="b", metrics={"qps": 1000.0 + n}) for n in range(3)])
        reply = await conn.request("compare", base={"tag": "a"}, head={"tag": "b"})
        by_ids = await conn.request("compare", base={"record_ids": ids}, head={"tag": "b"})
    assert reply["max_records"] == 5
    assert reply["base"]["truncated"] is True and reply["base"]["records"] == 5
    assert reply["head"]["truncated"] is False and reply["head"]["records"] == 3
    [qps] = reply["rows"]
    assert qps["base"]["n"] == 5 and qps["base"]["mean"] == sum(values[-5:]) / 5
    assert by_ids["base"]["truncated"] is True and by_ids["rows"][0]["base"]["mean"] == qps["base"]["mean"]


async def test_one_record_a_side_is_insufficient_data(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await store(conn, [record_request(tag="a"), record_request(tag="b", metrics={"qps": 1.0, "extra": 2})])
        reply = await conn.request("compare", base={"tag": "a"}, head={"tag": "b"})
    [qps] = reply["rows"]  # extra is on one side only: no row
    assert qps["status"] == "insufficient_data" and qps["test"] is None and qps["pvalue"] is None
    assert qps["base"] == {"n": 1, "mean": 1000.0, "stddev": 0.0, "median": 1000.0}


GOOD_ID = "0" * 20
BAD_SELECTORS: list[tuple[dict[str, Any], str]] = [
    ({"head": {"tag": "b"}}, "base: is required"),
    ({"base": "v1", "head": {"tag": "b"}}, "base: must be an object, got string"),
    ({"base": {}, "head": {"tag": "b"}}, "base: needs exactly one of tag, record_ids, commit, or a window"),
    ({"base": {"commit": "a1b2c3"}, "head": {"tag": "b"}}, "base: commit: must be a commit sha or its first 7"),
    ({"base": {"commit": "A1B2C3D4"}, "head": {"tag": "b"}}, "base: commit: must be a commit sha"),
    ({"base": {"commit": "a1b2c3d4", "tag": "x"}, "head": {"tag": "b"}}, "got tag and commit"),
    ({"base": {"tag": "a", "record_ids": [GOOD_ID]}, "head": {"tag": "b"}}, "got tag and record_ids"),
    ({"base": {"tag": "a"}, "head": {"tag": "b", "since": "2026-01-01T00:00:00Z"}}, "head: needs exactly one"),
    ({"base": {"tag": "a", "colour": 1}, "head": {"tag": "b"}}, "base: 'colour': unknown selector field"),
    ({"base": {"record_ids": []}, "head": {"tag": "b"}}, "base: record_ids: must list 1 to"),
    ({"base": {"record_ids": "abc"}, "head": {"tag": "b"}}, "base: record_ids: must be a list of record ids"),
    ({"base": {"record_ids": [GOOD_ID, "nope"]}, "head": {"tag": "b"}}, "base: record_ids[1]: is not a perfdb"),
    ({"base": {"record_ids": [GOOD_ID, GOOD_ID]}, "head": {"tag": "b"}}, "record_ids: lists a record id twice"),
    (
        {"base": {"record_ids": [f"{n:020x}" for n in range(MAX_COMPARE_RECORD_IDS + 1)]}, "head": {"tag": "b"}},
        f"must list 1 to {MAX_COMPARE_RECORD_IDS} record ids",
    ),
    ({"base": {"since": "yesterday"}, "head": {"tag": "b"}}, "base: since: must be an RFC 3339 timestamp"),
    (
        {"base": {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "head": {"tag": "b"}},
        "base: until: must be later than since",
    ),
    ({"base": {"tag": "a", "test_name": "x"}, "head": {"tag": "b"}, "test_name": "y"}, "base: test_name: is given"),
    ({"base": {"tag": 3}, "head": {"tag": "b"}}, "base: tag: must be a string"),
    ({"base": {"tag": "a"}, "head": {"tag": "b"}, "limit": 3}, "'limit': unknown field for this op"),
]


async def test_bad_selectors_get_bad_request_and_the_connection_carries_on(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        for fields, message in BAD_SELECTORS:
            reply = await conn.request("compare", **fields)
            assert error_code(reply) == "bad_request", fields
            assert message in reply["error"]["message"], (message, reply)
        assert (await conn.request("ping"))["ok"]


async def test_compare_needs_the_read_key_when_the_server_has_one(tmp_path: Path) -> None:
    key_file = tmp_path / "read.key"
    key_file.write_text("a-read-key-of-some-length\n")
    async with perfdb_with_provider(tmp_path, read_key_file=key_file) as (server, _), connect(server) as conn:
        refused = await conn.request("compare", base={"tag": "a"}, head={"tag": "b"})
        allowed = await conn.request(
            "compare", base={"tag": "a"}, head={"tag": "b"}, read_key="a-read-key-of-some-length"
        )
    assert error_code(refused) == "forbidden"
    assert allowed["ok"] and allowed["rows"] == []


async def test_both_clients_compare(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), AsyncClient(f"127.0.0.1:{server.port}") as client:
        acks = [await client.record(**request_fields(r)) for r in run_requests("v1", 10_000.0, seed=6)]
        for request in run_requests("v2", 9_000.0, seed=7):
            await client.record(**request_fields(request))
        by_tag = await client.compare("v1", "v2", test_name="unary", user_id="alice")
        by_ids = await client.compare({"record_ids": [ack["record_id"] for ack in acks]}, {"tag": "v2"})
        with Client(f"127.0.0.1:{server.port}") as blocking:
            blocking_reply = await asyncio.to_thread(lambda: blocking.compare("v1", {"tag": "v2"}, test_name="unary"))
        with pytest.raises(PerfdbClientError) as refused:
            await client.compare({"tag": "v1", "record_ids": []}, "v2")
    assert [(r["metric"], r["status"]) for r in by_tag["rows"]] == [("qps", "regression"), ("perc_lat_50", "no_change")]
    assert blocking_reply["rows"] == by_tag["rows"]
    assert by_ids["base"]["records"] == 2 * RUN_SIZE and row(by_ids, "unary", "qps")["status"] == "regression"
    assert refused.value.code == "bad_request" and "base: needs exactly one of" in refused.value.message


def request_fields(request: dict[str, Any]) -> dict[str, Any]:
    """A record request's fields as a client's record() takes them."""
    return {key: value for key, value in request.items() if key != "op"}


async def test_a_side_past_the_examination_bound_says_incomplete(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path, max_sort_examined=6) as (server, _), connect(server) as conn:
        # Tag a's index is the smallest for the base side, and every other entry of it is another test's.
        await store(conn, [record_request(test_name=("unary", "streaming")[n % 2], tag="a") for n in range(10)])
        await store(conn, [record_request(test_name="unary", tag="b") for _ in range(10)])
        reply = await conn.request("compare", base={"tag": "a", "test_name": "unary"}, head={"tag": "a"})
    assert reply["base"] == {"records": 3, "truncated": False, "complete": False, "examined": 6}
    assert reply["head"] == {"records": 6, "truncated": False, "complete": False, "examined": 6}


JUNK: list[Any] = [None, True, 0, -1.5, "", "x", [], ["x"], {}, {"tag": None}, "0" * 20, ["0" * 20]]


async def test_junk_in_every_field_is_answered_ok_or_bad_request(tmp_path: Path) -> None:
    """Every type in every field: never an internal error, and the connection carries on."""
    requests = []
    for junk in JUNK:
        requests += [
            {"base": junk, "head": {"tag": "b"}},
            {"base": {"tag": "a"}, "head": {"tag": "b"}, "test_name": junk},
            {"base": {"tag": "a"}, "head": {"tag": "b"}, "user_id": junk},
        ]
        requests += [{"base": {field: junk}, "head": {"tag": "b"}} for field in SELECTOR_FIELDS]
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        replies = await send_burst(conn, [{"op": "compare", "id": n, **fields} for n, fields in enumerate(requests)])
        assert (await conn.request("ping"))["ok"]
    for request, reply in zip(requests, replies, strict=True):
        assert reply["ok"] or error_code(reply) == "bad_request", (request, reply)
    assert sum(reply["ok"] for reply in replies) > 0  # some junk is a valid selector ("" is a tag)


def commit_run(commit: str, real_time_ns: float, seed: int) -> list[dict[str, Any]]:
    """A CI run at one commit: RUN_SIZE results of BM_Sort (lower real_time is better), with 1 % noise."""
    noise = random.Random(seed)
    return [
        record_request(
            test_name="BM_Sort",
            metrics={"real_time": real_time_ns * noise.gauss(1, 0.01)},
            units={"real_time": "ns"},
            better={"real_time": "lower"},
            source={"commit": commit, "branch": "main"},
        )
        for _ in range(RUN_SIZE)
    ]


async def test_runs_are_selected_by_commit_or_its_first_digits(tmp_path: Path) -> None:
    base_commit, head_commit = "a1b2c3d4" + "0" * 32, "f00dfeed" + "1" * 32
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await store(conn, commit_run(base_commit, 1000.0, seed=1))
        await store(conn, commit_run(head_commit, 1100.0, seed=2))
        # A record that names the commit elsewhere than in its source is not of that commit.
        decoy = record_request(test_name="BM_Sort", metrics={"real_time": 1.0}, sys_info={"commit": head_commit})
        await store(conn, [decoy])
        reply = await conn.request("compare", base={"commit": base_commit[:7]}, head={"commit": head_commit})
        unknown = await conn.request("compare", base={"commit": "0123456789"}, head={"commit": head_commit})
    real_time = row(reply, "BM_Sort", "real_time")
    assert (reply["base"]["records"], reply["head"]["records"]) == (RUN_SIZE, RUN_SIZE)
    assert real_time["status"] == "regression" and real_time["on"] == "records"
    assert real_time["change_percent"] == pytest.approx(10, abs=1.5)
    assert unknown["ok"] and unknown["rows"] == [] and unknown["base"]["records"] == 0


async def test_samples_are_compared_when_both_sides_have_them(tmp_path: Path) -> None:
    noise = random.Random(5)

    def with_samples(tag: str, mean: float) -> dict[str, Any]:
        values = [mean * noise.gauss(1, 0.02) for _ in range(30)]
        return record_request(
            test_name="BM_Parse", tag=tag, metrics={"real_time": sum(values) / len(values)},
            units={"real_time": "ns", "rep": "ns"}, better={"real_time": "lower"},
            samples={"real_time": values, "rep": values},
        )  # fmt: skip

    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await store(conn, [with_samples("before", 500.0)])
        await store(conn, [with_samples("after", 550.0)])
        # One side without samples: its records' values are compared, one per record.
        await store(conn, [record_request(test_name="BM_Parse", tag="plain", metrics={"real_time": 500.0})])
        reply = await conn.request("compare", base={"tag": "before"}, head={"tag": "after"})
        mixed = await conn.request("compare", base={"tag": "plain"}, head={"tag": "after"})
    real_time = row(reply, "BM_Parse", "real_time")
    # One record a side, but 30 samples each: enough for the tests, and a 10 % slowdown is found.
    assert real_time["on"] == "samples" and real_time["base"]["n"] == real_time["head"]["n"] == 30
    assert real_time["status"] == "regression" and real_time["pvalue"] < 0.001
    # A samples series that is no metric of the record is compared too (its direction undeclared).
    assert row(reply, "BM_Parse", "rep")["on"] == "samples"
    plain = row(mixed, "BM_Parse", "real_time")
    assert plain["on"] == "records" and plain["base"]["n"] == 1 and plain["status"] == "insufficient_data"
