"""Scheduled-post content: what each channel accepts, WeCom's size limits, and the request body per channel.

Pure: checked when a post is created (so content over a limit is refused then, not discovered through an
errcode at 03:00) and again when it is rendered for sending (reference §4.3, §5.2, §5.3, §5.4).

Content bodies by kind:
  text      {"text": "..."}
  markdown  {"markdown": "..."}
  image     {"base64": "...", "md5": "..."} for robots, {"pic_url": "https://..."} for customer groups
  link      {"title": "...", "url": "https://...", "description": "...", "picurl": "..."}
  file      {"media_id": "..."}
  news      {"articles": [{"title": "...", "url": "...", "description": "...", "picurl": "..."}]}
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("text", "markdown", "image", "link", "file", "news")
TARGET_KINDS = ("robot", "group_chat", "segment", "staff")

ROBOT_TEXT_MAX_B = 2048
ROBOT_MARKDOWN_MAX_B = 4096
ROBOT_IMAGE_MAX_B = 2 * 1024 * 1024
NEWS_MAX_ARTICLES = 8
NEWS_TITLE_MAX_B = 128
NEWS_DESCRIPTION_MAX_B = 512
MASS_TEXT_MAX_B = 4000
APP_TEXT_MAX_B = 2048
KF_TEXT_MAX_B = 2048

# Which content kinds each channel can carry (file to a robot needs a robot-side upload: not supported yet).
SUPPORTED: dict[str, frozenset[str]] = {
    "robot": frozenset({"text", "markdown", "image", "link", "news"}),
    "group_chat": frozenset({"text", "image", "link", "file"}),
    "segment": frozenset({"text", "link"}),
    "staff": frozenset({"text", "markdown", "link", "file", "news"}),
}
CHANNEL_NAMES = {
    "robot": "group robot",
    "group_chat": "customer group",
    "segment": "customer segment",
    "staff": "staff",
}


class ContentError(ValueError):
    """Content a channel cannot carry or that is over WeCom's limit; one line for the post's author."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """What to send: the WeCom msgtype and its body (robot/app/kf), or the add_msg_template fields."""

    msgtype: str
    body: dict[str, Any]


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _string(content: Mapping[str, Any], key: str, kind: str) -> str:
    value = content.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ContentError(f"{kind} content needs a non-empty {key!r}")
    return value


def _limit(text: str, limit: int, what: str) -> str:
    size = _size(text)
    if size > limit:
        raise ContentError(f"{what} is {size} bytes, over WeCom's limit of {limit} bytes")
    return text


def _articles(content: Mapping[str, Any]) -> list[dict[str, str]]:
    raw = content.get("articles")
    if not isinstance(raw, list) or not 1 <= len(raw) <= NEWS_MAX_ARTICLES:
        raise ContentError(f"news needs 1 to {NEWS_MAX_ARTICLES} articles")
    articles = []
    for number, item in enumerate(raw, 1):
        if not isinstance(item, Mapping):
            raise ContentError(f"news article {number} is not an object")
        article = {
            "title": _limit(_string(item, "title", "news article"), NEWS_TITLE_MAX_B, f"article {number} title"),
            "url": _string(item, "url", "news article"),
        }
        description = item.get("description")
        if isinstance(description, str) and description:
            article["description"] = _limit(description, NEWS_DESCRIPTION_MAX_B, f"article {number} description")
        picurl = item.get("picurl")
        if isinstance(picurl, str) and picurl:
            article["picurl"] = picurl
        articles.append(article)
    return articles


def _link_article(content: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "articles": [
            {
                key: value
                for key, value in (
                    ("title", content.get("title")),
                    ("description", content.get("description")),
                    ("url", content.get("url")),
                    ("picurl", content.get("picurl")),
                )
                if isinstance(value, str) and value
            }
        ]
    }


def _link_text(content: Mapping[str, Any]) -> str:
    parts = [_string(content, "title", "link"), str(content.get("description") or ""), _string(content, "url", "link")]
    return "\n".join(part for part in parts if part)


def render(kind: str, content: Mapping[str, Any], target_kind: str) -> Rendered:
    """The body for one channel, or ContentError when the channel cannot carry it or it is over a limit."""
    if kind not in KINDS:
        raise ContentError(f"unknown content kind {kind!r} ({', '.join(KINDS)})")
    if target_kind not in SUPPORTED:
        raise ContentError(f"unknown target kind {target_kind!r} ({', '.join(TARGET_KINDS)})")
    if kind not in SUPPORTED[target_kind]:
        allowed = ", ".join(sorted(SUPPORTED[target_kind]))
        raise ContentError(f"a {CHANNEL_NAMES[target_kind]} cannot receive {kind} posts (it takes {allowed})")
    if target_kind == "robot":
        return _render_robot(kind, content)
    if target_kind == "group_chat":
        return _render_mass(kind, content)
    if target_kind == "segment":
        text = _string(content, "text", kind) if kind == "text" else _link_text(content)
        return Rendered("text", {"content": _limit(text, KF_TEXT_MAX_B, "the text")})
    return _render_app(kind, content)


def _render_robot(kind: str, content: Mapping[str, Any]) -> Rendered:
    if kind == "text":
        return Rendered("text", {"content": _limit(_string(content, "text", kind), ROBOT_TEXT_MAX_B, "the text")})
    if kind == "markdown":
        markdown = _limit(_string(content, "markdown", kind), ROBOT_MARKDOWN_MAX_B, "the markdown")
        return Rendered("markdown", {"content": markdown})
    if kind == "image":
        data = _string(content, "base64", kind)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ContentError("image base64 is not valid base64") from None
        if len(raw) > ROBOT_IMAGE_MAX_B:
            raise ContentError(f"the image is {len(raw)} bytes, over the robot's limit of {ROBOT_IMAGE_MAX_B} bytes")
        return Rendered("image", {"base64": data, "md5": _string(content, "md5", kind)})
    if kind == "link":
        _string(content, "title", kind)
        _string(content, "url", kind)
        return Rendered("news", {"articles": _articles(_link_article(content))})
    return Rendered("news", {"articles": _articles(content)})


def _render_mass(kind: str, content: Mapping[str, Any]) -> Rendered:
    if kind == "text":
        return Rendered(
            "text", {"text": {"content": _limit(_string(content, "text", kind), MASS_TEXT_MAX_B, "the text")}}
        )
    if kind == "image":
        return Rendered(
            "image", {"attachments": [{"msgtype": "image", "image": {"pic_url": _string(content, "pic_url", kind)}}]}
        )
    if kind == "link":
        link = {"title": _string(content, "title", kind), "url": _string(content, "url", kind)}
        for source, target in (("description", "desc"), ("picurl", "picurl")):
            value = content.get(source)
            if isinstance(value, str) and value:
                link[target] = value
        return Rendered("link", {"attachments": [{"msgtype": "link", "link": link}]})
    return Rendered(
        "file", {"attachments": [{"msgtype": "file", "file": {"media_id": _string(content, "media_id", kind)}}]}
    )


def _render_app(kind: str, content: Mapping[str, Any]) -> Rendered:
    if kind == "text":
        return Rendered("text", {"content": _limit(_string(content, "text", kind), APP_TEXT_MAX_B, "the text")})
    if kind == "markdown":
        return Rendered(
            "markdown", {"content": _limit(_string(content, "markdown", kind), APP_TEXT_MAX_B, "the markdown")}
        )
    if kind == "link":
        return Rendered(
            "textcard",
            {
                "title": _string(content, "title", kind),
                "description": str(content.get("description") or content.get("title")),
                "url": _string(content, "url", kind),
            },
        )
    if kind == "file":
        return Rendered("file", {"media_id": _string(content, "media_id", kind)})
    return Rendered("news", {"articles": _articles(content)})


def preview_text(rendered: Rendered) -> str:
    """A one-screen summary of a rendered body for `posts preview` (never a secret: bodies hold none)."""
    body = rendered.body
    if "content" in body:
        return str(body["content"])
    if "text" in body and isinstance(body["text"], Mapping):
        return str(body["text"].get("content", ""))
    if "articles" in body:
        return " | ".join(f"{a.get('title')} <{a.get('url')}>" for a in body["articles"])
    if "attachments" in body:
        return ", ".join(str(a.get("msgtype")) for a in body["attachments"])
    if rendered.msgtype == "textcard":
        return f"{body.get('title')} <{body.get('url')}>"
    if rendered.msgtype == "image":
        return f"image ({len(str(body.get('base64', '')))} base64 chars)"
    return rendered.msgtype
