"""The WeCom chat sidebar (/sidebar) against the simulator: OAuth login mapped to staff, JS-SDK signatures over
cached tickets, the chat context (tags and the scripts that fit them) and the audited, CSRF-protected insert
record. Both backends; a fixed clock and nonce where the signature is checked."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.app import Services, open_services
from bot.sidebar import create_sidebar_app
from bot.storage.db import create_session_factory
from bot.storage.models import Customer, CustomerTag, StaffRole
from bot.wecom.simulator import SIM_STATE, ManualClock, SimulatorConfig, SimulatorState, create_simulator
from bot.wecom.simulator.api import jssdk_state, mint_oauth_code
from scripts_library import choose_variant, render
from tests.conftest import (
    TEST_AES_KEY,
    TEST_AGENT_ID,
    TEST_CORP_ID,
    TEST_KF_SECRET,
    TEST_SECRET,
    TEST_TOKEN,
    Backend,
    make_settings,
)

FIXED_NOW = 1_700_000_123.0
FIXED_NONCE = "Wm3WZYTPz0wzccnW"
VIP, NEWBIE = "wmVIPcustomer0001", "wmNEWcustomer0001"
GROUP = "wrGROUPchat000001"
MEMBERS = ("zhangsan", "lisi", "wangwu")


class FixedClock:
    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t


async def seed_customer(services: Services, external_id: str, name: str | None, tags: dict[str, list[str]]) -> int:
    at = datetime.fromtimestamp(FIXED_NOW, UTC)
    sessions = create_session_factory(services.engine)
    async with sessions.begin() as session:
        row = Customer(channel="contact", external_id=external_id, name=name, first_seen_at=at, last_seen_at=at)
        session.add(row)
        await session.flush()
        for source, names in tags.items():
            for tag in names:
                session.add(CustomerTag(customer_id=row.id, tag=tag, source=source, set_at=at))
        return row.id


@dataclass
class Sidebar:
    services: Services
    sim: SimulatorState
    server: TestServer
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")

    def browser(self) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(base_url=self.origin + "/", cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sessions.append(session)
        return session

    def calls(self, path: str) -> int:
        return sum(1 for c in self.sim.calls if c.path == path)

    async def start_login(self, browser: aiohttp.ClientSession, path: str = "/sidebar/") -> dict[str, str]:
        """Open the page unauthenticated: WeCom's OAuth URL and its query."""
        response = await browser.get(path, allow_redirects=False)
        assert response.status == 302, await response.text()
        location = response.headers["Location"]
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://open.weixin.qq.com/connect/oauth2/authorize"
        assert parts.fragment == "wechat_redirect"
        return {k: v[0] for k, v in parse_qs(parts.query).items()}

    async def login(self, userid: str = "zhangsan") -> tuple[aiohttp.ClientSession, str]:
        """The full OAuth round trip for a member; returns the browser and its CSRF token."""
        browser = self.browser()
        query = await self.start_login(browser)
        code = mint_oauth_code(self.sim, userid=userid).code
        response = await browser.get(
            "/sidebar/oauth/callback", params={"code": code, "state": query["state"]}, allow_redirects=False
        )
        assert response.status == 302, await response.text()
        assert response.headers["Location"] == "/sidebar/"
        page = await browser.get("/sidebar/")
        assert page.status == 200
        text = await page.text()
        csrf = text.split('data-csrf="', 1)[1].split('"', 1)[0]
        return browser, csrf


@pytest.fixture
async def sidebar(backend: Backend) -> AsyncIterator[Sidebar]:
    sim_config = SimulatorConfig(
        corp_id=TEST_CORP_ID,
        agent_id=TEST_AGENT_ID,
        token=TEST_TOKEN,
        aes_key=TEST_AES_KEY,
        secrets={TEST_SECRET: "app", TEST_KF_SECRET: "kf"},
        members=MEMBERS,
    )
    sim_app = create_simulator(sim_config, ManualClock(FIXED_NOW))
    sim_server = TestServer(sim_app, host="127.0.0.1")
    await sim_server.start_server()
    settings = make_settings(
        backend,
        wecom_api_base=str(sim_server.make_url("")).rstrip("/"),
        auto_migrate=True,
        scripts_reload_interval_s=0,
    )
    try:
        async with open_services(settings) as services:
            await services.repos.staff.add_user(
                "zhang", StaffRole.AGENT, display_name="张客服", team="售后", wecom_userid="zhangsan"
            )
            await services.repos.staff.add_user("wang", StaffRole.AGENT, display_name="王客服", wecom_userid="wangwu")
            await services.repos.staff.set_active("wang", False)
            app = web.Application()
            app.add_subapp(
                "/sidebar",
                create_sidebar_app(services, clock=FixedClock(FIXED_NOW), nonce=lambda: FIXED_NONCE),
            )
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            sidebar = Sidebar(services, sim_app[SIM_STATE], server)
            try:
                yield sidebar
            finally:
                for session in sidebar.sessions:
                    await session.close()
                await server.close()
    finally:
        await sim_server.close()


