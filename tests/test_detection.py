"""Regression detection in the server: verdicts in record acks, baselines, exclusion, alerts and their ops,
against a real server on loopback with a real LevelDB and seeded noisy data."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros
from perfdb.server import PerfdbServer
from perfdb.storage import layout
from tests.support import (
    Connection,
    Spawn,
    connect,
    error_code,
    perfdb_with_provider,
    record_request,
    token_hash,
)


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
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
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
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        await send_values(connection, "perc_lat_99", noisy(rng, 500.0, 30))
        ack = (await send_values(connection, "perc_lat_99", [600.0]))[0]
        assert verdict(ack, "perc_lat_99")["status"] == "regression"


async def test_pure_noise_gives_at_most_two_regressions(tmp_path: Path) -> None:
    rng = random.Random(3)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        acks = await send_values(connection, "qps", noisy(rng, 1000.0, 200))
        statuses = [verdict(ack, "qps")["status"] for ack in acks]
        assert statuses.count("regression") <= 2
        assert statuses[:5] == ["insufficient_data"] * 5


async def test_custom_metric_direction_and_duplicates(tmp_path: Path) -> None:
    rng = random.Random(4)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
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
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
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
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        await send_values(connection, "qps", noisy(rng, 1000.0, 40))
        live = [verdict(ack, "qps") for ack in await send_values(connection, "qps", probes, tag="a", baseline_tag="")]
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        rebuilt = [
            verdict(ack, "qps") for ack in await send_values(connection, "qps", probes, tag="b", baseline_tag="")
        ]
    assert [item["status"] for item in live] == ["no_change", "regression", "no_change"]
    assert rebuilt == live


async def test_exclude_record_takes_a_value_out_of_the_baseline(tmp_path: Path) -> None:
    rng = random.Random(7)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
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
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
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


ADMIN_KEY = "detection-tests-admin-key-0123456789"


def admin_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.key"
    path.write_text(ADMIN_KEY + "\n")
    return path


async def wait_for_alerts(
    server: PerfdbServer, connection: Connection, count: int, deadline: float = 30.0, **filters: Any
) -> list[dict[str, Any]]:
    """The `regressions` listing once it holds `count` alerts, re-read after each analysis pass."""
    monitor = server.alert_monitor
    assert monitor is not None

    async def listed() -> list[dict[str, Any]]:
        reply = await connection.request("regressions", **filters)
        assert reply["ok"], reply
        alerts: list[dict[str, Any]] = reply["alerts"]
        return alerts

    async def wait() -> list[dict[str, Any]]:
        while True:
            seen = monitor.passes
            alerts = await listed()
            if len(alerts) >= count:
                return alerts
            await monitor.wait_for_pass(seen)

    return await asyncio.wait_for(wait(), deadline)


async def send_shift(connection: Connection, rng: random.Random, **fields: Any) -> list[dict[str, Any]]:
    """40 records of qps around 1000, then 30 around 850: a sustained 15 % drop at the 41st."""
    return await send_values(connection, "qps", noisy(rng, 1000.0, 40) + noisy(rng, 850.0, 30), **fields)


async def test_a_sustained_shift_becomes_one_alert_at_the_right_record(tmp_path: Path) -> None:
    rng = random.Random(8)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        acks = await send_shift(connection, rng)
        alerts = await wait_for_alerts(server, connection, 1)
        assert len(alerts) == 1
        alert = alerts[0]
        assert alert["record_id"] == acks[40]["record_id"]
        assert (alert["user_id"], alert["test_name"], alert["tag"], alert["metric"]) == ("alice", "unary", "", "qps")
        assert alert["state"] == "open" and alert["change_percent"] < -10 and alert["pvalue"] < 0.001
        assert alert["before_mean"] > alert["after_mean"]
        # More records of the same level: analysed again, not alerted again.
        await send_values(connection, "qps", noisy(rng, 850.0, 10))
        monitor = server.alert_monitor
        assert monitor is not None
        await asyncio.wait_for(monitor.wait_for_pass(monitor.passes), 30)
        assert len((await connection.request("regressions"))["alerts"]) == 1
        assert (await connection.request("regressions", state="acknowledged"))["alerts"] == []
        assert (await connection.request("regressions", user_id="bob"))["alerts"] == []
        assert len((await connection.request("regressions", test_name="unary", tag=""))["alerts"]) == 1


async def test_alert_states_owner_foreign_admin_and_restart(tmp_path: Path) -> None:
    rng = random.Random(9)
    overrides = {"admin_key_file": admin_key_file(tmp_path)}
    async with (
        perfdb_with_provider(tmp_path, regression_detection=True, **overrides) as (server, _),
        connect(server) as connection,
    ):
        await send_shift(connection, rng)
        (alert,) = await wait_for_alerts(server, connection, 1)
        alert_id = alert["alert_id"]
        foreign = await connection.request("update_alert", alert_id=alert_id, state="resolved", access_token="user-bob")
        assert error_code(foreign) == "forbidden"
        assert (await connection.request("regressions"))["alerts"][0]["state"] == "open"
        owned = await connection.request(
            "update_alert", alert_id=alert_id, state="acknowledged", note="looking", access_token="user-alice"
        )
        assert owned["ok"] and owned["alert"]["state"] == "acknowledged", owned
        assert owned["alert"]["updated_by"] == "alice" and owned["alert"]["note"] == "looking"
        unknown = await connection.request("update_alert", alert_id="0" * 20, state="resolved", admin_key=ADMIN_KEY)
        assert error_code(unknown) == "not_found"
        bad_state = await connection.request("update_alert", alert_id=alert_id, state="gone", admin_key=ADMIN_KEY)
        assert error_code(bad_state) == "bad_request"
        wrong_admin = await connection.request("update_alert", alert_id=alert_id, state="resolved", admin_key="x" * 20)
        assert error_code(wrong_admin) == "forbidden"
        by_admin = await connection.request("update_alert", alert_id=alert_id, state="resolved", admin_key=ADMIN_KEY)
        assert by_admin["alert"]["updated_by"] == "admin"
        assert [change["state"] for change in by_admin["alert"]["history"]] == ["acknowledged", "resolved"]
    async with (
        perfdb_with_provider(tmp_path, regression_detection=True, **overrides) as (server, _),
        connect(server) as connection,
    ):
        (kept,) = (await connection.request("regressions"))["alerts"]
        assert kept["alert_id"] == alert_id and kept["state"] == "resolved"
        assert server.store.alerts.counts["resolved"] == 1 and server.store.alerts.counts["open"] == 0
        assert (await connection.request("get_record", record_id=kept["record_id"]))["ok"]


async def test_an_expected_change_restarts_the_verdict_window(tmp_path: Path) -> None:
    rng = random.Random(10)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        await send_shift(connection, rng)
        (alert,) = await wait_for_alerts(server, connection, 1)
        probe = {"tag": "probe", "baseline_tag": ""}
        # The window holds 30 records at the new level already; a probe at the old level is an improvement.
        assert verdict((await send_values(connection, "qps", [1000.0], **probe))[0], "qps")["baseline"]["n"] == 30
        expected = await connection.request(
            "update_alert", alert_id=alert["alert_id"], state="expected", access_token="user-alice"
        )
        assert expected["ok"], expected
        judged = verdict((await send_values(connection, "qps", [850.0], **probe))[0], "qps")
        assert judged["baseline"]["n"] == 30 and judged["status"] == "no_change"
        assert judged["baseline"]["max"] < 900  # only records from the change on
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        again = verdict((await send_values(connection, "qps", [850.0], **probe))[0], "qps")
        assert again["baseline"] == judged["baseline"]


async def test_regressions_pages_newest_first(tmp_path: Path) -> None:
    rng = random.Random(11)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        for tag in ("a", "b", "c"):
            await send_shift(connection, rng, tag=tag)
        alerts = await wait_for_alerts(server, connection, 3)
        ids = [alert["alert_id"] for alert in alerts]
        assert ids == sorted(ids, reverse=True)
        first = await connection.request("regressions", limit=2)
        assert [alert["alert_id"] for alert in first["alerts"]] == ids[:2] and first["next_cursor"]
        second = await connection.request("regressions", limit=2, cursor=first["next_cursor"])
        assert [alert["alert_id"] for alert in second["alerts"]] == ids[2:] and second["next_cursor"] is None
        assert error_code(await connection.request("regressions", state="closed")) == "bad_request"
        assert error_code(await connection.request("regressions", cursor="zz")) == "bad_request"
        late = await connection.request("regressions", since="2999-01-01T00:00:00Z")
        assert late["alerts"] == []


async def test_forget_records_resolves_their_alerts_and_leaves_the_windows(tmp_path: Path) -> None:
    rng = random.Random(12)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        acks = await send_shift(connection, rng)
        await wait_for_alerts(server, connection, 1)
        await server.store.forget_records("alice", [ack["record_id"] for ack in acks[40:]])
        (resolved,) = (await connection.request("regressions"))["alerts"]
        assert resolved["state"] == "resolved"
        probe = verdict((await send_values(connection, "qps", [1000.0], tag="p", baseline_tag=""))[0], "qps")
        assert probe["baseline"]["min"] > 900  # the 850s left the window


async def test_deleting_records_resolves_their_alerts_and_empties_the_windows(tmp_path: Path) -> None:
    rng = random.Random(18)
    overrides = {"admin_key_file": admin_key_file(tmp_path)}
    async with (
        perfdb_with_provider(tmp_path, regression_detection=True, **overrides) as (server, _),
        connect(server) as connection,
    ):
        acks = await send_shift(connection, rng)
        (alert,) = await wait_for_alerts(server, connection, 1)
        assert alert["record_id"] == acks[40]["record_id"]
        deleted = await connection.request("delete_record", record_id=alert["record_id"], access_token="user-alice")
        assert deleted["ok"] and deleted["deleted"] is True, deleted
        (resolved,) = (await connection.request("regressions"))["alerts"]
        assert resolved["state"] == "resolved" and resolved["updated_by"] == "admin"
        window = [
            point.record_id
            for key in server.store.detector.windows
            for point in server.store.detector.windows.points(key)
        ]
        assert window and alert["record_id"] not in window
        # A deleted user takes every window of theirs along.
        gone = await connection.request("delete_user", user_id="alice", admin_key=ADMIN_KEY)
        assert gone["ok"] and gone["records"] == len(acks) - 1, gone
        assert not [key for key in server.store.detector.windows if key.user_id == "alice"]


async def test_detection_is_off_unless_asked_for_and_exclusion_still_works(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as connection:
        hello = await connection.request("hello")
        assert hello["features"] == {"regression_detection": False}
        assert {"get_record", "exclude_record", "regressions", "update_alert"} <= set(hello["ops"])
        (ack,) = await send_values(connection, "qps", [1000.0])
        assert "verdicts" not in ack and server.alert_monitor is None
        excluded = await connection.request("exclude_record", record_id=ack["record_id"], access_token="user-alice")
        assert excluded["ok"] and excluded["excluded"] is True, excluded
        assert (await connection.request("get_record", record_id=ack["record_id"]))["record"]["excluded"] is True
        assert (await connection.request("regressions"))["alerts"] == []
        assert len(server.store.detector.windows) == 0


class WebhookReceiver:
    """An aiohttp endpoint on loopback that answers alert POSTs: held until `release` is set, then with the
    statuses in `statuses` in turn (200 once they run out)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()  # the first POST came in
        self.release = asyncio.Event()
        self.accepted = asyncio.Event()  # a POST was answered 200
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.arrived.set()
        await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.accepted.set()
        return web.Response(status=status)

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.runner is not None
        await self.runner.cleanup()


