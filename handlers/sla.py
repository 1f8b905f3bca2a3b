"""SLA policies, the per-conversation clock state machine and the escalation ladder (pure).

Times are epoch seconds (float), as from `Clock.now()`. Targets are business seconds: a clock's deadlines are
computed once, when it starts, with the team's `BusinessCalendar`, so time outside business hours never counts
and nothing has to pause or resume a clock when the team closes or opens.

Three clocks per conversation (Chatwoot vocabulary):
- first response: starts when the conversation is opened for a human (the handoff), fulfilled by the first
  human reply;
- next response: starts at the first customer message after a human reply (the oldest unanswered one), fulfilled
  by the next human reply, stopped by resolve; each restart is a new `cycle`;
- resolution: starts with the conversation, fulfilled by resolve.
Bot and scheduled messages never fulfil a clock.

Each running clock carries its ladder of deadlines (warn at a share of the target, breach at the due instant,
optional escalation levels after breach) and how many of them were already reported. `next_deadline` is the
instant the periodic sweep must look at the clock again, so the sweep can select clocks with an index on it:

    due = clocks where status = running and next_deadline <= now      (indexed)
    events = evaluate(due, now)        → insert each by `event.key` once (unique constraint), act on the new ones
    clocks = [advance(c, now) for c in due]                              → store reached / next_deadline

A clock stays running after a breach until it is fulfilled or stopped; the fulfilled event says whether the
target was met (`due_at` is the first breached instant).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from handlers.business_hours import BusinessCalendar
from handlers.domain import Channel

DEFAULT_WARN_SHARE = 0.8
DEFAULT_FIRST_RESPONSE_SECONDS = 30.0  # the operating SOP: first response within 30 s


class ClockKind(StrEnum):
    FIRST_RESPONSE = "first_response"
    NEXT_RESPONSE = "next_response"
    RESOLUTION = "resolution"


class ClockStatus(StrEnum):
    RUNNING = "running"
    FULFILLED = "fulfilled"
    STOPPED = "stopped"  # ended without being fulfilled (resolved before a human answered)


class SlaEventKind(StrEnum):
    APPLIED = "applied"
    WARNED = "warned"
    BREACHED = "breached"
    ESCALATED = "escalated"
    FULFILLED = "fulfilled"
    STOPPED = "stopped"


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class Author(StrEnum):
    """Who wrote an outgoing message; only humans answer a customer as far as the SLA is concerned."""

    HUMAN = "human"
    BOT = "bot"
    SCHEDULED = "scheduled"


WARN_LEVEL = 0
BREACH_LEVEL = 1


@dataclass(frozen=True, slots=True)
class Ladder:
    """When to warn (share of the target) and escalate (business seconds after breach, one per level from 2)."""

    warn_share: float | None = DEFAULT_WARN_SHARE
    escalate_after: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.warn_share is not None and not 0 < self.warn_share < 1:
            raise ValueError(f"warn_share must be between 0 and 1 (exclusive), got {self.warn_share}")
        previous = 0.0
        for extra in self.escalate_after:
            if extra <= previous:
                raise ValueError(f"escalate_after must be positive and increasing, got {self.escalate_after}")
            previous = extra


@dataclass(frozen=True, slots=True)
class SlaPolicy:
    """Targets in business seconds per clock (None: no such clock) and the escalation ladder."""

    policy_id: str
    first_response: float | None = DEFAULT_FIRST_RESPONSE_SECONDS
    next_response: float | None = None
    resolution: float | None = None
    ladder: Ladder = Ladder()

    def __post_init__(self) -> None:
        for kind in ClockKind:
            target = self.target(kind)
            if target is not None and target <= 0:
                raise ValueError(f"{kind} target must be positive, got {target}")

    def target(self, kind: ClockKind) -> float | None:
        """The target of one clock kind in business seconds."""
        if kind is ClockKind.FIRST_RESPONSE:
            return self.first_response
        if kind is ClockKind.NEXT_RESPONSE:
            return self.next_response
        return self.resolution


DEFAULT_POLICY = SlaPolicy("default")


@dataclass(frozen=True, slots=True)
class SlaRule:
    """Applies `policy` when every given condition holds; an empty condition matches anything."""

    policy: SlaPolicy
    channels: frozenset[Channel] = frozenset()
    tags_any: frozenset[str] = frozenset()
    priorities: frozenset[Priority] = frozenset()

    def matches(self, channel: Channel, tags: frozenset[str], priority: Priority) -> bool:
        """Whether this rule applies to a conversation."""
        return (
            (not self.channels or channel in self.channels)
            and (not self.tags_any or not self.tags_any.isdisjoint(tags))
            and (not self.priorities or priority in self.priorities)
        )


def choose_policy(
    rules: Sequence[SlaRule],
    channel: Channel,
    tags: Iterable[str] = (),
    priority: Priority = Priority.NORMAL,
    default: SlaPolicy = DEFAULT_POLICY,
) -> SlaPolicy:
    """The policy of the first matching rule, else the default."""
    tag_set = frozenset(tags)
    for rule in rules:
        if rule.matches(channel, tag_set, priority):
            return rule.policy
    return default


@dataclass(frozen=True, slots=True)
class Deadline:
    """One rung of a clock's ladder: what happens at which instant."""

    kind: SlaEventKind
    level: int
    at: float


