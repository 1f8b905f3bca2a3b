"""The sandbox chat page in a real headless Chromium, served by a real `wecom-bot serve` subprocess.

Needs the system Chromium (`/usr/bin/chromium`; Playwright never downloads a browser here). Without it the
test fails, unless WECOM_SKIP_BROWSER=1 says this machine is not meant to run browser tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.support_config import load_support_config
from scripts_library import Library, Matcher, Query, load_library, render
from tests.scripts_expect import NEWCOMER, event_replies, scripted_text
from tests.test_serve import SIM, BotServer, call, get_json, start_server

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


def menu_click_replies(menu_id: str, text: str) -> list[dict[str, Any]]:
    """What the library answers a kf menu click (a text carrying `menu_id`) with."""
    library = load_library()
    assert isinstance(library, Library), library
    match = Matcher(library).match(Query(text=text, menu_id=menu_id))
    assert match is not None, f"the library does not answer a click on {menu_id!r}"
    return [item.content for item in render(library, match.script, match.variant, {})]


@contextlib.contextmanager
def sandbox_page(chromium: str, server: BotServer, tmp_path: Path, problems: list[str]) -> Iterator[Any]:
    """A fresh Chromium profile on /sandbox; console errors and page errors go to `problems`."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=STEP_TIMEOUT_MS)
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
            yield page
        finally:
            context.close()


