"""Engine and session factory for SQLite (embedded) or PostgreSQL, plus Alembic schema checks and upgrades."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, make_url, pool, text
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from bot.settings import Settings

SchemaStatus = Literal["current", "behind", "empty"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def _json_dumps(value: Any) -> str:
    # Readable Chinese in the database; str() for stray non-JSON values in raw WeCom payloads.
    return json.dumps(value, ensure_ascii=False, default=str)


def _normalise_url(database_url: str) -> str:
    """Accept the plain scheme spellings Settings accepts."""
    for plain, async_driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if database_url.startswith(plain):
            return async_driver + database_url[len(plain) :]
    return database_url


def _ensure_sqlite_dir(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return
    database = url.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _on_sqlite_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front, so a read-then-write transaction waits on busy_timeout
    # instead of failing with SQLITE_BUSY when another connection committed after its first read.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


DEFAULT_POOL_SIZE = 20
PREPARED_STATEMENT_CACHE = 500  # per connection; the bot's distinct statements outnumber asyncpg's default 100


def engine_for_url(database_url: str, *, null_pool: bool = False, pool_size: int = DEFAULT_POOL_SIZE) -> AsyncEngine:
    """An async engine for a database URL, configured as create_engine does."""
    url = _normalise_url(database_url)
    backend = make_url(url).get_backend_name()
    options: dict[str, Any] = {"json_serializer": _json_dumps}
    if null_pool:
        options["poolclass"] = pool.NullPool
    if backend == "sqlite":
        _ensure_sqlite_dir(url)
        # isolation_level=None hands BEGIN to SQLAlchemy (see _on_sqlite_begin) instead of the
        # sqlite3 module's legacy implicit transactions, which skip BEGIN before SELECT and DDL.
        options["connect_args"] = {"isolation_level": None, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        engine = create_async_engine(url, **options)
        event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
        event.listen(engine.sync_engine, "begin", _on_sqlite_begin)
        return engine
    if backend == "postgresql":
        options["connect_args"] = {
            "timeout": 10,
            "command_timeout": 60,
            "prepared_statement_cache_size": PREPARED_STATEMENT_CACHE,
            "server_settings": {"application_name": "wecom-bot", "timezone": "UTC"},
        }
        if not null_pool:
            # No pool_pre_ping: it costs a round trip and a BEGIN/ROLLBACK on every checkout (16 % of a busy
            # worker's CPU in bench/handoff.py). After a server restart the first statement on a dead connection
            # fails instead; SQLAlchemy then invalidates the whole pool, and the worker retries the entry.
            options.update(pool_size=pool_size, max_overflow=pool_size // 2, pool_timeout=10, pool_recycle=1800)
        return create_async_engine(url, **options)
    raise ValueError(f"unsupported database backend {backend!r}")


def create_engine(settings: Settings) -> AsyncEngine:
    """The application's async engine for settings.database_url."""
    return engine_for_url(settings.database_url, pool_size=settings.database_pool_size)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded values usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(database_url: str | None = None, connection: Connection | None = None) -> Config:
    # Built in code rather than read from alembic.ini so it works from any cwd and when installed.
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        # Passed as an attribute: a main option would go through configparser interpolation (% in passwords).
        config.attributes["database_url"] = _normalise_url(database_url)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest migration revision shipped with the code."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _current_heads(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())


async def schema_status(engine: AsyncEngine) -> SchemaStatus:
    """Compare the database's alembic_version with the code's head ("behind" covers any mismatch)."""
    async with engine.connect() as conn:
        heads = await conn.run_sync(_current_heads)
    if not heads:
        return "empty"
    if heads == (head_revision(),):
        return "current"
    return "behind"


def upgrade(database_url: str) -> None:
    """Run every pending migration (alembic upgrade head); blocks, safe to call with a loop running."""
    _ensure_sqlite_dir(_normalise_url(database_url))
    config = _alembic_config(database_url)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        command.upgrade(config, "head")
        return
    # env.py drives an async engine with asyncio.run, which cannot nest inside a running loop.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            command.upgrade(config, "head")
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)

    worker = threading.Thread(target=run, name="alembic-upgrade")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


async def upgrade_async(engine: AsyncEngine) -> None:
    """Run every pending migration on an existing engine, from async code."""

    def run(connection: Connection) -> None:
        command.upgrade(_alembic_config(connection=connection), "head")

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
