"""`wecom-bot`: serve, worker, migrate, dead-letters, chat."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from bot.cli_args import positive_int, seconds
from bot.logs import configure_logging
from bot.settings import Settings, SettingsError, load_settings

DESCRIPTION = """\
WeCom (企业微信) customer-service assistant.

Quick start: `wecom-bot serve` with no settings at all runs a sandbox: the bot talks to a built-in
WeCom simulator, stores data in ./data/wecom-bot.sqlite3 and queues work in in-process fakeredis.
Open http://127.0.0.1:8080/sandbox in a browser, or run `wecom-bot chat` in a second terminal."""

EPILOG = """\
settings (environment variables or a .env file in the current directory):
  WECOM_CORP_ID, WECOM_SECRET   WeCom credentials; unset = sandbox mode with the built-in simulator
  WECOM_TOKEN, WECOM_AES_KEY    callback Token and EncodingAESKey (43 characters), required with credentials
  WECOM_AGENT_ID, WECOM_KF_SECRET  self-built app id; secret of 微信客服 if it differs from WECOM_SECRET
  DATABASE_URL                  postgresql://... or sqlite:///... (default sqlite:///./data/wecom-bot.sqlite3)
  REDIS_URL                     redis://...; unset = in-process fakeredis (one process only, not for production)
  BOT_HOST, BOT_PORT            where the server listens (default 0.0.0.0:8080)
  BOT_PUBLIC_URL                the public https:// base WeCom calls (the callback is BOT_PUBLIC_URL/wecom/callback)
  AUTO_MIGRATE                  true = `serve` applies PostgreSQL migrations itself (SQLite always does)
  LOG_LEVEL, LOG_JSON           DEBUG/INFO/WARNING/ERROR; true = one JSON object per log line

exit codes: 0 ok, 1 failed (for example the database or Redis is unreachable), 2 bad settings or usage,
130 interrupted. Run `wecom-bot COMMAND --help` for each command."""

SERVE_DESCRIPTION = """\
Run the webhook server with its in-process queue workers until SIGTERM or Ctrl-C.

Without WECOM_CORP_ID/WECOM_SECRET it starts in SANDBOX mode: a WeCom simulator is mounted at
/sandbox/wecom, a chat page at /sandbox, and this run's throw-away credentials at /sandbox/credentials.
With credentials it serves WeCom's callback at /wecom/callback (register BOT_PUBLIC_URL/wecom/callback
in the WeCom admin console). Always: /healthz (alive), /readyz (database and Redis reachable), /metrics
(Prometheus). SQLite is migrated on start; PostgreSQL must be migrated first with `wecom-bot migrate`."""

WORKER_DESCRIPTION = """\
Run extra queue consumers beside `wecom-bot serve`, to scale out. Needs a shared Redis (REDIS_URL),
the same DATABASE_URL and real WeCom credentials; the sandbox runs its workers inside `serve`."""

MIGRATE_DESCRIPTION = """\
Bring the database at DATABASE_URL to the newest schema (alembic upgrade head). Safe to run again:
it does nothing when the schema is already current. Run it before `serve` on PostgreSQL."""

DEAD_LETTERS_DESCRIPTION = """\
Queue entries that kept failing (after DEAD_LETTER_AFTER tries) are parked as dead letters.
List them, fix the cause, then replay them into the queue. Reads the Redis at REDIS_URL
(the in-process fakeredis of a sandbox server cannot be inspected from another process)."""

CHAT_DESCRIPTION = """\
Be a WeChat customer in this terminal, writing to a running sandbox bot (`wecom-bot serve`
without WeCom credentials). Each line you type is sent to the 微信客服 account; the bot's replies
are printed as `bot> ...`. Ctrl-D ends the chat. Lines can be piped in too:
  echo 你好 | wecom-bot chat"""


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json)
    return settings


