"""All SQL of the bot: inbound messages, conversations, customers, the reply outbox and kf cursors.

Every method opens its own short transaction, so callers never hold a session across network calls.
Customer message text is stored (it is the product) but must never be logged; nothing here logs it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Result,
    String,
    Table,
    bindparam,
    case,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from bot.storage.models import (
    AnswerStatus,
    Conversation,
    ConversationStatus,
    Customer,
    Direction,
    KfCursor,
    Message,
    MessageStatus,
    Outbox,
    OutboxStatus,
    ScriptAnswer,
    UTCDateTime,
)
from handlers.domain import Channel, Clock, InboundMessage, KfOrigin, OutboundMessage, SystemClock

if TYPE_CHECKING:
    from bot.storage.staff_repository import AuditRepository, ScriptRevisionRepository, StaffRepository
    from bot.storage.tags_repository import TagRepository

MAX_ERROR_CHARS = 2000
_ACTIVE_CONVERSATION = text("status <> 'resolved'")  # must match the uq_conversations_active predicate
_TERMINAL_STATUSES = frozenset({MessageStatus.HANDLED, MessageStatus.UNKNOWN, MessageStatus.FAILED})


@dataclass(frozen=True, slots=True)
class InboundRecord:
    """The stored row of an inbound message; created is False when it was already there."""

    id: int
    status: MessageStatus
    created: bool
    customer_id: int | None
    conversation_id: int | None

    @property
    def handled(self) -> bool:
        return self.status is MessageStatus.HANDLED


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One reserved reply; send what is stored here, not a freshly computed reply."""

    id: int
    inbound_message_id: int
    seq: int
    channel: Channel
    recipient: str
    account_id: str
    msgtype: str
    payload: Mapping[str, Any]
    welcome_code: str | None
    idempotency_key: str
    status: OutboxStatus
    attempts: int
    last_error: str | None
    provider_msgid: str | None
    created_at: datetime
    sent_at: datetime | None
    created: bool = False

    @property
    def sent(self) -> bool:
        return self.status is OutboxStatus.SENT

    def to_outbound(self) -> OutboundMessage:
        """The reply as the domain value the WeCom client sends."""
        return OutboundMessage(
            channel=self.channel,
            to=self.recipient,
            account_id=self.account_id,
            msgtype=self.msgtype,
            content=dict(self.payload),
            welcome_code=self.welcome_code,
        )


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """A stored message, in or out. text is customer content: show it, never log it."""

    id: int
    channel: Channel
    wecom_msgid: str
    direction: Direction
    customer_id: int | None
    conversation_id: int | None
    account_id: str
    msgtype: str
    text: str | None
    payload: Mapping[str, Any]
    origin: int | None
    status: MessageStatus
    handler: str | None
    created_at: datetime
    received_at: datetime
    handled_at: datetime | None


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    id: int
    channel: Channel
    account_id: str
    customer_id: int
    status: ConversationStatus
    kf_service_state: int | None
    opened_at: datetime
    updated_at: datetime
    last_inbound_at: datetime | None


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    id: int
    channel: Channel
    external_id: str
    name: str | None
    corp_tag_ids: tuple[str, ...]
    first_seen_at: datetime
    last_seen_at: datetime


def _insert(session: AsyncSession, model: type[Any]) -> postgresql.Insert | sqlite.Insert:
    # Both dialects spell upserts the same way (ON CONFLICT ...), but through different Insert classes.
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


def _later(new: ColumnElement[Any], old: ColumnElement[Any] | InstrumentedAttribute[Any]) -> ColumnElement[Any]:
    """SQL for the later of two nullable timestamps (NULL loses)."""
    return case((new.is_(None), old), (old.is_(None), new), (new > old, new), else_=old)


def _earlier(new: ColumnElement[Any], old: ColumnElement[Any] | InstrumentedAttribute[Any]) -> ColumnElement[Any]:
    return case((new < old, new), else_=old)


