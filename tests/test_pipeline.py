"""The worker pipeline (bot/pipeline.py + bot/outbound.py) against the WeCom simulator with the real WeComClient.

Entries come from the real KfPuller (kf_message) or from the simulator's callback plaintext (callback), and are
processed the way a worker does: `Pipeline.process(entry)`, again on the same entry when it raised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.outbound import DUPLICATE_CHECK_INTERVAL_S, WeComSender
from bot.pipeline import DUPLICATE_MSGID_ERRCODE
from bot.queue import QueueEntry
from bot.storage.models import Direction, MessageStatus, OutboxStatus
from bot.storage.repositories import InboundRecord, OutboxRecord
from bot.wecom.errors import WeComApiError, WeComTransportError
from bot.wecom.parse import kf_message_to_inbound
from bot.wecom.simulator import (
    push_app_message,
    push_kf_customer_message,
    push_kf_enter_session,
    push_kf_event,
    push_kf_servicer_message,
)
from bot.wecom.simulator.state import KF_QUOTA_PER_CUSTOMER_MSG, KF_SESSION_HUMAN, Fault
from handlers.dispatcher import Dispatcher
from handlers.domain import Channel, HandlerContext, HandlerResult, InboundMessage, OutboundMessage
from tests.conftest import TEST_AGENT_ID, TEST_SECRET, Backend
from tests.scripts_expect import event_replies, scripted_replies
from tests.test_kf_sync import KFID, Harness, callback_entry, callback_token, open_harness

SEND_PATH = "/cgi-bin/kf/send_msg"


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        yield harness


async def pull_entries(h: Harness, delivery_token: str) -> list[QueueEntry]:
    """Pull like a kf_pull entry would, then take what got queued."""
    await h.puller().pull(KFID, delivery_token)
    return await h.take()


async def one_entry(h: Harness, item: dict[str, Any], token: str) -> QueueEntry:
    entries = await pull_entries(h, token)
    assert [e.payload["msg"]["msgid"] for e in entries] == [item["msgid"]]
    return entries[0]


async def inbound(h: Harness, item: dict[str, Any]) -> InboundRecord:
    # record_inbound on a stored message only reads it back (insert-or-get).
    record = await h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    assert not record.created, "the pipeline should have stored it"
    return record


async def outbox(h: Harness, record: InboundRecord) -> list[OutboxRecord]:
    return await h.services.repos.outbox.replies_for(record.id)


def sends(h: Harness, user: str) -> list[tuple[str, str, int]]:
    """Every send attempt WeCom saw for a recipient: (api, status, errcode)."""
    return [(s.api, s.status, s.errcode) for s in h.sim.sent_after(0, user)]


# ---------------------------------------------------------------- origins and events


async def test_customer_text_is_answered_once_via_kf_send_msg(h: Harness) -> None:
    item, delivery = push_kf_customer_message(h.sim, "wmCust", "你好")
    entry = await one_entry(h, item, callback_token(delivery))
    pipeline = h.pipeline()
    await pipeline.process(entry)
    await pipeline.process(entry)  # a worker redelivery of the same entry

    assert sends(h, "wmCust") == [("kf/send_msg", "delivered", 0)]
    sent = h.sim.sent_after(0, "wmCust")[0]
    assert [sent.content] == scripted_replies("你好", customer="wmCust")
    assert sent.account == KFID
    record = await inbound(h, item)
    assert record.status is MessageStatus.HANDLED
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.SENT
    assert reply.provider_msgid == reply.idempotency_key == sent.msgid
    stored = await h.services.repos.messages.get_message(record.id)
    assert stored is not None and stored.origin == 3 and stored.text == "你好"
    assert await h.services.repos.messages.count_messages(channel=Channel.KF, direction=Direction.OUT) == 1


async def test_message_queued_twice_is_still_answered_once(h: Harness) -> None:
    """The Redis dedupe marker expired and a lost cursor brought the message back: the row is unique."""
    item, delivery = push_kf_customer_message(h.sim, "wmTwice", "再来")
    entry = await one_entry(h, item, callback_token(delivery))
    await h.services.redis.delete(h.services.keys.dedupe(f"kf:{item['msgid']}"))
    await h.services.repos.cursors.save_cursor(KFID, _cursor(0))
    again = await pull_entries(h, callback_token(delivery))
    assert [e.payload["msg"]["msgid"] for e in again] == [item["msgid"]]

    pipeline = h.pipeline()
    await pipeline.process(entry)
    await pipeline.process(again[0])
    assert sends(h, "wmTwice") == [("kf/send_msg", "delivered", 0)]


async def test_servicer_message_is_stored_without_a_bot_reply(h: Harness) -> None:
    push_kf_customer_message(h.sim, "wmServ", "人工")
    item, delivery = push_kf_servicer_message(h.sim, "wmServ", "zhangsan", "我是人工客服")
    entries = await pull_entries(h, callback_token(delivery))
    assert len(entries) == 2
    pipeline = h.pipeline()
    for entry in entries:
        await pipeline.process(entry)

    assert sends(h, "wmServ") == [("kf/send_msg", "delivered", 0)]  # only the customer's line is answered
    record = await inbound(h, item)
    assert record.status is MessageStatus.HANDLED
    assert await outbox(h, record) == []
    stored = await h.services.repos.messages.get_message(record.id)
    assert stored is not None
    assert stored.origin == 5
    assert stored.text == "我是人工客服"
    assert stored.payload.get("servicer_id") == "zhangsan"


EVENTS: dict[str, dict[str, Any]] = {
    "msg_send_fail": {"external_userid": "wmEvt", "fail_msgid": "rabc-0", "fail_type": 4},
    "servicer_status_change": {"servicer_userid": "zhangsan", "status": 2, "stop_type": 1},
    "session_status_change": {
        "external_userid": "wmEvt",
        "change_type": 1,
        "new_servicer_userid": "zhangsan",
        "msg_code": "MSGCODE123",
    },
    "user_recall_msg": {"external_userid": "wmEvt", "recall_msgid": "from_msgid_1"},
    "servicer_recall_msg": {"external_userid": "wmEvt", "recall_msgid": "from_msgid_2", "servicer_userid": "lisi"},
    "reject_customer_msg_switch_change": {"external_userid": "wmEvt", "servicer_userid": "lisi", "reject_switch": 1},
    "some_future_event": {"external_userid": "wmEvt"},
}


@pytest.mark.parametrize("event_type", sorted(EVENTS))
async def test_system_events_are_stored_without_a_reply(h: Harness, event_type: str) -> None:
    item, delivery = push_kf_event(h.sim, event_type, EVENTS[event_type])
    entry = await one_entry(h, item, callback_token(delivery))
    await h.pipeline().process(entry)

    assert h.sim.sent == []
    record = await inbound(h, item)
    assert record.status is MessageStatus.HANDLED
    assert await outbox(h, record) == []
    stored = await h.services.repos.messages.get_message(record.id)
    assert stored is not None
    assert stored.origin == 4
    assert stored.msgtype == "event"
    assert stored.payload.get("event") == event_type
    assert stored.payload["raw"]["event"]["event_type"] == event_type


@pytest.mark.parametrize("with_code", [True, False])
async def test_enter_session_is_stored_and_welcomed_only_with_a_code(h: Harness, with_code: bool) -> None:
    item, code, delivery = push_kf_enter_session(h.sim, "wmEnter", scene="qr", welcome_code=with_code)
    entry = await one_entry(h, item, callback_token(delivery))
    await h.pipeline().process(entry)
    await h.pipeline().process(entry)  # a redelivery does not welcome twice

    if with_code:
        # The welcome goes through send_msg_on_event with the single-use code, never kf/send_msg.
        assert [(s.api, s.status) for s in h.sim.sent] == [("kf/send_msg_on_event", "delivered")]
        assert [h.sim.sent[0].content] == event_replies("kf_session_entered")
    else:
        assert h.sim.sent == []
    record = await inbound(h, item)
    assert record.status is MessageStatus.HANDLED
    stored = await h.services.repos.messages.get_message(record.id)
    assert stored is not None and stored.payload.get("event") == "enter_session"
    assert stored.payload.get("welcome_code") == (code.code if code else None)
    customer = await h.services.repos.conversations.get_customer(Channel.KF, "wmEnter")
    assert customer is not None


async def test_unknown_msgtype_is_stored_as_unknown(h: Harness) -> None:
    item, delivery = push_kf_customer_message(
        h.sim, "wmOdd", msgtype="channels_future_card", content={"title": "新东西"}
    )
    entry = await one_entry(h, item, callback_token(delivery))
    await h.pipeline().process(entry)

    assert h.sim.sent == []
    record = await inbound(h, item)
    assert record.status is MessageStatus.UNKNOWN
    stored = await h.services.repos.messages.get_message(record.id)
    assert stored is not None and stored.msgtype == "unknown"
    assert stored.payload["raw"]["msgtype"] == "channels_future_card"


# ---------------------------------------------------------------- send semantics


@pytest.mark.parametrize("errcode", [-1, 45033, 45009])
async def test_retryable_error_raises_and_the_retry_sends_once(h: Harness, errcode: int) -> None:
    item, delivery = push_kf_customer_message(h.sim, "wmBusy", "忙吗")
    entry = await one_entry(h, item, callback_token(delivery))
    h.sim.faults.append(Fault(id=h.sim.next_id(), path=SEND_PATH, remaining=1, errcode=errcode))
    pipeline = h.pipeline(kf_retries=0)  # the client gives up at once: the worker's retry is what is tested

    with pytest.raises(WeComApiError) as info:
        await pipeline.process(entry)
    assert info.value.errcode == errcode and info.value.retryable
    record = await inbound(h, item)
    assert record.status is MessageStatus.RECEIVED  # not handled: the worker retries the entry
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.FAILED and reply.attempts == 1
    assert reply.last_error is not None and reply.last_error.startswith(f"errcode={errcode}")

    await pipeline.process(entry)  # the worker's retry
    await pipeline.process(entry)  # and a stray redelivery after success
    assert sends(h, "wmBusy") == [("kf/send_msg", "delivered", 0)]
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.SENT and reply.attempts == 2
    assert (await inbound(h, item)).status is MessageStatus.HANDLED
    send_calls = [c.errcode for c in h.sim.calls if c.path == SEND_PATH]
    assert send_calls == [errcode, 0]


async def test_client_level_retry_of_a_busy_answer_sends_once(h: Harness) -> None:
    item, delivery = push_kf_customer_message(h.sim, "wmBusy2", "忙吗")
    entry = await one_entry(h, item, callback_token(delivery))
    h.sim.faults.append(Fault(id=h.sim.next_id(), path=SEND_PATH, remaining=2, errcode=-1))
    await h.pipeline(kf_retries=3).process(entry)
    assert sends(h, "wmBusy2") == [("kf/send_msg", "delivered", 0)]
    assert [c.errcode for c in h.sim.calls if c.path == SEND_PATH] == [-1, -1, 0]
    assert len(h.sleeps) == 2  # backoff went through the injected sleep


def _human_serving(h: Harness, user: str) -> None:
    session = h.sim.kf_session(KFID, user)
    session.state = KF_SESSION_HUMAN
    session.servicer_userid = "zhangsan"


def _quota_used(h: Harness, user: str) -> None:
    h.sim.kf_session(KFID, user).sent_since_customer_msg = KF_QUOTA_PER_CUSTOMER_MSG


def _window_passed(h: Harness, user: str) -> None:
    h.clock.advance(48 * 3600 + 1)


@pytest.mark.parametrize(
    ("setup", "errcode"), [(_human_serving, 95018), (_quota_used, 95001), (_window_passed, 95002)]
)
async def test_permanent_error_fails_the_reply_and_handles_the_message(
    h: Harness, setup: Any, errcode: int
) -> None:
    item, delivery = push_kf_customer_message(h.sim, "wmNo", "还在吗")
    entry = await one_entry(h, item, callback_token(delivery))
    setup(h, "wmNo")
    pipeline = h.pipeline()

    await pipeline.process(entry)  # no exception: retrying cannot help
    await pipeline.process(entry)  # a redelivery does not try again

    assert sends(h, "wmNo") == [("kf/send_msg", "rejected", errcode)]
    record = await inbound(h, item)
    assert record.status is MessageStatus.HANDLED
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.FAILED and reply.attempts == 1
    assert reply.last_error is not None and reply.last_error.startswith(f"errcode={errcode}")


class WorkerKilled(BaseException):
    """Not an Exception: nothing in the pipeline gets to record anything, as with a SIGKILL."""


class SendThenCrash:
    """The sender reaches WeCom, which accepts; then the process dies before anything is recorded."""

    def __init__(self, real: WeComSender) -> None:
        self._real = real
        self.sent: list[str | None] = []

    async def send(self, reply: OutboundMessage, idempotency_key: str, *, resend: bool = False) -> str | None:
        self.sent.append(await self._real.send(reply, idempotency_key, resend=resend))
        raise WorkerKilled("after WeCom accepted the send")


class MarkSentCrashes:
    """The outbox repository, except that mark_sent dies once (the row stays unsent)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.crashed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def mark_sent(self, outbox_id: int, provider_msgid: str | None) -> None:
        if not self.crashed:
            self.crashed = True
            raise ConnectionError("database gone between the send and mark_sent")
        await self._real.mark_sent(outbox_id, provider_msgid)


