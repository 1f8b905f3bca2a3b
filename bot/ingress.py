"""`GET|POST /wecom/callback`: verify, decrypt, parse safely, dedupe + enqueue, answer at once (reference §1).

The handlers do no slow work: no database, no WeCom API calls; everything past the queue happens in workers.
Responses to rejected callbacks are a short plain-text reason, never a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

import structlog
from aiohttp import hdrs, web
from aiohttp.streams import StreamReader

from bot.metrics import Metrics
from bot.settings import Settings
from bot.wecom.crypto import (
    RECEIVEID_MISMATCH,
    SIGNATURE_MISMATCH,
    CallbackCrypto,
    CallbackCryptoError,
)
from bot.wecom.parse import (
    CallbackEvent,
    CallbackParseError,
    conversation_key,
    dedupe_key,
    parse_envelope_text,
    parse_plaintext,
)
from handlers.domain import Clock

CALLBACK_PATH = "/wecom/callback"
_READ_CHUNK = 64 * 1024
_MAX_QUERY_CHARS = 8192

log = structlog.get_logger(__name__)


class EnqueuePort(Protocol):
    async def enqueue_once(
        self, dedupe_key: str, conversation_key: str, kind: str, payload: Mapping[str, Any]
    ) -> bool:
        """Queue once per dedupe key; True if queued now, False if it was already seen."""
        ...


@runtime_checkable
class SubmitPort(Protocol):
    def submit_once(
        self, dedupe_key: str, conversation_key: str, kind: str, payload: Mapping[str, Any]
    ) -> asyncio.Future[str | None]:
        """`enqueue_once` as a future: the entry id if queued now, None if the key was already seen."""
        ...


class _Reject(Exception):
    """An early answer: HTTP status, metric outcome and a short reason for the body."""

    def __init__(self, status: int, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome
        self.reason = reason


def parse_query(query_string: str) -> dict[str, str]:
    """Split a raw query string, percent-decoding with `unquote` so a literal '+' stays '+' (reference §1.1).

    Callers pass `request.rel_url.raw_query_string`: aiohttp's `request.query_string` is already partly
    decoded by yarl (a literal '+' becomes a space there, which breaks echostr signatures).

    A parameter given twice is ambiguous and rejected.
    """
    if len(query_string) > _MAX_QUERY_CHARS:
        raise _Reject(400, "rejected_params", "query string too long")
    params: dict[str, str] = {}
    for part in query_string.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote(name)
        if name in params:
            raise _Reject(400, "rejected_params", f"duplicate query parameter {name}")
        params[name] = unquote(value)
    return params


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _debug_enabled() -> bool:
    """Whether `log.debug` would emit; True when the configured logger cannot tell (then it is called)."""
    check = getattr(log, "is_enabled_for", None)
    return check is None or bool(check(logging.DEBUG))


def _text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason, content_type="text/plain")


def _crypto_reject(exc: CallbackCryptoError) -> _Reject:
    if exc.code == SIGNATURE_MISMATCH:
        return _Reject(401, "rejected_signature", "signature mismatch")
    if exc.code == RECEIVEID_MISMATCH:
        return _Reject(403, "rejected_receiveid", "receiveid mismatch")
    return _Reject(400, "rejected_decrypt", "cannot decrypt payload")


class CallbackIngress:
    """The two callback handlers, bound to their collaborators."""

    def __init__(
        self,
        crypto: CallbackCrypto,
        enqueue: EnqueuePort,
        metrics: Metrics,
        settings: Settings,
        clock: Clock,
    ) -> None:
        self._crypto = crypto
        self._queue = enqueue
        # The real queue hands back a future the handler awaits directly (see `InboundQueue.submit_once`);
        # any other port (test doubles) goes through `enqueue_once`.
        self._submit: SubmitPort | None = enqueue if isinstance(enqueue, SubmitPort) else None
        self._observe_ack = metrics.ack_latency.observe
        self._metrics = metrics
        self._accepted = metrics.callbacks.labels("accepted")
        self._duplicate = metrics.callbacks.labels("duplicate")
        self._max_body = settings.callback_max_body_bytes
        self._max_skew = settings.callback_max_clock_skew_s
        self._clock = clock
        # Asked once: through structlog's lazy proxy the question costs as much as a parse step per callback.
        self._debug = _debug_enabled()

    def routes(self, path: str = CALLBACK_PATH) -> list[web.RouteDef]:
        return [web.get(path, self.handle_get, allow_head=False), web.post(path, self.handle_post)]

    def _rejected(self, request: web.Request, rej: _Reject) -> web.Response:
        self._metrics.callbacks.labels(rej.outcome).inc()
        log.info("callback_rejected", outcome=rej.outcome, status=rej.status, method=request.method)
        response = _text(rej.status, rej.reason)
        if rej.status == 413:
            response.force_close()
        return response

    async def _timed(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> web.Response:
        started = time.perf_counter()
        try:
            try:
                return await handler(request)
            except _Reject as rej:
                return self._rejected(request, rej)
        finally:
            self._metrics.ack_latency.observe(time.perf_counter() - started)

    async def handle_get(self, request: web.Request) -> web.Response:
        return await self._timed(request, self._verify_url)

    async def handle_post(self, request: web.Request) -> web.Response:
        # The hot path is this one coroutine from request to answer: every coroutine level between the handler
        # and the queue's future is resumed again when Redis answers, so helpers here are plain functions.
        started = time.perf_counter()
        try:
            declared = request.content_length
            if declared is not None and declared > self._max_body:
                raise _Reject(413, "rejected_too_large", "body too large")
            signature, timestamp, nonce = self._post_params(request)
            content = request.content
            limit = min(_READ_CHUNK, self._max_body + 1)
            # Usually the whole body came with the headers: take it without a read coroutine.
            first = content.read_nowait(limit) if content.is_eof() else await content.read(limit)
            if declared is not None and len(first) == declared and content.at_eof():
                body = first  # the usual case: the whole declared body in one read, nothing after it
            else:
                body = await self._read_rest(content, first)
            key, conversation, kind, payload, event = self._accept(signature, timestamp, nonce, body)
            try:
                if self._submit is not None:
                    queued = await self._submit.submit_once(key, conversation, kind, payload) is not None
                else:
                    queued = await self._queue.enqueue_once(key, conversation, kind, payload)
            except Exception as exc:
                self._metrics.callbacks.labels("enqueue_failed").inc()
                log.error(
                    "callback_enqueue_failed",
                    outcome="enqueue_failed",
                    dedupe=_key_hash(key),
                    error=type(exc).__name__,
                )
                return _text(503, "queue unavailable, retry later")
            # Accepted callbacks log at DEBUG: a line each at INFO would cost more CPU than the rest of the hot
            # path, and the counter has the numbers. Duplicates (WeCom retrying) are worth a line.
            (self._accepted if queued else self._duplicate).inc()
            if queued and not self._debug:
                return web.Response(status=200)  # the DEBUG line would be dropped: skip building it
            (log.debug if queued else log.info)(
                "callback_received",
                outcome="accepted" if queued else "duplicate",
                dedupe=_key_hash(key),
                kind=kind,
                callback_kind=event.kind,
                msgtype=event.msgtype,
            )
            return web.Response(status=200)
        except _Reject as rej:
            return self._rejected(request, rej)
        finally:
            self._observe_ack(time.perf_counter() - started)

    async def _verify_url(self, request: web.Request) -> web.Response:
        params = parse_query(request.rel_url.raw_query_string)
        signature, timestamp, nonce, echostr = (
            params.get(name, "") for name in ("msg_signature", "timestamp", "nonce", "echostr")
        )
        if not (signature and timestamp and nonce and echostr):
            raise _Reject(400, "rejected_params", "missing msg_signature, timestamp, nonce or echostr")
        try:
            plaintext = self._crypto.verify_and_decrypt(signature, timestamp, nonce, echostr)
        except CallbackCryptoError as exc:
            raise _crypto_reject(exc) from None
        self._metrics.callbacks.labels("verified").inc()
        log.info("callback_url_verified", outcome="verified")
        return web.Response(status=200, body=plaintext.encode("utf-8"), content_type="text/plain")

    def _post_params(self, request: web.Request) -> tuple[str, str, str]:
        params = parse_query(request.rel_url.raw_query_string)
        signature, timestamp, nonce = (
            params.get(name, "") for name in ("msg_signature", "timestamp", "nonce")
        )
        if not (signature and timestamp and nonce):
            raise _Reject(400, "rejected_params", "missing msg_signature, timestamp or nonce")
        if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
            raise _Reject(400, "rejected_params", "timestamp is not an integer")
        if abs(self._clock.now() - int(timestamp)) > self._max_skew:
            raise _Reject(400, "rejected_stale", "timestamp outside the allowed clock skew")
        return signature, timestamp, nonce

    async def _read_rest(self, content: StreamReader, first: bytes) -> bytes:
        """The rest of a body whose first read (`first`) did not hold all of it; at most max_body bytes.

        Stops as soon as the limit is crossed.
        """
        if len(first) > self._max_body:
            raise _Reject(413, "rejected_too_large", "body too large")
        chunks: list[bytes] = [first] if first else []
        total = len(first)
        while first:
            chunk = await content.read(min(_READ_CHUNK, self._max_body + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > self._max_body:
                raise _Reject(413, "rejected_too_large", "body too large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _accept(
        self, signature: str, timestamp: str, nonce: str, body: bytes
    ) -> tuple[str, str, str, dict[str, Any], CallbackEvent]:
        """Decode, verify, decrypt and parse a POSTed callback: (dedupe key, conversation, kind, payload, event)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject(400, "rejected_encoding", "body is not UTF-8") from None
        try:
            encrypted = parse_envelope_text(text)
        except CallbackParseError as exc:
            raise _Reject(400, "rejected_xml", exc.reason) from None
        try:
            plaintext = self._crypto.verify_and_decrypt(signature, timestamp, nonce, encrypted)
        except CallbackCryptoError as exc:
            raise _crypto_reject(exc) from None
        try:
            event = parse_plaintext(plaintext)
        except CallbackParseError as exc:
            raise _Reject(400, "rejected_xml", exc.reason) from None
        received_at = self._clock.now()
        payload: dict[str, Any]
        if event.is_kf_notification:
            kind = "kf_pull"
            payload = {
                "open_kfid": event.get_text("OpenKfId") or "",
                "token": event.get_text("Token") or "",
                "received_at": received_at,
            }
        else:
            kind = "callback"
            payload = {"xml": plaintext, "received_at": received_at}
        return dedupe_key(event), conversation_key(event), kind, payload, event


