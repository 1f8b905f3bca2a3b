"""The periodic SLA sweep: one pass over due clocks, each ladder event written once and acted on once.

One pass (`SlaSweeper.sweep_once`):
1. select running clocks with next_deadline ≤ now (the (status, next_deadline) index);
2. `evaluate` each → insert its events by their unique key (ON CONFLICT DO NOTHING): only the events this pass
   wrote are acted on → `advance` the clock with a conditional UPDATE (same `reached` as read);
3. act: warned → the assignee is told; breached → a response clock's conversation is reassigned to another
   available agent and the team's leads are told; escalated (level 2+) → the leads are told again;
4. drain the handoff queue (conversations waiting for an opening or for capacity).

Several processes may sweep at once without a lock on the sweep: two passes that read the same clock both
evaluate it, but the unique event key lets exactly one of them write (and so act on) each event, and the
conditional clock update never moves `reached` backwards. Only the queue drain takes a Redis lock (RedisLock):
two drains at once could each fill the same agent's last free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web

from bot.handoff import HandoffService
from handlers.domain import Clock
from handlers.sla import ClockKind, SlaEvent, SlaEventKind, advance, evaluate

log = structlog.get_logger(__name__)

SWEEP_INTERVAL_S = 1.0  # a breach is acted on within ~1 s of its due instant (the bar is 2 s)
SWEEP_BATCH = 500
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
    reassigned: dict[int, int] = field(default_factory=dict)  # conversation → new agent
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

    async def sweep_once(self) -> SweepReport:
        """One pass at the clock's now."""
        now = self._clock.now()
        report = SweepReport()
        due = await self._repo.due(now, limit=self._batch)
        report.due = len(due)
        for stored in due:
            events = evaluate([stored.clock], now)
            written = await self._repo.record_events(events)
            await self._repo.advance(stored, advance(stored.clock, now))
            for event in written:
                report.events.append(event)
                try:
                    await self._act(event, report)
                except Exception as exc:  # one conversation's failure must not stop the sweep
                    log.warning(
                        "sla action failed",
                        conversation_id=event.conversation_id,
                        kind=event.kind.value,
                        error=type(exc).__name__,
                    )
        report.drained = await self._handoff.drain()
        return report

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
                await handoff.notify_agent(assignee, conversation_id, "warned", extra=extra)
            else:
                await handoff.notify_leads(conversation_id, "warned", extra=f"排队中，{extra}")
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
            await handoff.notify_leads(conversation_id, "breached", extra=extra)
        elif event.kind is SlaEventKind.ESCALATED:
            extra = f"{name}超时升级（第 {event.level} 级），请尽快处理"
            await handoff.notify_leads(conversation_id, "escalated", level=event.level, extra=extra)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every interval until stopped; a failed pass is logged and the next one runs."""
        while not stop.is_set():
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("sla sweep failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)


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
