"""Reminders from customer data and the daily digest: who is due today, and what each reminder says (pure).

Everything here takes plain values and `now` (aware); "today" is the local date in the reminders' time zone
(Asia/Shanghai by default). Storage (bot/reminders.py) reads the facts, asks these functions, and creates one-off
posts through the post repository, so the delivery engine sends them under its own rules.

Rules (thresholds are fields of `ReminderConfig`; defaults in brackets):
- Churn recall: a customer with the computed tag 沉默 or 流失 who has had no recall touch within
  `recall_cooldown_days` [30] local days.
- Repurchase: a customer whose last paid order is at least `repurchase_days` [30] local days old, at most
  `repurchase_catch_up_days` [7] days more (a customer who last ordered a year ago is not suddenly reminded the
  day reminders are switched on; a day the job did not run is caught up), and who has had no repurchase touch
  since that order.
- Daily digest: one app message per team lead with a WeCom userid, with yesterday's first-response SLA
  attainment, the queue depth now and yesterday's post deliveries.
- Birthday greetings are not built: customers have no birthday field.

Idempotency keys: every reminder post is titled `reminder:{rule}:{YYYY-MM-DD}[:{subject}]`, and the customers a
customer touch is for carry the marker tag `reminder:{rule}:{YYYY-MM-DD}` (the post's segment), so a rerun on
the same day finds both and creates nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from handlers.tags import SopClass

DEFAULT_TIMEZONE = "Asia/Shanghai"
KEY_PREFIX = "reminder"
RECALL_TAGS: frozenset[str] = frozenset({SopClass.SILENT.value, SopClass.CHURNED.value})
MAX_NOTE_CHARS = 500

DEFAULT_RECALL_TEXT = (
    "好久不见！我们为老朋友准备了一份回归福利，回复「福利」即可领取。"
    "如不想再收到此类消息，回复「退订」。"
)
DEFAULT_REPURCHASE_TEXT = (
    "您上次购买的商品用得还顺手吗？现在回购可享老客专属优惠，回复「回购」了解详情。"
    "如不想再收到此类消息，回复「退订」。"
)


class ReminderRule(StrEnum):
    DIGEST = "digest"
    CHURN_RECALL = "churn_recall"
    REPURCHASE = "repurchase"
    FOLLOW_UP = "follow_up"


class ReminderInputError(ValueError):
    """A reminder someone is adding that cannot be created; one line."""


@dataclass(frozen=True, slots=True)
class ReminderConfig:
    timezone: str = DEFAULT_TIMEZONE
    repurchase_days: int = 30
    repurchase_catch_up_days: int = 7
    recall_cooldown_days: int = 30
    touch_time: time = time(10, 0)  # customer touches go out at this local time (or right away when later)
    lead: timedelta = timedelta(minutes=1)  # a post is never planned closer to now than this
    recall_text: str = DEFAULT_RECALL_TEXT
    repurchase_text: str = DEFAULT_REPURCHASE_TEXT

    def __post_init__(self) -> None:
        ZoneInfo(self.timezone)  # an unknown zone fails here, not at the first run
        if self.repurchase_days <= 0 or self.recall_cooldown_days <= 0 or self.repurchase_catch_up_days < 0:
            raise ValueError("repurchase_days and recall_cooldown_days must be positive, catch-up not negative")
        if self.lead <= timedelta(0):
            raise ValueError("lead must be positive")


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value


def local_date(instant: datetime, timezone: str = DEFAULT_TIMEZONE) -> date:
    """The calendar date of `instant` in `timezone`."""
    return _aware(instant, "instant").astimezone(ZoneInfo(timezone)).date()


def day_bounds(day: date, timezone: str = DEFAULT_TIMEZONE) -> tuple[datetime, datetime]:
    """The local day [midnight, next midnight) as UTC instants."""
    tz = ZoneInfo(timezone)
    start = datetime.combine(day, time(0, 0), tz)
    end = datetime.combine(day + timedelta(days=1), time(0, 0), tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def send_at(now: datetime, at: time, config: ReminderConfig) -> datetime:
    """Today's `at` (local), or `now + lead` when that is later: a post is never planned in the past."""
    now = _aware(now, "now")
    planned = datetime.combine(local_date(now, config.timezone), at, ZoneInfo(config.timezone)).astimezone(UTC)
    return max(planned, now.astimezone(UTC) + config.lead)


def reminder_key(rule: ReminderRule, day: date, subject: str | None = None) -> str:
    """`reminder:{rule}:{YYYY-MM-DD}[:{subject}]`: the title of a reminder post (and, without subject, the
    marker tag of the customers a customer touch is for)."""
    key = f"{KEY_PREFIX}:{rule.value}:{day.isoformat()}"
    return f"{key}:{subject}" if subject else key


