"""Business calendars per team: weekly open intervals in a timezone, holidays and make-up workdays (pure).

Time representation: every public function takes and returns epoch seconds (float), like `Clock.now()`.
Wall-clock times only exist inside the calendar, which maps them to instants through `zoneinfo`.

How wall-clock intervals become instants (what makes DST safe):
- A wall time `w` on a date maps to the first instant at which the local clock shows `w` or later.
  An ambiguous time (the repeated hour when clocks go back) therefore maps to its first occurrence, and a
  time that does not exist (the skipped hour when clocks go forward) maps to the transition instant.
- The mapping is monotonic, so 24:00 of one day and 00:00 of the next are the same instant and the days of a
  calendar tile the timeline without gaps or overlaps. An interval's real length follows the clock change:
  01:00-03:00 lasts one hour on a spring-forward night in New York and three hours on the fall-back night.
- Intervals lie inside one local day (end "24:00" is allowed); an interval crossing midnight is rejected at
  construction: write it as two intervals on consecutive days.
Holidays and make-up workdays (调休) are local dates; a make-up workday follows the hours of `makeup_weekday`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as wall_time
from zoneinfo import ZoneInfo

DAY_SECONDS = 86_400
DEFAULT_TIMEZONE = "Asia/Shanghai"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_CLOCK = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")
_ONE_DAY = timedelta(days=1)
_MEMO_DAYS = 4096


def _parse_clock(text: str) -> int:
    match = _CLOCK.match(text)
    if match is None:
        raise ValueError(f"not a HH:MM time: {text!r}")
    hours, minutes = int(match.group(1)), int(match.group(2))
    if minutes >= 60 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"not a time of day: {text!r}")
    return hours * 3600 + minutes * 60


def _format_clock(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


@dataclass(frozen=True, slots=True)
class Interval:
    """An open interval of one local day, [start, end) in seconds after local midnight."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < DAY_SECONDS or not 0 < self.end <= DAY_SECONDS:
            raise ValueError(f"interval outside one day: {self}")
        if self.end <= self.start:
            raise ValueError(
                f"interval {self} is empty or crosses midnight: split it into "
                f"{_format_clock(self.start)}-24:00 and 00:00-{_format_clock(self.end)} on the next day"
            )

    @classmethod
    def parse(cls, text: str) -> Interval:
        """Parse "09:00-12:00" ("24:00" allowed as the end)."""
        start, sep, end = text.partition("-")
        if not sep:
            raise ValueError(f"not an interval (HH:MM-HH:MM): {text!r}")
        return cls(_parse_clock(start), _parse_clock(end))

    def __str__(self) -> str:
        return f"{_format_clock(self.start)}-{_format_clock(self.end)}"