def _rowcount(result: Result[Any]) -> int:
    # UPDATE results are CursorResults at runtime; the session's execute() is typed for SELECTs.
    return cast(CursorResult[Any], result).rowcount


def _plain(value: Any) -> Any:
    """Mappings and sequences from parsers as plain dicts and lists, so they serialise as JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _outbound_text(content: Mapping[str, Any]) -> str | None:
    # The human-readable part of a reply body, for the conversation history.
    for key in ("content", "head_content", "title"):
        value = content.get(key)
        if isinstance(value, str):
            return value
    return None


def _message_record(row: Message) -> MessageRecord:
    return MessageRecord(
        id=row.id,
        channel=Channel(row.channel),
        wecom_msgid=row.wecom_msgid,
        direction=Direction(row.direction),
        customer_id=row.customer_id,
        conversation_id=row.conversation_id,
        account_id=row.account_id,
        msgtype=row.msgtype,
        text=row.text,
        payload=row.payload,
        origin=row.origin,
        status=MessageStatus(row.status),
        handler=row.handler,
        created_at=row.created_at,
        received_at=row.received_at,
        handled_at=row.handled_at,
    )


def _outbox_record(row: Outbox, *, created: bool = False) -> OutboxRecord:
    return OutboxRecord(
        id=row.id,
        inbound_message_id=row.inbound_message_id,
        seq=row.seq,
        channel=Channel(row.channel),
        recipient=row.recipient,
        account_id=row.account_id,
        msgtype=row.msgtype,
        payload=row.payload,
        welcome_code=row.welcome_code,
        idempotency_key=row.idempotency_key,
        status=OutboxStatus(row.status),
        attempts=row.attempts,
        last_error=row.last_error,
        provider_msgid=row.provider_msgid,
        created_at=row.created_at,
        sent_at=row.sent_at,
        created=created,
    )


def _conversation_record(row: Conversation) -> ConversationRecord:
    return ConversationRecord(
        id=row.id,
        channel=Channel(row.channel),
        account_id=row.account_id,
        customer_id=row.customer_id,
        status=ConversationStatus(row.status),
        kf_service_state=row.kf_service_state,
        opened_at=row.opened_at,
        updated_at=row.updated_at,
        last_inbound_at=row.last_inbound_at,
    )


def _customer_record(row: Customer) -> CustomerRecord:
    return CustomerRecord(
        id=row.id,
        channel=Channel(row.channel),
        external_id=row.external_id,
        name=row.name,
        corp_tag_ids=tuple(row.corp_tag_ids or ()),
        first_seen_at=row.first_seen_at,
        last_seen_at=row.last_seen_at,
    )


class _Repository:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock | None = None) -> None:
        self._sessions = sessions
        self._clock = clock or SystemClock()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), UTC)


def insert_for(dialect: str) -> Any:
    """The dialect's insert(), whose statements spell upserts (ON CONFLICT ...) the same way on both backends."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def binds(*columns: str, prefix: str = "") -> dict[str, Any]:
    """`column=bindparam(prefix + column)` for each column: the values of a statement built once, bound per call."""
    return {column: bindparam(prefix + column) for column in columns}


def table(model: type[Any]) -> Table:
    """The Core table of a mapped class: statements on it skip the ORM's per-execution layers."""
    return cast(Table, model.__table__)


_ANSWERS = table(ScriptAnswer).c
_LAST_SENT = (
    select(_ANSWERS.script_id, func.max(_ANSWERS.answered_at))
    .where(_ANSWERS.customer_id == bindparam("b_customer_id"), _ANSWERS.status == AnswerStatus.SENT.value)
    .group_by(_ANSWERS.script_id)
)
_MESSAGES = table(Message).c
_SET_MESSAGE_STATUS = (
    update(table(Message))
    .where(_MESSAGES.id == bindparam("b_message_id"))
    .values(
        status=bindparam("b_status"),
        handled_at=bindparam("b_handled_at", type_=UTCDateTime()),
        handler=func.coalesce(bindparam("b_handler", type_=String), _MESSAGES.handler),  # None keeps the name
    )
)


