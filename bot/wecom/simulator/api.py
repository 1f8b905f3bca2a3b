"""The `/cgi-bin/` API subset the bot uses: WeCom's paths, shapes, errcodes and limits (reference §4, §5)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .state import (
    KF_QUOTA_PER_CUSTOMER_MSG,
    KF_SESSION_ENDED,
    KF_SESSION_HUMAN,
    KF_SESSION_QUEUE,
    KF_SHORT_CODE_TTL_S,
    KF_TRANSITIONS,
    KF_WINDOW_S,
    SIM_STATE,
    GroupMsgTask,
    IssuedToken,
    SimulatorState,
    china_month,
    random_token,
)

JsonDict = dict[str, Any]
ApiHandler = Callable[[web.Request, SimulatorState], Awaitable[JsonDict]]

# errcodes (reference §4.6, §5, and the official global table it quotes)
SYSTEM_BUSY = -1
INVALID_SECRET = 40001
INVALID_MSGTYPE = 40008
INVALID_CORPID = 40013
INVALID_TOKEN = 40014
INVALID_AGENTID = 40056
# WeCom's generic "不合法的参数"; used wherever the reference names no specific code.
INVALID_PARAMETER = 40058
INVALID_TAG_ID = 40068
INVALID_EXTERNAL_USERID = 40096
MISSING_TOKEN = 41001
MISSING_CORPID = 41002
MISSING_SECRET = 41004
NO_RECIPIENTS = 41048
WELCOME_CODE_INVALID = 41050
WELCOME_CODE_USED = 41051
TOO_MANY_ATTACHMENTS = 41064
BAD_ATTACHMENT_TYPE = 41065
TOKEN_EXPIRED = 42001
EMPTY_CONTENT = 44004
CONTENT_TOO_LONG = 45002
FREQUENCY_LIMIT = 45009
BAD_JSON = 47001
API_FORBIDDEN = 48002
USERID_NOT_FOUND = 60111
ALL_RECIPIENTS_INVALID = 81013
NO_CONTACT_RELATION = 84061
NOT_CUSTOMER_GROUP = 90501
ROBOT_KEY_INVALID = 93000
KF_INVALID_OPEN_KFID = 95000
KF_QUOTA_EXCEEDED = 95001
KF_WINDOW_EXPIRED = 95002
KF_INVALID_SYNC_TOKEN = 95007
KF_TOO_MANY_MENU_ITEMS = 95008
KF_BAD_MENU_ITEM = 95009
KF_SESSION_ENDED_ERR = 95013
KF_NOT_SERVICER = 95014
KF_BAD_TRANSITION = 95016
KF_STATE_FORBIDS_SEND = 95018
KF_SERVICER_STOPPED = 95019

APP_LABELS = frozenset({"app"})
KF_LABELS = frozenset({"kf", "app"})
CONTACT_LABELS = frozenset({"app", "contact"})

APP_MSGTYPES = frozenset(
    {
        "text",
        "image",
        "voice",
        "video",
        "file",
        "textcard",
        "news",
        "mpnews",
        "markdown",
        "miniprogram_notice",
        "template_card",
    }
)
KF_MSGTYPES = frozenset(
    {"text", "image", "voice", "video", "file", "link", "miniprogram", "msgmenu", "location", "business_card"}
)
ROBOT_MSGTYPES = frozenset({"text", "markdown", "markdown_v2", "image", "news", "file", "voice", "template_card"})
MENU_ACTION_TYPES = frozenset({"click", "view", "miniprogram"})
MENU_ITEM_TYPES = MENU_ACTION_TYPES | {"text"}
ATTACHMENT_TYPES = frozenset({"image", "link", "miniprogram", "video", "file"})

TEXT_LIMIT_B = 2048
ROBOT_MARKDOWN_LIMIT_B = 4096
CONTACT_TEXT_LIMIT_B = 4000
MAX_ATTACHMENTS = 9
KF_MENU_MAX_ITEMS = 50
KF_MENU_MAX_ACTIONS = 10
KF_EVENT_MENU_MAX_ITEMS = 10
APP_PER_MEMBER_MINUTE = 30
APP_PER_MEMBER_HOUR = 1000
APP_DUPLICATE_DEFAULT_S = 1800
APP_DUPLICATE_MAX_S = 4 * 3600
ROBOT_PER_MINUTE = 20
GROUPMSG_PER_MONTH = 4
SYNC_MAX_LIMIT = 1000
SYNC_NO_CURSOR_LOOKBACK_S = 3 * 86400

_KF_MSGID = re.compile(r"[0-9A-Za-z_-]{1,32}")


class ApiError(Exception):
    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"{errcode} {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


def _errmsg(state: SimulatorState, errcode: int, text: str) -> str:
    # Shaped like WeCom's own errmsg so log parsers see the familiar form; clients must not depend on it.
    return (
        f"{text}, hint: [sim{state.next_id():08d}], "
        f"more info at https://open.work.weixin.qq.com/devtool/query?e={errcode}"
    )


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def endpoint(fn: ApiHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Apply injected faults, turn ApiError into WeCom's JSON and log the call."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        state.in_flight += 1
        try:
            return await _handle(request, state)
        finally:
            state.in_flight -= 1

    async def _handle(request: web.Request, state: SimulatorState) -> web.StreamResponse:
        path = api_path(request)
        fault = state.take_fault(path)
        if fault is not None:
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault.http_status is not None:
                state.record_call(request.method, path, fault.http_status, None)
                return web.Response(status=fault.http_status, text="simulated upstream failure")
            if fault.errcode is not None:
                state.record_call(request.method, path, 200, fault.errcode)
                faulted = {"errcode": fault.errcode, "errmsg": _errmsg(state, fault.errcode, "simulated")}
                return web.json_response(faulted, dumps=dumps)
        errcode = 0
        try:
            payload: JsonDict = {"errcode": 0, "errmsg": "ok", **await fn(request, state)}
        except ApiError as exc:
            errcode = exc.errcode
            payload = {"errcode": errcode, "errmsg": _errmsg(state, errcode, exc.errmsg)}
        state.record_call(request.method, path, 200, errcode)
        if fault is not None and fault.hold_response_s:
            await asyncio.sleep(fault.hold_response_s)
        return web.json_response(payload, dumps=dumps)

    return handle


def api_path(request: web.Request) -> str:
    """The path as WeCom names it, also when the simulator is mounted as a sub-app (the sandbox)."""
    at = request.path.find("/cgi-bin/")
    return request.path[at:] if at >= 0 else request.path


async def read_json(request: web.Request) -> JsonDict:
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(BAD_JSON, "Warning: wrong json format") from None
    if not isinstance(body, dict):
        raise ApiError(BAD_JSON, "Warning: wrong json format")
    return body


def require_token(request: web.Request, state: SimulatorState, labels: frozenset[str]) -> IssuedToken:
    token = request.query.get("access_token", "")
    if not token:
        raise ApiError(MISSING_TOKEN, "access_token missing")
    issued = state.tokens.get(token)
    if issued is None or issued.revoked:
        raise ApiError(INVALID_TOKEN, "invalid access_token")
    if issued.expires_at <= state.now():
        raise ApiError(TOKEN_EXPIRED, "access_token expired")
    if issued.label not in labels:
        raise ApiError(API_FORBIDDEN, "api forbidden")
    return issued


def _str_field(body: JsonDict, key: str, *, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise ApiError(INVALID_PARAMETER, f"invalid {key}")
    return value


def _dict_field(body: JsonDict, key: str) -> JsonDict:
    value = body.get(key)
    if not isinstance(value, dict):
        raise ApiError(INVALID_PARAMETER, f"missing {key}")
    return value


def _int_field(body: JsonDict, key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ApiError(INVALID_PARAMETER, f"invalid {key}")
    try:
        return int(value)
    except ValueError:
        raise ApiError(INVALID_PARAMETER, f"invalid {key}") from None


def _list_field(body: JsonDict, key: str) -> list[Any]:
    value = body.get(key, [])
    if not isinstance(value, list):
        raise ApiError(INVALID_PARAMETER, f"invalid {key}")
    return value


def _check_text(content: JsonDict, limit: int) -> None:
    text = content.get("content")
    if not isinstance(text, str) or not text:
        raise ApiError(EMPTY_CONTENT, "empty content")
    if len(text.encode("utf-8")) > limit:
        raise ApiError(CONTENT_TOO_LONG, f"content size out of limit ({limit} bytes)")


def _check_menu(menu: JsonDict, max_items: int, max_actions: int) -> None:
    items = menu.get("list", [])
    if not isinstance(items, list):
        raise ApiError(INVALID_PARAMETER, "invalid msgmenu.list")
    actions = 0
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in MENU_ITEM_TYPES or not isinstance(item.get(kind), dict):
            raise ApiError(KF_BAD_MENU_ITEM, "invalid menu item type")
        if kind in MENU_ACTION_TYPES:
            actions += 1
    if actions > max_actions or len(items) > max_items:
        raise ApiError(KF_TOO_MANY_MENU_ITEMS, f"menu items exceed the limit, at most {max_actions} allowed")


def _check_kf_msgid(body: JsonDict) -> str:
    msgid = body.get("msgid")
    if msgid is None or msgid == "":
        return ""
    if not isinstance(msgid, str) or not _KF_MSGID.fullmatch(msgid):
        raise ApiError(INVALID_PARAMETER, "invalid msgid: at most 32 bytes of [0-9a-zA-Z_-]")
    return msgid


def _content_of(body: JsonDict, msgtype: str) -> JsonDict:
    value = body.get(msgtype)
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- gettoken


@endpoint
async def gettoken(request: web.Request, state: SimulatorState) -> JsonDict:
    corpid = request.query.get("corpid", "")
    secret = request.query.get("corpsecret", "")
    if not corpid:
        raise ApiError(MISSING_CORPID, "corpid missing")
    if corpid != state.config.corp_id:
        raise ApiError(INVALID_CORPID, "invalid corpid")
    if not secret:
        raise ApiError(MISSING_SECRET, "secret missing")
    label = state.config.secrets.get(secret)
    if label is None:
        raise ApiError(INVALID_SECRET, "invalid credential")
    issued = state.issue_token(secret, label)
    return {"access_token": issued.token, "expires_in": max(1, int(issued.expires_at - state.now()))}


# ---------------------------------------------------------------- message/send (app messages)


def _app_content_check(msgtype: str, content: JsonDict) -> None:
    if msgtype in ("text", "markdown"):
        _check_text(content, TEXT_LIMIT_B)
    elif msgtype == "textcard":
        for key in ("title", "description", "url"):
            if not isinstance(content.get(key), str) or not content[key]:
                raise ApiError(INVALID_PARAMETER, f"textcard.{key} missing")
    elif msgtype == "template_card":
        if not isinstance(content.get("card_type"), str):
            raise ApiError(INVALID_PARAMETER, "template_card.card_type missing")
    elif msgtype in ("image", "voice", "video", "file") and not isinstance(content.get("media_id"), str):
        raise ApiError(INVALID_PARAMETER, "media_id missing")


@endpoint
async def message_send(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, APP_LABELS)
    body = await read_json(request)
    api = "message/send"
    msgtype = str(body.get("msgtype", ""))
    content = _content_of(body, msgtype)
    touser = str(body.get("touser", ""))
    try:
        if _int_field(body, "agentid", -1) != state.config.agent_id:
            raise ApiError(INVALID_AGENTID, "invalid agentid")
        if msgtype not in APP_MSGTYPES:
            raise ApiError(INVALID_MSGTYPE, "invalid message type")
        if not isinstance(body.get(msgtype), dict):
            raise ApiError(INVALID_PARAMETER, f"missing {msgtype}")
        _app_content_check(msgtype, content)
        members = state.config.members
        wanted = list(members) if touser == "@all" else [u for u in touser.split("|") if u]
        valid = [u for u in wanted if u in members]
        invalid = [u for u in wanted if u not in members]
        # Departments and tags are not modelled: every party/tag is reported back as invalid.
        toparty = str(body.get("toparty", "")) if touser != "@all" else ""
        totag = str(body.get("totag", "")) if touser != "@all" else ""
        if not valid:
            raise ApiError(ALL_RECIPIENTS_INVALID, "user & party & tag all invalid")
        dedupe = body.get("enable_duplicate_check") in (1, True, "1")
        interval = min(
            max(_int_field(body, "duplicate_check_interval", APP_DUPLICATE_DEFAULT_S), 0),
            APP_DUPLICATE_MAX_S,
        )
    except ApiError as exc:
        state.record_sent(
            api=api,
            recipient=touser,
            account=str(body.get("agentid", "")),
            msgtype=msgtype,
            content=content,
            errcode=exc.errcode,
            status="rejected",
        )
        raise

    now = state.now()
    msgid = random_token(48)
    canonical = dumps([msgtype, body.get(msgtype)])
    for userid in valid:
        key = f"{userid}\x00{canonical}"
        previous = state.app_recent.get(key)
        if dedupe and previous is not None and now - previous[0] < interval:
            status = "duplicate"
        else:
            state.app_recent[key] = (now, msgid)
            minute = state.app_rate_minute.count(userid, now)
            hour = state.app_rate_hour.count(userid, now)
            # WeCom answers ok and silently drops the excess (reference §5.2), so only the log tells.
            if minute >= APP_PER_MEMBER_MINUTE or hour >= APP_PER_MEMBER_HOUR:
                status = "dropped"
            else:
                state.app_rate_minute.add(userid, now)
                state.app_rate_hour.add(userid, now)
                status = "delivered"
        state.record_sent(
            api=api,
            recipient=userid,
            account=str(state.config.agent_id),
            msgtype=msgtype,
            content=content,
            errcode=0,
            status=status,
            msgid=msgid,
        )
    return {
        "invaliduser": "|".join(invalid),
        "invalidparty": toparty,
        "invalidtag": totag,
        "unlicenseduser": "",
        "msgid": msgid,
    }


# ---------------------------------------------------------------- kf


def _kf_account(state: SimulatorState, body: JsonDict) -> str:
    open_kfid = body.get("open_kfid")
    if not isinstance(open_kfid, str) or open_kfid not in state.config.kf_accounts:
        raise ApiError(KF_INVALID_OPEN_KFID, "invalid open_kfid")
    return open_kfid


@endpoint
async def kf_send_msg(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, KF_LABELS)
    body = await read_json(request)
    api = "kf/send_msg"
    msgtype = str(body.get("msgtype", ""))
    content = _content_of(body, msgtype)
    touser = str(body.get("touser", ""))
    account = str(body.get("open_kfid", ""))
    try:
        msgid = _check_kf_msgid(body)
        open_kfid = _kf_account(state, body)
        _str_field(body, "touser")
        if msgtype not in KF_MSGTYPES:
            raise ApiError(INVALID_MSGTYPE, "invalid message type")
        _dict_field(body, msgtype)
        if msgtype == "text":
            _check_text(content, TEXT_LIMIT_B)
        elif msgtype == "msgmenu":
            _check_menu(content, KF_MENU_MAX_ITEMS, KF_MENU_MAX_ACTIONS)
        # The reference only says a repeated msgid "errors"; 40058 (invalid parameter) is the code WeCom
        # uses for a bad msgid value, so it is the most plausible one. Checked before the session rules so
        # a retry of an accepted send is always told "already used", never delivered twice.
        if msgid and msgid in state.kf_used_msgids[open_kfid]:
            raise ApiError(INVALID_PARAMETER, "invalid msgid: duplicated in this kf account")
        session = state.kf_session(open_kfid, touser)
        if session.state not in (0, 1):
            raise ApiError(KF_STATE_FORBIDS_SEND, "session status does not allow sending messages")
        last = session.last_customer_msg_at
        if last is None or state.now() - last >= KF_WINDOW_S:
            raise ApiError(KF_WINDOW_EXPIRED, "more than 48 hours since the customer's last message")
        if session.sent_since_customer_msg >= KF_QUOTA_PER_CUSTOMER_MSG:
            raise ApiError(KF_QUOTA_EXCEEDED, "send count exceeds the limit (5 per customer message)")
    except ApiError as exc:
        state.record_sent(
            api=api,
            recipient=touser,
            account=account,
            msgtype=msgtype,
            content=content,
            errcode=exc.errcode,
            status="rejected",
            msgid=str(body.get("msgid", "")),
        )
        raise
    msgid = msgid or random_token(32)
    state.kf_used_msgids[open_kfid].add(msgid)
    session.sent_since_customer_msg += 1
    state.record_sent(
        api=api,
        recipient=touser,
        account=open_kfid,
        msgtype=msgtype,
        content=content,
        errcode=0,
        status="delivered",
        msgid=msgid,
    )
    return {"msgid": msgid}


@endpoint
async def kf_send_msg_on_event(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, KF_LABELS)
    body = await read_json(request)
    api = "kf/send_msg_on_event"
    msgtype = str(body.get("msgtype", ""))
    content = _content_of(body, msgtype)
    code = state.kf_codes.get(str(body.get("code", "")))
    recipient = code.external_userid if code else ""
    account = code.open_kfid if code else ""
    try:
        msgid = _check_kf_msgid(body)
        # No reference code for a bad event code: 40058 for unknown/used ones, 95002 once its time window
        # (20 s or 48 h) has passed, 95018 when the session left the state the code was issued for.
        if code is None:
            raise ApiError(INVALID_PARAMETER, "invalid code")
        if code.used:
            raise ApiError(INVALID_PARAMETER, "invalid code: already used")
        if state.now() >= code.expires_at:
            raise ApiError(KF_WINDOW_EXPIRED, "code expired")
        session = state.kf_session(code.open_kfid, code.external_userid)
        if code.state_at_issue is not None and session.state != code.state_at_issue:
            raise ApiError(KF_STATE_FORBIDS_SEND, "session status changed since the code was issued")
        allowed = ("text", "msgmenu") if code.kind in ("welcome", "end") else ("text",)
        if msgtype not in allowed:
            raise ApiError(INVALID_MSGTYPE, "invalid message type for this event")
        _dict_field(body, msgtype)
        if msgtype == "text":
            _check_text(content, TEXT_LIMIT_B)
        else:
            _check_menu(content, KF_EVENT_MENU_MAX_ITEMS, KF_EVENT_MENU_MAX_ITEMS)
        if msgid and msgid in state.kf_used_msgids[code.open_kfid]:
            raise ApiError(INVALID_PARAMETER, "invalid msgid: duplicated in this kf account")
    except ApiError as exc:
        state.record_sent(
            api=api,
            recipient=recipient,
            account=account,
            msgtype=msgtype,
            content=content,
            errcode=exc.errcode,
            status="rejected",
            msgid=str(body.get("msgid", "")),
        )
        raise
    code.used = True
    msgid = msgid or random_token(32)
    state.kf_used_msgids[code.open_kfid].add(msgid)
    state.record_sent(
        api=api,
        recipient=recipient,
        account=account,
        msgtype=msgtype,
        content=content,
        errcode=0,
        status="delivered",
        msgid=msgid,
    )
    return {"msgid": msgid}


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"simcursor:{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = raw.partition(":")
        if prefix != "simcursor":
            raise ValueError(cursor)
        return max(0, int(number))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError(INVALID_PARAMETER, "invalid cursor") from None


@endpoint
async def kf_sync_msg(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, KF_LABELS)
    body = await read_json(request)
    now = state.now()
    limit = _int_field(body, "limit", SYNC_MAX_LIMIT)
    if not 1 <= limit <= SYNC_MAX_LIMIT:
        raise ApiError(INVALID_PARAMETER, "invalid limit, must be 1..1000")
    open_kfid = body.get("open_kfid") or None
    if open_kfid is not None:
        open_kfid = _kf_account(state, body)
    token = body.get("token") or ""
    if token:
        known = state.kf_sync_tokens.get(str(token))
        if known is None or known[1] <= now:
            raise ApiError(KF_INVALID_SYNC_TOKEN, "invalid msg token")
    cursor = body.get("cursor") or ""
    if cursor:
        start = decode_cursor(str(cursor))
    else:
        start = next(
            (m.seq for m in state.kf_messages if int(m.item.get("send_time", 0)) >= now - SYNC_NO_CURSOR_LOOKBACK_S),
            len(state.kf_messages),
        )
    if state.kf_sync_empty_pages > 0:
        # Real pages can come back empty while has_more=1; clients must keep pulling, not stop.
        state.kf_sync_empty_pages -= 1
        return {"next_cursor": encode_cursor(start), "has_more": 1, "msg_list": []}
    page_size = min(limit, state.kf_sync_page_size or limit)
    page: list[JsonDict] = []
    position = start
    while position < len(state.kf_messages) and len(page) < page_size:
        stored = state.kf_messages[position]
        position += 1
        if open_kfid is None or stored.open_kfid == open_kfid:
            page.append(stored.item)
    has_more = any(open_kfid is None or m.open_kfid == open_kfid for m in state.kf_messages[position:])
    return {"next_cursor": encode_cursor(position), "has_more": int(has_more), "msg_list": page}


@endpoint
async def kf_service_state_get(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, KF_LABELS)
    body = await read_json(request)
    open_kfid = _kf_account(state, body)
    external_userid = _str_field(body, "external_userid")
    session = state.kf_sessions.get((open_kfid, external_userid))
    if session is None:
        return {"service_state": KF_SESSION_ENDED, "servicer_userid": ""}
    return {"service_state": session.state, "servicer_userid": session.servicer_userid}


@endpoint
async def kf_service_state_trans(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, KF_LABELS)
    body = await read_json(request)
    open_kfid = _kf_account(state, body)
    external_userid = _str_field(body, "external_userid")
    target = _int_field(body, "service_state", -1)
    if not 0 <= target <= 4:
        raise ApiError(INVALID_PARAMETER, "invalid service_state")
    session = state.kf_session(open_kfid, external_userid)
    if session.state == KF_SESSION_ENDED:
        # The reference reports 95013 ("session already ended") for attempts to move an ended session.
        raise ApiError(KF_SESSION_ENDED_ERR, "session already ended, wait for the customer to write")
    allowed = KF_TRANSITIONS | state.config.kf_extra_transitions
    if (session.state, target) not in allowed:
        raise ApiError(KF_BAD_TRANSITION, f"service state transition {session.state}->{target} not allowed")
    servicer = ""
    if target == KF_SESSION_HUMAN:
        servicer = _str_field(body, "servicer_userid")
        if servicer not in state.config.servicers_of(open_kfid):
            raise ApiError(KF_NOT_SERVICER, "user is not a servicer of this account or not activated")
        if state.servicer_status(open_kfid, servicer)[0] != 0:
            raise ApiError(KF_SERVICER_STOPPED, "servicer is stopped or suspended")
    session.state = target
    session.servicer_userid = servicer
    state.kf_transitions.append((state.now(), open_kfid, external_userid, target, servicer))
    code = None
    if target in (KF_SESSION_QUEUE, KF_SESSION_HUMAN) and target not in session.code_states:
        session.code_states.add(target)
        kind = "queue" if target == KF_SESSION_QUEUE else "human"
        code = state.new_kf_code(kind, open_kfid, external_userid, KF_WINDOW_S, target)
    elif target == KF_SESSION_ENDED:
        code = state.new_kf_code("end", open_kfid, external_userid, KF_SHORT_CODE_TTL_S, target)
    return {"msg_code": code.code} if code else {}


@endpoint
async def kf_servicer_list(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, KF_LABELS)
    open_kfid = _kf_account(state, dict(request.query))
    servicers: list[JsonDict] = []
    for userid in state.config.servicers_of(open_kfid):
        status, stop_type = state.servicer_status(open_kfid, userid)
        entry: JsonDict = {"userid": userid, "status": status}
        if status == 1:
            entry["stop_type"] = stop_type
        servicers.append(entry)
    return {"servicer_list": servicers}


@endpoint
async def kf_account_list(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, KF_LABELS)
    body = await read_json(request)
    offset = _int_field(body, "offset", 0)
    limit = _int_field(body, "limit", 100)
    accounts = [
        {"open_kfid": kfid, "name": f"沙箱客服{n}", "avatar": "", "manage_privilege": True}
        for n, kfid in enumerate(state.config.kf_accounts, start=1)
    ]
    return {"account_list": accounts[offset : offset + limit]}


# ---------------------------------------------------------------- externalcontact


def _follow_json(state: SimulatorState, external_userid: str) -> list[JsonDict]:
    contact = state.contacts[external_userid]
    result: list[JsonDict] = []
    for follow in contact.followers.values():
        tags = [
            {
                "group_name": state.corp_tags[t].group_name,
                "tag_name": state.corp_tags[t].name,
                "type": 1,
                "tag_id": t,
            }
            for t in sorted(follow.tags)
            if t in state.corp_tags
        ]
        result.append(
            {
                "userid": follow.userid,
                "remark": follow.remark,
                "description": "",
                "createtime": follow.createtime,
                "tags": tags,
                "remark_mobiles": [],
                "add_way": 1,
                "oper_userid": follow.userid,
                "state": follow.state,
            }
        )
    return result


@endpoint
async def contact_get(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    external_userid = request.query.get("external_userid", "")
    if not external_userid:
        raise ApiError(INVALID_EXTERNAL_USERID, "invalid external_userid")
    contact = state.contacts.get(external_userid)
    if contact is None or not contact.followers:
        raise ApiError(NO_CONTACT_RELATION, "not external contact")
    return {
        "external_contact": {
            "external_userid": contact.external_userid,
            "name": contact.name,
            "avatar": "",
            "type": 1,
            "gender": 0,
        },
        "follow_user": _follow_json(state, external_userid),
        "next_cursor": "",
    }


def _check_attachments(attachments: list[Any]) -> None:
    if len(attachments) > MAX_ATTACHMENTS:
        raise ApiError(TOO_MANY_ATTACHMENTS, "too many attachments")
    for attachment in attachments:
        kind = attachment.get("msgtype") if isinstance(attachment, dict) else None
        if kind not in ATTACHMENT_TYPES:
            raise ApiError(BAD_ATTACHMENT_TYPE, "invalid attachment msgtype")


@endpoint
async def contact_send_welcome_msg(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    body = await read_json(request)
    api = "externalcontact/send_welcome_msg"
    welcome = state.welcome_codes.get(str(body.get("welcome_code", "")))
    text = body.get("text")
    attachments = body.get("attachments", [])
    content: JsonDict = {"text": text, "attachments": attachments}
    recipient = welcome.external_userid if welcome else ""
    account = welcome.userid if welcome else ""
    try:
        if welcome is None or state.now() >= welcome.expires_at:
            raise ApiError(WELCOME_CODE_INVALID, "invalid welcome_code")
        if welcome.used:
            raise ApiError(WELCOME_CODE_USED, "customer and member already started chatting")
        if not isinstance(attachments, list):
            raise ApiError(INVALID_PARAMETER, "invalid attachments")
        if text is None and not attachments:
            raise ApiError(EMPTY_CONTENT, "text and attachments are both empty")
        if text is not None:
            if not isinstance(text, dict):
                raise ApiError(INVALID_PARAMETER, "invalid text")
            _check_text(text, CONTACT_TEXT_LIMIT_B)
        _check_attachments(attachments)
    except ApiError as exc:
        state.record_sent(
            api=api,
            recipient=recipient,
            account=account,
            msgtype="welcome",
            content=content,
            errcode=exc.errcode,
            status="rejected",
        )
        raise
    welcome.used = True
    state.record_sent(
        api=api,
        recipient=recipient,
        account=account,
        msgtype="welcome",
        content=content,
        errcode=0,
        status="delivered",
    )
    return {}


@endpoint
async def contact_mark_tag(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    body = await read_json(request)
    userid = _str_field(body, "userid")
    external_userid = _str_field(body, "external_userid")
    add = _list_field(body, "add_tag")
    remove = _list_field(body, "remove_tag")
    if userid not in state.config.members:
        raise ApiError(USERID_NOT_FOUND, "invalid userid")
    contact = state.contacts.get(external_userid)
    follow = contact.followers.get(userid) if contact else None
    if follow is None:
        raise ApiError(NO_CONTACT_RELATION, "not external contact")
    if not add and not remove:
        raise ApiError(INVALID_PARAMETER, "add_tag and remove_tag are both empty")
    for tag in [*add, *remove]:
        if tag not in state.corp_tags:
            raise ApiError(INVALID_TAG_ID, f"invalid tag id {tag}")
    follow.tags.update(str(t) for t in add)
    follow.tags.difference_update(str(t) for t in remove)
    return {}


@endpoint
async def contact_get_corp_tag_list(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    body = await read_json(request)
    tag_ids = set(_list_field(body, "tag_id"))
    group_ids = set(_list_field(body, "group_id"))
    groups: dict[str, JsonDict] = {}
    for tag in state.corp_tags.values():
        if tag_ids and tag.id not in tag_ids:
            continue
        if group_ids and tag.group_id not in group_ids:
            continue
        group = groups.setdefault(
            tag.group_id,
            {
                "group_id": tag.group_id,
                "group_name": tag.group_name,
                "create_time": tag.create_time,
                "order": 0,
                "tag": [],
            },
        )
        group["tag"].append({"id": tag.id, "name": tag.name, "create_time": tag.create_time, "order": tag.order})
    return {"tag_group": list(groups.values())}


def _matches_tag_filter(tags: set[str], tag_filter: Any) -> bool:
    groups = tag_filter.get("group_list", []) if isinstance(tag_filter, dict) else []
    # OR inside one group, AND across groups (reference §5.4)
    for group in groups:
        wanted = set(group.get("tag_list", [])) if isinstance(group, dict) else set()
        if wanted and not tags & wanted:
            return False
    return True


def confirm_groupmsg(state: SimulatorState, task: GroupMsgTask, userid: str | None = None) -> int:
    """The member confirms the 群发 in the client; returns how many recipients it reached."""
    now = state.now()
    count = 0
    for recipient, status in task.recipients.items():
        if status != 0 or (userid is not None and task.assignee[recipient] != userid):
            continue
        task.recipients[recipient] = 1
        task.sent_at[recipient] = now
        count += 1
        state.record_sent(
            api="externalcontact/add_msg_template",
            recipient=recipient,
            account=task.assignee[recipient],
            msgtype="text" if task.text else "attachments",
            content={"text": task.text, "attachments": task.attachments, "chat_type": task.chat_type},
            errcode=0,
            status="delivered",
            msgid=task.msgid,
        )
    if task.confirmed_at is None:
        task.confirmed_at = now
    return count


@endpoint
async def contact_add_msg_template(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    body = await read_json(request)
    chat_type = str(body.get("chat_type") or "single")
    if chat_type not in ("single", "group"):
        raise ApiError(INVALID_PARAMETER, "invalid chat_type")
    sender = _str_field(body, "sender", required=chat_type == "group")
    if sender and sender not in state.config.members:
        raise ApiError(USERID_NOT_FOUND, "invalid sender")
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise ApiError(INVALID_PARAMETER, "invalid text")
        _check_text(text, CONTACT_TEXT_LIMIT_B)
    attachments = _list_field(body, "attachments")
    if text is None and not attachments:
        raise ApiError(EMPTY_CONTENT, "text and attachments are both empty")
    _check_attachments(attachments)

    targets: dict[str, str] = {}  # recipient -> member who must confirm
    fail_list: list[str] = []
    if chat_type == "single":
        wanted = [str(u) for u in _list_field(body, "external_userid")]
        if not wanted:
            wanted = [
                ext
                for ext, contact in state.contacts.items()
                if any(
                    (not sender or f.userid == sender) and _matches_tag_filter(f.tags, body.get("tag_filter"))
                    for f in contact.followers.values()
                )
            ]
        for ext in wanted:
            contact = state.contacts.get(ext)
            followers = [u for u in (contact.followers if contact else {}) if not sender or u == sender]
            if followers:
                targets[ext] = followers[0]
            else:
                fail_list.append(ext)
    else:
        chats = {g.chat_id: g for g in state.config.group_chats}
        wanted = [str(c) for c in _list_field(body, "chat_id_list")]
        if not wanted:
            wanted = [g.chat_id for g in state.config.group_chats if g.owner == sender]
        for chat_id in wanted:
            chat = chats.get(chat_id)
            if chat is not None and chat.owner == sender:
                targets[chat_id] = sender
            else:
                fail_list.append(chat_id)

    month = china_month(state.now())
    accepted: dict[str, str] = {}
    for recipient, userid in targets.items():
        if state.groupmsg_month_count.get((recipient, month), 0) >= GROUPMSG_PER_MONTH:
            # at most 4 enterprise 群发 per customer/group per natural month (reference §5.4)
            fail_list.append(recipient)
            continue
        key = (recipient, month)
        state.groupmsg_month_count[key] = state.groupmsg_month_count.get(key, 0) + 1
        accepted[recipient] = userid
    if not accepted:
        raise ApiError(NO_RECIPIENTS, "no customers to send to")
    task = GroupMsgTask(
        msgid="msg" + random_token(24),
        chat_type=chat_type,
        sender=sender,
        created_at=state.now(),
        text=text,
        attachments=attachments,
        recipients=dict.fromkeys(accepted, 0),
        assignee=accepted,
        fail_list=fail_list,
    )
    state.groupmsg_tasks[task.msgid] = task
    for recipient, userid in accepted.items():
        state.record_sent(
            api="externalcontact/add_msg_template",
            recipient=recipient,
            account=userid,
            msgtype="text" if text else "attachments",
            content={"text": text, "attachments": attachments, "chat_type": chat_type},
            errcode=0,
            status="pending",
            msgid=task.msgid,
        )
    if state.config.groupmsg_auto_confirm:
        confirm_groupmsg(state, task)
    return {"fail_list": fail_list, "msgid": task.msgid}


def _groupmsg_task(state: SimulatorState, body: JsonDict) -> GroupMsgTask:
    task = state.groupmsg_tasks.get(str(body.get("msgid", "")))
    if task is None:
        raise ApiError(INVALID_PARAMETER, "invalid msgid")
    return task


@endpoint
async def contact_get_groupmsg_task(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    task = _groupmsg_task(state, await read_json(request))
    task_list: list[JsonDict] = []
    for userid in dict.fromkeys(task.assignee.values()):
        mine = [r for r, u in task.assignee.items() if u == userid]
        done = all(task.recipients[r] != 0 for r in mine)
        entry: JsonDict = {"userid": userid, "status": 2 if done else 0}
        if done:
            entry["send_time"] = int(max(task.sent_at.get(r, task.created_at) for r in mine))
        task_list.append(entry)
    return {"next_cursor": "", "task_list": task_list}


@endpoint
async def contact_get_groupmsg_send_result(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    body = await read_json(request)
    task = _groupmsg_task(state, body)
    userid = body.get("userid") or None
    key = "chat_id" if task.chat_type == "group" else "external_userid"
    send_list: list[JsonDict] = []
    for recipient, status in task.recipients.items():
        if userid is not None and task.assignee[recipient] != userid:
            continue
        entry: JsonDict = {key: recipient, "userid": task.assignee[recipient], "status": status}
        if status == 1:
            entry["send_time"] = int(task.sent_at[recipient])
        send_list.append(entry)
    return {"next_cursor": "", "send_list": send_list}


@endpoint
async def contact_groupchat_list(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    body = await read_json(request)
    limit = _int_field(body, "limit", 0)
    if not 1 <= limit <= 1000:
        raise ApiError(INVALID_PARAMETER, "invalid limit, must be 1..1000")
    owner_filter = body.get("owner_filter")
    owners = set(owner_filter.get("userid_list", [])) if isinstance(owner_filter, dict) else set()
    status_filter = _int_field(body, "status_filter", 0)
    chats = [g for g in state.config.group_chats if not owners or g.owner in owners]
    if status_filter != 0:
        # every simulated group has an active owner, so no handover states exist
        chats = []
    start = _int_field(body, "cursor", 0) if body.get("cursor") else 0
    page = chats[start : start + limit]
    next_cursor = str(start + limit) if start + limit < len(chats) else ""
    return {
        "group_chat_list": [{"chat_id": g.chat_id, "status": 0} for g in page],
        "next_cursor": next_cursor,
    }


@endpoint
async def contact_groupchat_get(request: web.Request, state: SimulatorState) -> JsonDict:
    require_token(request, state, CONTACT_LABELS)
    body = await read_json(request)
    chat_id = _str_field(body, "chat_id")
    need_name = body.get("need_name") in (1, True, "1")
    chat = next((g for g in state.config.group_chats if g.chat_id == chat_id), None)
    if chat is None:
        raise ApiError(NOT_CUSTOMER_GROUP, "not a customer group")
    created = int(state.now()) - 86400
    members: list[JsonDict] = [
        {"userid": chat.owner, "type": 1, "join_time": created, "join_scene": 1, "group_nickname": ""}
    ]
    for ext in chat.members:
        member: JsonDict = {
            "userid": ext,
            "type": 2,
            "join_time": created,
            "join_scene": 1,
            "invitor": {"userid": chat.owner},
            "group_nickname": "",
        }
        if need_name:
            contact = state.contacts.get(ext)
            member["name"] = contact.name if contact else ext
        members.append(member)
    if need_name:
        members[0]["name"] = chat.owner
    return {
        "group_chat": {
            "chat_id": chat.chat_id,
            "name": chat.name,
            "owner": chat.owner,
            "create_time": created,
            "notice": "",
            "member_list": members,
            "admin_list": [],
        }
    }


# ---------------------------------------------------------------- group robot


def _robot_content_check(msgtype: str, content: JsonDict) -> None:
    if msgtype == "text":
        _check_text(content, TEXT_LIMIT_B)
    elif msgtype in ("markdown", "markdown_v2"):
        _check_text(content, ROBOT_MARKDOWN_LIMIT_B)
    elif msgtype == "news":
        articles = content.get("articles")
        if not isinstance(articles, list) or not 1 <= len(articles) <= 8:
            raise ApiError(INVALID_PARAMETER, "news.articles must hold 1..8 items")
    elif msgtype == "image":
        if not isinstance(content.get("base64"), str) or not isinstance(content.get("md5"), str):
            raise ApiError(INVALID_PARAMETER, "image needs base64 and md5")
    elif msgtype in ("file", "voice") and not isinstance(content.get("media_id"), str):
        raise ApiError(INVALID_PARAMETER, "media_id missing")


@endpoint
async def webhook_send(request: web.Request, state: SimulatorState) -> JsonDict:
    key = request.query.get("key", "")
    if key not in state.config.robot_keys:
        raise ApiError(ROBOT_KEY_INVALID, "invalid webhook url")
    api = "webhook/send"
    now = state.now()
    msgtype = ""
    content: JsonDict = {}
    try:
        if state.robot_rate.count(key, now) >= ROBOT_PER_MINUTE:
            raise ApiError(FREQUENCY_LIMIT, "api freq out of limit")
        # Failed sends count towards the 20/min too (reference §5.3); the 45009 refusals above do not,
        # so a client that backs off recovers a minute after its burst.
        state.robot_rate.add(key, now)
        body = await read_json(request)
        msgtype = str(body.get("msgtype", ""))
        content = _content_of(body, msgtype)
        if msgtype not in ROBOT_MSGTYPES:
            raise ApiError(INVALID_MSGTYPE, "invalid message type")
        _dict_field(body, msgtype)
        _robot_content_check(msgtype, content)
    except ApiError as exc:
        state.record_sent(
            api=api,
            recipient=key,
            account=key,
            msgtype=msgtype,
            content=content,
            errcode=exc.errcode,
            status="rejected",
        )
        raise
    state.record_sent(
        api=api, recipient=key, account=key, msgtype=msgtype, content=content, errcode=0, status="delivered"
    )
    return {}


# ---------------------------------------------------------------- JS-SDK tickets and OAuth (the chat sidebar)
# Kept beside SimulatorState (not inside it) so the sidebar's additions touch no other module: one JsSdkState per
# SimulatorState, found through `jssdk_state(state)`.

INVALID_OAUTH_CODE = 40029
MISSING_OAUTH_CODE = 41008
JSAPI_TICKET_TTL_S = 7200
OAUTH_CODE_TTL_S = 300  # WeCom: a code is valid for 5 minutes and may be used once


@dataclass(slots=True)
class IssuedTicket:
    ticket: str
    issued_at: float
    expires_at: float


@dataclass(slots=True)
class OAuthCode:
    code: str
    userid: str  # a member's UserID, or "" for a non-member
    openid: str  # a non-member's openid, or ""
    expires_at: float
    used: bool = False


@dataclass(slots=True)
class JsSdkState:
    corp_ticket: IssuedTicket | None = None  # get_jsapi_ticket: one per corp
    agent_tickets: dict[str, IssuedTicket] = field(default_factory=dict)  # ticket/get agent_config: per app secret
    oauth_codes: dict[str, OAuthCode] = field(default_factory=dict)


_JSSDK: weakref.WeakKeyDictionary[SimulatorState, JsSdkState] = weakref.WeakKeyDictionary()


def jssdk_state(state: SimulatorState) -> JsSdkState:
    """The simulator's JS-SDK tickets and OAuth codes (created on first use)."""
    found = _JSSDK.get(state)
    if found is None:
        found = _JSSDK[state] = JsSdkState()
    return found


