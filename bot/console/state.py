"""What every console handler shares: repositories, the session store, the event hub and the actions port."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from aiohttp import web

from bot.console.actions import AgentDirectory, ConsoleActions
from bot.console.events import EventHub
from bot.console.policy import ConsoleUser
from bot.console.sessions import ConsoleKeys, ConsoleSession, LoginLimiter, SessionStore
from bot.settings import Settings
from bot.storage.console_repository import ConsoleRepository
from bot.storage.staff_repository import AuditRepository
from handlers.domain import Clock
from scripts_library import Matcher

SESSION_COOKIE = "wcb_console"
LOGIN_CSRF_COOKIE = "wcb_console_login"
COOKIE_PATH = "/console"
CSRF_HEADER = "X-CSRF-Token"

USER = web.RequestKey("console_user", ConsoleUser)
SESSION = web.RequestKey("console_session", ConsoleSession)
SESSION_ID = web.RequestKey("console_session_id", str)


@dataclass
class ConsoleState:
    settings: Settings
    clock: Clock
    keys: ConsoleKeys
    repo: ConsoleRepository
    audit: AuditRepository
    sessions: SessionStore
    limiter: LoginLimiter
    hub: EventHub
    actions: ConsoleActions
    timezone: ZoneInfo
    heartbeat_s: float = 15.0
    directory: AgentDirectory | None = None  # presence toggle and transfer picker (None: not offered)
    scripts: Callable[[], Matcher] | None = None  # the library now served, for canned replies (None: none shown)

    @property
    def secure_cookies(self) -> bool:
        return self.settings.bot_public_url.lower().startswith("https://")
