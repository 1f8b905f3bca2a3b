"""Run the server (and, without WeCom credentials, the sandbox) or standalone worker processes."""

from __future__ import annotations

import asyncio
import signal
from importlib import resources

import structlog
from aiohttp import web

from bot.app import create_app, open_services, sandbox_settings
from bot.settings import Settings, SettingsError
from bot.worker import WorkerRuntime

log = structlog.get_logger(__name__)

SANDBOX_PREFIX = "/sandbox/wecom"


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _announce_redis(settings: Settings) -> None:
    if settings.embedded_redis:
        log.warning(
            "REDIS_URL is unset: using in-process fakeredis. Single process only; queued work lives in this "
            "process's memory. Set REDIS_URL for production and for `wecom-bot worker`."
        )


def sandbox_page_routes() -> list[web.RouteDef]:
    page = resources.files("bot.web").joinpath("sandbox.html").read_bytes()

    async def sandbox_page(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def root(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/sandbox")

    return [web.get("/sandbox", sandbox_page), web.get("/", root)]


def attach_sandbox(app: web.Application, settings: Settings, bot_port: int) -> None:
    """Mount the WeCom simulator under /sandbox/wecom and the chat page at /sandbox."""
    from bot.wecom.simulator import SimulatorConfig, create_simulator

    config = SimulatorConfig(
        corp_id=settings.wecom_corp_id,
        agent_id=settings.wecom_agent_id or 0,
        token=settings.wecom_token,
        aes_key=settings.wecom_aes_key,
        callback_url=f"http://127.0.0.1:{bot_port}/wecom/callback",
        secrets={settings.wecom_secret: "app", settings.kf_secret: "kf"},
    )
    app.add_subapp(SANDBOX_PREFIX, create_simulator(config))
    app.add_routes(sandbox_page_routes())


async def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM."""
    sandbox = settings.sandbox
    if sandbox:
        settings = sandbox_settings(settings).model_copy(
            update={"wecom_api_base": f"http://127.0.0.1:{settings.bot_port}{SANDBOX_PREFIX}"}
        )
        log.warning(
            "SANDBOX MODE: no WeCom credentials (WECOM_CORP_ID / WECOM_SECRET), so the bot talks to its built-in "
            "WeCom simulator",
            chat_page=f"http://127.0.0.1:{settings.bot_port}/sandbox",
        )
    _announce_redis(settings)
    async with open_services(settings) as services:
        app = create_app(services)
        if sandbox:
            attach_sandbox(app, settings, settings.bot_port)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.bot_host, settings.bot_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SettingsError(f"BOT_PORT: cannot listen on {settings.bot_host}:{settings.bot_port} ({exc.strerror})")
        log.info(
            "wecom-bot listening",
            callback=f"http://{settings.bot_host}:{settings.bot_port}/wecom/callback",
            database=settings.database_url.split("://", 1)[0],
            workers_in_process=settings.worker_concurrency,
        )
        stop = _stop_event()
        await stop.wait()
        log.info("shutting down")
        await runner.cleanup()


async def run_workers(settings: Settings, count: int) -> None:
    """Consume the queue in this process until SIGINT/SIGTERM (scale-out beside the server)."""
    if settings.embedded_redis:
        raise SettingsError(
            "REDIS_URL: `wecom-bot worker` needs a shared Redis; the in-process fakeredis cannot be shared"
        )
    if settings.sandbox:
        raise SettingsError("WECOM_CORP_ID: `wecom-bot worker` needs real WeCom credentials (sandbox runs in serve)")
    async with open_services(settings) as services:
        stop = _stop_event()
        runtimes = [
            WorkerRuntime(
                services.redis,
                services.keys,
                settings,
                services.pipeline.process,
                metrics=services.metrics,
                clock=services.clock,
            )
            for _ in range(count)
        ]
        log.info("workers started", count=count, ids=[r.worker_id for r in runtimes])
        await asyncio.gather(*(runtime.run(stop) for runtime in runtimes))
