"""Scheduled-post benchmark: 10,000 robot posts due within one minute across 200 robots, plus 5,000 customer touches.

    .venv/bin/python bench/schedule.py                  # the issue's load: about 8 minutes
    .venv/bin/python bench/schedule.py --posts 1000 --robots 50 --touches 500 --segments 5   # quick look

One process, one event loop, the real wall clock (no accelerated clock: the engine, Redis's rate windows and the
simulator all read `time.time()`):

1. A throw-away PostgreSQL database (dropped afterwards), real Redis under a unique key prefix (deleted
   afterwards), the in-process WeCom simulator on 127.0.0.1, which enforces 20 webhook/send per robot key per
   minute (45009 beyond) and each 微信客服 customer's 48 h window and quota. The real services
   (`bot.app.open_services`) point at it.
2. `--robots` group robots registered by name (`PostRepository.add_robot`), and `--posts` one-off text posts, one
   robot each (round robin), slots uniform over `--spread` seconds (60) starting `--lead` seconds after setup.
3. Customer touches: `--touches` 微信客服 customers, each of whom wrote once (in the simulator, and recorded in the
   database through `MessageRepository.record_inbound`, so they are inside their 48 h window), tagged into
   `--segments` segments; one segment post per segment, slots in the same minute. A touch is one
   `kf/send_msg` to one customer (the engine's segment channel). SOP touch plans are not built yet, so these are
   the customer touches the engine can make today.
4. What `wecom-bot serve` runs for scheduled posts: a `LeaderElection` on real Redis and the APScheduler post-tick
   job (`build_post_scheduler`, every `--tick` seconds, `max_instances=1`, `coalesce`) around the engine from
   `bot.app.build_post_engine` (production config: 20/min per robot, grace 15 min, claim batch 500), with the
   audience policy switched off through its settings (AUDIENCE_QUIET_HOURS="", caps and de-dup window 0): the
   bench measures delivery within WeCom's limits, and 50 posts a robot would otherwise hit the group daily cap
   (and a night-time run would be held by quiet hours).
5. Baseline, same run, afterwards: the same slot offsets for a second set of robot keys, each message sent by a
   bare `webhook/send` POST at the earliest instant the 20/min limit allows (asyncio timers; a send whose 20th
   predecessor was answered late waits for that one to leave WeCom's minute, as it must), and the
   same customers touched by bare `kf/send_msg` calls at their slot. Its lateness is the harness's own floor
   (event loop, simulator, HTTP) on the same machine at the same time of day.

Measures (from the simulator's record of each accepted call, `at` by the same clock):
- lateness against the earliest time the rate limits allow: per robot, the slots sorted give e_k =
  max(slot_k, e_{k-20} + 60 s) (the k-th message cannot go before the 20th-previous one has left the sliding
  minute; for slots all within one minute this is slot + floor(k/20) min, or later); the k-th accepted send of
  that robot in time order is compared with e_k. A customer touch's earliest time is its slot (no per-minute
  limit on kf sends);
- duplicates (an accepted call beyond the first for one post and target, or one customer and segment post)
  and losses (none accepted by the end), both must be 0; 45009 refusals (the engine must never exceed 20/min);
- per-tick time and the engine's phases (materialise, missed, reclaim, mass tasks, send), timed by wrapping the
  engine's methods from outside; CPU of this process and of PostgreSQL and Redis; `--profile FILE` cProfiles
  the engine phase.
Exit status 1 if a duplicate, a loss or a 45009 is seen, or the engine did not finish within `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import pstats
import random
import secrets
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # type: ignore[import-untyped]  # noqa: E402
import structlog  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.measure import LogCounter, cpu_of, pct, summary  # noqa: E402
from bot.app import Services, build_post_engine, open_services  # noqa: E402
from bot.leader import LeaderElection  # noqa: E402
from bot.logs import configure_logging  # noqa: E402
from bot.post_delivery import PostDeliveryEngine  # noqa: E402
from bot.settings import load_settings  # noqa: E402
from bot.storage.db import create_session_factory  # noqa: E402
from bot.storage.models import TargetKind  # noqa: E402
from bot.storage.posts_repository import NewTarget, PostRepository  # noqa: E402
from bot.wecom.simulator import SIM_STATE, SimulatorConfig, SimulatorState, create_simulator  # noqa: E402
from bot.wecom.simulator import push_kf_customer_message as push_customer  # noqa: E402
from handlers.domain import Channel, InboundMessage, KfOrigin, SystemClock  # noqa: E402
from scheduler.runner import build_post_scheduler  # noqa: E402
from scheduler.slots import Rule  # noqa: E402
from tests.conftest import (  # noqa: E402
    TEST_AES_KEY,
    TEST_AGENT_ID,
    TEST_CORP_ID,
    TEST_KF_SECRET,
    TEST_SECRET,
    TEST_TOKEN,
)

KFID = "wkBENCHSCHED0001"
OWNER = "owner"
PER_MINUTE = 20
MINUTE = 60.0
PHASES = ("_materialise", "_mark_missed", "_reclaim", "_poll_mass_tasks", "_send_due", "_flush_notices")

# --------------------------------------------------------------------------------------------------- helpers


def own_cpu() -> float:
    usage = os.times()
    return usage.user + usage.system


def earliest(slots: list[float], per_minute: int = PER_MINUTE) -> list[float]:
    """The earliest send instant of each message of one robot, slots sorted: e_k = max(slot_k, e_{k-n} + 60)."""
    out: list[float] = []
    for k, slot in enumerate(sorted(slots)):
        out.append(max(slot, out[k - per_minute] + MINUTE) if k >= per_minute else slot)
    return out


class SkippedRuns(logging.Filter):
    """Counts APScheduler's "skipped: maximum number of running instances" (a tick longer than the interval)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "maximum number of running instances" in record.getMessage():
            self.count += 1
            return False
        return True


