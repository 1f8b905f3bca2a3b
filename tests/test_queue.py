"""InboundQueue: atomic dedupe + enqueue, partitioning, depth/lag, dead letters and replay (both backends)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from redis.exceptions import ResponseError

from bot.metrics import Metrics
from bot.queue import InboundQueue, MalformedEntry
from bot.redis_keys import CONSUMER_GROUP, RedisKeys
from tests.conftest import Backend


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.t = now

    def now(self) -> float:
        return self.t


@pytest.fixture
async def redis(backend: Backend) -> AsyncIterator[redis_asyncio.Redis]:
    if backend.name == "embedded":
        import fakeredis

        client: redis_asyncio.Redis = fakeredis.FakeAsyncRedis()
    else:
        client = redis_asyncio.Redis.from_url(backend.redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize(
    "payload",
    [
        {"xml": "<xml>你好 \u2028 \"quoted\"</xml>", "received_at": 1700000000.123},
        {"msg": {"msgid": "m1", "n": 2**70, "list": [1, None, True]}, "open_kfid": "acc"},  # beyond orjson's ints
    ],
)
async def test_payload_round_trips_through_the_stream(
    redis: redis_asyncio.Redis, keys: RedisKeys, payload: dict[str, Any]
) -> None:
    q = make_queue(redis, keys)
    await q.ensure_groups()
    assert await q.enqueue_once("p-1", "conv", "callback", payload) is True
    partition = q.partition_for("conv")
    entry_id, fields = (await stream_entries(redis, keys.inbound_stream(partition)))[0]
    assert q.parse(partition, entry_id, fields, 0).payload == payload


@pytest.fixture
def keys(backend: Backend) -> RedisKeys:
    return RedisKeys(backend.key_prefix)


def make_queue(
    redis: redis_asyncio.Redis, keys: RedisKeys, partitions: int = 4, **kw: Any
) -> InboundQueue:
    return InboundQueue(redis, keys, partitions, 3600, **kw)


async def stream_entries(redis: redis_asyncio.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in await redis.xrange(stream)
    ]


def test_partition_for_is_crc32_and_stable(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    q8 = make_queue(redis, keys, partitions=8)
    other = make_queue(redis, keys, partitions=8)
    for key in ("kf:wkAAA:wmBBB", "app:1000002:zhangsan", "kf-pull:wkAAA", "中文会话"):
        assert q8.partition_for(key) == zlib.crc32(key.encode()) % 8 == other.partition_for(key)
        assert 0 <= q8.partition_for(key) < 8
    assert {make_queue(redis, keys, partitions=1).partition_for(f"c{i}") for i in range(20)} == {0}
    assert len({q8.partition_for(f"conv-{i}") for i in range(200)}) == 8


async def test_ensure_groups_is_idempotent(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    q = make_queue(redis, keys)
    await q.ensure_groups()
    await q.ensure_groups()
    for p in range(4):
        groups = await redis.xinfo_groups(keys.inbound_stream(p))
        assert [g["name"] for g in groups] == [CONSUMER_GROUP.encode()]
    assert await q.depth() == 0
    assert await q.oldest_age_s() == 0.0


async def test_enqueue_once_writes_one_entry_per_dedupe_key(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    clock = FakeClock()
    q = make_queue(redis, keys, clock=clock)
    await q.ensure_groups()
    payload = {"xml": "<xml>你好</xml>", "received_at": 1.5}
    assert await q.enqueue_once("msg-1", "kf:acc:user", "callback", payload) is True
    assert await q.enqueue_once("msg-1", "kf:acc:user", "callback", payload) is False
    assert await q.enqueue_once("msg-1", "kf:other:user", "callback", payload) is False

    partition = q.partition_for("kf:acc:user")
    entries = await stream_entries(redis, keys.inbound_stream(partition))
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields["kind"] == "callback"
    assert fields["dedupe"] == "msg-1"
    assert fields["conversation"] == "kf:acc:user"
    assert float(fields["enqueued_at"]) == clock.t
    parsed = q.parse(partition, entries[0][0], fields, 0)
    assert parsed.payload == payload
    assert parsed.kind == "callback" and parsed.dedupe_key == "msg-1" and parsed.enqueued_at == clock.t
    assert 3590 <= await redis.ttl(keys.dedupe("msg-1")) <= 3600
    assert await q.depth() == 1


async def test_twenty_concurrent_enqueues_of_one_key_queue_once(
    redis: redis_asyncio.Redis, keys: RedisKeys
) -> None:
    q = make_queue(redis, keys)
    results = await asyncio.gather(
        *(q.enqueue_once("same-msgid", "kf:acc:user", "callback", {"n": i}) for i in range(20))
    )
    assert sorted(results) == [False] * 19 + [True]
    assert await q.depth() == 1


async def test_failed_xadd_leaves_no_dedupe_marker(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    q = make_queue(redis, keys, partitions=1)
    await redis.set(keys.inbound_stream(0), "not a stream")
    with pytest.raises(ResponseError):
        await q.enqueue_once("m1", "c", "callback", {})
    assert not await redis.exists(keys.dedupe("m1"))
    await redis.delete(keys.inbound_stream(0))
    assert await q.enqueue_once("m1", "c", "callback", {}) is True  # the retry is not lost


async def test_depth_and_lag(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    clock = FakeClock(1000.0)
    metrics = Metrics()
    q = make_queue(redis, keys, clock=clock, metrics=metrics)
    await q.ensure_groups()
    await q.enqueue_once("a", "conv-a", "callback", {})
    clock.t = 1010.0
    await q.enqueue_once("b", "conv-b", "callback", {})
    await q.enqueue_once("c", "conv-c", "callback", {})
    # One entry read (in flight) still counts.
    p = q.partition_for("conv-b")
    assert await q.read(p, "w1", ">", 10)
    assert await q.depth() == 3
    assert await q.oldest_age_s(1030.0) == pytest.approx(30.0)
    clock.t = 1040.0
    await q.refresh_metrics()
    assert metrics.registry.get_sample_value("wecom_queue_depth") == 3
    assert metrics.registry.get_sample_value("wecom_queue_lag_seconds") == pytest.approx(40.0)
    assert metrics.registry.get_sample_value("wecom_dead_letters") == 0


async def test_ack_deletes_and_forgets_attempts(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    q = make_queue(redis, keys, partitions=1)
    await q.ensure_groups()
    await q.enqueue_once("a", "c", "callback", {})
    [(entry_id, _fields)] = await q.read(0, "w1", ">", 10)
    assert await q.record_failure(0, entry_id) == 1
    assert await q.record_failure(0, entry_id) == 2
    assert await q.attempts(0, [entry_id, "0-1"]) == [2, 0]
    assert await q.ack(0, entry_id) is True
    assert await q.ack(0, entry_id) is False
    assert await q.depth() == 0
    assert await q.attempts(0, [entry_id]) == [0]
    assert (await redis.xpending(keys.inbound_stream(0), CONSUMER_GROUP))["pending"] == 0


def test_parse_rejects_malformed_entries(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    q = make_queue(redis, keys)
    for fields in ({"payload": "{}"}, {"kind": "callback", "payload": "{nope"}, {"kind": "x", "payload": "[1]"}):
        with pytest.raises(MalformedEntry):
            q.parse(0, "1-0", fields, 0)


async def test_dead_letter_list_count_and_replay(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    metrics = Metrics()
    q = make_queue(redis, keys, metrics=metrics)
    await q.ensure_groups()
    await q.enqueue_once("poison", "kf:acc:u1", "kf_message", {"msg": {"msgid": "m1"}, "open_kfid": "acc"})
    p = q.partition_for("kf:acc:u1")
    [(entry_id, fields)] = await q.read(p, "w1", ">", 10)
    await q.record_failure(p, entry_id)
    moved = await q.dead_letter(
        p, entry_id, fields, attempts=3, error_class="ValueError", error="ValueError: boom", worker_id="w1"
    )
    assert moved is True
    # Not pending any more: a second (split-brain) dead-lettering is refused.
    assert not await q.dead_letter(
        p, entry_id, fields, attempts=3, error_class="ValueError", error="again", worker_id="w2"
    )
    assert await q.depth() == 0
    assert await q.dead_letter_count() == 1
    assert await q.attempts(p, [entry_id]) == [0]

    [dead] = await q.list_dead_letters(10)
    assert dead.partition == p and dead.entry_id == entry_id and dead.attempts == 3
    assert dead.error_class == "ValueError" and dead.error == "ValueError: boom"
    assert dead.kind == "kf_message" and dead.dedupe_key == "poison"
    assert dead.payload == {"msg": {"msgid": "m1"}, "open_kfid": "acc"}
    assert dead.worker_id == "w1"

    # The dedupe marker is still there, yet replay re-queues the entry.
    assert await q.enqueue_once("poison", "kf:acc:u1", "kf_message", {}) is False
    results = await asyncio.gather(*(q.replay_dead_letter(dead.dead_letter_id) for _ in range(5)))
    assert sorted(results) == [False] * 4 + [True]
    assert await q.dead_letter_count() == 0
    assert metrics.registry.get_sample_value("wecom_dead_letters") == 0
    [(new_id, new_fields)] = await q.read(p, "w1", ">", 10)
    replayed = q.parse(p, new_id, new_fields, 0)
    assert new_id != entry_id
    assert replayed.payload == dead.payload and replayed.kind == "kf_message" and replayed.dedupe_key == "poison"
    assert replayed.replay_of == dead.dead_letter_id
    assert await q.replay_dead_letter(dead.dead_letter_id) is False
    assert await q.replay_dead_letter("0-1") is False


async def test_claim_orphans_moves_other_consumers_pending(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    q = make_queue(redis, keys, partitions=1)
    await q.ensure_groups()
    for i in range(5):
        await q.enqueue_once(f"m{i}", "c", "callback", {"i": i})
    taken = await q.read(0, "dead-worker", ">", 3)
    assert len(taken) == 3
    assert await q.claim_orphans(0, "new-owner", 0) == 3
    mine = await q.read(0, "new-owner", "0-0", 10)
    assert [e for e, _ in mine] == [e for e, _ in taken]
    assert await q.claim_orphans(0, "new-owner", 0) == 0  # nothing held by anybody else now
    consumers = {c["name"] for c in await redis.xinfo_consumers(keys.inbound_stream(0), CONSUMER_GROUP)}
    assert consumers == {b"new-owner"}  # the emptied former owner was pruned


async def test_submit_once_is_enqueue_once_as_a_future(redis: redis_asyncio.Redis, keys: RedisKeys) -> None:
    q = InboundQueue(redis, keys, partitions=2, dedupe_ttl_s=60)
    await q.ensure_groups()
    first = q.submit_once("s-1", "conv", "callback", {"n": 1})
    again = q.submit_once("s-1", "conv", "callback", {"n": 2})  # same loop turn: one round trip, in order
    entry_id = await first
    assert entry_id is not None and "-" in entry_id
    assert await again is None
    assert await q.depth() == 1
