"""A record's optional units, run_time, source and samples, over a real server on a real database:
stored and read back, samples kept under their own key and returned only when asked, every bad
value refused with a coded error on a connection that keeps working."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plyvel
import pytest

from perfdb.records.schema import MAX_SAMPLE_BYTES, MAX_SAMPLES
from perfdb.storage import layout
from tests.support import connect, error_code, perfdb_with_provider, record_request

SAMPLES = {"time": [1.5e-6, 1.25e-6, 2], "cpu_time": [3.0, 4.5]}
EXTRAS: dict[str, Any] = {
    "metrics": {"time": 1.5, "qps": 1000.0, "bytes_per_op": 8, "widgets_per_op": 2.0},
    "units": {"time": "us", "qps": "ops/s", "bytes_per_op": "B/op", "widgets_per_op": "widgets/op", "cpu_time": "ns"},
    "run_time": "2026-11-30T10:15:00+01:00",
    "source": {
        "commit": "06ecda3be7692cd2ac877520cfa2cb212fb99b2c",
        "branch": "main",
        "commit_time": "2026-11-29T08:00:00Z",
        "repository": "perfdb",
    },
    "samples": SAMPLES,
}


async def test_units_run_time_source_and_samples_are_stored_and_read_back(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request(**record_request(**EXTRAS))
        assert reply["ok"], reply
        record_id = reply["record_id"]
        [plain] = (await conn.request("get_user", user_id="alice"))["records"]
        [with_samples] = (await conn.request("get_user", user_id="alice", samples=True))["records"]
        [everyone] = (await conn.request("get_all", samples=True))["records"]
        [without] = (await conn.request("get_all", samples=False))["records"]
        single = (await conn.request("get_record", record_id=record_id))["record"]
    assert plain["units"] == EXTRAS["units"]
    assert plain["run_time"] == "2026-11-30T09:15:00.000000Z"  # the canonical form of the server's timestamps
    assert plain["source"] == {**EXTRAS["source"], "commit_time": "2026-11-29T08:00:00.000000Z"}
    assert "samples" not in plain and "samples" not in without
    assert with_samples == everyone == single == {**plain, "samples": SAMPLES}


async def test_samples_live_under_their_own_key_and_go_with_the_record(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text("admin-key-for-samples")
    async with perfdb_with_provider(tmp_path, admin_key_file=key_file) as (server, _), connect(server) as conn:
        kept = await conn.request(**record_request(test_name="kept", samples={"time": [1.0]}))
        doomed = await conn.request(**record_request(test_name="doomed", samples={"time": [2.0, 3.0]}))
        none = await conn.request(**record_request(test_name="none"))
        bobs = await conn.request(**record_request(token="user-bob", samples={"time": [4.0]}))
        deleted = await conn.request("delete_record", record_id=doomed["record_id"], access_token="user-alice")
        assert deleted["ok"], deleted
        gone = await conn.request("delete_user", user_id="bob", admin_key="admin-key-for-samples")
        assert gone["ok"] and bobs["ok"], gone
        [no_samples] = (await conn.request("get_user", user_id="alice", test_name="none", samples=True))["records"]
    assert "samples" not in no_samples
    db = plyvel.DB(str(tmp_path / "db"))
    try:
        stored = {key[len(layout.SAMPLES_PREFIX) :].decode() for key, _ in db.iterator(prefix=layout.SAMPLES_PREFIX)}
        with db.iterator(prefix=layout.RECORD_PREFIX + kept["record_id"].encode()) as records:
            _, record = next(records)
    finally:
        db.close()
    assert stored == {kept["record_id"]}  # the deleted records' samples went with them; "none" has none
    assert b"samples" not in bytes(layout.unseal(record))
    assert none["ok"]


async def test_an_export_carries_samples_and_an_import_restores_them(tmp_path: Path) -> None:
    admin_key = "admin-key-for-samples"
    key_file = tmp_path / "admin.key"
    key_file.write_text(admin_key)
    async with perfdb_with_provider(tmp_path, admin_key_file=key_file) as (server, _), connect(server) as conn:
        stored = await conn.request(**record_request(**EXTRAS))
        exported = await conn.request("export", admin_key=admin_key)
        [record] = exported["records"]
        assert record["samples"] == SAMPLES
        removed = await conn.request("delete_record", record_id=stored["record_id"], admin_key=admin_key)
        assert removed["ok"], removed
        restored = await conn.request(
            "import", admin_key=admin_key, records=[record], users=exported["users"], force=True
        )
        assert restored["ok"], restored
        again = (await conn.request("get_record", record_id=stored["record_id"]))["record"]
    assert again == record


BAD_VALUES = [
    ({"units": "ns"}, "units"),
    ({"units": {"time": "fortnights"}}, "units.time"),
    ({"units": {"time": 3}}, "units.time"),
    ({"units": {"nothing": "ns"}}, "units.nothing"),
    ({"units": {"qps": "ns"}}, "units.qps"),  # a core metric's unit is fixed
    ({"units": {"perc_lat_50": "ms"}}, "units.perc_lat_50"),
    ({"run_time": "yesterday"}, "run_time"),
    ({"run_time": "2026-11-30T10:15:00"}, "run_time"),  # no offset
    ({"run_time": 1764497700}, "run_time"),
    ({"run_time": "2999-01-01T00:00:00Z"}, "run_time"),
    ({"source": "abc123"}, "source"),
    ({"source": {"sha": "abc"}}, "source.sha"),
    ({"source": {"commit": 12}}, "source.commit"),
    ({"source": {"branch": "x" * 257}}, "source.branch"),
    ({"source": {"commit": "a\nb"}}, "source.commit"),
    ({"source": {"commit_time": "last week"}}, "source.commit_time"),
    ({"samples": [1, 2, 3]}, "samples"),
    ({"samples": {"time": []}}, "samples.time"),
    ({"samples": {"time": "1,2"}}, "samples.time"),
    ({"samples": {"time": [1, "2"]}}, "samples.time[1]"),
    ({"samples": {"time": [1, True]}}, "samples.time[1]"),
    ({"samples": {"time": [1, None]}}, "samples.time[1]"),
    ({"samples": {"bad name": [1]}}, "samples.bad name"),
    ({"samples": {"time": [0.5] * (MAX_SAMPLES + 1)}}, "samples"),
    ({"samples": {"a": [0.5] * (MAX_SAMPLES // 2), "b": [0.5] * (MAX_SAMPLES // 2 + 1)}}, "samples"),
    ({"samples": {"time": [1.2345678901234567e-300] * (MAX_SAMPLE_BYTES // 20)}}, "samples"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_VALUES, ids=[field for _, field in BAD_VALUES])
async def test_a_bad_extra_is_refused_naming_its_field(tmp_path: Path, fields: dict[str, Any], field: str) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request(**record_request(metrics={"time": 1.0, "qps": 1.0, "perc_lat_50": 2.0}, **fields))
        assert error_code(reply) == "bad_request"
        assert reply["error"]["message"].replace("'", "").startswith(f"{field}:"), reply  # names are quoted
        after = await conn.request(**record_request())  # the connection and the server carry on
        assert after["ok"], after
        assert (await conn.request("stats"))["records"] == 1


async def test_non_finite_samples_are_refused(tmp_path: Path) -> None:
    """NaN and infinity cannot be sent as JSON numbers; perfdb's JSON reader refuses them as
    written by Python (NaN, Infinity), so the request never reaches the samples check."""
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await conn.send_raw(
            b'{"op":"record","access_token":"user-alice","test_name":"t","metrics":{"qps":1},'
            b'"samples":{"time":[1.0,NaN]}}\n'
        )
        reply = await conn.reply()
        assert reply["ok"] is False, reply
        assert (await conn.request(**record_request()))["ok"]


async def test_samples_is_a_boolean_in_reads(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request("get_all", samples="yes")
        assert error_code(reply) == "bad_request" and reply["error"]["message"].startswith("samples:")
        assert (await conn.request("get_all", samples=True))["ok"]
