"""The scheduled-post delivery engine: `tick(now)` turns due slots into delivery rows and sends them once.

One tick, in order:
1. Materialise: each active post's slots since its watermark (scheduler/slots.py) become `scheduled` rows, one
   per (post, target, slot), inserted with ON CONFLICT DO NOTHING on the idempotency key. A clock that jumps
   back finds the rows already there; one that jumps forward materialises the slots it skipped.
2. Missed: scheduled rows never tried whose slot is older than the grace window become `missed`, and their
   owners are told. Late within the grace window is still sent.
3. Lease: rows left in `sending` longer than the lease (their process died) are retried if no WeCom call had
   started or the channel is idempotent (kf msgid, app duplicate check); a robot or mass-message call that had
   started is marked failed with reason `outcome_unknown`: WeCom's webhook/send and add_msg_template have no
   idempotency key, so at most once beats a double post. The owner is told.
4. Customer-group tasks: pending add_msg_template tasks are polled; confirmed → sent; the confirming member is
   reminded once after a while; past the deadline the delivery fails with reason `unconfirmed`.
5. Send: due rows are claimed atomically (→ `sending` under this tick's token), checked (content limits, the
   audience policy, the channel's quota or rate limit), and sent; the outcome is recorded with its errcode.
   A send held by our own rate limit goes back to `scheduled` for when the window frees (never dropped);
   transient WeCom errors retry with exponential backoff; permanent ones fail and the owner is told.

The audience policy (handlers/audience.py: quiet hours, daily caps, opt-out, de-duplication) is asked through
`AudienceGate`, its facts read from the touch history (`post_touches`: one row per send to one customer or
group) and the subscriptions. A hold with an `until` (quiet hours, a daily cap) puts the delivery back to
`scheduled` at that instant; a hold without one (opted out) or for duplicate content is `skipped`.

Rows are processed in lanes (one per target: a robot, a member, a customer group), lanes concurrently and each
lane in order, so one slow robot does not delay the others and per-target counts (rate windows, the monthly
cap) are read and written by one task at a time. Logs name post, delivery and target kind; never a webhook
key, a token or message content.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import redis.asyncio as redis_asyncio
import structlog

from bot.redis_keys import RedisKeys, secret_fingerprint
from bot.storage.models import DeliveryState, PostStatus, TargetKind
from bot.storage.posts_repository import (
    AT_MOST_ONCE_KINDS,
    DeliveryRecord,
    MassTaskRecord,
    PostRecord,
    PostRepository,
    RobotRecord,
    TargetRecord,
    Touch,
)
from bot.storage.subscription_repository import SubscriptionRepository
from bot.wecom.errors import WeComApiError, WeComError, WeComTransportError
from handlers.audience import (
    AudienceFacts,
    AudienceFactsPort,
    Hold,
    HoldReason,
    ProposedSend,
    QuietHours,
    RecipientKind,
    SendKind,
    check,
    content_fingerprint,
)
from handlers.audience import AudiencePolicy as AudienceRules
from handlers.business_hours import DEFAULT_TIMEZONE
from handlers.post_content import ContentError, Rendered, render
from scheduler.slots import china_month_bounds, slots_between

log = structlog.get_logger(__name__)

ROBOT_PER_MINUTE = 20  # reference §5.3
STAFF_PER_MINUTE = 30  # app messages to one member (reference §5.2); the excess is silently dropped by WeCom
MASS_PER_GROUP_PER_MONTH = 4  # reference §5.4
KF_WINDOW = timedelta(hours=48)
APP_DUPLICATE_CHECK_S = 4 * 3600
KF_WINDOW_ERRCODES = frozenset({95001, 95002, 95018})  # quota, 48 h window, session state: this customer, not now
KF_DUPLICATE_MSGID = 40058  # a retried kf send whose msgid WeCom already accepted
LANE_CONCURRENCY = 16
NOTICE_MAX_B = 2000
_ONE_US = timedelta(microseconds=1)

# KEYS[1] window; ARGV now_ms, window_ms, limit, member. -1: taken; else ms until a place frees.
_SLIDING_WINDOW = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('zremrangebyscore', KEYS[1], '-inf', now - window)
if redis.call('zcard', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('zadd', KEYS[1], now, ARGV[4])
  redis.call('pexpire', KEYS[1], window)
  return -1
end
local oldest = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(0, tonumber(oldest[2]) + window - now)
"""


class SlidingWindowLimiter:
    """At most `limit` events per window per key, shared by every process through Redis (clock injected)."""

    def __init__(self, redis: redis_asyncio.Redis, *, window_s: float = 60.0) -> None:
        self._redis = redis
        self._window_ms = int(window_s * 1000)

    async def take(self, key: str, now: datetime, limit: int) -> float | None:
        """Take a place now (None), or the seconds until one frees (nothing taken)."""
        now_ms = int(now.timestamp() * 1000)
        member = f"{now_ms}:{secrets.token_hex(4)}"
        wait = await self._redis.eval(  # type: ignore[misc]
            _SLIDING_WINDOW, 1, key, str(now_ms), str(self._window_ms), str(limit), member
        )
        wait_ms = int(wait)
        return None if wait_ms < 0 else max(wait_ms, 1) / 1000


