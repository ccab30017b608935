"""Access tokens to user profiles: static tokens for bots, an OIDC userinfo endpoint for people.

Tokens are secrets: they are hashed (SHA-256) before they are used as cache keys, never
logged, never stored, and only ever sent upstream in an Authorization header. (The resolver
keeps a token in plain only until the event loop's next turn, with the requests that carried it.)
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import time
from pathlib import Path

import aiohttp
import orjson

from perfdb.protocol.errors import ErrorCode, PerfdbError
from perfdb.records.profiles import Profile, clean_claims
from perfdb.records.schema import MAX_USER_ID_CHARS

log = logging.getLogger("perfdb.auth")

STATIC_USER_PREFIX = "static:"
MAX_USERINFO_BYTES = 64 * 1024


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# -- static tokens ------------------------------------------------------------------------


def load_static_tokens(path: Path) -> dict[bytes, Profile]:
    """Read a tokens file: {"tokens": [{"sha256": "<hex>", "user_id": "...", "name": ...}, ...]}.

    User ids get the "static:" prefix so they never collide with a provider's ids.
    Raises ValueError with a message fit for the operator.
    """
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read tokens file {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"tokens file {path} is not valid JSON: {exc}") from None
    entries = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'tokens file {path} must be an object with a "tokens" list')
    tokens: dict[bytes, Profile] = {}
    for index, entry in enumerate(entries):
        where = f"tokens file {path}, entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        digest_hex, user_id = entry.get("sha256"), entry.get("user_id")
        try:
            digest = bytes.fromhex(digest_hex) if isinstance(digest_hex, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(f'{where}: "sha256" must be the 64-hex-digit SHA-256 of the token')
        if (
            not isinstance(user_id, str)
            or not user_id
            or len(STATIC_USER_PREFIX + user_id) > MAX_USER_ID_CHARS
            or "\x00" in user_id
        ):
            raise ValueError(
                f'{where}: "user_id" must be a non-empty string of at most '
                f"{MAX_USER_ID_CHARS - len(STATIC_USER_PREFIX)} characters"
            )
        if digest in tokens:
            raise ValueError(f"{where}: the same token hash appears twice")
        tokens[digest] = Profile.create(STATIC_USER_PREFIX + user_id, clean_claims(entry))
    return tokens


# -- access keys (admin, read) --------------------------------------------------------------

MIN_KEY_CHARS = 16


def load_key(path: Path, what: str) -> str:
    """Read an access key (surrounding whitespace ignored); raises ValueError for the operator."""
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(key) < MIN_KEY_CHARS or not (key.isascii() and key.isprintable()):
        raise ValueError(f"{what} file {path} must hold a printable ASCII key of at least {MIN_KEY_CHARS} characters")
    return key


def key_matches(expected: str, presented: object) -> bool:
    """Constant-time comparison, so response timing does not reveal the key."""
    return isinstance(presented, str) and hmac.compare_digest(expected.encode(), presented.encode())


# -- the cache ------------------------------------------------------------------------------


class TokenCache:
    """Bounded LRU of token digest -> (expiry, profile or rejection)."""

    __slots__ = ("_entries", "_max_entries", "hits", "misses")

    def __init__(self, max_entries: int) -> None:
        self._entries: collections.OrderedDict[bytes, tuple[float, Profile | PerfdbError]] = collections.OrderedDict()
        self._max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes, now: float) -> Profile | PerfdbError | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] <= now:
            if entry is not None:
                del self._entries[digest]
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return entry[1]

    def put(self, digest: bytes, outcome: Profile | PerfdbError, expires: float) -> None:
        self._entries[digest] = (expires, outcome)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# -- the resolver --------------------------------------------------------------------------


class TokenResolver:
    """Resolves access tokens through static tokens, the cache, then the userinfo endpoint.

    With no userinfo URL only static tokens are accepted, and no HTTP session is made.
    """

    def __init__(
        self,
        *,
        userinfo_url: str | None,
        static_tokens: dict[bytes, Profile],
        cache_ttl: float,
        negative_ttl: float,
        cache_size: int,
        timeout: float,
        max_connections: int,
    ) -> None:
        self._userinfo_url = userinfo_url
        self._static = static_tokens
        self._cache_ttl = cache_ttl
        self._negative_ttl = negative_ttl
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=timeout, sock_read=timeout)
        self._max_connections = max_connections
        self.cache = TokenCache(cache_size)
        # Tokens resolved to a profile during this turn of the event loop, and whether the cache
        # answered: pipelined records mostly repeat a few tokens, and hashing each one again cost
        # as much as checking the rest of the record. Emptied on the loop's next turn, so a token
        # stays no longer than the requests that carried it, and no expiry is stretched.
        self._this_turn: dict[str, tuple[Profile, bool]] = {}
        # One upstream request per token at a time; concurrent lookups share its future.
        self._inflight: dict[bytes, asyncio.Future[Profile]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.upstream_requests = 0
        self.upstream_failures = 0  # the provider could not be asked or gave no usable answer

    async def start(self) -> None:
        if self._userinfo_url is None:
            return
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"Accept": "application/json", "User-Agent": "perfdb"},
            # No proxy or .netrc settings from the environment: tokens go straight to the provider.
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def resolve(self, token: str) -> Profile | asyncio.Future[Profile]:
        """The profile at once when known, else a future for it.

        The future fails with PerfdbError unauthenticated or auth_unavailable.
        """
        known = self._this_turn.get(token)
        if known is not None:
            profile, from_cache = known
            if from_cache:
                self.cache.hits += 1  # the counters count lookups, however they were answered
            return profile
        digest = token_digest(token)
        static = self._static.get(digest)
        if static is not None:
            self._remember_this_turn(token, static, from_cache=False)
            return static
        if self._userinfo_url is None:
            raise PerfdbError(
                ErrorCode.UNAUTHENTICATED,
                "the token matched no static token, and this server has no identity provider configured",
            )
        cached = self.cache.get(digest, time.monotonic())
        if isinstance(cached, Profile):
            self._remember_this_turn(token, cached, from_cache=True)
            return cached
        if isinstance(cached, PerfdbError):
            # A fresh exception each time: re-raising the cached one would chain every
            # request's frames onto its traceback and keep them alive until it expires.
            raise PerfdbError(cached.code, cached.message)
        future = self._inflight.get(digest)
        if future is None:
            future = asyncio.ensure_future(self._fetch(token, digest))
            self._inflight[digest] = future
            future.add_done_callback(lambda _f: self._inflight.pop(digest, None))
        return future

    def _remember_this_turn(self, token: str, profile: Profile, *, from_cache: bool) -> None:
        if not self._this_turn:
            asyncio.get_running_loop().call_soon(self._this_turn.clear)
        self._this_turn[token] = (profile, from_cache)

    async def _fetch(self, token: str, digest: bytes) -> Profile:
        try:
            profile = await self._ask_provider(token)
        except PerfdbError as error:
            if self._static and error.code in (ErrorCode.UNAUTHENTICATED, ErrorCode.AUTH_UNAVAILABLE):
                # Say why the static tokens did not answer, so a mistyped bot token does not
                # look like a network fault (or a provider's verdict on a token it never issued).
                error = PerfdbError(error.code, f"the token matched no static token, and {error.message}")
            if error.code is ErrorCode.UNAUTHENTICATED:
                self.cache.put(digest, error, time.monotonic() + self._negative_ttl)
            elif error.code is ErrorCode.AUTH_UNAVAILABLE:
                self.upstream_failures += 1
            raise error from None
        self.cache.put(digest, profile, time.monotonic() + self._cache_ttl)
        return profile

    async def _ask_provider(self, token: str) -> Profile:
        if self._session is None or self._userinfo_url is None:
            raise PerfdbError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        self.upstream_requests += 1
        try:
            async with self._session.get(
                self._userinfo_url,
                headers={"Authorization": f"Bearer {token}"},
                allow_redirects=False,
            ) as response:
                status = response.status
                body = await _read_bounded(response.content, MAX_USERINFO_BYTES + 1)
        except TimeoutError:
            raise _unavailable("the identity provider did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise _unavailable(f"the identity provider could not be reached ({type(exc).__name__})") from None
        if status in (401, 403):
            raise PerfdbError(ErrorCode.UNAUTHENTICATED, "the identity provider rejected the access token")
        if status == 400:
            # Google answers 400 for a malformed or revoked token.
            raise PerfdbError(ErrorCode.UNAUTHENTICATED, "the identity provider rejected the access token as invalid")
        if status != 200:
            raise _unavailable(f"the identity provider answered HTTP {status}")
        if len(body) > MAX_USERINFO_BYTES:
            raise _unavailable("the identity provider's answer is too large")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _unavailable("the identity provider's answer is not JSON") from None
        if not isinstance(document, dict):
            raise _unavailable("the identity provider's answer is not a JSON object")
        # OIDC names the subject "sub"; Google's older v1 endpoint calls it "id".
        user_id = document.get("sub", document.get("id"))
        if isinstance(user_id, int) and not isinstance(user_id, bool):
            user_id = str(user_id)
        if not isinstance(user_id, str) or not user_id or len(user_id) > MAX_USER_ID_CHARS or "\x00" in user_id:
            raise _unavailable("the identity provider's answer has no usable subject (sub)")
        if user_id.startswith(STATIC_USER_PREFIX):
            raise PerfdbError(ErrorCode.UNAUTHENTICATED, "the provider's subject collides with static token ids")
        return Profile.create(user_id, clean_claims(document))


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes, however many pieces it arrives in."""
    body = bytearray()
    while len(body) < limit:
        chunk = await stream.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _unavailable(message: str) -> PerfdbError:
    return PerfdbError(ErrorCode.AUTH_UNAVAILABLE, message)
