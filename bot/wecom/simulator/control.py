"""The `/_sim/` control API: play customers and staff, read what the bot sent, move the clock, inject faults.

Every push has a plain function (usable in-process by tests) and a JSON route over it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .api import OAUTH_CODE_TTL_S, confirm_groupmsg, dumps, jssdk_state, mint_oauth_code
from .callbacks import (
    app_event_xml,
    app_text_xml,
    build_delivery,
    external_contact_xml,
    kf_event_xml,
    redelivery,
    start_delivery,
    verify_url,
)
from .config import AdjustableClock
from .state import (
    KF_SESSION_ENDED,
    KF_SESSION_NEW,
    KF_WINDOW_S,
    SIM_STATE,
    WELCOME_CODE_TTL_S,
    CallbackDelivery,
    ExternalContact,
    Fault,
    Follow,
    KfMsgCode,
    SimulatorState,
    WelcomeCode,
    random_token,
)

JsonDict = dict[str, Any]
SEND_LONG_POLL_MAX_S = 60.0


class ControlError(ValueError):
    """A bad control request; answered with HTTP 400."""


# ---------------------------------------------------------------- in-process pushes


def _require_kfid(state: SimulatorState, open_kfid: str | None) -> str:
    kfid = open_kfid or state.config.kf_accounts[0]
    if kfid not in state.config.kf_accounts:
        raise ControlError(f"unknown open_kfid {kfid!r}")
    return kfid


def _notify_kf(state: SimulatorState, open_kfid: str) -> CallbackDelivery:
    token = state.new_sync_token(open_kfid)
    delivery = build_delivery(state, "kf_msg_or_event", kf_event_xml(state, open_kfid, token))
    start_delivery(state, delivery)
    return delivery


def push_kf_customer_message(
    state: SimulatorState,
    external_userid: str,
    text: str | None = None,
    *,
    open_kfid: str | None = None,
    msgtype: str = "text",
    content: JsonDict | None = None,
    menu_id: str | None = None,
) -> tuple[JsonDict, CallbackDelivery]:
    """A WeChat customer writes: stored for sync_msg, session reopened, quota refreshed, bot notified."""
    kfid = _require_kfid(state, open_kfid)
    if not external_userid:
        raise ControlError("external_userid is required")
    if msgtype == "text":
        if text is None and content is None:
            raise ControlError("text is required for a text message")
        body: JsonDict = dict(content or {"content": text})
        if menu_id:
            body["menu_id"] = menu_id
    else:
        body = dict(content or {})
    now = state.now()
    session = state.kf_session(kfid, external_userid)
    if session.state == KF_SESSION_ENDED:
        session.state = KF_SESSION_NEW
        session.servicer_userid = ""
        session.code_states.clear()
    session.last_customer_msg_at = now
    session.sent_since_customer_msg = 0
    session.has_messaged = True
    item: JsonDict = {
        "msgid": state.kf_msgid(),
        "open_kfid": kfid,
        "external_userid": external_userid,
        "send_time": int(now),
        "origin": 3,
        "msgtype": msgtype,
        msgtype: body,
    }
    state.store_kf_message(kfid, item)
    return item, _notify_kf(state, kfid)


def push_kf_event(
    state: SimulatorState, event_type: str, fields: JsonDict, *, open_kfid: str | None = None
) -> tuple[JsonDict, CallbackDelivery]:
    """A system event (origin 4); account and customer sit inside `event`, as WeCom puts them."""
    kfid = _require_kfid(state, open_kfid)
    item: JsonDict = {
        "msgid": state.kf_msgid(),
        "send_time": int(state.now()),
        "origin": 4,
        "msgtype": "event",
        "event": {"event_type": event_type, "open_kfid": kfid, **fields},
    }
    state.store_kf_message(kfid, item)
    return item, _notify_kf(state, kfid)


def push_kf_enter_session(
    state: SimulatorState,
    external_userid: str,
    *,
    open_kfid: str | None = None,
    scene: str = "",
    scene_param: str = "",
    welcome_code: bool | None = None,
) -> tuple[JsonDict, KfMsgCode | None, CallbackDelivery]:
    """The customer opens the chat. A welcome_code comes only for a customer who never wrote to this
    account and got no welcome in 48 h (reference §4.2); `welcome_code` forces it on or off."""
    kfid = _require_kfid(state, open_kfid)
    session = state.kf_session(kfid, external_userid)
    now = state.now()
    eligible = not session.has_messaged and (
        session.last_welcome_at is None or now - session.last_welcome_at >= KF_WINDOW_S
    )
    code = None
    if welcome_code if welcome_code is not None else eligible:
        code = state.new_kf_code("welcome", kfid, external_userid, WELCOME_CODE_TTL_S, None)
        session.last_welcome_at = now
    fields: JsonDict = {"external_userid": external_userid, "scene": scene, "scene_param": scene_param}
    if code is not None:
        fields["welcome_code"] = code.code
    item, delivery = push_kf_event(state, "enter_session", fields, open_kfid=kfid)
    return item, code, delivery


def push_kf_servicer_message(
    state: SimulatorState,
    external_userid: str,
    servicer_userid: str,
    text: str,
    *,
    open_kfid: str | None = None,
) -> tuple[JsonDict, CallbackDelivery]:
    """A servicer writes from the WeCom client (origin 5); sync_msg returns it, the quota is untouched."""
    kfid = _require_kfid(state, open_kfid)
    item: JsonDict = {
        "msgid": state.kf_msgid(),
        "open_kfid": kfid,
        "external_userid": external_userid,
        "send_time": int(state.now()),
        "origin": 5,
        "servicer_userid": servicer_userid,
        "msgtype": "text",
        "text": {"content": text},
    }
    state.store_kf_message(kfid, item)
    return item, _notify_kf(state, kfid)


def push_app_message(
    state: SimulatorState,
    from_userid: str,
    text: str | None = None,
    *,
    event: str | None = None,
    event_key: str = "",
) -> tuple[int | None, CallbackDelivery]:
    """A member writes to (or opens) the self-built app; returns the MsgId (None for events)."""
    if from_userid not in state.config.members:
        raise ControlError(f"{from_userid!r} is not a member")
    if event:
        delivery = build_delivery(state, "app_event", app_event_xml(state, from_userid, event, event_key))
        start_delivery(state, delivery)
        return None, delivery
    if text is None:
        raise ControlError("text or event is required")
    msgid = secrets.randbelow(2**62) + 2**62  # a 64-bit MsgId like WeCom's
    delivery = build_delivery(state, "app_text", app_text_xml(state, from_userid, text, msgid))
    start_delivery(state, delivery)
    return msgid, delivery


CONTACT_CHANGES = frozenset(
    {
        "add_external_contact",
        "add_half_external_contact",
        "edit_external_contact",
        "del_external_contact",
        "del_follow_user",
    }
)


def push_contact_change(
    state: SimulatorState,
    change_type: str,
    userid: str,
    external_userid: str,
    *,
    name: str = "",
    channel_state: str = "",
    welcome_code: bool = True,
) -> tuple[WelcomeCode | None, CallbackDelivery]:
    """change_external_contact: adding makes the relation (and a 20 s welcome code), deleting ends it."""
    if change_type not in CONTACT_CHANGES:
        raise ControlError(f"unsupported change_type {change_type!r}")
    if userid not in state.config.members:
        raise ControlError(f"{userid!r} is not a member")
    if not external_userid:
        raise ControlError("external_userid is required")
    now = state.now()
    code = None
    contact = state.contacts.setdefault(external_userid, ExternalContact(external_userid, name or external_userid))
    if name:
        contact.name = name
    if change_type in ("add_external_contact", "add_half_external_contact"):
        contact.followers.setdefault(userid, Follow(userid, int(now), channel_state))
        if welcome_code:
            code = WelcomeCode(random_token(43), userid, external_userid, now + WELCOME_CODE_TTL_S)
            state.welcome_codes[code.code] = code
    elif change_type in ("del_external_contact", "del_follow_user"):
        contact.followers.pop(userid, None)
    xml = external_contact_xml(state, change_type, userid, external_userid, channel_state, code.code if code else None)
    delivery = build_delivery(state, "change_external_contact", xml)
    start_delivery(state, delivery)
    return code, delivery


def redeliver(state: SimulatorState, delivery_id: int) -> CallbackDelivery:
    original = next((d for d in state.deliveries if d.id == delivery_id), None)
    if original is None:
        raise ControlError(f"no callback {delivery_id}")
    delivery = redelivery(state, original)
    start_delivery(state, delivery)
    return delivery


# ---------------------------------------------------------------- HTTP layer

ControlHandler = Callable[[web.Request, SimulatorState], Awaitable[JsonDict]]


def control(fn: ControlHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        try:
            result = await fn(request, state)
        except ControlError as exc:
            return web.json_response({"error": str(exc)}, status=400, dumps=dumps)
        return web.json_response(result, dumps=dumps)

    return handle


async def _body(request: web.Request) -> JsonDict:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError("body is not JSON") from None
    if not isinstance(body, dict):
        raise ControlError("body must be a JSON object")
    return body


def _opt_str(body: JsonDict, key: str, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ControlError(f"{key} must be a string")
    return value


def _req_str(body: JsonDict, key: str) -> str:
    value = _opt_str(body, key)
    if not value:
        raise ControlError(f"{key} is required")
    return value


def _opt_bool(body: JsonDict, key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ControlError(f"{key} must be a boolean")
    return value


def _number(body: JsonDict, key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(f"{key} must be a number")
    return float(value)


async def _maybe_wait(body: JsonDict, delivery: CallbackDelivery) -> JsonDict:
    """With "wait": true the push answers only once delivery (with retries) is over."""
    if body.get("wait") is True:
        await delivery.finished.wait()
    return delivery.to_json()


@control
async def c_kf_customer_message(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    msgtype = _opt_str(body, "msgtype", "text") or "text"
    text = _opt_str(body, "text") if msgtype == "text" else None
    content = None
    if msgtype != "text":
        content = body.get(msgtype)
        if not isinstance(content, dict):
            raise ControlError(f"{msgtype} must be an object with the message body")
    item, delivery = push_kf_customer_message(
        state,
        _req_str(body, "external_userid"),
        text,
        open_kfid=_opt_str(body, "open_kfid"),
        msgtype=msgtype,
        content=content,
        menu_id=_opt_str(body, "menu_id"),
    )
    return {"msgid": item["msgid"], "message": item, "callback": await _maybe_wait(body, delivery)}


@control
async def c_kf_enter_session(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    item, code, delivery = push_kf_enter_session(
        state,
        _req_str(body, "external_userid"),
        open_kfid=_opt_str(body, "open_kfid"),
        scene=_opt_str(body, "scene", "") or "",
        scene_param=_opt_str(body, "scene_param", "") or "",
        welcome_code=_opt_bool(body, "welcome_code"),
    )
    return {
        "msgid": item["msgid"],
        "welcome_code": code.code if code else None,
        "message": item,
        "callback": await _maybe_wait(body, delivery),
    }


@control
async def c_kf_servicer_message(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    item, delivery = push_kf_servicer_message(
        state,
        _req_str(body, "external_userid"),
        _req_str(body, "servicer_userid"),
        _req_str(body, "text"),
        open_kfid=_opt_str(body, "open_kfid"),
    )
    return {"msgid": item["msgid"], "message": item, "callback": await _maybe_wait(body, delivery)}


@control
async def c_kf_event(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    fields = body.get("fields", {})
    if not isinstance(fields, dict):
        raise ControlError("fields must be an object")
    item, delivery = push_kf_event(state, _req_str(body, "event_type"), fields, open_kfid=_opt_str(body, "open_kfid"))
    return {"msgid": item["msgid"], "message": item, "callback": await _maybe_wait(body, delivery)}


@control
async def c_kf_servicer_status(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    kfid = _require_kfid(state, _opt_str(body, "open_kfid"))
    userid = _req_str(body, "userid")
    status = int(_number(body, "status"))
    stop_type = int(_number(body, "stop_type", 0))
    if status not in (0, 1) or stop_type not in (0, 1):
        raise ControlError("status and stop_type must be 0 or 1")
    state.kf_servicer_status[(kfid, userid)] = (status, stop_type)
    return {"open_kfid": kfid, "userid": userid, "status": status, "stop_type": stop_type}


@control
async def c_kf_session(request: web.Request, state: SimulatorState) -> JsonDict:
    kfid = _require_kfid(state, request.query.get("open_kfid"))
    external_userid = request.query.get("external_userid", "")
    session = state.kf_sessions.get((kfid, external_userid))
    if session is None:
        return {"open_kfid": kfid, "external_userid": external_userid, "service_state": KF_SESSION_ENDED}
    return {
        "open_kfid": kfid,
        "external_userid": external_userid,
        "service_state": session.state,
        "servicer_userid": session.servicer_userid,
        "last_customer_msg_at": session.last_customer_msg_at,
        "sent_since_customer_msg": session.sent_since_customer_msg,
    }


@control
async def c_kf_sync_options(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    if "page_size" in body:
        size = body["page_size"]
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ControlError("page_size must be a positive integer or null")
        state.kf_sync_page_size = size
    if "empty_pages" in body:
        state.kf_sync_empty_pages = max(0, int(_number(body, "empty_pages")))
    return {"page_size": state.kf_sync_page_size, "empty_pages": state.kf_sync_empty_pages}


@control
async def c_app_message(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    msgid, delivery = push_app_message(
        state,
        _req_str(body, "from_userid"),
        _opt_str(body, "text"),
        event=_opt_str(body, "event"),
        event_key=_opt_str(body, "event_key", "") or "",
    )
    return {"msgid": msgid, "callback": await _maybe_wait(body, delivery)}


@control
async def c_contact_event(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    want_code = _opt_bool(body, "welcome_code")
    code, delivery = push_contact_change(
        state,
        _opt_str(body, "change_type", "add_external_contact") or "add_external_contact",
        _req_str(body, "userid"),
        _req_str(body, "external_userid"),
        name=_opt_str(body, "name", "") or "",
        channel_state=_opt_str(body, "state", "") or "",
        welcome_code=True if want_code is None else want_code,
    )
    return {"welcome_code": code.code if code else None, "callback": await _maybe_wait(body, delivery)}


@control
async def c_callbacks(request: web.Request, state: SimulatorState) -> JsonDict:
    return {"callback_url": state.callback_url, "callbacks": [d.to_json() for d in state.deliveries]}


@control
async def c_redeliver(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    try:
        delivery_id = int(request.match_info["delivery_id"])
    except ValueError:
        raise ControlError("delivery id must be an integer") from None
    return {"callback": await _maybe_wait(body, redeliver(state, delivery_id))}


@control
async def c_callback_url(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    url = _opt_str(body, "url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ControlError("url must start with http:// or https://")
    state.callback_url = url
    return {"callback_url": url}


@control
async def c_verify_callback(request: web.Request, state: SimulatorState) -> JsonDict:
    return await verify_url(state)


@control
async def c_sent(request: web.Request, state: SimulatorState) -> JsonDict:
    try:
        after = int(request.query.get("after", "0"))
        wait = min(float(request.query.get("wait", "0")), SEND_LONG_POLL_MAX_S)
        count = int(request.query.get("count", "1"))
    except ValueError:
        raise ControlError("after, wait and count must be numbers") from None
    recipient = request.query.get("recipient") or None
    api = request.query.get("api") or None
    if wait > 0:
        records = await state.wait_sent(after, count=count, wait_s=wait, recipient=recipient, api=api)
    else:
        records = state.sent_after(after, recipient, api)
    return {"last_seq": len(state.sent), "sent": [r.to_json() for r in records]}


@control
async def c_calls(request: web.Request, state: SimulatorState) -> JsonDict:
    return {"calls": [c.to_json() for c in state.calls]}


@control
async def c_clock(request: web.Request, state: SimulatorState) -> JsonDict:
    return {"now": state.now(), "adjustable": isinstance(state.clock, AdjustableClock)}


@control
async def c_clock_advance(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    seconds = _number(body, "seconds")
    if seconds < 0:
        raise ControlError("seconds must be >= 0")
    if not isinstance(state.clock, AdjustableClock):
        raise ControlError("the injected clock cannot be advanced from here")
    state.clock.advance(seconds)
    return {"now": state.now()}


@control
async def c_tokens_invalidate(request: web.Request, state: SimulatorState) -> JsonDict:
    return {"invalidated": state.invalidate_tokens()}


@control
async def c_faults_list(request: web.Request, state: SimulatorState) -> JsonDict:
    return {"faults": [f.to_json() for f in state.faults]}


@control
async def c_faults_add(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    path = _req_str(body, "path")
    if not path.startswith("/cgi-bin/"):
        raise ControlError("path must be an API path such as /cgi-bin/kf/send_msg")
    count = int(_number(body, "count", 1))
    errcode = body.get("errcode")
    http_status = body.get("http_status")
    delay = body.get("delay_s")
    hold = body.get("hold_response_s")
    if errcode is None and http_status is None and delay is None and hold is None:
        raise ControlError("give errcode, http_status, delay_s or hold_response_s")
    if errcode is not None and http_status is not None:
        raise ControlError("errcode and http_status exclude each other")
    fault = Fault(
        id=state.next_id(),
        path=path,
        remaining=max(1, count),
        errcode=None if errcode is None else int(_number(body, "errcode")),
        http_status=None if http_status is None else int(_number(body, "http_status")),
        delay_s=None if delay is None else _number(body, "delay_s"),
        hold_response_s=None if hold is None else _number(body, "hold_response_s"),
    )
    state.faults.append(fault)
    return fault.to_json()


@control
async def c_faults_clear(request: web.Request, state: SimulatorState) -> JsonDict:
    cleared = len(state.faults)
    state.faults.clear()
    return {"cleared": cleared}


@control
async def c_groupmsg_confirm(request: web.Request, state: SimulatorState) -> JsonDict:
    body = await _body(request)
    task = state.groupmsg_tasks.get(_req_str(body, "msgid"))
    if task is None:
        raise ControlError("unknown msgid")
    return {"sent": confirm_groupmsg(state, task, _opt_str(body, "userid"))}


@control
async def c_oauth_code(request: web.Request, state: SimulatorState) -> JsonDict:
    """A member (userid) or a non-member (openid) follows the app's OAuth link: the code WeCom would hand over."""
    body = await _body(request)
    try:
        code = mint_oauth_code(state, userid=_opt_str(body, "userid") or "", openid=_opt_str(body, "openid") or "")
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    return {"code": code.code, "expires_in": OAUTH_CODE_TTL_S}


