"""Console passwords: scrypt (stdlib) with a per-user salt, stored as one self-describing string.

    scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>

The parameters travel with the hash, so they can be raised later without breaking stored passwords
(`needs_rehash` tells when a stored hash uses weaker ones). Verification is constant time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import hashlib
import hmac
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import IO, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.storage.console_repository import ConsoleRepository
from bot.storage.staff_repository import AuditRepository

SCHEME = "scrypt"
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32
SALT_BYTES = 16
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 1024
_MAXMEM = 64 * 1024 * 1024


class WeakPassword(ValueError):
    """The password is refused before it is stored; the message says why (in Chinese, for people)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=_MAXMEM)


def check_password_policy(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise WeakPassword(f"密码至少 {MIN_PASSWORD_CHARS} 个字符")
    if len(password) > MAX_PASSWORD_CHARS:
        raise WeakPassword(f"密码最多 {MAX_PASSWORD_CHARS} 个字符")
    if not password.strip():
        raise WeakPassword("密码不能全是空白")


def hash_password(password: str) -> str:
    """A new hash with a fresh random salt (blocking: about 50 ms; call it in a thread from async code)."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _derive(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


# Verifying against this when the account does not exist keeps the answer time the same, so timing does not
# tell which usernames exist.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def verify_password(password: str, stored: str | None) -> bool:
    """True when `password` matches the stored hash; False for no hash, a malformed one or a mismatch."""
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    target = stored if stored else _DUMMY_HASH
    try:
        scheme, n, r, p, salt, key = target.split("$")
        if scheme != SCHEME:
            raise ValueError(scheme)
        expected = _unb64(key)
        derived = _derive(password, _unb64(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):  # malformed hash, or parameters scrypt refuses
        _derive(password, b"\0" * SALT_BYTES, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
        return False
    return hmac.compare_digest(derived, expected) and bool(stored)


def needs_rehash(stored: str) -> bool:
    try:
        scheme, n, r, p, _salt, _key = stored.split("$")
        return scheme != SCHEME or (int(n), int(r), int(p)) < (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    except ValueError:
        return True


async def set_password(
    sessions: async_sessionmaker[AsyncSession],
    username: str,
    password: str,
    *,
    actor: str = "cli",
    out: IO[str] | None = None,
) -> int:
    """`wecom-bot staff passwd USERNAME`: store a new console password for an account; 0 when stored."""
    try:
        check_password_policy(password)
    except WeakPassword as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    hashed = await asyncio.to_thread(hash_password, password)
    if not await ConsoleRepository(sessions).set_password_hash(username, hashed):
        print(f"error: no staff account named {username!r}", file=sys.stderr)
        return 1
    await AuditRepository(sessions).record(actor, "staff.passwd", f"staff:{username}")
    print(f"console password set for {username}", file=out or sys.stdout)
    return 0


def read_password(*, from_stdin: bool) -> str:
    """The new password from stdin (one line, for scripts) or asked twice without echo."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("新密码: ")
    if getpass.getpass("再输入一次: ") != first:
        raise SystemExit("error: the two passwords differ")
    return first


Run = Callable[[Callable[[async_sessionmaker[AsyncSession]], Awaitable[int]]], int]


def register_passwd(actions: Any, run: Run) -> None:
    """Add `passwd USERNAME [--stdin]` to `wecom-bot staff` (bot/cli_staff.py: `register_passwd(actions, _run)`)."""
    parser = actions.add_parser(
        "passwd",
        help="set an account's console password (asked twice, never echoed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("username")
    parser.add_argument("--stdin", action="store_true", help="read the password from one line of stdin")

    def handle(args: argparse.Namespace) -> int:
        password = read_password(from_stdin=args.stdin)
        return run(lambda sessions: set_password(sessions, args.username, password))

    parser.set_defaults(func=handle)
