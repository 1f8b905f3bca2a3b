"""The console's scheduled-posts pages (/console/posts), on both backends with an injected clock.

List (title, owner, rule, next slot, status, delivery counts), a 7-day calendar, a detail page with content
preview and delivery status per target, and a cancel that needs the CSRF token and a confirmation. Admins and
community managers may cancel, leads only read, agents get 403. Every database value is escaped.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from html import escape
from zoneinfo import ZoneInfo

import pytest

from bot.cli_posts import PostSpec, store_post
from bot.storage.db import create_session_factory
from bot.storage.models import DeliveryState, PostStatus
from bot.storage.posts_repository import PostRecord, PostRepository
from scheduler.slots import slots_between
from tests.conftest import Backend
from tests.test_console import Console, _console

SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2025, 3, 1, 8, 0, tzinfo=SH).astimezone(UTC)  # a Saturday, 08:00 in Shanghai
HOSTILE = '<script>alert("x")</script>&'


@pytest.fixture
async def console(backend: Backend) -> AsyncIterator[Console]:
    async for value in _console(backend):
        value.clock.t = NOW.timestamp()
        await repo(value).add_robot("运营群", "abcd-1234-wxyz")
        yield value


def repo(console: Console) -> PostRepository:
    return PostRepository(create_session_factory(console.services.engine), console.clock)


async def add(console: Console, **overrides: object) -> PostRecord:
    values: dict[str, object] = {
        "title": "每日话题",
        "owner": "zhangsan",
        "kind": "text",
        "content": {"text": "今日话题：聊聊你的护肤习惯"},
        "cron": "0 9 * * 1-5",
        "robots": ("运营群",),
    }
    values.update(overrides)
    return await store_post(repo(console), console.services.repos.audit, PostSpec(**values), NOW, "test")  # type: ignore[arg-type]


async def page(console: Console, who: str, path: str) -> tuple[int, str]:
    browser = await console.logged_in(who)
    response = await browser.session.get(path)
    return response.status, await response.text()


def assert_escaped(text: str, value: str = HOSTILE) -> None:
    assert value not in text and escape(value, quote=True) in text


# ------------------------------------------------------------------------------------------------ reading


async def test_the_list_shows_each_post_with_rule_next_slot_status_and_counts(console: Console) -> None:
    daily = await add(console, staff=("lisi",))
    hostile = await add(console, title=HOSTILE, owner='"><img src=x>', cron=None, at="2025-03-02 19:00")
    cancelled = await add(console, title="已停的推送")
    await repo(console).cancel_post(cancelled.id)
    until = NOW + timedelta(days=3)
    await repo(console).materialise(daily, slots_between(daily.rule, NOW, until), until, NOW)

    for who in ("admin", "community", "lead"):
        status, text = await page(console, who, "/console/posts")
        assert status == 200, text
        assert text.index(escape(HOSTILE)) < text.index("每日话题")  # newest first
        assert_escaped(text)
        assert_escaped(text, '"><img src=x>')
        row = re.search(rf'<tr data-id="{daily.id}">(.*?)</tr>', text)
        assert row is not None
        cells = row.group(1)
        assert "zhangsan" in cells and "周期：cron「0 9 * * 1-5」（Asia/Shanghai）" in cells
        assert "2025-03-03 09:00" in cells and "进行中" in cells and "待发送 2" in cells  # Mon and Tue rows
        assert "一次性：2025-03-02 19:00（Asia/Shanghai）" in text and "已取消" in text
        assert ('id="read-only"' in text) == (who == "lead")

    status, text = await page(console, "admin", "/console/posts?status=cancelled")
    assert status == 200 and "已停的推送" in text and "每日话题" not in text
    status, text = await page(console, "admin", "/console/posts?status=active")
    assert "已停的推送" not in text and "每日话题" in text and str(hostile.id) in text
    assert (await page(console, "admin", "/console/posts?status=bogus"))[0] == 400


async def test_the_calendar_lists_the_next_seven_days_slots(console: Console) -> None:
    await add(console, title=HOSTILE)  # weekdays 09:00
    await add(console, title="直播提醒", cron=None, at="2025-03-02 19:00")
    await add(console, title="十天后", cron=None, at="2025-03-11 10:00")  # outside the week
    gone = await add(console, title="已取消的", cron="30 12 * * *")
    await repo(console).cancel_post(gone.id)

    status, text = await page(console, "lead", "/console/posts/calendar")
    assert status == 200
    days = re.findall(r'<section class="day" data-day="([0-9-]+)">(.*?)</section>', text)
    assert [d for d, _ in days] == [f"2025-03-0{i}" for i in range(1, 8)]
    by_day = dict(days)
    assert "无安排" in by_day["2025-03-01"]  # Saturday: the 09:00 rule is weekdays only
    assert "19:00" in by_day["2025-03-02"] and "直播提醒" in by_day["2025-03-02"]
    for day in ("2025-03-03", "2025-03-04", "2025-03-05", "2025-03-06", "2025-03-07"):
        assert "09:00" in by_day[day] and escape(HOSTILE) in by_day[day]
    assert "十天后" not in text and "已取消的" not in text
    assert_escaped(text)


async def test_the_detail_page_shows_preview_and_delivery_status_per_target(console: Console) -> None:
    post = await add(console, cron="0 * * * *", staff=(HOSTILE,), content={"text": f"内容 {HOSTILE}"})
    posts = repo(console)
    until = NOW + timedelta(hours=3)
    await posts.materialise(post, slots_between(post.rule, NOW, until), until, NOW)
    token = "tok" * 5
    for delivery in await posts.claim_due(NOW + timedelta(hours=1), token, limit=100):
        sent = delivery.target_kind.value == "robot"
        await posts.finish(
            delivery.id,
            token,
            DeliveryState.SENT if sent else DeliveryState.FAILED,
            NOW,
            errcode=None if sent else 81013,
            errmsg=None if sent else f"bad {HOSTILE}",
        )

    status, text = await page(console, "community", f"/console/posts/{post.id}")
    assert status == 200, text
    assert_escaped(text)
    assert_escaped(text, f"内容 {HOSTILE}")
    assert "群机器人：运营群" in text and f"员工：{escape(HOSTILE)}" in text
    sections = dict(re.findall(r'<section class="target" data-target="(\d+)">(.*?)</section>', text))
    robot, staff = (sections[str(t.id)] for t in post.targets)
    assert "已发送 2" in robot and "待发送 1" in robot
    assert "失败 2" in staff and "81013" in staff and escape(f"bad {HOSTILE}") in staff
    slots = re.search(r'<ol id="slots">(.*?)</ol>', text)
    assert slots is not None and slots.group(1).count("<li>") == 5 and "2025-03-01 09:00" in slots.group(1)
    assert f'action="/console/posts/{post.id}/cancel"' in text and 'name="confirm"' in text

    status, text = await page(console, "lead", f"/console/posts/{post.id}")
    assert status == 200 and 'id="read-only"' in text and "/cancel" not in text

    assert (await page(console, "admin", "/console/posts/999"))[0] == 404
    assert (await page(console, "admin", "/console/posts/abc"))[0] == 400


async def test_agents_may_not_see_posts(console: Console) -> None:
    post = await add(console)
    for path in ("/console/posts", "/console/posts/calendar", f"/console/posts/{post.id}"):
        status, text = await page(console, "agent", path)
        assert status == 403 and "无权查看推送计划" in text and "每日话题" not in text


# ------------------------------------------------------------------------------------------------ cancelling


async def test_cancel_needs_the_csrf_token_a_confirmation_and_a_writer(console: Console) -> None:
    post = await add(console, cron="0 * * * *")
    posts = repo(console)
    until = NOW + timedelta(hours=2)
    await posts.materialise(post, slots_between(post.rule, NOW, until), until, NOW)
    path = f"/console/posts/{post.id}/cancel"

    async def still_active() -> bool:
        stored = await posts.get_post(post.id)
        return stored is not None and stored.status is PostStatus.ACTIVE

    community = await console.logged_in("community")
    for token in ("", "forged"):
        response = await community.session.post(path, data={"csrf": token, "confirm": "yes"})
        assert response.status == 403 and "页面已过期" in await response.text()
    assert await still_active()
    response = await community.session.post(path, data={"csrf": community.csrf})
    assert response.status == 400 and "请勾选确认" in await response.text()
    assert await still_active()

    lead = await console.logged_in("lead")
    response = await lead.session.post(path, data={"csrf": lead.csrf, "confirm": "yes"})
    assert response.status == 403 and "无权取消推送" in await response.text()
    agent = await console.logged_in("agent")
    response = await agent.session.post(path, data={"csrf": agent.csrf, "confirm": "yes"})
    assert response.status == 403
    assert await still_active()

    response = await community.session.post(path, data={"csrf": community.csrf, "confirm": "yes"})
    assert response.status == 200
    assert f"推送 #{post.id} 已取消，2 条待发送的投递已跳过。" in await response.text()
    assert not await still_active()
    assert {d.state for d in await posts.deliveries(post_id=post.id)} == {DeliveryState.SKIPPED}
    [entry, *_] = await console.services.repos.audit.recent(target=f"post:{post.id}")
    assert (entry.actor, entry.action, entry.detail) == ("community", "post.cancel", {"skipped": 2})

    admin = await console.logged_in("admin")
    response = await admin.session.post(path, data={"csrf": admin.csrf, "confirm": "yes"})
    assert response.status == 200 and "此前已取消" in await response.text()
    response = await admin.session.post("/console/posts/999/cancel", data={"csrf": admin.csrf, "confirm": "yes"})
    assert response.status == 404
    status, text = await page(console, "admin", f"/console/posts/{post.id}")
    assert status == 200 and "已取消" in text and "/cancel" not in text  # no cancel form once cancelled
