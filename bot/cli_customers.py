"""`wecom-bot customers ...`: import orders from a CSV and recompute customers' computed tags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bot.cli_args import positive_int, run_with_database
from bot.orders_import import COLUMNS, import_orders, read_csv_text
from bot.storage.tags_repository import TagRepository
from handlers.tags import TagConfig, TagSource

CUSTOMERS_DESCRIPTION = """\
Customer data behind the computed tags (高价值, 沉默, 流失, 潜客, 新用户, rfm:*, lifecycle:*, activity:*)."""

IMPORT_DESCRIPTION = f"""\
Import paid orders from a CSV file (UTF-8) with the header
  {",".join(COLUMNS)}
amount in yuan with up to 2 decimals; paid_at as 'YYYY-MM-DD HH:MM:SS' (Asia/Shanghai) or ISO-8601.
Every row is checked first; all good rows are then written in one transaction, bad rows are listed
by line number. Re-importing the same file changes nothing. Unknown external_userids become new
customers. The buyers' computed tags (RFM tier, 高价值, 新用户, ...) are recomputed right after.
Exit code 1 when any row was bad or the file was unusable, 0 otherwise."""

RECOMPUTE_DESCRIPTION = """\
Recompute the computed tags of every customer from their orders and activity, with the thresholds
from the TAG_* settings. Each customer's tags are replaced in one transaction, so the bot never sees
a half-updated set. The server also does this daily (TAG_RECOMPUTE_CRON, 03:30 Asia/Shanghai)."""


@dataclass(frozen=True, slots=True)
class RecomputeSummary:
    customers: int
    changed: int


async def run_import_orders(
    path: Path,
    repository: TagRepository,
    *,
    now: datetime,
    source: str = "csv",
    progress_every: int = 1000,
    tag_config: TagConfig | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Import an order CSV, printing progress, bad rows and a summary; the exit code (0 ok, 1 bad rows).

    With `tag_config`, the buyers' computed tags are recomputed right after the import.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        text = read_csv_text(path)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return 1

    def progress(phase: str, done: int, total: int) -> None:
        unit = "customers" if phase == "tagged" else "rows"
        print(f"[{phase}] {done}/{total} {unit}", file=out, flush=True)

    report = await import_orders(
        text,
        repository,
        now=now,
        source=source,
        on_progress=progress,
        progress_every=progress_every,
        tag_config=tag_config,
    )
    if report.error is not None:
        print(f"error: {path.name}: {report.error}; nothing was imported", file=err)
        return 1
    for bad in report.bad:
        print(f"{path.name}:{bad.line}: {bad.reason}", file=err)
    print(
        f"done: {report.rows} rows read, {report.imported} orders imported, {report.unchanged} already present, "
        f"{report.customers_created} new customers, {len(report.bad)} bad rows"
        + (f"; tags recomputed for {report.tags_recomputed}, changed for {report.tags_changed}" if tag_config else ""),
        file=out,
    )
    return 0 if report.ok else 1


async def recompute_all_tags(
    repository: TagRepository,
    *,
    now: datetime,
    config: TagConfig | None = None,
    progress_every: int = 1000,
    out: IO[str] | None = None,
    page_size: int = 1000,
) -> RecomputeSummary:
    """Recompute every taggable customer's computed tags (one transaction per customer), with progress."""
    out = out or sys.stdout
    total = await repository.count_customers()
    done = changed = 0
    after_id = 0
    while ids := await repository.customer_ids(after_id=after_id, limit=page_size):
        for customer_id in ids:
            before = (await repository.tags_by_source(customer_id)).get(TagSource.COMPUTED)
            tags = await repository.recompute_computed_tags(customer_id, now, config)
            changed += tags is not None and tags != before
            done += 1
            if done % progress_every == 0:
                print(f"[recompute] {done}/{total} customers", file=out, flush=True)
        after_id = ids[-1]
    print(f"done: {done} customers recomputed, {changed} with changed tags", file=out)
    return RecomputeSummary(done, changed)


def _with_repository(work: Callable[[TagRepository, TagConfig], Awaitable[int]]) -> int:
    return run_with_database(lambda sessions, settings: work(TagRepository(sessions), settings.tag_config))


def cmd_import_orders(args: argparse.Namespace) -> int:
    return _with_repository(
        lambda repo, config: run_import_orders(
            args.file,
            repo,
            now=datetime.now(UTC),
            source=args.source,
            progress_every=args.progress_every,
            tag_config=config,
        )
    )


def cmd_recompute_tags(args: argparse.Namespace) -> int:
    async def work(repo: TagRepository, config: TagConfig) -> int:
        await recompute_all_tags(repo, now=datetime.now(UTC), config=config, progress_every=args.progress_every)
        return 0

    return _with_repository(work)


def register(subparsers: Any) -> None:
    """Add `customers import-orders FILE` and `customers recompute-tags` to the top-level subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    customers = subparsers.add_parser(
        "customers",
        help="import orders and recompute customer tags",
        description=CUSTOMERS_DESCRIPTION,
        formatter_class=formatter,
    )
    actions = customers.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    importer = actions.add_parser(
        "import-orders",
        help="import paid orders from a CSV file",
        description=IMPORT_DESCRIPTION,
        formatter_class=formatter,
    )
    importer.add_argument("file", type=Path, metavar="FILE", help="the CSV file")
    importer.add_argument("--source", default="csv", help="order source; order ids are unique per source (csv)")
    importer.add_argument(
        "--progress-every", type=positive_int, default=1000, metavar="N", help="report every N rows (1000)"
    )
    importer.set_defaults(func=cmd_import_orders)
    recompute = actions.add_parser(
        "recompute-tags",
        help="recompute every customer's computed tags",
        description=RECOMPUTE_DESCRIPTION,
        formatter_class=formatter,
    )
    recompute.add_argument(
        "--progress-every", type=positive_int, default=1000, metavar="N", help="report every N customers (1000)"
    )
    recompute.set_defaults(func=cmd_recompute_tags)
