"""What a worker does with one queue entry: persist, dispatch, send each reply once, then mark handled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from bot.outbound import reply_idempotency_key
from bot.queue import MalformedEntry, QueueEntry
from bot.storage.models import MessageStatus
from bot.storage.repositories import Repositories
from bot.wecom.errors import WeComApiError
from bot.wecom.parse import CallbackParseError, kf_message_to_inbound, parse_plaintext, to_inbound
from handlers.dispatcher import Dispatcher
from handlers.domain import Clock, HandlerContext, InboundMessage, OutboundMessage

log = structlog.get_logger(__name__)

# kf/send_msg rejects a msgid already used in the account (reference §4.3). Which errcode real WeCom uses is not
# documented (reference open question 5); 40058 (invalid parameter) is our reading, and the simulator's.
DUPLICATE_MSGID_ERRCODE = 40058


class ReplySender(Protocol):
    async def send(self, reply: OutboundMessage, idempotency_key: str, *, resend: bool = False) -> str | None: ...


class KfPullPort(Protocol):
    async def pull(self, open_kfid: str, token: str) -> int: ...


class Pipeline:
    """Turns queue entries into handled messages; safe to run again on the same entry."""

    def __init__(
        self,
        repos: Repositories,
        dispatcher: Dispatcher,
        sender: ReplySender,
        kf_puller: KfPullPort,
        clock: Clock,
    ) -> None:
        self._repos = repos
        self._dispatcher = dispatcher
        self._sender = sender
        self._kf_puller = kf_puller
        self._clock = clock

    async def process(self, entry: QueueEntry) -> None:
        """Handle one entry; raising leaves it pending so the worker retries (then dead-letters) it."""
        if entry.kind == "kf_pull":
            await self._kf_puller.pull(str(entry.payload["open_kfid"]), str(entry.payload["token"]))
            return
        message = self._decode(entry)
        await self.handle(message)

    def _decode(self, entry: QueueEntry) -> InboundMessage:
        try:
            if entry.kind == "callback":
                return to_inbound(parse_plaintext(str(entry.payload["xml"])))
            if entry.kind == "kf_message":
                msg = entry.payload["msg"]
                if not isinstance(msg, Mapping):
                    raise MalformedEntry("kf_message payload has no msg object")
                return kf_message_to_inbound(msg)
        except (CallbackParseError, KeyError, TypeError, ValueError) as exc:
            raise MalformedEntry(f"{entry.kind}: {type(exc).__name__}") from None
        raise MalformedEntry(f"unknown entry kind {entry.kind!r}")

    async def handle(self, message: InboundMessage) -> None:
        """Persist, dispatch and reply; a message already handled is left alone."""
        messages = self._repos.messages
        record = await messages.record_inbound(message)
        if record.handled:
            return
        bound = log.bind(channel=message.channel.value, msgtype=message.msgtype, message_id=record.id)
        if message.msgtype == "unknown":
            bound.info("unknown message type stored", wecom_type=_wecom_type(message.raw))
            await messages.mark_status(record.id, MessageStatus.UNKNOWN)
            return
        dispatch = await self._dispatcher.dispatch(message, HandlerContext(clock=self._clock))
        for seq, reply in enumerate(dispatch.replies):
            await self._send_once(record.id, message, seq, reply)
        await messages.mark_handled(record.id, dispatch.handler_name)
        bound.info("message handled", handler=dispatch.handler_name, replies=len(dispatch.replies))

    async def _send_once(self, inbound_id: int, message: InboundMessage, seq: int, reply: OutboundMessage) -> None:
        key = reply_idempotency_key(message.channel.value, message.msgid, seq)
        reserved = await self._repos.outbox.reserve_reply(inbound_id, seq, reply, key)
        if reserved.sent:
            return
        # An earlier process() run reserved this row, so an earlier attempt may have reached WeCom.
        resend = not reserved.created or reserved.attempts > 0
        try:
            provider_msgid = await self._sender.send(
                reserved.to_outbound(), reserved.idempotency_key, resend=resend
            )
        except WeComApiError as exc:
            if exc.errcode == DUPLICATE_MSGID_ERRCODE and (resend or exc.after_uncertain_attempt):
                # WeCom refuses a msgid it already accepted: an attempt we never heard back from got through.
                # On a reply's first, certain try the same errcode is a plain invalid-parameter answer instead.
                log.info("reply already accepted by WeCom", outbox_id=reserved.id)
                await self._repos.outbox.mark_sent(reserved.id, None)
                return
            await self._repos.outbox.mark_failed(reserved.id, f"errcode={exc.errcode} {exc.errmsg}")
            if exc.retryable:
                raise
            # State, quota window, parameters, permissions: a retry would hit the same wall, so the reply is
            # recorded as failed and the message still counts as handled.
            log.warning("reply refused by WeCom", path=exc.path, errcode=exc.errcode, outbox_id=reserved.id)
            return
        except Exception as exc:
            await self._repos.outbox.mark_failed(reserved.id, type(exc).__name__)
            raise
        await self._repos.outbox.mark_sent(reserved.id, provider_msgid)


def _wecom_type(raw: Mapping[str, Any]) -> str:
    for key in ("MsgType", "msgtype"):
        if key in raw:
            return str(raw[key])[:32]
    return "?"
