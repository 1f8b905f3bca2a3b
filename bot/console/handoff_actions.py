"""The console's actions carried out by the handoff service, with every change pushed to open inboxes."""

from __future__ import annotations

import redis.asyncio as redis_asyncio
import structlog

from bot.console.actions import ActionResult
from bot.console.events import publish_console_event
from bot.console.policy import ConsoleUser
from bot.handoff import Conflict, HandoffService
from handlers.routing import TransferRefused

log = structlog.get_logger(__name__)

# 微信客服 accepts API sends only in session states 0/1 (reference §4.3, 95018): once a person has the session
# (state 3) its replies must come from the WeCom client, where they count for the SLA through sync_msg.
KF_REPLY_REFUSED = "微信客服会话由人工接待时，只能在企业微信客户端回复（接口发送会被拒绝）。请在企业微信中回复该客户。"


class HandoffConsoleActions:
    """ConsoleActions over HandoffService."""

    def __init__(self, handoff: HandoffService, redis: redis_asyncio.Redis, keys_prefix: str) -> None:
        self._handoff = handoff
        self._redis = redis
        self._prefix = keys_prefix

    async def _publish(self, conversation_id: int, kind: str, agent: ConsoleUser, **extra: object) -> None:
        event = {"type": kind, "conversation_id": conversation_id, "team": agent.team, **extra}
        try:
            await publish_console_event(self._redis, self._prefix, event)
        except Exception as exc:  # the action happened; a missed live update only delays the inbox refresh
            log.warning("console event not published", kind=kind, error=type(exc).__name__)

    async def claim(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        result = await self._handoff.claim(conversation_id, agent.id)
        if not result.won:
            code = "not_found" if result.reason == "not_found" else "conflict"
            return ActionResult.refused(result.message_zh, code)
        await self._publish(conversation_id, "claimed", agent, assignee_id=agent.id, status="open")
        return ActionResult.success()

    async def reply(self, conversation_id: int, agent: ConsoleUser, text: str) -> ActionResult:
        return ActionResult.refused(KF_REPLY_REFUSED)

    async def transfer(self, conversation_id: int, agent: ConsoleUser, to_agent_id: int) -> ActionResult:
        verdict = await self._handoff.transfer(conversation_id, to_agent_id)
        if isinstance(verdict, Conflict):
            return ActionResult.refused(verdict.message_zh, "conflict")
        if isinstance(verdict, TransferRefused):
            return ActionResult.refused(verdict.message_zh)
        await self._publish(
            conversation_id, "transferred", agent, assignee_id=to_agent_id, previous_assignee_id=agent.id, status="open"
        )
        return ActionResult.success()

    async def resolve(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        result = await self._handoff.resolve(conversation_id)
        if not result.resolved:
            return ActionResult.refused(result.message_zh, "conflict")
        await self._publish(conversation_id, "resolved", agent, assignee_id=agent.id, status="resolved")
        return ActionResult.success()
