"""Staff authentication for the admin API: bearer tokens, roles and what each role may do.

Tokens are random, shown once, and stored only as sha256 (a leaked database does not leak working tokens).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable
from enum import StrEnum

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from bot.storage.models import StaffRole
from bot.storage.staff_repository import StaffRecord, StaffRepository

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "wcb_"  # noqa: S105 (a prefix, not a secret): recognisable in secret scanners and pasted config


class Permission(StrEnum):
    SCRIPTS_READ = "scripts:read"
    SCRIPTS_WRITE = "scripts:write"
    ORDERS_WRITE = "orders:write"
    AUDIT_READ = "audit:read"
    REPORTS_READ = "reports:read"  # CSAT (and other service) reports: team leads and admins


ROLE_PERMISSIONS: dict[StaffRole, frozenset[Permission]] = {
    StaffRole.ADMIN: frozenset(Permission),
    StaffRole.LEAD: frozenset(
        {Permission.SCRIPTS_READ, Permission.SCRIPTS_WRITE, Permission.AUDIT_READ, Permission.REPORTS_READ}
    ),
    StaffRole.AGENT: frozenset({Permission.SCRIPTS_READ}),
    StaffRole.COMMUNITY: frozenset({Permission.SCRIPTS_READ}),
}

STAFF = web.RequestKey("staff", StaffRecord)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def allowed(user: StaffRecord, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS[user.role]


def json_error(status: int, code: str, message: str, **extra: object) -> web.Response:
    """Every API error has the same shape: a stable code for programs and a sentence for people."""
    return web.json_response({"error": code, "message": message, **extra}, status=status)


def bearer_auth(staff: StaffRepository) -> Middleware:
    """Middleware for the API sub-app: every request needs `Authorization: Bearer <token>` of an active account."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return json_error(401, "unauthenticated", "send `Authorization: Bearer <token>` (wecom-bot tokens create)")
        user = await staff.user_for_token(token_hash(token))
        if user is None:
            log.info("api_auth_refused", path=request.path)
            return json_error(401, "unauthenticated", "the token is unknown, revoked, or its account is disabled")
        request[STAFF] = user
        return await handler(request)

    return middleware


def require(request: web.Request, permission: Permission) -> StaffRecord:
    """The authenticated account, if its role has `permission`; otherwise the request ends with 403."""
    user = request[STAFF]
    if not allowed(user, permission):
        raise web.HTTPForbidden(
            text=f'{{"error": "forbidden", "message": "role {user.role} may not {permission}"}}',
            content_type="application/json",
        )
    return user
