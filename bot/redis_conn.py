"""Create the Redis client: a real server when REDIS_URL is set, else in-process fakeredis."""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as redis_asyncio
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError

from bot.settings import Settings

# A burst of callbacks waits briefly for a pooled connection instead of failing (which would make WeCom retry).
POOL_WAIT_S = 2.0


class _HiredisPacking:
    """Pack commands with hiredis's C encoder.

    redis-py's asyncio connections build RESP in Python, one call per argument; the callback hot path sends
    eight arguments per callback, which made packing the largest single cost of an enqueue. The sync client
    already offers this (`HiredisRespSerializer`); this is the same for the asyncio client. Default encoding
    only (UTF-8, strict), which is what this project uses.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py does: "SCRIPT LOAD" and friends arrive as one string and go out as separate arguments.
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # None, bool, dict...: redis-py's own error for the same mistake
            raise DataError(str(exc)) from None


def _with_hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    return type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})


def create_redis(settings: Settings) -> redis_asyncio.Redis:
    if settings.redis_url:
        # Every owned partition parks one blocking XREADGROUP on a pooled connection; keep room for the rest.
        blocking_reads = settings.queue_partitions * max(settings.worker_concurrency, 1)
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=max(settings.redis_max_connections, blocking_reads + 16),
            timeout=POOL_WAIT_S,
        )
        # from_url picks the class from the URL scheme (TCP, TLS or unix socket); keep that choice.
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
        return redis_asyncio.Redis(connection_pool=pool, decode_responses=False)
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=False)
