"""The real `wecom-bot serve` as a newcomer starts it: sandbox mode on the embedded defaults, in a subprocess."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from bot.serve import connect_host
from tests.scripts_expect import NEWCOMER, scripted_replies, scripted_text

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIM = "/sandbox/wecom/_sim"
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 10.0
STEP_DEADLINE_S = 15.0
# Settings a developer's shell may carry; the tests start from none of them.
SETTING_PREFIXES = ("WECOM_", "BOT_", "REDIS_", "DATABASE_", "LOG_", "AUTO_MIGRATE", "QUEUE_", "WORKER_")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**settings: str) -> dict[str, str]:
    """The current environment without any bot setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(SETTING_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", *args]


def run_cli(args: list[str], cwd: Path, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run a short-lived `wecom-bot` command (cwd = a temp dir, so no stray .env is read)."""
    return subprocess.run(
        cli(*args), cwd=cwd, env=clean_env(**settings), capture_output=True, text=True, timeout=timeout, check=False
    )


def call(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - local server
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - local test server
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str, timeout: float = 10) -> tuple[int, Any]:
    status, body = call("GET", url, timeout=timeout)
    return status, json.loads(body)


def wait_for(predicate: Callable[[], bool], what: str, deadline_s: float = STEP_DEADLINE_S) -> None:
    """Poll a condition until a deadline (bounded; never a timed assertion)."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class BotServer:
    """A `wecom-bot serve` subprocess; its stdout and stderr go to a file (no pipe to fill up)."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    settings: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def sigterm(self, deadline_s: float = STOP_DEADLINE_S) -> tuple[int, float]:
        """SIGTERM, then wait (bounded) for the exit; returns (exit code, seconds taken)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_DEADLINE_S)
            raise AssertionError(f"serve did not exit within {deadline_s} s of SIGTERM\n{self.log()}") from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_DEADLINE_S)


def _healthy(server: BotServer) -> bool:
    if server.proc.poll() is not None:
        raise AssertionError(f"serve exited with {server.proc.returncode} during start-up:\n{server.log()}")
    try:
        status, _ = call("GET", server.url("/healthz"), timeout=2)
    except OSError:
        return False
    return status == 200


