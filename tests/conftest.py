"""Shared fixtures: every storage-touching test runs on the embedded defaults and on real services."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.settings import Settings, load_settings
from bot.storage.db import create_engine, upgrade_async

REAL_POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REAL_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# A fixed, valid test identity (never a real corp).
TEST_CORP_ID = "wwtestcorp0000001"
TEST_TOKEN = "testtoken123"
TEST_AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
TEST_SECRET = "test-app-secret"
TEST_KF_SECRET = "test-kf-secret"
TEST_AGENT_ID = 1000002


@dataclass(frozen=True)
class Backend:
    name: str  # "embedded" (SQLite + fakeredis) or "real" (PostgreSQL + Redis)
    database_url: str
    redis_url: str
    key_prefix: str


def _postgres_admin(sql: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(REAL_POSTGRES_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture
def _postgres_database() -> Iterator[str]:
    """A throw-away PostgreSQL database per test, so tests and parallel runs never see each other's rows."""
    name = f"wecom_test_{os.getpid()}_{secrets.token_hex(4)}"
    _postgres_admin(f'CREATE DATABASE "{name}"')
    base = REAL_POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["embedded", "real"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "embedded":
        yield Backend("embedded", f"sqlite+aiosqlite:///{tmp_path}/bot.sqlite3", "", prefix)
        return
    database_url = request.getfixturevalue("_postgres_database")
    yield Backend("real", database_url, REAL_REDIS_URL, prefix)
    _flush_prefix(prefix)


def _flush_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REAL_REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


LLM_FROM_ENVIRONMENT = False  # a test of the operator's switch sets this (monkeypatch) to read OPENAI_* from env


def make_settings(backend: Backend | None = None, **overrides: object) -> Settings:
    """Settings for a test: fixed test credentials, pointed at the given backend."""
    values: dict[str, object] = {
        "wecom_corp_id": TEST_CORP_ID,
        "wecom_token": TEST_TOKEN,
        "wecom_aes_key": TEST_AES_KEY,
        "wecom_agent_id": TEST_AGENT_ID,
        "wecom_secret": TEST_SECRET,
        "wecom_kf_secret": TEST_KF_SECRET,
        "_env_file": None,
    }
    if not LLM_FROM_ENVIRONMENT:
        # The LLM stays off unless a test switches it on: an exported OPENAI_BASE_URL must not reroute every test.
        values["openai_base_url"] = ""
    if backend is not None:
        values.update(
            database_url=backend.database_url,
            redis_url=backend.redis_url,
            redis_key_prefix=backend.key_prefix,
        )
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def settings(backend: Backend) -> Settings:
    return make_settings(backend)


@pytest.fixture
async def engine(backend: Backend) -> AsyncIterator[AsyncEngine]:
    """A migrated database on the test's backend."""
    eng = create_engine(make_settings(backend))
    await upgrade_async(eng)
    yield eng
    await eng.dispose()
