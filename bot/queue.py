"""The durable hand-off from the webhook to the workers: partitioned Redis streams with a dead-letter stream.

Every conversation hashes (crc32) to one of `partitions` streams, `keys.inbound_stream(p)`, read through the
consumer group `CONSUMER_GROUP`. Only the owner of a partition's lease reads it (see `bot/worker.py`), so one
customer's messages are handled one at a time and in order.

Entries are deleted from their stream once acknowledged (or moved to the dead-letter stream), so a stream's
length is exactly the number of entries waiting or in flight.

Stream entry fields: `kind`, `payload` (JSON), `dedupe`, `conversation`, `enqueued_at` (unix seconds), and
`replay_of` (dead-letter id) on entries re-queued from the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as redis_asyncio
from redis.exceptions import ResponseError

from bot.metrics import Metrics
from bot.redis_keys import CONSUMER_GROUP, RedisKeys
from handlers.domain import Clock

# Longest error text kept on a dead letter (the log only ever gets the error class).
MAX_ERROR_CHARS = 2000

# Per item: SET dedupe NX EX ttl and, only when it was set, XADD. One script, so a crash can never leave a
# marker without its entry (a WeCom retry would then be dropped as a duplicate) nor queue an entry twice.
# Scripts are not rolled back on error, so a failed XADD removes the marker it just set. Concurrent callbacks
# share one call: redis-py's cost is per command, not per key.
# KEYS: dedupe_1, stream_1, dedupe_2, stream_2, ...; ARGV[1] = ttl, then 5 values per item. Each item gets its
# entry id, '' for a duplicate, or '!' .. the error of a failed XADD.
_ENQUEUE_MANY_LUA = """
local out = {}
for i = 1, #KEYS / 2 do
  local dedupe, stream, a = KEYS[2 * i - 1], KEYS[2 * i], 1 + (i - 1) * 5
  if redis.call('SET', dedupe, '1', 'NX', 'EX', ARGV[1]) then
    local id = redis.pcall('XADD', stream, '*', 'kind', ARGV[a + 1], 'payload', ARGV[a + 2], 'dedupe',
                           ARGV[a + 3], 'conversation', ARGV[a + 4], 'enqueued_at', ARGV[a + 5])
    if type(id) == 'table' and id.err then
      redis.call('DEL', dedupe)
      out[i] = '!' .. id.err
    else
      out[i] = id
    end
  else
    out[i] = ''
  end
end
return out
"""

# Acknowledge, drop the entry from the stream and forget its failed attempts.
_ACK_LUA = """
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
return n
"""

# Move one pending entry to the dead-letter stream. Only if it is still pending, so two workers that both
# think they own the partition can never dead-letter it twice.
_DEAD_LETTER_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return false
end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return id
"""

# Re-queue a dead letter, bypassing the dedupe marker, and delete it; a dead letter is replayed at most once.
_REPLAY_LUA = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return false
end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""

# Forget consumers (former owners) that hold nothing, so the group does not grow with every restart. Atomic,
# so a consumer that just read something is never dropped with its pending entries.
_PRUNE_CONSUMERS_LUA = """
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
  end
  if name ~= ARGV[2] and pending == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
"""


_PAYLOAD_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of an entry's payload; orjson on the hot path, the stdlib for what orjson refuses.

    orjson refuses integers beyond 64 bits, which WeCom never sends but a replayed or hand-made entry might hold.
    """
    try:
        return orjson.dumps(payload)
    except TypeError:
        return _PAYLOAD_JSON.encode(dict(payload)).encode("utf-8")

# Most enqueue calls sent in one pipeline (more wait for the next pass of the same flush).
_MAX_BATCH = 256


def _settle(future: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Hand a result to a waiting enqueue_once; a caller that was cancelled meanwhile is skipped."""
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):  # the flush itself was cancelled (shutdown)
        future.cancel()
    elif exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class MalformedEntry(Exception):
    """A stream entry that cannot be turned into a QueueEntry; retrying cannot help."""


