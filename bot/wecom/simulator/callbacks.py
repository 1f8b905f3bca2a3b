"""Callback plaintexts (reference §3) and their delivery: encrypted, signed and retried as WeCom does."""

from __future__ import annotations

import asyncio
import secrets

import aiohttp

from bot.wecom.crypto import CallbackCrypto

from .state import CallbackAttempt, CallbackDelivery, SimulatorState

XmlField = tuple[str, str | int]


def cdata(value: str) -> str:
    # "]]>" cannot appear inside one CDATA section, so it is split across two.
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def xml_document(fields: list[XmlField]) -> str:
    parts = ["<xml>"]
    for name, value in fields:
        text = str(value) if isinstance(value, int) else cdata(value)
        parts.append(f"<{name}>{text}</{name}>")
    parts.append("</xml>")
    return "".join(parts)


def kf_event_xml(state: SimulatorState, open_kfid: str, token: str) -> str:
    return xml_document(
        [
            ("ToUserName", state.config.corp_id),
            ("CreateTime", int(state.now())),
            ("MsgType", "event"),
            ("Event", "kf_msg_or_event"),
            ("Token", token),
            ("OpenKfId", open_kfid),
        ]
    )


def app_text_xml(state: SimulatorState, from_userid: str, content: str, msgid: int) -> str:
    return xml_document(
        [
            ("ToUserName", state.config.corp_id),
            ("FromUserName", from_userid),
            ("CreateTime", int(state.now())),
            ("MsgType", "text"),
            ("Content", content),
            ("MsgId", msgid),
            ("AgentID", state.config.agent_id),
        ]
    )


def app_event_xml(state: SimulatorState, from_userid: str, event: str, event_key: str) -> str:
    return xml_document(
        [
            ("ToUserName", state.config.corp_id),
            ("FromUserName", from_userid),
            ("CreateTime", int(state.now())),
            ("MsgType", "event"),
            ("Event", event),
            ("EventKey", event_key),
            ("AgentID", state.config.agent_id),
        ]
    )


def external_contact_xml(
    state: SimulatorState,
    change_type: str,
    userid: str,
    external_userid: str,
    channel_state: str,
    welcome_code: str | None,
) -> str:
    fields: list[XmlField] = [
        ("ToUserName", state.config.corp_id),
        ("FromUserName", "sys"),
        ("CreateTime", int(state.now())),
        ("MsgType", "event"),
        ("Event", "change_external_contact"),
        ("ChangeType", change_type),
        ("UserID", userid),
        ("ExternalUserID", external_userid),
    ]
    if channel_state:
        fields.append(("State", channel_state))
    if welcome_code is not None:
        fields.append(("WelcomeCode", welcome_code))
    return xml_document(fields)


def envelope_xml(corp_id: str, encrypted: str, agent_id: int) -> str:
    return (
        f"<xml><ToUserName>{cdata(corp_id)}</ToUserName>"
        f"<Encrypt>{cdata(encrypted)}</Encrypt>"
        f"<AgentID>{cdata(str(agent_id))}</AgentID></xml>"
    )


def build_delivery(state: SimulatorState, kind: str, plaintext: str) -> CallbackDelivery:
    config = state.config
    crypto = CallbackCrypto(config.token, config.aes_key, config.corp_id)
    timestamp = str(int(state.now()))
    nonce = str(secrets.randbelow(9 * 10**9) + 10**9)
    encrypted, signature = crypto.encrypt_and_sign(plaintext, timestamp, nonce)
    delivery = CallbackDelivery(
        id=len(state.deliveries) + 1,
        kind=kind,
        plaintext=plaintext,
        query={"msg_signature": signature, "timestamp": timestamp, "nonce": nonce},
        body=envelope_xml(config.corp_id, encrypted, config.agent_id),
        url=state.callback_url,
    )
    state.deliveries.append(delivery)
    return delivery


def redelivery(state: SimulatorState, original: CallbackDelivery) -> CallbackDelivery:
    """The same query and body again, as WeCom does when it believes the first try failed."""
    delivery = CallbackDelivery(
        id=len(state.deliveries) + 1,
        kind=original.kind,
        plaintext=original.plaintext,
        query=dict(original.query),
        body=original.body,
        url=state.callback_url,
        redelivery_of=original.id,
    )
    state.deliveries.append(delivery)
    return delivery


def start_delivery(state: SimulatorState, delivery: CallbackDelivery) -> None:
    """Deliver in the background: the caller (a control request) must not wait on the bot."""
    task = asyncio.get_running_loop().create_task(deliver(state, delivery))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def deliver(state: SimulatorState, delivery: CallbackDelivery) -> None:
    try:
        if delivery.url is None:
            delivery.outcome = "no_callback_url"
            return
        config = state.config
        session = await state_http(state)
        loop = asyncio.get_running_loop()
        for attempt_no in range(config.callback_tries):
            if attempt_no and config.callback_retry_delay_s > 0:
                await asyncio.sleep(config.callback_retry_delay_s)
            started = loop.time()
            at = state.now()
            try:
                async with session.post(
                    delivery.url,
                    params=delivery.query,
                    data=delivery.body.encode("utf-8"),
                    headers={"Content-Type": "text/xml; charset=utf-8"},
                    timeout=aiohttp.ClientTimeout(total=config.callback_timeout_s),
                ) as response:
                    await response.read()
                    status = response.status
            except TimeoutError:
                delivery.attempts.append(CallbackAttempt(at, None, loop.time() - started, "timeout"))
                continue
            except aiohttp.ClientError as exc:
                delivery.attempts.append(
                    CallbackAttempt(at, None, loop.time() - started, f"{type(exc).__name__}: {exc}")
                )
                continue
            delivery.attempts.append(CallbackAttempt(at, status, loop.time() - started))
            # Only a 200 counts as received (reference §1.4); anything else is retried.
            if status == 200:
                delivery.outcome = "delivered"
                return
        delivery.outcome = "failed"
    finally:
        if delivery.outcome == "pending":
            delivery.outcome = "failed"
        delivery.finished.set()


async def verify_url(state: SimulatorState) -> dict[str, object]:
    """The GET WeCom sends when the admin saves the callback URL (reference §1.1): echo the plaintext."""
    if state.callback_url is None:
        return {"ok": False, "error": "no callback_url"}
    config = state.config
    crypto = CallbackCrypto(config.token, config.aes_key, config.corp_id)
    expected = str(secrets.randbelow(9 * 10**18) + 10**18)
    timestamp = str(int(state.now()))
    nonce = str(secrets.randbelow(9 * 10**8) + 10**8)
    echostr, signature = crypto.encrypt_and_sign(expected, timestamp, nonce)
    query = {"msg_signature": signature, "timestamp": timestamp, "nonce": nonce, "echostr": echostr}
    session = await state_http(state)
    try:
        async with session.get(
            state.callback_url,
            params=query,
            timeout=aiohttp.ClientTimeout(total=config.callback_timeout_s),
        ) as response:
            body = await response.text()
            status = response.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "expected": expected}
    # WeCom wants the bare plaintext: no quotes, BOM or trailing newline.
    return {"ok": status == 200 and body == expected, "status": status, "body": body, "expected": expected}


async def state_http(state: SimulatorState) -> aiohttp.ClientSession:
    if state.http is None or state.http.closed:
        state.http = aiohttp.ClientSession()
    return state.http
