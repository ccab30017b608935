"""Per-user write rate limiting: a token bucket for each user, in bounded memory."""

from __future__ import annotations

import collections
import time


class UserRateLimiter:
    """Each user may store `rate` records per second on average, `burst` at once."""

    __slots__ = ("_buckets", "_burst", "_max_users", "_rate")

    def __init__(self, rate: float, burst: int, max_users: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_users = max_users
        # user id -> (tokens, last refill time); least recently seen first
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def allow(self, user_id: str, now: float | None = None) -> bool:
        """Take one record's worth from the user's bucket; False when it is empty."""
        if self._rate <= 0:
            return True
        if now is None:
            now = time.monotonic()
        tokens, last = self._buckets.pop(user_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[user_id] = (tokens, now)
        if len(self._buckets) > self._max_users:
            # The least recently seen user has had the longest to refill: forgetting it
            # (a full bucket next time) is the smallest error.
            self._buckets.popitem(last=False)
        return allowed