def _normalise(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    merged: list[Interval] = []
    for interval in sorted(intervals, key=lambda i: i.start):
        if merged and interval.start < merged[-1].end:
            raise ValueError(f"overlapping intervals: {merged[-1]} and {interval}")
        if merged and interval.start == merged[-1].end:
            # Adjacent intervals are one opening; merging keeps the day's periods minimal.
            merged[-1] = Interval(merged[-1].start, interval.end)
        else:
            merged.append(interval)
    return tuple(merged)


def _expand_days(key: str) -> list[int]:
    names = key.strip().lower()
    first, sep, last = names.partition("-")
    try:
        if not sep:
            return [WEEKDAYS.index(first)]
        lo, hi = WEEKDAYS.index(first), WEEKDAYS.index(last)
    except ValueError:
        raise ValueError(f"unknown weekday in {key!r}: use {', '.join(WEEKDAYS)} or a range like mon-fri") from None
    if hi < lo:
        raise ValueError(f"weekday range runs backwards: {key!r}")
    return list(range(lo, hi + 1))


@dataclass(frozen=True, slots=True)
class BusinessCalendar:
    """When a team is open: weekly intervals (Monday first) in an IANA timezone, holidays and make-up workdays."""

    weekly: tuple[tuple[Interval, ...], ...]
    timezone: str = DEFAULT_TIMEZONE
    holidays: frozenset[date] = frozenset()
    extra_workdays: frozenset[date] = frozenset()
    makeup_weekday: int = 0
    _tz: ZoneInfo = field(init=False, repr=False, compare=False, hash=False)
    _always: bool = field(init=False, repr=False, compare=False, hash=False)
    _days: dict[date, tuple[tuple[float, float], ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.weekly) != 7:
            raise ValueError(f"weekly needs 7 days (Monday first), got {len(self.weekly)}")
        weekly = tuple(_normalise(day) for day in self.weekly)
        if not any(weekly):
            # A calendar that is never open would make every deadline infinite.
            raise ValueError("a business calendar needs at least one weekly interval")
        both = self.holidays & self.extra_workdays
        if both:
            raise ValueError(f"dates both holiday and extra workday: {sorted(both)}")
        if not 0 <= self.makeup_weekday < 7:
            raise ValueError(f"makeup_weekday must be 0 (Monday) .. 6 (Sunday), got {self.makeup_weekday}")
        object.__setattr__(self, "weekly", weekly)
        object.__setattr__(self, "_tz", ZoneInfo(self.timezone))
        # A per-calendar memo of each date's instants: hashing the whole calendar per lookup cost more than it saved.
        object.__setattr__(self, "_days", {})
        full_day = (Interval(0, DAY_SECONDS),)
        object.__setattr__(self, "_always", all(day == full_day for day in weekly) and not self.holidays)

    @classmethod
    def build(
        cls,
        hours: Mapping[str, Sequence[str]],
        timezone: str = DEFAULT_TIMEZONE,
        holidays: Iterable[date] = (),
        extra_workdays: Iterable[date] = (),
        makeup_weekday: str = "mon",
    ) -> BusinessCalendar:
        """Build from {"mon-fri": ["09:00-12:00", "13:30-18:00"], "sat": ["10:00-16:00"]}-style config."""
        days: list[list[Interval]] = [[] for _ in WEEKDAYS]
        for key, texts in hours.items():
            for weekday in _expand_days(key):
                days[weekday].extend(Interval.parse(text) for text in texts)
        return cls(
            weekly=tuple(tuple(day) for day in days),
            timezone=timezone,
            holidays=frozenset(holidays),
            extra_workdays=frozenset(extra_workdays),
            makeup_weekday=_expand_days(makeup_weekday)[0],
        )

    @property
    def always_open(self) -> bool:
        """True for a 24/7 calendar (every day 00:00-24:00, no holidays)."""
        return self._always

    def intervals_on(self, day: date) -> tuple[Interval, ...]:
        """The wall-clock intervals open on a local date, after holidays and make-up workdays."""
        if day in self.holidays:
            return ()
        if day in self.extra_workdays:
            return self.weekly[self.makeup_weekday]
        return self.weekly[day.weekday()]

    def periods_on(self, day: date) -> tuple[tuple[float, float], ...]:
        """The open periods of a local date as [start, end) epoch instants (empty ones left out)."""
        periods = self._days.get(day)
        if periods is None:
            if len(self._days) >= _MEMO_DAYS:
                self._days.clear()
            periods = self._days[day] = _day_periods(self, day)
        return periods

    def is_open(self, at: float) -> bool:
        """Whether the team is open at this instant."""
        if self._always:
            return True
        start, end = next(self._periods_from(at))
        return start <= at < end

    def next_open(self, at: float) -> float:
        """The first open instant at or after `at` (`at` itself when open)."""
        if self._always:
            return at
        start, _end = next(self._periods_from(at))
        return max(start, at)

    def business_seconds_between(self, start: float, end: float) -> float:
        """Open seconds in [start, end); negative when end is before start."""
        if end < start:
            return -self.business_seconds_between(end, start)
        if self._always:
            return end - start
        total = 0.0
        for open_at, close_at in self._periods_from(start):
            if open_at >= end:
                break
            total += min(close_at, end) - max(open_at, start)
        return total

    def add_business_seconds(self, start: float, seconds: float) -> float:
        """The earliest instant by which `seconds` open seconds have passed since `start` (the due instant)."""
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, got {seconds}")
        if self._always or seconds == 0:
            return start + seconds
        remaining = seconds
        for open_at, close_at in self._periods_from(start):
            begin = max(open_at, start)
            if close_at - begin >= remaining:
                return begin + remaining
            remaining -= close_at - begin
        raise AssertionError("unreachable: a calendar with weekly hours always opens again")

    def _periods_from(self, at: float) -> Iterator[tuple[float, float]]:
        # Never exhausted: construction guarantees weekly hours, and holidays are finite.
        # Starting at the local date of `at` is enough: its wall time is at or after that date's 00:00, so `at`
        # is at or after that midnight's instant, where every earlier date's periods have already ended.
        # floor() because fromtimestamp rounds to microseconds, which can carry 23:59:59.9999998 into the next day.
        day = datetime.fromtimestamp(math.floor(at), self._tz).date()
        while True:
            for start, end in self.periods_on(day):
                if end > at:
                    yield start, end
            day += _ONE_DAY


ALWAYS_OPEN = BusinessCalendar(weekly=((Interval(0, DAY_SECONDS),),) * 7)


def always_open(timezone: str = DEFAULT_TIMEZONE) -> BusinessCalendar:
    """A 24/7 calendar."""
    return BusinessCalendar(weekly=((Interval(0, DAY_SECONDS),),) * 7, timezone=timezone)


def _day_periods(calendar: BusinessCalendar, day: date) -> tuple[tuple[float, float], ...]:
    tz = calendar._tz
    midnight = datetime.combine(day, wall_time())
    periods = []
    for interval in calendar.intervals_on(day):
        start = _instant(midnight + timedelta(seconds=interval.start), tz)
        end = _instant(midnight + timedelta(seconds=interval.end), tz)
        if end > start:
            periods.append((start, end))
    return tuple(periods)


def _instant(wall: datetime, tz: ZoneInfo) -> float:
    """The first instant at which the local clock shows `wall` or later."""
    first = wall.replace(tzinfo=tz, fold=0).timestamp()
    second = wall.replace(tzinfo=tz, fold=1).timestamp()
    if first == second:
        return first
    lo, hi = min(first, second), max(first, second)
    if _local(lo, tz) == wall:
        return lo  # ambiguous: the first occurrence
    # Skipped by a forward jump: find the transition, the first instant whose wall time is not before `wall`.
    low, high = int(lo), int(hi)
    while high - low > 1:
        mid = (low + high) // 2
        if _local(mid, tz) >= wall:
            high = mid
        else:
            low = mid
    return float(high)


def _local(at: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(at, tz).replace(tzinfo=None)
