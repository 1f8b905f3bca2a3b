"""Order CSV import: validate every row, import all good rows in one transaction, report bad rows by line.

Format (UTF-8, a BOM from Excel is fine), header row required, extra columns ignored:

    external_userid,order_id,amount,paid_at
    wmAbc123,SO-1001,199.00,2025-01-02 10:30:00

- amount: yuan, digits with up to two decimals (no thousands separators or currency signs), 0 to 100,000,000.
- paid_at: 'YYYY-MM-DD HH:MM:SS' or ISO-8601 with a time; without an offset it is Asia/Shanghai time.
  Not more than a day in the future.
- An order id appearing twice in the file is a bad row the second time; an order id already imported from the
  same source is skipped when identical (so a re-import is a no-op) and a bad row when it differs.
- An unknown external_userid is not an error: a customer of channel "contact" is created for it, because order
  exports usually reach the bot before the customer first writes.

Nothing is written when the header is wrong, and a database failure rolls the whole import back.

`import_orders_records` takes the same four fields as already-parsed records (an orders API) with the same rules.
Given a TagConfig, both recompute the computed tags of the customers that got new orders (and of customers of
re-imported rows whose tags are outdated, e.g. after a recompute failed), in batches after the import commits.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from bot.storage.tags_repository import OrderRow, TagRepository
from handlers.tags import TagConfig

COLUMNS = ("external_userid", "order_id", "amount", "paid_at")
SHANGHAI = ZoneInfo("Asia/Shanghai")
MAX_ID_CHARS = 128
MAX_AMOUNT = Decimal("100000000")
FUTURE_TOLERANCE = timedelta(days=1)
_AMOUNT = re.compile(r"\d{1,12}(?:\.\d{1,2})?")
_PLAIN_TIME = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    reason: str


@dataclass(slots=True)
class ParsedOrders:
    rows: list[OrderRow] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    error: str | None = None  # the whole file is unusable (encoding, header); nothing may be imported


@dataclass(frozen=True, slots=True)
class ImportReport:
    rows: int  # data rows read (blank lines not counted)
    imported: int
    unchanged: int
    customers_created: int
    bad: tuple[BadRow, ...]
    error: str | None = None
    tags_recomputed: int = 0  # customer rows whose computed tags were recomputed after the import
    tags_changed: int = 0  # of which the computed tags changed

    @property
    def ok(self) -> bool:
        return self.error is None and not self.bad


def parse_amount(text: str) -> int:
    """Yuan with up to two decimals as integer cents; ValueError with the reason otherwise."""
    if not _AMOUNT.fullmatch(text):
        raise ValueError(f"amount {text!r} is not yuan with up to 2 decimals (e.g. 199 or 199.50)")
    value = Decimal(text)
    if value > MAX_AMOUNT:
        raise ValueError(f"amount {text} is over {MAX_AMOUNT} yuan")
    return int(value * 100)


def parse_paid_at(text: str, now: datetime) -> datetime:
    """A payment time as an aware UTC datetime; naive times are Asia/Shanghai."""
    try:
        value = datetime.strptime(text, _PLAIN_TIME)  # the zone is attached just below
    except ValueError:
        if len(text) <= 10:
            raise ValueError(f"paid_at {text!r} has no time of day (use 'YYYY-MM-DD HH:MM:SS')") from None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"paid_at {text!r} is not 'YYYY-MM-DD HH:MM:SS' or ISO-8601") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=SHANGHAI)
    value = value.astimezone(UTC)
    if value > now + FUTURE_TOLERANCE:
        raise ValueError(f"paid_at {text!r} is in the future")
    return value


def _records(text: str) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(line, fields, csv error) per record; line is where the record starts."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, None, f"unreadable CSV: {exc}"
            start = reader.line_num + 1
            continue
        yield start, record, None
        start = reader.line_num + 1


def parse_orders_csv(text: str, now: datetime) -> ParsedOrders:
    """Validate every row of an order CSV; good rows and bad rows (by line) are both returned."""
    parsed = ParsedOrders()
    records = _records(text)
    header: list[str] | None = None
    for _line, fields, error in records:
        if error is not None:
            parsed.error = f"line 1: {error}"
            return parsed
        if fields and any(f.strip() for f in fields):
            header = [f.strip().lower() for f in fields]
            break
    if header is None:
        parsed.error = "the file is empty (expected the header external_userid,order_id,amount,paid_at)"
        return parsed
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        parsed.error = f"header: missing column(s) {', '.join(missing)} (expected {','.join(COLUMNS)})"
        return parsed
    duplicated = sorted({c for c in COLUMNS if header.count(c) > 1})
    if duplicated:
        parsed.error = f"header: column(s) {', '.join(duplicated)} appear more than once"
        return parsed
    index = {c: header.index(c) for c in COLUMNS}
    first_line: dict[str, int] = {}
    for line, fields, error in records:
        if error is not None:
            parsed.bad.append(BadRow(line, error))
            continue
        assert fields is not None
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) != len(header):
            parsed.bad.append(BadRow(line, f"expected {len(header)} fields, got {len(fields)}"))
            continue
        _add_row(parsed, line, {c: fields[i].strip() for c, i in index.items()}, now, first_line)
    return parsed


def _add_row(
    parsed: ParsedOrders, line: int, values: dict[str, str], now: datetime, first_line: dict[str, int]
) -> None:
    """Validate one row's four values into parsed.rows, or its reason into parsed.bad."""
    reason = _row_problem(values)
    if reason is None:
        try:
            amount = parse_amount(values["amount"])
            paid_at = parse_paid_at(values["paid_at"], now)
        except ValueError as exc:
            reason = str(exc)
    if reason is None and values["order_id"] in first_line:
        reason = f"duplicate order_id {values['order_id']!r} (first on line {first_line[values['order_id']]})"
    if reason is not None:
        parsed.bad.append(BadRow(line, reason))
        return
    first_line[values["order_id"]] = line
    parsed.rows.append(OrderRow(line, values["external_userid"], values["order_id"], amount, paid_at))


