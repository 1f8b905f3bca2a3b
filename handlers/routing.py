"""Choosing an agent for a conversation, and checking transfers (pure).

Times are epoch seconds (float), as from `Clock.now()`.

Assignment order (Chatwoot's, plus business hours): skilled agents (all needed skills, the needed group, not
excluded) whose team is open → online → under capacity → the returning customer's last agent when among them,
else the least busy (ties: longest idle, then agent id, so the same input always gives the same agent).
Nobody skilled in business hours → out of hours with the earliest next opening; otherwise nobody online or with
room → queue, with the reason.

Assigning a batch (a queue draining as capacity frees) is `choose_agent` per conversation with the chosen agent's
count bumped by `with_assignment` before the next one, which `assign_in_order` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from handlers.business_hours import ALWAYS_OPEN, BusinessCalendar


class Presence(StrEnum):
    ONLINE = "online"
    AWAY = "away"  # signed in but not taking new conversations
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Agent:
    """A WeCom member who serves customers, as routing sees them at one moment."""

    agent_id: str
    presence: Presence
    capacity: int  # maximum open conversations
    open_count: int = 0
    skills: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    last_assigned_at: float | None = None  # None: never assigned, which counts as the longest idle
    hours: BusinessCalendar = ALWAYS_OPEN  # the agent's team's business hours

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.open_count < 0:
            raise ValueError(f"capacity and open_count must not be negative: {self.agent_id}")

    @property
    def has_room(self) -> bool:
        """Whether the agent can take one more conversation."""
        return self.open_count < self.capacity


@dataclass(frozen=True, slots=True)
class ConversationNeeds:
    """What an agent must offer to take a conversation."""

    skills: frozenset[str] = frozenset()  # all of them
    group: str | None = None
    exclude: frozenset[str] = frozenset()  # e.g. the assignee whose SLA was breached

    def skilled(self, agent: Agent) -> bool:
        """Whether the agent has the skills and group this conversation needs."""
        return self.skills <= agent.skills and (self.group is None or self.group in agent.groups)

    def fits(self, agent: Agent) -> bool:
        """Whether the agent may be routed this conversation (presence, hours and capacity aside)."""
        return agent.agent_id not in self.exclude and self.skilled(agent)


class AssignReason(StrEnum):
    PREFERRED = "preferred_agent"  # the returning customer's last agent
    LEAST_BUSY = "least_busy"


class QueueReason(StrEnum):
    NO_SKILLED_AGENT = "no_skilled_agent"
    NOBODY_ONLINE = "nobody_online"
    ALL_AT_CAPACITY = "all_at_capacity"


@dataclass(frozen=True, slots=True)
class Assignment:
    agent_id: str
    reason: AssignReason


@dataclass(frozen=True, slots=True)
class QueueDecision:
    reason: QueueReason


@dataclass(frozen=True, slots=True)
class OutOfHours:
    next_open: float  # the earliest instant a skilled agent's team opens


RoutingDecision = Assignment | QueueDecision | OutOfHours


def _idle_order(agent: Agent) -> tuple[int, float, str]:
    last = float("-inf") if agent.last_assigned_at is None else agent.last_assigned_at
    return (agent.open_count, last, agent.agent_id)


def choose_agent(
    candidates: Iterable[Agent],
    conversation_needs: ConversationNeeds,
    preferred_agent_id: str | None = None,
    *,
    now: float,
) -> RoutingDecision:
    """Pick the agent for one conversation, or say why it waits (queue or out of hours)."""
    skilled = [agent for agent in candidates if conversation_needs.fits(agent)]
    if not skilled:
        return QueueDecision(QueueReason.NO_SKILLED_AGENT)
    in_hours = [agent for agent in skilled if agent.hours.is_open(now)]
    if not in_hours:
        return OutOfHours(min(agent.hours.next_open(now) for agent in skilled))
    online = [agent for agent in in_hours if agent.presence is Presence.ONLINE]
    if not online:
        return QueueDecision(QueueReason.NOBODY_ONLINE)
    available = [agent for agent in online if agent.has_room]
    if not available:
        return QueueDecision(QueueReason.ALL_AT_CAPACITY)
    if preferred_agent_id is not None:
        for agent in available:
            if agent.agent_id == preferred_agent_id:
                return Assignment(agent.agent_id, AssignReason.PREFERRED)
    return Assignment(min(available, key=_idle_order).agent_id, AssignReason.LEAST_BUSY)


def with_assignment(agent: Agent, now: float) -> Agent:
    """The agent after taking one more conversation at `now`."""
    return replace(agent, open_count=agent.open_count + 1, last_assigned_at=now)


@dataclass(frozen=True, slots=True)
class Waiting:
    """A conversation waiting for an agent, in queue order."""

    conversation_id: str
    needs: ConversationNeeds = ConversationNeeds()
    preferred_agent_id: str | None = None


def assign_in_order(
    waiting: Sequence[Waiting], agents: Sequence[Agent], *, now: float
) -> tuple[dict[str, RoutingDecision], tuple[Agent, ...]]:
    """Route waiting conversations one after another, counting each assignment before the next."""
    current = {agent.agent_id: agent for agent in agents}
    decisions: dict[str, RoutingDecision] = {}
    for item in waiting:
        decision = choose_agent(current.values(), item.needs, item.preferred_agent_id, now=now)
        decisions[item.conversation_id] = decision
        if isinstance(decision, Assignment):
            current[decision.agent_id] = with_assignment(current[decision.agent_id], now)
    return decisions, tuple(current.values())


class TransferRefusal(StrEnum):
    SAME_AGENT = "same_agent"
    AGENT_OFFLINE = "agent_offline"
    AGENT_AT_CAPACITY = "agent_at_capacity"
    MISSING_SKILL = "missing_skill"


TRANSFER_REFUSAL_MESSAGES_ZH: Mapping[TransferRefusal, str] = {
    TransferRefusal.SAME_AGENT: "该会话已由这位客服接待，无需转接",
    TransferRefusal.AGENT_OFFLINE: "对方当前离线，无法转接，请选择其他在线同事",
    TransferRefusal.AGENT_AT_CAPACITY: "对方接待量已满，无法转接，请稍后再试或选择其他同事",
    TransferRefusal.MISSING_SKILL: "对方不负责此类问题，无法转接",
}


@dataclass(frozen=True, slots=True)
class TransferAllowed:
    agent_id: str


@dataclass(frozen=True, slots=True)
class TransferRefused:
    agent_id: str
    code: TransferRefusal

    @property
    def message_zh(self) -> str:
        """The reason in Simplified Chinese, for the agent or customer."""
        return TRANSFER_REFUSAL_MESSAGES_ZH[self.code]


def check_transfer(
    target: Agent,
    current_agent_id: str | None = None,
    needs: ConversationNeeds | None = None,
) -> TransferAllowed | TransferRefused:
    """Whether a conversation may be transferred to `target`: not to the same, an offline or a full agent."""
    if target.agent_id == current_agent_id:
        return TransferRefused(target.agent_id, TransferRefusal.SAME_AGENT)
    if target.presence is Presence.OFFLINE:
        return TransferRefused(target.agent_id, TransferRefusal.AGENT_OFFLINE)
    if not target.has_room:
        return TransferRefused(target.agent_id, TransferRefusal.AGENT_AT_CAPACITY)
    if needs is not None and not needs.skilled(target):
        return TransferRefused(target.agent_id, TransferRefusal.MISSING_SKILL)
    return TransferAllowed(target.agent_id)
