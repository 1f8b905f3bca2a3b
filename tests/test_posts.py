"""Scheduled posts: slot maths (scheduler/slots.py), content limits (handlers/post_content.py) and the
delivery-row storage (bot/storage/posts_repository.py) on both backends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.storage.db import create_session_factory
from bot.storage.models import DeliveryState, TargetKind
from bot.storage.posts_repository import NewTarget, PostRecord, PostRepository
from handlers.post_content import ContentError, render
from scheduler.slots import (
    Rule,
    RuleError,
    china_month_bounds,
    next_slots,
    slot_key,
    slots_between,
    validate_rule,
)

SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2025, 3, 1, 8, 0, tzinfo=SH)


def sh(*args: int) -> datetime:
    return datetime(*args, tzinfo=SH)  # type: ignore[misc]


# ---- slots ---------------------------------------------------------------------------------------------------


def test_daily_cron_slots_in_a_window_are_the_shanghai_instants() -> None:
    rule = Rule("cron", cron="0 9 * * *")
    slots = slots_between(rule, sh(2025, 3, 1, 0, 0), sh(2025, 3, 4, 0, 0))
    assert slots == [sh(2025, 3, d, 9, 0).astimezone(UTC) for d in (1, 2, 3)]
    assert all(s.tzinfo is UTC for s in slots)


def test_window_is_half_open_and_recomputing_it_gives_the_same_slots() -> None:
    rule = Rule("cron", cron="*/10 * * * *")
    first = slots_between(rule, sh(2025, 3, 1, 9, 0), sh(2025, 3, 1, 9, 30))
    assert [s.astimezone(SH).minute for s in first] == [0, 10, 20]  # 09:30 is not in [09:00, 09:30)
    # A clock that went back and asks again gets the very same instants (so the same idempotency keys).
    again = slots_between(rule, sh(2025, 3, 1, 8, 55), sh(2025, 3, 1, 9, 30))
    assert again == first
    assert {slot_key(1, 2, s) for s in again} == {slot_key(1, 2, s) for s in first}


def test_cron_in_another_time_zone_follows_its_dst() -> None:
    rule = Rule("cron", cron="0 9 * * *", timezone="America/New_York")
    before, after = slots_between(rule, datetime(2025, 3, 8, tzinfo=UTC), datetime(2025, 3, 10, 0, tzinfo=UTC))
    assert before.hour == 14 and after.hour == 13  # EST (UTC-5) then EDT (UTC-4)


@pytest.mark.parametrize(
    ("weekdays", "expected"),
    [
        ("1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0", ["Sun"]),
        ("7", ["Sun"]),
        ("5", ["Fri"]),
        ("0-2", ["Sun", "Mon", "Tue"]),
        ("1,3,5", ["Mon", "Wed", "Fri"]),
        ("mon-fri", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("*/2", ["Sun", "Tue", "Thu", "Sat"]),
        ("1-5/2", ["Mon", "Wed", "Fri"]),
    ],
)
def test_weekday_numbers_mean_what_they_mean_in_crontab(weekdays: str, expected: list[str]) -> None:
    # APScheduler 3 counts weekdays from Monday = 0; crontab from Sunday = 0. A week of 09:00 slots from
    # Sunday 2025-03-02 shows which days fire.
    rule = Rule("cron", cron=f"0 9 * * {weekdays}")
    days = [s.astimezone(SH).strftime("%a") for s in slots_between(rule, sh(2025, 3, 2), sh(2025, 3, 9))]
    assert sorted(days) == sorted(expected)


def test_weekday_numbers_out_of_range_are_refused() -> None:
    with pytest.raises(RuleError, match="weekdays are 0-7"):
        validate_rule(Rule("cron", cron="0 9 * * 8"), NOW)


def test_one_off_slot_only_inside_its_window() -> None:
    rule = Rule("at", at=sh(2025, 3, 1, 9, 0))
    assert slots_between(rule, sh(2025, 3, 1, 8, 0), sh(2025, 3, 1, 9, 0)) == []
    assert slots_between(rule, sh(2025, 3, 1, 9, 0), sh(2025, 3, 1, 9, 1)) == [sh(2025, 3, 1, 9, 0)]
    assert slots_between(rule, sh(2025, 3, 1, 9, 1), sh(2025, 3, 2)) == []
    assert next_slots(rule, sh(2025, 3, 1, 8, 0), 3) == [sh(2025, 3, 1, 9, 0)]


def test_a_long_window_is_cut_at_the_limit() -> None:
    rule = Rule("cron", cron="* * * * *")
    slots = slots_between(rule, sh(2025, 3, 1), sh(2025, 3, 2), limit=50)
    assert len(slots) == 50 and slots[-1] == sh(2025, 3, 1, 0, 49).astimezone(UTC)


def test_sop_steps_have_no_calendar_slots() -> None:
    rule = validate_rule(Rule("sop", sop_plan="new_customer", sop_offset_s=3600), NOW)
    assert slots_between(rule, NOW, NOW + timedelta(days=30)) == []


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (Rule("cron", cron="0 25 * * *"), "invalid cron '0 25 * * *'"),
        (Rule("cron", cron="0 9 * *"), "need 5 fields"),
        (Rule("cron", cron="0 0 30 2 *"), "never fires"),
        (Rule("cron", cron="0 9 * * *", timezone="Mars/Olympus"), "unknown time zone 'Mars/Olympus'"),
        (Rule("at", at=sh(2025, 3, 1, 7, 59)), "2025-03-01 07:59 (Asia/Shanghai) is in the past"),
        (Rule("at", at=NOW), "is in the past"),
        (Rule("at"), "needs a time"),
        (Rule("sop", sop_plan="p", sop_offset_s=-1), "offset"),
        (Rule("weekly"), "unknown rule kind"),
    ],
)
def test_bad_rules_are_refused_with_one_clear_line(rule: Rule, message: str) -> None:
    with pytest.raises(RuleError) as refused:
        validate_rule(rule, NOW)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_valid_rules_pass() -> None:
    assert validate_rule(Rule("cron", cron="0 9 * * 1-5"), NOW).cron == "0 9 * * 1-5"
    assert validate_rule(Rule("at", at=NOW + timedelta(minutes=1)), NOW).kind == "at"


def test_china_month_bounds_use_china_time() -> None:
    # 2025-03-31 20:00 UTC is already April 1st in Shanghai.
    start, end = china_month_bounds(datetime(2025, 3, 31, 20, 0, tzinfo=UTC))
    assert start == sh(2025, 4, 1).astimezone(UTC) and end == sh(2025, 5, 1).astimezone(UTC)
    start, end = china_month_bounds(sh(2025, 12, 15))
    assert end == sh(2026, 1, 1).astimezone(UTC)


# ---- content -------------------------------------------------------------------------------------------------


def test_robot_text_limit_is_2048_bytes_of_utf8() -> None:
    assert render("text", {"text": "好" * 682}, "robot").body == {"content": "好" * 682}  # 2046 bytes
    with pytest.raises(ContentError, match="2049 bytes, over WeCom's limit of 2048 bytes"):
        render("text", {"text": "好" * 683}, "robot")


def test_robot_markdown_limit_is_4096_bytes_and_customer_groups_take_4000() -> None:
    assert render("markdown", {"markdown": "a" * 4096}, "robot").msgtype == "markdown"
    with pytest.raises(ContentError, match="4097 bytes"):
        render("markdown", {"markdown": "a" * 4097}, "robot")
    with pytest.raises(ContentError, match="over WeCom's limit of 4000 bytes"):
        render("text", {"text": "a" * 4001}, "group_chat")


def test_channels_refuse_kinds_they_cannot_carry() -> None:
    with pytest.raises(ContentError, match="a group robot cannot receive file posts"):
        render("file", {"media_id": "m"}, "robot")
    with pytest.raises(ContentError, match="a customer group cannot receive markdown posts"):
        render("markdown", {"markdown": "x"}, "group_chat")


def test_news_needs_one_to_eight_articles_with_short_titles() -> None:
    article = {"title": "t", "url": "https://example.com"}
    assert render("news", {"articles": [article] * 8}, "robot").msgtype == "news"
    with pytest.raises(ContentError, match="1 to 8 articles"):
        render("news", {"articles": [article] * 9}, "robot")
    with pytest.raises(ContentError, match="article 1 title is 129 bytes"):
        render("news", {"articles": [{"title": "x" * 129, "url": "u"}]}, "robot")


def test_a_link_becomes_a_news_card_for_robots_and_an_attachment_for_customer_groups() -> None:
    link = {"title": "直播预告", "url": "https://example.com/live", "description": "今晚八点"}
    assert render("link", link, "robot").body["articles"][0]["title"] == "直播预告"
    mass = render("link", link, "group_chat")
    assert mass.body == {
        "attachments": [
            {"msgtype": "link", "link": {"title": "直播预告", "url": "https://example.com/live", "desc": "今晚八点"}}
        ]
    }


# ---- storage -------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.value = now.timestamp()

    def now(self) -> float:
        return self.value


@pytest.fixture
def repo(engine: AsyncEngine) -> PostRepository:
    return PostRepository(create_session_factory(engine), FakeClock(NOW))


async def _post(repo: PostRepository, rule: Rule, *targets: NewTarget) -> PostRecord:
    return await repo.add_post(
        owner="zhangsan",
        title="每日话题",
        kind="text",
        content={"text": "今日话题"},
        rule=rule,
        targets=targets or (NewTarget(TargetKind.STAFF, "lisi"),),
    )


async def test_post_round_trip_with_targets(repo: PostRepository) -> None:
    post = await _post(
        repo,
        Rule("cron", cron="0 9 * * *"),
        NewTarget(TargetKind.STAFF, "lisi"),
        NewTarget(TargetKind.GROUP_CHAT, "wrChat", {"sender": "zhangsan"}),
    )
    loaded = await repo.get_post(post.id)
    assert loaded is not None
    assert loaded.rule == Rule("cron", cron="0 9 * * *", timezone="Asia/Shanghai")
    assert [(t.kind, t.ref, dict(t.params)) for t in loaded.targets] == [
        (TargetKind.STAFF, "lisi", {}),
        (TargetKind.GROUP_CHAT, "wrChat", {"sender": "zhangsan"}),
    ]
    assert loaded.materialised_until == NOW.astimezone(UTC)


async def test_materialising_twice_or_concurrently_inserts_each_slot_once(repo: PostRepository) -> None:
    post = await _post(
        repo, Rule("cron", cron="*/10 * * * *"), NewTarget(TargetKind.STAFF, "a"), NewTarget(TargetKind.STAFF, "b")
    )
    slots = slots_between(post.rule, NOW, NOW + timedelta(minutes=30))
    until = NOW + timedelta(minutes=30)
    counts = await asyncio.gather(*(repo.materialise(post, slots, until, NOW) for _ in range(4)))
    assert sum(counts) == 6  # 3 slots x 2 targets, whoever inserted them
    assert await repo.materialise(post, slots, until, NOW) == 0
    rows = await repo.deliveries(post_id=post.id)
    assert len(rows) == 6 and {r.state for r in rows} == {DeliveryState.SCHEDULED}
    assert len({r.idempotency_key for r in rows}) == 6


async def test_watermark_never_moves_back(repo: PostRepository) -> None:
    post = await _post(repo, Rule("cron", cron="*/10 * * * *"))
    later = NOW + timedelta(hours=1)
    await repo.materialise(post, [], later, NOW)
    await repo.materialise(post, [], NOW + timedelta(minutes=5), NOW)  # a clock that went back
    loaded = await repo.get_post(post.id)
    assert loaded is not None and loaded.materialised_until == later.astimezone(UTC)


async def test_two_claimers_never_claim_the_same_row(repo: PostRepository) -> None:
    post = await _post(repo, Rule("cron", cron="* * * * *"))
    slots = slots_between(post.rule, NOW, NOW + timedelta(minutes=40))
    await repo.materialise(post, slots, NOW + timedelta(minutes=40), NOW)
    at = NOW + timedelta(hours=1)
    first, second = await asyncio.gather(repo.claim_due(at, "a" * 16, limit=25), repo.claim_due(at, "b" * 16, limit=25))
    ids_a, ids_b = {d.id for d in first}, {d.id for d in second}
    assert not ids_a & ids_b and len(ids_a | ids_b) == 40
    # A claim is held by its token only: the other token cannot finish it.
    row = first[0] if first else second[0]
    other = "b" * 16 if row.claim_token == "a" * 16 else "a" * 16
    assert not await repo.finish(row.id, other, DeliveryState.SENT, at)
    assert await repo.finish(row.id, row.claim_token or "", DeliveryState.SENT, at)


async def test_cancel_skips_the_scheduled_rows_only(repo: PostRepository) -> None:
    post = await _post(repo, Rule("cron", cron="*/30 * * * *"))
    slots = slots_between(post.rule, NOW, NOW + timedelta(hours=2))
    await repo.materialise(post, slots, NOW + timedelta(hours=2), NOW)
    [claimed] = await repo.claim_due(NOW, "t" * 16, limit=1)
    assert await repo.finish(claimed.id, "t" * 16, DeliveryState.SENT, NOW)
    assert await repo.cancel_post(post.id) == 3
    states = [d.state for d in await repo.deliveries(post_id=post.id)]
    assert states == [DeliveryState.SENT] + [DeliveryState.SKIPPED] * 3
    assert await repo.cancel_post(999_999) is None


async def test_robot_keys_are_hidden_from_repr(repo: PostRepository) -> None:
    robot = await repo.add_robot("运营群", "secret-webhook-key-123456")
    assert "secret-webhook-key" not in repr(robot)
    assert robot.masked_key == "…3456"
    assert [r.name for r in await repo.list_robots()] == ["运营群"]
