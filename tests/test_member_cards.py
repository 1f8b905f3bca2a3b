"""Cards to staff within WeCom's per-member limit (30 a minute, 1,000 an hour), shared by every process.

Against fakeredis and real Redis (the `backend` fixture), with a manual clock; no network otherwise.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from bot.member_cards import CardBudget, CardItem, CardLimits, MemberCards
from bot.redis_conn import create_redis
from bot.redis_keys import RedisKeys
from bot.storage.handoff_repository import AgentRecord, HandoffConversation
from bot.wecom.simulator import ManualClock
from tests.conftest import Backend, make_settings

T0 = 1_750_000_000.0


def member(member_id: int, username: str) -> AgentRecord:
    return AgentRecord(
        id=member_id,
        username=username,
        display_name=username,
        role="agent",
        team="support",
        wecom_userid=username,
        skills=frozenset(),
        capacity=40,
        presence="online",
        last_assigned_at=datetime.fromtimestamp(T0, UTC),
        open_count=0,
    )


class Cards:
    """Records what would have reached WeCom: (member, single|digest, [(conversation, kind)], sent at)."""

    def __init__(self, clock: ManualClock, members: Sequence[AgentRecord]) -> None:
        self.clock = clock
        self.members = {m.id: m for m in members}
        self.sent: list[tuple[str, str, list[tuple[int, str]], float]] = []

    async def notify_agent(
        self,
        agent: AgentRecord,
        conversation_id: int,
        kind: str,
        *,
        level: int = 0,
        extra: str = "",
        conversation: HandoffConversation | None = None,
        tags: frozenset[str] | None = None,
    ) -> bool:
        self.sent.append((agent.username, "single", [(conversation_id, kind)], self.clock.now()))
        return True

    async def notify_digest(self, agent: AgentRecord, items: Sequence[CardItem], card_id: str) -> bool:
        self.sent.append(
            (agent.username, "digest", [(i.conversation_id, i.kind) for i in items], self.clock.now())
        )
        return True

    async def member(self, member_id: int) -> AgentRecord | None:
        return self.members.get(member_id)

    def told(self, username: str) -> list[tuple[int, str]]:
        return [item for who, _how, items, _at in self.sent if who == username for item in items]

    def most_in_a_minute(self, username: str) -> int:
        times = sorted(at for who, _how, _items, at in self.sent if who == username)
        return max((sum(1 for t in times if start <= t < start + 60) for start in times), default=0)


@pytest.fixture
async def redis(backend: Backend) -> AsyncIterator[Redis]:
    client = create_redis(make_settings(backend))
    yield client
    await client.aclose()


def gate(redis: Redis, backend: Backend, clock: ManualClock, cards: Cards, **limits: float) -> MemberCards:
    return MemberCards(cards, CardBudget(redis, RedisKeys(backend.key_prefix), clock, CardLimits(**limits)))  # type: ignore[arg-type]


async def test_urgent_cards_go_at_once_until_the_minute_is_full_then_wait_for_a_free_slot(
    redis: Redis, backend: Backend
) -> None:
    clock = ManualClock(T0)
    zhang = member(1, "zhangsan")
    cards = Cards(clock, [zhang])
    desk = gate(redis, backend, clock, cards)

    for conversation_id in range(30):
        assert await desk.send(zhang, CardItem(conversation_id, "assigned"))
        clock.advance(1)
    assert not await desk.send(zhang, CardItem(30, "assigned"))  # the 31st within a minute: WeCom would drop it
    assert not await desk.send(zhang, CardItem(31, "transferred"))
    assert await desk.flush() == 0  # still 30 in the last minute
    clock.advance(31)
    assert await desk.flush() == 0  # 61 s after the first card: WeCom may have had it a little later
    clock.advance(1)  # 62 s after the first card: its slot is free again
    assert await desk.flush() == 1

    assert cards.sent[-1][:3] == ("zhangsan", "digest", [(30, "assigned"), (31, "transferred")])
    assert await desk.held() == 0
    assert cards.most_in_a_minute("zhangsan") <= 30


class SlowCards(Cards):
    """WeCom answers each card 5 s after it was asked for (a loaded process)."""

    async def notify_agent(self, agent: AgentRecord, conversation_id: int, kind: str, **kw: object) -> bool:
        self.clock.advance(5)
        return await super().notify_agent(agent, conversation_id, kind)


async def test_a_slot_counts_from_when_wecom_had_the_card_not_from_when_it_was_taken(
    redis: Redis, backend: Backend
) -> None:
    clock = ManualClock(T0)
    zhang = member(1, "zhangsan")
    cards = SlowCards(clock, [zhang])
    desk = gate(redis, backend, clock, cards, per_minute=3, minute_reserve=0)

    for conversation_id in range(3):  # taken at T0, T0+5, T0+10; WeCom has each 5 s later
        assert await desk.send(zhang, CardItem(conversation_id, "assigned"))
    clock.advance(62 - 15)  # 62 s after the first slot was taken, but only 57 s after WeCom had that card
    assert not await desk.send(zhang, CardItem(3, "assigned"))
    assert await desk.flush() == 0
    clock.advance(5)  # 62 s after WeCom had the first card
    assert await desk.flush() == 1
    assert cards.told("zhangsan") == [(i, "assigned") for i in range(4)]


async def test_sla_cards_are_paced_and_what_arrives_meanwhile_is_one_digest(redis: Redis, backend: Backend) -> None:
    clock = ManualClock(T0)
    boss = member(1, "boss")
    cards = Cards(clock, [boss])
    desk = gate(redis, backend, clock, cards, pace_s=10)

    assert await desk.send(boss, CardItem(101, "breached", "首次响应已超时"))
    for conversation_id in (102, 103, 104):
        clock.advance(1)
        assert not await desk.send(boss, CardItem(conversation_id, "breached", "首次响应已超时"))
    assert await desk.held() == 3
    assert await desk.flush() == 0  # 3 s after the first card: still inside the pace
    clock.advance(7)
    assert await desk.flush() == 1

    assert [(how, items) for _who, how, items, _at in cards.sent] == [
        ("single", [(101, "breached")]),
        ("digest", [(102, "breached"), (103, "breached"), (104, "breached")]),
    ]


async def test_a_lone_held_card_is_sent_as_itself_and_members_are_counted_apart(
    redis: Redis, backend: Backend
) -> None:
    clock = ManualClock(T0)
    boss, zhang = member(1, "boss"), member(2, "zhangsan")
    cards = Cards(clock, [boss, zhang])
    desk = gate(redis, backend, clock, cards, pace_s=10)

    await desk.send(boss, CardItem(1, "breached", "x"))
    await desk.send(zhang, CardItem(2, "warned", "y"))  # another member: not held behind the boss's card
    clock.advance(2)
    await desk.send(zhang, CardItem(3, "warned", "z"))
    clock.advance(10)
    await desk.flush()
    await desk.send(boss, CardItem(4, "breached", "w"))  # the boss's pace passed long ago: at once

    assert [(who, how, items) for who, how, items, _at in cards.sent] == [
        ("boss", "single", [(1, "breached")]),
        ("zhangsan", "single", [(2, "warned")]),
        ("zhangsan", "single", [(3, "warned")]),
        ("boss", "single", [(4, "breached")]),
    ]


async def test_sla_cards_leave_the_reserve_to_assignments(redis: Redis, backend: Backend) -> None:
    clock = ManualClock(T0)
    zhang = member(1, "zhangsan")
    cards = Cards(clock, [zhang])
    desk = gate(redis, backend, clock, cards, minute_reserve=6)

    for conversation_id in range(24):
        assert await desk.send(zhang, CardItem(conversation_id, "assigned"))
    assert not await desk.send(zhang, CardItem(100, "warned", "x"))  # 24 of 30 used: the last 6 are kept
    for conversation_id in range(24, 30):
        assert await desk.send(zhang, CardItem(conversation_id, "assigned"))
    assert not await desk.send(zhang, CardItem(30, "assigned"))
    clock.advance(62)
    assert await desk.flush() == 1

    assert cards.sent[-1][1:3] == ("digest", [(30, "assigned"), (100, "warned")])  # the assignment first


async def test_the_hour_limit_holds_as_well(redis: Redis, backend: Backend) -> None:
    clock = ManualClock(T0)
    zhang = member(1, "zhangsan")
    cards = Cards(clock, [zhang])
    desk = gate(redis, backend, clock, cards, per_minute=5, per_hour=8, minute_reserve=0, hour_reserve=0)

    sent_now = []
    for conversation_id in range(12):
        sent_now.append(await desk.send(zhang, CardItem(conversation_id, "assigned")))
        clock.advance(15)  # 4 a minute: the minute never fills, the hour does
    assert sent_now == [True] * 8 + [False] * 4
    assert await desk.flush() == 0
    clock.advance(3602 - 12 * 15)  # the first card's hour (and the margin) is over
    assert await desk.flush() == 1
    assert cards.told("zhangsan") == [(i, "assigned") for i in range(12)]


async def test_two_processes_flushing_at_once_send_a_members_held_cards_once(redis: Redis, backend: Backend) -> None:
    clock = ManualClock(T0)
    zhang = member(1, "zhangsan")
    cards = Cards(clock, [zhang])
    desks = [gate(redis, backend, clock, cards, pace_s=10) for _ in range(2)]

    await desks[0].send(zhang, CardItem(1, "warned", "x"))
    for conversation_id in (2, 3, 4):
        await desks[conversation_id % 2].send(zhang, CardItem(conversation_id, "warned", "x"))
    clock.advance(10)
    flushed = await asyncio.gather(*(d.flush() for d in desks))

    assert sorted(flushed) == [0, 1]
    assert cards.told("zhangsan") == [(i, "warned") for i in (1, 2, 3, 4)]


async def test_a_storm_from_two_processes_stays_within_the_limit_and_loses_no_card(
    redis: Redis, backend: Backend
) -> None:
    clock = ManualClock(T0)
    agents = [member(i, f"agent{i}") for i in range(1, 4)]
    cards = Cards(clock, agents)
    desks = [gate(redis, backend, clock, cards) for _ in range(2)]
    rng = random.Random(7)
    kinds = ["assigned", "transferred", "reassigned", "warned", "breached"]
    offered: dict[str, list[tuple[int, str]]] = {a.username: [] for a in agents}
    for step in range(3_000):  # 3 agents, about 50 cards a minute each, for 20 minutes; flushes every second
        clock.advance(rng.choice([0.0, 0.5, 1.0, 1.5]))
        agent = rng.choice(agents)
        item = CardItem(step, rng.choice(kinds), "x")
        offered[agent.username].append((item.conversation_id, item.kind))
        await rng.choice(desks).send(agent, item)
        if step % 3 == 0:
            await rng.choice(desks).flush()
    for _ in range(70):  # the storm is over: everything held goes out
        clock.advance(1)
        await rng.choice(desks).flush()

    for agent in agents:
        assert cards.most_in_a_minute(agent.username) <= 30
        assert sorted(cards.told(agent.username)) == sorted(offered[agent.username])  # each card exactly once
    assert await desks[0].held() == 0


async def test_without_a_budget_every_card_goes_at_once() -> None:
    clock = ManualClock(T0)
    zhang = member(1, "zhangsan")
    cards = Cards(clock, [zhang])
    desk = MemberCards(cards, None)

    for conversation_id in range(40):
        assert await desk.send(zhang, CardItem(conversation_id, "warned"))
    assert await desk.flush() == 0
    assert len(cards.sent) == 40
