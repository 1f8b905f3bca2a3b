"""微信客服 pull (bot/kf_sync.py) against the WeCom simulator on loopback, with the real WeComClient.

Requirement: on `kf_msg_or_event`, pull `kf/sync_msg` with the callback token under a per-account Redis lock,
keep pulling while `has_more` (even on empty pages), persist `next_cursor` only after that page's messages are
durably queued, dedupe by msgid, handle origin 3/4/5 and the events of reference §4.2.

Both backends (SQLite + fakeredis, PostgreSQL + Redis). Time only matters for the sync token; it moves on a
ManualClock shared by the simulator and the bot. Interleavings are forced with events, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from aiohttp.test_utils import TestServer

from bot.app import Services, build_dispatcher, open_services
from bot.kf_sync import KfPuller
from bot.outbound import WeComSender
from bot.pipeline import Pipeline
from bot.queue import InboundQueue, QueueEntry
from bot.wecom.client import WeComClient
from bot.wecom.errors import WeComApiError
from bot.wecom.parse import parse_plaintext
from bot.wecom.simulator import (
    DEFAULT_OPEN_KFID,
    SIM_STATE,
    CallbackDelivery,
    ManualClock,
    SimulatorConfig,
    SimulatorState,
    create_simulator,
    push_kf_customer_message,
)
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

KFID = DEFAULT_OPEN_KFID
SYNC_PATH = "/cgi-bin/kf/sync_msg"


# ---------------------------------------------------------------- shared harness (also used by test_pipeline)


@dataclass
class SyncCall:
    """One kf_sync_msg call as the puller made it, and what it got back."""

    token: str | None
    cursor: str | None
    limit: int
    response: dict[str, Any] | None = None
    error: int | None = None


class RecordingSyncApi:
    """Wraps the real WeComClient: records every page call, tracks overlap, and can pause after a page."""

    def __init__(self, client: WeComClient) -> None:
        self._client = client
        self.calls: list[SyncCall] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # When set: after the real call returns, announce `paused` and wait for `resume` (once).
        self.pause_after_call: int | None = None
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        # Hook run after each successful page (index, response): lets a test change the simulator mid-pull.
        self.after_page: Any = None

    async def kf_sync_msg(
        self, token: str, open_kfid: str, cursor: str | None = None, limit: int = 1000
    ) -> dict[str, Any]:
        call = SyncCall(token or None, cursor, limit)
        index = len(self.calls)
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            try:
                call.response = await self._client.kf_sync_msg(token, open_kfid, cursor=cursor, limit=limit)
            except WeComApiError as exc:
                call.error = exc.errcode
                raise
            if self.after_page is not None:
                self.after_page(index, call.response)
            if self.pause_after_call == index:
                self.paused.set()
                await self.resume.wait()
            return call.response
        finally:
            self.in_flight -= 1


class FailingQueue:
    """An InboundQueue whose enqueue_once raises on the k-th call (1-based); everything else is the real one."""

    def __init__(self, queue: InboundQueue, fail_on_call: int) -> None:
        self._queue = queue
        self._fail_on = fail_on_call
        self.calls = 0

    async def enqueue_once(
        self, dedupe_key: str, conversation_key: str, kind: str, payload: Mapping[str, Any]
    ) -> bool:
        self.calls += 1
        if self.calls == self._fail_on:
            raise ConnectionError("redis went away mid-page")
        return await self._queue.enqueue_once(dedupe_key, conversation_key, kind, payload)


@dataclass
class Harness:
    sim: SimulatorState
    clock: ManualClock
    services: Services
    backend: Backend
    sleeps: list[float] = field(default_factory=list)
    extra_redis: list[redis_asyncio.Redis] = field(default_factory=list)

    async def _sleep(self, delay: float) -> None:
        self.sleeps.append(delay)  # backoff is recorded, never slept

    def client(self, secret: str = TEST_KF_SECRET, max_retries: int = 0, timeout_s: float = 5.0) -> WeComClient:
        s = self.services
        return WeComClient(
            s.http,
            s.redis,
            s.keys,
            s.settings.wecom_api_base,
            TEST_CORP_ID,
            secret,
            metrics=None,
            clock=self.clock,
            max_retries=max_retries,
            timeout_s=timeout_s,
            sleep=self._sleep,
            jitter=lambda: 0.0,
        )

    def recording_api(self) -> RecordingSyncApi:
        return RecordingSyncApi(self.client())

    def puller(
        self,
        api: Any = None,
        *,
        queue: Any = None,
        redis: redis_asyncio.Redis | None = None,
        page_limit: int = 1000,
    ) -> KfPuller:
        s = self.services
        return KfPuller(
            api if api is not None else self.client(),
            queue if queue is not None else s.queue,
            s.repos.cursors,
            redis if redis is not None else s.redis,
            s.keys,
            page_limit=page_limit,
        )

    def pipeline(
        self,
        *,
        sender: Any = None,
        puller: Any = None,
        repos: Any = None,
        kf_retries: int = 0,
        app_client: Any = None,
        dispatcher: Any = None,
    ) -> Pipeline:
        s = self.services
        if sender is None:
            sender = WeComSender(
                app_client if app_client is not None else self.client(TEST_SECRET),
                self.client(TEST_KF_SECRET, max_retries=kf_retries),
                s.settings.wecom_agent_id,
            )
        return Pipeline(
            repos if repos is not None else s.repos,
            dispatcher if dispatcher is not None else build_dispatcher(),
            sender,
            puller if puller is not None else self.puller(),
            self.clock,
            scripts=s.scripts,
        )

    async def other_redis(self) -> redis_asyncio.Redis:
        """A second connection, as another process would have (fakeredis: the one in-process server)."""
        if not self.backend.redis_url:
            return self.services.redis
        client = redis_asyncio.Redis.from_url(self.backend.redis_url)
        self.extra_redis.append(client)
        return client

    # ---- the queue, read without a worker

    async def queued(self) -> list[QueueEntry]:
        """Every entry currently in the partition streams (not consumed)."""
        q = self.services.queue
        out: list[QueueEntry] = []
        for p in range(q.partitions):
            for entry_id, raw in await q.redis.xrange(q.stream(p)):
                fields = {_text(k): _text(v) for k, v in raw.items()}
                out.append(q.parse(p, _text(entry_id), fields, 0))
        return out

    async def queued_msgids(self) -> list[str]:
        return [str(e.payload["msg"]["msgid"]) for e in await self.queued() if e.kind == "kf_message"]

    async def take(self) -> list[QueueEntry]:
        """Read (as a consumer) and ack everything queued; returns the entries, partition by partition."""
        q = self.services.queue
        taken: list[QueueEntry] = []
        for p in range(q.partitions):
            for entry_id, fields in await q.read(p, "test-consumer", ">", 1000):
                taken.append(q.parse(p, entry_id, fields, 0))
                await q.ack(p, entry_id)
        return taken

    async def run(self, pipeline: Pipeline) -> list[QueueEntry]:
        """Process every queued entry (and whatever a kf_pull entry queues) until the queue is empty."""
        done: list[QueueEntry] = []
        while batch := await self.take():
            for entry in batch:
                await pipeline.process(entry)
                done.append(entry)
        return done

    def sync_calls(self) -> list[Any]:
        return [c for c in self.sim.calls if c.path == SYNC_PATH]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.asynccontextmanager
async def open_harness(
    backend: Backend, kf_accounts: tuple[str, ...] = (KFID,), members: tuple[str, ...] | None = None
) -> AsyncIterator[Harness]:
    """The simulator (on a manual clock) and the bot's services pointed at it; `members`: the corp's members."""
    clock = ManualClock()
    config = SimulatorConfig(
        corp_id=TEST_CORP_ID,
        agent_id=TEST_AGENT_ID,
        token=TEST_TOKEN,
        aes_key=TEST_AES_KEY,
        secrets={TEST_SECRET: "app", TEST_KF_SECRET: "kf"},
        callback_url=None,  # the tests play the ingress themselves: no callback is POSTed anywhere
        kf_accounts=kf_accounts,
        **({"members": members} if members is not None else {}),
    )
    sim_app = create_simulator(config, clock)
    server = TestServer(sim_app, host="127.0.0.1")
    await server.start_server()
    settings = make_settings(
        backend,
        wecom_api_base=str(server.make_url("")).rstrip("/"),
        queue_partitions=4,
        auto_migrate=True,
        api_max_retries=0,
    )
    try:
        async with open_services(settings, clock=clock) as services:
            harness = Harness(sim=sim_app[SIM_STATE], clock=clock, services=services, backend=backend)
            try:
                yield harness
            finally:
                for client in harness.extra_redis:
                    await client.aclose()
    finally:
        await server.close()


def callback_entry(plaintext: str) -> QueueEntry:
    """A queue entry for a callback's decrypted XML, as the ingress writes it (for handing to the pipeline)."""
    return QueueEntry(
        partition=0,
        entry_id="0-1",
        kind="callback",
        payload={"xml": plaintext, "received_at": 0.0},
        dedupe_key="test",
        attempts=0,
        enqueued_at=0.0,
    )


