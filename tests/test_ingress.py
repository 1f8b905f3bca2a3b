"""`GET|POST /wecom/callback` through a real aiohttp server.

Callbacks are encrypted and signed as WeCom does and queued into the real InboundQueue, on embedded fakeredis
and on real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from structlog.testing import capture_logs

from bot.ingress import CALLBACK_PATH, callback_routes, install_callback_fast_path, parse_query
from bot.metrics import Metrics
from bot.queue import InboundQueue
from bot.redis_conn import create_redis
from bot.redis_keys import RedisKeys
from bot.settings import Settings
from bot.wecom.crypto import CallbackCrypto
from tests.conftest import TEST_AES_KEY, TEST_AGENT_ID, TEST_CORP_ID, TEST_TOKEN, Backend, make_settings

NOW = 1_700_000_000
MAX_BODY = 8192
NONCE = "1372623149"

V1_TOKEN = "QDG6eK"
V1_CORP = "wx5823bf96d3bd56c7"
V2_RAW_QUERY = (
    "msg_signature=5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3&timestamp=1409659589&nonce=263014780"
    "&echostr=P9nAzCzyDtyTWESHep1vC5X9xho%2FqYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp%2B4RPcs8TgAE7OaBO%2BFZXvnaqQ%3D%3D"
)
V2_ECHO_PLAINTEXT = "1616140317555161061"

AClient = TestClient[web.Request, web.Application]


class FixedClock:
    def __init__(self, now: float) -> None:
        self.value = now

    def now(self) -> float:
        return self.value


def text_xml(content: str = "hello", msg_id: str = "4561255354251345929", sender: str = "zhangsan") -> str:
    return (
        f"<xml><ToUserName><![CDATA[{TEST_CORP_ID}]]></ToUserName>"
        f"<FromUserName><![CDATA[{sender}]]></FromUserName><CreateTime>{NOW}</CreateTime>"
        f"<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{content}]]></Content>"
        f"<MsgId>{msg_id}</MsgId><AgentID>{TEST_AGENT_ID}</AgentID></xml>"
    )


def envelope(encrypted: str) -> bytes:
    return (
        f"<xml><ToUserName><![CDATA[{TEST_CORP_ID}]]></ToUserName>"
        f"<Encrypt><![CDATA[{encrypted}]]></Encrypt><AgentID><![CDATA[{TEST_AGENT_ID}]]></AgentID></xml>"
    ).encode()


def wecom_crypto(receive_id: str = TEST_CORP_ID) -> CallbackCrypto:
    """What WeCom holds: the same token and key, encrypting for `receive_id`."""
    return CallbackCrypto(TEST_TOKEN, TEST_AES_KEY, receive_id)


def query(signature: str, timestamp: str = str(NOW), nonce: str = NONCE) -> str:
    return f"msg_signature={signature}&timestamp={timestamp}&nonce={nonce}"


def signed(encrypted: str, timestamp: str = str(NOW), nonce: str = NONCE) -> tuple[str, bytes]:
    """(query string, body) for an Encrypt value, signed with the real token."""
    return query(wecom_crypto().sign(timestamp, nonce, encrypted), timestamp, nonce), envelope(encrypted)


def callback(plaintext: str, receive_id: str = TEST_CORP_ID) -> tuple[str, bytes]:
    """Encrypt and sign a plaintext exactly as WeCom does."""
    encrypted = wecom_crypto(receive_id).encrypt(plaintext)
    return signed(encrypted)


def raw_aes_encrypt(plain: bytes) -> str:
    """AES-256-CBC with the callback key, no padding added: for hand-built broken ciphertexts."""
    key = base64.b64decode(TEST_AES_KEY + "=")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()


@dataclass
class Harness:
    client: AClient
    queue: InboundQueue
    metrics: Metrics
    clock: FixedClock
    settings: Settings

    async def post(self, query_string: str, body: bytes, **kwargs: Any) -> tuple[int, str]:
        resp = await self.client.post(f"{CALLBACK_PATH}?{query_string}", data=body, **kwargs)
        return resp.status, await resp.text()

    async def entries(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for partition in range(self.queue.partitions):
            stored: Any = await self.queue.redis.xrange(self.queue.stream(partition))
            for entry_id, raw in stored:
                fields: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
                fields["payload"] = json.loads(fields["payload"])
                fields["id"] = entry_id.decode()
                fields["partition"] = partition
                out.append(fields)
        return out

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("wecom_callbacks_total", {"outcome": outcome})
        return value or 0.0

    def acks_observed(self) -> float:
        return self.metrics.registry.get_sample_value("wecom_callback_ack_seconds_count") or 0.0


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture(params=["router", "fast-path"])
def dispatch(request: pytest.FixtureRequest) -> str:
    """Every HTTP test runs through aiohttp's router and through the fast path `wecom-bot serve` installs."""
    return str(request.param)


