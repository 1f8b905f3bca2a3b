"""SQL of opt-out (退订): each customer row's subscription state, read per person.

WeCom gives a WeChat user the same external_userid in 微信客服 and 客户联系, so the kf and contact rows sharing it
are one person: a customer who opted out in the kf chat must not get a mass message through 客户联系. Readers
therefore take the latest change among those rows. No row means subscribed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from bot.storage.models import Customer, CustomerSubscription
from bot.storage.repositories import _insert
from handlers.domain import Channel, Clock, SystemClock

PERSON_CHANNELS = (Channel.KF.value, Channel.CONTACT.value)  # app senders are staff members, never subscribers
_CHUNK = 500  # ids per statement: well under SQLite's and asyncpg's bind-parameter limits


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    customer_id: int
    opted_out: bool
    changed_at: datetime
    source: str


class SubscriptionRepository:
    """Opt-out state per customer row; every method opens its own short transaction."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock | None = None) -> None:
        self._sessions = sessions
        self._clock = clock or SystemClock()

    async def set_opted_out(self, customer_id: int, opted_out: bool, *, at: float | None = None, source: str) -> bool:
        """Record the state as of `at` (epoch seconds, default now); True when it changed.

        Setting the state it already has keeps the first change's time; a change older than the stored one
        (a message handled out of order) is ignored.
        """
        changed_at = datetime.fromtimestamp(self._clock.now() if at is None else at, UTC)
        async with self._sessions() as session:
            insert = _insert(session, CustomerSubscription).values(
                customer_id=customer_id, opted_out=opted_out, changed_at=changed_at, source=source
            )
            upsert = insert.on_conflict_do_update(
                index_elements=[CustomerSubscription.customer_id],
                set_={
                    "opted_out": insert.excluded.opted_out,
                    "changed_at": insert.excluded.changed_at,
                    "source": insert.excluded.source,
                },
                where=and_(
                    CustomerSubscription.opted_out != insert.excluded.opted_out,
                    CustomerSubscription.changed_at <= insert.excluded.changed_at,
                ),
            ).returning(CustomerSubscription.customer_id)
            changed = (await session.execute(upsert)).first() is not None
            await session.commit()
        return changed

    async def get(self, customer_id: int) -> SubscriptionState | None:
        """The stored state of this customer row itself (None: never changed, i.e. subscribed)."""
        async with self._sessions() as session:
            row = await session.get(CustomerSubscription, customer_id)
            if row is None:
                return None
            return SubscriptionState(row.customer_id, row.opted_out, row.changed_at, row.source)

    async def is_opted_out(self, customer_id: int) -> bool:
        """Whether the person behind this customer row opted out (the latest change among their kf/contact rows)."""
        me, them = aliased(Customer), aliased(Customer)
        stmt = (
            select(CustomerSubscription.opted_out)
            .join(them, them.id == CustomerSubscription.customer_id)
            .join(me, me.external_id == them.external_id)
            .where(me.id == customer_id, them.channel.in_(PERSON_CHANNELS))
            .order_by(CustomerSubscription.changed_at.desc(), CustomerSubscription.customer_id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            return bool(await session.scalar(stmt))

    async def opted_out_external_ids(self, external_ids: Iterable[str]) -> frozenset[str]:
        """Which of these external_userids are opted out now (for filtering a segment before sending)."""
        wanted = sorted(set(external_ids))
        latest: dict[str, tuple[datetime, int, bool]] = {}
        async with self._sessions() as session:
            for i in range(0, len(wanted), _CHUNK):
                stmt = (
                    select(
                        Customer.external_id,
                        CustomerSubscription.changed_at,
                        CustomerSubscription.customer_id,
                        CustomerSubscription.opted_out,
                    )
                    .join(Customer, Customer.id == CustomerSubscription.customer_id)
                    .where(Customer.channel.in_(PERSON_CHANNELS), Customer.external_id.in_(wanted[i : i + _CHUNK]))
                )
                for external_id, changed_at, row_id, opted_out in (await session.execute(stmt)).all():
                    seen = latest.get(external_id)
                    if seen is None or (changed_at, row_id) > seen[:2]:
                        latest[external_id] = (changed_at, row_id, opted_out)
        return frozenset(external_id for external_id, (_at, _id, out) in latest.items() if out)