async def test_a_slow_then_failing_webhook_never_delays_ingest_and_gets_the_alert(tmp_path: Path) -> None:
    rng = random.Random(13)
    async with (
        WebhookReceiver([500, 503]) as receiver,
        perfdb_with_provider(tmp_path, regression_detection=True, alert_webhook=receiver.url) as (server, _),
        connect(server) as connection,
    ):
        await send_shift(connection, rng)
        await asyncio.wait_for(receiver.arrived.wait(), 30)
        # The endpoint holds the alert's POST: records are still stored and judged meanwhile.
        acks = await send_values(connection, "qps", noisy(rng, 850.0, 200), tag="during")
        assert all(ack["verdicts"] for ack in acks)
        receiver.release.set()
        await asyncio.wait_for(receiver.accepted.wait(), 30)
        (alert,) = (await connection.request("regressions", tag=""))["alerts"]
        assert [body["alert_id"] for body in receiver.bodies] == [alert["alert_id"]] * 3
        assert receiver.bodies[-1] == alert
        assert server.webhook is not None and server.webhook.delivered == 1


async def test_a_killed_server_leaves_no_alert_pointing_at_an_unstored_record(tmp_path: Path, spawn: Spawn) -> None:
    token = "detection-bot-token-0123456789"
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_bytes(orjson.dumps({"tokens": [{"sha256": token_hash(token), "user_id": "bot", "name": "Bot"}]}))
    server = spawn(
        "--address=127.0.0.1:0",
        f"--database={tmp_path / 'db'}",
        f"--tokens-file={tokens_file}",
        "--no-sync",
        "--regression-detection",
    )
    port = await asyncio.to_thread(server.wait_listening)
    rng = random.Random(14)
    shifts = [
        record_request(token, tag=f"t{tag}", metrics={"qps": value})
        for tag in range(6)
        for value in noisy(rng, 1000.0, 40) + noisy(rng, 850.0, 30)
    ]
    connection = await Connection.open(port)
    await connection.send(*shifts)
    # Killed once the first alerts can exist, with records of later shifts still on their way.
    first = await connection.replies(3 * 70)
    assert all(reply["ok"] for reply in first)
    await asyncio.to_thread(server.wait_for_log, re.compile(r"alert [0-9a-f]{20}: static:bot/"), timeout=30)
    assert server.kill() == -signal.SIGKILL
    await connection.close()
    server.restart()
    port = await asyncio.to_thread(server.wait_listening)
    connection = await Connection.open(port)
    try:
        alerts = (await connection.request("regressions", limit=1000))["alerts"]
        assert alerts
        for alert in alerts:
            stored = await connection.request("get_record", record_id=alert["record_id"])
            assert stored["ok"] and stored["record"]["tag"] == alert["tag"], (alert, stored)
    finally:
        await connection.close()


