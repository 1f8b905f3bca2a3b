"""The composition root: builds every service from settings and serves them as one aiohttp app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.admin_api import create_api_app
from bot.console import create_console_app
from bot.console.events import ConsoleEventPublisher
from bot.console.handoff_actions import HandoffConsoleActions
from bot.csat import CsatService
from bot.handoff import HandoffService
from bot.ingress import callback_routes
from bot.kf_sync import KfPuller
from bot.leader import LeaderElection
from bot.llm import IntentRouter
from bot.member_cards import CardBudget
from bot.metrics import Metrics
from bot.ops import ops_routes
from bot.outbound import WeComSender
from bot.pipeline import Pipeline
from bot.post_delivery import (
    AudienceGate,
    DeliveryAudienceFacts,
    DeliveryConfig,
    PostDeliveryEngine,
    audience_rules,
)
from bot.queue import InboundQueue
from bot.redis_conn import create_redis
from bot.redis_keys import RedisKeys
from bot.reminders import ReminderService
from bot.scripts_overlay import EMPTY_OVERLAY, Overlay, RevisionOverlaySource
from bot.scripts_reload import ScriptsWatcher, Snapshot, StatSignature, load_with_snapshot, problems_summary
from bot.settings import Settings, SettingsError
from bot.sidebar import create_sidebar_app
from bot.sla_store import SlaStore
from bot.sla_sweep import RedisLock, SlaSweeper, sweep_ctx
from bot.storage.csat_repository import CsatRepository
from bot.storage.db import create_engine, create_session_factory, schema_status, upgrade_async
from bot.storage.handoff_repository import HandoffRepository, SlaRepository
from bot.storage.posts_repository import PostRepository
from bot.storage.repositories import Repositories
from bot.storage.subscription_repository import SubscriptionRepository
from bot.storage.tags_repository import TagRepository
from bot.support_config import SupportConfig, SupportConfigError, load_support_config
from bot.tag_sync import CorpTagSyncer
from bot.wecom.client import RobotClient, WeComClient
from bot.wecom.crypto import CallbackCrypto
from bot.worker import WorkerRuntime
from handlers.dispatcher import Dispatcher
from handlers.domain import Clock, SystemClock
from handlers.reminders import ReminderConfig
from handlers.scripted import contact_added_without_welcome_code, contact_welcome, kf_welcome, scripted_reply
from handlers.tags import TagConfig
from scheduler.runner import RecomputeSchedule, add_reminders_job, build_post_scheduler, build_scheduler
from scripts_library import Library, Matcher, Problem

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


class ScriptLibraryError(SettingsError):
    """SCRIPTS_PATH names a library the validator refuses; start-up stops with every problem listed."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        shown = [f"  {problem}" for problem in problems[:50]]
        if len(problems) > len(shown):
            shown.append(f"  ... and {len(problems) - len(shown)} more")
        super().__init__(
            f"SCRIPTS_PATH: the script library at {path} is invalid ({len(problems)} problem(s); "
            "`wecom-bot scripts validate` shows them too):\n" + "\n".join(shown)
        )
        self.path = path
        self.problems = problems


@dataclass(frozen=True, slots=True)
class LoadedScripts:
    """The library in use with its matcher and where it came from; replaced whole, never mutated.

    `files_library` and `files_fingerprint` are the YAML files' part alone, so a run-time edit (the overlay)
    is applied without reading the files again.
    """

    matcher: Matcher
    fingerprint: str
    loaded_at: float
    signature: StatSignature = ()
    files_library: Library | None = None
    files_fingerprint: str = ""
    overlay: Overlay = EMPTY_OVERLAY


