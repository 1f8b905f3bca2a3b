"""Protecting the audience of customer-facing sends: quiet hours, daily caps, opt-out and de-duplication (pure).

The delivery engine proposes one send (`ProposedSend`), a port supplies the facts about its recipient
(`AudienceFacts`), and `AudiencePolicy.decide` answers `Allow` or `Hold(reason, until)`.

Rules (defaults in brackets; every one is a field of `AudiencePolicy`):
- Transactional sends (replies, order and service notices) are never held: the rules below govern marketing
  posts and SOP touches only.
- Opted out (退订): a customer who opted out gets no marketing send until they subscribe again (`until` None).
  Groups cannot opt out.
- Duplicate content: a customer never gets the same content (by `content_fingerprint`) twice within
  `dedupe_window_s` [7 days]; `until` is when the earlier send leaves the window. Group posts are not
  de-duplicated (a recurring reminder to a group is meant to repeat).
- Daily caps: at most `customer_daily_cap` [3] marketing sends per customer and `group_daily_cap` [5] per group
  per local day of the recipient; `until` is the next local midnight (or the end of the quiet hours it falls in).
- Quiet hours [22:00-08:00, wrapping midnight] in the recipient's timezone [Asia/Shanghai]; `until` is when
  they end. `quiet_hours=None` switches them off.
When several rules hold a send, the first in this order is reported (the most lasting reason first).

Time representation, as in `handlers.business_hours`: epoch seconds (float) everywhere; wall-clock times only
inside the quiet-hours calendar, which maps them to instants DST-safely (it is a `BusinessCalendar` of the
allowed hours). Local days are [midnight, next midnight) in the recipient's timezone.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Protocol
from zoneinfo import ZoneInfo

from handlers.business_hours import DAY_SECONDS, DEFAULT_TIMEZONE, BusinessCalendar, Interval, always_open
from scripts_library import normalize

DEFAULT_QUIET_HOURS = "22:00-08:00"
DEFAULT_CUSTOMER_DAILY_CAP = 3
DEFAULT_GROUP_DAILY_CAP = 5
DEFAULT_DEDUPE_WINDOW_S = 7 * DAY_SECONDS
DUPLICATION_BAR = 0.05  # the SOP's bar: at most 5 % of planned touches repeat content to the same customer

_FINGERPRINT_VERSION = "v1"
_PART_SEPARATOR = "\x1f"


class SendKind(StrEnum):
    """What a send is, which decides whether the audience rules apply."""

    MARKETING = "marketing"  # marketing posts and SOP touches: every rule applies
    TRANSACTIONAL = "transactional"  # replies, order and service notices: never held


class RecipientKind(StrEnum):
    CUSTOMER = "customer"  # one external contact (external_userid)
    GROUP = "group"  # one customer group (chat_id) or robot group


class HoldReason(StrEnum):
    """Why a send was held back; stored with the held delivery."""

    OPTED_OUT = "opted_out"
    DUPLICATE_CONTENT = "duplicate_content"
    DAILY_CAP_CUSTOMER = "daily_cap_customer"
    DAILY_CAP_GROUP = "daily_cap_group"
    QUIET_HOURS = "quiet_hours"


@dataclass(frozen=True, slots=True)
class Allow:
    """The send may go now."""

    @property
    def allowed(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Hold:
    """The send must not go now: why, and the earliest instant it could (None: not until the facts change)."""

    reason: HoldReason
    until: float | None

    @property
    def allowed(self) -> bool:
        return False


ALLOW = Allow()
Decision = Allow | Hold


@dataclass(frozen=True, slots=True)
class ProposedSend:
    """One customer-facing send the engine wants to make."""

    recipient_id: str  # external_userid or group chat_id
    recipient_kind: RecipientKind
    fingerprint: str  # content_fingerprint of what is sent
    kind: SendKind
    channel: str  # the delivery channel (kf, mass, robot, ...): recorded with a hold, not a rule input today
    timezone: str = DEFAULT_TIMEZONE

    def __post_init__(self) -> None:
        _zone(self.timezone)  # an unknown timezone is refused here, not at the first quiet-hours check


@dataclass(frozen=True, slots=True)
class AudienceFacts:
    """What a port knows about the recipient, read for one decision.

    sends_today: marketing sends already made to the recipient within `AudiencePolicy.day_bounds`.
    recent: fingerprint -> when it was last sent to this customer; entries older than the window are ignored,
    so a port may read from `AudiencePolicy.dedupe_since(now)` or earlier.
    """

    sends_today: int = 0
    opted_out: bool = False
    recent: Mapping[str, float] = field(default_factory=dict)


class AudienceFactsPort(Protocol):
    """Where the facts come from (a repository over deliveries and subscriptions)."""

    async def facts(self, send: ProposedSend, day_start: float, day_end: float, dedupe_since: float) -> AudienceFacts:
        """The facts about `send`'s recipient: sends counted in [day_start, day_end), fingerprints since then."""
        ...


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily quiet period [start, end) of wall-clock seconds after midnight; end < start wraps midnight."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < DAY_SECONDS or not 0 <= self.end <= DAY_SECONDS:
            raise ValueError(f"quiet hours outside one day: {self}")
        if self.start == self.end % DAY_SECONDS:
            raise ValueError(f"quiet hours {self} cover no time or the whole day: switch them off with None instead")

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        """Parse "22:00-08:00" (wrapping midnight) or "13:00-14:00"; "24:00" allowed as the end."""
        start, sep, end = text.partition("-")
        if not sep:
            raise ValueError(f"not quiet hours (HH:MM-HH:MM): {text!r}")
        # Interval does the HH:MM parsing and validation; a wrapping period is two intervals, so parse the halves.
        first = Interval.parse(f"{start.strip()}-24:00")
        last = Interval.parse(f"00:00-{end.strip()}") if end.strip() not in ("00:00", "0:00") else None
        return cls(first.start, last.end if last is not None else 0)

    def is_quiet(self, at: float, timezone: str = DEFAULT_TIMEZONE) -> bool:
        """Whether `at` falls in the quiet hours of that timezone."""
        return not _allowed_calendar(self, timezone).is_open(at)

    def ends_at(self, at: float, timezone: str = DEFAULT_TIMEZONE) -> float:
        """The first instant at or after `at` outside the quiet hours (`at` itself when not quiet)."""
        return _allowed_calendar(self, timezone).next_open(at)

    def __str__(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


def _clock(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


@lru_cache(maxsize=256)
def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ValueError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown timezone: {timezone!r}") from exc


@lru_cache(maxsize=256)
def _allowed_calendar(quiet: QuietHours, timezone: str) -> BusinessCalendar:
    """The hours outside the quiet period, every day, as a calendar (it owns the DST-safe wall -> instant maths)."""
    _zone(timezone)
    start, end = quiet.start, quiet.end
    if end != 0 and end > start:  # e.g. 13:00-14:00: allowed before and after
        allowed = [Interval(0, start)] if start else []
        if end < DAY_SECONDS:
            allowed.append(Interval(end, DAY_SECONDS))
    else:  # wraps midnight (or ends at 24:00/00:00): allowed from the end to the start
        allowed = [Interval(end, start)]
    return BusinessCalendar(weekly=(tuple(allowed),) * 7, timezone=timezone)


DEFAULT_QUIET = QuietHours.parse(DEFAULT_QUIET_HOURS)


@lru_cache(maxsize=256)
def _days(timezone: str) -> BusinessCalendar:
    return always_open(timezone)


def day_bounds(at: float, timezone: str = DEFAULT_TIMEZONE) -> tuple[float, float]:
    """The local day containing `at` as [midnight, next midnight) instants (23 or 25 hours on DST days)."""
    calendar = _days(timezone)
    # floor(): fromtimestamp rounds to microseconds, which could carry 23:59:59.9999998 into the next day
    local = datetime.fromtimestamp(math.floor(at), _zone(timezone)).date()
    [(start, end)] = calendar.periods_on(local)
    return start, end


@dataclass(frozen=True, slots=True)
class AudiencePolicy:
    """The audience rules with their limits; see the module docstring. None switches a rule off."""

    quiet_hours: QuietHours | None = DEFAULT_QUIET
    customer_daily_cap: int | None = DEFAULT_CUSTOMER_DAILY_CAP
    group_daily_cap: int | None = DEFAULT_GROUP_DAILY_CAP
    dedupe_window_s: float | None = DEFAULT_DEDUPE_WINDOW_S

    def __post_init__(self) -> None:
        for name in ("customer_daily_cap", "group_daily_cap"):
            cap = getattr(self, name)
            if cap is not None and cap < 0:
                raise ValueError(f"{name} must not be negative, got {cap}")
        if self.dedupe_window_s is not None and self.dedupe_window_s <= 0:
            raise ValueError(f"dedupe_window_s must be positive, got {self.dedupe_window_s}")

    def day_bounds(self, at: float, timezone: str = DEFAULT_TIMEZONE) -> tuple[float, float]:
        """The recipient's local day containing `at`, over which `AudienceFacts.sends_today` is counted."""
        return day_bounds(at, timezone)

    def dedupe_since(self, now: float) -> float:
        """The earliest send time that still counts for de-duplication at `now` (now itself when switched off)."""
        return now - self.dedupe_window_s if self.dedupe_window_s is not None else now

    def decide(self, send: ProposedSend, facts: AudienceFacts, now: float) -> Decision:
        """Allow the send now, or hold it with the first reason that applies and when it could go."""
        if send.kind is SendKind.TRANSACTIONAL:
            return ALLOW
        is_customer = send.recipient_kind is RecipientKind.CUSTOMER
        if is_customer and facts.opted_out:
            return Hold(HoldReason.OPTED_OUT, None)
        if is_customer and self.dedupe_window_s is not None:
            last = facts.recent.get(send.fingerprint)
            if last is not None and now - last < self.dedupe_window_s:
                leaves = last + self.dedupe_window_s
                return Hold(HoldReason.DUPLICATE_CONTENT, self._outside_quiet(leaves, send.timezone))
        cap = self.customer_daily_cap if is_customer else self.group_daily_cap
        if cap is not None and facts.sends_today >= cap:
            reason = HoldReason.DAILY_CAP_CUSTOMER if is_customer else HoldReason.DAILY_CAP_GROUP
            _start, next_midnight = day_bounds(now, send.timezone)
            return Hold(reason, self._outside_quiet(next_midnight, send.timezone))
        if self.quiet_hours is not None and self.quiet_hours.is_quiet(now, send.timezone):
            return Hold(HoldReason.QUIET_HOURS, self.quiet_hours.ends_at(now, send.timezone))
        return ALLOW

    def _outside_quiet(self, at: float, timezone: str) -> float:
        return self.quiet_hours.ends_at(at, timezone) if self.quiet_hours is not None else at


DEFAULT_POLICY = AudiencePolicy()


async def check(policy: AudiencePolicy, port: AudienceFactsPort, send: ProposedSend, now: float) -> Decision:
    """Read the recipient's facts through the port and decide (transactional sends read nothing)."""
    if send.kind is SendKind.TRANSACTIONAL:
        return ALLOW
    day_start, day_end = policy.day_bounds(now, send.timezone)
    facts = await port.facts(send, day_start, day_end, policy.dedupe_since(now))
    return policy.decide(send, facts, now)


# --- content fingerprints ---------------------------------------------------------------------------------------


def _significant(char: str) -> bool:
    # Punctuation (P*) and separators (Z*) do not make content different; symbols (¥, emoji) and letters do.
    return not char.isspace() and unicodedata.category(char)[0] not in "PZC"


def normalise_content(text: str) -> str:
    """Text as fingerprints compare it: full/half width, case and traditional/simplified folded, no whitespace
    or punctuation."""
    return "".join(c for c in normalize(text) if _significant(c))


def content_fingerprint(*parts: str) -> str:
    """A stable fingerprint of content (its text, or e.g. a link's title and url as parts); equal after
    `normalise_content` means equal fingerprints, whichever plan or post it came from."""
    joined = _PART_SEPARATOR.join(normalise_content(part) for part in parts)
    digest = hashlib.sha256(joined.encode()).hexdigest()[:32]
    return f"{_FINGERPRINT_VERSION}:{digest}"


# --- duplication rate of a plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedTouch:
    """One planned marketing/SOP send to one customer."""

    recipient_id: str
    fingerprint: str
    at: float


@dataclass(frozen=True, slots=True)
class DuplicationReport:
    total: int
    duplicates: int  # touches whose recipient already got (or was planned) the same content within the window

    @property
    def rate(self) -> float:
        return self.duplicates / self.total if self.total else 0.0

    def meets_bar(self, bar: float = DUPLICATION_BAR) -> bool:
        """Whether the duplication rate is within the SOP's bar (≤ 5 % by default)."""
        return self.rate <= bar


def duplication_report(
    touches: Iterable[PlannedTouch],
    window_s: float = DEFAULT_DEDUPE_WINDOW_S,
    already_sent: Iterable[PlannedTouch] = (),
) -> DuplicationReport:
    """Count the touches that repeat content to the same customer within `window_s` of an earlier touch (planned
    or `already_sent`); touches are taken in time order, so the first of a pair is never the duplicate."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    last: dict[tuple[str, str], float] = {}
    for sent in sorted(already_sent, key=lambda t: t.at):
        last[(sent.recipient_id, sent.fingerprint)] = sent.at
    total = duplicates = 0
    for touch in sorted(touches, key=lambda t: t.at):
        key = (touch.recipient_id, touch.fingerprint)
        total += 1
        previous = last.get(key)
        if previous is not None and touch.at - previous < window_s:
            duplicates += 1
        last[key] = touch.at
    return DuplicationReport(total, duplicates)


def duplication_rate(touches: Iterable[PlannedTouch], window_s: float = DEFAULT_DEDUPE_WINDOW_S) -> float:
    """The share of planned touches that are duplicates within the window (0.0 for an empty plan)."""
    return duplication_report(touches, window_s).rate


__all__ = [
    "ALLOW",
    "DEFAULT_POLICY",
    "DUPLICATION_BAR",
    "Allow",
    "AudienceFacts",
    "AudienceFactsPort",
    "AudiencePolicy",
    "Decision",
    "DuplicationReport",
    "Hold",
    "HoldReason",
    "PlannedTouch",
    "ProposedSend",
    "QuietHours",
    "RecipientKind",
    "SendKind",
    "check",
    "content_fingerprint",
    "day_bounds",
    "duplication_rate",
    "duplication_report",
    "normalise_content",
]
