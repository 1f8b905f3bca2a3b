"""Ingress benchmark: the real bot server against a bare aiohttp handler, over real HTTP on loopback.

    .venv/bin/python bench/ingress.py                 # defaults finish in about 75 s

What it does, in one run:

1. Builds every callback before any timing: app text messages with a unique MsgId each, encrypted and signed
   exactly as WeCom does (`CallbackCrypto.encrypt_and_sign`, the tests' fixed identity), wrapped in WeCom's
   envelope. The load generator only writes prebuilt bytes; it does no crypto.
2. Baseline: starts a bare aiohttp server (a subprocess; its handler reads the body and answers 200, empty)
   and drives it with the same callbacks.
3. Bot: starts the real server, `wecom-bot serve` (a subprocess, `bot.app.create_app` on `open_services`), with
   the test credentials, real Redis under a unique REDIS_KEY_PREFIX, a throw-away SQLite file and
   WORKER_CONCURRENCY=0, so the process measured is the ingress alone (workers are separate processes in a
   scale-out; nothing consumes the queue during the run, which is what lets us count the entries).
4. Each target gets the same phases, each driven by a separate load-generator process:
   warm-up → closed loop (C connections, each sends its next callback as soon as the previous is answered:
   max callbacks/s) → open loop (a fixed rate; latency is measured from each callback's *scheduled* send time,
   so a slow server cannot hide queueing delay: no coordinated omission).
5. Checks: every callback answered 200 with an empty body; afterwards the bot's Redis streams hold exactly as
   many entries as callbacks were sent, and `wecom_callbacks_total{outcome="accepted"}` agrees. The server's
   own `wecom_callback_ack_seconds` histogram over the open-loop phase is printed as a cross-check.
6. Stops both servers, deletes the Redis keys under the prefix and the temporary directory.

Everything listens and connects on 127.0.0.1 only, and every loop is bounded in count and time.

The load generator is a small asyncio Protocol HTTP/1.1 keep-alive client rather than aiohttp's client: on a
2-core machine aiohttp's client costs more CPU per request than the bare server does, so the baseline would
measure the client. This one writes prebuilt request bytes and reads status line + Content-Length.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CALLBACK_PATH = "/wecom/callback"
HOST = "127.0.0.1"
SENDERS = 500  # distinct customers (FromUserName), so conversations spread over the partitions

# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------


def _identity() -> dict[str, Any]:
    """The tests' fixed, never-real WeCom identity (tests/conftest.py)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import conftest

    return {
        "corp_id": conftest.TEST_CORP_ID,
        "token": conftest.TEST_TOKEN,
        "aes_key": conftest.TEST_AES_KEY,
        "secret": conftest.TEST_SECRET,
        "kf_secret": conftest.TEST_KF_SECRET,
        "agent_id": conftest.TEST_AGENT_ID,
    }


def build_callbacks(count: int, ident: dict[str, Any]) -> list[tuple[str, bytes]]:
    """`count` distinct (raw query string, body) pairs, as WeCom would POST them."""
    from bot.wecom.crypto import CallbackCrypto

    crypto = CallbackCrypto(ident["token"], ident["aes_key"], ident["corp_id"])
    corp, agent = ident["corp_id"], ident["agent_id"]
    now = int(time.time())
    run = secrets.randbelow(10**9)
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        msg_id = f"{run:09d}{i:010d}"
        plaintext = (
            f"<xml><ToUserName><![CDATA[{corp}]]></ToUserName>"
            f"<FromUserName><![CDATA[bench-user-{i % SENDERS}]]></FromUserName>"
            f"<CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[你好，我想问一下订单 {i} 的发货时间]]></Content>"
            f"<MsgId>{msg_id}</MsgId><AgentID>{agent}</AgentID></xml>"
        )
        timestamp, nonce = str(now), str(1_000_000_000 + i)
        encrypted, signature = crypto.encrypt_and_sign(plaintext, timestamp, nonce)
        body = (
            f"<xml><ToUserName><![CDATA[{corp}]]></ToUserName>"
            f"<Encrypt><![CDATA[{encrypted}]]></Encrypt><AgentID><![CDATA[{agent}]]></AgentID></xml>"
        ).encode()
        out.append((f"msg_signature={signature}&timestamp={timestamp}&nonce={nonce}", body))
    return out


