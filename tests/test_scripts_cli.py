"""`wecom-bot scripts validate|explain`, driven through a parser built with bot.cli_scripts.register."""

from __future__ import annotations

import argparse
import io
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bot.cli_scripts import register

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()


def run(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="wecom-bot")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    code = int(args.func(args, out))
    return code, out.getvalue()


def test_validate_the_shipped_library() -> None:
    code, out = run("scripts", "validate")
    assert code == 0 and out.startswith("ok: ")


def test_validate_prints_every_problem_as_file_line_cause(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "scripts:\n  - id: a\n    title: t\n    triggers: {regex: ['(a+)+']}\n"
        "    audience: {any_of: [火星人]}\n    reply: [{text: '{nobody}'}]\n",
        encoding="utf-8",
    )
    code, out = run("scripts", "validate", str(tmp_path))
    assert code == 1
    assert f"{bad}:4: unsafe regex: nested quantifier" in out
    assert f"{bad}:5: unknown tag '火星人'" in out
    assert f"{bad}:6: unknown placeholder {{nobody}} in text" in out
    assert "3 problem(s)" in out


def test_explain_prints_winner_variant_reasons_and_near_misses() -> None:
    code, out = run(
        "scripts", "explain", "這個多少錢", "--tags", "新用户,高价值", "--customer", "c1", "--now", str(NOW)
    )
    assert code == 0
    assert "winner: price.inquiry" in out
    assert "variant: vip_advisor (tag)" in out
    assert "because keywords_any 多少钱" in out
    assert "price.winback_silent: lost, audience" in out


def test_explain_an_event_and_unknown_tags() -> None:
    code, out = run("scripts", "explain", "--event", "contact_added", "--tags", "外星人", "--now", str(NOW))
    assert code == 0
    assert "warning: tags not in the library's vocabulary: 外星人" in out
    assert "winner: welcome.contact_added" in out and "variant: default (default)" in out


def test_explain_refuses_an_invalid_library(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("scripts: [\n", encoding="utf-8")
    code, out = run("scripts", "explain", "hi", "--path", str(tmp_path))
    assert code == 1 and "YAML syntax error" in out
