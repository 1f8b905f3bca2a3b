"""The audience policy wired into the delivery engine: quiet hours, daily caps, opt-out and de-duplication.

Transcripts on both backends against the simulator, with the injected clock (no sleeps): posts are planned at
local Asia/Shanghai times, the clock is moved there, the engine ticks, and what WeCom was asked to send and what
the delivery rows say are asserted. The policy itself is tested purely in tests/test_audience.py.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bot.app import build_post_engine
from bot.post_delivery import (
    AudienceGate,
    DeliveryAudienceFacts,
    DeliveryConfig,
    PostDeliveryEngine,
    audience_rules,
    tick_now,
)
from bot.settings import SettingsError
from bot.storage.db import create_session_factory
from bot.storage.models import DeliveryState, TargetKind
from bot.storage.posts_repository import NewTarget, PostRecord
from bot.storage.subscription_repository import SubscriptionRepository
from bot.wecom.simulator import DEFAULT_GROUP_CHAT_ID, push_kf_customer_message
from handlers.audience import DEFAULT_POLICY, AudiencePolicy, QuietHours
from handlers.domain import Channel, InboundMessage, KfOrigin
from scheduler.slots import Rule
from tests.conftest import TEST_AGENT_ID, Backend, make_settings
from tests.test_kf_sync import KFID, Harness, open_harness
from tests.test_post_delivery import (
    APP,
    MASS_PATH,
    ROBOT,
    engine_for,
    register_robot,
    repo_for,
    robot_posts,
    rows,
    tick,
)
from tests.test_subscription import customer_id, say

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY0 = datetime(2023, 11, 15, tzinfo=SHANGHAI)  # the simulator's clock starts on 2023-11-15 06:13 in Shanghai
SEGMENT = "高价值"
KF_SEND = "kf/send_msg"
_msgids = itertools.count()


def local(day: int, hour: int, minute: int = 0) -> float:
    """Epoch seconds of a wall-clock time in Shanghai, `day` days after DAY0."""
    return (DAY0 + timedelta(days=day)).replace(hour=hour, minute=minute).timestamp()


def move_to(h: Harness, instant: float) -> None:
    assert instant >= h.clock.now()
    h.clock.advance(instant - h.clock.now())


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        yield harness


def guarded(h: Harness, rules: AudiencePolicy = DEFAULT_POLICY, **config: Any) -> PostDeliveryEngine:
    """The engine with the audience policy over the deliveries' touches and the subscriptions, as in production."""
    sessions = create_session_factory(h.services.engine)
    facts = DeliveryAudienceFacts(repo_for(h), SubscriptionRepository(sessions, h.clock))
    return engine_for(h, config=DeliveryConfig(agent_id=TEST_AGENT_ID, **config), audience=AudienceGate(rules, facts))


async def post_at(
    h: Harness,
    at: float,
    text: str,
    *targets: NewTarget,
    title: str = "营销推送",
    cron: str | None = None,
) -> PostRecord:
    rule = Rule("cron", cron=cron) if cron else Rule("at", at=tick_now(at))
    return await repo_for(h).add_post(
        owner="zhangsan",
        title=title,
        kind="text",
        content={"text": text},
        rule=rule,
        targets=targets or (NewTarget(TargetKind.SEGMENT, SEGMENT),),
    )


async def kf_customer(h: Harness, external_userid: str, tag: str = SEGMENT) -> None:
    """The customer writes now (opening their 48 h window, in WeCom and in our rows) and carries the tag."""
    push_kf_customer_message(h.sim, external_userid, "你好")
    record = await h.services.repos.messages.record_inbound(
        InboundMessage(
            channel=Channel.KF,
            msgid=f"m-{external_userid}-{next(_msgids)}",
            sender_id=external_userid,
            account_id=KFID,
            msgtype="text",
            created_at=int(h.clock.now()),
            text="你好",
            origin=KfOrigin.CUSTOMER,
        )
    )
    assert record.customer_id is not None
    await h.services.repos.tags.set_bot_tag(record.customer_id, tag)


