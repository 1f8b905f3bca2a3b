"""Handoff benchmark: 2,000 open conversations, 50 agents, customers writing all along, real PostgreSQL and Redis.

    .venv/bin/python bench/handoff.py                 # defaults: about 3 minutes

What it does, in one process and one event loop (bench, bot and simulator together, as `wecom-bot serve` runs
the bot's workers and sweep together):

1. Creates a throw-away PostgreSQL database (dropped afterwards) and uses real Redis under a unique key prefix
   (deleted afterwards). Starts the in-process WeCom simulator on 127.0.0.1 on the real wall clock, and the
   real services (`bot.app.open_services`) pointed at it, with a support config written for the run: one team,
   24/7 hours, one SLA policy with a short first-response target (`--first-response`, 8 s) so breaches happen
   during the run, warn at 80 %.
2. Staff: `--agents` agents (kf servicers in the simulator, online, capacity `--capacity`) and one team lead
   (offline, so never routed to; told at each breach).
3. Runs what `wecom-bot serve` runs: `--workers` WorkerRuntimes on the inbound queue (`Pipeline.process`) and
   the SLA sweep (`SlaSweeper.run`, every second, with its queue drain).
4. Baseline, same path, same run: `--baseline` customers each write a plain question the bot answers; time
   from the customer's message to the bot's kf/send_msg in the simulator. This is the price of the path every
   message takes (sync_msg pull, queue, worker, pipeline); the handoff figure is the same path plus handoff.
   A second baseline: `SlaSweeper.sweep_once` over 0 clocks (before any conversation).
5. Load: `--conversations` customers each write 转人工 at `--rate` per second. Each message goes in as WeCom
   would deliver it: stored in the simulator for kf/sync_msg, then a pull with the callback's token (what the
   worker does for a kf callback), the queue, a worker, the pipeline, `HandoffService.handoff`. Meanwhile
   customers who were handed off keep writing (`--message-rate` per second, random open conversations).
   The run goes on for `--duration` seconds after the last handoff (by default the first-response target plus
   6 s, so every first-response clock falls due during the run) and is bounded by `--max-seconds`.
6. Measures:
   - trigger → agent notified: from the moment the customer's 转人工 is pushed into the simulator (and from
     the moment `HandoffService.handoff` is called, for the domain part alone) to the simulator's record time
     of the message/send textcard "新的客户会话" to the assigned agent;
   - breach-detection lag: for each SLA event (warned, breached), `recorded_at − due_at` from the event log,
     plus the lead's card (simulator time − due_at); clocks still running past their due time at the end are
     counted as missed;
   - sweep duration per pass, throughput, CPU of this process, PostgreSQL and Redis (from /proc), statements
     and Redis commands.
7. Checks (exit status 1 if any fails): no conversation got an "assigned" card from two agents; every kf
   service_state/trans to a servicer matches one assignment (1 + breach reassignments per conversation); at
   the end WeCom's servicer equals the assignee in the database for every conversation; no agent ever above
   capacity (sampled every 0.5 s and at the end); every handoff reached an agent; the bot logged no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # type: ignore[import-untyped]  # noqa: E402
import structlog  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.measure import LogCounter, cpu_of, pct, summary  # noqa: E402
from bot.app import Services, open_services  # noqa: E402
from bot.kf_sync import KfPuller  # noqa: E402
from bot.logs import configure_logging  # noqa: E402
from bot.settings import load_settings  # noqa: E402
from bot.sla_sweep import SlaSweeper, SweepReport  # noqa: E402
from bot.storage.models import StaffRole  # noqa: E402
from bot.wecom.parse import parse_plaintext  # noqa: E402
from bot.wecom.simulator import (  # noqa: E402
    SIM_STATE,
    CallbackDelivery,
    SimulatorConfig,
    SimulatorState,
    create_simulator,
    push_kf_customer_message,
)
from bot.wecom.simulator.api import decode_cursor  # noqa: E402
from bot.worker import WorkerRuntime  # noqa: E402
from handlers.domain import SystemClock  # noqa: E402
from tests.conftest import (  # noqa: E402
    TEST_AES_KEY,
    TEST_AGENT_ID,
    TEST_CORP_ID,
    TEST_KF_SECRET,
    TEST_SECRET,
    TEST_TOKEN,
)

KFID = "wkBENCH000000001"
LEAD = "lead"
ASSIGNED_TITLE = "新的客户会话"
BREACHED_TITLE = "SLA 已超时"
DIGEST_ASSIGNED = "新会话"  # a digest line's kind (bot.handoff.DIGEST_KINDS)
DIGEST_BREACHED = "已超时"
HANDOFF_TEXT = "我要转人工"
BASELINE_TEXT = "你好"
FOLLOW_UPS = ("在吗？", "还在等", "订单号是 20261123001", "麻烦快一点", "好的")
P99_TARGET_MS = 500.0
LAG_TARGET_S = 2.0

# --------------------------------------------------------------------------------------------------- helpers


def cpu_of_pids(pids: list[int]) -> float:
    """CPU seconds (user + system) of the given processes, while they still exist."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def start_worker_processes(count: int, settings: Any, log_dir: Path) -> list[asyncio.subprocess.Process]:
    """`wecom-bot worker` processes on the same queue, database, Redis and simulator (scale-out as deployed)."""
    env = {
        **os.environ,
        "WECOM_CORP_ID": settings.wecom_corp_id,
        "WECOM_TOKEN": settings.wecom_token,
        "WECOM_AES_KEY": settings.wecom_aes_key,
        "WECOM_AGENT_ID": str(settings.wecom_agent_id),
        "WECOM_SECRET": settings.wecom_secret,
        "WECOM_KF_SECRET": settings.wecom_kf_secret,
        "WECOM_API_BASE": settings.wecom_api_base,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "QUEUE_PARTITIONS": str(settings.queue_partitions),
        "SUPPORT_CONFIG_PATH": settings.support_config_path,
        "LOG_LEVEL": "WARNING",
    }
    command = str(Path(sys.executable).parent / "wecom-bot")
    procs = []
    for i in range(count):
        log = (log_dir / f"worker-{i}.log").open("wb")
        procs.append(
            await asyncio.create_subprocess_exec(
                command, "worker", env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        )
    return procs


async def stop_worker_processes(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()  # SIGTERM: a clean stop (in-flight entries finish, leases released)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def worker_log_problems(log_dir: Path) -> int:
    """Warning and error lines the worker processes logged."""
    lines = 0
    for path in log_dir.glob("worker-*.log"):
        text_ = path.read_text(errors="replace")
        lines += sum(1 for line in text_.splitlines() if "[warning" in line or "[error" in line or "Traceback" in line)
    return lines


def token_of(delivery: CallbackDelivery) -> str:
    """The Token of a kf_msg_or_event callback, as the ingress takes it from the decrypted XML."""
    return parse_plaintext(delivery.plaintext).get_text("Token") or ""


def support_yaml(first_response: int, team_leads: list[str]) -> str:
    return json.dumps(  # JSON is YAML
        {
            "default_team": "support",
            "teams": [
                {
                    "name": "support",
                    "timezone": "Asia/Shanghai",
                    "hours": {"mon-sun": ["00:00-24:00"]},
                    "leads": team_leads,
                }
            ],
            "sla": {
                "warn_share": 0.8,
                "default_policy": "bench",
                "policies": [
                    {"id": "bench", "first_response": first_response, "next_response": 120, "resolution": 86400}
                ],
            },
            "handoff": {"phrases": ["转人工", "人工客服"], "no_match_limit": 50},
        },
        ensure_ascii=False,
    )


# --------------------------------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace, services: Services, sim: SimulatorState) -> None:
        self.args = args
        self.services = services
        self.sim = sim
        self.clock = services.clock
        assert services.handoff is not None
        self.handoff = services.handoff
        self.puller = KfPuller(
            services.kf_client, services.queue, services.repos.cursors, services.redis, services.keys
        )
        self.pulls: set[asyncio.Task[int]] = set()
        self.pushed: dict[str, float] = {}  # customer → time the 转人工 was pushed
        self.handoff_called: dict[int, float] = {}  # conversation → time HandoffService.handoff was called
        self.handed: list[str] = []  # customers whose 转人工 went in
        self.follow_ups = 0
        self.trans: list[tuple[float, str, int, str | None, bool]] = []  # (t, customer, state, servicer, ok)
        self.sweeps: list[tuple[float, float, int, int]] = []  # (start, seconds, due, events)
        self.reassigned: Counter[int] = Counter()
        self.capacity_samples = 0
        self.over_capacity: list[tuple[float, int, int]] = []  # (t, agent, open)
        self.max_open = 0
        self.pull_errors = 0
        self.lags: list[float] = []
        self.waits: Counter[str] = Counter()
        self._instrument()

    def _instrument(self) -> None:
        """Timestamps around three calls, by wrapping them on these instances (nothing else changes)."""
        handoff_fn = self.handoff.handoff
        trans_fn = self.services.kf_client.kf_service_state_trans

        async def handoff(conversation_id: int, *a: Any, **kw: Any) -> Any:
            self.handoff_called.setdefault(conversation_id, time.time())
            return await handoff_fn(conversation_id, *a, **kw)

        async def trans(
            open_kfid: str, external_userid: str, service_state: int, servicer_userid: str | None = None
        ) -> str | None:
            try:
                code = await trans_fn(open_kfid, external_userid, service_state, servicer_userid)
            except Exception:
                self.trans.append((time.time(), external_userid, service_state, servicer_userid, False))
                raise
            self.trans.append((time.time(), external_userid, service_state, servicer_userid, True))
            return code

        setattr(self.handoff, "handoff", handoff)  # noqa: B010
        setattr(self.services.kf_client, "kf_service_state_trans", trans)  # noqa: B010

    def sweeper(self) -> SlaSweeper:
        """The service's sweeper, its passes timed (detection) and its breach reassignments counted (actions)."""
        sweeper = SlaSweeper(self.handoff, self.clock)
        detect, act = sweeper.detect, sweeper.act

        async def timed_detect() -> SweepReport:
            started = time.time()
            t0 = time.perf_counter()
            report = await detect()
            self.sweeps.append((started, time.perf_counter() - t0, report.due, len(report.events)))
            return report

        async def counted_act(report: SweepReport) -> None:
            await act(report)
            for conversation_id in report.reassigned:
                self.reassigned[conversation_id] += 1

        setattr(sweeper, "detect", timed_detect)  # noqa: B010
        setattr(sweeper, "act", counted_act)  # noqa: B010
        return sweeper

    # ---- load

    def say(self, customer: str, text_: str) -> float:
        """The customer writes: stored for sync_msg, then pulled as the worker does for the callback."""
        at = time.time()
        _item, delivery = push_kf_customer_message(self.sim, customer, text_, open_kfid=KFID)
        task = asyncio.create_task(self._pull(token_of(delivery)))
        self.pulls.add(task)
        task.add_done_callback(self.pulls.discard)
        return at

    async def _pull(self, token: str) -> int:
        try:
            return await self.puller.pull(KFID, token)
        except Exception as exc:
            self.pull_errors += 1
            print(f"  pull failed: {type(exc).__name__}: {exc}", flush=True)
            return 0

    async def paced(self, count: int, rate: float, action: Any) -> None:
        """Call action(i) for i in range(count) at `rate` per second, on schedule (no coordinated omission)."""
        start = time.perf_counter()
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            action(i)

    async def writers(self, stop: asyncio.Event) -> None:
        """Customers already handed off keep writing, at --message-rate per second."""
        rng = random.Random(7)
        interval = 1 / self.args.message_rate
        next_at = time.perf_counter()
        while not stop.is_set():
            next_at += interval
            if self.handed:
                self.say(rng.choice(self.handed), rng.choice(FOLLOW_UPS))
                self.follow_ups += 1
            delay = next_at - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def capacity_sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check_capacity()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def check_capacity(self) -> None:
        async with self.services.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT c.assignee_id, count(*), s.capacity FROM conversations c"
                        " JOIN staff_users s ON s.id = c.assignee_id"
                        " WHERE c.status IN ('open', 'waiting') GROUP BY c.assignee_id, s.capacity"
                    )
                )
            ).all()
        self.capacity_samples += 1
        now = time.time()
        for agent_id, n, capacity in rows:
            self.max_open = max(self.max_open, int(n))
            if int(n) > int(capacity):
                self.over_capacity.append((now, int(agent_id), int(n)))

    def assigned_cards(self) -> int:
        return sum(
            1
            for s in self.sim.sent
            if s.api == "message/send" and str(s.content.get("title", "")).startswith(ASSIGNED_TITLE)
        )

    async def loop_lag(self, stop: asyncio.Event) -> None:
        """How late a 50 ms sleep wakes up: the event loop's own queueing (CPU of this one process)."""
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.05)
            self.lags.append((time.perf_counter() - t0 - 0.05) * 1000)

    async def wait_sampler(self, stop: asyncio.Event) -> None:
        """Every 20 ms, where each worker and sweep task is suspended (innermost project frame → leaf frame)."""
        while not stop.is_set():
            await asyncio.sleep(0.02)
            for task in asyncio.all_tasks():
                name = task.get_name()
                if not name.startswith(("worker-", "partition", "sla-sweep")) and "_partition" not in repr(task):
                    continue
                frames: list[Any] = []
                coro: Any = task.get_coro()
                while coro is not None and len(frames) < 80:  # follow the await chain (get_stack gives one frame)
                    frame = (
                        getattr(coro, "cr_frame", None)
                        or getattr(coro, "gi_frame", None)
                        or getattr(coro, "ag_frame", None)
                    )
                    if frame is None:
                        break
                    frames.append(frame)
                    coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                if not frames:
                    continue
                ours = [f for f in frames if "/bot/" in f.f_code.co_filename or "/handlers/" in f.f_code.co_filename]
                inner = ours[-1] if ours else frames[-1]
                leaf = frames[-1]
                key = (
                    f"{Path(inner.f_code.co_filename).name}:{inner.f_code.co_name}:{inner.f_lineno} → "
                    f"{Path(leaf.f_code.co_filename).name}:{leaf.f_code.co_name}"
                )
                self.waits[key] += 1

    async def progress(self, stop: asyncio.Event, started: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
            recent = [s for _t, s, _d, _e in self.sweeps[-5:]]
            lags, self.lags = self.lags, []
            cursor = await self.services.repos.cursors.get_cursor(KFID)
            pulled = decode_cursor(cursor) if cursor else 0
            async with self.services.engine.connect() as conn:
                handled = (
                    await conn.execute(
                        text("SELECT count(*) FROM messages WHERE direction = 'in' AND status = 'handled'")
                    )
                ).scalar_one()
            print(
                f"  {time.time() - started:5.0f}s  customer messages {len(self.sim.kf_messages)} pushed, "
                f"{pulled} pulled, "
                f"{handled} handled; handoffs sent {len(self.handed)}, agents notified "
                f"{self.assigned_cards()}, follow-ups {self.follow_ups}, sweeps {len(self.sweeps)} "
                f"(last 5 max {max(recent) * 1000 if recent else 0:.0f} ms), trans {len(self.trans)}, "
                f"CPU {time.process_time():.0f}s, loop lag p99 {pct(lags, 99):.0f} ms, "
                f"DB pool {self.services.engine.pool.status()}",
                flush=True,
            )


async def baseline_phase(bench: Bench, count: int, rate: float) -> list[float]:
    """Customers asking something the bot answers: message pushed → the bot's kf/send_msg in the simulator."""
    if count == 0:
        return []
    customers = [f"wmBase{i:05d}" for i in range(count)]
    start_seq = len(bench.sim.sent)
    pushed: dict[str, float] = {}
    await bench.paced(count, rate, lambda i: pushed.__setitem__(customers[i], bench.say(customers[i], BASELINE_TEXT)))
    deadline = time.time() + 30
    while time.time() < deadline:
        answered = {s.recipient for s in bench.sim.sent[start_seq:] if s.api == "kf/send_msg"}
        if len(answered & pushed.keys()) >= count:
            break
        await asyncio.sleep(0.2)
    first: dict[str, float] = {}
    for s in bench.sim.sent[start_seq:]:
        if s.api == "kf/send_msg" and s.recipient in pushed:
            first.setdefault(s.recipient, s.at)
    return [(first[c] - pushed[c]) * 1000 for c in customers if c in first]


async def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    logs = LogCounter()
    configure_logging("WARNING")
    structlog.configure(processors=[logs, *structlog.get_config()["processors"]])

    name = f"bench_handoff_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(args.postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    prefix = f"bh{secrets.token_hex(5)}"
    tmp = tempfile.TemporaryDirectory(prefix="bench-handoff-")
    agents = tuple(f"agent{i:03d}" for i in range(args.agents))
    support_path = Path(tmp.name) / "support.yaml"
    support_path.write_text(support_yaml(args.first_response, []), encoding="utf-8")

    clock = SystemClock()
    sim_app = create_simulator(
        SimulatorConfig(
            corp_id=TEST_CORP_ID,
            agent_id=TEST_AGENT_ID,
            token=TEST_TOKEN,
            aes_key=TEST_AES_KEY,
            secrets={TEST_SECRET: "app", TEST_KF_SECRET: "kf"},
            callback_url=None,
            kf_accounts=(KFID,),
            servicers={KFID: agents},
            members=(*agents, LEAD),
        ),
        clock,
    )
    server = TestServer(sim_app, host="127.0.0.1")
    await server.start_server()
    sim = sim_app[SIM_STATE]
    base = args.postgres.rsplit("/", 1)[0]
    settings = load_settings(
        _env_file=None,
        wecom_corp_id=TEST_CORP_ID,
        wecom_token=TEST_TOKEN,
        wecom_aes_key=TEST_AES_KEY,
        wecom_agent_id=TEST_AGENT_ID,
        wecom_secret=TEST_SECRET,
        wecom_kf_secret=TEST_KF_SECRET,
        wecom_api_base=str(server.make_url("")).rstrip("/"),
        database_url=f"{base}/{name}",
        redis_url=args.redis,
        redis_key_prefix=prefix,
        auto_migrate=True,
        worker_concurrency=0,
        queue_partitions=args.partitions,
        support_config_path=str(support_path),
    )
    result: dict[str, Any] = {}
    try:
        async with open_services(settings, clock=clock) as services:
            result = await measure(args, services, sim, problems, logs)
    finally:
        await server.close()
        admin = await asyncpg.connect(args.postgres)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        import redis.asyncio as redis_asyncio

        r = redis_asyncio.Redis.from_url(args.redis)
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()
        tmp.cleanup()
    if args.json and result:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


async def measure(
    args: argparse.Namespace, services: Services, sim: SimulatorState, problems: list[str], logs: LogCounter
) -> dict[str, Any]:
    bench = Bench(args, services, sim)
    assert services.handoff is not None
    repo = services.handoff.repo
    for username in agents_of(args):
        user = await services.repos.staff.add_user(
            username, StaffRole.AGENT, display_name=f"客服{username[-3:]}", team="support", wecom_userid=username
        )
        await repo.set_agent_profile(user.id, capacity=args.capacity)
        await repo.set_presence(user.id, "online")
    lead = await services.repos.staff.add_user(
        LEAD, StaffRole.LEAD, display_name="组长", team="support", wecom_userid=LEAD
    )
    await repo.set_presence(lead.id, "offline")

    # Baseline 1: the sweep over 0 clocks and an empty queue.
    sweeper = bench.sweeper()
    for _ in range(20):
        await sweeper.sweep_once()
    idle_sweeps = [s * 1000 for _t, s, _d, _e in bench.sweeps]
    bench.sweeps.clear()

    stop = asyncio.Event()
    workers = [
        WorkerRuntime(
            services.redis,
            services.keys,
            services.settings,
            services.pipeline.process,
            metrics=services.metrics,
            clock=services.clock,
            worker_id=f"bench-{i}",
        )
        for i in range(args.workers)
    ]
    tasks = [asyncio.create_task(w.run(stop), name=f"worker-{i}") for i, w in enumerate(workers)]
    tasks.append(asyncio.create_task(sweeper.run(stop), name="sla-sweep"))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-handoff-workers-"))
    procs = await start_worker_processes(args.processes, services.settings, log_dir)
    # The workers take their partition leases (processes first import and connect).
    await asyncio.sleep(6.0 if procs else 1.0)
    print(f"workers: {args.workers} in this process, {len(procs)} worker processes (logs in {log_dir})", flush=True)

    # Baseline 2: the same path for messages the bot answers itself.
    print(f"baseline: {args.baseline} customers ask the bot something at {args.rate:g}/s", flush=True)
    baseline = await baseline_phase(bench, args.baseline, args.rate)
    print(f"  answered {len(baseline)}/{args.baseline}, p99 {pct(baseline, 99):.0f} ms", flush=True)

    async with services.engine.connect() as conn:
        xacts0 = (
            await conn.execute(
                text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
            )
        ).scalar_one()
    info0 = await services.redis.info("stats")
    cpu0 = time.process_time()
    workers_cpu0 = cpu_of_pids([p.pid for p in procs])
    pg0, redis0 = cpu_of(("postgres",)), cpu_of(("redis-server",))
    wall0 = time.time()
    seq0 = len(sim.sent)

    load_stop = asyncio.Event()
    side = [
        asyncio.create_task(bench.writers(load_stop)),
        asyncio.create_task(bench.capacity_sampler(load_stop)),
        asyncio.create_task(bench.progress(load_stop, wall0)),
        asyncio.create_task(bench.loop_lag(load_stop)),
        *([asyncio.create_task(bench.wait_sampler(load_stop))] if args.waits else []),
    ]
    customers = [f"wmC{i:05d}" for i in range(args.conversations)]

    def trigger(i: int) -> None:
        customer = customers[i]
        bench.pushed[customer] = bench.say(customer, HANDOFF_TEXT)
        bench.handed.append(customer)

    print(
        f"load: {args.conversations} handoffs at {args.rate:g}/s, follow-ups at {args.message_rate:g}/s, "
        f"then {args.duration:g}s more (first response target {args.first_response}s)",
        flush=True,
    )
    load_deadline = wall0 + args.max_seconds
    await asyncio.wait_for(bench.paced(args.conversations, args.rate, trigger), args.max_seconds)
    last_trigger = time.time()
    while time.time() < min(last_trigger + args.duration, load_deadline):
        await asyncio.sleep(0.25)
    load_stop.set()
    await asyncio.gather(*side, return_exceptions=True)
    end = time.time()
    # Let in-flight pulls and messages finish before stopping workers and sweep.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*list(bench.pulls), return_exceptions=True), 10)
    workers_cpu = cpu_of_pids([p.pid for p in procs]) - workers_cpu0
    stop.set()
    await stop_worker_processes(procs)
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.time() - wall0
    cpu = time.process_time() - cpu0
    pg_cpu, redis_cpu = cpu_of(("postgres",)) - pg0, cpu_of(("redis-server",)) - redis0
    info1 = await services.redis.info("stats")
    async with services.engine.connect() as conn:
        xacts1 = (
            await conn.execute(
                text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
            )
        ).scalar_one()
        conversations = {
            str(ext): (int(cid), status, assignee, userid)
            for cid, ext, status, assignee, userid in (
                await conn.execute(
                    text(
                        "SELECT c.id, cu.external_id, c.status, c.assignee_id, s.wecom_userid FROM conversations c"
                        " JOIN customers cu ON cu.id = c.customer_id LEFT JOIN staff_users s ON s.id = c.assignee_id"
                        " WHERE c.handoff_at IS NOT NULL"
                    )
                )
            ).all()
        }
        events = (
            await conn.execute(
                text(
                    "SELECT conversation_id, kind, due_at, recorded_at FROM sla_events"
                    " WHERE kind IN ('warned', 'breached', 'escalated')"
                )
            )
        ).all()
        overdue = (
            await conn.execute(
                text("SELECT count(*) FROM sla_clocks WHERE status = 'running' AND next_deadline <= :t"),
                {"t": end - LAG_TARGET_S},
            )
        ).scalar_one()
    await bench.check_capacity()

    # ---- trigger → agent notified
    cards: dict[int, list[tuple[float, str, str]]] = defaultdict(list)  # conversation → (at, recipient, status)
    lead_cards: dict[int, float] = {}
    dropped_cards = Counter[str]()
    digests = Counter[str]()
    for s in sim.sent[seq0:]:
        if s.api != "message/send":
            continue
        title = str(s.content.get("title", ""))
        url = str(s.content.get("url", ""))
        conversation_id = int(url.rsplit("/", 1)[1]) if url.rsplit("/", 1)[-1].isdigit() else -1
        if s.status != "delivered":
            dropped_cards[title.split("：")[0]] += 1
        if title.startswith(ASSIGNED_TITLE):
            cards[conversation_id].append((s.at, s.recipient, s.status))
        elif title.startswith(BREACHED_TITLE) and s.recipient == LEAD:
            lead_cards.setdefault(conversation_id, s.at)
        elif url.endswith(("/console/inbox", "/console/lead")):
            # A digest (bot.member_cards): cards the member's WeCom budget held back, one line per conversation,
            # "新会话｜<customer>" for an assignment, "已超时｜<customer>：…" for a breach.
            digests["assignments" if "新的客户会话" in title else "sla"] += 1
            for line in str(s.content.get("description", "")).split("\n"):
                kind, _, rest = line.partition("｜")
                row = conversations.get(rest.split("：", 1)[0])
                if row is None:
                    continue
                if kind == DIGEST_ASSIGNED:
                    cards[row[0]].append((s.at, s.recipient, s.status))
                elif kind == DIGEST_BREACHED and s.recipient == LEAD:
                    lead_cards.setdefault(row[0], s.at)
    from_push: list[float] = []
    from_handoff: list[float] = []
    not_notified: list[str] = []
    card_dropped: list[str] = []  # WeCom accepted the card, then dropped it (over 30/min per member)
    double: list[int] = []
    for customer in customers:
        row = conversations.get(customer)
        if row is None or row[0] not in cards:
            not_notified.append(customer)
            continue
        conversation_id = row[0]
        got = cards[conversation_id]
        if len({recipient for _a, recipient, _s in got}) > 1:
            double.append(conversation_id)
        if all(status != "delivered" for _a, _r, status in got):
            card_dropped.append(customer)
        first = min(at for at, _r, _s in got)
        from_push.append((first - bench.pushed[customer]) * 1000)
        if conversation_id in bench.handoff_called:
            from_handoff.append((first - bench.handoff_called[conversation_id]) * 1000)
    notified_at = sorted(min(at for at, _r, _s in got) for got in cards.values())
    throughput = (len(notified_at) - 1) / (notified_at[-1] - notified_at[0]) if len(notified_at) > 1 else 0.0

    # ---- breach-detection lag
    lag: dict[str, list[float]] = defaultdict(list)
    due_by_conversation: dict[int, float] = {}
    for conversation_id, kind, due_at, recorded_at in events:
        lag[kind].append(recorded_at.timestamp() - float(due_at))
        if kind == "breached":
            due_by_conversation[int(conversation_id)] = float(due_at)
    lead_lag = [lead_cards[c] - due for c, due in due_by_conversation.items() if c in lead_cards]

    # ---- one conversation, one servicer at a time
    to_servicer: dict[str, list[str]] = defaultdict(list)
    for _t, _kfid, customer, state, servicer in sim.kf_transitions:  # WeCom's record: every process's calls
        if state == 3:
            to_servicer[customer].append(servicer)
    trans_mismatch = [
        c
        for c, row in conversations.items()
        if c in bench.pushed and len(to_servicer.get(c, [])) != 1 + bench.reassigned.get(row[0], 0)
    ]
    wecom_mismatch = [
        c
        for c, (_cid, status, _a, userid) in conversations.items()
        if c in bench.pushed
        and status in ("open", "waiting")
        and sim.kf_sessions.get((KFID, c)) is not None
        and sim.kf_sessions[(KFID, c)].servicer_userid != userid
    ]
    statuses = Counter(status for _c, (_i, status, _a, _u) in conversations.items())

    sweep_ms = [s * 1000 for _t, s, _d, _e in bench.sweeps]
    sweep_due = [float(d) for _t, _s, d, _e in bench.sweeps]
    # ---- report
    print()
    print("=" * 78)
    print(
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}; "
        f"{args.agents} agents × capacity {args.capacity}, {args.workers} workers on {args.partitions} partitions, "
        "sweep every 1 s"
    )
    print(
        f"handoffs: {len(from_push)}/{args.conversations} notified; throughput {throughput:.1f} handoffs/s "
        f"(offered {args.rate:g}/s); follow-up customer messages {bench.follow_ups}; wall {wall:.0f}s"
    )
    print(f"conversation states at the end: {dict(statuses)}")
    print()
    print("| ms | n | p50 | p99 | max | mean |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, values in (
        ("baseline: customer message → bot's reply (kf/send_msg)", baseline),
        ("customer 转人工 → agent's card (message/send)", from_push),
        ("HandoffService.handoff called → agent's card", from_handoff),
        ("sweep detection pass, idle (0 clocks, empty queue)", idle_sweeps),
        ("sweep detection pass, under load", sweep_ms),
    ):
        st = summary(values)
        print(f"| {label} | {st['n']} | {st['p50']:.1f} | {st['p99']:.1f} | {st['max']:.1f} | {st['mean']:.1f} |")
    print()
    print("| lag after due_at, s | n | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    for label, values in (
        ("warned recorded", lag["warned"]),
        ("breached recorded", lag["breached"]),
        ("lead's breach card (simulator time)", lead_lag),
    ):
        st = summary(values)
        print(f"| {label} | {st['n']} | {st['p50']:.2f} | {st['p99']:.2f} | {st['max']:.2f} |")
    print(f"clocks still running ≥ {LAG_TARGET_S:g} s past their due time at the end: {overdue}")
    print(f"due clocks per sweep pass: p50 {pct(sweep_due, 50):.0f}, max {max(sweep_due, default=0)}")
    print(f"cards not delivered by WeCom (over 30/min per member, silently dropped): {dict(dropped_cards) or 'none'}")
    print(f"digest cards (held back by the per-member budget, then sent together): {dict(digests) or 'none'}")
    print(
        f"CPU over the load: this process {cpu:.0f} s ({cpu / wall:.0%} of one core), "
        f"worker processes {workers_cpu:.0f} s, PostgreSQL {pg_cpu:.0f} s, "
        f"Redis {redis_cpu:.0f} s; {int(xacts1) - int(xacts0)} PostgreSQL transactions, "
        f"{int(info1['total_commands_processed']) - int(info0['total_commands_processed'])} Redis commands"
    )
    print(
        f"double assignments: {len(double)} conversations with 'assigned' cards to two agents; "
        f"{len(trans_mismatch)} whose kf trans-to-servicer calls ≠ 1 + reassignments "
        f"({sum(bench.reassigned.values())} breach reassignments); {len(wecom_mismatch)} where WeCom's servicer "
        f"≠ the assignee; agents over capacity in {len(bench.over_capacity)} of {bench.capacity_samples} samples "
        f"(max open per agent {bench.max_open}, capacity {args.capacity})"
    )
    if args.waits:
        total = sum(bench.waits.values()) or 1
        print("where the worker and sweep tasks were suspended (sampled every 20 ms):")
        for key, n in bench.waits.most_common(25):
            print(f"  {n / total:6.1%}  {key}")
    print(f"bot warnings/errors logged: {dict(logs.counts) or 'none'}")
    p99 = pct(from_push, 99)
    breach_p99 = pct(lag["breached"], 99)
    print(
        f"trigger → notified p99 {p99:.0f} ms (target ≤ {P99_TARGET_MS:g} ms): "
        f"{'met' if p99 <= P99_TARGET_MS and not not_notified and not card_dropped else 'NOT met'}"
    )
    print(
        f"breach-detection lag p99 {breach_p99:.2f} s (target ≤ {LAG_TARGET_S:g} s): "
        f"{'met' if breach_p99 <= LAG_TARGET_S and overdue == 0 else 'NOT met'}"
    )

    if double:
        problems.append(f"{len(double)} conversations assigned to two agents, e.g. {double[:5]}")
    if trans_mismatch:
        problems.append(
            f"{len(trans_mismatch)} conversations moved to servicers more often than assigned, "
            f"e.g. {trans_mismatch[:5]}"
        )
    if wecom_mismatch:
        problems.append(
            f"{len(wecom_mismatch)} conversations whose WeCom servicer is not the assignee, e.g. {wecom_mismatch[:5]}"
        )
    if bench.over_capacity:
        problems.append(f"agents over capacity: {bench.over_capacity[:5]}")
    if not_notified:
        problems.append(f"{len(not_notified)} handoffs never reached an agent, e.g. {not_notified[:5]}")
    if card_dropped:
        problems.append(
            f"{len(card_dropped)} agents never saw their new conversation's card: WeCom accepted it, then dropped it "
            f"(over 30 app messages a minute per member), e.g. {card_dropped[:5]}"
        )
    if logs.errors:
        problems.append(f"the bot logged {logs.errors} errors")
    if procs and (logged := worker_log_problems(log_dir)):
        problems.append(f"the worker processes logged {logged} warnings or errors (see {log_dir})")
    if bench.pull_errors:
        problems.append(f"{bench.pull_errors} kf pulls failed")
    return {
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "baseline_ms": summary(baseline),
        "trigger_to_notified_ms": summary(from_push),
        "handoff_call_to_notified_ms": summary(from_handoff),
        "sweep_idle_ms": summary(idle_sweeps),
        "sweep_ms": summary(sweep_ms),
        "lag_s": {k: summary(v) for k, v in lag.items()} | {"lead_card": summary(lead_lag)},
        "overdue_at_end": overdue,
        "throughput_per_s": throughput,
        "follow_ups": bench.follow_ups,
        "dropped_cards": dict(dropped_cards),
        "digest_cards": dict(digests),
        "cpu_s": {
            "process": cpu,
            "worker_processes": workers_cpu,
            "postgres": pg_cpu,
            "redis": redis_cpu,
            "wall": wall,
        },
        "double_assignments": len(double),
        "assignment_cards_dropped": len(card_dropped),
        "trans_mismatch": len(trans_mismatch),
        "wecom_mismatch": len(wecom_mismatch),
        "over_capacity_samples": len(bench.over_capacity),
        "reassignments": sum(bench.reassigned.values()),
        "states": dict(statuses),
        "logs": {f"{m}:{e}": n for (m, e), n in logs.counts.items()},
        "problems": problems,
    }