# ------------------------------------------------------------------------------------------------ login


async def test_oauth_login_maps_the_member_to_staff_and_is_audited(sidebar: Sidebar) -> None:
    anonymous = sidebar.browser()
    response = await anonymous.get("/sidebar/api/context", params={"external_userid": VIP})
    assert response.status == 401 and (await response.json())["error"] == "unauthenticated"

    query = await sidebar.start_login(anonymous, "/sidebar/?from=toolbar")
    assert query["appid"] == TEST_CORP_ID and query["agentid"] == str(TEST_AGENT_ID)
    assert query["scope"] == "snsapi_base" and query["response_type"] == "code"
    assert query["redirect_uri"] == sidebar.origin + "/sidebar/oauth/callback"
    code = mint_oauth_code(sidebar.sim, userid="zhangsan").code
    response = await anonymous.get(
        "/sidebar/oauth/callback", params={"code": code, "state": query["state"]}, allow_redirects=False
    )
    assert response.status == 302 and response.headers["Location"] == "/sidebar/?from=toolbar"
    cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("wcb_sidebar="))
    assert "HttpOnly" in cookie and "Path=/sidebar" in cookie and "SameSite=Lax" in cookie
    page = await anonymous.get("/sidebar/")
    text = await page.text()
    assert page.status == 200 and "张客服" in text
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self' https://res.wx.qq.com https://open.work.weixin.qq.com;" in csp
    assert "'unsafe-inline'" not in csp
    assert "https://res.wx.qq.com/open/js/jweixin-1.2.0.js" in text
    assert "https://open.work.weixin.qq.com/wwopen/js/jwxwork-1.0.0.js" in text
    [entry] = [e for e in await sidebar.services.repos.audit.recent() if e.action == "sidebar.login"]
    assert entry.actor == "zhang" and entry.detail == {"wecom_userid": "zhangsan"}

    # The code is single-use, and a state is good for one callback only.
    again = sidebar.browser()
    query = await sidebar.start_login(again)
    response = await again.get("/sidebar/oauth/callback", params={"code": code, "state": query["state"]})
    assert response.status == 403 and "登录码无效或已过期" in await response.text()
    response = await again.get("/sidebar/oauth/callback", params={"code": code, "state": query["state"]})
    assert response.status == 400 and "登录已过期" in await response.text()
    errcodes = [c.errcode for c in sidebar.sim.calls if c.path == "/cgi-bin/auth/getuserinfo"]
    assert errcodes == [0, 40029]


async def test_a_forged_state_is_refused(sidebar: Sidebar) -> None:
    browser = sidebar.browser()
    await sidebar.start_login(browser)
    code = mint_oauth_code(sidebar.sim, userid="zhangsan").code
    response = await browser.get("/sidebar/oauth/callback", params={"code": code, "state": "attacker-state"})
    assert response.status == 400 and "登录已过期" in await response.text()
    assert sidebar.calls("/cgi-bin/auth/getuserinfo") == 0


async def test_unknown_disabled_and_outside_members_are_refused(sidebar: Sidebar) -> None:
    for who, expected in (
        ({"userid": "lisi"}, "未绑定客服系统账号或已停用"),  # a member without a staff account
        ({"userid": "wangwu"}, "未绑定客服系统账号或已停用"),  # a staff account that is disabled
        ({"openid": "oUTSIDER0001"}, "仅限本企业成员使用"),  # not a member of the corp at all
    ):
        browser = sidebar.browser()
        query = await sidebar.start_login(browser)
        code = mint_oauth_code(sidebar.sim, **who).code
        response = await browser.get(
            "/sidebar/oauth/callback", params={"code": code, "state": query["state"]}, allow_redirects=False
        )
        assert response.status == 403
        assert expected in await response.text()
        assert not any(c.key == "wcb_sidebar" for c in browser.cookie_jar)
    refused = [e for e in await sidebar.services.repos.audit.recent() if e.action == "sidebar.login_refused"]
    assert len(refused) == 3


