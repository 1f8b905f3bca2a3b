"""The WeCom simulator keeps WeCom's rules: tokens, kf sessions and quotas, rate limits, callbacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import defusedxml.ElementTree as SafeET
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from bot.wecom.crypto import CallbackCrypto
from bot.wecom.simulator import (
    DEFAULT_OPEN_KFID,
    DEFAULT_ROBOT_KEY,
    SIM_STATE,
    ManualClock,
    SimulatorConfig,
    SimulatorState,
    create_simulator,
)

CORP_ID = "wwsimtest00000001"
AGENT_ID = 1000002
CB_TOKEN = "simtoken123"
AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
APP_SECRET = "app-secret"
KF_SECRET = "kf-secret"
CONTACT_SECRET = "contact-secret"
KF = DEFAULT_OPEN_KFID
CUSTOMER = "wmCUSTOMER0000001"
START = 1_700_000_000.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def config() -> SimulatorConfig:
    return SimulatorConfig(
        corp_id=CORP_ID,
        agent_id=AGENT_ID,
        token=CB_TOKEN,
        aes_key=AES_KEY,
        secrets={APP_SECRET: "app", KF_SECRET: "kf", CONTACT_SECRET: "contact"},
        callback_timeout_s=0.3,
        servicers={KF: ("zhangsan", "lisi")},
        members=("zhangsan", "lisi", "wangwu"),
    )


@pytest.fixture
async def sim(aiohttp_client: AiohttpClient, config: SimulatorConfig, clock: ManualClock) -> TestClient[Any, Any]:
    return await aiohttp_client(create_simulator(config, clock))


def state_of(client: TestClient[Any, Any]) -> SimulatorState:
    assert client.app is not None
    state: SimulatorState = client.app[SIM_STATE]
    return state


async def get_token(client: TestClient[Any, Any], secret: str = KF_SECRET) -> str:
    resp = await client.get("/cgi-bin/gettoken", params={"corpid": CORP_ID, "corpsecret": secret})
    body = await resp.json()
    assert body["errcode"] == 0, body
    return str(body["access_token"])


async def call(client: TestClient[Any, Any], path: str, body: dict[str, Any], token: str) -> dict[str, Any]:
    resp = await client.post(path, json=body, params={"access_token": token})
    assert resp.status == 200
    result: dict[str, Any] = await resp.json()
    return result


async def control(client: TestClient[Any, Any], path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    resp = await client.post(path, json=body or {})
    result: dict[str, Any] = await resp.json()
    assert resp.status == 200, result
    return result


async def customer_writes(client: TestClient[Any, Any], text: str = "你好", user: str = CUSTOMER) -> dict[str, Any]:
    return await control(client, "/_sim/kf/customer_message", {"external_userid": user, "text": text})


def kf_text(text: str, msgid: str | None = None, user: str = CUSTOMER) -> dict[str, Any]:
    body: dict[str, Any] = {"touser": user, "open_kfid": KF, "msgtype": "text", "text": {"content": text}}
    if msgid is not None:
        body["msgid"] = msgid
    return body


# ---------------------------------------------------------------- tokens


async def test_gettoken_errors_and_reuse(sim: TestClient[Any, Any]) -> None:
    bad_corp = await (await sim.get("/cgi-bin/gettoken", params={"corpid": "x", "corpsecret": KF_SECRET})).json()
    assert bad_corp["errcode"] == 40013
    bad_secret = await (await sim.get("/cgi-bin/gettoken", params={"corpid": CORP_ID, "corpsecret": "x"})).json()
    assert bad_secret["errcode"] == 40001
    first = await (await sim.get("/cgi-bin/gettoken", params={"corpid": CORP_ID, "corpsecret": KF_SECRET})).json()
    assert first["expires_in"] == 7200
    assert await get_token(sim) == first["access_token"]  # same token while it is valid
    assert await get_token(sim, APP_SECRET) != first["access_token"]  # one token per secret

    missing = await (await sim.post("/cgi-bin/kf/sync_msg", json={})).json()
    assert missing["errcode"] == 41001
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, "garbage"))["errcode"] == 40014


async def test_token_expires_by_the_injected_clock(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim)
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, token))["errcode"] == 0
    clock.advance(7199)
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, token))["errcode"] == 0
    clock.advance(1)
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, token))["errcode"] == 42001
    fresh = await get_token(sim)
    assert fresh != token
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, fresh))["errcode"] == 0


async def test_invalidated_tokens_get_40014_until_refreshed(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    assert (await control(sim, "/_sim/tokens/invalidate"))["invalidated"] == 1
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, token))["errcode"] == 40014
    fresh = await get_token(sim)
    assert fresh != token
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, fresh))["errcode"] == 0


async def test_each_api_checks_which_secret_issued_the_token(sim: TestClient[Any, Any]) -> None:
    contact_token = await get_token(sim, CONTACT_SECRET)
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, contact_token))["errcode"] == 48002
    app_token = await get_token(sim, APP_SECRET)
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {}, app_token))["errcode"] == 0
    kf_token = await get_token(sim, KF_SECRET)
    body = {"touser": "zhangsan", "agentid": AGENT_ID, "msgtype": "text", "text": {"content": "hi"}}
    assert (await call(sim, "/cgi-bin/message/send", body, kf_token))["errcode"] == 48002


# ---------------------------------------------------------------- kf


async def test_kf_session_state_machine(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    ids = {"open_kfid": KF, "external_userid": CUSTOMER}

    async def trans(target: int, servicer: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {**ids, "service_state": target}
        if servicer is not None:
            body["servicer_userid"] = servicer
        return await call(sim, "/cgi-bin/kf/service_state/trans", body, token)

    async def current() -> tuple[int, str]:
        got = await call(sim, "/cgi-bin/kf/service_state/get", ids, token)
        return got["service_state"], got["servicer_userid"]

    assert await current() == (4, "")
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("too early"), token))["errcode"] == 95018
    await customer_writes(sim)
    assert await current() == (0, "")
    assert (await trans(1))["errcode"] == 0
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("bot here"), token))["errcode"] == 0
    assert (await trans(0))["errcode"] == 95016
    assert (await trans(1))["errcode"] == 95016

    queued = await trans(2)
    assert queued["errcode"] == 0 and queued["msg_code"]
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("queued"), token))["errcode"] == 95018
    assert (await trans(3))["errcode"] == 40058  # servicer_userid is required for 3
    assert (await trans(3, "wangwu"))["errcode"] == 95014  # a member, not a servicer of this account
    await control(sim, "/_sim/kf/servicer_status", {"open_kfid": KF, "userid": "lisi", "status": 1, "stop_type": 1})
    assert (await trans(3, "lisi"))["errcode"] == 95019
    human = await trans(3, "zhangsan")
    assert human["errcode"] == 0 and human["msg_code"]
    assert await current() == (3, "zhangsan")
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("human now"), token))["errcode"] == 95018
    transfer = await trans(3, "zhangsan")
    assert transfer["errcode"] == 0 and "msg_code" not in transfer  # only the first move to 3 yields a code
    ended = await trans(4)
    assert ended["errcode"] == 0 and ended["msg_code"]
    assert (await trans(1))["errcode"] == 95013  # an ended session waits for the customer
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("bye"), token))["errcode"] == 95018

    await customer_writes(sim, "我又来了")
    assert await current() == (0, "")
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("welcome back"), token))["errcode"] == 0


async def test_kf_quota_five_per_customer_message_and_48h(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim)
    await customer_writes(sim)
    for n in range(5):
        assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text(f"reply {n}"), token))["errcode"] == 0
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("sixth"), token))["errcode"] == 95001
    await customer_writes(sim, "还在吗")
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("yes"), token))["errcode"] == 0
    clock.advance(48 * 3600)
    token = await get_token(sim)
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("late"), token))["errcode"] == 95002
    delivered = [r for r in state_of(sim).sent if r.api == "kf/send_msg" and r.accepted]
    assert len(delivered) == 6


async def test_kf_duplicate_msgid_is_rejected_and_not_delivered_twice(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    await customer_writes(sim)
    first = await call(sim, "/cgi-bin/kf/send_msg", kf_text("once", msgid="reply-1_a"), token)
    assert first == {"errcode": 0, "errmsg": "ok", "msgid": "reply-1_a"}
    again = await call(sim, "/cgi-bin/kf/send_msg", kf_text("once", msgid="reply-1_a"), token)
    assert again["errcode"] == 40058
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("x", msgid="a" * 33), token))["errcode"] == 40058
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("x", msgid="bad id!"), token))["errcode"] == 40058
    delivered = [r for r in state_of(sim).sent_after(recipient=CUSTOMER) if r.accepted]
    assert [r.msgid for r in delivered] == ["reply-1_a"]
    # the rejected duplicate did not use up quota either
    assert state_of(sim).kf_sessions[(KF, CUSTOMER)].sent_since_customer_msg == 1


async def test_kf_send_msg_validation(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    await customer_writes(sim)
    bad_kf = {**kf_text("hi"), "open_kfid": "wkNOPE"}
    assert (await call(sim, "/cgi-bin/kf/send_msg", bad_kf, token))["errcode"] == 95000
    items = [{"type": "click", "click": {"id": str(n), "content": f"选项{n}"}} for n in range(11)]
    menu = {"touser": CUSTOMER, "open_kfid": KF, "msgtype": "msgmenu", "msgmenu": {"list": items}}
    assert (await call(sim, "/cgi-bin/kf/send_msg", menu, token))["errcode"] == 95008
    menu["msgmenu"] = {
        "head_content": "请选择",
        "list": [*items[:10], {"type": "text", "text": {"content": "或"}}],
    }
    assert (await call(sim, "/cgi-bin/kf/send_msg", menu, token))["errcode"] == 0
    long_text = kf_text("长" * 700)  # 2100 bytes of UTF-8
    assert (await call(sim, "/cgi-bin/kf/send_msg", long_text, token))["errcode"] == 45002
    rejected = [r for r in state_of(sim).sent if not r.accepted]
    assert [r.errcode for r in rejected] == [95000, 95008, 45002]


async def test_send_msg_on_event_welcome_code(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim)
    entered = await control(sim, "/_sim/kf/enter_session", {"external_userid": CUSTOMER, "scene": "qr"})
    code = entered["welcome_code"]
    assert code and entered["message"]["event"]["welcome_code"] == code
    body = {"code": code, "msgtype": "text", "text": {"content": "欢迎"}}
    assert (await call(sim, "/cgi-bin/kf/send_msg_on_event", body, token))["errcode"] == 0
    assert (await call(sim, "/cgi-bin/kf/send_msg_on_event", body, token))["errcode"] == 40058  # single use
    sent = state_of(sim).sent_after(api="kf/send_msg_on_event")
    assert [(r.recipient, r.account, r.accepted) for r in sent] == [
        (CUSTOMER, KF, True),
        (CUSTOMER, KF, False),
    ]

    # no new welcome within 48 h; forcing one and letting 20 s pass expires it
    again = await control(sim, "/_sim/kf/enter_session", {"external_userid": CUSTOMER})
    assert again["welcome_code"] is None
    forced = await control(sim, "/_sim/kf/enter_session", {"external_userid": "wmOTHER", "welcome_code": True})
    clock.advance(20)
    late = {"code": forced["welcome_code"], "msgtype": "text", "text": {"content": "欢迎"}}
    assert (await call(sim, "/cgi-bin/kf/send_msg_on_event", late, token))["errcode"] == 95002


async def test_sync_msg_pages_events_and_empty_page(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim)
    await control(sim, "/_sim/kf/enter_session", {"external_userid": CUSTOMER})
    pushed = await customer_writes(sim, "第一条")
    await call(sim, "/cgi-bin/kf/send_msg", kf_text("bot reply"), token)  # never comes back through sync
    await control(
        sim,
        "/_sim/kf/servicer_message",
        {"external_userid": CUSTOMER, "servicer_userid": "zhangsan", "text": "人工"},
    )
    await control(sim, "/_sim/kf/customer_message", {"external_userid": CUSTOMER, "text": "A", "menu_id": "menu-1"})
    await control(
        sim,
        "/_sim/kf/customer_message",
        {"external_userid": CUSTOMER, "msgtype": "image", "image": {"media_id": "MEDIA1"}},
    )
    sync_token = SafeET.fromstring(state_of(sim).deliveries[-1].plaintext).findtext("Token")
    await control(sim, "/_sim/kf/sync_options", {"page_size": 2, "empty_pages": 1})

    pages: list[dict[str, Any]] = []
    request: dict[str, Any] = {"token": sync_token, "open_kfid": KF, "limit": 1000}
    while True:
        page = await call(sim, "/cgi-bin/kf/sync_msg", request, token)
        assert page["errcode"] == 0, page
        pages.append(page)
        request["cursor"] = page["next_cursor"]
        if not page["has_more"]:
            break
    assert [len(p["msg_list"]) for p in pages] == [0, 2, 2, 1]
    assert pages[0]["has_more"] == 1
    items = [m for p in pages for m in p["msg_list"]]
    assert [m["origin"] for m in items] == [4, 3, 5, 3, 3]
    event = items[0]
    assert event["msgtype"] == "event" and "open_kfid" not in event and "external_userid" not in event
    assert event["event"]["event_type"] == "enter_session"
    assert event["event"]["open_kfid"] == KF and event["event"]["external_userid"] == CUSTOMER
    assert items[1] == pushed["message"]
    assert items[1]["text"] == {"content": "第一条"} and items[1]["send_time"] == int(START)
    assert items[2]["servicer_userid"] == "zhangsan"
    assert items[3]["text"] == {"content": "A", "menu_id": "menu-1"}
    assert items[4]["image"] == {"media_id": "MEDIA1"}
    assert all("bot reply" not in str(m) for m in items)

    # the cursor carries on: nothing new, then the next message only
    assert (await call(sim, "/cgi-bin/kf/sync_msg", request, token))["msg_list"] == []
    await customer_writes(sim, "新的")
    newer = await call(sim, "/cgi-bin/kf/sync_msg", request, token)
    assert [m["text"]["content"] for m in newer["msg_list"]] == ["新的"]

    assert (await call(sim, "/cgi-bin/kf/sync_msg", {"token": "ENCbogus"}, token))["errcode"] == 95007
    clock.advance(600)
    token = await get_token(sim)
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {"token": sync_token}, token))["errcode"] == 95007
    assert (await call(sim, "/cgi-bin/kf/sync_msg", {"limit": 1001}, token))["errcode"] == 40058


async def test_servicer_list(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    await control(sim, "/_sim/kf/servicer_status", {"open_kfid": KF, "userid": "lisi", "status": 1})
    resp = await sim.get("/cgi-bin/kf/servicer/list", params={"access_token": token, "open_kfid": KF})
    body = await resp.json()
    assert body["servicer_list"] == [
        {"userid": "zhangsan", "status": 0},
        {"userid": "lisi", "status": 1, "stop_type": 0},
    ]
    resp = await sim.get("/cgi-bin/kf/servicer/list", params={"access_token": token, "open_kfid": "wkNOPE"})
    assert (await resp.json())["errcode"] == 95000


# ---------------------------------------------------------------- robot and app messages


async def test_robot_45009_at_21st_message_and_recovery(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    async def robot(body: dict[str, Any], key: str = DEFAULT_ROBOT_KEY) -> int:
        resp = await sim.post("/cgi-bin/webhook/send", params={"key": key}, json=body)
        return int((await resp.json())["errcode"])

    text = {"msgtype": "text", "text": {"content": "早上好"}}
    assert await robot(text, key="nope") == 93000
    for _ in range(19):
        assert await robot(text) == 0
    # a failed send counts towards the 20/min too
    assert await robot({"msgtype": "markdown", "markdown": {"content": "x" * 4097}}) == 45002
    assert await robot(text) == 45009
    clock.advance(59)
    assert await robot(text) == 45009
    clock.advance(1)
    assert await robot(text) == 0
    log = state_of(sim).sent_after(recipient=DEFAULT_ROBOT_KEY)
    assert [r.status for r in log].count("delivered") == 20
    assert [r.errcode for r in log if not r.accepted] == [45002, 45009, 45009]


async def test_app_message_per_member_rate_limit_drops_silently(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim, APP_SECRET)

    async def send(touser: str, content: str) -> dict[str, Any]:
        body = {"touser": touser, "agentid": AGENT_ID, "msgtype": "text", "text": {"content": content}}
        return await call(sim, "/cgi-bin/message/send", body, token)

    for n in range(30):
        assert (await send("zhangsan", f"m{n}"))["errcode"] == 0
    over = await send("zhangsan|lisi", "m30")
    assert over["errcode"] == 0 and over["msgid"]
    state = state_of(sim)
    assert state.sent[-2].recipient == "zhangsan" and state.sent[-2].status == "dropped"
    assert state.sent[-1].recipient == "lisi" and state.sent[-1].status == "delivered"
    clock.advance(60)
    assert (await send("zhangsan", "after a minute"))["errcode"] == 0
    assert state.sent[-1].status == "delivered"


async def test_app_message_validation_and_duplicate_check(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim, APP_SECRET)
    body: dict[str, Any] = {
        "touser": "zhangsan|ghost",
        "agentid": AGENT_ID,
        "msgtype": "text",
        "text": {"content": "hi"},
    }
    partly = await call(sim, "/cgi-bin/message/send", body, token)
    assert partly["errcode"] == 0 and partly["invaliduser"] == "ghost"
    assert (await call(sim, "/cgi-bin/message/send", {**body, "touser": "ghost"}, token))["errcode"] == 81013
    assert (await call(sim, "/cgi-bin/message/send", {**body, "agentid": 1}, token))["errcode"] == 40056
    assert (await call(sim, "/cgi-bin/message/send", {**body, "msgtype": "bogus"}, token))["errcode"] == 40008
    too_long = {**body, "text": {"content": "x" * 2049}}
    assert (await call(sim, "/cgi-bin/message/send", too_long, token))["errcode"] == 45002

    checked = {**body, "touser": "lisi", "enable_duplicate_check": 1, "duplicate_check_interval": 600}
    assert (await call(sim, "/cgi-bin/message/send", checked, token))["errcode"] == 0
    assert (await call(sim, "/cgi-bin/message/send", checked, token))["errcode"] == 0
    clock.advance(600)
    assert (await call(sim, "/cgi-bin/message/send", checked, token))["errcode"] == 0
    assert [r.status for r in state_of(sim).sent_after(recipient="lisi")] == [
        "delivered",
        "duplicate",
        "delivered",
    ]


# ---------------------------------------------------------------- external contacts


async def test_send_welcome_msg_window_and_single_use(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim, CONTACT_SECRET)
    add = {"userid": "zhangsan", "external_userid": "wmNEW1", "name": "张三的客户", "state": "ad1"}
    code = (await control(sim, "/_sim/contact/event", add))["welcome_code"]
    clock.advance(20)
    late = {"welcome_code": code, "text": {"content": "你好"}}
    assert (await call(sim, "/cgi-bin/externalcontact/send_welcome_msg", late, token))["errcode"] == 41050

    code = (await control(sim, "/_sim/contact/event", {**add, "external_userid": "wmNEW2"}))["welcome_code"]
    clock.advance(19)
    ok = {"welcome_code": code, "text": {"content": "你好"}}
    assert (await call(sim, "/cgi-bin/externalcontact/send_welcome_msg", ok, token))["errcode"] == 0
    assert (await call(sim, "/cgi-bin/externalcontact/send_welcome_msg", ok, token))["errcode"] == 41051
    bogus = {"welcome_code": "nope", "text": {"content": "你好"}}
    assert (await call(sim, "/cgi-bin/externalcontact/send_welcome_msg", bogus, token))["errcode"] == 41050
    assert [r.recipient for r in state_of(sim).sent if r.accepted] == ["wmNEW2"]

    no_code = await control(sim, "/_sim/contact/event", {**add, "external_userid": "wmNEW3", "welcome_code": False})
    assert no_code["welcome_code"] is None


async def test_external_contact_tags_and_relation(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim, CONTACT_SECRET)
    await control(sim, "/_sim/contact/event", {"userid": "zhangsan", "external_userid": "wmC1", "name": "客户一"})
    tags = await call(sim, "/cgi-bin/externalcontact/get_corp_tag_list", {}, token)
    vip = tags["tag_group"][0]["tag"][0]
    assert vip["name"] == "VIP"
    mark = {"userid": "zhangsan", "external_userid": "wmC1", "add_tag": [vip["id"]]}
    assert (await call(sim, "/cgi-bin/externalcontact/mark_tag", mark, token))["errcode"] == 0
    assert (await call(sim, "/cgi-bin/externalcontact/mark_tag", {**mark, "add_tag": ["etX"]}, token))[
        "errcode"
    ] == 40068

    resp = await sim.get("/cgi-bin/externalcontact/get", params={"access_token": token, "external_userid": "wmC1"})
    got = await resp.json()
    assert got["external_contact"]["name"] == "客户一"
    assert got["follow_user"][0]["tags"] == [
        {"group_name": "客户等级", "tag_name": "VIP", "type": 1, "tag_id": vip["id"]}
    ]

    await control(
        sim,
        "/_sim/contact/event",
        {"change_type": "del_follow_user", "userid": "zhangsan", "external_userid": "wmC1"},
    )
    resp = await sim.get("/cgi-bin/externalcontact/get", params={"access_token": token, "external_userid": "wmC1"})
    assert (await resp.json())["errcode"] == 84061


async def test_add_msg_template_four_per_natural_month(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    token = await get_token(sim, CONTACT_SECRET)
    await control(sim, "/_sim/contact/event", {"userid": "zhangsan", "external_userid": "wmM1"})
    body = {
        "chat_type": "single",
        "external_userid": ["wmM1", "wmUNKNOWN"],
        "sender": "zhangsan",
        "text": {"content": "月报"},
    }
    msgids = []
    for _ in range(4):
        created = await call(sim, "/cgi-bin/externalcontact/add_msg_template", body, token)
        assert created["errcode"] == 0 and created["fail_list"] == ["wmUNKNOWN"]
        msgids.append(created["msgid"])
    assert (await call(sim, "/cgi-bin/externalcontact/add_msg_template", body, token))["errcode"] == 41048

    task = await call(sim, "/cgi-bin/externalcontact/get_groupmsg_task", {"msgid": msgids[0]}, token)
    assert task["task_list"] == [{"userid": "zhangsan", "status": 0}]
    assert (await control(sim, "/_sim/groupmsg/confirm", {"msgid": msgids[0]}))["sent"] == 1
    result = await call(sim, "/cgi-bin/externalcontact/get_groupmsg_send_result", {"msgid": msgids[0]}, token)
    assert result["send_list"] == [
        {"external_userid": "wmM1", "userid": "zhangsan", "status": 1, "send_time": int(START)}
    ]
    clock.advance(31 * 86400)  # 2023-11-14 → mid December: a new natural month
    token = await get_token(sim, CONTACT_SECRET)
    assert (await call(sim, "/cgi-bin/externalcontact/add_msg_template", body, token))["errcode"] == 0


async def test_groupchat_list_and_get(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim, CONTACT_SECRET)
    listed = await call(sim, "/cgi-bin/externalcontact/groupchat/list", {"limit": 10}, token)
    chat_id = listed["group_chat_list"][0]["chat_id"]
    assert listed["next_cursor"] == ""
    got = await call(sim, "/cgi-bin/externalcontact/groupchat/get", {"chat_id": chat_id, "need_name": 1}, token)
    assert got["group_chat"]["owner"] == "zhangsan"
    assert (await call(sim, "/cgi-bin/externalcontact/groupchat/get", {"chat_id": "nope"}, token))["errcode"] == 90501


# ---------------------------------------------------------------- callbacks


@dataclass
class Receiver:
    """A stand-in for the bot's /wecom/callback; `plan` gives the reaction per attempt."""

    plan: list[str] = field(default_factory=list)  # "ok", "hang", or an HTTP status like "500"
    requests: list[tuple[dict[str, str], str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.query), await request.text()))
        action = self.plan.pop(0) if self.plan else "ok"
        if action == "hang":
            await self.release.wait()
        if action.isdigit():
            return web.Response(status=int(action))
        return web.Response(text="")

    async def verify(self, request: web.Request) -> web.Response:
        q = request.query
        crypto = CallbackCrypto(CB_TOKEN, AES_KEY, CORP_ID)
        return web.Response(
            text=crypto.verify_and_decrypt(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"])
        )


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[Receiver, TestServer]]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/wecom/callback", receiver.handle)
    app.router.add_get("/wecom/callback", receiver.verify)
    server = await aiohttp_server(app)
    yield receiver, server
    receiver.release.set()


