"""JS-SDK tickets (jsapi_ticket) cached in Redis, and the JS-SDK signature.

Two tickets, both fetched with the self-built app's access token and valid `expires_in` seconds (7200):
- the corp's ticket, `GET cgi-bin/get_jsapi_ticket`, signs `wx.config`;
- the app's ticket, `GET cgi-bin/ticket/get?type=agent_config`, signs `wx.agentConfig`.

Both have small hourly quotas, so they are cached exactly like access tokens: `TokenStore` (bot/wecom/tokens.py)
does the work (Redis value with the clock's expiry, refresh `refresh_margin_s` early, single-flight across
processes through a Redis lock), with its own key shapes:
    {prefix}:jsapi-ticket:corp:{corp_id}:{fp}        {prefix}:jsapi-ticket-lock:corp:{corp_id}:{fp}
    {prefix}:jsapi-ticket:agent:{corp_id}:{fp}       {prefix}:jsapi-ticket-lock:agent:{corp_id}:{fp}
where fp is the fingerprint of the app secret (never the secret). Tickets are never logged.

Signature: sha1 over `jsapi_ticket=T&noncestr=N&timestamp=TS&url=U` (keys in that order, values raw, not
URL-encoded), lowercase hex; U is the page URL without its `#fragment`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import redis.asyncio as redis_asyncio
import structlog

from bot.redis_keys import RedisKeys, secret_fingerprint
from bot.wecom.client import DEFAULT_EXPIRES_IN, WeComClient
from bot.wecom.errors import WeComTransportError
from bot.wecom.tokens import TokenStore
from handlers.domain import Clock

log = structlog.get_logger(__name__)

CORP_TICKET_PATH = "/cgi-bin/get_jsapi_ticket"
AGENT_TICKET_PATH = "/cgi-bin/ticket/get"


@dataclass(frozen=True, slots=True)
class TicketKeys(RedisKeys):
    """RedisKeys whose token key shapes name a JS-SDK ticket instead (TokenStore only uses those two)."""

    kind: str = "corp"

    def access_token(self, corp_id: str, secret: str) -> str:
        return f"{self.prefix}:jsapi-ticket:{self.kind}:{corp_id}:{secret_fingerprint(secret)}"

    def access_token_lock(self, corp_id: str, secret: str) -> str:
        return f"{self.prefix}:jsapi-ticket-lock:{self.kind}:{corp_id}:{secret_fingerprint(secret)}"


def jsapi_signature(ticket: str, noncestr: str, timestamp: int | str, url: str) -> str:
    """The JS-SDK signature for `wx.config` / `wx.agentConfig` (the fragment of `url` is dropped)."""
    page = url.split("#", 1)[0]
    plain = f"jsapi_ticket={ticket}&noncestr={noncestr}&timestamp={timestamp}&url={page}"
    return hashlib.sha1(plain.encode("utf-8")).hexdigest()  # noqa: S324 - WeCom's algorithm, not our choice


class JsApiTickets:
    """The corp and app jsapi_tickets of one self-built app, cached and refreshed single-flight."""

    def __init__(
        self,
        client: WeComClient,
        redis: redis_asyncio.Redis,
        prefix: str,
        corp_id: str,
        secret: str,
        *,
        clock: Clock,
        refresh_margin_s: float = 300.0,
        lock_ttl_s: float = 60.0,
    ) -> None:
        self._client = client
        self._corp = TokenStore(
            redis,
            TicketKeys(prefix, "corp"),
            corp_id,
            secret,
            self._fetch_corp,
            clock=clock,
            refresh_margin_s=refresh_margin_s,
            lock_ttl_s=lock_ttl_s,
        )
        self._agent = TokenStore(
            redis,
            TicketKeys(prefix, "agent"),
            corp_id,
            secret,
            self._fetch_agent,
            clock=clock,
            refresh_margin_s=refresh_margin_s,
            lock_ttl_s=lock_ttl_s,
        )

    def __repr__(self) -> str:
        return "JsApiTickets()"

    async def corp_ticket(self) -> str:
        return (await self._corp.get()).value

    async def agent_ticket(self) -> str:
        return (await self._agent.get()).value

    async def _fetch(self, path: str, query: dict[str, str]) -> tuple[str, int]:
        data = await self._client.call("GET", path, query=query)
        ticket = data.get("ticket")
        if not isinstance(ticket, str) or not ticket:
            raise WeComTransportError(path, "answered without ticket", retryable=False)
        try:
            expires_in = int(data.get("expires_in", DEFAULT_EXPIRES_IN))
        except (TypeError, ValueError):
            expires_in = DEFAULT_EXPIRES_IN
        log.info("wecom.jsapi_ticket.fetched", path=path, expires_in=expires_in)
        return ticket, expires_in if expires_in > 0 else DEFAULT_EXPIRES_IN

    async def _fetch_corp(self) -> tuple[str, int]:
        return await self._fetch(CORP_TICKET_PATH, {})

    async def _fetch_agent(self) -> tuple[str, int]:
        return await self._fetch(AGENT_TICKET_PATH, {"type": "agent_config"})
