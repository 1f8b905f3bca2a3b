"""Time maths for scheduled posts, as pure functions: which slots of a rule fall in a window, and rule validation.

A slot is identified by its scheduled instant (UTC), never by the wall clock at which it was noticed: delivery
rows are unique per (post, target, slot), so a clock that jumps back computes the same slots again (and finds
their rows), and a clock that jumps forward computes the skipped ones (which the engine sends late or reports
as missed). Fire times come from APScheduler's triggers; no crontab parsing is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger

DEFAULT_TIMEZONE = "Asia/Shanghai"
MAX_SLOTS_PER_WINDOW = 1000  # a window is cut short here; the caller resumes from the last slot returned
_TINY = timedelta(microseconds=1)


class RuleError(ValueError):
    """A rule that cannot be scheduled; the message is one line meant for the person who wrote it."""


@dataclass(frozen=True, slots=True)
class Rule:
    """When a post is due: once `at` an instant, on a `cron` line in a time zone, or as an SOP plan step."""

    kind: str  # "at" | "cron" | "sop"
    at: datetime | None = None
    cron: str | None = None
    timezone: str = DEFAULT_TIMEZONE
    sop_plan: str | None = None
    sop_offset_s: int | None = None


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.astimezone(UTC)


def zone(name: str) -> ZoneInfo:
    """The IANA time zone, or RuleError naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise RuleError(f"unknown time zone {name!r} (use an IANA name such as Asia/Shanghai)") from None


def cron_trigger(expression: str, timezone: str) -> CronTrigger:
    """APScheduler's trigger for a crontab line (minute hour day month weekday), or RuleError."""
    tz = zone(timezone)
    fields = expression.split()
    if len(fields) != 5:
        raise RuleError(
            f"invalid cron {expression!r}: need 5 fields (minute hour day month weekday), got {len(fields)}"
        )
    fields[4] = crontab_weekdays(fields[4])
    try:
        return CronTrigger.from_crontab(" ".join(fields), timezone=tz)
    except ValueError as exc:
        raise RuleError(f"invalid cron {expression!r}: {exc}") from None


_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def crontab_weekdays(field: str) -> str:
    """The weekday field with crontab's numbers (0 or 7 Sunday, 1 Monday ...) spelled as day names.

    APScheduler 3's from_crontab reads numbers as Monday = 0, so `1-5` would run Tuesday to Saturday; names mean
    the same day to both. A range starting at Sunday (0-N) becomes `sun,mon-...`.
    """
    out: list[str] = []
    for part in field.split(","):
        base, slash, step = part.partition("/")
        if base == "*" and slash:
            if not step.isdigit() or int(step) < 1:
                raise RuleError(f"invalid weekday step {part!r}")
            out.append(",".join(_WEEKDAY_NAMES[day] for day in range(0, 7, int(step))))
            continue
        if not any(ch.isdigit() for ch in base):
            out.append(part)
            continue
        low, dash, high = base.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise RuleError(f"invalid weekday {part!r}: use numbers 0-7 or names sun-sat, not both")
        first, last = int(low), int(high) if dash else None
        if first > 7 or (last is not None and last > 7):
            raise RuleError(f"invalid weekday {part!r}: weekdays are 0-7 (0 and 7 are Sunday)")
        if slash:  # stepped: spelled out day by day (APScheduler ignores steps on named weekday ranges)
            if not step.isdigit() or int(step) < 1:
                raise RuleError(f"invalid weekday step {part!r}")
            days = range(first, (7 if last is None else last) + 1, int(step))
            out.append(",".join(dict.fromkeys(_WEEKDAY_NAMES[day] for day in days)))
        elif last is None:
            out.append(_WEEKDAY_NAMES[first])
        elif first == 0 and last > 0:
            out.append("*" if last == 7 else f"sun,mon-{_WEEKDAY_NAMES[last]}")
        else:
            out.append(f"{_WEEKDAY_NAMES[first]}-{_WEEKDAY_NAMES[last]}")
    return ",".join(out)


def validate_rule(rule: Rule, now: datetime) -> Rule:
    """The rule if it can be scheduled from `now` on; else RuleError with one clear line."""
    now = _aware(now, "now")
    zone(rule.timezone)
    if rule.kind == "at":
        if rule.at is None:
            raise RuleError("a one-off post needs a time (--at)")
        at = _aware(rule.at, "at")
        if at <= now:
            local = at.astimezone(zone(rule.timezone)).strftime("%Y-%m-%d %H:%M")
            raise RuleError(f"{local} ({rule.timezone}) is in the past")
        return rule
    if rule.kind == "cron":
        if not rule.cron:
            raise RuleError("a recurring post needs a cron line (--cron)")
        if not next_slots(rule, now, 1):
            raise RuleError(f"cron {rule.cron!r} never fires (no date matches it)")
        return rule
    if rule.kind == "sop":
        if not rule.sop_plan:
            raise RuleError("an SOP step needs its plan's name")
        if rule.sop_offset_s is None or rule.sop_offset_s < 0:
            raise RuleError("an SOP step needs an offset of zero or more seconds after its anchor event")
        return rule
    raise RuleError(f"unknown rule kind {rule.kind!r} (at, cron or sop)")


def slots_between(rule: Rule, since: datetime, until: datetime, *, limit: int = MAX_SLOTS_PER_WINDOW) -> list[datetime]:
    """The rule's slots in [since, until), in UTC, ascending, at most `limit`.

    SOP steps have no slots of their own: they are due relative to each anchor event, not on the calendar.
    """
    since, until = _aware(since, "since"), _aware(until, "until")
    if until <= since or limit <= 0:
        return []
    if rule.kind == "at":
        if rule.at is None:
            return []
        fire = DateTrigger(run_date=rule.at).get_next_fire_time(None, since)
        return [fire.astimezone(UTC)] if fire is not None and since <= fire < until else []
    if rule.kind != "cron" or not rule.cron:
        return []
    trigger = cron_trigger(rule.cron, rule.timezone)
    out: list[datetime] = []
    fire = trigger.get_next_fire_time(None, since)
    while fire is not None and fire < until and len(out) < limit:
        out.append(fire.astimezone(UTC))
        fire = trigger.get_next_fire_time(fire, fire + _TINY)
    return out


def next_slots(rule: Rule, after: datetime, count: int) -> list[datetime]:
    """The next `count` slots at or after `after` (for previews); fewer when the rule ends."""
    after = _aware(after, "after")
    if rule.kind == "at":
        return slots_between(rule, after, datetime.max.replace(tzinfo=UTC), limit=1)[:count]
    if rule.kind != "cron" or not rule.cron or count <= 0:
        return []
    trigger = cron_trigger(rule.cron, rule.timezone)
    out: list[datetime] = []
    fire = trigger.get_next_fire_time(None, after)
    while fire is not None and len(out) < count:
        out.append(fire.astimezone(UTC))
        fire = trigger.get_next_fire_time(fire, fire + _TINY)
    return out


def slot_key(post_id: int, target_id: int, slot_at: datetime) -> str:
    """The idempotency key of one delivery: the post, the target and the slot's instant in epoch milliseconds."""
    millis = int(_aware(slot_at, "slot_at").timestamp() * 1000)
    return f"post:{post_id}:target:{target_id}:slot:{millis}"


def china_month_bounds(instant: datetime) -> tuple[datetime, datetime]:
    """The natural month (in China time, as WeCom counts mass messages) holding `instant`, as UTC [start, end)."""
    local = _aware(instant, "instant").astimezone(ZoneInfo(DEFAULT_TIMEZONE))
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.astimezone(UTC), end.astimezone(UTC)