def callback_token(delivery: CallbackDelivery) -> str:
    """The Token of a kf_msg_or_event callback, as the ingress takes it from the decrypted XML."""
    token = parse_plaintext(delivery.plaintext).get_text("Token")
    assert token
    return token


def customer_says(h: Harness, user: str, text: str) -> tuple[str, str]:
    """A customer writes; returns (msgid, the callback's sync token)."""
    item, delivery = push_kf_customer_message(h.sim, user, text)
    return str(item["msgid"]), callback_token(delivery)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        yield harness


# ---------------------------------------------------------------- paging


async def test_pulls_small_pages_and_through_empty_pages_with_has_more(h: Harness) -> None:
    msgids = []
    token = ""
    for n in range(5):
        msgid, token = customer_says(h, f"wmPage{n % 2}", f"第{n}条")
        msgids.append(msgid)
    h.sim.kf_sync_page_size = 2
    h.sim.kf_sync_empty_pages = 2  # two empty pages (has_more=1) before anything

    api = h.recording_api()

    def more_empty_pages(index: int, response: dict[str, Any]) -> None:
        if index == 2:  # right after the first non-empty page: two more empty pages mid-stream
            assert response["msg_list"]
            h.sim.kf_sync_empty_pages = 2

    api.after_page = more_empty_pages
    queued = await h.puller(api).pull(KFID, token)

    assert queued == 5
    pages = [c.response for c in api.calls]
    assert all(p is not None for p in pages)
    sizes = [len(p["msg_list"]) for p in pages if p is not None]
    assert sizes == [0, 0, 2, 0, 0, 2, 1]
    assert [p["has_more"] for p in pages if p is not None] == [1, 1, 1, 1, 1, 1, 0]
    # Every call used the callback token and carried the cursor of the page before it.
    assert all(c.token == token for c in api.calls)
    for before, after in zip(api.calls, api.calls[1:], strict=False):
        assert before.response is not None
        assert after.cursor == before.response["next_cursor"]
    # Each message queued exactly once, as a kf_message of the customer's conversation.
    assert sorted(await h.queued_msgids()) == sorted(msgids)
    for entry in await h.queued():
        assert entry.kind == "kf_message"
        assert entry.payload["open_kfid"] == KFID
        msg = entry.payload["msg"]
        assert entry.conversation_key == f"kf:{KFID}:{msg['external_userid']}"
    # The cursor stored is the last page's.
    last = api.calls[-1].response
    assert last is not None
    assert await h.services.repos.cursors.get_cursor(KFID) == last["next_cursor"]


