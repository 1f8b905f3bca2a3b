"""SQLAlchemy 2 typed declarative models: customers, conversations, messages, outbox, kf cursors, orders, tags,
scripted answers, staff accounts, API tokens, the audit log and run-time script revisions."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class MessageStatus(StrEnum):
    RECEIVED = "received"
    HANDLED = "handled"
    UNKNOWN = "unknown"  # no handler applied
    FAILED = "failed"


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class AnswerStatus(StrEnum):
    SENT = "sent"  # at least one of its replies reached WeCom
    FAILED = "failed"  # every reply was refused or failed
    SUPPRESSED = "suppressed"  # not sent: the kf session is in the pool, with a human, or ended (states 2-4)


class ConversationStatus(StrEnum):
    BOT = "bot"
    QUEUED = "queued"
    OPEN = "open"
    WAITING = "waiting"
    RESOLVED = "resolved"


ACTIVE_CONVERSATION_STATUSES = frozenset(ConversationStatus) - {ConversationStatus.RESOLVED}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite drops the zone, so it is re-attached on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL for indexing/operators later; plain JSON text elsewhere.
Json = JSON().with_variant(JSONB(), "postgresql")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = (UniqueConstraint("channel", "external_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(128))  # external_userid or member userid
    name: Mapped[str | None] = mapped_column(String(255))
    corp_tag_ids: Mapped[list[str]] = mapped_column(Json, default=list)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_agent_id: Mapped[int | None] = mapped_column(BigId)  # a returning customer prefers this agent


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        # At most one active conversation per customer and account; also what makes get-or-open race-safe.
        Index(
            "uq_conversations_active",
            "channel",
            "account_id",
            "customer_id",
            unique=True,
            sqlite_where=text("status <> 'resolved'"),
            postgresql_where=text("status <> 'resolved'"),
        ),
        Index(None, "customer_id"),
        Index(None, "status", "team"),
        Index(None, "assignee_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    account_id: Mapped[str] = mapped_column(String(128))  # open_kfid or agent id
    customer_id: Mapped[int] = mapped_column(BigId, ForeignKey("customers.id"))
    status: Mapped[str] = mapped_column(
        String(16), default=ConversationStatus.BOT.value, server_default=ConversationStatus.BOT.value
    )
    kf_service_state: Mapped[int | None] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_inbound_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Handoff (support-desk vocabulary): who has it, why a person was asked for, and when each step happened.
    assignee_id: Mapped[int | None] = mapped_column(BigId)  # staff_users.id (no FK: SQLite cannot add one later)
    team: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16), default="normal", server_default="normal")
    handoff_reason: Mapped[str | None] = mapped_column(String(32))
    handoff_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    no_match_streak: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # optimistic lock for claims


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("channel", "wecom_msgid"),
        Index(None, "conversation_id", "id"),
        Index(None, "customer_id"),
        Index(None, "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    wecom_msgid: Mapped[str] = mapped_column(String(255))
    direction: Mapped[str] = mapped_column(String(3))
    customer_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("customers.id"))
    conversation_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("conversations.id"))
    account_id: Mapped[str] = mapped_column(String(128))
    msgtype: Mapped[str] = mapped_column(String(32))
    text: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    origin: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(
        String(16), default=MessageStatus.RECEIVED.value, server_default=MessageStatus.RECEIVED.value
    )
    handler: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)  # as WeCom stamped it
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Outbox(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("inbound_message_id", "seq"),
        UniqueConstraint("idempotency_key"),
        Index(None, "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    inbound_message_id: Mapped[int] = mapped_column(BigId, ForeignKey("messages.id"))
    seq: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(String(128))
    account_id: Mapped[str] = mapped_column(String(128))
    msgtype: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    welcome_code: Mapped[str | None] = mapped_column(String(255))
    idempotency_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(
        String(16), default=OutboxStatus.PENDING.value, server_default=OutboxStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_msgid: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class KfCursor(Base):
    __tablename__ = "kf_cursors"

    open_kfid: Mapped[str] = mapped_column(String(128), primary_key=True)
    cursor: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Order(Base):
    """A paid order, imported from a CSV or an API; unique per (source, external_order_id)."""

    __tablename__ = "orders"
    __table_args__ = (
        UniqueConstraint("source", "external_order_id"),
        CheckConstraint("amount_cents >= 0", name="amount_not_negative"),
        Index(None, "customer_id", "paid_at"),
        Index(None, "imported_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    customer_id: Mapped[int] = mapped_column(BigId, ForeignKey("customers.id"))
    source: Mapped[str] = mapped_column(String(32))
    external_order_id: Mapped[str] = mapped_column(String(128))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    paid_at: Mapped[datetime] = mapped_column(UTCDateTime)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CustomerTag(Base):
    """One tag on one customer from one source (wecom, computed, bot); set_at is when it was last written."""

    __tablename__ = "customer_tags"
    __table_args__ = (
        CheckConstraint("source IN ('wecom', 'computed', 'bot')", name="source"),
        Index(None, "tag"),
    )

    customer_id: Mapped[int] = mapped_column(BigId, ForeignKey("customers.id"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    set_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ScriptAnswer(Base):
    """One scripted answer to one inbound message: the analytics record, and what cooldowns read."""

    __tablename__ = "answers"
    __table_args__ = (
        UniqueConstraint("inbound_message_id", "script_id"),
        Index(None, "customer_id", "script_id", "answered_at"),
        Index(None, "script_id", "variant"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    inbound_message_id: Mapped[int] = mapped_column(BigId, ForeignKey("messages.id"))
    customer_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("customers.id"))
    channel: Mapped[str] = mapped_column(String(16))
    script_id: Mapped[str] = mapped_column(String(128))
    variant: Mapped[str] = mapped_column(String(128))
    assignment: Mapped[str] = mapped_column(String(16))  # tag, default, ab, tag+ab
    tags: Mapped[list[str]] = mapped_column(Json, default=list)  # the customer's tags when answered
    status: Mapped[str] = mapped_column(String(16))
    replies: Mapped[int] = mapped_column(Integer)
    answered_at: Mapped[datetime] = mapped_column(UTCDateTime)


class StaffRole(StrEnum):
    """What a staff account may do; the permissions per role are in bot/auth.py."""

    ADMIN = "admin"
    LEAD = "lead"  # team lead: supervises agents, edits scripts
    AGENT = "agent"
    COMMUNITY = "community"  # community manager: scheduled posts


class StaffUser(Base):
    """A person who uses the console or the admin API (agents, leads, admins, community managers)."""

    __tablename__ = "staff_users"
    __table_args__ = (
        UniqueConstraint("username"),
        CheckConstraint("role IN ('admin', 'lead', 'agent', 'community')", name="role"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    team: Mapped[str | None] = mapped_column(String(64))
    wecom_userid: Mapped[str | None] = mapped_column(String(64))  # the member's UserID, for kf servicers
    password_hash: Mapped[str | None] = mapped_column(String(255))  # None: API tokens only, no console login
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Agent profile (handoff routing): skills, how many open conversations at once, and presence.
    skills: Mapped[list[str]] = mapped_column(Json, default=list, server_default="[]")
    capacity: Mapped[int] = mapped_column(Integer, default=5, server_default="5")
    presence: Mapped[str] = mapped_column(String(16), default="offline", server_default="offline")  # online/away
    presence_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    """A bearer token for the admin API; only its sha256 is stored, the token itself is shown once."""

    __tablename__ = "api_tokens"
    __table_args__ = (UniqueConstraint("token_hash"), Index(None, "user_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("staff_users.id"))
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEntry(Base):
    """Who did what through the console or the API, when; never customer message text or secrets."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "at"), Index(None, "target"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    detail: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)


