"""Opt-out and re-subscribe (退订 / 订阅): the pure command, the stored state, and transcripts through the pipeline.

The transcripts run the services' own pipeline (the composition root's wiring) against the simulator on both
backends: a customer writes, the pull queues it, the worker processes it; then what WeCom sent is asserted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.app import build_dispatcher
from bot.outbound import WeComSender
from bot.pipeline import QUIET_HANDLER, SUBSCRIPTION_HANDLER, Pipeline
from bot.storage.db import create_session_factory
from bot.storage.models import ConversationStatus
from bot.storage.subscription_repository import SubscriptionRepository
from bot.wecom.parse import kf_message_to_inbound
from bot.wecom.simulator import push_kf_customer_message
from bot.wecom.simulator.api import encode_cursor
from handlers.domain import Channel, InboundMessage
from handlers.subscription import (
    DEFAULT_SUBSCRIPTION,
    SubscriptionAction,
    SubscriptionConfig,
    normalise_command,
    subscription_command,
)
from tests.conftest import TEST_KF_SECRET, TEST_SECRET, Backend
from tests.test_handoff import open_desk
from tests.test_kf_sync import KFID, Harness, callback_token, open_harness

OPTED_OUT = DEFAULT_SUBSCRIPTION.opted_out_reply
OPTED_IN = DEFAULT_SUBSCRIPTION.opted_in_reply

# ---------------------------------------------------------------------------------------------- the command (pure)


OPT_OUT_TEXTS = ["退订", "TD", "td", "ＴＤ", "T D", "退订！", "「退订」", " 退 订 ", "取消订阅", "取消訂閱"]
OPT_OUT_TEXTS += ["不要再发了。", "退订😡", "\u200b退订\u200b"]


@pytest.mark.parametrize("text", OPT_OUT_TEXTS)
def test_opt_out_phrases(text: str) -> None:
    change = subscription_command(text)
    assert change is not None
    assert (change.action, change.opted_out, change.reply) == (SubscriptionAction.OPT_OUT, True, OPTED_OUT)


@pytest.mark.parametrize("text", ["订阅", "订阅！", "訂閱", "【订阅】"])
def test_opt_in_phrases(text: str) -> None:
    change = subscription_command(text)
    assert change is not None and (change.action, change.opted_out) == (SubscriptionAction.OPT_IN, False)
    assert change.reply == OPTED_IN


@pytest.mark.parametrize("text", [None, "", "我不想退订", "怎么退订", "TDD", "订阅号是哪个", "退订" * 40, "。。。"])
def test_other_texts_are_not_commands(text: str | None) -> None:
    assert subscription_command(text) is None


def test_confirmations_say_how_to_come_back() -> None:
    assert "发送「订阅」" in OPTED_OUT and "退订" in OPTED_OUT
    assert "发送「退订」" in OPTED_IN


def test_phrases_are_configurable() -> None:
    config = SubscriptionConfig(opt_out_phrases=("别发了", "STOP"), opt_in_phrases=("恢复推送",), opted_in_reply="好的")
    assert subscription_command("stop!", config) is not None
    assert subscription_command("退订", config) is None
    back = subscription_command("恢复推送", config)
    assert back is not None and back.reply == "好的" and not back.opted_out
    assert normalise_command("  ＳＴＯＰ！！ ") == "stop"


def test_contradictory_or_empty_phrases_are_refused() -> None:
    with pytest.raises(ValueError, match="both opt out and opt in"):
        SubscriptionConfig(opt_out_phrases=("退订",), opt_in_phrases=("退订！",))
    with pytest.raises(ValueError, match="empty"):
        SubscriptionConfig(opt_out_phrases=("！！",))


# ---------------------------------------------------------------------------------------------- harness


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        yield harness


def subscriptions(h: Harness) -> SubscriptionRepository:
    return SubscriptionRepository(create_session_factory(h.services.engine), h.clock)


async def say(h: Harness, customer: str, text: str, *, pipeline: Pipeline | None = None) -> dict[str, Any]:
    """The customer writes; the pull queues it and the wired pipeline processes it. Returns the kf message."""
    item, delivery = push_kf_customer_message(h.sim, customer, text)
    await h.puller().pull(KFID, callback_token(delivery))
    for entry in await h.take():
        await (pipeline or h.services.pipeline).process(entry)
    return item


def texts(h: Harness, customer: str) -> list[str]:
    return [s.content["content"] for s in h.sim.sent_after(0, customer) if s.accepted and s.msgtype == "text"]


async def customer_id(h: Harness, item: dict[str, Any]) -> int:
    record = await h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    assert record.customer_id is not None
    return record.customer_id


async def handler_of(h: Harness, item: dict[str, Any]) -> str | None:
    record = await h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    stored = await h.services.repos.messages.get_message(record.id)
    assert stored is not None
    return stored.handler


# ---------------------------------------------------------------------------------------------- transcripts


async def test_opt_out_is_stored_and_confirmed_once(h: Harness) -> None:
    item = await say(h, "wmAlice", "退订")

    assert texts(h, "wmAlice") == [OPTED_OUT]
    assert await handler_of(h, item) == SUBSCRIPTION_HANDLER
    repo = subscriptions(h)
    alice = await customer_id(h, item)
    state = await repo.get(alice)
    assert state is not None and state.opted_out and state.source == "kf"
    assert await repo.is_opted_out(alice)
    assert await repo.opted_out_external_ids(["wmAlice", "wmBob"]) == {"wmAlice"}
    # 退订 never reached the script library: no scripted answer was recorded for it.
    record = await h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    assert await h.services.repos.answers.answers_for(record.id) == []


async def test_subscribe_again_clears_it(h: Harness) -> None:
    first = await say(h, "wmAlice", "TD")
    await say(h, "wmAlice", "订阅")

    assert texts(h, "wmAlice") == [OPTED_OUT, OPTED_IN]
    repo = subscriptions(h)
    assert not await repo.is_opted_out(await customer_id(h, first))
    assert await repo.opted_out_external_ids(["wmAlice"]) == frozenset()


async def test_the_same_wecom_message_twice_is_confirmed_once(h: Harness) -> None:
    item, delivery = push_kf_customer_message(h.sim, "wmTwice", "取消订阅")
    await h.puller().pull(KFID, callback_token(delivery))
    [entry] = await h.take()
    # The Redis dedupe marker expired and a lost cursor brought the message back; a worker also redelivers.
    await h.services.redis.delete(h.services.keys.dedupe(f"kf:{item['msgid']}"))
    await h.services.repos.cursors.save_cursor(KFID, encode_cursor(0))
    await h.puller().pull(KFID, callback_token(delivery))
    [again] = await h.take()
    assert again.payload["msg"]["msgid"] == item["msgid"]

    pipeline = h.services.pipeline
    for queued in (entry, entry, again):
        await pipeline.process(queued)
    assert texts(h, "wmTwice") == [OPTED_OUT]
    assert await subscriptions(h).is_opted_out(await customer_id(h, item))


async def test_ordinary_texts_still_get_scripts(h: Harness) -> None:
    item = await say(h, "wmCarol", "我不想退订，只想问下价格")
    assert await handler_of(h, item) != SUBSCRIPTION_HANDLER
    assert texts(h, "wmCarol") and OPTED_OUT not in texts(h, "wmCarol")
    assert await subscriptions(h).opted_out_external_ids(["wmCarol"]) == frozenset()


async def test_while_a_person_has_the_conversation_it_is_recorded_without_a_bot_reply(backend: Backend) -> None:
    async with open_desk(backend) as desk:
        h = desk.h
        repo = subscriptions(h)
        sender = WeComSender(h.client(TEST_SECRET), h.client(TEST_KF_SECRET), h.services.settings.wecom_agent_id)
        desk.pipeline = Pipeline(
            h.services.repos,
            build_dispatcher(),
            sender,
            h.puller(),
            h.clock,
            scripts=h.services.scripts,
            handoff=desk.service,
            subscriptions=repo,
        )
        await desk.agent("zhangsan")
        conversation_id = await desk.say("wmHuman", "我要转人工")
        row = await desk.repo.conversation(conversation_id)
        assert row is not None and row.status is ConversationStatus.OPEN
        before = desk.sent("wmHuman")

        assert await desk.say("wmHuman", "退订") == conversation_id
        assert desk.sent("wmHuman") == before  # the bot stays quiet
        [*_, last] = await h.services.repos.messages.conversation_messages(conversation_id)
        assert last.handler == QUIET_HANDLER
        assert last.customer_id is not None and await repo.is_opted_out(last.customer_id)

        await desk.say("wmHuman", "订阅")
        assert desk.sent("wmHuman") == before
        assert not await repo.is_opted_out(last.customer_id)


# ---------------------------------------------------------------------------------------------- the stored state


async def test_one_person_across_kf_and_customer_contact(h: Harness) -> None:
    """The kf and 客户联系 rows of one external_userid are one person: an opt-out in the chat covers both."""
    repo = subscriptions(h)
    messages = h.services.repos.messages
    kf = await messages.record_inbound(
        InboundMessage(Channel.KF, "m-kf", "wmDan", KFID, "text", 1, text="hi", origin=3)
    )
    contact = await messages.record_inbound(
        InboundMessage(Channel.CONTACT, "m-contact", "wmDan", "zhangsan", "event", 1, event="add_external_contact")
    )
    assert kf.customer_id is not None and contact.customer_id is not None and kf.customer_id != contact.customer_id
    assert not await repo.is_opted_out(contact.customer_id)

    assert await repo.set_opted_out(kf.customer_id, True, at=1_700_000_000, source="kf")
    assert await repo.is_opted_out(contact.customer_id)
    # A later change on the contact row wins; an older one (handled out of order) is ignored.
    assert await repo.set_opted_out(contact.customer_id, False, at=1_700_000_100, source="console")
    assert not await repo.is_opted_out(kf.customer_id)
    assert not await repo.set_opted_out(contact.customer_id, True, at=1_699_999_000, source="kf")
    assert await repo.opted_out_external_ids(["wmDan"]) == frozenset()


async def test_setting_the_same_state_keeps_the_first_change(h: Harness) -> None:
    repo = subscriptions(h)
    record = await h.services.repos.messages.record_inbound(
        InboundMessage(Channel.KF, "m-eve", "wmEve", KFID, "text", 1, text="hi", origin=3)
    )
    assert record.customer_id is not None
    assert await repo.get(record.customer_id) is None
    assert await repo.set_opted_out(record.customer_id, True, at=1_700_000_000, source="kf")
    assert not await repo.set_opted_out(record.customer_id, True, at=1_700_000_500, source="kf")
    state = await repo.get(record.customer_id)
    assert state is not None and state.changed_at.timestamp() == 1_700_000_000
