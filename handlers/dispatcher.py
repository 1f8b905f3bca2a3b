"""Handlers tried in explicit order; the first that returns something other than UNHANDLED wins."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from handlers.domain import (
    UNHANDLED,
    Handler,
    HandlerContext,
    InboundMessage,
    OutboundMessage,
    Unhandled,
)


@dataclass(frozen=True, slots=True)
class Dispatch:
    handler_name: str | None
    replies: Sequence[OutboundMessage]

    @property
    def handled(self) -> bool:
        return self.handler_name is not None


class Dispatcher:
    def __init__(self, handlers: Sequence[Handler]) -> None:
        self._handlers = tuple(handlers)

    async def dispatch(self, message: InboundMessage, context: HandlerContext) -> Dispatch:
        """Run handlers in order and return the first answer, or an unhandled Dispatch."""
        for handler in self._handlers:
            result = await handler(message, context)
            if isinstance(result, Unhandled):
                continue
            return Dispatch(handler_name=getattr(handler, "__name__", repr(handler)), replies=tuple(result))
        return Dispatch(handler_name=None, replies=())


__all__ = ["UNHANDLED", "Dispatch", "Dispatcher"]
