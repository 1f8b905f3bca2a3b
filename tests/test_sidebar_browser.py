"""The chat sidebar in a real headless Chromium with a stubbed WeCom JS-SDK: the member logs in through WeCom
OAuth (a stand-in authorize page), the page configures the SDK, reads the chat context, lists the customer's tags
and scripts, and one click inserts a script: the stub receives `sendChatMessage` with exactly the rendered text,
and the insert is recorded server-side.

WeCom's authorize page is served by the test (the sidebar's authorize URL is configurable; the real one is checked
in tests/test_sidebar.py). The bot and the simulator run in a thread of this process (aiohttp on its own loop,
SQLite and in-process Redis). No sleeps: every wait is a Playwright expectation with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from aiohttp import web

from bot.app import Services, open_services
from bot.sidebar import create_sidebar_app
from bot.storage.db import create_session_factory
from bot.storage.models import Customer, CustomerTag, StaffRole
from bot.wecom.simulator import SIM_STATE, SimulatorConfig, SimulatorState, create_simulator
from bot.wecom.simulator.api import jssdk_state, mint_oauth_code
from scripts_library import choose_variant, render
from tests.conftest import TEST_AES_KEY, TEST_AGENT_ID, TEST_CORP_ID, TEST_SECRET, TEST_TOKEN, Backend, make_settings
from tests.test_console_browser import _free_port
from tests.test_sandbox_browser import CHROMIUM_FLAGS, chromium  # noqa: F401 (the fixture)
from tests.thread_server import LoopCalls, in_thread, listening

pytestmark = pytest.mark.slow

T = TypeVar("T")
STEP_TIMEOUT_MS = 15_000
CUSTOMER = "wmVIPbrowser00001"

# A stand-in for WeCom's JS-SDK: answers like the WeCom client would inside a 1:1 chat with CUSTOMER and records
# every call on window.__wwCalls.
STUB_SDK = """
(function () {
  var calls = window.__wwCalls = [];
  function later(fn, value) { setTimeout(function () { fn(value); }, 0); }
  window.ww = {
    agentConfig: function (options) {
      calls.push({api: "agentConfig", params: {corpid: options.corpid, agentid: options.agentid,
        timestamp: options.timestamp, nonceStr: options.nonceStr, signature: options.signature,
        jsApiList: options.jsApiList}, url: location.href.split("#")[0]});
      later(options.success, {errMsg: "agentConfig:ok"});
    },
    invoke: function (name, params, callback) {
      calls.push({api: name, params: params});
      if (name === "getContext") {
        later(callback, {err_msg: "getContext:ok", entry: "single_chat_tools", shareTicket: ""});
      } else if (name === "getCurExternalContact") {
        later(callback, {err_msg: "getCurExternalContact:ok", userId: "%CUSTOMER%"});
      } else if (name === "sendChatMessage") {
        later(callback, {err_msg: "sendChatMessage:ok"});
      } else {
        later(callback, {err_msg: name + ":fail not stubbed"});
      }
    }
  };
})();
""".replace("%CUSTOMER%", CUSTOMER)


@dataclass
class ThreadServer(LoopCalls):
    loop: asyncio.AbstractEventLoop
    services: Services
    sim: SimulatorState
    base_url: str
    oauth_requests: list[tuple[str, str, str]]


async def _stub_sdk(request: web.Request) -> web.Response:
    return web.Response(text=STUB_SDK, content_type="text/javascript", charset="utf-8")


def _stub_oauth(sim: SimulatorState, seen: list[tuple[str, str, str]]) -> Any:
    """WeCom's authorize page for a member signed in to the client: it redirects straight back with a code (minted
    by the simulator, which getuserinfo then redeems). Chromium here does not let a test intercept the real host
    on a redirect, so the sidebar's configurable authorize URL points at this stand-in."""

    async def handler(request: web.Request) -> web.Response:
        query = request.query
        seen.append(("zhangsan", query["appid"], query["scope"]))
        code = mint_oauth_code(sim, userid="zhangsan").code
        raise web.HTTPFound(query["redirect_uri"] + "?" + urlencode({"code": code, "state": query["state"]}))

    return handler


