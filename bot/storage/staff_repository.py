"""SQL for staff accounts, API tokens, the audit log and run-time script revisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from bot.storage.models import (
    ApiToken,
    AuditEntry,
    ScriptRevision,
    ScriptRevisionAction,
    StaffRole,
    StaffUser,
)
from bot.storage.repositories import _Repository


class DuplicateUsername(Exception):
    """A staff account with this username exists already."""


class VersionConflict(Exception):
    """The script changed since the version the caller based its edit on."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the script is at version {current}")
        self.current = current


@dataclass(frozen=True, slots=True)
class StaffRecord:
    id: int
    username: str
    display_name: str
    role: StaffRole
    team: str | None
    wecom_userid: str | None
    active: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: int
    user_id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RevisionRecord:
    id: int
    script_id: str
    version: int
    action: ScriptRevisionAction
    body: str | None
    author: str
    comment: str
    created_at: datetime


def _staff(row: StaffUser) -> StaffRecord:
    return StaffRecord(
        id=row.id,
        username=row.username,
        display_name=row.display_name,
        role=StaffRole(row.role),
        team=row.team,
        wecom_userid=row.wecom_userid,
        active=row.active,
        created_at=row.created_at,
    )


def _token(row: ApiToken) -> TokenRecord:
    return TokenRecord(row.id, row.user_id, row.name, row.created_at, row.last_used_at, row.revoked_at)


def _revision(row: ScriptRevision) -> RevisionRecord:
    return RevisionRecord(
        id=row.id,
        script_id=row.script_id,
        version=row.version,
        action=ScriptRevisionAction(row.action),
        body=row.body,
        author=row.author,
        comment=row.comment,
        created_at=row.created_at,
    )


class StaffRepository(_Repository):
    """Staff accounts and their API tokens."""

    async def add_user(
        self,
        username: str,
        role: StaffRole,
        *,
        display_name: str | None = None,
        team: str | None = None,
        wecom_userid: str | None = None,
    ) -> StaffRecord:
        row = StaffUser(
            username=username,
            display_name=display_name or username,
            role=role.value,
            team=team,
            wecom_userid=wecom_userid,
            password_hash=None,
            active=True,
            created_at=self._now(),
        )
        try:
            async with self._sessions.begin() as session:
                session.add(row)
                await session.flush()
                return _staff(row)
        except IntegrityError:
            raise DuplicateUsername(username) from None

    async def get_user(self, username: str) -> StaffRecord | None:
        async with self._sessions() as session:
            row = (await session.execute(select(StaffUser).where(StaffUser.username == username))).scalar_one_or_none()
            return None if row is None else _staff(row)

    async def list_users(self) -> list[StaffRecord]:
        async with self._sessions() as session:
            rows = (await session.execute(select(StaffUser).order_by(StaffUser.username))).scalars()
            return [_staff(row) for row in rows]

    async def set_active(self, username: str, active: bool) -> bool:
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(StaffUser).where(StaffUser.username == username).values(active=active)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def add_token(self, user_id: int, name: str, token_hash: str) -> TokenRecord:
        row = ApiToken(user_id=user_id, name=name, token_hash=token_hash, created_at=self._now())
        async with self._sessions.begin() as session:
            session.add(row)
            await session.flush()
            return _token(row)

    async def user_for_token(self, token_hash: str) -> StaffRecord | None:
        """The active account holding this unrevoked token; records the use."""
        async with self._sessions.begin() as session:
            found = (
                await session.execute(
                    select(StaffUser, ApiToken)
                    .join(ApiToken, ApiToken.user_id == StaffUser.id)
                    .where(ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None), StaffUser.active)
                )
            ).one_or_none()
            if found is None:
                return None
            user, token = found
            token.last_used_at = self._now()
            return _staff(user)

    async def list_tokens(self, user_id: int | None = None) -> list[TokenRecord]:
        stmt = select(ApiToken).order_by(ApiToken.id)
        if user_id is not None:
            stmt = stmt.where(ApiToken.user_id == user_id)
        async with self._sessions() as session:
            return [_token(row) for row in (await session.execute(stmt)).scalars()]

    async def revoke_token(self, token_id: int) -> bool:
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(ApiToken)
                .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
                .values(revoked_at=self._now())
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]