def _run_server(main: Coroutine[Any, Any, None]) -> None:
    """Long-running processes use uvloop: it roughly halves the event loop's cost per callback."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def cmd_serve(_args: argparse.Namespace) -> int:
    from bot.serve import serve

    _run_server(serve(_settings()))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from bot.serve import run_workers

    _run_server(run_workers(_settings(), args.count))
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from bot.storage.db import engine_for_url, head_revision, schema_status, upgrade

    settings = _settings()
    target = _safe_url(settings.database_url)

    async def status() -> str:
        engine = engine_for_url(settings.database_url, null_pool=True)
        try:
            return await schema_status(engine)
        finally:
            await engine.dispose()

    print(f"[1/3] connecting to {target} ...", flush=True)
    before = asyncio.run(status())
    print(f"[2/3] schema is {before}; the code's head revision is {head_revision()}", flush=True)
    if before == "current":
        print("[3/3] nothing to do: the schema is current")
        return 0
    print("[3/3] applying migrations ...", flush=True)
    upgrade(settings.database_url)
    print(f"done: schema is {asyncio.run(status())}")
    return 0


def _format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from bot.app import open_services, sandbox_settings

    settings = _settings()
    if settings.sandbox:
        # Listing and requeueing touch only Redis; stand-in credentials let the services open without WECOM_*.
        settings = sandbox_settings(settings)
    if settings.embedded_redis:
        print(
            "REDIS_URL: unset, so the queue is the in-process fakeredis of the running server and cannot be "
            "inspected from here; set REDIS_URL to the server's Redis.",
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
                return 2 if not args.all else 0
            failed = 0
            for number, dead_letter_id in enumerate(ids, 1):
                ok = await queue.replay_dead_letter(dead_letter_id)
                failed += not ok
                print(f"[{number}/{len(ids)}] {dead_letter_id}: {'requeued' if ok else 'not found'}")
            return 1 if failed else 0

    return asyncio.run(run())


def cmd_chat(args: argparse.Namespace) -> int:
    from bot.chat import run_chat
    from bot.serve import local_base_url

    settings = _settings()
    base = args.url or local_base_url(settings)
    return asyncio.run(run_chat(base, args.customer, linger_s=args.wait))


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="wecom-bot", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    serve = sub.add_parser(
        "serve",
        help="run the webhook server (sandbox with a built-in WeCom simulator when credentials are unset)",
        description=SERVE_DESCRIPTION,
        formatter_class=formatter,
    )
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser(
        "worker",
        help="run extra queue consumers beside serve (needs REDIS_URL and WeCom credentials)",
        description=WORKER_DESCRIPTION,
        formatter_class=formatter,
    )
    worker.add_argument("--count", type=positive_int, default=1, help="consumers in this process (default 1)")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser(
        "migrate",
        help="apply database migrations to DATABASE_URL (needed before serve on PostgreSQL)",
        description=MIGRATE_DESCRIPTION,
        formatter_class=formatter,
    )
    migrate.set_defaults(func=cmd_migrate)

    dead = sub.add_parser(
        "dead-letters",
        help="list or replay queue entries that kept failing (needs REDIS_URL)",
        description=DEAD_LETTERS_DESCRIPTION,
        formatter_class=formatter,
    )
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    dead_list = dead_sub.add_parser(
        "list", help="show dead letters, oldest first", description="Show dead letters, oldest first."
    )
    dead_list.add_argument("--limit", type=positive_int, default=100, help="show at most this many (default 100)")
    dead_list.add_argument("--json", action="store_true", help="print one JSON array instead of a table")
    dead_replay = dead_sub.add_parser(
        "replay",
        help="put dead letters back on the queue",
        description="Put dead letters back on the queue; exit code 1 if an ID was not found.",
    )
    dead_replay.add_argument("ids", nargs="*", metavar="ID", help="dead-letter IDs as shown by `list`")
    dead_replay.add_argument("--all", action="store_true", help="replay every dead letter")
    dead.set_defaults(func=cmd_dead_letters)

    chat = sub.add_parser(
        "chat",
        help="chat with a running sandbox bot as a WeChat customer, in this terminal",
        description=CHAT_DESCRIPTION,
        formatter_class=formatter,
    )
    chat.add_argument("--url", help="the bot's base URL (default http://127.0.0.1:BOT_PORT)")
    chat.add_argument(
        "--customer", default="wmTerminalCustomer", help="external_userid to write as (default wmTerminalCustomer)"
    )
    chat.add_argument(
        "--wait",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="after the input ends, wait at most this long for the last replies (default 10)",
    )
    chat.set_defaults(func=cmd_chat)

    from bot import cli_customers, cli_posts, cli_reminders, cli_scripts, cli_staff

    cli_scripts.register(sub)
    cli_customers.register(sub)
    cli_staff.register(sub)
    cli_posts.register(sub)
    cli_reminders.register(sub)
    return parser


def _safe_url(url: str) -> str:
    """A database or Redis URL with its password hidden."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("://", 1)[0] + "://..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _describe_failure(exc: Exception) -> str | None:
    """One line for the failures an operator can fix (unreachable services, missing migrations), else None."""
    import redis.exceptions
    from sqlalchemy.exc import DBAPIError

    from bot.app import SchemaNotReadyError

    if isinstance(exc, SchemaNotReadyError):
        return f"DATABASE_URL: {exc}"
    if isinstance(exc, redis.exceptions.RedisError):
        return f"REDIS_URL: cannot use Redis ({_first_line(exc)})"
    if isinstance(exc, DBAPIError):
        return f"DATABASE_URL: cannot use the database ({_first_line(exc.orig or exc)})"
    if isinstance(exc, OSError | TimeoutError):
        return f"DATABASE_URL: cannot connect to the database ({_first_line(exc)})"
    return None


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

        message = _describe_failure(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, SchemaNotReadyError) else 1


if __name__ == "__main__":
    sys.exit(main())
