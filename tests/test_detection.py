"""Regression detection in the server: verdicts in record acks, baselines, exclusion, alerts and their ops,
against a real server on loopback with a real LevelDB and seeded noisy data."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tests.support import Connection, connect, error_code, perfdb_with_provider, record_request


def noisy(rng: random.Random, level: float, count: int, noise: float = 0.01) -> list[float]:
    return [level * (1 + rng.gauss(0, noise)) for _ in range(count)]


async def send_values(connection: Connection, metric: str, values: list[float], **fields: Any) -> list[dict[str, Any]]:
    """Record one value each, in order; the acks."""
    await connection.send(*(record_request(metrics={metric: value}, **fields) for value in values))
    replies = await connection.replies(len(values))
    assert all(reply["ok"] for reply in replies), [reply for reply in replies if not reply["ok"]][:1]
    return replies


def verdict(ack: dict[str, Any], metric: str) -> dict[str, Any]:
    found: dict[str, Any] = next(item for item in ack["verdicts"] if item["metric"] == metric)
    return found


async def test_a_drop_in_qps_is_a_regression_and_a_rise_an_improvement(tmp_path: Path) -> None:
    rng = random.Random(1)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        history = await send_values(connection, "qps", noisy(rng, 1000.0, 30))
        assert verdict(history[0], "qps")["status"] == "insufficient_data"
        dropped = (await send_values(connection, "qps", [850.0]))[0]
        found = verdict(dropped, "qps")
        assert found["status"] == "regression", found
        assert found["direction"] == "higher" and found["baseline"]["n"] == 30
        assert found["change_percent"] < -10
        risen = (await send_values(connection, "qps", [1150.0], tag="other"))[0]
        assert verdict(risen, "qps")["status"] == "insufficient_data"  # a new series
        risen = (await send_values(connection, "qps", [1150.0]))[0]
        assert verdict(risen, "qps")["status"] == "improvement"


async def test_a_rise_in_tail_latency_is_a_regression(tmp_path: Path) -> None:
    rng = random.Random(2)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        await send_values(connection, "perc_lat_99", noisy(rng, 500.0, 30))
        ack = (await send_values(connection, "perc_lat_99", [600.0]))[0]
        assert verdict(ack, "perc_lat_99")["status"] == "regression"


async def test_pure_noise_gives_at_most_two_regressions(tmp_path: Path) -> None:
    rng = random.Random(3)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        acks = await send_values(connection, "qps", noisy(rng, 1000.0, 200))
        statuses = [verdict(ack, "qps")["status"] for ack in acks]
        assert statuses.count("regression") <= 2
        assert statuses[:5] == ["insufficient_data"] * 5


async def test_custom_metric_direction_and_duplicates(tmp_path: Path) -> None:
    rng = random.Random(4)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        await send_values(connection, "frames", noisy(rng, 60.0, 30), better={"frames": "higher"})
        ack = (await send_values(connection, "frames", [40.0], better={"frames": "higher"}, request_id="r1"))[0]
        assert verdict(ack, "frames")["status"] == "regression"
        undeclared = (await send_values(connection, "frames", [40.0]))[0]
        assert verdict(undeclared, "frames")["status"] == "no_change"
        assert verdict(undeclared, "frames")["direction"] is None
        resent = (await send_values(connection, "frames", [40.0], better={"frames": "higher"}, request_id="r1"))[0]
        assert resent["duplicate"] is True and resent["verdicts"] == []
        await connection.send(record_request(metrics={"frames": 1.0}, better={"frames": "sideways"}))
        assert error_code(await connection.reply()) == "bad_request"
        await connection.send(record_request(metrics={"frames": 1.0}, better={"fps": "higher"}))
        assert error_code(await connection.reply()) == "bad_request"
        assert (await connection.request("ping"))["ok"]


async def test_baseline_tag_judges_against_the_other_tag_without_joining_it(tmp_path: Path) -> None:
    rng = random.Random(5)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        await send_values(connection, "qps", noisy(rng, 1000.0, 30), tag="main")
        ack = (await send_values(connection, "qps", [850.0], tag="pr-7", baseline_tag="main"))[0]
        assert verdict(ack, "qps")["status"] == "regression"
        assert verdict(ack, "qps")["baseline"]["n"] == 30
        # The record joined pr-7's series, not main's.
        own = (await send_values(connection, "qps", [850.0], tag="pr-7"))[0]
        assert verdict(own, "qps")["baseline"]["n"] == 1
        main = (await send_values(connection, "qps", [1000.0], tag="main"))[0]
        assert verdict(main, "qps")["baseline"]["n"] == 30
        assert verdict(main, "qps")["baseline"]["min"] > 900


async def test_windows_rebuilt_at_restart_give_the_same_verdicts(tmp_path: Path) -> None:
    rng = random.Random(6)
    probes = [960.0, 850.0, 1040.0]
    # Each probe is judged against the default tag's window but joins a series of its own, so the live server
    # and the restarted one judge it against the same window, the rebuilt one after the restart.
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        await send_values(connection, "qps", noisy(rng, 1000.0, 40))
        live = [verdict(ack, "qps") for ack in await send_values(connection, "qps", probes, tag="a", baseline_tag="")]
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        rebuilt = [
            verdict(ack, "qps") for ack in await send_values(connection, "qps", probes, tag="b", baseline_tag="")
        ]
    assert [item["status"] for item in live] == ["no_change", "regression", "no_change"]
    assert rebuilt == live


async def test_exclude_record_takes_a_value_out_of_the_baseline(tmp_path: Path) -> None:
    rng = random.Random(7)
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        await send_values(connection, "qps", noisy(rng, 1000.0, 29))
        outlier = (await send_values(connection, "qps", [700.0]))[0]
        probe = {"tag": "probe", "baseline_tag": ""}
        assert verdict((await send_values(connection, "qps", [900.0], **probe))[0], "qps")["status"] == "no_change"

        foreign = await connection.request(
            "exclude_record", record_id=outlier["record_id"], access_token="user-mallory", note="not mine"
        )
        assert error_code(foreign) == "forbidden"
        excluded = await connection.request(
            "exclude_record", record_id=outlier["record_id"], access_token="user-alice", note="noisy neighbour"
        )
        assert excluded["ok"] and excluded["excluded"] is True, excluded
        after = verdict((await send_values(connection, "qps", [900.0], **probe))[0], "qps")
        assert after["status"] == "regression" and after["baseline"]["n"] == 29, after

        shown = await connection.request("get_record", record_id=outlier["record_id"])
        assert shown["record"]["excluded"] is True
        assert shown["record"]["exclusion"]["note"] == "noisy neighbour"
        assert shown["record"]["exclusion"]["excluded_by"] == "alice"
        page = await connection.request("get_user", user_id="alice", tag="")
        flagged = [record for record in page["records"] if record.get("excluded")]
        assert [record["record_id"] for record in flagged] == [outlier["record_id"]]

        restored = await connection.request("exclude_record", record_id=outlier["record_id"], excluded=False,
                                            access_token="user-alice")  # fmt: skip
        assert restored["excluded"] is False
        again = verdict((await send_values(connection, "qps", [900.0], **probe))[0], "qps")
        assert again["status"] == "no_change"
        assert "excluded" not in (await connection.request("get_record", record_id=outlier["record_id"]))["record"]


async def test_get_record_and_exclude_record_errors(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        unknown = "0" * 20
        assert error_code(await connection.request("get_record", record_id=unknown)) == "not_found"
        assert error_code(await connection.request("get_record", record_id="nope")) == "bad_request"
        assert error_code(await connection.request("get_record")) == "bad_request"
        missing = await connection.request("exclude_record", record_id=unknown, access_token="user-alice")
        assert error_code(missing) == "not_found"
        no_auth = await connection.request("exclude_record", record_id=unknown)
        assert error_code(no_auth) == "bad_request"
        wrong_admin = await connection.request("exclude_record", record_id=unknown, admin_key="x" * 20)
        assert error_code(wrong_admin) == "forbidden"
        assert (await connection.request("ping"))["ok"]
