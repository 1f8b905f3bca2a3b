"""The summary at the top of the conversation view, computed from the stored facts alone (no LLM, no I/O).

Who the customer is and how they are tagged, the channel, where the conversation stands and who has it, why it
was handed to a person, since when the customer waits and when the SLA falls due, how much the customer wrote and
what they said last, and whether they have been here before (and with whom).

Issue 6 adds a written summary from an LLM: it goes in `ConversationSummary.generated` (None until then), which
the page and the JSON already show when set; the facts here stay as they are, beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.console.templates import (
    CHANNEL_LABELS,
    CLOCK_LABELS,
    MSGTYPE_LABELS,
    PRIORITY_LABELS,
    REASON_LABELS,
    STATUS_LABELS,
    label,
)
from bot.storage.console_repository import ConversationDetail, HistoryMessage

LAST_MESSAGE_CHARS = 80


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    customer: str  # the name, else the WeCom id
    customer_external_id: str
    tags: tuple[str, ...]
    channel: str
    channel_label: str
    status: str
    status_label: str
    assignee: str | None
    team: str | None
    priority_label: str
    handoff_reason: str | None
    reason_label: str  # in Chinese; "—" when the conversation was never handed off
    waiting_since: float  # epoch seconds: queued, else handed off, else opened
    sla_kind: str | None
    sla_label: str | None  # 首次响应 / 下次响应 / 解决
    sla_due_at: float | None
    customer_messages: int
    last_customer_message: str | None  # whitespace folded, cut to LAST_MESSAGE_CHARS (with …)
    last_customer_at: float | None
    returning: bool  # the customer has had earlier conversations
    previous_conversations: int
    previous_agent: str | None  # who handled the latest earlier conversation that had a person
    generated: str | None = None  # issue 6: the LLM's written summary, when there is one

    def to_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "customer_external_id": self.customer_external_id,
            "tags": list(self.tags),
            "channel": self.channel,
            "channel_label": self.channel_label,
            "status": self.status,
            "status_label": self.status_label,
            "assignee": self.assignee,
            "team": self.team,
            "priority_label": self.priority_label,
            "handoff_reason": self.handoff_reason,
            "reason_label": self.reason_label,
            "waiting_since": self.waiting_since,
            "sla": None
            if self.sla_due_at is None
            else {"kind": self.sla_kind, "label": self.sla_label, "due_at": self.sla_due_at},
            "customer_messages": self.customer_messages,
            "last_customer_message": self.last_customer_message,
            "last_customer_at": self.last_customer_at,
            "returning": self.returning,
            "previous_conversations": self.previous_conversations,
            "previous_agent": self.previous_agent,
            "generated": self.generated,
        }


def cut(text: str, limit: int = LAST_MESSAGE_CHARS) -> str:
    """`text` on one line, at most `limit` characters, with … when something was cut off."""
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


def message_text(message: HistoryMessage) -> str:
    """A message as one line of text: its text, or what kind of message it was ([图片])."""
    if message.text is not None and message.text.strip():
        return message.text
    return f"[{label(MSGTYPE_LABELS, message.msgtype)}]"


def summarize(detail: ConversationDetail) -> ConversationSummary:
    row = detail.row
    last = next(
        (m for m in reversed(detail.messages) if m.author == "customer" and m.msgtype != "event"),
        None,
    )
    status = row.status.value
    name = row.customer_name.strip() if row.customer_name else ""
    return ConversationSummary(
        customer=name if name else row.customer_external_id,
        customer_external_id=row.customer_external_id,
        tags=row.tags,
        channel=row.channel,
        channel_label=label(CHANNEL_LABELS, row.channel),
        status=status,
        status_label=label(STATUS_LABELS, status),
        assignee=row.assignee_name,
        team=row.team,
        priority_label=label(PRIORITY_LABELS, row.priority),
        handoff_reason=row.handoff_reason,
        reason_label=label(REASON_LABELS, row.handoff_reason),
        waiting_since=row.waiting_since.timestamp(),
        sla_kind=None if row.sla is None else row.sla.kind,
        sla_label=None if row.sla is None else label(CLOCK_LABELS, row.sla.kind),
        sla_due_at=None if row.sla is None else row.sla.due_at,
        customer_messages=detail.customer_messages,
        last_customer_message=None if last is None else cut(message_text(last)),
        last_customer_at=None if last is None else last.at.timestamp(),
        returning=detail.previous_conversations > 0,
        previous_conversations=detail.previous_conversations,
        previous_agent=_agent_name(detail.previous_agent_id, detail.previous_agent_name),
    )


def _agent_name(agent_id: int | None, name: str | None) -> str | None:
    if agent_id is None:
        return None
    return name or f"客服 #{agent_id}"  # the staff account is gone: at least which one it was
