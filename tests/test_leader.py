"""Scheduling leader election (bot/leader.py) on fakeredis and real Redis, with a fake clock and no sleeps.

Instances are LeaderElection objects sharing one lock key; "time passes" by moving the clock, and each
instance's loop is played by calling `step()` every third of the TTL, as `run()` does.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis_asyncio

from bot.leader import LeaderElection
from bot.redis_conn import create_redis
from bot.redis_keys import RedisKeys
from scheduler.runner import post_tick_job
from tests.conftest import Backend, make_settings

TTL_MS = 5000
STEP_S = TTL_MS / 3000


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.value = now

    def now(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


@pytest.fixture
async def redis(backend: Backend) -> AsyncIterator[redis_asyncio.Redis]:
    client = create_redis(make_settings(backend))
    yield client
    await client.aclose()


@pytest.fixture
def key(backend: Backend) -> str:
    return RedisKeys(backend.key_prefix).scheduler_leader()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def instances(redis: redis_asyncio.Redis, key: str, clock: FakeClock, n: int) -> list[LeaderElection]:
    return [LeaderElection(redis, key, clock, ttl_ms=TTL_MS, identity=f"instance-{i}") for i in range(n)]


async def test_one_leader_among_three_and_it_keeps_the_lock_by_renewing(
    redis: redis_asyncio.Redis, key: str, clock: FakeClock
) -> None:
    a, b, c = instances(redis, key, clock, 3)
    assert [await a.step(), await b.step(), await c.step()] == [True, False, False]
    for _ in range(30):  # 50 s of renewals every ttl/3
        clock.advance(STEP_S)
        assert [await a.step(), await b.step(), await c.step()] == [True, False, False]
    value = await redis.get(key)
    assert value is not None and value.decode().startswith("instance-0|")
    ttl = await redis.pttl(key)
    assert 0 < ttl <= TTL_MS  # Redis expires it on its own if everyone dies


async def test_a_dead_leader_is_replaced_within_the_ttl(redis: redis_asyncio.Redis, key: str, clock: FakeClock) -> None:
    a, b, c = instances(redis, key, clock, 3)
    await a.step()
    await b.step()
    await c.step()
    # a dies: it stops stepping. The others keep campaigning every ttl/3.
    waited = 0.0
    while not (b.is_leader or c.is_leader):
        clock.advance(STEP_S)
        waited += STEP_S
        await b.step()
        await c.step()
        assert waited <= TTL_MS / 1000 + STEP_S, "no successor within the TTL"
    assert waited <= TTL_MS / 1000 + STEP_S
    assert b.is_leader != c.is_leader  # exactly one successor


async def test_a_leader_that_was_paused_past_its_ttl_steps_down(
    redis: redis_asyncio.Redis, key: str, clock: FakeClock
) -> None:
    a, b = instances(redis, key, clock, 2)
    assert await a.step()
    clock.advance(TTL_MS / 1000 + 0.1)  # a is frozen (GC pause, SIGSTOP) for longer than the TTL
    assert not a.is_leader  # its own clock already tells it so
    assert await b.step()
    # a wakes up and tries to renew: the compare fails, it never extends b's lock.
    assert not await a.step()
    assert not a.is_leader and b.is_leader
    value = await redis.get(key)
    assert value is not None and value.decode().startswith("instance-1|")


async def test_resigning_hands_the_lock_over_at_once(redis: redis_asyncio.Redis, key: str, clock: FakeClock) -> None:
    a, b = instances(redis, key, clock, 2)
    await a.step()
    assert not await b.step()
    await a.resign()
    assert not a.is_leader
    assert await b.step()


async def test_a_leader_without_redis_stops_leading_when_its_lock_would_have_expired(
    redis: redis_asyncio.Redis, key: str, clock: FakeClock
) -> None:
    a = instances(redis, key, clock, 1)[0]
    assert await a.step()

    class Broken:
        async def eval(self, *args: object) -> object:
            raise ConnectionError("redis went away")

        async def set(self, *args: object, **kwargs: object) -> object:
            raise ConnectionError("redis went away")

    a._redis = Broken()  # type: ignore[assignment]
    clock.advance(STEP_S)
    assert await a.step()  # still within the lock it last set
    clock.advance(TTL_MS / 1000)
    assert not await a.step()


async def test_random_deaths_never_make_two_leaders(redis: redis_asyncio.Redis, key: str, clock: FakeClock) -> None:
    rng = random.Random(5)
    fleet = instances(redis, key, clock, 3)
    alive = [True, True, True]
    leaderless_since: float | None = None
    for _ in range(200):
        clock.advance(STEP_S)
        if rng.random() < 0.1:
            victim = rng.randrange(3)
            alive[victim] = not alive[victim]  # killed, or restarted
        for instance, up in zip(fleet, alive, strict=True):
            if up:
                await instance.step()
        leaders = [i for i, (inst, up) in enumerate(zip(fleet, alive, strict=True)) if up and inst.is_leader]
        assert len(leaders) <= 1
        if leaders or not any(alive):
            leaderless_since = None
        elif leaderless_since is None:
            leaderless_since = clock.now()
        else:
            assert clock.now() - leaderless_since <= TTL_MS / 1000 + STEP_S


class CountingEngine:
    def __init__(self) -> None:
        self.ticks: list[datetime] = []

    async def tick(self, now: datetime) -> None:
        self.ticks.append(now)


async def test_only_the_leader_ticks(redis: redis_asyncio.Redis, key: str, clock: FakeClock) -> None:
    a, b = instances(redis, key, clock, 2)
    await a.step()
    await b.step()
    engine = CountingEngine()
    now = datetime.fromtimestamp(clock.now(), UTC)
    assert await post_tick_job(engine, a, now)
    assert not await post_tick_job(engine, b, now)
    assert engine.ticks == [now]