@dataclass(frozen=True, slots=True)
class _InboundSql:
    """record_inbound's statements, built once per dialect with bind parameters.

    Every message runs them. Built per call they cost more CPU than the database spends on them: construction,
    then a walk of the whole statement for its cache key. A statement object reused keeps its cache key, and
    Core tables skip the ORM's bulk-insert layer.
    """

    find: Any
    customer_seen: Any  # the customer wrote: last_seen_at may move
    customer_created: Any  # a servicer line or an event: the customer exists, but was not seen
    conversation: Any
    message: Any


@functools.cache
def _inbound_sql(dialect: str) -> _InboundSql:
    insert = insert_for(dialect)
    messages, customers, conversations = table(Message).c, table(Customer).c, table(Conversation).c
    find = select(messages.id, messages.status, messages.customer_id, messages.conversation_id).where(
        messages.channel == bindparam("channel"), messages.wecom_msgid == bindparam("msgid")
    )
    customer = insert(table(Customer)).values(
        channel=bindparam("channel"),
        external_id=bindparam("external_id"),
        corp_tag_ids=[],
        first_seen_at=bindparam("seen_at"),
        last_seen_at=bindparam("seen_at"),
    )
    first_seen = _earlier(customer.excluded.first_seen_at, customers.first_seen_at)

    def customer_upsert(last_seen: ColumnElement[Any]) -> Any:
        return customer.on_conflict_do_update(
            index_elements=[customers.channel, customers.external_id],
            set_={"first_seen_at": first_seen, "last_seen_at": last_seen},
        ).returning(customers.id)

    conversation = insert(table(Conversation)).values(
        **binds("channel", "account_id", "customer_id"),
        status=ConversationStatus.BOT.value,
        opened_at=bindparam("now"),
        updated_at=bindparam("now"),
        last_inbound_at=bindparam("inbound_at"),
    )
    message = insert(table(Message)).values(
        **binds("channel", "customer_id", "conversation_id", "account_id", "msgtype", "text", "payload", "origin"),
        wecom_msgid=bindparam("msgid"),
        direction=Direction.IN.value,
        status=MessageStatus.RECEIVED.value,
        created_at=bindparam("created_at"),
        received_at=bindparam("now"),
    )
    return _InboundSql(
        find=find,
        customer_seen=customer_upsert(_later(customer.excluded.last_seen_at, customers.last_seen_at)),
        customer_created=customer_upsert(customers.last_seen_at),
        conversation=conversation.on_conflict_do_update(
            index_elements=[conversations.channel, conversations.account_id, conversations.customer_id],
            index_where=_ACTIVE_CONVERSATION,
            set_={
                "updated_at": conversation.excluded.updated_at,
                "last_inbound_at": _later(conversation.excluded.last_inbound_at, conversations.last_inbound_at),
            },
        ).returning(conversations.id),
        message=message.on_conflict_do_nothing(index_elements=[messages.channel, messages.wecom_msgid]).returning(
            messages.id
        ),
    )