SKIPPED = SkippedRuns()


async def bounded(limit: int, jobs: list[Callable[[], Awaitable[Any]]]) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(one(job) for job in jobs))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------- the plan


class Plan:
    """Slot offsets (seconds after T0) for robot posts and segment posts, and who is in which segment."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = random.Random(args.seed)
        self.robot_of = [i % args.robots for i in range(args.posts)]
        self.post_offset = [rng.uniform(0, args.spread) for _ in range(args.posts)]
        self.segment_offset = [rng.uniform(0, args.spread) for _ in range(args.segments)]
        self.customers = [f"wmSched{i:05d}" for i in range(args.touches)]
        self.segment_of = [i % args.segments for i in range(args.touches)]

    def earliest_end(self, robots: int) -> float:
        """Offset of the last earliest-allowed send (how long the baseline needs after T0)."""
        by_robot: dict[int, list[float]] = defaultdict(list)
        for post, robot in enumerate(self.robot_of):
            by_robot[robot].append(self.post_offset[post])
        ends = [earliest(slots)[-1] for slots in by_robot.values()] + self.segment_offset
        return max(ends, default=0.0)


def robot_lateness(
    sends: dict[str, list[float]], slots: dict[str, list[float]]
) -> tuple[list[float], list[float], int]:
    """Per robot key: k-th accepted send (time order) minus e_k. Returns (lateness, raw delay vs slot, too early)."""
    late: list[float] = []
    raw: list[float] = []
    early = 0
    for key, planned in slots.items():
        allowed = earliest(planned)
        actual = sorted(sends.get(key, []))
        for k, at in enumerate(actual[: len(allowed)]):
            late.append(at - allowed[k])
            raw.append(at - sorted(planned)[k])
            early += at < allowed[k] - 0.001
    return late, raw, early


# --------------------------------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace, services: Services, sim: SimulatorState, sim_url: str) -> None:
        self.args = args
        self.services = services
        self.sim = sim
        self.sim_url = sim_url
        self.plan = Plan(args)
        self.repo = PostRepository(create_session_factory(services.engine), services.clock)
        self.problems: list[str] = []

    # ---- setup --------------------------------------------------------------------------------------------

    async def setup_customers(self) -> None:
        messages, tags = self.services.repos.messages, self.services.repos.tags
        now = int(time.time())

        async def one(i: int, customer: str) -> None:
            record = await messages.record_inbound(
                InboundMessage(
                    channel=Channel.KF,
                    msgid=f"in-{customer}",
                    sender_id=customer,
                    account_id=KFID,
                    msgtype="text",
                    created_at=now,
                    text="你好",
                    origin=KfOrigin.CUSTOMER,
                )
            )
            assert record.customer_id is not None
            await tags.set_bot_tag(record.customer_id, f"seg{self.plan.segment_of[i]:03d}")

        for customer in self.plan.customers:
            push_customer(self.sim, customer, "你好", open_kfid=KFID)  # opens the 48 h window at "WeCom"
        await bounded(8, [lambda i=i, c=c: one(i, c) for i, c in enumerate(self.plan.customers)])

    async def setup_posts(self, t0: float) -> None:
        args = self.args
        for r in range(args.robots):
            await self.repo.add_robot(f"robot{r:03d}", engine_key(r))
        jobs: list[Callable[[], Awaitable[Any]]] = []
        for i in range(args.posts):
            jobs.append(
                lambda i=i: self.repo.add_post(
                    owner=OWNER,
                    title=f"post{i}",
                    kind="text",
                    content={"text": f"bench post {i}"},
                    rule=Rule("at", at=datetime.fromtimestamp(t0 + self.plan.post_offset[i], UTC)),
                    targets=(NewTarget(TargetKind.ROBOT, f"robot{self.plan.robot_of[i]:03d}"),),
                )
            )
        for s in range(args.segments):
            jobs.append(
                lambda s=s: self.repo.add_post(
                    owner=OWNER,
                    title=f"segment{s}",
                    kind="text",
                    content={"text": f"bench touch {s}"},
                    rule=Rule("at", at=datetime.fromtimestamp(t0 + self.plan.segment_offset[s], UTC)),
                    targets=(NewTarget(TargetKind.SEGMENT, f"seg{s:03d}"),),
                )
            )
        random.Random(self.args.seed + 1).shuffle(jobs)  # robot and segment posts interleaved by id
        await bounded(8, jobs)

    # ---- the engine ---------------------------------------------------------------------------------------

    async def run_engine(self, t0: float, seq0: int) -> dict[str, Any]:
        args = self.args
        services = self.services
        engine = build_post_engine(services)
        phase_s: dict[str, list[float]] = defaultdict(list)
        ticks: list[tuple[float, float]] = []  # (start, seconds)
        instrument(engine, phase_s, ticks)
        leader = LeaderElection(services.redis, services.keys.scheduler_leader(), services.clock, ttl_ms=5000)
        stop = asyncio.Event()
        election = asyncio.create_task(leader.run(stop))
        scheduler = build_post_scheduler(
            engine, leader, interval_s=args.tick, now=lambda: datetime.fromtimestamp(time.time(), UTC)
        )
        profiler = cProfile.Profile() if args.profile else None
        cpu0, db0 = own_cpu(), cpu_of(("postgres", "redis-server"))
        wanted_robot = args.posts
        wanted_touch = args.touches
        scheduler.start()
        if profiler is not None:
            profiler.enable()
        deadline = time.monotonic() + args.max_seconds
        finished = False
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(5)
                robot, touch = self.accepted_counts(seq0, "bench post ", "bench touch ")
                rows = await self.row_states()
                log(
                    f"engine T0{time.time() - t0:+6.0f}s  robot sends {robot}/{wanted_robot}  touches "
                    f"{touch}/{wanted_touch}  rows {dict(rows)}  ticks {len(ticks)} "
                    f"(last {ticks[-1][1] * 1000 if ticks else 0:.0f} ms)"
                )
                if (
                    rows
                    and set(rows) <= {"sent", "failed", "skipped", "missed"}
                    and sum(rows.values()) >= (args.posts + args.segments)
                ):
                    finished = True
                    break
        finally:
            if profiler is not None:
                profiler.disable()
            scheduler.shutdown(wait=False)
            stop.set()
            await asyncio.gather(election, return_exceptions=True)
            await asyncio.sleep(0.5)  # let a tick in progress end
        cpu = own_cpu() - cpu0
        db_cpu = cpu_of(("postgres", "redis-server")) - db0
        if profiler is not None:
            profiler.dump_stats(args.profile)
            stats = pstats.Stats(profiler)
            stats.sort_stats("cumulative").print_stats(25)
        if not finished:
            self.problems.append(f"the engine did not finish within --max-seconds {args.max_seconds}")
        result = self.measure(t0, seq0, "bench post ", "bench touch ", engine_key)
        result.update(
            finished=finished,
            cpu_s=round(cpu, 1),
            postgres_redis_cpu_s=round(db_cpu, 1),
            rows=dict(await self.row_states()),
            holds=await self.scalar("SELECT coalesce(sum(holds), 0) FROM post_deliveries"),
            attempts=await self.scalar("SELECT coalesce(sum(attempts), 0) FROM post_deliveries"),
            ticks=summary([s for _, s in ticks]),
            tick_count=len(ticks),
            ticks_skipped=SKIPPED.count,
            phases_s={name.strip("_"): round(sum(v), 2) for name, v in phase_s.items()},
            phase_p50_ms={name.strip("_"): round(pct(v, 50) * 1000, 1) for name, v in phase_s.items()},
        )
        return result

    async def row_states(self) -> Counter[str]:
        async with self.services.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT state, count(*) FROM post_deliveries GROUP BY state"))).all()
        return Counter({str(state): int(n) for state, n in rows})

    async def scalar(self, sql: str) -> int:
        async with self.services.engine.connect() as conn:
            return int((await conn.execute(text(sql))).scalar_one())

    def accepted_counts(self, seq0: int, robot_prefix: str, touch_prefix: str) -> tuple[int, int]:
        robot = touch = 0
        for record in self.sim.sent[seq0:]:
            if not record.accepted:
                continue
            content = str(record.content.get("content", ""))
            robot += record.api == "webhook/send" and content.startswith(robot_prefix)
            touch += record.api == "kf/send_msg" and content.startswith(touch_prefix)
        return robot, touch

    # ---- the baseline -------------------------------------------------------------------------------------

    async def run_baseline(self, t0: float, seq0: int) -> dict[str, Any]:
        """The same offsets, bare webhook/send at each earliest allowed instant, bare kf/send_msg at each slot."""
        plan = self.plan
        loop = asyncio.get_running_loop()
        by_robot: dict[int, list[int]] = defaultdict(list)
        for post, robot in enumerate(plan.robot_of):
            by_robot[robot].append(post)
        cpu0 = own_cpu()
        kf = self.services.kf_client

        async def at(instant: float) -> None:
            await asyncio.sleep(max(0.0, instant - time.time()))

        async with aiohttp.ClientSession() as http:

            async def robot_lane(robot: int, posts: list[int]) -> None:
                posts = sorted(posts, key=lambda p: plan.post_offset[p])
                allowed = earliest([t0 + plan.post_offset[p] for p in posts])
                url = f"{self.sim_url}/cgi-bin/webhook/send"
                done: list[float] = []  # when each send was answered: WeCom's window counts from its own record
                for k, (post, instant) in enumerate(zip(posts, allowed, strict=True)):
                    await at(max(instant, done[k - PER_MINUTE] + MINUTE + 0.001) if k >= PER_MINUTE else instant)
                    body = {"msgtype": "text", "text": {"content": f"base post {post}"}}
                    async with http.post(url, params={"key": baseline_key(robot)}, json=body) as response:
                        await response.read()
                    done.append(time.time())

            async def segment_lane(segment: int) -> None:
                await at(t0 + plan.segment_offset[segment])
                for i, customer in enumerate(plan.customers):
                    if plan.segment_of[i] == segment:
                        msgid = secrets.token_hex(16)
                        await kf.kf_send_msg(customer, KFID, "text", {"content": f"base touch {segment}"}, msgid)

            started = loop.time()
            lanes = [robot_lane(r, p) for r, p in by_robot.items()]
            lanes += [segment_lane(s) for s in range(self.args.segments)]
            await asyncio.wait_for(asyncio.gather(*lanes), self.args.max_seconds)
            log(f"baseline done in {loop.time() - started:.0f} s")
        result = self.measure(t0, seq0, "base post ", "base touch ", baseline_key)
        result["cpu_s"] = round(own_cpu() - cpu0, 1)
        return result

    # ---- measuring ----------------------------------------------------------------------------------------

    def measure(
        self, t0: float, seq0: int, robot_prefix: str, touch_prefix: str, key_of: Callable[[int], str]
    ) -> dict[str, Any]:
        plan = self.plan
        slots: dict[str, list[float]] = defaultdict(list)
        for post, robot in enumerate(plan.robot_of):
            slots[key_of(robot)].append(t0 + plan.post_offset[post])
        sends: dict[str, list[float]] = defaultdict(list)
        per_post: Counter[str] = Counter()
        per_touch: Counter[tuple[str, str]] = Counter()
        touch_at: dict[tuple[str, str], float] = {}
        refusals = Counter[int]()
        for record in self.sim.sent[seq0:]:
            content = str(record.content.get("content", ""))
            if record.api == "webhook/send":
                if not record.accepted:
                    refusals[record.errcode] += 1
                elif content.startswith(robot_prefix):
                    sends[record.recipient].append(record.at)
                    per_post[content] += 1
            elif record.api == "kf/send_msg" and content.startswith(touch_prefix):
                if not record.accepted:
                    refusals[record.errcode] += 1
                    continue
                key = (record.recipient, content)
                per_touch[key] += 1
                touch_at.setdefault(key, record.at)
        late, raw, early = robot_lateness(sends, slots)
        touch_late = []
        for i, customer in enumerate(plan.customers):
            segment = plan.segment_of[i]
            at = touch_at.get((customer, f"{touch_prefix}{segment}"))
            if at is not None:
                touch_late.append(at - (t0 + plan.segment_offset[segment]))
        robot_dups = sum(n - 1 for n in per_post.values() if n > 1)
        touch_dups = sum(n - 1 for n in per_touch.values() if n > 1)
        robot_lost = self.args.posts - len(per_post)
        touch_lost = self.args.touches - len(touch_at)
        return {
            "robot_lateness_s": summary(late),
            "robot_delay_vs_slot_s": summary(raw),
            "robot_sends_before_allowed": early,
            "touch_lateness_s": summary(touch_late),
            "robot_duplicates": robot_dups,
            "robot_losses": robot_lost,
            "touch_duplicates": touch_dups,
            "touch_losses": touch_lost,
            "refusals": dict(refusals),
            "last_send_after_t0_s": round(
                max([*(a for v in sends.values() for a in v), *touch_at.values()], default=t0) - t0, 1
            ),
            "earliest_end_after_t0_s": round(plan.earliest_end(self.args.robots), 1),
        }


def engine_key(robot: int) -> str:
    return f"bench-robot-key-{robot:04d}"


def baseline_key(robot: int) -> str:
    return f"base-robot-key-{robot:04d}"


def instrument(engine: PostDeliveryEngine, phase_s: dict[str, list[float]], ticks: list[tuple[float, float]]) -> None:
    """Time each tick and each of its phases by wrapping the engine's methods on the instance (no engine change)."""
    for name in PHASES:
        original = getattr(engine, name)

        def timed(original: Any = original, name: str = name) -> Callable[..., Awaitable[Any]]:
            async def wrapper(*a: Any, **kw: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await original(*a, **kw)
                finally:
                    phase_s[name].append(time.perf_counter() - started)

            return wrapper

        setattr(engine, name, timed())
    tick = engine.tick

    async def timed_tick(now: datetime) -> Any:
        started = time.perf_counter()
        try:
            return await tick(now)
        finally:
            ticks.append((time.time(), time.perf_counter() - started))

    engine.tick = timed_tick  # type: ignore[method-assign]


async def run(args: argparse.Namespace) -> int:
    logs = LogCounter()
    configure_logging("WARNING")
    structlog.configure(processors=[logs, *structlog.get_config()["processors"]])
    logging.getLogger("apscheduler.scheduler").addFilter(SKIPPED)
    logging.getLogger("apscheduler.executors.default").addFilter(SKIPPED)
    name = f"bench_schedule_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(args.postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    prefix = f"bs{secrets.token_hex(5)}"
    clock = SystemClock()
    keys = tuple(engine_key(r) for r in range(args.robots)) + tuple(baseline_key(r) for r in range(args.robots))
    sim_app = create_simulator(
        SimulatorConfig(
            corp_id=TEST_CORP_ID,
            agent_id=TEST_AGENT_ID,
            token=TEST_TOKEN,
            aes_key=TEST_AES_KEY,
            secrets={TEST_SECRET: "app", TEST_KF_SECRET: "kf"},
            callback_url=None,
            kf_accounts=(KFID,),
            robot_keys=keys,
            members=(OWNER,),
        ),
        clock,
    )
    server = TestServer(sim_app, host="127.0.0.1")
    await server.start_server()
    sim = sim_app[SIM_STATE]
    sim_url = str(server.make_url("")).rstrip("/")
    base = args.postgres.rsplit("/", 1)[0]
    settings = load_settings(
        _env_file=None,
        wecom_corp_id=TEST_CORP_ID,
        wecom_token=TEST_TOKEN,
        wecom_aes_key=TEST_AES_KEY,
        wecom_agent_id=TEST_AGENT_ID,
        wecom_secret=TEST_SECRET,
        wecom_kf_secret=TEST_KF_SECRET,
        wecom_api_base=sim_url,
        database_url=f"{base}/{name}",
        redis_url=args.redis,
        redis_key_prefix=prefix,
        auto_migrate=True,
        worker_concurrency=0,
        openai_base_url="",
        posts_tick_interval_s=args.tick,
        # The audience policy off: this measures delivery against WeCom's rate limits, not quiet hours or caps
        # (50 posts a robot would exceed the per-group daily cap, and at night everything would be held).
        audience_quiet_hours="",
        audience_customer_daily_cap=0,
        audience_group_daily_cap=0,
        audience_dedupe_window_s=0,
    )
    result: dict[str, Any] = {"args": vars(args)}
    problems: list[str] = []
    try:
        async with open_services(settings, clock=clock) as services:
            bench = Bench(args, services, sim, sim_url)
            started = time.time()
            log(f"setup: {args.touches} customers in {args.segments} segments ...")
            await bench.setup_customers()
            log(f"setup: customers in {time.time() - started:.0f} s; {args.posts} posts on {args.robots} robots ...")
            t0 = time.time() + args.lead
            await bench.setup_posts(t0)
            ready = time.time()
            log(f"setup: posts in {ready - started:.0f} s; first slot at T0 in {t0 - ready:.0f} s")
            if ready > t0 - 1:
                raise SystemExit(f"setup took longer than --lead {args.lead}: raise it")
            seq0 = len(sim.sent)
            result["engine"] = await bench.run_engine(t0, seq0)
            if args.baseline:
                seq1 = len(sim.sent)
                t1 = time.time() + 3
                log("baseline: the same offsets through bare webhook/send and kf/send_msg ...")
                result["baseline"] = await bench.run_baseline(t1, seq1)
            problems = bench.problems
    finally:
        await server.close()
        admin = await asyncpg.connect(args.postgres)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        import redis.asyncio as redis_asyncio

        r = redis_asyncio.Redis.from_url(args.redis)
        found = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if found:
            await r.delete(*found)
        await r.aclose()
    result["warnings"] = {f"{m}:{e}": n for (m, e), n in logs.counts.items()}
    report(result, problems)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def report(result: dict[str, Any], problems: list[str]) -> None:
    engine = result.get("engine", {})
    baseline = result.get("baseline", {})
    for label, figures in (("engine", engine), ("baseline", baseline)):
        if not figures:
            continue
        rl, tl = figures["robot_lateness_s"], figures["touch_lateness_s"]
        print(
            f"{label:>8}: robot lateness vs earliest allowed p50 {rl['p50']:.2f} s p99 {rl['p99']:.2f} s "
            f"max {rl['max']:.2f} s (n={rl['n']}); touch lateness p50 {tl['p50']:.2f} s p99 {tl['p99']:.2f} s "
            f"(n={tl['n']}); duplicates {figures['robot_duplicates']}+{figures['touch_duplicates']}, "
            f"losses {figures['robot_losses']}+{figures['touch_losses']}, refusals {figures['refusals']}, "
            f"last send T0+{figures['last_send_after_t0_s']} s (earliest possible T0+"
            f"{figures['earliest_end_after_t0_s']} s), cpu {figures.get('cpu_s')} s"
        )
    if engine:
        print(
            f"  engine: rows {engine['rows']}, holds {engine['holds']}, attempts {engine['attempts']}, "
            f"ticks {engine['tick_count']} ({engine['ticks_skipped']} runs skipped: tick still running; "
            f"p50 {engine['ticks']['p50'] * 1000:.0f} ms, p99 "
            f"{engine['ticks']['p99'] * 1000:.0f} ms, max {engine['ticks']['max'] * 1000:.0f} ms), phases total s "
            f"{engine['phases_s']}, phase p50 ms {engine['phase_p50_ms']}, postgres+redis cpu "
            f"{engine['postgres_redis_cpu_s']} s"
        )
        for side in ("robot", "touch"):
            if engine[f"{side}_duplicates"]:
                problems.append(f"{engine[f'{side}_duplicates']} duplicate {side} sends")
            if engine[f"{side}_losses"]:
                problems.append(f"{engine[f'{side}_losses']} {side} sends lost")
        if engine["refusals"]:
            problems.append(f"WeCom refused sends: {engine['refusals']}")
        if engine["robot_sends_before_allowed"]:
            problems.append(f"{engine['robot_sends_before_allowed']} robot sends before the rate limit allowed")
    print(f"  warnings/errors logged: {result.get('warnings')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--posts", type=int, default=10_000, help="one-off robot posts (10000)")
    p.add_argument("--robots", type=int, default=200, help="group robots, posts spread round robin (200)")
    p.add_argument("--touches", type=int, default=5_000, help="微信客服 customers touched once each (5000)")
    p.add_argument("--segments", type=int, default=50, help="segment posts the customers are split into (50)")
    p.add_argument("--spread", type=float, default=60.0, help="slots fall within this many seconds (60)")
    p.add_argument("--lead", type=float, default=120.0, help="T0 this many seconds after customer setup (120)")
    p.add_argument("--tick", type=float, default=1.0, help="post tick interval, POSTS_TICK_INTERVAL_S (1.0)")
    p.add_argument("--max-seconds", type=float, default=480.0, help="bound on the engine phase (480)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the baseline")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--profile", help="cProfile the engine phase into this file (and print the top 25)")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
