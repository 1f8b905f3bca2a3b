"""`wecom-bot posts add|list|show|cancel|preview` and `wecom-bot robots add|list`: the content calendar.

`build_post` turns what a person typed into a validated post (or one line saying what is wrong); the REST API
and the console will reuse it. Webhook keys are never printed in full.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.cli_args import positive_int, run_with_database
from bot.settings import Settings
from bot.storage.models import PostStatus, TargetKind
from bot.storage.posts_repository import (
    DeliveryRecord,
    DuplicateName,
    NewTarget,
    PostRecord,
    PostRepository,
    TargetRecord,
)
from bot.storage.staff_repository import AuditRepository
from handlers.post_content import ContentError, Rendered, preview_text, render
from scheduler.slots import DEFAULT_TIMEZONE, Rule, RuleError, next_slots, validate_rule, zone

CLI_ACTOR = "cli"
MAX_OWNER_CHARS = 64  # the columns' sizes (bot/storage/models.py)
MAX_CRON_CHARS = 120
MAX_TARGET_CHARS = 255

POSTS_DESCRIPTION = """\
Scheduled community content: one-off posts (--at) and recurring ones (--cron, a crontab line in --timezone,
default Asia/Shanghai), aimed at group robots, customer groups (enterprise mass messages the group owner
confirms, at most 4 per group per month), customer segments by tag (微信客服 customers inside their 48 h
window) and staff (app messages). The running server delivers each slot once; see docs/scheduling.md."""

ROBOTS_DESCRIPTION = """\
Group robots (群机器人) by name. The webhook key is the `key=` part of the robot's webhook URL; it is a
secret: it is stored, never logged, and shown only as its last 4 characters."""


class PostInputError(ValueError):
    """What is wrong with a post someone is adding; one line."""


@dataclass(frozen=True, slots=True)
class PostSpec:
    """A post as typed, before validation."""

    title: str
    owner: str
    kind: str
    content: dict[str, Any]
    at: str | None = None
    cron: str | None = None
    timezone: str = DEFAULT_TIMEZONE
    robots: Sequence[str] = ()
    groups: Sequence[str] = ()  # CHAT_ID or CHAT_ID:SENDER
    segments: Sequence[str] = ()  # TAG[,TAG...]
    staff: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class ValidPost:
    spec: PostSpec
    rule: Rule
    targets: tuple[NewTarget, ...]


def parse_at(text: str, timezone: str) -> datetime:
    """`YYYY-MM-DD HH:MM[:SS]` in `timezone`, or an ISO time with its own offset."""
    try:
        value = datetime.fromisoformat(text.strip().replace("T", " "))
    except ValueError:
        raise PostInputError(f"--at {text!r}: not a time (use YYYY-MM-DD HH:MM)") from None
    if value.tzinfo is None:
        try:
            value = value.replace(tzinfo=zone(timezone))
        except RuleError as exc:
            raise PostInputError(str(exc)) from None
    return value.astimezone(UTC)


async def build_post(repo: PostRepository, spec: PostSpec, now: datetime) -> ValidPost:
    """Validate everything about a post (rule, targets, content per channel); PostInputError says what is wrong."""
    if not spec.title.strip():
        raise PostInputError("a post needs a title")
    if len(spec.title) > 200:
        raise PostInputError("the title is longer than 200 characters")
    if not spec.owner.strip():
        raise PostInputError("a post needs an owner (the member userid told about failures)")
    if len(spec.owner) > MAX_OWNER_CHARS:
        raise PostInputError(f"the owner is longer than {MAX_OWNER_CHARS} characters")
    if spec.cron is not None and len(spec.cron) > MAX_CRON_CHARS:
        raise PostInputError(f"the cron line is longer than {MAX_CRON_CHARS} characters")
    if (spec.at is None) == (spec.cron is None):
        raise PostInputError("give exactly one of --at (one-off) or --cron (recurring)")
    try:
        if spec.at is not None:
            rule = Rule(kind="at", at=parse_at(spec.at, spec.timezone), timezone=spec.timezone)
        else:
            rule = Rule(kind="cron", cron=spec.cron, timezone=spec.timezone)
        validate_rule(rule, now)
    except RuleError as exc:
        raise PostInputError(str(exc)) from None
    targets: list[NewTarget] = []
    for name in spec.robots:
        if await repo.get_robot(name) is None:
            raise PostInputError(f"unknown robot {name!r} (register it first: wecom-bot robots add {name} --key ...)")
        targets.append(NewTarget(TargetKind.ROBOT, name))
    for group in spec.groups:
        chat_id, _, sender = group.partition(":")
        if not chat_id:
            raise PostInputError(f"--group {group!r}: needs a chat_id")
        targets.append(NewTarget(TargetKind.GROUP_CHAT, chat_id, {"sender": sender} if sender else {}))
    for segment in spec.segments:
        tags = sorted({t.strip() for t in segment.split(",") if t.strip()})
        if not tags:
            raise PostInputError(f"--segment {segment!r}: needs at least one tag")
        targets.append(NewTarget(TargetKind.SEGMENT, ",".join(tags)))
    targets.extend(NewTarget(TargetKind.STAFF, userid) for userid in spec.staff)
    if not targets:
        raise PostInputError("a post needs at least one target (--robot, --group, --segment or --staff)")
    for target in targets:
        if len(target.ref) > MAX_TARGET_CHARS:
            raise PostInputError(f"{target.kind.value} {target.ref[:20]}…: longer than {MAX_TARGET_CHARS} characters")
    if len({(t.kind, t.ref) for t in targets}) != len(targets):
        raise PostInputError("the same target is given twice")
    for target in targets:
        try:
            render(spec.kind, spec.content, target.kind.value)
        except ContentError as exc:
            raise PostInputError(f"{target.kind.value} {target.ref}: {exc}") from None
    return ValidPost(spec, rule, tuple(targets))


def _local(instant: datetime, timezone: str) -> str:
    return instant.astimezone(zone(timezone)).strftime("%Y-%m-%d %H:%M")


def _rule_text(post: PostRecord) -> str:
    rule = post.rule
    if rule.kind == "at" and rule.at is not None:
        return f"once at {_local(rule.at, rule.timezone)} ({rule.timezone})"
    if rule.kind == "cron":
        return f"cron '{rule.cron}' ({rule.timezone})"
    return f"sop {rule.sop_plan} +{rule.sop_offset_s}s"


def _err(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)


async def store_post(
    repo: PostRepository, audit: AuditRepository, spec: PostSpec, now: datetime, actor: str
) -> PostRecord:
    """Validate (build_post), store and audit a post: the one way the CLI, the REST API and the console create
    posts. PostInputError (nothing stored) when the input is refused."""
    valid = await build_post(repo, spec, now)
    post = await repo.add_post(
        owner=spec.owner,
        title=spec.title,
        kind=spec.kind,
        content=spec.content,
        rule=valid.rule,
        targets=valid.targets,
    )
    await audit.record(actor, "post.add", f"post:{post.id}", {"owner": spec.owner})
    return post


async def cancel_and_audit(repo: PostRepository, audit: AuditRepository, post_id: int, actor: str) -> int | None:
    """Cancel a post (its scheduled deliveries become skipped) and audit it; None when there is no such post."""
    skipped = await repo.cancel_post(post_id)
    if skipped is not None:
        await audit.record(actor, "post.cancel", f"post:{post_id}", {"skipped": skipped})
    return skipped


def upcoming_slots(post: PostRecord, now: datetime, count: int) -> list[datetime]:
    """The next `count` slots of an active post (none once it is cancelled)."""
    return next_slots(post.rule, now, count) if post.status is PostStatus.ACTIVE else []


@dataclass(frozen=True, slots=True)
class TargetPreview:
    """The content as one target will receive it, or why it cannot be sent."""

    target: TargetRecord
    rendered: Rendered | None
    error: str | None

    @property
    def text(self) -> str:
        return preview_text(self.rendered) if self.rendered is not None else ""


def target_previews(post: PostRecord) -> list[TargetPreview]:
    out: list[TargetPreview] = []
    for target in post.targets:
        try:
            out.append(TargetPreview(target, render(post.kind, post.content, target.kind.value), None))
        except ContentError as exc:
            out.append(TargetPreview(target, None, str(exc)))
    return out


def deliveries_by_target(post: PostRecord, deliveries: Sequence[DeliveryRecord]) -> dict[int, list[DeliveryRecord]]:
    """The post's delivery rows per target id (every target present, in slot order)."""
    by_target: dict[int, list[DeliveryRecord]] = {t.id: [] for t in post.targets}
    for delivery in deliveries:
        by_target.setdefault(delivery.target_id, []).append(delivery)
    return by_target


