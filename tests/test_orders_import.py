"""Order CSV import and customer tags on embedded SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.cli_customers import recompute_all_tags, register, run_import_orders
from bot.orders_import import BadRow, import_orders, parse_amount, parse_orders_csv
from bot.storage.db import create_session_factory
from bot.storage.models import Base, Customer, CustomerTag
from bot.storage.repositories import Repositories
from bot.storage.tags_repository import OrderRow, TagRepository
from handlers.domain import Channel, InboundMessage, KfOrigin
from handlers.tags import TagSource

NOW = datetime(2025, 6, 1, 4, 0, tzinfo=UTC)  # 12:00 in Shanghai
HEADER = "external_userid,order_id,amount,paid_at\n"


class FakeClock:
    def __init__(self, at: datetime = NOW) -> None:
        self.at = at

    def now(self) -> float:
        return self.at.timestamp()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_factory(engine)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def repo(sessions: async_sessionmaker[AsyncSession], clock: FakeClock) -> TagRepository:
    return TagRepository(sessions, clock)


async def count(sessions: async_sessionmaker[AsyncSession], model: type[Base]) -> int:
    async with sessions() as session:
        return int((await session.execute(select(func.count()).select_from(model))).scalar_one())


async def customer_id(sessions: async_sessionmaker[AsyncSession], external_id: str, channel: Channel) -> int:
    async with sessions() as session:
        stmt = select(Customer.id).where(Customer.channel == channel.value, Customer.external_id == external_id)
        return int((await session.execute(stmt)).scalar_one())


def csv_text(*rows: str) -> str:
    return HEADER + "".join(row + "\n" for row in rows)


# --- schema ---------------------------------------------------------------------------------------


async def test_migration_creates_tag_tables_matching_models(engine: AsyncEngine) -> None:
    def check(conn: Connection) -> tuple[set[str], list[object]]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return set(inspect(conn).get_table_names()), list(compare_metadata(context, Base.metadata))

    async with engine.connect() as conn:
        tables, diff = await conn.run_sync(check)
    assert {"orders", "customer_tags"} <= tables
    assert diff == []


# --- parsing (no database) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cents"), [("0", 0), ("199", 19_900), ("199.5", 19_950), ("199.05", 19_905), ("0.01", 1)]
)
def test_amount_in_yuan_to_cents(text: str, cents: int) -> None:
    assert parse_amount(text) == cents


def test_every_bad_row_is_reported_by_line() -> None:
    text = csv_text(
        "wmA,SO-1,199.00,2025-05-01 10:00:00",  # line 2: good
        "wmA,SO-2,1.999,2025-05-01 10:00:00",  # 3: three decimals
        "wmA,SO-3,-5,2025-05-01 10:00:00",  # 4: negative
        "wmA,SO-4,¥5,2025-05-01 10:00:00",  # 5: currency sign
        "wmA,SO-5,5,2025-13-01 10:00:00",  # 6: no such month
        "wmA,SO-6,5,2025-05-01",  # 7: no time of day
        "wmA,SO-7,5",  # 8: missing column
        "wmA,SO-1,5,2025-05-01 10:00:00",  # 9: duplicate of line 2
        ",SO-8,5,2025-05-01 10:00:00",  # 10: empty customer
        "",  # 11: blank, ignored
        "wmB,SO-9,5,2025-05-01T02:00:00Z",  # 12: good, ISO with offset
        "wmB,SO-10,5,2099-01-01 00:00:00",  # 13: future
        "wmB,SO-11,1,2,3,4",  # 14: too many fields
    )
    parsed = parse_orders_csv(text, NOW)
    assert parsed.error is None
    assert [r.line for r in parsed.rows] == [2, 12]
    assert [b.line for b in parsed.bad] == [3, 4, 5, 6, 7, 8, 9, 10, 13, 14]
    reasons = {b.line: b.reason for b in parsed.bad}
    assert "up to 2 decimals" in reasons[3]
    assert "ISO-8601" in reasons[6]
    assert "no time of day" in reasons[7]
    assert "expected 4 fields, got 3" in reasons[8]
    assert "duplicate order_id 'SO-1' (first on line 2)" in reasons[9]
    assert "external_userid is empty" in reasons[10]
    assert "future" in reasons[13]


def test_times_without_offset_are_shanghai() -> None:
    parsed = parse_orders_csv(csv_text("wmA,SO-1,1,2025-05-01 08:00:00", "wmA,SO-2,1,2025-05-01T08:00:00+00:00"), NOW)
    assert [r.paid_at for r in parsed.rows] == [
        datetime(2025, 5, 1, 0, 0, tzinfo=UTC),
        datetime(2025, 5, 1, 8, 0, tzinfo=UTC),
    ]


def test_header_problems_refuse_the_whole_file() -> None:
    assert "missing column(s) paid_at" in (
        parse_orders_csv("external_userid,order_id,amount\nwmA,1,2\n", NOW).error or ""
    )
    assert "empty" in (parse_orders_csv("\n\n", NOW).error or "")
    reordered = parse_orders_csv("paid_at,Amount,order_id,external_userid,note\n2025-05-01 08:00:00,1,SO,wmA,x\n", NOW)
    assert reordered.error is None and [r.order_id for r in reordered.rows] == ["SO"]


def test_multiline_quoted_field_keeps_line_numbers() -> None:
    text = csv_text('wmA,"SO\n1",1,2025-05-01 08:00:00', "wmA,SO-2,x,2025-05-01 08:00:00")
    parsed = parse_orders_csv(text, NOW)
    assert [b.line for b in parsed.bad] == [2, 4]  # the control character, then the amount on the line after
    assert "control characters" in parsed.bad[0].reason


# --- import ---------------------------------------------------------------------------------------


async def test_good_rows_are_imported_and_bad_rows_reported(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession]
) -> None:
    text = csv_text(
        "wmA,SO-1,199.00,2025-05-01 10:00:00",
        "wmA,SO-2,oops,2025-05-01 10:00:00",
        "wmB,SO-3,20.5,2025-05-02 10:00:00",
    )
    report = await import_orders(text, repo, now=NOW)
    assert (report.rows, report.imported, report.unchanged, report.customers_created) == (3, 2, 0, 2)
    assert report.bad == (BadRow(3, report.bad[0].reason),) and "amount" in report.bad[0].reason
    assert not report.ok
    assert await repo.count_orders() == 2
    created = await customer_id(sessions, "wmA", Channel.CONTACT)
    facts = await repo.customer_facts(created)
    assert facts is not None
    assert [(o.amount_cents, o.paid_at) for o in facts.orders] == [(19_900, datetime(2025, 5, 1, 2, 0, tzinfo=UTC))]
    assert facts.first_seen_at == datetime(2025, 5, 1, 2, 0, tzinfo=UTC)


async def test_reimport_is_idempotent_and_changed_orders_are_reported(repo: TagRepository) -> None:
    text = csv_text("wmA,SO-1,199.00,2025-05-01 10:00:00", "wmB,SO-2,20,2025-05-02 10:00:00")
    first = await import_orders(text, repo, now=NOW)
    again = await import_orders(text, repo, now=NOW)
    assert (first.imported, first.unchanged, first.customers_created) == (2, 0, 2)
    assert (again.imported, again.unchanged, again.customers_created, again.bad) == (0, 2, 0, ())
    assert await repo.count_orders() == 2

    edited = csv_text("wmA,SO-1,299.00,2025-05-01 10:00:00", "wmA,SO-3,5,2025-05-03 10:00:00")
    report = await import_orders(edited, repo, now=NOW)
    assert report.imported == 1 and [b.line for b in report.bad] == [2]
    assert "already imported" in report.bad[0].reason
    # The same order id from another source is another order.
    other = await import_orders(text, repo, now=NOW, source="shop-api")
    assert other.imported == 2 and await repo.count_orders() == 5


async def test_database_failure_midway_writes_nothing(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession]
) -> None:
    text = csv_text(*(f"wm{i % 3},SO-{i},{i}.50,2025-05-01 10:00:00" for i in range(10)))
    chunks: list[int] = []

    def explode_after_first_chunk(phase: str, done: int, total: int) -> None:
        if phase == "written":
            chunks.append(done)
            if len(chunks) == 2:
                raise ConnectionError("database went away")

    with pytest.raises(ConnectionError):
        await import_orders(text, repo, now=NOW, on_progress=explode_after_first_chunk, progress_every=3)
    assert chunks == [3, 6]  # two chunks were written inside the transaction before it failed
    assert await repo.count_orders() == 0
    assert await count(sessions, Customer) == 0

    report = await import_orders(text, repo, now=NOW, progress_every=3)
    assert (report.imported, report.customers_created) == (10, 3)


async def test_constraint_violation_rolls_back_everything(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession]
) -> None:
    good = csv_text("wmA,SO-1,1,2025-05-01 10:00:00")
    parsed = parse_orders_csv(good, NOW)
    # Validation never lets a negative amount through; the database's check constraint is the last line.
    negative = [*parsed.rows, OrderRow(3, "wmB", "SO-2", -1, parsed.rows[0].paid_at)]
    with pytest.raises(IntegrityError):
        await repo.import_orders(negative, source="csv")
    assert await repo.count_orders() == 0 and await count(sessions, Customer) == 0


async def test_orders_attach_to_existing_contact_customer(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession]
) -> None:
    repos = Repositories.create(sessions, FakeClock())
    event = InboundMessage(
        Channel.CONTACT, "ev-1", "wmKnown", "zhangsan", "event", int(NOW.timestamp()), event="add_external_contact"
    )
    known = await repos.messages.record_inbound(event)
    report = await import_orders(csv_text("wmKnown,SO-1,5,2025-05-01 10:00:00"), repo, now=NOW)
    assert report.customers_created == 0
    assert known.customer_id == await customer_id(sessions, "wmKnown", Channel.CONTACT)


async def test_concurrent_imports_of_the_same_file_store_each_order_once(repo: TagRepository) -> None:
    text = csv_text(*(f"wmC{i},SO-{i},1,2025-05-01 10:00:00" for i in range(20)))
    reports = await asyncio.gather(*(import_orders(text, repo, now=NOW) for _ in range(3)))
    assert sum(r.imported for r in reports) == 20
    assert all(r.imported + r.unchanged == 20 for r in reports)
    assert await repo.count_orders() == 20


# --- tags -----------------------------------------------------------------------------------------


async def test_bot_tags_and_deduplicated_reads(repo: TagRepository, sessions: async_sessionmaker[AsyncSession]) -> None:
    await import_orders(csv_text("wmA,SO-1,5,2025-05-01 10:00:00"), repo, now=NOW)
    cid = await customer_id(sessions, "wmA", Channel.CONTACT)
    assert await repo.set_bot_tag(cid, "高价值")
    assert not await repo.set_bot_tag(cid, "高价值")
    await repo.replace_tags(cid, TagSource.WECOM, ["高价值", "VIP"])
    await repo.replace_tags(cid, TagSource.COMPUTED, ["高价值", "rfm:low"])
    assert await repo.customer_tags(cid) == {"高价值", "VIP", "rfm:low"}
    assert (await repo.tags_by_source(cid))[TagSource.BOT] == {"高价值"}
    assert await repo.remove_bot_tag(cid, "高价值")
    assert not await repo.remove_bot_tag(cid, "高价值")
    assert await repo.customer_tags(cid) == {"高价值", "VIP", "rfm:low"}  # still set by the other sources
    await repo.replace_tags(cid, TagSource.WECOM, [])
    assert await repo.customer_tags(cid) == {"高价值", "rfm:low"}
    with pytest.raises(ValueError):
        await repo.set_bot_tag(cid, "x" * 65)


async def test_recompute_writes_computed_tags_from_orders_and_messages(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    repos = Repositories.create(sessions, clock)
    # A kf customer who wrote yesterday; the same external_userid has orders (imported on the contact row).
    await repos.messages.record_inbound(
        InboundMessage(
            Channel.KF,
            "m1",
            "wmVip",
            "wkShop",
            "text",
            int((NOW - timedelta(days=1)).timestamp()),
            text="在吗",
            origin=KfOrigin.CUSTOMER,
        )
    )
    rows = [
        f"wmVip,SO-{d},400,{(NOW - timedelta(days=d)).isoformat()}"
        for d in (2, 20, 40, 60, 80, 100, 150, 200, 250, 300)
    ]
    rows.append(f"wmFreebie,SO-P,0,{(NOW - timedelta(days=100)).isoformat()}")  # a free order
    await import_orders(csv_text(*rows), repo, now=NOW)
    kf_id = await customer_id(sessions, "wmVip", Channel.KF)
    contact_id = await customer_id(sessions, "wmVip", Channel.CONTACT)

    out = io.StringIO()
    summary = await recompute_all_tags(repo, now=NOW, out=out, progress_every=1)
    assert summary.customers == 3 and summary.changed == 3
    assert "[recompute] 3/3 customers" in out.getvalue()
    expected = {"高价值", "rfm:high", "lifecycle:mature", "activity:active"}
    assert await repo.customer_tags(kf_id) == expected
    assert await repo.customer_tags(contact_id) == expected
    freebie = await customer_id(sessions, "wmFreebie", Channel.CONTACT)
    assert await repo.customer_tags(freebie) == {"流失", "rfm:low", "lifecycle:dormant", "activity:churned"}

    again = await recompute_all_tags(repo, now=NOW, out=io.StringIO())
    assert again.changed == 0
    later = await recompute_all_tags(repo, now=NOW + timedelta(days=120), out=io.StringIO())
    assert later.changed == 2  # the free-order customer was churned already
    assert "流失" in await repo.customer_tags(kf_id)


async def test_recompute_replaces_only_computed_tags_atomically(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await import_orders(csv_text("wmA,SO-1,5,2025-05-31 10:00:00"), repo, now=NOW)
    cid = await customer_id(sessions, "wmA", Channel.CONTACT)
    await repo.set_bot_tag(cid, "投诉过")
    await repo.replace_tags(cid, TagSource.COMPUTED, ["潜客", "stale"])

    results = await asyncio.gather(*(repo.recompute_computed_tags(cid, NOW) for _ in range(5)))
    assert len(set(results)) == 1
    tags = await repo.tags_by_source(cid)
    assert results[0] is not None
    assert (
        tags[TagSource.COMPUTED] == results[0] == frozenset({"新用户", "rfm:low", "lifecycle:new", "activity:active"})
    )
    assert tags[TagSource.BOT] == {"投诉过"}
    assert await repo.recompute_computed_tags(10**12, NOW) is None


async def test_customers_needing_recompute(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    await import_orders(csv_text("wmA,SO-1,5,2025-05-01 10:00:00", "wmB,SO-2,5,2025-05-01 10:00:00"), repo, now=NOW)
    a = await customer_id(sessions, "wmA", Channel.CONTACT)
    b = await customer_id(sessions, "wmB", Channel.CONTACT)
    assert await repo.customers_needing_recompute(NOW - timedelta(days=1)) == [a, b]

    clock.at = NOW + timedelta(minutes=1)
    await repo.recompute_computed_tags(a, clock.at)
    await repo.recompute_computed_tags(b, clock.at)
    assert await repo.customers_needing_recompute(NOW - timedelta(days=1)) == []

    clock.at = NOW + timedelta(minutes=2)
    await import_orders(csv_text("wmB,SO-3,5,2025-05-02 10:00:00"), repo, now=clock.at)
    assert await repo.customers_needing_recompute(NOW - timedelta(days=1)) == [b]  # a new order
    assert await repo.customers_needing_recompute(NOW + timedelta(hours=1)) == [a, b]  # a day has passed
    assert await repo.customers_needing_recompute(NOW + timedelta(hours=1), after_id=a, limit=1) == [b]


async def test_computed_tag_rows_are_never_left_empty(
    repo: TagRepository, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await import_orders(csv_text("wmA,SO-1,5,2025-05-01 10:00:00"), repo, now=NOW)
    await recompute_all_tags(repo, now=NOW, out=io.StringIO())
    assert await count(sessions, CustomerTag) >= 3


# --- CLI ------------------------------------------------------------------------------------------


async def test_cli_import_prints_progress_bad_lines_and_exit_code(repo: TagRepository, tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("\ufeff" + csv_text(*(f"wm{i},SO-{i},1,2025-05-01 10:00:00" for i in range(5)), "wmX,SO-X,bad,x"))
    out, err = io.StringIO(), io.StringIO()
    assert await run_import_orders(path, repo, now=NOW, progress_every=2, out=out, err=err) == 1
    assert "[written] 2/5 rows" in out.getvalue() and "[written] 5/5 rows" in out.getvalue()
    assert "5 orders imported" in out.getvalue() and "1 bad rows" in out.getvalue()
    assert err.getvalue().startswith("orders.csv:7: amount 'bad'")

    out, err = io.StringIO(), io.StringIO()
    path.write_text(csv_text("wm1,SO-1,1,2025-05-01 10:00:00"))
    assert await run_import_orders(path, repo, now=NOW, out=out, err=err) == 0
    assert "0 orders imported, 1 already present" in out.getvalue()

    path.write_bytes("external_userid,order_id,amount,paid_at\nwm张,SO-9,1,2025-05-01 10:00:00\n".encode("gbk"))
    err = io.StringIO()
    assert await run_import_orders(path, repo, now=NOW, out=io.StringIO(), err=err) == 1
    assert "not UTF-8" in err.getvalue()


def test_register_adds_customer_commands() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="wecom-bot")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["customers", "import-orders", "x.csv", "--progress-every", "10"])
    assert (args.action, args.file, args.progress_every, args.source) == ("import-orders", Path("x.csv"), 10, "csv")
    assert parser.parse_args(["customers", "recompute-tags"]).action == "recompute-tags"
    with pytest.raises(SystemExit):
        parser.parse_args(["customers", "import-orders", "x.csv", "--progress-every", "0"])