@pytest.fixture
async def wired(
    sim: TestClient[Any, Any], receiver: tuple[Receiver, TestServer]
) -> tuple[TestClient[Any, Any], Receiver]:
    await control(sim, "/_sim/callback_url", {"url": str(receiver[1].make_url("/wecom/callback"))})
    return sim, receiver[0]


def open_envelope(query: dict[str, str], body: str) -> tuple[Any, str]:
    envelope = SafeET.fromstring(body)
    assert envelope.findtext("ToUserName") == CORP_ID
    assert envelope.findtext("AgentID") == str(AGENT_ID)
    encrypted = envelope.findtext("Encrypt")
    crypto = CallbackCrypto(CB_TOKEN, AES_KEY, CORP_ID)
    plain = crypto.verify_and_decrypt(query["msg_signature"], query["timestamp"], query["nonce"], encrypted)
    return SafeET.fromstring(plain), plain


async def test_pushed_kf_message_reaches_the_callback_encrypted_and_signed(
    wired: tuple[TestClient[Any, Any], Receiver],
) -> None:
    sim, receiver = wired
    pushed = await control(sim, "/_sim/kf/customer_message", {"external_userid": CUSTOMER, "text": "hi", "wait": True})
    assert pushed["callback"]["outcome"] == "delivered"
    assert [a["status"] for a in pushed["callback"]["attempts"]] == [200]
    ((query, body),) = receiver.requests
    assert query["timestamp"] == str(int(START))
    xml, _ = open_envelope(query, body)
    assert xml.findtext("Event") == "kf_msg_or_event"
    assert xml.findtext("MsgType") == "event"
    assert xml.findtext("OpenKfId") == KF
    assert xml.findtext("ToUserName") == CORP_ID
    token = await get_token(sim)
    synced = await call(sim, "/cgi-bin/kf/sync_msg", {"token": xml.findtext("Token")}, token)
    assert synced["msg_list"] == [pushed["message"]]