def kf_sends(h: Harness, customer: str) -> list[tuple[str, float]]:
    """(text, when) of the posts WeCom delivered to a kf customer (not the bot's replies to 退订/订阅)."""
    return [
        (str(r.content.get("content")), r.at)
        for r in h.sim.sent_after(0, recipient=customer, api=KF_SEND)
        if r.status == "delivered" and "订阅" not in str(r.content.get("content"))
    ]


# ---- quiet hours -------------------------------------------------------------------------------------------------


async def test_a_post_due_at_23_goes_out_at_08_to_groups_and_customers_but_staff_get_it_at_once(h: Harness) -> None:
    await register_robot(h)
    move_to(h, local(0, 21))
    await kf_customer(h, "wmNight")
    engine = guarded(h)
    targets = (NewTarget(TargetKind.ROBOT, ROBOT), NewTarget(TargetKind.SEGMENT, SEGMENT))
    post = await post_at(h, local(0, 23), "今晚上新：冬季外套八折", *targets)
    staff = await post_at(h, local(0, 23), "值班提醒", NewTarget(TargetKind.STAFF, "lisi"))

    move_to(h, local(0, 23))
    await tick(engine, h.clock)
    assert robot_posts(h) == [] and kf_sends(h, "wmNight") == []
    held = await rows(h, post.id)
    assert [(r.state, r.reason, r.next_attempt_at, r.holds) for r in held] == [
        (DeliveryState.SCHEDULED, "quiet_hours", tick_now(local(1, 8)), 1)
    ] * 2
    [to_staff] = await rows(h, staff.id)
    assert to_staff.state is DeliveryState.SENT  # staff reminders are not customer-facing: no quiet hours

    move_to(h, local(1, 7, 59))
    await tick(engine, h.clock)
    assert robot_posts(h) == [] and kf_sends(h, "wmNight") == []
    assert {r.state for r in await rows(h, post.id)} == {DeliveryState.SCHEDULED}  # held, not missed

    move_to(h, local(1, 8))
    await tick(engine, h.clock)
    move_to(h, local(1, 8, 5))
    await tick(engine, h.clock)
    [sent] = robot_posts(h)
    assert sent.at == local(1, 8)
    assert kf_sends(h, "wmNight") == [("今晚上新：冬季外套八折", local(1, 8))]
    for row in await rows(h, post.id):
        assert (row.state, row.sent_at, row.holds) == (DeliveryState.SENT, tick_now(local(1, 8)), 1)
        assert row.detail["deferred"] == {"quiet_hours": 1}


# ---- daily caps ------------------------------------------------------------------------------------------------


async def test_the_4th_marketing_send_to_a_customer_in_one_day_is_held_to_the_next_morning(h: Harness) -> None:
    move_to(h, local(0, 10))
    await kf_customer(h, "wmBusy")
    await kf_customer(h, "wmCalm", "新用户")
    engine = guarded(h)
    posts = [await post_at(h, local(0, 11, n), f"第{n + 1}条活动") for n in range(4)]
    calm = await post_at(h, local(0, 11, 3), "新用户专享", NewTarget(TargetKind.SEGMENT, "新用户"))
    for n in range(4):
        move_to(h, local(0, 11, n))
        await tick(engine, h.clock)
    assert [text for text, _ in kf_sends(h, "wmBusy")] == ["第1条活动", "第2条活动", "第3条活动"]
    assert [text for text, _ in kf_sends(h, "wmCalm")] == ["新用户专享"]  # the cap is per customer
    [fourth] = await rows(h, posts[3].id)
    # The next local midnight falls in the quiet hours: the send waits for 08:00.
    assert (fourth.state, fourth.reason, fourth.next_attempt_at) == (
        DeliveryState.SCHEDULED,
        "daily_cap_customer",
        tick_now(local(1, 8)),
    )
    assert (await rows(h, calm.id))[0].state is DeliveryState.SENT

    move_to(h, local(1, 0, 30))
    await tick(engine, h.clock)
    assert len(kf_sends(h, "wmBusy")) == 3
    move_to(h, local(1, 8))
    await tick(engine, h.clock)
    assert kf_sends(h, "wmBusy")[3] == ("第4条活动", local(1, 8))
    [fourth] = await rows(h, posts[3].id)
    assert (fourth.state, fourth.detail["sent"], fourth.detail["deferred"]) == (
        DeliveryState.SENT,
        1,
        {"daily_cap_customer": 1},
    )


