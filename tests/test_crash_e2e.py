"""kill -9 a real worker process while it is sending replies; after a restart every message is answered once.

Real processes (`wecom-bot worker`), real Redis, real PostgreSQL, the simulator on loopback. The simulator holds
the first replies for a while, so the killed worker dies with sends in flight: some reached WeCom, none were
recorded as sent. The replacement worker must neither lose those messages nor answer them twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from bot.app import create_app, open_services
from bot.pipeline import DUPLICATE_MSGID_ERRCODE
from bot.storage.models import Direction, MessageStatus
from bot.wecom.simulator import SIM_STATE, SimulatorConfig, SimulatorState, create_simulator, push_kf_customer_message
from bot.wecom.simulator.state import Fault
from handlers.domain import Channel
from tests.conftest import (
    REAL_REDIS_URL,
    TEST_AES_KEY,
    TEST_AGENT_ID,
    TEST_CORP_ID,
    TEST_KF_SECRET,
    TEST_SECRET,
    TEST_TOKEN,
    _flush_prefix,
    make_settings,
)

pytestmark = pytest.mark.slow

CUSTOMERS = 12
HELD_SENDS = 4
HOLD_S = 1.5
DEADLINE_S = 60.0


async def until(predicate: Callable[[], Awaitable[bool]], what: str, deadline_s: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimulatorState, str]]:
    config = SimulatorConfig(
        corp_id=TEST_CORP_ID,
        agent_id=TEST_AGENT_ID,
        token=TEST_TOKEN,
        aes_key=TEST_AES_KEY,
        secrets={TEST_SECRET: "app", TEST_KF_SECRET: "kf"},
    )
    app = create_simulator(config)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield app[SIM_STATE], str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_kill_9_worker_with_sends_in_flight_every_message_answered_once(
    sim: tuple[SimulatorState, str], _postgres_database: str, tmp_path: Path
) -> None:
    state, sim_url = sim
    prefix = f"crash{os.getpid()}"
    settings = make_settings(
        None,
        database_url=_postgres_database,
        redis_url=REAL_REDIS_URL,
        redis_key_prefix=prefix,
        wecom_api_base=sim_url,
        queue_partitions=4,
        lease_ttl_ms=1000,
        auto_migrate=True,
    )
    env = {
        **os.environ,
        "WECOM_CORP_ID": TEST_CORP_ID,
        "WECOM_TOKEN": TEST_TOKEN,
        "WECOM_AES_KEY": TEST_AES_KEY,
        "WECOM_AGENT_ID": str(TEST_AGENT_ID),
        "WECOM_SECRET": TEST_SECRET,
        "WECOM_KF_SECRET": TEST_KF_SECRET,
        "WECOM_API_BASE": sim_url,
        "DATABASE_URL": _postgres_database,
        "REDIS_URL": REAL_REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "QUEUE_PARTITIONS": "4",
        "LEASE_TTL_MS": "1000",
        "LOG_LEVEL": "INFO",
    }
    # The first replies hang inside "WeCom" long enough for the worker to die holding them.
    state.faults.append(
        Fault(id=state.next_id(), path="/cgi-bin/kf/send_msg", remaining=HELD_SENDS, hold_response_s=HOLD_S)
    )
    log_path = tmp_path / "workers.log"
    first = second = None
    try:
        async with open_services(settings) as services:
            server = TestServer(create_app(services, worker_count=0), host="127.0.0.1")
            await server.start_server()
            state.callback_url = str(server.make_url("/wecom/callback"))
            messages = services.repos.messages
            try:
                first = start_worker(env, log_path)
                customers = [f"wmCrash{n:02d}" for n in range(CUSTOMERS)]
                for customer in customers:
                    push_kf_customer_message(state, customer, f"你好，我是{customer}")

                async def send_accepted_but_unanswered() -> bool:
                    return state.in_flight >= 1 and any(record.accepted for record in state.sent)

                await until(send_accepted_but_unanswered, "WeCom to accept a send the worker has not heard back on")
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(timeout=10)
                assert first.returncode == -signal.SIGKILL
                unanswered = CUSTOMERS - await messages.count_messages(
                    channel=Channel.KF, direction=Direction.IN, status=MessageStatus.HANDLED
                )
                assert unanswered > 0, "the worker must die with work left, or the test proves nothing"

                second = start_worker(env, log_path)

                async def all_handled() -> bool:
                    handled = await messages.count_messages(
                        channel=Channel.KF, direction=Direction.IN, status=MessageStatus.HANDLED
                    )
                    return handled == CUSTOMERS

                await until(all_handled, "every message to be handled after the restart")
                # Let any send the dead worker left hanging inside the simulator finish, then count.
                await until(lambda: _no_held_requests(state), "held sends to complete", deadline_s=HOLD_S * 4 + 5)
                await until(lambda: _queue_empty(services.queue), "the queue to drain")
            finally:
                await server.close()

        delivered = Counter(record.recipient for record in state.sent if record.accepted)
        assert delivered == Counter({customer: 1 for customer in customers}), (
            delivered,
            log_path.read_text(errors="replace")[-4000:],
        )
        # The replacement re-sent what the dead worker had left unrecorded, and WeCom refused the repeated msgid.
        assert any(record.errcode == DUPLICATE_MSGID_ERRCODE for record in state.sent)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        _flush_prefix(prefix)


async def _no_held_requests(state: SimulatorState) -> bool:
    return not state.faults and state.in_flight == 0


async def _queue_empty(queue: object) -> bool:
    depth: int = await queue.depth()  # type: ignore[attr-defined]
    return depth == 0
