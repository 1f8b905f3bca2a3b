"""create_console_app: the agent console as an aiohttp sub-application under /console.

Its middlewares (security headers, sessions, CSRF, errors) run only for /console/..., so the WeCom callback path
pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from bot.auth import json_error
from bot.console.actions import AgentDirectory, ConsoleActions, NotWiredActions
from bot.console.events import EventHub
from bot.console.policy import ConsoleUser
from bot.console.posts_views import PostsViews
from bot.console.sessions import DEFAULT_ABSOLUTE_S, DEFAULT_IDLE_S, ConsoleKeys, LoginLimiter, SessionStore
from bot.console.sse import events_handler
from bot.console.state import (
    CSRF_HEADER,
    LOGIN_CSRF_COOKIE,
    SESSION,
    SESSION_COOKIE,
    SESSION_ID,
    USER,
    ConsoleState,
)
from bot.console.templates import message_page
from bot.console.views import ConsoleError, ConsoleViews, constant_equal, login_redirect, wants_json
from bot.storage.console_repository import ConsoleRepository
from bot.storage.db import create_session_factory
from bot.storage.post_stats_repository import PostStatsRepository
from bot.storage.posts_repository import PostRepository
from bot.storage.staff_repository import AuditRepository
from bot.web_assets import page_csp, set_page_headers
from handlers.domain import Clock
from scripts_library import Matcher

if TYPE_CHECKING:
    from bot.app import Services

log = structlog.get_logger(__name__)

CONSOLE_STATE = web.AppKey("console_state", ConsoleState)
PUBLIC_PATHS = frozenset(
    {"/console/login", "/console/static/console.js", "/console/static/console.css", "/console/static/favicon.svg"}
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = page_csp()
DEFAULT_TIMEZONE = "Asia/Shanghai"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _headers(response: web.StreamResponse) -> None:
    set_page_headers(response, CSP, deny_framing=True)


def _error_response(request: web.Request, error: ConsoleError) -> web.Response:
    if wants_json(request):
        return json_error(error.status, error.code, error.message)
    user = request.get(USER)
    session = request.get(SESSION)
    return web.Response(
        text=message_page("出错了", error.message, user=user, csrf=session.csrf if session else ""),
        status=error.status,
        content_type="text/html",
        charset="utf-8",
    )


def console_middlewares(state: ConsoleState) -> list[Any]:
    @web.middleware
    async def errors_and_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except ConsoleError as exc:
            response = _error_response(request, exc)
        except web.HTTPNotFound:
            response = _error_response(request, ConsoleError(404, "not_found", "页面不存在"))
        except web.HTTPException as exc:
            _headers(exc)
            raise
        if not response.prepared:
            _headers(response)
        return response

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        session_id = request.cookies.get(SESSION_COOKIE, "")
        session = await state.sessions.get(session_id) if session_id else None
        account = await state.repo.account(session.user_id) if session is not None else None
        if session is None or account is None or not account.active:
            if session is not None:
                await state.sessions.delete(session_id)
            if wants_json(request):
                raise ConsoleError(401, "unauthenticated", "请先登录")
            raise login_redirect(request)
        request[SESSION] = session
        request[SESSION_ID] = session_id
        request[USER] = ConsoleUser(account.id, account.username, account.display_name, account.role, account.team)
        return await handler(request)

    @web.middleware
    async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every state-changing request carries a token an attacker's page cannot read: the session's token
        (header or hidden field), or for the login form a double-submitted cookie."""
        if request.method in SAFE_METHODS:
            return await handler(request)
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            value = form.get("csrf", "")
            sent = value if isinstance(value, str) else ""
        session = request.get(SESSION)
        expected = session.csrf if session is not None else request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not constant_equal(sent, expected):
            log.info("console_csrf_refused", path=request.path)
            raise ConsoleError(403, "csrf", "页面已过期，请刷新后重试")
        return await handler(request)

    return [errors_and_headers, authenticate, csrf]


def create_console_app(
    services: Services,
    *,
    actions: ConsoleActions | None = None,
    clock: Clock | None = None,
    timezone: str = DEFAULT_TIMEZONE,
    idle_s: float = DEFAULT_IDLE_S,
    absolute_s: float = DEFAULT_ABSOLUTE_S,
    heartbeat_s: float = 15.0,
    directory: AgentDirectory | None = None,
    scripts: Callable[[], Matcher] | None = None,
) -> web.Application:
    """The /console sub-application. `actions` is the handoff service's ConsoleActions (default: NotWiredActions,
    every action answers 503); `directory` (presence, transfer picker) defaults to `actions` when it is one (the
    handoff adapter is); `clock` defaults to the services' clock (sessions expire by it); `scripts` (the matcher
    whose library the canned replies come from) defaults to the one the bot serves, hot reloads included."""
    clock = clock or services.clock
    keys = ConsoleKeys(services.settings.redis_key_prefix)
    sessions = create_session_factory(services.engine)
    state = ConsoleState(
        settings=services.settings,
        clock=clock,
        keys=keys,
        repo=ConsoleRepository(sessions, clock),
        audit=AuditRepository(sessions, clock),
        sessions=SessionStore(services.redis, keys, clock, idle_s=idle_s, absolute_s=absolute_s),
        limiter=LoginLimiter(services.redis, keys),
        hub=EventHub(services.redis, keys),
        actions=actions or NotWiredActions(),
        timezone=ZoneInfo(timezone),
        heartbeat_s=heartbeat_s,
        directory=directory if directory is not None else (actions if isinstance(actions, AgentDirectory) else None),
        scripts=scripts or (lambda: services.scripts.matcher),
    )
    app = web.Application(middlewares=console_middlewares(state))
    app[CONSOLE_STATE] = state
    app.add_routes(ConsoleViews(state).routes())
    app.add_routes(PostsViews(state, PostRepository(sessions, clock), PostStatsRepository(sessions, clock)).routes())
    app.router.add_get("/events", events_handler(state))

    async def close_streams(_app: web.Application) -> None:
        await state.hub.close()

    app.on_shutdown.append(close_streams)
    return app
