"""Scheduled jobs: plain async functions `(port, now)`, free of APScheduler so tests call them directly.

Ports are small Protocols defined here; bot/ adapts its repositories to them (scheduler/ never imports bot/).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

# A customer whose tags were computed within this long before the run is skipped, so a job re-run after a
# restart (or a second replica running the same slot) resumes instead of redoing everyone.
RECOMPUTE_FRESH_FOR = timedelta(hours=20)


class TagRecomputePort(Protocol):
    """What the daily tag recompute needs from storage; the thresholds (TagConfig) live behind it."""

    async def customers_needing_recompute(
        self, stale_before: datetime, *, after_id: int = 0, limit: int = 1000
    ) -> list[int]:
        """Ids above after_id, ascending, whose computed tags are missing, older than stale_before or outdated."""
        ...

    async def recompute(self, customer_id: int, now: datetime) -> frozenset[str] | None:
        """Replace the customer's computed tags as of now (one transaction); None if the customer is unknown."""
        ...


@dataclass(frozen=True, slots=True)
class RecomputeResult:
    examined: int
    recomputed: int
    failed: int
    truncated: bool  # stopped at max_customers; the next run carries on (those customers are still stale)


async def recompute_tags_job(
    port: TagRecomputePort,
    now: datetime,
    *,
    page_size: int = 500,
    max_customers: int = 1_000_000,
    fresh_for: timedelta = RECOMPUTE_FRESH_FOR,
) -> RecomputeResult:
    """Recompute the computed tags of every customer that needs it, page by page, at most max_customers.

    Idempotent: the tags depend only on the stored facts and `now`, and each customer is replaced in its own
    transaction, so running twice (or on two replicas at once) gives the same tags. One customer failing is
    logged and skipped; the rest still run.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if page_size <= 0 or max_customers <= 0:
        raise ValueError("page_size and max_customers must be positive")
    stale_before = now - fresh_for
    examined = recomputed = failed = 0
    after_id = 0
    truncated = False
    while True:
        limit = min(page_size, max_customers - examined)
        if limit <= 0:
            truncated = bool(await port.customers_needing_recompute(stale_before, after_id=after_id, limit=1))
            break
        ids = await port.customers_needing_recompute(stale_before, after_id=after_id, limit=limit)
        if not ids:
            break
        for customer_id in ids:
            examined += 1
            try:
                tags = await port.recompute(customer_id, now)
            except Exception:
                failed += 1
                log.exception("tag recompute failed", customer_id=customer_id)
                continue
            recomputed += tags is not None
        after_id = ids[-1]
    result = RecomputeResult(examined, recomputed, failed, truncated)
    log.info(
        "tag recompute done",
        examined=examined,
        recomputed=recomputed,
        failed=failed,
        truncated=truncated,
        now=now.isoformat(),
    )
    return result


# ---- reminders (issue 5 item 6) --------------------------------------------------------------------------------


class ReminderPort(Protocol):
    """The reminders as the scheduler sees them (bot/reminders.ReminderService): every daily reminder due at
    `now`, idempotent per local day (a second run the same day creates nothing)."""

    async def run_daily(self, now: datetime) -> object: ...


async def daily_reminders_job(port: ReminderPort, now: datetime) -> object:
    """Create the day's reminder posts (digest, churn recall, repurchase); the delivery engine sends them."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return await port.run_daily(now)