@pytest.fixture
async def make_harness(
    aiohttp_client: Callable[[web.Application], Awaitable[AClient]], backend: Backend, dispatch: str
) -> AsyncIterator[MakeHarness]:
    redis_clients: list[Any] = []

    async def make(crypto: CallbackCrypto | None = None, enqueue: Any = None) -> Harness:
        settings = make_settings(backend, callback_max_body_bytes=MAX_BODY, callback_max_clock_skew_s=300)
        redis = create_redis(settings)
        redis_clients.append(redis)
        metrics = Metrics()
        queue = InboundQueue(
            redis,
            RedisKeys(settings.redis_key_prefix),
            settings.queue_partitions,
            settings.dedupe_ttl_s,
            metrics,
        )
        clock = FixedClock(float(NOW))
        app = web.Application()
        app.add_routes(
            callback_routes(
                crypto
                or CallbackCrypto(settings.wecom_token, settings.wecom_aes_key, settings.wecom_corp_id),
                enqueue or queue,
                metrics,
                settings,
                clock,
            )
        )
        client = await aiohttp_client(app)
        if dispatch == "fast-path":
            runner = client.server.runner
            assert isinstance(runner, web.AppRunner)
            assert install_callback_fast_path(runner)
        return Harness(client, queue, metrics, clock, settings)

    yield make
    for redis in redis_clients:
        await redis.aclose()


@pytest.fixture
async def h(make_harness: MakeHarness) -> Harness:
    return await make_harness()


def assert_clean_error(body: str) -> None:
    assert body
    assert "Traceback" not in body
    assert "Error" not in body
    assert len(body) < 120


# --- the happy path -------------------------------------------------------------------------------


async def test_valid_message_is_queued_and_acked_with_empty_body(h: Harness) -> None:
    plaintext = text_xml("你好")
    status, body = await h.post(*callback(plaintext))
    assert (status, body) == (200, "")
    [entry] = await h.entries()
    assert entry["kind"] == "callback"
    assert entry["payload"] == {"xml": plaintext, "received_at": float(NOW)}
    assert entry["dedupe"] == "app-msg:4561255354251345929"
    assert entry["conversation"] == f"app:{TEST_AGENT_ID}:zhangsan"
    assert entry["partition"] == h.queue.partition_for(f"app:{TEST_AGENT_ID}:zhangsan")
    assert h.count("accepted") == 1
    assert h.acks_observed() == 1


async def test_kf_notification_is_queued_as_kf_pull(h: Harness) -> None:
    plaintext = (
        f"<xml><ToUserName><![CDATA[{TEST_CORP_ID}]]></ToUserName><CreateTime>{NOW}</CreateTime>"
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
        "<Token><![CDATA[ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR]]></Token>"
        "<OpenKfId><![CDATA[wkxxxxxxx]]></OpenKfId></xml>"
    )
    assert (await h.post(*callback(plaintext))) == (200, "")
    [entry] = await h.entries()
    assert entry["kind"] == "kf_pull"
    assert entry["conversation"] == "kf-pull:wkxxxxxxx"
    assert entry["payload"] == {
        "open_kfid": "wkxxxxxxx",
        "token": "ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR",
        "received_at": float(NOW),
    }