# ------------------------------------------------------------------------------------------------ JS-SDK


async def test_jssdk_config_signs_with_the_documented_sha1_and_caches_tickets(sidebar: Sidebar) -> None:
    browser, _ = await sidebar.login()
    page_url = sidebar.origin + "/sidebar/?from=toolbar"
    response = await browser.get("/sidebar/api/jssdk-config", params={"url": page_url + "#section"})
    assert response.status == 200
    config = await response.json()
    sdk = jssdk_state(sidebar.sim)
    assert sdk.corp_ticket is not None
    [agent] = sdk.agent_tickets.values()
    corp_ticket, agent_ticket = sdk.corp_ticket.ticket, agent.ticket
    assert corp_ticket != agent_ticket

    def expected(ticket: str) -> str:  # the documented algorithm, spelled out here on its own
        plain = f"jsapi_ticket={ticket}&noncestr={FIXED_NONCE}&timestamp={int(FIXED_NOW)}&url={page_url}"
        return hashlib.sha1(plain.encode()).hexdigest()  # noqa: S324 - WeCom's algorithm

    assert config == {
        "corpid": TEST_CORP_ID,
        "agentid": TEST_AGENT_ID,
        "timestamp": int(FIXED_NOW),
        "nonceStr": FIXED_NONCE,
        "signature": expected(corp_ticket),
        "agentSignature": expected(agent_ticket),
        "jsApiList": ["getContext", "getCurExternalContact", "getCurExternalChat", "sendChatMessage"],
    }

    # A second page load reuses both cached tickets: WeCom was asked once for each.
    response = await browser.get("/sidebar/api/jssdk-config", params={"url": page_url})
    assert response.status == 200 and (await response.json())["signature"] == expected(corp_ticket)
    assert sidebar.calls("/cgi-bin/get_jsapi_ticket") == 1
    assert sidebar.calls("/cgi-bin/ticket/get") == 1


async def test_jssdk_config_refuses_urls_of_other_origins(sidebar: Sidebar) -> None:
    browser, _ = await sidebar.login()
    port = urlsplit(sidebar.origin).port
    for url in (
        "https://evil.example.com/sidebar/",
        f"http://evil.example.com:{port}/sidebar/",
        f"https://127.0.0.1:{port}/sidebar/",  # same host, other scheme
        "/sidebar/",
        "javascript:alert(1)",
        "",
    ):
        response = await browser.get("/sidebar/api/jssdk-config", params={"url": url})
        assert response.status == 400, url
        assert (await response.json())["error"] in ("foreign_url", "bad_url")
    assert sidebar.calls("/cgi-bin/get_jsapi_ticket") == 0


# ------------------------------------------------------------------------------------------------ context