async def test_callback_retried_until_200(wired: tuple[TestClient[Any, Any], Receiver]) -> None:
    sim, receiver = wired
    receiver.plan = ["hang", "500"]
    pushed = await control(sim, "/_sim/kf/customer_message", {"external_userid": CUSTOMER, "text": "hi", "wait": True})
    attempts = pushed["callback"]["attempts"]
    assert [(a["status"], a["error"]) for a in attempts] == [(None, "timeout"), (500, None), (200, None)]
    assert pushed["callback"]["outcome"] == "delivered"
    assert len(receiver.requests) == 3
    assert all(r == receiver.requests[0] for r in receiver.requests)  # the same request each time
    logged = (await (await sim.get("/_sim/callbacks")).json())["callbacks"]
    assert logged[-1]["attempts"] == attempts


async def test_callback_gives_up_after_callback_tries(wired: tuple[TestClient[Any, Any], Receiver]) -> None:
    sim, receiver = wired
    receiver.plan = ["503", "503", "503", "503"]
    pushed = await control(sim, "/_sim/kf/customer_message", {"external_userid": CUSTOMER, "text": "hi", "wait": True})
    assert pushed["callback"]["outcome"] == "failed"
    assert len(receiver.requests) == 3


async def test_app_message_and_contact_event_callbacks_and_redelivery(
    wired: tuple[TestClient[Any, Any], Receiver],
) -> None:
    sim, receiver = wired
    pushed = await control(sim, "/_sim/app/message", {"from_userid": "lisi", "text": "请假", "wait": True})
    xml, _ = open_envelope(*receiver.requests[-1])
    assert xml.findtext("MsgType") == "text" and xml.findtext("Content") == "请假"
    assert xml.findtext("FromUserName") == "lisi" and xml.findtext("AgentID") == str(AGENT_ID)
    assert xml.findtext("MsgId") == str(pushed["msgid"])

    again = await control(sim, f"/_sim/callbacks/{pushed['callback']['id']}/redeliver", {"wait": True})
    assert again["callback"]["redelivery_of"] == pushed["callback"]["id"]
    assert receiver.requests[-1] == receiver.requests[-2]

    added = await control(
        sim,
        "/_sim/contact/event",
        {"userid": "zhangsan", "external_userid": "wmX", "state": "s1", "wait": True},
    )
    xml, _ = open_envelope(*receiver.requests[-1])
    assert xml.findtext("Event") == "change_external_contact"
    assert xml.findtext("ChangeType") == "add_external_contact"
    assert xml.findtext("FromUserName") == "sys"
    assert xml.findtext("WelcomeCode") == added["welcome_code"]
    assert xml.findtext("State") == "s1"


