"""Async WeCom API client on aiohttp (reference §0.1, §4, §5, §7).

- `WeComClient`: one instance per secret (the app secret and the kf secret each get their own instance and
  their own cached token). The access token goes in the query string, never in the body.
- `RobotClient`: the group robot webhook (`?key=`, no access token).

Retry policy (reference §5.1, §7):
- 40014 / 42001 / 41001: drop the cached token (only if it is still the one that failed) and retry once.
- -1 (system busy, at most 3 retries), 45009, 45033, timeouts, connection errors, HTTP 429 and 5xx: retried up
  to `max_retries` times with capped exponential backoff and full jitter.
- Everything else (parameter, permission, state errors; gettoken 40001) raises a typed error at once.

Logs and errors name the API path and errcode only: never a token, a secret or a robot key.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import redis.asyncio as redis_asyncio
import structlog

from bot.metrics import Metrics
from bot.redis_keys import RedisKeys
from bot.wecom.errors import (
    SYSTEM_BUSY,
    WeComApiError,
    WeComError,
    WeComTransportError,
    api_error,
)
from bot.wecom.tokens import GETTOKEN_PATH, AccessToken, TokenStore
from handlers.domain import Clock

log = structlog.get_logger(__name__)

JsonDict = dict[str, Any]
Sleep = Callable[[float], Awaitable[None]]

# WeCom's own advice: retry "system busy" no more than 3 times (reference §5.1).
MAX_SYSTEM_BUSY_RETRIES = 3
DEFAULT_EXPIRES_IN = 7200


@dataclass(frozen=True, slots=True)
class ServiceState:
    service_state: int  # 0 new, 1 bot, 2 pool, 3 human, 4 ended (reference §4.1)
    servicer_userid: str | None  # only meaningful in state 3
    raw: JsonDict = field(repr=False, default_factory=dict)


class _HttpApi:
    """One HTTP attempt at a time, plus the shared backoff policy; subclasses own the retry loops."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        api_base: str,
        metrics: Metrics | None,
        *,
        max_retries: int,
        timeout_s: float,
        backoff_base_s: float,
        backoff_cap_s: float,
        sleep: Sleep,
        jitter: Callable[[], float],
    ) -> None:
        self._http = http
        self._api_base = api_base.rstrip("/")
        self._metrics = metrics
        self._max_retries = max(0, max_retries)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._backoff_base = backoff_base_s
        self._backoff_cap = backoff_cap_s
        self._sleep = sleep
        self._jitter = jitter

    def backoff_delay(self, retry_index: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**retry_index)]."""
        ceiling = min(self._backoff_cap, self._backoff_base * (2.0 ** min(retry_index, 32)))
        return ceiling * self._jitter()

    def _count(self, path: str, errcode: str) -> None:
        if self._metrics is not None:
            self._metrics.api_calls.labels(path, errcode).inc()

    async def _attempt(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str],
        body: Mapping[str, Any] | None,
        hidden: Sequence[str],
    ) -> JsonDict:
        """One HTTP request: the parsed JSON object, or WeComTransportError. `hidden` values never show."""
        url = f"{self._api_base}{path}"
        data: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json; charset=utf-8"
        try:
            async with self._http.request(
                method, url, params=dict(params), data=data, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                payload = await response.read()
        except TimeoutError:
            self._count(path, "transport")
            raise WeComTransportError(path, "timeout") from None
        except aiohttp.InvalidURL:
            self._count(path, "transport")
            raise WeComTransportError(path, "invalid URL", retryable=False) from None
        except aiohttp.ClientResponseError as exc:  # a session created with raise_for_status=True
            self._count(path, "transport")
            retryable = exc.status >= 500 or exc.status == 429
            raise WeComTransportError(
                path, "unexpected HTTP status", status=exc.status, retryable=retryable
            ) from None
        except aiohttp.ClientError as exc:
            self._count(path, "transport")
            raise WeComTransportError(path, _scrub(f"{type(exc).__name__}: {exc}", hidden)) from None
        if status != 200:
            self._count(path, "transport")
            retryable = status >= 500 or status == 429
            raise WeComTransportError(path, "unexpected HTTP status", status=status, retryable=retryable)
        try:
            parsed: Any = json.loads(payload)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            self._count(path, "transport")
            raise WeComTransportError(path, "response is not a JSON object", status=status)
        self._count(path, str(_errcode(parsed)))
        return parsed

    async def _backoff_or_raise(
        self, failure: WeComError, path: str, retries: int, busy: int
    ) -> tuple[int, int]:
        """Sleep before the next try if `failure` may be retried; else raise it. Returns (retries, busy)."""
        if not failure.retryable or retries >= self._max_retries:
            raise failure
        errcode: int | str = "transport"
        if isinstance(failure, WeComApiError):
            errcode = failure.errcode
            if errcode == SYSTEM_BUSY:
                if busy >= MAX_SYSTEM_BUSY_RETRIES:
                    raise failure
                busy += 1
        delay = self.backoff_delay(retries)
        log.warning("wecom.api.retry", path=path, errcode=errcode, retry=retries + 1, delay_s=round(delay, 3))
        await self._sleep(delay)
        return retries + 1, busy


class WeComClient(_HttpApi):
    def __init__(
        self,
        http: aiohttp.ClientSession,
        redis: redis_asyncio.Redis,
        keys: RedisKeys,
        api_base: str,
        corp_id: str,
        secret: str,
        *,
        metrics: Metrics | None,
        clock: Clock,
        max_retries: int = 3,
        timeout_s: float = 10.0,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 5.0,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        token_refresh_margin_s: float = 300.0,
        credential_error_ttl_s: float = 60.0,
    ) -> None:
        super().__init__(
            http,
            api_base,
            metrics,
            max_retries=max_retries,
            timeout_s=timeout_s,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            sleep=sleep,
            jitter=jitter,
        )
        self._corp_id = corp_id
        self._secret = secret
        # the lock outlives the slowest possible gettoken (every try timing out plus the backoffs)
        lock_ttl_s = (timeout_s + backoff_cap_s) * (self._max_retries + 1) + 5.0
        self._tokens = TokenStore(
            redis,
            keys,
            corp_id,
            secret,
            self._fetch_token,
            clock=clock,
            refresh_margin_s=token_refresh_margin_s,
            lock_ttl_s=lock_ttl_s,
            credential_error_ttl_s=credential_error_ttl_s,
        )

    def __repr__(self) -> str:
        return f"WeComClient(api_base={self._api_base!r}, corp_id={self._corp_id!r})"

    # ---- tokens -------------------------------------------------------------------------------------------

    async def access_token(self) -> str:
        """The current access token (cached; refreshed single-flight). For calls this client does not wrap."""
        return (await self._tokens.get()).value

    async def _fetch_token(self) -> tuple[str, int]:
        """One gettoken, retried only for transient failures; a credential error (40001) raises at once."""
        retries = busy = 0
        params = {"corpid": self._corp_id, "corpsecret": self._secret}
        while True:
            try:
                data = await self._attempt(
                    "GET", GETTOKEN_PATH, params=params, body=None, hidden=(self._secret,)
                )
                _raise_for_errcode(data, GETTOKEN_PATH)
                token = data.get("access_token")
                if not isinstance(token, str) or not token:
                    raise WeComTransportError(GETTOKEN_PATH, "gettoken answered without access_token")
                try:
                    expires_in = int(data.get("expires_in", DEFAULT_EXPIRES_IN))
                except (TypeError, ValueError):
                    expires_in = DEFAULT_EXPIRES_IN
                return token, expires_in if expires_in > 0 else DEFAULT_EXPIRES_IN
            except WeComError as failure:
                retries, busy = await self._backoff_or_raise(failure, GETTOKEN_PATH, retries, busy)

    # ---- the call loop ------------------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        retry_uncertain: bool = True,
    ) -> JsonDict:
        """Call any JSON API under `api_base` (path like "/cgi-bin/kf/send_msg"); the errcode-0 response.

        A transport failure leaves it unknown whether WeCom acted. `retry_uncertain=False` raises at once in that
        case, for sends that carry no key WeCom could deduplicate on; an error raised after such an uncertain try
        has `after_uncertain_attempt` set, so callers can read a "duplicate" errcode as "already done".
        """
        refreshed = False
        uncertain = False
        retries = busy = 0
        while True:
            token: AccessToken = await self._tokens.get()  # gettoken has its own retries; not repeated here
            params = {**(query or {}), "access_token": token.value}
            try:
                data = await self._attempt(method, path, params=params, body=body, hidden=(token.value,))
                _raise_for_errcode(data, path)
                return data
            except WeComApiError as err:
                if err.token_invalid and not refreshed:
                    refreshed = True
                    await self._tokens.invalidate(token)
                    log.info("wecom.token.rejected", path=path, errcode=err.errcode)
                    continue
                err.after_uncertain_attempt = uncertain
                failure: WeComError = err
            except WeComTransportError as err:
                if err.retryable and not retry_uncertain:
                    raise
                uncertain = True
                failure = err
            retries, busy = await self._backoff_or_raise(failure, path, retries, busy)

    async def _post(self, path: str, body: Mapping[str, Any]) -> JsonDict:
        return await self.call("POST", path, body=body)

    async def _get(self, path: str, query: Mapping[str, str]) -> JsonDict:
        return await self.call("GET", path, query=query)

    # ---- app messages (reference §5.2) --------------------------------------------------------------------

    async def message_send(
        self,
        payload: Mapping[str, Any],
        *,
        enable_duplicate_check: bool | None = None,
        duplicate_check_interval: int | None = None,
    ) -> JsonDict:
        """`message/send`; `payload` has agentid, touser/toparty/totag, msgtype and its content."""
        body = dict(payload)
        if enable_duplicate_check is not None:
            body["enable_duplicate_check"] = 1 if enable_duplicate_check else 0
        if duplicate_check_interval is not None:
            body["duplicate_check_interval"] = duplicate_check_interval
        # Without WeCom's duplicate check a retry after a timeout could deliver the message twice.
        deduplicated = body.get("enable_duplicate_check") in (1, True)
        return await self.call("POST", "/cgi-bin/message/send", body=body, retry_uncertain=deduplicated)

    # ---- 微信客服 (reference §4) -------------------------------------------------------------------------

    async def kf_send_msg(
        self,
        touser: str,
        open_kfid: str,
        msgtype: str,
        content: Mapping[str, Any],
        msgid: str | None = None,
    ) -> JsonDict:
        """`kf/send_msg`, allowed only in session states 0 and 1 (else KfStateError 95018).

        Returns the response; its "msgid" is WeCom's id for the message (ours, echoed, when we passed one).
        """
        body: JsonDict = {"touser": touser, "open_kfid": open_kfid, "msgtype": msgtype}
        body[msgtype] = dict(content)
        if msgid is not None:
            body["msgid"] = msgid
        data = await self._post("/cgi-bin/kf/send_msg", body)
        if msgid and not data.get("msgid"):
            data["msgid"] = msgid
        return data

    async def kf_send_msg_on_event(
        self, code: str, msgtype: str, content: Mapping[str, Any], msgid: str | None = None
    ) -> JsonDict:
        """`kf/send_msg_on_event` with a welcome_code or msg_code (single use; reference §4.4)."""
        body: JsonDict = {"code": code, "msgtype": msgtype, msgtype: dict(content)}
        if msgid is not None:
            body["msgid"] = msgid
        data = await self._post("/cgi-bin/kf/send_msg_on_event", body)
        if msgid and not data.get("msgid"):
            data["msgid"] = msgid
        return data

    async def kf_sync_msg(
        self,
        token: str | None,
        open_kfid: str,
        cursor: str | None = None,
        limit: int = 1000,
        voice_format: int | None = None,
    ) -> JsonDict:
        """One page of `kf/sync_msg`: {next_cursor, has_more, msg_list}.

        `token` is the callback Token (valid 10 min; without it WeCom applies strict limits).
        Keep pulling while has_more = 1, even when msg_list is empty (reference §4.2).
        """
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be between 1 and 1000")
        body: JsonDict = {"open_kfid": open_kfid, "limit": limit}
        if token:
            body["token"] = token
        if cursor:
            body["cursor"] = cursor
        if voice_format is not None:
            body["voice_format"] = voice_format
        return await self._post("/cgi-bin/kf/sync_msg", body)

    async def kf_service_state_get(self, open_kfid: str, external_userid: str) -> ServiceState:
        data = await self._post(
            "/cgi-bin/kf/service_state/get", {"open_kfid": open_kfid, "external_userid": external_userid}
        )
        servicer = data.get("servicer_userid")
        return ServiceState(int(data.get("service_state", 0)), str(servicer) if servicer else None, data)

    async def kf_service_state_trans(
        self, open_kfid: str, external_userid: str, service_state: int, servicer_userid: str | None = None
    ) -> str | None:
        """`kf/service_state/trans`; returns msg_code (first move to 2/3, or to 4) for send_msg_on_event."""
        if service_state == 3 and not servicer_userid:
            raise ValueError("servicer_userid is required to hand a session to a human (state 3)")
        body: JsonDict = {"open_kfid": open_kfid, "external_userid": external_userid}
        body["service_state"] = service_state
        if servicer_userid:
            body["servicer_userid"] = servicer_userid
        data = await self._post("/cgi-bin/kf/service_state/trans", body)
        msg_code = data.get("msg_code")
        return str(msg_code) if msg_code else None

    async def kf_servicer_list(self, open_kfid: str) -> list[JsonDict]:
        """`kf/servicer/list`: [{userid, status (0 receiving, 1 stopped), stop_type, ...}]."""
        data = await self._get("/cgi-bin/kf/servicer/list", {"open_kfid": open_kfid})
        return [s for s in data.get("servicer_list") or [] if isinstance(s, dict)]

    # ---- 客户联系 (reference §5.4-§5.7) ----------------------------------------------------------------

    async def externalcontact_get(self, external_userid: str, cursor: str | None = None) -> JsonDict:
        query = {"external_userid": external_userid}
        if cursor:
            query["cursor"] = cursor
        return await self._get("/cgi-bin/externalcontact/get", query)

    async def send_welcome_msg(
        self,
        welcome_code: str,
        text: str | None = None,
        attachments: Sequence[Mapping[str, Any]] | None = None,
    ) -> JsonDict:
        """Within 20 s of add_external_contact, once (41050 expired code, 41051 already chatting)."""
        body: JsonDict = {"welcome_code": welcome_code}
        if text is not None:
            body["text"] = {"content": text}
        if attachments:
            body["attachments"] = [dict(a) for a in attachments]
        return await self._post("/cgi-bin/externalcontact/send_welcome_msg", body)

    async def mark_tag(
        self,
        userid: str,
        external_userid: str,
        add_tag: Iterable[str] = (),
        remove_tag: Iterable[str] = (),
    ) -> JsonDict:
        add, remove = list(add_tag), list(remove_tag)
        if not add and not remove:
            raise ValueError("mark_tag needs add_tag or remove_tag")
        body: JsonDict = {"userid": userid, "external_userid": external_userid}
        if add:
            body["add_tag"] = add
        if remove:
            body["remove_tag"] = remove
        return await self._post("/cgi-bin/externalcontact/mark_tag", body)

    async def get_corp_tag_list(self, tag_id: Iterable[str] = (), group_id: Iterable[str] = ()) -> JsonDict:
        """All corp tags when both filters are empty; the answer's `tag_group` lists groups and tags."""
        body: JsonDict = {}
        tags, groups = list(tag_id), list(group_id)
        if tags:
            body["tag_id"] = tags
        if groups:
            body["group_id"] = groups
        return await self._post("/cgi-bin/externalcontact/get_corp_tag_list", body)

    async def add_msg_template(self, payload: Mapping[str, Any]) -> JsonDict:
        """Creates a mass-send task the member must confirm; returns {msgid, fail_list} (reference §5.4)."""
        return await self._post("/cgi-bin/externalcontact/add_msg_template", dict(payload))

    async def get_groupmsg_task(
        self, msgid: str, *, limit: int | None = None, cursor: str | None = None
    ) -> JsonDict:
        body: JsonDict = {"msgid": msgid}
        if limit is not None:
            body["limit"] = limit
        if cursor:
            body["cursor"] = cursor
        return await self._post("/cgi-bin/externalcontact/get_groupmsg_task", body)

    async def get_groupmsg_send_result(
        self, msgid: str, userid: str, *, limit: int | None = None, cursor: str | None = None
    ) -> JsonDict:
        body: JsonDict = {"msgid": msgid, "userid": userid}
        if limit is not None:
            body["limit"] = limit
        if cursor:
            body["cursor"] = cursor
        return await self._post("/cgi-bin/externalcontact/get_groupmsg_send_result", body)

    async def groupchat_list(
        self,
        *,
        status_filter: int = 0,
        owner_userids: Iterable[str] = (),
        cursor: str | None = None,
        limit: int = 1000,
    ) -> JsonDict:
        """One page of customer groups: {group_chat_list: [{chat_id, status}], next_cursor ("" = end)}."""
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be between 1 and 1000")
        body: JsonDict = {"status_filter": status_filter, "limit": limit}
        owners = list(owner_userids)
        if owners:
            body["owner_filter"] = {"userid_list": owners}
        if cursor:
            body["cursor"] = cursor
        return await self._post("/cgi-bin/externalcontact/groupchat/list", body)

    async def groupchat_get(self, chat_id: str, need_name: bool = False) -> JsonDict:
        return await self._post(
            "/cgi-bin/externalcontact/groupchat/get", {"chat_id": chat_id, "need_name": 1 if need_name else 0}
        )


