"""SQL for handoff: agents as routing sees them, conversation assignment (conditional updates), SLA clocks/events.

Assignment changes are conditional UPDATEs on (status, version): of two concurrent claims on the same version,
exactly one matches a row; the other gets rowcount 0 and is told. SLA events are inserted with ON CONFLICT DO
NOTHING on their unique key (both backends), so an event is written once however many sweeps race.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, or_, select, update
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
from bot.storage.repositories import OutboxRecord, _insert, _insert_outbound, _outbox_record, _Repository, _rowcount
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


def _agent(row: StaffUser, open_count: int) -> AgentRecord:
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


def _conversation(row: Conversation, customer: Customer) -> HandoffConversation:
    return HandoffConversation(
        id=row.id,
        channel=Channel(row.channel),
        account_id=row.account_id,
        customer_id=row.customer_id,
        external_id=customer.external_id,
        customer_name=customer.name,
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
        last_agent_id=customer.last_agent_id,
        last_inbound_at=row.last_inbound_at,
    )


async def _read_conversation(session: AsyncSession, conversation_id: int) -> HandoffConversation | None:
    stmt = (
        select(Conversation, Customer)
        .join(Customer, Customer.id == Conversation.customer_id)
        .where(Conversation.id == conversation_id)
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else _conversation(row[0], row[1])


async def _open_count(session: AsyncSession, agent_id: int, *, excluding: int) -> int:
    """Conversations the agent has open now, not counting `excluding` (a transfer back to its own assignee)."""
    stmt = (
        select(func.count())
        .select_from(Conversation)
        .where(
            Conversation.assignee_id == agent_id,
            Conversation.status.in_(HUMAN_STATUSES),
            Conversation.id != excluding,
        )
    )
    return int((await session.execute(stmt)).scalar_one())


def _open_counts() -> Any:
    return (
        select(Conversation.assignee_id, func.count().label("n"))
        .where(Conversation.status.in_(HUMAN_STATUSES), Conversation.assignee_id.is_not(None))
        .group_by(Conversation.assignee_id)
        .subquery()
    )


class HandoffRepository(_Repository):
    """Agents, and the conversation columns of handoff, changed only by conditional updates."""

    # ---- agents

    async def agents(self, *, ids: Iterable[int] | None = None) -> list[AgentRecord]:
        """Active agents and leads (routable staff), with their open conversation counts."""
        counts = _open_counts()
        stmt = (
            select(StaffUser, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.assignee_id == StaffUser.id)
            .where(StaffUser.active.is_(True), StaffUser.role.in_(ROUTABLE_ROLES))
            .order_by(StaffUser.id)
        )
        if ids is not None:
            stmt = stmt.where(StaffUser.id.in_(list(ids)))
        async with self._sessions() as session:
            return [_agent(row, int(n)) for row, n in (await session.execute(stmt)).all()]

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
        rank = case(_PRIORITY_RANK, value=Conversation.priority, else_=2)
        stmt = (
            select(Conversation, Customer)
            .join(Customer, Customer.id == Conversation.customer_id)
            .where(Conversation.status == ConversationStatus.QUEUED.value)
            .order_by(rank, Conversation.queued_at, Conversation.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [_conversation(c, cu) for c, cu in (await session.execute(stmt)).all()]

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
        now = self._now()
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.status == ConversationStatus.BOT.value)
                .values(
                    status=ConversationStatus.QUEUED.value,
                    handoff_reason=reason[:32],
                    handoff_at=now,
                    queued_at=now,
                    team=team if team is not None else func.coalesce(Conversation.team, default_team),
                    priority=priority,
                    no_match_streak=0,
                    updated_at=now,
                    version=Conversation.version + 1,
                )
            )
            if _rowcount(result) == 0:
                return None
            # Same transaction: no second checkout for what the caller needs next.
            started = await _read_conversation(session, conversation_id)
            assert started is not None  # just updated, in this transaction
            tags = await session.execute(
                select(CustomerTag.tag).where(CustomerTag.customer_id == started.customer_id).distinct()
            )
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
                capacity = (
                    await session.execute(
                        select(StaffUser.capacity).where(StaffUser.id == agent_id).with_for_update()
                    )
                ).scalar_one_or_none()
                if capacity is None or await _open_count(session, agent_id, excluding=conversation_id) >= capacity:
                    return False
            result = await session.execute(
                update(Conversation)
                .where(
                    Conversation.id == conversation_id,
                    Conversation.version == version,
                    Conversation.status.in_(list(from_statuses)),
                )
                .values(
                    status=ConversationStatus.OPEN.value,
                    assignee_id=agent_id,
                    assigned_at=now,
                    updated_at=now,
                    version=Conversation.version + 1,
                )
            )
            if _rowcount(result) == 0:
                return False
            await session.execute(update(StaffUser).where(StaffUser.id == agent_id).values(last_assigned_at=now))
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
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(kf_service_state=state)
            )

    async def set_waiting(self, conversation_id: int, waiting: bool) -> bool:
        """open ↔ waiting (on the customer), for agent replies and customer messages."""
        old, new = (
            (ConversationStatus.OPEN, ConversationStatus.WAITING)
            if waiting
            else (ConversationStatus.WAITING, ConversationStatus.OPEN)
        )
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.status == old.value)
                .values(status=new.value, updated_at=self._now(), version=Conversation.version + 1)
            )
            return _rowcount(result) == 1

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


async def _save_clock(session: AsyncSession, clock: SlaClock) -> None:
    stmt = _insert(session, SlaClockRow).values(
        conversation_id=int(clock.conversation_id),
        kind=clock.kind.value,
        cycle=clock.cycle,
        policy_id=clock.policy_id,
        target_seconds=clock.target_seconds,
        started_at=clock.started_at,
        ladder=[[r.kind.value, r.level, r.at] for r in clock.ladder],
        reached=clock.reached,
        status=clock.status.value,
        next_deadline=clock.next_deadline,
        ended_at=clock.ended_at,
    )
    ex = stmt.excluded
    newer = ex.reached >= SlaClockRow.reached
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[SlaClockRow.conversation_id, SlaClockRow.kind, SlaClockRow.cycle],
            set_={
                "status": ex.status,
                "ended_at": ex.ended_at,
                "reached": case((newer, ex.reached), else_=SlaClockRow.reached),
                "next_deadline": case(
                    (ex.status != ClockStatus.RUNNING.value, None),
                    (newer, ex.next_deadline),
                    else_=SlaClockRow.next_deadline,
                ),
            },
        )
    )


async def _record_events(session: AsyncSession, events: Iterable[SlaEvent], now: datetime) -> list[SlaEvent]:
    written: list[SlaEvent] = []
    for event in events:
        stmt = (
            _insert(session, SlaEventRow)
            .values(
                conversation_id=int(event.conversation_id),
                clock=event.clock.value,
                cycle=event.cycle,
                kind=event.kind.value,
                level=event.level,
                at=event.at,
                due_at=event.due_at,
                met=event.met,
                recorded_at=now,
            )
            .on_conflict_do_nothing(
                index_elements=[
                    SlaEventRow.conversation_id,
                    SlaEventRow.clock,
                    SlaEventRow.cycle,
                    SlaEventRow.kind,
                    SlaEventRow.level,
                ]
            )
            .returning(SlaEventRow.id)
        )
        if (await session.execute(stmt)).scalar_one_or_none() is not None:
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
