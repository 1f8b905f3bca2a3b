"""Sidebar handlers: WeCom OAuth login, the page, the JS-SDK config, the chat context and the insert record."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any
from urllib.parse import urlencode

import structlog
from aiohttp import web
from yarl import URL

from bot.console import templates as console_templates
from bot.console.views import constant_equal
from bot.sidebar import templates
from bot.sidebar.context import MAX_QUERY_CHARS, ChatSubject, build_context
from bot.sidebar.state import (
    COOKIE_PATH,
    OAUTH_COOKIE,
    OAUTH_STATE_TTL_S,
    SESSION,
    SESSION_COOKIE,
    STAFF,
    SidebarState,
)
from bot.web_assets import asset_routes
from bot.wecom.errors import WeComApiError, WeComError
from bot.wecom.tickets import jsapi_signature
from handlers.domain import Channel

log = structlog.get_logger(__name__)

MAX_URL_CHARS = 2048
MAX_JSON_BYTES = 4096
_WECOM_ID = re.compile(r"[0-9A-Za-z_\-@.]{1,128}")
_SCRIPT_ID = re.compile(r"[0-9A-Za-z_.\-]{1,128}")
JS_API_LIST = ("getContext", "getCurExternalContact", "getCurExternalChat", "sendChatMessage")


class SidebarError(Exception):
    """Ends a request with a JSON error (API paths) or a small HTML page."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def wants_json(request: web.Request) -> bool:
    return request.path.startswith("/sidebar/api/")


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def safe_next(value: str | None) -> str:
    """Only sidebar paths (no scheme, no //host): no open redirect through the OAuth state."""
    if value and value.startswith("/sidebar/") and not value.startswith("//") and "\\" not in value:
        return value[:MAX_URL_CHARS]
    return "/sidebar/"


def public_origin(state: SidebarState, request: web.Request) -> URL:
    """The bot's own origin: BOT_PUBLIC_URL when set, else the origin this request came to."""
    if state.settings.bot_public_url:
        return URL(state.settings.bot_public_url).origin()
    return request.url.origin()


async def start_oauth(state: SidebarState, request: web.Request) -> web.HTTPFound:
    """Send the browser to WeCom's OAuth page; it comes back to /sidebar/oauth/callback with a code."""
    token = secrets.token_urlsafe(24)
    await state.redis.set(state.oauth_key(_digest(token)), safe_next(request.path_qs), ex=OAUTH_STATE_TTL_S)
    redirect_uri = str(public_origin(state, request).with_path("/sidebar/oauth/callback"))
    query = urlencode(
        {
            "appid": state.settings.wecom_corp_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "scope": "snsapi_base",
            "state": token,
            "agentid": str(state.settings.wecom_agent_id or ""),
        }
    )
    response = web.HTTPFound(f"{state.oauth_authorize_url}?{query}#wechat_redirect")
    response.set_cookie(
        OAUTH_COOKIE,
        token,
        path=COOKIE_PATH,
        max_age=OAUTH_STATE_TTL_S,
        httponly=True,
        samesite="Lax",
        secure=state.secure_cookies,
    )
    return response


