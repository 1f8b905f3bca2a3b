"""`wecom-bot posts add|list|show|cancel|preview` and `robots add|list` (bot/cli_posts.py), on both backends.

Bad input is refused at creation with one line on stderr; `show` gives delivery status per target; `preview`
gives the next slots and the content as each target will get it. One test drives the installed entry point.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.cli import build_parser, main
from bot.cli_posts import (
    PostSpec,
    add_post,
    add_robot,
    cancel_post,
    list_posts,
    list_robots,
    preview_post,
    show_post,
)
from bot.storage.db import create_engine, create_session_factory, upgrade_async
from bot.storage.models import DeliveryState
from bot.storage.posts_repository import PostRepository
from scheduler.slots import slots_between
from tests.conftest import Backend, make_settings

SH = ZoneInfo("Asia/Shanghai")
NOW = datetime(2025, 3, 1, 8, 0, tzinfo=SH).astimezone(UTC)


@pytest.fixture
async def sessions(backend: Backend) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(make_settings(backend))
    await upgrade_async(engine)
    yield create_session_factory(engine)
    await engine.dispose()


def spec(**overrides: object) -> PostSpec:
    values: dict[str, object] = {
        "title": "每日话题",
        "owner": "zhangsan",
        "kind": "text",
        "content": {"text": "今日话题：聊聊你的护肤习惯"},
        "cron": "0 9 * * *",
        "robots": ("运营群",),
    }
    values.update(overrides)
    return PostSpec(**values)  # type: ignore[arg-type]


async def added(sessions: async_sessionmaker[AsyncSession], post: PostSpec) -> tuple[int, str]:
    out = io.StringIO()
    code = await add_post(sessions, post, NOW, out)
    return code, out.getvalue()


@pytest.fixture
async def robot(sessions: async_sessionmaker[AsyncSession]) -> None:
    out = io.StringIO()
    assert (
        await add_robot(sessions, "运营群", "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=abcd-1234-wxyz", out)
        == 0
    )
    assert out.getvalue() == "added robot 运营群 (key …wxyz)\n"


async def test_add_list_and_robots(sessions: async_sessionmaker[AsyncSession], robot: None) -> None:
    code, out = await added(sessions, spec())
    assert code == 0
    assert (
        out == "added post 1: 每日话题 (cron '0 9 * * *' (Asia/Shanghai), 1 target(s); first slot 2025-03-01 09:00)\n"
    )
    listing = io.StringIO()
    await list_posts(sessions, False, listing)
    assert "每日话题" in listing.getvalue() and "robot:运营群" in listing.getvalue()
    robots = io.StringIO()
    await list_robots(sessions, robots)
    assert robots.getvalue() == "运营群                      key …wxyz\n"
    [stored] = await PostRepository(sessions).list_robots()
    assert stored.webhook_key == "abcd-1234-wxyz"  # the URL was reduced to its key


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"cron": "0 25 * * *"}, "invalid cron '0 25 * * *'"),
        ({"cron": None, "at": "2025-03-01 07:30"}, "2025-03-01 07:30 (Asia/Shanghai) is in the past"),
        ({"cron": None, "at": "next tuesday"}, "--at 'next tuesday': not a time"),
        ({"timezone": "Moon/Base"}, "unknown time zone 'Moon/Base'"),
        ({"at": "2025-03-02 09:00"}, "exactly one of --at (one-off) or --cron (recurring)"),
        ({"robots": ("无此群",)}, "unknown robot '无此群'"),
        ({"robots": ()}, "at least one target"),
        ({"content": {"text": "字" * 700}}, "robot 运营群: the text is 2100 bytes, over WeCom's limit of 2048 bytes"),
        ({"kind": "markdown", "content": {"markdown": "**x**"}, "groups": ("wrChat",)}, "group_chat wrChat"),
        ({"owner": " "}, "needs an owner"),
    ],
)
async def test_bad_input_is_refused_with_one_clear_line(
    sessions: async_sessionmaker[AsyncSession],
    robot: None,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, object],
    complaint: str,
) -> None:
    code, out = await added(sessions, spec(**overrides))
    err = capsys.readouterr().err
    assert code == 2 and out == ""
    assert err.startswith("error: ") and complaint in err
    assert err.count("\n") == 1
    assert await PostRepository(sessions).list_posts() == []


async def test_preview_shows_the_next_slots_and_the_content_per_target(
    sessions: async_sessionmaker[AsyncSession], robot: None
) -> None:
    link = {"title": "直播预告", "url": "https://example.com/live", "description": "今晚八点"}
    code, _ = await added(
        sessions, spec(kind="link", content=link, cron="0 20 * * 5", groups=("wrChat:lisi",), staff=("wangwu",))
    )
    assert code == 0
    out = io.StringIO()
    assert await preview_post(sessions, 1, 3, NOW, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1:5] == [
        "next slots:",
        "  2025-03-07 20:00 (Asia/Shanghai)",
        "  2025-03-14 20:00 (Asia/Shanghai)",
        "  2025-03-21 20:00 (Asia/Shanghai)",
    ]
    assert "robot:运营群 [news]: 直播预告 <https://example.com/live>" in lines
    assert "group_chat:wrChat [link]: link" in lines
    assert "staff:wangwu [textcard]: 直播预告 <https://example.com/live>" in lines


async def test_show_gives_delivery_status_per_target_and_cancel_skips_the_rest(
    sessions: async_sessionmaker[AsyncSession], robot: None
) -> None:
    await added(sessions, spec(cron="0 * * * *", staff=("lisi",)))
    repo = PostRepository(sessions)
    post = await repo.get_post(1)
    assert post is not None
    until = NOW + timedelta(hours=3)
    await repo.materialise(post, slots_between(post.rule, NOW, until), until, NOW)
    claimed = await repo.claim_due(NOW + timedelta(hours=1), "tok" * 5, limit=100)
    for delivery in claimed:
        state = DeliveryState.SENT if delivery.target_kind.value == "robot" else DeliveryState.FAILED
        await repo.finish(delivery.id, "tok" * 5, state, NOW, errcode=None if state is DeliveryState.SENT else 81013)
    assert await cancel_post(sessions, 1, io.StringIO()) == 0
    out = io.StringIO()
    assert await show_post(sessions, 1, out) == 0
    text = out.getvalue()
    assert "robot:运营群: sent 2, skipped 1" in text
    assert "staff:lisi: failed 2, skipped 1" in text
    assert "errcode=81013" in text and "reason=cancelled" in text
    assert "cancelled" in text.splitlines()[1]


async def test_unknown_post_ids(sessions: async_sessionmaker[AsyncSession], capsys: pytest.CaptureFixture[str]) -> None:
    assert await show_post(sessions, 42, io.StringIO()) == 1
    assert await cancel_post(sessions, 42, io.StringIO()) == 1
    assert await preview_post(sessions, 42, 3, NOW, io.StringIO()) == 1
    assert capsys.readouterr().err.count("error: no post 42") == 3


def test_help_texts_explain_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["posts", "--help"], ["posts", "add", "--help"], ["robots", "add", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    text = capsys.readouterr().out
    for needle in ("--cron", "--at", "--robot", "--group", "--segment", "--staff", "4 per group per month", "--key"):
        assert needle in text


def test_the_entry_point_adds_and_shows_a_post(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/bot.sqlite3")
    # main() would point logging at pytest's captured stderr, which is closed after this test (later tests log).
    monkeypatch.setattr("bot.logs.configure_logging", lambda *_args, **_kw: None)
    monkeypatch.setattr("bot.cli.configure_logging", lambda *_args, **_kw: None)
    assert main(["robots", "add", "早报群", "--key", "k-0000-1111"]) == 0
    at = (datetime.now(SH) + timedelta(days=1)).strftime("%Y-%m-%d 09:00")
    assert (
        main(
            [
                "posts",
                "add",
                "--title",
                "早报",
                "--owner",
                "zhangsan",
                "--text",
                "早上好",
                "--at",
                at,
                "--robot",
                "早报群",
            ]
        )
        == 0
    )
    assert main(["posts", "add", "--title", "坏", "--owner", "zhangsan", "--at", at, "--robot", "早报群"]) == 2
    assert main(["posts", "show", "1"]) == 0
    captured = capsys.readouterr()
    assert "added post 1: 早报" in captured.out and "robot:早报群: nothing due yet" in captured.out
    assert "error: give exactly one content" in captured.err
    assert "k-0000-1111" not in captured.out + captured.err
