"""The whole console flow against the simulator: a customer asks for a person through 微信客服, nobody is online,
the conversation queues; agent A (a console agent: no WeCom account) sees it with a ticking SLA, goes online and
gets it, while agent B's browser sees it leave the queue live; A picks a canned reply, which fills the reply box,
and sends it from the console (exactly one kf/send_msg) and resolves; the bot answers the customer's next message again.

The server (simulator, pipeline, HandoffService, console with HandoffConsoleActions) runs in a thread of this
process on SQLite + in-process Redis, with a ManualClock. No sleeps: every wait is a Playwright expectation.
The double-submit test runs on both backends without a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.console import create_console_app
from bot.console.handoff_actions import HandoffConsoleActions
from bot.storage.console_repository import ConsoleRepository
from bot.storage.db import create_session_factory
from bot.storage.models import ConversationStatus
from tests.conftest import Backend
from tests.test_console import PASSWORD_HASH, Browser
from tests.test_console_browser import _free_port, console_login, open_pages, remaining_seconds
from tests.test_handoff import Desk, open_desk
from tests.test_sandbox_browser import CHROMIUM_FLAGS, chromium  # noqa: F401 (the fixture)
from tests.thread_server import LoopCalls, in_thread, listening

T = TypeVar("T")
STEP_TIMEOUT_MS = 15_000
LIVE_TIMEOUT_MS = 1_500
CUSTOMER = "wmBrowser"


async def console_agent(desk: Desk, username: str) -> int:
    """A console agent (no WeCom userid), offline, who can log in with PASSWORD."""
    agent_id = await desk.agent(username, presence="offline", wecom=False)
    await ConsoleRepository(create_session_factory(desk.h.services.engine)).set_password_hash(username, PASSWORD_HASH)
    return agent_id


def console_app(desk: Desk) -> web.Application:
    services = desk.h.services
    actions = HandoffConsoleActions(desk.service, services.redis, services.settings.redis_key_prefix)
    app = web.Application()
    app.add_subapp("/console", create_console_app(services, actions=actions, clock=desk.h.clock))
    return app


def kf_texts(desk: Desk, text: str) -> int:
    return sum(1 for api, _t, c in desk.sent(CUSTOMER) if api == "kf/send_msg" and c.get("content") == text)


# ------------------------------------------------------------------------------------------ double submit


@contextlib.asynccontextmanager
async def desk_with_console(backend: Backend) -> AsyncIterator[tuple[Desk, TestServer]]:
    async with open_desk(backend) as desk:
        server = TestServer(console_app(desk))
        await server.start_server()
        try:
            yield desk, server
        finally:
            await server.close()


async def test_a_double_submitted_reply_post_sends_once(backend: Backend) -> None:
    async with desk_with_console(backend) as (desk, server):
        await console_agent(desk, "zhang")
        await desk.repo.set_presence((await desk.repo.agents())[0].id, "online")
        conversation = await desk.say(CUSTOMER, "转人工")
        browser = Browser(server)
        try:
            assert (await browser.login("zhang")).status == 303
            body = {"text": "您好，我是客服小张", "idempotency_key": "dbl-submit-0001"}
            answers = await asyncio.gather(*(browser.act(conversation, "reply", body) for _ in range(2)))
            retry = await browser.act(conversation, "reply", body)  # the browser retries after a lost answer
        finally:
            await browser.close()
        assert kf_texts(desk, "您好，我是客服小张") == 1
        assert retry == (200, {"ok": True, "code": "ok", "message": ""})
        assert all(status in (200, 409) for status, _ in answers) and any(status == 200 for status, _ in answers)
        messages = await desk.h.services.repos.messages.conversation_messages(conversation)
        stored = [m for m in messages if m.direction.value == "out"]
        assert sum(1 for m in stored if m.text == "您好，我是客服小张") == 1
        audit = [e for e in await desk.h.services.repos.audit.recent() if e.action == "console.reply"]
        assert len(audit) == 3 and all("text" not in e.detail for e in audit)


async def test_presence_toggle_and_agent_picker_are_validated_audited_and_drain_the_queue(backend: Backend) -> None:
    async with desk_with_console(backend) as (desk, server):
        zhang = await console_agent(desk, "zhang")
        await desk.agent("wangwu", presence="online", capacity=3)  # a WeCom agent of the team, not receiving kf yet
        await desk.repo.set_presence((await desk.repo.agents())[1].id, "offline")
        conversation = await desk.say(CUSTOMER, "转人工")
        browser = Browser(server)
        try:
            assert (await browser.login("zhang")).status == 303
            post = browser.session.post
            refused = await post("/console/api/presence", json={"presence": "online"})  # no CSRF token
            assert refused.status == 403
            token = {"X-CSRF-Token": browser.csrf}
            bad = await post("/console/api/presence", json={"presence": "busy"}, headers=token)
            assert bad.status == 400
            ok = await post("/console/api/presence", json={"presence": "online"}, headers=token)
            assert ok.status == 200 and (await ok.json())["ok"] is True
            row = await desk.repo.conversation(conversation)
            assert row is not None and row.assignee_id == zhang  # online drained the queue to zhang
            status, listed = await browser.get_json("/console/api/agents")
            assert status == 200 and listed["me"] == zhang
            by_name = {a["name"]: a for a in listed["agents"]}
            assert by_name["客服zhang"]["presence"] == "online" and by_name["客服zhang"]["open_count"] == 1
            assert by_name["客服zhang"]["answers_in"] == "console" and by_name["客服wangwu"]["answers_in"] == "wecom"
            page = await (await browser.session.get(f"/console/conversations/{conversation}")).text()
            assert "客服wangwu（离线，0/3，企业微信）" in page and 'name="idempotency_key"' in page
        finally:
            await browser.close()
        audit = [e for e in await desk.h.services.repos.audit.recent() if e.action == "console.presence"]
        assert [e.detail for e in audit] == [{"ok": True, "code": "ok", "presence": "online"}]


# ------------------------------------------------------------------------------------------ the browser flow


@dataclass
class FlowServer(LoopCalls):
    loop: asyncio.AbstractEventLoop
    desk: Desk
    base_url: str


@contextlib.contextmanager
def flow_server(tmp_path: Path) -> Iterator[FlowServer]:
    backend = Backend("embedded", f"sqlite+aiosqlite:///{tmp_path}/bot.sqlite3", "", "flow")
    port = _free_port()

    async def serve(ready: Callable[[FlowServer], None], stop: asyncio.Event) -> None:
        async with open_desk(backend) as desk, listening(console_app(desk), port):
            ready(FlowServer(asyncio.get_running_loop(), desk, f"http://127.0.0.1:{port}"))
            await stop.wait()

    with in_thread(serve, name="console-flow-server", start_timeout=60) as server:
        yield server


@pytest.mark.slow
def test_queue_go_online_reply_and_resolve_from_the_console(chromium: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    problems: list[str] = []
    with flow_server(tmp_path) as server, sync_playwright() as playwright:
        desk = server.desk
        agent_a = server.run(console_agent(desk, "zhang"))
        server.run(console_agent(desk, "li"))
        conversation = server.run(desk.say(CUSTOMER, "转人工"))
        row_now = server.run(desk.repo.conversation(conversation))
        assert row_now is not None and row_now.status is ConversationStatus.QUEUED
        assert desk.kf(CUSTOMER)[0] in (0, 1)  # our own queue: the kf session stays API-managed

        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            first, second = open_pages(browser, 2, problems, height=800)
            first.clock.install()

            def login(page: Any, username: str) -> None:
                console_login(page, server, username)

            login(first, "zhang")
            row = first.locator(f'#queue tbody tr[data-id="{conversation}"]')
            expect(row).to_contain_text(CUSTOMER)
            expect(first.locator("#presence-now")).to_have_attribute("data-presence", "offline")
            expect(first.locator("body")).to_have_attribute("data-synced", re.compile(r"^[1-9]"))
            countdown = row.locator(".sla")
            expect(countdown).to_have_text(re.compile(r"剩余 \d\d:\d\d"))
            before = remaining_seconds(countdown.inner_text())
            assert 25 <= before <= 30, before  # first response ≤ 30 s
            first.clock.run_for(5_000)
            expect(countdown).not_to_have_text(countdown.inner_text())
            after = remaining_seconds(countdown.inner_text())
            assert before - 7 <= after <= before - 4, (before, after)

            login(second, "li")
            other_row = second.locator(f'#queue tbody tr[data-id="{conversation}"]')
            expect(other_row).to_be_visible()

            # A goes online: the queue drains to A at once, and B's queue loses the row live.
            first.get_by_role("button", name="在线", exact=True).click()
            expect(first.locator("#presence-result")).to_have_text("接待状态已更新")
            expect(first.locator("#presence-now")).to_have_attribute("data-presence", "online")
            expect(other_row).to_have_count(0, timeout=LIVE_TIMEOUT_MS)
            expect(second.locator("#queue-empty")).to_be_visible()
            mine = first.locator(f'#mine tbody tr[data-id="{conversation}"]')
            expect(mine).to_contain_text("客服zhang")

            # A replies from the console: exactly one kf/send_msg with that text.
            mine.get_by_role("link", name=CUSTOMER).click()
            expect(first.get_by_role("heading", level=1)).to_contain_text(CUSTOMER)
            expect(first.locator("#transfer-to")).to_have_attribute("data-loaded", "1")
            expect(first.locator("#transfer-to")).to_contain_text("客服li（离线，0/5，工作台）")
            # The summary says why the customer is here; the canned replies fit the customer's (no) tags.
            expect(first.locator("#summary-reason")).to_have_text("客户要求转人工")
            expect(first.locator("#summary-last")).to_contain_text("转人工")
            # A canned reply, found with the search box, fills the reply box (rendered for this agent); nothing is
            # sent until 发送, and then exactly once.
            first.get_by_label("搜索话术").fill("欢迎语")
            expect(first.locator("#canned li:not([hidden])")).to_have_count(1)
            first.get_by_role("button", name="添加好友欢迎语").click()
            reply_box = first.get_by_label("回复客户")
            canned = first.get_by_role("button", name="添加好友欢迎语").get_attribute("data-text") or ""
            assert "客服zhang" in canned, canned
            expect(reply_box).to_have_value(canned)
            expect(reply_box).to_be_focused()
            assert kf_texts(desk, canned) == 0
            first.get_by_role("button", name="发送").click()
            expect(first.locator("#action-result")).to_have_text("已完成")
            expect(first.locator("ol.history li.agent").last).to_contain_text("我是客服zhang")
            expect(first.locator("ol.history li.agent").last).to_contain_text("客服")
            assert kf_texts(desk, canned) == 1
            expect(first.locator("#status")).to_have_text("等待客户")

            # A resolves: the bot answers the customer's next message again.
            first.get_by_role("button", name="标记解决").click()
            expect(first.locator("#action-result")).to_have_text("已完成")
            expect(first.locator("#status")).to_have_text("已解决")
            assert desk.trans_calls() == 0
            sent_before = len(desk.sent(CUSTOMER))
            again = server.run(desk.say(CUSTOMER, "你好"))
            assert again != conversation and len(desk.sent(CUSTOMER)) == sent_before + 1
            first.screenshot(path=str(tmp_path / "console-flow.png"), full_page=True)
            assert agent_a > 0
        finally:
            browser.close()
    assert not problems, problems
