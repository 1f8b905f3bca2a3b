"""Workers: own partitions through leases and handle each partition's entries one at a time, in stream order.

- A partition is read only by the worker holding `keys.partition_lease(p)` (SET NX PX, renewed by its owner
  with a compare-and-pexpire, deleted on a clean exit). Each worker aims for ceil(partitions / live workers)
  leases and gives back extras, so starting another worker spreads the load; a dead worker's leases expire.
- Live workers heartbeat into `keys.workers()` (score = Redis server time in ms); a heartbeat older than the
  lease TTL is dead. `clock` only stamps entries and measures lag.
- On taking a partition the new owner first XAUTOCLAIMs whatever other consumers left pending (a dead or
  evicted owner), then handles all its own pending entries in id order, and only then reads new ones ('>').
- An entry is acked (and deleted) only after `process` returned. A failure counts an attempt
  (`keys.delivery_count(p)`), logs the error class only, and is retried after a short backoff; after
  `dead_letter_after` attempts the entry moves to the dead-letter stream so the partition moves on.
- Different partitions run concurrently (one asyncio task each); within a partition nothing runs concurrently.

Cancelling `run()` abandons everything exactly as a crash would (nothing acked or released; leases expire).
Setting the `stop` event is the clean exit: in-flight entries finish, leases are released at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

import redis.asyncio as redis_asyncio
import structlog
from redis.exceptions import ResponseError

from bot.metrics import Metrics
from bot.queue import InboundQueue, MalformedEntry, QueueEntry
from bot.redis_keys import RedisKeys
from bot.settings import Settings
from handlers.domain import Clock, SystemClock

log = structlog.get_logger(__name__)

ProcessFn = Callable[[QueueEntry], Awaitable[None]]

# Take a free lease, or keep one that is already ours (e.g. after our local bookkeeping dropped it).
_ACQUIRE_LUA = """
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Heartbeat on the server's clock (no skew between hosts), forget workers silent for a lease TTL, count the rest.
_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(eq=False)
class _Owned:
    """One partition this worker holds the lease of."""

    partition: int
    lease_deadline: float  # time.monotonic() after which we no longer assume the lease is ours
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    adopted: bool = False  # orphaned pending entries claimed since taking the lease
    task: asyncio.Task[None] | None = None
    next_sweep: float = 0.0


