"""Every op and error code over a real socket, against a real server, LevelDB and provider."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

import orjson

from perfdb import PROTOCOL_VERSION
from perfdb.records.timestamps import parse_rfc3339
from tests.support import (
    REPO_ROOT,
    Connection,
    connect,
    error_code,
    make_config,
    page_through,
    perfdb_with_provider,
    record_request,
    running_server,
    userinfo_server,
)


async def test_hello_reports_versions_and_limits(tmp_path: Path) -> None:
    async with (
        perfdb_with_provider(tmp_path, max_line_bytes=4096, max_page_size=50) as (server, _),
        connect(server) as conn,
    ):
        reply = await conn.request("hello", id="h1")
    assert reply["id"] == "h1" and reply["ok"] is True
    assert reply["server"] == "perfdb" and reply["protocol_version"] == PROTOCOL_VERSION
    assert reply["limits"]["max_line_bytes"] == 4096
    assert reply["limits"]["max_page_size"] == 50
    assert set(reply["ops"]) >= {"hello", "ping", "record", "get_user", "get_all", "stats"}
    # The spec lists the same ops, in its op table and in its hello transcript.
    spec = (REPO_ROOT / "protocol_spec.md").read_text()
    table = spec[spec.index("## 2. Ops") : spec.index("## 3. The ops")]
    assert sorted(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)) == reply["ops"]
    transcript = re.search(r'^S: (\{"id":1,"ok":true,"server":"perfdb".*)$', spec, re.MULTILINE)
    assert transcript is not None and orjson.loads(transcript.group(1))["ops"] == reply["ops"]


async def test_ping_echoes_any_scalar_id(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        for request_id in (7, "seven", 7.5, True, None):
            assert await conn.request("ping", id=request_id) == {"id": request_id, "ok": True}
        reply = await conn.request("ping", id={"nested": 1})
        assert error_code(reply) == "bad_request" and reply["id"] is None
        assert "id" in reply["error"]["message"]


async def test_record_then_read_back_every_field(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        metrics = {"qps": 123456.5, "qps_per_core": 10288.0, "perc_lat_99_point_9": 900.25, "custom.metric-x": 3}
        reply = await conn.request(
            "record",
            id=1,
            access_token="user-alice",
            test_name="cpp_async_unary",
            tag="nightly",
            sys_info={"cpu": "Xeon", "cores": 12},
            metrics=metrics,
            client_config={"client_type": "ASYNC_CLIENT"},
            server_config={"server_type": "ASYNC_SERVER"},
            request_id="r-1",
        )
        assert reply["ok"] and reply["id"] == 1, reply
        assert reply["user_id"] == "alice" and reply["duplicate"] is False
        assert reply["timestamp"].endswith("Z") and len(reply["timestamp"].split(".")[1]) == 7
        parse_rfc3339(reply["timestamp"])
        user = await conn.request("get_user", user_id="alice")
    assert user["user"]["user_id"] == "alice" and user["user"]["name"] == "User alice"
    assert "email" not in user["user"]
    assert user["next_cursor"] is None
    [stored] = user["records"]
    assert stored == {
        "record_id": reply["record_id"],
        "user_id": "alice",
        "timestamp": reply["timestamp"],
        "test_name": "cpp_async_unary",
        "tag": "nightly",
        "sys_info": {"cpu": "Xeon", "cores": 12},
        "metrics": metrics,
        "client_config": {"client_type": "ASYNC_CLIENT"},
        "server_config": {"server_type": "ASYNC_SERVER"},
        "request_id": "r-1",
    }


async def test_optional_fields_default_to_empty(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        assert (await conn.request(**record_request()))["ok"]
        [stored] = (await conn.request("get_all"))["records"]
    assert stored["tag"] == "" and stored["sys_info"] == {}
    assert stored["client_config"] == {} and stored["server_config"] == {}
    assert "request_id" not in stored


async def test_sys_info_ips_and_config_hosts_are_removed_before_storing(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request(
            "record",
            access_token="user-alice",
            test_name="t",
            metrics={"qps": 1},
            sys_info="host eth0 inet 10.1.2.3/24 inet6 fe80::1%eth0 gw 2001:db8::7 up 16:19:53 v1.2.3",
            client_config={"server_targets": ["10.0.0.5:443"], "host": "bench-7", "nested": [{"host": "x"}], "k": 1},
            server_config={"serverTargets": ["a"], "port": 1},
        )
        assert reply["ok"], reply
        [stored] = (await conn.request("get_all"))["records"]
    info = stored["sys_info"]
    for address in ("10.1.2.3", "fe80::1", "2001:db8::7"):
        assert address not in info
    assert "16:19:53" in info and "v1.2.3" in info and "eth0" in info
    assert stored["client_config"] == {"nested": [{}], "k": 1}
    assert stored["server_config"] == {"port": 1}


async def test_bad_requests_name_the_field_and_keep_the_connection(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"op": "record", "test_name": "t", "metrics": {"qps": 1}}, "access_token"),
        (record_request(test_name=""), "test_name"),
        ({**record_request(), "test_name": 5}, "test_name"),
        (record_request(metrics={}), "metrics"),
        (record_request(metrics={"qps": "fast"}), "metrics.qps"),
        (record_request(metrics={"qps": True}), "metrics.qps"),
        (record_request(metrics=[1, 2]), "metrics"),
        (record_request(metrics={"bad name!": 1}), "metrics"),
        (record_request(tag=["x"]), "tag"),
        (record_request(sys_info=5), "sys_info"),
        (record_request(client_config="x"), "client_config"),
        (record_request(server_config=[1]), "server_config"),
        (record_request(request_id=""), "request_id"),
        (record_request(request_id="x" * 500), "request_id"),
        (record_request(unknown_field=1), "unknown_field"),
        (record_request(scenario_result={"summary": {"qps": 1}}), "metrics"),
        ({"op": "record", "access_token": "user-a", "scenario_result": []}, "scenario_result"),
        ({"op": "get_user"}, "user_id"),
        ({"op": "get_user", "user_id": "a", "limit": 0}, "limit"),
        ({"op": "get_all", "limit": "10"}, "limit"),
        ({"op": "get_all", "limit": 10**6}, "limit"),
        ({"op": "get_all", "since": "yesterday"}, "since"),
        ({"op": "get_all", "since": "2026-01-01T00:00:00"}, "since"),
        ({"op": "get_all", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
        ({"op": "get_all", "cursor": "not-a-cursor"}, "cursor"),
        ({"op": "get_all", "user_id": "a"}, "user_id"),
        ({"op": "ping", "extra": 1}, "extra"),
        ({"op": 5}, "op"),
        ({"id": 3}, "op"),
    ]
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        for request, field in cases:
            reply = await conn.request(**request) if "op" in request and isinstance(request["op"], str) else None
            if reply is None:
                await conn.send(request)
                reply = await conn.reply()
            assert error_code(reply) == "bad_request", (request, reply)
            assert reply["error"]["message"].startswith(field) or field in reply["error"]["message"], (field, reply)
            assert reply["error"]["retryable"] is False
        assert (await conn.request("ping"))["ok"]
        stats = await conn.request("stats")
    assert stats["records"] == 0
    assert stats["errors"]["bad_request"] == len(cases)


async def test_non_finite_metrics_are_bad_requests(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
            line = b'{"op":"record","access_token":"user-a","test_name":"t","metrics":{"qps":' + literal + b"}}\n"
            await conn.send_raw(line)
            reply = await conn.reply()
            assert reply["ok"] is False and reply["error"]["code"] in ("bad_request", "bad_json"), reply
        assert (await conn.request("stats"))["records"] == 0


async def test_bad_json_and_unknown_op_keep_the_connection(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await conn.send_raw(b'{"op": "ping"\n[1, 2]\n"text"\n\xff\xfe{}\n{"op":"fly","id":9}\n{"op":"ping","id":10}\n')
        replies = await conn.replies(6)
    assert [r["ok"] for r in replies] == [False, False, False, False, False, True]
    assert [error_code(r) for r in replies[:5]] == ["bad_json", "bad_request", "bad_request", "bad_json", "unknown_op"]
    assert replies[4]["id"] == 9 and "fly" in replies[4]["error"]["message"]
    assert replies[5] == {"id": 10, "ok": True}


async def test_error_messages_echo_at_most_a_little_input(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request("x" * 10_000)
        assert error_code(reply) == "unknown_op"
        assert len(reply["error"]["message"]) < 200


async def test_line_too_long_is_refused_and_never_executed(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path, max_line_bytes=1024) as (server, _), connect(server) as conn:
        hidden = orjson.dumps(record_request(test_name="hidden"))
        # An over-long line whose tail is itself a valid request: none of it may run.
        await conn.send_raw(b"x" * 2000 + b" " + hidden + b"\n" + orjson.dumps({"op": "ping", "id": 1}) + b"\n")
        first, second = await conn.replies(2)
        assert error_code(first) == "line_too_long" and first["id"] is None
        assert second == {"id": 1, "ok": True}
        # The same trickled in small pieces with no newline for a while.
        for _ in range(40):
            await conn.send_raw(b"y" * 100)
        await conn.send_raw(hidden + b"\n")
        assert error_code(await conn.reply()) == "line_too_long"
        assert (await conn.request("ping", id=2)) == {"id": 2, "ok": True}
        # Exactly at the limit is fine.
        at_limit = b'{"op":"ping","id":3' + b" " * (1024 - 20) + b"}"
        assert len(at_limit) == 1024
        await conn.send_raw(at_limit + b"\r\n" + at_limit + b" \n")
        assert await conn.reply() == {"id": 3, "ok": True}
        assert error_code(await conn.reply()) == "line_too_long"
        stats = await conn.request("stats")
    assert stats["records"] == 0 and stats["errors"]["line_too_long"] == 3


async def test_crlf_line_endings_are_accepted(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await conn.send_raw(b'{"op":"ping","id":1}\r\n\r\n{"op":"ping","id":2}\r\n')
        assert await conn.replies(2) == [{"id": 1, "ok": True}, {"id": 2, "ok": True}]


async def test_thousands_of_pipelined_requests_in_one_write_answer_in_order(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path, max_inflight=256) as (server, _), connect(server) as conn:
        requests = []
        for n in range(5000):
            if n % 3 == 0:
                requests.append(record_request(id=n, request_id=f"req-{n}", metrics={"qps": n}))
            elif n % 3 == 1:
                requests.append({"op": "ping", "id": n})
            else:
                requests.append({"op": "nope", "id": n})
        await conn.send(*requests)
        replies = await conn.replies(len(requests), timeout=60)
        stats = await conn.request("stats")
    assert [r["id"] for r in replies] == list(range(5000))
    for n, reply in enumerate(replies):
        assert reply["ok"] is (n % 3 != 2), reply
    record_ids = [r["record_id"] for r in replies[::3]]
    assert record_ids == sorted(record_ids) and len(set(record_ids)) == len(record_ids)
    assert stats["records"] == len(record_ids)
    # Group commit: many records share a batch.
    assert stats["commits"]["batches"] < len(record_ids)


async def test_requests_split_across_and_merged_within_tcp_chunks(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        stream = b"".join(orjson.dumps({"op": "ping", "id": n}) + b"\n" for n in range(50))
        for size in (1, 2, 3, 7, 64):
            for start in range(0, len(stream), size):
                conn.writer.write(stream[start : start + size])
                await conn.writer.drain()
                if start % (size * 20) == 0:
                    await asyncio.sleep(0.001)  # let some chunks arrive on their own
            assert [r["id"] for r in await conn.replies(50)] == list(range(50))


async def test_idempotent_retry_returns_the_first_record(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        first = await conn.request(**record_request(request_id="once", metrics={"qps": 1}))
        again = await conn.request(**record_request(request_id="once", metrics={"qps": 2}))
        # The same key from another user is a different request.
        other = await conn.request(**record_request(token="user-bob", request_id="once"))
        # Duplicates inside one pipelined batch are caught too.
        await conn.send(*[record_request(request_id="burst", id=n) for n in range(20)])
        burst = await conn.replies(20)
        records = (await conn.request("get_all"))["records"]
    assert first["duplicate"] is False and again["duplicate"] is True
    assert (again["record_id"], again["timestamp"], again["user_id"]) == (
        first["record_id"],
        first["timestamp"],
        first["user_id"],
    )
    assert other["duplicate"] is False and other["record_id"] != first["record_id"]
    assert sum(not r["duplicate"] for r in burst) == 1
    assert len({r["record_id"] for r in burst}) == 1
    assert len(records) == 3
    assert [r["metrics"]["qps"] for r in records if r["request_id"] == "once" and r["user_id"] == "alice"] == [1]


async def test_get_user_unknown_user_is_not_found(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        reply = await conn.request("get_user", user_id="nobody", id="q")
    assert error_code(reply) == "not_found" and reply["id"] == "q"


async def seed(conn: Connection, count: int, *, users: tuple[str, ...], tests: tuple[str, ...]) -> list[dict[str, Any]]:
    requests = [
        record_request(
            token=f"user-{users[n % len(users)]}",
            test_name=tests[n % len(tests)],
            tag=f"tag{n % 2}",
            metrics={"qps": n},
            id=n,
        )
        for n in range(count)
    ]
    await conn.send(*requests)
    replies = await conn.replies(count)
    assert all(r["ok"] for r in replies)
    return replies


async def test_paging_get_user_with_filters(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        acks = await seed(conn, 250, users=("alice", "bob"), tests=("unary", "streaming", "ping_pong"))
        pages = await page_through(conn, "get_user", user_id="alice", limit=7)
        filtered = await page_through(conn, "get_user", user_id="alice", test_name="streaming", tag="tag0", limit=4)
    alice = [a for a in acks if a["user_id"] == "alice"]
    got = [r for p in pages for r in p["records"]]
    # Record ids follow commit order, which need not be request order.
    assert [r["record_id"] for r in got] == sorted(a["record_id"] for a in alice)
    assert all(len(p["records"]) <= 7 for p in pages) and len(pages) >= len(alice) // 7
    assert all(p["user"]["user_id"] == "alice" for p in pages)
    expected = [r["record_id"] for r in got if r["test_name"] == "streaming" and r["tag"] == "tag0"]
    assert [r["record_id"] for p in filtered for r in p["records"]] == expected and expected


async def test_paging_get_all_with_filters_and_time_range(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        first = await seed(conn, 60, users=("alice", "bob", "carol"), tests=("unary", "streaming"))
        await asyncio.sleep(0.01)
        middle = await seed(conn, 60, users=("alice", "bob", "carol"), tests=("unary", "streaming"))
        await asyncio.sleep(0.01)
        await seed(conn, 60, users=("alice", "bob", "carol"), tests=("unary", "streaming"))
        everything = await page_through(conn, "get_all", limit=13)
        window = await page_through(
            conn,
            "get_all",
            since=min(m["timestamp"] for m in middle),
            until=_just_after(max(m["timestamp"] for m in middle)),
            limit=9,
        )
        unary_bob = await page_through(conn, "get_all", test_name="unary", limit=5)
    records = [r for p in everything for r in p["records"]]
    assert len(records) == 180 and [r["record_id"] for r in records] == sorted(r["record_id"] for r in records)
    assert {r["user_id"] for r in records} == {"alice", "bob", "carol"}
    for page in everything:
        assert set(page["users"]) == {r["user_id"] for r in page["records"]}
        assert all("email" not in profile for profile in page["users"].values())
    assert [r["record_id"] for p in window for r in p["records"]] == sorted(m["record_id"] for m in middle)
    assert max(f["record_id"] for f in first) < min(m["record_id"] for m in middle)
    unary = [r for p in unary_bob for r in p["records"]]
    assert len(unary) == 90 and all(r["test_name"] == "unary" for r in unary)


def _just_after(timestamp: str) -> str:
    from perfdb.records.timestamps import format_micros

    return format_micros(parse_rfc3339(timestamp) + 1)


async def test_expose_emails_puts_email_in_public_profiles(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path, expose_emails=True) as (server, _), connect(server) as conn:
        assert (await conn.request(**record_request()))["ok"]
        user = await conn.request("get_user", user_id="alice")
        everyone = await conn.request("get_all")
    assert user["user"]["email"] == "alice@example.com"
    assert everyone["users"]["alice"]["email"] == "alice@example.com"


async def test_data_survives_a_clean_restart(tmp_path: Path) -> None:
    async with userinfo_server() as provider:
        config = make_config(tmp_path / "db", provider.url)
        async with running_server(config) as server, connect(server) as conn:
            acks = await seed(conn, 30, users=("alice", "bob"), tests=("unary",))
            dup_key = await conn.request(**record_request(request_id="k"))
        async with running_server(config) as server, connect(server) as conn:
            stats = await conn.request("stats")
            records = [r for p in await page_through(conn, "get_all", limit=7) for r in p["records"]]
            retry = await conn.request(**record_request(request_id="k"))
            fresh = await conn.request(**record_request())
    assert stats["records"] == 31 and stats["users"] == 2
    assert [r["record_id"] for r in records] == sorted([a["record_id"] for a in acks] + [dup_key["record_id"]])
    assert retry["duplicate"] is True and retry["record_id"] == dup_key["record_id"]
    # Ids keep increasing across restarts.
    assert fresh["record_id"] > dup_key["record_id"]


async def test_stats_counts_everything(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn, connect(server) as other:
        await seed(conn, 10, users=("alice", "bob"), tests=("t",))
        await conn.request("nope")
        await conn.request("get_all", limit=0)
        await other.request("ping")
        stats = await conn.request("stats")
    assert stats["records"] == 10 and stats["users"] == 2
    assert stats["connections"]["open"] == 2 and stats["connections"]["total"] >= 2
    assert stats["requests"]["record"] == 10 and stats["requests"]["get_all"] == 1
    assert stats["errors"] == {"unknown_op": 1, "bad_request": 1}
    assert stats["commits"]["records"] == 10 and 1 <= stats["commits"]["batches"] <= 10
    assert math.isclose(stats["commits"]["mean_batch_size"], 10 / stats["commits"]["batches"], rel_tol=0.01)
    assert stats["token_cache"]["upstream_requests"] == 2
    # Each of the 10 records looked its token up once: the first of each user missed, and the
    # rest hit or (while that first lookup was in flight) missed and shared it.
    cache = stats["token_cache"]
    assert cache["hits"] + cache["misses"] == 10
    assert cache["misses"] >= 2 and cache["entries"] == 2
    assert stats["uptime_seconds"] >= 0


async def test_duplicate_keys_are_refused_wherever_they_are(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, _), connect(server) as conn:
        await conn.send_raw(
            b'{"op":"ping","op":"ping"}\n'
            b'{"op": "record", "access_token": "user-a", "test_name": "t", "test_name": "u", "metrics": {"qps": 1}}\n'
            b'{"op":"record","access_token":"user-a","test_name":"t","metrics":{"qps":1,"qps":2}}\n'
            b'{"op": "ping", "id": 4}\n'
        )
        replies = await conn.replies(4)
        stats = await conn.request("stats")
    assert [error_code(r) for r in replies[:3]] == ["bad_json"] * 3
    assert "repeats a key" in replies[0]["error"]["message"]
    assert replies[3] == {"id": 4, "ok": True}  # spaced-out JSON without duplicates is fine
    assert stats["records"] == 0