async def _active_conversation_id(session: AsyncSession, channel: str, account_id: str, customer_id: int) -> int | None:
    stmt = select(Conversation.id).where(
        Conversation.channel == channel,
        Conversation.account_id == account_id,
        Conversation.customer_id == customer_id,
        Conversation.status != ConversationStatus.RESOLVED.value,
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def _insert_outbound(
    session: AsyncSession,
    *,
    channel: str,
    key: str,
    account_id: str,
    msgtype: str,
    content: Mapping[str, Any],
    customer_id: int | None,
    conversation_id: int | None,
    sent_at: datetime,
) -> int:
    stmt = (
        _insert(session, Message)
        .values(
            channel=channel,
            wecom_msgid=key,
            direction=Direction.OUT.value,
            customer_id=customer_id,
            conversation_id=conversation_id,
            account_id=account_id,
            msgtype=msgtype,
            text=_outbound_text(content),
            payload=_plain(content),
            origin=None,
            status=MessageStatus.HANDLED.value,
            created_at=sent_at,
            received_at=sent_at,
            handled_at=sent_at,
        )
        .on_conflict_do_nothing(index_elements=[Message.channel, Message.wecom_msgid])
        .returning(Message.id)
    )
    new_id = (await session.execute(stmt)).scalar_one_or_none()
    if new_id is not None:
        if conversation_id is not None:
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(updated_at=sent_at)
            )
        return int(new_id)
    existing = select(Message.id).where(Message.channel == channel, Message.wecom_msgid == key)
    return int((await session.execute(existing)).scalar_one())


