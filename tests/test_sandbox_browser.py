"""The sandbox chat page in a real headless Chromium, served by a real `wecom-bot serve` subprocess.

Needs the system Chromium (`/usr/bin/chromium`; Playwright never downloads a browser here). Without it the
test fails, unless WECOM_SKIP_BROWSER=1 says this machine is not meant to run browser tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.scripts_expect import scripted_text
from tests.test_serve import BotServer, start_server

pytestmark = pytest.mark.slow

SCREENSHOT = Path("/tmp/sandbox.png")
STEP_TIMEOUT_MS = 15_000
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _unavailable(reason: str) -> None:
    if os.environ.get("WECOM_SKIP_BROWSER") == "1":
        pytest.skip(f"{reason} (WECOM_SKIP_BROWSER=1)")
    pytest.fail(f"{reason}; install it, or set WECOM_SKIP_BROWSER=1 to skip the browser test on this machine")


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        _unavailable("Chromium is not installed (no `chromium` on PATH; Debian/Ubuntu: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("Playwright for Python is missing (pip install -e '.[dev]')")
    assert path is not None
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BotServer]:
    bot = start_server(tmp_path / "serve")
    try:
        yield bot
    finally:
        bot.kill()


def test_sandbox_page_chat_in_chromium(chromium: str, server: BotServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a new, empty profile
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 900, "height": 640},
            locale="zh-CN",
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)

            def on_console(message: Any) -> None:
                if message.type == "error":
                    problems.append(f"console: {message.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

            page.goto(server.url("/"))  # the root sends a browser to /sandbox
            assert page.url.endswith("/sandbox")
            expect(page).to_have_title("WeCom bot sandbox · 沙箱")
            # The page is ready once it has introduced the customer it plays.
            expect(page.locator("#status")).to_contain_text("已连接")

            text = "你好，我想问一下发货时间"
            page.get_by_label("message").fill(text)
            page.get_by_role("button", name="发送").click()

            customer = page.locator(".msg.customer .bubble")
            expect(customer).to_have_count(1)
            expect(customer).to_have_text(text)
            expect(page.get_by_label("message")).to_have_value("")

            bot = page.locator(".msg.bot .bubble")
            expect(bot).to_have_count(1)
            expect(bot).to_have_text(scripted_text(text))

            # Enter sends too.
            page.get_by_label("message").fill("第二个问题")
            page.get_by_label("message").press("Enter")
            expect(customer).to_have_count(2)
            expect(bot).to_have_count(2)

            page.screenshot(path=str(SCREENSHOT))
        finally:
            context.close()
    assert not problems, problems
    assert SCREENSHOT.stat().st_size > 0
