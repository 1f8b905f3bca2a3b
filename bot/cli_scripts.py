"""`wecom-bot scripts validate|explain`: check the script library and ask why a message gets its answer."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from scripts_library import DEFAULT_LIBRARY, Library, Matcher, Query, load_library

VALIDATE_DESCRIPTION = """\
Check a script library (a folder of YAML files, or one file) and print every problem as FILE:LINE: CAUSE.
Exit 0 when the library is valid, 1 when it is not. Without PATH the built-in library is checked."""

EXPLAIN_DESCRIPTION = """\
Show which script and variant would answer TEXT for a customer with the given tags, why, and which
scripts were triggered but lost (audience, active window, cooldown, lower priority ...)."""


def cmd_validate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print every problem of the library at args.path; 0 when valid, 1 otherwise."""
    out = out or sys.stdout
    loaded = load_library(args.path)
    if isinstance(loaded, list):
        for problem in loaded:
            print(problem, file=out)
        print(f"{len(loaded)} problem(s) in {args.path}", file=out)
        return 1
    print(f"ok: {len(loaded.scripts)} scripts, {len(loaded.tags)} known tags in {args.path}", file=out)
    return 0


def cmd_explain(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the winner, its variant and reasons, and the near misses; 1 when the library is invalid."""
    out = out or sys.stdout
    loaded = load_library(args.path)
    if isinstance(loaded, list):
        for problem in loaded:
            print(problem, file=out)
        return 1
    library: Library = loaded
    tags = frozenset(t.strip() for t in (args.tags or "").split(",") if t.strip())
    unknown = sorted(tags - library.tags)
    if unknown:
        print(f"warning: tags not in the library's vocabulary: {','.join(unknown)}", file=out)
    query = Query(
        text=args.text,
        event=args.event,
        menu_id=args.menu_id,
        tags=tags,
        customer_id=args.customer,
        now=args.now if args.now is not None else time.time(),
    )
    for line in Matcher(library).explain(query).lines():
        print(line, file=out)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `scripts validate` and `scripts explain` to a CLI's subparsers; returns the `scripts` parser."""
    scripts = subparsers.add_parser(
        "scripts", help="check the script library, explain a match", description="Work with the script library."
    )
    sub = scripts.add_subparsers(dest="scripts_action", required=True, metavar="ACTION", title="actions")
    validate = sub.add_parser(
        "validate",
        help="report every problem in a library",
        description=VALIDATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("path", nargs="?", default=str(DEFAULT_LIBRARY), help="library folder or file")
    validate.set_defaults(func=cmd_validate)
    explain = sub.add_parser(
        "explain",
        help="which script answers a text, and why",
        description=EXPLAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("text", nargs="?", default=None, help='the customer\'s message, e.g. "这个多少钱"')
    explain.add_argument("--tags", default="", help="the customer's tags, comma-separated, e.g. 新用户,高价值")
    explain.add_argument("--customer", default="", help="customer id (decides sticky A/B variants)")
    explain.add_argument("--event", default=None, help="an event instead of text, e.g. contact_added")
    explain.add_argument("--menu-id", dest="menu_id", default=None, help="a kf menu id the customer clicked")
    explain.add_argument("--path", default=str(DEFAULT_LIBRARY), help="library folder or file")
    explain.add_argument("--now", type=float, default=None, help=argparse.SUPPRESS)  # unix seconds, for tests
    explain.set_defaults(func=cmd_explain)
    return scripts  # type: ignore[no-any-return]
