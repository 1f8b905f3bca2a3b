"""Turn an OutboundMessage into the right WeCom API call, with a provider-side idempotency key."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from handlers.domain import Channel, OutboundMessage

# kf/send_msg: msgid ≤ 32 bytes of [0-9a-zA-Z_-], unique within the kf account (reference §4.3).
# message/send: WeCom's own duplicate check, at its 4 h maximum, closes the send-then-crash window.
DUPLICATE_CHECK_INTERVAL_S = 4 * 3600


def reply_idempotency_key(channel: str, inbound_msgid: str, seq: int) -> str:
    """A deterministic key per (inbound message, reply number) that fits WeCom's msgid rules."""
    digest = hashlib.sha1(f"{channel}:{inbound_msgid}".encode()).hexdigest()[:24]  # noqa: S324
    return f"r{digest}-{seq}"


class KfApi(Protocol):
    async def kf_send_msg(
        self, touser: str, open_kfid: str, msgtype: str, content: dict[str, Any], msgid: str | None = None
    ) -> dict[str, Any]: ...

    async def kf_send_msg_on_event(
        self, code: str, msgtype: str, content: dict[str, Any], msgid: str | None = None
    ) -> dict[str, Any]: ...


class AppApi(Protocol):
    async def message_send(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def send_welcome_msg(
        self,
        welcome_code: str,
        text: str | None = None,
        attachments: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]: ...


class WeComSender:
    """Sends replies through kf/send_msg, send_msg_on_event, message/send or send_welcome_msg."""

    def __init__(self, app_api: AppApi, kf_api: KfApi, agent_id: int | None) -> None:
        self._app = app_api
        self._kf = kf_api
        self._agent_id = agent_id

    async def send(self, reply: OutboundMessage, idempotency_key: str, *, resend: bool = False) -> str | None:
        """Send one reply; return WeCom's msgid when it gives one. WeCom errors propagate as typed errors.

        `resend` marks a reply an earlier attempt may already have delivered. kf sends always carry the msgid,
        which WeCom refuses to accept twice; app messages switch on WeCom's content-based duplicate check only
        then, because on a first send it would also swallow a genuine second, identical reply.
        """
        content = dict(reply.content)
        if reply.channel is Channel.KF:
            if reply.welcome_code:
                response = await self._kf.kf_send_msg_on_event(
                    reply.welcome_code, reply.msgtype, content, msgid=idempotency_key
                )
            else:
                response = await self._kf.kf_send_msg(
                    reply.to, reply.account_id, reply.msgtype, content, msgid=idempotency_key
                )
            return str(response.get("msgid") or idempotency_key)
        if reply.channel is Channel.CONTACT and reply.welcome_code:
            await self._app.send_welcome_msg(reply.welcome_code, text=str(content.get("content", "")))
            return None
        payload: dict[str, Any] = {
            "touser": reply.to,
            "agentid": self._agent_id if self._agent_id is not None else int(reply.account_id or 0),
            "msgtype": reply.msgtype,
            reply.msgtype: content,
        }
        if resend:
            payload["enable_duplicate_check"] = 1
            payload["duplicate_check_interval"] = DUPLICATE_CHECK_INTERVAL_S
        response = await self._app.message_send(payload)
        msgid = response.get("msgid")
        return str(msgid) if msgid else None