async def test_sync_options_control_endpoint_drives_the_same_paging(h: Harness) -> None:
    """The sandbox's `/_sim/kf/sync_options` (HTTP) has the same effect as setting the state directly."""
    base = h.services.settings.wecom_api_base
    async with h.services.http.post(f"{base}/_sim/kf/sync_options", json={"page_size": 1, "empty_pages": 3}) as r:
        assert r.status == 200
    ids = [customer_says(h, "wmOpts", t) for t in ("a", "b", "c")]
    api = h.recording_api()
    assert await h.puller(api).pull(KFID, ids[-1][1]) == 3
    assert [len(c.response["msg_list"]) for c in api.calls if c.response] == [0, 0, 0, 1, 1, 1]
    assert sorted(await h.queued_msgids()) == sorted(m for m, _ in ids)


async def test_next_pull_starts_at_the_saved_cursor(h: Harness) -> None:
    first, token = customer_says(h, "wmCursor", "一")
    api = h.recording_api()
    assert await h.puller(api).pull(KFID, token) == 1
    saved = await h.services.repos.cursors.get_cursor(KFID)
    assert saved

    second, token2 = customer_says(h, "wmCursor", "二")
    api2 = h.recording_api()
    assert await h.puller(api2).pull(KFID, token2) == 1
    assert api2.calls[0].cursor == saved
    last = api2.calls[0].response
    assert last is not None and last["msg_list"][0]["msgid"] == second
    assert sorted(await h.queued_msgids()) == sorted([first, second])


# ---------------------------------------------------------------- cursor only after the page is queued