@dataclass(frozen=True, slots=True)
class QueueEntry:
    partition: int
    entry_id: str
    kind: str
    payload: dict[str, Any]
    dedupe_key: str
    attempts: int  # failed attempts before this one
    enqueued_at: float
    conversation_key: str = ""
    replay_of: str | None = None  # dead-letter id when this entry was replayed from the dead-letter stream

    def fields(self) -> dict[str, str]:
        """The stream fields this entry was written with."""
        out = {
            "kind": self.kind,
            "payload": encode_payload(self.payload).decode("utf-8"),
            "dedupe": self.dedupe_key,
            "conversation": self.conversation_key,
            "enqueued_at": repr(self.enqueued_at),
        }
        if self.replay_of:
            out["replay_of"] = self.replay_of
        return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dead_letter_id: str
    partition: int
    entry_id: str  # the id it had in its partition stream
    kind: str
    payload: dict[str, Any] | None  # None when the original payload was not valid JSON
    dedupe_key: str
    attempts: int
    error_class: str
    error: str
    enqueued_at: float
    dead_at: float
    worker_id: str
    fields: dict[str, str] = field(default_factory=dict)  # everything as stored


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _decode_fields(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in (raw or {}).items()}


def _float(value: str | None, default: float = 0.0) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def _id_ms(entry_id: str) -> float:
    """The server time (seconds) encoded in a stream id."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return 0.0


class InboundQueue:
    def __init__(
        self,
        redis: redis_asyncio.Redis,
        keys: RedisKeys,
        partitions: int,
        dedupe_ttl_s: int,
        metrics: Metrics | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self.dedupe_ttl_s = dedupe_ttl_s
        self.metrics = metrics
        self.group = CONSUMER_GROUP
        self._clock = clock
        self._enqueue_many = redis.register_script(_ENQUEUE_MANY_LUA)
        self._ack = redis.register_script(_ACK_LUA)
        self._dead_letter = redis.register_script(_DEAD_LETTER_LUA)
        self._replay = redis.register_script(_REPLAY_LUA)
        self._prune = redis.register_script(_PRUNE_CONSUMERS_LUA)
        # Each waiting call: (dedupe key, stream), (kind, payload, dedupe, conversation, enqueued_at), its future.
        self._batch: list[tuple[tuple[str, str], tuple[str, bytes, str, str, str], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._flushing = False

    def _now(self) -> float:
        return self._clock.now() if self._clock is not None else time.time()

    # ---- producing -----------------------------------------------------------------------------------------

    def partition_for(self, conversation_key: str) -> int:
        """Stable across processes and restarts (crc32, not Python's salted hash)."""
        return zlib.crc32(conversation_key.encode("utf-8")) % self.partitions

    def stream(self, partition: int) -> str:
        return self.keys.inbound_stream(partition)

    async def ensure_groups(self) -> None:
        """Create the consumer group on every partition stream (idempotent; creates empty streams)."""
        for partition in range(self.partitions):
            await self.ensure_group(partition)

    async def ensure_group(self, partition: int) -> None:
        try:
            await self.redis.xgroup_create(self.stream(partition), self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue_once(
        self, dedupe_key: str, conversation_key: str, kind: str, payload: Mapping[str, Any]
    ) -> bool:
        """Queue once per dedupe key; True if queued now, False if the key was already seen.

        Calls made in the same event-loop turn (concurrent callbacks) share one Redis round trip: each is still
        its own atomic script call with its own result or exception, sent in arrival order.
        """
        return await self.submit_once(dedupe_key, conversation_key, kind, payload) is not None

    def submit_once(
        self, dedupe_key: str, conversation_key: str, kind: str, payload: Mapping[str, Any]
    ) -> asyncio.Future[str | None]:
        """`enqueue_once` without its coroutine: a future of the entry id, or None for a key already seen.

        For the callback hot path, which awaits this future directly: every coroutine level between a handler
        and the future is resumed again when the Redis reply arrives, once per callback.
        """
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._batch.append(
            (
                (self.keys.dedupe(dedupe_key), self.stream(self.partition_for(conversation_key))),
                (kind, encode_payload(payload), dedupe_key, conversation_key, repr(self._now())),
                future,
            )
        )
        if not self._flushing:
            # One flusher at a time (group commit): whatever arrives while its round trip is in flight goes out
            # together in the next one, so batches grow with load and cost no latency when idle. It runs as its
            # own task, so a cancelled caller never strands the others in its batch.
            self._flushing = True
            task = future.get_loop().create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return future

    async def _flush(self) -> None:
        """Send every enqueue waiting in this loop turn: one script call alone, several in one pipeline."""
        try:
            await self._flush_waiting()
        finally:
            # No await between the loop finding the batch empty and this line, so nothing can slip in between.
            self._flushing = False

    async def _flush_waiting(self) -> None:
        while self._batch:  # bounded: each pass takes up to _MAX_BATCH calls off a finite list
            batch, self._batch = self._batch[:_MAX_BATCH], self._batch[_MAX_BATCH:]
            keys: list[Any] = []
            args: list[Any] = [self.dedupe_ttl_s]
            for item_keys, item_args, _future in batch:
                keys += item_keys
                args += item_args
            try:
                results = await self._enqueue_many(keys=keys, args=args)
            except BaseException as exc:
                for _keys, _args, future in batch:
                    _settle(future, exc=exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_keys, _args, future), result in zip(batch, results, strict=True):
                text = _text(result)
                if not text:
                    _settle(future, None)
                elif text.startswith("!"):
                    _settle(future, exc=ResponseError(text[1:]))
                else:
                    _settle(future, text)

    # ---- consuming (used by bot/worker.py) -----------------------------------------------------------------

    async def read(
        self, partition: int, consumer: str, after: str, count: int, block_ms: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """XREADGROUP: `after` is '>' for new entries or an id to page through this consumer's pending ones.

        A pending entry deleted from the stream comes back with empty fields.
        """
        response: Any = await self.redis.xreadgroup(
            self.group, consumer, {self.stream(partition): after}, count=count, block=block_ms
        )
        out: list[tuple[str, dict[str, str]]] = []
        for _stream, entries in response or []:
            for entry_id, raw in entries:
                out.append((_text(entry_id), _decode_fields(raw)))
        return out

    async def attempts(self, partition: int, entry_ids: Sequence[str]) -> list[int]:
        if not entry_ids:
            return []
        values = await self.redis.hmget(self.keys.delivery_count(partition), list(entry_ids))
        return [int(v) if v is not None else 0 for v in values]

    def parse(self, partition: int, entry_id: str, fields: Mapping[str, str], attempts: int) -> QueueEntry:
        try:
            kind = fields["kind"]
            payload = json.loads(fields["payload"])
        except (KeyError, ValueError) as exc:
            raise MalformedEntry(f"entry {entry_id} has no valid kind/payload") from exc
        if not isinstance(payload, dict):
            raise MalformedEntry(f"entry {entry_id} payload is not a JSON object")
        return QueueEntry(
            partition=partition,
            entry_id=entry_id,
            kind=kind,
            payload=payload,
            dedupe_key=fields.get("dedupe", ""),
            attempts=attempts,
            enqueued_at=_float(fields.get("enqueued_at"), _id_ms(entry_id)),
            conversation_key=fields.get("conversation", ""),
            replay_of=fields.get("replay_of") or None,
        )

    async def claim_orphans(self, partition: int, consumer: str, min_idle_ms: int) -> int:
        """Move entries pending for other consumers (a dead or evicted owner) to `consumer`.

        Returns how many pending entries were claimed (0 when no other consumer held any). The caller then
        reads its own pending entries (id '0'), which keeps stream order.
        """
        stream = self.stream(partition)
        summary = await self.redis.xpending(stream, self.group)
        others = [
            c
            for c in (summary.get("consumers") or [])
            if _text(c["name"]) != consumer and int(c["pending"]) > 0
        ]
        if not others:
            return 0
        claimed = 0
        start = "0-0"
        pages = 10 + sum(int(c["pending"]) for c in others) // 100
        for _page in range(pages):  # bounded: XAUTOCLAIM walks the pending list in pages of 100
            result = await self.redis.xautoclaim(stream, self.group, consumer, min_idle_ms, start, count=100)
            claimed += len(result[1]) + (len(result[2]) if len(result) > 2 else 0)
            start = _text(result[0])
            if start == "0-0":
                break
        await self._prune(keys=[stream], args=[self.group, consumer])
        return claimed

    async def ack(self, partition: int, entry_id: str) -> bool:
        """XACK + XDEL + forget attempts; False if the entry was no longer pending."""
        n = await self._ack(
            keys=[self.stream(partition), self.keys.delivery_count(partition)], args=[self.group, entry_id]
        )
        return int(n) > 0

    async def record_failure(self, partition: int, entry_id: str) -> int:
        """Count one failed attempt; returns the attempts so far."""
        return int(await self.redis.hincrby(self.keys.delivery_count(partition), entry_id, 1))

    async def dead_letter(
        self,
        partition: int,
        entry_id: str,
        fields: Mapping[str, str],
        *,
        attempts: int,
        error_class: str,
        error: str,
        worker_id: str,
    ) -> bool:
        """Move a pending entry to the dead-letter stream and ack it; False if it was no longer pending."""
        record: dict[str, str] = {k: v for k, v in fields.items() if k not in _DEAD_LETTER_META}
        record.update(
            partition=str(partition),
            entry_id=entry_id,
            attempts=str(attempts),
            error_class=error_class,
            error=error[:MAX_ERROR_CHARS],
            dead_at=repr(self._now()),
            worker_id=worker_id,
        )
        flat: list[str] = []
        for k, v in record.items():
            flat += [k, v]
        moved = await self._dead_letter(
            keys=[self.stream(partition), self.keys.dead_letters(), self.keys.delivery_count(partition)],
            args=[self.group, entry_id, *flat],
        )
        return moved is not None

    # ---- observing -----------------------------------------------------------------------------------------

    async def depth(self) -> int:
        """Entries waiting or in flight (pending + unread) across all partitions."""
        pipe = self.redis.pipeline(transaction=False)
        for partition in range(self.partitions):
            pipe.xlen(self.stream(partition))
        return sum(int(n) for n in await pipe.execute())

    async def oldest_age_s(self, now: float | None = None) -> float:
        """Age of the oldest entry not yet acknowledged, 0 when the queue is empty."""
        now = self._now() if now is None else now
        pipe = self.redis.pipeline(transaction=False)
        for partition in range(self.partitions):
            pipe.xrange(self.stream(partition), "-", "+", count=1)
        oldest: float | None = None
        for entries in await pipe.execute():
            for entry_id, raw in entries or []:
                eid = _text(entry_id)
                at = _float(_decode_fields(raw).get("enqueued_at"), _id_ms(eid))
                oldest = at if oldest is None else min(oldest, at)
        return max(0.0, now - oldest) if oldest is not None else 0.0

    async def refresh_metrics(self, now: float | None = None) -> None:
        if self.metrics is None:
            return
        self.metrics.queue_depth.set(await self.depth())
        self.metrics.queue_lag.set(await self.oldest_age_s(now))
        self.metrics.dead_letters.set(await self.dead_letter_count())

    # ---- dead letters --------------------------------------------------------------------------------------

    async def dead_letter_count(self) -> int:
        return int(await self.redis.xlen(self.keys.dead_letters()))

    async def list_dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """Oldest first."""
        entries = await self.redis.xrange(self.keys.dead_letters(), "-", "+", count=count)
        return [_dead_letter_from(_text(dl_id), _decode_fields(raw)) for dl_id, raw in entries or []]

    async def replay_dead_letter(self, dead_letter_id: str) -> bool:
        """Queue the original entry again (to its conversation's partition) and delete the dead letter.

        The dedupe marker is bypassed on purpose. False if there is no such dead letter (already replayed).
        """
        entries = await self.redis.xrange(self.keys.dead_letters(), dead_letter_id, dead_letter_id)
        if not entries:
            return False
        fields = _decode_fields(entries[0][1])
        conversation = fields.get("conversation", "")
        if conversation:
            partition = self.partition_for(conversation)
        else:
            partition = int(_float(fields.get("partition"))) % self.partitions
        record = {k: v for k, v in fields.items() if k not in _DEAD_LETTER_META}
        record["enqueued_at"] = repr(self._now())
        record["replay_of"] = dead_letter_id
        flat: list[str] = []
        for k, v in record.items():
            flat += [k, v]
        replayed = await self._replay(
            keys=[self.keys.dead_letters(), self.stream(partition)], args=[dead_letter_id, *flat]
        )
        if replayed is not None and self.metrics is not None:
            self.metrics.dead_letters.set(await self.dead_letter_count())
        return replayed is not None


_DEAD_LETTER_META = frozenset(
    {"partition", "entry_id", "attempts", "error_class", "error", "dead_at", "worker_id", "replay_of"}
)


def _dead_letter_from(dead_letter_id: str, fields: dict[str, str]) -> DeadLetter:
    try:
        loaded = json.loads(fields.get("payload", ""))
        payload: dict[str, Any] | None = loaded if isinstance(loaded, dict) else None
    except ValueError:
        payload = None
    return DeadLetter(
        dead_letter_id=dead_letter_id,
        partition=int(_float(fields.get("partition"))),
        entry_id=fields.get("entry_id", ""),
        kind=fields.get("kind", ""),
        payload=payload,
        dedupe_key=fields.get("dedupe", ""),
        attempts=int(_float(fields.get("attempts"))),
        error_class=fields.get("error_class", ""),
        error=fields.get("error", ""),
        enqueued_at=_float(fields.get("enqueued_at")),
        dead_at=_float(fields.get("dead_at")),
        worker_id=fields.get("worker_id", ""),
        fields=fields,
    )
