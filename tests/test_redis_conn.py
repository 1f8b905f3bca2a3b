"""create_redis: real connections pack commands with hiredis, byte for byte as redis-py's own packer would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from bot.redis_conn import create_redis
from tests.conftest import REAL_REDIS_URL, make_settings


@pytest.fixture
async def real_redis() -> AsyncIterator[redis_asyncio.Redis]:
    client = create_redis(make_settings(redis_url=REAL_REDIS_URL))
    yield client
    await client.aclose()


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "key", "value"),
        ("SET", "键", "中文值 with spaces", "EX", 60),
        ("EVALSHA", "0" * 40, 2, b"k1", b"k2", 3600, "callback", b'{"xml":"<xml/>"}', 1.5, -7, 0.1),
        ("SCRIPT LOAD", "return 1"),
        (b"CONFIG GET", "maxmemory"),
        ("XADD", "s", "*", "f", b"\x00\xff binary"),
    ],
)
def test_packing_matches_redis_py(args: tuple[Any, ...]) -> None:
    ours = create_redis(make_settings(redis_url=REAL_REDIS_URL)).connection_pool.connection_class()
    theirs = Connection()
    assert type(ours).__name__ == "HiredisConnection"
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))


@pytest.mark.parametrize("bad", [None, True, {"a": 1}])
def test_unpackable_argument_is_redis_pys_data_error(bad: object) -> None:
    connection = create_redis(make_settings(redis_url=REAL_REDIS_URL)).connection_pool.connection_class()
    with pytest.raises(DataError):
        connection.pack_command("SET", "key", bad)


def test_url_scheme_still_picks_the_connection_kind() -> None:
    pool = create_redis(make_settings(redis_url="unix:///tmp/redis.sock")).connection_pool
    assert pool.connection_class.__name__ == "HiredisUnixDomainSocketConnection"
    pool = create_redis(make_settings(redis_url="rediss://127.0.0.1:6380/0")).connection_pool
    assert pool.connection_class.__name__ == "HiredisSSLConnection"


async def test_round_trip_on_real_redis(real_redis: redis_asyncio.Redis) -> None:
    key = f"t{uuid.uuid4().hex[:10]}:packing"
    try:
        await real_redis.set(key, "中文 value", ex=60)
        assert await real_redis.get(key) == "中文 value".encode()
        script = real_redis.register_script("return {ARGV[1], ARGV[2], ARGV[3]}")
        assert await script(keys=[key], args=[42, 1.25, b"\xff"]) == [b"42", b"1.25", b"\xff"]
        assert await real_redis.config_get("maxmemory")
    finally:
        await real_redis.delete(key)