@control
async def c_jsapi_tickets(request: web.Request, state: SimulatorState) -> JsonDict:
    """The JS-SDK tickets issued so far, so a test can check a signature on its own."""
    sdk = jssdk_state(state)
    corp = sdk.corp_ticket
    return {
        "corp": None if corp is None else {"ticket": corp.ticket, "expires_at": corp.expires_at},
        "agent": [{"ticket": t.ticket, "expires_at": t.expires_at} for t in sdk.agent_tickets.values()],
    }


def add_control_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/_sim/kf/customer_message", c_kf_customer_message)
    r.add_post("/_sim/kf/enter_session", c_kf_enter_session)
    r.add_post("/_sim/kf/servicer_message", c_kf_servicer_message)
    r.add_post("/_sim/kf/event", c_kf_event)
    r.add_post("/_sim/kf/servicer_status", c_kf_servicer_status)
    r.add_get("/_sim/kf/session", c_kf_session)
    r.add_post("/_sim/kf/sync_options", c_kf_sync_options)
    r.add_post("/_sim/app/message", c_app_message)
    r.add_post("/_sim/contact/event", c_contact_event)
    r.add_get("/_sim/callbacks", c_callbacks)
    r.add_post("/_sim/callbacks/{delivery_id}/redeliver", c_redeliver)
    r.add_post("/_sim/callback_url", c_callback_url)
    r.add_post("/_sim/verify_callback", c_verify_callback)
    r.add_get("/_sim/sent", c_sent)
    r.add_get("/_sim/calls", c_calls)
    r.add_get("/_sim/clock", c_clock)
    r.add_post("/_sim/clock/advance", c_clock_advance)
    r.add_post("/_sim/tokens/invalidate", c_tokens_invalidate)
    r.add_get("/_sim/faults", c_faults_list)
    r.add_post("/_sim/faults", c_faults_add)
    r.add_delete("/_sim/faults", c_faults_clear)
    r.add_post("/_sim/groupmsg/confirm", c_groupmsg_confirm)
    r.add_post("/_sim/oauth/code", c_oauth_code)
    r.add_get("/_sim/jsapi/tickets", c_jsapi_tickets)


__all__ = [
    "ControlError",
    "add_control_routes",
    "push_app_message",
    "push_contact_change",
    "push_kf_customer_message",
    "push_kf_enter_session",
    "push_kf_event",
    "push_kf_servicer_message",
    "redeliver",
]