def write_callbacks(path: Path, callbacks: list[tuple[str, bytes]]) -> None:
    with path.open("wb") as f:
        for query, body in callbacks:
            q = query.encode()
            f.write(len(q).to_bytes(4, "big") + q + len(body).to_bytes(4, "big") + body)


def read_requests(path: Path, start: int, count: int, port: int) -> list[bytes]:
    """Raw HTTP/1.1 requests for callbacks [start, start+count) of the file."""
    data = path.read_bytes()
    pos, index, out = 0, 0, []
    while pos < len(data) and len(out) < count:
        qlen = int.from_bytes(data[pos : pos + 4], "big")
        query = data[pos + 4 : pos + 4 + qlen]
        pos += 4 + qlen
        blen = int.from_bytes(data[pos : pos + 4], "big")
        body = data[pos + 4 : pos + 4 + blen]
        pos += 4 + blen
        if index >= start:
            head = (
                f"POST {CALLBACK_PATH}?{query.decode()} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"User-Agent: Mozilla/4.0\r\nContent-Type: text/xml\r\nContent-Length: {blen}\r\n\r\n"
            ).encode()
            out.append(head + body)
        index += 1
    if len(out) != count:
        raise SystemExit(f"callback file has only {len(out)} callbacks from {start}, wanted {count}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Load generator (role "load", a separate process)
# ---------------------------------------------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, stats: _Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.started = 0.0  # when the in-flight request was due (open loop) or sent (closed loop)
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes, started: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.started = started
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        match = _CONTENT_LENGTH.search(self.buf, 0, end + 2)
        length = int(match.group(1)) if match else 0
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        del self.buf[: end + 4 + length]
        self.busy = False
        self.stats.done(self, status, length, time.perf_counter() - self.started)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy:
            self.busy = False
            self.stats.lost(self)


class _Stats:
    def __init__(self, total: int) -> None:
        self.total = total
        self.completed = 0
        self.ok = 0  # 200 with an empty body
        self.bad: dict[str, int] = {}
        self.latencies: list[float] = []
        self.finished = asyncio.get_running_loop().create_future()
        self.on_free: Any = None  # callback(conn) when a connection is free again

    def _count(self) -> None:
        self.completed += 1
        if self.completed >= self.total and not self.finished.done():
            self.finished.set_result(None)

    def done(self, conn: _Conn, status: int, body_len: int, latency: float) -> None:
        self.latencies.append(latency)
        if status == 200 and body_len == 0:
            self.ok += 1
        else:
            key = f"{status}{'' if body_len == 0 else ' with body'}"
            self.bad[key] = self.bad.get(key, 0) + 1
        self._count()
        if self.on_free is not None:
            self.on_free(conn)

    def lost(self, _conn: _Conn) -> None:
        self.bad["connection lost"] = self.bad.get("connection lost", 0) + 1
        self._count()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def _progress(stats: _Stats, label: str, started: float) -> None:
    while True:
        await asyncio.sleep(2.0)
        elapsed = time.perf_counter() - started
        print(
            f"    {label}: {stats.completed}/{stats.total} answered, {elapsed:.1f}s",
            file=sys.stderr,
            flush=True,
        )


async def _open_conns(port: int, n: int, stats: _Stats) -> list[_Conn]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        _t, proto = await loop.create_connection(lambda: _Conn(stats), HOST, port)
        conns.append(proto)
    return conns


async def run_closed(requests: list[bytes], port: int, concurrency: int, max_seconds: float, label: str) -> dict:
    stats = _Stats(len(requests))
    conns = await _open_conns(port, min(concurrency, len(requests)), stats)
    pending: Iterator[bytes] = iter(requests)

    def next_request(conn: _Conn) -> None:
        request = next(pending, None)
        if request is not None and not conn.closed:
            conn.send(request, time.perf_counter())

    stats.on_free = next_request
    cpu0 = time.process_time()
    started = time.perf_counter()
    reporter = asyncio.create_task(_progress(stats, label, started))
    for conn in conns:
        next_request(conn)
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(stats.finished), max_seconds)
    except TimeoutError:
        timed_out = True
    elapsed = time.perf_counter() - started
    reporter.cancel()
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return _result(stats, elapsed, timed_out, mode="closed", concurrency=len(conns), cpu_s=time.process_time() - cpu0)