def callback_routes(
    crypto: CallbackCrypto,
    enqueue: EnqueuePort,
    metrics: Metrics,
    settings: Settings,
    clock: Clock,
) -> list[web.RouteDef]:
    """Routes for `GET|POST /wecom/callback`; add them with `app.add_routes(...)`."""
    return CallbackIngress(crypto, enqueue, metrics, settings, clock).routes()


def install_callback_fast_path(runner: web.AppRunner, path: str = CALLBACK_PATH) -> bool:
    """Answer `POST <path>` past aiohttp's router and middleware chain; False (nothing changed) when unsafe.

    Call after `runner.setup()` and before any site starts. The handler is the one the router would pick, so
    the callback's behaviour is the same: only the per-request routing work is skipped (resolving the URL,
    building match info, the middleware wrapper that every request pays once any sub-application has
    middlewares). That is safe only while the root application has no middlewares of its own, since those
    would run for the callback too; with any, the fast path stays off. Requests with `Expect` (aiohttp answers
    "100 Continue" in its routing step) and everything else take the normal path.
    """
    server = runner.server
    app = runner.app
    if server is None or len(app.middlewares) > 0:
        return False
    route = next(
        (
            r
            for r in app.router.routes()
            if r.method == hdrs.METH_POST and r.resource is not None and r.resource.canonical == path
        ),
        None,
    )
    ingress = getattr(route.handler, "__self__", None) if route is not None else None
    if route is None or not isinstance(ingress, CallbackIngress):
        return False
    # One frozen match info for every fast-path request, as the router would build it: `request.app` and
    # `request.match_info` work in the handler, and response-prepare signals still run.
    match_info = web.UrlMappingMatchInfo({}, route)
    match_info.add_app(app)
    match_info.freeze()
    handle_post = ingress.handle_post
    routed = server.request_handler

    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain function, not a coroutine: it returns the handler's coroutine, adding no level of its own.
        if (
            request.method == hdrs.METH_POST
            and request.rel_url.raw_path == path
            and isinstance(request, web.Request)
            and hdrs.EXPECT not in request.headers
        ):
            request._match_info = match_info
            return handle_post(request)
        return routed(request)

    server.request_handler = dispatch
    return True
