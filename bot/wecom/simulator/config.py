"""Simulator configuration and the clocks it can run on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

DEFAULT_OPEN_KFID = "wkSANDBOX0000001"
DEFAULT_ROBOT_KEY = "sandbox-robot-key"
DEFAULT_GROUP_CHAT_ID = "wrSANDBOXGROUP0001"


@runtime_checkable
class AdjustableClock(Protocol):
    """A clock the control API may move forward (tests and the sandbox use it to skip 48 h windows)."""

    def now(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


class ManualClock:
    """Stands still until told otherwise, so tests decide exactly when windows and tokens expire."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._now += seconds


class OffsetClock:
    """Real time plus an offset: the sandbox keeps a live clock yet can still jump ahead."""

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds


@dataclass(frozen=True, slots=True)
class GroupChatSpec:
    """A customer group (客户群) owned by a member; `members` are external_userids."""

    chat_id: str
    name: str
    owner: str
    members: tuple[str, ...] = ()


@dataclass(slots=True)
class SimulatorConfig:
    corp_id: str
    agent_id: int
    token: str
    aes_key: str
    callback_url: str | None = None
    # secret -> "app" | "kf" | "contact": which APIs a token issued for it may call
    secrets: dict[str, str] = field(default_factory=lambda: {"sandbox-app-secret": "app", "sandbox-kf-secret": "kf"})
    token_ttl_s: int = 7200
    callback_timeout_s: float = 5.0
    callback_tries: int = 3
    callback_retry_delay_s: float = 0.0
    kf_accounts: tuple[str, ...] = (DEFAULT_OPEN_KFID,)
    # open_kfid -> servicer userids; an account missing here is served by every member
    servicers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    robot_keys: tuple[str, ...] = (DEFAULT_ROBOT_KEY,)
    members: tuple[str, ...] = ("zhangsan", "lisi")
    # group name -> tag names; ids are derived from the position so they are stable across runs
    corp_tags: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"客户等级": ("VIP", "普通")})
    group_chats: tuple[GroupChatSpec, ...] = (GroupChatSpec(DEFAULT_GROUP_CHAT_ID, "沙箱客户群", "zhangsan"),)
    # The reference leaves 1→4 / 2→4 / 0→4 open; a deployment that observes them can add them here.
    kf_extra_transitions: frozenset[tuple[int, int]] = frozenset()
    # Real 群发 tasks wait for the member to confirm in the client; the sandbox may skip that step.
    groupmsg_auto_confirm: bool = False

    def servicers_of(self, open_kfid: str) -> tuple[str, ...]:
        return self.servicers.get(open_kfid, self.members)
