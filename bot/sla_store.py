"""The SLA side of conversations, persisted: load a conversation's SlaState, apply a transition, log its events.

The state machine is handlers/sla.py; this module only loads and stores it (SQL in
bot/storage/handoff_repository.SlaRepository). Events are written by their unique key, so re-running a step
after a crash (or two processes doing it) writes each event once.
"""

from __future__ import annotations

from collections.abc import Iterable

from bot.storage.handoff_repository import SlaRepository
from bot.support_config import SupportConfig
from handlers.domain import Channel
from handlers.sla import (
    Author,
    ClockKind,
    ClockStatus,
    Priority,
    SlaClock,
    SlaEvent,
    SlaState,
    SlaTransition,
    choose_policy,
    customer_message,
    open_conversation,
    reply,
    resolve,
)


class SlaStore:
    """Starts, fulfils and stops a conversation's clocks; every change goes through handlers.sla."""

    def __init__(self, repo: SlaRepository, config: SupportConfig) -> None:
        self.repo = repo
        self._config = config

    async def state(self, conversation_id: int) -> SlaState | None:
        """The conversation's SLA state from its stored clocks (None: no clock was ever started)."""
        clocks = await self.repo.clocks_of(conversation_id)
        if not clocks:
            return None
        latest: dict[ClockKind, SlaClock] = {}
        for clock in clocks:
            current = latest.get(clock.kind)
            if current is None or clock.cycle > current.cycle:
                latest[clock.kind] = clock
        policy = self._config.policy(clocks[0].policy_id)
        first = latest.get(ClockKind.FIRST_RESPONSE)
        resolution = latest.get(ClockKind.RESOLUTION)
        human_replied = (first is not None and first.status is ClockStatus.FULFILLED) or any(
            c.kind is ClockKind.NEXT_RESPONSE for c in clocks
        )
        resolved = resolution is not None and not resolution.running
        return SlaState(
            conversation_id=str(conversation_id),
            policy=policy,
            first_response=first,
            next_response=latest.get(ClockKind.NEXT_RESPONSE),
            resolution=resolution,
            human_replied=human_replied,
            resolved=resolved,
        )

    async def apply(self, transition: SlaTransition) -> list[SlaEvent]:
        """Store the clocks the transition changed and its events; returns the events written now."""
        return await self.repo.save(_changed_clocks(transition), transition.events)

    async def open(
        self,
        conversation_id: int,
        *,
        channel: Channel,
        tags: Iterable[str],
        priority: Priority,
        team: str | None,
        at: float,
    ) -> list[SlaEvent]:
        """Start first-response and resolution clocks at the handoff (once: a retry finds them started)."""
        policy = choose_policy(self._config.rules, channel, tags, priority, default=self._config.default_policy)
        calendar = self._config.team(team).calendar
        transition = open_conversation(str(conversation_id), policy, calendar, at)
        return await self.repo.save_first(conversation_id, _changed_clocks(transition), transition.events) or []

    async def customer_message(self, conversation_id: int, team: str | None, at: float) -> list[SlaEvent]:
        """A customer wrote: after a human reply this starts a next-response cycle."""
        state = await self.state(conversation_id)
        if state is None:
            return []
        return await self.apply(customer_message(state, self._config.team(team).calendar, at))

    async def human_reply(self, conversation_id: int, at: float) -> list[SlaEvent]:
        """An agent answered the customer: running response clocks are fulfilled."""
        state = await self.state(conversation_id)
        if state is None:
            return []
        return await self.apply(reply(state, at, Author.HUMAN))

    async def bot_reply(self, conversation_id: int, at: float) -> list[SlaEvent]:
        """A bot or scheduled message: never fulfils a clock (kept for symmetry and the log)."""
        state = await self.state(conversation_id)
        if state is None:
            return []
        return await self.apply(reply(state, at, Author.BOT))

    async def resolve(self, conversation_id: int, at: float) -> list[SlaEvent]:
        """Resolution fulfilled, response clocks still running stopped."""
        state = await self.state(conversation_id)
        if state is None:
            return []
        return await self.apply(resolve(state, at))


def _changed_clocks(transition: SlaTransition) -> list[SlaClock]:
    """The clocks a transition's events are about: the only ones to store."""
    changed = {(e.clock, e.cycle) for e in transition.events}
    return [c for c in transition.state.clocks if (c.kind, c.cycle) in changed]