class AppApi(Protocol):
    """What the engine needs from the app-secret WeComClient (app messages and 客户联系)."""

    async def message_send(self, payload: Mapping[str, Any]) -> dict[str, Any]: ...

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        retry_uncertain: bool = True,
    ) -> dict[str, Any]: ...

    async def get_groupmsg_task(
        self, msgid: str, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]: ...

    async def get_groupmsg_send_result(
        self, msgid: str, userid: str, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]: ...


class KfApi(Protocol):
    async def kf_send_msg(
        self, touser: str, open_kfid: str, msgtype: str, content: Mapping[str, Any], msgid: str | None = None
    ) -> dict[str, Any]: ...


class RobotApi(Protocol):
    async def send(self, key: str, payload: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class AudienceDecision:
    """The audience policy's answer for one send: allow, or hold it back with a reason.

    A hold with `until` (quiet hours, a daily cap) is tried again then; one without (opted out, duplicate
    content) is recorded as skipped.
    """

    allow: bool
    reason: str | None = None
    until: datetime | None = None


ALLOW = AudienceDecision(True)
AudiencePolicy = Callable[[PostRecord, TargetRecord, "str | None", datetime], Awaitable[AudienceDecision]]


async def allow_everything(
    _post: PostRecord, _target: TargetRecord, _recipient: str | None, _now: datetime
) -> AudienceDecision:
    """No audience rules (tests of the channels; staff-only deployments). Production passes an AudienceGate."""
    return ALLOW


# ---- the audience policy over the delivery history ---------------------------------------------------------------


def send_kind(post: PostRecord) -> SendKind:
    """Marketing unless the post says `content.send_kind = "transactional"` (order and service notices)."""
    transactional = post.content.get("send_kind") == SendKind.TRANSACTIONAL.value
    return SendKind.TRANSACTIONAL if transactional else SendKind.MARKETING


def post_fingerprint(post: PostRecord) -> str:
    """The content's fingerprint: equal text (after normalisation) from two posts or plans is the same content."""
    content = post.content
    if post.kind in ("text", "markdown"):
        parts = [str(content.get(post.kind) or "")]
    elif post.kind == "link":
        parts = [str(content.get("title") or ""), str(content.get("url") or "")]
    elif post.kind == "news":
        articles = [a for a in content.get("articles") or [] if isinstance(a, Mapping)]
        parts = [f"{a.get('title') or ''} {a.get('url') or ''}" for a in articles]
    else:  # image, file: what identifies the media
        parts = [str(content.get(key) or "") for key in ("pic_url", "md5", "media_id")]
    return content_fingerprint(*parts)


def audience_recipient(target: TargetRecord, recipient: str | None) -> tuple[RecipientKind, str, str] | None:
    """(kind, id, timezone) of whom a send reaches, or None for staff (not customer-facing: no audience rules).

    Customers are keyed by external_userid (one person across kf and 客户联系), groups by `robot:{name}` or the
    customer group's chat_id; a group's timezone may be set as the target's `timezone` param.
    """
    timezone = str(target.params.get("timezone") or DEFAULT_TIMEZONE)
    if target.kind is TargetKind.STAFF:
        return None
    if recipient is not None:
        return RecipientKind.CUSTOMER, recipient, DEFAULT_TIMEZONE
    if target.kind is TargetKind.ROBOT:
        return RecipientKind.GROUP, f"robot:{target.ref}", timezone
    if target.kind is TargetKind.GROUP_CHAT:
        return RecipientKind.GROUP, target.ref, timezone
    return None  # a segment is decided per customer


def audience_rules(
    *, quiet_hours: str, customer_daily_cap: int, group_daily_cap: int, dedupe_window_s: float
) -> AudienceRules:
    """The policy from settings, where "" (quiet hours) and 0 (caps, window) switch a rule off."""
    return AudienceRules(
        quiet_hours=QuietHours.parse(quiet_hours) if quiet_hours.strip() else None,
        customer_daily_cap=customer_daily_cap or None,
        group_daily_cap=group_daily_cap or None,
        dedupe_window_s=dedupe_window_s or None,
    )


class DeliveryAudienceFacts:
    """`AudienceFactsPort` over the touch history of deliveries and the customers' subscriptions."""

    def __init__(self, repo: PostRepository, subscriptions: SubscriptionRepository | None) -> None:
        self._repo = repo
        self._subscriptions = subscriptions

    async def facts(self, send: ProposedSend, day_start: float, day_end: float, dedupe_since: float) -> AudienceFacts:
        kind = send.recipient_kind.value
        customer = send.recipient_kind is RecipientKind.CUSTOMER
        if customer and self._subscriptions is not None and send.recipient_id in (
            await self._subscriptions.opted_out_external_ids([send.recipient_id])
        ):
            return AudienceFacts(opted_out=True)  # the first rule: nothing else to read
        today = await self._repo.count_touches(kind, send.recipient_id, tick_now(day_start), tick_now(day_end))
        recent: dict[str, float] = {}
        if customer:
            since = await self._repo.recent_fingerprints(kind, send.recipient_id, tick_now(dedupe_since))
            recent = {fingerprint: at.timestamp() for fingerprint, at in since.items()}
        return AudienceFacts(sends_today=today, opted_out=False, recent=recent)


class AudienceGate:
    """The engine's audience hook: handlers.audience's pure policy, with its facts read through a port."""

    def __init__(self, rules: AudienceRules, port: AudienceFactsPort) -> None:
        self.rules = rules
        self._port = port

    async def __call__(
        self, post: PostRecord, target: TargetRecord, recipient: str | None, now: datetime
    ) -> AudienceDecision:
        who = audience_recipient(target, recipient)
        if who is None:
            return ALLOW
        kind, recipient_id, timezone = who
        send = ProposedSend(
            recipient_id=recipient_id,
            recipient_kind=kind,
            fingerprint=post_fingerprint(post),
            kind=send_kind(post),
            channel=target.kind.value,
            timezone=timezone,
        )
        decision = await check(self.rules, self._port, send, now.timestamp())
        if not isinstance(decision, Hold):
            return ALLOW
        until = None if decision.until is None else tick_now(decision.until)
        return AudienceDecision(False, decision.reason.value, until)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    grace: timedelta = timedelta(minutes=15)
    lease: timedelta = timedelta(minutes=2)
    max_attempts: int = 5
    retry_base: timedelta = timedelta(seconds=30)
    retry_cap: timedelta = timedelta(minutes=15)
    claim_batch: int = 500
    robot_per_minute: int = ROBOT_PER_MINUTE
    staff_per_minute: int = STAFF_PER_MINUTE
    mass_per_month: int = MASS_PER_GROUP_PER_MONTH
    mass_poll_interval: timedelta = timedelta(minutes=1)
    mass_remind_after: timedelta = timedelta(hours=4)
    mass_deadline: timedelta = timedelta(hours=24)
    agent_id: int | None = None
    # An audience hold (quiet hours, a daily cap) that would send later than this after the slot: skipped instead.
    audience_max_hold: timedelta = timedelta(days=3)


@dataclass(slots=True)
class TickReport:
    materialised: int = 0
    missed: int = 0
    reclaimed: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    held: int = 0
    retrying: int = 0
    awaiting_confirmation: int = 0
    confirmed: int = 0
    unconfirmed: int = 0
    reminded: int = 0
    notices: int = 0

    def busy(self) -> bool:
        return any(getattr(self, name) for name in self.__slots__)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one claimed delivery ends this tick."""

    state: DeliveryState
    reason: str | None = None
    errcode: int | None = None
    errmsg: str | None = None
    retry_at: datetime | None = None
    held: bool = False
    detail: Mapping[str, Any] | None = None
    task_msgid: str | None = None
    notify: str | None = None  # a line for the post's owner


@dataclass(slots=True)
class _Tick:
    now: datetime
    token: str
    report: TickReport = field(default_factory=TickReport)
    notices: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    robots: dict[str, RobotRecord | None] = field(default_factory=dict)
    called: set[int] = field(default_factory=set)  # deliveries whose WeCom call started in this tick
    # One customer at a time across lanes: decide, send and record the touch (caps and de-dup read the touches).
    recipients: dict[str, asyncio.Lock] = field(default_factory=dict)


class PostDeliveryEngine:
    """Delivers scheduled posts; `tick(now)` is the whole job (the scheduler calls it on the leader only)."""

    def __init__(
        self,
        repo: PostRepository,
        *,
        app: AppApi,
        kf: KfApi,
        robot: RobotApi,
        redis: redis_asyncio.Redis,
        keys: RedisKeys,
        config: DeliveryConfig | None = None,
        audience: AudiencePolicy = allow_everything,
    ) -> None:
        self.repo = repo
        self._app = app
        self._kf = kf
        self._robot = robot
        self._keys = keys
        self._limiter = SlidingWindowLimiter(redis)
        self.config = config or DeliveryConfig()
        self._audience_policy = audience

    # ---- the tick -----------------------------------------------------------------------------------------

    async def tick(self, now: datetime) -> TickReport:
        """One pass at `now` (aware): materialise, mark missed, reclaim, poll tasks, claim and send."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        tick = _Tick(now=now.astimezone(UTC), token=secrets.token_hex(8))
        await self._materialise(tick)
        await self._mark_missed(tick)
        await self._reclaim(tick)
        await self._poll_mass_tasks(tick)
        await self._send_due(tick)
        await self._flush_notices(tick)
        if tick.report.busy():
            log.info("posts.tick", **{name: getattr(tick.report, name) for name in TickReport.__slots__})  # type: ignore[attr-defined]
        return tick.report

    async def _materialise(self, tick: _Tick) -> None:
        until = tick.now + _ONE_US  # a slot at exactly `now` is due now
        for post in await self.repo.schedulable_posts(until):
            since = post.materialised_until or post.created_at
            if since >= until or not post.targets:
                continue
            slots = slots_between(post.rule, since, until)
            if not slots:
                continue
            # A window cut short at the slot limit resumes after its last slot on the next tick.
            end = until if len(slots) < 1000 else slots[-1] + _ONE_US
            tick.report.materialised += await self.repo.materialise(post, slots, end, tick.now)

    async def _mark_missed(self, tick: _Tick) -> None:
        missed = await self.repo.mark_missed(tick.now - self.config.grace, tick.now)
        if not missed:
            return
        tick.report.missed += len(missed)
        posts = await self.repo.posts_by_id(d.post_id for d in missed)
        for delivery in missed:
            post = posts.get(delivery.post_id)
            log.warning(
                "posts.delivery.missed",
                delivery_id=delivery.id,
                post_id=delivery.post_id,
                target_kind=delivery.target_kind.value,
                slot_at=delivery.slot_at.isoformat(),
            )
            if post is not None:
                tick.notices[post.owner].append(
                    f"错过：「{post.title}」原定 {_local(delivery.slot_at)} 发送（{_target_label(post, delivery)}），"
                    f"超过 {int(self.config.grace.total_seconds() // 60)} 分钟宽限期未发出，已标记为错过。"
                )

    async def _reclaim(self, tick: _Tick) -> None:
        retried, failed = await self.repo.reclaim_expired(tick.now - self.config.lease, tick.now)
        tick.report.reclaimed += retried
        if retried:
            log.warning("posts.delivery.lease_expired", retried=retried)
        if not failed:
            return
        tick.report.failed += len(failed)
        posts = await self.repo.posts_by_id(d.post_id for d in failed)
        for delivery in failed:
            log.warning(
                "posts.delivery.outcome_unknown",
                delivery_id=delivery.id,
                post_id=delivery.post_id,
                target_kind=delivery.target_kind.value,
            )
            post = posts.get(delivery.post_id)
            if post is not None:
                tick.notices[post.owner].append(
                    f"未确认：「{post.title}」（{_target_label(post, delivery)}）发送过程中断，无法确认是否已发出；"
                    "为避免重复发送，不再重试，请到群内核实。"
                )

    # ---- sending ------------------------------------------------------------------------------------------

    async def _send_due(self, tick: _Tick) -> None:
        claimed = await self.repo.claim_due(tick.now, tick.token, limit=self.config.claim_batch)
        if not claimed:
            return
        posts = await self.repo.posts_by_id(d.post_id for d in claimed)
        # One lane per channel subject (a robot, a member, a customer group, a segment), whichever post it is for.
        lanes: dict[tuple[str, str], list[DeliveryRecord]] = defaultdict(list)
        for delivery in claimed:
            post = posts.get(delivery.post_id)
            target = next((t for t in post.targets if t.id == delivery.target_id), None) if post else None
            ref = target.ref if target is not None else f"#{delivery.target_id}"
            lanes[(delivery.target_kind.value, ref)].append(delivery)
        slots = asyncio.Semaphore(LANE_CONCURRENCY)

        async def run_lane(deliveries: list[DeliveryRecord]) -> None:
            async with slots:
                for delivery in deliveries:
                    await self._deliver(tick, delivery, posts.get(delivery.post_id))

        await asyncio.gather(*(run_lane(lane) for lane in lanes.values()))

    async def _deliver(self, tick: _Tick, delivery: DeliveryRecord, post: PostRecord | None) -> None:
        target = next((t for t in post.targets if t.id == delivery.target_id), None) if post else None
        outcome: Outcome | None
        try:
            if post is None or target is None:
                outcome = Outcome(DeliveryState.FAILED, reason="post_not_found")
            elif post.status is PostStatus.CANCELLED:
                outcome = Outcome(DeliveryState.SKIPPED, reason="cancelled")
            else:
                outcome = await self._attempt(tick, delivery, post, target)
        except Exception as exc:  # a bug or an unreachable database/Redis
            log.exception("posts.delivery.error", delivery_id=delivery.id, post_id=delivery.post_id)
            if delivery.id in tick.called and delivery.target_kind.value in AT_MOST_ONCE_KINDS:
                outcome = Outcome(DeliveryState.FAILED, reason="outcome_unknown", errmsg=type(exc).__name__)
            else:
                attempted = delivery.id in tick.called
                outcome = self._retry(tick, delivery, "internal_error", None, type(exc).__name__, attempted=attempted)
        if outcome is None:
            return  # the claim was lost to a reclaim: whoever holds the row now decides
        await self._record(tick, delivery, post, outcome)

    async def _attempt(
        self, tick: _Tick, delivery: DeliveryRecord, post: PostRecord, target: TargetRecord
    ) -> Outcome | None:
        try:
            rendered = render(post.kind, post.content, target.kind.value)
        except ContentError as exc:
            return Outcome(
                DeliveryState.FAILED, reason="content_invalid", errmsg=str(exc), notify=f"内容不符合限制：{exc}"
            )
        if target.kind is TargetKind.SEGMENT:
            return await self._send_segment(tick, delivery, post, target, rendered)
        decision = await self._audience(post, target, None, tick.now)
        if not decision.allow:
            return self._audience_hold(tick, delivery, decision)
        if target.kind is TargetKind.ROBOT:
            outcome = await self._send_robot(tick, delivery, target, rendered)
            if outcome is not None and outcome.state is DeliveryState.SENT:
                await self._touch(delivery, post, target, None, tick.now)
            return outcome
        if target.kind is TargetKind.GROUP_CHAT:
            outcome = await self._send_mass(tick, delivery, post, target, rendered)
            if outcome is not None and outcome.state is DeliveryState.SENDING:
                await self._touch(delivery, post, target, None, tick.now)  # counted when the task is created
            return outcome
        return await self._send_staff(tick, delivery, target, rendered)

    def _audience_hold(self, tick: _Tick, delivery: DeliveryRecord, decision: AudienceDecision) -> Outcome:
        """A held robot, group or staff delivery: back to `scheduled` at `until`, or skipped with the reason."""
        reason = decision.reason or "audience_policy"
        if self._holds_until(delivery, decision) is None:
            return Outcome(DeliveryState.SKIPPED, reason=reason)
        tick.report.held += 1
        deferred = dict(delivery.detail.get("deferred") or {})
        deferred[reason] = int(deferred.get(reason, 0)) + 1
        return Outcome(
            DeliveryState.SCHEDULED,
            reason=reason,
            retry_at=decision.until,
            held=True,
            detail={**delivery.detail, "deferred": deferred},
        )

    def _holds_until(self, delivery: DeliveryRecord, decision: AudienceDecision) -> datetime | None:
        """When a held send is tried again; None: not at all (no `until`, or later than the longest hold)."""
        if decision.until is None or decision.reason == HoldReason.DUPLICATE_CONTENT.value:
            return None
        if decision.until - delivery.slot_at > self.config.audience_max_hold:
            return None
        return decision.until

    async def _touch(
        self, delivery: DeliveryRecord, post: PostRecord, target: TargetRecord, recipient: str | None, now: datetime
    ) -> None:
        """Record a send in the audience history; best effort (a send is not failed for its bookkeeping)."""
        who = audience_recipient(target, recipient)
        if who is None:
            return
        kind, recipient_id, _timezone = who
        touch = Touch(kind.value, recipient_id, post_fingerprint(post), send_kind(post) is SendKind.MARKETING)
        try:
            await self.repo.record_touches(delivery.id, [touch], now)
        except Exception:
            log.exception("posts.touch.not_recorded", delivery_id=delivery.id, post_id=delivery.post_id)

    async def _audience(
        self, post: PostRecord, target: TargetRecord, recipient: str | None, now: datetime
    ) -> AudienceDecision:
        """The one place the audience policy (quiet hours, caps, opt-out, de-dup) decides about a send.

        Called per delivery for groups, robots and staff, and per customer for segments; a hold is recorded
        as `skipped` with its reason (per customer in the row's detail for segments).
        """
        return await self._audience_policy(post, target, recipient, now)

    async def _begin(self, tick: _Tick, delivery: DeliveryRecord) -> bool:
        """Record that the WeCom call starts (a reclaim then knows it may have happened); False: claim lost."""
        if not await self.repo.begin_call(delivery.id, tick.token, tick.now):
            return False
        tick.called.add(delivery.id)
        return True

    async def _robot_for(self, tick: _Tick, name: str) -> RobotRecord | None:
        if name not in tick.robots:
            tick.robots[name] = await self.repo.get_robot(name)
        return tick.robots[name]

    async def _send_robot(
        self, tick: _Tick, delivery: DeliveryRecord, target: TargetRecord, rendered: Rendered
    ) -> Outcome | None:
        robot = await self._robot_for(tick, target.ref)
        if robot is None:
            return Outcome(
                DeliveryState.FAILED, reason="unknown_robot", notify=f"群机器人「{target.ref}」未登记或已删除"
            )
        rate_key = self._keys.post_rate("robot", secret_fingerprint(robot.webhook_key))
        wait = await self._limiter.take(rate_key, tick.now, self.config.robot_per_minute)
        if wait is not None:
            return self._hold(tick, "robot_rate_limit", wait)
        if not await self._begin(tick, delivery):
            return None
        try:
            await self._robot.send(robot.webhook_key, {"msgtype": rendered.msgtype, rendered.msgtype: rendered.body})
        except WeComApiError as exc:
            return self._api_failure(tick, delivery, exc)
        except WeComTransportError as exc:
            return self._transport_failure(
                tick, delivery, exc, "群机器人无应答，无法确认是否已发出；为避免重复发送，不再重试，请到群内核实"
            )
        return Outcome(DeliveryState.SENT)

    async def _send_staff(
        self, tick: _Tick, delivery: DeliveryRecord, target: TargetRecord, rendered: Rendered
    ) -> Outcome | None:
        wait = await self._limiter.take(
            self._keys.post_rate("staff", target.ref), tick.now, self.config.staff_per_minute
        )
        if wait is not None:
            return self._hold(tick, "member_rate_limit", wait)
        if not await self._begin(tick, delivery):
            return None
        payload: dict[str, Any] = {
            "touser": target.ref,
            "agentid": self.config.agent_id or 0,
            "msgtype": rendered.msgtype,
            rendered.msgtype: rendered.body,
        }
        if delivery.attempts > 0:
            # A retry may follow a send WeCom did accept: its content-based duplicate check drops the copy.
            payload.update(enable_duplicate_check=1, duplicate_check_interval=APP_DUPLICATE_CHECK_S)
        try:
            response = await self._app.message_send(payload)
        except WeComApiError as exc:
            return self._api_failure(tick, delivery, exc)
        except WeComTransportError as exc:
            return self._retry(tick, delivery, "transport_error", None, exc.reason)
        if target.ref in str(response.get("invaliduser") or "").split("|"):
            return Outcome(
                DeliveryState.FAILED, reason="invalid_user", notify=f"成员「{target.ref}」无效或不在应用可见范围"
            )
        return Outcome(DeliveryState.SENT)

    async def _send_mass(
        self, tick: _Tick, delivery: DeliveryRecord, post: PostRecord, target: TargetRecord, rendered: Rendered
    ) -> Outcome | None:
        chat_id = target.ref
        sender = str(target.params.get("sender") or post.owner)
        start, end = china_month_bounds(tick.now)
        used = await self.repo.count_mass_tasks(chat_id, start, end)
        if used >= self.config.mass_per_month:
            return Outcome(
                DeliveryState.SKIPPED,
                reason="monthly_cap",
                detail={"used_this_month": used},
                notify=(
                    f"客户群 {chat_id} 本月已有 {used} 次企业群发，"
                    f"达到每月 {self.config.mass_per_month} 次上限，本次未发送"
                ),
            )
        if not await self._begin(tick, delivery):
            return None
        body = {"chat_type": "group", "sender": sender, "chat_id_list": [chat_id], **rendered.body}
        try:
            # No client-side retry after a timeout: a second call could create a second task (and use the cap).
            response = await self._app.call(
                "POST", "/cgi-bin/externalcontact/add_msg_template", body=body, retry_uncertain=False
            )
        except WeComApiError as exc:
            return self._api_failure(tick, delivery, exc)
        except WeComTransportError as exc:
            return self._transport_failure(
                tick, delivery, exc, "创建企业群发无应答，无法确认任务是否已创建；为避免重复群发，不再重试"
            )
        msgid = str(response.get("msgid") or "")
        if chat_id in [str(c) for c in response.get("fail_list") or []] or not msgid:
            return Outcome(
                DeliveryState.FAILED,
                reason="refused_by_wecom",
                notify=f"企业微信拒绝向客户群 {chat_id} 群发（可能不是 {sender} 的群，或本月次数已满）",
            )
        if not await self.repo.record_mass_task(
            delivery.id, tick.token, msgid=msgid, chat_id=chat_id, sender=sender, now=tick.now
        ):
            return None
        await self._notify_member(tick, sender, f"请在企业微信客户端确认群发任务：「{post.title}」（客户群 {chat_id}）")
        return Outcome(DeliveryState.SENDING, reason="awaiting_confirmation", task_msgid=msgid)

    async def _send_segment(
        self, tick: _Tick, delivery: DeliveryRecord, post: PostRecord, target: TargetRecord, rendered: Rendered
    ) -> Outcome | None:
        """Each kf customer of the segment inside their 48 h window, one by one through the audience policy.

        A customer this delivery reached before (an earlier attempt, or before a hold) is not sent to again.
        Customers held until later (quiet hours, a daily cap) keep the row `scheduled` for the earliest of them;
        the others held (opted out, duplicate content) are counted in `detail.held` by reason.
        """
        tags = [t for t in target.ref.split(",") if t]
        recipients, outside = await self.repo.kf_segment(tags, tick.now - KF_WINDOW)
        done = await self.repo.touched_by(delivery.id) if delivery.attempts or delivery.holds else set()
        deferred: dict[str, int] = dict(delivery.detail.get("deferred") or {})
        detail: dict[str, Any] = {"sent": len(done), "outside_48h_window": outside, "held": {}, "refused": 0}
        if deferred:
            detail["deferred"] = deferred
        if not recipients and not done:
            return Outcome(DeliveryState.SKIPPED, reason="no_customer_in_48h_window", detail=detail)
        begun = False
        transient: WeComError | None = None
        permanent: WeComApiError | None = None
        retry_at: datetime | None = None
        retry_reason: str | None = None
        for external_userid, open_kfid in recipients:
            if external_userid in done:
                continue
            async with tick.recipients.setdefault(external_userid, asyncio.Lock()):
                decision = await self._audience(post, target, external_userid, tick.now)
                if not decision.allow:
                    reason = decision.reason or "audience_policy"
                    until = self._holds_until(delivery, decision)
                    if until is None:
                        detail["held"][reason] = detail["held"].get(reason, 0) + 1
                    else:
                        deferred[reason] = deferred.get(reason, 0) + 1
                        detail["deferred"] = deferred
                        if retry_at is None or until < retry_at:
                            retry_at, retry_reason = until, reason
                    continue
                if not begun:
                    if not await self._begin(tick, delivery):
                        return None
                    begun = True
                # kf msgid: ≤ 32 chars, unique per account; the same for a retry, so WeCom refuses a second copy.
                msgid = hashlib.sha256(f"{delivery.idempotency_key}:{external_userid}".encode()).hexdigest()[:32]
                try:
                    await self._kf.kf_send_msg(
                        external_userid, open_kfid, rendered.msgtype, rendered.body, msgid=msgid
                    )
                    sent = True
                except WeComApiError as exc:
                    sent = exc.errcode == KF_DUPLICATE_MSGID and delivery.attempts > 0  # an earlier attempt's
                    if not sent and exc.errcode in KF_WINDOW_ERRCODES:
                        detail["refused"] += 1
                    elif not sent and exc.retryable:
                        transient = exc
                    elif not sent:
                        permanent = exc
                        detail["refused"] += 1
                except WeComTransportError as exc:
                    sent = False
                    transient = exc
                if sent:
                    detail["sent"] += 1
                    await self._touch(delivery, post, target, external_userid, tick.now)
        if transient is not None:
            errcode = transient.errcode if isinstance(transient, WeComApiError) else None
            return self._retry(tick, delivery, "transient_error", errcode, str(transient), detail=detail)
        if retry_at is not None:
            tick.report.held += 1
            return Outcome(DeliveryState.SCHEDULED, reason=retry_reason, retry_at=retry_at, held=True, detail=detail)
        if detail["sent"]:
            return Outcome(DeliveryState.SENT, detail=detail)
        if permanent is not None:
            return Outcome(
                DeliveryState.FAILED,
                reason="wecom_error",
                errcode=permanent.errcode,
                errmsg=permanent.errmsg,
                detail=detail,
            )
        held: dict[str, int] = detail["held"]
        reason = next(iter(held)) if len(held) == 1 else "held_back" if held else "no_recipient"
        return Outcome(DeliveryState.SKIPPED, reason=reason, detail=detail)

    # ---- outcomes -----------------------------------------------------------------------------------------

    def _transport_failure(
        self, tick: _Tick, delivery: DeliveryRecord, exc: WeComTransportError, notify: str
    ) -> Outcome:
        """A call that never reached WeCom is retried; one that may have (no idempotency) fails, owner told."""
        if _never_sent(exc):
            return self._retry(tick, delivery, "transport_error", None, exc.reason)
        return Outcome(DeliveryState.FAILED, reason="outcome_unknown", errmsg=exc.reason, notify=notify)

    def _hold(self, tick: _Tick, reason: str, wait_s: float) -> Outcome:
        tick.report.held += 1
        return Outcome(DeliveryState.SCHEDULED, reason=reason, retry_at=tick.now + timedelta(seconds=wait_s), held=True)

    def _api_failure(self, tick: _Tick, delivery: DeliveryRecord, exc: WeComApiError) -> Outcome:
        if exc.retryable:
            return self._retry(tick, delivery, "transient_error", exc.errcode, exc.errmsg)
        return Outcome(
            DeliveryState.FAILED,
            reason="wecom_error",
            errcode=exc.errcode,
            errmsg=exc.errmsg,
            notify=f"企业微信返回错误 {exc.errcode}",
        )

    def _retry(
        self,
        tick: _Tick,
        delivery: DeliveryRecord,
        reason: str,
        errcode: int | None,
        errmsg: str,
        *,
        attempted: bool = True,
        detail: Mapping[str, Any] | None = None,
    ) -> Outcome:
        attempts = delivery.attempts + (1 if attempted else 0)
        if attempts >= self.config.max_attempts:
            return Outcome(
                DeliveryState.FAILED,
                reason="retries_exhausted",
                errcode=errcode,
                errmsg=errmsg,
                detail=detail,
                notify=f"重试 {attempts} 次仍失败" + (f"（错误码 {errcode}）" if errcode is not None else ""),
            )
        delay = min(self.config.retry_cap, self.config.retry_base * (2 ** max(attempts - 1, 0)))
        return Outcome(
            DeliveryState.SCHEDULED,
            reason=reason,
            errcode=errcode,
            errmsg=errmsg,
            retry_at=tick.now + delay,
            detail=detail,
        )

    async def _record(self, tick: _Tick, delivery: DeliveryRecord, post: PostRecord | None, outcome: Outcome) -> None:
        recorded = await self.repo.finish(
            delivery.id,
            tick.token,
            outcome.state,
            tick.now,
            errcode=outcome.errcode,
            errmsg=outcome.errmsg,
            reason=outcome.reason,
            next_attempt_at=outcome.retry_at,
            held=outcome.held,
            detail=outcome.detail,
            task_msgid=outcome.task_msgid,
        )
        if not recorded:
            log.warning("posts.delivery.claim_lost", delivery_id=delivery.id)
            return
        report = tick.report
        if outcome.state is DeliveryState.SENT:
            report.sent += 1
        elif outcome.state is DeliveryState.FAILED:
            report.failed += 1
        elif outcome.state is DeliveryState.SKIPPED:
            report.skipped += 1
        elif outcome.state is DeliveryState.SENDING:
            report.awaiting_confirmation += 1
        elif not outcome.held:
            report.retrying += 1
        level = log.warning if outcome.state in (DeliveryState.FAILED, DeliveryState.SKIPPED) else log.info
        level(
            "posts.delivery",
            delivery_id=delivery.id,
            post_id=delivery.post_id,
            target_kind=delivery.target_kind.value,
            state=outcome.state.value,
            reason=outcome.reason,
            errcode=outcome.errcode,
        )
        if outcome.notify and post is not None:
            tick.notices[post.owner].append(f"「{post.title}」（{_target_label(post, delivery)}）：{outcome.notify}")

    # ---- customer-group tasks ------------------------------------------------------------------------------

    async def _poll_mass_tasks(self, tick: _Tick) -> None:
        tasks = await self.repo.mass_tasks_to_check(tick.now - self.config.mass_poll_interval)
        if not tasks:
            return
        deliveries = {t.delivery_id: await self.repo.get_delivery(t.delivery_id) for t in tasks}
        posts = await self.repo.posts_by_id(d.post_id for d in deliveries.values() if d is not None)
        for task in tasks:
            delivery = deliveries.get(task.delivery_id)
            post = posts.get(delivery.post_id) if delivery is not None else None
            try:
                status = await self._task_status(task)
            except WeComError as exc:
                log.warning("posts.mass_task.poll_failed", task_id=task.id, error=type(exc).__name__)
                status = None
            if status == "sent":
                if await self.repo.close_task(task, True, tick.now):
                    tick.report.confirmed += 1
                    tick.report.sent += 1
                    log.info("posts.mass_task.confirmed", task_id=task.id, delivery_id=task.delivery_id)
                continue
            age = tick.now - task.created_at
            if age >= self.config.mass_deadline:
                if await self.repo.close_task(task, False, tick.now):
                    tick.report.unconfirmed += 1
                    tick.report.failed += 1
                    log.warning("posts.mass_task.unconfirmed", task_id=task.id, delivery_id=task.delivery_id)
                    if post is not None:
                        tick.notices[post.owner].append(
                            f"群发未确认：「{post.title}」（客户群 {task.chat_id}）的群发任务 "
                            f"{int(self.config.mass_deadline.total_seconds() // 3600)} 小时内"
                            f"未被 {task.sender} 确认，已标记为失败。"
                        )
                continue
            remind = age >= self.config.mass_remind_after and task.reminded_at is None
            if await self.repo.task_checked(task.id, tick.now, reminded=remind) and remind:
                tick.report.reminded += 1
                title = post.title if post is not None else "定时群发"
                await self._notify_member(
                    tick,
                    task.sender,
                    f"提醒：群发任务「{title}」（客户群 {task.chat_id}）还未确认，请在企业微信客户端确认发送。",
                )

    async def _task_status(self, task: MassTaskRecord) -> str:
        """sent | pending, from the task list (the member sent it) and the per-group send result."""
        listing = await self._app.get_groupmsg_task(task.msgid)
        mine = [t for t in listing.get("task_list") or [] if isinstance(t, dict) and t.get("userid") == task.sender]
        if not mine or int(mine[0].get("status", 0)) != 2:
            return "pending"
        result = await self._app.get_groupmsg_send_result(task.msgid, task.sender)
        for entry in result.get("send_list") or []:
            if isinstance(entry, dict) and entry.get("chat_id") == task.chat_id and int(entry.get("status", 0)) == 1:
                return "sent"
        return "pending"

    # ---- notices to owners ---------------------------------------------------------------------------------

    async def _notify_member(self, tick: _Tick, userid: str, text: str) -> None:
        """An app text message to a member, within their per-minute budget; best effort (logged if not sent)."""
        if not userid:
            return
        wait = await self._limiter.take(self._keys.post_rate("staff", userid), tick.now, self.config.staff_per_minute)
        if wait is not None:
            log.warning("posts.notice.rate_limited", wait_s=round(wait, 1))
            return
        payload = {
            "touser": userid,
            "agentid": self.config.agent_id or 0,
            "msgtype": "text",
            "text": {"content": _clip(text, NOTICE_MAX_B)},
        }
        try:
            await self._app.message_send(payload)
            tick.report.notices += 1
        except WeComError as exc:
            log.warning("posts.notice.failed", error=type(exc).__name__, errcode=getattr(exc, "errcode", None))

    async def _flush_notices(self, tick: _Tick) -> None:
        for owner, lines in tick.notices.items():
            text = "定时内容发送提醒：\n" + "\n".join(f"- {line}" for line in lines)
            await self._notify_member(tick, owner, text)


def _never_sent(exc: WeComTransportError) -> bool:
    """A connection that was never made: WeCom cannot have acted, so a retry cannot double-post."""
    return exc.reason.startswith(("ClientConnectorError", "ClientConnectorDNSError"))


def _local(instant: datetime) -> str:
    from scheduler.slots import zone

    return instant.astimezone(zone("Asia/Shanghai")).strftime("%m-%d %H:%M")


def _target_label(post: PostRecord, delivery: DeliveryRecord) -> str:
    target = next((t for t in post.targets if t.id == delivery.target_id), None)
    if target is None:
        return delivery.target_kind.value
    names = {"robot": "群机器人", "group_chat": "客户群", "segment": "客户分群", "staff": "成员"}
    return f"{names.get(target.kind.value, target.kind.value)} {target.ref}"


def _clip(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", errors="ignore") + "…"


def tick_now(seconds: float) -> datetime:
    """A clock reading (epoch seconds) as the aware UTC instant `tick` takes."""
    return datetime.fromtimestamp(seconds, UTC)


__all__: Sequence[str] = (
    "ALLOW",
    "AudienceDecision",
    "AudienceGate",
    "DeliveryAudienceFacts",
    "DeliveryConfig",
    "PostDeliveryEngine",
    "SlidingWindowLimiter",
    "TickReport",
    "allow_everything",
    "audience_recipient",
    "audience_rules",
    "post_fingerprint",
    "send_kind",
    "tick_now",
)