class SidebarViews:
    def __init__(self, state: SidebarState) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.page),
            web.get("/oauth/callback", self.oauth_callback),
            web.get("/api/jssdk-config", self.jssdk_config),
            web.get("/api/context", self.context),
            web.post("/api/inserted", self.inserted),
            *asset_routes("sidebar", js=templates.JS, css=templates.CSS, favicon=console_templates.FAVICON),
        ]

    # ---- login

    async def oauth_callback(self, request: web.Request) -> web.Response:
        state = self.state
        code = request.query.get("code", "")
        token = request.query.get("state", "")
        cookie = request.cookies.get(OAUTH_COOKIE, "")
        expired = SidebarError(400, "oauth_state", "登录已过期，请关闭后重新打开侧边栏")
        if not code or len(code) > 512 or not constant_equal(token, cookie):
            raise expired
        next_path = await state.redis.getdel(state.oauth_key(_digest(token)))  # single use
        if next_path is None:
            raise expired
        if isinstance(next_path, bytes):
            next_path = next_path.decode()
        try:
            data = await state.client.call("GET", "/cgi-bin/auth/getuserinfo", query={"code": code})
        except WeComApiError as exc:
            log.info("sidebar_oauth_failed", errcode=exc.errcode)
            raise SidebarError(403, "oauth_code", "企业微信登录失败（登录码无效或已过期），请重新打开侧边栏") from None
        except WeComError:
            log.warning("sidebar_oauth_unavailable")
            raise SidebarError(503, "wecom_unavailable", "暂时无法连接企业微信，请稍后重试") from None
        userid = data.get("userid") or data.get("UserId")
        if not isinstance(userid, str) or not userid:
            log.info("sidebar_login_refused", reason="not_a_member")
            await state.audit.record("-", "sidebar.login_refused", "wecom:-", {"reason": "not_a_member"})
            raise SidebarError(403, "not_member", "仅限本企业成员使用")
        staff = next((u for u in await state.repos.staff.list_users() if u.wecom_userid == userid and u.active), None)
        if staff is None:
            log.info("sidebar_login_refused", wecom_userid=userid, reason="unknown_member")
            await state.audit.record(
                f"wecom:{userid}"[:64], "sidebar.login_refused", f"wecom:{userid}", {"reason": "unknown_member"}
            )
            raise SidebarError(
                403,
                "unknown_member",
                f"你的企业微信账号（{userid}）未绑定客服系统账号或已停用，无法使用话术助手，请联系管理员开通。",
            )
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            await state.sessions.delete(old)
        session_id, _session = await state.sessions.create(staff.id, staff.username)
        await state.audit.record(staff.username, "sidebar.login", f"staff:{staff.username}", {"wecom_userid": userid})
        log.info("sidebar_login", username=staff.username)
        response = web.HTTPFound(safe_next(next_path))
        response.set_cookie(
            SESSION_COOKIE, session_id, path=COOKIE_PATH, httponly=True, samesite="Lax", secure=state.secure_cookies
        )
        response.del_cookie(OAUTH_COOKIE, path=COOKIE_PATH)
        raise response

    # ---- page

    async def page(self, request: web.Request) -> web.Response:
        staff = request[STAFF]
        return html(
            templates.page(
                csrf=request[SESSION].csrf,
                staff_name=staff.display_name or staff.username,
                sdk_urls=self.state.jssdk_urls,
            )
        )

    # ---- JS-SDK

    async def jssdk_config(self, request: web.Request) -> web.Response:
        state = self.state
        raw = request.query.get("url", "")
        if not raw or len(raw) > MAX_URL_CHARS:
            raise SidebarError(400, "bad_url", "缺少页面地址")
        try:
            url = URL(raw)
        except ValueError:
            raise SidebarError(400, "bad_url", "页面地址无效") from None
        if (
            not url.is_absolute()
            or url.scheme not in ("http", "https")
            or url.origin() != public_origin(state, request)
        ):
            log.info("sidebar_jssdk_foreign_url", origin=str(url.origin()) if url.is_absolute() else "")
            raise SidebarError(400, "foreign_url", "只能为本系统的页面签名")
        page_url = raw.split("#", 1)[0]
        try:
            corp_ticket = await state.tickets.corp_ticket()
            agent_ticket = await state.tickets.agent_ticket()
        except WeComError as exc:
            log.warning("sidebar_jsapi_ticket_failed", error=type(exc).__name__)
            raise SidebarError(503, "wecom_unavailable", "暂时无法获取企业微信签名，请稍后重试") from None
        timestamp = int(state.clock.now())
        nonce = state.nonce()
        return web.json_response(
            {
                "corpid": state.settings.wecom_corp_id,
                "agentid": state.settings.wecom_agent_id,
                "timestamp": timestamp,
                "nonceStr": nonce,
                "signature": jsapi_signature(corp_ticket, nonce, timestamp, page_url),
                "agentSignature": jsapi_signature(agent_ticket, nonce, timestamp, page_url),
                "jsApiList": list(JS_API_LIST),
            }
        )

    # ---- context

    async def _subject(self, request: web.Request) -> ChatSubject:
        external_userid = request.query.get("external_userid", "")
        chat_id = request.query.get("chat_id", "")
        if bool(external_userid) == bool(chat_id):
            raise SidebarError(400, "bad_field", "需要 external_userid 或 chat_id 之一")
        wecom_id = external_userid or chat_id
        if not _WECOM_ID.fullmatch(wecom_id):
            raise SidebarError(400, "bad_field", "客户或客户群 ID 无效")
        if chat_id:
            tags = await self.state.group_tags(chat_id)
            return ChatSubject("group", chat_id, None, bool(tags), tags, {"group": tags} if tags else {})
        repos = self.state.repos
        by_source: dict[str, set[str]] = {}
        name: str | None = None
        known = False
        for channel in (Channel.CONTACT, Channel.KF):  # one person: the 客户联系 row and the 微信客服 row
            customer = await repos.conversations.get_customer(channel, external_userid)
            if customer is None:
                continue
            known = True
            name = name or (customer.name if customer.name and customer.name.strip() else None)
            for source, tags in (await repos.tags.tags_by_source(customer.id)).items():
                by_source.setdefault(source.value, set()).update(tags)
        merged = frozenset(t for tags in by_source.values() for t in tags)
        frozen = {source: frozenset(tags) for source, tags in by_source.items()}
        return ChatSubject("single", external_userid, name, known, merged, frozen)

    async def context(self, request: web.Request) -> web.Response:
        q = request.query.get("q", "").strip()
        if len(q) > MAX_QUERY_CHARS:
            raise SidebarError(400, "bad_field", f"搜索内容最多 {MAX_QUERY_CHARS} 个字")
        subject = await self._subject(request)
        staff = request[STAFF]
        result = build_context(
            self.state.matcher(), subject, now=self.state.clock.now(), staff_name=staff.display_name, q=q
        )
        # never the search text or a rendered script: only what was looked at and how much came back
        log.debug("sidebar_context", kind=subject.kind, scripts=len(result.scripts), skipped=len(result.skipped))
        return web.json_response(result.to_json())

    # ---- insert record

    async def inserted(self, request: web.Request) -> web.Response:
        state = self.state
        staff = request[STAFF]
        body = await read_json(request)
        script_id, variant_name = body.get("script_id"), body.get("variant")
        chat, chat_id = body.get("chat"), body.get("chat_id", "")
        ok = body.get("ok", True)
        if not isinstance(script_id, str) or not _SCRIPT_ID.fullmatch(script_id):
            raise SidebarError(400, "bad_field", "script_id 无效")
        if not isinstance(variant_name, str) or not variant_name or len(variant_name) > 128:
            raise SidebarError(400, "bad_field", "variant 无效")
        if chat not in ("single", "group"):
            raise SidebarError(400, "bad_field", "chat 必须是 single 或 group")
        if not isinstance(chat_id, str) or (chat_id and not _WECOM_ID.fullmatch(chat_id)):
            raise SidebarError(400, "bad_field", "chat_id 无效")
        if not isinstance(ok, bool):
            raise SidebarError(400, "bad_field", "ok 必须是布尔值")
        script = state.matcher().library.get(script_id)
        if script is None or all(v.name != variant_name for v in script.variants):
            raise SidebarError(404, "not_found", "话术不存在或已更新，请刷新")
        error = body.get("error", "")
        if not isinstance(error, str):
            raise SidebarError(400, "bad_field", "error 必须是文字")
        detail: dict[str, Any] = {"variant": variant_name, "chat": chat, "ok": ok}
        if chat_id:
            detail["chat_id"] = chat_id
        if not ok and error:
            detail["error"] = error[:200]  # the JS-SDK's err_msg, e.g. "sendChatMessage:fail no permission"
        await state.audit.record(staff.username, "sidebar.inserted", f"script:{script_id}", detail)
        if ok:
            await state.redis.hincrby(state.inserted_key(), f"{script_id}|{variant_name}|{chat}", 1)
        log.info("sidebar_inserted", username=staff.username, script=script_id, variant=variant_name, chat=chat, ok=ok)
        return web.json_response({"ok": True})


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise SidebarError(415, "bad_content_type", "请求内容必须是 JSON")
    raw = await request.content.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise SidebarError(413, "too_large", "请求内容过大")
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        raise SidebarError(400, "bad_json", "请求内容不是有效的 JSON") from None
    if not isinstance(body, dict):
        raise SidebarError(400, "bad_json", "请求内容必须是 JSON 对象")
    return body