async def test_contact_event_is_queued_under_its_contact_pair(h: Harness) -> None:
    plaintext = (
        f"<xml><ToUserName><![CDATA[{TEST_CORP_ID}]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>"
        f"<CreateTime>{NOW}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
        "<Event><![CDATA[change_external_contact]]></Event><ChangeType><![CDATA[add_external_contact]]></ChangeType>"
        "<UserID><![CDATA[zhangsan]]></UserID><ExternalUserID><![CDATA[wmEXT]]></ExternalUserID>"
        "<WelcomeCode><![CDATA[WELCOMECODE]]></WelcomeCode></xml>"
    )
    assert (await h.post(*callback(plaintext))) == (200, "")
    [entry] = await h.entries()
    assert entry["kind"] == "callback"
    assert entry["conversation"] == "contact:zhangsan:wmEXT"
    assert entry["dedupe"] == f"sys-event:change_external_contact:add_external_contact:zhangsan:wmEXT:{NOW}"


@pytest.mark.parametrize(
    "plaintext",
    [
        pytest.param(
            f"<xml><ToUserName>{TEST_CORP_ID}</ToUserName><FromUserName>zhangsan</FromUserName>"
            f"<CreateTime>{NOW}</CreateTime><MsgType>hologram</MsgType><MsgId>77</MsgId>"
            f"<AgentID>{TEST_AGENT_ID}</AgentID></xml>",
            id="unknown-msgtype",
        ),
        pytest.param(
            f"<xml><ToUserName>{TEST_CORP_ID}</ToUserName><FromUserName>zhangsan</FromUserName>"
            f"<CreateTime>{NOW}</CreateTime><MsgType>event</MsgType><Event>teleport</Event>"
            f"<AgentID>{TEST_AGENT_ID}</AgentID></xml>",
            id="unknown-event",
        ),
    ],
)
async def test_unknown_types_are_acked_and_queued(h: Harness, plaintext: str) -> None:
    assert (await h.post(*callback(plaintext))) == (200, "")
    [entry] = await h.entries()
    assert entry["kind"] == "callback"
    assert entry["payload"]["xml"] == plaintext


async def test_same_message_three_times_concurrently_and_once_later_is_queued_once(h: Harness) -> None:
    query_string, body = callback(text_xml())
    results = await asyncio.gather(*(h.post(query_string, body) for _ in range(3)))
    assert results == [(200, "")] * 3
    assert (await h.post(query_string, body)) == (200, "")
    entries = await h.entries()
    assert len(entries) == 1
    assert h.count("accepted") == 1
    assert h.count("duplicate") == 3


async def test_retry_with_fresh_encryption_and_nonce_is_still_one_entry(h: Harness) -> None:
    plaintext = text_xml()
    assert (await h.post(*callback(plaintext))) == (200, "")
    encrypted = wecom_crypto().encrypt(plaintext)
    assert (await h.post(*signed(encrypted, timestamp=str(NOW + 5), nonce="999"))) == (200, "")
    assert len(await h.entries()) == 1


async def test_logs_carry_no_secrets_or_message_text(h: Harness) -> None:
    with capture_logs() as logs:
        assert (await h.post(*callback(text_xml("secret customer words")))) == (200, "")
    dumped = json.dumps(logs, default=str)
    assert logs and logs[-1]["outcome"] == "accepted"
    for forbidden in ("secret customer words", TEST_TOKEN, TEST_AES_KEY, "4561255354251345929", "<xml>"):
        assert forbidden not in dumped


# --- rejections -----------------------------------------------------------------------------------


async def test_wrong_signature_is_401_and_nothing_queued(h: Harness) -> None:
    encrypted = wecom_crypto().encrypt(text_xml())
    status, body = await h.post(query("0" * 40), envelope(encrypted))
    assert status == 401
    assert_clean_error(body)
    assert await h.entries() == []
    assert h.count("rejected_signature") == 1


async def test_signature_from_another_token_is_rejected(h: Harness) -> None:
    encrypted = wecom_crypto().encrypt(text_xml())
    other = CallbackCrypto("othertoken", TEST_AES_KEY, TEST_CORP_ID)
    status, _ = await h.post(query(other.sign(str(NOW), NONCE, encrypted)), envelope(encrypted))
    assert status == 401
    assert await h.entries() == []


@pytest.mark.parametrize("missing", ["msg_signature", "timestamp", "nonce"])
async def test_missing_query_param_is_400(h: Harness, missing: str) -> None:
    query_string, body = callback(text_xml())
    kept = "&".join(p for p in query_string.split("&") if not p.startswith(f"{missing}="))
    status, text = await h.post(kept, body)
    assert status == 400
    assert_clean_error(text)
    assert await h.entries() == []