class ScriptBook:
    """The script library in use, with its matcher; `reload()` swaps both at once or keeps the last good one.

    Readers take `matcher` once per message (it carries its library), so a reload between two messages is
    atomic for each of them: the swap is one assignment of an immutable LoadedScripts.
    """

    def __init__(
        self, path: Path, library: Library, *, snapshot: Snapshot | None = None, loaded_at: float | None = None
    ) -> None:
        self.path = path
        snap = snapshot or Snapshot((), "")
        self._current = LoadedScripts(
            Matcher(library),
            snap.fingerprint,
            time.time() if loaded_at is None else loaded_at,
            snap.signature,
            files_library=library,
            files_fingerprint=snap.fingerprint,
        )
        self._lock = threading.Lock()
        self.last_problems: list[Problem] = []
        self.last_error_at: float | None = None
        self.checked_at: float | None = None
        self.cluster_fingerprint: str | None = None  # what Redis says the fleet runs (None: unknown)

    @classmethod
    def load(cls, path: Path) -> ScriptBook:
        """Load and validate the library at path; ScriptLibraryError lists the problems when it is invalid."""
        snap, result = load_with_snapshot(path)
        if not isinstance(result, Library):
            raise ScriptLibraryError(path, result)
        log.info("script library loaded", path=str(path), scripts=len(result.scripts), fingerprint=snap.fingerprint)
        return cls(path, result, snapshot=snap)

    @property
    def current(self) -> LoadedScripts:
        return self._current

    @property
    def matcher(self) -> Matcher:
        return self._current.matcher

    @property
    def library(self) -> Library:
        return self._current.matcher.library

    @property
    def fingerprint(self) -> str:
        return self._current.fingerprint

    @property
    def signature(self) -> StatSignature:
        return self._current.signature

    @signature.setter
    def signature(self, value: StatSignature) -> None:
        """Same content, new stat signature (a touch): recorded so the next check is cheap again."""
        with self._lock:
            self._current = dataclasses.replace(self._current, signature=value)

    def apply(
        self,
        result: Matcher | Library | list[Problem],
        snapshot: Snapshot,
        *,
        loaded_at: float | None = None,
        files: tuple[str, Library] | None = None,
        overlay: Overlay | None = None,
    ) -> bool:
        """Swap in a loaded library (or its prebuilt matcher), or keep the last good one and log why.

        True when swapped. The watcher passes a Matcher built in its worker thread, so the swap itself is cheap.
        """
        matcher = Matcher(result) if isinstance(result, Library) else result
        with self._lock:
            if not isinstance(matcher, Matcher):
                self.last_problems = matcher
                self.last_error_at = time.time() if loaded_at is None else loaded_at
                log.warning(
                    "script library invalid; keeping the last good one",
                    path=str(self.path),
                    problems=problems_summary(matcher),
                    count=len(matcher),
                    serving=self._current.fingerprint,
                )
                return False
            files_fingerprint, files_library = files or (snapshot.fingerprint, matcher.library)
            self._current = LoadedScripts(  # one reference swap: readers see the old or the new, never a mix
                matcher,
                snapshot.fingerprint,
                time.time() if loaded_at is None else loaded_at,
                snapshot.signature,
                files_library=files_library,
                files_fingerprint=files_fingerprint,
                overlay=self._current.overlay if overlay is None else overlay,
            )
            self.last_problems = []
            log.info(
                "script library reloaded",
                path=str(self.path),
                scripts=len(matcher.library.scripts),
                fingerprint=snapshot.fingerprint,
            )
            return True

    def reload(self) -> bool:
        """Load the library again (blocking); on problems keep serving the last good one and log why."""
        snap, result = load_with_snapshot(self.path)
        return self.apply(result, snap)

    def status(self) -> dict[str, object]:
        """For /scripts/status and /readyz: what is served, and whether the files on disk are good."""
        current = self._current
        return {
            "status": "error" if self.last_problems else "ok",
            "path": str(self.path),
            "fingerprint": current.fingerprint,
            "cluster_fingerprint": self.cluster_fingerprint,
            "scripts": len(current.matcher.library.scripts),
            "loaded_at": current.loaded_at,
            "checked_at": self.checked_at,
            "last_error_at": self.last_error_at if self.last_problems else None,
            "problems": problems_summary(self.last_problems),
            "problem_count": len(self.last_problems),
        }


def build_dispatcher() -> Dispatcher:
    """Handlers in the order they are tried; the first that answers wins.

    1. kf enter_session with a welcome_code → welcome through send_msg_on_event
    2. 客户联系 add_external_contact with a WelcomeCode → welcome through send_welcome_msg
    3. add_external_contact without one → nothing sent (WeCom says the welcome is not ours, reference §3.1)
    4. customer text (kf origin 3) and app messages, menu clicks included → the matched script, else no_match
    Everything else (kf origin 4/5, other events) falls through unanswered.
    """
    return Dispatcher([kf_welcome, contact_welcome, contact_added_without_welcome_code, scripted_reply])


class TagRecomputeAdapter:
    """The TagRepository as scheduler.jobs.TagRecomputePort, with the configured thresholds."""

    def __init__(self, repository: TagRepository, config: TagConfig) -> None:
        self._repository = repository
        self._config = config

    async def customers_needing_recompute(
        self, stale_before: datetime, *, after_id: int = 0, limit: int = 1000
    ) -> list[int]:
        return await self._repository.customers_needing_recompute(stale_before, after_id=after_id, limit=limit)

    async def recompute(self, customer_id: int, now: datetime) -> frozenset[str] | None:
        return await self._repository.recompute_computed_tags(customer_id, now, self._config)