async def test_the_series_op_marks_the_change_points(tmp_path: Path) -> None:
    rng = random.Random(15)
    async with perfdb_with_provider(tmp_path, regression_detection=True) as (server, _), connect(server) as connection:
        acks = await send_shift(connection, rng)
        (alert,) = await wait_for_alerts(server, connection, 1)
        series = await connection.request("series", metric=["qps", "perc_lat_50"], test_name="unary", user_id="alice")
        (mark,) = series["series"]["qps"]["marks"]
        assert mark["alert_id"] == alert["alert_id"] and mark["record_id"] == acks[40]["record_id"]
        assert mark["record_timestamp"] == acks[40]["timestamp"] and mark["state"] == "open"
        assert series["series"]["perc_lat_50"]["marks"] == []
        other_tag = await connection.request("series", metric="qps", test_name="unary", tag="nightly")
        assert other_tag["series"]["qps"]["marks"] == []
        before = await connection.request("series", metric="qps", test_name="unary", until=acks[40]["timestamp"])
        assert before["series"]["qps"]["marks"] == []


async def test_the_alerts_gauge_counts_alerts_by_state(tmp_path: Path) -> None:
    rng = random.Random(16)
    async with (
        perfdb_with_provider(tmp_path, regression_detection=True, metrics_address="127.0.0.1:0") as (server, _),
        connect(server) as connection,
        aiohttp.ClientSession() as http,
    ):
        assert server.operator_endpoints is not None
        url = f"http://{server.operator_endpoints.address}/metrics"
        await send_shift(connection, rng)
        (alert,) = await wait_for_alerts(server, connection, 1)
        await connection.request(
            "update_alert", alert_id=alert["alert_id"], state="expected", access_token="user-alice"
        )
        async with http.get(url) as response:
            text = await response.text()
    gauges = dict(re.findall(r'^perfdb_alerts\{state="(\w+)"\} (\S+)$', text, re.MULTILINE))
    assert gauges == {"open": "0.0", "acknowledged": "0.0", "expected": "1.0", "resolved": "0.0"}


