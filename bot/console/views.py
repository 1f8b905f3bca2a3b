"""Console handlers: login and logout, the inbox (HTML and JSON), the conversation view, the lead's view and the
action endpoints (validated, authorised, audited, then handed to the ConsoleActions port)."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web

from bot.console import templates
from bot.console.actions import HTTP_STATUS_FOR_CODE, PRESENCES, ActionResult, AgentInfo
from bot.console.canned import Skipped, TaggedScripts, placeholder_values, scripts_for_tags
from bot.console.passwords import MAX_PASSWORD_CHARS, verify_password
from bot.console.policy import ConsoleUser, scope_for
from bot.console.state import (
    COOKIE_PATH,
    LOGIN_CSRF_COOKIE,
    SESSION,
    SESSION_COOKIE,
    SESSION_ID,
    USER,
    ConsoleState,
)
from bot.console.summary import ConversationSummary, summarize
from bot.storage.console_repository import ConversationDetail, InboxRow
from bot.storage.models import ConversationStatus, StaffRole
from bot.web_assets import asset_routes

log = structlog.get_logger(__name__)

MAX_REPLY_CHARS = 2048
REPLY_JOINER = "\n\n"  # a script's several messages, as one reply from the console
MAX_USERNAME_CHARS = 64
MAX_ID = 2**63 - 1
MAX_JSON_BYTES = 64 * 1024
ACTIONS = ("claim", "reply", "transfer", "resolve")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")


class ConsoleError(Exception):
    """Ends a request with a JSON error (API paths) or a small HTML page (form posts and pages)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


NOT_FOUND = ConsoleError(404, "not_found", "会话不存在或无权查看")
NO_DIRECTORY = ConsoleError(503, "not_wired", "该功能暂未开放（处理服务尚未接入）")


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def row_json(row: InboxRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "channel": row.channel,
        "customer": row.customer_name or row.customer_external_id,
        "tags": list(row.tags),
        "status": row.status.value,
        "status_label": templates.label(templates.STATUS_LABELS, row.status.value),
        "team": row.team,
        "priority": row.priority,
        "handoff_reason": row.handoff_reason,
        "reason_label": templates.label(templates.REASON_LABELS, row.handoff_reason),
        "assignee_id": row.assignee_id,
        "assignee": row.assignee_name,
        "waiting_since": row.waiting_since.timestamp(),
        "queued_at": _epoch(row.queued_at),
        "assigned_at": _epoch(row.assigned_at),
        "sla": None if row.sla is None else {"kind": row.sla.kind, "due_at": row.sla.due_at},
        "version": row.version,
    }


def _local(epoch: float | None, tz: Any) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).astimezone(tz).strftime("%m-%d %H:%M:%S")


def summary_json(summary: ConversationSummary, tz: Any) -> dict[str, Any]:
    """The summary's facts, with its instants also as local text for the page."""
    return {
        **summary.to_json(),
        "waiting_since_text": _local(summary.waiting_since, tz),
        "sla_due_text": _local(summary.sla_due_at, tz),
        "last_customer_at_text": _local(summary.last_customer_at, tz),
    }


def canned_json(tags: tuple[str, ...], listed: TaggedScripts) -> dict[str, Any]:
    """The canned replies: each script's messages joined into one reply text (`text`), as the reply box takes it;
    one too long for a single reply is listed as skipped."""
    scripts: list[dict[str, Any]] = []
    skipped = [s.to_json() for s in listed.skipped]
    for item in listed.items:
        text = REPLY_JOINER.join(item.texts)
        if len(text) > MAX_REPLY_CHARS:
            reason = f"超过 {MAX_REPLY_CHARS} 字，无法作为一条回复"
            skipped.append(Skipped(item.script_id, item.title, item.variant, reason).to_json())
            continue
        scripts.append({**item.to_json(), "text": text})
    return {"tags": list(tags), "audience": "tags" if tags else "default", "scripts": scripts, "skipped": skipped}


def detail_json(detail: ConversationDetail, tz: Any, *, canned: TaggedScripts | None = None) -> dict[str, Any]:
    """The conversation view's data: the row, the history, the summary and (when a library is wired) the canned
    replies for this customer."""
    return {
        "row": row_json(detail.row),
        "summary": summary_json(summarize(detail), tz),
        "canned": None if canned is None else canned_json(detail.row.tags, canned),
        "messages": [
            {
                "id": m.id,
                "author": m.author,
                "msgtype": m.msgtype,
                "text": m.text,
                "at": m.at.timestamp(),
                "at_iso": m.at.isoformat(),
                "at_text": m.at.astimezone(tz).strftime("%m-%d %H:%M:%S"),
            }
            for m in detail.messages
        ],
    }


def wants_json(request: web.Request) -> bool:
    return (
        request.path.startswith("/console/api/")
        or request.path == "/console/events"
        or (request.content_type == "application/json")
    )


