"""The conversation view's summary and canned replies (/console/conversations/{id}, page and JSON).

Canned replies are the sidebar's listing (`bot.console.canned.scripts_for_tags`): the scripts whose audience admits
the customer's tags, ranked as the matcher ranks them, each the variant the bot would choose for this customer and
rendered for them and the signed-in agent. A small library of our own makes every case visible. Both backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bot.console.summary import LAST_MESSAGE_CHARS, summarize
from bot.console.templates import REASON_LABELS
from bot.sidebar import ChatSubject, build_context
from bot.storage.console_repository import ConversationDetail, HistoryMessage, InboxRow, SlaDue
from bot.storage.db import create_session_factory
from bot.storage.models import Conversation, ConversationStatus, Message, SlaClockRow
from handlers.handoff import HandoffReason
from tests.conftest import Backend
from tests.test_console import SUPPORT, Console, _console, seed_conversation

LIBRARY = """
scripts:
  - id: care.vip
    title: 高价值客户专属关怀
    triggers:
      keywords_any: [专属顾问]
    audience:
      any_of: [高价值]
    priority: 10
    reply:
      - text: "{customer_name}您好，我是您的专属顾问{agent_name}<script>alert(1)</script>"

  - id: gift.newcomer
    title: 新客首单礼
    triggers:
      keywords_any: [新人礼]
    audience:
      any_of: [新用户]
    reply:
      - text: "{customer_name}，欢迎新朋友！首单立减 10 元。"

  - id: hello.general
    title: 通用问候
    triggers:
      keywords_any: [你好]
    variants:
      - name: default
        reply:
          - text: "您好，我是{agent_name}，请问有什么可以帮您？"
      - name: vip
        tags: [高价值]
        priority: 50
        reply:
          - text: "{customer_name}您好，VIP 专线为您服务。"

  - id: promo.page
    title: 活动页面
    triggers:
      keywords_any: [活动]
    reply:
      - link:
          title: 本月活动
          url: https://shop.example.com/promo

  - id: steps.two
    title: 售后两步走
    triggers:
      keywords_any: [售后]
    reply:
      - text: 第一步：打开订单。
      - text: 第二步：申请售后。
