"""Load and validate a library folder: every problem is reported with its file and line."""

from __future__ import annotations

import hashlib
import operator
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from scripts_library._gc import gc_paused
from scripts_library.model import (
    BUILTIN_PLACEHOLDERS,
    BUILTIN_TAGS,
    KNOWN_EVENTS,
    LIMITS,
    ActiveWindow,
    Audience,
    Library,
    Limits,
    MenuItem,
    Problem,
    Reply,
    Script,
    Triggers,
    Variant,
)
from scripts_library.text import TemplateError, normalize_term, regex_problem, template_parts

TAGS_FILE = "tags.yaml"
PLACEHOLDERS_FILE = "placeholders.yaml"
DEFAULT_LIBRARY = Path(__file__).parent / "library"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PLACEHOLDER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DAILY = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")
_SCRIPT_KEYS = {
    "id", "title", "examples", "triggers", "audience", "priority", "cooldown_seconds", "active", "fallbacks",
    "reply", "variants", "action",
}  # fmt: skip
_ACTIONS = ("reply", "handoff")
_TRIGGER_KEYS = {"keywords_any", "keywords_all", "phrases", "regex", "menu_ids", "events"}
_AUDIENCE_KEYS = {"any_of", "all_of", "none_of"}
_VARIANT_KEYS = {"name", "tags", "priority", "weight", "reply"}
_ACTIVE_KEYS = {"from", "until", "daily", "timezone"}
_REPLY_KINDS = ("text", "markdown", "image", "file", "link", "msgmenu")
_MENU_KINDS = ("click", "view", "miniprogram", "text")


_NULL = "tag:yaml.org,2002:null"


_NO_TRIGGERS = Triggers()
_EVERYONE = Audience()  # immutable, so one instance serves every script without an audience


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