def test_sandbox_page_chat_in_chromium(chromium: str, server: BotServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    problems: list[str] = []
    with sandbox_page(chromium, server, tmp_path, problems) as page:
        page.goto(server.url("/"))  # the root sends a browser to /sandbox
        assert page.url.endswith("/sandbox")
        expect(page).to_have_title("WeCom bot sandbox · 沙箱")
        # The page is ready once it has introduced the customer it plays.
        expect(page.locator("#status")).to_contain_text("已连接")

        # Opening the chat is an enter_session: the library's welcome menu comes through send_msg_on_event,
        # rendered as WeChat shows it (head, one button per click item, tail), not as JSON.
        [welcome] = event_replies("kf_session_entered", tags=NEWCOMER)  # a customer first seen now
        bot = page.locator(".msg.bot .bubble")
        expect(bot).to_have_count(1)
        menu = bot.first
        expect(menu.locator(".menu-head")).to_have_text(welcome["head_content"])
        expect(menu.locator(".menu-tail")).to_have_text(welcome["tail_content"])
        clicks = [entry["click"] for entry in welcome["list"] if entry["type"] == "click"]
        expect(menu.get_by_role("button")).to_have_text([click["content"] for click in clicks])
        expect(menu).not_to_contain_text("head_content")
        expect(menu).not_to_contain_text("{")

        text = "你好，我想问一下发货时间"
        page.get_by_label("message").fill(text)
        page.get_by_role("button", name="发送").click()

        customer = page.locator(".msg.customer .bubble")
        expect(customer).to_have_count(1)
        expect(customer).to_have_text(text)
        expect(page.get_by_label("message")).to_have_value("")
        expect(bot).to_have_count(2)
        expect(bot.nth(1)).to_have_text(scripted_text(text, tags=NEWCOMER))

        # Enter sends too.
        page.get_by_label("message").fill("第二个问题")
        page.get_by_label("message").press("Enter")
        expect(customer).to_have_count(2)
        expect(bot).to_have_count(3)

        # A click on a menu item is what WeCom delivers for it: a kf text message carrying the item's menu_id.
        human = next(click for click in clicks if click["id"] == "menu_human")
        with page.expect_request(lambda r: r.url.endswith("/kf/customer_message")) as request_info:
            menu.get_by_role("button", name=human["content"]).click()
        assert json.loads(request_info.value.post_data or "{}")["menu_id"] == "menu_human"
        expect(customer).to_have_count(3)
        expect(customer.nth(2)).to_have_text(human["content"])
        [answer] = menu_click_replies(human["id"], human["content"])
        # The script's answer, then the handoff's own notice: queued (nobody is online in the sandbox), or the
        # out-of-hours answer, depending on the time of day in the team's business hours.
        expect(bot).to_have_count(5)
        replies = [bot.nth(3).inner_text(), bot.nth(4).inner_text()]
        assert answer["content"] in replies, replies
        [notice] = [text for text in replies if text != answer["content"]] or [answer["content"]]
        texts = load_support_config().texts
        assert notice == texts.queued or notice.startswith(texts.out_of_hours.split("{")[0]), notice

        page.screenshot(path=str(SCREENSHOT))
    assert not problems, problems
    assert SCREENSHOT.stat().st_size > 0


class KfSender:
    """Sends to the page's customer through the real kf/send_msg, as a servicer's tool would."""

    def __init__(self, server: BotServer, customer: str) -> None:
        _, credentials = get_json(server.url("/sandbox/credentials"))
        api = credentials["api_base"]
        query = urllib.parse.urlencode({"corpid": credentials["corp_id"], "corpsecret": credentials["kf_secret"]})
        status, token = get_json(f"{api}/cgi-bin/gettoken?{query}")
        assert status == 200 and token.get("errcode", 0) == 0, token
        _, sent = get_json(server.url(f"{SIM}/sent?recipient={customer}"))
        self.url = f"{api}/cgi-bin/kf/send_msg?access_token={token['access_token']}"
        self.open_kfid = sent["sent"][0]["account"]  # the account the customer talks to
        self.customer = customer

    def send(self, msgtype: str, body: dict[str, Any]) -> None:
        message = {"touser": self.customer, "open_kfid": self.open_kfid, "msgtype": msgtype, msgtype: body}
        status, answer = call("POST", self.url, message)
        assert status == 200 and json.loads(answer)["errcode"] == 0, (msgtype, answer)


XSS = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 1</script>'


def test_sandbox_page_renders_every_reply_kind(chromium: str, server: BotServer, tmp_path: Path) -> None:
    from playwright.sync_api import Route, expect

    # Message kinds that only reach members (message/send), or that no script sends, cannot reach this customer
    # through WeCom: they ride along the page's next poll answer instead, as records the simulator could hold.
    staged: list[dict[str, Any]] = []

    def staff_kinds(route: Route) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(route.request.url).query)
        if not staged or query.get("wait", ["0"])[0] == "0":
            route.continue_()
            return
        after = int(query["after"][0])
        records = [
            {"seq": after, "api": "message/send", "accepted": True, "errcode": 0, "status": "delivered", **record}
            for record in staged
        ]
        staged.clear()
        route.fulfill(json={"last_seq": after, "sent": records})

    problems: list[str] = []
    with sandbox_page(chromium, server, tmp_path, problems) as page:
        page.route("**/_sim/sent?*", staff_kinds)
        page.goto(server.url("/sandbox"))
        bot = page.locator(".msg.bot .bubble")
        expect(bot).to_have_count(1)  # the welcome menu
        log = page.locator("#log")

        def customer_writes(text: str) -> None:
            before = bot.count()
            page.get_by_label("message").fill(text)
            page.get_by_label("message").press("Enter")
            expect(bot).to_have_count(before + 1)  # each answer below is one message

        customer_writes("你好")  # opens the 48 h window; the bot's answer uses 1 of the 5 sends
        customer = page.evaluate("localStorage.getItem('sandbox-customer')")
        kf = KfSender(server, customer)

        kf.send(
            "link",
            {
                "title": "新人首单专享 <b>",
                "desc": "新人首单专属优惠，具体以活动页为准",
                "url": "https://shop.example.com/newcomer?a=1&b=2",
                "thumb_media_id": "MEDIA_NEWCOMER_THUMB",
            },
        )
        card = log.locator(".part-link")
        expect(card.locator(".card-title")).to_have_text("新人首单专享 <b>")
        expect(card.locator(".card-desc")).to_have_text("新人首单专属优惠，具体以活动页为准")
        url = card.get_by_role("link", name="https://shop.example.com/newcomer?a=1&b=2")
        expect(url).to_have_attribute("href", "https://shop.example.com/newcomer?a=1&b=2")
        expect(url).to_have_attribute("target", "_blank")
        expect(url).to_have_attribute("rel", "noopener noreferrer")
        expect(card.get_by_role("img")).to_have_accessible_name("缩略图（media_id: MEDIA_NEWCOMER_THUMB）")

        kf.send(
            "msgmenu",
            {
                "head_content": "请选择",
                "list": [
                    {"type": "view", "view": {"url": "https://shop.example.com/help", "content": "帮助中心"}},
                    {"type": "view", "view": {"url": "javascript:window.__xss=1", "content": "坏链接"}},
                    {
                        "type": "miniprogram",
                        "miniprogram": {"appid": "wx123", "pagepath": "pages/i", "content": "商城"},
                    },
                    {"type": "text", "text": {"content": "营业时间 9:00-21:00", "no_newline": 0}},
                ],
            },
        )
        menu = log.locator(".part-msgmenu").last
        expect(menu.get_by_role("link", name="帮助中心")).to_have_attribute("href", "https://shop.example.com/help")
        expect(menu.get_by_text("坏链接")).to_be_visible()
        expect(menu.get_by_role("link", name="坏链接")).to_have_count(0)
        expect(menu.locator(".chip")).to_have_text("小程序 商城")
        expect(menu).to_contain_text("营业时间 9:00-21:00")

        kf.send("image", {"media_id": "MEDIA_IMAGE_1"})
        expect(log.locator(".part-image")).to_contain_text("[图片]")
        expect(log.locator(".part-image")).to_contain_text("MEDIA_IMAGE_1")

        kf.send("business_card", {"userid": "zhangsan"})  # the page has no view of its own for this kind
        fallback = log.locator(".part-business_card")
        expect(fallback).to_contain_text("[business_card]")
        expect(fallback.locator("pre")).to_have_text(json.dumps({"userid": "zhangsan"}, indent=2))

        customer_writes("在吗")  # a fresh customer message: 5 more sends
        kf.send("file", {"media_id": "MEDIA_FILE_1"})
        kf.send("voice", {"media_id": "MEDIA_VOICE_1"})
        kf.send("video", {"media_id": "MEDIA_VIDEO_1"})
        kf.send("text", {"content": "第一行\n" + XSS})
        for kind, label, media_id in (
            ("file", "[文件]", "MEDIA_FILE_1"),
            ("voice", "[语音]", "MEDIA_VOICE_1"),
            ("video", "[视频]", "MEDIA_VIDEO_1"),
        ):
            expect(log.locator(f".part-{kind}")).to_contain_text(label)
            expect(log.locator(f".part-{kind}")).to_contain_text(media_id)
        text = log.locator(".part-text").last
        expect(text).to_have_text("第一行\n" + XSS)
        assert text.evaluate("node => node.innerText") == "第一行\n" + XSS  # the newline shows

        staged.extend(
            [
                {
                    "msgtype": "markdown",
                    "content": {
                        "content": "# 今日待办\n> 客户 <@zhangsan> 等待回复\n**加粗** `code` "
                        '[官网](https://shop.example.com) [坏](javascript:window.__xss=1) <font color="warning">'
                        "紧急</font>\n" + XSS
                    },
                },
                {
                    "msgtype": "textcard",
                    "content": {
                        "title": "订单提醒",
                        "description": '<div class="gray">2024年1月1日</div><div class="normal">' + XSS + "</div>",
                        "url": "https://shop.example.com/order",
                        "btntxt": "查看订单",
                    },
                },
                {
                    "msgtype": "template_card",
                    "content": {
                        "card_type": "text_notice",
                        "main_title": {"title": "新客户待跟进", "desc": XSS},
                        "horizontal_content_list": [{"keyname": "客户", "value": "张三"}],
                        "card_action": {"type": 1, "url": "https://shop.example.com/crm"},
                    },
                },
                {
                    "msgtype": "welcome",
                    "content": {
                        "text": {"content": "欢迎！"},
                        "attachments": [
                            {"msgtype": "link", "link": {"title": "会员中心", "url": "https://shop.example.com/vip"}}
                        ],
                    },
                },
                {"msgtype": "no_such_kind", "content": {"x": XSS}},
            ]
        )
        # The bot's answer ends the page's long-poll; the next poll picks up the staged records with it.
        page.get_by_label("message").fill("第三条")
        page.get_by_label("message").press("Enter")

        md = log.locator(".part-markdown")
        expect(md.locator(".md-h")).to_have_text("今日待办")
        expect(md.locator(".md-quote")).to_have_text("客户 @zhangsan 等待回复")
        expect(md.locator("strong")).to_have_text("加粗")
        expect(md.locator("code")).to_have_text("code")
        expect(md.get_by_role("link", name="官网")).to_have_attribute("href", "https://shop.example.com/")
        expect(md.get_by_role("link")).to_have_count(1)
        expect(md.locator(".md-warning")).to_have_text("紧急")
        expect(md).to_contain_text(XSS)

        textcard = log.locator(".part-textcard")
        expect(textcard.locator(".card-title")).to_have_text("订单提醒")
        expect(textcard.locator(".card-desc")).to_contain_text("2024年1月1日")
        expect(textcard.get_by_role("link", name="查看订单")).to_have_attribute(
            "href", "https://shop.example.com/order"
        )

        template = log.locator(".part-template_card")
        expect(template).to_contain_text("新客户待跟进")
        expect(template).to_contain_text(XSS)
        expect(template).to_contain_text("客户：张三")
        expect(template.get_by_role("link", name="查看详情")).to_have_attribute("href", "https://shop.example.com/crm")

        welcome = log.locator(".bubble").filter(has_text="欢迎！")
        expect(welcome.get_by_role("link", name="https://shop.example.com/vip")).to_have_attribute(
            "href", "https://shop.example.com/vip"
        )
        expect(log.locator(".part-no_such_kind")).to_contain_text("[no_such_kind]")
        expect(log.locator(".part-no_such_kind pre")).to_contain_text(json.dumps(XSS)[1:-1])

        # Nothing untrusted became markup: no images, scripts or javascript: links, and nothing ran.
        expect(log.locator("img, script, a[href^='javascript']")).to_have_count(0)
        assert page.evaluate("window.__xss") is None
        page.screenshot(path=str(tmp_path / "kinds.png"), full_page=True)
    assert not problems, problems