@dataclass(frozen=True, slots=True)
class SlaClock:
    """One clock of one conversation, with its deadlines computed in business time at start."""

    conversation_id: str
    kind: ClockKind
    cycle: int  # 0 for first response and resolution; 1, 2, ... for each next-response restart
    policy_id: str
    target_seconds: float
    started_at: float
    ladder: tuple[Deadline, ...]
    reached: int = 0  # rungs of the ladder already reported
    status: ClockStatus = ClockStatus.RUNNING
    ended_at: float | None = None

    def _rung(self, kind: SlaEventKind, level: int) -> float | None:
        for rung in self.ladder:
            if rung.kind is kind and rung.level == level:
                return rung.at
        return None

    @property
    def due_at(self) -> float:
        """The first breached instant."""
        due = self._rung(SlaEventKind.BREACHED, BREACH_LEVEL)
        assert due is not None, "every ladder has a breach rung"
        return due

    @property
    def warn_at(self) -> float | None:
        return self._rung(SlaEventKind.WARNED, WARN_LEVEL)

    @property
    def level2_at(self) -> float | None:
        return self._rung(SlaEventKind.ESCALATED, 2)

    @property
    def next_deadline(self) -> float | None:
        """When the sweep must look at this clock again (None: never)."""
        if self.status is not ClockStatus.RUNNING or self.reached >= len(self.ladder):
            return None
        return self.ladder[self.reached].at

    @property
    def running(self) -> bool:
        return self.status is ClockStatus.RUNNING

    def met(self) -> bool | None:
        """For a fulfilled clock, whether it was fulfilled before its due instant."""
        if self.status is not ClockStatus.FULFILLED or self.ended_at is None:
            return None
        return self.ended_at < self.due_at


@dataclass(frozen=True, slots=True)
class SlaEvent:
    """One entry of a clock's event log; `key` identifies it so the caller writes it exactly once."""

    conversation_id: str
    clock: ClockKind
    cycle: int
    kind: SlaEventKind
    level: int
    at: float  # when it happened (applied/fulfilled/stopped) or was due (warned/breached/escalated)
    due_at: float
    met: bool | None = None  # fulfilled: whether the target was met

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        """(conversation, clock kind, cycle, event kind, level): unique per event."""
        return (self.conversation_id, self.clock.value, self.cycle, self.kind.value, self.level)


def start_clock(
    conversation_id: str,
    kind: ClockKind,
    policy: SlaPolicy,
    calendar: BusinessCalendar,
    at: float,
    cycle: int = 0,
) -> SlaClock | None:
    """A running clock from `at` with its deadlines in business time, or None when the policy has no target."""
    target = policy.target(kind)
    if target is None:
        return None
    ladder = policy.ladder
    rungs: list[Deadline] = []
    if ladder.warn_share is not None:
        rungs.append(
            Deadline(SlaEventKind.WARNED, WARN_LEVEL, calendar.add_business_seconds(at, target * ladder.warn_share))
        )
    rungs.append(Deadline(SlaEventKind.BREACHED, BREACH_LEVEL, calendar.add_business_seconds(at, target)))
    for level, extra in enumerate(ladder.escalate_after, start=2):
        rungs.append(Deadline(SlaEventKind.ESCALATED, level, calendar.add_business_seconds(at, target + extra)))
    return SlaClock(
        conversation_id=conversation_id,
        kind=kind,
        cycle=cycle,
        policy_id=policy.policy_id,
        target_seconds=target,
        started_at=at,
        ladder=tuple(rungs),
    )


def remaining_seconds(clock: SlaClock, calendar: BusinessCalendar, now: float) -> float:
    """Business seconds left until the clock is due (negative when overdue), for countdowns."""
    return calendar.business_seconds_between(now, clock.due_at)


def evaluate(clocks: Iterable[SlaClock], now: float) -> list[SlaEvent]:
    """Ladder events due by `now` and not yet reported, in clock order then ladder order."""
    events: list[SlaEvent] = []
    for clock in clocks:
        if not clock.running:
            continue
        for rung in clock.ladder[clock.reached :]:
            if rung.at > now:
                break
            events.append(
                SlaEvent(clock.conversation_id, clock.kind, clock.cycle, rung.kind, rung.level, rung.at, clock.due_at)
            )
    return events