class WorkerRuntime:
    def __init__(
        self,
        redis: redis_asyncio.Redis,
        keys: RedisKeys,
        settings: Settings,
        process: ProcessFn,
        *,
        metrics: Metrics | None = None,
        clock: Clock,
        worker_id: str | None = None,
        block_ms: int = 250,
        batch_size: int = 16,
        retry_backoff_s: float = 0.1,
        retry_backoff_max_s: float = 5.0,
        idle_poll_s: float = 0.05,
        metrics_interval_s: float = 5.0,
        shutdown_grace_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.process = process
        self.metrics = metrics
        self.clock = clock
        self.worker_id = worker_id or default_worker_id()
        self.queue = InboundQueue(
            redis, keys, settings.queue_partitions, settings.dedupe_ttl_s, metrics, clock=clock
        )
        self.partitions = settings.queue_partitions
        self.lease_ttl_ms = settings.lease_ttl_ms
        self.dead_letter_after = settings.dead_letter_after
        self.reclaim_idle_ms = settings.reclaim_idle_ms
        self.block_ms = block_ms
        self.batch_size = batch_size
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.idle_poll_s = idle_poll_s
        self.metrics_interval_s = metrics_interval_s
        self.shutdown_grace_s = shutdown_grace_s
        self.tick_s = settings.lease_ttl_ms / 3000.0
        self._owned: dict[int, _Owned] = {}
        self._groups_ready = False
        self._next_metrics = 0.0
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._heartbeat = redis.register_script(_HEARTBEAT_LUA)
        # Start looking for free partitions at a worker-specific offset, so workers rarely race for one lease.
        self._offset = zlib.crc32(self.worker_id.encode()) % self.partitions

    @property
    def owned_partitions(self) -> list[int]:
        """Partitions held and being worked (not the ones being handed back)."""
        return sorted(p for p, o in self._owned.items() if not o.stop.is_set())

    # ---- public entry points -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then finish in-flight entries, release leases and deregister."""
        log.info("worker_started", worker_id=self.worker_id, partitions=self.partitions)
        try:
            while not stop.is_set():
                try:
                    await self._ensure_groups()
                    await self._maintain(spawn=True)
                    if time.monotonic() >= self._next_metrics:
                        self._next_metrics = time.monotonic() + self.metrics_interval_s
                        await self.queue.refresh_metrics()
                except (TimeoutError, OSError, ConnectionError, ResponseError) as exc:
                    log.warning("worker_maintenance_failed", error_class=type(exc).__name__)
                except Exception as exc:
                    log.error("worker_maintenance_failed", error_class=type(exc).__name__)
                await _wait(stop, self.tick_s)
        except BaseException:
            await self._abandon()
            raise
        await self.shutdown()
        log.info("worker_stopped", worker_id=self.worker_id)

    async def run_once(self) -> int:
        """Handle what is available now, without blocking; returns how many entries were finished.

        Finished means acked after `process` returned, or moved to the dead-letter stream. An entry whose
        `process` fails (below the dead-letter threshold) gets one attempt per call and stops its partition
        for this call, so the next call retries it before anything newer. Leases taken are kept (and renewed
        by the next call) until `shutdown()`. Do not mix with `run()` on the same runtime.
        """
        await self._ensure_groups()
        await self._maintain(spawn=False)
        owned = [o for o in self._owned.values() if not o.stop.is_set()]
        counts = await asyncio.gather(*(self._serve(o, once=True) for o in owned))
        await self.queue.refresh_metrics()
        return sum(counts)

    async def shutdown(self) -> None:
        """Clean exit: let in-flight entries finish (bounded), release every lease, remove the heartbeat."""
        for o in self._owned.values():
            o.stop.set()
        tasks = {o.task for o in self._owned.values() if o.task is not None and not o.task.done()}
        deadline = time.monotonic() + self.shutdown_grace_s
        while tasks and time.monotonic() < deadline:
            _done, tasks = await asyncio.wait(tasks, timeout=min(self.tick_s, deadline - time.monotonic()))
            if tasks:  # still finishing: nobody may take these partitions yet
                await _quietly(self._renew_all())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for partition in list(self._owned):
            await self._release_lease(partition)
        self._owned.clear()
        try:
            await self.redis.zrem(self.keys.workers(), self.worker_id)
        except (OSError, ConnectionError, ResponseError) as exc:
            log.warning("worker_deregister_failed", error_class=type(exc).__name__)

    # ---- leases and balance --------------------------------------------------------------------------------

    async def _ensure_groups(self) -> None:
        if not self._groups_ready:
            await self.queue.ensure_groups()
            self._groups_ready = True

    async def _maintain(self, *, spawn: bool) -> None:
        """Heartbeat, renew held leases, hand back extras, take free partitions up to the fair share."""
        ttl_s = self.lease_ttl_ms / 1000.0
        live = int(
            await self._heartbeat(keys=[self.keys.workers()], args=[self.worker_id, self.lease_ttl_ms])
        )
        target = math.ceil(self.partitions / max(1, live))

        for partition, o in list(self._owned.items()):
            if o.task is not None and o.task.done():
                del self._owned[partition]
                if not o.task.cancelled() and o.task.exception() is not None:
                    exc = o.task.exception()
                    log.error("partition_task_failed", partition=partition, error_class=type(exc).__name__)

        await self._renew_all()

        active = sorted((o for o in self._owned.values() if not o.stop.is_set()), key=lambda o: o.partition)
        if len(active) > target:
            for o in active[target:]:
                log.info(
                    "partition_handing_back", partition=o.partition, worker_id=self.worker_id, target=target
                )
                o.stop.set()
                if o.task is None:
                    await self._release_lease(o.partition)
                    del self._owned[o.partition]
            return
        if len(active) >= target:
            return
        lease_keys = [self.keys.partition_lease(p) for p in range(self.partitions)]
        holders = await self.redis.mget(lease_keys)
        me = self.worker_id.encode()
        for i in range(self.partitions):
            partition = (self._offset + i) % self.partitions
            if len(active) >= target:
                break
            holder = holders[partition]
            if partition in self._owned or (holder is not None and _as_bytes(holder) != me):
                continue
            started = time.monotonic()
            lease = [lease_keys[partition]]
            taken = await self._acquire(keys=lease, args=[self.worker_id, self.lease_ttl_ms])
            if not taken:
                continue
            o = _Owned(partition, lease_deadline=started + ttl_s)
            self._owned[partition] = o
            active.append(o)
            log.info("partition_acquired", partition=partition, worker_id=self.worker_id, target=target)
            if spawn:
                o.task = asyncio.create_task(self._partition_task(o), name=f"partition-{partition}")

    async def _renew_all(self) -> None:
        """Extend every lease still in use (a finished task has released its own)."""
        held = [o for o in self._owned.values() if o.task is None or not o.task.done()]
        if not held:
            return
        started = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        for o in held:
            await self._renew(
                keys=[self.keys.partition_lease(o.partition)],
                args=[self.worker_id, self.lease_ttl_ms],
                client=pipe,
            )
        results = await pipe.execute()
        for o, ok in zip(held, results, strict=True):
            if int(ok):
                o.lease_deadline = started + self.lease_ttl_ms / 1000.0
                continue
            if not o.stop.is_set():  # when stopping, the task may just have released it itself
                log.warning("partition_lease_lost", partition=o.partition, worker_id=self.worker_id)
            o.stop.set()
            o.lease_deadline = 0.0
            if o.task is None:
                del self._owned[o.partition]

    async def _release_lease(self, partition: int) -> None:
        try:
            await self._release(keys=[self.keys.partition_lease(partition)], args=[self.worker_id])
        except (OSError, ConnectionError, ResponseError) as exc:
            log.warning("partition_release_failed", partition=partition, error_class=type(exc).__name__)

    async def _abandon(self) -> None:
        """Cancelled: stop everything as a crash would, without acking or releasing anything."""
        tasks = [o.task for o in self._owned.values() if o.task is not None and not o.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._owned.clear()

    # ---- one partition -------------------------------------------------------------------------------------

    def _may_work(self, o: _Owned) -> bool:
        return not o.stop.is_set() and time.monotonic() < o.lease_deadline

    async def _partition_task(self, o: _Owned) -> None:
        try:
            await self._serve(o, once=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # _serve retries its own errors; this is a bug, so give the partition back
            log.error("partition_task_crashed", partition=o.partition, error_class=type(exc).__name__)
        o.stop.set()
        await self._release_lease(o.partition)
        log.info("partition_released", partition=o.partition, worker_id=self.worker_id)

    async def _serve(self, o: _Owned, *, once: bool) -> int:
        """Handle the partition's entries in order: adopted/own pending first, then new ones."""
        p = o.partition
        finished = 0
        cursor: str | None = "0-0"  # paging through our pending entries; None once reading new ones
        error_backoff = self.retry_backoff_s
        while self._may_work(o):
            try:
                if not o.adopted:
                    claimed = await self.queue.claim_orphans(p, self.worker_id, 0)
                    if claimed:
                        log.info("partition_adopted_pending", partition=p, entries=claimed)
                    o.adopted = True
                    o.next_sweep = time.monotonic() + self.reclaim_idle_ms / 1000.0
                    cursor = "0-0"
                if cursor is not None:
                    batch = await self.queue.read(p, self.worker_id, cursor, self.batch_size)
                    if not batch:
                        cursor = None
                        continue
                    cursor = batch[-1][0]
                    attempts = await self.queue.attempts(p, [entry_id for entry_id, _ in batch])
                else:
                    started = time.monotonic()
                    batch = await self.queue.read(
                        p, self.worker_id, ">", self.batch_size, None if once else self.block_ms
                    )
                    if not batch:
                        if once:
                            return finished
                        if await self._sweep(o):
                            cursor = "0-0"
                        elif time.monotonic() - started < self.block_ms / 2000.0:
                            # The server answered at once (fakeredis does not block): poll gently.
                            await _wait(o.stop, self.idle_poll_s)
                        continue
                    attempts = [0] * len(batch)
                for (entry_id, fields), tries in zip(batch, attempts, strict=True):
                    if not self._may_work(o):
                        return finished
                    if not await self._handle(o, entry_id, fields, tries, retry=not once):
                        return finished
                    finished += 1
                error_backoff = self.retry_backoff_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if once:
                    raise
                log.warning("partition_read_failed", partition=p, error_class=type(exc).__name__)
                cursor = "0-0"  # anything read but not finished is pending: start over from there
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self._groups_ready = False
                    await _quietly(self.queue.ensure_group(p))
                await _wait(o.stop, error_backoff)
                error_backoff = min(error_backoff * 2, self.retry_backoff_max_s)
        return finished

    async def _sweep(self, o: _Owned) -> bool:
        """Now and then, take over entries another consumer has held for longer than RECLAIM_IDLE_MS.

        Only possible after a split brain (an old owner that read after losing its lease); returns True if
        anything was claimed.
        """
        if time.monotonic() < o.next_sweep:
            return False
        o.next_sweep = time.monotonic() + self.reclaim_idle_ms / 1000.0
        return await self.queue.claim_orphans(o.partition, self.worker_id, self.reclaim_idle_ms) > 0

    async def _handle(
        self, o: _Owned, entry_id: str, fields: Mapping[str, str], attempts: int, *, retry: bool
    ) -> bool:
        """Run one entry to completion; False if it is still pending (failed without retry, or stopping)."""
        p = o.partition
        if not fields:  # deleted from the stream while pending: nothing to do
            await self.queue.ack(p, entry_id)
            return True
        try:
            entry = self.queue.parse(p, entry_id, fields, attempts)
        except MalformedEntry as exc:
            await self._dead_letter(p, entry_id, fields, "-", attempts + 1, exc)
            return True
        while True:
            try:
                await self.process(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                tries = await self.queue.record_failure(p, entry_id)
                self._count("failed")
                log.warning(
                    "queue_entry_failed",
                    partition=p,
                    entry_id=entry_id,
                    kind=entry.kind,
                    attempt=tries,
                    error_class=type(exc).__name__,
                )
                # An entry that cannot be read will not become readable by retrying it.
                if tries >= self.dead_letter_after or isinstance(exc, MalformedEntry):
                    await self._dead_letter(p, entry_id, fields, entry.kind, tries, exc)
                    return True
                if not retry:
                    return False
                delay = min(self.retry_backoff_s * 2 ** (tries - 1), self.retry_backoff_max_s)
                if await _wait(o.stop, delay) or not self._may_work(o):
                    return False
                entry = replace(entry, attempts=tries)
                continue
            await self.queue.ack(p, entry_id)
            self._count("handled")
            return True

    async def _dead_letter(
        self, p: int, entry_id: str, fields: Mapping[str, str], kind: str, attempts: int, exc: BaseException
    ) -> None:
        moved = await self.queue.dead_letter(
            p,
            entry_id,
            fields,
            attempts=attempts,
            error_class=type(exc).__name__,
            error=f"{type(exc).__name__}: {exc}",
            worker_id=self.worker_id,
        )
        if moved:
            self._count("dead_lettered")
            if self.metrics is not None:
                self.metrics.dead_letters.inc()
        log.error(
            "queue_entry_dead_lettered",
            partition=p,
            entry_id=entry_id,
            kind=kind,
            attempts=attempts,
            error_class=type(exc).__name__,
        )

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.entries_processed.labels(outcome).inc()


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; True if it is set."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


async def _quietly(awaitable: Awaitable[None]) -> None:
    try:
        await awaitable
    except Exception as exc:
        log.warning("worker_recovery_failed", error_class=type(exc).__name__)


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


async def run_worker_process(
    settings: Settings,
    process_factory: Callable[[redis_asyncio.Redis], Awaitable[ProcessFn]],
    *,
    stop: asyncio.Event | None = None,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    worker_id: str | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT (or `stop`): the body of a `wecom-bot worker` process.

    `process_factory` gets the Redis client and returns the function that handles one entry.
    """
    from bot.redis_conn import create_redis

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not supported here
            pass
    redis = create_redis(settings)
    try:
        process = await process_factory(redis)
        runtime = WorkerRuntime(
            redis,
            RedisKeys(settings.redis_key_prefix),
            settings,
            process,
            metrics=metrics,
            clock=clock or SystemClock(),
            worker_id=worker_id,
        )
        await runtime.run(stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await redis.aclose()