class RobotClient(_HttpApi):
    """Group robot webhook (reference §5.3): 20 messages/min per robot, internal groups only.

    Same retry rules as WeComClient; the key is a secret and never appears in a log or an error.
    """

    PATH = "/cgi-bin/webhook/send"

    def __init__(
        self,
        http: aiohttp.ClientSession,
        api_base: str,
        metrics: Metrics | None,
        *,
        max_retries: int = 3,
        timeout_s: float = 10.0,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 5.0,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(
            http,
            api_base,
            metrics,
            max_retries=max_retries,
            timeout_s=timeout_s,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            sleep=sleep,
            jitter=jitter,
        )

    def __repr__(self) -> str:
        return f"RobotClient(api_base={self._api_base!r})"

    async def send(self, key: str, payload: Mapping[str, Any]) -> JsonDict:
        """POST a message (e.g. {"msgtype": "text", "text": {"content": ...}}) to the robot with this key."""
        retries = busy = 0
        while True:
            try:
                data = await self._attempt(
                    "POST", self.PATH, params={"key": key}, body=payload, hidden=(key,)
                )
                _raise_for_errcode(data, self.PATH)
                return data
            except WeComError as failure:
                retries, busy = await self._backoff_or_raise(failure, self.PATH, retries, busy)


def _errcode(data: Mapping[str, Any]) -> int:
    try:
        return int(data.get("errcode", 0))
    except (TypeError, ValueError):
        return SYSTEM_BUSY  # an answer we cannot read is treated as "system busy"


def _raise_for_errcode(data: Mapping[str, Any], path: str) -> None:
    errcode = _errcode(data)
    if errcode != 0:
        raise api_error(errcode, str(data.get("errmsg", "")), path)


def _scrub(text: str, hidden: Sequence[str]) -> str:
    for value in hidden:
        if value:
            for form in (value, quote(value, safe=""), quote_plus(value)):
                text = text.replace(form, "[redacted]")
    return text