def safe_next(value: str | None) -> str:
    """Only paths inside the console (no scheme, no //host): no open redirect through the login form."""
    if value and value.startswith("/console/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/inbox"


def client_ip(request: web.Request) -> str:
    return request.remote or "?"


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


class ConsoleViews:
    def __init__(self, state: ConsoleState) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.root),
            web.get("/login", self.login_form),
            web.post("/login", self.login),
            web.post("/logout", self.logout),
            web.get("/inbox", self.inbox_page),
            web.get("/lead", self.lead_page),
            web.get("/conversations/{conversation_id}", self.conversation_page),
            web.get("/api/inbox", self.inbox_json),
            web.get("/api/conversations/{conversation_id}", self.conversation_json),
            web.post("/api/conversations/{conversation_id}/{action}", self.act),
            web.get("/api/agents", self.agents_json),
            web.post("/api/presence", self.presence),
            *asset_routes("console", js=templates.JS, css=templates.CSS, favicon=templates.FAVICON),
        ]

    # ---- login

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/console/inbox")

    def _login_response(
        self, request: web.Request, *, error: str = "", username: str = "", status: int = 200
    ) -> web.Response:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
        fresh = len(token) < 32 or len(token) > 128
        if fresh:
            token = secrets.token_urlsafe(32)
        response = html(
            templates.login_page(
                csrf=token, next_path=safe_next(request.query.get("next")), error=error, username=username
            ),
            status,
        )
        if fresh:
            response.set_cookie(
                LOGIN_CSRF_COOKIE,
                token,
                path=COOKIE_PATH,
                httponly=True,
                samesite="Lax",
                secure=self.state.secure_cookies,
            )
        return response

    async def login_form(self, request: web.Request) -> web.Response:
        return self._login_response(request)

    async def login(self, request: web.Request) -> web.Response:
        state = self.state
        form = await request.post()
        username = str(form.get("username", "")).strip()
        password = str(form.get("password", ""))
        ip = client_ip(request)
        if not username or len(username) > MAX_USERNAME_CHARS or not password or len(password) > MAX_PASSWORD_CHARS:
            return self._login_response(request, error="请输入用户名和密码", username=username[:64], status=400)
        if await state.limiter.blocked(username, ip):
            log.info("console_login_blocked", username=username, ip=ip)
            await state.audit.record(username, "console.login_blocked", f"staff:{username}", {"ip": ip})
            return self._login_response(
                request, error="登录失败次数过多，请 15 分钟后再试", username=username, status=429
            )
        record = await state.repo.login_record(username)
        good = await asyncio.to_thread(verify_password, password, record.password_hash if record else None)
        if not good or record is None:
            reason = (
                "unknown_user" if record is None else ("no_password" if not record.password_hash else "bad_password")
            )
            failures = await state.limiter.failed(username, ip)
            log.info("console_login_failed", username=username, ip=ip, reason=reason, failures=failures)
            await state.audit.record(
                username, "console.login_failed", f"staff:{username}", {"ip": ip, "reason": reason}
            )
            return self._login_response(request, error="用户名或密码错误", username=username, status=401)
        if not record.active:
            log.info("console_login_refused", username=username, ip=ip, reason="disabled")
            await state.audit.record(
                username, "console.login_failed", f"staff:{username}", {"ip": ip, "reason": "disabled"}
            )
            return self._login_response(request, error="账号已停用，请联系管理员", username=username, status=403)
        await state.limiter.clear(username, ip)
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            await state.sessions.delete(old)
        session_id, _session = await state.sessions.create(record.id, record.username)
        await state.audit.record(record.username, "console.login", f"staff:{record.username}", {"ip": ip})
        log.info("console_login", username=record.username, ip=ip)
        response = web.HTTPSeeOther(safe_next(str(form.get("next", ""))))
        response.set_cookie(
            SESSION_COOKIE, session_id, path=COOKIE_PATH, httponly=True, samesite="Lax", secure=state.secure_cookies
        )
        response.del_cookie(LOGIN_CSRF_COOKIE, path=COOKIE_PATH)
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        user = request[USER]
        await self.state.sessions.delete(request[SESSION_ID])
        await self.state.audit.record(user.username, "console.logout", f"staff:{user.username}")
        response = web.HTTPSeeOther("/console/login")
        response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        raise response

    # ---- reading

    def _mine_title(self, user: ConsoleUser) -> str:
        if user.role is StaffRole.ADMIN:
            return "处理中的会话（全部团队）"
        if user.role is StaffRole.LEAD:
            return "处理中的会话（本团队）"
        return "我的会话"

    async def _inbox(self, user: ConsoleUser) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if not user.sees_conversations:
            return [], []
        queue, handled = await self.state.repo.inbox(scope_for(user))
        return [row_json(r) for r in queue], [row_json(r) for r in handled]

    async def inbox_json(self, request: web.Request) -> web.Response:
        user = request[USER]
        queue, mine = await self._inbox(user)
        return web.json_response(
            {"now": self.state.clock.now(), "queue": queue, "mine": mine, "mine_title": self._mine_title(user)}
        )

    async def inbox_page(self, request: web.Request) -> web.Response:
        user = request[USER]
        queue, mine = await self._inbox(user)
        me = next((a for a in await self._agents(user) if a.id == user.id), None)
        return html(
            templates.inbox_page(
                user,
                request[SESSION].csrf,
                self.state.clock.now(),
                queue,
                mine,
                self._mine_title(user),
                presence=me.presence if me is not None else None,
            )
        )

    async def _agents(self, user: ConsoleUser) -> list[AgentInfo]:
        directory = self.state.directory
        if directory is None or not user.sees_conversations:
            return []
        return await directory.agents(user)

    async def agents_json(self, request: web.Request) -> web.Response:
        """The transfer picker: the team's agents with presence and load."""
        user = request[USER]
        if self.state.directory is None:
            raise NO_DIRECTORY
        return web.json_response({"me": user.id, "agents": [agent_json(a) for a in await self._agents(user)]})

    async def presence(self, request: web.Request) -> web.Response:
        """The signed-in agent's presence (在线 / 离开 / 离线): validated, audited, published by the adapter."""
        state = self.state
        user = request[USER]
        directory = state.directory
        if directory is None:
            raise NO_DIRECTORY
        body = await read_body(request)
        value = body.get("presence")
        if not isinstance(value, str) or value not in PRESENCES:
            raise ConsoleError(400, "bad_field", "接待状态只能是在线、离开或离线")
        result = await directory.set_presence(user, value)
        await state.audit.record(
            user.username,
            "console.presence",
            f"staff:{user.username}",
            {"ok": result.ok, "code": result.code, "presence": value},
        )
        status = 200 if result.ok else HTTP_STATUS_FOR_CODE.get(result.code, 400)
        payload = {"ok": result.ok, "code": result.code, "message": result.reason, "presence": value}
        if not result.ok:
            payload["error"] = result.code
        if request.content_type == "application/json" or "application/json" in request.headers.get("Accept", ""):
            return web.json_response(payload, status=status)
        message = "接待状态已更新" if result.ok else result.reason
        return html(templates.message_page("接待状态", message, user=user, csrf=request[SESSION].csrf), status)

    async def _detail(self, request: web.Request) -> ConversationDetail:
        user = request[USER]
        conversation_id = parse_id(request.match_info["conversation_id"])
        detail = await self.state.repo.conversation(conversation_id, scope_for(user))
        if detail is None:
            raise NOT_FOUND
        return detail

    def _canned(self, detail: ConversationDetail, user: ConsoleUser) -> TaggedScripts | None:
        """The scripts this customer's tags admit, rendered for them and this agent (the sidebar's rule)."""
        scripts = self.state.scripts
        if scripts is None:
            return None
        row = detail.row
        return scripts_for_tags(
            scripts().library,
            frozenset(row.tags),
            customer_key=row.customer_external_id,
            values=placeholder_values(row.customer_name, user.display_name),
            now=self.state.clock.now(),
        )

    def _detail_json(self, detail: ConversationDetail, user: ConsoleUser) -> dict[str, Any]:
        return detail_json(detail, self.state.timezone, canned=self._canned(detail, user))

    async def conversation_json(self, request: web.Request) -> web.Response:
        detail = await self._detail(request)
        return web.json_response({"now": self.state.clock.now(), **self._detail_json(detail, request[USER])})

    async def conversation_page(self, request: web.Request) -> web.Response:
        detail = await self._detail(request)
        user = request[USER]
        others = (
            None
            if self.state.directory is None
            else [agent_json(a) for a in await self._agents(user) if a.id != user.id]
        )
        return html(
            templates.conversation_page(
                user,
                request[SESSION].csrf,
                self.state.clock.now(),
                self._detail_json(detail, user),
                agents=others,
                reply_key=secrets.token_urlsafe(18),
            )
        )

    async def lead_page(self, request: web.Request) -> web.Response:
        user = request[USER]
        if not user.is_lead:
            raise ConsoleError(403, "forbidden", "只有组长和管理员可以查看主管视图")
        state = self.state
        now = state.clock.now()
        local = datetime.fromtimestamp(now, UTC).astimezone(state.timezone)
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
        everything = user.role is StaffRole.ADMIN
        depth = await state.repo.queue_depth_by_team(user.team, everything=everything)
        attainment = await state.repo.first_response_attainment(
            start.timestamp(), end.timestamp(), user.team, everything=everything
        )
        return html(
            templates.lead_page(
                user, request[SESSION].csrf, now, depth, attainment.met, attainment.total, start.strftime("%Y-%m-%d")
            )
        )

    # ---- actions

    async def act(self, request: web.Request) -> web.Response:
        state = self.state
        user = request[USER]
        action = request.match_info["action"]
        if action not in ACTIONS:
            raise ConsoleError(404, "not_found", "没有这个操作")
        conversation_id = parse_id(request.match_info["conversation_id"])
        body = await read_body(request)
        row = await state.repo.visible(conversation_id, scope_for(user))
        if row is None:
            await state.audit.record(
                user.username,
                f"console.{action}",
                f"conversation:{conversation_id}",
                {"ok": False, "code": "not_found"},
            )
            raise NOT_FOUND
        detail: dict[str, Any] = {}
        if action == "claim":
            result = await state.actions.claim(conversation_id, user)
        elif action == "reply":
            text = reply_text(body.get("text"))
            detail["chars"] = len(text)  # never the text itself
            key = idempotency_key(body.get("idempotency_key"))
            if row.status is ConversationStatus.RESOLVED:
                result = ActionResult.refused("会话已解决，不能再回复")
            elif key is None:
                result = await state.actions.reply(conversation_id, user, text)
            else:
                result = await state.actions.reply(conversation_id, user, text, idempotency_key=key)
        elif action == "transfer":
            to_agent = parse_id(body.get("to_agent_id"), field="to_agent_id")
            detail["to_agent_id"] = to_agent
            if to_agent == user.id:
                raise ConsoleError(400, "bad_field", "不能转给自己")
            result = await state.actions.transfer(conversation_id, user, to_agent)
        else:
            result = await state.actions.resolve(conversation_id, user)
        await state.audit.record(
            user.username,
            f"console.{action}",
            f"conversation:{conversation_id}",
            {"ok": result.ok, "code": result.code, **detail},
        )
        status = 200 if result.ok else HTTP_STATUS_FOR_CODE.get(result.code, 400)
        payload = {"ok": result.ok, "code": result.code, "message": result.reason}
        if not result.ok:
            payload["error"] = result.code
        if request.content_type == "application/json" or "application/json" in request.headers.get("Accept", ""):
            return web.json_response(payload, status=status)
        back = f"/console/conversations/{conversation_id}"
        message = "已完成" if result.ok else result.reason
        return html(
            templates.message_page("操作结果", message, user=user, csrf=request[SESSION].csrf, back=back), status
        )


