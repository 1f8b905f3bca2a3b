"""A worker process for tests/test_worker_crash.py (not a test module).

Runs a real WorkerRuntime whose process function records, in Redis, every entry it starts and finishes:
  {prefix}:test:started  hash  "conv:seq" -> times started
  {prefix}:test:done     hash  "conv:seq" -> times finished
  {prefix}:test:order:{conv}  list of seqs in the order they finished
With --block, the entry whose payload has "block": true is never finished (in-flight work until SIGKILL), and
{prefix}:test:blocked is set to this worker's id when that happens.
"""

from __future__ import annotations

import argparse
import asyncio

import redis.asyncio as redis_asyncio

from bot.queue import QueueEntry
from bot.settings import load_settings
from bot.worker import ProcessFn, run_worker_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--lease-ttl-ms", type=int, default=1000)
    parser.add_argument("--block", action="store_true")
    args = parser.parse_args()
    settings = load_settings(
        _env_file=None,
        redis_url=args.redis_url,
        redis_key_prefix=args.prefix,
        queue_partitions=args.partitions,
        lease_ttl_ms=args.lease_ttl_ms,
    )
    test_key = f"{args.prefix}:test"

    async def factory(redis: redis_asyncio.Redis) -> ProcessFn:
        async def process(entry: QueueEntry) -> None:
            conv, seq = entry.payload["conv"], entry.payload["seq"]
            name = f"{conv}:{seq}"
            await redis.hincrby(f"{test_key}:started", name, 1)
            if args.block and entry.payload.get("block"):
                await redis.set(f"{test_key}:blocked", args.worker_id)
                await asyncio.Event().wait()
            await asyncio.sleep(0.005)  # a little real work, so batches are in flight at once
            pipe = redis.pipeline(transaction=True)
            pipe.hincrby(f"{test_key}:done", name, 1)
            pipe.rpush(f"{test_key}:order:{conv}", seq)
            await pipe.execute()

        return process

    asyncio.run(run_worker_process(settings, factory, worker_id=args.worker_id))


if __name__ == "__main__":
    main()