class MessageRepository(_Repository):
    """Inbound and outbound message rows, with the customers and conversations they belong to."""

    async def record_inbound(self, message: InboundMessage) -> InboundRecord:
        """Insert-or-get on (channel, msgid); upsert the customer and get-or-open the conversation."""
        now = self._now()
        channel = message.channel.value
        stamped = datetime.fromtimestamp(message.created_at, UTC) if message.created_at > 0 else now
        customer_authored = message.origin in (None, KfOrigin.CUSTOMER)
        async with self._sessions.begin() as session:
            sql = _inbound_sql(session.get_bind().dialect.name)
            existing = await self._find_inbound(session, channel, message.msgid)
            if existing is not None:
                return existing
            customer_id: int | None = None
            conversation_id: int | None = None
            # Some events (e.g. group-chat changes) have no single sender to attach them to.
            if message.sender_id:
                # A servicer's or system message creates the customer but does not count as the customer being seen.
                upsert = sql.customer_seen if customer_authored else sql.customer_created
                customer_id = int(
                    (
                        await session.execute(
                            upsert, {"channel": channel, "external_id": message.sender_id, "seen_at": stamped}
                        )
                    ).scalar_one()
                )
                # Only what the customer wrote opens WeCom's reply window; events and servicer lines do not.
                inbound_at = stamped if customer_authored and message.msgtype != "event" else None
                conversation_id = int(
                    (
                        await session.execute(
                            sql.conversation,
                            {
                                "channel": channel,
                                "account_id": message.account_id,
                                "customer_id": customer_id,
                                "now": now,
                                "inbound_at": inbound_at,
                            },
                        )
                    ).scalar_one()
                )
            values = {
                "channel": channel,
                "msgid": message.msgid,
                "customer_id": customer_id,
                "conversation_id": conversation_id,
                "account_id": message.account_id,
                "msgtype": message.msgtype,
                "text": message.text,
                "payload": self._inbound_payload(message),
                "origin": message.origin,
                "created_at": stamped,
                "now": now,
            }
            new_id = (await session.execute(sql.message, values)).scalar_one_or_none()
            if new_id is None:
                # Another worker inserted it between our check and our insert (PostgreSQL READ COMMITTED).
                raced = await self._find_inbound(session, channel, message.msgid)
                if raced is None:
                    raise RuntimeError("inbound insert conflicted but no row is visible")
                return raced
            return InboundRecord(
                id=int(new_id),
                status=MessageStatus.RECEIVED,
                created=True,
                customer_id=customer_id,
                conversation_id=conversation_id,
            )

    @staticmethod
    async def _find_inbound(session: AsyncSession, channel: str, msgid: str) -> InboundRecord | None:
        sql = _inbound_sql(session.get_bind().dialect.name)
        row = (await session.execute(sql.find, {"channel": channel, "msgid": msgid})).one_or_none()
        if row is None:
            return None
        return InboundRecord(
            id=row.id,
            status=MessageStatus(row.status),
            created=False,
            customer_id=row.customer_id,
            conversation_id=row.conversation_id,
        )

    @staticmethod
    def _inbound_payload(message: InboundMessage) -> dict[str, Any]:
        fields = {
            "event": message.event,
            "servicer_id": message.servicer_id,
            "menu_id": message.menu_id,
            "welcome_code": message.welcome_code,
            "raw": _plain(message.raw) if message.raw else None,
        }
        return {key: value for key, value in fields.items() if value is not None}

    async def mark_handled(self, message_id: int, handler_name: str | None) -> None:
        """Mark a message handled by the named handler (None: handled without one, e.g. a known no-op)."""
        await self._set_status(message_id, MessageStatus.HANDLED, handler_name)

    async def mark_status(self, message_id: int, status: MessageStatus) -> None:
        """Set a message's processing status; finished statuses also stamp handled_at."""
        await self._set_status(message_id, status, None)

    async def _set_status(self, message_id: int, status: MessageStatus, handler_name: str | None) -> None:
        params = {
            "b_message_id": message_id,
            "b_status": status.value,
            "b_handled_at": self._now() if status in _TERMINAL_STATUSES else None,
            "b_handler": handler_name,
        }
        async with self._sessions.begin() as session:
            result = await session.execute(_SET_MESSAGE_STATUS, params)
            if _rowcount(result) == 0:
                raise LookupError(f"no message with id {message_id}")

    async def record_outbound_message(
        self,
        outbound: OutboundMessage,
        key: str,
        *,
        sent_at: datetime | None = None,
        conversation_id: int | None = None,
    ) -> int:
        """Store a message the bot sent outside the outbox (idempotent on key); returns the row id."""
        channel = outbound.channel.value
        async with self._sessions.begin() as session:
            customer_id = await session.scalar(
                select(Customer.id).where(Customer.channel == channel, Customer.external_id == outbound.to)
            )
            if conversation_id is None and customer_id is not None:
                conversation_id = await _active_conversation_id(session, channel, outbound.account_id, customer_id)
            return await _insert_outbound(
                session,
                channel=channel,
                key=key,
                account_id=outbound.account_id,
                msgtype=outbound.msgtype,
                content=outbound.content,
                customer_id=customer_id,
                conversation_id=conversation_id,
                sent_at=sent_at or self._now(),
            )

    async def get_message(self, message_id: int) -> MessageRecord | None:
        """One message by row id."""
        async with self._sessions() as session:
            row = await session.get(Message, message_id)
            return None if row is None else _message_record(row)

    async def conversation_messages(self, conversation_id: int, *, limit: int = 50) -> list[MessageRecord]:
        """The newest `limit` messages of a conversation, oldest first."""
        stmt = (
            select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id.desc()).limit(limit)
        )
        async with self._sessions() as session:
            rows = (await session.scalars(stmt)).all()
        return [_message_record(row) for row in reversed(rows)]

    async def count_messages(
        self,
        *,
        channel: Channel | None = None,
        direction: Direction | None = None,
        status: MessageStatus | None = None,
        conversation_id: int | None = None,
        wecom_msgid: str | None = None,
    ) -> int:
        """How many message rows match every given filter."""
        stmt = select(func.count()).select_from(Message)
        if channel is not None:
            stmt = stmt.where(Message.channel == channel.value)
        if direction is not None:
            stmt = stmt.where(Message.direction == direction.value)
        if status is not None:
            stmt = stmt.where(Message.status == status.value)
        if conversation_id is not None:
            stmt = stmt.where(Message.conversation_id == conversation_id)
        if wecom_msgid is not None:
            stmt = stmt.where(Message.wecom_msgid == wecom_msgid)
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())