@pytest.mark.parametrize(
    "timestamp", [str(NOW - 301), str(NOW + 301), "1700000000.5", "-1700000000", "abc", "9" * 40]
)
async def test_stale_or_invalid_timestamp_is_400(h: Harness, timestamp: str) -> None:
    encrypted = wecom_crypto().encrypt(text_xml())
    status, text = await h.post(*signed(encrypted, timestamp=timestamp))
    assert status == 400
    assert_clean_error(text)
    assert await h.entries() == []


async def test_duplicated_query_param_is_400(h: Harness) -> None:
    query_string, body = callback(text_xml())
    status, _ = await h.post(query_string + "&nonce=other", body)
    assert status == 400
    assert await h.entries() == []


async def test_wrong_corp_in_plaintext_is_403(h: Harness) -> None:
    status, body = await h.post(*callback(text_xml(), receive_id="wwsomeothercorp01"))
    assert status == 403
    assert_clean_error(body)
    assert await h.entries() == []
    assert h.count("rejected_receiveid") == 1


async def test_bad_base64_is_400(h: Harness) -> None:
    status, body = await h.post(*signed("this is not base64!!!"))
    assert status == 400
    assert_clean_error(body)
    assert await h.entries() == []


async def test_bad_padding_is_400(h: Harness) -> None:
    msg = text_xml().encode()
    plain = b"0123456789abcdef" + struct.pack(">I", len(msg)) + msg + TEST_CORP_ID.encode()
    plain += b"\x00" * (32 - len(plain) % 32)  # pad byte 0: outside 1..32
    status, body = await h.post(*signed(raw_aes_encrypt(plain)))
    assert status == 400
    assert_clean_error(body)
    assert await h.entries() == []


async def test_inconsistent_padding_is_400(h: Harness) -> None:
    msg = text_xml().encode()
    plain = b"0123456789abcdef" + struct.pack(">I", len(msg)) + msg + TEST_CORP_ID.encode()
    n = 32 - len(plain) % 32
    plain += b"\x07" * (n - 1) + bytes([n if n != 7 else 8])  # last byte says n, the others disagree
    status, _ = await h.post(*signed(raw_aes_encrypt(plain)))
    assert status == 400


@pytest.mark.parametrize("cut", [5, 16, 32])
async def test_truncated_ciphertext_is_400(h: Harness, cut: int) -> None:
    encrypted = wecom_crypto().encrypt(text_xml(), random_prefix=b"1234567890123456")
    raw = base64.b64decode(encrypted)
    truncated = base64.b64encode(raw[:-cut]).decode()
    status, body = await h.post(*signed(truncated))
    assert status == 400
    assert_clean_error(body)
    assert await h.entries() == []


async def test_truncated_base64_text_is_400(h: Harness) -> None:
    encrypted = wecom_crypto().encrypt(text_xml())
    status, _ = await h.post(*signed(encrypted[:-3]))
    assert status == 400
    assert await h.entries() == []


async def test_length_field_beyond_plaintext_is_400(h: Harness) -> None:
    msg = b"<xml/>"
    plain = b"0123456789abcdef" + struct.pack(">I", 10_000) + msg + TEST_CORP_ID.encode()
    n = 32 - len(plain) % 32
    plain += bytes([n]) * n
    status, _ = await h.post(*signed(raw_aes_encrypt(plain)))
    assert status == 400


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">'
    '<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>'
)
EXTERNAL_ENTITY = '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<xml><Encrypt>abc</Encrypt>", id="unclosed"),
        pytest.param(b"plain text", id="not-xml"),
        pytest.param(b"", id="empty"),
        pytest.param(b"<xml><ToUserName>x</ToUserName></xml>", id="no-encrypt"),
        pytest.param((BILLION_LAUGHS + "<xml><Encrypt>&lol4;</Encrypt></xml>").encode(), id="billion-laughs"),
        pytest.param(
            (EXTERNAL_ENTITY + "<xml><Encrypt>&xxe;</Encrypt></xml>").encode(), id="external-entity"
        ),
        pytest.param(b"<!DOCTYPE xml><xml><Encrypt>QUJD</Encrypt></xml>", id="bare-doctype"),
    ],
)
async def test_hostile_or_malformed_envelope_is_400(h: Harness, body: bytes) -> None:
    status, text = await h.post(query("0" * 40), body)
    assert status == 400
    assert_clean_error(text)
    assert "lol" not in text and "root:" not in text
    assert await h.entries() == []
    assert h.count("rejected_xml") == 1