def _record_value(column: str, value: object) -> str:
    """A record field as the text a CSV cell would hold; ValueError for a type no CSV cell could be."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, datetime) and column == "paid_at":
        return value.isoformat(sep=" ")
    if isinstance(value, int) and not isinstance(value, bool) and column in ("order_id", "amount"):
        return str(value)
    if isinstance(value, float) and column == "amount" and math.isfinite(value):
        return repr(value)  # the shortest text of the float: 199.5 stays "199.5", 0.1 + 0.2 is refused
    raise ValueError(f"{column} must be a string, got {type(value).__name__}")


def parse_order_records(records: Sequence[object], now: datetime) -> ParsedOrders:
    """Validate already-parsed order records as CSV rows are validated; a bad record's line is its 1-based index."""
    parsed = ParsedOrders()
    first_line: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            parsed.bad.append(BadRow(number, f"not an object with the fields {','.join(COLUMNS)}"))
            continue
        try:
            values = {c: _record_value(c, record.get(c)) for c in COLUMNS}
        except ValueError as exc:
            parsed.bad.append(BadRow(number, str(exc)))
            continue
        _add_row(parsed, number, values, now, first_line)
    return parsed


def _row_problem(values: dict[str, str]) -> str | None:
    for column in ("external_userid", "order_id"):
        value = values[column]
        if not value:
            return f"{column} is empty"
        if len(value) > MAX_ID_CHARS:
            return f"{column} is longer than {MAX_ID_CHARS} characters"
        if not value.isprintable():
            return f"{column} contains control characters"
    for column in ("amount", "paid_at"):
        if not values[column]:
            return f"{column} is empty"
    return None


def read_csv_text(path: Path) -> str:
    """The file's text; ValueError when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path.name} is not UTF-8 (byte {exc.start}); save it as 'CSV UTF-8' and try again") from None


async def import_orders(
    text: str,
    repository: TagRepository,
    *,
    now: datetime,
    source: str = "csv",
    on_progress: Callable[[str, int, int], None] | None = None,
    progress_every: int = 1000,
    tag_config: TagConfig | None = None,
) -> ImportReport:
    """Validate an order CSV and import every good row in one transaction (all or nothing).

    on_progress(phase, done, total) is called every progress_every rows while validating ("validated") and
    while writing ("written"); with tag_config, then every progress_every customers while recomputing their
    computed tags ("tagged"). Without tag_config the tags are left to the daily job.
    """
    parsed = parse_orders_csv(text, now)
    return await _import_parsed(
        parsed,
        repository,
        now=now,
        source=source,
        on_progress=on_progress,
        progress_every=progress_every,
        tag_config=tag_config,
    )


async def import_orders_records(
    records: Sequence[Mapping[str, object]],
    repository: TagRepository,
    *,
    now: datetime,
    tag_config: TagConfig,
    source: str = "api",
    on_progress: Callable[[str, int, int], None] | None = None,
    progress_every: int = 1000,
) -> ImportReport:
    """Import already-parsed orders (external_userid, order_id, amount, paid_at) and recompute those customers' tags.

    Each record is validated as a CSV row is (amount: yuan text or a number; paid_at: text or a datetime,
    Asia/Shanghai when naive); a bad record is reported with its 1-based index as the line. Good records are
    written in one transaction, then the customers that got new orders have their computed tags recomputed
    with tag_config. Re-sending the same records changes nothing. Progress phases as in `import_orders`.
    """
    parsed = parse_order_records(records, now)
    return await _import_parsed(
        parsed,
        repository,
        now=now,
        source=source,
        on_progress=on_progress,
        progress_every=progress_every,
        tag_config=tag_config,
    )


async def _import_parsed(
    parsed: ParsedOrders,
    repository: TagRepository,
    *,
    now: datetime,
    source: str,
    on_progress: Callable[[str, int, int], None] | None,
    progress_every: int,
    tag_config: TagConfig | None,
) -> ImportReport:
    total = len(parsed.rows) + len(parsed.bad)
    if on_progress is not None:
        on_progress("validated", total, total)
    if parsed.error is not None:
        return ImportReport(0, 0, 0, 0, (), parsed.error)

    def written(done: int) -> None:
        if on_progress is not None:
            on_progress("written", done, len(parsed.rows))

    result = await repository.import_orders(
        parsed.rows, source=source, on_progress=written, chunk_size=max(1, progress_every)
    )
    bad = parsed.bad + [
        BadRow(c.line, f"order_id {c.order_id!r} was already imported with another customer, amount or time")
        for c in result.conflicts
    ]
    bad.sort(key=lambda b: b.line)
    recomputed = changed = 0
    if tag_config is not None:
        # A re-import adds no order, but its customers may still be outdated (a recompute that failed last time).
        targets = [*result.customer_ids, *await repository.needing_recompute_among(result.unchanged_customer_ids)]

        def tagged(done: int, of: int) -> None:
            if on_progress is not None:
                on_progress("tagged", done, of)

        if targets:
            summary = await repository.recompute_customers(
                targets, now, tag_config, reason="orders", batch_size=max(1, progress_every), on_progress=tagged
            )
            recomputed, changed = summary.customers, summary.changed
    return ImportReport(
        rows=total,
        imported=result.inserted,
        unchanged=result.unchanged,
        customers_created=result.customers_created,
        bad=tuple(bad),
        tags_recomputed=recomputed,
        tags_changed=changed,
    )