def _current_ticket(state: SimulatorState, current: IssuedTicket | None) -> IssuedTicket:
    """Within its validity the same ticket is returned again (as for access tokens); after it, a new one."""
    now = state.now()
    if current is not None and current.expires_at > now:
        return current
    return IssuedTicket(random_token(86), now, now + JSAPI_TICKET_TTL_S)


def _ticket_answer(state: SimulatorState, issued: IssuedTicket) -> JsonDict:
    return {"ticket": issued.ticket, "expires_in": max(1, int(issued.expires_at - state.now()))}


@endpoint
async def get_jsapi_ticket(request: web.Request, state: SimulatorState) -> JsonDict:
    """`GET cgi-bin/get_jsapi_ticket`: the corp's jsapi_ticket, for wx.config."""
    require_token(request, state, APP_LABELS)
    sdk = jssdk_state(state)
    sdk.corp_ticket = _current_ticket(state, sdk.corp_ticket)
    return _ticket_answer(state, sdk.corp_ticket)


@endpoint
async def ticket_get(request: web.Request, state: SimulatorState) -> JsonDict:
    """`GET cgi-bin/ticket/get?type=agent_config`: the app's jsapi_ticket, for wx.agentConfig."""
    issued = require_token(request, state, APP_LABELS)
    if request.query.get("type", "") != "agent_config":
        raise ApiError(INVALID_PARAMETER, "invalid type")
    sdk = jssdk_state(state)
    ticket = sdk.agent_tickets[issued.secret] = _current_ticket(state, sdk.agent_tickets.get(issued.secret))
    return _ticket_answer(state, ticket)