class OutboxRepository(_Repository):
    """Replies reserved before sending, so a retried message never sends a reply twice."""

    async def reserve_reply(
        self, inbound_message_id: int, seq: int, outbound: OutboundMessage, idempotency_key: str
    ) -> OutboxRecord:
        """Insert-or-get the reply (inbound_message_id, seq); an existing row wins over the given one."""
        now = self._now()
        async with self._sessions.begin() as session:
            stmt = (
                _insert(session, Outbox)
                .values(
                    inbound_message_id=inbound_message_id,
                    seq=seq,
                    channel=outbound.channel.value,
                    recipient=outbound.to,
                    account_id=outbound.account_id,
                    msgtype=outbound.msgtype,
                    payload=_plain(outbound.content),
                    welcome_code=outbound.welcome_code,
                    idempotency_key=idempotency_key,
                    status=OutboxStatus.PENDING.value,
                    attempts=0,
                    created_at=now,
                )
                # No conflict target: a concurrent duplicate also collides on the idempotency_key index, and
                # PostgreSQL only resolves conflicts on arbiter indexes quietly. A key reused for a different
                # (inbound, seq) is then caught below, because the (inbound, seq) row does not exist.
                .on_conflict_do_nothing()
                .returning(Outbox.id)
            )
            new_id = (await session.execute(stmt)).scalar_one_or_none()
            row = (
                await session.scalars(
                    select(Outbox).where(Outbox.inbound_message_id == inbound_message_id, Outbox.seq == seq)
                )
            ).one_or_none()
            if row is None:
                raise ValueError(f"idempotency key {idempotency_key!r} already used by another reply")
            return _outbox_record(row, created=new_id is not None)

    async def mark_sent(self, outbox_id: int, provider_msgid: str | None) -> None:
        """Mark a reply sent and store it as an outgoing message in its conversation (both idempotent)."""
        now = self._now()
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Outbox)
                .where(Outbox.id == outbox_id)
                .values(
                    status=OutboxStatus.SENT.value,
                    provider_msgid=func.coalesce(provider_msgid, Outbox.provider_msgid),
                    sent_at=func.coalesce(Outbox.sent_at, literal(now, UTCDateTime())),
                    attempts=Outbox.attempts + 1,
                )
            )
            if _rowcount(result) == 0:
                raise LookupError(f"no outbox row with id {outbox_id}")
            row = (
                await session.execute(
                    select(Outbox, Message.customer_id, Message.conversation_id)
                    .join(Message, Message.id == Outbox.inbound_message_id)
                    .where(Outbox.id == outbox_id)
                )
            ).one()
            reply: Outbox = row[0]
            await _insert_outbound(
                session,
                channel=reply.channel,
                key=reply.idempotency_key,
                account_id=reply.account_id,
                msgtype=reply.msgtype,
                content=reply.payload,
                customer_id=row.customer_id,
                conversation_id=row.conversation_id,
                sent_at=reply.sent_at or now,
            )

    async def mark_failed(self, outbox_id: int, error: str) -> None:
        """Record a failed send attempt (the row stays retryable; attempts counts every try)."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Outbox)
                .where(Outbox.id == outbox_id, Outbox.status != OutboxStatus.SENT.value)
                .values(
                    status=OutboxStatus.FAILED.value,
                    attempts=Outbox.attempts + 1,
                    last_error=error[:MAX_ERROR_CHARS],
                )
            )
            if _rowcount(result) == 0:
                exists = await session.scalar(select(Outbox.id).where(Outbox.id == outbox_id))
                if exists is None:
                    raise LookupError(f"no outbox row with id {outbox_id}")

    async def replies_for(self, inbound_message_id: int) -> list[OutboxRecord]:
        """Every reply reserved for an inbound message, in send order."""
        stmt = select(Outbox).where(Outbox.inbound_message_id == inbound_message_id).order_by(Outbox.seq)
        async with self._sessions() as session:
            return [_outbox_record(row) for row in (await session.scalars(stmt)).all()]

    async def count_outbox(self, *, status: OutboxStatus | None = None) -> int:
        """How many outbox rows there are, optionally with one status."""
        stmt = select(func.count()).select_from(Outbox)
        if status is not None:
            stmt = stmt.where(Outbox.status == status.value)
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())


class ConversationRepository(_Repository):
    """Conversations and customers, for handoff logic and a console."""

    async def get_conversation(self, conversation_id: int) -> ConversationRecord | None:
        """One conversation by id."""
        async with self._sessions() as session:
            row = await session.get(Conversation, conversation_id)
            return None if row is None else _conversation_record(row)

    async def active_conversation(
        self, channel: Channel, account_id: str, customer_id: int
    ) -> ConversationRecord | None:
        """The customer's not-yet-resolved conversation with an account, if any."""
        stmt = select(Conversation).where(
            Conversation.channel == channel.value,
            Conversation.account_id == account_id,
            Conversation.customer_id == customer_id,
            Conversation.status != ConversationStatus.RESOLVED.value,
        )
        async with self._sessions() as session:
            row = (await session.scalars(stmt)).one_or_none()
            return None if row is None else _conversation_record(row)

    async def set_conversation_status(
        self, conversation_id: int, status: ConversationStatus, *, kf_service_state: int | None = None
    ) -> None:
        """Move a conversation to a status (resolved frees the customer to open a new one)."""
        values: dict[str, Any] = {"status": status.value, "updated_at": self._now()}
        if kf_service_state is not None:
            values["kf_service_state"] = kf_service_state
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(**values)
            )
            if _rowcount(result) == 0:
                raise LookupError(f"no conversation with id {conversation_id}")

    async def get_customer(self, channel: Channel, external_id: str) -> CustomerRecord | None:
        """A customer by channel and WeCom id (external_userid or member userid)."""
        stmt = select(Customer).where(Customer.channel == channel.value, Customer.external_id == external_id)
        async with self._sessions() as session:
            row = (await session.scalars(stmt)).one_or_none()
            return None if row is None else _customer_record(row)

    async def update_customer(
        self, customer_id: int, *, name: str | None = None, corp_tag_ids: Sequence[str] | None = None
    ) -> None:
        """Set a customer's name and/or corp tag ids (None leaves a field as it is)."""
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name
        if corp_tag_ids is not None:
            values["corp_tag_ids"] = list(corp_tag_ids)
        if not values:
            return
        async with self._sessions.begin() as session:
            result = await session.execute(update(Customer).where(Customer.id == customer_id).values(**values))
            if _rowcount(result) == 0:
                raise LookupError(f"no customer with id {customer_id}")


