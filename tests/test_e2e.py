"""Transcripts through the whole stack: simulator → encrypted callback → queue → worker → reply via the API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp.test_utils import TestServer

from bot.app import Services, create_app, open_services
from bot.storage.models import Direction, MessageStatus
from bot.wecom.simulator import (
    SIM_STATE,
    SimulatorConfig,
    SimulatorState,
    create_simulator,
    push_app_message,
    push_kf_customer_message,
    redeliver,
)
from handlers.domain import Channel
from tests.conftest import (
    TEST_AES_KEY,
    TEST_AGENT_ID,
    TEST_CORP_ID,
    TEST_KF_SECRET,
    TEST_SECRET,
    TEST_TOKEN,
    Backend,
    make_settings,
)
from tests.scripts_expect import scripted_replies

DEADLINE_S = 15.0


@dataclass
class Stack:
    sim: SimulatorState
    services: Services
    bot_url: str


@pytest.fixture
async def stack(backend: Backend) -> AsyncIterator[Stack]:
    async with open_stack(backend) as opened:
        yield opened


@contextlib.asynccontextmanager
async def open_stack(backend: Backend) -> AsyncIterator[Stack]:
    """The simulator and the bot (server, in-process workers) wired to each other over real HTTP."""
    config = SimulatorConfig(
        corp_id=TEST_CORP_ID,
        agent_id=TEST_AGENT_ID,
        token=TEST_TOKEN,
        aes_key=TEST_AES_KEY,
        secrets={TEST_SECRET: "app", TEST_KF_SECRET: "kf"},
        callback_timeout_s=5.0,
    )
    sim_app = create_simulator(config)
    sim_server = TestServer(sim_app, host="127.0.0.1")
    await sim_server.start_server()
    settings = make_settings(
        backend, wecom_api_base=str(sim_server.make_url("")).rstrip("/"), queue_partitions=4, auto_migrate=True
    )
    try:
        async with open_services(settings) as services:
            bot_server = TestServer(create_app(services), host="127.0.0.1")
            await bot_server.start_server()
            sim = sim_app[SIM_STATE]
            sim.callback_url = str(bot_server.make_url("/wecom/callback"))
            try:
                yield Stack(sim=sim, services=services, bot_url=str(bot_server.make_url("")))
            finally:
                await bot_server.close()
    finally:
        await sim_server.close()


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a condition with a deadline (a bounded poll, not a timed assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def handled_count(stack: Stack, channel: Channel) -> int:
    return await stack.services.repos.messages.count_messages(
        channel=channel, direction=Direction.IN, status=MessageStatus.HANDLED
    )


async def test_kf_customer_gets_exactly_one_scripted_reply(stack: Stack) -> None:
    text = "你好，请问怎么下单？"
    push_kf_customer_message(stack.sim, "wmCustomerA", text)

    sent = await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="wmCustomerA")
    await until(lambda: _is(handled_count(stack, Channel.KF), 1), "the message to be marked handled")

    replies = stack.sim.sent_after(0, "wmCustomerA", None)
    assert len(replies) == 1, replies
    assert sent[0].api.endswith("kf/send_msg")
    assert sent[0].accepted
    assert [sent[0].content] == scripted_replies(text, customer="wmCustomerA")
    customer = await stack.services.repos.conversations.get_customer(Channel.KF, "wmCustomerA")
    assert customer is not None
    [answer] = await stack.services.repos.answers.answers_for_customer(customer.id)
    assert answer.replies == 1 and answer.status == "sent"


async def test_callback_retries_and_concurrent_duplicates_produce_one_reply(stack: Stack) -> None:
    _item, delivery = push_kf_customer_message(stack.sim, "wmCustomerB", "在吗")
    # WeCom's own retries, three at once, while the first may still be in flight.
    for _ in range(3):
        redeliver(stack.sim, delivery.id)
    await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="wmCustomerB")
    await until(lambda: _is(handled_count(stack, Channel.KF), 1), "the message to be handled")
    # And once more after it was handled.
    redeliver(stack.sim, delivery.id)
    await until(lambda: _all_callbacks_answered(stack.sim), "every callback to be answered")
    await _drain(stack)

    assert len(stack.sim.sent_after(0, "wmCustomerB", None)) == 1
    assert await stack.services.repos.outbox.count_outbox() == 1


async def test_two_customer_messages_two_replies_in_order(stack: Stack) -> None:
    push_kf_customer_message(stack.sim, "wmCustomerC", "第一条")
    push_kf_customer_message(stack.sim, "wmCustomerC", "第二条")
    await stack.sim.wait_sent(0, count=2, wait_s=DEADLINE_S, recipient="wmCustomerC")
    await until(lambda: _is(handled_count(stack, Channel.KF), 2), "both messages to be handled")
    await _drain(stack)
    assert len(stack.sim.sent_after(0, "wmCustomerC", None)) == 2


async def test_staff_app_message_is_answered_through_message_send(stack: Stack) -> None:
    push_app_message(stack.sim, "zhangsan", "测试一下")  # matches nothing: the polite no-match answer
    sent = await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="zhangsan")
    assert sent[0].api.endswith("message/send")
    assert [sent[0].content] == scripted_replies("测试一下", customer="zhangsan")
    await until(lambda: _is(handled_count(stack, Channel.APP), 1), "the app message to be handled")


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _all_callbacks_answered(sim: SimulatorState) -> bool:
    return all(delivery.attempts and delivery.attempts[-1].status == 200 for delivery in sim.deliveries)


async def _drain(stack: Stack) -> None:
    await until(_queue_empty(stack), "the queue to drain")


def _queue_empty(stack: Stack) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await stack.services.queue.depth() == 0

    return check
