"""Operations endpoints: /healthz (alive), /readyz (database and Redis reachable), /metrics (Prometheus),
/scripts/status (the script library in use and whether the files on disk load).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.storage.db import ping

if TYPE_CHECKING:
    from bot.app import Services

READINESS_TIMEOUT_S = 2.0

log = structlog.get_logger(__name__)


async def _probe(check: Awaitable[Any]) -> str:
    try:
        await asyncio.wait_for(check, READINESS_TIMEOUT_S)
    except Exception as exc:  # any failure means "not ready"; the reason is for the operator
        return f"unavailable: {type(exc).__name__}"
    return "ok"


def ops_routes(services: Services) -> list[web.RouteDef]:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        database, redis = await asyncio.gather(_probe(ping(services.engine)), _probe(services.redis.ping()))
        checks = {"database": database, "redis": redis}
        ready = all(value == "ok" for value in checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def scripts_status(_request: web.Request) -> web.Response:
        # Not part of /readyz: an invalid edit keeps the last good library serving, so the process stays ready.
        return web.json_response(services.scripts.status(), headers={"Cache-Control": "no-store"})

    async def metrics(_request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(services.queue.refresh_metrics(services.clock.now()), READINESS_TIMEOUT_S)
        except Exception as exc:  # scrape what we have; Redis trouble shows in /readyz
            log.debug("queue metrics not refreshed", error=type(exc).__name__)
        body = generate_latest(services.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/scripts/status", scripts_status),
    ]
