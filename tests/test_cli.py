"""`wecom-bot` as an operator meets it: help texts, bad settings, migrations on PostgreSQL, dead letters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.cli import build_parser
from tests.conftest import (
    REAL_REDIS_URL,
    TEST_AES_KEY,
    TEST_AGENT_ID,
    TEST_CORP_ID,
    TEST_SECRET,
    TEST_TOKEN,
    _flush_prefix,
)
from tests.test_serve import call, get_json, run_cli, start_server

pytestmark = pytest.mark.slow

SUBCOMMANDS = {
    "serve": ["SANDBOX", "/healthz", "/readyz", "/metrics", "wecom-bot migrate"],
    "worker": ["REDIS_URL", "--count"],
    "migrate": ["DATABASE_URL", "nothing"],
    "dead-letters": ["REDIS_URL", "replay"],
    "chat": ["sandbox", "--url", "--customer", "Ctrl-D"],
}


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command_and_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys)
    for command in SUBCOMMANDS:
        assert command in text
    for setting in ("WECOM_CORP_ID", "WECOM_AES_KEY", "DATABASE_URL", "REDIS_URL", "BOT_PORT", "BOT_PUBLIC_URL"):
        assert setting in text
    assert "/sandbox" in text and "exit codes" in text


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_command_explains_itself(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = _help(capsys, command)
    for needle in SUBCOMMANDS[command]:
        assert needle in text, f"`{command} --help` should mention {needle!r}"


@pytest.mark.parametrize("action", ["list", "replay"])
def test_dead_letter_actions_explain_themselves(capsys: pytest.CaptureFixture[str], action: str) -> None:
    text = _help(capsys, "dead-letters", action)
    assert ("--limit" if action == "list" else "--all") in text


def test_the_console_script_prints_help(tmp_path: Path) -> None:
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0 and "usage: wecom-bot" in result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("WECOM_AES_KEY", "short", "43 characters"),
        ("BOT_PORT", "abc", "integer"),
        ("BOT_PORT", "70000", "65535"),
        ("DATABASE_URL", "mysql://x", "postgresql:// or sqlite://"),
        ("REDIS_URL", "http://x", "redis://"),
        ("LOG_LEVEL", "chatty", "INFO"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tmp_path: Path, variable: str, value: str, complaint: str) -> None:
    result = run_cli(["serve"], tmp_path, timeout=30, **{variable: value})
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and complaint in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_real_credentials_need_the_token_and_key(tmp_path: Path) -> None:
    result = run_cli(["serve"], tmp_path, timeout=30, WECOM_CORP_ID=TEST_CORP_ID, WECOM_SECRET=TEST_SECRET)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: WECOM_TOKEN: required when WECOM_CORP_ID and WECOM_SECRET are set"
    ]


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    from tests.test_serve import free_port

    result = run_cli(
        ["migrate"], tmp_path, timeout=60, DATABASE_URL=f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x"
    )
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: DATABASE_URL: cannot connect to the database"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "hunter2" not in result.stdout + result.stderr


def test_postgres_needs_migrate_then_serves(tmp_path: Path, _postgres_database: str) -> None:
    real = {
        "WECOM_CORP_ID": TEST_CORP_ID,
        "WECOM_SECRET": TEST_SECRET,
        "WECOM_TOKEN": TEST_TOKEN,
        "WECOM_AES_KEY": TEST_AES_KEY,
        "WECOM_AGENT_ID": str(TEST_AGENT_ID),
        "WECOM_API_BASE": "http://127.0.0.1:9",  # never the real WeCom from a test
        "DATABASE_URL": _postgres_database,
    }
    refused = run_cli(["serve"], tmp_path, timeout=60, **real)
    assert refused.returncode == 2, refused
    last = refused.stderr.strip().splitlines()[-1]
    assert "DATABASE_URL" in last and "run `wecom-bot migrate`" in last, refused.stderr
    assert "Traceback" not in refused.stderr

    migrated = run_cli(["migrate"], tmp_path, timeout=120, **real)
    assert migrated.returncode == 0, migrated.stderr
    assert "[1/3]" in migrated.stdout and "schema is empty" in migrated.stdout, migrated.stdout
    assert "applying migrations" in migrated.stdout and "done: schema is current" in migrated.stdout
    again = run_cli(["migrate"], tmp_path, timeout=60, **real)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout

    server = start_server(tmp_path / "serve", **real)
    try:
        status, ready = get_json(server.url("/readyz"))
        assert status == 200 and ready["checks"] == {"database": "ok", "redis": "ok"}
        assert call("GET", server.url("/sandbox"))[0] == 404, "no sandbox with real credentials"
        assert "SANDBOX" not in server.log()
        assert "BOT_PUBLIC_URL is unset" in server.log()
        chat = run_cli(["chat", "--url", server.base_url], tmp_path, timeout=30)
        assert chat.returncode == 2 and "not a sandbox bot" in chat.stderr, chat
        code, _ = server.sigterm()
        assert code == 0, server.log()
    finally:
        server.kill()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"tcli{uuid.uuid4().hex[:10]}"
    yield prefix
    _flush_prefix(prefix)


def test_dead_letters_list_on_an_empty_queue(tmp_path: Path, redis_prefix: str) -> None:
    result = run_cli(
        ["dead-letters", "list"],
        tmp_path,
        timeout=60,
        REDIS_URL=REAL_REDIS_URL,
        REDIS_KEY_PREFIX=redis_prefix,
        DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no dead letters"


def test_dead_letters_without_redis_explains_why(tmp_path: Path) -> None:
    result = run_cli(["dead-letters", "list"], tmp_path, timeout=30, DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3")
    assert result.returncode == 2
    assert result.stderr.startswith("REDIS_URL:") and "Traceback" not in result.stderr
