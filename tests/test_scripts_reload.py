"""Hot reload of the script library: picked up on edit, last good kept on a bad edit, converging across processes.

The watcher's single step (`check_once`) is driven directly; only the app-wiring test runs the real task, and
it polls with a deadline.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio
from aiohttp.test_utils import TestClient, TestServer

from bot.app import ScriptBook, create_app, open_services
from bot.metrics import Metrics
from bot.redis_keys import RedisKeys
from bot.scripts_reload import ScriptsWatcher, content_fingerprint, snapshot
from bot.wecom.simulator import ManualClock
from handlers.domain import SystemClock
from scripts_library import Library, Matcher, Query, load_library
from tests.conftest import Backend, make_settings
from tests.test_e2e import until
from tests.test_kf_sync import open_harness
from tests.test_scripted_e2e import say

GOOD = """\
scripts:
  - id: only.hello
    title: 打招呼
    triggers:
      phrases: [你好]
    reply:
      - text: "你好呀"
"""

# Line 4 repeats the id of line 2's script: the problem must name scripts.yaml and a line.
BAD = """\
scripts:
  - id: dup
    title: a
    triggers: {phrases: [你好]}
    reply: [{text: "a"}]
  - id: dup
    title: b
    triggers: {phrases: [b]}
    reply: [{text: "b {no_such_placeholder}"}]
