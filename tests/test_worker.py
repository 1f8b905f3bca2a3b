"""WorkerRuntime: leases, order, no concurrency per conversation, retries, dead letters, takeover (both backends)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from bot.metrics import Metrics
from bot.queue import InboundQueue, MalformedEntry, QueueEntry
from bot.redis_keys import CONSUMER_GROUP, RedisKeys
from bot.settings import Settings
from bot.worker import WorkerRuntime
from handlers.domain import SystemClock
from tests.conftest import Backend, make_settings

RedisFactory = Callable[[], redis_asyncio.Redis]


@pytest.fixture
async def new_redis(backend: Backend) -> AsyncIterator[RedisFactory]:
    """A client per worker on real Redis; one shared in-process fakeredis client on the embedded backend."""
    clients: list[redis_asyncio.Redis] = []

    def make() -> redis_asyncio.Redis:
        if backend.name == "embedded":
            if not clients:
                import fakeredis

                clients.append(fakeredis.FakeAsyncRedis())
            return clients[0]
        client = redis_asyncio.Redis.from_url(backend.redis_url)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def worker_settings(backend: Backend, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"queue_partitions": 4, "lease_ttl_ms": 500, "dead_letter_after": 3}
    values.update(overrides)
    return make_settings(backend, **values)


def make_worker(
    redis: redis_asyncio.Redis,
    settings: Settings,
    process: Callable[[QueueEntry], Awaitable[None]],
    worker_id: str,
    **kw: Any,
) -> WorkerRuntime:
    kw.setdefault("retry_backoff_s", 0.01)
    kw.setdefault("retry_backoff_max_s", 0.05)
    kw.setdefault("block_ms", 100)
    kw.setdefault("idle_poll_s", 0.01)
    kw.setdefault("shutdown_grace_s", 5.0)
    return WorkerRuntime(
        redis, RedisKeys(settings.redis_key_prefix), settings, process, clock=SystemClock(), worker_id=worker_id,
        **kw,
    )


def make_queue(redis: redis_asyncio.Redis, settings: Settings, **kw: Any) -> InboundQueue:
    return InboundQueue(
        redis, RedisKeys(settings.redis_key_prefix), settings.queue_partitions, settings.dedupe_ttl_s, **kw
    )


async def wait_until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll a (sync or async) condition until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Tracker:
    """Records handling order per conversation and fails on any overlap within one conversation."""

    def __init__(self, delay: tuple[float, float] = (0.0, 0.0)) -> None:
        self.delay = delay
        self.in_flight: set[str] = set()
        self.order: dict[str, list[int]] = defaultdict(list)
        self.handled_by: dict[str, list[str]] = defaultdict(list)
        self.overlaps: list[str] = []
        self.max_parallel = 0

    def process_for(self, worker: str) -> Callable[[QueueEntry], Awaitable[None]]:
        async def process(entry: QueueEntry) -> None:
            conv = entry.payload["conv"]
            if conv in self.in_flight:
                self.overlaps.append(conv)
            self.in_flight.add(conv)
            self.max_parallel = max(self.max_parallel, len(self.in_flight))
            try:
                if self.delay[1]:
                    await asyncio.sleep(random.uniform(*self.delay))
                self.order[conv].append(entry.payload["seq"])
                self.handled_by[f"{conv}:{entry.payload['seq']}"].append(worker)
            finally:
                self.in_flight.discard(conv)

        return process

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.order.values())


async def enqueue_conversations(q: InboundQueue, conversations: int, per_conversation: int, start: int = 0) -> None:
    for seq in range(start, start + per_conversation):
        for c in range(conversations):
            conv = f"kf:acc:user{c}"
            assert await q.enqueue_once(f"{conv}:{seq}", conv, "callback", {"conv": conv, "seq": seq})


async def assert_queue_drained(redis: redis_asyncio.Redis, settings: Settings) -> None:
    q = make_queue(redis, settings)
    assert await q.depth() == 0
    keys = RedisKeys(settings.redis_key_prefix)
    for p in range(settings.queue_partitions):
        assert (await redis.xpending(keys.inbound_stream(p), CONSUMER_GROUP))["pending"] == 0


@contextlib.asynccontextmanager
async def running(worker: WorkerRuntime) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


# ---- run_once -------------------------------------------------------------------------------------------------


async def test_run_once_handles_everything_in_order_and_acks(backend: Backend, new_redis: RedisFactory) -> None:
    settings = worker_settings(backend)
    redis = new_redis()
    metrics = Metrics()
    q = make_queue(redis, settings)
    await enqueue_conversations(q, conversations=5, per_conversation=6)
    tracker = Tracker()
    worker = make_worker(redis, settings, tracker.process_for("w1"), "w1", metrics=metrics)
    assert await worker.run_once() == 30
    assert worker.owned_partitions == [0, 1, 2, 3]
    assert all(seqs == list(range(6)) for seqs in tracker.order.values()) and len(tracker.order) == 5
    await assert_queue_drained(redis, settings)
    assert await worker.run_once() == 0
    assert metrics.registry.get_sample_value("wecom_queue_entries_total", {"outcome": "handled"}) == 30
    assert metrics.registry.get_sample_value("wecom_queue_depth") == 0
    await worker.shutdown()
    keys = RedisKeys(settings.redis_key_prefix)
    assert not await redis.exists(*[keys.partition_lease(p) for p in range(4)])
    assert await redis.zscore(keys.workers(), "w1") is None


async def test_failure_retries_then_dead_letters_and_replay(backend: Backend, new_redis: RedisFactory) -> None:
    settings = worker_settings(backend, queue_partitions=1, dead_letter_after=3)
    redis = new_redis()
    metrics = Metrics()
    q = make_queue(redis, settings, metrics=metrics)
    conv = "kf:acc:poison-user"
    for seq in range(3):
        await q.enqueue_once(f"m{seq}", conv, "callback", {"conv": conv, "seq": seq})
    broken = {"on": True}
    seen: list[tuple[int, int]] = []

    async def process(entry: QueueEntry) -> None:
        seen.append((entry.payload["seq"], entry.attempts))
        if entry.payload["seq"] == 0 and broken["on"]:
            raise ValueError("customer text must not reach logs")

    worker = make_worker(redis, settings, process, "w1", metrics=metrics)
    assert await worker.run_once() == 0  # attempt 1 fails; the partition waits (order)
    assert await worker.run_once() == 0  # attempt 2
    assert seen == [(0, 0), (0, 1)]
    assert await q.dead_letter_count() == 0
    assert await worker.run_once() == 3  # attempt 3 → dead letter, then the rest goes on
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    await assert_queue_drained(redis, settings)

    [dead] = await q.list_dead_letters(10)
    assert dead.attempts == 3 and dead.partition == 0 and dead.error_class == "ValueError"
    assert dead.error == "ValueError: customer text must not reach logs"
    assert dead.payload == {"conv": conv, "seq": 0}
    sample = metrics.registry.get_sample_value
    assert sample("wecom_queue_entries_total", {"outcome": "failed"}) == 3
    assert sample("wecom_queue_entries_total", {"outcome": "dead_lettered"}) == 1
    assert sample("wecom_queue_entries_total", {"outcome": "handled"}) == 2
    assert sample("wecom_dead_letters") == 1

    broken["on"] = False
    assert await q.replay_dead_letter(dead.dead_letter_id)
    assert await worker.run_once() == 1
    assert seen[-1] == (0, 0)
    assert await q.dead_letter_count() == 0
    await assert_queue_drained(redis, settings)
    await worker.shutdown()


async def test_an_entry_the_pipeline_cannot_read_is_dead_lettered_at_once(
    backend: Backend, new_redis: RedisFactory
) -> None:
    settings = worker_settings(backend, queue_partitions=1, dead_letter_after=5)
    redis = new_redis()
    q = make_queue(redis, settings)
    conv = "app:1:zhangsan"
    for seq in range(2):
        await q.enqueue_once(f"m{seq}", conv, "callback", {"conv": conv, "seq": seq})
    attempts: list[int] = []

    async def process(entry: QueueEntry) -> None:
        if entry.payload["seq"] == 0:
            attempts.append(entry.attempts)
            raise MalformedEntry("callback: CallbackParseError")

    worker = make_worker(redis, settings, process, "w1")
    assert await worker.run_once() == 2
    assert attempts == [0]  # no retries: they could not help
    [dead] = await q.list_dead_letters(10)
    assert dead.attempts == 1 and dead.error_class == "MalformedEntry"
    await assert_queue_drained(redis, settings)
    await worker.shutdown()


async def test_poison_entry_does_not_block_its_partition_in_run(backend: Backend, new_redis: RedisFactory) -> None:
    settings = worker_settings(backend, queue_partitions=2, dead_letter_after=4)
    redis = new_redis()
    q = make_queue(redis, settings)
    conv = "kf:acc:u"
    for seq in range(4):
        await q.enqueue_once(f"m{seq}", conv, "callback", {"conv": conv, "seq": seq})
    done: list[int] = []

    async def process(entry: QueueEntry) -> None:
        if entry.payload["seq"] == 1:
            raise RuntimeError("poison")
        done.append(entry.payload["seq"])

    worker = make_worker(redis, settings, process, "w1")
    async with running(worker):
        await wait_until(lambda: len(done) == 3, what="the entries behind the poison one")
    assert done == [0, 2, 3]
    [dead] = await q.list_dead_letters(10)
    assert dead.attempts == 4 and dead.error == "RuntimeError: poison"
    await assert_queue_drained(redis, settings)


async def test_malformed_and_deleted_entries_do_not_block(backend: Backend, new_redis: RedisFactory) -> None:
    settings = worker_settings(backend, queue_partitions=1)
    redis = new_redis()
    q = make_queue(redis, settings)
    keys = RedisKeys(settings.redis_key_prefix)
    await q.ensure_groups()
    stream = keys.inbound_stream(0)
    await redis.xadd(stream, {"kind": "callback", "payload": "{not json"})
    await q.enqueue_once("gone", "c", "callback", {"conv": "c", "seq": 0})
    await q.enqueue_once("ok", "c", "callback", {"conv": "c", "seq": 1})
    # "gone" was read by this worker id (a previous life) and then deleted from the stream while pending.
    # (XAUTOCLAIM drops such entries by itself, so an orphan of another consumer would not even show up.)
    taken = await q.read(0, "w1", ">", 2)
    await redis.xdel(stream, taken[1][0])
    tracker = Tracker()
    worker = make_worker(redis, settings, tracker.process_for("w1"), "w1")
    assert await worker.run_once() == 3
    assert tracker.order == {"c": [1]}
    [dead] = await q.list_dead_letters(10)
    assert dead.error_class == "MalformedEntry" and dead.payload is None
    await assert_queue_drained(redis, settings)
    await worker.shutdown()


async def test_orphaned_pending_entries_are_handled_before_new_ones(
    backend: Backend, new_redis: RedisFactory
) -> None:
    settings = worker_settings(backend, queue_partitions=1)
    redis = new_redis()
    q = make_queue(redis, settings)
    await q.ensure_groups()
    await enqueue_conversations(q, conversations=1, per_conversation=4)
    assert len(await q.read(0, "vanished-worker", ">", 3)) == 3  # in flight at a worker that died
    await enqueue_conversations(q, conversations=1, per_conversation=3, start=4)
    tracker = Tracker()
    worker = make_worker(redis, settings, tracker.process_for("w1"), "w1")
    assert await worker.run_once() == 7
    assert tracker.order["kf:acc:user0"] == list(range(7))
    await assert_queue_drained(redis, settings)
    await worker.shutdown()


# ---- run: concurrency, order, balance, takeover ----------------------------------------------------------------


async def test_several_workers_keep_order_and_never_overlap_a_conversation(
    backend: Backend, new_redis: RedisFactory
) -> None:
    settings = worker_settings(backend, queue_partitions=8)
    q = make_queue(new_redis(), settings)
    await enqueue_conversations(q, conversations=12, per_conversation=10)
    tracker = Tracker(delay=(0.0, 0.004))
    workers = [make_worker(new_redis(), settings, tracker.process_for(f"w{i}"), f"w{i}") for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        # Staggered starts force hand-backs (rebalancing) while entries are in flight.
        await stack.enter_async_context(running(workers[0]))
        await wait_until(lambda: tracker.total >= 20, what="first worker progress")
        await stack.enter_async_context(running(workers[1]))
        await enqueue_conversations(q, conversations=12, per_conversation=10, start=10)
        await stack.enter_async_context(running(workers[2]))
        await wait_until(lambda: tracker.total >= 240, timeout=30, what="all entries handled")
        # Every worker got a share once the three of them are live.
        await wait_until(
            lambda: all(1 <= len(w.owned_partitions) <= 3 for w in workers), what="a balanced spread"
        )
    assert tracker.overlaps == []
    assert tracker.max_parallel > 1  # different partitions did run concurrently
    assert len(tracker.order) == 12
    for conv, seqs in tracker.order.items():
        assert seqs == list(range(20)), conv
    await assert_queue_drained(new_redis(), settings)


async def test_scale_out_spreads_partitions_and_clean_stop_releases(
    backend: Backend, new_redis: RedisFactory
) -> None:
    settings = worker_settings(backend, queue_partitions=8)
    keys = RedisKeys(settings.redis_key_prefix)
    tracker = Tracker()
    a = make_worker(new_redis(), settings, tracker.process_for("a"), "a")
    b = make_worker(new_redis(), settings, tracker.process_for("b"), "b")
    async with running(a):
        await wait_until(lambda: len(a.owned_partitions) == 8, what="a owns everything")
        async with running(b):
            await wait_until(
                lambda: len(a.owned_partitions) == 4 and len(b.owned_partitions) == 4, what="4 + 4"
            )
            assert set(a.owned_partitions).isdisjoint(b.owned_partitions)
            redis = new_redis()
            holders = await redis.mget([keys.partition_lease(p) for p in range(8)])
            assert sorted(h.decode() for h in holders) == ["a"] * 4 + ["b"] * 4
        # b stopped cleanly: its leases are free at once (no TTL wait) and a takes them back.
        await wait_until(lambda: len(a.owned_partitions) == 8, timeout=5, what="a takes everything back")
        assert await redis.zscore(keys.workers(), "b") is None
    assert not await redis.exists(*[keys.partition_lease(p) for p in range(8)])


async def test_dead_worker_lease_expires_and_its_pending_entries_are_taken_over(
    backend: Backend, new_redis: RedisFactory
) -> None:
    settings = worker_settings(backend, queue_partitions=2, lease_ttl_ms=500)
    q = make_queue(new_redis(), settings)
    await enqueue_conversations(q, conversations=4, per_conversation=6)
    stuck_conv, stuck_seq = "kf:acc:user1", 2
    blocked = asyncio.Event()
    tracker = Tracker()
    a_done: list[str] = []

    async def process_a(entry: QueueEntry) -> None:
        if (entry.payload["conv"], entry.payload["seq"]) == (stuck_conv, stuck_seq):
            blocked.set()
            await asyncio.Event().wait()  # in-flight forever, until the "crash"
        await tracker.process_for("a")(entry)
        a_done.append(entry.entry_id)

    a = make_worker(new_redis(), settings, process_a, "a")
    released: list[int] = []

    async def record_release(partition: int) -> None:
        released.append(partition)

    a._release_lease = record_release  # type: ignore[method-assign]
    a_task = asyncio.create_task(a.run(asyncio.Event()))
    await asyncio.wait_for(blocked.wait(), timeout=10)
    stuck_partition = q.partition_for(stuck_conv)
    keys = RedisKeys(settings.redis_key_prefix)
    redis = new_redis()
    # Entries of the stuck partition that a read but did not finish are pending for a.
    assert (await redis.xpending(keys.inbound_stream(stuck_partition), CONSUMER_GROUP))["pending"] >= 1

    a_task.cancel()  # "dies": nothing acked, nothing released
    with contextlib.suppress(asyncio.CancelledError):
        await a_task
    # The lease of the partition in flight is left to expire, as after a real crash. (Another partition may
    # have been handed back on its own if, on a loaded machine, a renewal came late.)
    assert stuck_partition not in released

    b = make_worker(new_redis(), settings, tracker.process_for("b"), "b")
    started = time.monotonic()
    async with running(b):
        await wait_until(lambda: tracker.total == 24, timeout=15, what="b finishes a's work")
    assert time.monotonic() - started < 10
    assert tracker.handled_by[f"{stuck_conv}:{stuck_seq}"] == ["b"]
    assert tracker.overlaps == []
    for conv, seqs in tracker.order.items():
        assert seqs == list(range(6)), conv
    await assert_queue_drained(redis, settings)


async def test_hand_back_finishes_the_entry_in_flight_and_the_new_owner_continues_in_order(
    backend: Backend, new_redis: RedisFactory
) -> None:
    settings = worker_settings(backend, queue_partitions=2)
    q = make_queue(new_redis(), settings)
    conv = next(c for c in (f"kf:acc:user{i}" for i in range(100)) if q.partition_for(c) == 1)
    for seq in range(6):
        await q.enqueue_once(f"m{seq}", conv, "callback", {"conv": conv, "seq": seq})
    tracker = Tracker()
    in_flight, gate = asyncio.Event(), asyncio.Event()

    async def process_a(entry: QueueEntry) -> None:
        if entry.payload["seq"] == 2:
            in_flight.set()
            await gate.wait()
        await tracker.process_for("a")(entry)

    a = make_worker(new_redis(), settings, process_a, "a")
    b = make_worker(new_redis(), settings, tracker.process_for("b"), "b")
    async with running(a):
        await asyncio.wait_for(in_flight.wait(), timeout=10)
        async with running(b):
            # b is live, so a hands partition 1 back, but only after the entry in flight is done.
            await wait_until(lambda: a.owned_partitions == [0], what="a to hand partition 1 back")
            assert b.owned_partitions == []
            gate.set()
            await wait_until(lambda: tracker.total == 6, what="b to continue the conversation")
            assert b.owned_partitions == [1]
    assert tracker.order[conv] == list(range(6))
    assert [tracker.handled_by[f"{conv}:{s}"] for s in range(6)] == [["a"]] * 3 + [["b"]] * 3
    assert tracker.overlaps == []
