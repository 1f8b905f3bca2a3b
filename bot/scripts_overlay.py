"""Run-time script edits (admin API, stored in the database) laid over the reviewed YAML library.

The library in use is the YAML files' scripts, with every script that has a run-time revision replaced by
that revision (an edit), removed (a delete), or left as in the files (a restore ends the override). Edits are
validated exactly like the files, against the files' tag and placeholder vocabulary, and reported with the
revision as the file name (`db:price.first_order@v3:4: unknown tag ...`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bot.storage.models import ScriptRevisionAction
from bot.storage.staff_repository import ScriptRevisionRepository
from scripts_library import Library, Problem, build_library
from scripts_library.model import Script

VOCABULARY_FILES = ("tags.yaml", "placeholders.yaml")
MAX_BODY_CHARS = 64_000


@dataclass(frozen=True, slots=True)
class OverlayEntry:
    """The latest revision of one script."""

    script_id: str
    version: int
    action: ScriptRevisionAction
    body: str | None


@dataclass(frozen=True, slots=True)
class Overlay:
    """Every script's latest revision, and the newest revision id (the cheap change probe)."""

    head: int
    entries: tuple[OverlayEntry, ...]

    @property
    def empty(self) -> bool:
        return not any(entry.action is not ScriptRevisionAction.RESTORE for entry in self.entries)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for entry in sorted(self.entries, key=lambda e: e.script_id):
            if entry.action is not ScriptRevisionAction.RESTORE:
                digest.update(f"{entry.script_id}\0{entry.version}\0{entry.action}\0".encode())
        return digest.hexdigest()[:16]

    def with_entry(self, entry: OverlayEntry) -> Overlay:
        """This overlay with `entry` replacing its script's revision (a candidate edit, before it is stored)."""
        others = tuple(e for e in self.entries if e.script_id != entry.script_id)
        return Overlay(self.head, (*others, entry))


EMPTY_OVERLAY = Overlay(0, ())


def combined_fingerprint(files_fingerprint: str, overlay: Overlay) -> str:
    """The files' fingerprint alone when nothing is overridden, so a library without edits keeps its value."""
    if overlay.empty:
        return files_fingerprint
    return hashlib.sha256(f"{files_fingerprint}+{overlay.fingerprint()}".encode()).hexdigest()[:16]


def source_name(script_id: str, version: int) -> str:
    return f"db:{script_id}@v{version}"


def wrap_body(body: str) -> str:
    """One script mapping as a library file with a one-item `scripts:` list; its line k becomes line k + 1."""
    lines = body.splitlines() or [""]
    return "scripts:\n" + "\n".join(("  - " if i == 0 else "    ") + line for i, line in enumerate(lines)) + "\n"


def body_from_mapping(script: object) -> str:
    """YAML text for a script given as JSON (the API accepts either)."""
    return yaml.safe_dump(script, allow_unicode=True, sort_keys=False, default_flow_style=False)


def script_to_yaml_hint(script_id: str, files_root: Path) -> str | None:
    """The YAML of a file-defined script as written in its file (for the API to show before an edit)."""
    for path in _library_files(files_root):
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if not isinstance(document, dict):
            continue
        for item in document.get("scripts") or []:
            if isinstance(item, dict) and item.get("id") == script_id:
                return body_from_mapping(item)
    return None


def _library_files(root: Path) -> Iterable[Path]:
    base = root if root.is_dir() else root.parent
    return sorted(p for p in base.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _vocabulary_sources(files_root: Path) -> dict[str, str]:
    base = files_root if files_root.is_dir() else files_root.parent
    sources: dict[str, str] = {}
    for name in VOCABULARY_FILES:
        path = base / name
        if path.is_file():
            sources[str(path)] = path.read_text(encoding="utf-8")
    return sources


def build_overlay(files_root: Path, overlay: Overlay) -> tuple[dict[str, Script], set[str], list[Problem]]:
    """The overlay's edited scripts by id, its deleted ids, and every problem (with revision names and lines)."""
    edits = [e for e in overlay.entries if e.action is ScriptRevisionAction.EDIT]
    deleted = {e.script_id for e in overlay.entries if e.action is ScriptRevisionAction.DELETE}
    problems: list[Problem] = []
    if not edits:
        return {}, deleted, problems
    sources = _vocabulary_sources(files_root)
    names: dict[str, OverlayEntry] = {}
    for entry in edits:
        name = source_name(entry.script_id, entry.version)
        body = entry.body or ""
        if len(body) > MAX_BODY_CHARS:
            problems.append(Problem(name, 1, f"script is over {MAX_BODY_CHARS} characters"))
            continue
        names[name] = entry
        sources[name] = wrap_body(body)
    built = build_library(sources)
    if not isinstance(built, Library):
        for problem in built:
            if problem.file in names:
                problems.append(Problem(problem.file, max(problem.line - 1, 1), problem.message))
            else:  # the vocabulary files themselves: reported as they are
                problems.append(problem)
        return {}, deleted, problems
    scripts = {script.id: script for script in built.scripts}
    for name, entry in names.items():
        if entry.script_id not in scripts:
            problems.append(Problem(name, 1, f"the body must define exactly the script {entry.script_id!r}"))
    if len(scripts) != len(names):
        stray = sorted(set(scripts) - {e.script_id for e in names.values()})
        problems.append(Problem("db", 1, f"revision bodies define scripts under other ids: {', '.join(stray)}"))
    return scripts, deleted, problems


def apply_overlay(files_root: Path, library: Library, overlay: Overlay) -> Library | list[Problem]:
    """The library in use: `library` (from the files) with the overlay's edits and deletes applied."""
    if overlay.empty:
        return library
    edited, deleted, problems = build_overlay(files_root, overlay)
    if problems:
        return problems
    kept = [s for s in library.scripts if s.id not in edited and s.id not in deleted]
    return Library(
        scripts=tuple(sorted([*kept, *edited.values()], key=lambda s: s.id)),
        tags=library.tags,
        placeholders=library.placeholders,
    )


class RevisionOverlaySource:
    """The overlay as stored by the admin API (ScriptRevisionRepository)."""

    def __init__(self, revisions: ScriptRevisionRepository) -> None:
        self._revisions = revisions

    async def head(self) -> int:
        return await self._revisions.head()

    async def current(self) -> Overlay:
        head = await self._revisions.head()
        latest = await self._revisions.latest()
        return Overlay(head, tuple(OverlayEntry(r.script_id, r.version, r.action, r.body) for r in latest))
