"""Cards to staff within WeCom's per-member limit, counted in Redis so every process shares one budget.

WeCom delivers at most 30 app messages a minute and 1,000 an hour from one app to one member, and silently drops
the rest (reference §5.2). A card WeCom drops is an agent who never hears of a customer, so the limit is kept
here, before the API is called:

- **Urgent cards** (a conversation was just assigned or transferred to this member: someone waits for them) take
  any free slot of the member's window and go out at once.
- **Paced cards** (SLA warnings, breaches, escalations, breach reassignments) go out at most once per `pace_s`
  per member and only while the minute keeps `minute_reserve` slots free for urgent ones; the first goes at
  once, what arrives meanwhile waits and is sent as one digest.
- A card that finds no slot is held, never dropped; `flush` (the SLA sweep's, every second, in whichever process
  gets there first) sends each member's held cards as one digest as soon as the window allows, urgent ones
  listed first.

Every decision (count the window, take a slot or hold, pop the held cards) is one Lua script, so two processes
never both take a member's last slot or both send the same held card.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis

from bot.redis_keys import RedisKeys
from bot.storage.handoff_repository import AgentRecord, HandoffConversation
from handlers.domain import Clock

log = structlog.get_logger(__name__)

PER_MINUTE = 30
PER_HOUR = 1_000
MINUTE_RESERVE = 6  # slots a minute that paced cards leave free for urgent ones
HOUR_RESERVE = 100
PACE_S = 10.0
URGENT_KINDS = frozenset({"assigned", "transferred"})

# Times are the injected clock's (ms), never Redis's own: the pace marker holds the instant it ends, and its expiry
# only collects it. A send counts from when its slot was taken until 62 s (and 3,602 s) after WeCom answered it
# (`CardBudget.sent` moves its score): WeCom counts from when the message arrived, which under load can be seconds
# after the slot was taken, and the 2 s cover clocks that disagree a little.
# KEYS: window (zset of sends, score ms), pace marker, held urgent list, held paced list, members-with-held set.
# ARGV: now ms, urgent 0/1, per minute, per hour, minute reserve, hour reserve, pace ms, send id, member id,
#       the card (JSON) to hold when no slot is free ("" to never hold).
# Returns 1 when a slot was taken (send now), 0 when the card was held (for a day at most: a deployment with no
# sweep running never flushes, and its held cards must not stay forever).
_TAKE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3602000)
local minute = redis.call('ZCOUNT', KEYS[1], '(' .. (now - 62000), '+inf')
local hour = redis.call('ZCARD', KEYS[1])
local ok
if ARGV[2] == '1' then
  ok = minute < tonumber(ARGV[3]) and hour < tonumber(ARGV[4])
else
  ok = redis.call('LLEN', KEYS[4]) == 0 and now >= tonumber(redis.call('GET', KEYS[2]) or '0')
    and minute < tonumber(ARGV[3]) - tonumber(ARGV[5]) and hour < tonumber(ARGV[4]) - tonumber(ARGV[6])
end
if ok then
  redis.call('ZADD', KEYS[1], now, ARGV[8])
  redis.call('PEXPIRE', KEYS[1], 3700000)
  if ARGV[2] ~= '1' then redis.call('SET', KEYS[2], now + tonumber(ARGV[7]), 'PX', tonumber(ARGV[7]) + 60000) end
  return 1
end
if ARGV[10] ~= '' then
  local held = KEYS[4]
  if ARGV[2] == '1' then held = KEYS[3] end
  redis.call('RPUSH', held, ARGV[10])
  redis.call('PEXPIRE', held, 86400000)
  redis.call('SADD', KEYS[5], ARGV[9])
end
return 0
"""

# Same KEYS and ARGV 1–9. When the member's held cards may go now (urgent ones: any slot; only paced ones: the
# pace and the reserve), takes the slot and pops them all: {urgent JSON...} and {paced JSON...}; else nil.
_RELEASE = """
local urgent_n = redis.call('LLEN', KEYS[3])
local paced_n = redis.call('LLEN', KEYS[4])
if urgent_n == 0 and paced_n == 0 then
  redis.call('SREM', KEYS[5], ARGV[9])
  return nil
end
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3602000)
local minute = redis.call('ZCOUNT', KEYS[1], '(' .. (now - 62000), '+inf')
local hour = redis.call('ZCARD', KEYS[1])
local ok
if urgent_n > 0 then
  ok = minute < tonumber(ARGV[3]) and hour < tonumber(ARGV[4])
else
  ok = now >= tonumber(redis.call('GET', KEYS[2]) or '0')
    and minute < tonumber(ARGV[3]) - tonumber(ARGV[5]) and hour < tonumber(ARGV[4]) - tonumber(ARGV[6])
end
if not ok then return nil end
redis.call('ZADD', KEYS[1], now, ARGV[8])
redis.call('PEXPIRE', KEYS[1], 3700000)
if paced_n > 0 then redis.call('SET', KEYS[2], now + tonumber(ARGV[7]), 'PX', tonumber(ARGV[7]) + 60000) end
local urgent = redis.call('LRANGE', KEYS[3], 0, -1)
local paced = redis.call('LRANGE', KEYS[4], 0, -1)
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SREM', KEYS[5], ARGV[9])
return {urgent, paced}
"""


@dataclass(frozen=True, slots=True)
class CardItem:
    """One thing to tell a member about one conversation."""

    conversation_id: int
    kind: str  # assigned, transferred, reassigned, warned, breached, escalated
    extra: str = ""  # what happened, in Chinese (the digest's line)
    level: int = 0

    @property
    def urgent(self) -> bool:
        return self.kind in URGENT_KINDS