class ScriptRevisionAction(StrEnum):
    EDIT = "edit"  # body replaces (or adds) the script with this id
    DELETE = "delete"  # the script is removed from the library in use
    RESTORE = "restore"  # the run-time override ends: the YAML files' version (if any) applies again


class ScriptRevision(Base):
    """One run-time edit of one script, versioned; the latest revision per script id is what applies."""

    __tablename__ = "script_revisions"
    __table_args__ = (
        UniqueConstraint("script_id", "version"),
        CheckConstraint("action IN ('edit', 'delete', 'restore')", name="action"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    script_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))
    body: Mapped[str | None] = mapped_column(Text)  # the script as YAML (one mapping), for edits
    author: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SlaClockRow(Base):
    """One SLA clock of one conversation (handlers/sla.py SlaClock); times are epoch seconds, as there."""

    __tablename__ = "sla_clocks"
    __table_args__ = (
        UniqueConstraint("conversation_id", "kind", "cycle"),
        Index(None, "status", "next_deadline"),  # the sweep: running clocks whose next deadline has passed
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(BigId, ForeignKey("conversations.id"))
    kind: Mapped[str] = mapped_column(String(32))
    cycle: Mapped[int] = mapped_column(Integer)
    policy_id: Mapped[str] = mapped_column(String(64))
    target_seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float)
    ladder: Mapped[list[Any]] = mapped_column(Json, default=list)  # [[event kind, level, at], ...]
    reached: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    next_deadline: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)