async def test_a_group_gets_at_most_5_posts_a_day_and_the_6th_the_next_morning(h: Harness) -> None:
    await register_robot(h)
    move_to(h, local(0, 9))
    engine = guarded(h)
    posts = [await post_at(h, local(0, 9), f"群公告{n}", NewTarget(TargetKind.ROBOT, ROBOT)) for n in range(6)]
    await tick(engine, h.clock)
    assert len(robot_posts(h)) == 5
    held = [r for r in await rows(h) if r.state is DeliveryState.SCHEDULED]
    assert [(r.post_id, r.reason, r.next_attempt_at) for r in held] == [
        (posts[5].id, "daily_cap_group", tick_now(local(1, 8)))
    ]
    move_to(h, local(1, 8))
    await tick(engine, h.clock)
    assert [r.content["content"] for r in robot_posts(h)][5] == "群公告5"


async def test_a_customer_group_mass_message_counts_towards_the_group_cap(h: Harness) -> None:
    move_to(h, local(0, 9))
    engine = guarded(h, AudiencePolicy(group_daily_cap=1))
    group = NewTarget(TargetKind.GROUP_CHAT, DEFAULT_GROUP_CHAT_ID, {"sender": "zhangsan"})
    first = await post_at(h, local(0, 9), "双十二预告", group)
    second = await post_at(h, local(0, 9), "双十二开抢", group)
    await tick(engine, h.clock)
    assert len([c for c in h.sim.calls if c.path == MASS_PATH]) == 1  # one task created, one held
    assert (await rows(h, first.id))[0].reason == "awaiting_confirmation"
    [held] = await rows(h, second.id)
    assert (held.state, held.reason) == (DeliveryState.SCHEDULED, "daily_cap_group")


async def test_a_hold_longer_than_the_longest_wait_is_skipped(h: Harness) -> None:
    move_to(h, local(0, 10))
    await kf_customer(h, "wmBusy")
    engine = guarded(h, AudiencePolicy(customer_daily_cap=1), audience_max_hold=timedelta(hours=6))
    await post_at(h, local(0, 11), "第一条")
    late = await post_at(h, local(0, 11), "第二条")
    move_to(h, local(0, 11))
    await tick(engine, h.clock)
    [row] = await rows(h, late.id)
    assert (row.state, row.reason, row.detail["held"]) == (
        DeliveryState.SKIPPED,
        "daily_cap_customer",
        {"daily_cap_customer": 1},
    )


# ---- opt-out ----------------------------------------------------------------------------------------------------


async def test_an_opted_out_customer_is_skipped_and_gets_posts_again_after_subscribing(h: Harness) -> None:
    move_to(h, local(0, 10))
    opted_out = await say(h, "wmAlice", "退订")  # through the pipeline, as in production
    await h.services.repos.tags.set_bot_tag(await customer_id(h, opted_out), SEGMENT)
    engine = guarded(h)
    post = await post_at(h, 0, "每日穿搭灵感", cron="0 12 * * *", title="每日穿搭")

    move_to(h, local(0, 12))
    await tick(engine, h.clock)
    assert kf_sends(h, "wmAlice") == []
    [today] = await rows(h, post.id)
    assert (today.state, today.reason) == (DeliveryState.SKIPPED, "opted_out")
    assert today.detail["held"] == {"opted_out": 1}

    move_to(h, local(0, 13))
    await say(h, "wmAlice", "订阅")
    move_to(h, local(1, 12))
    await tick(engine, h.clock)
    assert kf_sends(h, "wmAlice") == [("每日穿搭灵感", local(1, 12))]
    assert [r.state for r in await rows(h, post.id)] == [DeliveryState.SKIPPED, DeliveryState.SENT]
    assert [r for r in h.sim.sent_after(0, api=APP) if "错过" in str(r.content)] == []