def _real_sender(h: Harness) -> WeComSender:
    return WeComSender(h.client(TEST_SECRET), h.client(), TEST_AGENT_ID)


async def test_crash_after_wecom_accepted_delivers_once(h: Harness) -> None:
    item, delivery = push_kf_customer_message(h.sim, "wmCrash", "崩了吗")
    entry = await one_entry(h, item, callback_token(delivery))
    crashing = SendThenCrash(_real_sender(h))

    with pytest.raises(WorkerKilled):
        await h.pipeline(sender=crashing).process(entry)
    assert crashing.sent and crashing.sent[0]
    record = await inbound(h, item)
    [reply] = await outbox(h, record)
    assert reply.status is not OutboxStatus.SENT

    # A new worker takes the entry over with a healthy sender.
    await h.pipeline().process(entry)
    assert sends(h, "wmCrash") == [
        ("kf/send_msg", "delivered", 0),
        ("kf/send_msg", "rejected", DUPLICATE_MSGID_ERRCODE),
    ]
    assert [s.msgid for s in h.sim.sent_after(0, "wmCrash")] == [reply.idempotency_key] * 2
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.SENT
    assert (await inbound(h, item)).status is MessageStatus.HANDLED
    assert await h.services.repos.messages.count_messages(channel=Channel.KF, direction=Direction.OUT) == 1


