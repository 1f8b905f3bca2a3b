"""The agent console (/console): login, sessions, CSRF, visibility by team, the inbox JSON, the action port and
live updates over SSE fanned out through Redis pub/sub. Both backends; an injected clock where time matters."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.app import Services, create_app, open_services
from bot.console import ActionResult, ConsoleUser, create_console_app, publish_console_event
from bot.console.passwords import hash_password, needs_rehash, verify_password
from bot.console.sessions import ConsoleKeys
from bot.storage.console_repository import ConsoleRepository
from bot.storage.db import create_session_factory
from bot.storage.models import (
    Conversation,
    Customer,
    CustomerTag,
    Message,
    SlaClockRow,
    SlaEventRow,
    StaffRole,
)
from tests.conftest import REAL_REDIS_URL, Backend, make_settings

PASSWORD = "correct horse battery"
PASSWORD_HASH = hash_password(PASSWORD)  # once: scrypt is slow on purpose
SALES, SUPPORT = "售前", "售后"


class FakeClock:
    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# ------------------------------------------------------------------------------------------------ seeding


async def add_staff(
    services: Services, username: str, role: StaffRole, team: str | None, *, password: str | None = PASSWORD
) -> int:
    user = await services.repos.staff.add_user(username, role, team=team, display_name=f"{username} 名")
    if password is not None:
        repo = ConsoleRepository(create_session_factory(services.engine))
        await repo.set_password_hash(username, PASSWORD_HASH if password == PASSWORD else hash_password(password))
    return user.id


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


async def seed_conversation(
    services: Services,
    customer: str,
    *,
    team: str | None,
    status: str = "queued",
    queued_at: float,
    assignee_id: int | None = None,
    tags: Iterable[str] = (),
    sla_due: float | None = None,
    reason: str = "customer_request",
    messages: Iterable[tuple[str, str, int | None]] = (),
) -> int:
    """One customer with a conversation in the given state, its tags, a running first-response clock due at
    `sla_due`, and messages (direction, text, origin); returns the conversation id."""
    sessions = create_session_factory(services.engine)
    at = _utc(queued_at)
    async with sessions.begin() as session:
        row = Customer(channel="kf", external_id=customer, name=f"客户{customer}", first_seen_at=at, last_seen_at=at)
        session.add(row)
        await session.flush()
        conversation = Conversation(
            channel="kf",
            account_id="wkACCOUNT",
            customer_id=row.id,
            status=status,
            opened_at=at,
            updated_at=at,
            team=team,
            handoff_reason=reason,
            handoff_at=at,
            queued_at=at,
            assignee_id=assignee_id,
            assigned_at=at if assignee_id else None,
        )
        session.add(conversation)
        await session.flush()
        for tag in tags:
            session.add(CustomerTag(customer_id=row.id, tag=tag, source="computed", set_at=at))
        if sla_due is not None:
            session.add(
                SlaClockRow(
                    conversation_id=conversation.id,
                    kind="first_response",
                    cycle=0,
                    policy_id="default",
                    target_seconds=sla_due - queued_at,
                    started_at=queued_at,
                    ladder=[["warned", 0, queued_at + (sla_due - queued_at) * 0.8], ["breached", 1, sla_due]],
                    reached=0,
                    status="running",
                    next_deadline=queued_at + (sla_due - queued_at) * 0.8,
                )
            )
        for index, (direction, text, origin) in enumerate(messages):
            session.add(
                Message(
                    channel="kf",
                    wecom_msgid=f"{customer}-{index}",
                    direction=direction,
                    customer_id=row.id,
                    conversation_id=conversation.id,
                    account_id="wkACCOUNT",
                    msgtype="text",
                    text=text,
                    payload={},
                    origin=origin,
                    status="handled",
                    created_at=at,
                    received_at=at,
                )
            )
        return conversation.id


async def set_assignee(services: Services, conversation_id: int, assignee_id: int, status: str = "open") -> None:
    sessions = create_session_factory(services.engine)
    async with sessions.begin() as session:
        row = await session.get(Conversation, conversation_id)
        assert row is not None
        row.assignee_id = assignee_id
        row.status = status
        row.version += 1


# ------------------------------------------------------------------------------------------------ harness


class Browser:
    """One person's browser: its own cookie jar, logged in (or not) as one account."""

    def __init__(self, server: TestServer) -> None:
        self.session = aiohttp.ClientSession(
            base_url=str(server.make_url("/")), cookie_jar=aiohttp.CookieJar(unsafe=True)
        )
        self.csrf = ""

    async def login(self, username: str, password: str = PASSWORD, **extra: str) -> aiohttp.ClientResponse:
        page = await self.session.get("/console/login")
        token = re.search(r'name="csrf" value="([^"]+)"', await page.text())
        assert token is not None
        data = {"csrf": token.group(1), "username": username, "password": password, **extra}
        response = await self.session.post("/console/login", data=data, allow_redirects=False)
        if response.status == 303:
            inbox = await self.session.get("/console/inbox")
            found = re.search(r'data-csrf="([^"]+)"', await inbox.text())
            assert found is not None
            self.csrf = found.group(1)
        return response

    async def get_json(self, path: str) -> tuple[int, Any]:
        response = await self.session.get(path, headers={"Accept": "application/json"})
        return response.status, await response.json()

    async def act(
        self, conversation_id: int | str, action: str, body: dict[str, Any] | None = None, *, csrf: str | None = None
    ) -> tuple[int, Any]:
        headers = {"X-CSRF-Token": self.csrf if csrf is None else csrf}
        response = await self.session.post(
            f"/console/api/conversations/{conversation_id}/{action}", json=body or {}, headers=headers
        )
        return response.status, await response.json()

    async def close(self) -> None:
        await self.session.close()