def test_a_bad_threshold_file_stops_the_start_in_one_line(tmp_path: Path, spawn: Spawn) -> None:
    config = tmp_path / "thresholds.toml"
    config.write_text('[[rule]]\ntest = "streaming_*"\nsigmas = -1\n')
    server = spawn("--address=127.0.0.1:0", f"--database={tmp_path / 'db'}", f"--regression-config={config}")
    code, stderr = server.wait_exit(timeout=60)
    assert code == 1 and "Traceback" not in stderr, stderr
    (line,) = stderr.splitlines()
    assert f"{config}: rule 1: sigmas must be a finite number >= 0, not -1.0" in line, line
    help_text = subprocess.run(
        [sys.executable, "run_perf_db_server.py", "--help"], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout  # fmt: skip
    for option in ("--regression-window", "--regression-sigmas", "--regression-min-change", "--regression-config",
                   "--regression-max-series", "--regression-detection", "--alert-webhook"):  # fmt: skip
        assert option in help_text, option


async def test_imported_records_join_the_windows_without_verdicts(tmp_path: Path) -> None:
    rng = random.Random(17)
    start = now_micros() - 3_600_000_000
    records = [
        {"record_id": make_record_id(start + index, 0), "user_id": "alice",
         "timestamp": format_micros(start + index), "test_name": "unary", "metrics": {"qps": value}}
        for index, value in enumerate(noisy(rng, 1000.0, 12))
    ]  # fmt: skip
    overrides = {"admin_key_file": admin_key_file(tmp_path)}
    async with (
        perfdb_with_provider(tmp_path, regression_detection=True, **overrides) as (server, _),
        connect(server) as connection,
    ):
        imported = await connection.request("import", admin_key=ADMIN_KEY, records=records, users={"alice": {}})
        assert imported["ok"] and imported["imported"] == 12 and "verdicts" not in imported, imported
        ack = (await send_values(connection, "qps", [850.0]))[0]
        assert verdict(ack, "qps")["status"] == "regression" and verdict(ack, "qps")["baseline"]["n"] == 12


def test_every_key_prefix_is_distinct() -> None:
    """The alerts' prefix must not be the audit log's (a:) nor any other: a scan of one would read the other."""
    prefixes = [value for name, value in vars(layout).items() if name.endswith("_PREFIX") and isinstance(value, bytes)]
    assert layout.ALERT_PREFIX not in (layout.AUDIT_PREFIX, layout.EXCLUSION_PREFIX, layout.ALERTED_POINT_PREFIX)
    prefixes.append(layout.SCHEMA_KEY[:2])  # m: the meta keys
    assert len(prefixes) >= 13
    for one in prefixes:
        for other in prefixes:
            assert one is other or not other.startswith(one), (one, other)
