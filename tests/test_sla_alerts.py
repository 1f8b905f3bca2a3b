"""Alert pacing: one alert card per member per interval, the rest as one digest (no network)."""

from __future__ import annotations

from datetime import UTC, datetime

from bot.sla_alerts import Alert, AlertPacer
from bot.storage.handoff_repository import AgentRecord
from bot.wecom.simulator import ManualClock

T0 = 1_750_000_000.0


def member(member_id: int, username: str) -> AgentRecord:
    return AgentRecord(
        id=member_id,
        username=username,
        display_name=username,
        role="lead",
        team="support",
        wecom_userid=username,
        skills=frozenset(),
        capacity=5,
        presence="offline",
        last_assigned_at=datetime.fromtimestamp(T0, UTC),
        open_count=0,
    )


class Cards:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[int]]] = []  # (member, single|digest, conversation ids)

    async def notify_agent(
        self, agent: AgentRecord, conversation_id: int, kind: str, *, level: int = 0, extra: str = ""
    ) -> bool:
        self.sent.append((agent.username, "single", [conversation_id]))
        return True

    async def notify_digest(self, agent: AgentRecord, alerts: list[Alert]) -> bool:
        self.sent.append((agent.username, "digest", [a.conversation_id for a in alerts]))
        return True


async def test_the_first_alert_goes_at_once_and_the_rest_of_the_interval_becomes_one_digest() -> None:
    clock = ManualClock(T0)
    cards = Cards()
    pacer = AlertPacer(cards, clock, interval_s=10)
    boss = member(1, "boss")

    assert await pacer.send(boss, Alert(101, "breached", "首次响应已超时"))
    for conversation_id in (102, 103, 104):
        clock.advance(1)
        assert not await pacer.send(boss, Alert(conversation_id, "breached", "首次响应已超时"))
    assert pacer.held() == 3
    assert await pacer.flush() == 0  # 3 s after the first card: still inside the interval
    clock.advance(7)
    assert await pacer.flush() == 1

    assert cards.sent == [("boss", "single", [101]), ("boss", "digest", [102, 103, 104])]
    assert pacer.held() == 0


async def test_members_are_paced_apart_and_a_lone_held_alert_is_sent_as_itself() -> None:
    clock = ManualClock(T0)
    cards = Cards()
    pacer = AlertPacer(cards, clock, interval_s=10)
    boss, zhang = member(1, "boss"), member(2, "zhangsan")

    await pacer.send(boss, Alert(1, "breached", "x"))
    await pacer.send(zhang, Alert(2, "warned", "y"))  # another member: not held behind the boss's card
    clock.advance(2)
    await pacer.send(zhang, Alert(3, "warned", "z"))
    clock.advance(10)
    await pacer.flush()
    await pacer.send(boss, Alert(4, "breached", "w"))  # the boss's interval passed long ago: at once

    assert cards.sent == [
        ("boss", "single", [1]),
        ("zhangsan", "single", [2]),
        ("zhangsan", "single", [3]),
        ("boss", "single", [4]),
    ]


async def test_a_storm_stays_within_wecoms_30_cards_a_minute_per_member() -> None:
    clock = ManualClock(T0)
    cards = Cards()
    pacer = AlertPacer(cards, clock)
    boss = member(1, "boss")
    for i in range(1200):  # 20 breaches a second for a minute, the sweep flushing every second
        await pacer.send(boss, Alert(i, "breached", "x"))
        if i % 20 == 19:
            clock.advance(1)
            await pacer.flush()
    clock.advance(60)
    await pacer.flush()

    told = [c for c in cards.sent if c[0] == "boss"]
    assert len(told) <= 30 - 20  # 6 a minute (+ the last flush): well inside the limit
    assert sorted(i for _m, _k, ids in told for i in ids) == list(range(1200))  # every alert reached the lead
