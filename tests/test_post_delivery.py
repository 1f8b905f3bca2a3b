"""The scheduled-post delivery engine (bot/post_delivery.py) against the WeCom simulator, on both backends.

Transcripts: plan posts, move an injected clock, tick, and assert what WeCom was asked to send and what the
delivery rows say. No sleeps: the engine, the simulator and the WeCom clients read the clock they are given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bot.post_delivery import AudienceDecision, DeliveryConfig, PostDeliveryEngine, tick_now
from bot.storage.db import create_session_factory
from bot.storage.models import DeliveryState, MassTaskStatus, TargetKind
from bot.storage.posts_repository import DeliveryRecord, NewTarget, PostRecord, PostRepository, TargetRecord
from bot.wecom.client import RobotClient
from bot.wecom.simulator import DEFAULT_GROUP_CHAT_ID, DEFAULT_ROBOT_KEY, SentRecord
from bot.wecom.simulator.api import confirm_groupmsg
from bot.wecom.simulator.state import Fault
from handlers.domain import Channel, InboundMessage, KfOrigin
from scheduler.slots import Rule, slots_between
from tests.conftest import TEST_AGENT_ID, TEST_KF_SECRET, TEST_SECRET, Backend
from tests.test_kf_sync import KFID, Harness, open_harness

OWNER = "zhangsan"
ROBOT = "运营一群"
WEBHOOK = "webhook/send"
APP = "message/send"
MASS_PATH = "/cgi-bin/externalcontact/add_msg_template"


class JumpClock:
    """A clock the test may move either way (the simulator's ManualClock only goes forward)."""

    def __init__(self, now: float) -> None:
        self.value = now

    def now(self) -> float:
        return self.value

    def set(self, value: float) -> None:
        self.value = value


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        yield harness


def repo_for(h: Harness, clock: Any = None) -> PostRepository:
    return PostRepository(create_session_factory(h.services.engine), clock or h.clock)


def engine_for(
    h: Harness,
    *,
    clock: Any = None,
    config: DeliveryConfig | None = None,
    redis: Any = None,
    robot: Any = None,
    **kw: Any,
) -> PostDeliveryEngine:
    s = h.services
    return PostDeliveryEngine(
        repo_for(h, clock),
        app=h.client(TEST_SECRET),
        kf=h.client(TEST_KF_SECRET),
        robot=robot or RobotClient(s.http, s.settings.wecom_api_base, metrics=None, max_retries=0),
        redis=redis or s.redis,
        keys=s.keys,
        config=config or DeliveryConfig(agent_id=TEST_AGENT_ID),
        **kw,
    )


async def tick(engine: PostDeliveryEngine, clock: Any) -> None:
    await engine.tick(tick_now(clock.now()))


async def add_post(
    h: Harness,
    *,
    at: float | None = None,
    cron: str | None = None,
    targets: tuple[NewTarget, ...] = (NewTarget(TargetKind.ROBOT, ROBOT),),
    text: str = "今日话题：你最喜欢的产品是？",
    title: str = "每日话题",
    clock: Any = None,
) -> PostRecord:
    rule = Rule("at", at=tick_now(at)) if at is not None else Rule("cron", cron=cron)
    return await repo_for(h, clock).add_post(
        owner=OWNER, title=title, kind="text", content={"text": text}, rule=rule, targets=targets
    )


def robot_posts(h: Harness, after: int = 0) -> list[SentRecord]:
    return [r for r in h.sim.sent_after(after, api=WEBHOOK) if r.status == "delivered"]


def notices_to(h: Harness, userid: str) -> list[str]:
    return [str(r.content.get("content")) for r in h.sim.sent_after(0, recipient=userid, api=APP)]


async def rows(h: Harness, post_id: int | None = None) -> list[DeliveryRecord]:
    return await repo_for(h).deliveries(post_id=post_id)


async def register_robot(h: Harness, name: str = ROBOT, key: str = DEFAULT_ROBOT_KEY) -> None:
    await repo_for(h).add_robot(name, key)


# ---- exactly once ---------------------------------------------------------------------------------------------


async def test_one_off_robot_post_is_delivered_once(h: Harness) -> None:
    await register_robot(h)
    engine = engine_for(h)
    post = await add_post(h, at=h.clock.now() + 60, text="今晚八点直播，不见不散")
    await tick(engine, h.clock)
    assert robot_posts(h) == []  # not due yet
    h.clock.advance(60)
    await tick(engine, h.clock)
    [sent] = robot_posts(h)
    assert sent.recipient == DEFAULT_ROBOT_KEY and sent.content == {"content": "今晚八点直播，不见不散"}
    for _ in range(3):
        h.clock.advance(5)
        await tick(engine, h.clock)
    assert len(robot_posts(h)) == 1
    [row] = await rows(h, post.id)
    assert (row.state, row.attempts, row.errcode) == (DeliveryState.SENT, 1, None)
    assert row.sent_at == tick_now(h.clock.now() - 15)


async def test_recurring_post_delivers_every_slot_once(h: Harness) -> None:
    await register_robot(h)
    engine = engine_for(h)
    post = await add_post(h, cron="*/10 * * * *")
    start = h.clock.now()
    for _ in range(70):  # 35 minutes, a tick every 30 s
        h.clock.advance(30)
        await tick(engine, h.clock)
    expected = slots_between(post.rule, tick_now(start), tick_now(h.clock.now()) + timedelta(microseconds=1))
    assert len(expected) == 3
    delivered = robot_posts(h)
    assert len(delivered) == 3
    # Each went out at the first tick at or after its slot (ticks are 30 s apart).
    for record, slot in zip(delivered, expected, strict=True):
        assert 0 <= record.at - slot.timestamp() < 30
    assert [r.slot_at for r in await rows(h, post.id)] == expected
    assert {r.state for r in await rows(h, post.id)} == {DeliveryState.SENT}


async def test_two_engines_ticking_concurrently_deliver_each_slot_once(h: Harness) -> None:
    await register_robot(h)
    first = engine_for(h)
    second = engine_for(h, redis=await h.other_redis())  # another process: its own Redis connection
    staff = NewTarget(TargetKind.STAFF, "lisi")
    for n in range(8):
        await add_post(h, at=h.clock.now() + 30, text=f"第{n}条", targets=(NewTarget(TargetKind.ROBOT, ROBOT), staff))
    h.clock.advance(30)
    for _ in range(3):
        await asyncio.gather(tick(first, h.clock), tick(second, h.clock))
        h.clock.advance(1)
    assert sorted(str(r.content["content"]) for r in robot_posts(h)) == [f"第{n}条" for n in range(8)]
    lisi = [r for r in h.sim.sent_after(0, recipient="lisi", api=APP) if r.status == "delivered"]
    assert len(lisi) == 8
    assert {r.state for r in await rows(h)} == {DeliveryState.SENT}


# ---- clocks and downtime ---------------------------------------------------------------------------------------


async def test_a_clock_that_jumps_back_and_forward_neither_double_sends_nor_skips(h: Harness) -> None:
    await register_robot(h)
    clock = JumpClock(h.clock.now())
    engine = engine_for(h, clock=clock)
    post = await add_post(h, cron="*/10 * * * *", clock=clock)
    first_slot = slots_between(post.rule, tick_now(clock.now()), tick_now(clock.now() + 3600))[0]

    clock.set(first_slot.timestamp())
    await tick(engine, clock)
    assert len(robot_posts(h)) == 1

    clock.set(first_slot.timestamp() - 900)  # NTP pulls the clock back 15 minutes
    await tick(engine, clock)
    clock.set(first_slot.timestamp() + 30)
    await tick(engine, clock)
    assert len(robot_posts(h)) == 1  # the slot is known by its instant: not sent again

    clock.set(first_slot.timestamp() + 2 * 3600 + 5 * 60)  # then jumps two hours ahead
    await tick(engine, clock)
    by_state: dict[DeliveryState, list[datetime]] = {}
    for row in await rows(h, post.id):
        by_state.setdefault(row.state, []).append(row.slot_at)
    # Every slot in the jump has a row: the last 15 minutes' were sent late, the older ones reported missed.
    assert len(by_state[DeliveryState.SENT]) == 1 + 2
    assert len(by_state[DeliveryState.MISSED]) == 10
    assert len(robot_posts(h)) == 3
    [notice] = notices_to(h, OWNER)
    assert notice.count("错过：「每日话题」") == 10


async def test_downtime_within_grace_is_sent_late_and_beyond_it_is_missed_and_reported(h: Harness) -> None:
    await register_robot(h)
    engine = engine_for(h)
    early = await add_post(h, at=h.clock.now() + 60, title="早间提醒", text="早")
    late = await add_post(h, at=h.clock.now() + 30 * 60, title="午间提醒", text="午")
    h.clock.advance(40 * 60)  # the whole fleet was down for 40 minutes
    await tick(engine, h.clock)
    [early_row] = await rows(h, early.id)
    [late_row] = await rows(h, late.id)
    assert (early_row.state, early_row.reason) == (DeliveryState.MISSED, "missed_grace_window")
    assert late_row.state is DeliveryState.SENT  # 10 minutes late, within the 15-minute grace window
    assert [r.content["content"] for r in robot_posts(h)] == ["午"]
    [notice] = notices_to(h, OWNER)
    assert "错过：「早间提醒」" in notice and "午间提醒" not in notice
    await tick(engine, h.clock)
    assert len(notices_to(h, OWNER)) == 1  # reported once


# ---- failures ----------------------------------------------------------------------------------------------------


async def test_a_robot_key_wecom_rejects_fails_with_93000_and_the_owner_is_told(h: Harness) -> None:
    await register_robot(h, "旧群", "removed-robot-key")
    engine = engine_for(h)
    post = await add_post(h, at=h.clock.now() + 10, targets=(NewTarget(TargetKind.ROBOT, "旧群"),))
    h.clock.advance(10)
    await tick(engine, h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.errcode, row.reason) == (DeliveryState.FAILED, 93000, "wecom_error")
    [notice] = notices_to(h, OWNER)
    assert "企业微信返回错误 93000" in notice and "群机器人 旧群" in notice
    assert "removed-robot-key" not in notice
    h.clock.advance(600)
    await tick(engine, h.clock)
    webhook_calls = [c for c in h.sim.calls if c.path == "/cgi-bin/webhook/send"]
    assert len(webhook_calls) == 1  # a permanent error is not retried


async def test_a_transient_error_is_retried_with_backoff(h: Harness) -> None:
    await register_robot(h)
    engine = engine_for(h)
    post = await add_post(h, at=h.clock.now() + 10)
    h.sim.faults.append(Fault(id=1, path="/cgi-bin/webhook/send", remaining=1, errcode=-1))
    h.clock.advance(10)
    await tick(engine, h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.attempts, row.errcode, row.reason) == (DeliveryState.SCHEDULED, 1, -1, "transient_error")
    assert row.next_attempt_at == tick_now(h.clock.now() + 30)
    h.clock.advance(29)
    await tick(engine, h.clock)
    assert robot_posts(h) == []
    h.clock.advance(1)
    await tick(engine, h.clock)
    assert len(robot_posts(h)) == 1
    [row] = await rows(h, post.id)
    assert (row.state, row.attempts) == (DeliveryState.SENT, 2)
    assert notices_to(h, OWNER) == []


class HangingRobot:
    """A robot API whose call never answers: the process dies while WeCom may or may not have posted."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def send(self, key: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        self.called.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_crash_after_the_robot_call_started_is_not_retried_but_reported(h: Harness) -> None:
    await register_robot(h)
    hanging = HangingRobot()
    dying = engine_for(h, robot=hanging)
    post = await add_post(h, at=h.clock.now() + 10)
    h.clock.advance(10)
    task = asyncio.create_task(tick(dying, h.clock))
    await hanging.called.wait()
    task.cancel()  # the process is killed mid-call
    with pytest.raises(asyncio.CancelledError):
        await task
    [row] = await rows(h, post.id)
    assert row.state is DeliveryState.SENDING and row.call_started_at is not None

    survivor = engine_for(h)
    h.clock.advance(60)
    await tick(survivor, h.clock)
    assert (await rows(h, post.id))[0].state is DeliveryState.SENDING  # the lease (2 min) has not run out
    h.clock.advance(61)
    await tick(survivor, h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.reason) == (DeliveryState.FAILED, "outcome_unknown")
    assert robot_posts(h) == []  # never a second call that could double-post
    [notice] = notices_to(h, OWNER)
    assert "无法确认是否已发出" in notice


async def test_a_crash_between_claim_and_call_loses_nothing(h: Harness) -> None:
    await register_robot(h)
    repo = repo_for(h)
    post = await add_post(h, at=h.clock.now() + 10)
    h.clock.advance(10)
    now = tick_now(h.clock.now())
    slots = slots_between(post.rule, post.created_at, now + timedelta(microseconds=1))
    await repo.materialise(post, slots, now + timedelta(microseconds=1), now)
    [claimed] = await repo.claim_due(now, "dead-process-tok")  # claimed, then the process died
    assert claimed.state is DeliveryState.SENDING
    h.clock.advance(121)
    await tick(engine_for(h), h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.attempts) == (DeliveryState.SENT, 1)
    assert len(robot_posts(h)) == 1


async def test_a_cancelled_post_is_not_delivered(h: Harness) -> None:
    await register_robot(h)
    engine = engine_for(h)
    post = await add_post(h, cron="* * * * *")
    h.clock.advance(61)
    await tick(engine, h.clock)
    assert len(robot_posts(h)) == 1
    await repo_for(h).cancel_post(post.id)
    h.clock.advance(300)
    await tick(engine, h.clock)
    assert len(robot_posts(h)) == 1


# ---- rate limits and quotas ----------------------------------------------------------------------------------


async def test_robot_rate_limit_holds_the_21st_post_and_sends_it_a_minute_later(h: Harness) -> None:
    await register_robot(h)
    engine = engine_for(h)
    for n in range(21):
        await add_post(h, at=h.clock.now() + 10, text=f"帖子{n:02d}")
    h.clock.advance(10)
    await tick(engine, h.clock)
    assert len(robot_posts(h)) == 20
    held = [r for r in await rows(h) if r.state is DeliveryState.SCHEDULED]
    assert len(held) == 1
    assert (held[0].reason, held[0].holds, held[0].attempts) == ("robot_rate_limit", 1, 0)
    h.clock.advance(30)
    await tick(engine, h.clock)
    assert len(robot_posts(h)) == 20
    h.clock.advance(30)
    await tick(engine, h.clock)
    assert sorted(str(r.content["content"]) for r in robot_posts(h)) == [f"帖子{n:02d}" for n in range(21)]
    assert [r for r in h.sim.sent_after(0, api=WEBHOOK) if r.errcode == 45009] == []  # WeCom never refused one
    assert {r.state for r in await rows(h)} == {DeliveryState.SENT}


async def test_app_messages_to_one_member_stay_within_30_a_minute(h: Harness) -> None:
    engine = engine_for(h)
    for n in range(31):
        await add_post(h, at=h.clock.now() + 10, text=f"提醒{n}", targets=(NewTarget(TargetKind.STAFF, "lisi"),))
    h.clock.advance(10)
    await tick(engine, h.clock)
    delivered = [r for r in h.sim.sent_after(0, recipient="lisi", api=APP) if r.status == "delivered"]
    assert len(delivered) == 30
    h.clock.advance(60)
    await tick(engine, h.clock)
    statuses = [r.status for r in h.sim.sent_after(0, recipient="lisi", api=APP)]
    assert statuses == ["delivered"] * 31  # none silently dropped by WeCom


async def test_the_4_per_month_mass_message_cap_is_counted_before_the_api(h: Harness) -> None:
    engine = engine_for(h)
    group = NewTarget(TargetKind.GROUP_CHAT, DEFAULT_GROUP_CHAT_ID, {"sender": OWNER})
    for n in range(5):
        await add_post(h, at=h.clock.now() + 10, title=f"活动{n}", targets=(group,))
    h.clock.advance(10)
    await tick(engine, h.clock)
    assert len([c for c in h.sim.calls if c.path == MASS_PATH]) == 4
    by_state = sorted((r.state.value, r.reason) for r in await rows(h))
    assert by_state == [("sending", "awaiting_confirmation")] * 4 + [("skipped", "monthly_cap")]
    assert len(await repo_for(h).mass_tasks(chat_id=DEFAULT_GROUP_CHAT_ID)) == 4
    assert any("达到每月 4 次上限" in text for text in notices_to(h, OWNER))


async def test_mass_message_confirmation_is_tracked(h: Harness) -> None:
    engine = engine_for(h)
    group = NewTarget(TargetKind.GROUP_CHAT, DEFAULT_GROUP_CHAT_ID)  # sender: the post's owner
    post = await add_post(h, at=h.clock.now() + 10, targets=(group,))
    h.clock.advance(10)
    await tick(engine, h.clock)
    [task] = await repo_for(h).mass_tasks()
    assert (task.status, task.sender) == (MassTaskStatus.PENDING, OWNER)
    assert any("请在企业微信客户端确认群发任务" in t for t in notices_to(h, OWNER))
    h.clock.advance(61)
    await tick(engine, h.clock)
    assert (await rows(h, post.id))[0].state is DeliveryState.SENDING  # polled: not confirmed yet

    confirm_groupmsg(h.sim, h.sim.groupmsg_tasks[task.msgid])  # the owner taps 发送 in the client
    h.clock.advance(61)
    await tick(engine, h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.task_msgid) == (DeliveryState.SENT, task.msgid)
    [task] = await repo_for(h).mass_tasks()
    assert task.status is MassTaskStatus.CONFIRMED


async def test_an_unconfirmed_mass_message_reminds_once_then_fails(h: Harness) -> None:
    config = DeliveryConfig(
        agent_id=TEST_AGENT_ID, mass_remind_after=timedelta(hours=1), mass_deadline=timedelta(hours=3)
    )
    engine = engine_for(h, config=config)
    post = await add_post(h, at=h.clock.now() + 10, targets=(NewTarget(TargetKind.GROUP_CHAT, DEFAULT_GROUP_CHAT_ID),))
    h.clock.advance(10)
    await tick(engine, h.clock)
    for _ in range(8):  # 2 hours in 15-minute steps
        h.clock.advance(15 * 60)
        await tick(engine, h.clock)
    reminders = [t for t in notices_to(h, OWNER) if t.startswith("提醒：群发任务")]
    assert len(reminders) == 1
    h.clock.advance(3600)
    await tick(engine, h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.reason) == (DeliveryState.FAILED, "unconfirmed")
    assert any("群发未确认：「每日话题」" in t for t in notices_to(h, OWNER))
    [task] = await repo_for(h).mass_tasks()
    assert task.status is MassTaskStatus.UNCONFIRMED


# ---- customer segments and the audience policy -----------------------------------------------------------------


async def _kf_customer(h: Harness, external_userid: str, wrote_at: float, tag: str) -> None:
    record = await h.services.repos.messages.record_inbound(
        InboundMessage(
            channel=Channel.KF,
            msgid=f"m-{external_userid}",
            sender_id=external_userid,
            account_id=KFID,
            msgtype="text",
            created_at=int(wrote_at),
            text="你好",
            origin=KfOrigin.CUSTOMER,
        )
    )
    assert record.customer_id is not None
    await h.services.repos.tags.set_bot_tag(record.customer_id, tag)


async def test_a_segment_reaches_kf_customers_only_inside_their_48h_window(h: Harness) -> None:
    from bot.wecom.simulator import push_kf_customer_message

    push_kf_customer_message(h.sim, "wmRecent", "在吗")
    await _kf_customer(h, "wmRecent", h.clock.now(), "高价值")
    await _kf_customer(h, "wmOld", h.clock.now() - 3 * 86400, "高价值")
    await _kf_customer(h, "wmOther", h.clock.now(), "新用户")
    engine = engine_for(h)
    post = await add_post(h, at=h.clock.now() + 60, targets=(NewTarget(TargetKind.SEGMENT, "高价值"),))
    h.clock.advance(60)
    await tick(engine, h.clock)
    sent = h.sim.sent_after(0, api="kf/send_msg")
    assert [(r.recipient, r.status) for r in sent] == [("wmRecent", "delivered")]
    [row] = await rows(h, post.id)
    assert row.state is DeliveryState.SENT
    assert row.detail == {"sent": 1, "outside_48h_window": 1, "held": {}, "refused": 0}


async def test_the_audience_policy_can_hold_a_send_back_with_its_reason(h: Harness) -> None:
    await register_robot(h)
    seen: list[tuple[str, str | None]] = []

    async def quiet_hours(
        post: PostRecord, target: TargetRecord, recipient: str | None, now: datetime
    ) -> AudienceDecision:
        seen.append((target.label, recipient))
        return AudienceDecision(False, "quiet_hours")

    engine = engine_for(h, audience=quiet_hours)
    post = await add_post(h, at=h.clock.now() + 10)
    h.clock.advance(10)
    await tick(engine, h.clock)
    [row] = await rows(h, post.id)
    assert (row.state, row.reason) == (DeliveryState.SKIPPED, "quiet_hours")
    assert seen == [(f"robot:{ROBOT}", None)]
    assert robot_posts(h) == []


def test_tick_needs_an_aware_instant() -> None:
    assert tick_now(0) == datetime(1970, 1, 1, tzinfo=UTC)
