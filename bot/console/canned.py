"""The scripts that fit a customer's tags, rendered for that customer: the console's canned replies and the chat
sidebar's listing (bot/sidebar/context.py) both come from `scripts_for_tags`, so the two never disagree.

Rule: every script whose audience admits the tags and whose active window is open, in the matcher's rank order
(priority, then audience strictness, then id), each with the variant the bot itself would choose for this customer
(`choose_variant`, sticky per WeCom id). Placeholders are filled with the customer's name and the staff member as
agent_name; anything unknown falls back as the renderer does. Cooldowns do not apply: a person chooses to send.

Only plain-text replies can be sent from the console's reply box or inserted with `sendChatMessage`: a variant
with any other message (link, menu, image, markdown) is listed under `skipped` with the reason, as is one whose
placeholders cannot be filled.

This lives in the console package (pure: it imports only the script library) because importing anything under
`bot.sidebar` runs that package's `__init__`, which imports the console's views: the console cannot import the
sidebar without a cycle, while the sidebar already depends on the console.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scripts_library import Library, RenderError, Script, choose_variant, render

KIND_LABELS = {"link": "链接", "msgmenu": "菜单", "image": "图片", "file": "文件", "markdown": "Markdown"}

# How a script came to be listed: its audience admits the tags, the matcher fired on the search text, or the
# search text occurs in its title, examples or rendered text (the last two: the sidebar's search only).
AUDIENCE, TRIGGER, TEXT = "audience", "trigger", "text"


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
class TaggedScripts:
    items: tuple[ScriptItem, ...]
    skipped: tuple[Skipped, ...]


def rank_key(script: Script) -> tuple[int, int, str]:
    """The matcher's order among scripts of equal match strength: priority, audience strictness, id."""
    return (-script.priority, -script.audience.strictness, script.id)


def placeholder_values(customer_name: str | None, staff_name: str | None) -> dict[str, str]:
    """The values a person's rendering fills in: the customer's name and the staff member as agent_name
    (blank ones are left out, so the library's fallbacks apply)."""
    values: dict[str, str] = {}
    if customer_name and customer_name.strip():
        values["customer_name"] = customer_name
    if staff_name and staff_name.strip():
        values["agent_name"] = staff_name
    return values


def admitted_scripts(library: Library, tags: frozenset[str], now: float) -> list[Script]:
    """Every script whose audience admits `tags` and whose window is open at `now`, in rank order."""
    return sorted(
        (
            s
            for s in library.scripts
            if s.audience.admits(tags) and (s.window is None or not s.window.why_inactive(now))
        ),
        key=rank_key,
    )


def render_items(
    library: Library,
    order: Iterable[tuple[Script, str, tuple[str, ...]]],
    tags: frozenset[str],
    customer_key: str,
    values: dict[str, str],
) -> TaggedScripts:
    """Each (script, how it was matched, reasons) rendered for this customer, or skipped with the reason.

    A non-text variant found only by a text search is dropped silently (not worth a line); a variant whose
    placeholders cannot be filled is always reported."""
    items: list[ScriptItem] = []
    skipped: list[Skipped] = []
    for script, matched, reasons in order:
        variant, assignment = choose_variant(script, tags, customer_key)
        kinds = sorted({r.kind for r in variant.replies if r.kind != "text"})
        if kinds:
            if matched != TEXT:
                names = "、".join(KIND_LABELS.get(k, k) for k in kinds)
                skipped.append(Skipped(script.id, script.title, variant.name, f"含非文字消息（{names}），无法插入"))
            continue
        try:
            rendered = render(library, script, variant, values)
        except RenderError as exc:
            skipped.append(Skipped(script.id, script.title, variant.name, f"缺少占位符 {{{exc.placeholder}}} 的值"))
            continue
        texts = tuple(str(r.content.get("content", "")) for r in rendered)
        items.append(ScriptItem(script.id, script.title, variant.name, assignment, texts, matched, reasons))
    return TaggedScripts(tuple(items), tuple(skipped))


def scripts_for_tags(
    library: Library, tags: frozenset[str], *, customer_key: str, values: dict[str, str], now: float
) -> TaggedScripts:
    """The scripts a customer with `tags` may be sent, best first, rendered with `values`.

    `customer_key` is the sticky A/B key: the customer's WeCom id, as the bot itself uses."""
    order = [(s, AUDIENCE, ()) for s in admitted_scripts(library, tags, now)]
    return render_items(library, order, tags, customer_key, values)
