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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from scripts_library import Matcher, Query, RenderError, Script, choose_variant, normalize, render

MAX_QUERY_CHARS = 100
KIND_LABELS = {"link": "链接", "msgmenu": "菜单", "image": "图片", "file": "文件", "markdown": "Markdown"}


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
class ScriptItem:
    script_id: str
    title: str
    variant: str
    assignment: str
    texts: tuple[str, ...]
    matched: str  # "audience" | "trigger" | "text"
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.script_id,
            "title": self.title,
            "variant": self.variant,
            "assignment": self.assignment,
            "texts": list(self.texts),
            "matched": self.matched,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True, slots=True)
class Skipped:
    script_id: str
    title: str
    variant: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.script_id, "title": self.title, "variant": self.variant, "reason": self.reason}


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


def rank_key(script: Script) -> tuple[int, int, str]:
    """The matcher's order among scripts of equal match strength: priority, audience strictness, id."""
    return (-script.priority, -script.audience.strictness, script.id)


def _values(subject: ChatSubject, staff_name: str | None) -> dict[str, str]:
    values: dict[str, str] = {}
    if subject.kind == "single" and subject.name and subject.name.strip():
        values["customer_name"] = subject.name
    if staff_name and staff_name.strip():
        values["agent_name"] = staff_name
    return values


def build_context(
    matcher: Matcher, subject: ChatSubject, *, now: float, staff_name: str | None = None, q: str = ""
) -> SidebarContext:
    library = matcher.library
    tags = subject.tags
    values = _values(subject, staff_name)
    admitted = sorted(
        (
            s
            for s in library.scripts
            if s.audience.admits(tags) and (s.window is None or not s.window.why_inactive(now))
        ),
        key=rank_key,
    )
    order: list[tuple[Script, str, tuple[str, ...]]]
    needle = normalize(q) if q else ""
    if needle:
        by_id = {s.id: s for s in admitted}
        explanation = matcher.explain(
            Query(text=q, tags=tags, customer_id=subject.wecom_id, now=now, fallback_no_match=False)
        )
        order = []
        seen: set[str] = set()
        if explanation.winner is not None and explanation.winner.script.id in by_id:
            order.append((explanation.winner.script, "trigger", explanation.winner.reasons))
            seen.add(explanation.winner.script.id)
        for miss in explanation.near_misses:
            if miss.script.id in by_id and miss.script.id not in seen:
                order.append((miss.script, "trigger", miss.reasons))
                seen.add(miss.script.id)
        order.extend((s, "text", ()) for s in admitted if s.id not in seen)
    else:
        order = [(s, "audience", ()) for s in admitted]

    items: list[ScriptItem] = []
    skipped: list[Skipped] = []
    for script, matched, reasons in order:
        variant, assignment = choose_variant(script, tags, subject.wecom_id)
        kinds = sorted({r.kind for r in variant.replies if r.kind != "text"})
        if kinds:
            if matched != "text":  # a text-search non-hit is not worth a line
                names = "、".join(KIND_LABELS.get(k, k) for k in kinds)
                skipped.append(Skipped(script.id, script.title, variant.name, f"含非文字消息（{names}），无法插入"))
            continue
        try:
            rendered = render(library, script, variant, values)
        except RenderError as exc:
            skipped.append(Skipped(script.id, script.title, variant.name, f"缺少占位符 {{{exc.placeholder}}} 的值"))
            continue
        texts = tuple(str(r.content.get("content", "")) for r in rendered)
        if matched == "text" and not _contains(needle, script, texts):
            continue
        items.append(ScriptItem(script.id, script.title, variant.name, assignment, texts, matched, reasons))
    return SidebarContext(subject, tuple(items), tuple(skipped))


def _contains(needle: str, script: Script, texts: Sequence[str]) -> bool:
    haystack = (script.title, script.id, *script.examples, *texts)
    return any(needle in normalize(text) for text in haystack)