@contextlib.contextmanager
def sidebar_server(tmp_path: Path) -> Iterator[ThreadServer]:
    port, sim_port = _free_port(), _free_port()
    backend = Backend("embedded", f"sqlite+aiosqlite:///{tmp_path}/bot.sqlite3", "", "sidebar-browser")
    settings = make_settings(
        backend, wecom_api_base=f"http://127.0.0.1:{sim_port}", auto_migrate=True, scripts_reload_interval_s=0
    )
    sim_config = SimulatorConfig(
        corp_id=TEST_CORP_ID,
        agent_id=TEST_AGENT_ID,
        token=TEST_TOKEN,
        aes_key=TEST_AES_KEY,
        secrets={TEST_SECRET: "app"},
        members=("zhangsan", "lisi"),
    )

    async def serve(ready: Callable[[ThreadServer], None], stop: asyncio.Event) -> None:
        sim_app = create_simulator(sim_config)
        async with listening(sim_app, sim_port), open_services(settings) as services:
            base = f"http://127.0.0.1:{port}"
            app = web.Application()
            sim = sim_app[SIM_STATE]
            seen: list[tuple[str, str, str]] = []
            app.router.add_get("/stub/jwxwork.js", _stub_sdk)  # served by the test, not by the sidebar
            app.router.add_get("/stub/oauth2/authorize", _stub_oauth(sim, seen))
            sidebar = create_sidebar_app(
                services,
                jssdk_urls=(base + "/stub/jwxwork.js",),
                oauth_authorize_url=base + "/stub/oauth2/authorize",
            )
            app.add_subapp("/sidebar", sidebar)
            async with listening(app, port):
                ready(ThreadServer(asyncio.get_running_loop(), services, sim, base, seen))
                await stop.wait()

    with in_thread(serve, name="sidebar-server") as server:
        yield server


async def _seed(services: Services) -> None:
    await services.repos.staff.add_user(
        "zhang", StaffRole.AGENT, display_name="张客服", team="售后", wecom_userid="zhangsan"
    )
    at = datetime.now(UTC)
    async with create_session_factory(services.engine).begin() as session:
        row = Customer(channel="contact", external_id=CUSTOMER, name="王先生", first_seen_at=at, last_seen_at=at)
        session.add(row)
        await session.flush()
        session.add(CustomerTag(customer_id=row.id, tag="高价值", source="computed", set_at=at))
        session.add(CustomerTag(customer_id=row.id, tag="老客户", source="wecom", set_at=at))


def test_sidebar_lists_scripts_and_inserts_one_through_the_js_sdk(chromium: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    problems: list[str] = []
    with sidebar_server(tmp_path) as server, sync_playwright() as playwright:
        services = server.services
        server.run(_seed(services))
        library = services.scripts.library
        script = library.get("price.product")
        assert script is not None
        variant, _ = choose_variant(script, frozenset({"高价值", "老客户"}), CUSTOMER)
        [rendered] = render(library, script, variant, {"customer_name": "王先生", "agent_name": "张客服"})
        expected_text = rendered.content["content"]
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(locale="zh-CN", viewport={"width": 360, "height": 700})
            page = context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

            page.goto(server.url("/sidebar/"))
            # a browser carries the authorize URL's #wechat_redirect along the redirects, as in the WeCom client;
            # the page signs its URL without the fragment
            expect(page).to_have_url(re.compile(re.escape(server.url("/sidebar/")) + "(#wechat_redirect)?$"))
            assert server.oauth_requests == [("zhangsan", TEST_CORP_ID, "snsapi_base")]
            expect(page.locator("#subject-title")).to_have_text("客户：王先生")
            expect(page.locator("#tags .tag")).to_have_text(["老客户", "高价值"])
            item = page.locator('#scripts li[data-script="price.product"]')
            expect(item).to_have_attribute("data-variant", "vip")
            expect(item.locator(".text")).to_have_text(expected_text)
            expect(page.locator("#status")).to_be_hidden()

            # agentConfig got the app ticket's signature for exactly this page URL
            [agent_config] = page.evaluate("window.__wwCalls.filter(c => c.api === 'agentConfig')")
            ticket = next(iter(jssdk_state(server.sim).agent_tickets.values())).ticket
            plain = (
                f"jsapi_ticket={ticket}&noncestr={agent_config['params']['nonceStr']}"
                f"&timestamp={agent_config['params']['timestamp']}&url={agent_config['url']}"
            )
            signature = hashlib.sha1(plain.encode()).hexdigest()  # noqa: S324 - WeCom's algorithm
            assert agent_config["params"]["signature"] == signature
            assert agent_config["params"]["corpid"] == TEST_CORP_ID
            assert "sendChatMessage" in agent_config["params"]["jsApiList"]

            item.get_by_role("button", name="发送到聊天").click()
            expect(page.locator("#result")).to_have_text(f"已发送：{script.title}")
            sent = page.evaluate("window.__wwCalls.filter(c => c.api === 'sendChatMessage').map(c => c.params)")
            assert sent == [{"msgtype": "text", "enterChat": False, "text": {"content": expected_text}}]

            entries = server.run(services.repos.audit.recent())
            [entry] = [e for e in entries if e.action == "sidebar.inserted"]
            assert entry.actor == "zhang" and entry.target == "script:price.product"
            assert entry.detail == {"variant": "vip", "chat": "single", "chat_id": CUSTOMER, "ok": True}

            # the search box narrows the list with the matcher: a price question puts the price script first
            page.locator("#search").fill("这个多少钱")
            expect(page.locator("#scripts li").first).to_have_attribute("data-script", "price.inquiry")
        finally:
            browser.close()
    assert problems == []
