"""Computed customer tags: RFM scores and tier, lifecycle stage, activity and the five SOP classes (pure).

Every function takes `now` explicitly and refuses naive datetimes; nothing here does I/O.

Definitions (thresholds are fields of `TagConfig`; defaults in brackets):

- Recency R (1-5) from the days since the last paid order: R5 within `recency_days[0]` [7],
  R4 within [30], R3 within [90], R2 within [180], R1 older. R0 = never ordered.
- Frequency F (1-5) from the number of orders paid within the last `window_days` [365]:
  F1 from 1 order, F2 from `frequency_orders[0]` [2], F3 from [3], F4 from [5], F5 from [10]. F0 = none.
- Monetary M (1-5) from the amount paid within the same window, in cents: M1 above zero,
  M2 from `monetary_cents[0]` [¥200], M3 from [¥500], M4 from [¥1,000], M5 from [¥3,000]. M0 = nothing.
  Fixed tiers rather than quintiles, so a customer's score does not move when other customers buy.
- RFM tier: none (never ordered); otherwise by R+F+M: high from `rfm_high_total` [12], medium from
  `rfm_medium_total` [8], else low.
- Activity, from the days since the last interaction (the later of the last inbound message and the last
  paid order; the first contact when there is neither): active within `active_days` [30], silent within
  `churned_days` [90], churned beyond.
- Lifecycle stage: new while the first contact (or first order, if earlier) is within `new_days` [7];
  otherwise dormant when churned, or when the customer has ordered but not within `dormant_order_days` [180];
  otherwise mature from `mature_orders` [3] orders in the window; otherwise growing.
- SOP classes (may overlap; audience rules pick among them):
  新用户 = lifecycle new; 高价值 = RFM tier high and not churned; 沉默 = silent; 流失 = churned;
  潜客 = never ordered.

Besides the SOP classes every customer gets exactly one `rfm:*`, one `lifecycle:*` and one `activity:*` tag,
so the computed set is never empty (storage relies on that to know when tags were last computed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

DAY = timedelta(days=1)


class TagSource(StrEnum):
    """Where a customer tag came from."""

    WECOM = "wecom"  # corp tags on the external contact, synced from WeCom
    COMPUTED = "computed"  # derived here from orders and activity; replaced wholesale on recompute
    BOT = "bot"  # set by the bot or an operator (written back to WeCom with mark_tag by the sync)


class SopClass(StrEnum):
    """The five customer classes of the operating SOP, which are also tag names."""

    HIGH_VALUE = "高价值"
    SILENT = "沉默"
    CHURNED = "流失"
    PROSPECT = "潜客"
    NEW = "新用户"


class RfmTier(StrEnum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Lifecycle(StrEnum):
    NEW = "new"
    GROWING = "growing"
    MATURE = "mature"
    DORMANT = "dormant"


class Activity(StrEnum):
    ACTIVE = "active"
    SILENT = "silent"
    CHURNED = "churned"


COMPUTED_TAG_NAMES: frozenset[str] = frozenset(
    {c.value for c in SopClass}
    | {f"rfm:{t.value}" for t in RfmTier}
    | {f"lifecycle:{s.value}" for s in Lifecycle}
    | {f"activity:{a.value}" for a in Activity}
)
"""Every tag `computed_tags` can return, for validating audience rules against."""


def _ascending(name: str, values: Sequence[int]) -> None:
    if len(values) != 4 or any(v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"{name} must be four strictly ascending positive numbers, got {tuple(values)}")


@dataclass(frozen=True, slots=True)
class TagConfig:
    """Thresholds of the computed tags; see the module docstring for what each one means."""

    recency_days: tuple[int, int, int, int] = (7, 30, 90, 180)
    frequency_orders: tuple[int, int, int, int] = (2, 3, 5, 10)
    monetary_cents: tuple[int, int, int, int] = (20_000, 50_000, 100_000, 300_000)
    window_days: int = 365
    rfm_high_total: int = 12
    rfm_medium_total: int = 8
    new_days: int = 7
    active_days: int = 30
    churned_days: int = 90
    dormant_order_days: int = 180
    mature_orders: int = 3

    def __post_init__(self) -> None:
        _ascending("recency_days", self.recency_days)
        _ascending("frequency_orders", self.frequency_orders)
        _ascending("monetary_cents", self.monetary_cents)
        if self.frequency_orders[0] < 2:
            raise ValueError("frequency_orders must start at 2 or more (one order is F1)")
        if not 3 <= self.rfm_medium_total < self.rfm_high_total <= 15:
            raise ValueError("need 3 <= rfm_medium_total < rfm_high_total <= 15")
        if not 0 < self.active_days < self.churned_days:
            raise ValueError("need 0 < active_days < churned_days")
        for name in ("window_days", "new_days", "dormant_order_days", "mature_orders"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class PaidOrder:
    amount_cents: int
    paid_at: datetime


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What the computation knows about one customer."""

    first_seen_at: datetime
    last_inbound_at: datetime | None = None  # the last message the customer wrote; None if never
    orders: tuple[PaidOrder, ...] = ()


@dataclass(frozen=True, slots=True)
class RfmScores:
    recency: int
    frequency: int
    monetary: int

    @property
    def total(self) -> int:
        return self.recency + self.frequency + self.monetary


@dataclass(frozen=True, slots=True)
class CustomerProfile:
    """Everything computed for one customer; `tags` is what gets stored."""

    rfm: RfmScores
    tier: RfmTier
    lifecycle: Lifecycle
    activity: Activity
    classes: frozenset[SopClass]

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(
            {c.value for c in self.classes}
            | {f"rfm:{self.tier.value}", f"lifecycle:{self.lifecycle.value}", f"activity:{self.activity.value}"}
        )


