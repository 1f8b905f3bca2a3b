"""GET /console/events: Server-Sent Events telling a signed-in browser that its inbox changed.

Each message is `event: inbox` with a tiny JSON body (type, conversation id, status); the page re-fetches
/console/api/inbox, which applies the visibility rules. A comment line every heartbeat keeps proxies from timing
the stream out, and the session is checked again at each heartbeat: a logged-out, expired or disabled account's
stream ends with `event: logout`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from bot.console.events import CLOSING
from bot.console.policy import may_see_event
from bot.console.state import SESSION_ID, USER, ConsoleState

FORWARDED_FIELDS = ("type", "conversation_id", "status")


def _frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def still_signed_in(state: ConsoleState, request: web.Request) -> bool:
    session = await state.sessions.get(request[SESSION_ID])
    if session is None:
        return False
    account = await state.repo.account(session.user_id)
    return account is not None and account.active


def events_handler(state: ConsoleState) -> Any:
    async def events(request: web.Request) -> web.StreamResponse:
        user = request[USER]
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            }
        )
        queue = await state.hub.subscribe()
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n" + _frame("ready", {"now": state.clock.now()}))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=state.heartbeat_s)
                except TimeoutError:
                    if not await still_signed_in(state, request):
                        await response.write(_frame("logout", {}))
                        break
                    await response.write(b": ping\n\n")
                    continue
                if event is CLOSING:
                    break
                if not may_see_event(user, event):
                    continue
                await response.write(_frame("inbox", {k: event[k] for k in FORWARDED_FIELDS if k in event}))
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            state.hub.unsubscribe(queue)
        return response

    return events
