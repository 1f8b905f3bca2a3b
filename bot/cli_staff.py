"""`wecom-bot staff ...` and `wecom-bot tokens ...`: staff accounts with roles, and API tokens for them."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.auth import ROLE_PERMISSIONS, new_token, token_hash
from bot.cli_args import positive_int, run_with_database
from bot.console.passwords import register_passwd
from bot.settings import Settings
from bot.storage.models import StaffRole
from bot.storage.staff_repository import AuditRepository, DuplicateUsername, StaffRepository

STAFF_DESCRIPTION = """\
Staff accounts: who may use the admin API and the console (/console), with one role each:
""" + "\n".join(f"  {role.value:<10} {', '.join(sorted(ROLE_PERMISSIONS[role]))}" for role in StaffRole)

TOKENS_DESCRIPTION = """\
API tokens for staff accounts. A token is printed once, when created; only its hash is stored.
Use it as `Authorization: Bearer <token>` on /api/..."""

CLI_ACTOR = "cli"


def _print(text: str, out: IO[str] | None = None) -> None:
    print(text, file=out or sys.stdout)


async def add_staff(
    sessions: async_sessionmaker[AsyncSession],
    username: str,
    role: StaffRole,
    *,
    team: str | None = None,
    display_name: str | None = None,
    wecom_userid: str | None = None,
    out: IO[str] | None = None,
) -> int:
    try:
        user = await StaffRepository(sessions).add_user(
            username, role, team=team, display_name=display_name, wecom_userid=wecom_userid
        )
    except DuplicateUsername:
        print(f"error: a staff account named {username!r} exists already", file=sys.stderr)
        return 1
    await AuditRepository(sessions).record(CLI_ACTOR, "staff.add", f"staff:{username}", {"role": role.value})
    _print(f"added {user.username} ({user.role.value}); create a token with: wecom-bot tokens create {username}", out)
    return 0


async def list_staff(sessions: async_sessionmaker[AsyncSession], out: IO[str] | None = None) -> int:
    users = await StaffRepository(sessions).list_users()
    if not users:
        _print("no staff accounts yet: wecom-bot staff add NAME --role admin", out)
    for user in users:
        state = "" if user.active else "  (disabled)"
        _print(f"{user.username:<24} {user.role.value:<10} {user.team or '-':<12}{state}", out)
    return 0


async def set_staff_active(
    sessions: async_sessionmaker[AsyncSession], username: str, active: bool, out: IO[str] | None = None
) -> int:
    if not await StaffRepository(sessions).set_active(username, active):
        print(f"error: no staff account named {username!r}", file=sys.stderr)
        return 1
    action = "staff.enable" if active else "staff.disable"
    await AuditRepository(sessions).record(CLI_ACTOR, action, f"staff:{username}")
    _print(f"{username} {'enabled' if active else 'disabled'}", out)
    return 0


async def create_token(
    sessions: async_sessionmaker[AsyncSession], username: str, name: str, out: IO[str] | None = None
) -> int:
    staff = StaffRepository(sessions)
    user = await staff.get_user(username)
    if user is None:
        hint = f"wecom-bot staff add {username} --role ..."
        print(f"error: no staff account named {username!r} ({hint})", file=sys.stderr)
        return 1
    token = new_token()
    record = await staff.add_token(user.id, name, token_hash(token))
    await AuditRepository(sessions).record(CLI_ACTOR, "token.create", f"staff:{username}", {"token_id": record.id})
    _print(f"token {record.id} for {username} ({user.role.value}); shown once, store it now:", out)
    _print(token, out)
    return 0


async def list_tokens(sessions: async_sessionmaker[AsyncSession], out: IO[str] | None = None) -> int:
    staff = StaffRepository(sessions)
    names = {user.id: user.username for user in await staff.list_users()}
    for token in await staff.list_tokens():
        state = f"revoked {token.revoked_at:%Y-%m-%d}" if token.revoked_at else "active"
        used = f"last used {token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never used"
        _print(f"{token.id:>5}  {names.get(token.user_id, '?'):<24} {token.name:<20} {state:<20} {used}", out)
    return 0


async def revoke_token(sessions: async_sessionmaker[AsyncSession], token_id: int, out: IO[str] | None = None) -> int:
    if not await StaffRepository(sessions).revoke_token(token_id):
        print(f"error: no active token {token_id}", file=sys.stderr)
        return 1
    await AuditRepository(sessions).record(CLI_ACTOR, "token.revoke", f"token:{token_id}")
    _print(f"token {token_id} revoked", out)
    return 0


def _run(work: Any) -> int:
    def with_settings(sessions: async_sessionmaker[AsyncSession], _settings: Settings) -> Any:
        return work(sessions)

    return run_with_database(with_settings)


def register(subparsers: Any) -> None:
    """Add `staff add|list|disable|enable` and `tokens create|list|revoke` to the top-level subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    staff = subparsers.add_parser(
        "staff", help="staff accounts and roles", description=STAFF_DESCRIPTION, formatter_class=formatter
    )
    actions = staff.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    add = actions.add_parser("add", help="add a staff account")
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=[r.value for r in StaffRole])
    add.add_argument("--team", default=None)
    add.add_argument("--display-name", default=None)
    add.add_argument("--wecom-userid", default=None, help="the member's WeCom UserID (agents answering in WeCom)")
    add.set_defaults(
        func=lambda a: _run(
            lambda s: add_staff(
                s, a.username, StaffRole(a.role), team=a.team, display_name=a.display_name, wecom_userid=a.wecom_userid
            )
        )
    )
    actions.add_parser("list", help="list staff accounts").set_defaults(func=lambda a: _run(list_staff))
    for verb, active, effect in (
        ("disable", False, "its tokens and console sessions stop working"),
        ("enable", True, "its tokens work again"),
    ):
        parser = actions.add_parser(verb, help=f"{verb} an account ({effect})")
        parser.add_argument("username")
        parser.set_defaults(func=lambda a, on=active: _run(lambda s: set_staff_active(s, a.username, on)))
    register_passwd(actions, _run)  # `staff passwd USERNAME`: the console login

    tokens = subparsers.add_parser(
        "tokens", help="API tokens for staff accounts", description=TOKENS_DESCRIPTION, formatter_class=formatter
    )
    token_actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    create = token_actions.add_parser("create", help="create a token (printed once)")
    create.add_argument("username")
    create.add_argument("--name", default="api", help="what the token is for (api)")
    create.set_defaults(func=lambda a: _run(lambda s: create_token(s, a.username, a.name)))
    token_actions.add_parser("list", help="list tokens").set_defaults(func=lambda a: _run(list_tokens))
    revoke = token_actions.add_parser("revoke", help="revoke a token by its number")
    revoke.add_argument("token_id", type=positive_int)
    revoke.set_defaults(func=lambda a: _run(lambda s: revoke_token(s, a.token_id)))
