"""`wecom-bot chat`: be a WeChat customer in the terminal, talking to a running sandbox bot."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp

SIM = "/sandbox/wecom/_sim"


def _describe(record: dict[str, Any]) -> str:
    content = record.get("content") or {}
    if isinstance(content, dict) and isinstance(content.get("content"), str):
        return str(content["content"])
    return f"[{record.get('msgtype')}] {content}"


async def _read_line() -> str | None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.rstrip("\n") if line else None


async def _print_replies(http: aiohttp.ClientSession, base: str, customer: str, after: int) -> None:
    while True:
        params: dict[str, str | int] = {"after": after, "wait": 25, "recipient": customer}
        async with http.get(f"{base}{SIM}/sent", params=params) as response:
            data = await response.json()
        after = int(data["last_seq"])
        for record in data.get("sent", []):
            if record.get("accepted"):
                print(f"\rbot> {_describe(record)}\nyou> ", end="", flush=True)
            else:
                print(f"\r(refused by WeCom: errcode {record.get('errcode')})\nyou> ", end="", flush=True)


async def run_chat(base: str, customer: str) -> int:
    """Send each typed line as the customer and print the bot's replies as they arrive."""
    base = base.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.get(f"{base}{SIM}/sent", params={"after": 0, "recipient": customer}) as response:
                if response.status == 404:
                    print(f"{base} is not a sandbox bot (no simulator at {SIM}).", file=sys.stderr)
                    return 2
                after = int((await response.json())["last_seq"])
        except aiohttp.ClientConnectionError:
            print(f"cannot reach {base}: start the bot with `make serve` (or `wecom-bot serve`) first.", file=sys.stderr)
            return 2
        print(f"chatting as {customer} with {base}; Ctrl-D to quit")
        printer = asyncio.create_task(_print_replies(http, base, customer, after))
        try:
            print("you> ", end="", flush=True)
            while (line := await _read_line()) is not None:
                if line.strip():
                    payload = {"external_userid": customer, "text": line}
                    async with http.post(f"{base}{SIM}/kf/customer_message", json=payload) as response:
                        if response.status != 200:
                            print(f"(simulator refused: HTTP {response.status})")
                print("you> ", end="", flush=True)
        finally:
            printer.cancel()
    print()
    return 0
