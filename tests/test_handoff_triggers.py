"""Handoff triggers (pure): phrases, complaint words, the menu item, handoff scripts, no-match streaks, tags."""

from __future__ import annotations

import pytest

from handlers.domain import Channel, InboundMessage, KfOrigin
from handlers.handoff import (
    HandoffReason,
    HandoffTriggers,
    TagPolicy,
    format_opening,
    handoff_script_ids,
    next_no_match_streak,
    no_match_script_ids,
    no_match_trigger,
    tag_policy_trigger,
    text_trigger,
)
from handlers.sla import Priority
from scripts_library import Library, build_library, load_library

TRIGGERS = HandoffTriggers(tag_policies=(TagPolicy(frozenset({"高价值"}), Priority.HIGH),))


def customer(text: str, *, menu_id: str | None = None, origin: int = KfOrigin.CUSTOMER) -> InboundMessage:
    return InboundMessage(Channel.KF, "m1", "wmX", "wk1", "text", 1, text=text, origin=origin, menu_id=menu_id)


@pytest.mark.parametrize(
    ("text", "menu_id", "reason", "priority"),
    [
        ("我要转人工", None, HandoffReason.CUSTOMER_ASKED, Priority.NORMAL),
        ("请给我 人工客服", None, HandoffReason.CUSTOMER_ASKED, Priority.NORMAL),
        ("我要投诉你们", None, HandoffReason.COMPLAINT, Priority.HIGH),
        ("给差评", None, HandoffReason.COMPLAINT, Priority.HIGH),
        ("转人工客服", "menu_human", HandoffReason.MENU, Priority.NORMAL),
    ],
)
def test_text_triggers(text: str, menu_id: str | None, reason: HandoffReason, priority: Priority) -> None:
    trigger = text_trigger(customer(text, menu_id=menu_id), TRIGGERS)
    assert trigger is not None and (trigger.reason, trigger.priority) == (reason, priority)


def test_plain_questions_and_servicer_lines_do_not_trigger() -> None:
    assert text_trigger(customer("这个多少钱"), TRIGGERS) is None
    assert text_trigger(customer("转人工", origin=KfOrigin.SERVICER), TRIGGERS) is None


def test_the_library_handoff_script_is_a_handoff_action() -> None:
    library = load_library()
    assert isinstance(library, Library)
    scripts = handoff_script_ids(library)
    assert "handoff.human" in scripts
    trigger = text_trigger(customer("我想找真人聊聊"), TRIGGERS, ["handoff.human"], scripts)
    assert trigger is not None and trigger.reason is HandoffReason.SCRIPT and trigger.detail == "handoff.human"
    assert "fallback.no_match" in no_match_script_ids(library)


def test_a_script_with_an_explicit_handoff_action_hands_off_after_its_reply() -> None:
    library = build_library(
        {
            "s.yaml": """\
scripts:
  - id: refund.dispute
    title: 退款纠纷
    action: handoff
    triggers: {keywords_any: [退款纠纷]}
    reply: [{text: 已为您转接售后专员}]
  - id: refund.policy
    title: 退款政策
    triggers: {keywords_any: [退款]}
    reply: [{text: 七天无理由}]
"""
        }
    )
    assert isinstance(library, Library)
    assert handoff_script_ids(library) == {"refund.dispute"}
    trigger = text_trigger(customer("有个退款纠纷"), TRIGGERS, ["refund.dispute"], handoff_script_ids(library))
    assert trigger is not None and trigger.reason is HandoffReason.SCRIPT and trigger.detail == "refund.dispute"
    assert text_trigger(customer("怎么退款"), TRIGGERS, ["refund.policy"], handoff_script_ids(library)) is None
    assert "aftersale.complaint" in handoff_script_ids(load_library())  # its reply promises a person


def test_an_unknown_script_action_is_refused_with_its_line() -> None:
    problems = build_library(
        {"s.yaml": "scripts:\n  - id: a\n    title: A\n    action: transfer\n    triggers: {keywords_any: [x]}\n"
         "    reply: [{text: y}]\n"}
    )
    assert isinstance(problems, list)
    assert [(p.line, p.message) for p in problems] == [(4, "action 'transfer' must be one of reply, handoff")]


def test_no_match_streak_counts_consecutive_fallbacks_only() -> None:
    fallback = frozenset({"fallback.no_match"})
    assert next_no_match_streak(0, ["fallback.no_match"], fallback) == 1
    assert next_no_match_streak(1, ["price.inquiry"], fallback) == 0
    assert next_no_match_streak(1, [], fallback) == 0
    assert no_match_trigger(2, TRIGGERS) is None  # two fallback answers in a row are still the bot's
    hit = no_match_trigger(3, TRIGGERS)  # the miss after them goes to a person
    assert hit is not None and hit.reason is HandoffReason.NO_MATCH
    assert no_match_trigger(5, HandoffTriggers(no_match_limit=0)) is None


def test_tag_policy() -> None:
    hit = tag_policy_trigger(frozenset({"高价值", "老客户"}), TRIGGERS)
    assert hit is not None and (hit.reason, hit.priority, hit.detail) == (
        HandoffReason.TAG_POLICY,
        Priority.HIGH,
        "高价值",
    )
    assert tag_policy_trigger(frozenset({"新用户"}), TRIGGERS) is None


def test_opening_times_read_naturally() -> None:
    now = 1_700_000_000.0  # Wed 2023-11-15 06:13 in Shanghai
    assert format_opening(now + 3 * 3600, "Asia/Shanghai", now) == "今天 09:13"
    assert format_opening(now + 86_400, "Asia/Shanghai", now) == "明天 06:13"
    assert format_opening(now + 4 * 86_400, "Asia/Shanghai", now) == "11月19日（周日）06:13"
