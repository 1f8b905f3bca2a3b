"""The composition root: builds every service from settings and serves them as one aiohttp app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.ingress import callback_routes
from bot.kf_sync import KfPuller
from bot.metrics import Metrics
from bot.ops import ops_routes
from bot.outbound import WeComSender
from bot.pipeline import Pipeline
from bot.queue import InboundQueue
from bot.redis_conn import create_redis
from bot.redis_keys import RedisKeys
from bot.settings import Settings
from bot.storage.db import create_engine, create_session_factory, schema_status, upgrade_async
from bot.storage.repositories import Repositories
from bot.wecom.client import RobotClient, WeComClient
from bot.wecom.crypto import CallbackCrypto
from bot.worker import WorkerRuntime
from handlers.acknowledge import acknowledge_customer_text
from handlers.dispatcher import Dispatcher
from handlers.domain import Clock, SystemClock

log = structlog.get_logger(__name__)

SANDBOX_CORP_ID = "wwsandbox00000000"
SANDBOX_AGENT_ID = 1000002
SANDBOX_APP_SECRET = "sandbox-app-secret"  # noqa: S105 - only ever valid against the in-process simulator
SANDBOX_KF_SECRET = "sandbox-kf-secret"  # noqa: S105


class SchemaNotReadyError(RuntimeError):
    """The database has no schema (or an old one) and serve must not create it on its own."""


def sandbox_settings(settings: Settings) -> Settings:
    """Credentials for the in-process simulator, generated fresh at every start."""
    aes_key = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return settings.model_copy(
        update={
            "wecom_corp_id": SANDBOX_CORP_ID,
            "wecom_token": secrets.token_urlsafe(16),
            "wecom_aes_key": aes_key,
            "wecom_agent_id": SANDBOX_AGENT_ID,
            "wecom_secret": SANDBOX_APP_SECRET,
            "wecom_kf_secret": SANDBOX_KF_SECRET,
        }
    )


def build_dispatcher() -> Dispatcher:
    """Handlers in the order they are tried; the first that answers wins."""
    return Dispatcher([acknowledge_customer_text])


@dataclass
class Services:
    """Everything the routes and workers use, created once per process."""

    settings: Settings
    clock: Clock
    metrics: Metrics
    keys: RedisKeys
    redis: redis_asyncio.Redis
    engine: AsyncEngine
    repos: Repositories
    queue: InboundQueue
    http: aiohttp.ClientSession
    app_client: WeComClient
    kf_client: WeComClient
    robot: RobotClient
    crypto: CallbackCrypto
    pipeline: Pipeline
    workers: list[WorkerRuntime] = field(default_factory=list)


async def ensure_schema(engine: AsyncEngine, settings: Settings) -> None:
    """SQLite (the embedded trial) is migrated on start; PostgreSQL must be migrated explicitly."""
    status = await schema_status(engine)
    if status == "current":
        return
    if settings.sqlite_path() is not None or settings.auto_migrate:
        log.info("applying database migrations", status=status)
        await upgrade_async(engine)
        return
    raise SchemaNotReadyError(
        f"database schema is {status}: run `wecom-bot migrate` first (or set AUTO_MIGRATE=true)"
    )


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, *, clock: Clock | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Services]:
    """Open every resource for `settings` and close them in reverse order."""
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    keys = RedisKeys(settings.redis_key_prefix)
    redis = create_redis(settings)
    engine = create_engine(settings)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.http_timeout_s))
    try:
        await ensure_schema(engine, settings)
        repos = Repositories.create(create_session_factory(engine), clock)
        queue = InboundQueue(redis, keys, settings.queue_partitions, settings.dedupe_ttl_s, metrics, clock=clock)
        await queue.ensure_groups()

        def client_for(secret: str) -> WeComClient:
            return WeComClient(
                http,
                redis,
                keys,
                settings.wecom_api_base,
                settings.wecom_corp_id,
                secret,
                metrics=metrics,
                clock=clock,
                max_retries=settings.api_max_retries,
                timeout_s=settings.http_timeout_s,
            )

        app_client = client_for(settings.wecom_secret)
        kf_client = client_for(settings.kf_secret) if settings.kf_secret != settings.wecom_secret else app_client
        robot = RobotClient(http, settings.wecom_api_base, metrics=metrics)
        puller = KfPuller(kf_client, queue, repos.cursors, redis, keys)
        sender = WeComSender(app_client, kf_client, settings.wecom_agent_id)
        pipeline = Pipeline(repos, build_dispatcher(), sender, puller, clock)
        crypto = CallbackCrypto(settings.wecom_token, settings.wecom_aes_key, settings.wecom_corp_id)
        yield Services(
            settings=settings,
            clock=clock,
            metrics=metrics,
            keys=keys,
            redis=redis,
            engine=engine,
            repos=repos,
            queue=queue,
            http=http,
            app_client=app_client,
            kf_client=kf_client,
            robot=robot,
            crypto=crypto,
            pipeline=pipeline,
        )
    finally:
        await http.close()
        await engine.dispose()
        await redis.aclose()


SERVICES = web.AppKey("services", Services)


def create_app(services: Services, *, worker_count: int | None = None) -> web.Application:
    """The bot's aiohttp app: callback ingress, operations endpoints and (by default) in-process workers."""
    settings = services.settings
    app = web.Application(client_max_size=settings.callback_max_body_bytes)
    app[SERVICES] = services
    workers_wanted = settings.worker_concurrency if worker_count is None else worker_count

    async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = []
        for _ in range(workers_wanted):
            runtime = WorkerRuntime(
                services.redis,
                services.keys,
                settings,
                services.pipeline.process,
                metrics=services.metrics,
                clock=services.clock,
            )
            services.workers.append(runtime)
            tasks.append(asyncio.create_task(runtime.run(stop), name=f"worker-{runtime.worker_id}"))
        if tasks:
            log.info("in-process workers started", count=len(tasks))
        yield
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.append(workers_ctx)
    app.add_routes(callback_routes(services.crypto, services.queue, services.metrics, settings, services.clock))
    app.add_routes(ops_routes(services))
    return app