async def test_timeout_after_wecom_accepted_delivers_once(h: Harness) -> None:
    """The answer is lost (client timeout) although WeCom went on to deliver: a transport error, so the entry
    is retried, and the retry's repeated msgid tells us it was sent."""
    item, delivery = push_kf_customer_message(h.sim, "wmSlow", "慢")
    entry = await one_entry(h, item, callback_token(delivery))
    h.sim.faults.append(Fault(id=h.sim.next_id(), path=SEND_PATH, remaining=1, hold_response_s=2.0))
    slow = WeComSender(h.client(TEST_SECRET), h.client(timeout_s=0.5), TEST_AGENT_ID)

    with pytest.raises(WeComTransportError):
        await h.pipeline(sender=slow).process(entry)
    # WeCom delivered; only its answer was held past the client's timeout (a bounded wait, not a timed assert).
    delivered = await h.sim.wait_sent(0, count=1, wait_s=10.0, recipient="wmSlow")
    assert [(s.status, s.errcode) for s in delivered] == [("delivered", 0)]
    record = await inbound(h, item)
    assert record.status is MessageStatus.RECEIVED
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.FAILED

    await h.pipeline().process(entry)  # the worker's retry
    assert [s[1:] for s in sends(h, "wmSlow")] == [("delivered", 0), ("rejected", DUPLICATE_MSGID_ERRCODE)]
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.SENT
    assert (await inbound(h, item)).status is MessageStatus.HANDLED


