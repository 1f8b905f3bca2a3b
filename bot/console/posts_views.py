"""Console pages for scheduled posts: `/console/posts` (list), `/console/posts/calendar` (the next 7 days' slots),
`/console/posts/{id}` (content preview and delivery status per target) and the confirmed cancel.

Roles as in the REST API (bot/posts_api.py): admins and community managers read and cancel, team leads read,
agents get 403. Posts are not scoped by team. Cancelling goes through bot.cli_posts.cancel_and_audit, like the
CLI and the API; the console's CSRF middleware guards the form, and the form must carry `confirm=yes`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web

from bot.cli_posts import cancel_and_audit, deliveries_by_target, target_previews, upcoming_slots
from bot.console import posts_templates
from bot.console.policy import ConsoleUser
from bot.console.posts_templates import CalendarDay, ListedPost, TargetStatus
from bot.console.state import SESSION, USER, ConsoleState
from bot.console.templates import message_page
from bot.console.views import ConsoleError, html, parse_id, read_body
from bot.posts_api import POSTS_READERS, POSTS_WRITERS
from bot.storage.models import PostStatus
from bot.storage.post_stats_repository import PostStatsRepository
from bot.storage.posts_repository import PostRecord, PostRepository
from scheduler.slots import RuleError, slots_between

CALENDAR_DAYS = 7
CALENDAR_SLOTS_PER_POST = 200  # a minutely rule would have 10,080 slots in a week
CALENDAR_ENTRIES_PER_DAY = 50
RECENT_DELIVERIES = 20
PREVIEW_SLOTS = 5
STATUS_FILTERS = ("all", "active", "cancelled")
NOT_FOUND = ConsoleError(404, "not_found", "推送不存在")


def _reader(request: web.Request) -> ConsoleUser:
    user = request[USER]
    if user.role not in POSTS_READERS:
        raise ConsoleError(403, "forbidden", "你的角色无权查看推送计划")
    return user


def _writable(user: ConsoleUser) -> bool:
    return user.role in POSTS_WRITERS


class PostsViews:
    def __init__(self, state: ConsoleState, posts: PostRepository, stats: PostStatsRepository) -> None:
        self.state = state
        self.posts = posts
        self.stats = stats

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/posts", self.list_page),
            web.get("/posts/calendar", self.calendar_page),  # before /posts/{post_id}
            web.get("/posts/{post_id}", self.detail_page),
            web.post("/posts/{post_id}/cancel", self.cancel),
        ]

    def _now(self) -> tuple[float, datetime]:
        now = self.state.clock.now()
        return now, datetime.fromtimestamp(now, UTC)

    async def list_page(self, request: web.Request) -> web.Response:
        user = _reader(request)
        wanted = request.query.get("status", "all")
        if wanted not in STATUS_FILTERS:
            raise ConsoleError(400, "bad_field", "筛选条件无效")
        posts = await self.posts.list_posts(status=None if wanted == "all" else PostStatus(wanted))
        counts = await self.stats.delivery_counts(p.id for p in posts)
        now, instant = self._now()
        rows = []
        for post in posts:
            upcoming = upcoming_slots(post, instant, 1)
            total: dict[str, int] = {}
            for per_state in counts.get(post.id, {}).values():
                for state, count in per_state.items():
                    total[state] = total.get(state, 0) + count
            rows.append(ListedPost(post, upcoming[0] if upcoming else None, total))
        return html(
            posts_templates.list_page(
                user,
                request[SESSION].csrf,
                now,
                rows,
                status_filter=wanted,
                writable=_writable(user),
                tz=self.state.timezone,
            )
        )

    async def calendar_page(self, request: web.Request) -> web.Response:
        user = _reader(request)
        now, instant = self._now()
        tz = self.state.timezone
        today = instant.astimezone(tz).date()
        end = datetime.combine(today + timedelta(days=CALENDAR_DAYS), datetime.min.time(), tz)
        entries: dict[int, list[tuple[datetime, PostRecord]]] = {i: [] for i in range(CALENDAR_DAYS)}
        for post in await self.posts.list_posts(status=PostStatus.ACTIVE):
            try:
                slots = slots_between(post.rule, instant, end, limit=CALENDAR_SLOTS_PER_POST)
            except RuleError:
                continue
            for slot in slots:
                index = (slot.astimezone(tz).date() - today).days
                if 0 <= index < CALENDAR_DAYS:
                    entries[index].append((slot, post))
        days = []
        for index in range(CALENDAR_DAYS):
            day = sorted(entries[index], key=lambda e: (e[0], e[1].id))
            shown = day[:CALENDAR_ENTRIES_PER_DAY]
            days.append(CalendarDay(today + timedelta(days=index), shown, len(day) - len(shown)))
        return html(
            posts_templates.calendar_page(user, request[SESSION].csrf, now, days, writable=_writable(user), tz=tz)
        )

    async def detail_page(self, request: web.Request) -> web.Response:
        user = _reader(request)
        post = await self.posts.get_post(parse_id(request.match_info["post_id"]))
        if post is None:
            raise NOT_FOUND
        now, instant = self._now()
        by_target = deliveries_by_target(post, await self.posts.deliveries(post_id=post.id))
        statuses = []
        for target in post.targets:
            rows = by_target.get(target.id, [])
            counts: dict[str, int] = {}
            for row in rows:
                counts[row.state.value] = counts.get(row.state.value, 0) + 1
            statuses.append(TargetStatus(target, counts, rows[-RECENT_DELIVERIES:]))
        return html(
            posts_templates.detail_page(
                user,
                request[SESSION].csrf,
                now,
                post,
                slots=upcoming_slots(post, instant, PREVIEW_SLOTS),
                previews=target_previews(post),
                statuses=statuses,
                writable=_writable(user),
            )
        )

    async def cancel(self, request: web.Request) -> web.Response:
        user = _reader(request)
        if not _writable(user):
            raise ConsoleError(403, "forbidden", "你的角色无权取消推送")
        post_id = parse_id(request.match_info["post_id"])
        body = await read_body(request)
        if body.get("confirm") not in ("yes", True):
            raise ConsoleError(400, "not_confirmed", "请勾选确认后再取消推送")
        post = await self.posts.get_post(post_id)
        if post is None:
            raise NOT_FOUND
        skipped = await cancel_and_audit(self.posts, self.state.audit, post_id, user.username)
        if skipped is None:
            raise NOT_FOUND
        if post.status is PostStatus.ACTIVE:
            message = f"推送 #{post_id} 已取消，{skipped} 条待发送的投递已跳过。"
        else:
            message = f"推送 #{post_id} 此前已取消。"
        return html(
            message_page("推送已取消", message, user=user, csrf=request[SESSION].csrf, back=f"/console/posts/{post_id}")
        )
