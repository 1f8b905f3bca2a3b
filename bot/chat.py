"""`wecom-bot chat`: be a WeChat customer in the terminal, talking to a running sandbox bot."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from typing import Any

import aiohttp

SIM = "/sandbox/wecom/_sim"
LONG_POLL_S = 25
# After the input ends (Ctrl-D, or the end of piped input), wait this long for replies still on their way...
DEFAULT_LINGER_S = 10.0
# ...and stop early once the bot has answered and then stayed quiet this long.
QUIET_S = 1.0


def _describe(record: dict[str, Any]) -> str:
    content = record.get("content") or {}
    if isinstance(content, dict) and isinstance(content.get("content"), str):
        return str(content["content"])
    return f"[{record.get('msgtype')}] {content}"


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines from stdin, read on a daemon thread (a blocked read must never keep the process alive)."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        try:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
        except (OSError, ValueError, RuntimeError):  # stdin closed or the loop already gone
            pass
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, name="chat-stdin", daemon=True).start()
    return lines


class _Console:
    """Prompts only on a terminal; piped output gets plain `bot> ...` lines."""

    def __init__(self) -> None:
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()

    def prompt(self) -> None:
        if self.interactive:
            print("you> ", end="", flush=True)

    def show(self, line: str) -> None:
        if self.interactive:
            print(f"\r{line}\nyou> ", end="", flush=True)
        else:
            print(line, flush=True)


class _Replies:
    """Long-polls the simulator for what the bot sent to the customer and prints it."""

    def __init__(self, http: aiohttp.ClientSession, base: str, customer: str, after: int, console: _Console) -> None:
        self.http, self.base, self.customer, self.after, self.console = http, base, customer, after, console
        self.received = 0
        self.changed = asyncio.Event()
        self.failure: str | None = None

    async def run(self) -> None:
        while True:
            params: dict[str, str | int] = {"after": self.after, "wait": LONG_POLL_S, "recipient": self.customer}
            try:
                async with self.http.get(f"{self.base}{SIM}/sent", params=params) as response:
                    if response.status != 200:
                        self.failure = f"the bot stopped answering (HTTP {response.status})"
                        break
                    data = await response.json()
                    int(data["last_seq"])
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                self.failure = f"lost the connection to {self.base} ({type(exc).__name__})"
                break
            self.after = int(data["last_seq"])
            for record in data.get("sent", []):
                if record.get("accepted"):
                    self.console.show(f"bot> {_describe(record)}")
                else:
                    self.console.show(f"(refused by WeCom: errcode {record.get('errcode')})")
                self.received += 1
                self.changed.set()
        self.changed.set()


async def _linger(replies: _Replies, expect_after: int, linger_s: float) -> None:
    """Wait (at most linger_s) until the bot has answered the last message and then stayed quiet QUIET_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger_s
    while replies.failure is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        answered = replies.received > expect_after
        replies.changed.clear()
        try:
            await asyncio.wait_for(replies.changed.wait(), min(QUIET_S, remaining) if answered else remaining)
        except TimeoutError:
            if answered:
                return


async def run_chat(base: str, customer: str, *, linger_s: float = DEFAULT_LINGER_S) -> int:
    """Send each line read from stdin as the customer and print the bot's replies as they arrive."""
    base = base.rstrip("/")
    console = _Console()
    timeout = aiohttp.ClientTimeout(total=LONG_POLL_S + 15, connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.get(f"{base}{SIM}/sent", params={"after": 0, "recipient": customer}) as response:
                if response.status == 404:
                    print(
                        f"{base} is not a sandbox bot (no simulator at {SIM}); `chat` needs `wecom-bot serve` "
                        "running without WeCom credentials.",
                        file=sys.stderr,
                    )
                    return 2
                after = int((await response.json())["last_seq"])
        except (aiohttp.ClientError, TimeoutError):
            print(f"cannot reach {base}: start the bot with `make serve` (or `wecom-bot serve`) first.",
                  file=sys.stderr)
            return 2
        quit_hint = "Ctrl-D to quit" if console.interactive else "replies follow"
        print(f"chatting as {customer} with {base}; {quit_hint}", flush=True)
        replies = _Replies(http, base, customer, after, console)
        printer = asyncio.create_task(replies.run())
        lines = _stdin_lines(asyncio.get_running_loop())
        sent_at_received = -1
        try:
            console.prompt()
            while True:
                next_line = asyncio.ensure_future(lines.get())
                await asyncio.wait({next_line, printer}, return_when=asyncio.FIRST_COMPLETED)
                if not next_line.done():  # the printer gave up: the bot went away
                    next_line.cancel()
                    break
                line = next_line.result()
                if line is None:
                    break
                if line.strip():
                    sent_at_received = replies.received
                    payload = {"external_userid": customer, "text": line}
                    try:
                        async with http.post(f"{base}{SIM}/kf/customer_message", json=payload) as response:
                            if response.status != 200:
                                console.show(f"(simulator refused the message: HTTP {response.status})")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        replies.failure = f"lost the connection to {base} ({type(exc).__name__})"
                        break
                console.prompt()
            if sent_at_received >= 0 and replies.failure is None:
                await _linger(replies, sent_at_received, linger_s)
        finally:
            printer.cancel()
            await asyncio.gather(printer, return_exceptions=True)
    if console.interactive:
        print()
    if replies.failure:
        print(replies.failure, file=sys.stderr)
        return 1
    return 0