@dataclass
class _File:
    """Walks one composed YAML document, collecting problems instead of stopping at the first."""

    name: str
    problems: list[Problem]
    tags: frozenset[str]
    placeholders: Mapping[str, str | None]
    limits: Limits

    def problem(self, node: Node | int, message: str) -> None:
        line = node if isinstance(node, int) else _line(node)
        self.problems.append(Problem(self.name, line, message))

    def mapping(self, node: Node, what: str, allowed: set[str] | None = None) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            self.problem(node, f"{what} must be a mapping")
            return {}
        out: dict[str, tuple[Node, Node]] = {}
        for pair in node.value:  # the composer's own (key, value) tuples, kept as they are
            key = pair[0]
            if not isinstance(key, ScalarNode):
                self.problem(key, f"{what}: keys must be plain words")
                continue
            name: str = key.value
            if name in out:
                self.problem(key, f"{what}: duplicate key {name!r} (first on line {_line(out[name][0])})")
                continue
            if allowed is not None and name not in allowed:
                self.problem(key, f"{what}: unknown key {name!r} (expected one of {', '.join(sorted(allowed))})")
                continue
            out[name] = pair
        return out

    def string(self, node: Node, what: str, *, required: bool = True) -> str | None:
        if isinstance(node, ScalarNode) and node.tag != _NULL:
            value: str = node.value
            if required and (not value or value.isspace()):
                self.problem(node, f"{what} must not be empty")
                return None
            return value
        if required or isinstance(node, MappingNode | SequenceNode):
            self.problem(node, f"{what} must be text")
        return None

    def strings(self, node: Node, what: str) -> list[tuple[str, Node]]:
        if isinstance(node, SequenceNode):
            items: list[Node] = node.value
        elif isinstance(node, ScalarNode) and node.tag != _NULL:
            items = [node]
        else:
            self.problem(node, f"{what} must be a list of texts")
            return []
        out: list[tuple[str, Node]] = []
        for item in items:
            value = self.string(item, what)
            if value is not None:
                out.append((value, item))
        return out

    def integer(self, node: Node, what: str, minimum: int) -> int | None:
        text = node.value if isinstance(node, ScalarNode) else None
        try:
            value = int(str(text)) if text is not None else None
        except ValueError:
            value = None
        if value is None or value < minimum:
            self.problem(node, f"{what} must be a whole number ≥ {minimum}")
            return None
        return value

    def tag_set(self, node: Node, what: str) -> frozenset[str]:
        entries = self.strings(node, what)
        for tag, item in entries:
            if tag not in self.tags:
                self.problem(item, f"unknown tag {tag!r} in {what} (declare it in {TAGS_FILE})")
        return frozenset([tag for tag, _ in entries])

    # --- content -------------------------------------------------------------------------------------------

    def template(self, node: Node, what: str, limit: int | None, *, minimum: int = 0) -> str:
        value = self.string(node, what, required=minimum > 0)
        if value is None:
            return ""
        try:
            names, size = template_parts(value)
        except TemplateError as exc:
            self.problem(node, f"{what}: {exc}")
            return value
        for name in names:
            if name not in self.placeholders:
                self.problem(node, f"unknown placeholder {{{name}}} in {what}")
        size += len(names) * self.limits.placeholder_value_bytes
        if limit is not None and size > limit:
            self.problem(
                node,
                f"{what} is {size} bytes (placeholders counted at {self.limits.placeholder_value_bytes} B), "
                f"over WeCom's {limit}-byte limit",
            )
        return value

    def plain(self, node: Node, what: str, limit: int | None = None, *, required: bool = True) -> str:
        value = self.string(node, what, required=required)
        if value is None:
            return ""
        if re.search(r"\{[A-Za-z_][A-Za-z0-9_]*\}", value):
            self.problem(node, f"placeholders are not allowed in {what}")
        if limit is not None and len(value.encode()) > limit:
            self.problem(node, f"{what} is {len(value.encode())} bytes, over WeCom's {limit}-byte limit")
        return value

    def reply(self, node: Node) -> Reply | None:
        m = self.mapping(node, "reply item")
        if not m:
            return None
        kind = next(iter(m))
        if len(m) != 1 or kind not in _REPLY_KINDS:
            self.problem(node, f"a reply item has exactly one of {', '.join(_REPLY_KINDS)}")
            return None
        value = m[kind][1]
        lim = self.limits
        if kind == "text":
            return Reply(kind, text=self.template(value, "text", lim.text_bytes, minimum=1))
        if kind == "markdown":
            return Reply(kind, text=self.template(value, "markdown", lim.markdown_bytes, minimum=1))
        if kind in ("image", "file"):
            fields = self.mapping(value, kind, {"media_id"})
            if "media_id" not in fields:
                self.problem(value, f"{kind} needs media_id")
                return None
            return Reply(kind, media_id=self.plain(fields["media_id"][1], "media_id"))
        if kind == "link":
            fields = self.mapping(value, "link", {"title", "desc", "url", "thumb_media_id", "pic_url"})
            for needed in ("title", "url"):
                if needed not in fields:
                    self.problem(value, f"link needs {needed}")
            if "title" not in fields or "url" not in fields:
                return None
            return Reply(
                kind,
                title=self.template(fields["title"][1], "link title", lim.link_title_bytes, minimum=1),
                desc=self.template(fields["desc"][1], "link desc", lim.link_desc_bytes) if "desc" in fields else "",
                url=self.plain(fields["url"][1], "link url", lim.menu_view_url_bytes),
                media_id=self.plain(fields["thumb_media_id"][1], "thumb_media_id")
                if "thumb_media_id" in fields
                else "",
                pic_url=self.plain(fields["pic_url"][1], "pic_url") if "pic_url" in fields else "",
            )
        return self.msgmenu(value)

    def msgmenu(self, node: Node) -> Reply | None:
        lim = self.limits
        fields = self.mapping(node, "msgmenu", {"head_content", "tail_content", "list"})
        head = (
            self.template(fields["head_content"][1], "head_content", lim.menu_head_tail_bytes)
            if "head_content" in fields
            else ""
        )
        tail = (
            self.template(fields["tail_content"][1], "tail_content", lim.menu_head_tail_bytes)
            if "tail_content" in fields
            else ""
        )
        if "list" not in fields or not isinstance(fields["list"][1], SequenceNode):
            self.problem(node, "msgmenu needs a list of items")
            return None
        list_node = fields["list"][1]
        items: list[MenuItem] = []
        for item_node in list_node.value:
            item = self.menu_item(item_node)
            if item is not None:
                items.append(item)
        actionable = sum(1 for item in items if item.type != "text")
        if actionable > lim.menu_actionable_items:
            self.problem(
                list_node,
                f"msgmenu has {actionable} click/view/miniprogram items, over WeCom's limit of "
                f"{lim.menu_actionable_items}",
            )
        if len(list_node.value) > lim.menu_items:
            self.problem(list_node, f"msgmenu has {len(list_node.value)} items, over WeCom's limit of {lim.menu_items}")
        if not list_node.value:
            self.problem(list_node, "msgmenu list is empty")
        return Reply("msgmenu", head_content=head, tail_content=tail, items=tuple(items))

    def menu_item(self, node: Node) -> MenuItem | None:
        lim = self.limits
        m = self.mapping(node, "msgmenu item")
        if len(m) != 1 or next(iter(m)) not in _MENU_KINDS:
            if m:
                self.problem(node, f"a msgmenu item has exactly one of {', '.join(_MENU_KINDS)}")
            return None
        kind, (_, value) = next(iter(m.items()))
        if kind == "click":
            f = self.mapping(value, "click item", {"id", "content"})
            if "id" not in f or "content" not in f:
                self.problem(value, "click item needs id and content")
                return None
            return MenuItem(
                "click",
                id=self.plain(f["id"][1], "click id", lim.menu_click_id_bytes),
                content=self.template(f["content"][1], "click content", lim.menu_click_content_bytes, minimum=1),
            )
        if kind == "view":
            f = self.mapping(value, "view item", {"url", "content"})
            if "url" not in f or "content" not in f:
                self.problem(value, "view item needs url and content")
                return None
            return MenuItem(
                "view",
                url=self.plain(f["url"][1], "view url", lim.menu_view_url_bytes),
                content=self.template(f["content"][1], "view content", lim.menu_click_content_bytes, minimum=1),
            )
        if kind == "miniprogram":
            f = self.mapping(value, "miniprogram item", {"appid", "pagepath", "content"})
            if not {"appid", "pagepath", "content"} <= f.keys():
                self.problem(value, "miniprogram item needs appid, pagepath and content")
                return None
            return MenuItem(
                "miniprogram",
                appid=self.plain(f["appid"][1], "appid"),
                pagepath=self.plain(f["pagepath"][1], "pagepath"),
                content=self.template(f["content"][1], "miniprogram content", lim.menu_click_content_bytes, minimum=1),
            )
        f = self.mapping(value, "text item", {"content", "no_newline"})
        if "content" not in f:
            self.problem(value, "text item needs content")
            return None
        no_newline = "no_newline" in f and str(f["no_newline"][1].value).lower() in ("1", "true", "yes")
        return MenuItem(
            "text",
            content=self.template(f["content"][1], "menu text", lim.menu_text_item_bytes, minimum=1),
            no_newline=no_newline,
        )

    def replies(self, node: Node, where: str) -> tuple[Reply, ...]:
        items = node.value if isinstance(node, SequenceNode) else [node]
        if not items:
            self.problem(node, f"{where}: reply is empty")
        if len(items) > self.limits.replies_per_variant:
            self.problem(
                node,
                f"{where}: {len(items)} reply messages, over kf's limit of "
                f"{self.limits.replies_per_variant} per customer message",
            )
        out = [self.reply(item) for item in items]
        return tuple(r for r in out if r is not None)

    # --- script --------------------------------------------------------------------------------------------

    def triggers(self, node: Node) -> Triggers:
        f = self.mapping(node, "triggers", _TRIGGER_KEYS)
        got: dict[str, tuple[str, ...]] = {}
        for key, (_, value) in f.items():
            entries = self.strings(value, key)
            if key == "regex":
                for text, item in entries:
                    cause = regex_problem(text, self.limits.regex_chars)
                    if cause:
                        self.problem(item, f"{cause}: {text!r}")
            elif key == "events":
                for text, item in entries:
                    if text not in KNOWN_EVENTS:
                        self.problem(item, f"unknown event {text!r} (known: {', '.join(sorted(KNOWN_EVENTS))})")
            elif key != "menu_ids":  # keywords_any, keywords_all, phrases
                for text, item in entries:
                    if not normalize_term(text):
                        self.problem(item, f"{key}: {text!r} is empty after normalisation")
            got[key] = tuple([text for text, _ in entries])
        return Triggers(**got)

    def window(self, node: Node) -> ActiveWindow | None:
        f = self.mapping(node, "active", _ACTIVE_KEYS)
        tz_name = "Asia/Shanghai"
        if "timezone" in f:
            tz_name = self.string(f["timezone"][1], "timezone") or tz_name
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            self.problem(f["timezone"][1], f"unknown timezone {tz_name!r}")
            return None
        bounds: dict[str, datetime | None] = {"from": None, "until": None}
        for key in bounds:
            if key in f:
                raw = self.string(f[key][1], key)
                if raw is None:
                    continue
                try:
                    stamp = datetime.fromisoformat(raw.strip())
                except ValueError:
                    self.problem(f[key][1], f"{key}: {raw!r} is not a date/time like 2025-06-18 00:00")
                    continue
                bounds[key] = stamp if stamp.tzinfo else stamp.replace(tzinfo=tz)
        start, until = bounds["from"], bounds["until"]
        if start is not None and until is not None and start >= until:
            self.problem(node, "active: from must be before until")
        daily_from = daily_until = None
        if "daily" in f:
            raw = self.string(f["daily"][1], "daily") or ""
            m = _DAILY.match(raw.strip())
            try:
                if m is None:
                    raise ValueError(raw)
                daily_from = time(int(m.group(1)), int(m.group(2)))
                daily_until = time(int(m.group(3)), int(m.group(4)))
            except ValueError:
                self.problem(f["daily"][1], f"daily: {raw!r} is not a range like 09:00-21:00")
        return ActiveWindow(start, until, daily_from, daily_until, tz_name)

    def variants(self, node: Node) -> tuple[Variant, ...]:
        if not isinstance(node, SequenceNode) or not node.value:
            self.problem(node, "variants must be a non-empty list")
            return ()
        out: list[Variant] = []
        seen: dict[str, int] = {}
        for item in node.value:
            f = self.mapping(item, "variant", _VARIANT_KEYS)
            if not f:
                continue
            name = self.string(f["name"][1], "variant name") if "name" in f else None
            if name is None:
                if "name" not in f:
                    self.problem(item, "variant needs a name")
                continue
            if name in seen:
                self.problem(f["name"][1], f"duplicate variant name {name!r} (first on line {seen[name]})")
                continue
            seen[name] = _line(f["name"][1])
            if "reply" not in f:
                self.problem(item, f"variant {name!r} needs a reply")
                continue
            tags = self.tag_set(f["tags"][1], f"variant {name!r} tags") if "tags" in f else frozenset()
            priority = self.integer(f["priority"][1], "priority", -1000) if "priority" in f else 0
            weight = self.integer(f["weight"][1], "weight", 1) if "weight" in f else 1
            replies = self.replies(f["reply"][1], f"variant {name!r}")
            out.append(Variant(name, replies, tags, priority or 0, weight or 1))
        if out and all(v.tags for v in out):
            self.problem(node, "variants need a default (a variant without tags)")
        return tuple(out)

    def script(self, node: Node) -> Script | None:
        f = self.mapping(node, "script", _SCRIPT_KEYS)
        if not f:
            return None
        start = len(self.problems)
        script_id = self.string(f["id"][1], "id") if "id" in f else None
        if "id" not in f:
            self.problem(node, "script needs an id")
        elif script_id is not None and not _ID.match(script_id):
            self.problem(f["id"][1], f"id {script_id!r} must be letters, digits, _ . - (at most 64)")
        title = self.string(f["title"][1], "title") if "title" in f else None
        if "title" not in f:
            self.problem(node, "script needs a title")
        examples = tuple([t for t, _ in self.strings(f["examples"][1], "examples")]) if "examples" in f else ()
        triggers = self.triggers(f["triggers"][1]) if "triggers" in f else _NO_TRIGGERS
        t = triggers
        if not (t.keywords_any or t.keywords_all or t.phrases or t.regex or t.menu_ids or t.events):
            self.problem(f["triggers"][1] if "triggers" in f else node, "script needs at least one trigger")
        audience = _EVERYONE
        if "audience" in f:
            a = self.mapping(f["audience"][1], "audience", _AUDIENCE_KEYS)
            audience = Audience(**{k: self.tag_set(v, f"audience {k}") for k, (_, v) in a.items()})
        priority = self.integer(f["priority"][1], "priority", -1000) if "priority" in f else 0
        cooldown = self.integer(f["cooldown_seconds"][1], "cooldown_seconds", 0) if "cooldown_seconds" in f else 0
        window = self.window(f["active"][1]) if "active" in f else None
        action = self.string(f["action"][1], "action") if "action" in f else "reply"
        if action is not None and action not in _ACTIONS:
            self.problem(f["action"][1], f"action {action!r} must be one of {', '.join(_ACTIONS)}")
        fallbacks: list[tuple[str, str]] = []
        if "fallbacks" in f:
            for name, (key, value) in self.mapping(f["fallbacks"][1], "fallbacks").items():
                if name not in self.placeholders:
                    self.problem(key, f"unknown placeholder {{{name}}} in fallbacks")
                fallback = self.plain(value, f"fallback for {name}", self.limits.placeholder_value_bytes)
                fallbacks.append((name, fallback))
        variants: tuple[Variant, ...] = ()
        if ("reply" in f) == ("variants" in f):
            self.problem(node, "script needs either reply or variants (not both)")
        elif "reply" in f:
            variants = (Variant("default", self.replies(f["reply"][1], "reply")),)
        else:
            variants = self.variants(f["variants"][1])
        if len(self.problems) > start or script_id is None or title is None:
            return None
        return Script(
            id=script_id,
            title=title,
            file=self.name,
            line=_line(node),
            variants=variants,
            examples=examples,
            triggers=triggers,
            audience=audience,
            window=window,
            cooldown_seconds=cooldown or 0,
            priority=priority or 0,
            fallbacks=tuple(fallbacks),
            action=action or "reply",
        )


