"""`wecom-bot reminders follow-up|run`: staff follow-up tasks, and the daily reminders by hand.

A follow-up task is a one-off post: an app message to the member at the given time about one customer, delivered
by the scheduled-post engine (so `wecom-bot posts show ID` has its delivery status). See docs/scheduling.md.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.cli_args import run_with_database
from bot.cli_posts import CLI_ACTOR, PostInputError, parse_at
from bot.reminders import ReminderService
from bot.settings import Settings
from bot.storage.staff_repository import AuditRepository
from handlers.domain import Clock
from handlers.reminders import DEFAULT_TIMEZONE, ReminderConfig, ReminderInputError

DESCRIPTION = """\
Reminders delivered as scheduled posts. `follow-up` plans an app message to a member about one customer at a
given time (Asia/Shanghai). `run` creates today's daily reminders now (digest to team leads, churn-recall and
repurchase touches); the server does this itself every morning (REMINDERS_CRON), and a second run the same day
creates nothing twice."""


class _FixedClock:
    def __init__(self, now: datetime) -> None:
        self._now = now.timestamp()

    def now(self) -> float:
        return self._now


def _err(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)


async def add_follow_up(
    sessions: async_sessionmaker[AsyncSession],
    *,
    staff: str,
    customer: str,
    at: str,
    note: str,
    now: datetime,
    out: TextIO | None = None,
) -> int:
    """Plan a follow-up task; exit code 2 with one line on stderr when the input is refused."""
    out = out or sys.stdout
    clock: Clock = _FixedClock(now)
    service = ReminderService(sessions, clock)
    try:
        when = parse_at(at, DEFAULT_TIMEZONE)
        post, created = await service.follow_up(staff=staff, customer=customer, at=when, note=note, now=now)
    except (PostInputError, ReminderInputError) as exc:
        _err(str(exc))
        return 2
    local = when.astimezone(ZoneInfo(DEFAULT_TIMEZONE)).strftime("%Y-%m-%d %H:%M")
    if not created:
        print(f"follow-up exists already: post {post.id} ({staff} about {customer} at {local})", file=out)
        return 0
    await AuditRepository(sessions).record(
        CLI_ACTOR, "reminder.follow_up", f"post:{post.id}", {"staff": staff, "customer": customer}
    )
    print(f"added follow-up post {post.id}: {staff} about {customer} at {local} ({DEFAULT_TIMEZONE})", file=out)
    return 0


async def run_daily(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, now: datetime, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    config = ReminderConfig(
        repurchase_days=settings.reminders_repurchase_days,
        recall_cooldown_days=settings.reminders_recall_cooldown_days,
    )
    report = await ReminderService(sessions, _FixedClock(now), config, owner=settings.reminders_owner).run_daily(now)
    print(f"reminders for {report.day.isoformat()}: {len(report.digests)} digest(s)", file=out)
    for touch in report.touches:
        post = f"post {touch.post.id}" if touch.post else (touch.skipped or "post exists")
        print(f"  {touch.rule.value}: {len(touch.due)} customer(s) marked; {post}", file=out)
    print(f"  birthday: {report.birthday}", file=out)
    return 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def register(subparsers: Any) -> None:
    """Add `reminders follow-up|run` to the top-level subparsers."""
    reminders = subparsers.add_parser(
        "reminders",
        help="staff follow-up tasks and the daily reminders",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = reminders.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    follow = actions.add_parser("follow-up", help="an app message to a member about a customer, at a time")
    follow.add_argument("--staff", required=True, metavar="USERID", help="the member's WeCom userid")
    follow.add_argument("--customer", required=True, metavar="EXTERNAL_ID", help="the customer's external_userid")
    follow.add_argument("--at", required=True, help="YYYY-MM-DD HH:MM (Asia/Shanghai)")
    follow.add_argument("--note", required=True, help="what to follow up")

    def follow_up(args: argparse.Namespace) -> int:
        def work(sessions: async_sessionmaker[AsyncSession], _settings: Settings) -> Any:
            return add_follow_up(
                sessions, staff=args.staff, customer=args.customer, at=args.at, note=args.note, now=_utcnow()
            )

        return run_with_database(work)

    follow.set_defaults(func=follow_up)
    run = actions.add_parser("run", help="create today's daily reminders now (idempotent for the day)")
    run.set_defaults(func=lambda _a: run_with_database(lambda s, settings: run_daily(s, settings, _utcnow())))
