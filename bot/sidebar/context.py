"""What the sidebar shows for one chat: the customer's (or group's) tags and the scripts that fit them.

Listing rule (no search text): every script whose audience admits the tags and whose active window is open, in the
matcher's rank order (priority, then audience strictness, then id), each with the variant the bot itself would
choose for this customer (`choose_variant`, sticky per WeCom id). With search text `q`, the matcher runs on `q`
(`Matcher.explain`): the winner and the scripts that lost only on rank come first, in the matcher's order, then
scripts whose title, examples or rendered text contain `q`.

Only plain-text replies can be inserted with `sendChatMessage` here: a variant with any other message (link, menu,
image, markdown) is listed under `skipped` with the reason, as is one whose placeholders cannot be filled.
Placeholders are filled for this chat (customer name, the staff member as agent_name); anything unknown falls back
as the renderer does. Cooldowns do not apply: a person chooses to send.

The listing without search text is `bot.console.canned.scripts_for_tags`, which the console's canned replies use
too; the search reuses its pieces (`admitted_scripts`, `render_items`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.console.canned import (
    TEXT,
    TRIGGER,
    ScriptItem,
    Skipped,
    admitted_scripts,
    placeholder_values,
    render_items,
    scripts_for_tags,
)
from scripts_library import Matcher, Query, Script, normalize

MAX_QUERY_CHARS = 100


class GroupTags(Protocol):
    """Where a customer group's tags come from (none is stored yet: every group gets the default audience)."""

    async def __call__(self, chat_id: str) -> frozenset[str]: ...


async def no_group_tags(chat_id: str) -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True, slots=True)
class ChatSubject:
    """The chat the sidebar is open in: one external contact, or one customer group."""

    kind: str  # "single" | "group"
    wecom_id: str  # external_userid or chat_id; also the sticky A/B key, as the bot uses the WeCom id
    name: str | None
    known: bool
    tags: frozenset[str]
    tags_by_source: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SidebarContext:
    subject: ChatSubject
    scripts: tuple[ScriptItem, ...]
    skipped: tuple[Skipped, ...]

    def to_json(self) -> dict[str, Any]:
        s = self.subject
        return {
            "kind": s.kind,
            "id": s.wecom_id,
            "name": s.name,
            "known": s.known,
            "tags": sorted(s.tags),
            "tags_by_source": {source: sorted(tags) for source, tags in sorted(s.tags_by_source.items())},
            "audience": "tags" if s.tags else "default",
            "scripts": [item.to_json() for item in self.scripts],
            "skipped": [item.to_json() for item in self.skipped],
        }


def build_context(
    matcher: Matcher, subject: ChatSubject, *, now: float, staff_name: str | None = None, q: str = ""
) -> SidebarContext:
    library = matcher.library
    tags = subject.tags
    # a group has no one name to greet with: its scripts get the customer_name fallback
    values = placeholder_values(subject.name if subject.kind == "single" else None, staff_name)
    needle = normalize(q) if q else ""
    if not needle:  # the listing the console's canned replies show too: one rule for both
        listed = scripts_for_tags(library, tags, customer_key=subject.wecom_id, values=values, now=now)
        return SidebarContext(subject, listed.items, listed.skipped)
    admitted = admitted_scripts(library, tags, now)
    by_id = {s.id: s for s in admitted}
    explanation = matcher.explain(
        Query(text=q, tags=tags, customer_id=subject.wecom_id, now=now, fallback_no_match=False)
    )
    order: list[tuple[Script, str, tuple[str, ...]]] = []
    seen: set[str] = set()
    if explanation.winner is not None and explanation.winner.script.id in by_id:
        order.append((explanation.winner.script, TRIGGER, explanation.winner.reasons))
        seen.add(explanation.winner.script.id)
    for miss in explanation.near_misses:
        if miss.script.id in by_id and miss.script.id not in seen:
            order.append((miss.script, TRIGGER, miss.reasons))
            seen.add(miss.script.id)
    order.extend((s, TEXT, ()) for s in admitted if s.id not in seen)
    found = render_items(library, order, tags, subject.wecom_id, values)
    items = tuple(
        item for item in found.items if item.matched != TEXT or _contains(needle, by_id[item.script_id], item.texts)
    )
    return SidebarContext(subject, items, found.skipped)


def _contains(needle: str, script: Script, texts: Sequence[str]) -> bool:
    haystack = (script.title, script.id, *script.examples, *texts)
    return any(needle in normalize(text) for text in haystack)
