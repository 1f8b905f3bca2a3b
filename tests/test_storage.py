"""Storage on embedded SQLite and real PostgreSQL: migrations, idempotent inserts under races, outbox."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.storage.db import (
    create_engine,
    create_session_factory,
    engine_for_url,
    head_revision,
    ping,
    schema_status,
    upgrade,
)
from bot.storage.models import Base, ConversationStatus, Direction, MessageStatus, OutboxStatus
from bot.storage.repositories import Repositories
from handlers.domain import Channel, InboundMessage, KfOrigin, OutboundMessage
from tests.conftest import REAL_POSTGRES_ADMIN_URL, Backend, make_settings

TABLES = {"customers", "conversations", "messages", "outbox", "kf_cursors", "orders", "customer_tags", "answers",
          "staff_users", "api_tokens", "audit_log", "script_revisions",
          "sla_clocks", "sla_events", "csat_surveys",
          "posts", "post_targets", "post_deliveries", "group_robots", "mass_message_tasks",
          "customer_subscriptions", "post_touches"}
T0 = 1_700_000_000


class FakeClock:
    def __init__(self, now: float = T0 + 5) -> None:
        self.value = now

    def now(self) -> float:
        return self.value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def repos(engine: AsyncEngine, clock: FakeClock) -> Repositories:
    return Repositories.create(create_session_factory(engine), clock)


@pytest.fixture
async def empty_database_url(backend: Backend, tmp_path: Path) -> AsyncIterator[str]:
    """A database with no tables at all (the shared PostgreSQL test database already has the schema)."""
    if backend.name == "embedded":
        # A directory that does not exist yet: upgrade/create_engine must create it.
        yield f"sqlite:///{tmp_path}/fresh/dir/bot.sqlite3"
        return
    import asyncpg

    name = f"wecom_empty_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(REAL_POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield f"{REAL_POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    admin = await asyncpg.connect(REAL_POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def uid(prefix: str = "m") -> str:
    return f"{prefix}{uuid.uuid4().hex[:16]}"


def kf_message(
    msgid: str | None = None,
    *,
    sender: str = "wmCustomer",
    account: str = "wkAccount",
    origin: int | None = KfOrigin.CUSTOMER,
    created_at: int = T0,
    text_: str | None = "你好",
    msgtype: str = "text",
) -> InboundMessage:
    return InboundMessage(
        channel=Channel.KF,
        msgid=msgid or uid(),
        sender_id=sender,
        account_id=account,
        msgtype=msgtype,
        created_at=created_at,
        text=text_,
        origin=origin,
        raw={"msgid": "x", "text": {"content": text_}},
    )


def reply(to: str = "wmCustomer", content: str = "您好") -> OutboundMessage:
    return OutboundMessage(
        channel=Channel.KF, to=to, account_id="wkAccount", msgtype="text", content={"content": content}
    )


# --- migrations and engine ------------------------------------------------------------------------


async def test_migrations_apply_from_empty(backend: Backend, empty_database_url: str) -> None:
    settings = make_settings(backend, database_url=empty_database_url)
    eng = create_engine(settings)
    try:
        assert await schema_status(eng) == "empty"
        upgrade(settings.database_url)  # the sync entry point, called with a loop running
        assert await schema_status(eng) == "current"
        upgrade(settings.database_url)  # a second run is a no-op
        assert await schema_status(eng) == "current"

        def tables(conn: Connection) -> set[str]:
            return set(inspect(conn).get_table_names())

        async with eng.connect() as conn:
            assert await conn.run_sync(tables) == TABLES | {"alembic_version"}
    finally:
        await eng.dispose()


async def test_upgrade_outside_a_loop_creates_sqlite_dir(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "bot.sqlite3"
    await asyncio.to_thread(upgrade, f"sqlite:///{path}")
    assert path.exists()


async def test_migration_matches_models(engine: AsyncEngine) -> None:
    def diff(conn: Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_schema_status_behind_when_version_differs(engine: AsyncEngine) -> None:
    assert await schema_status(engine) == "current"
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
    try:
        assert await schema_status(engine) == "behind"
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head_revision()})


async def test_ping(engine: AsyncEngine) -> None:
    await ping(engine)


async def test_ping_fails_when_database_unreachable() -> None:
    eng = engine_for_url("postgresql://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(OSError):
            await ping(eng)
    finally:
        await eng.dispose()


async def test_pool_recovers_after_the_server_drops_every_connection(
    backend: Backend, engine: AsyncEngine, repos: Repositories
) -> None:
    """Without pool_pre_ping a dropped connection fails one statement; the pool is then renewed, not reused."""
    if backend.name != "real":
        pytest.skip("PostgreSQL only: SQLite has no server to drop connections")
    held = [await engine.connect() for _ in range(3)]  # fill the pool with several idle connections
    for conn in held:
        await conn.execute(text("SELECT 1"))
        await conn.close()
    database = engine.url.database
    admin = engine_for_url(REAL_POSTGRES_ADMIN_URL, null_pool=True)
    try:
        async with admin.connect() as conn:
            await conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": database}
            )
    finally:
        await admin.dispose()
    failures = 0
    for _ in range(4):
        try:
            await repos.messages.record_inbound(kf_message(uid()))
        except Exception:
            failures += 1
    assert failures <= 1  # the first checkout may meet a dead connection; the invalidated pool does not again
    assert (await repos.messages.record_inbound(kf_message(uid()))).id > 0


async def test_sqlite_pragmas(tmp_path: Path) -> None:
    eng = engine_for_url(f"sqlite:///{tmp_path}/new/dir/x.sqlite3")
    try:
        async with eng.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() >= 1000
    finally:
        await eng.dispose()
    assert (tmp_path / "new" / "dir").is_dir()


# --- inbound messages -----------------------------------------------------------------------------


async def test_record_inbound_is_idempotent(repos: Repositories) -> None:
    message = kf_message()
    first = await repos.messages.record_inbound(message)
    second = await repos.messages.record_inbound(message)
    assert first.created and not second.created
    assert second.id == first.id
    assert (second.customer_id, second.conversation_id) == (first.customer_id, first.conversation_id)
    assert await repos.messages.count_messages(wecom_msgid=message.msgid) == 1


async def test_same_msgid_on_another_channel_is_another_message(repos: Repositories) -> None:
    msgid = uid()
    kf = await repos.messages.record_inbound(kf_message(msgid))
    app = await repos.messages.record_inbound(
        InboundMessage(Channel.APP, msgid, "zhangsan", "1000002", "text", T0, text="hi")
    )
    assert kf.created and app.created and kf.id != app.id


async def test_concurrent_record_inbound_inserts_once(repos: Repositories) -> None:
    message = kf_message(sender=uid("wm"))
    results = await asyncio.gather(*(repos.messages.record_inbound(message) for _ in range(8)))
    assert sum(r.created for r in results) == 1
    assert len({r.id for r in results}) == 1
    assert len({r.conversation_id for r in results}) == 1
    assert await repos.messages.count_messages(wecom_msgid=message.msgid) == 1


async def test_concurrent_first_messages_share_one_customer_and_conversation(repos: Repositories) -> None:
    sender = uid("wm")
    results = await asyncio.gather(
        *(repos.messages.record_inbound(kf_message(sender=sender)) for _ in range(6))
    )
    assert all(r.created for r in results)
    assert len({r.customer_id for r in results}) == 1
    assert len({r.conversation_id for r in results}) == 1


async def test_stored_message_keeps_text_payload_and_aware_times(repos: Repositories) -> None:
    message = kf_message(text_="我想退货")
    record = await repos.messages.record_inbound(message)
    stored = await repos.messages.get_message(record.id)
    assert stored is not None
    assert stored.text == "我想退货"
    assert stored.direction is Direction.IN
    assert stored.status is MessageStatus.RECEIVED
    assert stored.origin == KfOrigin.CUSTOMER
    assert stored.payload["raw"]["text"]["content"] == "我想退货"
    assert stored.created_at == datetime.fromtimestamp(T0, UTC)
    assert stored.received_at == datetime.fromtimestamp(T0 + 5, UTC)
    assert stored.created_at.tzinfo is not None


async def test_customer_and_conversation_reuse(repos: Repositories, clock: FakeClock) -> None:
    sender = uid("wm")
    first = await repos.messages.record_inbound(kf_message(sender=sender, created_at=T0))
    second = await repos.messages.record_inbound(kf_message(sender=sender, created_at=T0 + 60))
    assert second.customer_id == first.customer_id
    assert second.conversation_id == first.conversation_id

    other_account = await repos.messages.record_inbound(kf_message(sender=sender, account="wkOther"))
    assert other_account.customer_id == first.customer_id
    assert other_account.conversation_id != first.conversation_id

    customer = await repos.conversations.get_customer(Channel.KF, sender)
    assert customer is not None and customer.id == first.customer_id
    assert customer.first_seen_at == datetime.fromtimestamp(T0, UTC)
    assert customer.last_seen_at == datetime.fromtimestamp(T0 + 60, UTC)

    assert first.conversation_id is not None
    conversation = await repos.conversations.get_conversation(first.conversation_id)
    assert conversation is not None
    assert conversation.status is ConversationStatus.BOT
    assert conversation.last_inbound_at == datetime.fromtimestamp(T0 + 60, UTC)


async def test_older_or_servicer_messages_do_not_move_last_inbound(repos: Repositories) -> None:
    sender = uid("wm")
    first = await repos.messages.record_inbound(kf_message(sender=sender, created_at=T0 + 100))
    await repos.messages.record_inbound(kf_message(sender=sender, created_at=T0))  # pulled late
    await repos.messages.record_inbound(
        kf_message(sender=sender, created_at=T0 + 200, origin=KfOrigin.SERVICER)
    )
    await repos.messages.record_inbound(
        kf_message(
            sender=sender, created_at=T0 + 300, msgtype="event", text_=None, origin=KfOrigin.SYSTEM_EVENT
        )
    )
    assert first.conversation_id is not None
    conversation = await repos.conversations.get_conversation(first.conversation_id)
    assert conversation is not None
    assert conversation.last_inbound_at == datetime.fromtimestamp(T0 + 100, UTC)
    customer = await repos.conversations.get_customer(Channel.KF, sender)
    assert customer is not None
    assert customer.first_seen_at == datetime.fromtimestamp(T0, UTC)
    assert customer.last_seen_at == datetime.fromtimestamp(T0 + 100, UTC)


async def test_resolved_conversation_is_followed_by_a_new_one(repos: Repositories) -> None:
    sender = uid("wm")
    first = await repos.messages.record_inbound(kf_message(sender=sender))
    assert first.conversation_id is not None
    await repos.conversations.set_conversation_status(
        first.conversation_id, ConversationStatus.OPEN, kf_service_state=3
    )
    again = await repos.messages.record_inbound(kf_message(sender=sender))
    assert again.conversation_id == first.conversation_id
    opened = await repos.conversations.get_conversation(first.conversation_id)
    assert opened is not None and opened.kf_service_state == 3

    await repos.conversations.set_conversation_status(first.conversation_id, ConversationStatus.RESOLVED)
    after = await repos.messages.record_inbound(kf_message(sender=sender))
    assert after.customer_id == first.customer_id
    assert after.conversation_id not in (None, first.conversation_id)
    assert first.customer_id is not None
    active = await repos.conversations.active_conversation(Channel.KF, "wkAccount", first.customer_id)
    assert active is not None and active.id == after.conversation_id


async def test_event_without_sender_has_no_customer(repos: Repositories) -> None:
    event = InboundMessage(
        Channel.CONTACT, uid("ev"), "", "zhangsan", "event", T0, event="change_external_chat"
    )
    record = await repos.messages.record_inbound(event)
    assert record.created and record.customer_id is None and record.conversation_id is None


async def test_mark_handled_and_status(repos: Repositories) -> None:
    message = kf_message()
    record = await repos.messages.record_inbound(message)
    assert not record.handled
    await repos.messages.mark_handled(record.id, "faq")
    again = await repos.messages.record_inbound(message)
    assert again.handled and again.status is MessageStatus.HANDLED
    stored = await repos.messages.get_message(record.id)
    assert stored is not None and stored.handler == "faq" and stored.handled_at is not None

    other = await repos.messages.record_inbound(kf_message())
    await repos.messages.mark_status(other.id, MessageStatus.UNKNOWN)
    assert (await repos.messages.record_inbound(kf_message(msgid=None))).status is MessageStatus.RECEIVED
    stored_other = await repos.messages.get_message(other.id)
    assert stored_other is not None and stored_other.status is MessageStatus.UNKNOWN

    with pytest.raises(LookupError):
        await repos.messages.mark_handled(10**12, "faq")


async def test_update_customer(repos: Repositories) -> None:
    sender = uid("wm")
    record = await repos.messages.record_inbound(kf_message(sender=sender))
    assert record.customer_id is not None
    await repos.conversations.update_customer(record.customer_id, name="张三", corp_tag_ids=["etA", "etB"])
    customer = await repos.conversations.get_customer(Channel.KF, sender)
    assert customer is not None and customer.name == "张三" and customer.corp_tag_ids == ("etA", "etB")


# --- outbox ---------------------------------------------------------------------------------------


async def test_reserve_reply_is_idempotent_and_first_payload_wins(repos: Repositories) -> None:
    inbound = await repos.messages.record_inbound(kf_message())
    key = uid("r")
    first = await repos.outbox.reserve_reply(inbound.id, 0, reply(content="first"), key)
    second = await repos.outbox.reserve_reply(inbound.id, 0, reply(content="second"), key)
    assert first.created and not second.created
    assert second.id == first.id
    assert second.to_outbound().content == {"content": "first"}
    assert second.status is OutboxStatus.PENDING and second.attempts == 0


async def test_concurrent_reserve_reply_inserts_once(repos: Repositories) -> None:
    inbound = await repos.messages.record_inbound(kf_message())
    key = uid("r")
    results = await asyncio.gather(
        *(repos.outbox.reserve_reply(inbound.id, 0, reply(), key) for _ in range(8))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.id for r in results}) == 1
    assert len(await repos.outbox.replies_for(inbound.id)) == 1


async def test_reused_idempotency_key_is_refused(repos: Repositories) -> None:
    inbound = await repos.messages.record_inbound(kf_message())
    key = uid("r")
    await repos.outbox.reserve_reply(inbound.id, 0, reply(), key)
    with pytest.raises(ValueError, match="idempotency key"):
        await repos.outbox.reserve_reply(inbound.id, 1, reply(), key)


async def test_reserve_reply_needs_an_existing_inbound_message(repos: Repositories) -> None:
    with pytest.raises(IntegrityError):
        await repos.outbox.reserve_reply(10**12, 0, reply(), uid("r"))


async def test_send_lifecycle_and_outbound_history(repos: Repositories) -> None:
    sender = uid("wm")
    inbound = await repos.messages.record_inbound(kf_message(sender=sender))
    r0 = await repos.outbox.reserve_reply(inbound.id, 0, reply(sender, "第一条"), uid("r"))
    r1 = await repos.outbox.reserve_reply(inbound.id, 1, reply(sender, "第二条"), uid("r"))

    await repos.outbox.mark_failed(r0.id, "errcode 45009 api freq out of limit")
    await repos.outbox.mark_sent(r0.id, r0.idempotency_key)
    await repos.outbox.mark_sent(r0.id, r0.idempotency_key)  # a retry after a crash: still one history row
    await repos.outbox.mark_failed(r0.id, "late error")  # never un-sends a sent row

    replies = await repos.outbox.replies_for(inbound.id)
    assert [r.seq for r in replies] == [0, 1]
    sent, pending = replies
    assert sent.sent and sent.provider_msgid == r0.idempotency_key and sent.sent_at is not None
    assert sent.attempts == 3 and sent.last_error == "errcode 45009 api freq out of limit"
    assert pending.id == r1.id and pending.status is OutboxStatus.PENDING

    assert inbound.conversation_id is not None
    history = await repos.messages.conversation_messages(inbound.conversation_id)
    assert [(m.direction, m.text) for m in history] == [(Direction.IN, "你好"), (Direction.OUT, "第一条")]
    out = history[1]
    assert out.wecom_msgid == r0.idempotency_key and out.customer_id == inbound.customer_id


async def test_record_outbound_message_outside_outbox(repos: Repositories) -> None:
    sender = uid("wm")
    inbound = await repos.messages.record_inbound(kf_message(sender=sender))
    key = uid("post")
    first = await repos.messages.record_outbound_message(reply(sender, "活动通知"), key)
    second = await repos.messages.record_outbound_message(reply(sender, "活动通知"), key)
    assert first == second
    stored = await repos.messages.get_message(first)
    assert stored is not None
    assert stored.direction is Direction.OUT and stored.conversation_id == inbound.conversation_id
    assert await repos.messages.count_messages(direction=Direction.OUT, wecom_msgid=key) == 1


# --- kf cursors -----------------------------------------------------------------------------------


async def test_cursor_upsert(repos: Repositories) -> None:
    open_kfid = uid("wk")
    assert await repos.cursors.get_cursor(open_kfid) is None
    await repos.cursors.save_cursor(open_kfid, "c1")
    assert await repos.cursors.get_cursor(open_kfid) == "c1"
    await repos.cursors.save_cursor(open_kfid, "c2")
    assert await repos.cursors.get_cursor(open_kfid) == "c2"
    await asyncio.gather(*(repos.cursors.save_cursor(open_kfid, f"c{i}") for i in range(3, 8)))
    assert await repos.cursors.get_cursor(open_kfid) in {f"c{i}" for i in range(3, 8)}
