"""Read-only counts over scheduled posts' delivery rows, for the REST API and the console's list views."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select

from bot.storage.models import PostDelivery
from bot.storage.repositories import _Repository

# post id -> target id -> delivery state -> rows
DeliveryCounts = dict[int, dict[int, dict[str, int]]]


class PostStatsRepository(_Repository):
    async def delivery_counts(self, post_ids: Iterable[int]) -> DeliveryCounts:
        """Delivery rows per post, target and state, in one grouped query (posts without rows are absent)."""
        wanted = sorted(set(post_ids))
        if not wanted:
            return {}
        stmt = (
            select(PostDelivery.post_id, PostDelivery.target_id, PostDelivery.state, func.count())
            .where(PostDelivery.post_id.in_(wanted))
            .group_by(PostDelivery.post_id, PostDelivery.target_id, PostDelivery.state)
        )
        out: DeliveryCounts = {}
        async with self._sessions() as session:
            for post_id, target_id, state, count in (await session.execute(stmt)).all():
                out.setdefault(int(post_id), {}).setdefault(int(target_id), {})[str(state)] = int(count)
        return out
