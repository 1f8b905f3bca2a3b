"""Routing (pure): who gets a conversation, when it queues, out-of-hours answers, and transfer checks."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.business_hours import ALWAYS_OPEN, BusinessCalendar
from handlers.routing import (
    TRANSFER_REFUSAL_MESSAGES_ZH,
    Agent,
    Assignment,
    AssignReason,
    ConversationNeeds,
    OutOfHours,
    Presence,
    QueueDecision,
    QueueReason,
    RoutingDecision,
    TransferAllowed,
    TransferRefusal,
    TransferRefused,
    Waiting,
    assign_in_order,
    check_transfer,
    choose_agent,
    with_assignment,
)

SHANGHAI_TEAM = BusinessCalendar.build({"mon-fri": ["09:00-12:00", "13:30-18:00"], "sat": ["10:00-16:00"]})
BERLIN_TEAM = BusinessCalendar.build({"mon-fri": ["09:00-17:00"]}, timezone="Europe/Berlin")


def sh(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()


NOW = sh(2025, 6, 2, 10, 0)  # Monday morning
ANY = ConversationNeeds()
AFTER_SALES = ConversationNeeds(skills=frozenset({"after_sales"}))


def agent(
    agent_id: str,
    presence: Presence = Presence.ONLINE,
    capacity: int = 3,
    open_count: int = 0,
    skills: frozenset[str] = frozenset({"after_sales", "presales"}),
    last: float | None = None,
    hours: BusinessCalendar = SHANGHAI_TEAM,
    groups: frozenset[str] = frozenset(),
) -> Agent:
    return Agent(agent_id, presence, capacity, open_count, skills, groups, last, hours)


# --- assignment -----------------------------------------------------------------------------------


def test_the_least_busy_online_skilled_agent_gets_the_conversation() -> None:
    agents = [agent("ann", open_count=2), agent("bob", open_count=1), agent("cat", open_count=0, skills=frozenset())]
    assert choose_agent(agents, AFTER_SALES, now=NOW) == Assignment("bob", AssignReason.LEAST_BUSY)


def test_ties_go_to_the_longest_idle_then_the_agent_id() -> None:
    agents = [agent("ann", last=NOW - 60), agent("bob", last=NOW - 600), agent("cat", last=NOW - 600)]
    assert choose_agent(agents, ANY, now=NOW) == Assignment("bob", AssignReason.LEAST_BUSY)
    never = [*agents, agent("dan", last=None)]
    assert choose_agent(never, ANY, now=NOW) == Assignment("dan", AssignReason.LEAST_BUSY)
    assert choose_agent(list(reversed(agents)), ANY, now=NOW) == Assignment("bob", AssignReason.LEAST_BUSY)


@pytest.mark.parametrize(
    "unavailable",
    [
        agent("zed", presence=Presence.OFFLINE),
        agent("zed", presence=Presence.AWAY),
        agent("zed", capacity=2, open_count=2),
        agent("zed", capacity=0),
        agent("zed", skills=frozenset({"presales"})),
    ],
)
def test_offline_away_full_or_unskilled_agents_are_never_chosen(unavailable: Agent) -> None:
    busy = agent("amy", open_count=2, last=NOW)
    assert choose_agent([unavailable, busy], AFTER_SALES, now=NOW) == Assignment("amy", AssignReason.LEAST_BUSY)


def test_needs_can_ask_for_a_group_and_exclude_an_agent() -> None:
    agents = [agent("ann", groups=frozenset({"vip"})), agent("bob", groups=frozenset({"vip"}), open_count=1)]
    vip = ConversationNeeds(group="vip")
    assert choose_agent(agents, vip, now=NOW) == Assignment("ann", AssignReason.LEAST_BUSY)
    # Reassignment after a breach: anyone but the current assignee.
    assert choose_agent(agents, ConversationNeeds(group="vip", exclude=frozenset({"ann"})), now=NOW) == Assignment(
        "bob", AssignReason.LEAST_BUSY
    )
    assert choose_agent(agents, ConversationNeeds(group="sales"), now=NOW) == QueueDecision(
        QueueReason.NO_SKILLED_AGENT
    )


def test_a_returning_customer_gets_their_last_agent_when_available() -> None:
    agents = [agent("ann", open_count=0), agent("bob", open_count=2)]
    assert choose_agent(agents, ANY, "bob", now=NOW) == Assignment("bob", AssignReason.PREFERRED)


@pytest.mark.parametrize(
    "last_agent",
    [
        agent("bob", presence=Presence.OFFLINE),
        agent("bob", open_count=3),
        agent("bob", skills=frozenset()),
        agent("bob", hours=BERLIN_TEAM),  # 04:00 in Berlin: that team is closed
    ],
)
def test_an_unavailable_last_agent_falls_back_to_the_least_busy(last_agent: Agent) -> None:
    agents = [agent("ann", open_count=1), last_agent]
    assert choose_agent(agents, AFTER_SALES, "bob", now=NOW) == Assignment("ann", AssignReason.LEAST_BUSY)


@pytest.mark.parametrize(
    ("agents", "reason"),
    [
        ([], QueueReason.NO_SKILLED_AGENT),
        ([agent("ann", skills=frozenset())], QueueReason.NO_SKILLED_AGENT),
        ([agent("ann", presence=Presence.OFFLINE), agent("bob", presence=Presence.AWAY)], QueueReason.NOBODY_ONLINE),
        ([agent("ann", open_count=3), agent("bob", capacity=1, open_count=1)], QueueReason.ALL_AT_CAPACITY),
    ],
)
def test_nobody_available_means_the_queue_with_a_reason(agents: list[Agent], reason: QueueReason) -> None:
    assert choose_agent(agents, AFTER_SALES, now=NOW) == QueueDecision(reason)


def test_outside_business_hours_the_customer_learns_when_the_team_opens() -> None:
    friday_night = sh(2025, 6, 6, 20, 0)
    agents = [agent("ann"), agent("bob", presence=Presence.OFFLINE)]
    assert choose_agent(agents, ANY, now=friday_night) == OutOfHours(next_open=sh(2025, 6, 7, 10, 0))


def test_out_of_hours_names_the_earliest_opening_among_skilled_teams() -> None:
    sunday_night = sh(2025, 6, 8, 23, 0)  # Monday 09:00 Shanghai is earlier than Monday 09:00 Berlin
    agents = [agent("ann", hours=BERLIN_TEAM), agent("bob"), agent("cat", skills=frozenset(), hours=ALWAYS_OPEN)]
    assert choose_agent(agents, AFTER_SALES, now=sunday_night) == OutOfHours(next_open=sh(2025, 6, 9, 9, 0))


def test_an_open_team_takes_the_conversation_while_another_is_closed() -> None:
    berlin_morning = sh(2025, 6, 2, 16, 0)  # 10:00 in Berlin; Shanghai (16:00) is open too
    lunch = sh(2025, 6, 2, 12, 30)  # Shanghai lunch; 06:30 in Berlin, closed
    evening = sh(2025, 6, 2, 20, 0)  # Shanghai closed, 14:00 in Berlin
    agents = [agent("ann", hours=BERLIN_TEAM, open_count=1), agent("bob", open_count=2)]
    assert choose_agent(agents, ANY, now=berlin_morning) == Assignment("ann", AssignReason.LEAST_BUSY)
    assert choose_agent(agents, ANY, now=evening) == Assignment("ann", AssignReason.LEAST_BUSY)
    assert choose_agent(agents, ANY, now=lunch) == OutOfHours(next_open=sh(2025, 6, 2, 13, 30))


# --- a queue draining -----------------------------------------------------------------------------


def test_a_batch_fills_agents_up_to_capacity_and_queues_the_rest() -> None:
    agents = [agent("ann", capacity=3), agent("bob", capacity=3, open_count=1)]
    waiting = [Waiting(f"c{i}") for i in range(8)]
    decisions, after = assign_in_order(waiting, agents, now=NOW)
    assigned = [d.agent_id for d in decisions.values() if isinstance(d, Assignment)]
    # ann (0 open); then bob, never assigned, is idler than ann; then ann (1 vs 2); a full tie goes by id; bob.
    assert assigned == ["ann", "bob", "ann", "ann", "bob"]
    assert [decisions[f"c{i}"] for i in range(5, 8)] == [QueueDecision(QueueReason.ALL_AT_CAPACITY)] * 3
    assert {a.agent_id: a.open_count for a in after} == {"ann": 3, "bob": 3}
    assert all(a.last_assigned_at == NOW for a in after)


def test_with_assignment_counts_one_more_and_resets_idle_time() -> None:
    assert with_assignment(agent("ann", open_count=1, last=NOW - 100), NOW) == agent("ann", open_count=2, last=NOW)


# --- transfers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (agent("bob", presence=Presence.OFFLINE), TransferRefusal.AGENT_OFFLINE),
        (agent("bob", capacity=2, open_count=2), TransferRefusal.AGENT_AT_CAPACITY),
        (agent("ann"), TransferRefusal.SAME_AGENT),
        (agent("bob", skills=frozenset({"presales"})), TransferRefusal.MISSING_SKILL),
    ],
)
def test_transfers_to_offline_full_or_unfit_agents_are_refused_with_a_reason(
    target: Agent, code: TransferRefusal
) -> None:
    refused = check_transfer(target, current_agent_id="ann", needs=AFTER_SALES)
    assert refused == TransferRefused(target.agent_id, code)
    assert isinstance(refused, TransferRefused)
    assert refused.message_zh == TRANSFER_REFUSAL_MESSAGES_ZH[code]


def test_refusal_codes_are_english_and_messages_simplified_chinese() -> None:
    assert set(TRANSFER_REFUSAL_MESSAGES_ZH) == set(TransferRefusal)
    assert TransferRefusal.AGENT_OFFLINE.value == "agent_offline"
    assert "离线" in TRANSFER_REFUSAL_MESSAGES_ZH[TransferRefusal.AGENT_OFFLINE]
    assert "已满" in TRANSFER_REFUSAL_MESSAGES_ZH[TransferRefusal.AGENT_AT_CAPACITY]


@pytest.mark.parametrize("presence", [Presence.ONLINE, Presence.AWAY])
def test_transfers_to_signed_in_agents_with_room_are_allowed(presence: Presence) -> None:
    assert check_transfer(agent("bob", presence=presence), current_agent_id="ann") == TransferAllowed("bob")
    assert check_transfer(agent("bob", skills=frozenset()), current_agent_id=None) == TransferAllowed("bob")


# --- properties -----------------------------------------------------------------------------------

SKILLS = ["after_sales", "presales", "billing"]
skill_sets = st.frozensets(st.sampled_from(SKILLS), max_size=3)
instants = st.floats(sh(2025, 1, 1), sh(2026, 1, 1), allow_nan=False)


@st.composite
def agent_lists(draw: st.DrawFn) -> list[Agent]:
    ids = draw(st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8))
    return [
        Agent(
            agent_id=agent_id,
            presence=draw(st.sampled_from(list(Presence))),
            capacity=draw(st.integers(0, 4)),
            open_count=draw(st.integers(0, 5)),
            skills=draw(skill_sets),
            groups=draw(st.frozensets(st.sampled_from(["vip", "cn"]), max_size=2)),
            last_assigned_at=draw(st.none() | st.floats(0, 100, allow_nan=False)),
            hours=draw(st.sampled_from([ALWAYS_OPEN, SHANGHAI_TEAM, BERLIN_TEAM])),
        )
        for agent_id in ids
    ]


needs_strategy = st.builds(
    ConversationNeeds,
    skills=st.frozensets(st.sampled_from(SKILLS), max_size=2),
    group=st.none() | st.sampled_from(["vip", "cn"]),
    exclude=st.frozensets(st.sampled_from("abcdefgh"), max_size=2),
)


def eligible(a: Agent, needs: ConversationNeeds, now: float) -> bool:
    return needs.fits(a) and a.presence is Presence.ONLINE and a.has_room and a.hours.is_open(now)


@settings(deadline=None)
@given(agent_lists(), needs_strategy, st.none() | st.sampled_from("abcdefgh"), instants)
def test_routing_only_ever_picks_an_eligible_agent(
    agents: list[Agent], needs: ConversationNeeds, preferred: str | None, now: float
) -> None:
    decision: RoutingDecision = choose_agent(agents, needs, preferred, now=now)
    candidates = [a for a in agents if eligible(a, needs, now)]
    if isinstance(decision, Assignment):
        chosen = next(a for a in agents if a.agent_id == decision.agent_id)
        assert eligible(chosen, needs, now)
        if decision.reason is AssignReason.PREFERRED:
            assert chosen.agent_id == preferred
        else:
            assert preferred not in {a.agent_id for a in candidates}
            assert chosen.open_count == min(a.open_count for a in candidates)
    else:
        assert candidates == []
    if isinstance(decision, OutOfHours):
        assert decision.next_open > now
        assert not any(a.hours.is_open(now) for a in agents if needs.fits(a))


@settings(deadline=None)
@given(agent_lists(), st.lists(needs_strategy, max_size=30), instants)
def test_a_batch_never_assigns_beyond_capacity(agents: list[Agent], needs: list[ConversationNeeds], now: float) -> None:
    waiting = [Waiting(f"c{i}", n) for i, n in enumerate(needs)]
    decisions, after = assign_in_order(waiting, agents, now=now)
    before = {a.agent_id: a for a in agents}
    taken: dict[str, int] = {}
    for decision in decisions.values():
        if isinstance(decision, Assignment):
            taken[decision.agent_id] = taken.get(decision.agent_id, 0) + 1
    for final in after:
        start = before[final.agent_id]
        assert taken.get(final.agent_id, 0) <= max(0, start.capacity - start.open_count)
        assert final.open_count == start.open_count + taken.get(final.agent_id, 0)
