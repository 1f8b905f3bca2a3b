"""SQL for handoff: agents as routing sees them, conversation assignment (conditional updates), SLA clocks/events.

Assignment changes are conditional UPDATEs on (status, version): of two concurrent claims on the same version,
exactly one matches a row; the other gets rowcount 0 and is told. SLA events are inserted with ON CONFLICT DO
NOTHING on their unique key (both backends), so an event is written once however many sweeps race.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, String, bindparam, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.storage.models import (
    Conversation,
    ConversationStatus,
    Customer,
    CustomerTag,
    Direction,
    Message,
    Outbox,
    ScriptAnswer,
    SlaClockRow,
    SlaEventRow,
    StaffRole,
    StaffUser,
)
from bot.storage.repositories import (
    OutboxRecord,
    _insert_outbound,
    _outbox_record,
    _Repository,
    _rowcount,
    binds,
    insert_for,
    table,
)
from handlers.domain import Channel
from handlers.sla import ClockKind, ClockStatus, Deadline, SlaClock, SlaEvent, SlaEventKind

HUMAN_STATUSES = (ConversationStatus.OPEN.value, ConversationStatus.WAITING.value)
WITH_HUMANS = (ConversationStatus.QUEUED.value, *HUMAN_STATUSES)
ROUTABLE_ROLES = (StaffRole.AGENT.value, StaffRole.LEAD.value)
_PRIORITY_RANK = {"urgent": 0, "high": 1, "normal": 2, "low": 3}


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """A staff member who may serve customers, with how many conversations they have open now."""

    id: int
    username: str
    display_name: str
    role: str
    team: str | None
    wecom_userid: str | None
    skills: frozenset[str]
    capacity: int
    presence: str
    last_assigned_at: datetime | None
    open_count: int


@dataclass(frozen=True, slots=True)
class HandoffConversation:
    """A conversation with what handoff needs: its customer, state, assignee and lock version."""

    id: int
    channel: Channel
    account_id: str
    customer_id: int
    external_id: str
    customer_name: str | None
    status: ConversationStatus
    opened_at: datetime
    kf_service_state: int | None
    assignee_id: int | None
    team: str | None
    priority: str
    handoff_reason: str | None
    handoff_at: datetime | None
    queued_at: datetime | None
    version: int
    no_match_streak: int
    last_agent_id: int | None
    last_inbound_at: datetime | None = None  # the customer's last message: opens WeCom's 48 h / 5-message window


def _agent(row: Any, open_count: int) -> AgentRecord:  # an ORM StaffUser or a Core row of its columns
    return AgentRecord(
        id=row.id,
        username=row.username,
        display_name=row.display_name,
        role=row.role,
        team=row.team,
        wecom_userid=row.wecom_userid,
        skills=frozenset(row.skills or ()),
        capacity=row.capacity,
        presence=row.presence,
        last_assigned_at=row.last_assigned_at,
        open_count=open_count,
    )


# The hot statements, built once with bind parameters (see repositories._InboundSql for why): every handoff,
# claim and sweep action runs several of them.
_conversations, _customers, _staff = table(Conversation), table(Customer), table(StaffUser)
_C, _CU, _S = _conversations.c, _customers.c, _staff.c

_CONVERSATION_SELECT = select(
    _C.id,
    _C.channel,
    _C.account_id,
    _C.customer_id,
    _CU.external_id,
    _CU.name.label("customer_name"),
    _C.status,
    _C.opened_at,
    _C.kf_service_state,
    _C.assignee_id,
    _C.team,
    _C.priority,
    _C.handoff_reason,
    _C.handoff_at,
    _C.queued_at,
    _C.version,
    _C.no_match_streak,
    _CU.last_agent_id,
    _C.last_inbound_at,
).select_from(_conversations.join(_customers, _CU.id == _C.customer_id))
_CONVERSATION_BY_ID = _CONVERSATION_SELECT.where(_C.id == bindparam("b_conversation_id"))
_QUEUED = (
    _CONVERSATION_SELECT.where(_C.status == ConversationStatus.QUEUED.value)
    .order_by(case(_PRIORITY_RANK, value=_C.priority, else_=2), _C.queued_at, _C.id)
    .limit(bindparam("b_limit"))
)
_OPEN_COUNTS = (
    select(_C.assignee_id, func.count().label("n"))
    .where(_C.status.in_(HUMAN_STATUSES), _C.assignee_id.is_not(None))
    .group_by(_C.assignee_id)
    .subquery()
)
_AGENTS = (
    select(
        _S.id,
        _S.username,
        _S.display_name,
        _S.role,
        _S.team,
        _S.wecom_userid,
        _S.skills,
        _S.capacity,
        _S.presence,
        _S.last_assigned_at,
        func.coalesce(_OPEN_COUNTS.c.n, 0).label("open_count"),
    )
    .outerjoin(_OPEN_COUNTS, _OPEN_COUNTS.c.assignee_id == _S.id)
    .where(_S.active.is_(True), _S.role.in_(ROUTABLE_ROLES))
    .order_by(_S.id)
)
_AGENTS_BY_ID = _AGENTS.where(_S.id.in_(bindparam("b_ids", expanding=True)))
_CAPACITY_FOR_UPDATE = select(_S.capacity).where(_S.id == bindparam("b_agent_id")).with_for_update()
_OPEN_COUNT = (
    select(func.count())
    .select_from(_conversations)
    .where(
        _C.assignee_id == bindparam("b_agent_id"),
        _C.status.in_(HUMAN_STATUSES),
        _C.id != bindparam("b_conversation_id"),
    )
)
_CLAIM = (
    update(_conversations)
    .where(
        _C.id == bindparam("b_conversation_id"),
        _C.version == bindparam("b_version"),
        _C.status.in_(bindparam("b_from", expanding=True)),
    )
    .values(
        status=ConversationStatus.OPEN.value,
        assignee_id=bindparam("b_agent_id"),
        assigned_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        version=_C.version + 1,
    )
)
_TOUCH_AGENT = update(_staff).where(_S.id == bindparam("b_agent_id")).values(last_assigned_at=bindparam("b_now"))
_SET_KF_STATE = (
    update(_conversations).where(_C.id == bindparam("b_conversation_id")).values(kf_service_state=bindparam("b_state"))
)
_SET_WAITING = (
    update(_conversations)
    .where(_C.id == bindparam("b_conversation_id"), _C.status == bindparam("b_old"))
    .values(status=bindparam("b_new"), updated_at=bindparam("b_now"), version=_C.version + 1)
)
_START_HANDOFF = (
    update(_conversations)
    .where(_C.id == bindparam("b_conversation_id"), _C.status == ConversationStatus.BOT.value)
    .values(
        status=ConversationStatus.QUEUED.value,
        handoff_reason=bindparam("b_reason"),
        handoff_at=bindparam("b_now"),
        queued_at=bindparam("b_now"),
        team=func.coalesce(bindparam("b_team", type_=String), _C.team, bindparam("b_default_team", type_=String)),
        priority=bindparam("b_priority"),
        no_match_streak=0,
        updated_at=bindparam("b_now"),
        version=_C.version + 1,
    )
)
_CUSTOMER_TAGS = (
    select(table(CustomerTag).c.tag).where(table(CustomerTag).c.customer_id == bindparam("b_customer_id")).distinct()
)


def _conversation_row(row: Any) -> HandoffConversation:
    return HandoffConversation(
        id=row.id,
        channel=Channel(row.channel),
        account_id=row.account_id,
        customer_id=row.customer_id,
        external_id=row.external_id,
        customer_name=row.customer_name,
        status=ConversationStatus(row.status),
        opened_at=row.opened_at,
        kf_service_state=row.kf_service_state,
        assignee_id=row.assignee_id,
        team=row.team,
        priority=row.priority,
        handoff_reason=row.handoff_reason,
        handoff_at=row.handoff_at,
        queued_at=row.queued_at,
        version=row.version,
        no_match_streak=row.no_match_streak,
        last_agent_id=row.last_agent_id,
        last_inbound_at=row.last_inbound_at,
    )


async def _read_conversation(session: AsyncSession, conversation_id: int) -> HandoffConversation | None:
    row = (await session.execute(_CONVERSATION_BY_ID, {"b_conversation_id": conversation_id})).one_or_none()
    return None if row is None else _conversation_row(row)


async def _open_count(session: AsyncSession, agent_id: int, *, excluding: int) -> int:
    """Conversations the agent has open now, not counting `excluding` (a transfer back to its own assignee)."""
    params = {"b_agent_id": agent_id, "b_conversation_id": excluding}
    return int((await session.execute(_OPEN_COUNT, params)).scalar_one())


class HandoffRepository(_Repository):
    """Agents, and the conversation columns of handoff, changed only by conditional updates."""

    # ---- agents

    async def agents(self, *, ids: Iterable[int] | None = None) -> list[AgentRecord]:
        """Active agents and leads (routable staff), with their open conversation counts."""
        async with self._sessions() as session:
            if ids is None:
                result = await session.execute(_AGENTS)
            else:
                result = await session.execute(_AGENTS_BY_ID, {"b_ids": list(ids)})
            return [_agent(row, int(row.open_count)) for row in result.all()]

    async def agent(self, agent_id: int) -> AgentRecord | None:
        """One routable staff member by id."""
        found = await self.agents(ids=[agent_id])
        return found[0] if found else None

    async def agent_by_wecom_userid(self, wecom_userid: str) -> AgentRecord | None:
        """The routable staff member with this WeCom UserID (a kf servicer)."""
        for agent in await self.agents():
            if agent.wecom_userid == wecom_userid:
                return agent
        return None

    async def leads(self, team: str | None, usernames: Sequence[str] = ()) -> list[AgentRecord]:
        """Whom to tell at a breach: the listed usernames and the team's leads (active, any presence)."""
        stmt = select(StaffUser).where(
            StaffUser.active.is_(True),
            or_(
                StaffUser.username.in_(list(usernames)),
                (StaffUser.role == StaffRole.LEAD.value) & (StaffUser.team == team),
            ),
        )
        async with self._sessions() as session:
            return [_agent(row, 0) for row in (await session.scalars(stmt.order_by(StaffUser.id))).all()]

    async def set_presence(self, agent_id: int, presence: str) -> bool:
        """Set an agent's presence (online, away, offline)."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(StaffUser).where(StaffUser.id == agent_id).values(presence=presence, presence_at=self._now())
            )
            return _rowcount(result) == 1

    async def set_agent_profile(
        self, agent_id: int, *, skills: Iterable[str] | None = None, capacity: int | None = None
    ) -> None:
        """Set an agent's skills and/or capacity (None leaves a field as it is)."""
        values: dict[str, Any] = {}
        if skills is not None:
            values["skills"] = sorted(set(skills))
        if capacity is not None:
            values["capacity"] = capacity
        if values:
            async with self._sessions.begin() as session:
                await session.execute(update(StaffUser).where(StaffUser.id == agent_id).values(**values))

    # ---- conversations

    async def conversation(self, conversation_id: int) -> HandoffConversation | None:
        """One conversation with its customer."""
        async with self._sessions() as session:
            return await _read_conversation(session, conversation_id)

    async def queued(self, *, limit: int = 500) -> list[HandoffConversation]:
        """Conversations waiting for an agent, in queue order (priority, then time queued)."""
        async with self._sessions() as session:
            return [_conversation_row(row) for row in (await session.execute(_QUEUED, {"b_limit": limit})).all()]

    async def start_handoff(
        self,
        conversation_id: int,
        *,
        reason: str,
        team: str | None,
        priority: str,
        default_team: str | None = None,
    ) -> tuple[HandoffConversation, frozenset[str]] | None:
        """bot → queued (the handoff itself), with the customer's tags as they are now; None when the conversation
        is not with the bot any more. The team: `team`, else the conversation's, else `default_team`."""
        params = {
            "b_conversation_id": conversation_id,
            "b_reason": reason[:32],
            "b_now": self._now(),
            "b_team": team,
            "b_default_team": default_team,
            "b_priority": priority,
        }
        async with self._sessions.begin() as session:
            result = await session.execute(_START_HANDOFF, params)
            if _rowcount(result) == 0:
                return None
            # Same transaction: no second checkout for what the caller needs next.
            started = await _read_conversation(session, conversation_id)
            assert started is not None  # just updated, in this transaction
            tags = await session.execute(_CUSTOMER_TAGS, {"b_customer_id": started.customer_id})
            return started, frozenset(tags.scalars().all())

    async def claim(
        self,
        conversation_id: int,
        agent_id: int,
        *,
        version: int,
        from_statuses: Sequence[str] = (ConversationStatus.QUEUED.value,),
        within_capacity: bool = False,
    ) -> bool:
        """Give the conversation to an agent if nobody changed it since `version`; True for the one winner.

        `within_capacity`: also refuse when the agent already has `capacity` conversations open. The agent's row
        is locked first (FOR UPDATE; SQLite's BEGIN IMMEDIATE serialises writers anyway), so two claims for the
        same agent's last free slot, from any process, cannot both count a free slot and both win.
        """
        now = self._now()
        async with self._sessions.begin() as session:
            if within_capacity:
                capacity = (await session.execute(_CAPACITY_FOR_UPDATE, {"b_agent_id": agent_id})).scalar_one_or_none()
                if capacity is None or await _open_count(session, agent_id, excluding=conversation_id) >= capacity:
                    return False
            params = {
                "b_conversation_id": conversation_id,
                "b_version": version,
                "b_from": list(from_statuses),
                "b_agent_id": agent_id,
                "b_now": now,
            }
            if _rowcount(await session.execute(_CLAIM, params)) == 0:
                return False
            await session.execute(_TOUCH_AGENT, {"b_agent_id": agent_id, "b_now": now})
            return True

    async def requeue(self, conversation_id: int, *, version: int) -> bool:
        """Back to the queue (WeCom refused the servicer), if nobody changed it since `version`."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.version == version)
                .values(
                    status=ConversationStatus.QUEUED.value,
                    assignee_id=None,
                    assigned_at=None,
                    updated_at=self._now(),
                    version=Conversation.version + 1,
                )
            )
            return _rowcount(result) == 1

    async def set_kf_state(self, conversation_id: int, state: int) -> None:
        """Record the kf service state WeCom now has for the session."""
        async with self._sessions.begin() as session:
            await session.execute(_SET_KF_STATE, {"b_conversation_id": conversation_id, "b_state": state})

    async def set_waiting(self, conversation_id: int, waiting: bool) -> bool:
        """open ↔ waiting (on the customer), for agent replies and customer messages."""
        old, new = (
            (ConversationStatus.OPEN, ConversationStatus.WAITING)
            if waiting
            else (ConversationStatus.WAITING, ConversationStatus.OPEN)
        )
        params = {"b_conversation_id": conversation_id, "b_old": old.value, "b_new": new.value, "b_now": self._now()}
        async with self._sessions.begin() as session:
            return _rowcount(await session.execute(_SET_WAITING, params)) == 1

    async def resolve(self, conversation_id: int) -> HandoffConversation | None:
        """queued/open/waiting → resolved, the customer remembering the agent; None when not active with humans."""
        before = await self.conversation(conversation_id)
        if before is None or before.status.value not in WITH_HUMANS:
            return None
        now = self._now()
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.version == before.version)
                .values(
                    status=ConversationStatus.RESOLVED.value,
                    resolved_at=now,
                    updated_at=now,
                    version=Conversation.version + 1,
                )
            )
            if _rowcount(result) == 0:
                return None
            if before.assignee_id is not None:
                await session.execute(
                    update(Customer).where(Customer.id == before.customer_id).values(last_agent_id=before.assignee_id)
                )
        return before

    async def no_match_run(
        self,
        conversation: HandoffConversation,
        before_message_id: int,
        no_match_scripts: frozenset[str],
        *,
        limit: int = 50,
    ) -> int:
        """How many of the conversation's answers right before this message were no-match answers, in a row.

        Read from the answers (unique per inbound message), so handling a message again after a crash counts
        the same run: a stored counter would count the retried message twice.
        """
        stmt = (
            select(ScriptAnswer.inbound_message_id, ScriptAnswer.script_id)
            .where(
                ScriptAnswer.customer_id == conversation.customer_id,
                ScriptAnswer.inbound_message_id < before_message_id,
                ScriptAnswer.answered_at >= conversation.opened_at,
            )
            .order_by(ScriptAnswer.inbound_message_id.desc())
            .limit(limit)
        )
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).all()
        by_message: dict[int, set[str]] = {}
        for message_id, script_id in rows:
            by_message.setdefault(message_id, set()).add(script_id)
        run = 0
        for message_id in sorted(by_message, reverse=True):
            if not by_message[message_id] <= no_match_scripts:
                break
            run += 1
        return run

    async def set_no_match_streak(self, conversation_id: int, streak: int) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(no_match_streak=streak)
            )

    # ---- console replies (kf/send_msg from the console, through the outbox)

    async def last_customer_message_id(self, conversation_id: int) -> int | None:
        """The newest message the customer wrote in the conversation (console replies hang their outbox row on it)."""
        stmt = (
            select(Message.id)
            .where(
                Message.conversation_id == conversation_id,
                Message.direction == Direction.IN.value,
                or_(Message.origin.is_(None), Message.origin == 3),
                Message.msgtype != "event",
            )
            .order_by(Message.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            return (await session.execute(stmt)).scalar_one_or_none()

    async def sent_after(self, conversation: HandoffConversation, message_id: int) -> int:
        """How many messages were stored as sent to this customer on this account after message `message_id` (the
        customer's last one): what WeCom's 5-per-customer-message quota counts, in insertion (id) order."""
        stmt = (
            select(func.count())
            .select_from(Message)
            .where(
                Message.channel == conversation.channel.value,
                Message.account_id == conversation.account_id,
                Message.customer_id == conversation.customer_id,
                Message.direction == Direction.OUT.value,
                Message.id > message_id,
            )
        )
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def outbox_by_key(self, idempotency_key: str) -> OutboxRecord | None:
        """The outbox row reserved under this key, if any (a console reply retried with the same key)."""
        async with self._sessions() as session:
            row = (await session.scalars(select(Outbox).where(Outbox.idempotency_key == idempotency_key))).one_or_none()
            return None if row is None else _outbox_record(row)

    async def next_console_seq(self, inbound_message_id: int, floor: int) -> int:
        """The next free outbox seq (≥ floor) under an inbound message: console replies number after the bot's."""
        stmt = select(func.max(Outbox.seq)).where(Outbox.inbound_message_id == inbound_message_id, Outbox.seq >= floor)
        async with self._sessions() as session:
            top = (await session.execute(stmt)).scalar_one_or_none()
        return floor if top is None else int(top) + 1

    async def record_agent_message(
        self, conversation: HandoffConversation, key: str, text: str, agent_id: int, sent_at: datetime
    ) -> int:
        """Store a console reply as an outbound message authored by the agent (idempotent on the key)."""
        async with self._sessions.begin() as session:
            return await _insert_outbound(
                session,
                channel=conversation.channel.value,
                key=key,
                account_id=conversation.account_id,
                msgtype="text",
                content={"content": text, "author": "agent", "agent_id": agent_id},
                customer_id=conversation.customer_id,
                conversation_id=conversation.id,
                sent_at=sent_at,
            )


# --------------------------------------------------------------------------- SLA clocks and events


def _clock(row: SlaClockRow) -> SlaClock:
    return SlaClock(
        conversation_id=str(row.conversation_id),
        kind=ClockKind(row.kind),
        cycle=row.cycle,
        policy_id=row.policy_id,
        target_seconds=row.target_seconds,
        started_at=row.started_at,
        ladder=tuple(Deadline(SlaEventKind(kind), int(level), float(at)) for kind, level, at in row.ladder),
        reached=row.reached,
        status=ClockStatus(row.status),
        ended_at=row.ended_at,
    )


@dataclass(frozen=True, slots=True)
class _SlaSql:
    """The SLA upserts, built once per dialect with bind parameters (every handoff and sweep runs them)."""

    save_clock: Any
    record_event: Any


@functools.cache
def _sla_sql(dialect: str) -> _SlaSql:
    insert = insert_for(dialect)
    clocks, events = table(SlaClockRow), table(SlaEventRow)
    clock = insert(clocks).values(
        **binds("conversation_id", "kind", "cycle", "policy_id", "target_seconds", "started_at", prefix="b_"),
        **binds("reached", "status", prefix="b_"),
        ladder=bindparam("b_ladder", type_=clocks.c.ladder.type),
        next_deadline=bindparam("b_next_deadline", type_=Float),
        ended_at=bindparam("b_ended_at", type_=Float),
    )
    ex, c = clock.excluded, clocks.c
    newer = ex.reached >= c.reached  # `reached` never goes back: a sweep may have advanced it meanwhile
    save_clock = clock.on_conflict_do_update(
        index_elements=[c.conversation_id, c.kind, c.cycle],
        set_={
            "status": ex.status,
            "ended_at": ex.ended_at,
            "reached": case((newer, ex.reached), else_=c.reached),
            "next_deadline": case(
                (ex.status != ClockStatus.RUNNING.value, None),
                (newer, ex.next_deadline),
                else_=c.next_deadline,
            ),
        },
    )
    e = events.c
    record_event = (
        insert(events)
        .values(
            **binds("conversation_id", "clock", "cycle", "kind", "level", "at", "due_at", prefix="b_"),
            met=bindparam("b_met", type_=Boolean),
            recorded_at=bindparam("b_now"),
        )
        .on_conflict_do_nothing(index_elements=[e.conversation_id, e.clock, e.cycle, e.kind, e.level])
        .returning(e.id)
    )
    return _SlaSql(save_clock=save_clock, record_event=record_event)


async def _save_clock(session: AsyncSession, clock: SlaClock) -> None:
    params = {
        "b_conversation_id": int(clock.conversation_id),
        "b_kind": clock.kind.value,
        "b_cycle": clock.cycle,
        "b_policy_id": clock.policy_id,
        "b_target_seconds": clock.target_seconds,
        "b_started_at": clock.started_at,
        "b_ladder": [[r.kind.value, r.level, r.at] for r in clock.ladder],
        "b_reached": clock.reached,
        "b_status": clock.status.value,
        "b_next_deadline": clock.next_deadline,
        "b_ended_at": clock.ended_at,
    }
    await session.execute(_sla_sql(session.get_bind().dialect.name).save_clock, params)


async def _record_events(session: AsyncSession, events: Iterable[SlaEvent], now: datetime) -> list[SlaEvent]:
    statement = _sla_sql(session.get_bind().dialect.name).record_event
    written: list[SlaEvent] = []
    for event in events:
        params = {
            "b_conversation_id": int(event.conversation_id),
            "b_clock": event.clock.value,
            "b_cycle": event.cycle,
            "b_kind": event.kind.value,
            "b_level": event.level,
            "b_at": event.at,
            "b_due_at": event.due_at,
            "b_met": event.met,
            "b_now": now,
        }
        if (await session.execute(statement, params)).scalar_one_or_none() is not None:
            written.append(event)
    return written


@dataclass(frozen=True, slots=True)
class StoredClock:
    id: int
    clock: SlaClock


def _advance(stored: StoredClock, advanced: SlaClock) -> Any:
    return (
        update(SlaClockRow)
        .where(
            SlaClockRow.id == stored.id,
            SlaClockRow.status == ClockStatus.RUNNING.value,
            SlaClockRow.reached == stored.clock.reached,
        )
        .values(reached=advanced.reached, next_deadline=advanced.next_deadline)
    )


class SlaRepository(_Repository):
    """SLA clocks (one row per conversation, kind, cycle) and the event log (each event once)."""

    async def save_clocks(self, clocks: Iterable[SlaClock]) -> None:
        """Insert or update clocks; `reached` never goes back (a sweep may have advanced it meanwhile)."""
        await self.save(clocks, ())

    async def record_events(self, events: Iterable[SlaEvent]) -> list[SlaEvent]:
        """Insert events by their unique key; returns only those written now (the caller acts on these)."""
        return await self.save((), events)

    async def save(self, clocks: Iterable[SlaClock], events: Iterable[SlaEvent]) -> list[SlaEvent]:
        """Clocks and the events of the same change in one transaction; returns the events written now."""
        async with self._sessions.begin() as session:
            for clock in clocks:
                await _save_clock(session, clock)
            return await _record_events(session, events, self._now())

    async def save_first(
        self, conversation_id: int, clocks: Iterable[SlaClock], events: Iterable[SlaEvent]
    ) -> list[SlaEvent] | None:
        """`save`, unless the conversation has clocks already (None then): starting them twice is a retry."""
        async with self._sessions.begin() as session:
            started = await session.execute(
                select(SlaClockRow.id).where(SlaClockRow.conversation_id == conversation_id).limit(1)
            )
            if started.first() is not None:
                return None
            for clock in clocks:
                await _save_clock(session, clock)
            return await _record_events(session, events, self._now())

    async def sweep(self, changes: Sequence[tuple[StoredClock, SlaClock, Sequence[SlaEvent]]]) -> list[SlaEvent]:
        """One sweep pass in one transaction: each due clock's events written once and the clock advanced.

        A clock advances only if it is still as read (running, same `reached`); its events are written either
        way, by their unique key, so of two racing passes exactly one writes (and acts on) each event.
        """
        written: list[SlaEvent] = []
        now = self._now()
        async with self._sessions.begin() as session:
            for stored, advanced, events in changes:
                written.extend(await _record_events(session, events, now))
                await session.execute(_advance(stored, advanced))
        return written

    async def clocks_of(self, conversation_id: int) -> list[SlaClock]:
        """Every clock of a conversation, by kind then cycle."""
        stmt = (
            select(SlaClockRow)
            .where(SlaClockRow.conversation_id == conversation_id)
            .order_by(SlaClockRow.kind, SlaClockRow.cycle)
        )
        async with self._sessions() as session:
            return [_clock(row) for row in (await session.scalars(stmt)).all()]

    async def due(self, now: float, *, limit: int = 500) -> list[StoredClock]:
        """Running clocks whose next deadline has passed (the (status, next_deadline) index)."""
        stmt = (
            select(SlaClockRow)
            .where(SlaClockRow.status == ClockStatus.RUNNING.value, SlaClockRow.next_deadline <= now)
            .order_by(SlaClockRow.next_deadline, SlaClockRow.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [StoredClock(row.id, _clock(row)) for row in (await session.scalars(stmt)).all()]

    async def advance(self, stored: StoredClock, advanced: SlaClock) -> bool:
        """Store the rungs reported, only if the clock is still as read (running, same `reached`)."""
        async with self._sessions.begin() as session:
            return _rowcount(await session.execute(_advance(stored, advanced))) == 1

    async def events_of(self, conversation_id: int) -> list[SlaEventRow]:
        """The event log of a conversation, in the order written."""
        stmt = select(SlaEventRow).where(SlaEventRow.conversation_id == conversation_id).order_by(SlaEventRow.id)
        async with self._sessions() as session:
            rows = list((await session.scalars(stmt)).all())
            for row in rows:
                session.expunge(row)
            return rows