class CorpTagSync(Protocol):
    """Port for the WeCom side of tags (externalcontact/get, mark_tag); wired in bot/, not implemented here."""

    async def fetch_corp_tags(self, external_userid: str) -> frozenset[str]:
        """The corp tag names currently on the external contact."""
        ...

    async def mark_tags(self, external_userid: str, add: Iterable[str], remove: Iterable[str]) -> None:
        """Write bot-set tags back to the external contact."""
        ...


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value


def _days_since(then: datetime, now: datetime) -> float:
    # A timestamp slightly in the future (clock skew between systems) counts as "just now".
    return max((now - then) / DAY, 0.0)


def _score_at_most(value: float, thresholds: Sequence[int]) -> int:
    """5 when value is within the first threshold, down to 1 beyond the last."""
    return 5 - sum(value > t for t in thresholds)


def _score_at_least(value: int, thresholds: Sequence[int]) -> int:
    """0 for nothing, 1 for something, +1 for each threshold reached."""
    if value <= 0:
        return 0
    return 1 + sum(value >= t for t in thresholds)


def rfm_scores(orders: Sequence[PaidOrder], now: datetime, config: TagConfig) -> RfmScores:
    """R, F and M, each 0 (no orders) or 1-5."""
    _aware(now, "now")
    if not orders:
        return RfmScores(0, 0, 0)
    last_paid = max(_aware(o.paid_at, "paid_at") for o in orders)
    window_start = now - config.window_days * DAY
    recent = [o for o in orders if o.paid_at >= window_start]
    return RfmScores(
        recency=_score_at_most(_days_since(last_paid, now), config.recency_days),
        frequency=_score_at_least(len(recent), config.frequency_orders),
        monetary=_score_at_least(sum(o.amount_cents for o in recent), config.monetary_cents),
    )


def rfm_tier(scores: RfmScores, config: TagConfig) -> RfmTier:
    """The tier from the sum of the scores; none when the customer never ordered."""
    if scores.recency == 0:
        return RfmTier.NONE
    if scores.total >= config.rfm_high_total:
        return RfmTier.HIGH
    if scores.total >= config.rfm_medium_total:
        return RfmTier.MEDIUM
    return RfmTier.LOW


def activity(facts: CustomerFacts, now: datetime, config: TagConfig) -> Activity:
    """Active, silent or churned by the days since the last interaction."""
    moments = [_aware(facts.first_seen_at, "first_seen_at")]
    if facts.last_inbound_at is not None:
        moments.append(_aware(facts.last_inbound_at, "last_inbound_at"))
    moments.extend(_aware(o.paid_at, "paid_at") for o in facts.orders)
    idle = _days_since(max(moments), _aware(now, "now"))
    if idle <= config.active_days:
        return Activity.ACTIVE
    if idle <= config.churned_days:
        return Activity.SILENT
    return Activity.CHURNED


def lifecycle(facts: CustomerFacts, now: datetime, config: TagConfig) -> Lifecycle:
    """New, growing, mature or dormant."""
    _aware(now, "now")
    first = min([_aware(facts.first_seen_at, "first_seen_at")] + [o.paid_at for o in facts.orders])
    if _days_since(first, now) <= config.new_days:
        return Lifecycle.NEW
    if activity(facts, now, config) is Activity.CHURNED:
        return Lifecycle.DORMANT
    if facts.orders:
        last_paid = max(o.paid_at for o in facts.orders)
        if _days_since(last_paid, now) > config.dormant_order_days:
            return Lifecycle.DORMANT
        window_start = now - config.window_days * DAY
        if sum(o.paid_at >= window_start for o in facts.orders) >= config.mature_orders:
            return Lifecycle.MATURE
    return Lifecycle.GROWING


def profile(facts: CustomerFacts, now: datetime, config: TagConfig | None = None) -> CustomerProfile:
    """The full computed profile of one customer at `now`."""
    config = config or TagConfig()
    scores = rfm_scores(facts.orders, now, config)
    tier = rfm_tier(scores, config)
    stage = lifecycle(facts, now, config)
    act = activity(facts, now, config)
    classes: set[SopClass] = set()
    if stage is Lifecycle.NEW:
        classes.add(SopClass.NEW)
    if tier is RfmTier.HIGH and act is not Activity.CHURNED:
        classes.add(SopClass.HIGH_VALUE)
    if act is Activity.SILENT:
        classes.add(SopClass.SILENT)
    if act is Activity.CHURNED:
        classes.add(SopClass.CHURNED)
    if not facts.orders:
        classes.add(SopClass.PROSPECT)
    return CustomerProfile(rfm=scores, tier=tier, lifecycle=stage, activity=act, classes=frozenset(classes))


def computed_tags(facts: CustomerFacts, now: datetime, config: TagConfig | None = None) -> frozenset[str]:
    """The computed tag names of one customer at `now` (never empty)."""
    return profile(facts, now, config).tags


ACTIVE_TAG = f"activity:{Activity.ACTIVE.value}"


def recompute_due_on_inbound(computed: frozenset[str]) -> bool:
    """Whether a message the customer just wrote can change their computed tags: none yet, or not active.

    A customer already tagged active stays active whatever the new message; every other change (a new RFM
    score, new → growing) comes from orders or the passing of time, which the daily job and imports cover.
    """
    return not computed or ACTIVE_TAG not in computed