def mint_oauth_code(state: SimulatorState, *, userid: str = "", openid: str = "") -> OAuthCode:
    """The code WeCom appends to the OAuth redirect for this member (or, with openid, this non-member)."""
    if bool(userid) == bool(openid):
        raise ValueError("give exactly one of userid and openid")
    if userid and userid not in state.config.members:
        raise ValueError(f"{userid!r} is not a member")
    code = OAuthCode(random_token(43), userid, openid, state.now() + OAUTH_CODE_TTL_S)
    jssdk_state(state).oauth_codes[code.code] = code
    return code


@endpoint
async def auth_getuserinfo(request: web.Request, state: SimulatorState) -> JsonDict:
    """`GET cgi-bin/auth/getuserinfo?code=`: who followed the OAuth link. Codes are single-use, 5 minutes."""
    require_token(request, state, APP_LABELS)
    value = request.query.get("code", "")
    if not value:
        raise ApiError(MISSING_OAUTH_CODE, "missing code")
    code = jssdk_state(state).oauth_codes.get(value)
    if code is None or code.used or code.expires_at <= state.now():
        raise ApiError(INVALID_OAUTH_CODE, "invalid code")
    code.used = True
    if code.userid:
        return {"userid": code.userid, "user_ticket": random_token(64)}
    return {"openid": code.openid}