class KfCursorRepository(_Repository):
    """The sync_msg cursor of each kf account, persisted after every page."""

    async def get_cursor(self, open_kfid: str) -> str | None:
        """The saved next_cursor for an account, or None to start from WeCom's earliest."""
        async with self._sessions() as session:
            return await session.scalar(select(KfCursor.cursor).where(KfCursor.open_kfid == open_kfid))

    async def save_cursor(self, open_kfid: str, cursor: str) -> None:
        """Insert or replace the account's cursor."""
        async with self._sessions.begin() as session:
            stmt = _insert(session, KfCursor).values(open_kfid=open_kfid, cursor=cursor, updated_at=self._now())
            upsert = stmt.on_conflict_do_update(
                index_elements=[KfCursor.open_kfid],
                set_={"cursor": stmt.excluded.cursor, "updated_at": stmt.excluded.updated_at},
            )
            await session.execute(upsert)


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    """One scripted answer: which script and variant answered which message, for whom, with which tags."""

    id: int
    inbound_message_id: int
    customer_id: int | None
    channel: Channel
    script_id: str
    variant: str
    assignment: str
    tags: frozenset[str]
    status: AnswerStatus
    replies: int
    answered_at: datetime


def _answer_record(row: ScriptAnswer) -> AnswerRecord:
    return AnswerRecord(
        id=row.id,
        inbound_message_id=row.inbound_message_id,
        customer_id=row.customer_id,
        channel=Channel(row.channel),
        script_id=row.script_id,
        variant=row.variant,
        assignment=row.assignment,
        tags=frozenset(row.tags or ()),
        status=AnswerStatus(row.status),
        replies=row.replies,
        answered_at=row.answered_at,
    )


