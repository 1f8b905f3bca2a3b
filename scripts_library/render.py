"""Render a chosen variant into WeCom message bodies, filling placeholders safely."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scripts_library.model import LIMITS, Library, Reply, Script, Variant
from scripts_library.text import parse_template

# In markdown a value must not open a tag (<@all>, <font>) or a link; swap those characters for full-width ones.
_MARKDOWN_SAFE = str.maketrans({"<": "＜", ">": "＞", "[": "［", "]": "］", "(": "（", ")": "）", "`": "｀"})


class RenderError(ValueError):
    """A placeholder had no value and no fallback; the caller should not send a half-filled text."""

    def __init__(self, script_id: str, placeholder: str) -> None:
        super().__init__(f"script {script_id!r}: no value for {{{placeholder}}} and no fallback")
        self.script_id = script_id
        self.placeholder = placeholder


@dataclass(frozen=True, slots=True)
class Rendered:
    """One message body, shaped like kf/send_msg's `msgtype` + `{msgtype: content}`."""

    msgtype: str
    content: dict[str, Any]


def _clip(value: str, max_bytes: int) -> str:
    data = value.encode()
    if len(data) <= max_bytes:
        return value
    return data[:max_bytes].decode(errors="ignore")


class _Filler:
    def __init__(self, library: Library, script: Script, values: Mapping[str, str]) -> None:
        self.script_id = script.id
        self.values = values
        self.fallbacks: dict[str, str | None] = dict(library.placeholders)
        self.fallbacks.update(script.fallbacks)

    def fill(self, template: str, *, markdown: bool = False) -> str:
        out: list[str] = []
        for token in parse_template(template):
            if not token.placeholder:
                out.append(token.literal)
                continue
            value = self.values.get(token.placeholder)
            if value is None or not str(value).strip():
                value = self.fallbacks.get(token.placeholder)
            if value is None:
                raise RenderError(self.script_id, token.placeholder)
            text = " ".join(str(value).split())  # no newlines or control whitespace from outside
            if markdown:
                text = text.translate(_MARKDOWN_SAFE)
            out.append(_clip(text, LIMITS.placeholder_value_bytes))
        return "".join(out)


def _render_one(reply: Reply, f: _Filler) -> Rendered:
    if reply.kind == "text":
        return Rendered("text", {"content": f.fill(reply.text)})
    if reply.kind == "markdown":
        return Rendered("markdown", {"content": f.fill(reply.text, markdown=True)})
    if reply.kind in ("image", "file"):
        return Rendered(reply.kind, {"media_id": reply.media_id})
    if reply.kind == "link":
        link: dict[str, Any] = {"title": f.fill(reply.title), "desc": f.fill(reply.desc), "url": reply.url}
        if reply.media_id:
            link["thumb_media_id"] = reply.media_id
        if reply.pic_url:
            link["pic_url"] = reply.pic_url
        return Rendered("link", link)
    items: list[dict[str, Any]] = []
    for item in reply.items:
        if item.type == "click":
            items.append({"type": "click", "click": {"id": item.id, "content": f.fill(item.content)}})
        elif item.type == "view":
            items.append({"type": "view", "view": {"url": item.url, "content": f.fill(item.content)}})
        elif item.type == "miniprogram":
            body = {"appid": item.appid, "pagepath": item.pagepath, "content": f.fill(item.content)}
            items.append({"type": "miniprogram", "miniprogram": body})
        else:
            text = {"content": f.fill(item.content), "no_newline": 1 if item.no_newline else 0}
            items.append({"type": "text", "text": text})
    menu: dict[str, Any] = {"list": items}
    if reply.head_content:
        menu["head_content"] = f.fill(reply.head_content)
    if reply.tail_content:
        menu["tail_content"] = f.fill(reply.tail_content)
    return Rendered("msgmenu", menu)


def render(library: Library, script: Script, variant: Variant, values: Mapping[str, str]) -> list[Rendered]:
    """The variant's messages with placeholders filled (value, else script fallback, else library fallback).

    Raises RenderError when a placeholder has none of the three: nothing half-filled is ever returned.
    """
    filler = _Filler(library, script, values)
    return [_render_one(reply, filler) for reply in variant.replies]
