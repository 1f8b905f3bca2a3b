"""WeComClient / RobotClient against the WeCom simulator (bot/wecom/simulator): real paths and errcodes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import fakeredis
import pytest
import redis.asyncio as redis_asyncio
from aiohttp.test_utils import TestServer

from bot.redis_keys import RedisKeys
from bot.wecom.client import RobotClient, WeComClient
from bot.wecom.errors import CredentialError, KfStateError, QuotaError
from bot.wecom.simulator import (
    DEFAULT_OPEN_KFID,
    DEFAULT_ROBOT_KEY,
    SIM_STATE,
    ManualClock,
    SimulatorConfig,
    SimulatorState,
    create_simulator,
    push_kf_customer_message,
)
from tests.conftest import TEST_AES_KEY, TEST_AGENT_ID, TEST_CORP_ID, TEST_KF_SECRET, TEST_TOKEN, Backend

GETTOKEN = "/cgi-bin/gettoken"
SEND = "/cgi-bin/kf/send_msg"
CUSTOMER = "wmSimCustomer01"


@dataclass
class Sim:
    state: SimulatorState
    clock: ManualClock
    base_url: str
    http: aiohttp.ClientSession
    redis: redis_asyncio.Redis
    keys: RedisKeys
    sleeps: list[float]

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)

    def client(self, secret: str = TEST_KF_SECRET) -> WeComClient:
        return WeComClient(
            self.http,
            self.redis,
            self.keys,
            self.base_url,
            TEST_CORP_ID,
            secret,
            metrics=None,
            clock=self.clock,
            sleep=self.sleep,
            jitter=lambda: 1.0,
        )

    def calls(self, path: str) -> list[Any]:
        return [c for c in self.state.calls if c.path == path]


@pytest.fixture
async def sim(backend: Backend) -> AsyncIterator[Sim]:
    clock = ManualClock()
    config = SimulatorConfig(
        corp_id=TEST_CORP_ID,
        agent_id=TEST_AGENT_ID,
        token=TEST_TOKEN,
        aes_key=TEST_AES_KEY,
        secrets={TEST_KF_SECRET: "kf"},
    )
    app = create_simulator(config, clock)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    redis: redis_asyncio.Redis = (
        redis_asyncio.Redis.from_url(backend.redis_url) if backend.redis_url else fakeredis.FakeAsyncRedis()
    )
    http = aiohttp.ClientSession()
    try:
        yield Sim(
            state=app[SIM_STATE],
            clock=clock,
            base_url=str(server.make_url("")).rstrip("/"),
            http=http,
            redis=redis,
            keys=RedisKeys(prefix=backend.key_prefix),
            sleeps=[],
        )
    finally:
        await http.close()
        await server.close()
        await redis.aclose()


async def test_kf_send_then_95018_once_a_human_serves(sim: Sim) -> None:
    push_kf_customer_message(sim.state, CUSTOMER, "你好")
    client = sim.client()
    page = await client.kf_sync_msg(None, DEFAULT_OPEN_KFID)
    assert [m["external_userid"] for m in page["msg_list"]] == [CUSTOMER]

    sent = await client.kf_send_msg(CUSTOMER, DEFAULT_OPEN_KFID, "text", {"content": "您好"}, msgid="reply1")
    assert sent["msgid"] == "reply1"

    await client.kf_service_state_trans(DEFAULT_OPEN_KFID, CUSTOMER, 3, "zhangsan")
    state = await client.kf_service_state_get(DEFAULT_OPEN_KFID, CUSTOMER)
    assert (state.service_state, state.servicer_userid) == (3, "zhangsan")

    with pytest.raises(KfStateError) as info:
        await client.kf_send_msg(CUSTOMER, DEFAULT_OPEN_KFID, "text", {"content": "还在吗"})
    assert info.value.errcode == 95018
    assert len(sim.calls(SEND)) == 2  # not retried
    assert len(sim.calls(GETTOKEN)) == 1
    assert sim.sleeps == []


async def test_revoked_token_refreshed_once(sim: Sim) -> None:
    push_kf_customer_message(sim.state, CUSTOMER, "你好")
    client = sim.client()
    await client.kf_send_msg(CUSTOMER, DEFAULT_OPEN_KFID, "text", {"content": "一"})
    sim.state.invalidate_tokens()
    await client.kf_send_msg(CUSTOMER, DEFAULT_OPEN_KFID, "text", {"content": "二"})
    assert len(sim.calls(GETTOKEN)) == 2
    assert [c.errcode for c in sim.calls(SEND)] == [0, 40014, 0]


async def test_wrong_secret_calls_gettoken_once(sim: Sim) -> None:
    client = sim.client("not-the-secret")
    for _ in range(3):
        with pytest.raises(CredentialError) as info:
            await client.kf_servicer_list(DEFAULT_OPEN_KFID)
        assert info.value.errcode == 40001
    assert len(sim.calls(GETTOKEN)) == 1
    assert sim.sleeps == []


async def test_robot_rate_limit_retried_then_raised(sim: Sim) -> None:
    robot = RobotClient(sim.http, sim.base_url, None, sleep=sim.sleep, jitter=lambda: 1.0)
    payload = {"msgtype": "text", "text": {"content": "定时推送"}}
    for _ in range(20):
        await robot.send(DEFAULT_ROBOT_KEY, payload)
    assert sim.sleeps == []
    # the simulator's clock stands still, so the 21st message stays over 20/min through every retry
    with pytest.raises(QuotaError) as info:
        await robot.send(DEFAULT_ROBOT_KEY, payload)
    assert info.value.errcode == 45009 and info.value.retryable
    assert sim.sleeps == [0.2, 0.4, 0.8]
    assert [c.errcode for c in sim.calls("/cgi-bin/webhook/send")][20:] == [45009] * 4
    # a minute later the robot takes messages again
    sim.clock.advance(61)
    await robot.send(DEFAULT_ROBOT_KEY, payload)
