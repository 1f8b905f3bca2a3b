"""SLA alert cards to staff, paced per member so a breach storm never runs into WeCom's per-member limit.

WeCom delivers at most 30 app messages a minute (and 1,000 an hour) from one app to one member and silently drops
the rest (reference §6). A burst of breaches would send a lead one card per conversation, most of them lost. So
alerts (warned, breached, escalated) go out at most once per `interval_s` per member: the first at once, the
ones that arrive within the interval are held and sent together as one digest card when it ends. Assignment
cards (new, transferred, reassigned conversations) do not go through here: each is a conversation to open now.

The pacing is per process: with several `serve` processes each paces its own alerts, so a member gets at most
processes × 60 / interval_s alert cards a minute (6 per process by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import structlog

from bot.storage.handoff_repository import AgentRecord
from handlers.domain import Clock

log = structlog.get_logger(__name__)

ALERT_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class Alert:
    conversation_id: int
    kind: str  # warned, breached, escalated
    extra: str  # what happened, in Chinese (the card's line)
    level: int = 0


class AlertCards(Protocol):
    """Sends the cards (bot.handoff.HandoffService)."""

    async def notify_agent(
        self, agent: AgentRecord, conversation_id: int, kind: str, *, level: int = 0, extra: str = ""
    ) -> bool: ...

    async def notify_digest(self, agent: AgentRecord, alerts: list[Alert]) -> bool: ...


@dataclass(slots=True)
class _Held:
    member: AgentRecord
    alerts: list[Alert] = field(default_factory=list)


class AlertPacer:
    """At most one alert card per member per interval; what arrives meanwhile is sent as one digest."""

    def __init__(self, cards: AlertCards, clock: Clock, *, interval_s: float = ALERT_INTERVAL_S) -> None:
        self._cards = cards
        self._clock = clock
        self._interval_s = interval_s
        self._last_sent: dict[int, float] = {}
        self._held: dict[int, _Held] = {}

    async def send(self, member: AgentRecord, alert: Alert) -> bool:
        """True when the card went out now; False when it is held for the member's next digest (or failed)."""
        now = self._clock.now()
        if member.id in self._held or not self._free(member.id, now):
            self._held.setdefault(member.id, _Held(member)).alerts.append(alert)
            return False
        self._last_sent[member.id] = now
        return await self._cards.notify_agent(
            member, alert.conversation_id, alert.kind, level=alert.level, extra=alert.extra
        )

    async def flush(self) -> int:
        """Send the held alerts of every member whose interval has passed; returns how many cards went out."""
        now = self._clock.now()
        sent = 0
        for member_id in [m for m in self._held if self._free(m, now)]:
            held = self._held.pop(member_id)
            self._last_sent[member_id] = now
            if len(held.alerts) == 1:
                alert = held.alerts[0]
                ok = await self._cards.notify_agent(
                    held.member, alert.conversation_id, alert.kind, level=alert.level, extra=alert.extra
                )
            else:
                ok = await self._cards.notify_digest(held.member, held.alerts)
            sent += ok
        return sent

    def held(self) -> int:
        """Alerts waiting for their member's next card."""
        return sum(len(h.alerts) for h in self._held.values())

    def _free(self, member_id: int, now: float) -> bool:
        last = self._last_sent.get(member_id)
        return last is None or now - last >= self._interval_s
