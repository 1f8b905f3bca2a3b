"""Alembic environment: configured by bot.storage.db (database_url or an open connection in attributes)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, text

from bot.storage.db import engine_for_url
from bot.storage.models import Base

# Any constant shared by every process of this app; serialises concurrent upgrades on PostgreSQL.
_PG_MIGRATION_LOCK_ID = 0x7765636F6D  # "wecom"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # A second process starting at the same time waits here, then finds nothing left to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_MIGRATION_LOCK_ID})
        context.run_migrations()


async def _run_with_new_engine(database_url: str) -> None:
    engine = engine_for_url(database_url, null_pool=True)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def _main() -> None:
    config = context.config
    if context.is_offline_mode():
        context.configure(
            url=config.attributes["database_url"],
            target_metadata=Base.metadata,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_with_new_engine(config.attributes["database_url"]))


_main()
