"""What the packaged script library answers, rendered with its public API, for tests to compare sends with.

Tests that only need "the bot answered this message with the library" compute the expectation here instead of
copying YAML text, so a copy edit in the library does not break them while a wrong script or variant does.
"""

from __future__ import annotations

from typing import Any

from scripts_library import Library, Matcher, Query, load_library, render

_LIBRARY = load_library()
assert isinstance(_LIBRARY, Library), _LIBRARY
_MATCHER = Matcher(_LIBRARY)

# The computed tags of a customer first seen now: the pipeline computes them before the first answer.
NEWCOMER = frozenset({"新用户", "潜客", "rfm:none", "lifecycle:new", "activity:active"})


def scripted_replies(text: str, *, customer: str = "", tags: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The message bodies the library answers `text` with, for an untagged customer by default."""
    match = _MATCHER.match(Query(text=text, tags=tags, customer_id=customer))
    assert match is not None, f"the library does not answer {text!r}"
    return [item.content for item in render(_LIBRARY, match.script, match.variant, {})]


def scripted_text(text: str, *, customer: str = "", tags: frozenset[str] = frozenset()) -> str:
    """The text of the library's single-text answer to `text`."""
    [body] = scripted_replies(text, customer=customer, tags=tags)
    return str(body["content"])


def event_replies(event: str, *, tags: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The message bodies the library answers a library event (kf_session_entered, contact_added) with."""
    match = _MATCHER.match(Query(event=event, tags=tags))
    assert match is not None, f"the library has no script for {event!r}"
    return [item.content for item in render(_LIBRARY, match.script, match.variant, {})]