@pytest.mark.parametrize(
    "plaintext",
    [
        pytest.param(
            BILLION_LAUGHS + f"<xml><MsgType>text</MsgType><CreateTime>{NOW}</CreateTime>"
            "<Content>&lol4;</Content><MsgId>1</MsgId></xml>",
            id="billion-laughs",
        ),
        pytest.param(
            EXTERNAL_ENTITY + f"<xml><MsgType>text</MsgType><CreateTime>{NOW}</CreateTime>"
            "<Content>&xxe;</Content><MsgId>1</MsgId></xml>",
            id="external-entity",
        ),
        pytest.param(f"<xml><MsgType>text</MsgType><CreateTime>{NOW}</CreateTime>", id="malformed"),
        pytest.param("hello, not xml", id="not-xml"),
    ],
)
async def test_hostile_or_malformed_encrypted_plaintext_is_400(h: Harness, plaintext: str) -> None:
    status, text = await h.post(*callback(plaintext))
    assert status == 400
    assert_clean_error(text)
    assert "lol" not in text and "root:" not in text
    assert await h.entries() == []


async def test_body_over_limit_is_413(h: Harness) -> None:
    query_string, _ = callback(text_xml())
    status, text = await h.post(query_string, b"<xml>" + b"a" * MAX_BODY + b"</xml>")
    assert status == 413
    assert_clean_error(text)
    assert await h.entries() == []
    assert h.count("rejected_too_large") == 1


