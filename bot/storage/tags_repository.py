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

import structlog
from sqlalchemy import ColumnElement, bindparam, delete, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from bot.storage.models import Customer, CustomerTag, Direction, Message, Order
from bot.storage.repositories import _insert, table
from handlers.domain import Channel, Clock, KfOrigin, SystemClock
from handlers.tags import CustomerFacts, PaidOrder, TagConfig, TagSource, computed_tags

log = structlog.get_logger(__name__)

TAGGED_CHANNELS = (Channel.KF.value, Channel.CONTACT.value)  # app senders are staff members, never tagged
MAX_TAG_CHARS = 64
_CHUNK = 500  # rows per statement: well under SQLite's and asyncpg's bind-parameter limits


# Read on every message: built once, with a bind parameter (see repositories._InboundSql for why).
_TAG_COLUMNS = table(CustomerTag).c
_TAGS = select(_TAG_COLUMNS.tag).where(_TAG_COLUMNS.customer_id == bindparam("b_customer_id")).distinct()
_TAGS_BY_SOURCE = select(_TAG_COLUMNS.source, _TAG_COLUMNS.tag).where(
    _TAG_COLUMNS.customer_id == bindparam("b_customer_id")
)


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
    customer_ids: tuple[int, ...] = ()  # customers (contact rows) that got at least one new order, ascending
    unchanged_customer_ids: tuple[int, ...] = ()  # customers of re-imported rows without a new order, ascending


@dataclass(frozen=True, slots=True)
class ComputedTagsChange:
    """One customer row's computed tags before and after a recompute (before is empty when never computed)."""

    customer_id: int
    before: frozenset[str]
    after: frozenset[str]

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def added(self) -> frozenset[str]:
        return self.after - self.before

    @property
    def removed(self) -> frozenset[str]:
        return self.before - self.after


