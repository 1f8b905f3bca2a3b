"""A real aiohttp server on its own event loop in a thread, for browser tests (playwright's sync API blocks)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class LoopCalls:
    """What a test does with a server running in a thread: run a coroutine on its loop, build its URLs."""

    loop: asyncio.AbstractEventLoop
    base_url: str

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def url(self, path: str) -> str:
        return self.base_url + path


@asynccontextmanager
async def listening(app: web.Application, port: int) -> AsyncIterator[None]:
    """Serve `app` on 127.0.0.1:port until the block ends."""
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield
    finally:
        await runner.cleanup()


@contextmanager
def in_thread(
    run: Callable[[Callable[[T], None], asyncio.Event], Awaitable[None]], *, name: str, start_timeout: float = 30
) -> Iterator[T]:
    """Run `run(ready, stop)` on a new loop in a thread; yields what it passes to `ready`, then sets `stop`."""
    loop = asyncio.new_event_loop()
    ready: list[T] = []
    started, stop, failed = threading.Event(), asyncio.Event(), []

    def on_ready(value: T) -> None:
        ready.append(value)
        started.set()

    def main() -> None:
        try:
            loop.run_until_complete(run(on_ready, stop))
        except BaseException as exc:
            failed.append(exc)
            started.set()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    assert started.wait(start_timeout), f"{name} did not start"
    if failed:
        raise failed[0]
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        loop.close()
