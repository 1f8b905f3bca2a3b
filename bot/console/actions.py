"""The port through which console actions reach the handoff service (bot/handoff.py implements it).

The console validates input, checks that the signed-in user may act on the conversation (same rules as seeing
it: bot/console/policy.py), audits the attempt and its outcome, and then calls one of these methods. Everything
else (who wins a race for a claim, capacity, presence, the 48 h kf window, SLA clocks, notifying WeCom, and
publishing the change with `publish_console_event`) is the implementation's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from bot.console.policy import ConsoleUser


@dataclass(frozen=True, slots=True)
class ActionResult:
    """ok, or why not: `reason` is a sentence in Chinese shown to the agent; `code` is for programs and decides
    the HTTP status (conflict 409, refused 422, not_found 404, not_wired / unavailable 503, else 400)."""

    ok: bool
    reason: str = ""
    code: str = "ok"

    @classmethod
    def success(cls) -> ActionResult:
        return cls(True)

    @classmethod
    def refused(cls, reason: str, code: str = "refused") -> ActionResult:
        return cls(False, reason, code)


HTTP_STATUS_FOR_CODE = {
    "ok": 200,
    "conflict": 409,
    "refused": 422,
    "not_found": 404,
    "not_wired": 503,
    "unavailable": 503,
}


class ConsoleActions(Protocol):
    async def claim(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        """Take a queued conversation (exactly one of two concurrent claims wins; the other gets code conflict)."""
        ...

    async def reply(
        self, conversation_id: int, agent: ConsoleUser, text: str, idempotency_key: str | None = None
    ) -> ActionResult:
        """Send `text` (1-2048 characters, validated) to the customer as this agent, once per `idempotency_key`
        (the console form's key for one submission; a retried POST with the same key does not send again)."""
        ...

    async def transfer(self, conversation_id: int, agent: ConsoleUser, to_agent_id: int) -> ActionResult:
        """Hand the conversation to another agent (refused with the reason when they are offline or full)."""
        ...

    async def resolve(self, conversation_id: int, agent: ConsoleUser) -> ActionResult: ...


NOT_WIRED = ActionResult(False, "该操作暂未开放（处理服务尚未接入）", "not_wired")


class NotWiredActions:
    """The default until the handoff service is wired in: every action answers 503 "not available yet"."""

    async def claim(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        return NOT_WIRED

    async def reply(
        self, conversation_id: int, agent: ConsoleUser, text: str, idempotency_key: str | None = None
    ) -> ActionResult:
        return NOT_WIRED

    async def transfer(self, conversation_id: int, agent: ConsoleUser, to_agent_id: int) -> ActionResult:
        return NOT_WIRED

    async def resolve(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        return NOT_WIRED


PRESENCES = ("online", "away", "offline")


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """An agent as the console shows them: presence, load, and where they answer (wecom or console)."""

    id: int
    name: str
    team: str | None
    presence: str
    open_count: int
    capacity: int
    answers_in: str


@runtime_checkable
class AgentDirectory(Protocol):
    """Agents' presence and load (the presence toggle and the transfer picker); the handoff adapter has it."""

    async def agents(self, viewer: ConsoleUser) -> list[AgentInfo]:
        """The agents this user may see: their team's (an admin: everyone's)."""
        ...

    async def set_presence(self, agent: ConsoleUser, presence: str) -> ActionResult:
        """online / away / offline for the signed-in agent; online takes from the queue at once."""
        ...
