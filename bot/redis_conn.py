"""Create the Redis client: a real server when REDIS_URL is set, else in-process fakeredis."""

from __future__ import annotations

import redis.asyncio as redis_asyncio

from bot.settings import Settings


def create_redis(settings: Settings) -> redis_asyncio.Redis:
    if settings.redis_url:
        return redis_asyncio.Redis.from_url(settings.redis_url, decode_responses=False)
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=False)
