"""The agent console under /console: login and sessions, inbox with live SLA countdowns (SSE), conversation
view, the lead's view, and claim / reply / transfer / resolve through the ConsoleActions port."""

from bot.console.actions import ActionResult, ConsoleActions, NotWiredActions
from bot.console.app import create_console_app
from bot.console.events import publish_console_event
from bot.console.passwords import hash_password, register_passwd, set_password, verify_password
from bot.console.policy import ConsoleUser

__all__ = [
    "ActionResult",
    "ConsoleActions",
    "ConsoleUser",
    "NotWiredActions",
    "create_console_app",
    "hash_password",
    "publish_console_event",
    "register_passwd",
    "set_password",
    "verify_password",
]