@pytest.mark.parametrize("fail_on_call", [1, 4, 5])
async def test_cursor_saved_only_after_the_page_is_queued(h: Harness, fail_on_call: int) -> None:
    msgids = []
    token = ""
    for n in range(6):
        msgid, token = customer_says(h, f"wmCur{n % 3}", f"m{n}")
        msgids.append(msgid)
    h.sim.kf_sync_page_size = 2
    api = h.recording_api()
    failing = FailingQueue(h.services.queue, fail_on_call)

    with pytest.raises(ConnectionError):
        await h.puller(api, queue=failing).pull(KFID, token)

    # The page being queued when the queue failed is page (k-1)//2; the cursor still points before it.
    failed_page = (fail_on_call - 1) // 2
    assert len(api.calls) == failed_page + 1
    stored = await h.services.repos.cursors.get_cursor(KFID)
    assert stored == api.calls[failed_page].cursor  # None when the very first page failed
    queued_before = await h.queued_msgids()
    assert sorted(queued_before) == sorted(msgids[: fail_on_call - 1])  # the page's earlier messages stay queued
    # The lock was released on the way out: a healthy pull afterwards runs at once and queues the rest.
    api2 = h.recording_api()
    queued = await h.puller(api2).pull(KFID, token)
    assert queued == len(msgids) - (fail_on_call - 1)
    assert api2.calls[0].cursor == stored
    final = await h.queued_msgids()
    assert sorted(final) == sorted(msgids)
    assert len(final) == len(set(final))


# ---------------------------------------------------------------- per-account lock


async def test_callback_during_a_running_pull_is_not_lost(h: Harness) -> None:
    """A holds the lock and has its page; B's callback (a newer message) arrives then. B returns at once and A
    pulls again for B before letting go, with B's token."""
    m1, token1 = customer_says(h, "wmLock", "first")
    api_a = h.recording_api()
    api_a.pause_after_call = 0  # A has fetched page 0 (only m1) and stops inside the lock
    api_b = h.recording_api()
    puller_a = h.puller(api_a)
    puller_b = h.puller(api_b, redis=await h.other_redis())

    task_a = asyncio.create_task(puller_a.pull(KFID, token1))
    await api_a.paused.wait()
    m2, token2 = customer_says(h, "wmLock", "second")  # stored after A's page was served
    assert await puller_b.pull(KFID, token2) == 0  # lock busy: B leaves its wish and returns
    assert api_b.calls == []
    api_a.resume.set()
    assert await task_a == 2  # m1 from its own pull, m2 from B's

    assert [c.token for c in api_a.calls] == [token1, token2]
    assert api_a.max_in_flight == 1
    assert sorted(await h.queued_msgids()) == sorted([m1, m2])
    # Nothing left behind: no lock, no pending wish.
    r = h.services.redis
    assert not await r.exists(h.services.keys.kf_sync_lock(KFID))
    assert not await r.exists(h.services.keys.kf_sync_pending(KFID))


async def test_concurrent_pulls_sync_one_at_a_time(h: Harness) -> None:
    ids = [customer_says(h, f"wmConc{n}", f"c{n}") for n in range(6)]
    h.sim.kf_sync_page_size = 2
    shared = h.recording_api()  # one recorder, so overlap between the pullers is seen
    pullers = [h.puller(shared, redis=await h.other_redis()) for _ in range(4)]
    results = await asyncio.gather(*(p.pull(KFID, ids[-1][1]) for p in pullers))

    assert sum(results) == 6
    assert shared.max_in_flight == 1
    # Exactly one drain of 3 pages, plus at most one re-drain per loser wish (each an empty 1-page pull).
    assert 3 <= len(shared.calls) <= 3 + len(pullers) - 1
    assert len(h.sync_calls()) == len(shared.calls)
    msgids = await h.queued_msgids()
    assert sorted(msgids) == sorted(m for m, _ in ids)


async def test_the_lock_is_per_account(backend: Backend) -> None:
    other = "wkSECONDACCOUNT01"
    async with open_harness(backend, kf_accounts=(KFID, other)) as h:
        m1, token1 = customer_says(h, "wmAcctA", "a")
        item, delivery = push_kf_customer_message(h.sim, "wmAcctB", "b", open_kfid=other)
        api_a = h.recording_api()
        api_a.pause_after_call = 0
        task_a = asyncio.create_task(h.puller(api_a).pull(KFID, token1))
        await api_a.paused.wait()  # KFID's lock is held
        api_b = h.recording_api()
        assert await h.puller(api_b).pull(other, callback_token(delivery)) == 1  # not blocked by KFID's pull
        api_a.resume.set()
        assert await task_a == 1
        assert sorted(await h.queued_msgids()) == sorted([m1, str(item["msgid"])])
        assert await h.services.repos.cursors.get_cursor(other) is not None