class CardSender(Protocol):
    """Renders and sends the cards (bot.handoff.HandoffService)."""

    async def notify_agent(
        self,
        agent: AgentRecord,
        conversation_id: int,
        kind: str,
        *,
        level: int = 0,
        extra: str = "",
        conversation: HandoffConversation | None = None,
        tags: frozenset[str] | None = None,
    ) -> bool: ...

    async def notify_digest(self, agent: AgentRecord, items: Sequence[CardItem], card_id: str) -> bool: ...

    async def member(self, member_id: int) -> AgentRecord | None: ...


@dataclass(frozen=True, slots=True)
class CardLimits:
    per_minute: int = PER_MINUTE
    per_hour: int = PER_HOUR
    minute_reserve: int = MINUTE_RESERVE
    hour_reserve: int = HOUR_RESERVE
    pace_s: float = PACE_S


class CardBudget:
    """The per-member send window in Redis: take a slot or hold the card, and release held cards."""

    def __init__(self, redis: Redis, keys: RedisKeys, clock: Clock, limits: CardLimits | None = None) -> None:
        self._keys = keys
        self._clock = clock
        self._limits = limits or CardLimits()
        self._take = redis.register_script(_TAKE)
        self._release = redis.register_script(_RELEASE)
        self._redis = redis

    def _keys_of(self, member_id: int) -> list[str]:
        k = self._keys
        return [
            k.card_window(member_id),
            k.card_pace(member_id),
            k.card_held(member_id, urgent=True),
            k.card_held(member_id, urgent=False),
            k.card_held_members(),
        ]

    def _args(self, member_id: int, urgent: bool) -> list[Any]:
        limits = self._limits
        return [
            int(self._clock.now() * 1000),
            1 if urgent else 0,
            limits.per_minute,
            limits.per_hour,
            limits.minute_reserve,
            limits.hour_reserve,
            int(limits.pace_s * 1000),
            uuid.uuid4().hex,
            member_id,
        ]

    async def take_or_hold(self, member_id: int, item: CardItem) -> str | None:
        """A send id when a slot was taken (send now); None when the card was held for a digest."""
        args = self._args(member_id, item.urgent)
        taken = await self._take(keys=self._keys_of(member_id), args=[*args, json.dumps(asdict(item))])
        return str(args[7]) if int(taken) == 1 else None

    async def sent(self, member_id: int, send_id: str) -> None:
        """The card of `send_id` was answered by WeCom now: its slot counts from now (see the scripts' comment)."""
        await self._redis.zadd(
            self._keys.card_window(member_id), {send_id: int(self._clock.now() * 1000)}, xx=True
        )

    async def release(self, member_id: int) -> tuple[str, list[CardItem]] | None:
        """(send id, held cards, urgent first) when the member's held cards may go now; None otherwise."""
        args = self._args(member_id, urgent=False)
        popped = await self._release(keys=self._keys_of(member_id), args=args)
        if not popped:
            return None
        urgent, paced = popped
        return str(args[7]), [CardItem(**json.loads(raw)) for raw in [*urgent, *paced]]

    async def members_with_held(self) -> list[int]:
        return sorted(int(m) for m in await self._redis.smembers(self._keys.card_held_members()))

    async def held(self) -> int:
        """Cards waiting, over all members."""
        total = 0
        for member_id in await self.members_with_held():
            for urgent in (True, False):
                total += int(await self._redis.llen(self._keys.card_held(member_id, urgent=urgent)))
        return total


class MemberCards:
    """Sends cards through the member's budget: at once when it allows, else held and sent as a digest."""

    def __init__(self, sender: CardSender, budget: CardBudget | None) -> None:
        self._sender = sender
        self._budget = budget  # None: no limit kept (a deployment without Redis-backed limits, some tests)

    async def send(
        self,
        member: AgentRecord,
        item: CardItem,
        *,
        conversation: HandoffConversation | None = None,
        tags: frozenset[str] | None = None,
    ) -> bool:
        """True when the card went out now; False when it is held for the member's next digest (or failed).

        `conversation` and `tags`, when the caller has just read them, save the card reading them again.
        """
        send_id = None
        if self._budget is not None:
            send_id = await self._budget.take_or_hold(member.id, item)
            if send_id is None:
                log.info("agent card held", agent_id=member.id, kind=item.kind, conversation_id=item.conversation_id)
                return False
        try:
            return await self._sender.notify_agent(
                member,
                item.conversation_id,
                item.kind,
                level=item.level,
                extra=item.extra,
                conversation=conversation,
                tags=tags,
            )
        finally:
            if self._budget is not None and send_id is not None:
                await self._budget.sent(member.id, send_id)

    async def flush(self) -> int:
        """Send the held cards of every member whose window allows it now; returns how many cards went out."""
        if self._budget is None:
            return 0
        sent = 0
        for member_id in await self._budget.members_with_held():
            released = await self._budget.release(member_id)
            if released is None:
                continue
            card_id, items = released
            member = await self._sender.member(member_id)
            if member is None:
                log.warning("held cards for an unknown member dropped", agent_id=member_id, cards=len(items))
                continue
            try:
                if len(items) == 1:
                    item = items[0]
                    ok = await self._sender.notify_agent(
                        member, item.conversation_id, item.kind, level=item.level, extra=item.extra
                    )
                else:
                    ok = await self._sender.notify_digest(member, items, card_id)
            finally:
                await self._budget.sent(member_id, card_id)
            sent += ok
        return sent

    async def held(self) -> int:
        return 0 if self._budget is None else await self._budget.held()
