"""SQL of the customer tag model: imported orders and customer tags from the three sources.

Orders belong to the customer row of channel "contact" with the order's external_userid (created when absent).
WeCom gives a WeChat user the same external_userid in 客户联系 and 微信客服, so the facts tags are computed
from (orders, first contact, last inbound message) are gathered over the kf and contact rows sharing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from bot.storage.models import Customer, CustomerTag, Direction, Message, Order
from bot.storage.repositories import _insert
from handlers.domain import Channel, Clock, KfOrigin, SystemClock
from handlers.tags import CustomerFacts, PaidOrder, TagConfig, TagSource, computed_tags

TAGGED_CHANNELS = (Channel.KF.value, Channel.CONTACT.value)  # app senders are staff members, never tagged
MAX_TAG_CHARS = 64
_CHUNK = 500  # rows per statement: well under SQLite's and asyncpg's bind-parameter limits


@dataclass(frozen=True, slots=True)
class OrderRow:
    """One validated order to import; line is where it came from, for reports."""

    line: int
    external_userid: str
    order_id: str
    amount_cents: int
    paid_at: datetime


@dataclass(frozen=True, slots=True)
class OrderConflict:
    """An order id already imported from this source with different content."""

    line: int
    order_id: str


@dataclass(frozen=True, slots=True)
class OrdersWritten:
    inserted: int
    unchanged: int  # already imported with the same content (a re-import)
    conflicts: tuple[OrderConflict, ...]
    customers_created: int


def _check_tag(tag: str) -> str:
    tag = tag.strip()
    if not tag or len(tag) > MAX_TAG_CHARS:
        raise ValueError(f"a tag must have 1 to {MAX_TAG_CHARS} characters, got {tag!r}")
    return tag


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _same_instant(a: datetime, b: datetime) -> bool:
    return a.astimezone(UTC) == b.astimezone(UTC)


class TagRepository:
    """Orders and customer tags. Every method is one transaction."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock | None = None) -> None:
        self._sessions = sessions
        self._clock = clock or SystemClock()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), UTC)

    # --- orders -----------------------------------------------------------------------------------

    async def import_orders(
        self,
        rows: Sequence[OrderRow],
        *,
        source: str,
        on_progress: Callable[[int], None] | None = None,
        chunk_size: int = _CHUNK,
    ) -> OrdersWritten:
        """Insert all rows in one transaction, skipping ids already imported from source; all or nothing.

        Rows must have distinct order ids. An id already stored with another customer, amount or time is
        returned as a conflict and not written. on_progress gets the number of rows handled after each chunk;
        an exception from it (or from the database) rolls everything back.
        """
        now = self._now()
        inserted = unchanged = created = 0
        conflicts: list[OrderConflict] = []
        if len({r.order_id for r in rows}) != len(rows):
            raise ValueError("order ids must be unique within one import")
        async with self._sessions.begin() as session:
            customer_ids: dict[str, int] = {}
            done = 0
            for chunk in _chunks(rows, chunk_size):
                created += await self._resolve_customers(session, chunk, customer_ids, now)
                stored = await self._stored_orders(session, source, [r.order_id for r in chunk])
                new: list[dict[str, Any]] = []
                for row in chunk:
                    old = stored.get(row.order_id)
                    customer_id = customer_ids[row.external_userid]
                    if old is None:
                        new.append(
                            {
                                "customer_id": customer_id,
                                "source": source,
                                "external_order_id": row.order_id,
                                "amount_cents": row.amount_cents,
                                "paid_at": row.paid_at,
                                "imported_at": now,
                            }
                        )
                    elif (old[0], old[1]) == (customer_id, row.amount_cents) and _same_instant(old[2], row.paid_at):
                        unchanged += 1
                    else:
                        conflicts.append(OrderConflict(row.line, row.order_id))
                if new:
                    stmt = (
                        _insert(session, Order)
                        .values(new)
                        .on_conflict_do_nothing(index_elements=[Order.source, Order.external_order_id])
                        .returning(Order.id)
                    )
                    written = len((await session.execute(stmt)).scalars().all())
                    # A concurrent import of the same ids committed first; count those as re-imported.
                    inserted += written
                    unchanged += len(new) - written
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done)
        return OrdersWritten(inserted, unchanged, tuple(conflicts), created)

    @staticmethod
    async def _resolve_customers(
        session: AsyncSession, chunk: Sequence[OrderRow], known: dict[str, int], now: datetime
    ) -> int:
        """Fill known with the contact customer id of every external_userid in chunk; return how many were new."""
        first_paid: dict[str, datetime] = {}
        for row in chunk:
            if row.external_userid not in known:
                seen = first_paid.get(row.external_userid)
                first_paid[row.external_userid] = row.paid_at if seen is None else min(seen, row.paid_at)
        if not first_paid:
            return 0
        existing = await session.execute(
            select(Customer.external_id, Customer.id).where(
                Customer.channel == Channel.CONTACT.value, Customer.external_id.in_(first_paid)
            )
        )
        for external_id, customer_id in existing.all():
            known[external_id] = int(customer_id)
        missing = [e for e in first_paid if e not in known]
        for external_id in missing:
            # A customer who paid existed by then: first and last seen start at the first payment in the file.
            at = min(first_paid[external_id], now)
            known[external_id] = await upsert_contact_customer(session, external_id, at)
        return len(missing)

    @staticmethod
    async def _stored_orders(
        session: AsyncSession, source: str, order_ids: Sequence[str]
    ) -> dict[str, tuple[int, int, datetime]]:
        stmt = select(Order.external_order_id, Order.customer_id, Order.amount_cents, Order.paid_at).where(
            Order.source == source, Order.external_order_id.in_(order_ids)
        )
        return {row[0]: (row[1], row[2], row[3]) for row in (await session.execute(stmt)).all()}

    async def count_orders(self, *, source: str | None = None) -> int:
        """How many orders are stored (from one source, or all)."""
        stmt = select(func.count()).select_from(Order)
        if source is not None:
            stmt = stmt.where(Order.source == source)
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())

    # --- tags -------------------------------------------------------------------------------------

    async def customer_tags(self, customer_id: int) -> frozenset[str]:
        """All tags of a customer, from every source, deduplicated."""
        stmt = select(CustomerTag.tag).where(CustomerTag.customer_id == customer_id).distinct()
        async with self._sessions() as session:
            return frozenset((await session.execute(stmt)).scalars().all())

    async def tags_by_source(self, customer_id: int) -> dict[TagSource, frozenset[str]]:
        """A customer's tags per source (sources without tags are left out)."""
        stmt = select(CustomerTag.source, CustomerTag.tag).where(CustomerTag.customer_id == customer_id)
        result: dict[TagSource, set[str]] = {}
        async with self._sessions() as session:
            for source, tag in (await session.execute(stmt)).all():
                result.setdefault(TagSource(source), set()).add(tag)
        return {source: frozenset(tags) for source, tags in result.items()}

    async def replace_tags(self, customer_id: int, source: TagSource, tags: Iterable[str]) -> None:
        """Make the customer's tags from source exactly `tags`, atomically (the port for the WeCom sync too)."""
        clean = sorted({_check_tag(t) for t in tags})
        async with self._sessions.begin() as session:
            await self._replace(session, customer_id, source, clean, self._now())

    @staticmethod
    async def _replace(
        session: AsyncSession, customer_id: int, source: TagSource, tags: Sequence[str], now: datetime
    ) -> None:
        # Replacements of one customer's tags queue on its row, so concurrent ones cannot interleave.
        await session.execute(select(Customer.id).where(Customer.id == customer_id).with_for_update())
        await session.execute(
            delete(CustomerTag).where(CustomerTag.customer_id == customer_id, CustomerTag.source == source.value)
        )
        if tags:
            await session.execute(
                _insert(session, CustomerTag).values(
                    [{"customer_id": customer_id, "tag": t, "source": source.value, "set_at": now} for t in tags]
                )
            )

    async def set_bot_tag(self, customer_id: int, tag: str) -> bool:
        """Set a bot tag; False when the customer already had it."""
        async with self._sessions.begin() as session:
            insert = (
                _insert(session, CustomerTag)
                .values(customer_id=customer_id, tag=_check_tag(tag), source=TagSource.BOT.value, set_at=self._now())
                .on_conflict_do_nothing(index_elements=[CustomerTag.customer_id, CustomerTag.tag, CustomerTag.source])
                .returning(CustomerTag.tag)
            )
            return (await session.execute(insert)).scalar_one_or_none() is not None

    async def remove_bot_tag(self, customer_id: int, tag: str) -> bool:
        """Remove a bot tag; False when the customer did not have it."""
        async with self._sessions.begin() as session:
            stmt = (
                delete(CustomerTag)
                .where(
                    CustomerTag.customer_id == customer_id,
                    CustomerTag.tag == tag.strip(),
                    CustomerTag.source == TagSource.BOT.value,
                )
                .returning(CustomerTag.tag)
            )
            return (await session.execute(stmt)).scalar_one_or_none() is not None

    # --- recompute --------------------------------------------------------------------------------

    async def customer_ids(self, *, after_id: int = 0, limit: int = 1000) -> list[int]:
        """Ids of taggable customers (kf and contact), in id order, for paging through all of them."""
        stmt = (
            select(Customer.id)
            .where(Customer.channel.in_(TAGGED_CHANNELS), Customer.id > after_id)
            .order_by(Customer.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [int(i) for i in (await session.execute(stmt)).scalars().all()]

    async def count_customers(self) -> int:
        """How many taggable customers there are."""
        stmt = select(func.count()).select_from(Customer).where(Customer.channel.in_(TAGGED_CHANNELS))
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def customers_needing_recompute(
        self, stale_before: datetime, *, after_id: int = 0, limit: int = 1000
    ) -> list[int]:
        """Taggable customers never computed, computed before stale_before, or seen or sold to since then."""
        computed_at = (
            select(func.min(CustomerTag.set_at))
            .where(CustomerTag.customer_id == Customer.id, CustomerTag.source == TagSource.COMPUTED.value)
            .correlate(Customer)
            .scalar_subquery()
        )
        sibling = aliased(Customer)
        newer_order = exists(
            select(Order.id)
            .join(sibling, sibling.id == Order.customer_id)
            .where(
                sibling.external_id == Customer.external_id,
                sibling.channel.in_(TAGGED_CHANNELS),
                Order.imported_at > computed_at,
            )
        ).correlate(Customer)
        stmt = (
            select(Customer.id)
            .where(
                Customer.channel.in_(TAGGED_CHANNELS),
                Customer.id > after_id,
                or_(
                    computed_at.is_(None),
                    computed_at < stale_before,
                    Customer.last_seen_at > computed_at,
                    newer_order,
                ),
            )
            .order_by(Customer.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [int(i) for i in (await session.execute(stmt)).scalars().all()]

    async def customer_facts(self, customer_id: int) -> CustomerFacts | None:
        """What tags are computed from, gathered over the customer's kf and contact rows; None if unknown."""
        async with self._sessions() as session:
            return await self._facts(session, customer_id)

    @staticmethod
    async def _facts(session: AsyncSession, customer_id: int) -> CustomerFacts | None:
        me = (
            await session.execute(select(Customer.channel, Customer.external_id).where(Customer.id == customer_id))
        ).one_or_none()
        if me is None:
            return None
        if me.channel in TAGGED_CHANNELS:
            same_person = and_(Customer.external_id == me.external_id, Customer.channel.in_(TAGGED_CHANNELS))
        else:
            same_person = Customer.id == customer_id
        rows = (await session.execute(select(Customer.id, Customer.first_seen_at).where(same_person))).all()
        ids = [int(r.id) for r in rows]
        orders = (
            await session.execute(
                select(Order.amount_cents, Order.paid_at).where(Order.customer_id.in_(ids)).order_by(Order.paid_at)
            )
        ).all()
        # What the customer wrote; events and servicer lines are not the customer being active.
        last_inbound = (
            await session.execute(
                select(func.max(Message.created_at)).where(
                    Message.customer_id.in_(ids),
                    Message.direction == Direction.IN.value,
                    Message.msgtype != "event",
                    or_(Message.origin.is_(None), Message.origin == int(KfOrigin.CUSTOMER)),
                )
            )
        ).scalar_one_or_none()
        if last_inbound is not None and last_inbound.tzinfo is None:
            last_inbound = last_inbound.replace(tzinfo=UTC)  # func.max bypasses the column type on SQLite
        return CustomerFacts(
            first_seen_at=min(r.first_seen_at for r in rows),
            last_inbound_at=last_inbound,
            orders=tuple(PaidOrder(int(o.amount_cents), o.paid_at) for o in orders),
        )

    async def recompute_computed_tags(
        self, customer_id: int, now: datetime, config: TagConfig | None = None
    ) -> frozenset[str] | None:
        """Read the facts and replace the computed tags in one transaction; None if the customer is unknown."""
        async with self._sessions.begin() as session:
            await session.execute(select(Customer.id).where(Customer.id == customer_id).with_for_update())
            facts = await self._facts(session, customer_id)
            if facts is None:
                return None
            tags = computed_tags(facts, now, config)
            await self._replace(session, customer_id, TagSource.COMPUTED, sorted(tags), self._now())
            return tags


async def upsert_contact_customer(session: AsyncSession, external_id: str, seen_at: datetime) -> int:
    """The id of the 客户联系 customer row for external_id, created (first and last seen = seen_at) if missing."""
    stmt = (
        _insert(session, Customer)
        .values(
            channel=Channel.CONTACT.value,
            external_id=external_id,
            corp_tag_ids=[],
            first_seen_at=seen_at,
            last_seen_at=seen_at,
        )
        .on_conflict_do_update(
            index_elements=[Customer.channel, Customer.external_id],
            set_={"channel": Channel.CONTACT.value},  # no-op update so RETURNING yields a raced row
        )
        .returning(Customer.id)
    )
    return int((await session.execute(stmt)).scalar_one())
