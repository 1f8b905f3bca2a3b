"""Opt-out and re-subscribe (退订 / 订阅) from a customer's own message (pure).

A customer who sends one of the opt-out phrases stops receiving marketing posts and SOP touches and is told how
to subscribe again; an opt-in phrase undoes it. Transactional replies and conversations with people are not
affected (`handlers.audience` applies the state to marketing sends only).

A phrase matches the whole message after normalisation: full width -> half width, case, traditional ->
simplified, whitespace anywhere and punctuation or symbols around it ("ＴＤ", "退订！", "「退 订」" all opt out).
A longer sentence that merely contains a phrase ("我不想退订") is not a command.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType

from scripts_library import normalize

DEFAULT_OPT_OUT_PHRASES = ("退订", "TD", "取消订阅", "不要再发了")
DEFAULT_OPT_IN_PHRASES = ("订阅",)

OPTED_OUT_REPLY = (
    "您已成功退订，我们将不再向您推送活动、优惠等营销消息。订单和售后相关的通知以及客服咨询不受影响。"
    "如需重新订阅，请发送「订阅」。"
)
OPTED_IN_REPLY = "订阅成功，我们会继续为您推送活动和优惠信息。如需退订，请发送「退订」。"


class SubscriptionAction(StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """The phrases that opt out and in, and the confirmations sent back (Simplified Chinese)."""

    opt_out_phrases: tuple[str, ...] = DEFAULT_OPT_OUT_PHRASES
    opt_in_phrases: tuple[str, ...] = DEFAULT_OPT_IN_PHRASES
    opted_out_reply: str = OPTED_OUT_REPLY
    opted_in_reply: str = OPTED_IN_REPLY

    def __post_init__(self) -> None:
        out = {normalise_command(p): p for p in self.opt_out_phrases}
        into = {normalise_command(p): p for p in self.opt_in_phrases}
        if "" in out or "" in into:
            raise ValueError("a subscription phrase is empty after normalisation")
        both = sorted(out.keys() & into.keys())
        if both:
            raise ValueError(f"phrases both opt out and opt in: {', '.join(out[k] for k in both)}")
        if not self.opted_out_reply.strip() or not self.opted_in_reply.strip():
            raise ValueError("subscription replies must not be empty")

    def action_for(self, normalised: str) -> SubscriptionAction | None:
        return _phrase_table(self).get(normalised)


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """What a command does: the new opt-out state and the confirmation to send."""

    action: SubscriptionAction
    opted_out: bool
    reply: str


def _edge(char: str) -> bool:
    # Punctuation, separators, symbols (emoji, ~) and invisible format characters around a command are noise.
    return char.isspace() or unicodedata.category(char)[0] in "PZSC"


def normalise_command(text: str) -> str:
    """A message as commands compare it: `scripts_library.normalize`d, no whitespace, no edge punctuation."""
    folded = "".join(normalize(text).split())
    start, end = 0, len(folded)
    while start < end and _edge(folded[start]):
        start += 1
    while end > start and _edge(folded[end - 1]):
        end -= 1
    return folded[start:end]


@lru_cache(maxsize=64)
def _phrase_table(config: SubscriptionConfig) -> Mapping[str, SubscriptionAction]:
    table = {normalise_command(p): SubscriptionAction.OPT_OUT for p in config.opt_out_phrases}
    table.update({normalise_command(p): SubscriptionAction.OPT_IN for p in config.opt_in_phrases})
    return MappingProxyType(table)


MAX_COMMAND_CHARS = 64  # a longer message is a conversation, never a command (and is not normalised for it)


def subscription_command(text: str | None, config: SubscriptionConfig | None = None) -> SubscriptionChange | None:
    """The change a customer's text asks for, or None when it is not a subscription command."""
    if not text or len(text) > MAX_COMMAND_CHARS:
        return None
    config = config or DEFAULT_SUBSCRIPTION
    action = config.action_for(normalise_command(text))
    if action is SubscriptionAction.OPT_OUT:
        return SubscriptionChange(action, True, config.opted_out_reply)
    if action is SubscriptionAction.OPT_IN:
        return SubscriptionChange(action, False, config.opted_in_reply)
    return None


DEFAULT_SUBSCRIPTION = SubscriptionConfig()

__all__ = [
    "DEFAULT_SUBSCRIPTION",
    "SubscriptionAction",
    "SubscriptionChange",
    "SubscriptionConfig",
    "normalise_command",
    "subscription_command",
]