async def test_verify_callback_url_round_trip(wired: tuple[TestClient[Any, Any], Receiver]) -> None:
    sim, _ = wired
    for _ in range(5):  # several random echostrs, so "+" and "/" in base64 get exercised
        result = await control(sim, "/_sim/verify_callback")
        assert result["ok"] is True, result


# ---------------------------------------------------------------- control API


async def test_sent_long_poll_wakes_on_a_new_message(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    await customer_writes(sim)
    after = len(state_of(sim).sent)
    poll = asyncio.ensure_future(sim.get("/_sim/sent", params={"after": after, "wait": 10, "recipient": CUSTOMER}))
    # whichever runs first, the poll must return the send: it only looks at records after `after`
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("hello"), token))["errcode"] == 0
    got = await (await poll).json()
    (record,) = got["sent"]
    assert record["api"] == "kf/send_msg" and record["content"] == {"content": "hello"} and record["accepted"]

    idle = await (await sim.get("/_sim/sent", params={"after": got["last_seq"], "wait": 0})).json()
    assert idle["sent"] == []


async def test_state_wait_sent_in_process(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    await customer_writes(sim)
    state = state_of(sim)
    waiter = asyncio.ensure_future(state.wait_sent(len(state.sent), count=2, wait_s=10))
    await call(sim, "/cgi-bin/kf/send_msg", kf_text("one"), token)
    await call(sim, "/cgi-bin/kf/send_msg", kf_text("two"), token)
    assert [r.content["content"] for r in await waiter] == ["one", "two"]


async def test_fault_injection(sim: TestClient[Any, Any]) -> None:
    token = await get_token(sim)
    await customer_writes(sim)
    await control(sim, "/_sim/faults", {"path": "/cgi-bin/kf/send_msg", "count": 2, "errcode": -1})
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("a"), token))["errcode"] == -1
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("a"), token))["errcode"] == -1
    assert (await call(sim, "/cgi-bin/kf/send_msg", kf_text("a"), token))["errcode"] == 0
    await control(sim, "/_sim/faults", {"path": "/cgi-bin/gettoken", "http_status": 502})
    resp = await sim.get("/cgi-bin/gettoken", params={"corpid": CORP_ID, "corpsecret": KF_SECRET})
    assert resp.status == 502
    assert (await (await sim.get("/_sim/faults")).json())["faults"] == []
    calls = (await (await sim.get("/_sim/calls")).json())["calls"]
    assert [c["errcode"] for c in calls if c["path"] == "/cgi-bin/kf/send_msg"] == [-1, -1, 0]