"""


@pytest.fixture
async def console(backend: Backend, tmp_path: Path) -> AsyncIterator[Console]:
    folder = tmp_path / "library"
    folder.mkdir()
    (folder / "scripts.yaml").write_text(LIBRARY, encoding="utf-8")
    async for value in _console(backend, scripts_path=str(folder)):
        yield value


def ids(body: dict[str, Any]) -> list[str]:
    return [s["id"] for s in body["canned"]["scripts"]]


def texts(body: dict[str, Any]) -> dict[str, str]:
    return {s["id"]: s["text"] for s in body["canned"]["scripts"]}


async def add_message(
    console: Console,
    conversation_id: int,
    index: int,
    direction: str,
    text: str | None,
    *,
    origin: int | None = 3,
    msgtype: str = "text",
    at: float,
) -> None:
    sessions = create_session_factory(console.services.engine)
    async with sessions.begin() as session:
        conversation = await session.get(Conversation, conversation_id)
        assert conversation is not None
        session.add(
            Message(
                channel="kf",
                wecom_msgid=f"extra-{conversation_id}-{index}",
                direction=direction,
                customer_id=conversation.customer_id,
                conversation_id=conversation_id,
                account_id="wkACCOUNT",
                msgtype=msgtype,
                text=text,
                payload={},
                origin=origin,
                status="handled",
                created_at=datetime.fromtimestamp(at, UTC),
                received_at=datetime.fromtimestamp(at, UTC),
            )
        )


async def reopen(console: Console, earlier: int, *, at: float, reason: str) -> int:
    """A new queued conversation for the customer of `earlier` (a returning customer)."""
    sessions = create_session_factory(console.services.engine)
    stamp = datetime.fromtimestamp(at, UTC)
    async with sessions.begin() as session:
        before = await session.get(Conversation, earlier)
        assert before is not None
        row = Conversation(
            channel="kf",
            account_id="wkACCOUNT",
            customer_id=before.customer_id,
            status="queued",
            opened_at=stamp,
            updated_at=stamp,
            team=SUPPORT,
            handoff_reason=reason,
            handoff_at=stamp,
            queued_at=stamp,
        )
        session.add(row)
        await session.flush()
        return row.id


# ------------------------------------------------------------------------------------------------ canned replies


async def test_canned_replies_are_the_scripts_the_customers_tags_admit_rendered_for_them(console: Console) -> None:
    now = console.clock.now()
    vip = await seed_conversation(console.services, "vip", team=SUPPORT, queued_at=now - 9, tags=["高价值"])
    newbie = await seed_conversation(console.services, "new", team=SUPPORT, queued_at=now - 8, tags=["新用户"])
    plain = await seed_conversation(console.services, "plain", team=SUPPORT, queued_at=now - 7)
    agent = await console.logged_in("agent")

    status, body = await agent.get_json(f"/console/api/conversations/{vip}")
    assert status == 200
    # the high-value script first (priority), then the rest in rank order; the link script cannot be a text reply
    assert ids(body) == ["care.vip", "hello.general", "steps.two"]
    assert body["canned"]["tags"] == ["高价值"] and body["canned"]["audience"] == "tags"
    by_id = {s["id"]: s for s in body["canned"]["scripts"]}
    assert by_id["care.vip"]["title"] == "高价值客户专属关怀"
    # rendered for this customer and this agent ("agent 名" is the signed-in agent's display name)
    assert by_id["care.vip"]["text"] == "客户vip您好，我是您的专属顾问agent 名<script>alert(1)</script>"
    assert (
        by_id["hello.general"]["variant"] == "vip"
        and by_id["hello.general"]["text"] == "客户vip您好，VIP 专线为您服务。"
    )
    assert by_id["steps.two"]["texts"] == ["第一步：打开订单。", "第二步：申请售后。"]
    assert by_id["steps.two"]["text"] == "第一步：打开订单。\n\n第二步：申请售后。"  # one reply from the console
    [skipped] = body["canned"]["skipped"]
    assert skipped["id"] == "promo.page" and "链接" in skipped["reason"]

    # exactly the sidebar's listing for the same customer, tags and staff member: one rule for both
    sidebar = build_context(
        console.services.scripts.matcher,
        ChatSubject("single", "vip", "客户vip", True, frozenset({"高价值"})),
        now=now,
        staff_name="agent 名",
    )
    assert [(s["id"], s["variant"], s["texts"]) for s in body["canned"]["scripts"]] == [
        (s.script_id, s.variant, list(s.texts)) for s in sidebar.scripts
    ]

    _, body = await agent.get_json(f"/console/api/conversations/{newbie}")
    assert ids(body) == ["gift.newcomer", "hello.general", "steps.two"]  # no high-value script for a newcomer
    assert texts(body)["gift.newcomer"] == "客户new，欢迎新朋友！首单立减 10 元。"
    assert texts(body)["hello.general"] == "您好，我是agent 名，请问有什么可以帮您？"

    _, body = await agent.get_json(f"/console/api/conversations/{plain}")
    assert ids(body) == ["hello.general", "steps.two"] and body["canned"]["audience"] == "default"

    # another agent gets the same scripts signed with their own name
    other = await console.logged_in("agent2")
    _, body = await other.get_json(f"/console/api/conversations/{plain}")
    assert texts(body)["hello.general"] == "您好，我是agent2 名，请问有什么可以帮您？"


async def test_the_page_lists_canned_replies_escaped_with_a_search_box(console: Console) -> None:
    now = console.clock.now()
    vip = await seed_conversation(console.services, "vip", team=SUPPORT, queued_at=now - 9, tags=["高价值"])
    newbie = await seed_conversation(console.services, "new", team=SUPPORT, queued_at=now - 8, tags=["新用户"])
    agent = await console.logged_in("agent")

    response = await agent.session.get(f"/console/conversations/{vip}")
    page = await response.text()
    assert response.status == 200
    assert "<script>alert(1)" not in page  # neither in the listed text nor in the attribute the click copies
    escaped = "客户vip您好，我是您的专属顾问agent 名&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f'data-text="{escaped}"' in page and f'<p class="text">{escaped}</p>' in page
    assert '<input id="canned-search" type="search"' in page
    assert ">高价值客户专属关怀</button>" in page and "按客户标签 高价值 筛选" in page
    assert "活动页面：含非文字消息（链接），无法插入" in page
    assert page.index('id="canned"') < page.index('id="reply-text"')  # above the reply box it fills

    page = await (await agent.session.get(f"/console/conversations/{newbie}")).text()
    assert "高价值客户专属关怀" not in page and ">新客首单礼</button>" in page


async def test_another_teams_conversation_shows_no_canned_replies_or_summary(console: Console) -> None:
    now = console.clock.now()
    theirs = await seed_conversation(console.services, "vip", team="售前", queued_at=now - 9, tags=["高价值"])
    agent = await console.logged_in("agent")
    status, body = await agent.get_json(f"/console/api/conversations/{theirs}")
    assert status == 404 and body["error"] == "not_found" and "canned" not in body and "summary" not in body
    response = await agent.session.get(f"/console/conversations/{theirs}")
    page = await response.text()
    assert response.status == 404 and "专属顾问" not in page and "客户vip" not in page
    sales = await console.logged_in("sales")  # the team's own agent sees it
    status, body = await sales.get_json(f"/console/api/conversations/{theirs}")
    assert status == 200 and ids(body)[0] == "care.vip"


# ------------------------------------------------------------------------------------------------ summary


async def test_the_summary_of_a_returning_customer(console: Console) -> None:
    now = console.clock.now()
    agent2 = console.staff["agent2"]
    earlier = await seed_conversation(
        console.services,
        "ret",
        team=SUPPORT,
        status="resolved",
        queued_at=now - 3600,
        assignee_id=agent2,
        tags=["高价值", "老客户"],
        messages=[("in", "上次的问题", 3)],
    )
    current = await reopen(console, earlier, at=now - 12, reason=HandoffReason.COMPLAINT.value)
    sessions = create_session_factory(console.services.engine)
    async with sessions.begin() as session:
        session.add(
            SlaClockRow(
                conversation_id=current,
                kind="first_response",
                cycle=0,
                policy_id="default",
                target_seconds=30,
                started_at=now - 12,
                ladder=[["warned", 0, now + 12], ["breached", 1, now + 18]],
                reached=0,
                status="running",
                next_deadline=now + 12,
            )
        )
    long_text = "我的订单" + "一直没有发货，" * 20 + "请尽快处理"
    await add_message(console, current, 0, "in", "你好", at=now - 20)
    await add_message(console, current, 1, "out", "您好，请问有什么可以帮您？", origin=None, at=now - 19)
    await add_message(console, current, 2, "in", None, msgtype="event", origin=4, at=now - 18)  # not the customer
    await add_message(console, current, 3, "in", long_text, at=now - 15)
    await add_message(console, current, 4, "in", "客服在 WeCom 里的回复", origin=5, at=now - 13)  # a servicer
    agent = await console.logged_in("agent")

    status, body = await agent.get_json(f"/console/api/conversations/{current}")
    assert status == 200
    summary = body["summary"]
    cut = summary["last_customer_message"]
    assert len(cut) == LAST_MESSAGE_CHARS and cut.endswith("…") and cut.startswith("我的订单一直没有发货")
    assert summary == {
        **summary,
        "customer": "客户ret",
        "customer_external_id": "ret",
        "tags": ["老客户", "高价值"],
        "channel": "kf",
        "channel_label": "微信客服",
        "status": "queued",
        "status_label": "排队中",
        "assignee": None,
        "team": SUPPORT,
        "handoff_reason": "complaint",
        "reason_label": "投诉",
        "waiting_since": pytest.approx(now - 12),
        "sla": {"kind": "first_response", "label": "首次响应", "due_at": pytest.approx(now + 18)},
        "customer_messages": 2,  # 你好 and the long one: not the bot, the event or the servicer's line
        "last_customer_at": pytest.approx(now - 15),
        "returning": True,
        "previous_conversations": 1,
        "previous_agent": "agent2 名",
        "generated": None,
    }
    page = await (await agent.session.get(f"/console/conversations/{current}")).text()
    assert '<h2 id="summary-title">会话摘要</h2>' in page
    assert page.index('id="summary-title"') < page.index('id="history-title"')  # at the top
    assert '<dd id="summary-reason">投诉</dd>' in page and '<dd id="summary-channel">微信客服</dd>' in page
    assert '<dd id="summary-messages">2 条</dd>' in page
    assert f'<dd id="summary-last">{cut} <time' in page
    assert "回头客（此前 1 次会话），上次由 agent2 名 接待" in page
    assert 'class="sla ok" data-due=' in page and "首次响应" in page

    # The first conversation: no earlier one, so no previous agent (its own assignee is not "previous").
    admin = await console.logged_in("admin")
    _, body = await admin.get_json(f"/console/api/conversations/{earlier}")
    first = body["summary"]
    assert first["returning"] is False and first["previous_agent"] is None and first["previous_conversations"] == 0
    assert first["assignee"] == "agent2 名" and first["status_label"] == "已解决"
    assert first["last_customer_message"] == "上次的问题" and first["customer_messages"] == 1
    page = await (await admin.session.get(f"/console/conversations/{earlier}")).text()
    assert '<dd id="summary-previous">首次咨询</dd>' in page and "已等待" not in page


def test_every_handoff_reason_has_a_chinese_label() -> None:
    missing = [reason.value for reason in HandoffReason if reason.value not in REASON_LABELS]
    assert missing == []


def _detail(messages: Iterable[HistoryMessage], **row: Any) -> ConversationDetail:
    at = datetime.fromtimestamp(1_700_000_000, UTC)
    values: dict[str, Any] = {
        "id": 1,
        "channel": "kf",
        "status": ConversationStatus.OPEN,
        "team": None,
        "priority": "high",
        "handoff_reason": "customer_asked",
        "customer_id": 1,
        "customer_name": None,
        "customer_external_id": "wmPURE",
        "tags": (),
        "assignee_id": 7,
        "assignee_name": "小王",
        "queued_at": None,
        "assigned_at": at,
        "handoff_at": at,
        "opened_at": at,
        "last_inbound_at": at,
        "sla": SlaDue("next_response", 1_700_000_100.0, 1_700_000_000.0, 60.0),
        "version": 1,
        **row,
    }
    return ConversationDetail(InboxRow(**values), tuple(messages), customer_messages=3)


def test_summarize_is_a_pure_function_of_the_detail() -> None:
    at = datetime.fromtimestamp(1_700_000_050, UTC)
    detail = _detail(
        [
            HistoryMessage(1, "customer", "text", "  多行\n\n文字  ", at),
            HistoryMessage(2, "customer", "image", None, at),
            HistoryMessage(3, "agent", "text", "好的", at),
        ]
    )
    summary = summarize(detail)
    assert summary.customer == "wmPURE"  # no name: the WeCom id
    assert summary.last_customer_message == "[图片]" and summary.customer_messages == 3
    assert summary.reason_label == "客户要求转人工" and summary.priority_label == "高"
    assert summary.sla_label == "下次响应" and summary.sla_due_at == 1_700_000_100.0
    assert summary.waiting_since == 1_700_000_000.0  # not queued: since the handoff
    assert summary.returning is False and summary.previous_agent is None and summary.generated is None
    assert summarize(detail) == summary

    text_only = summarize(_detail([HistoryMessage(1, "customer", "text", "  多行\n\n文字  ", at)], sla=None))
    assert text_only.last_customer_message == "多行 文字" and text_only.sla_due_at is None
    nothing = summarize(_detail([], handoff_reason=None, channel="contact"))
    assert nothing.last_customer_message is None and nothing.reason_label == "—" and nothing.channel_label == "客户联系"
