"""What every sidebar handler shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as redis_asyncio
from aiohttp import web

from bot.console.sessions import ConsoleSession, SessionStore
from bot.settings import Settings
from bot.sidebar.context import GroupTags
from bot.storage.console_repository import ConsoleRepository, LoginRecord
from bot.storage.repositories import Repositories
from bot.storage.staff_repository import AuditRepository
from bot.wecom.client import WeComClient
from bot.wecom.tickets import JsApiTickets
from handlers.domain import Clock
from scripts_library import Matcher

SESSION_COOKIE = "wcb_sidebar"
OAUTH_COOKIE = "wcb_sidebar_oauth"
COOKIE_PATH = "/sidebar"
CSRF_HEADER = "X-CSRF-Token"
OAUTH_STATE_TTL_S = 300
DEFAULT_IDLE_S = 2 * 3600  # short-lived: the sidebar logs in again silently through OAuth when it lapses
DEFAULT_ABSOLUTE_S = 12 * 3600

# WeCom's own JS-SDK files (jweixin for wx.config / wx.invoke, jwxwork for wx.agentConfig).
DEFAULT_JSSDK_URLS = (
    "https://res.wx.qq.com/open/js/jweixin-1.2.0.js",
    "https://open.work.weixin.qq.com/wwopen/js/jwxwork-1.0.0.js",
)
DEFAULT_OAUTH_AUTHORIZE_URL = "https://open.weixin.qq.com/connect/oauth2/authorize"

STAFF = web.RequestKey("sidebar_staff", LoginRecord)
SESSION = web.RequestKey("sidebar_session", ConsoleSession)


@dataclass
class SidebarState:
    settings: Settings
    clock: Clock
    prefix: str  # Redis key prefix of the sidebar's own keys
    redis: redis_asyncio.Redis
    repos: Repositories
    accounts: ConsoleRepository
    audit: AuditRepository
    sessions: SessionStore
    client: WeComClient  # the self-built app's client (OAuth getuserinfo, tickets)
    tickets: JsApiTickets
    matcher: Callable[[], Matcher]
    group_tags: GroupTags
    jssdk_urls: tuple[str, ...]
    oauth_authorize_url: str
    nonce: Callable[[], str]

    @property
    def secure_cookies(self) -> bool:
        return self.settings.bot_public_url.lower().startswith("https://")

    def oauth_key(self, state_digest: str) -> str:
        return f"{self.prefix}:oauth:{state_digest}"

    def inserted_key(self) -> str:
        """Hash: "script|variant|single-or-group" -> inserts recorded (the cheap usage counter)."""
        return f"{self.prefix}:inserted"
