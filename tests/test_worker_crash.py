"""A worker process is SIGKILLed with entries in flight; the others take over and nothing is lost (real Redis)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from bot.queue import InboundQueue
from bot.redis_keys import CONSUMER_GROUP, RedisKeys
from tests.conftest import REAL_REDIS_URL, _flush_prefix

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "worker_crash_helper.py"
PARTITIONS = 4
LEASE_TTL_MS = 1000


def _real_redis_up() -> bool:
    import redis

    try:
        client = redis.Redis.from_url(REAL_REDIS_URL, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


@pytest.fixture
def prefix() -> Iterator[str]:
    if not _real_redis_up():
        pytest.skip("real Redis is not reachable")
    name = f"tcrash{uuid.uuid4().hex[:8]}"
    yield name
    _flush_prefix(name)


class Workers:
    def __init__(self, prefix: str, logs: Path) -> None:
        self.prefix = prefix
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, worker_id: str, *, block: bool = False) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, str(HELPER),
            "--redis-url", REAL_REDIS_URL,
            "--prefix", self.prefix,
            "--worker-id", worker_id,
            "--partitions", str(PARTITIONS),
            "--lease-ttl-ms", str(LEASE_TTL_MS),
        ]  # fmt: skip
        if block:
            cmd.append("--block")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = (self.logs / f"{worker_id}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[worker_id] = proc
        return proc

    def output(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{(self.logs / f'{name}.log').read_text(errors='replace')[-3000:]}"
            for name in self.procs
        )

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


async def wait_until(condition: Callable[[], Any], timeout: float, what: str, workers: Workers) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{workers.output()}")
        await asyncio.sleep(0.05)


async def test_sigkilled_worker_in_flight_entries_are_taken_over(prefix: str, tmp_path: Path) -> None:
    redis = redis_asyncio.Redis.from_url(REAL_REDIS_URL)
    keys = RedisKeys(prefix)
    queue = InboundQueue(redis, keys, PARTITIONS, 3600)
    test_key = f"{prefix}:test"
    workers = Workers(prefix, tmp_path)
    try:
        await queue.ensure_groups()
        conversations, per_conversation = 6, 10
        blocked_conv, blocked_seq = "kf:acc:user0", 3
        blocked_partition = queue.partition_for(blocked_conv)
        # Entries stuck behind the blocked one: same partition, enqueued at or after it.
        stuck: set[str] = set()
        for seq in range(per_conversation):
            for c in range(conversations):
                conv = f"kf:acc:user{c}"
                block = (conv, seq) == (blocked_conv, blocked_seq)
                payload = {"conv": conv, "seq": seq, "block": block}
                assert await queue.enqueue_once(f"{conv}:{seq}", conv, "callback", payload)
                if queue.partition_for(conv) == blocked_partition and (block or stuck):
                    stuck.add(f"{conv}:{seq}")
        total = conversations * per_conversation

        async def done_count() -> int:
            return int(await redis.hlen(f"{test_key}:done"))

        workers.start("a", block=True)
        await wait_until(lambda: redis.get(f"{test_key}:blocked"), 20, "worker a to block", workers)
        workers.start("b")
        await wait_until(lambda: redis.zscore(keys.workers(), "b"), 20, "worker b to start", workers)
        # Let everything not stuck behind the blocked entry finish, so a is idle except for the blocked one.
        await wait_until(
            lambda: _eq(done_count(), total - len(stuck)), 20, "entries not behind the blocked one", workers
        )
        pending = await redis.xpending_range(
            keys.inbound_stream(blocked_partition), CONSUMER_GROUP, "-", "+", 100
        )
        assert pending and {p["consumer"] for p in pending} == {b"a"}  # a holds in-flight entries

        workers.procs["a"].send_signal(signal.SIGKILL)
        assert workers.procs["a"].wait(timeout=10) == -signal.SIGKILL
        workers.start("c")
        # c is up (signal handlers installed, heartbeat written) before anything is asked of it.
        await wait_until(lambda: redis.zscore(keys.workers(), "c"), 20, "worker c to start", workers)

        await wait_until(lambda: _eq(done_count(), total), 30, "every entry handled after the crash", workers)
        await wait_until(lambda: _eq(queue.depth(), 0), 10, "the queue to drain", workers)
        for p in range(PARTITIONS):
            assert (await redis.xpending(keys.inbound_stream(p), CONSUMER_GROUP))["pending"] == 0
        assert await queue.dead_letter_count() == 0

        done = {k.decode(): int(v) for k, v in (await redis.hgetall(f"{test_key}:done")).items()}
        started = {k.decode(): int(v) for k, v in (await redis.hgetall(f"{test_key}:started")).items()}
        assert len(done) == total and set(done.values()) == {1}
        assert started.pop(f"{blocked_conv}:{blocked_seq}") == 2  # in flight at a, then redone
        assert set(started.values()) == {1}
        for c in range(conversations):
            order = [int(x) for x in await redis.lrange(f"{test_key}:order:kf:acc:user{c}", 0, -1)]
            assert order == list(range(per_conversation)), c

        for name in ("b", "c"):
            workers.procs[name].send_signal(signal.SIGTERM)
        for name in ("b", "c"):
            assert workers.procs[name].wait(timeout=15) == 0, workers.output()
        # Clean exits hand every lease back and leave the live-worker set.
        assert not await redis.exists(*[keys.partition_lease(p) for p in range(PARTITIONS)])
        assert await redis.zscore(keys.workers(), "b") is None
        assert await redis.zscore(keys.workers(), "c") is None
    finally:
        workers.kill_all()
        await redis.aclose()


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
