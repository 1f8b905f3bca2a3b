"""Create the Redis client: a real server when REDIS_URL is set, else in-process fakeredis."""

from __future__ import annotations

import redis.asyncio as redis_asyncio

from bot.settings import Settings

# A burst of callbacks waits briefly for a pooled connection instead of failing (which would make WeCom retry).
POOL_WAIT_S = 2.0


def create_redis(settings: Settings) -> redis_asyncio.Redis:
    if settings.redis_url:
        # Every owned partition parks one blocking XREADGROUP on a pooled connection; keep room for the rest.
        blocking_reads = settings.queue_partitions * max(settings.worker_concurrency, 1)
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=max(settings.redis_max_connections, blocking_reads + 16),
            timeout=POOL_WAIT_S,
        )
        return redis_asyncio.Redis(connection_pool=pool, decode_responses=False)
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=False)
