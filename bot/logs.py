"""Structured logging: JSON or console lines, with secrets and customer text kept out."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Values under these keys never reach a log line, at any level.
SECRET_KEYS = frozenset(
    {"secret", "corpsecret", "token", "access_token", "aes_key", "encoding_aes_key", "password", "authorization"}
)
# Customer content is allowed only at DEBUG.
CONTENT_KEYS = frozenset({"text", "content", "xml", "plaintext", "body", "payload"})


def redact(_logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secrets always and message content above DEBUG."""
    for key in list(event_dict):
        lowered = key.lower()
        secret = lowered in SECRET_KEYS or lowered.endswith(("_secret", "_token"))
        content = lowered in CONTENT_KEYS and method_name != "debug"
        if secret or content:
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(level: str = "INFO", json_output: bool = False) -> None:
    """Configure structlog and the stdlib root logger once, at start-up."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s", force=True)
    for noisy in ("aiohttp.access", "apscheduler", "sqlalchemy.engine", "alembic"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    renderer: Any = structlog.processors.JSONRenderer(ensure_ascii=False) if json_output else (
        structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