async def test_chunked_body_over_limit_is_413(h: Harness) -> None:
    query_string, _ = callback(text_xml())

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"a" * (MAX_BODY // 2)

    status, _ = await h.post(query_string, chunks())  # type: ignore[arg-type]
    assert status == 413
    assert await h.entries() == []


async def test_body_exactly_at_limit_is_read(h: Harness) -> None:
    query_string, body = callback(text_xml())
    padded = body.replace(b"</xml>", b" " * (MAX_BODY - len(body)) + b"</xml>")
    assert len(padded) == MAX_BODY
    assert (await h.post(query_string, padded)) == (200, "")


async def test_non_utf8_body_is_400(h: Harness) -> None:
    query_string, body = callback(text_xml())
    status, text = await h.post(query_string, body.replace(b"<xml>", b"<xml>\xff\xfe", 1))
    assert status == 400
    assert_clean_error(text)
    assert await h.entries() == []
    assert h.count("rejected_encoding") == 1


class BrokenQueue:
    async def enqueue_once(
        self, dedupe_key: str, conversation_key: str, kind: str, payload: Mapping[str, Any]
    ) -> bool:
        raise ConnectionError("redis down")


async def test_enqueue_failure_is_503_so_wecom_retries(make_harness: MakeHarness) -> None:
    h = await make_harness(enqueue=BrokenQueue())
    status, text = await h.post(*callback(text_xml()))
    assert status == 503
    assert_clean_error(text)
    assert "redis" not in text
    assert h.count("enqueue_failed") == 1


# --- URL verification (GET) -----------------------------------------------------------------------


async def raw_get(client: AClient, raw_query: str) -> tuple[int, bytes, str]:
    """Send the request line byte-for-byte as WeCom does; no client-side URL normalisation."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    request = f"GET {CALLBACK_PATH}?{raw_query} HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    content_type = next(
        (line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("content-type:")), ""
    )
    return status, body, content_type


async def test_echostr_official_v2_vector(make_harness: MakeHarness) -> None:
    h = await make_harness(crypto=CallbackCrypto(V1_TOKEN, TEST_AES_KEY, V1_CORP))
    status, body, content_type = await raw_get(h.client, V2_RAW_QUERY)
    assert status == 200
    assert body == V2_ECHO_PLAINTEXT.encode()
    assert content_type.startswith("text/plain")
    assert h.count("verified") == 1


async def test_echostr_with_literal_plus_is_not_turned_into_space(make_harness: MakeHarness) -> None:
    h = await make_harness(crypto=CallbackCrypto(V1_TOKEN, TEST_AES_KEY, V1_CORP))
    literal = V2_RAW_QUERY.replace("%2F", "/").replace("%2B", "+")
    status, body, _ = await raw_get(h.client, literal)
    assert (status, body) == (200, V2_ECHO_PLAINTEXT.encode())


async def test_echostr_round_trip_with_test_credentials(h: Harness) -> None:
    echostr = wecom_crypto().encrypt("8437503720393716")
    signature = wecom_crypto().sign(str(NOW), NONCE, echostr)
    resp = await h.client.get(
        CALLBACK_PATH,
        params={"msg_signature": signature, "timestamp": str(NOW), "nonce": NONCE, "echostr": echostr},
    )
    assert resp.status == 200
    assert await resp.read() == b"8437503720393716"
    assert await h.entries() == []


@pytest.mark.parametrize("missing", ["msg_signature", "timestamp", "nonce", "echostr"])
async def test_echostr_missing_param_is_400(make_harness: MakeHarness, missing: str) -> None:
    h = await make_harness(crypto=CallbackCrypto(V1_TOKEN, TEST_AES_KEY, V1_CORP))
    kept = "&".join(p for p in V2_RAW_QUERY.split("&") if not p.startswith(f"{missing}="))
    status, body, _ = await raw_get(h.client, kept)
    assert status == 400
    assert_clean_error(body.decode())


async def test_echostr_wrong_signature_is_401(make_harness: MakeHarness) -> None:
    h = await make_harness(crypto=CallbackCrypto(V1_TOKEN, TEST_AES_KEY, V1_CORP))
    status, body, _ = await raw_get(h.client, V2_RAW_QUERY.replace("5c45ff5e", "00000000"))
    assert status == 401
    assert V2_ECHO_PLAINTEXT.encode() not in body


async def test_echostr_for_another_corp_is_403(h: Harness) -> None:
    echostr = wecom_crypto("wwsomeothercorp01").encrypt("123")
    signature = wecom_crypto().sign(str(NOW), NONCE, echostr)
    resp = await h.client.get(
        CALLBACK_PATH,
        params={"msg_signature": signature, "timestamp": str(NOW), "nonce": NONCE, "echostr": echostr},
    )
    assert resp.status == 403


# --- query parsing --------------------------------------------------------------------------------


async def test_expect_100_continue_is_answered_and_queued(h: Harness) -> None:
    query_string, body = callback(text_xml())
    assert (await h.post(query_string, body, expect100=True)) == (200, "")
    assert len(await h.entries()) == 1


async def test_other_methods_and_paths_still_route(h: Harness) -> None:
    query_string, body = callback(text_xml())
    assert (await h.client.put(f"{CALLBACK_PATH}?{query_string}", data=body)).status == 405
    assert (await h.client.post(f"{CALLBACK_PATH}/?{query_string}", data=body)).status == 404
    assert await h.entries() == []


async def test_fast_path_stays_off_when_the_root_app_has_middlewares(
    aiohttp_client: Callable[[web.Application], Awaitable[AClient]], backend: Backend
) -> None:
    """A root middleware must see the callback too, so the fast path refuses and the router keeps serving."""
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    settings = make_settings(backend, callback_max_body_bytes=MAX_BODY, callback_max_clock_skew_s=300)
    redis = create_redis(settings)
    try:
        queue = InboundQueue(redis, RedisKeys(settings.redis_key_prefix), 1, 60)
        crypto = CallbackCrypto(settings.wecom_token, settings.wecom_aes_key, settings.wecom_corp_id)
        app = web.Application(middlewares=[record])
        app.add_routes(callback_routes(crypto, queue, Metrics(), settings, FixedClock(float(NOW))))
        client = await aiohttp_client(app)
        runner = client.server.runner
        assert isinstance(runner, web.AppRunner)
        assert not install_callback_fast_path(runner)
        query_string, body = callback(text_xml())
        resp = await client.post(f"{CALLBACK_PATH}?{query_string}", data=body)
        assert resp.status == 200
        assert seen == [CALLBACK_PATH]
    finally:
        await redis.aclose()


def test_parse_query_uses_unquote_not_unquote_plus() -> None:
    assert parse_query("a=x+y%2Bz%3D&b=&c") == {"a": "x+y+z=", "b": "", "c": ""}
