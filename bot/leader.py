"""One scheduling leader among instances: a Redis lock taken with SET NX PX and renewed by compare-and-extend.

The lock's value is `token|expires_at_ms`, the expiry by the injected clock. Redis's own PX expiry is the
safety net in real time; the stamped expiry lets a lock whose holder stopped renewing be taken over as soon as
the clock says it is stale (so failover tests run on a fake clock, without sleeping through a TTL).

- Acquire: `SET key value NX PX ttl`; if the key exists but its stamped expiry has passed, a Lua script
  replaces it only if it is still that same stale value (so two candidates never both take it).
- Renew every ttl/3: a Lua script extends the lock only while it still holds this instance's token. A
  process that lost the lock (paused past its TTL, then taken over) fails the compare and steps down.
- `is_leader` is also bounded locally: a leader that cannot renew (Redis unreachable) stops considering
  itself leader once the TTL it last set has run out by its own clock.

Exactly-once delivery does not depend on this lock: delivery rows are claimed by conditional UPDATEs, so two
leaders for a moment would still send each slot once. The lock keeps the work (and WeCom calls) on one instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable

import redis.asyncio as redis_asyncio
import structlog

from handlers.domain import Clock

log = structlog.get_logger(__name__)

DEFAULT_TTL_MS = 5000

# KEYS[1] lock; ARGV[1] the stale value seen; ARGV[2] new value; ARGV[3] ttl ms
_TAKE_OVER = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
  return 1
end
return 0
"""

# KEYS[1] lock; ARGV[1] token; ARGV[2] new value; ARGV[3] ttl ms
_EXTEND = """
local current = redis.call('get', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  redis.call('set', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
  return 1
end
return 0
"""

# KEYS[1] lock; ARGV[1] token
_RELEASE = """
local current = redis.call('get', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  return redis.call('del', KEYS[1])
end
return 0
"""


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class LeaderElection:
    """Campaigns for (and keeps) the scheduling lock; `step()` once per ttl/3, or `run()` to loop."""

    def __init__(
        self,
        redis: redis_asyncio.Redis,
        key: str,
        clock: Clock,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        identity: str | None = None,
    ) -> None:
        if ttl_ms < 300:
            raise ValueError("ttl_ms must be at least 300")
        self._redis = redis
        self._key = key
        self._clock = clock
        self.ttl_ms = ttl_ms
        self.token = identity or secrets.token_hex(8)
        self._valid_until_ms = 0.0  # by our clock: when the lock we last set runs out

    @property
    def renew_interval_s(self) -> float:
        return self.ttl_ms / 3000

    def _now_ms(self) -> float:
        return self._clock.now() * 1000

    @property
    def is_leader(self) -> bool:
        """Whether this instance holds the lock, as of its last successful step and by its own clock."""
        return self._now_ms() < self._valid_until_ms

    def _value(self, now_ms: float) -> str:
        return f"{self.token}|{int(now_ms + self.ttl_ms)}"

    async def step(self) -> bool:
        """Renew if leading, else try to take the lock; returns whether this instance leads now."""
        now_ms = self._now_ms()
        value = self._value(now_ms)
        was_leader = self.is_leader
        try:
            if self._valid_until_ms and await self._redis.eval(  # type: ignore[misc]
                _EXTEND, 1, self._key, self.token, value, str(self.ttl_ms)
            ):
                self._valid_until_ms = now_ms + self.ttl_ms
                return True
            if await self._redis.set(self._key, value, nx=True, px=self.ttl_ms):
                self._won(now_ms, was_leader)
                return True
            current = _text(await self._redis.get(self._key))
            if (
                current is not None
                and _stale(current, now_ms)
                and await self._redis.eval(  # type: ignore[misc]
                    _TAKE_OVER, 1, self._key, current, value, str(self.ttl_ms)
                )
            ):
                self._won(now_ms, was_leader, took_over=True)
                return True
        except Exception:
            # Redis is unreachable or failing: keep leading only until the lock we last set would have expired.
            log.warning("scheduler.leader.redis_failed", exc_info=True, leading=self.is_leader)
            return self.is_leader
        if self._valid_until_ms:
            log.warning("scheduler.leader.lost", identity=self.token)
        self._valid_until_ms = 0.0
        return False

    def _won(self, now_ms: float, was_leader: bool, *, took_over: bool = False) -> None:
        self._valid_until_ms = now_ms + self.ttl_ms
        if not was_leader:
            log.info("scheduler.leader.elected", identity=self.token, took_over=took_over)

    async def resign(self) -> None:
        """Give the lock up (on shutdown) so another instance takes over at its next step."""
        self._valid_until_ms = 0.0
        try:
            await self._redis.eval(_RELEASE, 1, self._key, self.token)  # type: ignore[misc]
        except Exception:
            log.warning("scheduler.leader.release_failed", exc_info=True)

    async def run(self, stop: asyncio.Event, *, sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        """Step every ttl/3 until `stop` is set, then resign."""
        try:
            while not stop.is_set():
                await self.step()
                if sleep is not None:
                    await sleep(self.renew_interval_s)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.renew_interval_s)
        finally:
            await self.resign()


def _stale(value: str, now_ms: float) -> bool:
    """Whether a lock value's stamped expiry has passed (an unreadable stamp is left to Redis's PX)."""
    _, _, stamp = value.rpartition("|")
    try:
        return float(stamp) <= now_ms
    except ValueError:
        return False