def _fast_loader() -> type[yaml.SafeLoader] | None:
    """libyaml's parser when PyYAML was built with it (the same nodes and marks, many times faster), with a
    cheaper tag resolution: libyaml calls back into Python for every node, which made resolving cost about a
    third of composing. Only plain scalars can resolve to anything but str, and only those starting with a
    character of the implicit-resolver table (digits, signs, `t`, `n`, `~`, ...); these are memoised (the
    result depends only on the text, as a SafeLoader has no path resolvers)."""
    base: type[yaml.SafeLoader] | None = getattr(yaml, "CSafeLoader", None)
    if base is None or base.yaml_path_resolvers:
        return base
    resolve = base.resolve
    scalar, sequence, mapping = base.DEFAULT_SCALAR_TAG, base.DEFAULT_SEQUENCE_TAG, base.DEFAULT_MAPPING_TAG
    cache: dict[str, str] = {}

    class _Loader(base):  # type: ignore[valid-type,misc]
        # libyaml calls these two around every node. With no path resolvers they do nothing; as builtins they
        # cost no Python frame, which saves about a tenth of composing.
        descend_resolver = staticmethod(operator.is_)  # called as (parent, index)
        ascend_resolver = staticmethod(tuple)  # called with no arguments

        def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
            if kind is not ScalarNode:
                return sequence if kind is SequenceNode else mapping
            if not implicit[0]:  # quoted, or tagged `!`: never resolved implicitly
                return scalar
            table = self.yaml_implicit_resolvers
            if value and value[0] not in table and None not in table:
                return scalar
            try:
                return cache[value]
            except KeyError:
                pass
            tag = str(resolve(self, kind, value, implicit))  # type: ignore[no-untyped-call]
            if len(cache) < 100_000:
                cache[value] = tag
            return tag

    return _Loader


