"""The WeCom chat sidebar (聊天工具栏) under /sidebar: staff log in through WeCom OAuth, the page configures the
JS-SDK, shows the customer's (or group's) tags and the scripts that fit them, and inserts one with
`sendChatMessage`; each insert is recorded and audited."""

from bot.sidebar.app import SIDEBAR_STATE, create_sidebar_app
from bot.sidebar.context import ChatSubject, GroupTags, SidebarContext, build_context, no_group_tags
from bot.sidebar.state import DEFAULT_JSSDK_URLS, DEFAULT_OAUTH_AUTHORIZE_URL

__all__ = [
    "DEFAULT_JSSDK_URLS",
    "DEFAULT_OAUTH_AUTHORIZE_URL",
    "SIDEBAR_STATE",
    "ChatSubject",
    "GroupTags",
    "SidebarContext",
    "build_context",
    "create_sidebar_app",
    "no_group_tags",
]
