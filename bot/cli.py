"""`wecom-bot`: serve, worker, migrate, dead-letters, chat."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from bot.logs import configure_logging
from bot.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json)
    return settings


def cmd_serve(_args: argparse.Namespace) -> int:
    from bot.serve import serve

    asyncio.run(serve(_settings()))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from bot.serve import run_workers

    asyncio.run(run_workers(_settings(), args.count))
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from bot.storage.db import engine_for_url, head_revision, schema_status, upgrade

    settings = _settings()
    target = settings.database_url.split("://", 1)[0]

    async def status() -> str:
        engine = engine_for_url(settings.database_url, null_pool=True)
        try:
            return await schema_status(engine)
        finally:
            await engine.dispose()

    before = asyncio.run(status())
    print(f"[1/2] {target}: schema is {before}; head revision {head_revision()}")
    if before == "current":
        print("[2/2] nothing to do")
        return 0
    print("[2/2] applying migrations ...", flush=True)
    upgrade(settings.database_url)
    print(f"done: schema is {asyncio.run(status())}")
    return 0


def _format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from bot.app import open_services

    settings = _settings()
    if settings.embedded_redis:
        print(
            "REDIS_URL is unset: the in-process queue belongs to the running server, so there is nothing to "
            "inspect from here. Set REDIS_URL to the server's Redis.",
            file=sys.stderr,
        )
        return 2

    async def run() -> int:
        async with open_services(settings) as services:
            queue = services.queue
            if args.action == "list":
                letters = await queue.list_dead_letters(args.limit)
                if args.json:
                    print(json.dumps([letter.__dict__ for letter in letters], ensure_ascii=False, default=str))
                    return 0
                if not letters:
                    print("no dead letters")
                    return 0
                print(f"{'ID':<20} {'KIND':<11} {'TRIES':>5}  {'DIED (UTC)':<19}  ERROR")
                for letter in letters:
                    print(
                        f"{letter.dead_letter_id:<20} {letter.kind:<11} {letter.attempts:>5}  "
                        f"{_format_time(letter.dead_at):<19}  {letter.error_class}: {letter.error[:80]}"
                    )
                print(f"{len(letters)} shown; replay with `wecom-bot dead-letters replay ID` or `--all`")
                return 0
            ids = [letter.dead_letter_id for letter in await queue.list_dead_letters(10_000)] if args.all else args.ids
            if not ids:
                print("nothing to replay (give IDs or --all)", file=sys.stderr)
                return 2
            failed = 0
            for number, dead_letter_id in enumerate(ids, 1):
                ok = await queue.replay_dead_letter(dead_letter_id)
                failed += not ok
                print(f"[{number}/{len(ids)}] {dead_letter_id}: {'requeued' if ok else 'not found'}")
            return 1 if failed else 0

    return asyncio.run(run())


def cmd_chat(args: argparse.Namespace) -> int:
    from bot.chat import run_chat

    settings = _settings()
    base = args.url or settings.bot_public_url or f"http://127.0.0.1:{settings.bot_port}"
    return asyncio.run(run_chat(base, args.customer))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wecom-bot", description="WeCom customer-service assistant")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the webhook server (sandbox mode without WeCom credentials)").set_defaults(
        func=cmd_serve
    )
    worker = sub.add_parser("worker", help="run extra worker processes' worth of consumers (needs REDIS_URL)")
    worker.add_argument("--count", type=int, default=1, help="consumers in this process (default 1)")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    dead = sub.add_parser("dead-letters", help="list or replay entries that kept failing")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    dead_list = dead_sub.add_parser("list")
    dead_list.add_argument("--limit", type=int, default=100)
    dead_list.add_argument("--json", action="store_true")
    dead_replay = dead_sub.add_parser("replay")
    dead_replay.add_argument("ids", nargs="*")
    dead_replay.add_argument("--all", action="store_true")
    dead.set_defaults(func=cmd_dead_letters)

    chat = sub.add_parser("chat", help="chat with a running sandbox bot as a WeChat customer, in this terminal")
    chat.add_argument("--url", help="the bot's base URL (default http://127.0.0.1:BOT_PORT)")
    chat.add_argument("--customer", default="wmTerminalCustomer", help="external_userid to write as")
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from bot.app import SchemaNotReadyError

        if isinstance(exc, SchemaNotReadyError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
