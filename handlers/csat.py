"""The satisfaction (CSAT) survey as WeCom sees it: a kf msgmenu of five click items, the answer, the thanks.

Pure: no I/O. The survey goes out once per resolved conversation (bot/csat.py), normally through
send_msg_on_event with the session-end msg_code ("session ended (closing / satisfaction survey)": 1 message,
text or msgmenu, code valid 20 s, reference §4.4). msgmenu limits (reference §4.3): head/tail ≤ 1024 bytes;
click items id ≤ 128 bytes, content 1–128 bytes; at most 10 click/view/miniprogram items via send_msg_on_event.

Clicking an item sends back a customer text whose `menu_id` is the item id: `csat:5` (best) … `csat:1` (worst).
Texts are module constants for now (configurable later).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MENU_ID_PREFIX = "csat:"
MIN_SCORE, MAX_SCORE = 1, 5
SATISFIED_MIN_SCORE = 4  # 4–5 count as satisfied
SATISFACTION_BAR = 0.90  # the SOP: satisfaction ≥ 90 %

# Platform limits (reference §4.3, §4.4).
HEAD_TAIL_MAX_BYTES = 1024
CLICK_ID_MAX_BYTES = 128
CLICK_CONTENT_MAX_BYTES = 128
EVENT_MENU_MAX_ITEMS = 10  # click/view/miniprogram items through send_msg_on_event

# Shown best first, as customers read a rating list; the score is in the id, never in the position.
SCORE_LABELS: tuple[tuple[int, str], ...] = (
    (5, "非常满意"),
    (4, "满意"),
    (3, "一般"),
    (2, "不满意"),
    (1, "非常不满意"),
)
SURVEY_HEAD = "本次服务已结束，感谢您的耐心。请为本次服务打分："
SURVEY_TAIL = "点击上方选项即可完成评价，您的反馈将帮助我们改进服务。"
THANKS_TEXT = "感谢您的评价，祝您生活愉快！"
THANKS_TEXT_LOW = "感谢您的反馈，很抱歉没能让您满意，我们会认真改进。"


class SurveyMenuError(ValueError):
    """A survey menu WeCom would refuse (a limit is exceeded)."""


def menu_id(score: int) -> str:
    """The click item id of a score: `csat:N`."""
    if not MIN_SCORE <= score <= MAX_SCORE:
        raise ValueError(f"a CSAT score is {MIN_SCORE}-{MAX_SCORE}, got {score}")
    return f"{MENU_ID_PREFIX}{score}"


def is_survey_answer(menu_id_value: str | None) -> bool:
    """Whether a kf text's menu_id belongs to the survey (whether or not the score in it is valid)."""
    return bool(menu_id_value) and str(menu_id_value).startswith(MENU_ID_PREFIX)


def parse_score(menu_id_value: str | None) -> int | None:
    """`csat:N` → N (1–5); anything else (other menus, `csat:9`, `csat:x`) → None."""
    if not is_survey_answer(menu_id_value):
        return None
    rest = str(menu_id_value)[len(MENU_ID_PREFIX) :]
    if len(rest) != 1 or not rest.isdigit():
        return None
    score = int(rest)
    return score if MIN_SCORE <= score <= MAX_SCORE else None


def survey_menu(
    head: str = SURVEY_HEAD, labels: Sequence[tuple[int, str]] = SCORE_LABELS, tail: str = SURVEY_TAIL
) -> dict[str, Any]:
    """The kf `msgmenu` body of the survey, checked against the platform's limits."""
    menu: dict[str, Any] = {
        "head_content": head,
        "list": [{"type": "click", "click": {"id": menu_id(score), "content": label}} for score, label in labels],
        "tail_content": tail,
    }
    check_menu(menu)
    return menu


def check_menu(menu: Mapping[str, Any], max_actions: int = EVENT_MENU_MAX_ITEMS) -> None:
    """Raise SurveyMenuError when a msgmenu body breaks a limit WeCom enforces."""
    for key in ("head_content", "tail_content"):
        if len(str(menu.get(key, "")).encode()) > HEAD_TAIL_MAX_BYTES:
            raise SurveyMenuError(f"{key} is over {HEAD_TAIL_MAX_BYTES} bytes")
    items = menu.get("list")
    if not isinstance(items, list) or not items:
        raise SurveyMenuError("the menu needs at least one item")
    if len(items) > max_actions:
        raise SurveyMenuError(f"{len(items)} items: at most {max_actions} via send_msg_on_event")
    ids: set[str] = set()
    for item in items:
        click = item.get("click") if isinstance(item, Mapping) and item.get("type") == "click" else None
        if not isinstance(click, Mapping):
            raise SurveyMenuError("every survey item is a click item")
        item_id, content = str(click.get("id", "")), str(click.get("content", ""))
        if not item_id or len(item_id.encode()) > CLICK_ID_MAX_BYTES:
            raise SurveyMenuError(f"click id {item_id!r} must be 1-{CLICK_ID_MAX_BYTES} bytes")
        if not 1 <= len(content.encode()) <= CLICK_CONTENT_MAX_BYTES:
            raise SurveyMenuError(f"click content {content!r} must be 1-{CLICK_CONTENT_MAX_BYTES} bytes")
        if item_id in ids:
            raise SurveyMenuError(f"duplicate click id {item_id!r}")
        ids.add(item_id)


def thanks_text(score: int) -> str:
    """The short reply to an answer: a warmer one for satisfied customers, an apology for the others."""
    return THANKS_TEXT if score >= SATISFIED_MIN_SCORE else THANKS_TEXT_LOW


def satisfied(score: int) -> bool:
    return score >= SATISFIED_MIN_SCORE