def recompute_schedule(settings: Settings) -> RecomputeSchedule:
    return RecomputeSchedule(
        cron=settings.tag_recompute_cron,
        timezone=settings.tag_recompute_timezone,
        page_size=settings.tag_recompute_page_size,
        max_customers=settings.tag_recompute_max_customers,
    )


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
    scripts: ScriptBook
    scripts_watcher: ScriptsWatcher
    workers: list[WorkerRuntime] = field(default_factory=list)
    handoff: HandoffService | None = None
    csat: CsatService | None = None


def _support_config(settings: Settings) -> SupportConfig:
    """The handoff configuration; an invalid file stops start-up with every problem listed."""
    try:
        return load_support_config(settings.support_config_path or None)
    except SupportConfigError as exc:
        raise SettingsError(
            "SUPPORT_CONFIG_PATH: the support configuration is invalid:\n" + "\n".join(f"  {p}" for p in exc.problems)
        ) from None


async def ensure_schema(engine: AsyncEngine, settings: Settings) -> None:
    """SQLite (the embedded trial) is migrated on start; PostgreSQL must be migrated explicitly."""
    status = await schema_status(engine)
    if status == "current":
        return
    if settings.sqlite_path() is not None or settings.auto_migrate:
        log.info("applying database migrations", status=status)
        await upgrade_async(engine)
        return
    raise SchemaNotReadyError(f"database schema is {status}: run `wecom-bot migrate` first (or set AUTO_MIGRATE=true)")


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, *, clock: Clock | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Services]:
    """Open every resource for `settings` and close them in reverse order."""
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    scripts = ScriptBook.load(settings.scripts_dir)  # before any resource: an invalid library stops start-up
    support = _support_config(settings)
    keys = RedisKeys(settings.redis_key_prefix)
    redis = create_redis(settings)
    engine = create_engine(settings)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.http_timeout_s))
    intent = IntentRouter.from_settings(settings, redis, keys, clock)  # None unless OPENAI_BASE_URL + OPENAI_MODEL
    try:
        await ensure_schema(engine, settings)
        sessions = create_session_factory(engine)
        repos = Repositories.create(sessions, clock)
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
        # Handoff: the support config, SLA store and the handoff service the pipeline and the console call.
        handoff = HandoffService(
            repos,
            HandoffRepository(sessions, clock),
            SlaStore(SlaRepository(sessions, clock), support),
            support,
            kf_client,
            sender,
            clock,
            console_base_url=settings.bot_public_url or f"http://localhost:{settings.bot_port}",
            drain_lock=RedisLock(redis, keys.handoff_drain_lock()),
            events=ConsoleEventPublisher(redis, keys.prefix),
            card_budget=CardBudget(redis, keys, clock),
        )
        csat = CsatService(CsatRepository(sessions, clock), repos, sender, clock, default_team=support.default_team)
        # 客户联系 APIs take the app secret's token.
        tag_syncer = CorpTagSyncer(app_client, repos, sessions, clock=clock)
        pipeline = Pipeline(
            repos,
            build_dispatcher(),
            sender,
            puller,
            clock,
            scripts=scripts,
            tag_syncer=tag_syncer,
            tag_config=settings.tag_config,  # computed tags recomputed on the events that change them
            handoff=handoff,
            csat=csat,
            subscriptions=SubscriptionRepository(sessions, clock),  # 退订 / 订阅 before script matching
            intent=intent,  # LLM intent routing when keywords match nothing (docs/llm.md)
        )
        crypto = CallbackCrypto(settings.wecom_token, settings.wecom_aes_key, settings.wecom_corp_id)
        scripts_watcher = ScriptsWatcher(
            scripts,
            redis,
            keys,
            interval_s=settings.scripts_reload_interval_s,
            clock=clock,
            metrics=metrics,
            overlay_source=RevisionOverlaySource(repos.script_revisions),
        )
        await scripts_watcher.check_once()  # run-time edits from the database apply before anything is served
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
            scripts=scripts,
            scripts_watcher=scripts_watcher,
            handoff=handoff,
            csat=csat,
        )
    finally:
        if intent is not None:
            await intent.aclose()
        await http.close()
        await engine.dispose()
        await redis.aclose()


SERVICES = web.AppKey("services", Services)


