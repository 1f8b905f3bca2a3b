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
from typing import Protocol

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from scheduler.jobs import ReminderPort, TagRecomputePort, daily_reminders_job, recompute_tags_job
from scheduler.slots import cron_trigger

log = structlog.get_logger(__name__)

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


# ---- scheduled posts (issue 5) -------------------------------------------------------------------------------
#
# The delivery engine lives in bot/ (it does I/O) and reaches this module as two ports. The job store stays in
# memory on purpose: the durable truth is the delivery table (slots are derived from each post's rule and its
# watermark; a row per (post, target, slot) records what happened), so a restarted process rebuilds this one
# interval job from code and loses nothing. docs/scheduling.md explains the choice.

POST_TICK_JOB_ID = "post-tick"
DEFAULT_POST_TICK_S = 5.0


class PostTickPort(Protocol):
    """The delivery engine as the scheduler sees it: one pass at `now`."""

    async def tick(self, now: datetime) -> object: ...


class LeaderPort(Protocol):
    """Whether this instance is the scheduling leader right now (only the leader ticks)."""

    @property
    def is_leader(self) -> bool: ...


async def post_tick_job(engine: PostTickPort, leader: LeaderPort, now: datetime) -> bool:
    """Run one delivery pass if this instance leads; True when it ran."""
    if not leader.is_leader:
        return False
    await engine.tick(now)
    return True


def add_post_tick_job(
    scheduler: AsyncIOScheduler,
    engine: PostTickPort,
    leader: LeaderPort,
    *,
    interval_s: float = DEFAULT_POST_TICK_S,
    now: Callable[[], datetime] = _utc_now,
) -> None:
    """Every `interval_s`: one delivery pass on the leader (never overlapping; late runs collapse into one)."""

    async def post_tick() -> None:
        try:
            await post_tick_job(engine, leader, now())
        except Exception:
            log.exception("post tick failed")  # the next tick retries; rows keep their state

    scheduler.add_job(
        post_tick,
        IntervalTrigger(seconds=interval_s),
        id=POST_TICK_JOB_ID,
        name="deliver scheduled posts",
        replace_existing=True,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=max(1, int(interval_s)),
    )


def build_post_scheduler(
    engine: PostTickPort,
    leader: LeaderPort,
    *,
    interval_s: float = DEFAULT_POST_TICK_S,
    timezone: str = DEFAULT_TIMEZONE,
    now: Callable[[], datetime] = _utc_now,
) -> AsyncIOScheduler:
    """A scheduler (not started) with only the post tick; start() it inside the running event loop."""
    scheduler = AsyncIOScheduler(timezone=timezone)
    add_post_tick_job(scheduler, engine, leader, interval_s=interval_s, now=now)
    return scheduler


# ---- reminders (issue 5 item 6) --------------------------------------------------------------------------------
#
# A cron job on the post scheduler: the leader creates the day's reminder posts (digest to leads, churn recall,
# repurchase), which the post tick then delivers. The default fires hourly 09:00-11:00: each run is idempotent for
# the local day, so the later runs only catch up a day whose 09:00 found no leader (a fleet restarting then).

REMINDERS_JOB_ID = "daily-reminders"
DEFAULT_REMINDERS_CRON = "0 9-11 * * *"


async def reminders_job(port: ReminderPort, leader: LeaderPort, now: datetime) -> bool:
    """Run the daily reminders if this instance leads; True when it ran."""
    if not leader.is_leader:
        return False
    await daily_reminders_job(port, now)
    return True


def add_reminders_job(
    scheduler: AsyncIOScheduler,
    port: ReminderPort,
    leader: LeaderPort,
    *,
    cron: str = DEFAULT_REMINDERS_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    now: Callable[[], datetime] = _utc_now,
) -> None:
    """On `cron` (in `timezone`): the day's reminder posts, on the leader only (never overlapping)."""

    async def daily_reminders() -> None:
        try:
            await reminders_job(port, leader, now())
        except Exception:
            log.exception("daily reminders failed")  # the next run of the day retries; nothing is created twice

    scheduler.add_job(
        daily_reminders,
        cron_trigger(cron, timezone),  # crontab weekdays (0/7 = Sunday), unlike APScheduler's from_crontab
        id=REMINDERS_JOB_ID,
        name="create the daily reminder posts",
        replace_existing=True,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=1800,
    )