async def test_lock_held_elsewhere_defers_to_the_holder(h: Harness) -> None:
    """Another process holds the lock: this pull makes no sync_msg call and leaves its token as the wish."""
    _, token = customer_says(h, "wmHeld", "hi")
    keys, r = h.services.keys, h.services.redis
    await r.set(keys.kf_sync_lock(KFID), "someone-else", px=60_000)
    api = h.recording_api()
    assert await h.puller(api).pull(KFID, token) == 0
    assert api.calls == []
    assert _text(await r.get(keys.kf_sync_pending(KFID))) == token
    # The holder goes away (lock released); the next pull takes the wish and drains.
    await r.delete(keys.kf_sync_lock(KFID))
    assert await h.puller(api).pull(KFID, token) == 1


# ---------------------------------------------------------------- msgid dedupe


async def test_same_message_in_two_pulls_is_queued_once(h: Harness) -> None:
    m1, token = customer_says(h, "wmDup", "once")
    assert await h.puller().pull(KFID, token) == 1
    # The cursor is lost (restored backup, a lagging replica): the next pull sees m1 again.
    await h.services.repos.cursors.save_cursor(KFID, _sim_cursor(0))
    m2, token2 = customer_says(h, "wmDup", "twice")
    api = h.recording_api()
    assert await h.puller(api).pull(KFID, token2) == 1
    first = api.calls[0].response
    assert first is not None
    assert [m["msgid"] for m in first["msg_list"]] == [m1, m2]
    assert sorted(await h.queued_msgids()) == sorted([m1, m2])


def _sim_cursor(position: int) -> str:
    from bot.wecom.simulator.api import encode_cursor

    return encode_cursor(position)


# ---------------------------------------------------------------- expired token


async def test_expired_sync_token_falls_back_to_pulling_without_it(h: Harness) -> None:
    m1, token = customer_says(h, "wmLate", "hello")
    h.clock.advance(601)  # the callback token lives 10 minutes
    api = h.recording_api()
    assert await h.puller(api).pull(KFID, token) == 1
    assert [(c.token, c.error) for c in api.calls] == [(token, 95007), (None, None)]
    assert [c.errcode for c in h.sync_calls()] == [95007, 0]
    assert await h.queued_msgids() == [m1]


async def test_expired_token_mid_pull_continues_without_it(h: Harness) -> None:
    ids = [customer_says(h, "wmMid", f"x{n}") for n in range(3)]
    h.sim.kf_sync_page_size = 1
    api = h.recording_api()

    def expire(index: int, _response: dict[str, Any]) -> None:
        if index == 0:
            h.clock.advance(601)

    api.after_page = expire
    assert await h.puller(api).pull(KFID, ids[-1][1]) == 3
    assert [c.error for c in api.calls] == [None, 95007, None, None]
    assert [c.token for c in api.calls][2:] == [None, None]
    assert api.calls[2].cursor == api.calls[1].cursor  # the failed page is asked again, not skipped


async def test_other_sync_errors_propagate_and_keep_the_cursor(h: Harness) -> None:
    _, token = customer_says(h, "wmErr", "hi")
    h.sim.faults.append(_fault(h, SYNC_PATH, errcode=95000))
    with pytest.raises(WeComApiError) as info:
        await h.puller().pull(KFID, token)
    assert info.value.errcode == 95000
    assert await h.services.repos.cursors.get_cursor(KFID) is None
    assert not await h.services.redis.exists(h.services.keys.kf_sync_lock(KFID))
    assert await h.puller().pull(KFID, token) == 1


def _fault(h: Harness, path: str, *, errcode: int, count: int = 1) -> Any:
    from bot.wecom.simulator.state import Fault

    return Fault(id=h.sim.next_id(), path=path, remaining=count, errcode=errcode)


# ---------------------------------------------------------------- the kf_pull entry, end to end


async def test_kf_pull_entry_pulls_with_the_callback_token(h: Harness) -> None:
    """The ingress queues kf_msg_or_event as a kf_pull entry; the worker's process() pulls with its token."""
    msgid, token = customer_says(h, "wmEntry", "在吗")
    api = h.recording_api()
    pipeline = h.pipeline(puller=h.puller(api))
    entry = QueueEntry(
        partition=0,
        entry_id="0-1",
        kind="kf_pull",
        payload={"open_kfid": KFID, "token": token, "received_at": h.clock.now()},
        dedupe_key="test",
        attempts=0,
        enqueued_at=h.clock.now(),
        conversation_key=f"kf-pull:{KFID}",
    )
    await pipeline.process(entry)
    assert [c.token for c in api.calls] == [token]
    assert await h.queued_msgids() == [msgid]
    entries = await h.run(pipeline)
    assert [e.kind for e in entries] == ["kf_message"]
    sent = h.sim.sent_after(0, "wmEntry")
    assert [(s.api, s.status) for s in sent] == [("kf/send_msg", "delivered")]
    assert [sent[0].content] == scripted_replies("在吗", customer="wmEntry")