def advance(clock: SlaClock, now: float) -> SlaClock:
    """The clock with every rung due by `now` marked reported (what `evaluate` just returned for it)."""
    if not clock.running:
        return clock
    reached = clock.reached
    while reached < len(clock.ladder) and clock.ladder[reached].at <= now:
        reached += 1
    return clock if reached == clock.reached else replace(clock, reached=reached)


def _applied(clock: SlaClock) -> SlaEvent:
    return SlaEvent(
        clock.conversation_id, clock.kind, clock.cycle, SlaEventKind.APPLIED, 0, clock.started_at, clock.due_at
    )


def _end(clock: SlaClock, status: ClockStatus, at: float) -> tuple[SlaClock, SlaEvent]:
    ended = replace(clock, status=status, ended_at=at)
    kind = SlaEventKind.FULFILLED if status is ClockStatus.FULFILLED else SlaEventKind.STOPPED
    event = SlaEvent(clock.conversation_id, clock.kind, clock.cycle, kind, 0, at, clock.due_at, met=ended.met())
    return ended, event


@dataclass(frozen=True, slots=True)
class SlaState:
    """The SLA side of one conversation: its policy and the latest clock of each kind."""

    conversation_id: str
    policy: SlaPolicy
    first_response: SlaClock | None = None
    next_response: SlaClock | None = None
    resolution: SlaClock | None = None
    human_replied: bool = False
    resolved: bool = False

    @property
    def clocks(self) -> tuple[SlaClock, ...]:
        """The latest clock of each kind that exists."""
        return tuple(c for c in (self.first_response, self.next_response, self.resolution) if c is not None)

    @property
    def running(self) -> tuple[SlaClock, ...]:
        """The clocks still running."""
        return tuple(c for c in self.clocks if c.running)

    def with_clock(self, clock: SlaClock) -> SlaState:
        """The state with one clock replaced (e.g. after the sweep advanced it)."""
        if clock.kind is ClockKind.FIRST_RESPONSE:
            return replace(self, first_response=clock)
        if clock.kind is ClockKind.NEXT_RESPONSE:
            return replace(self, next_response=clock)
        return replace(self, resolution=clock)


@dataclass(frozen=True, slots=True)
class SlaTransition:
    """The new state and the events the change produced."""

    state: SlaState
    events: tuple[SlaEvent, ...] = ()


def open_conversation(conversation_id: str, policy: SlaPolicy, calendar: BusinessCalendar, at: float) -> SlaTransition:
    """Start the first-response and resolution clocks when a conversation is handed to humans."""
    state = SlaState(conversation_id, policy)
    events: list[SlaEvent] = []
    for kind in (ClockKind.FIRST_RESPONSE, ClockKind.RESOLUTION):
        clock = start_clock(conversation_id, kind, policy, calendar, at)
        if clock is not None:
            state = state.with_clock(clock)
            events.append(_applied(clock))
    return SlaTransition(state, tuple(events))


def customer_message(state: SlaState, calendar: BusinessCalendar, at: float) -> SlaTransition:
    """A customer wrote: after a human reply, the first such message starts a next-response cycle."""
    if state.resolved or not state.human_replied:
        return SlaTransition(state)
    if state.next_response is not None and state.next_response.running:
        return SlaTransition(state)  # the clock already runs from the oldest unanswered message
    cycle = 1 if state.next_response is None else state.next_response.cycle + 1
    clock = start_clock(state.conversation_id, ClockKind.NEXT_RESPONSE, state.policy, calendar, at, cycle)
    if clock is None:
        return SlaTransition(state)
    return SlaTransition(state.with_clock(clock), (_applied(clock),))


def reply(state: SlaState, at: float, author: Author) -> SlaTransition:
    """A message went to the customer: a human one fulfils the running response clocks."""
    if author is not Author.HUMAN or state.resolved:
        return SlaTransition(state)
    events: list[SlaEvent] = []
    for clock in (state.first_response, state.next_response):
        if clock is not None and clock.running:
            ended, event = _end(clock, ClockStatus.FULFILLED, at)
            state = state.with_clock(ended)
            events.append(event)
    return SlaTransition(replace(state, human_replied=True), tuple(events))


def resolve(state: SlaState, at: float) -> SlaTransition:
    """The conversation was resolved: resolution is fulfilled, response clocks still running stop."""
    if state.resolved:
        return SlaTransition(state)
    events: list[SlaEvent] = []
    for clock in state.clocks:
        if clock.running:
            status = ClockStatus.FULFILLED if clock.kind is ClockKind.RESOLUTION else ClockStatus.STOPPED
            ended, event = _end(clock, status, at)
            state = state.with_clock(ended)
            events.append(event)
    return SlaTransition(replace(state, resolved=True), tuple(events))
