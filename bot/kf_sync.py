"""微信客服 pull: on kf_msg_or_event, drain kf/sync_msg into the queue under a per-account lock."""

from __future__ import annotations

import secrets
from typing import Any, Protocol

import redis.asyncio as redis_asyncio
import structlog

from bot.queue import InboundQueue
from bot.redis_keys import RedisKeys
from bot.storage.repositories import KfCursorRepository
from bot.wecom.errors import WeComApiError
from bot.wecom.parse import kf_message_to_inbound

log = structlog.get_logger(__name__)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Far above WeCom's 10-minute sync token life: a page loop never legitimately runs this long.
MAX_PAGES_PER_PULL = 10_000
EXPIRED_SYNC_TOKEN = 95007


class KfSyncApi(Protocol):
    async def kf_sync_msg(
        self, token: str, open_kfid: str, cursor: str | None = None, limit: int = 1000
    ) -> dict[str, Any]: ...


class KfPuller:
    """One pull at a time per kf account, across all processes; a callback during a pull is never lost."""

    def __init__(
        self,
        api: KfSyncApi,
        queue: InboundQueue,
        cursors: KfCursorRepository,
        redis: redis_asyncio.Redis,
        keys: RedisKeys,
        lock_ttl_ms: int = 60_000,
        page_limit: int = 1000,
    ) -> None:
        self._api = api
        self._queue = queue
        self._cursors = cursors
        self._redis = redis
        self._keys = keys
        self._lock_ttl_ms = lock_ttl_ms
        self._page_limit = page_limit

    async def pull(self, open_kfid: str, token: str) -> int:
        """Pull everything new for the account; return how many messages were queued by this call."""
        pending_key = self._keys.kf_sync_pending(open_kfid)
        # Announce the wish first: whoever holds the lock re-checks this flag after releasing it.
        await self._redis.set(pending_key, token, px=self._lock_ttl_ms * 10)
        queued = 0
        while True:
            owner = await self._acquire(open_kfid)
            if owner is None:
                return queued  # the holder will see the flag and pull again
            try:
                wanted = await self._redis.getdel(pending_key)
                if wanted is not None:
                    token = wanted.decode() if isinstance(wanted, bytes) else str(wanted)
                    queued += await self._drain(open_kfid, token, owner)
            finally:
                await self._redis.eval(_RELEASE, 1, self._keys.kf_sync_lock(open_kfid), owner)  # type: ignore[misc]
            if not await self._redis.exists(pending_key):
                return queued

    async def _acquire(self, open_kfid: str) -> str | None:
        owner = secrets.token_hex(8)
        acquired = await self._redis.set(self._keys.kf_sync_lock(open_kfid), owner, nx=True, px=self._lock_ttl_ms)
        return owner if acquired else None

    async def _drain(self, open_kfid: str, token: str, owner: str) -> int:
        cursor = await self._cursors.get_cursor(open_kfid)
        queued = 0
        for _ in range(MAX_PAGES_PER_PULL):
            try:
                page = await self._api.kf_sync_msg(token, open_kfid, cursor=cursor, limit=self._page_limit)
            except WeComApiError as exc:
                if exc.errcode != EXPIRED_SYNC_TOKEN or not token:
                    raise
                # The 10-minute callback token ran out (a long backlog or a late retry): pulling without it
                # is allowed, only under stricter frequency limits.
                log.info("kf sync token expired; pulling without it", open_kfid=open_kfid)
                token = ""
                continue
            for msg in page.get("msg_list") or ():
                queued += await self._enqueue(open_kfid, msg)
            next_cursor = page.get("next_cursor") or cursor
            # Only after the page is durably queued: a crash before this line re-pulls the page (deduped).
            if next_cursor and next_cursor != cursor:
                await self._cursors.save_cursor(open_kfid, next_cursor)
                cursor = next_cursor
            await self._redis.eval(  # type: ignore[misc]
                _RENEW, 1, self._keys.kf_sync_lock(open_kfid), owner, self._lock_ttl_ms
            )
            if not page.get("has_more"):
                break
        else:
            log.warning("kf pull stopped at the page cap", open_kfid=open_kfid, pages=MAX_PAGES_PER_PULL)
        log.info("kf pull done", open_kfid=open_kfid, queued=queued)
        return queued

    async def _enqueue(self, open_kfid: str, msg: dict[str, Any]) -> int:
        msgid = str(msg.get("msgid") or "")
        if not msgid:
            log.warning("kf message without msgid ignored", open_kfid=open_kfid)
            return 0
        try:
            inbound = kf_message_to_inbound(msg)
            conversation_key = inbound.conversation_key
        except Exception as exc:  # a shape we cannot read still gets queued, to be stored as unknown
            log.warning("kf message not understood", error=type(exc).__name__)
            conversation_key = f"kf:{open_kfid}:?"
        added = await self._queue.enqueue_once(
            f"kf:{msgid}", conversation_key, "kf_message", {"msg": msg, "open_kfid": open_kfid}
        )
        return int(added)
