"""SLA (pure): policy choice, the clock state machine in business time, and the escalation ladder sweep."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.business_hours import ALWAYS_OPEN, BusinessCalendar
from handlers.domain import Channel
from handlers.sla import (
    DEFAULT_POLICY,
    Author,
    ClockKind,
    ClockStatus,
    Ladder,
    Priority,
    SlaClock,
    SlaEvent,
    SlaEventKind,
    SlaPolicy,
    SlaRule,
    SlaState,
    SlaTransition,
    advance,
    choose_policy,
    customer_message,
    evaluate,
    open_conversation,
    remaining_seconds,
    reply,
    resolve,
    start_clock,
)

TEAM = BusinessCalendar.build(
    {"mon-fri": ["09:00-12:00", "13:30-18:00"], "sat": ["10:00-16:00"]}, holidays=[date(2025, 10, 1)]
)


def sh(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()


MONDAY_10 = sh(2025, 6, 2, 10, 0)
FULL = SlaPolicy(
    "vip", first_response=30, next_response=60, resolution=3600, ladder=Ladder(warn_share=0.5, escalate_after=(120,))
)


def kinds(events: tuple[SlaEvent, ...] | list[SlaEvent]) -> list[tuple[ClockKind, SlaEventKind, int]]:
    return [(e.clock, e.kind, e.level) for e in events]


# --- policies -------------------------------------------------------------------------------------

VIP = SlaPolicy("vip", first_response=15)
URGENT = SlaPolicy("urgent", first_response=10)
APP = SlaPolicy("app", first_response=120)
RULES = [
    SlaRule(URGENT, priorities=frozenset({Priority.URGENT})),
    SlaRule(VIP, channels=frozenset({Channel.KF}), tags_any=frozenset({"高价值", "vip"})),
    SlaRule(APP, channels=frozenset({Channel.APP})),
]


@pytest.mark.parametrize(
    ("channel", "tags", "priority", "policy"),
    [
        (Channel.KF, {"高价值"}, Priority.NORMAL, VIP),
        (Channel.KF, {"新用户", "vip"}, Priority.NORMAL, VIP),  # any of the tags
        (Channel.KF, {"高价值"}, Priority.URGENT, URGENT),  # the first matching rule wins
        (Channel.APP, {"高价值"}, Priority.NORMAL, APP),  # the VIP rule is for kf only
        (Channel.KF, {"沉默"}, Priority.NORMAL, DEFAULT_POLICY),
        (Channel.KF, set(), Priority.LOW, DEFAULT_POLICY),
    ],
)
def test_the_first_matching_rule_chooses_the_policy(
    channel: Channel, tags: set[str], priority: Priority, policy: SlaPolicy
) -> None:
    assert choose_policy(RULES, channel, tags, priority) is policy


def test_the_default_policy_is_first_response_within_30_seconds() -> None:
    assert DEFAULT_POLICY.first_response == 30
    assert DEFAULT_POLICY.next_response is None and DEFAULT_POLICY.resolution is None
    assert DEFAULT_POLICY.ladder.warn_share == 0.8
    assert SlaRule(VIP).matches(Channel.CONTACT, frozenset(), Priority.LOW)  # no conditions: matches anything


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Ladder(warn_share=1.0), "warn_share"),
        (lambda: Ladder(warn_share=0), "warn_share"),
        (lambda: Ladder(escalate_after=(60, 60)), "increasing"),
        (lambda: Ladder(escalate_after=(0,)), "increasing"),
        (lambda: SlaPolicy("x", first_response=0), "first_response target must be positive"),
        (lambda: SlaPolicy("x", resolution=-1), "resolution target must be positive"),
    ],
)
def test_bad_policies_are_rejected(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# --- clocks start in business time ---------------------------------------------------------------


def test_handoff_in_business_hours_is_due_30_seconds_later_with_a_warning_at_80_percent() -> None:
    opened = open_conversation("c1", DEFAULT_POLICY, TEAM, MONDAY_10)
    clock = opened.state.first_response
    assert clock is not None
    assert (clock.warn_at, clock.due_at, clock.level2_at) == (MONDAY_10 + 24, MONDAY_10 + 30, None)
    assert clock.next_deadline == MONDAY_10 + 24
    assert opened.state.resolution is None  # the default policy has no resolution target
    assert kinds(opened.events) == [(ClockKind.FIRST_RESPONSE, SlaEventKind.APPLIED, 0)]
    assert opened.events[0].at == MONDAY_10


@pytest.mark.parametrize(
    ("handoff", "warn", "due"),
    [
        # Friday evening: the clock only starts when the team opens on Saturday
        ((2025, 6, 6, 20, 0), (2025, 6, 7, 10, 0, 24), (2025, 6, 7, 10, 0, 30)),
        # ten seconds before lunch: the rest of the 30 s counts after lunch
        ((2025, 6, 2, 11, 59, 50), (2025, 6, 2, 13, 30, 14), (2025, 6, 2, 13, 30, 20)),
        # the day before a holiday, after closing: next opening is Thursday
        ((2025, 9, 30, 18, 30), (2025, 10, 2, 9, 0, 24), (2025, 10, 2, 9, 0, 30)),
    ],
)
def test_clocks_only_run_inside_business_hours(
    handoff: tuple[int, ...], warn: tuple[int, ...], due: tuple[int, ...]
) -> None:
    clock = open_conversation("c1", DEFAULT_POLICY, TEAM, sh(*handoff)).state.first_response
    assert clock is not None
    assert (clock.warn_at, clock.due_at) == (sh(*warn), sh(*due))


def test_a_policy_without_a_target_starts_no_clock() -> None:
    assert start_clock("c1", ClockKind.NEXT_RESPONSE, DEFAULT_POLICY, TEAM, MONDAY_10) is None


# --- ladder ---------------------------------------------------------------------------------------


def test_the_ladder_warns_breaches_and_escalates_once_each() -> None:
    clock = open_conversation("c1", FULL, TEAM, MONDAY_10).state.first_response
    assert clock is not None
    assert (clock.warn_at, clock.due_at, clock.level2_at) == (MONDAY_10 + 15, MONDAY_10 + 30, MONDAY_10 + 150)

    assert evaluate([clock], MONDAY_10 + 14.9) == []
    warned = evaluate([clock], MONDAY_10 + 15)
    assert kinds(warned) == [(ClockKind.FIRST_RESPONSE, SlaEventKind.WARNED, 0)]
    clock = advance(clock, MONDAY_10 + 15)
    assert evaluate([clock], MONDAY_10 + 20) == []
    assert clock.next_deadline == MONDAY_10 + 30

    breached = evaluate([clock], MONDAY_10 + 30)
    assert kinds(breached) == [(ClockKind.FIRST_RESPONSE, SlaEventKind.BREACHED, 1)]
    assert breached[0].at == breached[0].due_at == MONDAY_10 + 30
    clock = advance(clock, MONDAY_10 + 30)
    assert clock.next_deadline == MONDAY_10 + 150
    assert clock.running  # a breached clock keeps running until a human answers

    escalated = evaluate([clock], MONDAY_10 + 151)
    assert kinds(escalated) == [(ClockKind.FIRST_RESPONSE, SlaEventKind.ESCALATED, 2)]
    clock = advance(clock, MONDAY_10 + 151)
    assert clock.next_deadline is None
    assert evaluate([clock], MONDAY_10 + 10_000) == []


def test_a_late_sweep_reports_every_passed_rung_in_order() -> None:
    clock = open_conversation("c1", FULL, TEAM, MONDAY_10).state.first_response
    assert clock is not None
    events = evaluate([clock], MONDAY_10 + 3600)
    assert [(e.kind, e.level) for e in events] == [
        (SlaEventKind.WARNED, 0),
        (SlaEventKind.BREACHED, 1),
        (SlaEventKind.ESCALATED, 2),
    ]
    assert [e.at for e in events] == [MONDAY_10 + 15, MONDAY_10 + 30, MONDAY_10 + 150]


def test_evaluate_is_idempotent_until_the_clock_is_advanced() -> None:
    clock = open_conversation("c1", DEFAULT_POLICY, TEAM, MONDAY_10).state.first_response
    assert clock is not None
    assert evaluate([clock], MONDAY_10 + 31) == evaluate([clock], MONDAY_10 + 31)
    assert advance(advance(clock, MONDAY_10 + 31), MONDAY_10 + 31) == advance(clock, MONDAY_10 + 31)


def test_escalation_after_breach_counts_business_time() -> None:
    policy = SlaPolicy("p", first_response=30, ladder=Ladder(escalate_after=(600,)))
    clock = open_conversation("c1", policy, TEAM, sh(2025, 6, 6, 17, 59, 0)).state.first_response
    assert clock is not None
    assert clock.due_at == sh(2025, 6, 6, 17, 59, 30)
    assert clock.level2_at == sh(2025, 6, 7, 10, 9, 30)  # 30 s on Friday, the remaining 9.5 min on Saturday


def test_no_warning_when_the_share_is_switched_off() -> None:
    policy = SlaPolicy("p", first_response=30, ladder=Ladder(warn_share=None))
    clock = open_conversation("c1", policy, ALWAYS_OPEN, MONDAY_10).state.first_response
    assert clock is not None
    assert clock.warn_at is None
    assert clock.next_deadline == clock.due_at


# --- only humans answer ---------------------------------------------------------------------------


@pytest.mark.parametrize("author", [Author.BOT, Author.SCHEDULED])
def test_bot_and_scheduled_messages_do_not_fulfil_the_first_response(author: Author) -> None:
    state = open_conversation("c1", DEFAULT_POLICY, TEAM, MONDAY_10).state
    after = reply(state, MONDAY_10 + 5, author)
    assert after.events == ()
    assert after.state == state
    assert kinds(evaluate(after.state.running, MONDAY_10 + 30)) == [
        (ClockKind.FIRST_RESPONSE, SlaEventKind.WARNED, 0),
        (ClockKind.FIRST_RESPONSE, SlaEventKind.BREACHED, 1),
    ]


def test_a_human_reply_in_time_fulfils_the_first_response() -> None:
    state = open_conversation("c1", DEFAULT_POLICY, TEAM, MONDAY_10).state
    answered = reply(state, MONDAY_10 + 12, Author.HUMAN)
    assert kinds(answered.events) == [(ClockKind.FIRST_RESPONSE, SlaEventKind.FULFILLED, 0)]
    assert answered.events[0].met is True
    clock = answered.state.first_response
    assert clock is not None
    assert (clock.status, clock.ended_at, clock.next_deadline) == (ClockStatus.FULFILLED, MONDAY_10 + 12, None)
    assert evaluate(answered.state.clocks, MONDAY_10 + 3600) == []


def test_a_human_reply_after_the_due_instant_is_a_miss() -> None:
    state = open_conversation("c1", DEFAULT_POLICY, TEAM, MONDAY_10).state
    assert reply(state, MONDAY_10 + 29.9, Author.HUMAN).events[0].met is True
    assert reply(state, MONDAY_10 + 30, Author.HUMAN).events[0].met is False


# --- next response --------------------------------------------------------------------------------


def test_next_response_runs_from_the_oldest_unanswered_message_after_a_human_reply() -> None:
    t = MONDAY_10
    state = open_conversation("c1", FULL, TEAM, t).state
    # Before any human reply a customer message only adds to the first-response wait.
    before = customer_message(state, TEAM, t + 5)
    assert before.events == () and before.state.next_response is None

    state = reply(state, t + 10, Author.HUMAN).state
    first = customer_message(state, TEAM, t + 100)
    assert kinds(first.events) == [(ClockKind.NEXT_RESPONSE, SlaEventKind.APPLIED, 0)]
    clock = first.state.next_response
    assert clock is not None
    assert (clock.cycle, clock.started_at, clock.due_at) == (1, t + 100, t + 160)

    # More customer messages do not move the clock: it runs from the oldest unanswered one.
    again = customer_message(first.state, TEAM, t + 130)
    assert again.events == () and again.state.next_response == clock

    # A bot answer does not count; a human one does.
    assert reply(again.state, t + 140, Author.BOT).events == ()
    answered = reply(again.state, t + 150, Author.HUMAN)
    assert kinds(answered.events) == [(ClockKind.NEXT_RESPONSE, SlaEventKind.FULFILLED, 0)]
    assert answered.events[0].met is True

    second = customer_message(answered.state, TEAM, t + 400)
    clock2 = second.state.next_response
    assert clock2 is not None and clock2.cycle == 2 and clock2.started_at == t + 400
    assert second.events[0].key != first.events[0].key  # each cycle's events are written separately


def test_resolve_fulfils_resolution_and_stops_response_clocks() -> None:
    t = MONDAY_10
    state = open_conversation("c1", FULL, TEAM, t).state
    state = reply(state, t + 10, Author.HUMAN).state
    state = customer_message(state, TEAM, t + 20).state
    resolved = resolve(state, t + 50)
    assert sorted(kinds(resolved.events)) == sorted(
        [
            (ClockKind.NEXT_RESPONSE, SlaEventKind.STOPPED, 0),
            (ClockKind.RESOLUTION, SlaEventKind.FULFILLED, 0),
        ]
    )
    assert resolved.state.resolved and resolved.state.running == ()
    assert evaluate(resolved.state.clocks, t + 100_000) == []
    # After resolve: customer messages start nothing, replies fulfil nothing, resolving again is a no-op.
    assert customer_message(resolved.state, TEAM, t + 60).events == ()
    assert reply(resolved.state, t + 61, Author.HUMAN).events == ()
    assert resolve(resolved.state, t + 62) == SlaTransition(resolved.state)


def test_resolving_before_any_human_answer_stops_the_first_response() -> None:
    state = open_conversation("c1", FULL, TEAM, MONDAY_10).state
    resolved = resolve(state, MONDAY_10 + 5)
    by_clock = {e.clock: e for e in resolved.events}
    assert by_clock[ClockKind.FIRST_RESPONSE].kind is SlaEventKind.STOPPED
    assert by_clock[ClockKind.FIRST_RESPONSE].met is None
    assert by_clock[ClockKind.RESOLUTION].kind is SlaEventKind.FULFILLED
    assert by_clock[ClockKind.RESOLUTION].met is True


def test_event_keys_name_conversation_clock_cycle_kind_and_level() -> None:
    clock = open_conversation("c9", DEFAULT_POLICY, TEAM, MONDAY_10).state.first_response
    assert clock is not None
    (event,) = evaluate([advance(clock, MONDAY_10 + 24)], MONDAY_10 + 30)
    assert event.key == ("c9", "first_response", 0, "breached", 1)


# --- the sweep ------------------------------------------------------------------------------------


class Store:
    """What the I/O layer would keep: clocks indexed by next deadline, events unique by key."""

    def __init__(self, clocks: list[SlaClock]) -> None:
        self.clocks = {(c.conversation_id, c.kind): c for c in clocks}
        self.events: dict[tuple[str, str, int, str, int], SlaEvent] = {}
        self.written = 0

    def due(self, now: float) -> list[SlaClock]:
        # Stands in for `WHERE next_deadline <= now ORDER BY next_deadline` on an indexed column.
        due = [c for c in self.clocks.values() if c.next_deadline is not None and c.next_deadline <= now]
        return sorted(due, key=lambda c: (c.next_deadline or 0.0, c.conversation_id))

    def sweep(self, now: float) -> list[SlaEvent]:
        due = self.due(now)
        fresh = []
        for event in evaluate(due, now):
            self.written += 1
            if event.key not in self.events:
                self.events[event.key] = event
                fresh.append(event)
        for clock in due:
            self.clocks[(clock.conversation_id, clock.kind)] = advance(clock, now)
        return fresh


def test_one_sweep_per_second_acts_on_each_breach_within_a_second_and_once() -> None:
    policy = SlaPolicy("p", first_response=30, ladder=Ladder(escalate_after=(60,)))
    starts = [MONDAY_10 + i * 0.37 for i in range(200)]
    clocks = []
    for i, start in enumerate(starts):
        clock = open_conversation(f"c{i}", policy, TEAM, start).state.first_response
        assert clock is not None
        clocks.append(clock)
    store = Store(clocks)
    lags = []
    now = MONDAY_10
    while now < MONDAY_10 + 200:
        for event in store.sweep(now):
            lags.append(now - event.at)
        now += 1.0
    assert len(store.events) == 200 * 3
    assert store.written == len(store.events)  # advanced clocks are never reported twice
    assert max(lags) < 1.0


@settings(deadline=None)
@given(
    st.lists(st.floats(0, 3 * 86_400, allow_nan=False), min_size=1, max_size=20),
    st.lists(st.floats(0, 5 * 86_400, allow_nan=False), min_size=1, max_size=30),
    st.sampled_from([DEFAULT_POLICY, FULL]),
)
def test_sweeps_at_any_times_report_exactly_what_one_late_sweep_would(
    offsets: list[float], sweep_offsets: list[float], policy: SlaPolicy
) -> None:
    clocks = []
    for i, offset in enumerate(offsets):
        clock = open_conversation(f"c{i}", policy, TEAM, MONDAY_10 + offset).state.first_response
        assert clock is not None
        clocks.append(clock)
    store = Store(clocks)
    sweep_times = sorted(MONDAY_10 + s for s in sweep_offsets)
    for now in sweep_times:
        fresh = store.sweep(now)
        assert all(e.at <= now for e in fresh)
    assert store.written == len(store.events)
    assert set(store.events) == {e.key for e in evaluate(clocks, sweep_times[-1])}
    for clock in store.clocks.values():
        assert clock.next_deadline is None or clock.next_deadline > sweep_times[-1]


@settings(deadline=None)
@given(st.floats(0, 7 * 86_400, allow_nan=False), st.floats(0, 7 * 86_400, allow_nan=False))
def test_a_reply_is_met_exactly_when_no_breach_was_due(start_offset: float, reply_after: float) -> None:
    start = MONDAY_10 + start_offset
    state = open_conversation("c1", DEFAULT_POLICY, TEAM, start).state
    answered = reply(state, start + reply_after, Author.HUMAN)
    breached = any(e.kind is SlaEventKind.BREACHED for e in evaluate(state.running, start + reply_after))
    assert answered.events[0].met is (not breached)
    assert TEAM.business_seconds_between(start, answered.events[0].due_at) == pytest.approx(30)


def test_with_clock_replaces_the_clock_of_its_kind() -> None:
    state = open_conversation("c1", FULL, TEAM, MONDAY_10).state
    assert state.first_response is not None
    moved = advance(state.first_response, MONDAY_10 + 20)
    updated = state.with_clock(moved)
    assert updated.first_response == moved and updated.resolution == state.resolution
    assert replace(updated, first_response=state.first_response) == state
    assert isinstance(updated, SlaState)


def test_the_countdown_stands_still_outside_business_hours() -> None:
    clock = open_conversation("c1", DEFAULT_POLICY, TEAM, sh(2025, 6, 2, 11, 59, 50)).state.first_response
    assert clock is not None
    assert remaining_seconds(clock, TEAM, sh(2025, 6, 2, 11, 59, 55)) == 25
    assert remaining_seconds(clock, TEAM, sh(2025, 6, 2, 12, 45)) == 20  # lunch: paused
    assert remaining_seconds(clock, TEAM, sh(2025, 6, 2, 13, 30, 30)) == -10  # overdue