_FAST_LOADER = _fast_loader()


# An alias is a node starting with `*`: at a line start or after a space or flow/indicator character. Text
# without this (a `*` inside a word or a regex like `\s*`) cannot hold one; with it, the tree is checked. An alias
# also needs an anchor (`&`) before it, or composing fails; `&` is looked for first because the regex is slow to
# scan a large file with (a tenth of a second for the benchmark's 5 MB, run on every cold load).
_ALIAS_START = re.compile(r"(?:^|[\s\[\]{},:?-])\*", re.MULTILINE)


def _has_alias(root: Node) -> bool:
    """Whether a composed tree reuses a node: the composer returns the anchored node itself for an alias."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            return True
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                stack.append(key)
                stack.append(value)
    return False


def _compose_fast(text: str) -> Node | None:
    """Compose with libyaml; raise LookupError when the pure-Python path must decide (aliases, errors)."""
    assert _FAST_LOADER is not None
    try:
        root = yaml.compose(text, Loader=_FAST_LOADER)
    except yaml.YAMLError as exc:
        raise LookupError("error") from exc
    if root is not None and "&" in text and _ALIAS_START.search(text) and _has_alias(root):
        raise LookupError("alias")
    return root


def _compose(name: str, text: str, problems: list[Problem]) -> Node | None:
    if _FAST_LOADER is not None:
        try:
            return _compose_fast(text)
        except LookupError:
            pass  # the pure-Python parser below finds and words the problem exactly as it always has
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark is not None else 1
                problems.append(Problem(name, line, "YAML aliases (*name) are not allowed"))
                return None
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problems.append(Problem(name, line, f"YAML syntax error: {exc.problem or exc.context}"))
    except yaml.YAMLError as exc:
        problems.append(Problem(name, 1, f"YAML syntax error: {exc}"))
    return None


def _vocabulary(
    sources: Mapping[str, str], problems: list[Problem], limits: Limits
) -> tuple[set[str], dict[str, str | None]]:
    tags = set(BUILTIN_TAGS)
    placeholders: dict[str, str | None] = dict(BUILTIN_PLACEHOLDERS)
    for name, text in sources.items():
        base = Path(name).name
        if base not in (TAGS_FILE, PLACEHOLDERS_FILE):
            continue
        root = _compose(name, text, problems)
        if root is None:
            continue
        walker = _File(name, problems, frozenset(), {}, limits)
        key = "tags" if base == TAGS_FILE else "placeholders"
        top = walker.mapping(root, base, {key})
        if key not in top:
            continue
        if base == TAGS_FILE:
            tags.update(t.strip() for t, _ in walker.strings(top[key][1], "tags"))
            continue
        for ph, (k, v) in walker.mapping(top[key][1], "placeholders").items():
            if not _PLACEHOLDER_NAME.match(ph):
                walker.problem(k, f"placeholder name {ph!r} must be letters, digits and _")
            fallback = walker.string(v, f"fallback for {ph}", required=False)
            placeholders[ph] = fallback
    return tags, placeholders


def _peek_id(node: Node) -> str | None:
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == "id" and isinstance(value, ScalarNode):
                return str(value.value)
    return None


def build_library(sources: Mapping[str, str], limits: Limits = LIMITS) -> Library | list[Problem]:
    """Validate YAML texts by file name (tags.yaml / placeholders.yaml are the vocabulary) into a Library."""
    with gc_paused():
        return _build_library(sources, limits)


def _build_library(sources: Mapping[str, str], limits: Limits) -> Library | list[Problem]:
    problems: list[Problem] = []
    tags, placeholders = _vocabulary(sources, problems, limits)
    vocabulary = _Vocabulary(frozenset(tags), frozenset(placeholders), limits)
    scripts: list[Script] = []
    first_seen: dict[str, tuple[str, int]] = {}
    for name in sorted(sources):
        if Path(name).name in (TAGS_FILE, PLACEHOLDERS_FILE):
            continue
        text = sources[name]
        data = text.encode()
        if len(data) > limits.file_bytes:
            problems.append(Problem(name, 1, f"file is over the {limits.file_bytes}-byte cap"))
            continue
        checked = _checked_file(name, text, data, vocabulary, placeholders)
        problems.extend(checked.problems)
        for entry in checked.entries:
            if entry.script_id is not None:
                if entry.script_id in first_seen:
                    file, line = first_seen[entry.script_id]
                    problems.append(
                        Problem(name, entry.line, f"duplicate id {entry.script_id!r} (first in {file}:{line})")
                    )
                    continue
                first_seen[entry.script_id] = (name, entry.line)
            problems.extend(entry.problems)
            if entry.script is not None:
                scripts.append(entry.script)
    if problems:
        return sorted(set(problems), key=lambda p: (p.file, p.line, p.message))
    return Library(
        scripts=tuple(sorted(scripts, key=lambda s: s.id)),
        tags=frozenset(tags),
        placeholders=tuple(sorted(placeholders.items())),
    )


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    """Everything outside a script file that its validation depends on."""

    tags: frozenset[str]
    placeholders: frozenset[str]
    limits: Limits


@dataclass(frozen=True, slots=True)
class _Entry:
    """One item of a file's `scripts:` list, validated on its own. Whether its id repeats one in an earlier item
    or file is decided over the whole library (and then its own problems are not reported)."""

    script_id: str | None
    line: int
    script: Script | None
    problems: tuple[Problem, ...]


@dataclass(frozen=True, slots=True)
class _Checked:
    """A script file validated against one vocabulary."""

    problems: tuple[Problem, ...]  # the file's own: YAML syntax, aliases, layout
    entries: tuple[_Entry, ...]


# File name -> (content digest, vocabulary, result) of its last validation. A reload re-validates only the files
# whose bytes (or the vocabulary) changed; one entry per name, so an edited file replaces its old version, and
# at most _CHECKED_FILES names (run-time edits arrive under new names) are kept, least recently used dropped.
_checked: dict[str, tuple[bytes, _Vocabulary, _Checked]] = {}
_checked_lock = threading.Lock()
_CHECKED_FILES = 4096


def _checked_file(
    name: str, text: str, data: bytes, vocabulary: _Vocabulary, placeholders: Mapping[str, str | None]
) -> _Checked:
    digest = hashlib.blake2b(data, digest_size=20).digest()
    with _checked_lock:
        cached = _checked.pop(name, None)
        if cached is not None and cached[0] == digest and cached[1] == vocabulary:
            _checked[name] = cached
            return cached[2]
    checked = _check_file(name, text, vocabulary, placeholders)
    with _checked_lock:
        _checked[name] = (digest, vocabulary, checked)
        while len(_checked) > _CHECKED_FILES:
            del _checked[next(iter(_checked))]
    return checked


def _check_file(name: str, text: str, vocabulary: _Vocabulary, placeholders: Mapping[str, str | None]) -> _Checked:
    problems: list[Problem] = []
    root = _compose(name, text, problems)
    if root is None:
        return _Checked(tuple(problems), ())
    walker = _File(name, problems, vocabulary.tags, placeholders, vocabulary.limits)
    top = walker.mapping(root, "file", {"scripts"})
    if "scripts" not in top:
        if top or isinstance(root, MappingNode):
            walker.problem(root, "a script file is a mapping with a `scripts:` list")
        return _Checked(tuple(problems), ())
    seq = top["scripts"][1]
    if not isinstance(seq, SequenceNode):
        walker.problem(seq, "scripts must be a list")
        return _Checked(tuple(problems), ())
    entries: list[_Entry] = []
    for node in seq.value:
        walker.problems = []
        script = walker.script(node)
        entries.append(_Entry(_peek_id(node), _line(node), script, tuple(walker.problems)))
    return _Checked(tuple(problems), tuple(entries))


def _files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        for extra in (TAGS_FILE, PLACEHOLDERS_FILE):
            if (root.parent / extra).is_file() and root.name != extra:
                yield root.parent / extra
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            yield path


def load_library(path: str | Path = DEFAULT_LIBRARY, limits: Limits = LIMITS) -> Library | list[Problem]:
    """Load a library folder (or one file beside its vocabulary): a Library, or every problem found."""
    root = Path(path)
    if not root.exists():
        return [Problem(str(root), 1, "no such file or folder")]
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    for file in _files(root):
        name = str(file)
        try:
            size = file.stat().st_size
            if size > limits.file_bytes:
                problems.append(Problem(name, 1, f"file is {size} bytes, over the {limits.file_bytes}-byte cap"))
                continue
            sources[name] = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(name, 1, "file is not UTF-8"))
        except OSError as exc:
            problems.append(Problem(name, 1, f"cannot read: {exc.strerror}"))
    if not sources and not problems:
        return [Problem(str(root), 1, "no .yaml files found")]
    built = build_library(sources, limits)
    if problems:
        more = built if isinstance(built, list) else []
        return sorted(problems + more, key=lambda p: (p.file, p.line, p.message))
    return built