def marker_prefix(rule: ReminderRule) -> str:
    """What every marker tag of a rule starts with (for reading the touch history)."""
    return f"{KEY_PREFIX}:{rule.value}:"


# ---- customer touches ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What the reminder rules know about one customer (one person: every row of one external_userid)."""

    external_id: str
    tags: frozenset[str] = frozenset()
    last_order_at: datetime | None = None
    last_recall_at: datetime | None = None  # the last churn-recall touch (its marker tag's date)
    last_repurchase_at: datetime | None = None  # the last repurchase touch


def _days_between(earlier: datetime, now: datetime, timezone: str) -> int:
    return (local_date(now, timezone) - local_date(earlier, timezone)).days


def due_for_recall(customers: Iterable[CustomerFacts], now: datetime, config: ReminderConfig) -> list[str]:
    """External ids of customers tagged 沉默 or 流失 with no recall touch within the cooldown, sorted."""
    due = {
        c.external_id
        for c in customers
        if c.tags & RECALL_TAGS
        and (
            c.last_recall_at is None
            or _days_between(c.last_recall_at, now, config.timezone) >= config.recall_cooldown_days
        )
    }
    return sorted(due)


def due_for_repurchase(customers: Iterable[CustomerFacts], now: datetime, config: ReminderConfig) -> list[str]:
    """External ids of customers whose last order is `repurchase_days` (up to the catch-up more) local days old
    and who had no repurchase touch since that order, sorted."""
    low, high = config.repurchase_days, config.repurchase_days + config.repurchase_catch_up_days
    due = set()
    for c in customers:
        if c.last_order_at is None:
            continue
        if not low <= _days_between(c.last_order_at, now, config.timezone) <= high:
            continue
        if c.last_repurchase_at is not None and c.last_repurchase_at >= c.last_order_at:
            continue
        due.add(c.external_id)
    return sorted(due)


# ---- the daily digest ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DigestFigures:
    day: date  # the day the SLA and post figures are about (yesterday)
    first_response_met: int
    first_response_total: int
    queue_depth: int  # conversations waiting for an agent, now
    posts_sent: int
    posts_failed: int
    posts_missed: int = 0


@dataclass(frozen=True, slots=True)
class Lead:
    username: str
    wecom_userid: str | None
    team: str | None = None


def leads_to_tell(leads: Iterable[Lead]) -> list[Lead]:
    """Leads with a WeCom userid (an app message needs one), one per userid, by userid."""
    by_userid: dict[str, Lead] = {}
    for lead in leads:
        userid = (lead.wecom_userid or "").strip()
        if userid and userid not in by_userid:
            by_userid[userid] = lead
    return [by_userid[u] for u in sorted(by_userid)]


def attainment(met: int, total: int) -> str:
    """`met/total（pct%）`, or 无数据 when nothing was measured."""
    if total <= 0:
        return "无数据（昨日没有结束的首次响应计时）"
    return f"{met}/{total}（{met * 100 / total:.1f}%）"


def digest_text(figures: DigestFigures) -> str:
    """The digest a team lead receives, in Simplified Chinese."""
    lines = [
        f"【每日运营简报】{figures.day.isoformat()}",
        f"首次响应 SLA 达标：{attainment(figures.first_response_met, figures.first_response_total)}",
        f"当前排队会话：{figures.queue_depth} 个",
        f"昨日定时消息：发送成功 {figures.posts_sent} 条，发送失败 {figures.posts_failed} 条"
        + (f"，错过 {figures.posts_missed} 条" if figures.posts_missed else ""),
    ]
    return "\n".join(lines)


# ---- staff follow-up tasks -----------------------------------------------------------------------------------


def follow_up_text(external_id: str, customer_name: str | None, note: str, at_local: str) -> str:
    """The app message a member receives for a follow-up task."""
    who = f"{customer_name}（{external_id}）" if customer_name else external_id
    return f"【客户跟进提醒】{at_local}\n客户：{who}\n事项：{note.strip()}"


def check_follow_up(staff: str, customer: str, note: str) -> None:
    """ReminderInputError when a follow-up task is missing something."""
    if not staff.strip():
        raise ReminderInputError("a follow-up needs --staff (the member's userid)")
    if not customer.strip():
        raise ReminderInputError("a follow-up needs --customer (the customer's external_userid)")
    if not note.strip():
        raise ReminderInputError("a follow-up needs --note (what to follow up)")
    if len(note) > MAX_NOTE_CHARS:
        raise ReminderInputError(f"--note is longer than {MAX_NOTE_CHARS} characters")
