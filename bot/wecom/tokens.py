"""Access-token cache in Redis with a single-flight refresh shared by every process (reference §5.1).

One `TokenStore` per (corp, secret). The token lives under `RedisKeys.access_token(corp_id, secret)` (the key
holds a fingerprint of the secret, never the secret) as JSON `{"access_token", "expires_at"}`; `expires_at`
comes from the injected `Clock`, and the Redis TTL matches it, so a token is refreshed `refresh_margin_s`
before WeCom would expire it.

Refresh: callers in one process share one refresh task. Across processes, the process that wins
`SET lock NX PX` calls gettoken; the others poll the cache (with backoff) until it is filled or the lock is
free again. The lock is released only by its owner (Lua compare-and-delete), and it expires on its own if the
owner dies. A gettoken credential error (wrong secret) is cached briefly, so neither this process nor any
other calls gettoken again in that window: a wrong secret repeated many times gets the IP banned.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis_asyncio
import structlog

from bot.redis_keys import RedisKeys
from bot.wecom.errors import CredentialError, TokenRefreshTimeout
from handlers.domain import Clock

log = structlog.get_logger(__name__)

GETTOKEN_PATH = "/cgi-bin/gettoken"

# KEYS[1] = key, ARGV[1] = the value the caller owns. Deletes the key only if it still holds that value.
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

TokenFetcher = Callable[[], Awaitable[tuple[str, int]]]
"""Calls gettoken once (with its own transport retries); returns (access_token, expires_in seconds)."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    expires_at: float  # Clock time at which the bot stops using it (WeCom's expiry minus the margin)
    raw: bytes  # the stored form, so invalidation deletes exactly this token and nothing newer

    def __repr__(self) -> str:  # never print the token itself
        return f"AccessToken(expires_at={self.expires_at})"


class TokenStore:
    def __init__(
        self,
        redis: redis_asyncio.Redis,
        keys: RedisKeys,
        corp_id: str,
        secret: str,
        fetch: TokenFetcher,
        *,
        clock: Clock,
        refresh_margin_s: float = 300.0,
        lock_ttl_s: float = 60.0,
        wait_timeout_s: float | None = None,
        credential_error_ttl_s: float = 60.0,
        poll_initial_s: float = 0.01,
        poll_max_s: float = 0.25,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._redis = redis
        self._key = keys.access_token(corp_id, secret)
        self._lock_key = keys.access_token_lock(corp_id, secret)
        self._fetch = fetch
        self._clock = clock
        self._margin = refresh_margin_s
        self._lock_ttl_ms = max(1000, int(lock_ttl_s * 1000))
        self._wait_timeout = wait_timeout_s if wait_timeout_s is not None else lock_ttl_s + 5.0
        self._credential_error_ttl_ms = max(1000, int(credential_error_ttl_s * 1000))
        self._poll_initial = poll_initial_s
        self._poll_max = poll_max_s
        self._sleep = sleep
        self._compare_and_delete = redis.register_script(_COMPARE_AND_DELETE)
        self._inflight: asyncio.Future[AccessToken] | None = None

    async def get(self) -> AccessToken:
        """A valid token: from the cache, or refreshed once for all concurrent callers (of all processes)."""
        cached = await self._read()
        if cached is not None:
            return cached
        task = self._inflight
        if task is None or task.done():
            task = asyncio.ensure_future(self._refresh())
            self._inflight = task
            task.add_done_callback(self._refresh_done)
        # shield: one caller giving up (cancelled) must not cancel the refresh the others are waiting for
        return await asyncio.shield(task)

    async def invalidate(self, token: AccessToken) -> bool:
        """Drop the cached token if it is still `token` (WeCom rejected it); a newer one is kept."""
        deleted = await self._compare_and_delete(keys=[self._key], args=[token.raw])
        return bool(deleted)

    def ttl_for(self, expires_in: float) -> float:
        """How long the bot uses a token: expires_in minus the margin (half for short lifetimes)."""
        if expires_in > 2 * self._margin:
            return expires_in - self._margin
        return max(1.0, expires_in / 2)

    def _refresh_done(self, task: asyncio.Future[AccessToken]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody awaited anymore is not reported as lost

    async def _read(self) -> AccessToken | None:
        raw = await self._redis.get(self._key)
        if raw is None:
            return None
        raw_bytes = raw.encode() if isinstance(raw, str) else bytes(raw)
        try:
            data: Any = json.loads(raw_bytes)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        if "error" in data:
            raise CredentialError(int(data["error"]), str(data.get("errmsg", "")), GETTOKEN_PATH)
        value = data.get("access_token")
        expires_at = data.get("expires_at")
        if not isinstance(value, str) or not value or not isinstance(expires_at, int | float):
            return None
        if expires_at <= self._clock.now():
            return None
        return AccessToken(value, float(expires_at), raw_bytes)

    async def _refresh(self) -> AccessToken:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_timeout
        delay = self._poll_initial
        while True:
            cached = await self._read()
            if cached is not None:
                return cached
            owner = secrets.token_hex(16)
            if await self._redis.set(self._lock_key, owner, nx=True, px=self._lock_ttl_ms):
                try:
                    # another process may have filled the cache between our read and taking the lock
                    cached = await self._read()
                    if cached is not None:
                        return cached
                    return await self._fetch_and_store()
                finally:
                    await self._release(owner)
            if loop.time() >= deadline:
                raise TokenRefreshTimeout("timed out waiting for another process to refresh the access token")
            await self._sleep(delay)
            delay = min(delay * 2, self._poll_max)

    async def _fetch_and_store(self) -> AccessToken:
        try:
            value, expires_in = await self._fetch()
        except CredentialError as err:
            # remembered for a while by every process: no gettoken storm with a wrong secret
            marker = json.dumps({"error": err.errcode, "errmsg": err.errmsg})
            await self._redis.set(self._key, marker, px=self._credential_error_ttl_ms)
            log.error("wecom.token.credential_error", path=GETTOKEN_PATH, errcode=err.errcode)
            raise
        ttl = self.ttl_for(expires_in)
        expires_at = self._clock.now() + ttl
        raw = json.dumps({"access_token": value, "expires_at": expires_at}).encode()
        await self._redis.set(self._key, raw, px=max(1, int(ttl * 1000)))
        log.info("wecom.token.refreshed", path=GETTOKEN_PATH, expires_in=expires_in)
        return AccessToken(value, expires_at, raw)

    async def _release(self, owner: str) -> None:
        try:
            await self._compare_and_delete(keys=[self._lock_key], args=[owner])
        except Exception as exc:  # the lock expires on its own; do not hide the refresh's own outcome
            log.warning("wecom.token.lock_release_failed", error=type(exc).__name__)