async def test_context_lists_tags_and_the_variant_each_customer_gets(sidebar: Sidebar) -> None:
    services = sidebar.services
    await seed_customer(services, VIP, "王先生", {"computed": ["高价值"], "wecom": ["老客户"]})
    await seed_customer(services, NEWBIE, "李女士", {"computed": ["新用户"]})
    browser, _ = await sidebar.login()
    library = services.scripts.library

    async def context(**params: str) -> dict[str, Any]:
        response = await browser.get("/sidebar/api/context", params=params)
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    vip = await context(external_userid=VIP)
    assert vip["tags"] == ["老客户", "高价值"] and vip["name"] == "王先生" and vip["known"] is True
    assert vip["tags_by_source"] == {"computed": ["高价值"], "wecom": ["老客户"]}
    newbie = await context(external_userid=NEWBIE)
    assert newbie["tags"] == ["新用户"]

    vip_scripts = {s["id"]: s for s in vip["scripts"]}
    new_scripts = {s["id"]: s for s in newbie["scripts"]}
    assert vip_scripts["price.product"]["variant"] == "vip"
    assert new_scripts["price.product"]["variant"] == "first_order"
    # exactly what the renderer makes for this customer: name filled, the staff member as agent_name
    script = library.get("price.product")
    assert script is not None
    variant, _ = choose_variant(script, frozenset({"高价值", "老客户"}), VIP)
    [rendered] = render(library, script, variant, {"customer_name": "王先生", "agent_name": "张客服"})
    assert vip_scripts["price.product"]["texts"] == [rendered.content["content"]]
    assert vip_scripts["price.product"]["texts"][0].startswith("王先生您好")
    # the newcomer's price answer carries a link: not insertable as text, and said so
    assert "price.inquiry" not in new_scripts
    [skip] = [s for s in newbie["skipped"] if s["id"] == "price.inquiry"]
    assert skip["variant"] == "first_order" and "链接" in skip["reason"]
    assert vip_scripts["price.inquiry"]["variant"] == "vip_advisor"
    # audience: the win-back script is only for 沉默/流失 customers
    assert "price.winback_silent" not in vip_scripts and "price.winback_silent" not in new_scripts
    # ranked as the matcher ranks (priority, then audience strictness, then id)
    ranked = [library.get(s["id"]) for s in vip["scripts"]]
    keys = [(-s.priority, -s.audience.strictness, s.id) for s in ranked if s is not None]
    assert keys == sorted(keys)

    # a search runs the matcher on the text: the price script comes first for 多少钱
    searched = await context(external_userid=VIP, q="这个多少钱")
    assert searched["scripts"][0]["id"] == "price.inquiry" and searched["scripts"][0]["matched"] == "trigger"
    assert all(s["matched"] in ("trigger", "text") for s in searched["scripts"])

    # a customer group with no tags of its own gets the default audience; no customer name is filled in
    group = await context(chat_id=GROUP)
    assert group["kind"] == "group" and group["tags"] == [] and group["audience"] == "default"
    group_scripts = {s["id"]: s for s in group["scripts"]}
    assert group_scripts["price.product"]["variant"] == "default"
    unknown = await context(external_userid="wmSOMEONEnew00001")
    assert unknown["known"] is False and unknown["tags"] == []

    for bad in (
        {},
        {"external_userid": VIP, "chat_id": GROUP},
        {"external_userid": "<script>"},
        {"external_userid": VIP, "q": "x" * 101},
    ):
        response = await browser.get("/sidebar/api/context", params=bad)
        assert response.status == 400, bad


# ------------------------------------------------------------------------------------------------ insert record


async def test_insert_record_is_csrf_protected_validated_and_audited(sidebar: Sidebar) -> None:
    browser, csrf = await sidebar.login()
    body = {"script_id": "price.product", "variant": "vip", "chat": "group", "chat_id": GROUP, "ok": True}
    for headers in ({}, {"X-CSRF-Token": "not-the-token"}):
        response = await browser.post("/sidebar/api/inserted", json=body, headers=headers)
        assert response.status == 403 and (await response.json())["error"] == "csrf"
    _other, other_csrf = await sidebar.login()
    response = await browser.post("/sidebar/api/inserted", json=body, headers={"X-CSRF-Token": other_csrf})
    assert response.status == 403  # another session's token is no good either
    assert not [e for e in await sidebar.services.repos.audit.recent() if e.action == "sidebar.inserted"]

    response = await browser.post("/sidebar/api/inserted", json=body, headers={"X-CSRF-Token": csrf})
    assert response.status == 200 and await response.json() == {"ok": True}
    for bad, status in (
        ({"script_id": "no.such.script"}, 404),
        ({"variant": "no_such_variant"}, 404),
        ({"chat": "channel"}, 400),
        ({"ok": "yes"}, 400),
    ):
        response = await browser.post("/sidebar/api/inserted", json={**body, **bad}, headers={"X-CSRF-Token": csrf})
        assert response.status == status, bad
    [entry] = [e for e in await sidebar.services.repos.audit.recent() if e.action == "sidebar.inserted"]
    assert entry.actor == "zhang" and entry.target == "script:price.product"
    assert entry.detail == {"variant": "vip", "chat": "group", "chat_id": GROUP, "ok": True}
    counts = await sidebar.services.redis.hgetall(f"{sidebar.services.settings.redis_key_prefix}:sidebar:inserted")
    assert {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in counts.items()} == {
        "price.product|vip|group": 1
    }
    # logged out (no session): refused before anything else
    response = await sidebar.browser().post("/sidebar/api/inserted", json=body, headers={"X-CSRF-Token": csrf})
    assert response.status == 401