async def test_timeout_retried_inside_the_client_still_delivers_once(h: Harness) -> None:
    """The client's own retry of a timed-out send meets the repeated msgid: that is "already delivered"."""
    item, delivery = push_kf_customer_message(h.sim, "wmSlow2", "慢")
    entry = await one_entry(h, item, callback_token(delivery))
    h.sim.faults.append(Fault(id=h.sim.next_id(), path=SEND_PATH, remaining=1, hold_response_s=2.0))
    slow = WeComSender(h.client(TEST_SECRET), h.client(timeout_s=0.5, max_retries=3), TEST_AGENT_ID)

    pipeline = h.pipeline(sender=slow)
    await pipeline.process(entry)
    await pipeline.process(entry)
    assert [s[1:] for s in sends(h, "wmSlow2")] == [("delivered", 0), ("rejected", DUPLICATE_MSGID_ERRCODE)]
    record = await inbound(h, item)
    assert record.status is MessageStatus.HANDLED
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.SENT


async def test_crash_in_mark_sent_delivers_once(h: Harness) -> None:
    item, delivery = push_kf_customer_message(h.sim, "wmCrash2", "崩了吗")
    entry = await one_entry(h, item, callback_token(delivery))
    repos = h.services.repos
    flaky = MarkSentCrashes(repos.outbox)
    pipeline = h.pipeline(repos=dataclasses.replace(repos, outbox=flaky))

    with pytest.raises(ConnectionError):
        await pipeline.process(entry)
    await pipeline.process(entry)  # the worker's retry of the same entry

    assert [s[1:] for s in sends(h, "wmCrash2")] == [("delivered", 0), ("rejected", DUPLICATE_MSGID_ERRCODE)]
    record = await inbound(h, item)
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.SENT
    assert record.status is MessageStatus.HANDLED