def agents_of(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(f"agent{i:03d}" for i in range(args.agents))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--conversations", type=int, default=2000, help="customers handed off (2000)")
    p.add_argument("--agents", type=int, default=50, help="agents, all online kf servicers (50)")
    p.add_argument("--capacity", type=int, default=40, help="open conversations per agent (40: 2,000 fit exactly)")
    p.add_argument("--rate", type=float, default=20.0, help="handoffs (转人工 messages) per second (20)")
    p.add_argument("--message-rate", type=float, default=20.0, help="follow-up customer messages per second (20)")
    p.add_argument("--first-response", type=int, default=8, help="SLA first-response target, seconds (8)")
    p.add_argument("--duration", type=float, default=None, help="seconds to keep going after the last handoff")
    p.add_argument("--baseline", type=int, default=200, help="customers the bot answers itself, first (200)")
    p.add_argument("--workers", type=int, default=4, help="in-process queue workers (4)")
    p.add_argument("--processes", type=int, default=0, help="extra `wecom-bot worker` processes (0)")
    p.add_argument("--partitions", type=int, default=8, help="queue partitions (QUEUE_PARTITIONS, default 8)")
    p.add_argument("--max-seconds", type=float, default=400.0, help="bound on the load phase (400)")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--waits", action="store_true", help="sample where worker and sweep tasks wait, and print it")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = args.first_response + 6.0
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