class AnswerRepository(_Repository):
    """Scripted answers: the analytics record, and the "when did this script last reach this customer" lookup."""

    async def record_answer(
        self,
        *,
        inbound_message_id: int,
        customer_id: int | None,
        channel: Channel,
        script_id: str,
        variant: str,
        assignment: str,
        tags: frozenset[str],
        status: AnswerStatus,
        replies: int,
    ) -> None:
        """Insert the answer to a message, or update its outcome when a retried run records it again."""
        now = self._now()
        async with self._sessions.begin() as session:
            stmt = _insert(session, ScriptAnswer).values(
                inbound_message_id=inbound_message_id,
                customer_id=customer_id,
                channel=channel.value,
                script_id=script_id,
                variant=variant,
                assignment=assignment,
                tags=sorted(tags),
                status=status.value,
                replies=replies,
                answered_at=now,
            )
            # The first recording keeps its variant, tags and time (what the customer got); only the outcome
            # of the sends may move on a retry.
            await session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[ScriptAnswer.inbound_message_id, ScriptAnswer.script_id],
                    set_={"status": stmt.excluded.status, "replies": stmt.excluded.replies},
                )
            )

    async def last_sent_times(self, customer_id: int) -> dict[str, float]:
        """When each script was last sent to a customer (unix seconds), for cooldowns."""
        async with self._sessions() as session:
            rows = (await session.execute(_LAST_SENT, {"b_customer_id": customer_id})).all()
        return {script_id: _as_utc(at).timestamp() for script_id, at in rows if at is not None}

    async def answers_for_customer(self, customer_id: int) -> list[AnswerRecord]:
        """Every answer a customer got, oldest first."""
        stmt = select(ScriptAnswer).where(ScriptAnswer.customer_id == customer_id).order_by(ScriptAnswer.id)
        async with self._sessions() as session:
            return [_answer_record(row) for row in (await session.scalars(stmt)).all()]

    async def answers_for(self, inbound_message_id: int) -> list[AnswerRecord]:
        """The answer(s) recorded for one inbound message."""
        stmt = (
            select(ScriptAnswer).where(ScriptAnswer.inbound_message_id == inbound_message_id).order_by(ScriptAnswer.id)
        )
        async with self._sessions() as session:
            return [_answer_record(row) for row in (await session.scalars(stmt)).all()]


def _as_utc(value: datetime) -> datetime:
    # func.max() skips the column type, so SQLite hands back a naive (UTC) datetime or even a string.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True, slots=True)
class Repositories:
    """Every repository over one session factory, for wiring."""

    messages: MessageRepository
    outbox: OutboxRepository
    conversations: ConversationRepository
    cursors: KfCursorRepository
    answers: AnswerRepository
    tags: TagRepository
    staff: StaffRepository
    audit: AuditRepository
    script_revisions: ScriptRevisionRepository

    @classmethod
    def create(cls, sessions: async_sessionmaker[AsyncSession], clock: Clock | None = None) -> Repositories:
        """Build all repositories sharing a session factory and clock."""
        # tags_repository builds on this module's helpers, so it is imported here, not at the top.
        from bot.storage.staff_repository import AuditRepository, ScriptRevisionRepository, StaffRepository
        from bot.storage.tags_repository import TagRepository

        return cls(
            messages=MessageRepository(sessions, clock),
            outbox=OutboxRepository(sessions, clock),
            conversations=ConversationRepository(sessions, clock),
            cursors=KfCursorRepository(sessions, clock),
            answers=AnswerRepository(sessions, clock),
            tags=TagRepository(sessions, clock),
            staff=StaffRepository(sessions, clock),
            audit=AuditRepository(sessions, clock),
            script_revisions=ScriptRevisionRepository(sessions, clock),
        )