async def test_invalid_parameter_on_the_first_send_is_a_failure_not_a_duplicate(h: Harness) -> None:
    """40058 means "msgid already used" only if an earlier attempt could have reached WeCom. On a reply's very
    first attempt it is a genuine parameter error (here a malformed msgmenu) and must not be recorded as sent."""

    async def broken_menu(message: InboundMessage, context: HandlerContext) -> HandlerResult:
        return [
            OutboundMessage(
                channel=Channel.KF,
                to=message.sender_id,
                account_id=message.account_id,
                msgtype="msgmenu",
                content={"head_content": "请选择", "list": "not-a-list"},
            )
        ]

    item, delivery = push_kf_customer_message(h.sim, "wmMenu", "菜单")
    entry = await one_entry(h, item, callback_token(delivery))
    await h.pipeline(dispatcher=Dispatcher([broken_menu])).process(entry)

    assert sends(h, "wmMenu") == [("kf/send_msg", "rejected", 40058)]
    record = await inbound(h, item)
    assert record.status is MessageStatus.HANDLED  # permanent: not retried forever
    [reply] = await outbox(h, record)
    assert reply.status is OutboxStatus.FAILED
    assert reply.last_error is not None and reply.last_error.startswith("errcode=40058")
    assert await h.services.repos.messages.count_messages(channel=Channel.KF, direction=Direction.OUT) == 0


# ---------------------------------------------------------------- app channel


class RecordingAppApi:
    def __init__(self, real: Any) -> None:
        self._real = real
        self.payloads: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def message_send(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.payloads.append(dict(payload))
        result: dict[str, Any] = await self._real.message_send(payload)
        return result


async def test_app_message_resend_uses_the_duplicate_check(h: Harness) -> None:
    _msgid, delivery = push_app_message(h.sim, "zhangsan", "测试")
    entry = callback_entry(delivery.plaintext)
    app_api = RecordingAppApi(h.client(TEST_SECRET))
    repos = h.services.repos
    flaky = MarkSentCrashes(repos.outbox)
    pipeline = h.pipeline(app_client=app_api, repos=dataclasses.replace(repos, outbox=flaky))

    with pytest.raises(ConnectionError):  # WeCom accepted, then mark_sent died
        await pipeline.process(entry)
    await pipeline.process(entry)

    first, resend = app_api.payloads
    assert "enable_duplicate_check" not in first
    assert resend["enable_duplicate_check"] == 1
    assert resend["duplicate_check_interval"] == DUPLICATE_CHECK_INTERVAL_S
    for payload in app_api.payloads:
        assert payload["agentid"] == TEST_AGENT_ID
        assert payload["touser"] == "zhangsan"
        assert [payload["text"]] == scripted_replies("测试", customer="zhangsan")
    # WeCom's duplicate check suppressed the resend: the member got one message.
    assert [(s.api, s.status) for s in h.sim.sent_after(0, "zhangsan")] == [
        ("message/send", "delivered"),
        ("message/send", "duplicate"),
    ]
    assert await repos.outbox.count_outbox(status=OutboxStatus.SENT) == 1
    assert (
        await repos.messages.count_messages(channel=Channel.APP, direction=Direction.IN, status=MessageStatus.HANDLED)
        == 1
    )


def _cursor(position: int) -> str:
    from bot.wecom.simulator.api import encode_cursor

    return encode_cursor(position)


async def test_two_staff_messages_get_two_acknowledgements(h: Harness) -> None:
    pipeline = h.pipeline()
    for text in ("第一条", "第二条"):
        _msgid, delivery = push_app_message(h.sim, "lisi", text)
        await pipeline.process(callback_entry(delivery.plaintext))
    assert [s.status for s in h.sim.sent_after(0, "lisi")] == ["delivered", "delivered"]
