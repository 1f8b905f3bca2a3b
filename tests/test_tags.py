"""Computed customer tags (pure): RFM thresholds and their boundaries, lifecycle, activity, the SOP classes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from handlers.tags import (
    COMPUTED_TAG_NAMES,
    Activity,
    CustomerFacts,
    Lifecycle,
    PaidOrder,
    RfmScores,
    RfmTier,
    SopClass,
    TagConfig,
    activity,
    computed_tags,
    lifecycle,
    profile,
    rfm_scores,
    rfm_tier,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
CONFIG = TagConfig()


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def order(days: float, yuan: int = 100) -> PaidOrder:
    return PaidOrder(amount_cents=yuan * 100, paid_at=days_ago(days))


def facts(first_seen_days: float = 400, inbound_days: float | None = None, *orders: PaidOrder) -> CustomerFacts:
    inbound = None if inbound_days is None else days_ago(inbound_days)
    return CustomerFacts(first_seen_at=days_ago(first_seen_days), last_inbound_at=inbound, orders=orders)


# --- RFM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "score"),
    [(0, 5), (7, 5), (7.001, 4), (30, 4), (31, 3), (90, 3), (91, 2), (180, 2), (181, 1), (1000, 1)],
)
def test_recency_boundaries_are_inclusive(days: float, score: int) -> None:
    assert rfm_scores([order(days)], NOW, CONFIG).recency == score


@pytest.mark.parametrize(("count", "score"), [(1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (9, 4), (10, 5), (40, 5)])
def test_frequency_counts_orders_in_the_window(count: int, score: int) -> None:
    orders = [order(10, yuan=1) for _ in range(count)]
    assert rfm_scores(orders, NOW, CONFIG).frequency == score


def test_orders_outside_the_window_count_for_recency_only() -> None:
    scores = rfm_scores([order(366, yuan=10_000)] * 20, NOW, CONFIG)
    assert scores == RfmScores(recency=1, frequency=0, monetary=0)
    assert rfm_scores([order(365, yuan=1)], NOW, CONFIG).frequency == 1  # the window edge is inside


@pytest.mark.parametrize(
    ("cents", "score"),
    [(0, 0), (1, 1), (19_999, 1), (20_000, 2), (49_999, 2), (50_000, 3), (100_000, 4), (299_999, 4), (300_000, 5)],
)
def test_monetary_tiers_in_cents(cents: int, score: int) -> None:
    assert rfm_scores([PaidOrder(cents, days_ago(1))], NOW, CONFIG).monetary == score


def test_no_orders_score_zero_and_tier_none() -> None:
    scores = rfm_scores([], NOW, CONFIG)
    assert scores == RfmScores(0, 0, 0)
    assert rfm_tier(scores, CONFIG) is RfmTier.NONE


@pytest.mark.parametrize(
    ("scores", "tier"),
    [
        (RfmScores(5, 5, 5), RfmTier.HIGH),
        (RfmScores(4, 4, 4), RfmTier.HIGH),
        (RfmScores(5, 4, 2), RfmTier.MEDIUM),
        (RfmScores(3, 3, 2), RfmTier.MEDIUM),
        (RfmScores(3, 2, 2), RfmTier.LOW),
        (RfmScores(1, 0, 0), RfmTier.LOW),
    ],
)
def test_tier_by_total(scores: RfmScores, tier: RfmTier) -> None:
    assert rfm_tier(scores, CONFIG) is tier


def test_thresholds_come_from_the_config() -> None:
    strict = TagConfig(recency_days=(1, 2, 3, 4), monetary_cents=(1_000, 2_000, 3_000, 4_000))
    scores = rfm_scores([order(2.5, yuan=25)], NOW, strict)
    assert (scores.recency, scores.monetary) == (3, 3)  # 2.5 days: past 1 and 2, within 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recency_days": (30, 7, 90, 180)},
        {"recency_days": (7, 7, 90, 180)},
        {"monetary_cents": (0, 1, 2, 3)},
        {"frequency_orders": (1, 3, 5, 10)},
        {"active_days": 90, "churned_days": 90},
        {"rfm_medium_total": 12, "rfm_high_total": 12},
        {"new_days": 0},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TagConfig(**kwargs)  # type: ignore[arg-type]


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        rfm_scores([order(1)], NOW.replace(tzinfo=None), CONFIG)
    with pytest.raises(ValueError, match="timezone-aware"):
        activity(CustomerFacts(first_seen_at=datetime(2025, 1, 1)), NOW, CONFIG)


# --- activity and lifecycle -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idle_days", "expected"),
    [
        (0, Activity.ACTIVE),
        (30, Activity.ACTIVE),
        (30.5, Activity.SILENT),
        (90, Activity.SILENT),
        (91, Activity.CHURNED),
    ],
)
def test_activity_by_days_since_last_inbound(idle_days: float, expected: Activity) -> None:
    assert activity(facts(400, idle_days), NOW, CONFIG) is expected


def test_activity_counts_orders_and_first_contact_too() -> None:
    assert activity(facts(400, 200, order(3)), NOW, CONFIG) is Activity.ACTIVE  # bought recently, never wrote
    assert activity(facts(10), NOW, CONFIG) is Activity.ACTIVE  # just added, silent so far
    assert activity(facts(100), NOW, CONFIG) is Activity.CHURNED


def test_future_timestamps_count_as_now() -> None:
    assert activity(facts(400, -1), NOW, CONFIG) is Activity.ACTIVE


@pytest.mark.parametrize(
    ("customer", "stage"),
    [
        (facts(7), Lifecycle.NEW),
        (facts(7.01, 1), Lifecycle.GROWING),
        (facts(3, 1, order(1), order(1), order(1)), Lifecycle.NEW),  # new wins over order count
        (facts(400, 1, order(5)), Lifecycle.GROWING),
        (facts(400, 1, order(5), order(50), order(300)), Lifecycle.MATURE),
        (facts(400, 1, order(5), order(50), order(400)), Lifecycle.GROWING),  # third order outside the window
        (facts(400, 1, order(181)), Lifecycle.DORMANT),  # writes, but stopped buying
        (facts(400, 100), Lifecycle.DORMANT),  # churned prospect
    ],
)
def test_lifecycle(customer: CustomerFacts, stage: Lifecycle) -> None:
    assert lifecycle(customer, NOW, CONFIG) is stage


def test_first_order_before_first_contact_makes_an_old_customer() -> None:
    assert lifecycle(facts(1, 1, order(60)), NOW, CONFIG) is Lifecycle.GROWING


# --- the five SOP classes -------------------------------------------------------------------------


def loyal_orders() -> tuple[PaidOrder, ...]:
    return tuple(order(d, yuan=400) for d in (2, 20, 40, 60, 80, 100, 150, 200, 250, 300))


def test_high_value() -> None:
    result = profile(facts(400, 2, *loyal_orders()), NOW)
    assert result.rfm == RfmScores(5, 5, 5) and result.tier is RfmTier.HIGH
    assert result.classes == {SopClass.HIGH_VALUE}
    assert result.tags == {"高价值", "rfm:high", "lifecycle:mature", "activity:active"}


def test_silent_high_value_stays_high_value() -> None:
    orders = tuple(order(d + 45, yuan=400) for d in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9))
    result = profile(facts(400, 45, *orders), NOW)
    assert result.tier is RfmTier.HIGH  # R3 + F5 + M5
    assert result.classes == {SopClass.HIGH_VALUE, SopClass.SILENT}


def test_churned_high_value_is_only_churned() -> None:
    orders = tuple(order(d + 100, yuan=400) for d in range(10))
    result = profile(facts(400, 100, *orders), NOW)
    assert result.classes == {SopClass.CHURNED}
    assert result.lifecycle is Lifecycle.DORMANT


def test_silent_buyer() -> None:
    assert computed_tags(facts(400, 60, order(60)), NOW) == {"沉默", "rfm:low", "lifecycle:growing", "activity:silent"}


def test_churned_buyer() -> None:
    result = profile(facts(400, 120, order(120)), NOW)
    assert result.classes == {SopClass.CHURNED}
    assert result.activity is Activity.CHURNED


def test_prospect_is_contact_without_orders() -> None:
    assert profile(facts(60, 5), NOW).classes == {SopClass.PROSPECT}
    assert profile(facts(60, 45), NOW).classes == {SopClass.PROSPECT, SopClass.SILENT}


def test_new_customer_is_new_and_prospect_until_first_order() -> None:
    assert profile(facts(1), NOW).classes == {SopClass.NEW, SopClass.PROSPECT}
    assert profile(facts(1, 0, order(0)), NOW).classes == {SopClass.NEW}


def test_now_is_injected_so_the_same_customer_ages() -> None:
    customer = CustomerFacts(first_seen_at=NOW, last_inbound_at=NOW)
    assert profile(customer, NOW).classes == {SopClass.NEW, SopClass.PROSPECT}
    assert profile(customer, NOW + timedelta(days=40)).classes == {SopClass.PROSPECT, SopClass.SILENT}
    assert profile(customer, NOW + timedelta(days=100)).classes == {SopClass.PROSPECT, SopClass.CHURNED}


def test_every_result_has_one_tag_per_axis_and_only_known_tags() -> None:
    cases = [facts(1), facts(400, 2, *loyal_orders()), facts(400, 120, order(120)), facts(60, 45)]
    for customer in cases:
        tags = computed_tags(customer, NOW)
        assert tags <= COMPUTED_TAG_NAMES
        for axis in ("rfm:", "lifecycle:", "activity:"):
            assert sum(t.startswith(axis) for t in tags) == 1
    assert {c.value for c in SopClass} == {"高价值", "沉默", "流失", "潜客", "新用户"}