async def run_open(requests: list[bytes], port: int, rate: float, max_conns: int, grace_s: float, label: str) -> dict:
    """Send callback i at t0 + i/rate whatever happened before; latency counts from that scheduled time."""
    stats = _Stats(len(requests))
    idle: deque[_Conn] = deque(await _open_conns(port, min(64, max_conns), stats))
    n_conns = len(idle)
    backlog: deque[tuple[bytes, float]] = deque()  # due, but no free connection yet
    loop = asyncio.get_running_loop()
    opening = 0
    max_backlog = 0

    def free(conn: _Conn) -> None:
        if conn.closed:
            return
        if backlog:
            request, due = backlog.popleft()
            conn.send(request, due)
        else:
            idle.append(conn)

    async def grow() -> None:
        nonlocal n_conns, opening
        try:
            _t, proto = await loop.create_connection(lambda: _Conn(stats), HOST, port)
            n_conns += 1
            free(proto)
        finally:
            opening -= 1

    stats.on_free = free
    interval = 1.0 / rate
    cpu0 = time.process_time()
    t0 = time.perf_counter() + 0.05
    reporter = asyncio.create_task(_progress(stats, label, t0))
    growers: set[asyncio.Task[None]] = set()
    i = 0
    while i < len(requests):
        now = time.perf_counter()
        while i < len(requests) and t0 + i * interval <= now:
            due = t0 + i * interval
            while idle and idle[0].closed:
                idle.popleft()
            if idle:
                idle.popleft().send(requests[i], due)
            else:
                backlog.append((requests[i], due))
                max_backlog = max(max_backlog, len(backlog))
                if n_conns + opening < max_conns:
                    opening += 1
                    task = asyncio.create_task(grow())
                    growers.add(task)
                    task.add_done_callback(growers.discard)
            i += 1
        if i < len(requests):
            await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
    sent_all = time.perf_counter()
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(stats.finished), grace_s)
    except TimeoutError:
        timed_out = True
    elapsed = time.perf_counter() - t0
    reporter.cancel()
    for conn in list(idle):
        if conn.transport is not None:
            conn.transport.close()
    result = _result(stats, elapsed, timed_out, mode="open", concurrency=n_conns, cpu_s=time.process_time() - cpu0)
    result.update(
        target_rate=rate,
        achieved_send_rate=len(requests) / max(1e-9, sent_all - t0),
        max_backlog=max_backlog,
    )
    return result


def _result(stats: _Stats, elapsed: float, timed_out: bool, *, mode: str, concurrency: int, cpu_s: float) -> dict:
    lat = sorted(stats.latencies)
    return {
        "client_cpu_share": cpu_s / elapsed if elapsed > 0 else 0.0,
        "mode": mode,
        "connections": concurrency,
        "sent": stats.total,
        "answered": stats.completed,
        "ok_200_empty": stats.ok,
        "bad": stats.bad,
        "timed_out": timed_out,
        "elapsed_s": elapsed,
        "rate": stats.completed / elapsed if elapsed > 0 else 0.0,
        "p50_ms": _percentile(lat, 0.50) * 1000,
        "p90_ms": _percentile(lat, 0.90) * 1000,
        "p99_ms": _percentile(lat, 0.99) * 1000,
        "max_ms": (lat[-1] * 1000) if lat else float("nan"),
    }


def load_main(args: argparse.Namespace) -> None:
    requests = read_requests(Path(args.file), args.start, args.count, args.port)

    async def main() -> dict:
        if args.mode == "closed":
            return await run_closed(requests, args.port, args.concurrency, args.max_seconds, args.label)
        return await run_open(requests, args.port, args.rate, args.max_conns, args.grace, args.label)

    print(json.dumps(asyncio.run(main())), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Bare baseline server (role "bare", a separate process)
# ---------------------------------------------------------------------------------------------------------------


def bare_main(args: argparse.Namespace) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post(CALLBACK_PATH, handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, HOST, args.port, reuse_address=True).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.lifetime)  # bounded even if the parent dies
        await runner.cleanup()

    import uvloop  # the same event loop as `wecom-bot serve`, so the ratio compares like with like

    uvloop.run(serve())


# ---------------------------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise SystemExit(f"server exited with {proc.returncode} before listening\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"server did not listen on {HOST}:{port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _redis_cpu_s() -> float:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


