"""Scheduled posts in the admin API: `/api/posts` (list, create, show, cancel, preview) and `/api/openapi.json`.

Same bearer tokens and error shape as the rest of /api (bot/admin_api.py). A post is validated by
`bot.cli_posts.build_post`, exactly as `wecom-bot posts add` validates it: an invalid cron line, a time in the
past, an unknown robot or content over WeCom's limits is refused with 400 `invalid_post` and the same sentence
the CLI prints. Posts are not scoped by team: admins and community managers (role community) read and change
every post, team leads read them, other roles get 403.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.auth import STAFF, json_error
from bot.cli_posts import (
    PostInputError,
    PostSpec,
    cancel_and_audit,
    deliveries_by_target,
    store_post,
    target_previews,
    upcoming_slots,
)
from bot.storage.db import create_session_factory
from bot.storage.models import PostStatus, StaffRole
from bot.storage.post_stats_repository import PostStatsRepository
from bot.storage.posts_repository import DeliveryRecord, PostRecord, PostRepository
from bot.storage.staff_repository import StaffRecord
from handlers.post_content import KINDS
from scheduler.slots import DEFAULT_TIMEZONE, RuleError, zone

if TYPE_CHECKING:
    from bot.app import Services

POSTS_READERS = frozenset({StaffRole.ADMIN, StaffRole.COMMUNITY, StaffRole.LEAD})
POSTS_WRITERS = frozenset({StaffRole.ADMIN, StaffRole.COMMUNITY})
MAX_POST_REQUEST_BYTES = 4 * 1024 * 1024  # a robot image is up to 2 MB, ~2.7 MB as base64
MAX_TARGETS_PER_KIND = 100
MAX_PREVIEW_SLOTS = 50
DEFAULT_PREVIEW_SLOTS = 5
MAX_LIST = 500
RECENT_DELIVERIES = 20  # per target, in a post's detail
MAX_POST_ID = 2**63 - 1
SPEC_FIELDS = frozenset(
    {"title", "owner", "kind", "content", "at", "cron", "timezone", "robots", "groups", "segments", "staff"}
)
STATUS_FILTERS = ("active", "cancelled", "all")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PostsApiError(Exception):
    """Ends a request with the API's JSON error: `{"error": code, "message": sentence, ...}`."""

    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def _bad_field(message: str) -> PostsApiError:
    return PostsApiError(400, "bad_field", message)


def _answering_errors(handler: Handler) -> Handler:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except PostsApiError as exc:
            return json_error(exc.status, exc.code, exc.message, **exc.extra)

    return run


def _role(request: web.Request, roles: frozenset[StaffRole], doing: str) -> StaffRecord:
    user = request[STAFF]
    if user.role not in roles:
        raise PostsApiError(403, "forbidden", f"role {user.role.value} may not {doing}")
    return user


