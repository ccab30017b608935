"""Token resolution end to end: real sockets, a real perfdb server and a real userinfo server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import secrets
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import plyvel
import pytest
from aiohttp import web

from perfdb.auth import tokens
from perfdb.auth.tokens import STATIC_USER_PREFIX, TokenResolver, load_static_tokens, token_digest
from perfdb.config import GOOGLE_USERINFO_URL, ConfigError, check_userinfo_url, config_from_args
from perfdb.observability.logformat import log_formatter
from perfdb.protocol.errors import PerfdbError
from perfdb.records.profiles import Profile
from perfdb.server import PerfdbServer, StartupError
from perfdb.storage import layout
from tests.support import (
    Connection,
    UserinfoAnswer,
    UserinfoServer,
    closed_port_url,
    connect,
    error_code,
    make_config,
    perfdb_with_provider,
    record_request,
    running_server,
    token_hash,
)

# Generous bound on how long past auth_timeout a failed lookup may take to be answered.
TIMEOUT_MARGIN = 2.0
# Longer than any test waits: a provider that "hangs" answers only after this.
HANG_SECONDS = 10.0


def answer(document: Any, status: int = 200, delay: float = 0.0) -> UserinfoAnswer:
    return UserinfoAnswer(status=status, body=orjson.dumps(document), delay=delay)


class PiecewiseUserinfoServer(UserinfoServer):
    """The loopback userinfo server, plus two things the tests need: handlers are cancelled when
    the client hangs up (so a hung answer does not hold up the test's cleanup), and an answer
    can be streamed in pieces, as a provider using chunked transfer encoding may send it."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: dict[str, list[bytes]] = {}
        self.asked = asyncio.Event()  # set once any request has arrived

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        self.asked.set()
        pieces = self.pieces.get(token)
        if pieces is None:
            return await self._userinfo(request)
        self.urls_seen.append(str(request.rel_url))
        self.calls.append(token)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for piece in pieces:
                await response.write(piece)
                await asyncio.sleep(0.05)
            await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/userinfo", self._answer)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/userinfo"


@contextlib.asynccontextmanager
async def perfdb_with_piecewise_provider(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[PerfdbServer, PiecewiseUserinfoServer]]:
    provider = PiecewiseUserinfoServer()
    await provider.start()
    try:
        async with running_server(make_config(tmp_path / "db", provider.url, **overrides)) as server:
            yield server, provider
    finally:
        await provider.close()


async def stored_count(connection: Connection) -> tuple[int, int]:
    """(records, users) as the stats op reports them."""
    stats = await connection.request("stats")
    assert stats["ok"], stats
    return stats["records"], stats["users"]


async def all_records(connection: Connection) -> list[dict[str, Any]]:
    page = await connection.request("get_all")
    assert page["ok"], page
    records: list[dict[str, Any]] = page["records"]
    return records


async def upstream_requests(connection: Connection) -> int:
    stats = await connection.request("stats")
    count: int = stats["token_cache"]["upstream_requests"]
    return count


def assert_unavailable(reply: dict[str, Any]) -> None:
    assert error_code(reply) == "auth_unavailable", reply
    assert reply["error"]["retryable"] is True, reply


def assert_unauthenticated(reply: dict[str, Any]) -> None:
    assert error_code(reply) == "unauthenticated", reply
    assert reply["error"]["retryable"] is False, reply


# -- good tokens ------------------------------------------------------------------------------


async def test_good_token_stores_record_under_provider_sub(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, provider), connect(server) as connection:
        reply = await connection.request(**record_request("user-alice", test_name="unary"))
        assert reply["ok"] is True, reply
        assert reply["user_id"] == "alice"
        assert provider.calls == ["user-alice"]
        records = await all_records(connection)
        assert [(r["record_id"], r["user_id"], r["test_name"]) for r in records] == [
            (reply["record_id"], "alice", "unary")
        ]
        user = await connection.request("get_user", user_id="alice")
        assert user["ok"] is True, user
        assert user["user"]["name"] == "User alice"
        assert [r["record_id"] for r in user["records"]] == [reply["record_id"]]


@pytest.mark.parametrize(("google_id", "user_id"), [("108", "108"), (1234567890, "1234567890")])
async def test_google_v1_answer_with_id_instead_of_sub(tmp_path: Path, google_id: str | int, user_id: str) -> None:
    async with perfdb_with_provider(tmp_path) as (server, provider), connect(server) as connection:
        provider.answers["google-v1"] = answer({"id": google_id, "name": "Gee", "email": "g@example.com"})
        reply = await connection.request(**record_request("google-v1"))
        assert reply["ok"] is True, reply
        assert reply["user_id"] == user_id
        user = await connection.request("get_user", user_id=user_id)
        assert user["ok"] is True, user
        assert user["user"] == {"user_id": user_id, "name": "Gee"}


# -- rejected tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 400])
async def test_rejected_token_is_unauthenticated_and_cached_only_for_negative_ttl(tmp_path: Path, status: int) -> None:
    negative_ttl = 0.5
    async with (
        perfdb_with_provider(tmp_path, token_negative_ttl=negative_ttl) as (server, provider),
        connect(server) as connection,
    ):
        provider.answers["tok-rejected"] = answer({"error": "invalid_token"}, status=status)
        assert_unauthenticated(await connection.request(**record_request("tok-rejected")))
        assert provider.calls == ["tok-rejected"]
        # The provider would now accept it, but the rejection is still cached.
        provider.answers["tok-rejected"] = answer({"sub": "late"})
        assert_unauthenticated(await connection.request(**record_request("tok-rejected")))
        assert provider.calls == ["tok-rejected"]
        assert await stored_count(connection) == (0, 0)
        assert await all_records(connection) == []
        await asyncio.sleep(negative_ttl + 0.2)
        reply = await connection.request(**record_request("tok-rejected"))
        assert reply["ok"] is True, reply
        assert reply["user_id"] == "late"
        assert provider.calls == ["tok-rejected", "tok-rejected"]


# -- the provider failing ---------------------------------------------------------------------

FAILING_ANSWERS = {
    "http-500": answer({"error": "boom"}, status=500),
    "http-503": answer({"error": "busy"}, status=503),
    "http-429": answer({"error": "slow down"}, status=429),
    "http-302": answer({"sub": "redirected"}, status=302),
    "not-json": UserinfoAnswer(status=200, body=b"<html>userinfo</html>"),
    "json-array": answer([{"sub": "alice"}]),
    "json-string": answer("alice"),
    "no-subject": answer({"name": "Nobody", "email": "n@example.com"}),
    "empty-subject": answer({"sub": ""}),
    "null-subject": answer({"sub": None, "id": "shadowed"}),
    "boolean-subject": answer({"sub": True}),
    "huge-body": answer({"sub": "big", "padding": "x" * (70 * 1024)}),
}


@pytest.mark.parametrize("case", list(FAILING_ANSWERS))
async def test_provider_failure_is_auth_unavailable_and_not_cached(tmp_path: Path, case: str) -> None:
    auth_timeout = 1.0
    token = f"tok-{case}"
    async with (
        perfdb_with_provider(tmp_path, auth_timeout=auth_timeout) as (server, provider),
        connect(server) as connection,
    ):
        provider.answers[token] = FAILING_ANSWERS[case]
        started = time.monotonic()
        assert_unavailable(await connection.request(**record_request(token)))
        assert time.monotonic() - started < auth_timeout + TIMEOUT_MARGIN
        assert provider.calls == [token]
        # Not cached: the next request asks the provider again.
        assert_unavailable(await connection.request(**record_request(token)))
        assert provider.calls == [token, token]
        assert await stored_count(connection) == (0, 0)
        assert await all_records(connection) == []
        # Once the provider recovers, the same token works at once.
        provider.answers[token] = answer({"sub": "recovered"})
        reply = await connection.request(**record_request(token))
        assert reply["ok"] is True, reply
        assert reply["user_id"] == "recovered"
        assert provider.calls == [token, token, token]


async def test_hanging_provider_times_out_and_is_not_cached(tmp_path: Path) -> None:
    auth_timeout = 0.5
    async with (
        perfdb_with_piecewise_provider(tmp_path, auth_timeout=auth_timeout) as (server, provider),
        connect(server) as connection,
    ):
        provider.answers["tok-hang"] = answer({"sub": "too-late"}, delay=HANG_SECONDS)
        for attempt in (1, 2):
            started = time.monotonic()
            assert_unavailable(await connection.request(**record_request("tok-hang")))
            assert time.monotonic() - started < auth_timeout + TIMEOUT_MARGIN
            assert provider.calls == ["tok-hang"] * attempt
        assert await stored_count(connection) == (0, 0)


async def test_unreachable_provider_is_auth_unavailable_and_not_cached(tmp_path: Path) -> None:
    auth_timeout = 1.0
    config = make_config(tmp_path / "db", closed_port_url(), auth_timeout=auth_timeout)
    async with running_server(config) as server, connect(server) as connection:
        for attempt in (1, 2):
            started = time.monotonic()
            assert_unavailable(await connection.request(**record_request("user-alice")))
            assert time.monotonic() - started < auth_timeout + TIMEOUT_MARGIN
            assert await upstream_requests(connection) == attempt
        assert await stored_count(connection) == (0, 0)


async def test_ping_answers_while_the_provider_hangs(tmp_path: Path) -> None:
    async with (
        perfdb_with_piecewise_provider(tmp_path, auth_timeout=1.0) as (server, provider),
        connect(server) as recorder,
        connect(server) as pinger,
    ):
        provider.answers["tok-hang"] = answer({"sub": "too-late"}, delay=HANG_SECONDS)
        answered: list[str] = []

        async def record() -> dict[str, Any]:
            reply = await recorder.request(**record_request("tok-hang"))
            answered.append("record")
            return reply

        record_task = asyncio.create_task(record())
        # Once the provider has the request, the lookup is waiting on it.
        await asyncio.wait_for(provider.asked.wait(), 5)
        assert (await pinger.request("ping"))["ok"] is True
        answered.append("ping")
        assert_unavailable(await record_task)
        assert answered == ["ping", "record"]


# -- caching and single flight ----------------------------------------------------------------


async def test_good_token_is_cached_until_cache_ttl(tmp_path: Path) -> None:
    cache_ttl = 0.5
    async with (
        perfdb_with_provider(tmp_path, token_cache_ttl=cache_ttl) as (server, provider),
        connect(server) as connection,
    ):
        first = await connection.request(**record_request("user-bob"))
        second = await connection.request(**record_request("user-bob"))
        assert first["ok"] and second["ok"], (first, second)
        assert first["record_id"] != second["record_id"]
        assert provider.calls == ["user-bob"]
        await asyncio.sleep(cache_ttl + 0.2)
        third = await connection.request(**record_request("user-bob"))
        assert third["ok"] is True, third
        assert provider.calls == ["user-bob", "user-bob"]
        assert await stored_count(connection) == (3, 1)


async def test_single_flight_for_pipelined_requests(tmp_path: Path) -> None:
    async with perfdb_with_provider(tmp_path) as (server, provider), connect(server) as connection:
        provider.answers["tok-burst"] = answer({"sub": "burst"}, delay=0.3)
        await connection.send(*(record_request("tok-burst", id=n) for n in range(200)))
        replies = await connection.replies(200)
        assert [reply["id"] for reply in replies] == list(range(200))
        assert all(reply["ok"] and reply["user_id"] == "burst" for reply in replies), replies
        assert len({reply["record_id"] for reply in replies}) == 200
        assert provider.calls == ["tok-burst"]
        assert await stored_count(connection) == (200, 1)


async def test_single_flight_across_connections(tmp_path: Path) -> None:
    connections_count, per_connection = 8, 25
    async with perfdb_with_provider(tmp_path) as (server, provider):
        provider.answers["tok-burst"] = answer({"sub": "burst"}, delay=0.3)
        connections = [await Connection.open(server.port) for _ in range(connections_count)]
        try:

            async def burst(connection: Connection) -> list[dict[str, Any]]:
                await connection.send(*(record_request("tok-burst", id=n) for n in range(per_connection)))
                return await connection.replies(per_connection)

            results = await asyncio.gather(*(burst(connection) for connection in connections))
            replies = [reply for result in results for reply in result]
            assert len(replies) == connections_count * per_connection
            assert all(reply["ok"] and reply["user_id"] == "burst" for reply in replies), replies
            assert provider.calls == ["tok-burst"]
            assert await stored_count(connections[0]) == (connections_count * per_connection, 1)
        finally:
            for connection in connections:
                await connection.close()


async def test_a_token_is_hashed_once_a_turn_of_the_event_loop_and_each_lookup_still_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pipelined records repeat their token; within one turn of the loop it is hashed once. The
    next turn looks it up afresh, so a cache entry that expired meanwhile is not used."""
    hashed: list[str] = []

    def counted_digest(token: str) -> bytes:
        hashed.append(token)
        return token_digest(token)

    monkeypatch.setattr(tokens, "token_digest", counted_digest)
    bot, alice = Profile.create("static:ci-bot", {}), Profile.create("alice", {})
    resolver = TokenResolver(
        userinfo_url=closed_port_url(),
        static_tokens={token_digest("ci-token"): bot},
        cache_ttl=60.0,
        negative_ttl=10.0,
        cache_size=10,
        timeout=1.0,
        max_connections=1,
    )
    resolver.cache.put(token_digest("user-alice"), alice, time.monotonic() + 60.0)
    assert [resolver.resolve("ci-token") for _ in range(3)] == [bot, bot, bot]
    assert [resolver.resolve("user-alice") for _ in range(3)] == [alice, alice, alice]
    assert hashed == ["ci-token", "user-alice"]
    assert (resolver.cache.hits, resolver.cache.misses) == (3, 0)

    resolver.cache.put(token_digest("user-alice"), alice, time.monotonic() - 1.0)  # expired since
    await asyncio.sleep(0)  # the next turn
    assert resolver.resolve("ci-token") is bot
    lookup = resolver.resolve("user-alice")
    assert isinstance(lookup, asyncio.Future)  # asks the provider again (here: no session, so it fails)
    with pytest.raises(PerfdbError):
        await lookup
    assert hashed == ["ci-token", "user-alice", "ci-token", "user-alice"]
    assert (resolver.cache.hits, resolver.cache.misses) == (3, 1)


async def test_token_travels_only_in_the_authorization_header(tmp_path: Path) -> None:
    tokens = ["user-carol", "tok-rejected", "tok-broken"]
    async with perfdb_with_provider(tmp_path) as (server, provider), connect(server) as connection:
        provider.answers["tok-broken"] = answer({"error": "boom"}, status=500)
        for token in tokens:
            await connection.request(**record_request(token))
        # The provider read every token from the Authorization header ...
        assert provider.calls == tokens
        # ... and from nowhere else.
        assert provider.urls_seen == ["/userinfo"] * len(tokens)
        for url in provider.urls_seen:
            for token in tokens:
                assert token not in url


# -- static tokens ----------------------------------------------------------------------------


def write_tokens_file(path: Path, token: str) -> Path:
    path.write_bytes(orjson.dumps({"tokens": [{"sha256": token_hash(token), "user_id": "ci-bot", "name": "CI"}]}))
    return path


async def test_static_token_needs_no_provider(tmp_path: Path) -> None:
    token = "ci-" + secrets.token_hex(16)
    tokens_file = write_tokens_file(tmp_path / "tokens.json", token)
    async with (
        perfdb_with_provider(tmp_path, tokens_file=tokens_file) as (server, provider),
        connect(server) as connection,
    ):
        for _ in range(2):
            reply = await connection.request(**record_request(token))
            assert reply["ok"] is True, reply
            assert reply["user_id"] == "static:ci-bot"
        assert provider.calls == []
        assert await upstream_requests(connection) == 0
        user = await connection.request("get_user", user_id="static:ci-bot")
        assert user["ok"] is True, user
        assert user["user"] == {"user_id": "static:ci-bot", "name": "CI"}
        assert len(user["records"]) == 2
        # Another token still goes to the provider.
        reply = await connection.request(**record_request("user-dave"))
        assert reply["user_id"] == "dave"
        assert provider.calls == ["user-dave"]


async def test_provider_subject_cannot_impersonate_a_static_token(tmp_path: Path) -> None:
    tokens_file = write_tokens_file(tmp_path / "tokens.json", "ci-" + secrets.token_hex(16))
    async with (
        perfdb_with_provider(tmp_path, tokens_file=tokens_file) as (server, provider),
        connect(server) as connection,
    ):
        provider.answers["tok-impostor"] = answer({"sub": STATIC_USER_PREFIX + "ci-bot", "name": "Not CI"})
        assert_unauthenticated(await connection.request(**record_request("tok-impostor")))
        assert provider.calls == ["tok-impostor"]
        assert await stored_count(connection) == (0, 0)
        assert error_code(await connection.request("get_user", user_id="static:ci-bot")) == "not_found"


async def test_unknown_token_with_static_tokens_and_provider_offline_names_both(tmp_path: Path) -> None:
    """A mistyped bot token on an offline machine must not read as a mere network fault."""
    token = "ci-" + secrets.token_hex(16)
    tokens_file = write_tokens_file(tmp_path / "tokens.json", token)
    config = make_config(tmp_path / "db", closed_port_url(), tokens_file=tokens_file, auth_timeout=1.0)
    async with running_server(config) as server, connect(server) as connection:
        reply = await connection.request(**record_request(token + "-typo"))
        assert_unavailable(reply)
        message = reply["error"]["message"]
        assert "matched no static token" in message, reply
        assert "identity provider could not be reached" in message, reply
        assert token not in message
        assert (await connection.request(**record_request(token)))["ok"] is True


async def test_unknown_token_rejected_by_the_provider_says_no_static_token_matched(tmp_path: Path) -> None:
    tokens_file = write_tokens_file(tmp_path / "tokens.json", "ci-" + secrets.token_hex(16))
    async with (
        perfdb_with_provider(tmp_path, tokens_file=tokens_file) as (server, provider),
        connect(server) as connection,
    ):
        for _ in range(2):  # the second answer comes from the negative cache, and says the same
            reply = await connection.request(**record_request("tok-nobody"))
            assert_unauthenticated(reply)
            assert reply["error"]["message"] == (
                "the token matched no static token, and the identity provider rejected the access token"
            )
        assert provider.calls == ["tok-nobody"]


async def test_unreachable_provider_without_static_tokens_says_only_that(tmp_path: Path) -> None:
    config = make_config(tmp_path / "db", closed_port_url(), auth_timeout=1.0)
    async with running_server(config) as server, connect(server) as connection:
        reply = await connection.request(**record_request("user-alice"))
        assert_unavailable(reply)
        assert reply["error"]["message"] == "the identity provider could not be reached (ClientConnectorError)"


async def test_without_a_provider_unknown_tokens_are_unauthenticated_and_no_session_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_session(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an aiohttp session was created with --userinfo-url none")

    monkeypatch.setattr(aiohttp, "ClientSession", no_session)
    token = "ci-" + secrets.token_hex(16)
    tokens_file = write_tokens_file(tmp_path / "tokens.json", token)
    config = make_config(tmp_path / "db", "unused", tokens_file=tokens_file)
    config = dataclasses.replace(config, userinfo_url=None)
    async with running_server(config) as server, connect(server) as connection:
        for unknown in ("user-alice", token + "-typo"):
            reply = await connection.request(**record_request(unknown))
            assert_unauthenticated(reply)
            message = reply["error"]["message"]
            assert "matched no static token" in message, reply
            assert "no identity provider configured" in message, reply
        reply = await connection.request(**record_request(token))
        assert reply["ok"] is True, reply
        assert reply["user_id"] == "static:ci-bot"
        assert await upstream_requests(connection) == 0
        assert await stored_count(connection) == (1, 1)


def test_userinfo_url_none_turns_the_provider_off() -> None:
    assert config_from_args(["--userinfo-url", "none"]).userinfo_url is None
    assert config_from_args([]).userinfo_url == GOOGLE_USERINFO_URL


def test_load_static_tokens_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(
        orjson.dumps(
            {
                "tokens": [
                    {"sha256": token_hash("one"), "user_id": "bot-1", "name": "One", "secret_claim": "dropped"},
                    {"sha256": token_hash("two").upper(), "user_id": "bot-2"},
                ]
            }
        )
    )
    tokens = load_static_tokens(path)
    assert set(tokens) == {token_digest("one"), token_digest("two")}
    one = tokens[token_digest("one")]
    assert one.user_id == "static:bot-1"
    assert one.claims == {"name": "One"}
    assert tokens[token_digest("two")].user_id == "static:bot-2"


MALFORMED_TOKEN_FILES: dict[str, bytes] = {
    "not-json": b"{tokens: [",
    "empty-file": b"",
    "top-level-array": b"[]",
    "no-tokens-key": b"{}",
    "tokens-not-a-list": orjson.dumps({"tokens": {"sha256": token_hash("x"), "user_id": "x"}}),
    "entry-not-object": orjson.dumps({"tokens": ["abc"]}),
    "hash-missing": orjson.dumps({"tokens": [{"user_id": "x"}]}),
    "hash-not-hex": orjson.dumps({"tokens": [{"sha256": "zz" * 32, "user_id": "x"}]}),
    "hash-too-short": orjson.dumps({"tokens": [{"sha256": token_hash("x")[:62], "user_id": "x"}]}),
    "hash-not-string": orjson.dumps({"tokens": [{"sha256": 12345, "user_id": "x"}]}),
    "hash-is-the-token": orjson.dumps({"tokens": [{"sha256": "plain-token", "user_id": "x"}]}),
    "user-id-missing": orjson.dumps({"tokens": [{"sha256": token_hash("x")}]}),
    "user-id-empty": orjson.dumps({"tokens": [{"sha256": token_hash("x"), "user_id": ""}]}),
    "duplicate-hash": orjson.dumps(
        {
            "tokens": [
                {"sha256": token_hash("x"), "user_id": "a"},
                {"sha256": token_hash("x").upper(), "user_id": "b"},
            ]
        }
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_TOKEN_FILES))
def test_load_static_tokens_rejects_malformed_files(tmp_path: Path, case: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(MALFORMED_TOKEN_FILES[case])
    with pytest.raises(ValueError, match="tokens file"):
        load_static_tokens(path)


def test_load_static_tokens_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read tokens file"):
        load_static_tokens(tmp_path / "absent.json")


async def test_server_refuses_to_start_with_a_malformed_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(MALFORMED_TOKEN_FILES["duplicate-hash"])
    server = PerfdbServer(make_config(tmp_path / "db", closed_port_url(), tokens_file=path))
    try:
        with pytest.raises(StartupError, match="appears twice"):
            await server.start()
    finally:
        await server.shutdown()  # in case it did start


# -- profiles ---------------------------------------------------------------------------------


async def test_profile_is_stored_and_updated_when_the_provider_changes_it(tmp_path: Path) -> None:
    cache_ttl = 0.3
    first = {"sub": "pat", "name": "Pat One", "email": "pat@example.com", "locale": "en"}
    second = {"sub": "pat", "name": "Pat Two", "email": "pat@example.com", "locale": "en"}
    async with (
        perfdb_with_provider(tmp_path, token_cache_ttl=cache_ttl) as (server, provider),
        connect(server) as connection,
    ):
        provider.answers["tok-pat"] = answer(first)
        # The same profile, both from the cache and fetched again after the cache expired.
        for _ in range(2):
            assert (await connection.request(**record_request("tok-pat")))["ok"]
        await asyncio.sleep(cache_ttl + 0.2)
        assert (await connection.request(**record_request("tok-pat")))["ok"]
        assert len(provider.calls) == 2
        user = await connection.request("get_user", user_id="pat")
        assert user["user"] == {"user_id": "pat", "name": "Pat One", "locale": "en"}
        assert await stored_count(connection) == (3, 1)

        provider.answers["tok-pat"] = answer(second)
        await asyncio.sleep(cache_ttl + 0.2)
        assert (await connection.request(**record_request("tok-pat")))["ok"]
        assert len(provider.calls) == 3
        user = await connection.request("get_user", user_id="pat")
        assert user["user"] == {"user_id": "pat", "name": "Pat Two", "locale": "en"}
        assert len(user["records"]) == 4
        page = await connection.request("get_all")
        assert page["users"] == {"pat": {"user_id": "pat", "name": "Pat Two", "locale": "en"}}
        assert await stored_count(connection) == (4, 1)

    db = plyvel.DB(str(tmp_path / "db"))
    try:
        stored = db.get(layout.profile_key("pat"))
        profiles = list(db.iterator(prefix=layout.PROFILE_PREFIX))
    finally:
        db.close()
    assert stored is not None
    assert orjson.loads(stored) == {"user_id": "pat", "name": "Pat Two", "email": "pat@example.com", "locale": "en"}
    assert [key for key, _ in profiles] == [layout.profile_key("pat")]


@pytest.mark.parametrize("expose_emails", [False, True])
async def test_public_profiles_hide_email_unless_exposed(tmp_path: Path, expose_emails: bool) -> None:
    async with (
        perfdb_with_provider(tmp_path, expose_emails=expose_emails) as (server, _provider),
        connect(server) as connection,
    ):
        assert (await connection.request(**record_request("user-erin")))["ok"]
        user = (await connection.request("get_user", user_id="erin"))["user"]
        listed = (await connection.request("get_all"))["users"]["erin"]
    expected = {"user_id": "erin", "name": "User erin", "picture": "https://p/x.png"}
    if expose_emails:
        expected["email"] = "erin@example.com"
    assert user == expected
    assert listed == expected


# -- secrecy ----------------------------------------------------------------------------------


async def read_raw_reply(connection: Connection) -> bytes:
    line = await asyncio.wait_for(connection.reader.readline(), 10)
    assert line.endswith(b"\n"), line
    return line


async def test_token_never_appears_in_logs_replies_or_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = "tok-good-" + secrets.token_hex(16)
    rejected = "tok-rejected-" + secrets.token_hex(16)
    broken = "tok-broken-" + secrets.token_hex(16)
    secrets_sent = (good, rejected, broken)
    requests: list[bytes] = [
        orjson.dumps(record_request(good, request_id="r1")),
        orjson.dumps(record_request(good, request_id="r2")),
        orjson.dumps(record_request(good, request_id="r1")),  # an idempotent duplicate
        orjson.dumps(record_request(rejected)),
        orjson.dumps(record_request(rejected)),
        orjson.dumps(record_request(broken)),
        b'{"op": "record", "access_token": "' + good.encode() + b'", "metrics": ',  # bad JSON
        orjson.dumps(record_request(good, surprise=True)),
        orjson.dumps(record_request(good, metrics={"qps": "fast"})),
        orjson.dumps({key: value for key, value in record_request(good).items() if key != "test_name"}),
        orjson.dumps(record_request(good * 200)),
        orjson.dumps(record_request(good + "\u00e9")),
        orjson.dumps({"op": "record", "access_token": [good]}),
        orjson.dumps({"op": "get_user", "access_token": good, "user_id": "keeper"}),
    ]
    replies: list[bytes] = []
    async with perfdb_with_provider(tmp_path) as (server, provider), connect(server) as connection:
        provider.answers[good] = answer({"sub": "keeper", "name": "Keeper", "email": "k@example.com"})
        provider.answers[rejected] = answer({"error": "invalid_token"}, status=401)
        provider.answers[broken] = answer({"error": "boom"}, status=500)
        for request in requests:
            await connection.send_raw(request + b"\n")
            replies.append(await read_raw_reply(connection))
        assert await stored_count(connection) == (2, 1)
    # The exchange did what it should, so the checks below are not vacuous.
    outcomes = [orjson.loads(reply) for reply in replies]
    assert [outcome["ok"] for outcome in outcomes[:3]] == [True, True, True]
    assert outcomes[2]["duplicate"] is True
    assert [error_code(outcome) for outcome in outcomes[3:6]] == [
        "unauthenticated",
        "unauthenticated",
        "auth_unavailable",
    ]
    assert all(outcome["ok"] is False for outcome in outcomes[6:]), outcomes
    assert provider.calls == [good, rejected, broken]
    assert caplog.records, "the server logged nothing at DEBUG"

    for secret in secrets_sent:
        for reply in replies:
            assert secret.encode() not in reply
        assert secret not in caplog.text
        for record in caplog.records:
            assert secret not in record.getMessage()
            assert secret not in repr(record.args)
            for log_format in ("text", "json"):  # what --log-format writes
                assert secret not in log_formatter(log_format).format(record)
    database_files = [path for path in (tmp_path / "db").rglob("*") if path.is_file()]
    contents = b"".join(path.read_bytes() for path in database_files)
    assert b"keeper" in contents  # what was stored can be found this way
    for secret in secrets_sent:
        assert secret.encode() not in contents
        assert token_hash(secret).encode() not in contents


# -- where tokens may be sent -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/userinfo",
        "http://127.9.8.7/userinfo",
        "http://localhost/userinfo",
        "http://LOCALHOST:9000/userinfo",
        "http://[::1]:9000/userinfo",
        "https://openidconnect.googleapis.com/v1/userinfo",
        "https://idp.example.com:8443/oauth/userinfo",
        "https://10.1.2.3/userinfo",
    ],
)
def test_userinfo_url_accepted(url: str) -> None:
    check_userinfo_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://idp.example.com/userinfo",
        "http://10.0.0.1/userinfo",
        "http://192.168.1.10:8080/userinfo",
        "http://localhost.example.com/userinfo",
        "http://127.0.0.1.nip.io/userinfo",
        "http://[2001:db8::1]/userinfo",
        "https://user:secret@idp.example.com/userinfo",
        "https://token@idp.example.com/userinfo",
        "http://user:secret@127.0.0.1/userinfo",
        "http://:secret@localhost/userinfo",
        "ftp://127.0.0.1/userinfo",
        "idp.example.com/userinfo",
        "https:///userinfo",
        "",
    ],
)
def test_userinfo_url_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        check_userinfo_url(url)


def test_command_line_refuses_plain_http_to_a_remote_provider() -> None:
    with pytest.raises(ConfigError, match="https"):
        config_from_args(["--userinfo-url", "http://idp.example.com/userinfo"])
    config = config_from_args(["--userinfo-url", "http://127.0.0.1:8080/userinfo"])
    assert config.userinfo_url == "http://127.0.0.1:8080/userinfo"


# -- robustness (each of these found a bug; see the report) -------------------------------------


async def test_token_with_control_characters_is_refused_as_a_client_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ASCII control characters pass the access_token check, then make aiohttp refuse the header.

    Expected: a client error (bad_request or unauthenticated) and no error logged.
    """
    caplog.set_level(logging.DEBUG)
    async with perfdb_with_provider(tmp_path) as (server, provider), connect(server) as connection:
        for token in ("user-eve\r\nX-Injected: yes", "user-eve\x00", "user-eve\x01"):
            reply = await connection.request(**record_request(token))
            assert error_code(reply) in ("bad_request", "unauthenticated"), (token, reply)
        assert provider.calls == []
        assert await stored_count(connection) == (0, 0)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


async def test_answer_streamed_in_pieces_is_read_whole(tmp_path: Path) -> None:
    """A valid userinfo answer that arrives in more than one piece (chunked encoding) is a valid answer."""
    async with (
        perfdb_with_piecewise_provider(tmp_path) as (server, provider),
        connect(server) as connection,
    ):
        body = orjson.dumps({"sub": "chunky", "name": "Chunky", "email": "c@example.com"})
        provider.pieces["tok-pieces"] = [body[:20], body[20:]]
        reply = await connection.request(**record_request("tok-pieces"))
        assert provider.calls == ["tok-pieces"]
        assert reply["ok"] is True, reply
        assert reply["user_id"] == "chunky"


def live_frames(names: set[str]) -> int:
    """Finished or running frame objects of functions with these names that are still reachable."""
    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, types.FrameType) and thing.f_code.co_name in names)


async def test_cached_rejection_does_not_hold_on_to_every_request(tmp_path: Path) -> None:
    """Requests answered from the negative cache must not keep their frames (and request lines) alive."""
    async with perfdb_with_provider(tmp_path) as (server, provider), connect(server) as connection:
        provider.answers["tok-rejected"] = answer({"error": "invalid_token"}, status=401)
        assert_unauthenticated(await connection.request(**record_request("tok-rejected")))
        before = live_frames({"op_record", "handle_line"})
        sys_info = "x" * 10_000
        for _ in range(50):
            reply = await connection.request(**record_request("tok-rejected", sys_info=sys_info))
            assert_unauthenticated(reply)
        assert provider.calls == ["tok-rejected"]
        after = live_frames({"op_record", "handle_line"})
    assert after - before < 5, f"{after - before} request frames kept alive by 50 cached rejections"
