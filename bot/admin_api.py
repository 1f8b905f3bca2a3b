"""The admin API under /api: run-time script edits (validated, versioned, audited, hot-reloaded), order imports,
the audit log and the CSAT report.

Every request carries a staff bearer token (bot/auth.py); every change is validated exactly like the YAML files,
stored as a new revision, written to the audit log, and served at once by this process and within one reload
interval by every other. Errors are JSON: `{"error": code, "message": sentence, ...}`.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog
import yaml
from aiohttp import web

from bot.auth import ROLE_PERMISSIONS, STAFF, Permission, bearer_auth, json_error, require
from bot.csat import CsatReporter
from bot.orders_import import import_orders_records
from bot.posts_api import PostsApi
from bot.scripts_overlay import (
    MAX_BODY_CHARS,
    Overlay,
    OverlayEntry,
    RevisionOverlaySource,
    apply_overlay,
    body_from_mapping,
    script_to_yaml_hint,
    source_name,
)
from bot.storage.csat_repository import CsatRepository
from bot.storage.db import create_session_factory
from bot.storage.models import ScriptRevisionAction
from bot.storage.staff_repository import RevisionRecord, VersionConflict
from scripts_library import Library, Problem, load_library

if TYPE_CHECKING:
    from bot.app import Services

log = structlog.get_logger(__name__)

SCRIPT_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
ORDER_SOURCE = re.compile(r"[A-Za-z0-9_\-]{1,32}")
MAX_REQUEST_BYTES = 1024 * 1024
MAX_ORDERS_PER_REQUEST = 5000
TEAM_NAME = re.compile(r"[^\x00-\x1f]{1,64}")
MAX_REPORT_DAYS = 366
ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
REPORT_TIMEZONE = "Asia/Shanghai"  # report days when no support config is loaded (else the team's timezone)


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.response = json_error(status, code, message, **extra)


@dataclass(frozen=True, slots=True)
class _Edit:
    body: str
    comment: str
    base_version: int | None


def _iso(value: datetime) -> str:
    return value.isoformat()


def _revision_json(revision: RevisionRecord) -> dict[str, Any]:
    return {
        "version": revision.version,
        "action": revision.action.value,
        "author": revision.author,
        "comment": revision.comment,
        "created_at": _iso(revision.created_at),
    }


def _problems_json(problems: list[Problem]) -> list[dict[str, object]]:
    return [{"file": p.file, "line": p.line, "message": p.message} for p in problems[:200]]


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        raise _ApiError(413, "too_large", f"request bodies are limited to {MAX_REQUEST_BYTES} bytes")
    raw = await request.content.read(MAX_REQUEST_BYTES + 1)
    if len(raw) > MAX_REQUEST_BYTES:
        raise _ApiError(413, "too_large", f"request bodies are limited to {MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise _ApiError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _script_id(request: web.Request) -> str:
    script_id = request.match_info["script_id"]
    if not SCRIPT_ID.fullmatch(script_id):
        raise _ApiError(400, "bad_script_id", "script ids are 1-128 characters of letters, digits and _ . : -")
    return script_id


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _ApiError(400, "bad_field", f"{name} must be a non-negative integer")
    return value


def _edit_from(body: dict[str, Any]) -> _Edit:
    text, script = body.get("yaml"), body.get("script")
    if (text is None) == (script is None):
        raise _ApiError(400, "bad_field", "send the script either as `yaml` (text) or as `script` (an object)")
    if script is not None:
        if not isinstance(script, dict):
            raise _ApiError(400, "bad_field", "`script` must be an object")
        text = body_from_mapping(script)
    if not isinstance(text, str) or not text.strip():
        raise _ApiError(400, "bad_field", "`yaml` must be non-empty text")
    if len(text) > MAX_BODY_CHARS:
        raise _ApiError(413, "too_large", f"a script is limited to {MAX_BODY_CHARS} characters")
    comment = body.get("comment", "")
    if not isinstance(comment, str) or len(comment) > 500:
        raise _ApiError(400, "bad_field", "`comment` must be text of at most 500 characters")
    return _Edit(text, comment, _optional_int(body, "base_version"))


class AdminApi:
    """Handlers bound to the process's services."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.revisions = services.repos.script_revisions
        self.audit = services.repos.audit
        self._write = asyncio.Lock()  # one edit at a time per process: validation sees the overlay it stores over
        support = services.handoff.config if services.handoff is not None else None
        self._support = support
        self.csat = CsatReporter(
            CsatRepository(create_session_factory(services.engine), services.clock),
            default_team=support.default_team if support is not None else None,
        )

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/me", self.me),
            web.get("/scripts", self.list_scripts),
            web.post("/scripts/validate", self.validate),
            web.get("/scripts/{script_id}", self.get_script),
            web.put("/scripts/{script_id}", self.put_script),
            web.delete("/scripts/{script_id}", self.delete_script),
            web.get("/scripts/{script_id}/revisions", self.revisions_of),
            web.post("/scripts/{script_id}/restore", self.restore_script),
            web.post("/scripts/{script_id}/rollback", self.rollback_script),
            web.get("/audit", self.audit_log),
            web.get("/reports/csat", self.csat_report),
            web.post("/orders", self.import_orders),
        ]

    # ---- reading

    async def me(self, request: web.Request) -> web.Response:
        user = request[STAFF]
        granted = sorted(p.value for p in ROLE_PERMISSIONS[user.role])
        return web.json_response(
            {"username": user.username, "role": user.role.value, "team": user.team, "permissions": granted}
        )

    async def list_scripts(self, request: web.Request) -> web.Response:
        require(request, Permission.SCRIPTS_READ)
        current = self.services.scripts.current
        edited = {e.script_id: e for e in current.overlay.entries if e.action is not ScriptRevisionAction.RESTORE}
        scripts = [
            {
                "id": s.id,
                "title": s.title,
                "source": "api" if s.id in edited else "file",
                "version": edited[s.id].version if s.id in edited else None,
                "file": s.file,
                "line": s.line,
                "priority": s.priority,
                "variants": [v.name for v in s.variants],
            }
            for s in current.matcher.library.scripts
        ]
        deleted = sorted(i for i, e in edited.items() if e.action is ScriptRevisionAction.DELETE)
        return web.json_response({"fingerprint": current.fingerprint, "scripts": scripts, "deleted": deleted})

    async def get_script(self, request: web.Request) -> web.Response:
        require(request, Permission.SCRIPTS_READ)
        script_id = _script_id(request)
        history = await self.revisions.history(script_id)
        latest = history[-1] if history else None
        in_use = self.services.scripts.library.get(script_id)
        if latest is not None and latest.action is ScriptRevisionAction.EDIT:
            source, text = "api", latest.body
        else:
            source = "file"
            text = await asyncio.to_thread(script_to_yaml_hint, script_id, self.services.scripts.path)
        if in_use is None and text is None and not history:
            raise _ApiError(404, "not_found", f"no script {script_id!r}")
        return web.json_response(
            {
                "id": script_id,
                "in_use": in_use is not None,
                "source": source if in_use is not None else None,
                "version": latest.version if latest else 0,
                "yaml": text,
                "revisions": [_revision_json(r) for r in history],
            }
        )

    async def revisions_of(self, request: web.Request) -> web.Response:
        require(request, Permission.SCRIPTS_READ)
        script_id = _script_id(request)
        history = await self.revisions.history(script_id)
        return web.json_response(
            {"id": script_id, "revisions": [{**_revision_json(r), "yaml": r.body} for r in history]}
        )

    async def audit_log(self, request: web.Request) -> web.Response:
        require(request, Permission.AUDIT_READ)
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        except ValueError:
            raise _ApiError(400, "bad_field", "limit must be an integer") from None
        entries = await self.audit.recent(limit=limit, target=request.query.get("target"))
        return web.json_response(
            {
                "entries": [
                    {"at": _iso(e.at), "actor": e.actor, "action": e.action, "target": e.target, "detail": e.detail}
                    for e in entries
                ]
            }
        )

    async def csat_report(self, request: web.Request) -> web.Response:
        """CSAT per team and agent: `?since=YYYY-MM-DD&until=YYYY-MM-DD&team=` (days inclusive, team's timezone)."""
        require(request, Permission.REPORTS_READ)
        since_day, until_day = _query_date(request, "since"), _query_date(request, "until")
        if until_day < since_day:
            raise _ApiError(400, "bad_field", "until must not be before since")
        if (until_day - since_day).days >= MAX_REPORT_DAYS:
            raise _ApiError(400, "bad_field", f"a report covers at most {MAX_REPORT_DAYS} days")
        team = request.query.get("team") or None
        if team is not None and not TEAM_NAME.fullmatch(team):
            raise _ApiError(400, "bad_field", "team is a name of 1-64 characters")
        zone = ZoneInfo(self._support.team(team).timezone if self._support is not None else REPORT_TIMEZONE)
        since = datetime.combine(since_day, time(), zone)
        until = datetime.combine(until_day + timedelta(days=1), time(), zone)
        report = await self.csat.csat_report(since, until, team)
        return web.json_response(
            {**report.to_json(), "days": {"since": since_day.isoformat(), "until": until_day.isoformat()}}
        )

    # ---- orders

    async def import_orders(self, request: web.Request) -> web.Response:
        """Paid orders from another system; good records are stored, bad ones listed by index, buyers re-tagged."""
        user = require(request, Permission.ORDERS_WRITE)
        body = await _json_body(request)
        records = body.get("orders")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise _ApiError(400, "bad_field", "`orders` must be a list of objects")
        if not records or len(records) > MAX_ORDERS_PER_REQUEST:
            raise _ApiError(400, "bad_field", f"send between 1 and {MAX_ORDERS_PER_REQUEST} orders per request")
        source = body.get("source", "api")
        if not isinstance(source, str) or not ORDER_SOURCE.fullmatch(source):
            raise _ApiError(400, "bad_field", "`source` is 1-32 letters, digits, _ or - (default api)")
        settings = self.services.settings
        report = await import_orders_records(
            records,
            self.services.repos.tags,
            now=datetime.fromtimestamp(self.services.clock.now(), UTC),
            tag_config=settings.tag_config,
            source=source,
        )
        if report.error is not None:
            raise _ApiError(400, "bad_orders", report.error)
        summary = {
            "ok": report.ok,
            "rows": report.rows,
            "imported": report.imported,
            "unchanged": report.unchanged,
            "customers_created": report.customers_created,
            "tags_recomputed": report.tags_recomputed,
            "tags_changed": report.tags_changed,
        }
        await self.audit.record(user.username, "orders.import", f"orders:{source}", {**summary, "bad": len(report.bad)})
        return web.json_response({**summary, "bad": [{"index": b.line, "reason": b.reason} for b in report.bad[:500]]})

    # ---- validating and changing

    async def _check(self, overlay: Overlay) -> list[Problem]:
        book = self.services.scripts
        files_library = book.current.files_library

        def run() -> list[Problem]:
            base = files_library if files_library is not None else load_library(book.path)
            if not isinstance(base, Library):
                return base
            result = apply_overlay(book.path, base, overlay)
            return [] if isinstance(result, Library) else result

        return await asyncio.to_thread(run)

    async def _overlay(self) -> Overlay:
        return await RevisionOverlaySource(self.revisions).current()

    async def validate(self, request: web.Request) -> web.Response:
        require(request, Permission.SCRIPTS_READ)
        edit = _edit_from(await _json_body(request))
        script_id = _declared_id(edit.body)
        overlay = await self._overlay()
        candidate = OverlayEntry(script_id, 0, ScriptRevisionAction.EDIT, edit.body)
        problems = await self._check(overlay.with_entry(candidate))
        return web.json_response({"valid": not problems, "problems": _problems_json(problems)})

    async def _store(
        self,
        request: web.Request,
        script_id: str,
        action: ScriptRevisionAction,
        body: str | None,
        comment: str,
        base_version: int | None,
        audit_action: str,
        audit_detail: dict[str, object] | None = None,
    ) -> web.Response:
        user = require(request, Permission.SCRIPTS_WRITE)
        async with self._write:
            overlay = await self._overlay()
            current_version = max((e.version for e in overlay.entries if e.script_id == script_id), default=0)
            if base_version is not None and base_version != current_version:
                raise _ApiError(
                    409, "version_conflict", f"the script is at version {current_version}", current=current_version
                )
            candidate = overlay.with_entry(OverlayEntry(script_id, current_version + 1, action, body))
            problems = await self._check(candidate)
            if problems:
                raise _ApiError(
                    422,
                    "invalid_script",
                    f"the change was not stored: {len(problems)} problem(s)",
                    problems=_problems_json(problems),
                )
            try:
                revision = await self.revisions.add(
                    script_id, action, body, user.username, comment, expected_version=current_version
                )
            except VersionConflict as exc:
                raise _ApiError(409, "version_conflict", str(exc), current=exc.current) from None
            await self.audit.record(
                user.username,
                audit_action,
                f"script:{script_id}",
                {"version": revision.version, "comment": comment, **(audit_detail or {})},
            )
            outcome = await self.services.scripts_watcher.check_once()
        log.info("script_changed", script=script_id, version=revision.version, action=action.value, actor=user.username)
        book = self.services.scripts
        return web.json_response(
            {
                "id": script_id,
                "version": revision.version,
                "action": action.value,
                "applied": outcome in ("reloaded", "unchanged") and not book.last_problems,
                "fingerprint": book.fingerprint,
            }
        )

    async def put_script(self, request: web.Request) -> web.Response:
        script_id = _script_id(request)
        edit = _edit_from(await _json_body(request))
        declared = _declared_id(edit.body)
        if declared != script_id:
            raise _ApiError(400, "id_mismatch", f"the body defines {declared!r}, the URL says {script_id!r}")
        return await self._store(
            request, script_id, ScriptRevisionAction.EDIT, edit.body, edit.comment, edit.base_version, "script.edit"
        )

    async def delete_script(self, request: web.Request) -> web.Response:
        script_id = _script_id(request)
        if self.services.scripts.library.get(script_id) is None:
            raise _ApiError(404, "not_found", f"no script {script_id!r} in the library in use")
        base = _query_int(request, "base_version")
        return await self._store(request, script_id, ScriptRevisionAction.DELETE, None, "", base, "script.delete")

    async def restore_script(self, request: web.Request) -> web.Response:
        script_id = _script_id(request)
        body = await _json_body(request)
        history = await self.revisions.history(script_id)
        if not history or history[-1].action is ScriptRevisionAction.RESTORE:
            raise _ApiError(404, "not_found", f"{script_id!r} has no run-time change to undo")
        comment = body.get("comment", "")
        return await self._store(
            request,
            script_id,
            ScriptRevisionAction.RESTORE,
            None,
            comment if isinstance(comment, str) else "",
            _optional_int(body, "base_version"),
            "script.restore",
        )

    async def rollback_script(self, request: web.Request) -> web.Response:
        script_id = _script_id(request)
        body = await _json_body(request)
        version = _optional_int(body, "version")
        if version is None:
            raise _ApiError(400, "bad_field", "`version` (the revision to bring back) is required")
        old = await self.revisions.get(script_id, version)
        if old is None or old.action is not ScriptRevisionAction.EDIT or old.body is None:
            raise _ApiError(404, "not_found", f"{script_id!r} has no edit at version {version}")
        return await self._store(
            request,
            script_id,
            ScriptRevisionAction.EDIT,
            old.body,
            f"rollback to v{version}",
            _optional_int(body, "base_version"),
            "script.rollback",
            {"from_version": version},
        )


def _declared_id(body: str) -> str:
    """The `id:` the body declares, read leniently; a body without one is reported by the validator."""
    try:
        document = yaml.safe_load(body)
    except yaml.YAMLError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("id"), str):
        return str(document["id"])
    problems = [Problem(source_name("?", 0), 1, "the body must be one script: a mapping with an `id`")]
    raise _ApiError(422, "invalid_script", "the body is not one script", problems=_problems_json(problems))


def _query_date(request: web.Request, name: str) -> date:
    raw = request.query.get(name, "")
    try:
        if not ISO_DAY.fullmatch(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise _ApiError(400, "bad_field", f"{name} must be a date YYYY-MM-DD") from None


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise _ApiError(400, "bad_field", f"{name} must be a non-negative integer")
    return int(raw)


@web.middleware
async def _api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except _ApiError as exc:
        return exc.response


def create_api_app(services: Services) -> web.Application:
    """The /api sub-application: its own middlewares, so the callback path pays nothing for them."""
    api = web.Application(middlewares=[_api_errors, bearer_auth(services.repos.staff)])
    api.add_routes(AdminApi(services).routes())
    api.add_routes(PostsApi(services).routes())  # /api/posts..., /api/openapi.json
    return api
