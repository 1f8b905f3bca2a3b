"""Scheduled posts in the admin API (bot/posts_api.py), on both backends with an injected clock.

Create, list, show (delivery status per target), cancel and preview; every refusal with its message (the CLI's
validation, shared); roles (admin and community write, lead reads, agent 403) whatever the account's team; the
OpenAPI document describes every posts route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.app import Services, create_app, open_services
from bot.auth import new_token, token_hash
from bot.posts_api import OPENAPI
from bot.storage.db import create_session_factory
from bot.storage.models import DeliveryState, StaffRole
from bot.storage.posts_repository import PostRepository
from scheduler.slots import slots_between
from tests.conftest import Backend, make_settings

SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2025, 3, 1, 8, 0, tzinfo=SH).astimezone(UTC)  # a Saturday, 08:00 in Shanghai


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.t = start.timestamp()

    def now(self) -> float:
        return self.t


@dataclass
class Api:
    client: TestClient
    services: Services
    tokens: dict[str, str]

    async def call(self, method: str, path: str, who: str | None = "admin", **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who is not None else {}
        response = await self.client.request(method, path, headers=headers, **kw)
        return response.status, await response.json()

    def repo(self) -> PostRepository:
        return PostRepository(create_session_factory(self.services.engine), self.services.clock)


# Accounts in different teams (and none): posts are not scoped by team.
ACCOUNTS = {
    "admin": (StaffRole.ADMIN, None),
    "community": (StaffRole.COMMUNITY, "运营"),
    "community-other": (StaffRole.COMMUNITY, "售前"),
    "lead": (StaffRole.LEAD, "售后"),
    "agent": (StaffRole.AGENT, "运营"),
}


@pytest.fixture
async def api(backend: Backend) -> AsyncIterator[Api]:
    settings = make_settings(backend, scripts_reload_interval_s=0, auto_migrate=True)
    async with open_services(settings, clock=FakeClock(NOW)) as services:
        tokens = {}
        for username, (role, team) in ACCOUNTS.items():
            user = await services.repos.staff.add_user(username, role, team=team)
            token = new_token()
            await services.repos.staff.add_token(user.id, "test", token_hash(token))
            tokens[username] = token
        await PostRepository(create_session_factory(services.engine)).add_robot("运营群", "abcd-1234-wxyz")
        client = TestClient(TestServer(create_app(services, worker_count=0)))
        await client.start_server()
        try:
            yield Api(client, services, tokens)
        finally:
            await client.close()


def body(**overrides: object) -> dict[str, Any]:
    values: dict[str, Any] = {
        "title": "每日话题",
        "owner": "zhangsan",
        "kind": "text",
        "content": {"text": "今日话题：聊聊你的护肤习惯"},
        "cron": "0 9 * * 1-5",
        "robots": ["运营群"],
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


async def create(api: Api, who: str = "community", **overrides: object) -> dict[str, Any]:
    status, post = await api.call("POST", "/api/posts", who, json=body(**overrides))
    assert status == 201, post
    return post


# ------------------------------------------------------------------------------------------------ the flow


async def test_create_list_show_preview_and_cancel(api: Api) -> None:
    post = await create(api, staff=["lisi"], groups=[{"chat_id": "wrChat", "sender": "wangwu"}])
    assert post["title"] == "每日话题" and post["status"] == "active" and post["owner"] == "zhangsan"
    assert post["rule"] == {"kind": "cron", "at": None, "cron": "0 9 * * 1-5", "timezone": "Asia/Shanghai"}
    # Saturday 08:00: the next weekday 09:00 is Monday (crontab weekdays keep their meaning).
    assert post["next_slot"] == datetime(2025, 3, 3, 9, 0, tzinfo=SH).astimezone(UTC).isoformat()
    assert [(t["kind"], t["ref"], t["params"]) for t in post["targets"]] == [
        ("robot", "运营群", {}),
        ("group_chat", "wrChat", {"sender": "wangwu"}),
        ("staff", "lisi", {}),
    ]
    assert post["content"] == {"text": "今日话题：聊聊你的护肤习惯"} and post["deliveries"] == {}

    once = await create(api, "admin", title="直播提醒", cron=None, at="2025-03-02 19:00", staff=["lisi"], robots=[])
    status, listing = await api.call("GET", "/api/posts", "lead")
    assert status == 200 and [p["id"] for p in listing["posts"]] == [once["id"], post["id"]]
    assert "content" not in listing["posts"][0]

    status, shown = await api.call("GET", f"/api/posts/{post['id']}", "lead")
    assert status == 200 and shown["id"] == post["id"] and [t["recent"] for t in shown["targets"]] == [[], [], []]

    status, preview = await api.call("GET", f"/api/posts/{post['id']}/preview?n=3", "lead")
    assert status == 200
    assert [s["local"] for s in preview["slots"]] == ["2025-03-03 09:00", "2025-03-04 09:00", "2025-03-05 09:00"]
    robot, group, staff = preview["targets"]
    assert robot["msgtype"] == "text" and robot["text"] == "今日话题：聊聊你的护肤习惯" and robot["error"] is None
    assert robot["body"] == {"content": "今日话题：聊聊你的护肤习惯"}
    assert group["body"] == {"text": {"content": "今日话题：聊聊你的护肤习惯"}} and staff["msgtype"] == "text"
    status, preview = await api.call("GET", f"/api/posts/{post['id']}/preview", "lead")
    assert len(preview["slots"]) == 5  # the default

    status, cancelled = await api.call("POST", f"/api/posts/{post['id']}/cancel", "community")
    assert status == 200 and cancelled == {"id": post["id"], "status": "cancelled", "was_active": True, "skipped": 0}
    status, again = await api.call("POST", f"/api/posts/{post['id']}/cancel", "community")
    assert status == 200 and again["was_active"] is False
    status, preview = await api.call("GET", f"/api/posts/{post['id']}/preview", "admin")
    assert preview["status"] == "cancelled" and preview["slots"] == []

    for wanted, ids in (("active", [once["id"]]), ("cancelled", [post["id"]]), ("all", [once["id"], post["id"]])):
        status, listing = await api.call("GET", f"/api/posts?status={wanted}", "admin")
        assert status == 200 and [p["id"] for p in listing["posts"]] == ids
    status, listing = await api.call("GET", "/api/posts?limit=1", "admin")
    assert [p["id"] for p in listing["posts"]] == [once["id"]]

    audit = await api.services.repos.audit.recent(target=f"post:{post['id']}")
    assert [(e.actor, e.action) for e in audit] == [
        ("community", "post.cancel"),
        ("community", "post.cancel"),
        ("community", "post.add"),
    ]


async def test_show_gives_delivery_status_per_target(api: Api) -> None:
    created = await create(api, cron="0 * * * *", staff=["lisi"])
    repo = api.repo()
    post = await repo.get_post(created["id"])
    assert post is not None
    until = NOW + timedelta(hours=3)
    await repo.materialise(post, slots_between(post.rule, NOW, until), until, NOW)
    token = "tok" * 5
    for delivery in await repo.claim_due(NOW + timedelta(hours=1), token, limit=100):
        sent = delivery.target_kind.value == "robot"
        state = DeliveryState.SENT if sent else DeliveryState.FAILED
        await repo.finish(
            delivery.id, token, state, NOW, errcode=None if sent else 81013, errmsg=None if sent else "user invalid"
        )

    status, shown = await api.call("GET", f"/api/posts/{created['id']}", "lead")
    assert status == 200
    robot, staff = shown["targets"]
    assert robot["deliveries"] == {"scheduled": 1, "sent": 2} and staff["deliveries"] == {"failed": 2, "scheduled": 1}
    assert shown["deliveries"] == {"failed": 2, "scheduled": 2, "sent": 2}
    assert [d["state"] for d in staff["recent"]] == ["failed", "failed", "scheduled"]
    assert staff["recent"][0]["errcode"] == 81013 and staff["recent"][0]["errmsg"] == "user invalid"
    assert robot["recent"][0]["sent_at"] is not None

    status, listing = await api.call("GET", "/api/posts", "community")
    [listed] = listing["posts"]
    assert listed["deliveries"] == shown["deliveries"]
    assert [t["deliveries"] for t in listed["targets"]] == [robot["deliveries"], staff["deliveries"]]

    await api.call("POST", f"/api/posts/{created['id']}/cancel", "admin")
    status, shown = await api.call("GET", f"/api/posts/{created['id']}", "admin")
    assert shown["status"] == "cancelled" and shown["cancelled_at"] is not None
    assert shown["deliveries"] == {"failed": 2, "sent": 2, "skipped": 2}
    assert shown["targets"][0]["recent"][-1]["reason"] == "cancelled"


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("overrides", "code", "message"),
    [
        ({"cron": "0 25 * * *"}, "invalid_post", "invalid cron '0 25 * * *'"),
        ({"cron": "0 9 * *"}, "invalid_post", "need 5 fields"),
        ({"cron": "0 9 31 2 *"}, "invalid_post", "never fires"),
        ({"cron": None, "at": "2025-03-01 07:30"}, "invalid_post", "2025-03-01 07:30 (Asia/Shanghai) is in the past"),
        ({"cron": None, "at": "2025-02-28T23:00:00+00:00"}, "invalid_post", "is in the past"),
        ({"cron": None, "at": "next tuesday"}, "invalid_post", "'next tuesday': not a time"),
        ({"cron": None}, "invalid_post", "exactly one of --at (one-off) or --cron (recurring)"),
        ({"at": "2025-03-02 09:00"}, "invalid_post", "exactly one of --at (one-off) or --cron (recurring)"),
        ({"timezone": "Moon/Base"}, "invalid_post", "unknown time zone 'Moon/Base'"),
        ({"robots": ["无此群"]}, "invalid_post", "unknown robot '无此群'"),
        ({"robots": []}, "invalid_post", "at least one target"),
        ({"robots": ["运营群", "运营群"]}, "invalid_post", "the same target is given twice"),
        ({"content": {"text": "字" * 700}}, "invalid_post", "the text is 2100 bytes, over WeCom's limit of 2048 bytes"),
        (
            {"kind": "markdown", "content": {"markdown": "**x**"}, "groups": ["wrChat"]},
            "invalid_post",
            "group_chat wrChat: a customer group cannot receive markdown posts",
        ),
        ({"kind": "news", "content": {"articles": []}}, "invalid_post", "news needs 1 to 8 articles"),
        ({"kind": "video"}, "invalid_post", "unknown content kind 'video'"),
        ({"title": " "}, "invalid_post", "a post needs a title"),
        ({"title": "长" * 201}, "invalid_post", "longer than 200 characters"),
        ({"owner": ""}, "invalid_post", "needs an owner"),
        ({"owner": "o" * 65}, "invalid_post", "the owner is longer than 64 characters"),
        ({"segments": [" , "]}, "invalid_post", "needs at least one tag"),
        ({"kind": None}, "bad_field", "`kind` is required"),
        ({"content": "今日话题"}, "bad_field", "`content` must be an object"),
        ({"title": 5}, "bad_field", "`title` must be text"),
        ({"robots": "运营群"}, "bad_field", "`robots` must be a list"),
        ({"staff": [1]}, "bad_field", "`staff` must be a list of text"),
        ({"groups": [5]}, "bad_field", "`groups` entries are"),
        ({"segments": [{"tag": "VIP"}]}, "bad_field", "`segments` entries are"),
        ({"robot": ["运营群"]}, "bad_field", "unknown field(s): robot"),
    ],
)
async def test_bad_posts_are_refused_with_a_clear_message(
    api: Api, overrides: dict[str, object], code: str, message: str
) -> None:
    payload = body(**overrides)
    if "kind" in overrides and overrides["kind"] is None:
        payload.pop("kind", None)
    status, answer = await api.call("POST", "/api/posts", "community", json=payload)
    assert status == 400, answer
    assert answer["error"] == code and message in answer["message"], answer
    assert await api.repo().list_posts() == []


async def test_malformed_bodies_and_ids(api: Api) -> None:
    response = await api.client.post(
        "/api/posts", data=b"{not json", headers={"Authorization": f"Bearer {api.tokens['admin']}"}
    )
    assert response.status == 400 and (await response.json())["error"] == "bad_json"
    status, answer = await api.call("POST", "/api/posts", json=[1, 2])
    assert status == 400 and answer["error"] == "bad_json"
    status, answer = await api.call("GET", "/api/posts/abc")
    assert status == 400 and answer["error"] == "bad_post_id"
    status, answer = await api.call("GET", "/api/posts/0/preview")
    assert status == 400 and answer["error"] == "bad_post_id"
    for path in ("/api/posts/42", "/api/posts/42/preview"):
        status, answer = await api.call("GET", path)
        assert status == 404 and answer == {"error": "not_found", "message": "no post 42"}
    status, answer = await api.call("POST", "/api/posts/42/cancel")
    assert status == 404 and answer["error"] == "not_found"
    post = await create(api)
    for query in ("n=0", "n=51", "n=x"):
        status, answer = await api.call("GET", f"/api/posts/{post['id']}/preview?{query}")
        assert status == 400 and answer["message"] == "n must be an integer from 1 to 50"
    status, answer = await api.call("GET", "/api/posts?status=paused")
    assert status == 400 and "status must be one of active, cancelled, all" in answer["message"]


# ------------------------------------------------------------------------------------------------ roles


async def test_roles_decide_who_may_read_and_change_posts(api: Api) -> None:
    post = await create(api, "community")
    paths = [
        ("GET", "/api/posts"),
        ("GET", f"/api/posts/{post['id']}"),
        ("GET", f"/api/posts/{post['id']}/preview"),
        ("POST", "/api/posts"),
        ("POST", f"/api/posts/{post['id']}/cancel"),
    ]
    for method, path in paths:
        kw = {"json": body()} if method == "POST" else {}
        status, answer = await api.call(method, path, "agent", **kw)
        assert status == 403 and answer["error"] == "forbidden" and "role agent may not" in answer["message"]
        status, answer = await api.call(method, path, None, **kw)
        assert status == 401 and answer["error"] == "unauthenticated"
    for method, path in paths[:3]:
        assert (await api.call(method, path, "lead"))[0] == 200
    status, answer = await api.call("POST", "/api/posts", "lead", json=body())
    assert status == 403 and answer["message"] == "role lead may not create posts"
    status, answer = await api.call("POST", f"/api/posts/{post['id']}/cancel", "lead")
    assert status == 403 and answer["message"] == "role lead may not cancel posts"
    [stored] = await api.repo().list_posts()
    assert stored.status.value == "active"


async def test_posts_are_not_scoped_by_team(api: Api) -> None:
    post = await create(api, "community")  # team 运营
    status, listing = await api.call("GET", "/api/posts", "community-other")  # team 售前
    assert status == 200 and [p["id"] for p in listing["posts"]] == [post["id"]]
    status, _ = await api.call("POST", f"/api/posts/{post['id']}/cancel", "community-other")
    assert status == 200
    status, shown = await api.call("GET", f"/api/posts/{post['id']}", "admin")  # no team
    assert shown["status"] == "cancelled"


# ------------------------------------------------------------------------------------------------ OpenAPI


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> object:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, ref
        node = node[part]
    return node


async def test_the_openapi_document_describes_every_posts_route(api: Api) -> None:
    status, document = await api.call("GET", "/api/openapi.json", "agent")
    assert status == 200 and document == OPENAPI
    assert (await api.call("GET", "/api/openapi.json", None))[0] == 401
    assert document["openapi"].startswith("3.") and document["info"]["title"] and document["info"]["version"]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "a staff token (wecom-bot tokens create)",
    }
    refs = _refs(document)
    assert refs and all(_resolve(document, ref) is not None for ref in refs)

    served = {
        (route.method.lower(), route.resource.canonical[len("/api") :])
        for route in api.client.app.router.routes()  # type: ignore[union-attr]
        if route.resource is not None
        and route.resource.canonical.startswith(("/api/posts", "/api/openapi"))
        and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served and served == documented, (served, documented)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["operationId"] and operation["summary"], (method, path)
            assert {"200", "201"} & set(operation["responses"]), (method, path)
            assert "401" in operation["responses"], (method, path)
            params = {p["name"] for p in operation.get("parameters", [])}
            assert ("{post_id}" in path) == ("post_id" in params), (method, path)
    create_schema = document["components"]["schemas"]["PostInput"]
    assert set(create_schema["required"]) <= set(create_schema["properties"])
    assert set(create_schema["properties"]) == {
        "title",
        "owner",
        "kind",
        "content",
        "at",
        "cron",
        "timezone",
        "robots",
        "groups",
        "segments",
        "staff",
    }