class SlaEventRow(Base):
    """One SLA event (applied, warned, breached, escalated, fulfilled, stopped), written exactly once."""

    __tablename__ = "sla_events"
    __table_args__ = (
        UniqueConstraint("conversation_id", "clock", "cycle", "kind", "level"),
        Index(None, "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(BigId, ForeignKey("conversations.id"))
    clock: Mapped[str] = mapped_column(String(32))
    cycle: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    level: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    due_at: Mapped[float] = mapped_column(Float)
    met: Mapped[bool | None] = mapped_column(Boolean)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CsatSurvey(Base):
    """The satisfaction survey of one resolved conversation: asked once, answered at most once (1-5)."""

    __tablename__ = "csat_surveys"
    __table_args__ = (UniqueConstraint("conversation_id"), CheckConstraint("score BETWEEN 1 AND 5", name="score"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(BigId, ForeignKey("conversations.id"))
    agent_id: Mapped[int | None] = mapped_column(BigId)
    asked_at: Mapped[datetime] = mapped_column(UTCDateTime)
    score: Mapped[int | None] = mapped_column(Integer)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# ---- scheduled community content (issue 5): posts, their targets, one delivery row per slot ----------------


class PostKind(StrEnum):
    TEXT = "text"
    MARKDOWN = "markdown"
    IMAGE = "image"
    LINK = "link"
    FILE = "file"
    NEWS = "news"


class PostStatus(StrEnum):
    ACTIVE = "active"
    CANCELLED = "cancelled"


class RuleKind(StrEnum):
    AT = "at"  # one-off at an instant
    CRON = "cron"  # recurring: a crontab line in a time zone
    SOP = "sop"  # a step of an SOP touch plan, relative to an event (offset from the anchor)


class TargetKind(StrEnum):
    ROBOT = "robot"  # an internal group through its robot webhook (ref: the robot's name)
    GROUP_CHAT = "group_chat"  # a customer group through add_msg_template (ref: chat_id)
    SEGMENT = "segment"  # 微信客服 customers with any of some tags, inside their 48 h window (ref: tags, comma-joined)
    STAFF = "staff"  # a member through an app message (ref: userid)


class DeliveryState(StrEnum):
    SCHEDULED = "scheduled"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # held back on purpose (audience policy, monthly cap, cancelled), with a reason
    MISSED = "missed"  # its slot passed more than the grace window ago before anything was sent


TERMINAL_DELIVERY_STATES = frozenset(
    {DeliveryState.SENT, DeliveryState.FAILED, DeliveryState.SKIPPED, DeliveryState.MISSED}
)


class MassTaskStatus(StrEnum):
    PENDING = "pending"  # created; the member has not confirmed it in the client yet
    CONFIRMED = "confirmed"
    UNCONFIRMED = "unconfirmed"  # the deadline passed without a confirmation


class Post(Base):
    """One planned piece of content with its rule; its targets and deliveries hang off it."""

    __tablename__ = "posts"
    __table_args__ = (
        CheckConstraint("kind IN ('text', 'markdown', 'image', 'link', 'file', 'news')", name="kind"),
        CheckConstraint("rule_kind IN ('at', 'cron', 'sop')", name="rule_kind"),
        CheckConstraint("status IN ('active', 'cancelled')", name="status"),
        Index(None, "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64))  # the member userid told about failures and misses
    title: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    content: Mapped[dict[str, Any]] = mapped_column(Json)
    rule_kind: Mapped[str] = mapped_column(String(8))
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # rule_kind at
    cron: Mapped[str | None] = mapped_column(String(120))  # rule_kind cron
    timezone: Mapped[str] = mapped_column(String(64), default="Asia/Shanghai", server_default="Asia/Shanghai")
    sop_plan: Mapped[str | None] = mapped_column(String(64))  # rule_kind sop: the plan and this step's offset
    sop_offset_s: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    # Slots before this instant have their delivery rows already; only ever moves forward.
    materialised_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PostTarget(Base):
    """Where a post goes; params hold channel details (e.g. the member who sends a customer-group message)."""

    __tablename__ = "post_targets"
    __table_args__ = (
        UniqueConstraint("post_id", "kind", "ref"),
        CheckConstraint("kind IN ('robot', 'group_chat', 'segment', 'staff')", name="kind"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    post_id: Mapped[int] = mapped_column(BigId, ForeignKey("posts.id"))
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)


class PostDelivery(Base):
    """One (post, target, slot): the state machine scheduled → sending → sent | failed | skipped | missed."""

    __tablename__ = "post_deliveries"
    __table_args__ = (
        UniqueConstraint("idempotency_key"),
        CheckConstraint(
            "state IN ('scheduled', 'sending', 'sent', 'failed', 'skipped', 'missed')", name="state"
        ),
        Index(None, "state", "next_attempt_at"),  # the claim: due scheduled rows
        Index(None, "post_id", "slot_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    post_id: Mapped[int] = mapped_column(BigId, ForeignKey("posts.id"))
    target_id: Mapped[int] = mapped_column(BigId, ForeignKey("post_targets.id"))
    target_kind: Mapped[str] = mapped_column(String(16))
    slot_at: Mapped[datetime] = mapped_column(UTCDateTime)
    idempotency_key: Mapped[str] = mapped_column(String(96))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # WeCom calls started
    holds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # held back by our rate limits
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    call_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    errcode: Mapped[int | None] = mapped_column(Integer)
    errmsg: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(String(64))
    task_msgid: Mapped[str | None] = mapped_column(String(128))  # customer groups: the add_msg_template task
    detail: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)  # e.g. segment counts
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class GroupRobot(Base):
    """A group robot by name; the webhook key is a secret: never logged, never shown in full."""

    __tablename__ = "group_robots"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    webhook_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"GroupRobot(id={self.id!r}, name={self.name!r})"


class MassMessageTask(Base):
    """One add_msg_template task for one customer group; counts towards the group's 4 per natural month."""

    __tablename__ = "mass_message_tasks"
    __table_args__ = (
        UniqueConstraint("msgid"),
        Index(None, "chat_id", "created_at"),
        Index(None, "status", "checked_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    msgid: Mapped[str] = mapped_column(String(128))
    delivery_id: Mapped[int] = mapped_column(BigId, ForeignKey("post_deliveries.id"))
    chat_id: Mapped[str] = mapped_column(String(128))
    sender: Mapped[str] = mapped_column(String(64))  # the member who must confirm it
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reminded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CustomerSubscription(Base):
    """Whether a customer opted out of marketing posts and SOP touches (退订), and when and how that last changed.

    No row: subscribed. One row per customer row; the kf and 客户联系 rows of one external_userid are one person,
    so readers take the latest change among them (bot/storage/subscription_repository.py).
    """

    __tablename__ = "customer_subscriptions"

    customer_id: Mapped[int] = mapped_column(BigId, ForeignKey("customers.id"), primary_key=True)
    opted_out: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String(32))  # kf (the customer wrote), or console/api/import later


class PostTouch(Base):
    """One customer-facing send a delivery made to one recipient (a customer or a group): the audience history.

    The audience policy counts today's marketing touches per recipient (daily caps) and reads the content
    fingerprints a customer got within the de-duplication window. A segment delivery reaches many customers, so
    touches are per (delivery, recipient); a delivery that is retried or held skips the recipients it already
    touched. Customers are keyed by external_userid (one person across kf and 客户联系), groups by
    `robot:{name}` or the customer group's chat_id.
    """

    __tablename__ = "post_touches"
    __table_args__ = (
        UniqueConstraint("delivery_id", "recipient_kind", "recipient_id"),
        Index(None, "recipient_kind", "recipient_id", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(BigId, ForeignKey("post_deliveries.id"))
    recipient_kind: Mapped[str] = mapped_column(String(16))  # customer | group
    recipient_id: Mapped[str] = mapped_column(String(160))
    fingerprint: Mapped[str] = mapped_column(String(64))  # handlers.audience.content_fingerprint
    marketing: Mapped[bool] = mapped_column(Boolean)  # counted by the daily caps
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime)
