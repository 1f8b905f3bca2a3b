"""Business calendars (pure): open/closed, next opening, business seconds, holidays, 调休 and DST transitions."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.business_hours import ALWAYS_OPEN, BusinessCalendar, Interval, always_open

SHANGHAI = "Asia/Shanghai"

# The SOP team: weekdays with a lunch break, Saturday short day; National Day off, a Sunday 调休 workday.
TEAM = BusinessCalendar.build(
    {"mon-fri": ["09:00-12:00", "13:30-18:00"], "sat": ["10:00-16:00"]},
    holidays=[date(2025, 10, 1), date(2025, 10, 2), date(2025, 10, 3)],
    extra_workdays=[date(2025, 9, 28)],
)


def local(tz: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Epoch seconds of a local wall time (first occurrence when ambiguous)."""
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(tz)).timestamp()


def sh(*args: int) -> float:
    return local(SHANGHAI, *args)


def utc(*args: int) -> float:
    return local("UTC", *args)


HOUR = 3600.0

# --- open or closed -------------------------------------------------------------------------------
# 2025-06-02 is a Monday; 2025-06-07 a Saturday; 2025-06-08 a Sunday.


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        ((2025, 6, 2, 8, 59, 59), False),
        ((2025, 6, 2, 9, 0), True),
        ((2025, 6, 2, 11, 59, 59), True),
        ((2025, 6, 2, 12, 0), False),  # lunch
        ((2025, 6, 2, 13, 30), True),
        ((2025, 6, 2, 18, 0), False),
        ((2025, 6, 7, 10, 0), True),  # Saturday short day
        ((2025, 6, 7, 16, 0), False),
        ((2025, 6, 8, 12, 0), False),  # Sunday
        ((2025, 10, 1, 10, 0), False),  # National Day (a Wednesday)
        ((2025, 9, 28, 10, 0), True),  # 调休: a Sunday worked with Monday's hours
        ((2025, 9, 28, 12, 30), False),
    ],
)
def test_is_open_follows_intervals_holidays_and_makeup_days(when: tuple[int, ...], is_open: bool) -> None:
    assert TEAM.is_open(sh(*when)) is is_open


@pytest.mark.parametrize(
    ("when", "opens"),
    [
        ((2025, 6, 2, 10, 0), (2025, 6, 2, 10, 0)),  # open: itself
        ((2025, 6, 2, 12, 10), (2025, 6, 2, 13, 30)),  # lunch
        ((2025, 6, 6, 18, 30), (2025, 6, 7, 10, 0)),  # Friday evening → Saturday
        ((2025, 6, 7, 16, 0), (2025, 6, 9, 9, 0)),  # Saturday close → Monday
        ((2025, 9, 30, 18, 0), (2025, 10, 4, 10, 0)),  # before the holiday → Saturday after it
        ((2025, 9, 27, 17, 0), (2025, 9, 28, 9, 0)),  # Saturday → the 调休 Sunday
    ],
)
def test_next_open(when: tuple[int, ...], opens: tuple[int, ...]) -> None:
    assert TEAM.next_open(sh(*when)) == sh(*opens)


def test_business_seconds_count_only_open_time_and_are_antisymmetric() -> None:
    monday_morning, monday_night = sh(2025, 6, 2, 8, 0), sh(2025, 6, 2, 20, 0)
    assert TEAM.business_seconds_between(monday_morning, monday_night) == 7.5 * HOUR
    assert TEAM.business_seconds_between(monday_night, monday_morning) == -7.5 * HOUR
    # Friday 17:00 → Monday 10:00: 1 h Friday + 6 h Saturday + 1 h Monday.
    assert TEAM.business_seconds_between(sh(2025, 6, 6, 17, 0), sh(2025, 6, 9, 10, 0)) == 8 * HOUR


@pytest.mark.parametrize(
    ("start", "seconds", "due"),
    [
        ((2025, 6, 2, 10, 0), 30, (2025, 6, 2, 10, 0, 30)),
        ((2025, 6, 2, 11, 59, 50), 30, (2025, 6, 2, 13, 30, 20)),  # across lunch
        ((2025, 6, 6, 17, 59, 30), 30, (2025, 6, 6, 18, 0)),  # exactly at closing: due at the close
        ((2025, 6, 6, 17, 59, 30), 31, (2025, 6, 7, 10, 0, 1)),
        ((2025, 6, 6, 20, 0), 30, (2025, 6, 7, 10, 0, 30)),  # a clock started after hours starts at opening
        ((2025, 6, 2, 12, 30), 0, (2025, 6, 2, 12, 30)),  # zero seconds have passed at the start itself
    ],
)
def test_add_business_seconds(start: tuple[int, ...], seconds: float, due: tuple[int, ...]) -> None:
    assert TEAM.add_business_seconds(sh(*start), seconds) == sh(*due)