@dataclass(frozen=True, slots=True)
class TagsRecomputed:
    customers: int  # customer rows recomputed (a customer's kf and contact rows count separately)
    changed: int  # of which the computed tags changed


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
        with_new: set[int] = set()
        unchanged_ids: set[int] = set()
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
                        unchanged_ids.add(customer_id)
                    else:
                        conflicts.append(OrderConflict(row.line, row.order_id))
                if new:
                    stmt = (
                        _insert(session, Order)
                        .values(new)
                        .on_conflict_do_nothing(index_elements=[Order.source, Order.external_order_id])
                        .returning(Order.customer_id)
                    )
                    owners = [int(i) for i in (await session.execute(stmt)).scalars().all()]
                    # A concurrent import of the same ids committed first; count those as re-imported.
                    inserted += len(owners)
                    unchanged += len(new) - len(owners)
                    with_new.update(owners)
                    if len(owners) < len(new):
                        unchanged_ids.update(r["customer_id"] for r in new)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done)
        return OrdersWritten(
            inserted,
            unchanged,
            tuple(conflicts),
            created,
            tuple(sorted(with_new)),
            tuple(sorted(unchanged_ids - with_new)),
        )

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
        async with self._sessions() as session:
            return frozenset((await session.execute(_TAGS, {"b_customer_id": customer_id})).scalars().all())

    async def tags_by_source(self, customer_id: int) -> dict[TagSource, frozenset[str]]:
        """A customer's tags per source (sources without tags are left out)."""
        result: dict[TagSource, set[str]] = {}
        async with self._sessions() as session:
            for source, tag in (await session.execute(_TAGS_BY_SOURCE, {"b_customer_id": customer_id})).all():
                result.setdefault(TagSource(source), set()).add(tag)
        return {source: frozenset(tags) for source, tags in result.items()}

    async def replace_tags(self, customer_id: int, source: TagSource, tags: Iterable[str]) -> None:
        """Make the customer's tags from source exactly `tags`, atomically (the port for the WeCom sync too)."""
        clean = sorted({_check_tag(t) for t in tags})
        async with self._sessions.begin() as session:
            await self._replace(session, customer_id, source, clean, self._now())

    async def replace_in(
        self, session: AsyncSession, customer_id: int, source: TagSource, tags: Iterable[str]
    ) -> None:
        """`replace_tags` inside the caller's transaction (several changes committed together)."""
        await self._replace(session, customer_id, source, sorted({_check_tag(t) for t in tags}), self._now())

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
        stmt = (
            select(Customer.id)
            .where(Customer.channel.in_(TAGGED_CHANNELS), Customer.id > after_id, _needs_recompute(stale_before))
            .order_by(Customer.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [int(i) for i in (await session.execute(stmt)).scalars().all()]

    async def needing_recompute_among(self, customer_ids: Sequence[int]) -> list[int]:
        """Those of customer_ids never computed, or seen or sold to since their last computation, ascending."""
        found: list[int] = []
        async with self._sessions() as session:
            for chunk in _chunks(sorted(set(customer_ids))):
                stmt = select(Customer.id).where(
                    Customer.channel.in_(TAGGED_CHANNELS), Customer.id.in_(chunk), _needs_recompute(None)
                )
                found.extend(int(i) for i in (await session.execute(stmt)).scalars().all())
        return sorted(found)

    async def customer_facts(self, customer_id: int) -> CustomerFacts | None:
        """What tags are computed from, gathered over the customer's kf and contact rows; None if unknown."""
        async with self._sessions() as session:
            return (await self._facts(session, [customer_id])).get(customer_id)

    @staticmethod
    async def _facts(session: AsyncSession, customer_ids: Sequence[int]) -> dict[int, CustomerFacts]:
        """The facts of each known customer id, each gathered over its person's kf and contact rows."""
        me = (
            await session.execute(
                select(Customer.id, Customer.channel, Customer.external_id).where(Customer.id.in_(customer_ids))
            )
        ).all()
        if not me:
            return {}
        tagged = {r.external_id for r in me if r.channel in TAGGED_CHANNELS}
        untagged = [int(r.id) for r in me if r.channel not in TAGGED_CHANNELS]
        # A person is the kf and contact rows sharing an external_userid; any other row stands alone.
        person_of: dict[int, tuple[str, str]] = {}
        first_seen: dict[tuple[str, str], datetime] = {}
        rows: list[Any] = []
        if tagged:
            rows += [
                (("person", r.external_id), r)
                for r in (
                    await session.execute(
                        select(Customer.id, Customer.external_id, Customer.first_seen_at).where(
                            Customer.external_id.in_(tagged), Customer.channel.in_(TAGGED_CHANNELS)
                        )
                    )
                ).all()
            ]
        if untagged:
            rows += [
                (("row", str(r.id)), r)
                for r in (
                    await session.execute(select(Customer.id, Customer.first_seen_at).where(Customer.id.in_(untagged)))
                ).all()
            ]
        for key, row in rows:
            person_of[int(row.id)] = key
            seen = first_seen.get(key)
            first_seen[key] = row.first_seen_at if seen is None else min(seen, row.first_seen_at)
        members = list(person_of)
        orders: dict[tuple[str, str], list[PaidOrder]] = {}
        for chunk in _chunks(members):
            paid = (
                select(Order.customer_id, Order.amount_cents, Order.paid_at)
                .where(Order.customer_id.in_(chunk))
                .order_by(Order.paid_at, Order.id)
            )
            for o in (await session.execute(paid)).all():
                orders.setdefault(person_of[int(o.customer_id)], []).append(PaidOrder(int(o.amount_cents), o.paid_at))
        last_inbound: dict[tuple[str, str], datetime] = {}
        for chunk in _chunks(members):
            # What the customer wrote; events and servicer lines are not the customer being active.
            latest = (
                select(Message.customer_id, func.max(Message.created_at))
                .where(
                    Message.customer_id.in_(chunk),
                    Message.direction == Direction.IN.value,
                    Message.msgtype != "event",
                    or_(Message.origin.is_(None), Message.origin == int(KfOrigin.CUSTOMER)),
                )
                .group_by(Message.customer_id)
            )
            for owner, at in (await session.execute(latest)).all():
                if owner is None or at is None:
                    continue
                if at.tzinfo is None:
                    at = at.replace(tzinfo=UTC)  # func.max bypasses the column type on SQLite
                key = person_of[int(owner)]
                seen = last_inbound.get(key)
                last_inbound[key] = at if seen is None else max(seen, at)
        result: dict[int, CustomerFacts] = {}
        for row in me:
            key = person_of[int(row.id)]
            result[int(row.id)] = CustomerFacts(
                first_seen_at=first_seen[key],
                last_inbound_at=last_inbound.get(key),
                orders=tuple(orders.get(key, ())),
            )
        return result

    async def recompute_computed_tags(
        self, customer_id: int, now: datetime, config: TagConfig | None = None, *, reason: str = "recompute"
    ) -> frozenset[str] | None:
        """Read the facts and replace the computed tags in one transaction; None if the customer is unknown."""
        async with self._sessions.begin() as session:
            changes = await self._recompute(session, [customer_id], now, config, reason)
        return changes[0].after if changes else None

    async def recompute_customer(
        self, customer_id: int, now: datetime, config: TagConfig | None = None, *, reason: str
    ) -> list[ComputedTagsChange]:
        """Recompute one customer's computed tags now, on each of its kf and contact rows, in one transaction.

        The rows of one external_userid share their facts, so an event on one changes the tags of both. The
        rules and the write are the daily job's (`recompute_computed_tags`); [] when the customer is unknown.
        """
        async with self._sessions.begin() as session:
            ids = await self._with_same_person(session, [customer_id])
            return await self._recompute(session, ids, now, config, reason)

    async def recompute_customers(
        self,
        customer_ids: Iterable[int],
        now: datetime,
        config: TagConfig | None = None,
        *,
        reason: str,
        batch_size: int = _CHUNK,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> TagsRecomputed:
        """`recompute_customer` for many customers, one transaction per batch; on_progress(done, total) per batch."""
        ordered = sorted(set(customer_ids))
        customers = changed = done = 0
        for chunk in _chunks(ordered, max(1, batch_size)):
            async with self._sessions.begin() as session:
                ids = await self._with_same_person(session, chunk)
                changes = await self._recompute(session, ids, now, config, reason)
            customers += len(changes)
            changed += sum(c.changed for c in changes)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, len(ordered))
        return TagsRecomputed(customers, changed)

    @staticmethod
    async def _with_same_person(session: AsyncSession, customer_ids: Sequence[int]) -> list[int]:
        """customer_ids plus the other kf and contact rows of the same external_userids, ascending."""
        me = aliased(Customer)
        people = select(me.external_id).where(me.id.in_(customer_ids), me.channel.in_(TAGGED_CHANNELS))
        stmt = select(Customer.id).where(Customer.channel.in_(TAGGED_CHANNELS), Customer.external_id.in_(people))
        siblings = {int(i) for i in (await session.execute(stmt)).scalars().all()}
        return sorted(siblings | set(customer_ids))

    async def _recompute(
        self,
        session: AsyncSession,
        customer_ids: Sequence[int],
        now: datetime,
        config: TagConfig | None,
        reason: str,
    ) -> list[ComputedTagsChange]:
        """Replace the computed tags of the known customer_ids from their facts at now; the one write path.

        Every change is logged ("computed tags changed"), whichever caller recomputed: that is the record of
        tag changes. Unchanged tags are rewritten too, so set_at says when they were last computed.
        """
        ids = sorted(set(customer_ids))
        if not ids:
            return []
        # Replacements of one customer's tags queue on its row; rows are locked in id order (no deadlocks).
        await session.execute(select(Customer.id).where(Customer.id.in_(ids)).order_by(Customer.id).with_for_update())
        facts = await self._facts(session, ids)
        known = [i for i in ids if i in facts]
        if not known:
            return []
        before: dict[int, set[str]] = {}
        stmt = select(CustomerTag.customer_id, CustomerTag.tag).where(
            CustomerTag.customer_id.in_(known), CustomerTag.source == TagSource.COMPUTED.value
        )
        for owner, tag in (await session.execute(stmt)).all():
            before.setdefault(int(owner), set()).add(tag)
        changes = [
            ComputedTagsChange(i, frozenset(before.get(i, ())), computed_tags(facts[i], now, config)) for i in known
        ]
        await session.execute(
            delete(CustomerTag).where(
                CustomerTag.customer_id.in_(known), CustomerTag.source == TagSource.COMPUTED.value
            )
        )
        set_at = self._now()
        values = [
            {"customer_id": c.customer_id, "tag": t, "source": TagSource.COMPUTED.value, "set_at": set_at}
            for c in changes
            for t in sorted(c.after)
        ]
        for chunk in _chunks(values):
            await session.execute(_insert(session, CustomerTag).values(list(chunk)))
        for change in changes:
            if change.changed:
                log.info(
                    "computed tags changed",
                    customer_id=change.customer_id,
                    added=sorted(change.added),
                    removed=sorted(change.removed),
                    reason=reason,
                    at=now.isoformat(),
                )
        return changes


def _needs_recompute(stale_before: datetime | None) -> ColumnElement[bool]:
    """Customer rows never computed, computed before stale_before (if given), or seen or sold to since then."""
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
    due: list[ColumnElement[bool]] = [computed_at.is_(None), Customer.last_seen_at > computed_at, newer_order]
    if stale_before is not None:
        due.append(computed_at < stale_before)
    return or_(*due)


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