# ---- reading the request


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_POST_REQUEST_BYTES:
        raise PostsApiError(413, "too_large", f"request bodies are limited to {MAX_POST_REQUEST_BYTES} bytes")
    raw = await request.content.read(MAX_POST_REQUEST_BYTES + 1)
    if len(raw) > MAX_POST_REQUEST_BYTES:
        raise PostsApiError(413, "too_large", f"request bodies are limited to {MAX_POST_REQUEST_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise PostsApiError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise PostsApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _post_id(request: web.Request) -> int:
    raw = request.match_info["post_id"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or not 0 < int(raw) <= MAX_POST_ID:
        raise PostsApiError(400, "bad_post_id", "post ids are positive integers")
    return int(raw)


def _text(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad_field(f"`{name}` is required")
        return None
    if not isinstance(value, str):
        raise _bad_field(f"`{name}` must be text")
    return value


def _items(body: Mapping[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad_field(f"`{name}` must be a list")
    if len(value) > MAX_TARGETS_PER_KIND:
        raise _bad_field(f"`{name}` takes at most {MAX_TARGETS_PER_KIND} entries")
    return value


def _strings(body: Mapping[str, Any], name: str) -> list[str]:
    items = _items(body, name)
    if not all(isinstance(item, str) for item in items):
        raise _bad_field(f"`{name}` must be a list of text")
    return items


def _group(item: object) -> str:
    """A customer group as `CHAT_ID[:SENDER]` (the CLI's spelling) or `{"chat_id": ..., "sender": ...}`."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("chat_id"), str):
        chat_id, sender = item["chat_id"], item.get("sender") or ""
        if not isinstance(sender, str) or ":" in chat_id or set(item) - {"chat_id", "sender"}:
            raise _bad_field('a group is {"chat_id": text, "sender": text (optional)}')
        return f"{chat_id}:{sender}" if sender else chat_id
    raise _bad_field('`groups` entries are "CHAT_ID[:SENDER]" or {"chat_id", "sender"}')


def _segment(item: object) -> str:
    """A customer segment as `"TAG,TAG"` or `["TAG", "TAG"]` (customers with any of the tags)."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and all(isinstance(tag, str) and "," not in tag for tag in item):
        return ",".join(item)
    raise _bad_field('`segments` entries are "TAG,TAG" or a list of tags')


def spec_from_json(body: Mapping[str, Any]) -> PostSpec:
    """The request body as the CLI's PostSpec; only the shape is checked here, the rest by build_post."""
    unknown = sorted(set(body) - SPEC_FIELDS)
    if unknown:
        raise _bad_field(f"unknown field(s): {', '.join(unknown)} (see GET /api/openapi.json)")
    kind = _text(body, "kind", required=True)
    content = body.get("content")
    if not isinstance(content, dict):
        raise _bad_field(f'`content` must be an object, e.g. {{"text": "..."}} for kind text ({", ".join(KINDS)})')
    return PostSpec(
        title=_text(body, "title") or "",
        owner=_text(body, "owner") or "",
        kind=kind or "",
        content=content,
        at=_text(body, "at"),
        cron=_text(body, "cron"),
        timezone=_text(body, "timezone") or DEFAULT_TIMEZONE,
        robots=_strings(body, "robots"),
        groups=[_group(item) for item in _items(body, "groups")],
        segments=[_segment(item) for item in _items(body, "segments")],
        staff=_strings(body, "staff"),
    )


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise _bad_field(f"{name} must be an integer from {low} to {high}")
    return int(raw)


# ---- writing the answer


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _local(value: datetime, timezone: str) -> str:
    try:
        return value.astimezone(zone(timezone)).strftime("%Y-%m-%d %H:%M")
    except RuleError:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _rule_json(post: PostRecord) -> dict[str, Any]:
    rule = post.rule
    return {"kind": rule.kind, "at": _iso(rule.at), "cron": rule.cron, "timezone": rule.timezone}


def _total(counts: Mapping[int, Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for per_state in counts.values():
        for state, count in per_state.items():
            total[state] = total.get(state, 0) + count
    return dict(sorted(total.items()))


def post_json(post: PostRecord, counts: Mapping[int, Mapping[str, int]], now: datetime) -> dict[str, Any]:
    """A post as listed: its rule, next slot, targets and delivery counts by state (per target and in all)."""
    upcoming = upcoming_slots(post, now, 1)
    return {
        "id": post.id,
        "title": post.title,
        "owner": post.owner,
        "kind": post.kind,
        "status": post.status.value,
        "rule": _rule_json(post),
        "next_slot": _iso(upcoming[0]) if upcoming else None,
        "created_at": _iso(post.created_at),
        "cancelled_at": _iso(post.cancelled_at),
        "targets": [
            {
                "id": t.id,
                "kind": t.kind.value,
                "ref": t.ref,
                "params": dict(t.params),
                "deliveries": dict(sorted(counts.get(t.id, {}).items())),
            }
            for t in post.targets
        ],
        "deliveries": _total(counts),
    }


def delivery_json(delivery: DeliveryRecord) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "slot_at": _iso(delivery.slot_at),
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "reason": delivery.reason,
        "errcode": delivery.errcode,
        "errmsg": delivery.errmsg,
        "detail": dict(delivery.detail),
        "sent_at": _iso(delivery.sent_at),
        "updated_at": _iso(delivery.updated_at),
    }


def post_detail_json(post: PostRecord, deliveries: Sequence[DeliveryRecord], now: datetime) -> dict[str, Any]:
    """A post with its content and, per target, its delivery counts and latest deliveries."""
    by_target = deliveries_by_target(post, deliveries)
    counts: dict[int, dict[str, int]] = {}
    for target_id, rows in by_target.items():
        for row in rows:
            per_state = counts.setdefault(target_id, {})
            per_state[row.state.value] = per_state.get(row.state.value, 0) + 1
    out = post_json(post, counts, now)
    out["content"] = dict(post.content)
    for target in out["targets"]:
        target["recent"] = [delivery_json(d) for d in by_target.get(target["id"], [])[-RECENT_DELIVERIES:]]
    return out


class PostsApi:
    """Handlers bound to the process's services."""

    def __init__(self, services: Services) -> None:
        sessions = create_session_factory(services.engine)
        self.clock = services.clock
        self.posts = PostRepository(sessions, services.clock)
        self.stats = PostStatsRepository(sessions, services.clock)
        self.audit = services.repos.audit

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/openapi.json", _answering_errors(self.openapi)),
            web.get("/posts", _answering_errors(self.list_posts)),
            web.post("/posts", _answering_errors(self.create_post)),
            web.get("/posts/{post_id}", _answering_errors(self.show_post)),
            web.post("/posts/{post_id}/cancel", _answering_errors(self.cancel_post)),
            web.get("/posts/{post_id}/preview", _answering_errors(self.preview_post)),
        ]

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    async def _post(self, request: web.Request) -> PostRecord:
        post_id = _post_id(request)
        post = await self.posts.get_post(post_id)
        if post is None:
            raise PostsApiError(404, "not_found", f"no post {post_id}")
        return post

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI 3 document of the posts endpoints (any valid token may read it)."""
        return web.json_response(OPENAPI)

    async def list_posts(self, request: web.Request) -> web.Response:
        _role(request, POSTS_READERS, "read posts")
        wanted = request.query.get("status", "all")
        if wanted not in STATUS_FILTERS:
            raise _bad_field(f"status must be one of {', '.join(STATUS_FILTERS)}")
        limit = _query_int(request, "limit", MAX_LIST, 1, MAX_LIST)
        status = None if wanted == "all" else PostStatus(wanted)
        posts = await self.posts.list_posts(status=status, limit=limit)
        counts = await self.stats.delivery_counts(p.id for p in posts)
        now = self._now()
        return web.json_response({"posts": [post_json(p, counts.get(p.id, {}), now) for p in posts]})

    async def create_post(self, request: web.Request) -> web.Response:
        user = _role(request, POSTS_WRITERS, "create posts")
        spec = spec_from_json(await _json_body(request))
        now = self._now()
        try:
            post = await store_post(self.posts, self.audit, spec, now, user.username)
        except PostInputError as exc:
            raise PostsApiError(400, "invalid_post", str(exc)) from None
        return web.json_response(post_detail_json(post, [], now), status=201)

    async def show_post(self, request: web.Request) -> web.Response:
        _role(request, POSTS_READERS, "read posts")
        post = await self._post(request)
        deliveries = await self.posts.deliveries(post_id=post.id)
        return web.json_response(post_detail_json(post, deliveries, self._now()))

    async def cancel_post(self, request: web.Request) -> web.Response:
        user = _role(request, POSTS_WRITERS, "cancel posts")
        post = await self._post(request)
        skipped = await cancel_and_audit(self.posts, self.audit, post.id, user.username)
        if skipped is None:  # deleted in between (posts are never deleted today)
            raise PostsApiError(404, "not_found", f"no post {post.id}")
        return web.json_response(
            {
                "id": post.id,
                "status": PostStatus.CANCELLED.value,
                "was_active": post.status is PostStatus.ACTIVE,
                "skipped": skipped,
            }
        )

    async def preview_post(self, request: web.Request) -> web.Response:
        _role(request, POSTS_READERS, "read posts")
        count = _query_int(request, "n", DEFAULT_PREVIEW_SLOTS, 1, MAX_PREVIEW_SLOTS)
        post = await self._post(request)
        slots = upcoming_slots(post, self._now(), count)
        return web.json_response(
            {
                "id": post.id,
                "status": post.status.value,
                "timezone": post.rule.timezone,
                "slots": [{"at": _iso(s), "local": _local(s, post.rule.timezone)} for s in slots],
                "targets": [
                    {
                        "id": item.target.id,
                        "kind": item.target.kind.value,
                        "ref": item.target.ref,
                        "msgtype": item.rendered.msgtype if item.rendered else None,
                        "body": item.rendered.body if item.rendered else None,
                        "text": item.text if item.rendered else None,
                        "error": item.error,
                    }
                    for item in target_previews(post)
                ],
            }
        )


# ---- the OpenAPI document


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_content(_ref("Error"))}


_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthenticated"},
    "403": {"$ref": "#/components/responses/Forbidden"},
}
_POST_ID = {
    "name": "post_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
    "description": "the post's id",
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}, "description": "rows by delivery state"}
_TEXT_LIST = {"type": "array", "items": {"type": "string"}, "maxItems": MAX_TARGETS_PER_KIND}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": "string", "format": "date-time", "nullable": True}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "wecom-bot admin API: scheduled posts",
        "version": "1.0.0",
        "description": (
            "The content calendar: one-off and recurring posts aimed at group robots, customer groups, customer "
            "segments and staff; each slot is delivered once per target (docs/scheduling.md). Validation is the "
            "CLI's (`wecom-bot posts add`). Readers: admin, community, lead. Writers: admin, community."
        ),
    },
    "servers": [{"url": "/api"}],
    "security": [{"bearerAuth": []}],
    "paths": {
        "/posts": {
            "get": {
                "operationId": "listPosts",
                "summary": "List posts, newest first, with their next slot and delivery counts",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(STATUS_FILTERS), "default": "all"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": MAX_LIST},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the posts",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["posts"],
                                "properties": {"posts": {"type": "array", "items": _ref("Post")}},
                            }
                        ),
                    },
                    "400": _error_response("bad_field: an unknown status or limit"),
                    **_ERRORS,
                },
            },
            "post": {
                "operationId": "createPost",
                "summary": "Plan a post (validated like `wecom-bot posts add`)",
                "requestBody": {"required": True, "content": _json_content(_ref("PostInput"))},
                "responses": {
                    "201": {"description": "the stored post", "content": _json_content(_ref("PostDetail"))},
                    "400": _error_response(
                        "bad_json / bad_field (the body's shape) or invalid_post: an invalid cron line, a time in the "
                        "past, an unknown robot, content a channel cannot carry or over WeCom's limits, ..."
                    ),
                    "413": _error_response("too_large: the body is over 4 MiB"),
                    **_ERRORS,
                },
            },
        },
        "/posts/{post_id}": {
            "get": {
                "operationId": "showPost",
                "summary": "A post with its content and its delivery status per target",
                "parameters": [_POST_ID],
                "responses": {
                    "200": {"description": "the post", "content": _json_content(_ref("PostDetail"))},
                    "400": _error_response("bad_post_id"),
                    "404": _error_response("not_found"),
                    **_ERRORS,
                },
            }
        },
        "/posts/{post_id}/cancel": {
            "post": {
                "operationId": "cancelPost",
                "summary": "Cancel a post: its scheduled deliveries become skipped (reason cancelled)",
                "parameters": [_POST_ID],
                "responses": {
                    "200": {
                        "description": "cancelled (again: was_active false, skipped 0)",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["id", "status", "was_active", "skipped"],
                                "properties": {
                                    "id": {"type": "integer"},
                                    "status": {"type": "string", "enum": ["cancelled"]},
                                    "was_active": {"type": "boolean"},
                                    "skipped": {"type": "integer"},
                                },
                            }
                        ),
                    },
                    "400": _error_response("bad_post_id"),
                    "404": _error_response("not_found"),
                    **_ERRORS,
                },
            }
        },
        "/posts/{post_id}/preview": {
            "get": {
                "operationId": "previewPost",
                "summary": "The next slots and the content as each target will receive it",
                "parameters": [
                    _POST_ID,
                    {
                        "name": "n",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_PREVIEW_SLOTS,
                            "default": DEFAULT_PREVIEW_SLOTS,
                        },
                    },
                ],
                "responses": {
                    "200": {"description": "the preview", "content": _json_content(_ref("Preview"))},
                    "400": _error_response("bad_post_id or bad_field (n)"),
                    "404": _error_response("not_found"),
                    **_ERRORS,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3 document"}, "401": _ERRORS["401"]},
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "a staff token (wecom-bot tokens create)"}
        },
        "responses": {
            "Unauthenticated": _error_response("no, unknown, revoked or disabled token"),
            "Forbidden": _error_response("the token's role may not do this"),
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "PostInput": {
                "type": "object",
                "required": ["title", "owner", "kind", "content"],
                "additionalProperties": False,
                "description": "exactly one of `at` and `cron`; at least one target",
                "properties": {
                    "title": {"type": "string", "maxLength": 200},
                    "owner": {"type": "string", "maxLength": 64, "description": "member userid told about failures"},
                    "kind": {"type": "string", "enum": list(KINDS)},
                    "content": {
                        "type": "object",
                        "description": (
                            'by kind: text {"text"}, markdown {"markdown"}, image {"base64", "md5"} (robots) or '
                            '{"pic_url"} (customer groups), link {"title", "url", "description", "picurl"}, '
                            'file {"media_id"}, news {"articles": [{"title", "url", "description", "picurl"}]}'
                        ),
                    },
                    "at": {"type": "string", "description": "one-off: YYYY-MM-DD HH:MM in `timezone`, or ISO-8601"},
                    "cron": {"type": "string", "maxLength": 120, "description": "recurring: a crontab line"},
                    "timezone": {"type": "string", "default": DEFAULT_TIMEZONE},
                    "robots": {**_TEXT_LIST, "description": "registered group robot names"},
                    "groups": {
                        "type": "array",
                        "maxItems": MAX_TARGETS_PER_KIND,
                        "description": "customer groups (enterprise mass messages)",
                        "items": {
                            "oneOf": [
                                {"type": "string", "description": "CHAT_ID or CHAT_ID:SENDER"},
                                {
                                    "type": "object",
                                    "required": ["chat_id"],
                                    "properties": {"chat_id": {"type": "string"}, "sender": {"type": "string"}},
                                },
                            ]
                        },
                    },
                    "segments": {
                        "type": "array",
                        "maxItems": MAX_TARGETS_PER_KIND,
                        "description": "微信客服 customers with any of the tags",
                        "items": {
                            "oneOf": [
                                {"type": "string", "description": "TAG,TAG"},
                                {"type": "array", "items": {"type": "string"}},
                            ]
                        },
                    },
                    "staff": {**_TEXT_LIST, "description": "member userids (app messages)"},
                },
            },
            "Target": {
                "type": "object",
                "required": ["id", "kind", "ref", "deliveries"],
                "properties": {
                    "id": {"type": "integer"},
                    "kind": {"type": "string", "enum": ["robot", "group_chat", "segment", "staff"]},
                    "ref": {"type": "string"},
                    "params": {"type": "object"},
                    "deliveries": _COUNTS,
                    "recent": {"type": "array", "items": _ref("Delivery"), "description": "detail only"},
                },
            },
            "Post": {
                "type": "object",
                "required": ["id", "title", "owner", "kind", "status", "rule", "targets", "deliveries"],
                "properties": {
                    "id": {"type": "integer"},
                    "title": {"type": "string"},
                    "owner": {"type": "string"},
                    "kind": {"type": "string"},
                    "status": {"type": "string", "enum": ["active", "cancelled"]},
                    "rule": {
                        "type": "object",
                        "properties": {
                            "kind": {"type": "string", "enum": ["at", "cron", "sop"]},
                            "at": _NULLABLE_TIME,
                            "cron": {"type": "string", "nullable": True},
                            "timezone": {"type": "string"},
                        },
                    },
                    "next_slot": _NULLABLE_TIME,
                    "created_at": _TIME,
                    "cancelled_at": _NULLABLE_TIME,
                    "targets": {"type": "array", "items": _ref("Target")},
                    "deliveries": _COUNTS,
                },
            },
            "PostDetail": {
                "allOf": [
                    _ref("Post"),
                    {"type": "object", "required": ["content"], "properties": {"content": {"type": "object"}}},
                ]
            },
            "Delivery": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "slot_at": _TIME,
                    "state": {
                        "type": "string",
                        "enum": ["scheduled", "sending", "sent", "failed", "skipped", "missed"],
                    },
                    "attempts": {"type": "integer"},
                    "reason": {"type": "string", "nullable": True},
                    "errcode": {"type": "integer", "nullable": True},
                    "errmsg": {"type": "string", "nullable": True},
                    "detail": {"type": "object"},
                    "sent_at": _NULLABLE_TIME,
                    "updated_at": _TIME,
                },
            },
            "Preview": {
                "type": "object",
                "required": ["id", "status", "slots", "targets"],
                "properties": {
                    "id": {"type": "integer"},
                    "status": {"type": "string"},
                    "timezone": {"type": "string"},
                    "slots": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"at": _TIME, "local": {"type": "string"}},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "integer"},
                                "kind": {"type": "string"},
                                "ref": {"type": "string"},
                                "msgtype": {"type": "string", "nullable": True},
                                "body": {"type": "object", "nullable": True},
                                "text": {"type": "string", "nullable": True},
                                "error": {"type": "string", "nullable": True, "description": "why it cannot be sent"},
                            },
                        },
                    },
                },
            },
        },
    },
}
