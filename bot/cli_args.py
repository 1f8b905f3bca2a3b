"""Argument types and the database runner shared by the `wecom-bot` subcommands."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from bot.settings import Settings


def positive_int(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def seconds(text: str) -> float:
    """A duration between 0 and 600 seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 600:
        raise argparse.ArgumentTypeError("must be between 0 and 600 seconds")
    return value


def run_with_database(work: Callable[[async_sessionmaker[AsyncSession], Settings], Awaitable[int]]) -> int:
    """Run one CLI command's database work: settings and logging, a migrated schema, then `work`; its exit code."""
    from bot.app import ensure_schema
    from bot.logs import configure_logging
    from bot.settings import load_settings
    from bot.storage.db import create_engine, create_session_factory

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json)

    async def run() -> int:
        engine = create_engine(settings)
        try:
            await ensure_schema(engine, settings)
            return await work(create_session_factory(engine), settings)
        finally:
            await engine.dispose()

    return asyncio.run(run())