def parse_id(value: object, *, field: str = "id") -> int:
    """A positive 64-bit integer id, from a path segment, form field or JSON number."""
    if isinstance(value, bool):
        raise ConsoleError(400, "bad_field", f"{field} 必须是正整数")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        number = int(value)
    else:
        raise ConsoleError(400, "bad_field", f"{field} 必须是正整数")
    if not 0 < number <= MAX_ID:
        raise ConsoleError(400, "bad_field", f"{field} 必须是正整数")
    return number


def agent_json(agent: AgentInfo) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "team": agent.team,
        "presence": agent.presence,
        "presence_label": templates.label(templates.PRESENCE_LABELS, agent.presence),
        "open_count": agent.open_count,
        "capacity": agent.capacity,
        "answers_in": agent.answers_in,
    }


def idempotency_key(value: object) -> str | None:
    """The console form's key for one reply submission (absent: None; malformed: 400)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not IDEMPOTENCY_KEY.fullmatch(value):
        raise ConsoleError(400, "bad_field", "idempotency_key 格式无效")
    return value


def reply_text(value: object) -> str:
    if not isinstance(value, str):
        raise ConsoleError(400, "bad_field", "回复内容必须是文字")
    text = value.replace("\r\n", "\n").strip()
    if not text:
        raise ConsoleError(400, "bad_field", "回复内容不能为空")
    if len(text) > MAX_REPLY_CHARS:
        raise ConsoleError(400, "bad_field", f"回复内容最多 {MAX_REPLY_CHARS} 个字符")
    if "\x00" in text:
        raise ConsoleError(400, "bad_field", "回复内容包含无效字符")
    return text


async def read_body(request: web.Request) -> dict[str, Any]:
    """The action's fields, from JSON (the page's script) or a form (without JavaScript)."""
    if request.content_type == "application/json":
        raw = await request.content.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ConsoleError(413, "too_large", "请求内容过大")
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ConsoleError(400, "bad_json", "请求内容不是有效的 JSON") from None
        if not isinstance(body, dict):
            raise ConsoleError(400, "bad_json", "请求内容必须是 JSON 对象")
        return body
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf"}


def constant_equal(a: str, b: str) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def login_redirect(request: web.Request) -> web.HTTPSeeOther:
    target = request.path_qs if request.method == "GET" else "/console/inbox"
    return web.HTTPSeeOther("/console/login?next=" + quote(safe_next(target), safe="/"))
