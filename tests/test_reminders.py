"""Reminders (issue 5 item 6): the pure rules (handlers/reminders.py), the posts they become (bot/reminders.py) on
both backends with an injected clock, the scheduler job, and `wecom-bot reminders follow-up`.

Each rule fires for the right customers only; a second run the same day creates nothing new; the digest carries
the figures. No sleeps: the clock is a value.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.cli import build_parser, main
from bot.cli_reminders import add_follow_up
from bot.reminders import ReminderService
from bot.storage.db import create_engine, create_session_factory, upgrade_async
from bot.storage.models import (
    Conversation,
    Customer,
    CustomerTag,
    Order,
    Post,
    PostDelivery,
    PostTarget,
    SlaEventRow,
    StaffUser,
    TargetKind,
)
from bot.storage.posts_repository import PostRepository
from handlers.reminders import (
    CustomerFacts,
    DigestFigures,
    Lead,
    ReminderConfig,
    ReminderInputError,
    ReminderRule,
    day_bounds,
    digest_text,
    due_for_recall,
    due_for_repurchase,
    leads_to_tell,
    local_date,
    reminder_key,
    send_at,
)
from scheduler.runner import reminders_job
from tests.conftest import make_settings

SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2025, 3, 10, 9, 0, tzinfo=SH)  # the job's 09:00 run
TODAY = date(2025, 3, 10)
CONFIG = ReminderConfig()


def sh(*args: int) -> datetime:
    return datetime(*args, tzinfo=SH)  # type: ignore[misc]


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.value = now.timestamp()

    def now(self) -> float:
        return self.value

    def set(self, now: datetime) -> None:
        self.value = now.timestamp()


# ---- pure rules ----------------------------------------------------------------------------------------------


def test_local_dates_are_shanghai_dates() -> None:
    # 2025-03-09 16:30 UTC is already the 10th in Shanghai.
    assert local_date(datetime(2025, 3, 9, 16, 30, tzinfo=UTC)) == TODAY
    start, end = day_bounds(TODAY)
    assert start == datetime(2025, 3, 9, 16, 0, tzinfo=UTC) and end - start == timedelta(days=1)
    with pytest.raises(ValueError, match="timezone-aware"):
        local_date(datetime(2025, 3, 10, 9, 0))


def test_recall_is_for_silent_or_churned_customers_outside_the_cooldown() -> None:
    customers = [
        CustomerFacts("silent", frozenset({"沉默"})),
        CustomerFacts("churned", frozenset({"流失", "rfm:low"})),
        CustomerFacts("active", frozenset({"activity:active", "高价值"})),
        CustomerFacts("recalled_29_days_ago", frozenset({"沉默"}), last_recall_at=NOW - timedelta(days=29)),
        CustomerFacts("recalled_30_days_ago", frozenset({"流失"}), last_recall_at=NOW - timedelta(days=30)),
    ]
    assert due_for_recall(customers, NOW, CONFIG) == ["churned", "recalled_30_days_ago", "silent"]
    assert due_for_recall(customers, NOW, ReminderConfig(recall_cooldown_days=31)) == ["churned", "silent"]


def test_repurchase_counts_local_days_since_the_last_order() -> None:
    customers = [
        CustomerFacts("day30_late_evening", last_order_at=sh(2025, 2, 8, 23, 30)),  # Feb 8 in Shanghai
        CustomerFacts("day29_after_midnight", last_order_at=sh(2025, 2, 9, 0, 30)),  # Feb 8 in UTC, Feb 9 here
        CustomerFacts("day37_catch_up", last_order_at=sh(2025, 2, 1, 12, 0)),
        CustomerFacts("day38_too_old", last_order_at=sh(2025, 1, 31, 12, 0)),
        CustomerFacts("never_ordered"),
        CustomerFacts(
            "touched_since", last_order_at=sh(2025, 2, 6, 12, 0), last_repurchase_at=sh(2025, 3, 8, 10, 0)
        ),
        CustomerFacts(
            "touched_before_order", last_order_at=sh(2025, 2, 6, 12, 0), last_repurchase_at=sh(2025, 1, 1, 10, 0)
        ),
    ]
    assert due_for_repurchase(customers, NOW, CONFIG) == [
        "day30_late_evening",
        "day37_catch_up",
        "touched_before_order",
    ]
    assert due_for_repurchase(customers, NOW, ReminderConfig(repurchase_days=29, repurchase_catch_up_days=0)) == [
        "day29_after_midnight"
    ]


def test_touches_go_out_at_ten_or_right_away_when_later() -> None:
    assert send_at(NOW, time(10, 0), CONFIG) == sh(2025, 3, 10, 10, 0).astimezone(UTC)
    late = sh(2025, 3, 10, 11, 0)
    assert send_at(late, time(10, 0), CONFIG) == (late + CONFIG.lead).astimezone(UTC)


def test_digest_text_is_chinese_with_the_figures() -> None:
    text = digest_text(DigestFigures(date(2025, 3, 9), 2, 3, 4, 7, 1, 2))
    assert "2025-03-09" in text and "2/3（66.7%）" in text
    assert "当前排队会话：4 个" in text and "发送成功 7 条" in text and "发送失败 1 条" in text and "错过 2 条" in text
    assert "无数据" in digest_text(DigestFigures(date(2025, 3, 9), 0, 0, 0, 0, 0))


def test_only_leads_with_a_userid_get_a_digest_once() -> None:
    leads = [Lead("a", "LeadB"), Lead("b", None), Lead("c", " "), Lead("d", "LeadA"), Lead("e", "LeadB")]
    assert [lead.wecom_userid for lead in leads_to_tell(leads)] == ["LeadA", "LeadB"]


def test_keys_are_per_rule_day_and_subject() -> None:
    assert reminder_key(ReminderRule.DIGEST, TODAY, "LeadA") == "reminder:digest:2025-03-10:LeadA"
    assert reminder_key(ReminderRule.CHURN_RECALL, TODAY) == "reminder:churn_recall:2025-03-10"


# ---- storage: both backends ----------------------------------------------------------------------------------


@dataclass
class World:
    sessions: async_sessionmaker[AsyncSession]
    clock: FakeClock
    service: ReminderService
    ids: dict[str, int]


async def _customer(session: AsyncSession, external_id: str, *, channel: str = "kf", name: str | None = None) -> int:
    row = Customer(
        channel=channel,
        external_id=external_id,
        name=name,
        corp_tag_ids=[],
        first_seen_at=NOW - timedelta(days=400),
        last_seen_at=NOW - timedelta(days=100),
    )
    session.add(row)
    await session.flush()
    return int(row.id)


def _tag(customer_id: int, tag: str, source: str = "computed", at: datetime = NOW) -> CustomerTag:
    return CustomerTag(customer_id=customer_id, tag=tag, source=source, set_at=at)


def _order(customer_id: int, number: str, paid_at: datetime) -> Order:
    return Order(
        customer_id=customer_id,
        source="csv",
        external_order_id=number,
        amount_cents=9900,
        paid_at=paid_at,
        imported_at=paid_at,
    )


def _conversation(customer_id: int, status: str, *, last_inbound_at: datetime | None = None) -> Conversation:
    return Conversation(
        channel="kf",
        account_id="wkKF",
        customer_id=customer_id,
        status=status,
        opened_at=NOW - timedelta(days=2),
        updated_at=NOW - timedelta(days=1),
        last_inbound_at=last_inbound_at,
    )


def _staff(username: str, role: str, userid: str | None, *, active: bool = True) -> StaffUser:
    return StaffUser(
        username=username,
        display_name=username,
        role=role,
        wecom_userid=userid,
        active=active,
        created_at=NOW - timedelta(days=10),
    )


def _fulfilled(
    conversation_id: int, at: datetime, met: bool, clock: str = "first_response", cycle: int = 0
) -> SlaEventRow:
    return SlaEventRow(
        conversation_id=conversation_id,
        clock=clock,
        cycle=cycle,
        kind="fulfilled",
        level=0,
        at=at.timestamp(),
        due_at=at.timestamp() + (10 if met else -10),
        met=met,
        recorded_at=at,
    )


async def _seed(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    ids: dict[str, int] = {}
    async with sessions.begin() as s:
        for ext in ("wmSilent", "wmChurned", "wmActive", "wmRecalled", "wmOldRecall", "wmWecomTag"):
            ids[ext] = await _customer(s, ext)
        ids["wmChurned/contact"] = await _customer(s, "wmChurned", channel="contact")
        s.add_all(
            [
                _tag(ids["wmSilent"], "沉默"),
                _tag(ids["wmChurned"], "流失"),
                _tag(ids["wmChurned/contact"], "流失"),
                _tag(ids["wmActive"], "activity:active"),
                _tag(ids["wmRecalled"], "沉默"),
                _tag(ids["wmRecalled"], "reminder:churn_recall:2025-02-20", "bot", sh(2025, 2, 20, 9, 0)),
                _tag(ids["wmOldRecall"], "流失"),
                _tag(ids["wmOldRecall"], "reminder:churn_recall:2025-01-29", "bot", sh(2025, 1, 29, 9, 0)),
                _tag(ids["wmWecomTag"], "沉默", "wecom"),  # a corp tag of that name is not the computed class
            ]
        )
        # Repurchase: the orders sit on 客户联系 rows (as the CSV import creates them).
        for ext in ("wmBuy30", "wmBuy29", "wmBuy45", "wmBuyAgain", "wmBuy33", "wmBuy33Touched"):
            ids[ext] = await _customer(s, ext, channel="contact")
        ids["wmBuy30/kf"] = await _customer(s, "wmBuy30")
        s.add_all(
            [
                _order(ids["wmBuy30"], "o1", sh(2025, 2, 8, 23, 30)),
                _order(ids["wmBuy29"], "o2", sh(2025, 2, 9, 0, 30)),
                _order(ids["wmBuy45"], "o3", sh(2025, 1, 24, 12, 0)),
                _order(ids["wmBuyAgain"], "o4", sh(2025, 2, 8, 12, 0)),
                _order(ids["wmBuyAgain"], "o5", sh(2025, 3, 5, 12, 0)),
                _order(ids["wmBuy33"], "o6", sh(2025, 2, 5, 12, 0)),
                _order(ids["wmBuy33Touched"], "o7", sh(2025, 2, 5, 12, 0)),
                _tag(ids["wmBuy33Touched"], "reminder:repurchase:2025-03-08", "bot", sh(2025, 3, 8, 9, 0)),
            ]
        )
        # Leads and the figures of the digest.
        s.add_all(
            [
                _staff("lead1", "lead", "LeadOne"),
                _staff("lead2", "lead", None),
                _staff("agent1", "agent", "AgentOne"),
                _staff("lead3", "lead", "LeadGone", active=False),
            ]
        )
        conversations = [
            _conversation(ids["wmSilent"], "queued", last_inbound_at=NOW - timedelta(hours=1)),
            _conversation(ids["wmActive"], "queued"),
            _conversation(ids["wmRecalled"], "open"),
        ]
        s.add_all(conversations)
        await s.flush()
        c = conversations[0].id
        s.add_all(
            [
                _fulfilled(c, sh(2025, 3, 9, 10, 0), True),
                _fulfilled(conversations[1].id, sh(2025, 3, 9, 23, 59), True),
                _fulfilled(conversations[2].id, sh(2025, 3, 9, 0, 1), False),
                _fulfilled(c, sh(2025, 3, 8, 23, 59), True, cycle=1),  # the day before yesterday
                _fulfilled(c, sh(2025, 3, 10, 0, 1), False, cycle=2),  # today
                _fulfilled(c, sh(2025, 3, 9, 12, 0), False, clock="next_response"),
            ]
        )
        post = Post(
            owner="ops",
            title="每日话题",
            kind="text",
            content={"text": "话题"},
            rule_kind="cron",
            cron="0 * * * *",
            timezone="Asia/Shanghai",
            status="active",
            created_at=NOW - timedelta(days=5),
        )
        s.add(post)
        await s.flush()
        target = PostTarget(post_id=post.id, kind="staff", ref="ops", params={})
        s.add(target)
        await s.flush()
        deliveries = [
            ("sent", sh(2025, 3, 9, 9, 0)),
            ("sent", sh(2025, 3, 9, 10, 0)),
            ("sent", sh(2025, 3, 9, 23, 0)),
            ("failed", sh(2025, 3, 9, 11, 0)),
            ("missed", sh(2025, 3, 9, 12, 0)),
            ("sent", sh(2025, 3, 8, 9, 0)),  # the day before yesterday
            ("failed", sh(2025, 3, 10, 8, 0)),  # today
            ("scheduled", sh(2025, 3, 9, 13, 0)),
        ]
        for number, (state, at) in enumerate(deliveries):
            s.add(
                PostDelivery(
                    post_id=post.id,
                    target_id=target.id,
                    target_kind="staff",
                    slot_at=at,
                    idempotency_key=f"seed:{number}",
                    state=state,
                    next_attempt_at=at,
                    detail={},
                    created_at=at,
                    updated_at=at,
                    sent_at=at if state == "sent" else None,
                )
            )
    return ids


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    sessions = create_session_factory(engine)
    clock = FakeClock(NOW)
    ids = await _seed(sessions)
    yield World(sessions, clock, ReminderService(sessions, clock), ids)


async def _count(sessions: async_sessionmaker[AsyncSession], stmt: Any) -> int:
    async with sessions() as s:
        return int((await s.execute(stmt)).scalar_one())


async def _tagged(sessions: async_sessionmaker[AsyncSession], tag: str) -> set[tuple[str, str]]:
    stmt = (
        select(Customer.external_id, Customer.channel)
        .join(CustomerTag, CustomerTag.customer_id == Customer.id)
        .where(CustomerTag.tag == tag, CustomerTag.source == "bot")
    )
    async with sessions() as s:
        return {(e, c) for e, c in (await s.execute(stmt)).all()}


async def test_daily_run_creates_each_reminder_for_the_right_customers_only(world: World) -> None:
    report = await world.service.run_daily(NOW.astimezone(UTC))
    recall, repurchase = report.touches

    assert recall.due == ("wmChurned", "wmOldRecall", "wmSilent")
    marker = "reminder:churn_recall:2025-03-10"
    assert await _tagged(world.sessions, marker) == {
        ("wmChurned", "kf"),
        ("wmChurned", "contact"),
        ("wmOldRecall", "kf"),
        ("wmSilent", "kf"),
    }
    assert recall.post is not None
    assert recall.post.title == marker and recall.post.owner == "LeadOne"
    assert recall.post.content["send_kind"] == "marketing"
    assert [(t.kind, t.ref) for t in recall.post.targets] == [(TargetKind.SEGMENT, marker)]
    assert recall.post.rule.kind == "at" and recall.post.rule.at == sh(2025, 3, 10, 10, 0).astimezone(UTC)

    assert repurchase.due == ("wmBuy30", "wmBuy33")
    rmarker = "reminder:repurchase:2025-03-10"
    assert await _tagged(world.sessions, rmarker) == {
        ("wmBuy30", "contact"),
        ("wmBuy30", "kf"),
        ("wmBuy33", "contact"),
    }
    assert repurchase.post is not None and repurchase.post.targets[0].ref == rmarker

    # The engine's own segment query reaches exactly the marked 微信客服 customers (inside their 48 h window).
    inside, outside = await PostRepository(world.sessions, world.clock).kf_segment(
        [marker], NOW.astimezone(UTC) - timedelta(hours=48)
    )
    assert [ext for ext, _ in inside] == ["wmSilent"] and outside == 2

    assert [p.title for p in report.digests] == ["reminder:digest:2025-03-10:LeadOne"]
    assert len(report.created) == 3


async def test_digest_carries_yesterdays_figures(world: World) -> None:
    figures = await world.service.digest_figures(date(2025, 3, 9))
    assert figures == DigestFigures(date(2025, 3, 9), 2, 3, 2, 3, 1, 1)
    (post,) = await world.service.digest(NOW.astimezone(UTC))
    text = post.content["text"]
    assert "【每日运营简报】2025-03-09" in text
    assert "首次响应 SLA 达标：2/3（66.7%）" in text
    assert "当前排队会话：2 个" in text
    assert "发送成功 3 条，发送失败 1 条，错过 1 条" in text
    assert [(t.kind, t.ref) for t in post.targets] == [(TargetKind.STAFF, "LeadOne")]
    assert post.rule.at == NOW.astimezone(UTC) + CONFIG.lead


async def test_a_second_run_the_same_day_creates_nothing(world: World) -> None:
    first = await world.service.run_daily(NOW.astimezone(UTC))
    posts = await _count(world.sessions, select(func.count()).select_from(Post))
    tags = await _count(world.sessions, select(func.count()).select_from(CustomerTag))
    assert len(first.created) == 3

    for later in (sh(2025, 3, 10, 10, 0), sh(2025, 3, 10, 23, 59)):
        world.clock.set(later)
        again = await world.service.run_daily(later.astimezone(UTC))
        assert again.created == ()
        assert all(t.due == () for t in again.touches)
    assert await _count(world.sessions, select(func.count()).select_from(Post)) == posts
    assert await _count(world.sessions, select(func.count()).select_from(CustomerTag)) == tags


async def test_next_day_respects_the_cooldowns_and_a_new_digest_is_due(world: World) -> None:
    await world.service.run_daily(NOW.astimezone(UTC))
    tomorrow = sh(2025, 3, 11, 9, 0)
    world.clock.set(tomorrow)
    report = await world.service.run_daily(tomorrow.astimezone(UTC))
    recall, repurchase = report.touches
    assert recall.due == () and recall.post is None  # recalled yesterday: 30 days' cooldown
    assert repurchase.due == ("wmBuy29",)  # its 30th local day; wmBuy30/wmBuy33 were touched since their order
    assert [p.title for p in report.digests] == ["reminder:digest:2025-03-11:LeadOne"]


async def test_customers_due_after_the_touch_went_out_wait_for_the_next_day(world: World) -> None:
    report = await world.service.run_daily(NOW.astimezone(UTC))
    post = report.touches[0].post
    assert post is not None
    repo = PostRepository(world.sessions, world.clock)
    slot = post.rule.at
    assert slot is not None
    await repo.materialise(post, [slot], slot, slot)
    claimed = await repo.claim_due(slot, "tok")
    assert post.id in {d.post_id for d in claimed}  # the engine took today's touch
    async with world.sessions.begin() as s:  # a customer turned silent after the touch was claimed
        s.add(_tag(world.ids["wmActive"], "沉默"))
    later = sh(2025, 3, 10, 11, 0)
    world.clock.set(later)
    again = await world.service.churn_recall(later.astimezone(UTC))
    assert again.skipped == "already_sent" and again.due == ()
    assert ("wmActive", "kf") not in await _tagged(world.sessions, "reminder:churn_recall:2025-03-10")


async def test_the_scheduler_job_runs_on_the_leader_only(world: World) -> None:
    @dataclass
    class Leader:
        is_leader: bool

    assert await reminders_job(world.service, Leader(False), NOW.astimezone(UTC)) is False
    assert await _count(world.sessions, select(func.count()).select_from(Post)) == 1  # the seeded post only
    assert await reminders_job(world.service, Leader(True), NOW.astimezone(UTC)) is True
    assert await _count(world.sessions, select(func.count()).select_from(Post)) == 4


async def test_follow_up_is_a_one_off_app_message_created_once(world: World) -> None:
    async with world.sessions.begin() as s:
        await _customer(s, "wmVip", name="王女士")
    out = io.StringIO()
    now = NOW.astimezone(UTC)
    args = {"staff": "zhangsan", "customer": "wmVip", "at": "2025-03-11 15:30", "note": "回访新品试用感受"}
    assert await add_follow_up(world.sessions, now=now, out=out, **args) == 0
    assert await add_follow_up(world.sessions, now=now, out=out, **args) == 0
    assert "added follow-up post" in out.getvalue() and "exists already" in out.getvalue()
    posts = [p for p in await PostRepository(world.sessions).list_posts() if p.title.startswith("reminder:follow")]
    assert len(posts) == 1
    (post,) = posts
    assert post.rule.at == sh(2025, 3, 11, 15, 30).astimezone(UTC)
    assert [(t.kind, t.ref) for t in post.targets] == [(TargetKind.STAFF, "zhangsan")]
    assert post.content["text"] == "【客户跟进提醒】2025-03-11 15:30\n客户：王女士（wmVip）\n事项：回访新品试用感受"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"at": "2025-03-10 08:00"}, "in the past"),
        ({"customer": "wmNobody"}, "unknown customer"),
        ({"note": "  "}, "needs --note"),
        ({"note": "长" * 501}, "longer than 500"),
        ({"at": "tomorrow"}, "not a time"),
    ],
)
async def test_bad_follow_ups_are_refused_with_one_line(
    world: World, capsys: pytest.CaptureFixture[str], overrides: dict[str, str], message: str
) -> None:
    args = {"staff": "zhangsan", "customer": "wmSilent", "at": "2025-03-11 15:30", "note": "回访"}
    args.update(overrides)
    assert await add_follow_up(world.sessions, now=NOW.astimezone(UTC), **args) == 2
    assert message in capsys.readouterr().err
    if overrides.get("at") == "tomorrow":
        return  # refused by the CLI's time parser, before the service
    with pytest.raises(ReminderInputError, match=message):
        await world.service.follow_up(
            staff=args["staff"],
            customer=args["customer"],
            at=datetime.fromisoformat(args["at"]).replace(tzinfo=SH),
            note=args["note"],
            now=NOW.astimezone(UTC),
        )


def test_the_entry_point_adds_a_follow_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    url = f"sqlite:///{tmp_path}/bot.sqlite3"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setattr("bot.logs.configure_logging", lambda *_args, **_kw: None)
    monkeypatch.setattr("bot.cli.configure_logging", lambda *_args, **_kw: None)
    at = (datetime.now(SH) + timedelta(days=1)).strftime("%Y-%m-%d 10:00")
    argv = ["reminders", "follow-up", "--staff", "lisi", "--customer", "wmX", "--at", at, "--note", "回访"]
    assert main(argv) == 2  # unknown customer (and the schema is created on the way)

    async def seed() -> None:
        engine = create_engine(make_settings(database_url=url))
        await upgrade_async(engine)
        async with create_session_factory(engine).begin() as s:
            await _customer(s, "wmX")
        await engine.dispose()

    asyncio.run(seed())
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "unknown customer 'wmX'" in captured.err and "added follow-up post 1: lisi about wmX" in captured.out
    parsed = build_parser().parse_args(["reminders", "run"])
    assert parsed.action == "run"