def _load(
    args: argparse.Namespace, file: Path, port: int, start: int, count: int, mode: str, label: str, server_pid: int
) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--role", "load", "--file", str(file),
        "--port", str(port), "--start", str(start), "--count", str(count), "--mode", mode,
        "--concurrency", str(args.concurrency), "--rate", str(args.rate), "--max-conns", str(args.max_conns),
        "--label", label,
    ]  # fmt: skip
    budget = count / args.rate + 60 if mode == "open" else args.max_seconds + 30
    cpu0, redis0, t0 = _proc_cpu_s(server_pid), _redis_cpu_s(), time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, timeout=budget, cwd=ROOT).stdout
    wall = time.perf_counter() - t0  # includes the generator's start-up, so shares are slight underestimates
    result: dict = json.loads(out.decode().strip().splitlines()[-1])
    result["server_cpu_s"] = _proc_cpu_s(server_pid) - cpu0
    result["server_cpu_share"] = result["server_cpu_s"] / wall
    result["server_cpu_us_per_callback"] = result["server_cpu_s"] / count * 1e6
    result["redis_cpu_share"] = (_redis_cpu_s() - redis0) / wall
    return result


def _fetch(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


_BUCKET = re.compile(r'^wecom_callback_ack_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', re.MULTILINE)
_ACCEPTED = re.compile(r'^wecom_callbacks_total\{outcome="accepted"\} ([0-9.e+]+)$', re.MULTILINE)


def _buckets(metrics: str) -> list[tuple[float, float]]:
    return [(float(le), float(n)) for le, n in _BUCKET.findall(metrics)]


def _histogram_quantiles(before: str, after: str) -> dict[str, str]:
    """p50/p99 bucket upper bounds of the server-side ack histogram between two scrapes."""
    diff = [(le, n - m) for (le, n), (_, m) in zip(_buckets(after), _buckets(before), strict=True)]
    total = diff[-1][1] if diff else 0
    out = {"count": str(int(total))}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        bound = next((le for le, n in diff if total and n >= q * total), float("inf"))
        out[name] = "≤ " + (f"{bound * 1000:g} ms" if bound != float("inf") else "inf")
    return out


def _stream_entries(prefix: str) -> tuple[int, list[str]]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:inbound:*", count=1000))
        return sum(int(client.xlen(k)) for k in keys), keys
    finally:
        client.close()


def _flush_prefix(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        return len(keys)
    finally:
        client.close()


REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _closed(args: argparse.Namespace, file: Path, port: int, start: int, label: str, pid: int) -> dict:
    r = _load(args, file, port, start, args.requests, "closed", f"{label} closed", pid)
    print(f"  [{label}] closed: {r['rate']:.0f} callbacks/s, {r['ok_200_empty']}/{r['sent']} ok; {_cpu(r)}", flush=True)
    return r


def _open(args: argparse.Namespace, file: Path, port: int, start: int, label: str, pid: int) -> dict:
    n_open = int(args.rate * args.duration)
    r = _load(args, file, port, start, n_open, "open", f"{label} open", pid)
    ok = f"{r['ok_200_empty']}/{r['sent']} ok"
    print(f"  [{label}] open at {args.rate:g}/s: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, {ok}", flush=True)
    return r


def _cpu(r: dict) -> str:
    return (
        f"CPU: server {r['server_cpu_share'] * 100:.0f} % ({r['server_cpu_us_per_callback']:.0f} µs/callback), "
        f"load generator {r['client_cpu_share'] * 100:.0f} %, redis {r['redis_cpu_share'] * 100:.0f} %"
    )


def _bot_env(tmp: Path, port: int, prefix: str, ident: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WECOM_", "BOT_", "REDIS_", "DATABASE_"))}
    env.update(
        WECOM_CORP_ID=ident["corp_id"],
        WECOM_SECRET=ident["secret"],
        WECOM_KF_SECRET=ident["kf_secret"],
        WECOM_TOKEN=ident["token"],
        WECOM_AES_KEY=ident["aes_key"],
        WECOM_AGENT_ID=str(ident["agent_id"]),
        WECOM_API_BASE="http://127.0.0.1:9",  # never called: the ingress does not talk to WeCom
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp}/bench.sqlite3",
        REDIS_URL=REDIS_URL,
        REDIS_KEY_PREFIX=prefix,
        BOT_HOST=HOST,
        BOT_PORT=str(port),
        WORKER_CONCURRENCY="0",
        LOG_LEVEL="INFO",
        LOG_JSON="true",
    )
    return env


def orchestrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    ident = _identity()
    n_open = int(args.rate * args.duration)
    rounds = args.rounds
    per_target = args.warmup + rounds * (args.requests + n_open)
    prefix = f"bench{secrets.token_hex(5)}"
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load_before:.1f} before start: other work shares the cores; figures will be low")
    with tempfile.TemporaryDirectory(prefix="wecom-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        callbacks = build_callbacks(per_target, ident)
        file = tmp / "callbacks.bin"
        write_callbacks(file, callbacks)
        print(f"built {per_target} signed, encrypted callbacks in {time.perf_counter() - t:.1f}s", flush=True)

        bare_port, bot_port = _free_port(), _free_port()
        bare = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--role", "bare", "--port", str(bare_port)], cwd=ROOT
        )
        log_path = tmp / "server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "serve"],
                cwd=tmp,  # no stray .env
                env=_bot_env(tmp, bot_port, prefix, ident),
                stdout=log,
                stderr=log,
            )
        checks: dict[str, Any] = {}
        base: dict[str, list[dict]] = {"warmup": [], "closed": [], "open": []}
        bot: dict[str, list[dict]] = {"warmup": [], "closed": [], "open": []}
        targets = (("baseline", bare_port, bare.pid, base), ("bot", bot_port, server.pid, bot))
        try:
            _wait_listening(bare_port, bare, 15)
            _wait_listening(bot_port, server, 60, log_path)
            print(f"baseline: bare aiohttp handler on {HOST}:{bare_port} (pid {bare.pid})", flush=True)
            print(
                f"bot: wecom-bot serve on {HOST}:{bot_port} (pid {server.pid}), REDIS_KEY_PREFIX={prefix}", flush=True
            )
            # Both servers idle while the other is measured; rounds alternate which goes first, so drift in the
            # machine's speed (a shared VM) hits both alike. Both get the same callbacks.
            for label, port, pid, out in targets:
                print(f"  [{label}] warm-up: {args.warmup} callbacks", flush=True)
                out["warmup"].append(_load(args, file, port, 0, args.warmup, "closed", f"{label} warm-up", pid))
            offset = args.warmup
            for n in range(rounds):
                print(
                    f"round {n + 1}/{rounds}: closed loop, {args.requests} callbacks, {args.concurrency} connections"
                )
                for label, port, pid, out in targets if n % 2 == 0 else targets[::-1]:
                    out["closed"].append(_closed(args, file, port, offset, label, pid))
                offset += args.requests
            metrics_before_open = _fetch(bot_port, "/metrics")
            for n in range(rounds):
                print(f"round {n + 1}/{rounds}: open loop, {n_open} callbacks at {args.rate:g}/s")
                for label, port, pid, out in targets if n % 2 == 0 else targets[::-1]:
                    out["open"].append(_open(args, file, port, offset, label, pid))
                offset += n_open
            metrics_after = _fetch(bot_port, "/metrics")
            checks["server_histogram_open"] = _histogram_quantiles(metrics_before_open, metrics_after)
            accepted = _ACCEPTED.search(metrics_after)
            checks["accepted_metric"] = int(float(accepted.group(1))) if accepted else 0
            checks["stream_entries"], checks["streams"] = _stream_entries(prefix)
        finally:
            _stop(bare)
            _stop(server)
            removed = _flush_prefix(prefix)
            print(f"cleanup: servers stopped, {removed} Redis keys under {prefix}: removed", flush=True)
        server_errors = [
            line for line in log_path.read_text(errors="replace").splitlines() if '"level": "error"' in line
        ]

    def flat(results: dict[str, list[dict]]) -> list[dict]:
        return [r for phase in results.values() for r in phase]

    sent_bot = sum(r["sent"] for r in flat(bot))
    ok_bot = sum(r["ok_200_empty"] for r in flat(bot))
    ok_base = sum(r["ok_200_empty"] for r in flat(base))
    sent_base = sum(r["sent"] for r in flat(base))
    problems = []
    if ok_base != sent_base:
        problems.append(f"baseline: {sent_base - ok_base} callbacks not answered 200/empty")
    if ok_bot != sent_bot:
        problems.append(f"bot: {sent_bot - ok_bot} callbacks not answered 200/empty")
    if checks["stream_entries"] != sent_bot:
        problems.append(f"bot: Redis streams hold {checks['stream_entries']} entries, expected {sent_bot}")
    if checks["accepted_metric"] != sent_bot:
        problems.append(f"bot: accepted metric {checks['accepted_metric']}, expected {sent_bot}")
    if server_errors:
        problems.append(f"bot: {len(server_errors)} error log lines, first: {server_errors[0][:300]}")
    if any(r["timed_out"] for r in [*flat(base), *flat(bot)]):
        problems.append("a phase hit its time limit")

    ratios = [b["rate"] / a["rate"] for a, b in zip(base["closed"], bot["closed"], strict=True)]
    cpu_ratios = [
        a["server_cpu_us_per_callback"] / b["server_cpu_us_per_callback"]
        for a, b in zip(base["closed"], bot["closed"], strict=True)
    ]
    summary = {
        name: {
            "rate": _median([r["rate"] for r in res["closed"]]),
            "cpu_us": _median([r["server_cpu_us_per_callback"] for r in res["closed"]]),
            "p50_ms": _median([r["p50_ms"] for r in res["open"]]),
            "p99_ms": _median([r["p99_ms"] for r in res["open"]]),
            "p99_worst_ms": max(r["p99_ms"] for r in res["open"]),
        }
        for name, res in (("baseline", base), ("bot", bot))
    }
    ratio, cpu_ratio = _median(ratios), _median(cpu_ratios)
    hist = checks["server_histogram_open"]
    rate = f"{args.rate:g}/s"
    print()
    print("=" * 78)
    print(f"medians of {rounds} interleaved rounds")
    print(
        f"| target | callbacks/s (closed, C={args.concurrency}) | server CPU µs/cb | p50 @ {rate} | p99 @ {rate} "
        "| worst-round p99 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, key in (("bare aiohttp handler", "baseline"), ("bot server, 1 process", "bot")):
        m = summary[key]
        print(
            f"| {name} | {m['rate']:.0f} | {m['cpu_us']:.0f} | {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms "
            f"| {m['p99_worst_ms']:.2f} ms |"
        )
    print(
        f"ratio bot/bare (median of per-round ratios): {ratio * 100:.1f} % by throughput "
        f"(rounds: {', '.join(f'{x * 100:.0f} %' for x in ratios)}), {cpu_ratio * 100:.1f} % by CPU per callback "
        "(target ≥ 40 %)"
    )
    print(f"load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"bot ack p99 at {rate}: median {summary['bot']['p99_ms']:.2f} ms (target ≤ 20 ms)")
    print(
        f"server histogram (handler time) over the bot's open-loop rounds: {hist['count']} callbacks, "
        f"p50 {hist['p50']}, p99 {hist['p99']}"
    )
    print(
        f"checks: {ok_bot}/{sent_bot} bot callbacks 200/empty; Redis streams hold {checks['stream_entries']} "
        f"entries in {len(checks['streams'])} partitions (expected {sent_bot}); accepted metric "
        f"{checks['accepted_metric']}"
    )
    print(f"total wall time {time.monotonic() - started:.0f}s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"baseline": base, "bot": bot, "checks": checks, "summary": summary, "ratios": ratios},
                indent=2,
                default=str,
            )
        )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _bad(results: dict[str, dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results.values():
        for k, v in r["bad"].items():
            out[k] = out.get(k, 0) + v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per phase; medians are reported (3)")
    p.add_argument("--requests", type=int, default=10_000, help="callbacks per closed-loop round (10000)")
    p.add_argument("--concurrency", type=int, default=32, help="connections in the closed loop (32)")
    p.add_argument("--warmup", type=int, default=1_000, help="warm-up callbacks before the closed loop (1000)")
    p.add_argument("--rate", type=float, default=1_000.0, help="open-loop callbacks/s (1000)")
    p.add_argument("--duration", type=float, default=5.0, help="open-loop seconds per round (5)")
    p.add_argument("--max-conns", type=int, default=256, help="open-loop connection cap (256)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time limit of one closed-loop phase (120)")
    p.add_argument("--json", help="also write the raw results to this file")
    # internal roles (the script starts itself as the baseline server and the load generators)
    p.add_argument("--role", choices=["run", "bare", "load"], default="run", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lifetime", type=float, default=900.0, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["closed", "open"], default="closed", help=argparse.SUPPRESS)
    p.add_argument("--grace", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--label", default="load", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "bare":
        bare_main(args)
        return 0
    if args.role == "load":
        load_main(args)
        return 0
    if args.requests < 1 or args.concurrency < 1 or args.rate <= 0 or args.duration <= 0 or args.warmup < 0:
        p.error("--requests, --concurrency, --rate and --duration must be positive")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
