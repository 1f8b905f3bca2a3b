"""Transcripts of handoff to people: a customer asks, the bot hands over, routing picks an agent, WeCom is moved.

Against the simulator (real kf service-state rules, msg_codes, servicers) on both backends, through the pipeline
with an injected ManualClock (no sleeps): push a customer line, pull, process, then assert what WeCom was asked
to do and what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bot.app import build_dispatcher
from bot.handoff import KF_REPLY_IN_WECOM, Conflict, HandoffService, Refused
from bot.member_cards import CardBudget
from bot.outbound import WeComSender
from bot.pipeline import QUIET_HANDLER, Pipeline
from bot.sla_store import SlaStore
from bot.sla_sweep import SlaSweeper
from bot.storage.db import create_session_factory
from bot.storage.handoff_repository import HandoffRepository, SlaRepository
from bot.storage.models import ConversationStatus, MessageStatus, StaffRole
from bot.support_config import SupportConfig, SupportConfigError, load_support_config, parse_support_config
from bot.wecom.parse import kf_message_to_inbound
from bot.wecom.simulator import (
    push_kf_customer_message,
    push_kf_event,
    push_kf_servicer_message,
)
from handlers.routing import Presence, TransferRefusal, TransferRefused
from tests.conftest import (
    TEST_KF_SECRET,
    TEST_SECRET,
    Backend,
)
from tests.test_kf_sync import KFID, Harness, callback_token, open_harness

MEMBERS = ("zhangsan", "lisi", "wangwu", "boss")
# ManualClock starts at 1_700_000_000: Wednesday 2023-11-15 06:13:20 in Asia/Shanghai.


def config(hours: dict[str, list[str]] | None = None, **sla: Any) -> SupportConfig:
    policy = {"id": "standard", "first_response": 30, "next_response": 60, "resolution": 3600, **sla}
    return parse_support_config(
        {
            "default_team": "support",
            "teams": [
                {
                    "name": "support",
                    "timezone": "Asia/Shanghai",
                    "hours": hours or {"mon-sun": ["00:00-24:00"]},
                    "leads": ["boss"],
                }
            ],
            "sla": {"warn_share": 0.8, "default_policy": "standard", "policies": [policy]},
            "handoff": {"no_match_limit": 2, "tag_policies": [{"tags": ["高价值"], "priority": "high"}]},
        },
        "test.yaml",
    )


ALWAYS = config()


class RecordedEvents:
    """The console events the service publishes (bot.console.events.ConsoleEventPublisher's port)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, str | None, dict[str, object]]] = []

    async def changed(self, conversation_id: int, kind: str, team: str | None, **detail: object) -> None:
        self.seen.append((conversation_id, kind, team, detail))

    def kinds(self, conversation_id: int) -> list[str]:
        return [kind for c, kind, _t, _d in self.seen if c == conversation_id]


@dataclass
class Desk:
    h: Harness
    service: HandoffService
    pipeline: Pipeline
    repo: HandoffRepository
    sweeper: SlaSweeper
    events: RecordedEvents

    @property
    def sim(self) -> Any:
        return self.h.sim

    async def agent(
        self,
        username: str,
        *,
        presence: str = "online",
        capacity: int = 5,
        role: StaffRole = StaffRole.AGENT,
        wecom: bool = True,
    ) -> int:
        """An agent of the support team: a kf servicer (WeCom mode), or with `wecom=False` a console agent."""
        user = await self.h.services.repos.staff.add_user(
            username, role, display_name=f"客服{username}", team="support", wecom_userid=username if wecom else None
        )
        await self.repo.set_agent_profile(user.id, capacity=capacity)
        await self.repo.set_presence(user.id, presence)
        return user.id

    async def say(self, customer: str, text: str, *, menu_id: str | None = None) -> int:
        item, delivery = push_kf_customer_message(self.sim, customer, text, menu_id=menu_id)
        return await self._process(item, delivery)

    async def servicer_says(self, customer: str, servicer: str, text: str) -> int:
        item, delivery = push_kf_servicer_message(self.sim, customer, servicer, text)
        return await self._process(item, delivery)

    async def _process(self, item: dict[str, Any], delivery: Any) -> int:
        await self.h.puller().pull(KFID, callback_token(delivery))
        for entry in await self.h.take():
            await self.pipeline.process(entry)
        record = await self.h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
        assert record.status is MessageStatus.HANDLED
        assert record.conversation_id is not None
        return record.conversation_id

    def kf(self, customer: str) -> tuple[int, str]:
        session = self.sim.kf_sessions[(KFID, customer)]
        return session.state, session.servicer_userid

    def sent(self, recipient: str) -> list[tuple[str, str, Any]]:
        return [(s.api, s.msgtype, s.content) for s in self.sim.sent_after(0, recipient) if s.accepted]

    def trans_calls(self) -> int:
        return sum(1 for c in self.sim.calls if c.path.endswith("kf/service_state/trans"))

    def cards(self, member: str) -> list[dict[str, Any]]:
        return [s.content for s in self.sim.sent_after(0, member) if s.api == "message/send" and s.accepted]


@contextlib.asynccontextmanager
async def open_desk(backend: Backend, support: SupportConfig = ALWAYS) -> AsyncIterator[Desk]:
    async with open_harness(backend, members=MEMBERS) as h:
        services, clock = h.services, h.clock
        sessions = create_session_factory(services.engine)
        repo = HandoffRepository(sessions, clock)
        events = RecordedEvents()
        kf = h.client(TEST_KF_SECRET)
        sender = WeComSender(h.client(TEST_SECRET), kf, services.settings.wecom_agent_id)
        service = HandoffService(
            services.repos,
            repo,
            SlaStore(SlaRepository(sessions, clock), support),
            support,
            kf,
            sender,
            clock,
            console_base_url="https://bot.example.com",
            events=events,
            card_budget=CardBudget(services.redis, services.keys, clock),
        )
        pipeline = Pipeline(
            services.repos, build_dispatcher(), sender, h.puller(), clock, scripts=services.scripts, handoff=service
        )
        yield Desk(h, service, pipeline, repo, SlaSweeper(service, clock), events)


@pytest.fixture
async def desk(backend: Backend) -> AsyncIterator[Desk]:
    async with open_desk(backend) as opened:
        yield opened


# ------------------------------------------------------------------------------------------- handoff and routing


async def test_asking_for_a_person_assigns_the_least_busy_online_agent_and_the_bot_goes_quiet(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan")
    li = await desk.agent("lisi")
    await desk.agent("wangwu", presence="offline")

    first = await desk.say("wmAlice", "我要转人工")
    second = await desk.say("wmBob", "人工客服")

    a, b = await desk.repo.conversation(first), await desk.repo.conversation(second)
    assert a is not None and b is not None
    assert (a.status, a.assignee_id, a.kf_service_state) == (ConversationStatus.OPEN, zhang, 3)
    assert (b.status, b.assignee_id) == (ConversationStatus.OPEN, li)  # zhangsan has one already: lisi is less busy
    assert desk.kf("wmAlice") == (3, "zhangsan") and desk.kf("wmBob") == (3, "lisi")
    # The handoff script's reply went out in state 0, the assigned notice through the trans msg_code.
    apis = [api for api, _t, _c in desk.sent("wmAlice")]
    assert apis == ["kf/send_msg", "kf/send_msg_on_event"]
    assert "客服zhangsan" in desk.sent("wmAlice")[1][2]["content"]
    [card] = desk.cards("zhangsan")
    assert card["url"] == f"https://bot.example.com/console/conversations/{first}"
    assert "wmAlice" in card["title"] and "我要转人工" in card["description"]

    quiet = await desk.say("wmAlice", "在吗？")
    assert quiet == first
    assert [api for api, _t, _c in desk.sent("wmAlice")] == apis  # nothing more from the bot
    [*_, last] = await desk.h.services.repos.messages.conversation_messages(first)
    assert last.handler == QUIET_HANDLER
    assert not [c for c in desk.sim.calls if c.errcode == 95018]


async def test_nobody_available_queues_with_a_notice_then_assigns_when_an_agent_comes_online(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline")
    conversation_id = await desk.say("wmQueue", "找人工")

    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.QUEUED and row.kf_service_state == 2
    assert desk.kf("wmQueue") == (2, "")
    notice = [c for api, _t, c in desk.sent("wmQueue") if api == "kf/send_msg_on_event"]
    assert notice == [{"content": ALWAYS.texts.queued}]

    assigned = await desk.service.set_presence(zhang, Presence.ONLINE)
    assert assigned == [(conversation_id, zhang)]
    assert desk.kf("wmQueue") == (3, "zhangsan")
    assert len(desk.cards("zhangsan")) == 1


async def test_servicer_stopped_in_wecom_is_skipped_for_the_next_agent(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan")
    li = await desk.agent("lisi")
    desk.sim.kf_servicer_status[(KFID, "zhangsan")] = (1, 0)  # stopped receiving in the WeCom client
    conversation_id = await desk.say("wmSkip", "转人工")

    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.assignee_id == li and desk.kf("wmSkip") == (3, "lisi")
    assert any(c.errcode == 95019 for c in desk.sim.calls)
    agent = await desk.repo.agent(zhang)
    assert agent is not None and agent.presence == "away"


async def test_out_of_hours_answers_with_the_next_opening_and_assigns_at_the_opening(backend: Backend) -> None:
    support = config({"mon-fri": ["09:00-12:00", "13:00-18:00"]})
    async with open_desk(backend, support) as desk:
        zhang = await desk.agent("zhangsan")
        conversation_id = await desk.say("wmNight", "转人工")

        texts = [c["content"] for api, _t, c in desk.sent("wmNight") if api == "kf/send_msg"]
        assert texts[-1] == support.texts.out_of_hours.replace("{next_open}", "今天 09:00")
        row = await desk.repo.conversation(conversation_id)
        assert row is not None and row.status is ConversationStatus.QUEUED and desk.kf("wmNight") == (2, "")

        desk.h.clock.advance(2 * 3600 + 46 * 60 + 40)  # 09:00 local
        report = await desk.sweeper.sweep_once()
        assert report.drained == [(conversation_id, zhang)]
        assert desk.kf("wmNight") == (3, "zhangsan")


async def test_a_miss_after_two_no_match_answers_hands_off(desk: Desk) -> None:
    await desk.agent("zhangsan")
    first = await desk.say("wmLost", "今天天气怎么样")
    await desk.say("wmLost", "月亮有多远")
    row = await desk.repo.conversation(first)
    assert row is not None and row.status is ConversationStatus.BOT and row.no_match_streak == 2
    await desk.say("wmLost", "星星呢")
    row = await desk.repo.conversation(first)
    assert row is not None and row.status is ConversationStatus.OPEN and row.handoff_reason == "no_match"
    # Two polite no-match answers, then (instead of a third) the handoff's assigned notice.
    assert [api for api, _t, _c in desk.sent("wmLost")] == ["kf/send_msg", "kf/send_msg", "kf/send_msg_on_event"]
    assert "客服zhangsan" in desk.sent("wmLost")[2][2]["content"]


async def test_handling_a_message_again_does_not_count_its_no_match_twice(desk: Desk) -> None:
    await desk.agent("zhangsan")
    await desk.say("wmRetry", "今天天气怎么样")
    item, delivery = push_kf_customer_message(desk.sim, "wmRetry", "月亮有多远")
    await desk.h.puller().pull(KFID, callback_token(delivery))
    [entry] = await desk.h.take()
    await desk.pipeline.process(entry)
    record = await desk.h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    await desk.h.services.repos.messages.mark_status(record.id, MessageStatus.RECEIVED)  # as if it crashed
    await desk.pipeline.process(entry)
    row = await desk.repo.conversation(record.conversation_id or 0)
    assert row is not None and row.status is ConversationStatus.BOT and row.no_match_streak == 2


async def test_tag_policy_sends_a_high_value_customer_straight_to_a_person(desk: Desk) -> None:
    await desk.agent("zhangsan")
    item, delivery = push_kf_customer_message(desk.sim, "wmVip", "这个多少钱")
    await desk.h.puller().pull(KFID, callback_token(delivery))
    entries = await desk.h.take()
    # The customer is known and tagged 高价值 before the message is handled.
    record = await desk.h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    assert record.customer_id is not None
    await desk.h.services.repos.tags.set_bot_tag(record.customer_id, "高价值")
    for entry in entries:
        await desk.pipeline.process(entry)
    row = await desk.repo.conversation(record.conversation_id or 0)
    assert row is not None and row.status is ConversationStatus.OPEN
    assert (row.handoff_reason, row.priority) == ("tag_policy", "high")
    assert [api for api, _t, _c in desk.sent("wmVip")] == ["kf/send_msg_on_event"]  # no scripted reply


# ------------------------------------------------------------------------------------------- claims and transfers


async def test_two_concurrent_claims_have_exactly_one_winner(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline")
    li = await desk.agent("lisi", presence="offline")
    conversation_id = await desk.say("wmRace", "转人工")
    for agent in (zhang, li):
        await desk.repo.set_presence(agent, "online")  # without draining: both see it queued

    results = await asyncio.gather(desk.service.claim(conversation_id, zhang), desk.service.claim(conversation_id, li))

    assert sorted(r.won for r in results) == [False, True]
    [lost] = [r for r in results if not r.won]
    assert lost.reason == "taken" and lost.message_zh
    row = await desk.repo.conversation(conversation_id)
    winner = zhang if results[0].won else li
    assert row is not None and row.assignee_id == winner
    assert desk.kf("wmRace") == (3, "zhangsan" if winner == zhang else "lisi")


async def test_transfer_to_an_offline_or_full_agent_is_refused_with_the_reason(desk: Desk) -> None:
    await desk.agent("zhangsan")
    li = await desk.agent("lisi", presence="offline")
    wang = await desk.agent("wangwu", capacity=0)
    conversation_id = await desk.say("wmMove", "转人工")

    offline = await desk.service.transfer(conversation_id, li)
    full = await desk.service.transfer(conversation_id, wang)
    assert isinstance(offline, TransferRefused) and offline.code is TransferRefusal.AGENT_OFFLINE
    assert isinstance(full, TransferRefused) and full.code is TransferRefusal.AGENT_AT_CAPACITY
    assert "离线" in offline.message_zh and "已满" in full.message_zh
    assert desk.kf("wmMove") == (3, "zhangsan")

    await desk.repo.set_presence(li, "online")
    moved = await desk.service.transfer(conversation_id, li)
    assert not isinstance(moved, TransferRefused | Conflict)
    assert desk.kf("wmMove") == (3, "lisi")


async def test_resolve_ends_the_session_remembers_the_agent_and_the_bot_speaks_again(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan")
    conversation_id = await desk.say("wmDone", "转人工")
    result = await desk.service.resolve(conversation_id)
    assert result.resolved and result.end_msg_code
    assert desk.kf("wmDone") == (4, "")
    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.RESOLVED and row.last_agent_id == zhang

    before = len(desk.sent("wmDone"))
    again = await desk.say("wmDone", "你好")
    assert again != conversation_id
    assert len(desk.sent("wmDone")) == before + 1  # the bot answers the new conversation


async def test_resolving_a_queued_session_takes_it_out_of_wecoms_pool_to_end_it(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline")
    conversation_id = await desk.say("wmPool", "转人工")
    assert desk.kf("wmPool") == (2, "")

    result = await desk.service.resolve(conversation_id, by_agent_id=zhang)

    assert result.resolved and result.end_msg_code  # 2 → 3 (the only move out of the pool) → 4
    assert [(state, servicer) for _t, _k, customer, state, servicer in desk.sim.kf_transitions if customer == "wmPool"][
        -2:
    ] == [(3, "zhangsan"), (4, "")]
    assert desk.kf("wmPool") == (4, "")
    assert not [c for c in desk.sim.calls if c.errcode == 95016]


async def test_a_queued_session_nobody_can_take_stays_in_the_pool_but_is_resolved_here(desk: Desk) -> None:
    conversation_id = await desk.say("wmNoOne", "转人工")  # no agents at all

    result = await desk.service.resolve(conversation_id)

    assert result.resolved and result.end_msg_code is None
    assert desk.kf("wmNoOne") == (2, "")
    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.RESOLVED


# ------------------------------------------------------------------------------------------- SLA


async def test_agent_reply_from_wecom_fulfils_first_response_and_bot_messages_do_not(desk: Desk) -> None:
    await desk.agent("zhangsan")
    conversation_id = await desk.say("wmSla", "转人工")
    state = await desk.service.sla.state(conversation_id)
    assert state is not None and state.first_response is not None and state.first_response.running
    # The bot's own handoff reply and the assigned notice went out: the human clock still runs.
    assert len(desk.sent("wmSla")) == 2

    desk.h.clock.advance(10)
    await desk.servicer_says("wmSla", "zhangsan", "您好，我来帮您看看")

    state = await desk.service.sla.state(conversation_id)
    assert state is not None and state.first_response is not None
    assert state.first_response.status.value == "fulfilled" and state.first_response.met() is True
    events = [(e.clock, e.kind) for e in await desk.service.sla.repo.events_of(conversation_id)]
    assert ("first_response", "fulfilled") in events
    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.WAITING


async def test_sla_warns_at_80_percent_then_breach_reassigns_and_tells_the_lead_once_with_racing_sweeps(
    desk: Desk,
) -> None:
    zhang = await desk.agent("zhangsan")
    await desk.agent("boss", role=StaffRole.LEAD, presence="offline")  # a lead, not taking chats now
    await desk.repo.set_presence(zhang, "online")
    conversation_id = await desk.say("wmLate", "转人工")
    li = await desk.agent("lisi")  # joins after the assignment: free to take it over
    other = SlaSweeper(desk.service, desk.h.clock)

    desk.h.clock.advance(23.9)
    assert (await desk.sweeper.sweep_once()).events == []
    desk.h.clock.advance(0.1)  # 24 s = 80 % of 30 s
    reports = await asyncio.gather(desk.sweeper.sweep_once(), other.sweep_once())
    warned = [e for r in reports for e in r.events]
    assert [(e.clock.value, e.kind.value) for e in warned] == [("first_response", "warned")]
    assert [c["title"].split("：")[0] for c in desk.cards("zhangsan")] == ["新的客户会话", "SLA 即将超时"]

    desk.h.clock.advance(6)  # 30 s: breached
    reports = await asyncio.gather(desk.sweeper.sweep_once(), other.sweep_once())
    breached = [e for r in reports for e in r.events]
    assert [(e.clock.value, e.kind.value) for e in breached] == [("first_response", "breached")]
    assert {k: v for r in reports for k, v in r.reassigned.items()} == {conversation_id: li}
    assert desk.kf("wmLate") == (3, "lisi")
    lead_cards = desk.cards("boss")
    assert len(lead_cards) == 1 and lead_cards[0]["title"].startswith("SLA 已超时")
    assert "改派" in lead_cards[0]["description"]

    rows = await desk.service.sla.repo.events_of(conversation_id)
    keys = [(r.clock, r.kind, r.level) for r in rows]
    assert len(keys) == len(set(keys))
    assert keys.count(("first_response", "warned", 0)) == 1 and keys.count(("first_response", "breached", 1)) == 1


# ------------------------------------------------------------------------------------------- configuration


def test_the_shipped_support_config_is_valid() -> None:
    shipped = load_support_config()
    assert shipped.default_policy.first_response == 30
    assert "转人工" in shipped.triggers.phrases and "投诉" in shipped.triggers.complaint_words


def test_support_config_errors_name_file_key_and_cause() -> None:
    with pytest.raises(SupportConfigError) as info:
        parse_support_config(
            {
                "teams": [{"name": "a", "hours": {"mon": ["18:00-09:00"]}}],
                "sla": {"policies": [{"id": "p", "first_response": -1}], "rules": [{"policy": "nope"}]},
                "handoff": {"no_match_limit": "two"},
            },
            "support.yaml",
        )
    problems = info.value.problems
    assert any(p.startswith("support.yaml:teams[0].hours:") and "midnight" in p for p in problems)
    assert "support.yaml:sla.policies[0].first_response: must be a positive number of seconds, got -1" in problems
    assert any(p.startswith("support.yaml:sla.rules[0].policy: unknown policy") for p in problems)
    assert any(p.startswith("support.yaml:handoff.no_match_limit:") for p in problems)


async def test_servicer_status_change_in_wecom_sets_presence_and_drains_the_queue(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline")
    conversation_id = await desk.say("wmBack", "转人工")
    assert desk.kf("wmBack") == (2, "")

    _item, delivery = push_kf_event(desk.sim, "servicer_status_change", {"servicer_userid": "zhangsan", "status": 1})
    await desk.h.puller().pull(KFID, callback_token(delivery))
    for entry in await desk.h.take():
        await desk.pipeline.process(entry)

    agent = await desk.repo.agent(zhang)
    assert agent is not None and agent.presence == "online"
    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.assignee_id == zhang and desk.kf("wmBack") == (3, "zhangsan")


# ------------------------------------------------------------------------------------------- console mode


async def test_a_console_agent_takes_the_conversation_while_the_kf_session_stays_api_managed(desk: Desk) -> None:
    console_agent = await desk.agent("lisi", wecom=False)
    conversation_id = await desk.say("wmCon", "转人工")

    row = await desk.repo.conversation(conversation_id)
    assert row is not None and (row.status, row.assignee_id) == (ConversationStatus.OPEN, console_agent)
    assert desk.kf("wmCon")[0] in (0, 1) and desk.trans_calls() == 0  # no service_state/trans at all
    sent = desk.sent("wmCon")
    assert [api for api, _t, _c in sent] == ["kf/send_msg", "kf/send_msg"]  # script reply, then assigned notice
    assert "客服lisi" in sent[-1][2]["content"]

    quiet = await desk.say("wmCon", "在吗？")
    assert quiet == conversation_id and len(desk.sent("wmCon")) == 2  # the bot stays quiet


async def test_a_mixed_team_queues_in_our_own_queue_and_a_console_agent_coming_online_takes_it(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline")
    li = await desk.agent("lisi", presence="offline", wecom=False)
    conversation_id = await desk.say("wmMix", "转人工")

    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.QUEUED
    assert desk.kf("wmMix")[0] in (0, 1) and desk.trans_calls() == 0  # not WeCom's pool: a console agent may take it
    assert [c for api, _t, c in desk.sent("wmMix") if api == "kf/send_msg"][-1] == {"content": ALWAYS.texts.queued}

    assert await desk.service.set_presence(li, Presence.ONLINE) == [(conversation_id, li)]
    assert desk.kf("wmMix")[0] in (0, 1)
    # A WeCom agent may still get such a conversation later: transfer moves 0/1 → 3 to the servicer.
    await desk.repo.set_presence(zhang, "online")
    moved = await desk.service.transfer(conversation_id, zhang)
    assert not isinstance(moved, TransferRefused | Conflict | Refused)
    assert desk.kf("wmMix") == (3, "zhangsan")


async def test_console_reply_sends_once_counts_for_the_sla_and_waits_on_the_customer(desk: Desk) -> None:
    li = await desk.agent("lisi", wecom=False)
    conversation_id = await desk.say("wmReply", "转人工")
    desk.h.clock.advance(5)

    first = await desk.service.console_reply(conversation_id, li, "您好，我来帮您看看", "form-key-1")
    again = await desk.service.console_reply(conversation_id, li, "您好，我来帮您看看", "form-key-1")
    both = await asyncio.gather(
        desk.service.console_reply(conversation_id, li, "还有别的问题吗", "form-key-2"),
        desk.service.console_reply(conversation_id, li, "还有别的问题吗", "form-key-2"),
    )
    assert first.ok and not first.duplicate and again.ok and again.duplicate
    assert sum(1 for r in both if r.ok and not r.duplicate) == 1
    texts = [c["content"] for api, _t, c in desk.sent("wmReply") if api == "kf/send_msg"]
    assert texts.count("您好，我来帮您看看") == 1 and texts.count("还有别的问题吗") == 1

    [*_, last] = await desk.h.services.repos.messages.conversation_messages(conversation_id)
    assert last.direction.value == "out" and last.payload.get("author") == "agent" and last.payload["agent_id"] == li
    state = await desk.service.sla.state(conversation_id)
    assert state is not None and state.first_response is not None
    assert state.first_response.status.value == "fulfilled"
    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.WAITING

    await desk.say("wmReply", "好的，谢谢")  # the customer answers: back to open, the bot still quiet
    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.OPEN
    assert not [c for c in desk.sim.calls if c.errcode == 95018]


async def test_console_reply_is_refused_before_wecom_over_quota_after_48_hours_and_in_wecom_mode(desk: Desk) -> None:
    li = await desk.agent("lisi", wecom=False)
    conversation_id = await desk.say("wmQuota", "转人工")  # script reply + assigned notice: 2 of 5 used
    for n in range(3):
        assert (await desk.service.console_reply(conversation_id, li, f"第{n}条", f"quota-{n}")).ok
    calls = len(desk.sim.calls)
    over = await desk.service.console_reply(conversation_id, li, "第六条", "quota-6")
    assert not over.ok and over.code == "refused" and "5 条" in over.message_zh
    assert len(desk.sim.calls) == calls  # WeCom was not asked

    await desk.say("wmQuota", "还在吗")  # a customer message refreshes the quota
    assert (await desk.service.console_reply(conversation_id, li, "在的", "quota-7")).ok

    desk.h.clock.advance(48 * 3600)
    calls = len(desk.sim.calls)
    late = await desk.service.console_reply(conversation_id, li, "还需要帮忙吗", "late")
    assert not late.ok and "48 小时" in late.message_zh and len(desk.sim.calls) == calls

    await desk.agent("zhangsan")
    wecom_mode = await desk.say("wmWeCom", "转人工")
    assert desk.kf("wmWeCom")[0] == 3
    calls = len(desk.sim.calls)
    refused = await desk.service.console_reply(wecom_mode, li, "您好", "wecom")
    assert not refused.ok and refused.message_zh == KF_REPLY_IN_WECOM and len(desk.sim.calls) == calls
    moved = await desk.service.transfer(wecom_mode, li)  # 3 → a console agent is impossible: refused
    assert isinstance(moved, Refused) and "企业微信" in moved.message_zh


async def test_resolving_a_console_conversation_makes_no_kf_move_and_the_bot_answers_again(desk: Desk) -> None:
    li = await desk.agent("lisi", wecom=False)
    conversation_id = await desk.say("wmEnd", "转人工")
    assert (await desk.service.console_reply(conversation_id, li, "已为您处理好了", "end-1")).ok

    result = await desk.service.resolve(conversation_id)
    assert result.resolved and result.end_msg_code is None and desk.trans_calls() == 0
    row = await desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.RESOLVED and row.last_agent_id == li
    refused = await desk.service.console_reply(conversation_id, li, "还有吗", "end-2")
    assert not refused.ok and "已解决" in refused.message_zh

    before = len(desk.sent("wmEnd"))
    again = await desk.say("wmEnd", "你好")
    assert again != conversation_id and len(desk.sent("wmEnd")) == before + 1  # the bot answers


async def test_two_claims_for_one_agents_last_free_slot_have_exactly_one_winner(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline", capacity=1)
    first = await desk.say("wmSlotA", "转人工")
    second = await desk.say("wmSlotB", "转人工")
    await desk.repo.set_presence(zhang, "online")  # without draining: both conversations wait in the queue

    results = await asyncio.gather(desk.service.claim(first, zhang), desk.service.claim(second, zhang))

    assert sorted(r.won for r in results) == [False, True]
    [lost] = [r for r in results if not r.won]
    assert lost.reason == "agent_at_capacity" and lost.message_zh
    [agent] = [a for a in await desk.service.agents() if a.id == zhang]
    assert agent.open_count == 1


async def test_a_claim_within_capacity_is_refused_when_the_agent_is_full(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline", capacity=1)
    first = await desk.say("wmFullA", "转人工")
    second = await desk.say("wmFullB", "转人工")
    for conversation_id in (first, second):
        row = await desk.repo.conversation(conversation_id)
        assert row is not None and row.status is ConversationStatus.QUEUED

    row = await desk.repo.conversation(first)
    assert row is not None
    assert await desk.repo.claim(first, zhang, version=row.version, within_capacity=True)
    row = await desk.repo.conversation(second)
    assert row is not None
    assert not await desk.repo.claim(second, zhang, version=row.version, within_capacity=True)
    assert await desk.repo.claim(second, zhang, version=row.version)  # without the check (WeCom already moved it)


async def test_the_sweep_keeps_finding_breaches_while_earlier_actions_are_still_running(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan")
    await desk.agent("boss", role=StaffRole.LEAD, presence="offline")
    await desk.repo.set_presence(zhang, "online")
    first = await desk.say("wmSlowA", "转人工")
    desk.h.clock.advance(10)
    second = await desk.say("wmSlowB", "转人工")
    release = asyncio.Event()
    acting: list[int] = []
    real_reassign = desk.service.reassign_after_breach

    async def slow_reassign(conversation_id: int) -> int | None:
        acting.append(conversation_id)
        await release.wait()  # WeCom hanging on the first breach's reassignment
        return await real_reassign(conversation_id)

    setattr(desk.service, "reassign_after_breach", slow_reassign)  # noqa: B010
    desk.h.clock.advance(21)  # the first conversation's 30 s first response has passed, not the second's
    stop = asyncio.Event()
    detected: list[list[int]] = []
    real_detect = desk.sweeper.detect

    async def detect() -> Any:
        report = await real_detect()
        detected.append(sorted({int(e.conversation_id) for e in report.events}))
        if len(detected) == 1:
            desk.h.clock.advance(10)  # by the next pass the second conversation has breached too
        elif len(detected) == 3:
            release.set()
            stop.set()
        return report

    runner = SlaSweeper(desk.service, desk.h.clock, interval_s=0)
    setattr(runner, "detect", detect)  # noqa: B010
    await runner.run(stop)

    assert detected[0] == [first] and second in detected[1]  # found while the first action was still blocked
    assert sorted(acting) == sorted([first, second])  # both actions ran (in either order: concurrently)
    rows = await desk.service.sla.repo.events_of(second)
    assert ("first_response", "breached") in [(r.clock, r.kind) for r in rows]


async def test_changes_the_console_did_not_make_are_published_to_open_consoles(desk: Desk) -> None:
    zhang = await desk.agent("zhangsan", presence="offline")
    await desk.agent("boss", role=StaffRole.LEAD, presence="offline")
    queued = await desk.say("wmLive", "转人工")  # nobody online: queued
    assert desk.events.seen[-1][:3] == (queued, "handed_off", "support")
    assert desk.events.seen[-1][3]["status"] == "queued"

    await desk.service.set_presence(zhang, Presence.ONLINE)  # the queue drains to the agent coming online
    assert desk.events.kinds(queued)[-1] == "assigned"
    assert desk.events.seen[-1][3] == {"assignee_id": zhang, "status": "open"}

    await desk.say("wmLive", "还在吗")  # the customer writes while a person has it
    assert desk.events.kinds(queued)[-1] == "customer_message"

    li = await desk.agent("lisi")
    desk.h.clock.advance(31)
    await desk.sweeper.sweep_once()  # first response breached: reassigned to lisi
    assert desk.events.kinds(queued)[-1] == "reassigned"
    assert desk.events.seen[-1][3] == {"assignee_id": li, "previous_assignee_id": zhang}
