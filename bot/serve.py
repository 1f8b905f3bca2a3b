"""Run the server (and, without WeCom credentials, the sandbox) or standalone worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import signal
import socket
from collections.abc import Awaitable, Callable
from importlib import resources

import structlog
from aiohttp import web

from bot.settings import Settings, SettingsError

# bot.app and bot.worker (SQLAlchemy, Alembic, wechatpy: seconds of imports) load inside the functions that
# need them, so `wecom-bot chat` and `--help` can use the helpers here and still start at once.

log = structlog.get_logger(__name__)

SANDBOX_PREFIX = "/sandbox/wecom"
LISTEN_BACKLOG = 128
# In-flight requests get this long to finish after SIGTERM; sandbox long-polls are answered at once.
SHUTDOWN_GRACE_S = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def connect_host(bind_host: str) -> str:
    """The host a client on this machine uses to reach a server bound to `bind_host` (URL-ready)."""
    if bind_host in ("", "0.0.0.0"):  # noqa: S104 - comparing, not binding
        return "127.0.0.1"
    if bind_host == "::":
        return "[::1]"
    if ":" in bind_host:
        return f"[{bind_host}]"
    return bind_host


def local_base_url(settings: Settings) -> str:
    """The server's base URL as seen from this machine (never http://0.0.0.0)."""
    return f"http://{connect_host(settings.bot_host)}:{settings.bot_port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket before anything else starts, so a busy port fails fast and clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SettingsError(f"BOT_HOST: cannot resolve {host!r} ({exc.strerror})") from None
    try:
        return socket.create_server(
            (host, port),
            family=family,
            backlog=LISTEN_BACKLOG,
            dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SettingsError(
                f"BOT_PORT: port {port} is already in use on {host} (is another wecom-bot running? "
                "set BOT_PORT to a free port)"
            ) from None
        if exc.errno == errno.EACCES:
            raise SettingsError(f"BOT_PORT: no permission to listen on port {port} (use a port above 1023)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise SettingsError(f"BOT_HOST: {host} is not an address of this machine") from None
        raise SettingsError(f"BOT_HOST/BOT_PORT: cannot listen on {host}:{port} ({exc.strerror})") from None


def _announce_redis(settings: Settings) -> None:
    if settings.embedded_redis:
        log.warning(
            "REDIS_URL is unset: using fakeredis, in-process. Single process only: the queue lives in this "
            "process's memory and is lost on exit, and `wecom-bot worker` cannot join. Set REDIS_URL for production."
        )


def sandbox_page_routes() -> list[web.RouteDef]:
    page = resources.files("bot.web").joinpath("sandbox.html").read_bytes()

    async def sandbox_page(_request: web.Request) -> web.Response:
        return web.Response(
            body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"}
        )

    async def root(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/sandbox")

    return [web.get("/sandbox", sandbox_page), web.get("/", root)]


def _sandbox_credentials_route(settings: Settings, callback_url: str) -> web.RouteDef:
    """The throw-away credentials of this run (valid only against the built-in simulator), for other tools."""
    body = {
        "corp_id": settings.wecom_corp_id,
        "agent_id": settings.wecom_agent_id,
        "token": settings.wecom_token,
        "encoding_aes_key": settings.wecom_aes_key,
        "app_secret": settings.wecom_secret,
        "kf_secret": settings.kf_secret,
        "api_base": settings.wecom_api_base,
        "callback_url": callback_url,
    }

    async def credentials(_request: web.Request) -> web.Response:
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    return web.get("/sandbox/credentials", credentials)


def _answer_long_polls_on_shutdown(app: web.Application, simulator: web.Application) -> None:
    """Simulator requests (long-polls up to 60 s) end with 503 as soon as shutdown starts, not at their timeout.

    The middleware belongs to the simulator's sub-application, so it runs only for its requests and the root
    application keeps no middleware (which the callback fast path needs, see `install_callback_fast_path`).
    """
    stopping = asyncio.Event()

    async def on_shutdown(_app: web.Application) -> None:
        stopping.set()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        work = asyncio.ensure_future(handler(request))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return web.json_response({"error": "the bot is shutting down"}, status=503, headers={"Connection": "close"})

    app.on_shutdown.append(on_shutdown)
    simulator.middlewares.insert(0, middleware)  # outermost, as it was on the root application


def attach_sandbox(app: web.Application, settings: Settings) -> None:
    """Mount the WeCom simulator under /sandbox/wecom and the chat page at /sandbox."""
    from bot.app import SANDBOX_AGENT_ID
    from bot.wecom.simulator import SimulatorConfig, create_simulator

    callback_url = f"{local_base_url(settings)}/wecom/callback"
    config = SimulatorConfig(
        corp_id=settings.wecom_corp_id,
        agent_id=settings.wecom_agent_id or SANDBOX_AGENT_ID,
        token=settings.wecom_token,
        aes_key=settings.wecom_aes_key,
        callback_url=callback_url,
        secrets={settings.wecom_secret: "app", settings.kf_secret: "kf"},
    )
    simulator = create_simulator(config)
    _answer_long_polls_on_shutdown(app, simulator)
    app.add_subapp(SANDBOX_PREFIX, simulator)
    app.add_routes([*sandbox_page_routes(), _sandbox_credentials_route(settings, callback_url)])


async def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM."""
    from bot.app import create_app, open_services, sandbox_settings
    from bot.ingress import install_callback_fast_path

    stop = _stop_event()  # first, so a SIGTERM during start-up still ends in a clean shutdown
    sock = bind_socket(settings.bot_host, settings.bot_port)  # fail fast on a busy port, before any work
    sandbox = settings.sandbox
    local = local_base_url(settings)
    if sandbox:
        settings = sandbox_settings(settings).model_copy(update={"wecom_api_base": f"{local}{SANDBOX_PREFIX}"})
        log.warning(
            "SANDBOX MODE: no WeCom credentials (WECOM_CORP_ID / WECOM_SECRET are unset), so the bot talks to its "
            "built-in WeCom simulator. Chat in a browser or with `wecom-bot chat`",
            chat_page=f"{local}/sandbox",
        )
    _announce_redis(settings)
    try:
        async with open_services(settings) as services:
            app = create_app(services)
            if sandbox:
                attach_sandbox(app, settings)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
            await runner.setup()
            fast_path = install_callback_fast_path(runner)
            try:
                site = web.SockSite(runner, sock)
                await site.start()
                _settle_heap()
                public = settings.bot_public_url or local
                log.info(
                    "wecom-bot listening",
                    listen=f"{settings.bot_host}:{settings.bot_port}",
                    callback_url=f"{public}/wecom/callback",
                    database=settings.database_url.split("://", 1)[0],
                    redis="fakeredis (in-process)" if settings.embedded_redis else "redis",
                    workers_in_process=settings.worker_concurrency,
                    callback_fast_path=fast_path,
                )
                if not sandbox and not settings.bot_public_url:
                    log.warning(
                        "BOT_PUBLIC_URL is unset: register https://<your public address>/wecom/callback as the "
                        "callback URL in the WeCom admin console"
                    )
                await stop.wait()
                log.info("shutting down")
            finally:
                await runner.cleanup()
    finally:
        sock.close()
    log.info("stopped")


def _settle_heap() -> None:
    """Move everything start-up allocated out of the garbage collector's sight.

    Libraries leave hundreds of thousands of long-lived objects behind; a full collection walking them all
    stalls the loop for tens of milliseconds, which shows up as callback ack latency spikes.
    """
    gc.collect()
    gc.freeze()


async def run_workers(settings: Settings, count: int) -> None:
    """Consume the queue in this process until SIGINT/SIGTERM (scale-out beside the server)."""
    from bot.app import open_services
    from bot.worker import WorkerRuntime

    if settings.embedded_redis:
        raise SettingsError(
            "REDIS_URL: `wecom-bot worker` needs a shared Redis; the in-process fakeredis cannot be shared"
        )
    if settings.sandbox:
        raise SettingsError("WECOM_CORP_ID: `wecom-bot worker` needs real WeCom credentials (sandbox runs in serve)")
    if count < 1:
        raise SettingsError("--count: must be at least 1")
    stop = _stop_event()
    async with open_services(settings) as services:
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
        await asyncio.gather(services.scripts_watcher.run(stop), *(runtime.run(stop) for runtime in runtimes))
    log.info("workers stopped")
