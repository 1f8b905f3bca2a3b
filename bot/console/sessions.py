"""Server-side console sessions in Redis, and the login rate limit.

Key shapes (under REDIS_KEY_PREFIX, like bot/redis_keys.py):
    {prefix}:console:session:{sha256(session id)}     JSON: user, CSRF token, created / last seen (epoch s)
    {prefix}:console:login-fail:{sha256(user|ip)}     failed logins in the current window (INCR, TTL)

Only a hash of the session id is stored, so a Redis dump holds no working cookie. Expiry is decided by the
injected clock (idle and absolute limits); the Redis TTL follows it, so abandoned sessions also disappear.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import asdict, dataclass

import redis.asyncio as redis_asyncio

from handlers.domain import Clock

DEFAULT_IDLE_S = 8 * 3600
DEFAULT_ABSOLUTE_S = 24 * 3600
TOUCH_EVERY_S = 60.0  # last-seen is rewritten at most this often per session
LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_S = 15 * 60


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ConsoleKeys:
    """The console's Redis key shapes (kept here, not in bot/redis_keys.py, by design of the module split)."""

    prefix: str

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:console:session:{_digest(session_id)}"

    def login_failures(self, username: str, ip: str) -> str:
        return f"{self.prefix}:console:login-fail:{_digest(username.casefold() + '|' + ip)}"

    def events(self) -> str:
        """Pub/sub channel of inbox changes, fanned out to every process's SSE clients."""
        return f"{self.prefix}:console:events"


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    user_id: int
    username: str
    csrf: str
    created_at: float
    last_seen: float


class SessionStore:
    def __init__(
        self,
        redis: redis_asyncio.Redis,
        keys: ConsoleKeys,
        clock: Clock,
        *,
        idle_s: float = DEFAULT_IDLE_S,
        absolute_s: float = DEFAULT_ABSOLUTE_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self.idle_s = idle_s
        self.absolute_s = absolute_s

    def _ttl(self, session: ConsoleSession, now: float) -> int:
        remaining = min(self.idle_s, session.created_at + self.absolute_s - now)
        return max(1, math.ceil(remaining))

    async def _write(self, session_id: str, session: ConsoleSession, now: float) -> None:
        await self._redis.set(self._keys.session(session_id), json.dumps(asdict(session)), ex=self._ttl(session, now))

    async def create(self, user_id: int, username: str) -> tuple[str, ConsoleSession]:
        """A new session (a fresh id at every login: no fixation); returns the id for the cookie."""
        now = self._clock.now()
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(user_id, username, secrets.token_urlsafe(32), now, now)
        await self._write(session_id, session, now)
        return session_id, session

    async def get(self, session_id: str) -> ConsoleSession | None:
        """The live session for a cookie value, or None (unknown, idle too long, or past its absolute limit)."""
        if not session_id or len(session_id) > 128:
            return None
        key = self._keys.session(session_id)
        raw = await self._redis.get(key)
        if raw is None:
            return None
        try:
            session = ConsoleSession(**json.loads(raw))
        except (ValueError, TypeError):
            await self._redis.delete(key)
            return None
        now = self._clock.now()
        if now - session.last_seen > self.idle_s or now - session.created_at > self.absolute_s:
            await self._redis.delete(key)
            return None
        if now - session.last_seen >= TOUCH_EVERY_S:
            session = ConsoleSession(session.user_id, session.username, session.csrf, session.created_at, now)
            await self._write(session_id, session, now)
        return session

    async def delete(self, session_id: str) -> None:
        await self._redis.delete(self._keys.session(session_id))


class LoginLimiter:
    """At most LOGIN_MAX_FAILURES failed logins per username and address per window; a success clears it."""

    def __init__(
        self,
        redis: redis_asyncio.Redis,
        keys: ConsoleKeys,
        *,
        max_failures: int = LOGIN_MAX_FAILURES,
        window_s: int = LOGIN_WINDOW_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.max_failures = max_failures
        self.window_s = window_s

    async def blocked(self, username: str, ip: str) -> bool:
        raw = await self._redis.get(self._keys.login_failures(username, ip))
        return raw is not None and int(raw) >= self.max_failures

    async def failed(self, username: str, ip: str) -> int:
        key = self._keys.login_failures(username, ip)
        count = int(await self._redis.incr(key))
        if count == 1:
            await self._redis.expire(key, self.window_s)
        return count

    async def clear(self, username: str, ip: str) -> None:
        await self._redis.delete(self._keys.login_failures(username, ip))
