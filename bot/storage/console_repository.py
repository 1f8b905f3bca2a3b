"""SQL for the agent console: login records, the password column, and read queries for the inbox, the
conversation view and the lead's figures.

Writes to conversations (claim, transfer, resolve) belong to the handoff service, not here. Customer message text
is read to be shown to staff; nothing here logs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update

from bot.storage.models import (
    Conversation,
    ConversationStatus,
    Customer,
    CustomerTag,
    Direction,
    Message,
    SlaClockRow,
    SlaEventRow,
    StaffRole,
    StaffUser,
)
from bot.storage.repositories import _Repository, _rowcount
from handlers.domain import KfOrigin

RUNNING = "running"
FIRST_RESPONSE = "first_response"
FULFILLED = "fulfilled"
BREACHED = "breached"
BREACH_LEVEL = 1
HANDLED_STATUSES = (ConversationStatus.OPEN.value, ConversationStatus.WAITING.value)


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """What a login checks: the account, whether it may log in, and its password hash (never logged)."""

    id: int
    username: str
    display_name: str
    role: StaffRole
    team: str | None
    active: bool
    password_hash: str | None


@dataclass(frozen=True, slots=True)
class Scope:
    """Which conversations a reader may see: all (admin), a team's (lead), or a team's queue plus own (agent).

    `none` is for roles that see no conversations at all (community).
    """

    everything: bool = False
    team: str | None = None
    team_all: bool = False  # every conversation of `team` (lead); else only its queue (agent)
    assignee_id: int | None = None
    none: bool = False


@dataclass(frozen=True, slots=True)
class SlaDue:
    kind: str
    due_at: float  # epoch seconds: the breach instant of the running clock that is due first
    started_at: float
    target_seconds: float


@dataclass(frozen=True, slots=True)
class InboxRow:
    id: int
    channel: str
    status: ConversationStatus
    team: str | None
    priority: str
    handoff_reason: str | None
    customer_id: int
    customer_name: str | None
    customer_external_id: str
    tags: tuple[str, ...]
    assignee_id: int | None
    assignee_name: str | None
    queued_at: datetime | None
    assigned_at: datetime | None
    handoff_at: datetime | None
    opened_at: datetime
    last_inbound_at: datetime | None
    sla: SlaDue | None
    version: int

    @property
    def waiting_since(self) -> datetime:
        """Since when the customer has waited for a person (queued, else handed off, else opened)."""
        return self.queued_at or self.handoff_at or self.opened_at


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    id: int
    author: str  # customer, bot or agent
    msgtype: str
    text: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class ConversationDetail:
    row: InboxRow
    messages: tuple[HistoryMessage, ...]  # the latest `history` messages, oldest first
    customer_messages: int = 0  # everything the customer wrote in this conversation (events not counted)
    previous_conversations: int = 0  # the customer's earlier conversations on any channel/account
    previous_agent_id: int | None = None  # who handled the latest earlier conversation that had a person
    previous_agent_name: str | None = None


@dataclass(frozen=True, slots=True)
class Attainment:
    met: int
    total: int

    @property
    def share(self) -> float | None:
        return None if self.total == 0 else self.met / self.total


def _ladder_due(ladder: Sequence[Any], fallback: float | None) -> float | None:
    for rung in ladder or ():
        if isinstance(rung, list | tuple) and len(rung) >= 3 and rung[0] == BREACHED and rung[1] == BREACH_LEVEL:
            return float(rung[2])
    return fallback


def _scope_filter(scope: Scope) -> ColumnElement[bool]:
    if scope.none:
        return Conversation.id.is_(None)  # nothing
    if scope.everything:
        return Conversation.id.is_not(None)
    same_team = Conversation.team.is_(None) if scope.team is None else Conversation.team == scope.team
    if scope.team_all:
        return same_team
    queued = and_(same_team, Conversation.status == ConversationStatus.QUEUED.value)
    if scope.assignee_id is None:
        return queued
    return or_(queued, Conversation.assignee_id == scope.assignee_id)


def author_of(direction: str, origin: int | None, handler: str | None, payload: Mapping[str, Any]) -> str:
    """customer, bot or agent. Agent replies from the WeCom client arrive as inbound origin 5 (servicer);
    replies stored by the console carry `payload.author` "agent"/"human" or a handler named "agent..."."""
    if direction == Direction.IN.value:
        return "agent" if origin == 5 else "customer"
    if str(payload.get("author", "")) in ("agent", "human") or (handler or "").startswith("agent"):
        return "agent"
    return "bot"


def _customer_authored() -> ColumnElement[bool]:
    """What the customer wrote: inbound, not a servicer's line (origin 5) or a system event (origin 4)."""
    return and_(
        Message.direction == Direction.IN.value,
        or_(Message.origin.is_(None), Message.origin == int(KfOrigin.CUSTOMER)),
        Message.msgtype != "event",
    )


