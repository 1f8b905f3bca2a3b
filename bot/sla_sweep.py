"""The periodic SLA sweep: each ladder event written once, found within about a second, acted on once.

A pass has two halves:
1. Detect (`detect`): select running clocks with next_deadline ≤ now (the (status, next_deadline) index),
   `evaluate` each, and in one transaction insert their events by unique key (ON CONFLICT DO NOTHING) and
   `advance` the clocks with a conditional UPDATE (same `reached` as read). Only the events this pass wrote
   are acted on.
2. Act (`act`): warned → the assignee is told; breached → a response clock's conversation is reassigned to
   another available agent and the team's leads are told; escalated (level 2+) → the leads are told again.
   Conversations are acted on concurrently (at most `ACTION_CONCURRENCY` at once), each one's events in order.
   Alert cards are paced per member (bot.member_cards): a breach storm becomes digests, not dropped cards.
Then the handoff queue is drained (conversations waiting for an opening or for capacity).

`sweep_once` does both halves and returns when all is done (tests, one-off runs). `run` (the service) detects
every interval and leaves acting and draining to background tasks, so a burst of slow actions (each a WeCom
call or two) never delays finding the next breach: detection lag stays about one interval whatever the load.
An event whose action was cut short by a crash is not acted on again (it is in the log, its card may be missing).

Several processes may sweep at once without a lock on the sweep: two passes that read the same clock both
evaluate it, but the unique event key lets exactly one of them write (and so act on) each event, and the
conditional clock update never moves `reached` backwards. Only the queue drain takes a Redis lock (RedisLock):
two drains at once could each fill the same agent's last free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web

from bot.handoff import HandoffService
from bot.member_cards import CardItem
from bot.storage.handoff_repository import HandoffConversation
from handlers.domain import Clock
from handlers.sla import ClockKind, SlaEvent, SlaEventKind, advance, evaluate

log = structlog.get_logger(__name__)

SWEEP_INTERVAL_S = 1.0  # a breach is found within ~1 s of its due instant (the bar is 2 s)
SWEEP_BATCH = 500
ACTION_CONCURRENCY = 16  # conversations acted on at once (each action: a few statements and WeCom calls)
RESPONSE_CLOCKS = frozenset({ClockKind.FIRST_RESPONSE, ClockKind.NEXT_RESPONSE})
CLOCK_NAMES_ZH = {
    ClockKind.FIRST_RESPONSE: "首次响应",
    ClockKind.NEXT_RESPONSE: "后续响应",
    ClockKind.RESOLUTION: "解决时长",
}

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisLock:
    """A short Redis lock (SET NX PX) released only by its holder; the TTL frees it if the holder dies."""

    def __init__(self, redis: redis_asyncio.Redis, key: str, ttl_ms: int = 10_000) -> None:
        self._redis = redis
        self._key = key
        self._ttl_ms = ttl_ms
        self._token = ""

    async def acquire(self) -> bool:
        token = secrets.token_hex(8)
        if await self._redis.set(self._key, token, nx=True, px=self._ttl_ms):
            self._token = token
            return True
        return False

    async def release(self) -> None:
        if self._token:
            await self._redis.eval(_RELEASE, 1, self._key, self._token)  # type: ignore[misc]
            self._token = ""


@dataclass(slots=True)
class SweepReport:
    due: int = 0
    events: list[SlaEvent] = field(default_factory=list)  # written (and acted on) by this pass
    reassigned: dict[int, int] = field(default_factory=dict)  # conversation → new agent (filled by `act`)
    drained: list[tuple[int, int]] = field(default_factory=list)


class SlaSweeper:
    """Evaluates due SLA clocks and acts on each new event once; `run` repeats it every interval."""

    def __init__(
        self,
        handoff: HandoffService,
        clock: Clock,
        *,
        interval_s: float = SWEEP_INTERVAL_S,
        batch: int = SWEEP_BATCH,
    ) -> None:
        self._handoff = handoff
        self._repo = handoff.sla.repo
        self._clock = clock
        self._interval_s = interval_s
        self._batch = batch
        self.cards = handoff.cards
        self._slots = asyncio.Semaphore(ACTION_CONCURRENCY)

    async def sweep_once(self) -> SweepReport:
        """One whole pass at the clock's now: detect, act, drain, send the alert digests that are due."""
        report = await self.detect()
        await self.act(report)
        report.drained = await self._handoff.drain()
        await self.cards.flush()
        return report

    async def detect(self) -> SweepReport:
        """Write the events of every due clock and advance the clocks, in one transaction; nothing is acted on."""
        now = self._clock.now()
        due = await self._repo.due(now, limit=self._batch)
        report = SweepReport(due=len(due))
        if due:
            changes = [(stored, advance(stored.clock, now), evaluate([stored.clock], now)) for stored in due]
            report.events = await self._repo.sweep(changes)
        return report

    async def act(self, report: SweepReport) -> None:
        """Act on the report's events: conversations concurrently (bounded), each conversation's in order."""
        by_conversation: dict[str, list[SlaEvent]] = {}
        for event in report.events:
            by_conversation.setdefault(event.conversation_id, []).append(event)
        await asyncio.gather(*(self._act_in_order(events, report) for events in by_conversation.values()))

    async def _act_in_order(self, events: list[SlaEvent], report: SweepReport) -> None:
        async with self._slots:
            for event in events:
                try:
                    await self._act(event, report)
                except Exception as exc:  # one conversation's failure must not stop the others
                    log.warning(
                        "sla action failed",
                        conversation_id=event.conversation_id,
                        kind=event.kind.value,
                        error=type(exc).__name__,
                    )

    async def _act(self, event: SlaEvent, report: SweepReport) -> None:
        conversation_id = int(event.conversation_id)
        handoff = self._handoff
        conversation = await handoff.repo.conversation(conversation_id)
        if conversation is None:
            return
        name = CLOCK_NAMES_ZH[event.clock]
        log.info(
            "sla event",
            conversation_id=conversation_id,
            clock=event.clock.value,
            kind=event.kind.value,
            level=event.level,
        )
        if event.kind is SlaEventKind.WARNED:
            left = max(0, round(event.due_at - self._clock.now()))
            extra = f"{name}将在约 {left} 秒后超时"
            assignee = await handoff.repo.agent(conversation.assignee_id) if conversation.assignee_id else None
            if assignee is not None:
                await self.cards.send(assignee, CardItem(conversation_id, "warned", extra))
            else:
                await self._tell_leads(conversation, CardItem(conversation_id, "warned", f"排队中，{extra}"))
        elif event.kind is SlaEventKind.BREACHED:
            moved_to: int | None = None
            if event.clock in RESPONSE_CLOCKS:
                moved_to = await handoff.reassign_after_breach(conversation_id)
            if moved_to is not None:
                report.reassigned[conversation_id] = moved_to
                agent = await handoff.repo.agent(moved_to)
                extra = f"{name}已超时，已改派给 {agent.display_name if agent else moved_to}"
            else:
                extra = f"{name}已超时，暂无可改派的客服"
            await self._tell_leads(conversation, CardItem(conversation_id, "breached", extra))
        elif event.kind is SlaEventKind.ESCALATED:
            extra = f"{name}超时升级（第 {event.level} 级），请尽快处理"
            await self._tell_leads(conversation, CardItem(conversation_id, "escalated", extra, event.level))

    async def _tell_leads(self, conversation: HandoffConversation, card: CardItem) -> None:
        for lead in await self._handoff.leads_of(conversation):
            await self.cards.send(lead, card)

    async def run(self, stop: asyncio.Event) -> None:
        """Detect every interval until stopped; acting, draining and digests run beside it in the background.

        A failed pass is logged and the next one runs. Only one drain and one digest flush run at a time; the
        actions of several passes may overlap (they concern different events). On stop, what was started ends.
        """
        background: set[asyncio.Task[Any]] = set()
        drain: asyncio.Task[Any] | None = None
        flush: asyncio.Task[Any] | None = None

        def start(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
            task = asyncio.create_task(_logged(coro, name), name=name)
            background.add(task)
            task.add_done_callback(background.discard)
            return task

        try:
            while not stop.is_set():
                try:
                    report = await self.detect()
                except Exception as exc:
                    log.warning("sla sweep failed", error=type(exc).__name__)
                else:
                    if report.events:
                        start(self.act(report), "sla-act")
                if drain is None or drain.done():
                    drain = start(self._handoff.drain(), "sla-drain")
                if flush is None or flush.done():
                    flush = start(self.cards.flush(), "sla-cards")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval_s)
        finally:
            await asyncio.gather(*background, return_exceptions=True)


async def _logged(coro: Coroutine[Any, Any, Any], name: str) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("sla background task failed", task=name, error=type(exc).__name__)


def sweep_ctx(
    sweeper: Callable[[], SlaSweeper | None],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup_ctx running the sweep as a task for the app's lifetime (no-op when None)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        built = sweeper()
        if built is None:
            yield
            return
        stop = asyncio.Event()
        task = asyncio.create_task(built.run(stop), name="sla-sweep")
        log.info("sla sweep started")
        yield
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    return ctx
