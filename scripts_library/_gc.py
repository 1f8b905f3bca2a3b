"""Pausing the cyclic garbage collector while a library or its matcher is built."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic garbage collection while a library (or its matcher) is built.

    Composing and validating 10,000 scripts allocates about a million short-lived, acyclic objects (YAML nodes,
    marks, model tuples) that reference counting frees, and building the matcher tens of thousands of long-lived
    ones; meanwhile the cyclic collector would run thousands of times and walk the whole heap in its full passes,
    which more than doubled load time and made the matcher's build take half as long again. Whatever cycles a
    build leaves are collected as usual once collection is resumed.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
