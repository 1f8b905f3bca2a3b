"""Live inbox updates: Redis pub/sub fan-out across processes, and the SSE endpoint's plumbing.

Anything that changes a conversation (the handoff service: claim, transfer, resolve, new handoffs, SLA events)
calls `publish_console_event`; every process runs one subscriber (started with the first SSE client) that hands
each event to its connected browsers, which re-fetch their (filtered) inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import redis.asyncio as redis_asyncio
import structlog

from bot.console.sessions import ConsoleKeys

log = structlog.get_logger(__name__)

SUBSCRIBER_QUEUE = 256
RESYNC: dict[str, Any] = {"type": "resync"}  # a client missed events: re-fetch everything
CLOSING: dict[str, Any] = {"type": "closing"}


async def publish_console_event(redis: redis_asyncio.Redis, keys_prefix: str, event: dict[str, Any]) -> int:
    """Tell every console process about an inbox change; returns how many processes listen.

    `event` is a small JSON object, e.g. {"type": "claimed", "conversation_id": 12, "team": "售后",
    "status": "open", "assignee_id": 3}. `team` (and `assignee_id` / `previous_assignee_id`) decide who is told;
    without `team` everyone who sees conversations is told. Never put message text in it.
    """
    payload = json.dumps(event, ensure_ascii=False, default=str, separators=(",", ":"))
    return int(await redis.publish(ConsoleKeys(keys_prefix).events(), payload))


class ConsoleEventPublisher:
    """Publishes conversation changes to the consoles; a failure is logged, never raised (the change happened)."""

    def __init__(self, redis: redis_asyncio.Redis, keys_prefix: str) -> None:
        self._redis = redis
        self._prefix = keys_prefix

    async def changed(self, conversation_id: int, kind: str, team: str | None, **detail: object) -> None:
        event = {"type": kind, "conversation_id": conversation_id, "team": team, **detail}
        try:
            await publish_console_event(self._redis, self._prefix, event)
        except Exception as exc:  # a missed live update only delays the inbox refresh
            log.warning("console event not published", kind=kind, error=type(exc).__name__)


class EventHub:
    """One Redis subscription per process, fanned out to in-process queues (one per SSE client)."""

    def __init__(self, redis: redis_asyncio.Redis, keys: ConsoleKeys, *, poll_s: float = 1.0) -> None:
        self._redis = redis
        self._channel = keys.events()
        self._poll_s = poll_s
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def clients(self) -> int:
        return len(self._queues)

    async def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue of events for one client, once the process's subscription is confirmed."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="console-events")
        await asyncio.wait_for(self._ready.wait(), timeout=10)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.discard(queue)

    def _fan_out(self, event: dict[str, Any]) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a stuck client: drop its backlog, tell it to re-fetch
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(RESYNC)

    async def _run(self) -> None:
        backoff = 0.5
        while not self._closed:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
            try:
                await pubsub.subscribe(self._channel)
                while not self._closed:
                    message = await pubsub.get_message(timeout=self._poll_s)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":
                        if self._ready.is_set():  # re-subscribed after an error: events may have been missed
                            self._fan_out(RESYNC)
                        self._ready.set()
                        backoff = 0.5
                        continue
                    if message.get("type") != "message":
                        continue
                    try:
                        event = json.loads(message["data"])
                    except (ValueError, TypeError):
                        log.warning("console_event_unreadable")
                        continue
                    if isinstance(event, dict):
                        self._fan_out(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: retry with backoff; clients re-sync afterwards
                log.warning("console_events_subscription_failed", error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Tell every client to end its stream, and stop the subscription."""
        self._closed = True
        self._fan_out(CLOSING)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
