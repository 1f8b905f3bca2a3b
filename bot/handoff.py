"""Handoff to a person: one domain operation whatever triggered it, routing, claims, transfers, resolve.

Conversation states (support-desk vocabulary, conversations.status) and the 微信客服 service_state they map to,
moved only along the transitions WeCom allows (reference §4.1):

    bot (0/1) ──handoff──▶ queued (2) ──assign/claim──▶ open (3) ⇄ waiting (3) ──resolve──▶ resolved (4)
                 └──────────── agent chosen at once ──────────▶ open (3)

- 0/1 → 3 with servicer_userid when an agent is chosen, 0/1 → 2 when nobody can take it; 2 → 3 on assignment;
  3 → 3 on transfer; 3 → 4 on resolve. The bot never sends in 2–4: every customer notice of a move goes out
  either before it (the out-of-hours answer, in 0/1) or through send_msg_on_event with the trans msg_code.
- 95014/95019 (servicer not activated / stopped): that agent is marked away and the next one is tried, else the
  conversation queues. 95016 (illegal move): the session state is read back and followed.
- Claims are conditional UPDATEs on (status, version): two agents claiming at once → exactly one wins.
- Out of hours: an honest answer with the next opening, then the session waits in the queue and the queue
  drain assigns it when the team opens (the SLA sweep drains every second).

Two kinds of assignment, decided per agent (WeCom accepts kf/send_msg only in states 0/1, else 95018):

- WeCom mode: an agent with a `wecom_userid` (a kf servicer) answers in the WeCom client: kf 0/1 → 3 with
  servicer_userid, as above. Their replies arrive through sync_msg (origin 5): `servicer_wrote`.
- Console mode: an agent without one answers in the web console. The kf session stays in its API state (0/1: no
  service_state/trans), only our row says open/assigned; the bot is quiet because it goes by our status; the
  customer's notices (queued, assigned) and the agent's replies go out with kf/send_msg (`console_reply`, through
  the outbox with a deterministic msgid, within WeCom's 48 h / 5-messages-per-customer-message window, checked
  before WeCom is called). Resolve makes no kf move (1 → 4 is not known to be allowed): our status → resolved.
- A session WeCom holds (2 or 3) can only go to a servicer (2 → 3, 3 → 3): routing, claims and transfers then
  consider WeCom-mode agents only, and a transfer to a console agent is refused with the reason.

Queueing: WeCom's pool (2) is a one-way door to WeCom mode (2 → 3 only), so a conversation is queued in WeCom's
pool only when every agent of its team answers in WeCom (then servicers can also take it from the pool in the
client, as before). As soon as the team has a console agent, the queue is ours alone: the session stays in 0/1,
the queue notice goes out with kf/send_msg, and whoever the drain (or a claim) picks later, console or WeCom
agent, can take it (0/1 → 3 is allowed; 2 → console is not). The cost: servicers of a mixed team do not see
those waiting customers in the WeCom client's pool, only in the console, and the queue notice uses one of the
five messages the customer's last message allows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import structlog

from bot.member_cards import CardBudget, CardItem, MemberCards
from bot.pipeline import ReplySender
from bot.sla_store import SlaStore
from bot.storage.handoff_repository import (
    HUMAN_STATUSES,
    WITH_HUMANS,
    AgentRecord,
    HandoffConversation,
    HandoffRepository,
)
from bot.storage.models import ConversationStatus, OutboxStatus
from bot.storage.repositories import OutboxRecord, Repositories
from bot.support_config import SupportConfig
from bot.wecom.errors import WeComApiError
from handlers.domain import Channel, Clock, InboundMessage, OutboundMessage
from handlers.handoff import HandoffReason, HandoffTrigger, HandoffTriggers, fill, format_opening
from handlers.routing import (
    Agent,
    Assignment,
    ConversationNeeds,
    OutOfHours,
    Presence,
    QueueDecision,
    RoutingDecision,
    TransferAllowed,
    TransferRefusal,
    TransferRefused,
    Waiting,
    assign_in_order,
    check_transfer,
    choose_agent,
)
from handlers.sla import Priority

log = structlog.get_logger(__name__)

KF_NEW, KF_BOT, KF_POOL, KF_HUMAN, KF_ENDED = 0, 1, 2, 3, 4
ERR_NOT_SERVICER = 95014
ERR_BAD_TRANSITION = 95016
ERR_SERVICER_STOPPED = 95019
ERR_SESSION_ENDED = 95013
ERR_STATE_FORBIDS_SEND = 95018
ERR_QUOTA = 95001
ERR_WINDOW = 95002
ERR_NOT_CONSULTED = 95031
ERR_DUPLICATE_MSGID = 40058  # a kf msgid used before: a resend of a reply WeCom already accepted
SERVICER_REFUSALS = frozenset({ERR_NOT_SERVICER, ERR_SERVICER_STOPPED})
KF_API_STATES = (None, KF_NEW, KF_BOT)  # kf/send_msg allowed (None: not read yet, a fresh session)
KF_WECOM_STATES = (KF_POOL, KF_HUMAN)  # WeCom holds the session: only a servicer can take it
KF_QUOTA = 5  # kf/send_msg messages per customer message
KF_WINDOW_S = 48 * 3600
CONSOLE_SEQ_FLOOR = 1000  # console replies' outbox seq, after the bot's own replies to the same message
STALE_PENDING_S = 30.0  # a reserved console reply nobody finished sending: a retry may send it again

# Why a console reply is refused (shown to the agent).
KF_REPLY_IN_WECOM = "微信客服会话由人工接待时，只能在企业微信客户端回复（接口发送会被拒绝）。请在企业微信中回复该客户。"
REPLY_RESOLVED = "会话已解决，不能再回复"
REPLY_QUEUED = "会话还在排队中，请先认领再回复"
REPLY_WITH_BOT = "会话由机器人接待中，不能从工作台回复"
REPLY_CHANNEL = "该渠道的会话暂不支持从工作台回复"
REPLY_ENDED = "微信客服会话已结束，客户再次发消息后才能回复"
REPLY_EXPIRED = "客户最后一条消息已超过 48 小时，微信客服不允许再回复；请等客户再次发消息"
REPLY_QUOTA = "客户上一条消息之后已发送 5 条消息，达到微信客服上限；请等客户回复后再发送"
REPLY_SENDING = "这条回复正在发送中，请稍后刷新查看"
REPLY_FAILED = "发送失败（企业微信暂时不可用），请稍后重试"
TO_CONSOLE_AGENT_REFUSED = (
    "该会话已在企业微信中由人工接待，只能转给企业微信客服（对方未绑定企业微信账号，只能在工作台接待）"
)
TEXTCARD_TITLE_BYTES = 128
TEXTCARD_DESCRIPTION_BYTES = 512
LAST_MESSAGES = 3
DIGEST_LINES = 8  # conversations listed on a digest card (512 bytes of description hold about that many)
DIGEST_KINDS = {
    "assigned": "新会话",
    "transferred": "转接",
    "reassigned": "改派",
    "warned": "即将超时",
    "breached": "已超时",
    "escalated": "超时升级",
}


class KfStateApi(Protocol):
    """The kf service-state calls (bot.wecom.client.WeComClient)."""

    async def kf_service_state_get(self, open_kfid: str, external_userid: str) -> Any: ...

    async def kf_service_state_trans(
        self, open_kfid: str, external_userid: str, service_state: int, servicer_userid: str | None = None
    ) -> str | None: ...


class ConversationEvents(Protocol):
    """Tells open consoles that a conversation changed (bot.console.events.ConsoleEventPublisher)."""

    async def changed(self, conversation_id: int, kind: str, team: str | None, **detail: object) -> None: ...


class DrainLock(Protocol):
    """Serialises queue drains across processes (so two drains cannot both fill one agent's last slot)."""

    async def acquire(self) -> bool: ...

    async def release(self) -> None: ...


class HandoffStatus(StrEnum):
    ASSIGNED = "assigned"
    QUEUED = "queued"
    OUT_OF_HOURS = "out_of_hours"
    NOT_WITH_BOT = "not_with_bot"  # already with humans (or resolved): nothing to do
    DEFERRED = "deferred"  # out of hours and the trigger asked to keep the bot answering then


@dataclass(frozen=True, slots=True)
class HandoffOutcome:
    status: HandoffStatus
    conversation_id: int
    agent_id: int | None = None
    next_open: float | None = None


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """A claim's answer: `won`, or why not (in Chinese, for the agent)."""

    won: bool
    reason: str = ""
    message_zh: str = ""


@dataclass(frozen=True, slots=True)
class Conflict:
    """Somebody changed the conversation first."""

    message_zh: str = "会话状态已变化（可能已被其他同事处理），请刷新后再试"


@dataclass(frozen=True, slots=True)
class ResolveResult:
    resolved: bool
    end_msg_code: str | None = None  # from 3 → 4: a closing / survey message within 20 s (send_msg_on_event)
    message_zh: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    """Not allowed, with the reason for the agent (in Chinese) and a code for programs."""

    code: str
    message_zh: str


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    """A console reply: sent (or sent before, `duplicate`), or why not: code refused / conflict / not_found /
    unavailable, and the reason in Chinese."""

    ok: bool
    code: str = "ok"
    message_zh: str = ""
    duplicate: bool = False


def answers_in_wecom(agent: AgentRecord) -> bool:
    """WeCom mode (a kf servicer, answers in the WeCom client) or console mode (answers in the web console)."""
    return bool(agent.wecom_userid)


def console_reply_key(conversation_id: int, client_key: str) -> str:
    """The outbox key and kf msgid of a console reply: the same for every retry of the same submission."""
    digest = hashlib.sha1(f"console:{conversation_id}:{client_key}".encode()).hexdigest()[:28]  # noqa: S324
    return f"a{digest}"


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _cut(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _key(*parts: object) -> str:
    """A kf msgid (≤ 32 bytes of [0-9a-zA-Z_-]) that is the same every time for the same notice."""
    digest = hashlib.sha1(":".join(str(p) for p in parts).encode()).hexdigest()[:28]  # noqa: S324
    return f"h{digest}"


class HandoffService:
    """The handoff domain: hand off, route, claim, transfer, resolve, and the SLA clocks that go with them."""

    def __init__(
        self,
        repos: Repositories,
        handoff_repo: HandoffRepository,
        sla: SlaStore,
        config: SupportConfig,
        kf: KfStateApi,
        sender: ReplySender,
        clock: Clock,
        *,
        console_base_url: str = "http://localhost:8080",
        drain_lock: DrainLock | None = None,
        events: ConversationEvents | None = None,
        card_budget: CardBudget | None = None,
    ) -> None:
        self.repos = repos
        self.repo = handoff_repo
        self.sla = sla
        self.config = config
        self._kf = kf
        self._sender = sender
        self._clock = clock
        self._console = console_base_url.rstrip("/")
        self._drain_lock = drain_lock
        self._events = events  # changes made here, not through the console's own actions (which publish theirs)
        self.cards = MemberCards(self, card_budget)  # every card to staff goes through the member's WeCom budget

    async def _changed(self, conversation: HandoffConversation, kind: str, **detail: object) -> None:
        if self._events is not None:
            team = conversation.team or self.config.default_team
            await self._events.changed(conversation.id, kind, team, **detail)

    # ------------------------------------------------------------------ what the pipeline asks

    @property
    def triggers(self) -> HandoffTriggers:
        return self.config.triggers

    async def conversation(self, conversation_id: int) -> HandoffConversation | None:
        return await self.repo.conversation(conversation_id)

    async def no_match_run(
        self, conversation: HandoffConversation, before_message_id: int, no_match_scripts: frozenset[str]
    ) -> int:
        return await self.repo.no_match_run(conversation, before_message_id, no_match_scripts)

    async def set_no_match_streak(self, conversation_id: int, streak: int) -> None:
        await self.repo.set_no_match_streak(conversation_id, streak)

    async def kf_event(self, message: InboundMessage, conversation: HandoffConversation | None) -> None:
        """kf events about servicers and sessions, as changed in the WeCom client (reference §4.2)."""
        raw_event = message.raw.get("event") if isinstance(message.raw, Mapping) else None
        event: Mapping[str, Any] = raw_event if isinstance(raw_event, Mapping) else {}
        if message.event == "servicer_status_change":
            agent = await self.repo.agent_by_wecom_userid(str(event.get("servicer_userid") or ""))
            if agent is not None:
                receiving = str(event.get("status")) == "1"
                await self.set_presence(agent.id, Presence.ONLINE if receiving else Presence.AWAY)
            return
        if message.event != "session_status_change" or conversation is None:
            return
        change = str(event.get("change_type"))
        if change in ("1", "2", "4"):  # taken from the pool, transferred, re-taken: record the new servicer
            agent = await self.repo.agent_by_wecom_userid(str(event.get("new_servicer_userid") or ""))
            await self.repo.set_kf_state(conversation.id, KF_HUMAN)
            if agent is not None and conversation.status.value in WITH_HUMANS:
                await self.repo.claim(
                    conversation.id, agent.id, version=conversation.version, from_statuses=WITH_HUMANS
                )
        elif change == "3":  # ended by the servicer
            await self.repo.set_kf_state(conversation.id, KF_ENDED)
            if conversation.status.value in WITH_HUMANS:
                await self.resolve(conversation.id)
        await self._changed(conversation, "wecom_session_changed", change_type=change)

    # ------------------------------------------------------------------ routing inputs

    def _agent(self, record: AgentRecord) -> Agent:
        team = record.team or self.config.default_team
        try:
            presence = Presence(record.presence)
        except ValueError:
            presence = Presence.OFFLINE
        return Agent(
            agent_id=str(record.id),
            presence=presence,
            capacity=record.capacity,
            open_count=record.open_count,
            skills=record.skills,
            groups=frozenset({team}),
            last_assigned_at=_epoch(record.last_assigned_at),
            hours=self.config.team(team).calendar,
        )

    async def _needs(
        self, conversation: HandoffConversation, exclude: Iterable[int] = (), tags: frozenset[str] | None = None
    ) -> ConversationNeeds:
        if tags is None:
            tags = await self.repos.tags.customer_tags(conversation.customer_id)
        skills = frozenset(skill for tag, skill in self.config.skills_by_tag if tag in tags)
        return ConversationNeeds(
            skills=skills,
            group=conversation.team or self.config.default_team,
            exclude=frozenset(str(i) for i in exclude),
        )

    async def _routable(
        self, conversation: HandoffConversation, agents: list[AgentRecord] | None = None
    ) -> list[AgentRecord]:
        if agents is None:
            agents = await self.repo.agents()
        if self._servicers_only(conversation):
            agents = [a for a in agents if answers_in_wecom(a)]  # WeCom holds the session: 2 → 3 / 3 → 3 only
        return agents

    @staticmethod
    def _servicers_only(conversation: HandoffConversation) -> bool:
        return conversation.channel is Channel.KF and conversation.kf_service_state in KF_WECOM_STATES

    async def _own_queue(self, conversation: HandoffConversation) -> bool:
        """Queue in our DB only (kf stays 0/1) when a console agent of the team could take the conversation."""
        team = conversation.team or self.config.default_team
        return any(
            not answers_in_wecom(a) and (a.team or self.config.default_team) == team for a in await self.repo.agents()
        )

    async def decide(self, conversation: HandoffConversation, exclude: Iterable[int] = ()) -> RoutingDecision:
        """Where this conversation would go now (no change made)."""
        decision, _ = await self._decide(conversation, exclude)
        return decision

    async def _decide(
        self, conversation: HandoffConversation, exclude: Iterable[int] = (), tags: frozenset[str] | None = None
    ) -> tuple[RoutingDecision, dict[int, AgentRecord]]:
        """The decision and the agent records it was made from (so the chosen agent is not read again)."""
        records = await self._routable(conversation)
        preferred = str(conversation.last_agent_id) if conversation.last_agent_id is not None else None
        needs = await self._needs(conversation, exclude, tags)
        decision = choose_agent([self._agent(a) for a in records], needs, preferred, now=self._clock.now())
        return decision, {a.id: a for a in records}

    # ------------------------------------------------------------------ the handoff

    async def handoff(
        self,
        conversation_id: int,
        trigger: HandoffTrigger,
        *,
        defer_out_of_hours: bool = False,
    ) -> HandoffOutcome:
        """Hand a bot conversation to a person: assign, queue, or answer honestly when the team is closed."""
        if defer_out_of_hours:
            conversation = await self.repo.conversation(conversation_id)
            if conversation is None or conversation.status is not ConversationStatus.BOT:
                return HandoffOutcome(HandoffStatus.NOT_WITH_BOT, conversation_id)
            probe, _ = await self._decide(conversation)
            if isinstance(probe, OutOfHours):
                return HandoffOutcome(HandoffStatus.DEFERRED, conversation_id, next_open=probe.next_open)
        begun = await self.repo.start_handoff(
            conversation_id,
            reason=trigger.reason.value,
            team=trigger.team,
            default_team=self.config.default_team,
            priority=trigger.priority.value,
        )
        if begun is None:
            return HandoffOutcome(HandoffStatus.NOT_WITH_BOT, conversation_id)
        started, tags = begun  # the tags, read once, serve the SLA policy, routing and the agent's card
        team = started.team or self.config.default_team
        log.info(
            "handoff started",
            conversation_id=conversation_id,
            reason=trigger.reason.value,
            detail=trigger.detail,
            priority=trigger.priority.value,
            team=team,
        )
        now = self._clock.now()
        await self.sla.open(
            conversation_id, channel=started.channel, tags=tags, priority=trigger.priority, team=team, at=now
        )
        outcome = await self._hand_over(started, tags)
        await self._changed(started, "handed_off", status=outcome.status.value, assignee_id=outcome.agent_id)
        return outcome

    async def _hand_over(self, started: HandoffConversation, tags: frozenset[str]) -> HandoffOutcome:
        if started.channel is Channel.KF:
            started = await self._read_kf_state(started)
            if started.kf_service_state == KF_HUMAN:
                adopted = await self._adopt_servicer(started)
                if adopted is not None:
                    return adopted
        return await self._route_one(started, tags)

    async def _route_one(self, conversation: HandoffConversation, tags: frozenset[str]) -> HandoffOutcome:
        excluded: set[int] = set()
        while True:
            decision, records = await self._decide(conversation, excluded, tags)
            if isinstance(decision, Assignment):
                agent_id = int(decision.agent_id)
                outcome = await self._assign(conversation, records[agent_id], tags=tags)
                if outcome is True:
                    return HandoffOutcome(HandoffStatus.ASSIGNED, conversation.id, agent_id)
                fresh = await self.repo.conversation(conversation.id)
                if fresh is None or fresh.status is not ConversationStatus.QUEUED:
                    return HandoffOutcome(HandoffStatus.NOT_WITH_BOT, conversation.id)  # somebody else took it
                excluded.add(agent_id)
                conversation = fresh
                continue
            if isinstance(decision, OutOfHours):
                await self._out_of_hours(conversation, decision.next_open)
                return HandoffOutcome(HandoffStatus.OUT_OF_HOURS, conversation.id, next_open=decision.next_open)
            await self._to_pool(conversation, decision)
            return HandoffOutcome(HandoffStatus.QUEUED, conversation.id)

    async def _read_kf_state(self, conversation: HandoffConversation) -> HandoffConversation:
        try:
            state = await self._kf.kf_service_state_get(conversation.account_id, conversation.external_id)
        except WeComApiError as exc:
            log.warning("kf service state unknown", conversation_id=conversation.id, errcode=exc.errcode)
            return conversation
        await self.repo.set_kf_state(conversation.id, int(state.service_state))
        return replace(conversation, kf_service_state=int(state.service_state))  # the version does not change

    async def _adopt_servicer(self, conversation: HandoffConversation) -> HandoffOutcome | None:
        """The session is already with a servicer in WeCom: record that agent instead of routing."""
        try:
            state = await self._kf.kf_service_state_get(conversation.account_id, conversation.external_id)
        except WeComApiError:
            return None
        agent = await self.repo.agent_by_wecom_userid(str(state.servicer_userid or ""))
        if agent is None:
            return None
        if await self.repo.claim(conversation.id, agent.id, version=conversation.version):
            return HandoffOutcome(HandoffStatus.ASSIGNED, conversation.id, agent.id)
        return None

    async def _assign(
        self, conversation: HandoffConversation, agent: AgentRecord, *, tags: frozenset[str] | None = None
    ) -> bool:
        """Claim for the agent (within their capacity), then move the kf session to them; False (claim undone)
        when the agent has no room left any more or WeCom refuses."""
        agent_id = agent.id
        console_mode = not answers_in_wecom(agent)
        if console_mode and self._servicers_only(conversation):
            return False  # WeCom holds the session: a console agent cannot take it
        if not await self.repo.claim(conversation.id, agent_id, version=conversation.version, within_capacity=True):
            return False
        if conversation.channel is Channel.KF and console_mode:
            # The session stays in 0/1 (API-managed): the notice goes out with kf/send_msg.
            text = fill(self.config.texts.assigned, agent_name=agent.display_name)
            await self._notice(conversation, text, None, "assigned", agent_id)
        elif conversation.channel is Channel.KF:
            try:
                msg_code = await self._trans(conversation, KF_HUMAN, agent.wecom_userid)
            except WeComApiError as exc:
                await self.repo.requeue(conversation.id, version=conversation.version + 1)
                if exc.errcode in SERVICER_REFUSALS:
                    # WeCom says this member is not receiving: stop routing to them until they are online again.
                    await self.repo.set_presence(agent_id, Presence.AWAY.value)
                log.warning(
                    "kf refused the servicer", conversation_id=conversation.id, agent_id=agent_id, errcode=exc.errcode
                )
                return False
            if msg_code:
                text = fill(self.config.texts.assigned, agent_name=agent.display_name)
                await self._notice(conversation, text, msg_code, "assigned", agent_id)
        log.info("conversation assigned", conversation_id=conversation.id, agent_id=agent_id)
        await self.cards.send(agent, CardItem(conversation.id, "assigned"), conversation=conversation, tags=tags)
        return True

    async def _trans(self, conversation: HandoffConversation, target: int, servicer: str | None = None) -> str | None:
        """service_state/trans; 95016 re-reads the state, and an already-reached target counts as done."""
        try:
            msg_code = await self._kf.kf_service_state_trans(
                conversation.account_id, conversation.external_id, target, servicer
            )
        except WeComApiError as exc:
            if exc.errcode != ERR_BAD_TRANSITION:
                raise
            state = await self._kf.kf_service_state_get(conversation.account_id, conversation.external_id)
            await self.repo.set_kf_state(conversation.id, int(state.service_state))
            if int(state.service_state) == target and (servicer is None or state.servicer_userid == servicer):
                return None
            raise
        await self.repo.set_kf_state(conversation.id, target)
        return msg_code

    async def _to_pool(self, conversation: HandoffConversation, decision: QueueDecision | None = None) -> None:
        """kf 0/1 → 2 and the queue notice through send_msg_on_event with the trans msg_code."""
        log.info(
            "conversation queued",
            conversation_id=conversation.id,
            reason=decision.reason.value if decision else "out_of_hours",
        )
        if conversation.channel is not Channel.KF or conversation.kf_service_state == KF_POOL:
            return
        if await self._own_queue(conversation):
            # Our queue only: the session stays API-managed (0/1), so a console agent can still take it.
            if decision is not None and conversation.kf_service_state in KF_API_STATES:
                await self._notice(conversation, self.config.texts.queued, None, "queued")
            return
        try:
            msg_code = await self._trans(conversation, KF_POOL)
        except WeComApiError as exc:
            log.warning("kf session not moved to the pool", conversation_id=conversation.id, errcode=exc.errcode)
            return
        if msg_code and decision is not None:
            await self._notice(conversation, self.config.texts.queued, msg_code, "queued")

    async def _out_of_hours(self, conversation: HandoffConversation, next_open: float) -> None:
        """The honest answer (sent while the session is still the bot's), then wait in the pool for the opening."""
        team = self.config.team(conversation.team)
        when = format_opening(next_open, team.timezone, self._clock.now())
        text = fill(self.config.texts.out_of_hours, next_open=when)
        log.info("handoff out of hours", conversation_id=conversation.id, next_open=next_open)
        if conversation.channel is Channel.KF and conversation.kf_service_state in (None, KF_NEW, KF_BOT):
            await self._notice(conversation, text, None, "out_of_hours")
        await self._to_pool(conversation, None)

    async def _notice(
        self, conversation: HandoffConversation, text: str, msg_code: str | None, kind: str, *extra: object
    ) -> None:
        """A text to the customer: send_msg_on_event with a msg_code, else kf/send_msg (states 0/1 only)."""
        reply = OutboundMessage(
            channel=conversation.channel,
            to=conversation.external_id,
            account_id=conversation.account_id,
            msgtype="text",
            content={"content": text},
            welcome_code=msg_code,
        )
        key = _key(conversation.id, conversation.handoff_at, kind, *extra)
        try:
            await self._sender.send(reply, key)
        except WeComApiError as exc:
            log.warning("customer notice not sent", conversation_id=conversation.id, kind=kind, errcode=exc.errcode)
            return
        await self.repos.messages.record_outbound_message(
            reply, key, sent_at=datetime.fromtimestamp(self._clock.now(), UTC), conversation_id=conversation.id
        )

    # ------------------------------------------------------------------ the queue

    async def drain(self) -> list[tuple[int, int]]:
        """Assign queued conversations in order while agents have room; returns (conversation, agent) pairs."""
        lock = self._drain_lock
        if lock is not None and not await lock.acquire():
            return []  # another process is draining right now
        try:
            return await self._drain()
        finally:
            if lock is not None:
                await lock.release()

    async def _drain(self) -> list[tuple[int, int]]:
        queued = await self.repo.queued()
        if not queued:
            return []
        records = await self.repo.agents()
        with_userid = [self._agent(a) for a in records if answers_in_wecom(a)]
        every = [self._agent(a) for a in records]
        if not any(a.presence is Presence.ONLINE and a.open_count < a.capacity for a in every):
            return []  # nobody can take anything: skip reading every queued customer's tags (runs every second)
        now = self._clock.now()
        by_id = {c.id: c for c in queued}
        kf_waiting = [c for c in queued if self._servicers_only(c)]  # in WeCom's pool: servicers only
        other_waiting = [c for c in queued if not self._servicers_only(c)]
        decisions: dict[str, RoutingDecision] = {}
        for waiting, agents in ((kf_waiting, with_userid), (other_waiting, every)):
            items = [
                Waiting(
                    str(c.id),
                    await self._needs(c),
                    str(c.last_agent_id) if c.last_agent_id is not None else None,
                )
                for c in waiting
            ]
            got, _ = assign_in_order(items, agents, now=now)
            decisions.update(got)
        assigned: list[tuple[int, int]] = []
        records_by_id = {a.id: a for a in records}
        for conversation_id, decision in decisions.items():
            if isinstance(decision, Assignment):
                conversation = by_id[int(conversation_id)]
                if await self._assign(conversation, records_by_id[int(decision.agent_id)]):
                    assigned.append((conversation.id, int(decision.agent_id)))
                    await self._changed(conversation, "assigned", assignee_id=int(decision.agent_id), status="open")
        return assigned

    # ------------------------------------------------------------------ agent actions

    async def claim(self, conversation_id: int, agent_id: int) -> ClaimResult:
        """An agent takes a queued conversation; of two at once exactly one wins, the other is told why not."""
        conversation = await self.repo.conversation(conversation_id)
        record = await self.repo.agent(agent_id)
        if conversation is None or record is None:
            return ClaimResult(False, "not_found", "会话或客服不存在")
        if conversation.status is not ConversationStatus.QUEUED:
            return ClaimResult(False, "taken", "该会话已被接入或已结束")
        verdict = check_transfer(self._agent(record))
        if isinstance(verdict, TransferRefused):
            return ClaimResult(False, verdict.code.value, verdict.message_zh)
        if not answers_in_wecom(record) and self._servicers_only(conversation):
            return ClaimResult(False, "wecom_only", "该会话已进入企业微信排队池，只能由企业微信客服在企业微信中接入")
        if not await self._assign(conversation, record):
            fresh = await self.repo.conversation(conversation_id)
            if fresh is not None and fresh.status is ConversationStatus.QUEUED:
                now_record = await self.repo.agent(agent_id)
                full = check_transfer(self._agent(now_record)) if now_record is not None else None
                if isinstance(full, TransferRefused):  # another claim took the agent's last free slot first
                    return ClaimResult(False, full.code.value, full.message_zh)
                return ClaimResult(
                    False, "servicer_refused", "企业微信拒绝将会话转给您（未在接待状态），请检查接待状态"
                )
            return ClaimResult(False, "taken", "该会话已被其他同事接入")
        return ClaimResult(True)

    async def transfer(
        self, conversation_id: int, to_agent_id: int
    ) -> TransferAllowed | TransferRefused | Conflict | Refused:
        """Move an open conversation to another agent; refused (with the reason) for offline or full agents."""
        conversation = await self.repo.conversation(conversation_id)
        target = await self.repo.agent(to_agent_id)
        if conversation is None or target is None or conversation.status.value not in HUMAN_STATUSES:
            return Conflict()
        verdict = check_transfer(
            self._agent(target),
            str(conversation.assignee_id) if conversation.assignee_id is not None else None,
            await self._needs(conversation),
        )
        if isinstance(verdict, TransferRefused):
            log.info("transfer refused", conversation_id=conversation_id, reason=verdict.code.value)
            return verdict
        return await self._move(conversation, target)

    async def _move(
        self, conversation: HandoffConversation, target: AgentRecord, kind: str = "transferred"
    ) -> TransferAllowed | TransferRefused | Conflict | Refused:
        previous = conversation.assignee_id
        if not answers_in_wecom(target) and self._servicers_only(conversation):
            log.info("transfer refused", conversation_id=conversation.id, reason="wecom_only")
            return Refused("wecom_only", TO_CONSOLE_AGENT_REFUSED)
        if not await self.repo.claim(
            conversation.id,
            target.id,
            version=conversation.version,
            from_statuses=HUMAN_STATUSES,
            within_capacity=True,
        ):
            return Conflict()
        if conversation.channel is Channel.KF and answers_in_wecom(target):
            try:
                await self._trans(conversation, KF_HUMAN, target.wecom_userid)
            except WeComApiError as exc:
                if previous is not None:
                    await self.repo.claim(
                        conversation.id, previous, version=conversation.version + 1, from_statuses=HUMAN_STATUSES
                    )
                if exc.errcode in SERVICER_REFUSALS:
                    await self.repo.set_presence(target.id, Presence.AWAY.value)
                    return TransferRefused(str(target.id), TransferRefusal.AGENT_OFFLINE)
                return Conflict()
        await self.cards.send(target, CardItem(conversation.id, kind), conversation=conversation)
        return TransferAllowed(str(target.id))

    async def resolve(self, conversation_id: int, by_agent_id: int | None = None) -> ResolveResult:
        """Resolved: kf 3 → 4, clocks stopped/fulfilled, the customer remembers the agent, the queue drains.

        A session still in WeCom's pool (2) can only move to a servicer (3), so it is ended through one: the
        agent resolving it (`by_agent_id`), else its assignee; without one it stays in the pool until WeCom ends it.
        """
        before = await self.repo.resolve(conversation_id)
        if before is None:
            return ResolveResult(False, message_zh="会话不在人工处理中，或已被其他人更新")
        msg_code: str | None = None
        if before.channel is Channel.KF and before.kf_service_state in (KF_POOL, KF_HUMAN):
            try:
                if before.kf_service_state == KF_HUMAN or await self._take_from_pool(before, by_agent_id):
                    msg_code = await self._trans(before, KF_ENDED)
                else:
                    log.info("kf session left in the pool: no servicer to end it", conversation_id=conversation_id)
            except WeComApiError as exc:
                log.warning("kf session not ended", conversation_id=conversation_id, errcode=exc.errcode)
        await self.sla.resolve(conversation_id, self._clock.now())
        log.info("conversation resolved", conversation_id=conversation_id, agent_id=before.assignee_id)
        await self.drain()  # capacity freed
        return ResolveResult(True, msg_code)

    async def _take_from_pool(self, conversation: HandoffConversation, by_agent_id: int | None) -> bool:
        """2 → 3 to the resolving agent (or the assignee), the only way out of WeCom's pool; False without one."""
        for agent_id in dict.fromkeys(a for a in (by_agent_id, conversation.assignee_id) if a is not None):
            agent = await self.repo.agent(agent_id)
            if agent is not None and agent.wecom_userid:
                await self._trans(conversation, KF_HUMAN, agent.wecom_userid)
                return True
        return False

    async def set_presence(self, agent_id: int, presence: Presence) -> list[tuple[int, int]]:
        """Console or kf servicer status: an agent coming online takes from the queue at once."""
        await self.repo.set_presence(agent_id, presence.value)
        if presence is Presence.ONLINE:
            return await self.drain()
        return []

    # ------------------------------------------------------------------ messages in a human conversation

    async def customer_wrote(self, conversation: HandoffConversation, at: float) -> None:
        """The customer wrote while humans have the conversation: next-response clock, waiting → open."""
        await self.sla.customer_message(conversation.id, conversation.team, at)
        if conversation.status is ConversationStatus.WAITING:
            await self.repo.set_waiting(conversation.id, False)
        await self._changed(conversation, "customer_message", assignee_id=conversation.assignee_id)

    async def servicer_wrote(self, conversation: HandoffConversation, servicer_userid: str | None, at: float) -> None:
        """A servicer wrote from the WeCom client (kf origin 5): a human reply; open → waiting on the customer."""
        agent = await self.repo.agent_by_wecom_userid(servicer_userid) if servicer_userid else None
        if agent is None:
            log.info("servicer line from an unknown member", conversation_id=conversation.id)
        if conversation.status.value not in WITH_HUMANS:
            return
        if conversation.status is ConversationStatus.QUEUED and agent is not None:
            # Taken from the pool in the WeCom client: record who has it.
            await self.repo.claim(conversation.id, agent.id, version=conversation.version)
        await self.sla.human_reply(conversation.id, at)
        await self.repo.set_waiting(conversation.id, True)
        await self._changed(
            conversation, "servicer_replied", assignee_id=agent.id if agent else conversation.assignee_id
        )

    # ------------------------------------------------------------------ console replies (console mode)

    async def console_reply(
        self, conversation_id: int, agent_id: int, text: str, client_key: str | None = None
    ) -> ReplyOutcome:
        """An agent's reply from the console, sent with kf/send_msg exactly once per submission.

        `client_key` (the console form's idempotency key) names the submission; without one, the same text by the
        same agent within the same customer turn counts as the same submission. The outbox row (keyed by it, seq
        ≥ 1000 under the customer's last message) and the deterministic kf msgid make a retried or double POST
        send at most once. Refused before WeCom is called: not with a person, WeCom-mode sessions (2/3: 95018),
        ended or expired (48 h) sessions, and the sixth message since the customer's last one.
        """
        conversation = await self.repo.conversation(conversation_id)
        if conversation is None:
            return ReplyOutcome(False, "not_found", "会话不存在")
        if client_key is None:
            text_digest = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324
            client_key = f"auto:{agent_id}:{text_digest}:{_epoch(conversation.last_inbound_at)}"
        key = console_reply_key(conversation_id, client_key)
        existing = await self.repo.outbox_by_key(key)
        if existing is not None:
            busy = self._busy(existing)
            if busy is not None:
                return busy
        refusal = await self._reply_refusal(conversation)
        if refusal is not None:
            log.info("console reply refused", conversation_id=conversation_id, code=refusal.code)
            return refusal
        if existing is None:
            inbound = await self.repo.last_customer_message_id(conversation.id)
            if inbound is None:
                return ReplyOutcome(False, "refused", REPLY_EXPIRED)
            reply = OutboundMessage(
                channel=conversation.channel,
                to=conversation.external_id,
                account_id=conversation.account_id,
                msgtype="text",
                content={"content": text},
            )
            record = await self._reserve_console(inbound, reply, key)
            if not record.created:  # the same submission, reserved by a concurrent request
                busy = self._busy(record)
                if busy is not None:
                    return busy
        else:
            record = existing
        return await self._send_console(conversation, record, agent_id, resend=existing is not None)

    def _busy(self, record: OutboxRecord) -> ReplyOutcome | None:
        """A submission seen before: sent (ok, nothing more), being sent by another request, or to retry (None)."""
        if record.sent:
            return ReplyOutcome(True, duplicate=True)
        age = self._clock.now() - record.created_at.timestamp()
        if record.status is OutboxStatus.PENDING and record.attempts == 0 and age < STALE_PENDING_S:
            return ReplyOutcome(False, "conflict", REPLY_SENDING)
        return None

    async def _reply_refusal(self, conversation: HandoffConversation) -> ReplyOutcome | None:
        status = conversation.status
        if status is ConversationStatus.RESOLVED:
            return ReplyOutcome(False, "refused", REPLY_RESOLVED)
        if status is ConversationStatus.QUEUED:
            return ReplyOutcome(False, "refused", REPLY_QUEUED)
        if status is ConversationStatus.BOT:
            return ReplyOutcome(False, "refused", REPLY_WITH_BOT)
        if conversation.channel is not Channel.KF:
            return ReplyOutcome(False, "refused", REPLY_CHANNEL)
        if conversation.kf_service_state in KF_WECOM_STATES:
            return ReplyOutcome(False, "refused", KF_REPLY_IN_WECOM)
        if conversation.kf_service_state == KF_ENDED:
            return ReplyOutcome(False, "refused", REPLY_ENDED)
        last = conversation.last_inbound_at
        if last is None or self._clock.now() - last.timestamp() >= KF_WINDOW_S:
            return ReplyOutcome(False, "refused", REPLY_EXPIRED)
        # Counted from our own log of what went to the customer since their last message (conservative: a
        # send_msg_on_event notice in that span counts too).
        inbound = await self.repo.last_customer_message_id(conversation.id)
        if inbound is None:
            return ReplyOutcome(False, "refused", REPLY_EXPIRED)
        if await self.repo.sent_after(conversation, inbound) >= KF_QUOTA:
            return ReplyOutcome(False, "refused", REPLY_QUOTA)
        return None

    async def _reserve_console(self, inbound: int, reply: OutboundMessage, key: str) -> OutboxRecord:
        seq = await self.repo.next_console_seq(inbound, CONSOLE_SEQ_FLOOR)
        while True:
            try:
                record = await self.repos.outbox.reserve_reply(inbound, seq, reply, key)
            except ValueError:  # the key is taken under another seq: a concurrent twin of this submission
                twin = await self.repo.outbox_by_key(key)
                if twin is None:
                    raise
                return twin
            if record.idempotency_key == key:
                return record
            seq += 1  # another console reply took this seq meanwhile

    async def _send_console(
        self, conversation: HandoffConversation, record: OutboxRecord, agent_id: int, *, resend: bool
    ) -> ReplyOutcome:
        reply = record.to_outbound()
        try:
            msgid = await self._sender.send(reply, record.idempotency_key, resend=resend)
        except WeComApiError as exc:
            if not (resend and exc.errcode == ERR_DUPLICATE_MSGID):
                await self.repos.outbox.mark_failed(record.id, f"errcode {exc.errcode}")
                log.warning("console reply not sent", conversation_id=conversation.id, errcode=exc.errcode)
                return await self._send_refusal(conversation, exc.errcode)
            msgid = record.idempotency_key  # an earlier attempt was delivered: WeCom refuses the msgid again
        except Exception as exc:
            await self.repos.outbox.mark_failed(record.id, type(exc).__name__)
            log.warning("console reply not sent", conversation_id=conversation.id, error=type(exc).__name__)
            return ReplyOutcome(False, "unavailable", REPLY_FAILED)
        now = self._clock.now()
        sent_at = datetime.fromtimestamp(now, UTC)
        text = str(record.payload.get("content", ""))
        await self.repo.record_agent_message(conversation, record.idempotency_key, text, agent_id, sent_at)
        await self.repos.outbox.mark_sent(record.id, msgid)
        await self.sla.human_reply(conversation.id, now)
        await self.repo.set_waiting(conversation.id, True)  # back to open when the customer writes
        log.info("console reply sent", conversation_id=conversation.id, agent_id=agent_id)
        return ReplyOutcome(True)

    async def _send_refusal(self, conversation: HandoffConversation, errcode: int) -> ReplyOutcome:
        if errcode == ERR_QUOTA:
            return ReplyOutcome(False, "refused", REPLY_QUOTA)
        if errcode in (ERR_WINDOW, ERR_NOT_CONSULTED):
            return ReplyOutcome(False, "refused", REPLY_EXPIRED)
        if errcode == ERR_SESSION_ENDED:
            return ReplyOutcome(False, "refused", REPLY_ENDED)
        if errcode == ERR_STATE_FORBIDS_SEND:
            fresh = await self._read_kf_state(conversation)  # WeCom moved it (e.g. a servicer took it)
            reason = KF_REPLY_IN_WECOM if fresh.kf_service_state in KF_WECOM_STATES else REPLY_ENDED
            return ReplyOutcome(False, "refused", reason)
        return ReplyOutcome(False, "unavailable", REPLY_FAILED)

    async def agents(self) -> list[AgentRecord]:
        """The routable staff, with presence and load (the console's transfer picker)."""
        return await self.repo.agents()

    # ------------------------------------------------------------------ agent notifications

    def console_url(self, conversation_id: int) -> str:
        return f"{self._console}/console/conversations/{conversation_id}"

    async def notify_agent(
        self,
        agent: AgentRecord,
        conversation_id: int,
        kind: str,
        *,
        level: int = 0,
        extra: str = "",
        conversation: HandoffConversation | None = None,
        tags: frozenset[str] | None = None,
    ) -> bool:
        """A textcard app message to the member: customer, tags, the last messages and a console link.

        `conversation` and `tags`, when the caller has just read them, save reading them again (the card shows
        the customer's name and tags, which a move does not change).
        """
        if not agent.wecom_userid:
            log.info("agent has no wecom userid; not notified", agent_id=agent.id, kind=kind)
            return False
        if conversation is None or conversation.id != conversation_id:
            conversation = await self.repo.conversation(conversation_id)
        if conversation is None:
            return False
        titles = {
            "assigned": "新的客户会话",
            "transferred": "转接给您的客户会话",
            "warned": "SLA 即将超时",
            "breached": "SLA 已超时",
            "escalated": "SLA 超时升级",
            "reassigned": "SLA 超时，会话已改派给您",
        }
        customer = conversation.customer_name or conversation.external_id
        if tags is None:
            tags = await self.repos.tags.customer_tags(conversation.customer_id)
        shown = sorted(tags)
        lines = [f"客户：{customer}", f"标签：{'、'.join(shown) if shown else '无'}"]
        if extra:
            lines.append(extra)
        recent = await self.repos.messages.conversation_messages(conversation_id, limit=LAST_MESSAGES)
        for message in recent:
            who = "客户" if message.direction.value == "in" and message.origin in (None, 3) else "回复"
            if message.text:
                lines.append(f"{who}：{_cut(message.text, 60)}")
        content = {
            "title": _cut(f"{titles.get(kind, '客户会话')}：{customer}", TEXTCARD_TITLE_BYTES),
            "description": _cut("\n".join(lines), TEXTCARD_DESCRIPTION_BYTES),
            "url": self.console_url(conversation_id),
            "btntxt": "打开会话",
        }
        reply = OutboundMessage(
            channel=Channel.APP, to=agent.wecom_userid, account_id="", msgtype="textcard", content=content
        )
        try:
            await self._sender.send(reply, _key("notify", conversation_id, agent.id, kind, level))
        except WeComApiError as exc:
            log.warning("agent notification failed", agent_id=agent.id, kind=kind, errcode=exc.errcode)
            return False
        log.info("agent notified", agent_id=agent.id, conversation_id=conversation_id, kind=kind)
        return True

    async def notify_digest(self, agent: AgentRecord, items: Sequence[CardItem], card_id: str) -> bool:
        """One textcard for several cards the member's WeCom budget held back (bot.member_cards), urgent first."""
        if not agent.wecom_userid or not items:
            return False
        lines: list[str] = []
        for item in items[:DIGEST_LINES]:
            conversation = await self.repo.conversation(item.conversation_id)
            customer = (conversation.customer_name or conversation.external_id) if conversation else "?"
            line = f"{DIGEST_KINDS.get(item.kind, item.kind)}｜{customer}"
            lines.append(f"{line}：{item.extra}" if item.extra else line)
        if len(items) > DIGEST_LINES:
            lines.append(f"另有 {len(items) - DIGEST_LINES} 条，请在工作台查看")
        new = sum(item.urgent for item in items)
        title = f"{new} 个新的客户会话待处理" if new else f"SLA 提醒：{len(items)} 个会话需要处理"
        content = {
            "title": _cut(title, TEXTCARD_TITLE_BYTES),
            "description": _cut("\n".join(lines), TEXTCARD_DESCRIPTION_BYTES),
            "url": f"{self._console}/console/{'lead' if agent.role == 'lead' and not new else 'inbox'}",
            "btntxt": "打开工作台",
        }
        reply = OutboundMessage(
            channel=Channel.APP, to=agent.wecom_userid, account_id="", msgtype="textcard", content=content
        )
        try:
            await self._sender.send(reply, _key("digest", agent.id, card_id))
        except WeComApiError as exc:
            log.warning("agent notification failed", agent_id=agent.id, kind="digest", errcode=exc.errcode)
            return False
        log.info("agent notified", agent_id=agent.id, kind="digest", cards=len(items))
        return True

    async def member(self, member_id: int) -> AgentRecord | None:
        return await self.repo.agent(member_id)

    async def leads_of(self, conversation: HandoffConversation) -> list[AgentRecord]:
        """The team's leads: configured usernames and role=lead members of the conversation's team."""
        team = self.config.team(conversation.team)
        return await self.repo.leads(team.name, team.leads)

    async def reassign_after_breach(self, conversation_id: int) -> int | None:
        """Move a breached conversation to another available agent (not the assignee); the new agent's id."""
        conversation = await self.repo.conversation(conversation_id)
        if conversation is None or conversation.status.value not in HUMAN_STATUSES:
            return None
        exclude = [conversation.assignee_id] if conversation.assignee_id is not None else []
        decision, records = await self._decide(conversation, exclude)
        if not isinstance(decision, Assignment):
            return None
        target = records[int(decision.agent_id)]
        moved = await self._move(conversation, target, "reassigned")
        if not isinstance(moved, TransferAllowed):
            return None
        await self._changed(
            conversation, "reassigned", assignee_id=target.id, previous_assignee_id=conversation.assignee_id
        )
        return target.id


def priority_of(value: str | None) -> Priority:
    try:
        return Priority(value or Priority.NORMAL.value)
    except ValueError:
        return Priority.NORMAL


__all__: Sequence[str] = [
    "ClaimResult",
    "Conflict",
    "HandoffOutcome",
    "HandoffReason",
    "HandoffService",
    "HandoffStatus",
    "Refused",
    "ReplyOutcome",
    "ResolveResult",
    "answers_in_wecom",
    "console_reply_key",
]
