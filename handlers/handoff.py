"""When a conversation goes to a person, and the texts the customer is told on the way (pure).

Triggers, in the order the pipeline checks them:
- tag policy (before dispatch): a customer with a listed tag (e.g. 高价值) goes straight to a person;
- after dispatch, on the customer's text: a handoff phrase (转人工, 人工客服, ...), a complaint word (投诉, 差评, ...),
  a click on the handoff menu item, a library script that is a handoff action (`action: handoff`, or triggered
  by the `handoff_requested` event), or a miss after N consecutive answers by the library's no-match fallback
  (the fallback invites the customer to rephrase or ask for a person N times; the next miss goes to a person
  instead of a further "I did not understand").
One domain operation (bot.handoff.HandoffService.handoff) performs the handoff, whatever the trigger.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo

from handlers.domain import InboundMessage, KfOrigin
from handlers.sla import Priority
from scripts_library import Library, normalize

HANDOFF_EVENT = "handoff_requested"  # a library script triggered by this event is a handoff action
HANDOFF_ACTION = "handoff"  # a library script's explicit `action: handoff`
NO_MATCH_EVENT = "no_match"
DEFAULT_NO_MATCH_LIMIT = 2
WEEKDAYS_ZH = ("周一", "周二", "周三", "周四", "周五", "周六", "周日")


class HandoffReason(StrEnum):
    """Why a person was asked for (stored on the conversation as handoff_reason)."""

    CUSTOMER_ASKED = "customer_asked"
    MENU = "menu"
    COMPLAINT = "complaint"
    NO_MATCH = "no_match"
    TAG_POLICY = "tag_policy"
    SCRIPT = "script"
    MANUAL = "manual"  # staff opened it from the console
    LLM_INTENT = "llm_intent"  # the LLM intent router judged that the text needs a person


@dataclass(frozen=True, slots=True)
class TagPolicy:
    """Customers with any of `tags` go straight to a person, with this priority (and team, when given)."""

    tags: frozenset[str]
    priority: Priority = Priority.HIGH
    team: str | None = None


@dataclass(frozen=True, slots=True)
class HandoffTriggers:
    """What makes the bot hand a conversation to a person."""

    phrases: tuple[str, ...] = ("转人工", "人工客服", "找人工")
    complaint_words: tuple[str, ...] = ("投诉", "差评", "举报")
    menu_ids: frozenset[str] = frozenset({"menu_human"})
    no_match_limit: int = DEFAULT_NO_MATCH_LIMIT  # 0: never hand off for no-matches
    tag_policies: tuple[TagPolicy, ...] = ()
    complaint_priority: Priority = Priority.HIGH
    default_priority: Priority = Priority.NORMAL


@dataclass(frozen=True, slots=True)
class HandoffTrigger:
    """A decision to hand off: why, with which priority, to which team (None: the default team)."""

    reason: HandoffReason
    priority: Priority = Priority.NORMAL
    team: str | None = None
    detail: str = ""  # the phrase, word, menu id, script id or tag that fired (never the customer's text)


def is_customer_text(message: InboundMessage) -> bool:
    """A kf message the customer wrote (origin 3), not an event."""
    return message.origin == KfOrigin.CUSTOMER and message.msgtype not in ("event", "unknown")


def handoff_script_ids(library: Library) -> frozenset[str]:
    """Scripts that are handoff actions: `action: handoff`, or triggered by the `handoff_requested` event."""
    return frozenset(
        script.id
        for script in library.scripts
        if script.action == HANDOFF_ACTION or HANDOFF_EVENT in script.triggers.events
    )


def no_match_script_ids(library: Library) -> frozenset[str]:
    """Scripts that answer when nothing matched."""
    return frozenset(script.id for script in library.scripts if NO_MATCH_EVENT in script.triggers.events)


def _contains(text: str, terms: Iterable[str]) -> str | None:
    for term in terms:
        if term and normalize(term) in text:
            return term
    return None


def tag_policy_trigger(tags: frozenset[str], triggers: HandoffTriggers) -> HandoffTrigger | None:
    """The first tag policy the customer's tags meet, as a trigger."""
    for policy in triggers.tag_policies:
        hit = sorted(policy.tags & tags)
        if hit:
            return HandoffTrigger(HandoffReason.TAG_POLICY, policy.priority, policy.team, hit[0])
    return None


def text_trigger(
    message: InboundMessage,
    triggers: HandoffTriggers,
    answered_by: Iterable[str] = (),
    handoff_scripts: frozenset[str] = frozenset(),
) -> HandoffTrigger | None:
    """A handoff asked for by what the customer wrote or clicked, or by the script that answered."""
    if not is_customer_text(message):
        return None
    if message.menu_id and message.menu_id in triggers.menu_ids:
        return HandoffTrigger(HandoffReason.MENU, triggers.default_priority, None, message.menu_id)
    text = normalize(message.text or "")
    if text:
        word = _contains(text, triggers.complaint_words)
        if word is not None:
            return HandoffTrigger(HandoffReason.COMPLAINT, triggers.complaint_priority, None, word)
        phrase = _contains(text, triggers.phrases)
        if phrase is not None:
            return HandoffTrigger(HandoffReason.CUSTOMER_ASKED, triggers.default_priority, None, phrase)
    for script_id in answered_by:
        if script_id in handoff_scripts:
            return HandoffTrigger(HandoffReason.SCRIPT, triggers.default_priority, None, script_id)
    return None


def next_no_match_streak(streak: int, answered_by: Iterable[str], no_match_scripts: frozenset[str]) -> int:
    """The consecutive no-match count after this answer: +1 for a fallback answer, else back to 0."""
    answered = set(answered_by)
    if answered and answered <= no_match_scripts:
        return streak + 1
    return 0


def no_match_trigger(streak: int, triggers: HandoffTriggers) -> HandoffTrigger | None:
    """A handoff for a miss after `no_match_limit` no-match answers in a row (`streak` counts this miss too)."""
    if triggers.no_match_limit > 0 and streak > triggers.no_match_limit:
        return HandoffTrigger(HandoffReason.NO_MATCH, triggers.default_priority, None, str(streak))
    return None


def format_opening(at: float, timezone: str, now: float) -> str:
    """When the team opens, as a customer reads it: 今天 14:00, 明天 09:00, or 12月25日（周一）09:00."""
    tz = ZoneInfo(timezone)
    opening = datetime.fromtimestamp(at, tz)
    today = datetime.fromtimestamp(now, tz).date()
    clock = opening.strftime("%H:%M")
    days = (opening.date() - today).days
    if days <= 0:
        return f"今天 {clock}"
    if days == 1:
        return f"明天 {clock}"
    if days == 2:
        return f"后天 {clock}"
    return f"{opening.month}月{opening.day}日（{WEEKDAYS_ZH[opening.weekday()]}）{clock}"


def fill(template: str, **values: str) -> str:
    """A customer-facing text with {name} placeholders filled (unknown ones left as they are)."""
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", value)
    return out
