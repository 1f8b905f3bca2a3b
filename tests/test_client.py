"""WeComClient / RobotClient against a scripted fake WeCom server on loopback, on fakeredis and real Redis."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import fakeredis
import pytest
import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from bot.metrics import Metrics
from bot.redis_keys import RedisKeys
from bot.wecom.client import RobotClient, ServiceState, WeComClient
from bot.wecom.errors import (
    AccessTokenError,
    CredentialError,
    KfStateError,
    PermissionDeniedError,
    QuotaError,
    RobotError,
    TokenRefreshTimeout,
    WeComApiError,
    WeComError,
    WeComTransportError,
)
from bot.wecom.tokens import TokenStore
from tests.conftest import TEST_CORP_ID, TEST_KF_SECRET, TEST_SECRET, Backend

GETTOKEN = "/cgi-bin/gettoken"
SEND = "/cgi-bin/kf/send_msg"
ROBOT = "/cgi-bin/webhook/send"

# ----------------------------------------------------------------------------------------------------
# A scripted fake WeCom


HANG = "hang"  # never answer (until the test ends): the client must time out
DISCONNECT = "disconnect"  # drop the connection without an answer


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class FakeWeCom:
    """Answers each path from its script (FIFO), else with defaults: gettoken issues tok-1, tok-2, ...;
    other paths accept only issued tokens (else 40014) and answer errcode 0 plus `defaults[path]`."""

    scripts: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    issued: int = 0
    gettoken_delay_s: float = 0.0
    expires_in: int = 7200
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def script(self, path: str, *responses: Any) -> None:
        self.scripts[path].extend(responses)

    def count(self, path: str) -> int:
        return sum(1 for c in self.calls if c.path == path)

    def calls_to(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.calls.append(Call(request.method, request.path, dict(request.query), body))
        if self.scripts.get(request.path):
            step = self.scripts[request.path].pop(0)
            if step == HANG:
                await self.release.wait()
                return web.json_response({"errcode": 0, "errmsg": "ok"})
            if step == DISCONNECT:
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if isinstance(step, int):
                return web.Response(status=step, text="gateway trouble")
            if isinstance(step, dict):
                return web.json_response(step)
            raise AssertionError(f"bad script step {step!r}")
        if request.path == GETTOKEN:
            if self.gettoken_delay_s:
                await asyncio.sleep(self.gettoken_delay_s)
            self.issued += 1
            token = f"tok-{self.issued}"
            self.valid_tokens.add(token)
            return web.json_response(
                {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": self.expires_in}
            )
        if request.path == ROBOT:
            return web.json_response({"errcode": 0, "errmsg": "ok"})
        if request.query.get("access_token") not in self.valid_tokens:
            return web.json_response({"errcode": 40014, "errmsg": "invalid access_token"})
        return web.json_response({"errcode": 0, "errmsg": "ok", **self.defaults.get(request.path, {})})


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.t = now

    def now(self) -> float:
        return self.t


@dataclass
class Env:
    fake: FakeWeCom
    base_url: str
    http: aiohttp.ClientSession
    keys: RedisKeys
    redis_factory: Callable[[], redis_asyncio.Redis]
    redis: redis_asyncio.Redis
    clock: FakeClock
    metrics: Metrics
    sleeps: list[float]

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)

    def client(
        self, secret: str = TEST_SECRET, *, redis: redis_asyncio.Redis | None = None, **kw: Any
    ) -> WeComClient:
        kw.setdefault("jitter", lambda: 1.0)
        return WeComClient(
            self.http,
            redis or self.redis,
            self.keys,
            self.base_url,
            TEST_CORP_ID,
            secret,
            metrics=self.metrics,
            clock=self.clock,
            sleep=self.sleep,
            **kw,
        )

    def robot(self, **kw: Any) -> RobotClient:
        kw.setdefault("jitter", lambda: 1.0)
        return RobotClient(self.http, self.base_url, self.metrics, sleep=self.sleep, **kw)

    def api_calls(self, path: str, errcode: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "wecom_api_calls_total", {"path": path, "errcode": errcode}
        )
        return value or 0.0


@pytest.fixture
async def env(backend: Backend) -> AsyncIterator[Env]:
    fake = FakeWeCom()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake_server = fakeredis.FakeServer()
    made: list[redis_asyncio.Redis] = []

    def redis_factory() -> redis_asyncio.Redis:
        # a new connection to the same data, like another process would have
        r: redis_asyncio.Redis
        if backend.redis_url:
            r = redis_asyncio.Redis.from_url(backend.redis_url)
        else:
            r = fakeredis.FakeAsyncRedis(server=fake_server)
        made.append(r)
        return r

    http = aiohttp.ClientSession()
    try:
        yield Env(
            fake=fake,
            base_url=str(server.make_url("")).rstrip("/"),
            http=http,
            keys=RedisKeys(prefix=backend.key_prefix),
            redis_factory=redis_factory,
            redis=redis_factory(),
            clock=FakeClock(),
            metrics=Metrics(CollectorRegistry()),
            sleeps=[],
        )
    finally:
        fake.release.set()
        await http.close()
        await server.close()
        for r in made:
            await r.aclose()


TEXT = {"content": "你好"}

# ----------------------------------------------------------------------------------------------------
# Tokens


async def test_token_cached_and_reused_in_query_only(env: Env) -> None:
    client = env.client()
    await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    # another instance (another process) with the same secret uses the cached token too
    await env.client(redis=env.redis_factory()).kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)

    assert env.fake.count(GETTOKEN) == 1
    gettoken = env.fake.calls_to(GETTOKEN)[0]
    assert gettoken.method == "GET"
    assert gettoken.query == {"corpid": TEST_CORP_ID, "corpsecret": TEST_SECRET}
    sends = env.fake.calls_to(SEND)
    assert [c.query for c in sends] == [{"access_token": "tok-1"}] * 3
    for call in sends:
        assert "access_token" not in call.body
        assert call.body == {
            "touser": "wmCustomer",
            "open_kfid": "wkAccount",
            "msgtype": "text",
            "text": TEXT,
        }
    assert env.api_calls(GETTOKEN, "0") == 1
    assert env.api_calls(SEND, "0") == 3
    assert env.sleeps == []


async def test_each_secret_has_its_own_token(env: Env) -> None:
    app_client = env.client(TEST_SECRET)
    kf_client = env.client(TEST_KF_SECRET)
    assert await app_client.access_token() == "tok-1"
    assert await kf_client.access_token() == "tok-2"
    assert await app_client.access_token() == "tok-1"
    assert [c.query["corpsecret"] for c in env.fake.calls_to(GETTOKEN)] == [TEST_SECRET, TEST_KF_SECRET]
    # the secret never appears in a Redis key
    keys = [
        k.decode() if isinstance(k, bytes) else k async for k in env.redis.scan_iter(f"{env.keys.prefix}:*")
    ]
    assert keys and not any(TEST_SECRET in k or TEST_KF_SECRET in k for k in keys)


async def test_token_refreshed_early_by_the_clock(env: Env) -> None:
    client = env.client()
    assert await client.access_token() == "tok-1"
    env.clock.t += 7200 - 300 - 1
    assert await client.access_token() == "tok-1"
    env.clock.t += 2  # inside the 5-minute safety margin
    assert await client.access_token() == "tok-2"
    assert env.fake.count(GETTOKEN) == 2


@pytest.mark.parametrize("errcode", [40014, 42001, 41001])
async def test_rejected_token_refreshed_once_and_retried(env: Env, errcode: int) -> None:
    env.fake.script(SEND, {"errcode": errcode, "errmsg": "token trouble"})
    client = env.client()
    result = await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT, msgid="m1")
    assert result == {"errcode": 0, "errmsg": "ok", "msgid": "m1"}
    assert env.fake.count(GETTOKEN) == 2
    assert [c.query["access_token"] for c in env.fake.calls_to(SEND)] == ["tok-1", "tok-2"]
    assert env.sleeps == []  # a token refresh is not a backoff
    # the fresh token is cached for the next call
    await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert env.fake.count(GETTOKEN) == 2


async def test_rejected_twice_raises_after_one_refresh(env: Env) -> None:
    env.fake.script(SEND, {"errcode": 40014, "errmsg": "a"}, {"errcode": 42001, "errmsg": "b"})
    with pytest.raises(AccessTokenError) as info:
        await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert (info.value.errcode, info.value.errmsg, info.value.path) == (42001, "b", SEND)
    assert env.fake.count(GETTOKEN) == 2
    assert env.fake.count(SEND) == 2


async def test_invalidate_only_drops_the_token_that_failed(env: Env) -> None:
    fetched = iter(["old", "new"])

    async def fetch() -> tuple[str, int]:
        return next(fetched), 7200

    first = TokenStore(env.redis, env.keys, TEST_CORP_ID, TEST_SECRET, fetch, clock=env.clock)
    second = TokenStore(env.redis_factory(), env.keys, TEST_CORP_ID, TEST_SECRET, fetch, clock=env.clock)
    old = await first.get()
    assert old.value == "old" and "old" not in repr(old)
    # the other process saw it fail first and already refreshed
    assert await second.invalidate(await second.get())
    assert (await second.get()).value == "new"
    # this process's late invalidation of the old token must not drop the new one
    assert not await first.invalidate(old)
    assert (await first.get()).value == "new"


# ----------------------------------------------------------------------------------------------------
# Single flight


async def test_single_flight_in_one_process(env: Env) -> None:
    env.fake.gettoken_delay_s = 0.05
    client = env.client()
    results = await asyncio.gather(
        *(client.kf_send_msg(f"wm{i}", "wkAccount", "text", TEXT) for i in range(50))
    )
    assert len(results) == 50
    assert env.fake.count(GETTOKEN) == 1
    assert env.fake.count(SEND) == 50


async def test_single_flight_across_processes(env: Env) -> None:
    env.fake.gettoken_delay_s = 0.05
    one = env.client(redis=env.redis_factory())
    two = env.client(redis=env.redis_factory())
    calls = [c.kf_send_msg(f"wm{i}", "wkAccount", "text", TEXT) for i in range(25) for c in (one, two)]
    await asyncio.gather(*calls)
    assert env.fake.count(GETTOKEN) == 1
    assert {c.query["access_token"] for c in env.fake.calls_to(SEND)} == {"tok-1"}
    # the refresh lock is gone once the refresh is done
    assert await env.redis.exists(env.keys.access_token_lock(TEST_CORP_ID, TEST_SECRET)) == 0


async def test_waiter_uses_the_token_another_process_fetched(env: Env) -> None:
    lock_key = env.keys.access_token_lock(TEST_CORP_ID, TEST_SECRET)
    await env.redis.set(lock_key, "other-process", px=30_000)
    env.fake.valid_tokens.add("theirs")
    client = env.client()
    task = asyncio.create_task(client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT))
    await asyncio.sleep(0)  # let the call start waiting (the outcome is the same if it has not yet)

    async def their_fetch() -> tuple[str, int]:
        return "theirs", 7200

    other = TokenStore(env.redis_factory(), env.keys, TEST_CORP_ID, TEST_SECRET, their_fetch, clock=env.clock)
    await other._fetch_and_store()  # the lock holder fills the cache

    await asyncio.wait_for(task, timeout=10)
    assert env.fake.count(GETTOKEN) == 0
    assert env.fake.calls_to(SEND)[0].query["access_token"] == "theirs"
    # the waiter never released a lock it does not own
    assert await env.redis.get(lock_key) == b"other-process"


async def test_lock_of_a_dead_process_expires(env: Env) -> None:
    lock_key = env.keys.access_token_lock(TEST_CORP_ID, TEST_SECRET)
    await env.redis.set(lock_key, "dead-process", px=200)
    assert await env.client().access_token() == "tok-1"
    assert env.fake.count(GETTOKEN) == 1


async def test_waiting_for_a_stuck_refresh_gives_up(env: Env) -> None:
    lock_key = env.keys.access_token_lock(TEST_CORP_ID, TEST_SECRET)
    await env.redis.set(lock_key, "stuck-process", px=30_000)

    async def fetch() -> tuple[str, int]:
        raise AssertionError("must not call gettoken while another process holds the lock")

    store = TokenStore(
        env.redis, env.keys, TEST_CORP_ID, TEST_SECRET, fetch, clock=env.clock, wait_timeout_s=0.05
    )
    with pytest.raises(TokenRefreshTimeout):
        await store.get()


# ----------------------------------------------------------------------------------------------------
# Retries and backoff


async def test_system_busy_retried_at_most_three_times(env: Env) -> None:
    env.fake.script(SEND, *[{"errcode": -1, "errmsg": "system busy"}] * 10)
    with pytest.raises(WeComApiError) as info:
        await env.client(max_retries=8).kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert info.value.errcode == -1 and info.value.retryable
    assert env.fake.count(SEND) == 4  # the first try + 3 retries
    assert env.sleeps == [0.2, 0.4, 0.8]
    assert env.api_calls(SEND, "-1") == 4


async def test_system_busy_then_success(env: Env) -> None:
    env.fake.script(SEND, {"errcode": -1, "errmsg": "busy"}, {"errcode": -1, "errmsg": "busy"})
    await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert env.fake.count(SEND) == 3
    assert env.sleeps == [0.2, 0.4]


async def test_frequency_limit_backoff_grows_and_is_capped(env: Env) -> None:
    env.fake.script(SEND, *[{"errcode": 45009, "errmsg": "api freq out of limit"}] * 5)
    client = env.client(max_retries=5, backoff_base_s=0.2, backoff_cap_s=1.0)
    await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert env.sleeps == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert env.fake.count(SEND) == 6
    assert env.api_calls(SEND, "45009") == 5
    assert env.api_calls(SEND, "0") == 1


async def test_frequency_limit_exhausted_raises_quota_error(env: Env) -> None:
    env.fake.script(SEND, *[{"errcode": 45009, "errmsg": "api freq out of limit"}] * 10)
    with pytest.raises(QuotaError) as info:
        await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert info.value.errcode == 45009
    assert env.fake.count(SEND) == 4
    assert env.sleeps == [0.2, 0.4, 0.8]


async def test_full_jitter_stays_under_the_ceiling(env: Env) -> None:
    draws = iter([0.5, 0.0, 0.25])
    env.fake.script(SEND, *[{"errcode": 45033, "errmsg": "concurrency"}] * 3)
    await env.client(jitter=lambda: next(draws)).kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert env.sleeps == [0.1, 0.0, 0.2]


async def test_http_5xx_retried(env: Env) -> None:
    env.fake.script(SEND, 502, 503)
    await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert env.fake.count(SEND) == 3
    assert env.sleeps == [0.2, 0.4]
    assert env.api_calls(SEND, "transport") == 2


async def test_http_5xx_exhausted_raises_transport_error(env: Env) -> None:
    env.fake.script(SEND, *[500] * 10)
    with pytest.raises(WeComTransportError) as info:
        await env.client(max_retries=2).kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert info.value.status == 500 and info.value.retryable
    assert env.fake.count(SEND) == 3
    assert "tok-1" not in str(info.value)


async def test_http_4xx_not_retried(env: Env) -> None:
    env.fake.script(SEND, 404)
    with pytest.raises(WeComTransportError) as info:
        await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert info.value.status == 404 and not info.value.retryable
    assert env.fake.count(SEND) == 1 and env.sleeps == []


async def test_timeout_retried(env: Env) -> None:
    env.fake.script(SEND, HANG)
    client = env.client(timeout_s=0.2)
    await client.access_token()  # so the timeout below is the send's
    await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert env.fake.count(SEND) == 2
    assert env.sleeps == [0.2]
    assert env.api_calls(SEND, "transport") == 1


async def test_dropped_connection_retried(env: Env) -> None:
    env.fake.script(SEND, DISCONNECT)
    await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert env.fake.count(SEND) == 2
    assert env.sleeps == [0.2]


async def test_connection_refused_on_gettoken_is_a_transport_error(env: Env) -> None:
    client = WeComClient(
        env.http,
        env.redis,
        env.keys,
        "http://127.0.0.1:1",
        TEST_CORP_ID,
        TEST_SECRET,
        metrics=env.metrics,
        clock=env.clock,
        sleep=env.sleep,
        jitter=lambda: 1.0,
    )
    with pytest.raises(WeComTransportError) as info:
        await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert info.value.retryable
    assert TEST_SECRET not in str(info.value)
    assert env.api_calls(GETTOKEN, "transport") == 4  # gettoken's own retries only, not multiplied
    assert env.sleeps == [0.2, 0.4, 0.8]


# ----------------------------------------------------------------------------------------------------
# Errors that are never retried


async def test_bad_secret_never_retried_and_remembered(env: Env) -> None:
    env.fake.script(GETTOKEN, {"errcode": 40001, "errmsg": "invalid credential"})
    client = env.client()
    with pytest.raises(CredentialError) as info:
        await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert (info.value.errcode, info.value.errmsg, info.value.path) == (40001, "invalid credential", GETTOKEN)
    assert not info.value.retryable
    assert env.sleeps == []
    # neither this process nor another one calls gettoken again for a while (the IP would be banned)
    with pytest.raises(CredentialError):
        await client.access_token()
    with pytest.raises(CredentialError):
        await env.client(redis=env.redis_factory()).access_token()
    assert env.fake.count(GETTOKEN) == 1
    assert env.fake.count(SEND) == 0


@pytest.mark.parametrize(
    ("errcode", "error_type"),
    [
        (40003, WeComApiError),
        (48002, PermissionDeniedError),
        (60020, PermissionDeniedError),
        (95018, KfStateError),
        (95016, KfStateError),
        (95001, QuotaError),
        (95002, QuotaError),
        (93000, RobotError),
    ],
)
async def test_parameter_permission_and_state_errors_not_retried(
    env: Env, errcode: int, error_type: type[WeComApiError]
) -> None:
    env.fake.script(SEND, {"errcode": errcode, "errmsg": f"msg {errcode}"})
    with pytest.raises(error_type) as info:
        await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    err = info.value
    assert (err.errcode, err.errmsg, err.path) == (errcode, f"msg {errcode}", SEND)
    assert not err.retryable
    assert isinstance(err, WeComError)
    assert env.fake.count(SEND) == 1
    assert env.sleeps == []
    assert env.api_calls(SEND, str(errcode)) == 1


async def test_token_never_logged(env: Env) -> None:
    env.fake.script(SEND, {"errcode": 40014, "errmsg": "x"}, {"errcode": 45009, "errmsg": "y"}, 502)
    env.fake.script(GETTOKEN, {"errcode": -1, "errmsg": "busy"})
    with structlog.testing.capture_logs() as logs:
        await env.client().kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert logs, "retries are logged"
    text = repr(logs)
    for secret in ("tok-1", "tok-2", TEST_SECRET):
        assert secret not in text
    assert {entry.get("path") for entry in logs} >= {SEND, GETTOKEN}


# ----------------------------------------------------------------------------------------------------
# Method payloads


async def test_kf_methods(env: Env) -> None:
    env.fake.defaults["/cgi-bin/kf/sync_msg"] = {
        "next_cursor": "c2",
        "has_more": 1,
        "msg_list": [{"msgid": "m1", "msgtype": "text", "text": {"content": "hi"}}],
    }
    env.fake.defaults["/cgi-bin/kf/service_state/get"] = {"service_state": 3, "servicer_userid": "zhangsan"}
    env.fake.defaults["/cgi-bin/kf/service_state/trans"] = {"msg_code": "MSG_CODE"}
    env.fake.defaults["/cgi-bin/kf/servicer/list"] = {"servicer_list": [{"userid": "zhangsan", "status": 0}]}
    env.fake.defaults[SEND] = {"msgid": "wecom-msgid"}
    client = env.client(TEST_KF_SECRET)

    page = await client.kf_sync_msg("cbtoken", "wkAccount", cursor="c1", limit=100)
    assert (page["next_cursor"], page["has_more"], page["msg_list"][0]["msgid"]) == ("c2", 1, "m1")
    state = await client.kf_service_state_get("wkAccount", "wmCustomer")
    assert state == ServiceState(3, "zhangsan", state.raw)
    assert await client.kf_service_state_trans("wkAccount", "wmCustomer", 3, "zhangsan") == "MSG_CODE"
    with pytest.raises(ValueError, match="servicer_userid"):
        await client.kf_service_state_trans("wkAccount", "wmCustomer", 3)
    assert await client.kf_servicer_list("wkAccount") == [{"userid": "zhangsan", "status": 0}]
    assert (await client.kf_send_msg("wmC", "wkAccount", "text", TEXT))["msgid"] == "wecom-msgid"
    menu = {"head_content": "h", "list": [{"type": "click", "click": {"id": "1", "content": "One"}}]}
    await client.kf_send_msg_on_event("WELCOME", "msgmenu", menu, msgid="w1")

    by_path = {c.path: c for c in env.fake.calls if c.path != GETTOKEN}
    assert by_path["/cgi-bin/kf/sync_msg"].body == {
        "open_kfid": "wkAccount",
        "limit": 100,
        "token": "cbtoken",
        "cursor": "c1",
    }
    assert by_path["/cgi-bin/kf/service_state/get"].body == {
        "open_kfid": "wkAccount",
        "external_userid": "wmCustomer",
    }
    assert by_path["/cgi-bin/kf/service_state/trans"].body == {
        "open_kfid": "wkAccount",
        "external_userid": "wmCustomer",
        "service_state": 3,
        "servicer_userid": "zhangsan",
    }
    servicer_list = by_path["/cgi-bin/kf/servicer/list"]
    assert (servicer_list.method, servicer_list.query["open_kfid"]) == ("GET", "wkAccount")
    assert by_path["/cgi-bin/kf/send_msg_on_event"].body == {
        "code": "WELCOME",
        "msgtype": "msgmenu",
        "msgmenu": menu,
        "msgid": "w1",
    }
    assert all(c.method == "POST" for p, c in by_path.items() if p != "/cgi-bin/kf/servicer/list")


async def test_app_and_contact_methods(env: Env) -> None:
    client = env.client()
    await client.message_send(
        {"touser": "u1", "agentid": 1000002, "msgtype": "text", "text": {"content": "x"}},
        enable_duplicate_check=True,
        duplicate_check_interval=600,
    )
    await client.externalcontact_get("wmCustomer", cursor="cur")
    await client.send_welcome_msg(
        "WCODE", text="欢迎", attachments=[{"msgtype": "link", "link": {"url": "u"}}]
    )
    await client.mark_tag("u1", "wmCustomer", add_tag=["t1"], remove_tag=["t2"])
    await client.get_corp_tag_list(tag_id=["t1"])
    await client.add_msg_template({"chat_type": "group", "sender": "u1", "text": {"content": "x"}})
    await client.get_groupmsg_task("gm1", limit=100)
    await client.get_groupmsg_send_result("gm1", "u1", cursor="c")
    await client.groupchat_list(status_filter=0, owner_userids=["u1"], limit=100)
    await client.groupchat_get("wrChat", need_name=True)
    with pytest.raises(ValueError):
        await client.mark_tag("u1", "wmCustomer")

    by_path = {c.path: c for c in env.fake.calls if c.path != GETTOKEN}
    assert by_path["/cgi-bin/message/send"].body == {
        "touser": "u1",
        "agentid": 1000002,
        "msgtype": "text",
        "text": {"content": "x"},
        "enable_duplicate_check": 1,
        "duplicate_check_interval": 600,
    }
    get = by_path["/cgi-bin/externalcontact/get"]
    assert (get.method, get.query["external_userid"], get.query["cursor"]) == ("GET", "wmCustomer", "cur")
    assert by_path["/cgi-bin/externalcontact/send_welcome_msg"].body == {
        "welcome_code": "WCODE",
        "text": {"content": "欢迎"},
        "attachments": [{"msgtype": "link", "link": {"url": "u"}}],
    }
    assert by_path["/cgi-bin/externalcontact/mark_tag"].body == {
        "userid": "u1",
        "external_userid": "wmCustomer",
        "add_tag": ["t1"],
        "remove_tag": ["t2"],
    }
    assert by_path["/cgi-bin/externalcontact/get_corp_tag_list"].body == {"tag_id": ["t1"]}
    assert by_path["/cgi-bin/externalcontact/add_msg_template"].body["chat_type"] == "group"
    assert by_path["/cgi-bin/externalcontact/get_groupmsg_task"].body == {"msgid": "gm1", "limit": 100}
    assert by_path["/cgi-bin/externalcontact/get_groupmsg_send_result"].body == {
        "msgid": "gm1",
        "userid": "u1",
        "cursor": "c",
    }
    assert by_path["/cgi-bin/externalcontact/groupchat/list"].body == {
        "status_filter": 0,
        "limit": 100,
        "owner_filter": {"userid_list": ["u1"]},
    }
    assert by_path["/cgi-bin/externalcontact/groupchat/get"].body == {"chat_id": "wrChat", "need_name": 1}
    assert env.fake.count(GETTOKEN) == 1


# ----------------------------------------------------------------------------------------------------
# Group robot


async def test_robot_send(env: Env) -> None:
    payload = {"msgtype": "text", "text": {"content": "早上好"}}
    assert await env.robot().send("robot-key", payload) == {"errcode": 0, "errmsg": "ok"}
    (call,) = env.fake.calls
    assert (call.method, call.path, call.query, call.body) == ("POST", ROBOT, {"key": "robot-key"}, payload)
    assert env.api_calls(ROBOT, "0") == 1


async def test_robot_frequency_limit_retried(env: Env) -> None:
    env.fake.script(ROBOT, {"errcode": 45009, "errmsg": "freq"}, 503)
    await env.robot().send("robot-key", {"msgtype": "text", "text": {"content": "x"}})
    assert env.fake.count(ROBOT) == 3
    assert env.sleeps == [0.2, 0.4]
    assert env.fake.count(GETTOKEN) == 0


async def test_robot_bad_key_not_retried(env: Env) -> None:
    env.fake.script(ROBOT, {"errcode": 93000, "errmsg": "invalid webhook url"})
    with pytest.raises(RobotError) as info:
        await env.robot().send("robot-key", {"msgtype": "text", "text": {"content": "x"}})
    assert info.value.errcode == 93000
    assert "robot-key" not in str(info.value)
    assert env.fake.count(ROBOT) == 1 and env.sleeps == []


async def test_session_with_raise_for_status_keeps_the_status(env: Env) -> None:
    env.fake.script(SEND, 502, 404)
    async with aiohttp.ClientSession(raise_for_status=True) as strict_http:
        client = WeComClient(
            strict_http,
            env.redis,
            env.keys,
            env.base_url,
            TEST_CORP_ID,
            TEST_SECRET,
            metrics=None,
            clock=env.clock,
            sleep=env.sleep,
            jitter=lambda: 1.0,
        )
        with pytest.raises(WeComTransportError) as info:
            await client.kf_send_msg("wmCustomer", "wkAccount", "text", TEXT)
    assert info.value.status == 404 and not info.value.retryable
    assert "tok-1" not in str(info.value)
    assert env.fake.count(SEND) == 2 and env.sleeps == [0.2]


async def test_short_token_lifetimes_keep_half(env: Env) -> None:
    env.fake.expires_in = 400
    client = env.client()
    assert await client.access_token() == "tok-1"
    env.clock.t += 199
    assert await client.access_token() == "tok-1"
    env.clock.t += 2
    assert await client.access_token() == "tok-2"
