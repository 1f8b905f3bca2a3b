"""The daily recompute of computed tags: the job on both backends, thresholds from settings, the schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.app import TagRecomputeAdapter, recompute_schedule
from bot.orders_import import import_orders
from bot.settings import SettingsError
from bot.storage.models import Customer
from bot.storage.tags_repository import TagRepository
from handlers.domain import Channel
from handlers.tags import TagConfig
from scheduler.jobs import recompute_tags_job
from scheduler.runner import RECOMPUTE_TAGS_JOB_ID, RecomputeSchedule, build_scheduler
from tests.conftest import Backend, make_settings

# The order-import tests' storage fixtures (same backend, clock and repository), shared rather than copied.
from tests.test_orders_import import HEADER, NOW, FakeClock, clock, repo, sessions  # noqa: F401

SHANGHAI = ZoneInfo("Asia/Shanghai")
VIP = {"高价值", "rfm:high", "lifecycle:mature", "activity:active"}


async def contact_id(sessions: async_sessionmaker[AsyncSession], external_id: str) -> int:
    async with sessions() as session:
        stmt = select(Customer.id).where(Customer.channel == Channel.CONTACT.value, Customer.external_id == external_id)
        return int((await session.execute(stmt)).scalar_one())


def ago(days: int) -> str:
    return (NOW - timedelta(days=days)).isoformat()


async def seed(repo: TagRepository) -> None:
    rows = [f"wmVip,SO-V{d},400,{ago(d)}" for d in (2, 20, 40, 60, 80, 100, 150, 200, 250, 300)]
    # Three ¥400 orders this month: R5 + F3 + M4 = 12, exactly the default rfm_high_total.
    rows += [f"wmEdge,SO-E{d},400,{ago(d)}" for d in (3, 15, 25)]
    rows.append(f"wmOld,SO-O1,30,{ago(200)}")  # one small order long ago
    report = await import_orders(HEADER + "\n".join(rows) + "\n", repo, now=NOW)
    assert report.ok and report.imported == len(rows)


async def test_job_computes_expected_tags(repo: TagRepository, sessions: async_sessionmaker[AsyncSession]) -> None:
    await seed(repo)
    port = TagRecomputeAdapter(repo, make_settings().tag_config)

    result = await recompute_tags_job(port, NOW, page_size=2)  # two pages and a bit

    assert (result.examined, result.recomputed, result.failed, result.truncated) == (3, 3, 0, False)
    assert await repo.customer_tags(await contact_id(sessions, "wmVip")) == VIP
    assert await repo.customer_tags(await contact_id(sessions, "wmEdge")) == {
        "高价值",
        "rfm:high",
        "lifecycle:mature",
        "activity:active",
    }
    old = await repo.customer_tags(await contact_id(sessions, "wmOld"))
    assert {"rfm:low", "lifecycle:dormant"} <= old and "高价值" not in old

    # Idempotent and resumable: a second run the same day finds nothing to do; the next day redoes everyone.
    assert (await recompute_tags_job(port, NOW)).examined == 0
    later = NOW + timedelta(days=120)
    assert (await recompute_tags_job(port, later)).recomputed == 3
    assert "流失" in await repo.customer_tags(await contact_id(sessions, "wmVip"))


async def test_job_is_bounded(repo: TagRepository) -> None:
    await seed(repo)
    port = TagRecomputeAdapter(repo, TagConfig())

    first = await recompute_tags_job(port, NOW, page_size=1, max_customers=2)
    assert (first.examined, first.truncated) == (2, True)
    rest = await recompute_tags_job(port, NOW, page_size=1, max_customers=2)
    assert (rest.examined, rest.truncated) == (1, False)


async def test_thresholds_from_settings_change_the_outcome(
    repo: TagRepository,
    sessions: async_sessionmaker[AsyncSession],
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seed(repo)
    monkeypatch.setenv("TAG_RFM_HIGH_TOTAL", "13")
    monkeypatch.setenv("TAG_MONETARY_CENTS", "20000,50000,100000,500000")
    settings = make_settings(backend)
    assert settings.tag_config == TagConfig(rfm_high_total=13, monetary_cents=(20_000, 50_000, 100_000, 500_000))

    await recompute_tags_job(TagRecomputeAdapter(repo, settings.tag_config), NOW)

    assert await repo.customer_tags(await contact_id(sessions, "wmEdge")) == {
        "rfm:medium",
        "lifecycle:mature",
        "activity:active",
    }
    assert await repo.customer_tags(await contact_id(sessions, "wmVip")) == VIP  # 5+5+4 = 14 still high


def test_bad_thresholds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAG_ACTIVE_DAYS", "120")  # beyond churned_days (90)
    with pytest.raises(SettingsError, match="active_days < churned_days"):
        make_settings()
    monkeypatch.delenv("TAG_ACTIVE_DAYS")
    monkeypatch.setenv("TAG_RECENCY_DAYS", "7,30")
    with pytest.raises(SettingsError, match="TAG_RECENCY_DAYS"):
        make_settings()
    monkeypatch.delenv("TAG_RECENCY_DAYS")
    with pytest.raises(SettingsError, match="TAG_RECOMPUTE_CRON"):
        make_settings(tag_recompute_cron="every day")


class RecordingPort:
    def __init__(self) -> None:
        self.calls: list[tuple[int, datetime]] = []

    async def customers_needing_recompute(
        self, stale_before: datetime, *, after_id: int = 0, limit: int = 1000
    ) -> list[int]:
        return [i for i in (1, 2, 3) if i > after_id][:limit]

    async def recompute(self, customer_id: int, now: datetime) -> frozenset[str] | None:
        self.calls.append((customer_id, now))
        if customer_id == 2:
            raise RuntimeError("boom")
        return frozenset({"rfm:none"})


async def test_runner_registers_daily_job_at_0330_shanghai() -> None:
    port = RecordingPort()
    scheduler = build_scheduler(port, recompute_schedule(make_settings()), now=lambda: NOW)

    job = scheduler.get_job(RECOMPUTE_TAGS_JOB_ID)
    assert job is not None and [j.id for j in scheduler.get_jobs()] == [RECOMPUTE_TAGS_JOB_ID]
    trigger = job.trigger
    assert isinstance(trigger, CronTrigger)
    assert str(trigger) == "cron[month='*', day='*', day_of_week='*', hour='3', minute='30']"
    assert str(trigger.timezone) == "Asia/Shanghai"
    assert job.max_instances == 1 and job.coalesce
    fire = trigger.get_next_fire_time(None, NOW)
    assert fire == datetime(2025, 6, 2, 3, 30, tzinfo=SHANGHAI)
    assert trigger.get_next_fire_time(fire, fire + timedelta(seconds=1)) == datetime(2025, 6, 3, 3, 30, tzinfo=SHANGHAI)

    # What the scheduler would run: the job with the injected clock; one failing customer does not stop it.
    await job.func()
    assert port.calls == [(1, NOW), (2, NOW), (3, NOW)]


def test_runner_uses_cron_setting() -> None:
    schedule = recompute_schedule(make_settings(tag_recompute_cron="0 2 * * *", tag_recompute_timezone="UTC"))
    assert schedule == RecomputeSchedule(cron="0 2 * * *", timezone="UTC")
    job = build_scheduler(RecordingPort(), schedule).get_job(RECOMPUTE_TAGS_JOB_ID)
    assert job is not None
    assert job.trigger.get_next_fire_time(None, NOW) == datetime(2025, 6, 2, 2, 0, tzinfo=UTC)