def start_server(workdir: Path, **settings: str) -> BotServer:
    """Start `wecom-bot serve` in `workdir` with only `settings` (plus a free BOT_PORT and a temp database)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = settings.setdefault("BOT_PORT", str(free_port()))
    settings.setdefault("DATABASE_URL", f"sqlite:///{workdir}/bot.sqlite3")
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cli("serve"), cwd=workdir, env=clean_env(**settings), stdout=log_file, stderr=subprocess.STDOUT
        )
    server = BotServer(proc, f"http://127.0.0.1:{port}", log_path, settings)
    try:
        wait_for(lambda: _healthy(server), "/healthz", START_DEADLINE_S)
    except BaseException:
        server.kill()
        raise
    return server


@pytest.fixture
def sandbox_server(tmp_path: Path) -> Iterator[BotServer]:
    """`wecom-bot serve` with the embedded defaults: no WECOM_*, no REDIS_URL, SQLite in tmp_path."""
    server = start_server(tmp_path / "serve")
    try:
        yield server
    finally:
        server.kill()


def customer_says(server: BotServer, customer: str, text: str) -> dict[str, Any]:
    status, body = call("POST", server.url(f"{SIM}/kf/customer_message"), {"external_userid": customer, "text": text})
    assert status == 200, body
    return dict(json.loads(body))


def sent_to(server: BotServer, customer: str, after: int = 0, wait_s: float = 0) -> dict[str, Any]:
    query = urllib.parse.urlencode({"after": after, "wait": wait_s, "recipient": customer})
    status, data = get_json(server.url(f"{SIM}/sent?{query}"), timeout=wait_s + 10)
    assert status == 200, data
    return dict(data)


def metric_value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_connect_host_never_uses_the_wildcard_address() -> None:
    assert connect_host("0.0.0.0") == "127.0.0.1"  # noqa: S104
    assert connect_host("") == "127.0.0.1"
    assert connect_host("::") == "[::1]"
    assert connect_host("::1") == "[::1]"
    assert connect_host("127.0.0.1") == "127.0.0.1"
    assert connect_host("localhost") == "localhost"


def test_sandbox_serve_end_to_end(sandbox_server: BotServer) -> None:
    server = sandbox_server

    # Ready, with both dependencies checked.
    status, ready = get_json(server.url("/readyz"))
    assert status == 200, ready
    assert ready == {"ready": True, "checks": {"database": "ok", "redis": "ok"}}

    # Prometheus families.
    status, body = call("GET", server.url("/metrics"))
    assert status == 200
    metrics = body.decode()
    for family in (
        "wecom_callbacks_total",
        "wecom_callback_ack_seconds",
        "wecom_queue_depth",
        "wecom_dead_letters",
        "wecom_api_calls_total",
    ):
        assert f"# TYPE {family} " in metrics, family

    # The start-up log explains the mode and the embedded Redis.
    startup = server.log()
    assert "SANDBOX MODE" in startup
    assert "fakeredis" in startup and "in-process" in startup and "Single process only" in startup
    assert "http://0.0.0.0" not in startup, "a URL nobody can open"

    # The sandbox root sends a browser to the chat page.
    status, page = call("GET", server.url("/sandbox"))
    assert status == 200 and b"<form" in page

    # A customer writes; the bot's scripted answer arrives through the simulator's kf/send_msg.
    customer = "wmServeTest01"
    text = "我的订单 A-1234 还没到，秘密内容"
    pushed = customer_says(server, customer, text)
    first = sent_to(server, customer, after=0, wait_s=STEP_DEADLINE_S)
    assert [r["content"] for r in first["sent"]] == scripted_replies(text, customer=customer, tags=NEWCOMER), first
    assert first["sent"][0]["api"] == "kf/send_msg" and first["sent"][0]["accepted"]

    # WeCom retries the same callback: still exactly one answer once everything settled.
    redeliver = server.url(f"{SIM}/callbacks/{pushed['callback']['id']}/redeliver")
    status, redelivered = call("POST", redeliver, {"wait": True})
    assert status == 200, redelivered

    def settled() -> bool:
        _, callbacks = get_json(server.url(f"{SIM}/callbacks"))
        if any(c["outcome"] == "pending" for c in callbacks["callbacks"]):
            return False
        _, scrape = call("GET", server.url("/metrics"))
        return metric_value(scrape.decode(), "wecom_queue_depth") == 0

    wait_for(settled, "callbacks delivered and the queue drained")
    everything = sent_to(server, customer, after=0)
    assert len(everything["sent"]) == 1, everything
    _, scrape = call("GET", server.url("/metrics"))
    assert 'wecom_callbacks_total{outcome="duplicate"} 1.0' in scrape.decode()

    # Nothing secret (nor the customer's words) in the INFO log.
    _, credentials = get_json(server.url("/sandbox/credentials"))
    log = server.log()
    assert "message handled" in log, "the log should still say what happened"
    for secret in (
        text,
        "A-1234",
        credentials["token"],
        credentials["encoding_aes_key"],
        credentials["app_secret"],
        credentials["kf_secret"],
    ):
        assert secret not in log, f"{secret!r} leaked into the log"

    # SIGTERM with a long-poll still open (it would otherwise hold the shutdown for 50 s): a prompt, clean exit.
    poll_sent = threading.Event()
    poll_result: queue.Queue[object] = queue.Queue()

    def long_poll() -> None:
        conn = HTTPConnection("127.0.0.1", int(server.settings["BOT_PORT"]), timeout=60)
        try:
            conn.request("GET", f"{SIM}/sent?after=999&wait=50")
            poll_sent.set()
            poll_result.put(conn.getresponse().status)
        except OSError as exc:
            poll_result.put(exc)
        finally:
            poll_sent.set()
            conn.close()

    threading.Thread(target=long_poll, daemon=True).start()
    assert poll_sent.wait(STEP_DEADLINE_S)
    assert call("GET", server.url("/healthz"))[0] == 200  # a round trip after the poll went out
    code, took = server.sigterm()
    assert code == 0, server.log()
    assert took < STOP_DEADLINE_S
    outcome = poll_result.get(timeout=STEP_DEADLINE_S)
    assert outcome == 503 or isinstance(outcome, OSError), outcome
    final_log = server.log()
    assert "Traceback" not in final_log
    assert "stopped" in final_log


def test_serve_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))  # noqa: S104 - the port the bot would want
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["serve"], tmp_path, BOT_PORT=str(port), DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "BOT_PORT" in lines[0] and "in use" in lines[0], result.stderr


class LineReader:
    """Reads a pipe on a thread so the test can wait for a line with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, predicate: Callable[[str], bool], what: str, deadline_s: float = STEP_DEADLINE_S) -> str:
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; output so far: {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended before {what}; output: {self.seen}")
            self.seen.append(line)
            if predicate(line):
                return line


def test_chat_command_talks_to_the_running_sandbox(sandbox_server: BotServer, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*cli("chat", "--url", sandbox_server.base_url, "--customer", "wmChatTest01")],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        out = LineReader(proc.stdout)
        out.wait_for(lambda line: line.startswith("chatting as wmChatTest01"), "the greeting")
        proc.stdin.write("你好，请问营业时间？\n")
        proc.stdin.flush()
        reply = out.wait_for(lambda line: line.startswith("bot> "), "the bot's reply")
        assert reply == f"bot> {scripted_text('你好，请问营业时间？', customer='wmChatTest01')}"
        proc.stdin.close()  # Ctrl-D
        assert proc.wait(timeout=STEP_DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_DEADLINE_S)


def test_chat_command_with_piped_input_waits_for_the_replies(sandbox_server: BotServer, tmp_path: Path) -> None:
    proc = subprocess.run(
        cli("chat", "--url", sandbox_server.base_url, "--customer", "wmChatPipe01"),
        cwd=tmp_path,
        env=clean_env(),
        input="第一条\n第二条\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [f"bot> {scripted_text(t, customer='wmChatPipe01')}" for t in ("第一条", "第二条")]
    assert sum(proc.stdout.count(r) for r in set(replies)) == 2, proc.stdout
    assert "you>" not in proc.stdout, "no prompts when the input is piped"


def test_chat_command_without_a_server_says_how_to_start_one(tmp_path: Path) -> None:
    result = run_cli(["chat", "--url", f"http://127.0.0.1:{free_port()}"], tmp_path, timeout=30)
    assert result.returncode == 2
    assert "wecom-bot serve" in result.stderr and "Traceback" not in result.stderr