def test_always_open_is_plain_arithmetic() -> None:
    at = sh(2025, 10, 1, 3, 0)
    assert ALWAYS_OPEN.always_open
    assert ALWAYS_OPEN.is_open(at)
    assert ALWAYS_OPEN.next_open(at) == at
    assert ALWAYS_OPEN.add_business_seconds(at, 30) == at + 30
    assert ALWAYS_OPEN.business_seconds_between(at, at + 99.5) == 99.5
    assert not TEAM.always_open


def test_adjacent_intervals_merge() -> None:
    calendar = BusinessCalendar.build({"mon": ["09:00-12:00", "12:00-13:00"]})
    assert calendar.weekly[0] == (Interval.parse("09:00-13:00"),)
    assert str(calendar.weekly[0][0]) == "09:00-13:00"


@pytest.mark.parametrize(
    ("hours", "message"),
    [
        ({"mon": ["22:00-02:00"]}, "crosses midnight: split it into 22:00-24:00 and 00:00-02:00"),
        ({"mon": ["09:00-09:00"]}, "empty or crosses midnight"),
        ({"mon": ["09:00-25:00"]}, "not a time of day"),
        ({"mon": ["9am-5pm"]}, "not a HH:MM time"),
        ({"mon": ["09:00"]}, "not an interval"),
        ({"mon": ["09:00-12:00", "11:00-13:00"]}, "overlapping"),
        ({"mon-fri": ["09:00-12:00"], "fri": ["10:00-11:00"]}, "overlapping"),
        ({"funday": ["09:00-12:00"]}, "unknown weekday"),
        ({"fri-mon": ["09:00-12:00"]}, "runs backwards"),
        ({}, "at least one weekly interval"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(hours: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BusinessCalendar.build(hours)


def test_a_date_cannot_be_holiday_and_workday() -> None:
    with pytest.raises(ValueError, match="both holiday and extra workday"):
        BusinessCalendar.build({"mon": ["09:00-12:00"]}, holidays=[date(2025, 1, 1)], extra_workdays=[date(2025, 1, 1)])


def test_unknown_timezone_is_rejected() -> None:
    with pytest.raises(KeyError):  # zoneinfo.ZoneInfoNotFoundError
        BusinessCalendar.build({"mon": ["09:00-12:00"]}, timezone="Mars/Olympus_Mons")


def test_makeup_weekday_uses_that_days_hours() -> None:
    calendar = BusinessCalendar.build(
        {"mon-fri": ["09:00-18:00"], "sat": ["10:00-12:00"]},
        extra_workdays=[date(2025, 6, 8)],
        makeup_weekday="sat",
    )
    assert calendar.intervals_on(date(2025, 6, 8)) == (Interval.parse("10:00-12:00"),)


# --- DST ------------------------------------------------------------------------------------------

NEW_YORK = "America/New_York"  # 2025: 02:00 → 03:00 on Sun 9 Mar; 02:00 → 01:00 on Sun 2 Nov
BERLIN = "Europe/Berlin"  # 2025: 02:00 → 03:00 on Sun 30 Mar; 03:00 → 02:00 on Sun 26 Oct
SANTIAGO = "America/Santiago"  # 2025: 24:00 → 23:00 on Sat 5 Apr; 24:00 → 01:00 on Sat/Sun 6-7 Sep


@pytest.mark.parametrize(("day", "hours"), [(date(2025, 3, 9), 23), (date(2025, 11, 2), 25), (date(2025, 6, 1), 24)])
def test_a_24_7_day_lasts_as_long_as_the_clocks_say(day: date, hours: int) -> None:
    calendar = always_open(NEW_YORK)
    start = local(NEW_YORK, day.year, day.month, day.day)
    nxt = day + timedelta(days=1)
    end = local(NEW_YORK, nxt.year, nxt.month, nxt.day)
    assert calendar.business_seconds_between(start, end) == hours * HOUR


def test_weekday_hours_across_the_new_york_spring_weekend() -> None:
    calendar = BusinessCalendar.build({"mon-fri": ["09:00-17:00"]}, timezone=NEW_YORK)
    friday_4pm_est = local(NEW_YORK, 2025, 3, 7, 16, 0)
    due = calendar.add_business_seconds(friday_4pm_est, 2 * HOUR)
    assert due == utc(2025, 3, 10, 14, 0)  # Monday 10:00 EDT, one hour earlier in UTC than before the change
    assert calendar.business_seconds_between(friday_4pm_est, due) == 2 * HOUR


@pytest.mark.parametrize(
    ("day", "opens", "closes"),
    [
        # spring forward: 01:00 EST → 03:00 EDT is one real hour
        (date(2025, 3, 9), utc(2025, 3, 9, 6, 0), utc(2025, 3, 9, 7, 0)),
        # fall back: from the first 01:00 (EDT) to 03:00 EST is three real hours
        (date(2025, 11, 2), utc(2025, 11, 2, 5, 0), utc(2025, 11, 2, 8, 0)),
    ],
)
def test_an_interval_over_the_changed_hour_new_york(day: date, opens: float, closes: float) -> None:
    calendar = BusinessCalendar.build({"sun": ["01:00-03:00"]}, timezone=NEW_YORK)
    assert calendar.periods_on(day) == ((opens, closes),)
    assert not calendar.is_open(opens - 1)
    assert calendar.is_open(opens)
    assert calendar.is_open(closes - 1)
    assert not calendar.is_open(closes)


def test_an_interval_starting_in_the_skipped_hour_opens_at_the_jump_berlin() -> None:
    calendar = BusinessCalendar.build({"sun": ["02:30-05:00"]}, timezone=BERLIN)
    # 02:30 does not exist on 30 Mar: the clock jumps from 02:00 CET to 03:00 CEST (01:00Z).
    assert calendar.periods_on(date(2025, 3, 30)) == ((utc(2025, 3, 30, 1, 0), utc(2025, 3, 30, 3, 0)),)
    assert calendar.next_open(utc(2025, 3, 30, 0, 0)) == utc(2025, 3, 30, 1, 0)


def test_an_interval_inside_the_repeated_hour_berlin() -> None:
    calendar = BusinessCalendar.build({"sun": ["02:00-03:00"]}, timezone=BERLIN)
    # 02:00 CEST (00:00Z) to 03:00 CET (02:00Z): both passes through 02:xx count.
    assert calendar.periods_on(date(2025, 10, 26)) == ((utc(2025, 10, 26, 0, 0), utc(2025, 10, 26, 2, 0)),)
    assert calendar.business_seconds_between(utc(2025, 10, 25, 0, 0), utc(2025, 10, 27, 0, 0)) == 2 * HOUR


def test_days_tile_when_midnight_is_skipped_or_repeated_santiago() -> None:
    calendar = BusinessCalendar.build({"sat": ["22:00-24:00"], "sun": ["00:00-02:00"]}, timezone=SANTIAGO)
    # 5-6 Apr: 23:00-24:00 happens twice, Saturday's opening is three real hours and Sunday's follows on.
    assert calendar.periods_on(date(2025, 4, 5)) == ((utc(2025, 4, 6, 1, 0), utc(2025, 4, 6, 4, 0)),)
    assert calendar.periods_on(date(2025, 4, 6)) == ((utc(2025, 4, 6, 4, 0), utc(2025, 4, 6, 6, 0)),)
    assert calendar.is_open(utc(2025, 4, 6, 3, 30))  # 23:30 the second time, local date still Saturday
    # 6-7 Sep: 00:00-01:00 Sunday does not exist, Sunday opens at the jump and lasts one real hour.
    assert calendar.periods_on(date(2025, 9, 6)) == ((utc(2025, 9, 7, 2, 0), utc(2025, 9, 7, 4, 0)),)
    assert calendar.periods_on(date(2025, 9, 7)) == ((utc(2025, 9, 7, 4, 0), utc(2025, 9, 7, 5, 0)),)
    assert calendar.business_seconds_between(utc(2025, 9, 7, 0, 0), utc(2025, 9, 8, 0, 0)) == 3 * HOUR


def test_an_instant_a_hair_before_midnight_belongs_to_the_day_before() -> None:
    # fromtimestamp rounds to microseconds: 23:59:59.9999998 must not be read as the next day (hypothesis found it).
    calendar = BusinessCalendar.build({"sat": ["23:00-24:00"]}, timezone=NEW_YORK)
    hair_before_midnight = local(NEW_YORK, 2025, 9, 7) - 2e-7
    assert hair_before_midnight < local(NEW_YORK, 2025, 9, 7)
    assert calendar.is_open(hair_before_midnight)
    assert calendar.next_open(hair_before_midnight) == hair_before_midnight


# --- properties -----------------------------------------------------------------------------------

CALENDARS = [
    TEAM,
    BusinessCalendar.build(
        {"mon-fri": ["09:00-17:00"], "sun": ["01:00-03:00"]}, timezone=NEW_YORK, holidays=[date(2025, 7, 4)]
    ),
    BusinessCalendar.build({"mon-fri": ["08:00-12:00", "13:00-17:00"], "sun": ["00:00-03:30"]}, timezone=BERLIN),
    BusinessCalendar.build({"sat": ["22:00-24:00"], "sun": ["00:00-02:00", "23:00-24:00"]}, timezone=SANTIAGO),
    BusinessCalendar.build({"mon-sun": ["01:00-02:30", "12:00-12:01"]}, timezone="Australia/Lord_Howe"),
    always_open(BERLIN),
    # 24/7 but with a holiday long ago: the same hours through the general path instead of the shortcut
    BusinessCalendar.build({"mon-sun": ["00:00-24:00"]}, timezone=SANTIAGO, holidays=[date(1990, 1, 1)]),
]

TRANSITIONS = [
    utc(2025, 3, 9, 7, 0),
    utc(2025, 11, 2, 6, 0),
    utc(2025, 3, 30, 1, 0),
    utc(2025, 10, 26, 1, 0),
    utc(2025, 4, 6, 3, 0),
    utc(2025, 9, 7, 4, 0),
    utc(2025, 4, 5, 15, 0),
    utc(2025, 10, 4, 15, 30),
]

calendars = st.sampled_from(CALENDARS)
near_transition = st.builds(
    lambda t, dt: t + dt, st.sampled_from(TRANSITIONS), st.floats(-3 * 86_400, 3 * 86_400, allow_nan=False)
)
anywhere = st.floats(utc(2024, 1, 1), utc(2027, 1, 1), allow_nan=False)
instants = st.one_of(near_transition, anywhere)
durations = st.one_of(st.floats(0, 600, allow_nan=False), st.floats(0, 20 * 86_400, allow_nan=False))
TOL = 1e-5


def _period_around(calendar: BusinessCalendar, at: float) -> tuple[float, float] | None:
    day = datetime.fromtimestamp(at, ZoneInfo(calendar.timezone)).date()
    for offset in (-1, 0, 1):
        for start, end in calendar.periods_on(day + timedelta(days=offset)):
            if start < at <= end:
                return start, end
    return None


@settings(deadline=None)
@given(calendars, instants, durations)
def test_add_and_between_are_inverse(calendar: BusinessCalendar, start: float, seconds: float) -> None:
    due = calendar.add_business_seconds(start, seconds)
    assert due >= start
    assert math.isclose(calendar.business_seconds_between(start, due), seconds, abs_tol=TOL)


@settings(deadline=None)
@given(calendars, instants, instants)
def test_adding_the_measured_time_gets_back_no_later_than_the_end(
    calendar: BusinessCalendar, a: float, b: float
) -> None:
    start, end = min(a, b), max(a, b)
    back = calendar.add_business_seconds(start, calendar.business_seconds_between(start, end))
    assert back <= end + TOL
    assert math.isclose(calendar.business_seconds_between(back, end), 0, abs_tol=TOL)


@settings(deadline=None)
@given(calendars, instants, durations, durations)
def test_add_is_monotonic(calendar: BusinessCalendar, start: float, s1: float, s2: float) -> None:
    lo, hi = min(s1, s2), max(s1, s2)
    assert calendar.add_business_seconds(start, lo) <= calendar.add_business_seconds(start, hi)
    assert calendar.add_business_seconds(start, lo) <= calendar.add_business_seconds(start + hi, lo)


@settings(deadline=None)
@given(calendars, instants, st.floats(0.001, 20 * 86_400, allow_nan=False))
def test_a_due_instant_never_lands_in_a_closed_period(calendar: BusinessCalendar, start: float, seconds: float) -> None:
    due = calendar.add_business_seconds(start, seconds)
    # Inside an open period, or exactly at its close: never in the middle of a closed stretch.
    assert _period_around(calendar, due) is not None


@settings(deadline=None)
@given(calendars, instants)
def test_next_open_is_open_and_nothing_opens_before_it(calendar: BusinessCalendar, at: float) -> None:
    opens = calendar.next_open(at)
    assert opens >= at
    assert calendar.is_open(opens)
    assert calendar.business_seconds_between(at, opens) == 0
    assert (opens == at) is calendar.is_open(at)


@settings(deadline=None)
@given(calendars, instants, instants, instants)
def test_between_is_additive(calendar: BusinessCalendar, a: float, b: float, c: float) -> None:
    ab, bc, ac = (calendar.business_seconds_between(x, y) for x, y in ((a, b), (b, c), (a, c)))
    assert math.isclose(ab + bc, ac, abs_tol=TOL)


@settings(deadline=None)
@given(st.sampled_from([NEW_YORK, BERLIN, SANTIAGO, SHANGHAI]), instants, durations, durations)
def test_the_24_7_shortcut_agrees_with_the_general_path(tz: str, start: float, s: float, d: float) -> None:
    fast = always_open(tz)
    slow = BusinessCalendar.build({"mon-sun": ["00:00-24:00"]}, timezone=tz, holidays=[date(1990, 1, 1)])
    assert fast.always_open and not slow.always_open
    assert slow.is_open(start)
    assert slow.next_open(start) == start
    assert math.isclose(slow.add_business_seconds(start, s), fast.add_business_seconds(start, s), abs_tol=TOL)
    assert math.isclose(slow.business_seconds_between(start, start + d), d, abs_tol=TOL)