def add_api_routes(app: web.Application) -> None:
    app.router.add_get("/cgi-bin/gettoken", gettoken)
    app.router.add_post("/cgi-bin/message/send", message_send)
    app.router.add_post("/cgi-bin/kf/send_msg", kf_send_msg)
    app.router.add_post("/cgi-bin/kf/send_msg_on_event", kf_send_msg_on_event)
    app.router.add_post("/cgi-bin/kf/sync_msg", kf_sync_msg)
    app.router.add_post("/cgi-bin/kf/service_state/get", kf_service_state_get)
    app.router.add_post("/cgi-bin/kf/service_state/trans", kf_service_state_trans)
    app.router.add_get("/cgi-bin/kf/servicer/list", kf_servicer_list)
    app.router.add_post("/cgi-bin/kf/account/list", kf_account_list)
    app.router.add_get("/cgi-bin/externalcontact/get", contact_get)
    app.router.add_post("/cgi-bin/externalcontact/send_welcome_msg", contact_send_welcome_msg)
    app.router.add_post("/cgi-bin/externalcontact/mark_tag", contact_mark_tag)
    app.router.add_post("/cgi-bin/externalcontact/get_corp_tag_list", contact_get_corp_tag_list)
    app.router.add_post("/cgi-bin/externalcontact/add_msg_template", contact_add_msg_template)
    app.router.add_post("/cgi-bin/externalcontact/get_groupmsg_task", contact_get_groupmsg_task)
    app.router.add_post("/cgi-bin/externalcontact/get_groupmsg_send_result", contact_get_groupmsg_send_result)
    app.router.add_post("/cgi-bin/externalcontact/groupchat/list", contact_groupchat_list)
    app.router.add_post("/cgi-bin/externalcontact/groupchat/get", contact_groupchat_get)
    app.router.add_post("/cgi-bin/webhook/send", webhook_send)
    app.router.add_get("/cgi-bin/get_jsapi_ticket", get_jsapi_ticket)
    app.router.add_get("/cgi-bin/ticket/get", ticket_get)
    app.router.add_get("/cgi-bin/auth/getuserinfo", auth_getuserinfo)


__all__ = [
    "ApiError",
    "JsSdkState",
    "OAuthCode",
    "add_api_routes",
    "confirm_groupmsg",
    "jssdk_state",
    "mint_oauth_code",
]
