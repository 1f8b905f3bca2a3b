"""The console's actions carried out by the handoff service, with every change pushed to open inboxes.

Replies: a console-mode conversation (kf session still in 0/1, bot/handoff.py's module docstring) is answered with
kf/send_msg through HandoffService.console_reply (exactly once per submission, within WeCom's quota); a
WeCom-mode one (state 2/3) is refused with the reason, since WeCom accepts API sends only in states 0/1 (95018).
"""

from __future__ import annotations

import redis.asyncio as redis_asyncio
import structlog

from bot.console.actions import PRESENCES, ActionResult, AgentInfo
from bot.console.events import ConsoleEventPublisher
from bot.console.policy import ConsoleUser
from bot.csat import CsatService
from bot.handoff import KF_REPLY_IN_WECOM, Conflict, HandoffService, Refused, answers_in_wecom
from bot.storage.models import StaffRole
from handlers.routing import Presence, TransferRefused

log = structlog.get_logger(__name__)

KF_REPLY_REFUSED = KF_REPLY_IN_WECOM  # the name the console used first
NOT_AN_AGENT = "只有客服和组长可以设置接待状态"


class HandoffConsoleActions:
    """ConsoleActions (and AgentDirectory) over HandoffService."""

    def __init__(
        self,
        handoff: HandoffService,
        redis: redis_asyncio.Redis,
        keys_prefix: str,
        *,
        csat: CsatService | None = None,
    ) -> None:
        self._handoff = handoff
        self._events = ConsoleEventPublisher(redis, keys_prefix)
        self._csat = csat

    async def _publish(self, conversation_id: int, kind: str, team: str | None, **extra: object) -> None:
        await self._events.changed(conversation_id, kind, team, **extra)

    async def _team_of(self, conversation_id: int, fallback: str | None) -> str | None:
        conversation = await self._handoff.conversation(conversation_id)
        return conversation.team if conversation is not None and conversation.team else fallback

    async def claim(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        result = await self._handoff.claim(conversation_id, agent.id)
        if not result.won:
            code = {"not_found": "not_found", "taken": "conflict"}.get(result.reason, "refused")
            return ActionResult.refused(result.message_zh, code)
        team = await self._team_of(conversation_id, agent.team)
        await self._publish(conversation_id, "claimed", team, assignee_id=agent.id, status="open")
        return ActionResult.success()

    async def reply(
        self, conversation_id: int, agent: ConsoleUser, text: str, idempotency_key: str | None = None
    ) -> ActionResult:
        outcome = await self._handoff.console_reply(conversation_id, agent.id, text, idempotency_key)
        if not outcome.ok:
            return ActionResult.refused(outcome.message_zh, outcome.code)
        if not outcome.duplicate:
            team = await self._team_of(conversation_id, agent.team)
            await self._publish(conversation_id, "replied", team, assignee_id=agent.id, status="waiting")
        return ActionResult.success()

    async def transfer(self, conversation_id: int, agent: ConsoleUser, to_agent_id: int) -> ActionResult:
        verdict = await self._handoff.transfer(conversation_id, to_agent_id)
        if isinstance(verdict, Conflict):
            return ActionResult.refused(verdict.message_zh, "conflict")
        if isinstance(verdict, TransferRefused | Refused):
            return ActionResult.refused(verdict.message_zh)
        team = await self._team_of(conversation_id, agent.team)
        await self._publish(
            conversation_id, "transferred", team, assignee_id=to_agent_id, previous_assignee_id=agent.id, status="open"
        )
        return ActionResult.success()

    async def resolve(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        result = await self._handoff.resolve(conversation_id, by_agent_id=agent.id)
        if not result.resolved:
            return ActionResult.refused(result.message_zh, "conflict")
        if self._csat is not None:  # at once: the end-of-session code lives 20 s
            try:
                await self._csat.ask(conversation_id, result.end_msg_code)
            except Exception as exc:  # the conversation is resolved either way; the survey is best effort
                log.warning("csat survey not asked", conversation_id=conversation_id, error=type(exc).__name__)
        await self._publish(conversation_id, "resolved", agent.team, assignee_id=agent.id, status="resolved")
        return ActionResult.success()

    # ---- AgentDirectory

    async def agents(self, viewer: ConsoleUser) -> list[AgentInfo]:
        default = self._handoff.config.default_team
        found = []
        for record in await self._handoff.agents():
            team = record.team or default
            if viewer.role is not StaffRole.ADMIN and team != (viewer.team or default):
                continue
            found.append(
                AgentInfo(
                    id=record.id,
                    name=record.display_name or record.username,
                    team=record.team,
                    presence=record.presence,
                    open_count=record.open_count,
                    capacity=record.capacity,
                    answers_in="wecom" if answers_in_wecom(record) else "console",
                )
            )
        return found

    async def set_presence(self, agent: ConsoleUser, presence: str) -> ActionResult:
        if presence not in PRESENCES:
            return ActionResult.refused("接待状态只能是在线、离开或离线")
        if await self._handoff.repo.agent(agent.id) is None:
            return ActionResult.refused(NOT_AN_AGENT)
        await self._handoff.set_presence(agent.id, Presence(presence))  # queue assignments publish themselves
        await self._publish(0, "presence", agent.team, agent_id=agent.id, presence=presence)
        return ActionResult.success()
