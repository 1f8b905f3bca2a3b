"""APScheduler 3.x wiring: which job runs when. The jobs themselves are in scheduler/jobs.py.

The in-memory job store is enough: the schedule is rebuilt from settings at every start, and the only job so far
(the daily tag recompute) is idempotent. No leader guard either: when several replicas each run the 03:30 slot,
every customer's tags end up the same (each customer is replaced in one transaction, and a customer recomputed
within the last hours is skipped), so the cost is some duplicated reads, never a wrong result. A job with
side effects (sending messages) will need a per-slot Redis key so only one replica runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from scheduler.jobs import TagRecomputePort, recompute_tags_job

RECOMPUTE_TAGS_JOB_ID = "recompute-tags"
DEFAULT_RECOMPUTE_CRON = "30 3 * * *"  # 03:30, before the shop opens
DEFAULT_TIMEZONE = "Asia/Shanghai"


@dataclass(frozen=True, slots=True)
class RecomputeSchedule:
    cron: str = DEFAULT_RECOMPUTE_CRON  # minute hour day month weekday
    timezone: str = DEFAULT_TIMEZONE
    page_size: int = 500
    max_customers: int = 1_000_000


def _utc_now() -> datetime:
    return datetime.now(UTC)


def build_scheduler(
    tag_port: TagRecomputePort,
    schedule: RecomputeSchedule | None = None,
    *,
    now: Callable[[], datetime] = _utc_now,
) -> AsyncIOScheduler:
    """A scheduler (not started) with the daily tag recompute; start() it inside the running event loop."""
    schedule = schedule or RecomputeSchedule()
    scheduler = AsyncIOScheduler(timezone=schedule.timezone)

    async def recompute_tags() -> None:
        await recompute_tags_job(tag_port, now(), page_size=schedule.page_size, max_customers=schedule.max_customers)

    scheduler.add_job(
        recompute_tags,
        CronTrigger.from_crontab(schedule.cron, timezone=schedule.timezone),
        id=RECOMPUTE_TAGS_JOB_ID,
        name="recompute computed customer tags",
        replace_existing=True,
        max_instances=1,  # a slow run is never overlapped by the next one
        coalesce=True,  # runs missed while the process was down collapse into one
        misfire_grace_time=3600,
    )
    return scheduler
