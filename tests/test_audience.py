"""Protecting the audience (handlers/audience.py, pure): quiet hours, daily caps, opt-out, de-duplication.

Instants are built from wall times in a named zone, so each case reads like the situation it describes.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.audience import (
    ALLOW,
    DEFAULT_POLICY,
    AudienceFacts,
    AudiencePolicy,
    DuplicationReport,
    Hold,
    HoldReason,
    PlannedTouch,
    ProposedSend,
    QuietHours,
    RecipientKind,
    SendKind,
    check,
    content_fingerprint,
    day_bounds,
    duplication_rate,
    duplication_report,
    normalise_content,
)

SHANGHAI = "Asia/Shanghai"
NEW_YORK = "America/New_York"
DAY = 86_400.0
FP = content_fingerprint("本周会员日：全场满200减30")


def at(wall: str, tz: str = SHANGHAI) -> float:
    """An instant from a local wall time, e.g. at("2026-03-02 23:00")."""
    return datetime.fromisoformat(wall).replace(tzinfo=ZoneInfo(tz)).timestamp()


def wall(instant: float, tz: str = SHANGHAI) -> str:
    return datetime.fromtimestamp(instant, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")


def to_customer(
    tz: str = SHANGHAI, kind: SendKind = SendKind.MARKETING, fingerprint: str = FP, recipient: str = "wmAlice"
) -> ProposedSend:
    return ProposedSend(recipient, RecipientKind.CUSTOMER, fingerprint, kind, "kf", tz)


def to_group(tz: str = SHANGHAI, kind: SendKind = SendKind.MARKETING) -> ProposedSend:
    return ProposedSend("wrGroup1", RecipientKind.GROUP, FP, kind, "robot", tz)


NO_FACTS = AudienceFacts()


# ---------------------------------------------------------------------------------------------- quiet hours


def test_defaults() -> None:
    assert AudiencePolicy() == DEFAULT_POLICY
    assert str(DEFAULT_POLICY.quiet_hours) == "22:00-08:00"
    assert (DEFAULT_POLICY.customer_daily_cap, DEFAULT_POLICY.group_daily_cap) == (3, 5)
    assert DEFAULT_POLICY.dedupe_window_s == 7 * DAY


@pytest.mark.parametrize(
    ("now", "until"),
    [
        ("2026-03-02 22:00", "2026-03-03 08:00"),  # quiet starts
        ("2026-03-02 23:30", "2026-03-03 08:00"),  # crosses midnight
        ("2026-03-03 00:00", "2026-03-03 08:00"),
        ("2026-03-03 07:59", "2026-03-03 08:00"),
    ],
)
def test_marketing_at_night_waits_for_the_morning(now: str, until: str) -> None:
    decision = DEFAULT_POLICY.decide(to_customer(), NO_FACTS, at(now))
    assert isinstance(decision, Hold) and not decision.allowed
    assert decision.reason is HoldReason.QUIET_HOURS
    assert decision.until is not None and wall(decision.until) == until


@pytest.mark.parametrize("now", ["2026-03-03 08:00", "2026-03-03 12:00", "2026-03-03 21:59"])
def test_marketing_in_the_day_goes(now: str) -> None:
    assert DEFAULT_POLICY.decide(to_customer(), NO_FACTS, at(now)) == ALLOW


def test_quiet_hours_are_the_recipients() -> None:
    now = at("2026-03-02 23:00")  # Shanghai night is 10:00 in New York
    assert DEFAULT_POLICY.decide(to_customer(NEW_YORK), NO_FACTS, now) == ALLOW
    held = DEFAULT_POLICY.decide(to_customer(NEW_YORK), NO_FACTS, at("2026-03-02 23:00", NEW_YORK))
    assert isinstance(held, Hold) and held.until is not None and wall(held.until, NEW_YORK) == "2026-03-03 08:00"


def test_quiet_hours_can_be_moved_or_switched_off() -> None:
    lunch = AudiencePolicy(quiet_hours=QuietHours.parse("12:00-14:00"))
    assert lunch.decide(to_customer(), NO_FACTS, at("2026-03-02 23:00")) == ALLOW
    held = lunch.decide(to_customer(), NO_FACTS, at("2026-03-02 12:30"))
    assert isinstance(held, Hold) and held.until is not None and wall(held.until) == "2026-03-02 14:00"
    assert AudiencePolicy(quiet_hours=None).decide(to_customer(), NO_FACTS, at("2026-03-02 23:00")) == ALLOW


def test_quiet_hours_ending_in_a_skipped_hour_end_at_the_clock_change() -> None:
    # 2026-03-08: New York jumps from 02:00 to 03:00, so 02:30 never shows on the clock.
    quiet = QuietHours.parse("22:00-02:30")
    end = quiet.ends_at(at("2026-03-08 01:00", NEW_YORK), NEW_YORK)
    assert wall(end, NEW_YORK) == "2026-03-08 03:00"
    assert not quiet.is_quiet(end, NEW_YORK) and quiet.is_quiet(end - 1, NEW_YORK)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("22:00-22:00", "no time or the whole day"),
        ("00:00-24:00", "no time or the whole day"),
        ("25:00-08:00", "not a time of day"),
        ("2200", "HH:MM-HH:MM"),
    ],
)
def test_bad_quiet_hours_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        QuietHours.parse(text)


def test_bad_policies_and_zones_are_refused() -> None:
    with pytest.raises(ValueError, match="customer_daily_cap"):
        AudiencePolicy(customer_daily_cap=-1)
    with pytest.raises(ValueError, match="dedupe_window_s"):
        AudiencePolicy(dedupe_window_s=0)
    with pytest.raises(ValueError, match="unknown timezone"):
        to_customer("Mars/Olympus")


# ---------------------------------------------------------------------------------------------- daily caps


def test_a_customer_gets_at_most_three_marketing_sends_a_day() -> None:
    noon = at("2026-03-02 12:00")
    assert DEFAULT_POLICY.decide(to_customer(), AudienceFacts(sends_today=2), noon) == ALLOW
    held = DEFAULT_POLICY.decide(to_customer(), AudienceFacts(sends_today=3), noon)
    assert isinstance(held, Hold) and held.reason is HoldReason.DAILY_CAP_CUSTOMER
    # Tomorrow starts at midnight, but midnight is in the quiet hours: the first moment it could go is 08:00.
    assert held.until is not None and wall(held.until) == "2026-03-03 08:00"
    no_quiet = AudiencePolicy(quiet_hours=None).decide(to_customer(), AudienceFacts(sends_today=3), noon)
    assert isinstance(no_quiet, Hold) and no_quiet.until is not None and wall(no_quiet.until) == "2026-03-03 00:00"


def test_a_group_gets_at_most_five() -> None:
    noon = at("2026-03-02 12:00")
    assert DEFAULT_POLICY.decide(to_group(), AudienceFacts(sends_today=4), noon) == ALLOW
    held = DEFAULT_POLICY.decide(to_group(), AudienceFacts(sends_today=5), noon)
    assert isinstance(held, Hold) and held.reason is HoldReason.DAILY_CAP_GROUP
    assert AudiencePolicy(group_daily_cap=None).decide(to_group(), AudienceFacts(sends_today=50), noon) == ALLOW


def test_days_are_counted_in_the_recipients_timezone() -> None:
    instant = at("2026-03-02 01:00")  # already Monday in Shanghai, still Sunday noon in New York
    start, end = DEFAULT_POLICY.day_bounds(instant, SHANGHAI)
    assert (wall(start), wall(end)) == ("2026-03-02 00:00", "2026-03-03 00:00")
    start, end = DEFAULT_POLICY.day_bounds(instant, NEW_YORK)
    assert (wall(start, NEW_YORK), wall(end, NEW_YORK)) == ("2026-03-01 00:00", "2026-03-02 00:00")
    start, end = day_bounds(at("2026-03-08 12:00", NEW_YORK), NEW_YORK)
    assert end - start == 23 * 3600  # the spring-forward day is 23 hours long


# ---------------------------------------------------------------------------------------------- opt-out and dupes


def test_an_opted_out_customer_gets_no_marketing_but_still_gets_transactional_sends() -> None:
    noon, night = at("2026-03-02 12:00"), at("2026-03-02 23:00")
    opted_out = AudienceFacts(opted_out=True)
    assert DEFAULT_POLICY.decide(to_customer(), opted_out, noon) == Hold(HoldReason.OPTED_OUT, None)
    assert DEFAULT_POLICY.decide(to_customer(kind=SendKind.TRANSACTIONAL), opted_out, night) == ALLOW
    busy = AudienceFacts(sends_today=99, opted_out=True, recent={FP: noon})
    assert DEFAULT_POLICY.decide(to_customer(kind=SendKind.TRANSACTIONAL), busy, night) == ALLOW


def test_the_same_content_reaches_a_customer_once_a_week() -> None:
    now = at("2026-03-10 12:00")
    sent = at("2026-03-07 10:00")
    held = DEFAULT_POLICY.decide(to_customer(), AudienceFacts(recent={FP: sent}), now)
    assert isinstance(held, Hold) and held.reason is HoldReason.DUPLICATE_CONTENT
    assert held.until is not None and wall(held.until) == "2026-03-14 10:00"  # when the first send leaves the window
    other = content_fingerprint("新品上市")
    assert DEFAULT_POLICY.decide(to_customer(fingerprint=other), AudienceFacts(recent={FP: sent}), now) == ALLOW
    long_ago = AudienceFacts(recent={FP: at("2026-03-03 11:59")})
    assert DEFAULT_POLICY.decide(to_customer(), long_ago, now) == ALLOW
    assert DEFAULT_POLICY.decide(to_group(), AudienceFacts(recent={FP: sent}), now) == ALLOW  # groups may repeat
    assert AudiencePolicy(dedupe_window_s=None).decide(to_customer(), AudienceFacts(recent={FP: sent}), now) == ALLOW


def test_the_most_lasting_reason_is_reported_first() -> None:
    night = at("2026-03-02 23:00")
    everything = AudienceFacts(sends_today=3, opted_out=True, recent={FP: night - 60})
    order = []
    for facts in (
        everything,
        AudienceFacts(sends_today=3, recent={FP: night - 60}),
        AudienceFacts(sends_today=3),
        NO_FACTS,
    ):
        decision = DEFAULT_POLICY.decide(to_customer(), facts, night)
        assert isinstance(decision, Hold)
        order.append(decision.reason)
    assert order == [
        HoldReason.OPTED_OUT,
        HoldReason.DUPLICATE_CONTENT,
        HoldReason.DAILY_CAP_CUSTOMER,
        HoldReason.QUIET_HOURS,
    ]


class RecordingPort:
    def __init__(self, facts: AudienceFacts) -> None:
        self.facts_given = facts
        self.asked: list[tuple[str, float, float, float]] = []

    async def facts(self, send: ProposedSend, day_start: float, day_end: float, dedupe_since: float) -> AudienceFacts:
        self.asked.append((send.recipient_id, day_start, day_end, dedupe_since))
        return self.facts_given


async def test_check_reads_the_recipients_day_and_window_through_the_port() -> None:
    port = RecordingPort(AudienceFacts(sends_today=3))
    now = at("2026-03-02 12:00", NEW_YORK)
    decision = await check(DEFAULT_POLICY, port, to_customer(NEW_YORK), now)
    assert isinstance(decision, Hold) and decision.reason is HoldReason.DAILY_CAP_CUSTOMER
    [(who, start, end, since)] = port.asked
    assert who == "wmAlice" and (wall(start, NEW_YORK), wall(end, NEW_YORK)) == ("2026-03-02 00:00", "2026-03-03 00:00")
    assert since == now - 7 * DAY
    assert await check(DEFAULT_POLICY, port, to_customer(kind=SendKind.TRANSACTIONAL), now) == ALLOW
    assert len(port.asked) == 1  # transactional sends read nothing


# ---------------------------------------------------------------------------------------------- fingerprints


def test_fingerprints_ignore_width_case_spacing_and_punctuation() -> None:
    one = content_fingerprint("【会员日】全场满200减30！点击 https://shop.example.com/Day")
    assert one == content_fingerprint("【会员日】 全场满２００减３０ 点击https://SHOP.example.com/day。")
    assert one == content_fingerprint("会員日：全場滿200減30，點擊 https://shop.example.com/day")  # traditional
    assert one != content_fingerprint("【会员日】全场满200减50！点击 https://shop.example.com/Day")
    assert content_fingerprint("标题", "https://a.example/x") != content_fingerprint("标题https://a.example/x", "")
    assert one.startswith("v1:") and len(one) == 35


@st.composite
def noisy(draw: st.DrawFn, text: str) -> str:
    """The same text with random spacing and punctuation between characters, some of it full width."""
    noise = st.sampled_from([" ", "\u3000", "，", "。", "！", "!", "、", "…", "\n", ""])
    out = []
    for char in text:
        out.append(draw(noise))
        out.append(unicodedata.normalize("NFKC", char) if draw(st.booleans()) else char)
    out.append(draw(noise))
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_noise_never_changes_a_fingerprint(data: st.DataObject) -> None:
    text = "明晚８点直播：新品ＡＢＣ限时9折"
    assert content_fingerprint(data.draw(noisy(text))) == content_fingerprint(text)


def test_normalised_content_is_what_counts() -> None:
    assert normalise_content(" Ｈｅｌｌｏ，　世界！ ") == "hello世界"
    assert normalise_content("¥99") == "¥99"  # symbols are content


# ---------------------------------------------------------------------------------------------- properties

ZONES = st.sampled_from([SHANGHAI, NEW_YORK, "Europe/London", "Australia/Lord_Howe", "UTC"])
INSTANTS = st.floats(min_value=1_600_000_000, max_value=1_900_000_000, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(now=INSTANTS, tz=ZONES)
def test_a_quiet_hold_ends_at_the_first_moment_outside_the_quiet_hours(now: float, tz: str) -> None:
    decision = DEFAULT_POLICY.decide(to_customer(tz), NO_FACTS, now)
    hour = datetime.fromtimestamp(now, ZoneInfo(tz)).hour
    if decision == ALLOW:
        assert 8 <= hour < 22
        return
    assert isinstance(decision, Hold) and decision.reason is HoldReason.QUIET_HOURS
    assert hour >= 22 or hour < 8
    assert decision.until is not None and now < decision.until <= now + 11 * 3600  # 11 h: a fall-back night
    assert DEFAULT_POLICY.decide(to_customer(tz), NO_FACTS, decision.until) == ALLOW
    assert DEFAULT_POLICY.decide(to_customer(tz), NO_FACTS, decision.until - 1) != ALLOW


@settings(max_examples=400, deadline=None)
@given(now=INSTANTS, tz=ZONES)
def test_local_days_tile_the_timeline(now: float, tz: str) -> None:
    start, end = day_bounds(now, tz)
    assert start <= now < end
    assert 22.5 * 3600 <= end - start <= 25 * 3600
    assert datetime.fromtimestamp(start, ZoneInfo(tz)).strftime("%H:%M") == "00:00"
    assert day_bounds(end, tz)[0] == end
    assert day_bounds(start - 1, tz)[1] == start


@settings(max_examples=300, deadline=None)
@given(now=INSTANTS, tz=ZONES, sent=st.integers(min_value=0, max_value=10), group=st.booleans())
def test_a_capped_send_waits_for_the_next_local_day_outside_quiet_hours(
    now: float, tz: str, sent: int, group: bool
) -> None:
    send = to_group(tz) if group else to_customer(tz)
    decision = DEFAULT_POLICY.decide(send, AudienceFacts(sends_today=sent), now)
    cap = 5 if group else 3
    if sent < cap:
        assert decision == ALLOW or (isinstance(decision, Hold) and decision.reason is HoldReason.QUIET_HOURS)
        return
    assert isinstance(decision, Hold) and decision.until is not None
    assert decision.reason is (HoldReason.DAILY_CAP_GROUP if group else HoldReason.DAILY_CAP_CUSTOMER)
    assert decision.until >= day_bounds(now, tz)[1]
    assert DEFAULT_POLICY.decide(send, NO_FACTS, decision.until) == ALLOW  # a fresh day, outside quiet hours


# ---------------------------------------------------------------------------------------------- duplication rate


def test_duplication_rate_of_a_plan() -> None:
    t0 = at("2026-03-02 10:00")
    brand = content_fingerprint("品牌故事：十年只做一件事")
    same_brand = content_fingerprint("品牌故事 —— 十年只做一件事！")  # the same story from another plan
    welcome = content_fingerprint("欢迎加入")
    touches = [PlannedTouch(f"wm{i}", welcome, t0) for i in range(18)]
    touches += [PlannedTouch("wm0", brand, t0 + 3600), PlannedTouch("wm0", same_brand, t0 + 2 * DAY)]
    report = duplication_report(touches)
    assert report == DuplicationReport(total=20, duplicates=1)
    assert report.rate == 0.05 and report.meets_bar()
    touches.append(PlannedTouch("wm1", welcome, t0 + 6 * DAY))
    assert duplication_report(touches).duplicates == 2 and not duplication_report(touches).meets_bar()
    assert duplication_rate([PlannedTouch("wm1", welcome, t0 + 8 * DAY), touches[1]]) == 0.0  # outside the window
    assert duplication_rate([]) == 0.0
    earlier = [PlannedTouch("wm5", welcome, t0 - DAY)]
    assert duplication_report(touches[:18], already_sent=earlier).duplicates == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["x", "y"]), st.integers(0, 30)),
        max_size=40,
    )
)
def test_duplicates_are_repeats_within_the_window_in_any_order(raw: list[tuple[str, str, int]]) -> None:
    touches = [PlannedTouch(who, what, day * DAY) for who, what, day in raw]
    report = duplication_report(touches)
    assert report == duplication_report(list(reversed(touches)))
    assert 0 <= report.duplicates <= max(0, report.total - 1) and 0.0 <= report.rate <= 1.0
    expected = 0
    for i, (who, what, day) in enumerate(sorted(raw, key=lambda r: r[2])):
        earlier = [d for w, f, d in sorted(raw, key=lambda r: r[2])[:i] if (w, f) == (who, what)]
        expected += bool(earlier) and day - max(earlier) < 7
    assert report.duplicates == expected