"""


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scripts.yaml").write_text(text, encoding="utf-8")
    return folder


@asynccontextmanager
async def redis_clients(backend: Backend, count: int) -> AsyncIterator[list[redis_asyncio.Redis]]:
    """`count` connections to one Redis, as `count` processes would have (fakeredis: one shared in-process client)."""
    if not backend.redis_url:
        import fakeredis

        shared = fakeredis.FakeAsyncRedis()
        try:
            yield [shared] * count
        finally:
            await shared.aclose()
        return
    clients = [redis_asyncio.Redis.from_url(backend.redis_url) for _ in range(count)]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


def watcher_for(book: ScriptBook, redis: redis_asyncio.Redis, backend: Backend, **kw: object) -> ScriptsWatcher:
    return ScriptsWatcher(book, redis, RedisKeys(backend.key_prefix), interval_s=0, clock=ManualClock(), **kw)  # type: ignore[arg-type]


async def published(redis: redis_asyncio.Redis, backend: Backend) -> str | None:
    value: bytes | str | None = await redis.get(RedisKeys(backend.key_prefix).scripts_version())
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------------------------- picked up


async def test_an_edited_file_is_picked_up_and_the_next_message_gets_the_new_script(
    backend: Backend, tmp_path: Path
) -> None:
    folder = write(tmp_path / "lib", GOOD)
    async with open_harness(backend) as h:
        book = ScriptBook.load(folder)
        h.services.scripts = book  # the pipeline reads this book once per message
        watcher = watcher_for(book, h.services.redis, backend, metrics=h.services.metrics)

        assert await watcher.check_once() == "unchanged"
        await say(h, "wmHot", "你好")
        write(folder, GOOD.replace("你好呀", "热更新后的问候"))
        before = book.fingerprint

        assert await watcher.check_once() == "reloaded"
        await say(h, "wmHot", "你好")

        contents = [s.content for s in h.sim.sent_after(0, "wmHot")]
        assert contents == [{"content": "你好呀"}, {"content": "热更新后的问候"}]
        assert book.fingerprint != before and book.fingerprint == content_fingerprint(folder)
        assert await published(h.services.redis, backend) == book.fingerprint
        assert await watcher.check_once() == "unchanged"  # nothing new: no second load
        assert h.services.metrics.scripts_reloads.labels("ok")._value.get() == 1


async def test_a_touch_without_a_content_change_does_not_reload(backend: Backend, tmp_path: Path) -> None:
    folder = write(tmp_path / "lib", GOOD)
    book = ScriptBook.load(folder)
    before = book.current
    async with redis_clients(backend, 1) as [redis]:
        watcher = watcher_for(book, redis, backend)
        st = (folder / "scripts.yaml").stat()
        os.utime(folder / "scripts.yaml", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        assert await watcher.check_once() == "unchanged"
        assert book.matcher is before.matcher and book.signature != before.signature


# --------------------------------------------------------------------------------------------- bad edit


async def test_an_invalid_edit_keeps_the_last_good_library_and_reports_file_and_line(
    backend: Backend, tmp_path: Path
) -> None:
    folder = write(tmp_path / "lib", GOOD)
    book = ScriptBook.load(folder)
    good = book.current
    metrics = Metrics()
    async with redis_clients(backend, 1) as [redis]:
        watcher = watcher_for(book, redis, backend, metrics=metrics)
        await watcher.publish(book.fingerprint)

        write(folder, BAD)
        assert await watcher.check_once() == "invalid"

        assert book.current is good  # still serving the last good library, untouched
        status = book.status()
        assert status["status"] == "error" and status["fingerprint"] == good.fingerprint
        problems = status["problems"]
        assert isinstance(problems, list) and problems
        assert all(re.search(r"scripts\.yaml:\d+: ", p) for p in problems), problems
        assert any("dup" in p for p in problems)
        assert await published(redis, backend) == good.fingerprint  # a bad library is never announced
        assert metrics.scripts_reload_failing._value.get() == 1
        assert metrics.scripts_reloads.labels("invalid")._value.get() == 1

        assert await watcher.check_once() == "unchanged"  # the same bad content is not loaded again and again

        write(folder, GOOD.replace("你好呀", "修好了"))
        assert await watcher.check_once() == "reloaded"
        assert book.status()["status"] == "ok" and book.status()["problems"] == []
        assert metrics.scripts_reload_failing._value.get() == 0
        assert await published(redis, backend) == book.fingerprint


async def test_a_vanished_folder_keeps_the_last_good_library(backend: Backend, tmp_path: Path) -> None:
    folder = write(tmp_path / "lib", GOOD)
    book = ScriptBook.load(folder)
    good = book.current
    async with redis_clients(backend, 1) as [redis]:
        watcher = watcher_for(book, redis, backend)
        (folder / "scripts.yaml").unlink()
        folder.rmdir()
        assert await watcher.check_once() == "invalid"
        assert book.current is good and book.status()["status"] == "error"


# --------------------------------------------------------------------------------------------- processes


async def test_two_processes_sharing_redis_converge_on_the_same_fingerprint(backend: Backend, tmp_path: Path) -> None:
    folder = write(tmp_path / "shared-volume", GOOD)
    book_a, book_b = ScriptBook.load(folder), ScriptBook.load(folder)
    async with redis_clients(backend, 2) as [redis_a, redis_b]:
        a, b = watcher_for(book_a, redis_a, backend), watcher_for(book_b, redis_b, backend)

        write(folder, GOOD.replace("你好呀", "大家好"))
        assert await a.check_once() == "reloaded"
        assert await b.check_once() == "reloaded"
        assert book_a.fingerprint == book_b.fingerprint == await published(redis_b, backend)

        # An edit whose size and mtime look unchanged (attribute caches on shared volumes, mtime-keeping copies):
        # b's stat check cannot see it; a picks it up (a forced check, as an operator command would do), and
        # b follows because the fingerprint in Redis is one it has not acted on.
        path = folder / "scripts.yaml"
        st = path.stat()
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("大家好", "大伙好"), encoding="utf-8")  # same UTF-8 length
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size

        assert await b.check_once() == "unchanged"  # blind on its own
        assert await a.check_once(force=True) == "reloaded"
        assert book_a.fingerprint != book_b.fingerprint
        assert await b.check_once() == "reloaded"  # nudged through Redis
        assert book_a.fingerprint == book_b.fingerprint == await published(redis_a, backend)
        reply = book_b.matcher.match(Query(text="你好", customer_id="c"))
        assert reply is not None and "大伙好" in repr(reply.variant)
        assert book_b.status()["cluster_fingerprint"] == book_b.fingerprint
        assert await b.check_once() == "unchanged"  # converged: no more loads


# --------------------------------------------------------------------------------------------- atomicity


def _library(tmp_path: Path, prefix: str, count: int) -> Library:
    lines = ["scripts:"]
    for i in range(count):
        lines += [
            f"  - id: {prefix}.s{i:03d}",
            f"    title: {prefix} {i}",
            f"    priority: {i}",
            "    triggers:",
            f"      keywords_any: [你好, {prefix}{i}]",
            "    reply:",
            f'      - text: "{prefix}-{i}"',
        ]
    folder = write(tmp_path / prefix, "\n".join(lines) + "\n")
    result = load_library(folder)
    assert isinstance(result, Library), result
    return result


def test_a_reload_never_exposes_a_partial_library_to_a_concurrent_match(tmp_path: Path) -> None:
    lib_a, lib_b = _library(tmp_path, "alpha", 60), _library(tmp_path, "beta", 40)
    ids = {"alpha": {s.id for s in lib_a.scripts}, "beta": {s.id for s in lib_b.scripts}}
    matchers = [Matcher(lib_a), Matcher(lib_b)]
    snaps = [snapshot(tmp_path / "alpha"), snapshot(tmp_path / "beta")]
    book = ScriptBook(tmp_path / "alpha", lib_a, snapshot=snaps[0])

    with pytest.raises(dataclasses.FrozenInstanceError):
        book.current.matcher = matchers[1]  # type: ignore[misc]

    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            i = swaps % 2
            assert book.apply(matchers[i], snaps[i])
            swaps += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    seen: set[str] = set()
    try:
        for _ in range(3000):
            state = book.current  # what a message takes once
            prefix = state.matcher.library.scripts[0].id.split(".")[0]
            assert {s.id for s in state.matcher.library.scripts} == ids[prefix]
            assert state.fingerprint == snaps[0 if prefix == "alpha" else 1].fingerprint
            match = state.matcher.match(Query(text="你好", customer_id="c"))
            assert match is not None and match.script.id.startswith(prefix + ".")
            seen.add(prefix)
    finally:
        stop.set()
        thread.join()
    assert swaps > 0


# --------------------------------------------------------------------------------------------- wiring


async def test_the_app_runs_the_watcher_and_reports_the_library(backend: Backend, tmp_path: Path) -> None:
    folder = write(tmp_path / "lib", GOOD)
    settings = make_settings(backend, scripts_path=str(folder), scripts_reload_interval_s=0.05, auto_migrate=True)
    async with open_services(settings, clock=SystemClock()) as services:
        client = TestClient(TestServer(create_app(services, worker_count=0)))
        await client.start_server()
        try:
            first = await (await client.get("/scripts/status")).json()
            assert first["status"] == "ok" and first["fingerprint"] == content_fingerprint(folder)

            write(folder, GOOD.replace("你好呀", "自动重载"))
            expected = content_fingerprint(folder)

            async def reloaded() -> bool:
                body = await (await client.get("/scripts/status")).json()
                return bool(body["fingerprint"] == expected)

            await until(reloaded, "the running watcher to reload the library")
            status = await (await client.get("/scripts/status")).json()
            assert status["status"] == "ok" and status["cluster_fingerprint"] == expected
            assert await published(services.redis, backend) == expected
            metrics = await (await client.get("/metrics")).text()
            assert 'wecom_scripts_reloads_total{outcome="ok"} 1.0' in metrics
            assert f'wecom_scripts_library_info{{fingerprint="{expected}"}} 1.0' in metrics
        finally:
            await client.close()


async def test_interval_zero_disables_the_watcher(tmp_path: Path) -> None:
    import asyncio

    assert make_settings().scripts_reload_interval_s == 2
    book = ScriptBook.load(write(tmp_path / "lib", GOOD))
    watcher = ScriptsWatcher(book, None, RedisKeys(), interval_s=0, clock=SystemClock())
    await asyncio.wait_for(watcher.run(asyncio.Event()), 5)  # returns at once instead of looping
