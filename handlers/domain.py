"""Typed core values and ports shared by every package (the one module all layers may import)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from scripts_library import Matcher


class Channel(StrEnum):
    """Where an inbound message came from, which is also where its answer goes."""

    KF = "kf"  # 微信客服: WeChat customers, answered with kf/send_msg
    APP = "app"  # self-built app: staff members, answered with message/send
    CONTACT = "contact"  # 客户联系 events (change_external_contact / change_external_chat / tags)


class KfOrigin(IntEnum):
    CUSTOMER = 3
    SYSTEM_EVENT = 4
    SERVICER = 5


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One customer/staff message or event, normalised from any WeCom surface."""

    channel: Channel
    msgid: str  # WeCom MsgId / kf msgid, or the composite dedupe key for events
    sender_id: str  # external_userid (kf, contact) or member userid (app)
    account_id: str  # open_kfid (kf), agent id (app), member userid (contact)
    msgtype: str  # text, image, voice, ..., event, unknown
    created_at: int  # unix seconds, as WeCom stamped it
    text: str | None = None
    event: str | None = None  # event name, e.g. enter_session, add_external_contact
    origin: int | None = None  # kf only: 3 customer, 4 system event, 5 servicer
    servicer_id: str | None = None  # kf origin 5: the member who wrote
    menu_id: str | None = None  # kf text sent by clicking a msgmenu item
    welcome_code: str | None = None  # add_external_contact / enter_session
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def conversation_key(self) -> str:
        """Messages with the same key are handled one at a time, in order."""
        return f"{self.channel}:{self.account_id}:{self.sender_id}"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """A reply the bot wants sent; the edge turns it into the right WeCom API call."""

    channel: Channel
    to: str  # external_userid (kf) or member userid (app)
    account_id: str  # open_kfid (kf) or agent id (app)
    msgtype: str  # text, markdown, msgmenu, ...
    content: Mapping[str, Any]  # the msgtype-specific body, e.g. {"content": "你好"}
    welcome_code: str | None = None  # send through send_msg_on_event / send_welcome_msg instead
    script_id: str | None = None  # the library script that produced this reply, if any
    variant: str | None = None  # the variant of that script (per-tag, default or the sticky A/B pick)
    assignment: str | None = None  # how the variant was chosen: tag, default, ab, tag+ab


class Unhandled:
    """The value a handler returns when it does not apply; the dispatcher tries the next one."""

    _instance: Unhandled | None = None

    def __new__(cls) -> Unhandled:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNHANDLED"


UNHANDLED = Unhandled()


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


def never_sent(_script_id: str) -> float | None:
    """The default `last_sent` lookup: no script was ever sent to this customer."""
    return None


@dataclass(slots=True)
class HandlerContext:
    """What a handler may use besides the message itself.

    The pipeline fills the script-related fields before dispatch: the library's matcher as it is right now
    (a reload swaps it between messages, never during one), the customer's tags and name, and when each
    script last went to this customer (for cooldowns).
    """

    clock: Clock
    extras: dict[str, Any] = field(default_factory=dict)
    matcher: Matcher | None = None
    tags: frozenset[str] = frozenset()
    customer_name: str | None = None
    last_sent: Callable[[str], float | None] = never_sent

    def now(self) -> float:
        return self.clock.now()


HandlerResult = Sequence[OutboundMessage] | Unhandled
Handler = Callable[[InboundMessage, HandlerContext], Awaitable[HandlerResult]]
