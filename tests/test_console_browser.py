"""The agent console in a real headless Chromium: an agent logs in, sees a queued conversation with a ticking SLA
countdown, and claims it, while a second agent's browser sees the claim live (SSE over Redis pub/sub).

The server runs in a thread of this process (aiohttp on its own event loop, SQLite and in-process Redis), with a
ConsoleActions that stands in for the handoff service: its claim updates the row and calls publish_console_event,
as bot/handoff.py will. No sleeps: every wait is a Playwright expectation with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from bot.app import Services, open_services
from bot.console import ActionResult, ConsoleUser, create_console_app, publish_console_event
from bot.storage.models import StaffRole
from tests.conftest import Backend, make_settings
from tests.test_console import PASSWORD, SUPPORT, add_staff, seed_conversation, set_assignee
from tests.test_sandbox_browser import CHROMIUM_FLAGS, chromium  # noqa: F401 (the fixture)
from tests.thread_server import LoopCalls, in_thread, listening

pytestmark = pytest.mark.slow

T = TypeVar("T")
STEP_TIMEOUT_MS = 15_000
LIVE_TIMEOUT_MS = 1_500  # "a claim made in one browser appears in another within a second" (plus polling slack)


class ClaimingActions:
    """Claim = assign to the claimer and publish, as the handoff service does; the rest is not needed here."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def claim(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        await set_assignee(self.services, conversation_id, agent.id)
        await publish_console_event(
            self.services.redis,
            self.services.settings.redis_key_prefix,
            {"type": "claimed", "conversation_id": conversation_id, "team": agent.team, "assignee_id": agent.id},
        )
        return ActionResult.success()

    async def reply(self, conversation_id: int, agent: ConsoleUser, text: str) -> ActionResult:
        return ActionResult.refused("not in this test", "not_wired")

    async def transfer(self, conversation_id: int, agent: ConsoleUser, to_agent_id: int) -> ActionResult:
        return ActionResult.refused("not in this test", "not_wired")

    async def resolve(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        return ActionResult.refused("not in this test", "not_wired")


def open_pages(browser: Any, count: int, problems: list[str], *, height: int) -> list[Any]:
    """Pages in separate contexts (separate sessions); console errors and page errors go into `problems`."""
    pages = []
    for _ in range(count):
        context = browser.new_context(locale="zh-CN", viewport={"width": 1000, "height": height})
        page = context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        pages.append(page)
    return pages


def console_login(page: Any, server: LoopCalls, username: str) -> None:
    """Sign in through the login form and wait until the inbox's live stream is up."""
    from playwright.sync_api import expect

    page.goto(server.url("/console/inbox"))  # not signed in: sent to the login form
    expect(page).to_have_title("登录 · 客服工作台")
    page.get_by_label("用户名").fill(username)
    page.get_by_label("密码").fill(PASSWORD)
    page.get_by_role("button", name="登录").click()
    expect(page).to_have_url(server.url("/console/inbox"))
    expect(page.locator("body")).to_have_attribute("data-live", "1")  # the SSE stream is up


@dataclass
class ThreadServer(LoopCalls):
    loop: asyncio.AbstractEventLoop
    services: Services
    base_url: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def console_server(tmp_path: Path) -> Iterator[ThreadServer]:
    backend = Backend("embedded", f"sqlite+aiosqlite:///{tmp_path}/bot.sqlite3", "", "browser")
    settings = make_settings(backend, auto_migrate=True, scripts_reload_interval_s=0)
    port = _free_port()

    async def serve(ready: Callable[[ThreadServer], None], stop: asyncio.Event) -> None:
        async with open_services(settings) as services:
            app = web.Application()
            app.add_subapp("/console", create_console_app(services, actions=ClaimingActions(services)))
            async with listening(app, port):
                ready(ThreadServer(asyncio.get_running_loop(), services, f"http://127.0.0.1:{port}"))
                await stop.wait()

    with in_thread(serve, name="console-server") as server:
        yield server


def remaining_seconds(text: str) -> int:
    match = re.fullmatch(r"剩余 (\d+):(\d\d)", text.strip())
    assert match, f"not a countdown: {text!r}"
    return int(match.group(1)) * 60 + int(match.group(2))


def test_agent_sees_a_ticking_sla_and_a_claim_appears_live_elsewhere(chromium: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    problems: list[str] = []
    with console_server(tmp_path) as server, sync_playwright() as playwright:
        services = server.services
        agent_a = server.run(add_staff(services, "zhang", StaffRole.AGENT, SUPPORT))
        server.run(add_staff(services, "li", StaffRole.AGENT, SUPPORT))
        now = time.time()
        conversation = server.run(
            seed_conversation(
                services, "c1", team=SUPPORT, queued_at=now - 3, sla_due=now + 600, tags=["高价值"], reason="complaint"
            )
        )
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            first, second = open_pages(browser, 2, problems, height=700)
            first.clock.install()  # the page's clock: moved on below instead of waiting

            def login(page: Any, username: str) -> None:
                console_login(page, server, username)

            login(first, "zhang")
            row = first.locator(f'#queue tbody tr[data-id="{conversation}"]')
            expect(row).to_contain_text("客户c1")
            expect(row).to_contain_text("高价值")
            expect(row).to_contain_text("投诉")
            # The page has synced with the server's clock (after the stream opened): from here only the page's
            # own clock moves the countdown.
            expect(first.locator("body")).to_have_attribute("data-synced", re.compile(r"^[1-9]"))
            countdown = row.locator(".sla")
            expect(countdown).to_have_text(re.compile(r"剩余 \d\d:\d\d"))
            before = remaining_seconds(countdown.inner_text())
            assert 590 <= before <= 600, before
            first.clock.run_for(5_000)  # five seconds pass on the page: the countdown follows
            expect(countdown).not_to_have_text(countdown.inner_text())
            after = remaining_seconds(countdown.inner_text())
            assert before - 7 <= after <= before - 4, (before, after)

            login(second, "li")
            other_row = second.locator(f'#queue tbody tr[data-id="{conversation}"]')
            expect(other_row).to_be_visible()

            # Agent A opens the conversation and claims it; agent B's queue loses the row live.
            row.get_by_role("link", name="客户c1").click()
            expect(first.get_by_role("heading", level=1)).to_contain_text("客户c1")
            first.get_by_role("button", name="认领").click()
            expect(first.locator("#action-result")).to_have_text("已完成")
            expect(other_row).to_have_count(0, timeout=LIVE_TIMEOUT_MS)
            expect(second.locator("#queue-empty")).to_be_visible()
            assert server.run(services.repos.conversations.get_conversation(conversation)) is not None

            first.goto(server.url("/console/inbox"))
            expect(first.locator(f'#mine tbody tr[data-id="{conversation}"]')).to_contain_text("zhang 名")
            first.screenshot(path=str(tmp_path / "console.png"), full_page=True)
            assert agent_a > 0
        finally:
            browser.close()
    assert not problems, problems