# ---- de-duplication -----------------------------------------------------------------------------------------------


async def test_the_same_content_from_two_posts_reaches_a_customer_once_in_7_days(h: Harness) -> None:
    move_to(h, local(0, 10))
    await kf_customer(h, "wmDup")
    await kf_customer(h, "wmNew", "新用户")
    engine = guarded(h)
    welcome = await post_at(h, local(0, 11), "新品上市，快来看看！", title="新品计划A")
    both = (NewTarget(TargetKind.SEGMENT, SEGMENT), NewTarget(TargetKind.SEGMENT, "新用户"))
    again = await post_at(h, local(0, 12), "新品上市 快来看看", *both, title="新品计划B")  # other punctuation
    move_to(h, local(0, 11))
    await tick(engine, h.clock)
    move_to(h, local(0, 12))
    await tick(engine, h.clock)
    assert kf_sends(h, "wmDup") == [("新品上市，快来看看！", local(0, 11))]
    assert kf_sends(h, "wmNew") == [("新品上市 快来看看", local(0, 12))]  # never got it: not a duplicate
    assert (await rows(h, welcome.id))[0].state is DeliveryState.SENT
    by_target = {r.target_id: r for r in await rows(h, again.id)}
    dup, new = (by_target[t.id] for t in again.targets)
    assert (dup.state, dup.reason, dup.detail["held"]) == (
        DeliveryState.SKIPPED,
        "duplicate_content",
        {"duplicate_content": 1},
    )
    assert new.state is DeliveryState.SENT

    move_to(h, local(6, 10))  # still within 7 days of the first send
    await kf_customer(h, "wmDup")
    await post_at(h, local(6, 11), "新品上市!快来看看")
    move_to(h, local(6, 11))
    await tick(engine, h.clock)
    assert len(kf_sends(h, "wmDup")) == 1

    move_to(h, local(7, 11, 1))  # the window has passed
    await kf_customer(h, "wmDup")
    await post_at(h, local(7, 11, 2), "新品上市，快来看看！")
    move_to(h, local(7, 11, 2))
    await tick(engine, h.clock)
    assert len(kf_sends(h, "wmDup")) == 2


# ---- wiring ----------------------------------------------------------------------------------------------------


def test_settings_switch_rules_off() -> None:
    rules = audience_rules(quiet_hours="", customer_daily_cap=0, group_daily_cap=2, dedupe_window_s=0)
    assert rules == AudiencePolicy(
        quiet_hours=None, customer_daily_cap=None, group_daily_cap=2, dedupe_window_s=None
    )
    rules = audience_rules(quiet_hours="21:30-07:00", customer_daily_cap=3, group_daily_cap=5, dedupe_window_s=60)
    assert rules.quiet_hours == QuietHours.parse("21:30-07:00") and rules.dedupe_window_s == 60


async def test_the_production_engine_protects_the_audience(h: Harness) -> None:
    await register_robot(h)
    engine = build_post_engine(h.services)
    post = await post_at(h, h.clock.now() + 60, "早安", NewTarget(TargetKind.ROBOT, ROBOT))  # 06:14 in Shanghai
    h.clock.advance(60)
    await tick(engine, h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.reason, row.next_attempt_at) == (
        DeliveryState.SCHEDULED,
        "quiet_hours",
        tick_now(local(0, 8)),
    )


@pytest.mark.parametrize("value", ["25:00-08:00", "22:00", "08:00-08:00"])
def test_bad_quiet_hours_are_refused_at_startup(value: str) -> None:
    with pytest.raises(SettingsError, match="AUDIENCE_QUIET_HOURS"):
        make_settings(audience_quiet_hours=value)
