"""The admin API: run-time script edits validated, versioned, audited and hot-reloaded; tokens and roles enforced."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.app import Services, create_app, open_services
from bot.auth import new_token, token_hash
from bot.settings import Settings
from bot.storage.models import StaffRole
from handlers.domain import Channel, SystemClock
from handlers.tags import TagSource
from scripts_library import DEFAULT_LIBRARY
from tests.conftest import Backend, make_settings

EDITED = """\
id: order.logistics
title: 订单物流查询（运行时修改）
triggers:
  keywords_any: [物流, 快递]
reply:
  - text: "运行时修改后的物流回复"
"""

# Line 5 names a tag the vocabulary does not declare.
UNKNOWN_TAG = """\
id: order.logistics
title: 订单物流查询
triggers:
  keywords_any: [物流]
audience: {any_of: [不存在的标签]}
reply:
  - text: "x"
"""

NEW_SCRIPT = {
    "id": "promo.double11",
    "title": "双十一活动",
    "triggers": {"keywords_any": ["双十一"]},
    "reply": [{"text": "双十一活动详情请看店铺首页公告。"}],
}


@dataclass
class Api:
    client: TestClient
    services: Services
    settings: Settings
    tokens: dict[StaffRole, str]

    async def call(self, method: str, path: str, role: StaffRole | None = StaffRole.ADMIN, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role is not None else {}
        response = await self.client.request(method, path, headers=headers, **kw)
        return response.status, await response.json()


async def add_token(services: Services, username: str, role: StaffRole) -> str:
    user = await services.repos.staff.add_user(username, role, team="售后")
    token = new_token()
    await services.repos.staff.add_token(user.id, "test", token_hash(token))
    return token


@pytest.fixture
async def api(backend: Backend, tmp_path: Path) -> AsyncIterator[Api]:
    library = tmp_path / "library"
    shutil.copytree(DEFAULT_LIBRARY, library)
    settings = make_settings(backend, scripts_path=str(library), scripts_reload_interval_s=0, auto_migrate=True)
    async with open_services(settings, clock=SystemClock()) as services:
        tokens = {role: await add_token(services, f"u-{role.value}", role) for role in StaffRole}
        client = TestClient(TestServer(create_app(services, worker_count=0)))
        await client.start_server()
        try:
            yield Api(client, services, settings, tokens)
        finally:
            await client.close()


def default_text(services: Services, script_id: str) -> str:
    script = services.scripts.library.get(script_id)
    assert script is not None
    return script.variants[0].replies[0].text


# ------------------------------------------------------------------------------------------------ auth


async def test_requests_without_a_valid_token_are_refused(api: Api) -> None:
    status, body = await api.call("GET", "/api/scripts", role=None)
    assert status == 401 and body["error"] == "unauthenticated"
    response = await api.client.get("/api/scripts", headers={"Authorization": "Bearer wcb_not-a-token"})
    assert response.status == 401
    response = await api.client.get("/api/scripts", headers={"Authorization": "Basic abc"})
    assert response.status == 401


async def test_a_revoked_token_or_disabled_account_stops_working(api: Api) -> None:
    assert (await api.call("GET", "/api/me", role=StaffRole.AGENT))[0] == 200
    await api.services.repos.staff.set_active("u-agent", False)
    assert (await api.call("GET", "/api/me", role=StaffRole.AGENT))[0] == 401
    lead = (await api.services.repos.staff.list_tokens())[1]
    assert await api.services.repos.staff.revoke_token(lead.id)
    assert (await api.call("GET", "/api/me", role=StaffRole.LEAD))[0] == 401


async def test_roles_decide_who_may_edit(api: Api) -> None:
    status, me = await api.call("GET", "/api/me", role=StaffRole.AGENT)
    assert status == 200 and me["role"] == "agent" and me["permissions"] == ["scripts:read"]
    assert (await api.call("GET", "/api/scripts", role=StaffRole.AGENT))[0] == 200
    status, body = await api.call("PUT", "/api/scripts/order.logistics", role=StaffRole.AGENT, json={"yaml": EDITED})
    assert status == 403 and body["error"] == "forbidden"
    assert (await api.call("GET", "/api/audit", role=StaffRole.AGENT))[0] == 403
    assert await api.services.repos.script_revisions.history("order.logistics") == []
    status, _ = await api.call("PUT", "/api/scripts/order.logistics", role=StaffRole.LEAD, json={"yaml": EDITED})
    assert status == 200


# ------------------------------------------------------------------------------------------------ edits


async def test_an_edit_is_validated_stored_audited_and_served_at_once(api: Api) -> None:
    before = api.services.scripts.fingerprint
    status, body = await api.call(
        "PUT", "/api/scripts/order.logistics", json={"yaml": EDITED, "comment": "双十一文案", "base_version": 0}
    )
    assert status == 200, body
    assert body["version"] == 1 and body["applied"] is True and body["fingerprint"] != before
    assert default_text(api.services, "order.logistics") == "运行时修改后的物流回复"

    status, listing = await api.call("GET", "/api/scripts", role=StaffRole.AGENT)
    entry = next(s for s in listing["scripts"] if s["id"] == "order.logistics")
    assert entry["source"] == "api" and entry["version"] == 1 and entry["file"] == "db:order.logistics@v1"

    status, shown = await api.call("GET", "/api/scripts/order.logistics")
    assert shown["yaml"] == EDITED and [r["version"] for r in shown["revisions"]] == [1]
    status, audit = await api.call("GET", "/api/audit?target=script:order.logistics")
    assert [(e["actor"], e["action"], e["detail"]["version"]) for e in audit["entries"]] == [
        ("u-admin", "script.edit", 1)
    ]


async def test_an_invalid_edit_is_refused_with_file_and_line_and_nothing_changes(api: Api) -> None:
    before = (api.services.scripts.fingerprint, default_text(api.services, "order.logistics"))
    status, body = await api.call("PUT", "/api/scripts/order.logistics", json={"yaml": UNKNOWN_TAG})
    assert status == 422 and body["error"] == "invalid_script"
    [problem] = body["problems"]
    assert problem["file"] == "db:order.logistics@v1" and problem["line"] == 5
    assert "不存在的标签" in problem["message"]
    assert await api.services.repos.script_revisions.history("order.logistics") == []
    assert (api.services.scripts.fingerprint, default_text(api.services, "order.logistics")) == before


async def test_validate_is_a_dry_run(api: Api) -> None:
    status, body = await api.call("POST", "/api/scripts/validate", role=StaffRole.AGENT, json={"yaml": UNKNOWN_TAG})
    assert status == 200 and body["valid"] is False and body["problems"][0]["line"] == 5
    status, body = await api.call("POST", "/api/scripts/validate", role=StaffRole.AGENT, json={"script": NEW_SCRIPT})
    assert status == 200 and body == {"valid": True, "problems": []}
    assert await api.services.repos.script_revisions.head() == 0


async def test_a_stale_base_version_is_a_conflict(api: Api) -> None:
    assert (await api.call("PUT", "/api/scripts/order.logistics", json={"yaml": EDITED, "base_version": 0}))[0] == 200
    status, body = await api.call("PUT", "/api/scripts/order.logistics", json={"yaml": EDITED, "base_version": 0})
    assert status == 409 and body["current"] == 1


async def test_two_concurrent_edits_from_the_same_version_one_wins(api: Api) -> None:
    bodies = [{"yaml": EDITED.replace("运行时", f"第{i}次"), "base_version": 0} for i in range(2)]
    edits = [api.call("PUT", "/api/scripts/order.logistics", json=body) for body in bodies]
    statuses = sorted(status for status, _ in await asyncio.gather(*edits))
    assert statuses == [200, 409]
    assert [r.version for r in await api.services.repos.script_revisions.history("order.logistics")] == [1]


async def test_a_new_script_can_be_added_as_json_then_deleted_then_restored(api: Api) -> None:
    status, body = await api.call("PUT", "/api/scripts/promo.double11", json={"script": NEW_SCRIPT})
    assert status == 200 and body["version"] == 1
    assert default_text(api.services, "promo.double11") == "双十一活动详情请看店铺首页公告。"

    status, body = await api.call("DELETE", "/api/scripts/promo.double11")
    assert status == 200 and body["version"] == 2
    assert api.services.scripts.library.get("promo.double11") is None
    assert (await api.call("DELETE", "/api/scripts/promo.double11"))[0] == 404

    status, body = await api.call("POST", "/api/scripts/promo.double11/rollback", json={"version": 1})
    assert status == 200 and body["version"] == 3
    assert default_text(api.services, "promo.double11") == "双十一活动详情请看店铺首页公告。"


async def test_restore_brings_back_the_files_version(api: Api) -> None:
    original = default_text(api.services, "order.logistics")
    fingerprint = api.services.scripts.fingerprint
    await api.call("PUT", "/api/scripts/order.logistics", json={"yaml": EDITED})
    assert (await api.call("DELETE", "/api/scripts/order.logistics"))[0] == 200
    assert api.services.scripts.library.get("order.logistics") is None
    status, body = await api.call("POST", "/api/scripts/order.logistics/restore", json={"comment": "撤销"})
    assert status == 200 and body["version"] == 3
    assert default_text(api.services, "order.logistics") == original
    assert api.services.scripts.fingerprint == fingerprint  # nothing overridden: the files' own fingerprint
    assert (await api.call("POST", "/api/scripts/order.logistics/restore", json={}))[0] == 404


@pytest.mark.parametrize(
    ("path", "payload", "status", "error"),
    [
        ("/api/scripts/order.logistics", {"yaml": EDITED.replace("order.logistics", "other.id")}, 400, "id_mismatch"),
        ("/api/scripts/order.logistics", {"yaml": EDITED, "script": NEW_SCRIPT}, 400, "bad_field"),
        ("/api/scripts/order.logistics", {"yaml": "- just\n- a list\n"}, 422, "invalid_script"),
        ("/api/scripts/order.logistics", {"yaml": EDITED, "base_version": "one"}, 400, "bad_field"),
        ("/api/scripts/bad%20id", {"yaml": EDITED}, 400, "bad_script_id"),
        ("/api/scripts/order.logistics", {"yaml": "x" * 70_000}, 413, "too_large"),
    ],
)
async def test_bad_requests_get_a_clear_error(api: Api, path: str, payload: object, status: int, error: str) -> None:
    got_status, body = await api.call("PUT", path, json=payload)
    assert (got_status, body["error"]) == (status, error)
    assert body["message"]


async def test_malformed_json_and_oversized_bodies(api: Api) -> None:
    headers = {"Authorization": f"Bearer {api.tokens[StaffRole.ADMIN]}", "Content-Type": "application/json"}
    response = await api.client.put("/api/scripts/order.logistics", data=b"{not json", headers=headers)
    assert response.status == 400 and (await response.json())["error"] == "bad_json"
    response = await api.client.put("/api/scripts/order.logistics", data=b"[1, 2]", headers=headers)
    assert response.status == 400
    response = await api.client.put("/api/scripts/order.logistics", data=b" " * 1_100_000, headers=headers)
    assert response.status == 413


# ------------------------------------------------------------------------------------------------ orders


async def test_orders_by_api_are_stored_once_and_the_buyer_is_retagged(api: Api) -> None:
    orders = [
        {"external_userid": "wmBuyer01", "order_id": "A-1", "amount": "199.00", "paid_at": "2026-11-01 10:00:00"},
        {"external_userid": "wmBuyer01", "order_id": "A-2", "amount": 88, "paid_at": "2026-11-02T10:00:00+08:00"},
        {"external_userid": "wmBuyer02", "order_id": "B-1", "amount": "-5", "paid_at": "2026-11-01 10:00:00"},
    ]
    status, body = await api.call("POST", "/api/orders", json={"orders": orders})
    assert status == 200, body
    assert (body["ok"], body["rows"], body["imported"], body["unchanged"]) == (False, 3, 2, 0)
    assert [b["index"] for b in body["bad"]] == [3] and "amount" in body["bad"][0]["reason"]
    assert body["tags_recomputed"] >= 1

    customers = api.services.repos.conversations
    buyer = await customers.get_customer(Channel.CONTACT, "wmBuyer01")
    assert buyer is not None
    computed = (await api.services.repos.tags.tags_by_source(buyer.id))[TagSource.COMPUTED]
    assert any(tag.startswith("rfm:") and tag != "rfm:none" for tag in computed), computed

    status, again = await api.call("POST", "/api/orders", json={"orders": orders[:2]})
    assert (status, again["ok"], again["imported"], again["unchanged"]) == (200, True, 0, 2)
    status, audit = await api.call("GET", "/api/audit?target=orders:api")
    assert [e["detail"]["imported"] for e in audit["entries"]] == [0, 2]


@pytest.mark.parametrize(
    ("role", "payload", "status"),
    [
        (StaffRole.LEAD, {"orders": [{"order_id": "x"}]}, 403),
        (StaffRole.ADMIN, {"orders": []}, 400),
        (StaffRole.ADMIN, {"orders": "A-1"}, 400),
        (StaffRole.ADMIN, {"orders": [{"order_id": "x"}] * 5001}, 400),
        (StaffRole.ADMIN, {"orders": [{"order_id": "x"}], "source": "x" * 33}, 400),
    ],
)
async def test_order_requests_are_checked(api: Api, role: StaffRole, payload: object, status: int) -> None:
    assert (await api.call("POST", "/api/orders", role=role, json=payload))[0] == status


# ------------------------------------------------------------------------------------------------ other processes


async def test_another_process_picks_up_the_edit_and_a_restart_keeps_it(api: Api) -> None:
    settings = api.settings
    async with open_services(settings, clock=SystemClock()) as other:
        assert await other.scripts_watcher.check_once() == "unchanged"
        status, body = await api.call("PUT", "/api/scripts/order.logistics", json={"yaml": EDITED})
        assert status == 200
        assert await other.scripts_watcher.check_once() == "reloaded"
        assert other.scripts.fingerprint == body["fingerprint"]
        assert default_text(other, "order.logistics") == "运行时修改后的物流回复"
    async with open_services(settings, clock=SystemClock()) as restarted:
        assert restarted.scripts.fingerprint == body["fingerprint"]
        assert default_text(restarted, "order.logistics") == "运行时修改后的物流回复"