def build_post_engine(services: Services) -> PostDeliveryEngine:
    """The scheduled-post delivery engine over the process's services (settings: POSTS_*)."""
    settings = services.settings
    config = DeliveryConfig(
        grace=timedelta(seconds=settings.posts_grace_s),
        lease=timedelta(seconds=settings.posts_lease_s),
        max_attempts=settings.posts_max_attempts,
        retry_base=timedelta(seconds=settings.posts_retry_base_s),
        retry_cap=timedelta(seconds=settings.posts_retry_cap_s),
        robot_per_minute=settings.posts_robot_per_minute,
        staff_per_minute=settings.posts_staff_per_minute,
        mass_poll_interval=timedelta(seconds=settings.posts_mass_poll_interval_s),
        mass_remind_after=timedelta(seconds=settings.posts_mass_remind_after_s),
        mass_deadline=timedelta(seconds=settings.posts_mass_deadline_s),
        agent_id=settings.wecom_agent_id,
        audience_max_hold=timedelta(seconds=settings.audience_max_hold_s),
    )
    # The robot client never retries by itself: after a timeout WeCom may have posted, and the engine decides.
    robot = RobotClient(services.http, settings.wecom_api_base, metrics=services.metrics, max_retries=0)
    sessions = create_session_factory(services.engine)
    repo = PostRepository(sessions, services.clock)
    # Quiet hours, daily caps, opt-out and de-duplication for customer-facing sends (AUDIENCE_*, docs/audience.md).
    rules = audience_rules(
        quiet_hours=settings.audience_quiet_hours,
        customer_daily_cap=settings.audience_customer_daily_cap,
        group_daily_cap=settings.audience_group_daily_cap,
        dedupe_window_s=settings.audience_dedupe_window_s,
    )
    facts = DeliveryAudienceFacts(repo, SubscriptionRepository(sessions, services.clock))
    return PostDeliveryEngine(
        repo,
        app=services.app_client,
        kf=services.kf_client,
        robot=robot,
        redis=services.redis,
        keys=services.keys,
        config=config,
        audience=AudienceGate(rules, facts),
    )


def build_reminders(services: Services) -> ReminderService:
    """Reminder posts (digest, churn recall, repurchase) over the process's services (settings: REMINDERS_*)."""
    settings = services.settings
    config = ReminderConfig(
        repurchase_days=settings.reminders_repurchase_days, recall_cooldown_days=settings.reminders_recall_cooldown_days
    )
    sessions = create_session_factory(services.engine)
    return ReminderService(sessions, services.clock, config, owner=settings.reminders_owner)


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

    async def scripts_reload_ctx(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(services.scripts_watcher.run(stop), name="scripts-reload")
        yield
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    async def tag_recompute_ctx(app: web.Application) -> AsyncIterator[None]:
        port = TagRecomputeAdapter(services.repos.tags, settings.tag_config)
        scheduler = build_scheduler(port, recompute_schedule(settings))
        scheduler.start()
        log.info("scheduler started", jobs=[job.id for job in scheduler.get_jobs()])
        yield
        scheduler.shutdown(wait=False)

    async def posts_ctx(app: web.Application) -> AsyncIterator[None]:
        # The leader election loop, and the post tick that runs the delivery engine on the leader only.
        engine = build_post_engine(services)
        leader = LeaderElection(
            services.redis, services.keys.scheduler_leader(), services.clock, ttl_ms=settings.scheduler_leader_ttl_ms
        )
        stop = asyncio.Event()
        election = asyncio.create_task(leader.run(stop), name="scheduler-leader")
        scheduler = build_post_scheduler(
            engine,
            leader,
            interval_s=settings.posts_tick_interval_s,
            now=lambda: datetime.fromtimestamp(services.clock.now(), UTC),
        )
        if settings.reminders_enabled:  # the day's reminder posts, created on the leader (docs/scheduling.md)
            add_reminders_job(
                scheduler,
                build_reminders(services),
                leader,
                cron=settings.reminders_cron,
                now=lambda: datetime.fromtimestamp(services.clock.now(), UTC),
            )
        scheduler.start()
        yield
        scheduler.shutdown(wait=False)
        stop.set()
        await asyncio.gather(election, return_exceptions=True)

    app.cleanup_ctx.append(workers_ctx)
    app.cleanup_ctx.append(scripts_reload_ctx)
    app.cleanup_ctx.append(  # the SLA sweep and the queue drain, every second
        sweep_ctx(lambda: SlaSweeper(services.handoff, services.clock) if services.handoff else None)
    )
    if settings.tag_recompute_enabled:
        app.cleanup_ctx.append(tag_recompute_ctx)
    if settings.posts_enabled:
        app.cleanup_ctx.append(posts_ctx)
    app.add_routes(callback_routes(services.crypto, services.queue, services.metrics, settings, services.clock))
    app.add_routes(ops_routes(services))
    app.add_subapp("/api", create_api_app(services))
    actions = (
        HandoffConsoleActions(services.handoff, services.redis, services.keys.prefix, csat=services.csat)
        if services.handoff is not None
        else None
    )
    app.add_subapp("/console", create_console_app(services, actions=actions))
    app.add_subapp("/sidebar", create_sidebar_app(services))
    return app
