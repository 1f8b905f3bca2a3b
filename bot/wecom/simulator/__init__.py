"""A faithful in-process WeCom: the API subset the bot uses plus a `/_sim/` control API (tests, sandbox)."""

from __future__ import annotations

from .app import create_simulator
from .config import (
    DEFAULT_GROUP_CHAT_ID,
    DEFAULT_OPEN_KFID,
    DEFAULT_ROBOT_KEY,
    AdjustableClock,
    GroupChatSpec,
    ManualClock,
    OffsetClock,
    SimulatorConfig,
)
from .control import (
    ControlError,
    push_app_message,
    push_contact_change,
    push_kf_customer_message,
    push_kf_enter_session,
    push_kf_event,
    push_kf_servicer_message,
    redeliver,
)
from .state import SIM_STATE, CallbackDelivery, SentRecord, SimulatorState

__all__ = [
    "DEFAULT_GROUP_CHAT_ID",
    "DEFAULT_OPEN_KFID",
    "DEFAULT_ROBOT_KEY",
    "SIM_STATE",
    "AdjustableClock",
    "CallbackDelivery",
    "ControlError",
    "GroupChatSpec",
    "ManualClock",
    "OffsetClock",
    "SentRecord",
    "SimulatorConfig",
    "SimulatorState",
    "create_simulator",
    "push_app_message",
    "push_contact_change",
    "push_kf_customer_message",
    "push_kf_enter_session",
    "push_kf_event",
    "push_kf_servicer_message",
    "redeliver",
]
