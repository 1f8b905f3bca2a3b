"""Hot reload of the script library (话术库): atomic in each process, converging across processes through Redis.

Every `interval_s` the watcher stats the library's files (sorted relative path, size, mtime_ns: cheap). Only
when that signature changes does it hash the contents, and only when the hash differs from the library in use
does it load and validate, in a worker thread so the event loop never waits for a big library. A valid library
is swapped in with one reference assignment (ScriptBook.apply); an invalid one is logged with file:line and the
last good library keeps serving. After a swap the new fingerprint is published under `{prefix}:scripts:version`;
a process that sees a fingerprint there it has not acted on yet re-hashes its files even when their stat
signature looks unchanged (attribute caches on shared volumes, tools that keep mtimes), so an edit one process
picked up reaches all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import redis.asyncio as redis_asyncio
import structlog

from bot.scripts_overlay import EMPTY_OVERLAY, Overlay, apply_overlay, combined_fingerprint
from scripts_library import Library, Matcher, Problem, load_library

if TYPE_CHECKING:
    from bot.app import ScriptBook
    from bot.metrics import Metrics
    from bot.redis_keys import RedisKeys
    from handlers.domain import Clock

log = structlog.get_logger(__name__)

StatSignature = tuple[tuple[str, int, int], ...]
Outcome = Literal["unchanged", "reloaded", "invalid", "error"]

YAML_SUFFIXES = (".yaml", ".yml")


def library_files(root: Path) -> Iterable[Path]:
    """The files a load reads (a superset for a single-file library: its folder's YAML files)."""
    if root.is_dir():
        candidates = root.rglob("*")
    else:
        if root.is_file() and root.suffix not in YAML_SUFFIXES:
            yield root
        candidates = root.parent.glob("*")
    for path in sorted(candidates):
        if path.suffix in YAML_SUFFIXES and path.is_file():
            yield path


def stat_signature(root: Path) -> StatSignature:
    """Sorted (relative path, size, mtime_ns) of every library file; () when the folder is gone."""
    base = root if root.is_dir() else root.parent
    out: list[tuple[str, int, int]] = []
    with contextlib.suppress(OSError):
        for path in library_files(root):
            try:
                st = path.stat()
            except OSError:  # removed while listing: the next check sees the new state
                continue
            out.append((path.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(out)


def content_fingerprint(root: Path) -> str:
    """sha256 over every library file's relative path and bytes: the same content gives the same value anywhere."""
    base = root if root.is_dir() else root.parent
    digest = hashlib.sha256()
    with contextlib.suppress(OSError):
        for path in library_files(root):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            name = path.relative_to(base).as_posix().encode()
            digest.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What was on disk just before a load: the stat signature and the content fingerprint."""

    signature: StatSignature
    fingerprint: str


def snapshot(root: Path) -> Snapshot:
    signature = stat_signature(root)  # first: a change during hashing shows as a new signature next time
    return Snapshot(signature, content_fingerprint(root))


def load_with_snapshot(root: Path) -> tuple[Snapshot, Library | list[Problem]]:
    """Snapshot then load (blocking: call in a thread from async code)."""
    snap = snapshot(root)
    try:
        result = load_library(root)
    except Exception as exc:  # an unreadable folder must not take the bot down
        result = [Problem(str(root), 1, f"cannot load: {exc!r}")]
    return snap, result


def problems_summary(problems: list[Problem], limit: int = 20) -> list[str]:
    shown = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more")
    return shown


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class OverlaySource(Protocol):
    """Where run-time edits live (the database); `head()` is the cheap probe polled every interval."""

    async def head(self) -> int: ...

    async def current(self) -> Overlay: ...


class ScriptsWatcher:
    """Polls the library folder, the run-time edits and the fleet's version key; `check_once()` is one step.

    `run()` is the loop. The admin API calls `check_once()` right after storing an edit, so the process that
    took the edit serves it at once; the others follow within an interval (they see the new head revision).
    """

    def __init__(
        self,
        book: ScriptBook,
        redis: redis_asyncio.Redis | None,
        keys: RedisKeys,
        *,
        interval_s: float,
        clock: Clock,
        metrics: Metrics | None = None,
        overlay_source: OverlaySource | None = None,
    ) -> None:
        self.book = book
        self.overlay_source = overlay_source
        self._overlay_head: int | None = None
        self.redis = redis
        self.keys = keys
        self.interval_s = interval_s
        self.clock = clock
        self.metrics = metrics
        self._signature: StatSignature | None = book.signature
        self._remote_seen: str | None = None
        self._failed_fingerprint: str | None = None
        self._step = asyncio.Lock()
        self._redis_warned = False
        self._observe_metrics()

    # ---- Redis (optional: a failure only means no cross-process nudge this time)

    async def remote_fingerprint(self) -> str | None:
        if self.redis is None:
            return None
        try:
            value = _text(await self.redis.get(self.keys.scripts_version()))
        except Exception as exc:
            self._warn_redis(exc)
            return None
        self.book.cluster_fingerprint = value
        return value

    async def publish(self, fingerprint: str, *, only_if_missing: bool = False) -> None:
        if self.redis is None:
            return
        try:
            await self.redis.set(self.keys.scripts_version(), fingerprint, nx=only_if_missing)
        except Exception as exc:
            self._warn_redis(exc)
            return
        self._remote_seen = fingerprint
        if not only_if_missing:
            self.book.cluster_fingerprint = fingerprint

    def _warn_redis(self, exc: Exception) -> None:
        if not self._redis_warned:
            log.warning("script library version not shared through Redis", error=repr(exc))
            self._redis_warned = True

    # ---- run-time edits (optional: while the database is unreachable the edits in use stay as they are)

    async def _overlay_probe(self) -> tuple[int | None, Overlay | None]:
        """The newest revision id; (last seen head, the overlay in use) when the database cannot be asked."""
        if self.overlay_source is None:
            return 0, EMPTY_OVERLAY
        try:
            return await self.overlay_source.head(), None
        except Exception as exc:
            log.warning("script edits not checked: database unavailable", error=type(exc).__name__)
            return self._overlay_head, self.book.current.overlay

    async def _overlay_now(self) -> Overlay:
        if self.overlay_source is None:
            return EMPTY_OVERLAY
        try:
            return await self.overlay_source.current()
        except Exception as exc:
            log.warning("script edits not read: database unavailable", error=type(exc).__name__)
            return self.book.current.overlay

    # ---- one step

    async def check_once(self, *, force: bool = False) -> Outcome:
        """Reload when the files changed (or another process says so, or `force`); never raises."""
        async with self._step:
            try:
                return await self._check(force=force)
            except Exception as exc:  # the watcher must survive anything; the last good library keeps serving
                log.exception("script library check failed", error=repr(exc))
                self._count("error")
                return "error"

    async def _check(self, *, force: bool) -> Outcome:
        root = self.book.path
        self.book.checked_at = self.clock.now()
        signature = await asyncio.to_thread(stat_signature, root)
        remote = await self.remote_fingerprint()
        nudged = remote is not None and remote != self._remote_seen and remote != self.book.fingerprint
        if remote is not None:
            self._remote_seen = remote
        head, overlay = await self._overlay_probe()
        overlay_moved = head != self._overlay_head
        if not force and not nudged and not overlay_moved and signature == self._signature:
            return "unchanged"
        if overlay is None:
            overlay = await self._overlay_now()

        known = self.book.fingerprint
        failed = None if force else self._failed_fingerprint
        current = self.book.current

        def hash_then_load() -> tuple[Snapshot, Snapshot, Matcher | list[Problem] | None, Library | None]:
            files = snapshot(root)
            snap = Snapshot(files.signature, combined_fingerprint(files.fingerprint, overlay))
            if snap.fingerprint in (known, failed):
                return files, snap, None, None  # touched, or the same bad content again: nothing to load
            if files.fingerprint == current.files_fingerprint and current.files_library is not None:
                files_library: Library | list[Problem] = current.files_library  # only the edits changed
            else:
                try:
                    files_library = load_library(root)
                except Exception as exc:
                    return files, snap, [Problem(str(root), 1, f"cannot load: {exc!r}")], None
            if not isinstance(files_library, Library):
                return files, snap, files_library, None
            try:
                effective = apply_overlay(root, files_library, overlay)
            except Exception as exc:
                return files, snap, [Problem("db", 1, f"cannot apply run-time edits: {exc!r}")], None
            # The automaton is built here too: the event loop only does the one-assignment swap.
            result = Matcher(effective) if isinstance(effective, Library) else effective
            return files, snap, result, files_library

        files, snap, result, files_library = await asyncio.to_thread(hash_then_load)
        self._signature = snap.signature
        self._overlay_head = head
        if result is None:
            if snap.fingerprint == known:
                self.book.signature = snap.signature
            return "unchanged"
        swapped = self.book.apply(
            result,
            snap,
            loaded_at=self.clock.now(),
            files=None if files_library is None else (files.fingerprint, files_library),
            overlay=overlay,
        )
        self._observe_metrics()
        if not swapped:
            self._failed_fingerprint = snap.fingerprint
            self._count("invalid")
            return "invalid"
        self._failed_fingerprint = None
        self._count("ok")
        await self.publish(snap.fingerprint)
        return "reloaded"

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.scripts_reloads.labels(outcome).inc()

    def _observe_metrics(self) -> None:
        if self.metrics is None:
            return
        state = self.book.current
        self.metrics.scripts_loaded_at.set(state.loaded_at)
        self.metrics.scripts_count.set(len(state.matcher.library.scripts))
        self.metrics.scripts_reload_failing.set(1 if self.book.last_problems else 0)
        self.metrics.scripts_library.info({"fingerprint": state.fingerprint})

    # ---- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Check every interval until `stop` is set; interval 0 disables hot reload."""
        if self.interval_s <= 0:
            log.info("script library hot reload disabled (SCRIPTS_RELOAD_INTERVAL_S=0)")
            return
        await self.publish(self.book.fingerprint, only_if_missing=True)
        log.info("script library hot reload on", path=str(self.book.path), interval_s=self.interval_s)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
                return
            await self.check_once()