class AuditRepository(_Repository):
    """Append-only record of staff actions."""

    async def record(self, actor: str, action: str, target: str, detail: Mapping[str, Any] | None = None) -> None:
        async with self._sessions.begin() as session:
            session.add(
                AuditEntry(at=self._now(), actor=actor, action=action, target=target[:255], detail=dict(detail or {}))
            )

    async def recent(self, *, limit: int = 100, target: str | None = None) -> list[AuditRecord]:
        stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if target is not None:
            stmt = stmt.where(AuditEntry.target == target)
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).scalars()
            return [AuditRecord(r.id, r.at, r.actor, r.action, r.target, r.detail) for r in rows]


class ScriptRevisionRepository(_Repository):
    """Versioned run-time edits of scripts; the latest revision per script id is the one that applies."""

    async def head(self) -> int:
        """The newest revision id (0 when none): a cheap "did anything change" probe for every process."""
        async with self._sessions() as session:
            return int((await session.execute(select(func.coalesce(func.max(ScriptRevision.id), 0)))).scalar_one())

    async def latest(self) -> list[RevisionRecord]:
        """The latest revision of every script that has any, in script id order."""
        newest = (
            select(ScriptRevision.script_id, func.max(ScriptRevision.version).label("version"))
            .group_by(ScriptRevision.script_id)
            .subquery()
        )
        stmt = (
            select(ScriptRevision)
            .join(
                newest,
                (ScriptRevision.script_id == newest.c.script_id) & (ScriptRevision.version == newest.c.version),
            )
            .order_by(ScriptRevision.script_id)
        )
        async with self._sessions() as session:
            return [_revision(row) for row in (await session.execute(stmt)).scalars()]

    async def history(self, script_id: str) -> list[RevisionRecord]:
        stmt = select(ScriptRevision).where(ScriptRevision.script_id == script_id).order_by(ScriptRevision.version)
        async with self._sessions() as session:
            return [_revision(row) for row in (await session.execute(stmt)).scalars()]

    async def get(self, script_id: str, version: int) -> RevisionRecord | None:
        stmt = select(ScriptRevision).where(ScriptRevision.script_id == script_id, ScriptRevision.version == version)
        async with self._sessions() as session:
            row = (await session.execute(stmt)).scalar_one_or_none()
            return None if row is None else _revision(row)

    async def add(
        self,
        script_id: str,
        action: ScriptRevisionAction,
        body: str | None,
        author: str,
        comment: str = "",
        *,
        expected_version: int | None = None,
    ) -> RevisionRecord:
        """Append the next version; with `expected_version`, only if the script is still at that version.

        Two concurrent edits of one script cannot both win: the (script_id, version) key is unique, so the
        loser's insert fails and it is told the version it lost to.
        """
        try:
            async with self._sessions.begin() as session:
                current = int(
                    (
                        await session.execute(
                            select(func.coalesce(func.max(ScriptRevision.version), 0)).where(
                                ScriptRevision.script_id == script_id
                            )
                        )
                    ).scalar_one()
                )
                if expected_version is not None and expected_version != current:
                    raise VersionConflict(current)
                row = ScriptRevision(
                    script_id=script_id,
                    version=current + 1,
                    action=action.value,
                    body=body,
                    author=author,
                    comment=comment[:500],
                    created_at=self._now(),
                )
                session.add(row)
                await session.flush()
                return _revision(row)
        except IntegrityError:
            raise VersionConflict(await self._version(script_id)) from None

    async def _version(self, script_id: str) -> int:
        async with self._sessions() as session:
            stmt = select(func.coalesce(func.max(ScriptRevision.version), 0)).where(
                ScriptRevision.script_id == script_id
            )
            return int((await session.execute(stmt)).scalar_one())
