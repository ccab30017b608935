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