async def add_post(
    sessions: async_sessionmaker[AsyncSession], spec: PostSpec, now: datetime, out: TextIO | None = None
) -> int:
    """Validate and store a post; exit code 2 with one line on stderr when the input is refused."""
    out = out or sys.stdout
    try:
        post = await store_post(PostRepository(sessions), AuditRepository(sessions), spec, now, CLI_ACTOR)
    except PostInputError as exc:
        _err(str(exc))
        return 2
    upcoming = next_slots(post.rule, now, 1)
    first = f"; first slot {_local(upcoming[0], post.rule.timezone)}" if upcoming else ""
    print(f"added post {post.id}: {post.title} ({_rule_text(post)}, {len(post.targets)} target(s){first})", file=out)
    return 0


async def list_posts(sessions: async_sessionmaker[AsyncSession], show_all: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    posts = await PostRepository(sessions).list_posts(status=None if show_all else PostStatus.ACTIVE)
    if not posts:
        print("no posts yet: wecom-bot posts add --help", file=out)
    for post in posts:
        targets = ", ".join(t.label for t in post.targets)
        print(f"{post.id:>5}  {post.status.value:<9} {post.title[:30]:<30}  {_rule_text(post)}  → {targets}", file=out)
    return 0


async def show_post(sessions: async_sessionmaker[AsyncSession], post_id: int, out: TextIO | None = None) -> int:
    """The post and, per target, its deliveries by state and the latest ones with their reasons."""
    out = out or sys.stdout
    repo = PostRepository(sessions)
    post = await repo.get_post(post_id)
    if post is None:
        _err(f"no post {post_id}")
        return 1
    print(f"post {post.id}: {post.title}", file=out)
    print(f"  owner {post.owner}, {post.kind}, {_rule_text(post)}, {post.status.value}", file=out)
    by_target = deliveries_by_target(post, await repo.deliveries(post_id=post_id))
    for target in post.targets:
        mine = by_target[target.id]
        counts = Counter(d.state.value for d in mine)
        summary = ", ".join(f"{state} {count}" for state, count in sorted(counts.items())) or "nothing due yet"
        print(f"  {target.label}: {summary}", file=out)
        for d in mine[-10:]:
            extra = " ".join(
                part
                for part in (
                    f"reason={d.reason}" if d.reason else "",
                    f"errcode={d.errcode}" if d.errcode is not None else "",
                    f"attempts={d.attempts}" if d.attempts else "",
                    json.dumps(dict(d.detail), ensure_ascii=False) if d.detail else "",
                )
                if part
            )
            print(f"    {_local(d.slot_at, post.rule.timezone)}  {d.state.value:<9} {extra}".rstrip(), file=out)
    return 0


async def cancel_post(sessions: async_sessionmaker[AsyncSession], post_id: int, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    skipped = await cancel_and_audit(PostRepository(sessions), AuditRepository(sessions), post_id, CLI_ACTOR)
    if skipped is None:
        _err(f"no post {post_id}")
        return 1
    print(f"post {post_id} cancelled; {skipped} scheduled delivery(ies) skipped", file=out)
    return 0


async def preview_post(
    sessions: async_sessionmaker[AsyncSession], post_id: int, count: int, now: datetime, out: TextIO | None = None
) -> int:
    """The next `count` slots and the content as each target will receive it."""
    out = out or sys.stdout
    post = await PostRepository(sessions).get_post(post_id)
    if post is None:
        _err(f"no post {post_id}")
        return 1
    print(f"post {post.id}: {post.title} ({_rule_text(post)})", file=out)
    slots = upcoming_slots(post, now, count)
    print("next slots:" if slots else "next slots: none", file=out)
    for slot in slots:
        print(f"  {_local(slot, post.rule.timezone)} ({post.rule.timezone})", file=out)
    for item in target_previews(post):
        if item.rendered is not None:
            print(f"{item.target.label} [{item.rendered.msgtype}]: {item.text}", file=out)
        else:
            print(f"{item.target.label}: cannot be sent: {item.error}", file=out)
    return 0


async def add_robot(
    sessions: async_sessionmaker[AsyncSession], name: str, key: str, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    key = key.strip()
    if "key=" in key:  # the whole webhook URL was pasted: keep only the key
        key = key.split("key=", 1)[1].split("&", 1)[0]
    if not name.strip() or not key:
        _err("a robot needs a name and a webhook key")
        return 2
    try:
        robot = await PostRepository(sessions).add_robot(name.strip(), key)
    except DuplicateName:
        _err(f"a robot named {name!r} exists already")
        return 1
    await AuditRepository(sessions).record(CLI_ACTOR, "robot.add", f"robot:{robot.name}")
    print(f"added robot {robot.name} (key {robot.masked_key})", file=out)
    return 0


async def list_robots(sessions: async_sessionmaker[AsyncSession], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    robots = await PostRepository(sessions).list_robots()
    if not robots:
        print("no robots yet: wecom-bot robots add NAME --key KEY", file=out)
    for robot in robots:
        print(f"{robot.name:<24} key {robot.masked_key}", file=out)
    return 0


def content_from_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The content kind and body from `posts add` options; PostInputError when not exactly one is given."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    if args.text is not None:
        chosen.append(("text", {"text": args.text}))
    if args.markdown is not None:
        chosen.append(("markdown", {"markdown": args.markdown}))
    if args.link_url is not None:
        link = {"url": args.link_url, "title": args.link_title or ""}
        if args.link_description:
            link["description"] = args.link_description
        chosen.append(("link", link))
    if args.image_file is not None or args.image_url is not None:
        image: dict[str, Any] = {}
        if args.image_file is not None:
            try:
                raw = Path(args.image_file).read_bytes()
            except OSError as exc:
                raise PostInputError(f"--image-file: {exc.strerror}") from None
            image.update(base64=base64.b64encode(raw).decode(), md5=hashlib.md5(raw).hexdigest())  # noqa: S324
        if args.image_url is not None:
            image["pic_url"] = args.image_url
        chosen.append(("image", image))
    if args.file_media_id is not None:
        chosen.append(("file", {"media_id": args.file_media_id}))
    if args.news_json is not None:
        try:
            articles = json.loads(Path(args.news_json).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PostInputError(f"--news-json: cannot read a JSON list of articles ({exc})") from None
        chosen.append(("news", {"articles": articles}))
    if len(chosen) != 1:
        raise PostInputError(
            "give exactly one content: --text, --markdown, --link-url, --image-file/--image-url, "
            "--file-media-id or --news-json"
        )
    return chosen[0]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _run(work: Any) -> int:
    def with_settings(sessions: async_sessionmaker[AsyncSession], _settings: Settings) -> Any:
        return work(sessions)

    return run_with_database(with_settings)


def cmd_add(args: argparse.Namespace) -> int:
    try:
        kind, content = content_from_args(args)
    except PostInputError as exc:
        _err(str(exc))
        return 2
    spec = PostSpec(
        title=args.title,
        owner=args.owner,
        kind=kind,
        content=content,
        at=args.at,
        cron=args.cron,
        timezone=args.timezone,
        robots=args.robot,
        groups=args.group,
        segments=args.segment,
        staff=args.staff,
    )
    return _run(lambda s: add_post(s, spec, _utcnow()))


def _read_key(args: argparse.Namespace) -> str:
    return sys.stdin.readline() if args.key == "-" else args.key


def register(subparsers: Any) -> None:
    """Add `posts add|list|show|cancel|preview` and `robots add|list` to the top-level subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    posts = subparsers.add_parser(
        "posts", help="scheduled community content", description=POSTS_DESCRIPTION, formatter_class=formatter
    )
    actions = posts.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    add = actions.add_parser("add", help="plan a post (validated: bad input is refused with one line)")
    add.add_argument("--title", required=True)
    add.add_argument("--owner", required=True, help="the member userid told about failures and misses")
    content = add.add_argument_group("content (exactly one)")
    content.add_argument("--text")
    content.add_argument("--markdown")
    content.add_argument("--link-url")
    content.add_argument("--link-title")
    content.add_argument("--link-description")
    content.add_argument("--image-file", help="JPG/PNG ≤ 2 MB, for group robots")
    content.add_argument("--image-url", help="picture URL, for customer groups")
    content.add_argument("--file-media-id")
    content.add_argument("--news-json", help="a JSON file: [{title, url, description, picurl}, ...] (1-8)")
    when = add.add_argument_group("when (exactly one)")
    when.add_argument("--at", help="one-off: YYYY-MM-DD HH:MM in --timezone")
    when.add_argument("--cron", help="recurring: a crontab line, e.g. '0 9 * * 1-5'")
    add.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="IANA time zone (default Asia/Shanghai)")
    where = add.add_argument_group("targets (one or more)")
    where.add_argument("--robot", action="append", default=[], metavar="NAME", help="a registered group robot")
    where.add_argument(
        "--group", action="append", default=[], metavar="CHAT_ID[:SENDER]", help="a customer group (mass message)"
    )
    where.add_argument("--segment", action="append", default=[], metavar="TAG[,TAG]", help="kf customers by tag")
    where.add_argument("--staff", action="append", default=[], metavar="USERID", help="a member (app message)")
    add.set_defaults(func=cmd_add)

    listing = actions.add_parser("list", help="list active posts")
    listing.add_argument("--all", action="store_true", help="include cancelled posts")
    listing.set_defaults(func=lambda a: _run(lambda s: list_posts(s, a.all)))
    show = actions.add_parser("show", help="a post and its delivery status per target")
    show.add_argument("post_id", type=positive_int)
    show.set_defaults(func=lambda a: _run(lambda s: show_post(s, a.post_id)))
    cancel = actions.add_parser("cancel", help="cancel a post (its pending deliveries are skipped)")
    cancel.add_argument("post_id", type=positive_int)
    cancel.set_defaults(func=lambda a: _run(lambda s: cancel_post(s, a.post_id)))
    preview = actions.add_parser("preview", help="the next slots and the content each target will get")
    preview.add_argument("post_id", type=positive_int)
    preview.add_argument("--count", type=positive_int, default=5, help="how many slots (default 5)")
    preview.set_defaults(func=lambda a: _run(lambda s: preview_post(s, a.post_id, a.count, _utcnow())))

    robots = subparsers.add_parser(
        "robots", help="group robots for scheduled posts", description=ROBOTS_DESCRIPTION, formatter_class=formatter
    )
    robot_actions = robots.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    robot_add = robot_actions.add_parser("add", help="register a group robot's webhook key under a name")
    robot_add.add_argument("name")
    robot_add.add_argument("--key", required=True, help="the webhook key (or the whole webhook URL); - reads stdin")
    robot_add.set_defaults(func=lambda a: _run(lambda s: add_robot(s, a.name, _read_key(a))))
    robot_actions.add_parser("list", help="list group robots").set_defaults(func=lambda a: _run(list_robots))
