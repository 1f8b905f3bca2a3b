"""create_sidebar_app: the WeCom chat sidebar (聊天工具栏) as an aiohttp sub-application under /sidebar.

Its middlewares (headers, WeCom OAuth sessions, CSRF, errors) run only for /sidebar/..., so the WeCom callback path
pays nothing for them.

Redis keys (under REDIS_KEY_PREFIX):
    {prefix}:sidebar:console:session:{sha256(id)}   sessions (bot/console/sessions.py's store, its own prefix)
    {prefix}:sidebar:oauth:{sha256(state)}          a pending OAuth login: where to go back (300 s, single use)
    {prefix}:sidebar:inserted                       hash "script|variant|single|group" -> inserts
    {prefix}:jsapi-ticket[-lock]:{corp|agent}:...   JS-SDK tickets (bot/wecom/tickets.py)
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from bot.auth import json_error
from bot.console.sessions import ConsoleKeys, SessionStore
from bot.console.views import constant_equal
from bot.sidebar import templates
from bot.sidebar.context import GroupTags, no_group_tags
from bot.sidebar.state import (
    CSRF_HEADER,
    DEFAULT_ABSOLUTE_S,
    DEFAULT_IDLE_S,
    DEFAULT_JSSDK_URLS,
    DEFAULT_OAUTH_AUTHORIZE_URL,
    SESSION,
    SESSION_COOKIE,
    STAFF,
    SidebarState,
)
from bot.sidebar.views import SidebarError, SidebarViews, start_oauth, wants_json
from bot.storage.console_repository import ConsoleRepository
from bot.storage.db import create_session_factory
from bot.storage.staff_repository import AuditRepository
from bot.web_assets import page_csp, set_page_headers
from bot.wecom.tickets import JsApiTickets
from handlers.domain import Clock

if TYPE_CHECKING:
    from bot.app import Services

log = structlog.get_logger(__name__)

SIDEBAR_STATE = web.AppKey("sidebar_state", SidebarState)
PUBLIC_PATHS = frozenset(
    {
        "/sidebar/oauth/callback",
        "/sidebar/static/sidebar.js",
        "/sidebar/static/sidebar.css",
        "/sidebar/static/favicon.svg",
    }
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def script_origins(urls: Sequence[str]) -> list[str]:
    """The origins the JS-SDK files come from, for script-src ('self' covers same-origin ones)."""
    origins: list[str] = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc:
            origin = f"{parts.scheme}://{parts.netloc}"
            if origin not in origins:
                origins.append(origin)
    return origins


def content_security_policy(jssdk_urls: Sequence[str]) -> str:
    return page_csp(script_origins(jssdk_urls))


def sidebar_middlewares(state: SidebarState) -> list[Any]:
    csp = content_security_policy(state.jssdk_urls)

    def headers(response: web.StreamResponse) -> None:
        set_page_headers(response, csp, deny_framing=False)  # WeCom shows the sidebar inside its client

    @web.middleware
    async def errors_and_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except SidebarError as exc:
            if wants_json(request):
                response = json_error(exc.status, exc.code, exc.message)
            else:
                response = web.Response(
                    text=templates.message_page("无法打开话术助手", exc.message),
                    status=exc.status,
                    content_type="text/html",
                    charset="utf-8",
                )
        except web.HTTPNotFound:
            if wants_json(request):
                response = json_error(404, "not_found", "页面不存在")
            else:
                response = web.Response(
                    text=templates.message_page("页面不存在", "页面不存在"),
                    status=404,
                    content_type="text/html",
                    charset="utf-8",
                )
        except web.HTTPException as exc:
            headers(exc)
            raise
        if not response.prepared:
            headers(response)
        return response

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        session_id = request.cookies.get(SESSION_COOKIE, "")
        session = await state.sessions.get(session_id) if session_id else None
        account = await state.accounts.account(session.user_id) if session is not None else None
        if session is None or account is None or not account.active:
            if session is not None:
                await state.sessions.delete(session_id)
            if wants_json(request) or request.method not in SAFE_METHODS:
                raise SidebarError(401, "unauthenticated", "登录已过期，请重新打开侧边栏")
            raise await start_oauth(state, request)
        request[SESSION] = session
        request[STAFF] = account
        return await handler(request)

    @web.middleware
    async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
        """State-changing requests carry the session's token in a header an attacker's page cannot set."""
        if request.method in SAFE_METHODS or request.path in PUBLIC_PATHS:
            return await handler(request)
        session = request.get(SESSION)
        if session is None or not constant_equal(request.headers.get(CSRF_HEADER, ""), session.csrf):
            log.info("sidebar_csrf_refused", path=request.path)
            raise SidebarError(403, "csrf", "页面已过期，请刷新后重试")
        return await handler(request)

    return [errors_and_headers, authenticate, csrf]


def create_sidebar_app(
    services: Services,
    *,
    clock: Clock | None = None,
    jssdk_urls: Sequence[str] = DEFAULT_JSSDK_URLS,
    oauth_authorize_url: str = DEFAULT_OAUTH_AUTHORIZE_URL,
    group_tags: GroupTags = no_group_tags,
    nonce: Callable[[], str] | None = None,
    idle_s: float = DEFAULT_IDLE_S,
    absolute_s: float = DEFAULT_ABSOLUTE_S,
) -> web.Application:
    """The /sidebar sub-application.

    `jssdk_urls`: the JS-SDK script URLs the page loads (WeCom's own by default; tests serve a stub).
    `group_tags`: a customer group's tags (default: none stored, so groups get the default audience).
    `nonce`: the JS-SDK nonceStr source (default: 16 random URL-safe characters); `clock` its timestamp.
    """
    clock = clock or services.clock
    settings = services.settings
    prefix = f"{settings.redis_key_prefix}:sidebar"
    sessions = create_session_factory(services.engine)
    state = SidebarState(
        settings=settings,
        clock=clock,
        prefix=prefix,
        redis=services.redis,
        repos=services.repos,
        accounts=ConsoleRepository(sessions, clock),
        audit=AuditRepository(sessions, clock),
        sessions=SessionStore(services.redis, ConsoleKeys(prefix), clock, idle_s=idle_s, absolute_s=absolute_s),
        client=services.app_client,
        tickets=JsApiTickets(
            services.app_client,
            services.redis,
            settings.redis_key_prefix,
            settings.wecom_corp_id,
            settings.wecom_secret,
            clock=clock,
        ),
        matcher=lambda: services.scripts.matcher,
        group_tags=group_tags,
        jssdk_urls=tuple(jssdk_urls),
        oauth_authorize_url=oauth_authorize_url,
        nonce=nonce or (lambda: secrets.token_urlsafe(12)),
    )
    app = web.Application(middlewares=sidebar_middlewares(state))
    app[SIDEBAR_STATE] = state
    app.add_routes(SidebarViews(state).routes())
    return app