async def test_clock_control(sim: TestClient[Any, Any], clock: ManualClock) -> None:
    assert (await control(sim, "/_sim/clock/advance", {"seconds": 90}))["now"] == START + 90
    assert clock.now() == START + 90
    bad = await sim.post("/_sim/clock/advance", json={"seconds": -1})
    assert bad.status == 400


async def test_fixed_clock_cannot_be_advanced(aiohttp_client: AiohttpClient, config: SimulatorConfig) -> None:
    class Fixed:
        def now(self) -> float:
            return START

    client = await aiohttp_client(create_simulator(config, Fixed()))
    resp = await client.post("/_sim/clock/advance", json={"seconds": 1})
    assert resp.status == 400


def test_factory_exposes_state(config: SimulatorConfig, clock: ManualClock) -> None:
    app = create_simulator(config, clock)
    state: SimulatorState = app[SIM_STATE]
    assert state.clock is clock and state.callback_url is None
    with pytest.raises(ValueError):
        create_simulator(SimulatorConfig(CORP_ID, AGENT_ID, CB_TOKEN, AES_KEY, callback_tries=0))


async def test_mounted_as_a_sub_app_like_the_sandbox(aiohttp_client: AiohttpClient, config: SimulatorConfig) -> None:
    parent = web.Application()
    sub = create_simulator(config, ManualClock(START))
    parent.add_subapp("/sandbox/wecom", sub)
    client = await aiohttp_client(parent)
    await control(client, "/sandbox/wecom/_sim/faults", {"path": "/cgi-bin/gettoken", "errcode": -1})
    params = {"corpid": CORP_ID, "corpsecret": KF_SECRET}
    faulted = await (await client.get("/sandbox/wecom/cgi-bin/gettoken", params=params)).json()
    assert faulted["errcode"] == -1
    ok = await (await client.get("/sandbox/wecom/cgi-bin/gettoken", params=params)).json()
    assert ok["errcode"] == 0
    assert [c.path for c in sub[SIM_STATE].calls] == ["/cgi-bin/gettoken"] * 2
