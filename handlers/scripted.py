"""Answers from the script library (话术库): scripted replies, the kf welcome and the contact-added welcome.

Pure: everything comes from the message and the HandlerContext the pipeline fills (matcher, tags, customer
name, `last_sent` for cooldowns, the clock). Each reply carries the script and variant that produced it, so
the pipeline can record the answer.

Order matters and is set in `bot.app.build_dispatcher`; these handlers never overlap on one message:
- `kf_welcome`: kf `enter_session` with a welcome_code → one text/msgmenu through send_msg_on_event (§4.4).
- `contact_welcome`: 客户联系 add_external_contact with a WelcomeCode → text through send_welcome_msg (§5.5).
- `contact_added_without_welcome_code`: no WelcomeCode → nothing is sent. WeCom leaves the code out when the
  console already has a welcome for the member, the two already chatted, or a welcome went out through the
  add_half code (§3.1): a welcome is then not ours to send, and no other API may greet the customer instead.
  The handler's name, stored on the message, records why nothing went out.
- `scripted_reply`: customer text (kf origin 3) and app messages, including kf menu clicks → the matched
  script's items (kf: at most 5); nothing matches → the library's no_match script.
Other kf origins (4 system events, 5 servicer lines) are never answered, apart from the enter_session welcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handlers.domain import (
    UNHANDLED,
    Channel,
    HandlerContext,
    HandlerResult,
    InboundMessage,
    KfOrigin,
    OutboundMessage,
)
from scripts_library import Matcher, Query, Rendered, RenderError, Script, Variant, choose_variant, render

KF_MAX_REPLIES = 5  # kf/send_msg: at most 5 messages per customer message (reference §4.3)
KF_EVENT_MSGTYPES = frozenset({"text", "msgmenu"})  # what send_msg_on_event takes for a welcome (§4.4)
CONTACT_WELCOME_CHANGES = frozenset({"add_external_contact", "add_half_external_contact"})
KF_ENTER_SESSION = "enter_session"

# Library event names (scripts_library.KNOWN_EVENTS) for the WeCom events handled here.
EVENT_CONTACT_ADDED = "contact_added"
EVENT_KF_SESSION_ENTERED = "kf_session_entered"
EVENT_NO_MATCH = "no_match"


@dataclass(frozen=True, slots=True)
class Answer:
    """A script's rendered reply for one customer: what to send and where it came from."""

    script: Script
    variant: Variant
    assignment: str
    items: tuple[Rendered, ...]
    skipped: tuple[str, ...] = ()  # scripts that won but could not be rendered, and why


def _values(context: HandlerContext) -> dict[str, str]:
    values: dict[str, str] = {}
    if context.customer_name and context.customer_name.strip():
        values["customer_name"] = context.customer_name
    return values


def _eligible(script: Script, query: Query) -> bool:
    """Whether a triggered script could have answered (it only lost on rank)."""
    if not script.audience.admits(query.tags):
        return False
    if script.window is not None and script.window.why_inactive(query.now):
        return False
    if script.cooldown_seconds:
        last = query.last_sent(script.id)
        if last is not None and query.now - last < script.cooldown_seconds:
            return False
    return True


def _answer_for(matcher: Matcher, query: Query, values: dict[str, str]) -> Answer | None:
    """The winner of `query`, rendered; when it cannot be rendered, the next eligible candidate instead.

    A placeholder without value or fallback (RenderError) must not leave the customer unanswered, and must not
    send a half-filled text: the scripts that lost only on rank are tried in rank order, then no_match.
    """
    explanation = matcher.explain(query)
    if explanation.winner is None:
        return None
    winner = explanation.winner
    candidates: list[tuple[Script, Variant, str]] = [(winner.script, winner.variant, winner.assignment)]
    for miss in explanation.near_misses:
        if _eligible(miss.script, query):
            variant, assignment = choose_variant(miss.script, query.tags, query.customer_id)
            candidates.append((miss.script, variant, assignment))
    skipped: list[str] = []
    seen: set[str] = set()
    for script, variant, assignment in candidates:
        if script.id in seen:
            continue
        seen.add(script.id)
        try:
            items = render(matcher.library, script, variant, values)
        except RenderError as exc:
            skipped.append(str(exc))
            continue
        return Answer(script, variant, assignment, tuple(items), tuple(skipped))
    if query.event != EVENT_NO_MATCH and query.text is not None:
        fallback = Query(
            event=EVENT_NO_MATCH,
            tags=query.tags,
            customer_id=query.customer_id,
            now=query.now,
            last_sent=query.last_sent,
        )
        answer = _answer_for(matcher, fallback, values)
        if answer is not None:
            return Answer(
                answer.script, answer.variant, answer.assignment, answer.items, (*skipped, *answer.skipped)
            )
    return None


def _query(message: InboundMessage, context: HandlerContext, **fields: Any) -> Query:
    last_sent: Callable[[str], float | None] = context.last_sent
    return Query(
        tags=context.tags,
        customer_id=message.sender_id,  # the WeCom id: the A/B pick stays put across processes and databases
        now=context.now(),
        last_sent=last_sent,
        **fields,
    )