@dataclass
class RecordingActions:
    """A ConsoleActions that records calls (stands in for the handoff service)."""

    calls: list[tuple[str, int, str, Any]] = field(default_factory=list)
    answer: ActionResult = field(default_factory=ActionResult.success)

    async def claim(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        self.calls.append(("claim", conversation_id, agent.username, None))
        return self.answer

    async def reply(self, conversation_id: int, agent: ConsoleUser, text: str) -> ActionResult:
        self.calls.append(("reply", conversation_id, agent.username, text))
        return self.answer

    async def transfer(self, conversation_id: int, agent: ConsoleUser, to_agent_id: int) -> ActionResult:
        self.calls.append(("transfer", conversation_id, agent.username, to_agent_id))
        return self.answer

    async def resolve(self, conversation_id: int, agent: ConsoleUser) -> ActionResult:
        self.calls.append(("resolve", conversation_id, agent.username, None))
        return self.answer


@dataclass
class Console:
    services: Services
    server: TestServer
    clock: FakeClock
    staff: dict[str, int]
    browsers: list[Browser] = field(default_factory=list)

    def browser(self) -> Browser:
        browser = Browser(self.server)
        self.browsers.append(browser)
        return browser

    async def logged_in(self, username: str) -> Browser:
        browser = self.browser()
        response = await browser.login(username)
        assert response.status == 303, await response.text()
        return browser


async def _console(backend: Backend, *, actions: Any = None, **settings: Any) -> AsyncIterator[Console]:
    clock = FakeClock(time.time())
    config = make_settings(backend, auto_migrate=True, scripts_reload_interval_s=0, **settings)
    async with open_services(config) as services:
        staff = {
            "agent": await add_staff(services, "agent", StaffRole.AGENT, SUPPORT),
            "agent2": await add_staff(services, "agent2", StaffRole.AGENT, SUPPORT),
            "sales": await add_staff(services, "sales", StaffRole.AGENT, SALES),
            "lead": await add_staff(services, "lead", StaffRole.LEAD, SUPPORT),
            "admin": await add_staff(services, "admin", StaffRole.ADMIN, None),
            "community": await add_staff(services, "community", StaffRole.COMMUNITY, None),
            "tokens-only": await add_staff(services, "tokens-only", StaffRole.AGENT, SUPPORT, password=None),
        }
        app = web.Application()
        app.add_subapp("/console", create_console_app(services, actions=actions, clock=clock, heartbeat_s=0.2))
        server = TestServer(app)
        await server.start_server()
        console = Console(services, server, clock, staff)
        try:
            yield console
        finally:
            for browser in console.browsers:
                await browser.close()
            await server.close()


@pytest.fixture
async def console(backend: Backend) -> AsyncIterator[Console]:
    async for value in _console(backend):
        yield value


# ------------------------------------------------------------------------------------------------ passwords


def test_password_hashes_are_salted_self_describing_and_verified() -> None:
    first, second = hash_password("s3cret-password"), hash_password("s3cret-password")
    assert first != second and first.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret-password", first) and verify_password("s3cret-password", second)
    assert not verify_password("s3cret-passwore", first)
    assert not verify_password("s3cret-password", None)
    assert not verify_password("s3cret-password", "scrypt$broken")
    assert not verify_password("s3cret-password", "md5$x$y$z$a$b")
    assert not needs_rehash(first) and needs_rehash("scrypt$1024$8$1$AA$AA")


# ------------------------------------------------------------------------------------------------ login


async def test_login_sets_a_session_cookie_and_is_audited(console: Console) -> None:
    browser = console.browser()
    response = await browser.login("agent", next="/console/conversations/1")
    assert response.status == 303 and response.headers["Location"] == "/console/conversations/1"
    cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("wcb_console="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # BOT_PUBLIC_URL is not https here
    status, inbox = await browser.get_json("/console/api/inbox")
    assert status == 200 and inbox["queue"] == []
    [entry] = [e for e in await console.services.repos.audit.recent() if e.action == "console.login"]
    assert entry.actor == "agent"

    # An open redirect through `next` is refused.
    other = console.browser()
    response = await other.login("agent2", next="//evil.example.com/")
    assert response.headers["Location"] == "/console/inbox"


async def test_session_cookie_is_secure_when_the_public_url_is_https(backend: Backend) -> None:
    async for console in _console(backend, bot_public_url="https://bot.example.com"):
        session = console.browser().session
        form = await session.get("/console/login")
        assert "Secure" in form.headers["Set-Cookie"]
        token = form.cookies["wcb_console_login"].value  # a plain-http test client keeps no Secure cookie itself
        response = await session.post(
            "/console/login",
            data={"csrf": token, "username": "agent", "password": PASSWORD},
            headers={"Cookie": f"wcb_console_login={token}"},
            allow_redirects=False,
        )
        assert response.status == 303
        cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("wcb_console="))
        assert "Secure" in cookie and "HttpOnly" in cookie


async def test_bad_password_unknown_user_and_no_password_are_refused_alike(console: Console) -> None:
    for username, password in (("agent", "wrong password!"), ("nobody", PASSWORD), ("tokens-only", PASSWORD)):
        browser = console.browser()
        response = await browser.login(username, password)
        assert response.status == 401
        assert "用户名或密码错误" in await response.text()
        assert "wcb_console=" not in "".join(response.headers.getall("Set-Cookie", []))
        assert (await browser.get_json("/console/api/inbox"))[0] == 401
    failures = [e for e in await console.services.repos.audit.recent() if e.action == "console.login_failed"]
    assert sorted(e.detail["reason"] for e in failures) == ["bad_password", "no_password", "unknown_user"]
    assert PASSWORD not in json.dumps([e.detail for e in failures]) and "wrong password!" not in str(failures)


async def test_a_disabled_account_cannot_log_in_and_its_sessions_stop(console: Console) -> None:
    browser = await console.logged_in("agent")
    await console.services.repos.staff.set_active("agent", False)
    assert (await browser.get_json("/console/api/inbox"))[0] == 401  # the live session stops at once
    response = await console.browser().login("agent")
    assert response.status == 403 and "账号已停用" in await response.text()


async def test_failed_logins_are_rate_limited_per_username_and_address(console: Console) -> None:
    browser = console.browser()
    for _ in range(5):
        assert (await browser.login("agent", "wrong password!")).status == 401
    response = await browser.login("agent")  # the right password, too late
    assert response.status == 429 and "次数过多" in await response.text()
    assert (await console.browser().login("agent2")).status == 303  # another username is not affected
    blocked = [e for e in await console.services.repos.audit.recent() if e.action == "console.login_blocked"]
    assert len(blocked) == 1


async def test_a_success_clears_the_failure_count(console: Console) -> None:
    browser = console.browser()
    for _ in range(4):
        await browser.login("agent", "wrong password!")
    assert (await browser.login("agent")).status == 303
    for _ in range(4):
        assert (await console.browser().login("agent", "wrong password!")).status == 401
    assert (await console.browser().login("agent")).status == 303


# ------------------------------------------------------------------------------------------------ sessions


async def test_sessions_expire_when_idle_and_at_their_absolute_limit(console: Console) -> None:
    idle = await console.logged_in("agent")
    console.clock.advance(7 * 3600)
    assert (await idle.get_json("/console/api/inbox"))[0] == 200  # used within 8 h: still alive
    console.clock.advance(8 * 3600 + 1)
    status, body = await idle.get_json("/console/api/inbox")
    assert status == 401 and body["error"] == "unauthenticated"
    page = await idle.session.get("/console/inbox", allow_redirects=False)
    assert page.status == 303 and page.headers["Location"].startswith("/console/login?next=/console/inbox")

    busy = await console.logged_in("agent2")
    for _ in range(23):  # used every hour, never idle ...
        console.clock.advance(3600)
        assert (await busy.get_json("/console/api/inbox"))[0] == 200
    console.clock.advance(3600 + 1)  # ... but 24 h after login it ends anyway
    assert (await busy.get_json("/console/api/inbox"))[0] == 401


async def test_logout_ends_the_session(console: Console) -> None:
    browser = await console.logged_in("agent")
    cookie = browser.session.cookie_jar.filter_cookies(console.server.make_url("/console/"))["wcb_console"].value
    response = await browser.session.post("/console/logout", data={"csrf": browser.csrf}, allow_redirects=False)
    assert response.status == 303
    again = console.browser()
    again.session.cookie_jar.update_cookies({"wcb_console": cookie}, console.server.make_url("/console/"))
    assert (await again.get_json("/console/api/inbox"))[0] == 401  # the old cookie is dead server-side
    assert "console.logout" in [e.action for e in await console.services.repos.audit.recent()]


# ------------------------------------------------------------------------------------------------ CSRF


async def test_posts_without_the_csrf_token_are_refused(console: Console) -> None:
    now = console.clock.now()
    conversation = await seed_conversation(console.services, "c1", team=SUPPORT, queued_at=now)
    browser = await console.logged_in("agent")
    for token in ("", "forged"):
        status, body = await browser.act(conversation, "claim", csrf=token)
        assert status == 403 and body["error"] == "csrf"
    response = await browser.session.post("/console/logout", data={}, allow_redirects=False)
    assert response.status == 403
    assert (await browser.get_json("/console/api/inbox"))[0] == 200  # still logged in

    fresh = console.browser()  # the login form carries a double-submitted token
    response = await fresh.session.post(
        "/console/login", data={"username": "agent", "password": PASSWORD}, allow_redirects=False
    )
    assert response.status == 403
    assert (await browser.act(conversation, "claim"))[0] == 503  # with the token it reaches the (unwired) port


# ------------------------------------------------------------------------------------------------ visibility


async def test_an_agent_never_sees_or_acts_on_another_teams_conversation(console: Console) -> None:
    now = console.clock.now()
    theirs = await seed_conversation(console.services, "s1", team=SALES, queued_at=now - 60)
    ours = await seed_conversation(console.services, "a1", team=SUPPORT, queued_at=now - 30)
    teammate = await seed_conversation(
        console.services, "a2", team=SUPPORT, status="open", queued_at=now - 90, assignee_id=console.staff["agent2"]
    )
    agent = await console.logged_in("agent")
    _, inbox = await agent.get_json("/console/api/inbox")
    assert [r["id"] for r in inbox["queue"]] == [ours] and inbox["mine"] == []

    missing = await agent.get_json("/console/api/conversations/999999")
    for hidden in (theirs, teammate):
        assert await agent.get_json(f"/console/api/conversations/{hidden}") == missing  # 404, same as missing
        assert missing[0] == 404
        page = await agent.session.get(f"/console/conversations/{hidden}")
        assert page.status == 404 and "客户" not in await page.text()
        for action, body in (
            ("claim", {}),
            ("reply", {"text": "你好"}),
            ("resolve", {}),
            ("transfer", {"to_agent_id": 1}),
        ):
            status, answer = await agent.act(hidden, action, body)
            assert status == 404 and answer["error"] == "not_found"
    assert (await agent.get_json(f"/console/api/conversations/{ours}"))[0] == 200

    sales = await console.logged_in("sales")
    _, inbox = await sales.get_json("/console/api/inbox")
    assert [r["id"] for r in inbox["queue"]] == [theirs]

    lead = await console.logged_in("lead")  # the whole team, queue and open
    _, inbox = await lead.get_json("/console/api/inbox")
    assert [r["id"] for r in inbox["queue"]] == [ours] and [r["id"] for r in inbox["mine"]] == [teammate]
    assert (await lead.get_json(f"/console/api/conversations/{theirs}"))[0] == 404

    admin = await console.logged_in("admin")
    _, inbox = await admin.get_json("/console/api/inbox")
    assert [r["id"] for r in inbox["queue"]] == [theirs, ours]

    community = await console.logged_in("community")
    _, inbox = await community.get_json("/console/api/inbox")
    assert inbox["queue"] == [] and inbox["mine"] == []
    assert (await community.get_json(f"/console/api/conversations/{ours}"))[0] == 404
    assert (await community.session.get("/console/lead")).status == 403
    assert (await agent.session.get("/console/lead")).status == 403


async def test_the_inbox_lists_the_queue_oldest_first_with_sla_due(console: Console) -> None:
    now = console.clock.now()
    newer = await seed_conversation(
        console.services, "n", team=SUPPORT, queued_at=now - 10, sla_due=now + 20, tags=["新用户"]
    )
    older = await seed_conversation(
        console.services, "o", team=SUPPORT, queued_at=now - 25, sla_due=now + 5, tags=["高价值", "复购"]
    )
    mine = await seed_conversation(
        console.services, "m", team=SUPPORT, status="open", queued_at=now - 100, assignee_id=console.staff["agent"]
    )
    await seed_conversation(console.services, "r", team=SUPPORT, status="resolved", queued_at=now - 200)
    agent = await console.logged_in("agent")
    status, inbox = await agent.get_json("/console/api/inbox")
    assert status == 200 and inbox["now"] == pytest.approx(now)
    assert [r["id"] for r in inbox["queue"]] == [older, newer]
    first = inbox["queue"][0]
    assert first["customer"] == "客户o" and first["tags"] == ["复购", "高价值"]
    assert first["sla"] == {"kind": "first_response", "due_at": pytest.approx(now + 5)}
    assert first["waiting_since"] == pytest.approx(now - 25) and first["status_label"] == "排队中"
    assert [r["id"] for r in inbox["mine"]] == [mine] and inbox["mine"][0]["assignee"] == "agent 名"

    page = await agent.session.get("/console/inbox")
    text = await page.text()
    assert page.status == 200 and "客户o" in text and "剩余 00:05" in text
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")


async def test_the_conversation_view_shows_history_tags_and_reason(console: Console) -> None:
    now = console.clock.now()
    conversation = await seed_conversation(
        console.services,
        "h",
        team=SUPPORT,
        queued_at=now - 5,
        tags=["高价值"],
        reason="complaint",
        messages=[("in", "<b>我要投诉</b>", 3), ("out", "正在为您转接人工", None), ("in", "您好，我是客服", 5)],
    )
    agent = await console.logged_in("agent")
    status, body = await agent.get_json(f"/console/api/conversations/{conversation}")
    assert status == 200
    assert [(m["author"], m["text"]) for m in body["messages"]] == [
        ("customer", "<b>我要投诉</b>"),
        ("bot", "正在为您转接人工"),
        ("agent", "您好，我是客服"),
    ]
    page = await (await agent.session.get(f"/console/conversations/{conversation}")).text()
    assert "&lt;b&gt;我要投诉&lt;/b&gt;" in page and "<b>我要投诉" not in page  # escaped
    assert "投诉" in page and "高价值" in page and "机器人" in page


async def test_the_lead_view_shows_queue_depth_and_todays_attainment(console: Console) -> None:
    now = console.clock.now()
    for customer in ("q1", "q2"):
        await seed_conversation(console.services, customer, team=SUPPORT, queued_at=now - 5)
    await seed_conversation(console.services, "q3", team=SALES, queued_at=now - 5)
    done = await seed_conversation(console.services, "d", team=SUPPORT, status="resolved", queued_at=now - 50)
    sessions = create_session_factory(console.services.engine)
    async with sessions.begin() as session:
        for cycle, met in enumerate((True, True, False)):
            session.add(
                SlaEventRow(
                    conversation_id=done,
                    clock="first_response",
                    cycle=cycle,
                    kind="fulfilled",
                    level=0,
                    at=now - 1,
                    due_at=now,
                    met=met,
                    recorded_at=_utc(now),
                )
            )
    lead = await console.logged_in("lead")
    page = await (await lead.session.get("/console/lead")).text()
    assert re.search(r"<td>售后</td><td>2</td>", page) and "售前" not in page
    assert '<strong id="attainment">66.7%</strong>' in page and '<span id="total">3</span>' in page
    admin = await console.logged_in("admin")
    page = await (await admin.session.get("/console/lead")).text()
    assert "<td>售前</td><td>1</td>" in page


# ------------------------------------------------------------------------------------------------ actions


async def test_actions_answer_503_until_the_handoff_service_is_wired(console: Console) -> None:
    conversation = await seed_conversation(console.services, "w", team=SUPPORT, queued_at=console.clock.now())
    agent = await console.logged_in("agent")
    status, body = await agent.act(conversation, "claim")
    assert status == 503 and body["ok"] is False and body["error"] == "not_wired" and body["message"]
    [entry] = [e for e in await console.services.repos.audit.recent() if e.action == "console.claim"]
    assert entry.actor == "agent" and entry.target == f"conversation:{conversation}"
    assert entry.detail == {"ok": False, "code": "not_wired"}


async def test_actions_are_validated_authorised_audited_and_reach_the_port(backend: Backend) -> None:
    actions = RecordingActions()
    async for console in _console(backend, actions=actions):
        now = console.clock.now()
        conversation = await seed_conversation(console.services, "p", team=SUPPORT, queued_at=now)
        agent = await console.logged_in("agent")
        assert (await agent.act(conversation, "claim")) == (200, {"ok": True, "code": "ok", "message": ""})
        assert (await agent.act(conversation, "reply", {"text": "  您好，请稍等  "}))[0] == 200
        assert (await agent.act(conversation, "transfer", {"to_agent_id": console.staff["agent2"]}))[0] == 200
        assert (await agent.act(conversation, "resolve"))[0] == 200
        assert actions.calls == [
            ("claim", conversation, "agent", None),
            ("reply", conversation, "agent", "您好，请稍等"),
            ("transfer", conversation, "agent", console.staff["agent2"]),
            ("resolve", conversation, "agent", None),
        ]
        audit = [e for e in await console.services.repos.audit.recent() if e.action.startswith("console.")]
        reply = next(e for e in audit if e.action == "console.reply")
        assert reply.detail == {"ok": True, "code": "ok", "chars": 6}  # the length, never the text

        bad = [
            (conversation, "reply", {"text": ""}),
            (conversation, "reply", {"text": "   "}),
            (conversation, "reply", {"text": "字" * 2049}),
            (conversation, "reply", {"text": 5}),
            (conversation, "reply", {}),
            (conversation, "transfer", {"to_agent_id": "abc"}),
            (conversation, "transfer", {"to_agent_id": -3}),
            (conversation, "transfer", {"to_agent_id": True}),
            (conversation, "transfer", {"to_agent_id": console.staff["agent"]}),
            ("abc", "claim", {}),
            ("0", "claim", {}),
            ("99999999999999999999", "claim", {}),
        ]
        for target, action, body in bad:
            status, answer = await agent.act(target, action, body)
            assert status == 400 and answer["error"] == "bad_field", (target, action, body, answer)
        assert (await agent.act(conversation, "reply", {"text": "字" * 2048}))[0] == 200
        assert (await agent.act(conversation, "explode"))[0] == 404
        assert len(actions.calls) == 5

        actions.answer = ActionResult.refused("已被其他客服认领", "conflict")
        status, body = await agent.act(conversation, "claim")
        assert status == 409 and body == {
            "ok": False,
            "code": "conflict",
            "message": "已被其他客服认领",
            "error": "conflict",
        }

        # Without JavaScript: a form post with the hidden token gets a small HTML page.
        response = await agent.session.post(
            f"/console/api/conversations/{conversation}/resolve", data={"csrf": agent.csrf}
        )
        assert response.status == 409 and "已被其他客服认领" in await response.text()


# ------------------------------------------------------------------------------------------------ live updates


async def second_redis(console: Console, backend: Backend) -> redis_asyncio.Redis:
    """Another Redis client on the same server (for fakeredis: the same in-process server)."""
    if backend.name == "real":
        return redis_asyncio.Redis.from_url(REAL_REDIS_URL)
    import fakeredis

    pool = console.services.redis.connection_pool
    connection = await pool.get_connection()
    try:
        server = connection._server  # type: ignore[attr-defined]
    finally:
        await pool.release(connection)
    return fakeredis.FakeAsyncRedis(server=server)


async def next_frame(stream: aiohttp.StreamReader, *, skip_pings: bool = True) -> tuple[str, dict[str, Any]]:
    async with asyncio.timeout(5):
        while True:
            block = (await stream.readuntil(b"\n\n")).decode()
            fields = dict(
                line.split(": ", 1) for line in block.strip().splitlines() if ": " in line and not line.startswith(":")
            )
            if "event" in fields:
                return fields["event"], json.loads(fields.get("data", "{}"))
            if not skip_pings:
                return "", {}


async def test_sse_delivers_an_event_published_from_another_redis_client(console: Console, backend: Backend) -> None:
    agent = await console.logged_in("agent")
    response = await agent.session.get("/console/events")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    event, _ = await next_frame(response.content)
    assert event == "ready"

    other = await second_redis(console, backend)
    try:
        prefix = console.services.settings.redis_key_prefix
        started = time.monotonic()
        # Another team's change is not sent; a change in the agent's team is, with no customer data.
        await publish_console_event(other, prefix, {"type": "queued", "conversation_id": 7, "team": SALES})
        await publish_console_event(
            other, prefix, {"type": "claimed", "conversation_id": 8, "team": SUPPORT, "status": "open", "note": "x"}
        )
        event, data = await next_frame(response.content)
        assert time.monotonic() - started < 1.0
        assert event == "inbox" and data == {"type": "claimed", "conversation_id": 8, "status": "open"}
    finally:
        await other.aclose()
    response.close()


async def test_sse_needs_a_session_and_ends_when_it_does(console: Console) -> None:
    anonymous = console.browser()
    status, body = await anonymous.get_json("/console/events")
    assert status == 401 and body["error"] == "unauthenticated"

    agent = await console.logged_in("agent")
    response = await agent.session.get("/console/events")
    assert (await next_frame(response.content))[0] == "ready"
    console.clock.advance(9 * 3600)  # idle too long: the next heartbeat notices
    assert (await next_frame(response.content))[0] == "logout"
    response.close()


async def test_the_console_is_mounted_by_create_app(backend: Backend) -> None:
    config = make_settings(backend, auto_migrate=True, scripts_reload_interval_s=0)
    async with open_services(config) as services:
        await add_staff(services, "agent", StaffRole.AGENT, SUPPORT)
        server = TestServer(create_app(dataclasses.replace(services), worker_count=0))
        await server.start_server()
        browser = Browser(server)
        try:
            page = await browser.session.get("/console/inbox", allow_redirects=False)
            assert page.status == 303 and page.headers["Location"].startswith("/console/login")
            assert (await browser.login("agent")).status == 303
            assert (await browser.get_json("/console/api/inbox"))[0] == 200
            assert (await browser.session.get("/healthz")).status == 200  # the rest of the app is untouched
        finally:
            await browser.close()
            await server.close()


def test_console_keys_use_the_prefix() -> None:
    keys = ConsoleKeys("wecom")
    assert keys.session("abc").startswith("wecom:console:session:") and "abc" not in keys.session("abc")
    assert keys.events() == "wecom:console:events"
    assert keys.login_failures("Agent", "1.2.3.4") == keys.login_failures("agent", "1.2.3.4")