class ConsoleRepository(_Repository):
    """Reads for the console, and the one write it owns: a staff account's password hash."""

    # ---- accounts

    async def login_record(self, username: str) -> LoginRecord | None:
        async with self._sessions() as session:
            row = (await session.execute(select(StaffUser).where(StaffUser.username == username))).scalar_one_or_none()
            return None if row is None else _login(row)

    async def account(self, user_id: int) -> LoginRecord | None:
        async with self._sessions() as session:
            row = await session.get(StaffUser, user_id)
            return None if row is None else _login(row)

    async def set_password_hash(self, username: str, password_hash: str | None) -> bool:
        """Store (or with None, clear) a password hash; False when there is no such account."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(StaffUser).where(StaffUser.username == username).values(password_hash=password_hash)
            )
            return _rowcount(result) > 0

    async def staff_names(self, ids: Sequence[int]) -> dict[int, str]:
        if not ids:
            return {}
        async with self._sessions() as session:
            rows = await session.execute(select(StaffUser.id, StaffUser.display_name).where(StaffUser.id.in_(ids)))
            return {int(i): str(n) for i, n in rows.all()}

    # ---- conversations

    async def inbox(self, scope: Scope, *, limit: int = 200) -> tuple[list[InboxRow], list[InboxRow]]:
        """(queue, handled): queued conversations oldest first, and open/waiting ones in scope (lead: the team's;
        agent: their own), longest waiting first."""
        waiting_since = func.coalesce(Conversation.queued_at, Conversation.handoff_at, Conversation.opened_at)
        queue_stmt = (
            select(Conversation, Customer)
            .join(Customer, Customer.id == Conversation.customer_id)
            .where(Conversation.status == ConversationStatus.QUEUED.value, _scope_filter(scope))
            .order_by(waiting_since, Conversation.id)
            .limit(limit)
        )
        handled_filter: ColumnElement[bool]
        if scope.everything or scope.team_all:
            handled_filter = _scope_filter(scope)
        elif scope.assignee_id is not None and not scope.none:
            handled_filter = Conversation.assignee_id == scope.assignee_id
        else:
            handled_filter = Conversation.id.is_(None)
        handled_stmt = (
            select(Conversation, Customer)
            .join(Customer, Customer.id == Conversation.customer_id)
            .where(Conversation.status.in_(HANDLED_STATUSES), handled_filter)
            .order_by(func.coalesce(Conversation.assigned_at, waiting_since), Conversation.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            queue = (await session.execute(queue_stmt)).all()
            handled = (await session.execute(handled_stmt)).all()
            rows = [*queue, *handled]
            extras = await self._extras(session, [(c, u) for c, u in rows])
        built = [self._row(c, u, extras) for c, u in rows]
        return built[: len(queue)], built[len(queue) :]

    async def conversation(
        self, conversation_id: int, scope: Scope, *, history: int = 200
    ) -> ConversationDetail | None:
        """One conversation with its history, or None when it does not exist or is out of scope (the caller
        cannot tell which: existence is not leaked)."""
        stmt = (
            select(Conversation, Customer)
            .join(Customer, Customer.id == Conversation.customer_id)
            .where(Conversation.id == conversation_id, _scope_filter(scope))
        )
        messages_stmt = (
            select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id.desc()).limit(history)
        )
        async with self._sessions() as session:
            found = (await session.execute(stmt)).one_or_none()
            if found is None:
                return None
            conversation, customer = found
            extras = await self._extras(session, [(conversation, customer)])
            messages = (await session.scalars(messages_stmt)).all()
            customer_messages = int(
                await session.scalar(
                    select(func.count())
                    .select_from(Message)
                    .where(Message.conversation_id == conversation_id, _customer_authored())
                )
                or 0
            )
            earlier = and_(Conversation.customer_id == customer.id, Conversation.id < conversation_id)
            previous = int(await session.scalar(select(func.count()).select_from(Conversation).where(earlier)) or 0)
            previous_agent_id: int | None = None
            previous_agent_name: str | None = None
            if previous:
                found_agent = (
                    await session.execute(
                        select(Conversation.assignee_id, StaffUser.display_name)
                        .outerjoin(StaffUser, StaffUser.id == Conversation.assignee_id)
                        .where(earlier, Conversation.assignee_id.is_not(None))
                        .order_by(Conversation.id.desc())
                        .limit(1)
                    )
                ).one_or_none()
                if found_agent is not None and found_agent[0] is not None:
                    previous_agent_id = int(found_agent[0])
                    previous_agent_name = None if found_agent[1] is None else str(found_agent[1])
        return ConversationDetail(
            row=self._row(conversation, customer, extras),
            messages=tuple(
                HistoryMessage(
                    m.id, author_of(m.direction, m.origin, m.handler, m.payload or {}), m.msgtype, m.text, m.created_at
                )
                for m in reversed(messages)
            ),
            customer_messages=customer_messages,
            previous_conversations=previous,
            previous_agent_id=previous_agent_id,
            previous_agent_name=previous_agent_name,
        )

    async def visible(self, conversation_id: int, scope: Scope) -> InboxRow | None:
        """The conversation if the scope may see it (and act on it), else None."""
        stmt = (
            select(Conversation, Customer)
            .join(Customer, Customer.id == Conversation.customer_id)
            .where(Conversation.id == conversation_id, _scope_filter(scope))
        )
        async with self._sessions() as session:
            found = (await session.execute(stmt)).one_or_none()
            if found is None:
                return None
            conversation, customer = found
            extras = await self._extras(session, [(conversation, customer)])
        return self._row(conversation, customer, extras)

    # ---- the lead's figures

    async def queue_depth_by_team(self, team: str | None = None, *, everything: bool = False) -> dict[str, int]:
        """Queued conversations per team ("" for conversations without a team)."""
        stmt = (
            select(Conversation.team, func.count())
            .where(Conversation.status == ConversationStatus.QUEUED.value)
            .group_by(Conversation.team)
        )
        if not everything:
            stmt = stmt.where(Conversation.team.is_(None) if team is None else Conversation.team == team)
        async with self._sessions() as session:
            return {str(t or ""): int(n) for t, n in (await session.execute(stmt)).all()}

    async def first_response_attainment(
        self, since: float, until: float, team: str | None = None, *, everything: bool = False
    ) -> Attainment:
        """Fulfilled first-response events in [since, until) and how many of them met their target."""
        stmt = (
            select(func.count(), func.coalesce(func.sum(case((SlaEventRow.met.is_(True), 1), else_=0)), 0))
            .select_from(SlaEventRow)
            .join(Conversation, Conversation.id == SlaEventRow.conversation_id)
            .where(
                SlaEventRow.clock == FIRST_RESPONSE,
                SlaEventRow.kind == FULFILLED,
                SlaEventRow.at >= since,
                SlaEventRow.at < until,
            )
        )
        if not everything:
            stmt = stmt.where(Conversation.team.is_(None) if team is None else Conversation.team == team)
        async with self._sessions() as session:
            total, met = (await session.execute(stmt)).one()
        return Attainment(met=int(met or 0), total=int(total or 0))

    # ---- helpers

    async def _extras(
        self, session: Any, rows: Sequence[tuple[Conversation, Customer]]
    ) -> tuple[dict[int, list[str]], dict[int, SlaDue], dict[int, str]]:
        customer_ids = sorted({c.customer_id for c, _ in rows})
        conversation_ids = sorted({c.id for c, _ in rows})
        assignee_ids = sorted({c.assignee_id for c, _ in rows if c.assignee_id is not None})
        tags: dict[int, list[str]] = {}
        dues: dict[int, SlaDue] = {}
        names: dict[int, str] = {}
        if customer_ids:
            tag_rows = await session.execute(
                select(CustomerTag.customer_id, CustomerTag.tag)
                .where(CustomerTag.customer_id.in_(customer_ids))
                .distinct()
                .order_by(CustomerTag.customer_id, CustomerTag.tag)
            )
            for customer_id, tag in tag_rows.all():
                tags.setdefault(int(customer_id), []).append(str(tag))
        if conversation_ids:
            clocks = (
                await session.scalars(
                    select(SlaClockRow).where(
                        SlaClockRow.conversation_id.in_(conversation_ids), SlaClockRow.status == RUNNING
                    )
                )
            ).all()
            for clock in clocks:
                due = _ladder_due(clock.ladder, clock.next_deadline)
                if due is None:
                    continue
                current = dues.get(clock.conversation_id)
                if current is None or due < current.due_at:
                    dues[clock.conversation_id] = SlaDue(clock.kind, due, clock.started_at, clock.target_seconds)
        if assignee_ids:
            staff = await session.execute(
                select(StaffUser.id, StaffUser.display_name).where(StaffUser.id.in_(assignee_ids))
            )
            names = {int(i): str(n) for i, n in staff.all()}
        return tags, dues, names

    @staticmethod
    def _row(
        conversation: Conversation,
        customer: Customer,
        extras: tuple[dict[int, list[str]], dict[int, SlaDue], dict[int, str]],
    ) -> InboxRow:
        tags, dues, names = extras
        return InboxRow(
            id=conversation.id,
            channel=conversation.channel,
            status=ConversationStatus(conversation.status),
            team=conversation.team,
            priority=conversation.priority,
            handoff_reason=conversation.handoff_reason,
            customer_id=customer.id,
            customer_name=customer.name,
            customer_external_id=customer.external_id,
            tags=tuple(tags.get(customer.id, ())),
            assignee_id=conversation.assignee_id,
            assignee_name=names.get(conversation.assignee_id) if conversation.assignee_id is not None else None,
            queued_at=conversation.queued_at,
            assigned_at=conversation.assigned_at,
            handoff_at=conversation.handoff_at,
            opened_at=conversation.opened_at,
            last_inbound_at=conversation.last_inbound_at,
            sla=dues.get(conversation.id),
            version=conversation.version,
        )


def _login(row: StaffUser) -> LoginRecord:
    return LoginRecord(
        id=row.id,
        username=row.username,
        display_name=row.display_name,
        role=StaffRole(row.role),
        team=row.team,
        active=row.active,
        password_hash=row.password_hash,
    )