def _outbound(
    message: InboundMessage,
    answer: Answer,
    item: Rendered,
    *,
    channel: Channel | None = None,
    welcome_code: str | None = None,
    msgtype: str | None = None,
    content: dict[str, Any] | None = None,
) -> OutboundMessage:
    return OutboundMessage(
        channel=channel or message.channel,
        to=message.sender_id,
        account_id=message.account_id,
        msgtype=msgtype or item.msgtype,
        content=content if content is not None else item.content,
        welcome_code=welcome_code,
        script_id=answer.script.id,
        variant=answer.variant.name,
        assignment=answer.assignment,
    )


# --------------------------------------------------------------------------- app rendering

_APP_NATIVE = frozenset({"text", "markdown", "image", "file"})


def _menu_as_text(content: dict[str, Any]) -> str:
    lines: list[str] = []
    if content.get("head_content"):
        lines.append(str(content["head_content"]))
    for entry in content.get("list", []):
        body = entry.get(entry.get("type", ""), {})
        text = body.get("content") if isinstance(body, dict) else None
        if text:
            lines.append(f"· {text}")
    if content.get("tail_content"):
        lines.append(str(content["tail_content"]))
    return "\n".join(lines)


def _for_app(item: Rendered) -> tuple[str, dict[str, Any]]:
    """message/send has no link or msgmenu type: a link becomes a textcard, a menu plain text."""
    if item.msgtype in _APP_NATIVE:
        return item.msgtype, item.content
    if item.msgtype == "link":
        title = str(item.content.get("title", ""))
        desc = str(item.content.get("desc", "")) or title
        return "textcard", {"title": title, "description": desc, "url": str(item.content.get("url", ""))}
    return "text", {"content": _menu_as_text(item.content)}


# --------------------------------------------------------------------------- handlers


async def kf_welcome(message: InboundMessage, context: HandlerContext) -> HandlerResult:
    """kf enter_session with a welcome_code → the welcome script through send_msg_on_event (one message)."""
    if message.channel is not Channel.KF or message.msgtype != "event" or message.event != KF_ENTER_SESSION:
        return UNHANDLED
    if not message.welcome_code or context.matcher is None:
        return UNHANDLED
    answer = _answer_for(context.matcher, _query(message, context, event=EVENT_KF_SESSION_ENTERED), _values(context))
    if answer is None:
        return UNHANDLED
    for item in answer.items:
        if item.msgtype in KF_EVENT_MSGTYPES:  # the code is single-use: one text or menu, nothing else
            return [_outbound(message, answer, item, welcome_code=message.welcome_code)]
    return UNHANDLED


async def contact_welcome(message: InboundMessage, context: HandlerContext) -> HandlerResult:
    """客户联系 add_external_contact with a WelcomeCode → the contact-added welcome through send_welcome_msg."""
    if message.channel is not Channel.CONTACT or message.event not in CONTACT_WELCOME_CHANGES:
        return UNHANDLED
    if not message.welcome_code or not message.sender_id or context.matcher is None:
        return UNHANDLED
    answer = _answer_for(context.matcher, _query(message, context, event=EVENT_CONTACT_ADDED), _values(context))
    if answer is None:
        return UNHANDLED
    for item in answer.items:
        if item.msgtype == "text":  # send_welcome_msg: text (attachments are not used by the library yet)
            return [_outbound(message, answer, item, welcome_code=message.welcome_code)]
    return UNHANDLED


async def contact_added_without_welcome_code(message: InboundMessage, context: HandlerContext) -> HandlerResult:
    """add_external_contact without a WelcomeCode: WeCom says a welcome is not ours to send (§3.1), so none."""
    if message.channel is not Channel.CONTACT or message.event not in CONTACT_WELCOME_CHANGES:
        return UNHANDLED
    if message.welcome_code:
        return UNHANDLED
    return []


async def scripted_reply(message: InboundMessage, context: HandlerContext) -> HandlerResult:
    """A customer's kf message (origin 3) or a member's app message → the matched script, else no_match."""
    if message.msgtype in ("event", "unknown") or context.matcher is None:
        return UNHANDLED
    if message.channel is Channel.KF:
        if message.origin != KfOrigin.CUSTOMER:
            return UNHANDLED
    elif message.channel is not Channel.APP:
        return UNHANDLED
    # Non-text messages (image, voice, ...) have no text to match: "" still falls back to no_match.
    query = _query(message, context, text=message.text or "", menu_id=message.menu_id)
    answer = _answer_for(context.matcher, query, _values(context))
    if answer is None:
        return UNHANDLED
    return answer_replies(message, answer)


def answer_replies(message: InboundMessage, answer: Answer) -> list[OutboundMessage]:
    """The outbound messages of an answer to this message: app-shaped for staff, at most KF_MAX_REPLIES on kf."""
    replies: list[OutboundMessage] = []
    for item in answer.items:
        if message.channel is Channel.APP:
            msgtype, content = _for_app(item)
            replies.append(_outbound(message, answer, item, msgtype=msgtype, content=content))
        else:
            replies.append(_outbound(message, answer, item))
    return replies[:KF_MAX_REPLIES] if message.channel is Channel.KF else replies

