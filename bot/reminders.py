"""Reminders as scheduled posts: the daily digest to team leads, churn-recall and repurchase touches, and staff
follow-up tasks (issue 5 item 6). The decisions are pure (handlers/reminders.py); this module reads the facts
(customers, orders, tags, SLA events, the queue, yesterday's deliveries) and creates one-off posts through
`PostRepository`, so the delivery engine (bot/post_delivery.py) sends them with all its rules: claims,
retries, rate limits, the 48 h window of 微信客服 and the audience policy.

Targets: there is no single-customer target kind. A customer touch is one post per rule and day aimed at the
customer segment of a marker tag, `reminder:{rule}:{YYYY-MM-DD}`, put (as a bot tag) on exactly the customers
it is for, on every kf and 客户联系 row of each person. The marker tags are also the touch history the cooldowns
read. Only 微信客服 customers inside their 48 h window are reached (the engine's segment channel).

Idempotent: each post's title is its key (`reminder:{rule}:{date}[:{subject}]`) and is looked up before one is
created; marker tags are inserted with ON CONFLICT DO NOTHING; a customer marked today is no longer due today.
A rerun the same day therefore creates nothing twice. The job runs on the scheduling leader only, so two
instances do not race the look-up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.storage.models import (
    Conversation,
    ConversationStatus,
    Customer,
    CustomerTag,
    DeliveryState,
    Order,
    Post,
    PostDelivery,
    SlaEventRow,
    StaffRole,
    StaffUser,
    TargetKind,
)
from bot.storage.posts_repository import NewTarget, PostRecord, PostRepository
from bot.storage.repositories import _insert
from bot.storage.tags_repository import TAGGED_CHANNELS
from handlers.domain import Clock, SystemClock
from handlers.post_content import ContentError, render
from handlers.reminders import (
    RECALL_TAGS,
    CustomerFacts,
    DigestFigures,
    Lead,
    ReminderConfig,
    ReminderInputError,
    ReminderRule,
    check_follow_up,
    day_bounds,
    digest_text,
    due_for_recall,
    due_for_repurchase,
    follow_up_text,
    leads_to_tell,
    local_date,
    marker_prefix,
    reminder_key,
    send_at,
)
from handlers.sla import ClockKind, SlaEventKind
from handlers.tags import TagSource
from scheduler.slots import Rule, RuleError, validate_rule, zone

log = structlog.get_logger(__name__)

MAX_TITLE_CHARS = 200
DEFAULT_OWNER = "reminders"  # told about failures when no REMINDERS_OWNER and no lead with a userid exists


@dataclass(frozen=True, slots=True)
class TouchResult:
    rule: ReminderRule
    due: tuple[str, ...] = ()  # external ids marked for today's touch by this run
    post: PostRecord | None = None  # the post created by this run (None: none was needed, or it existed)
    skipped: str | None = None  # why nothing was created (no_customer_due, already_sent)


@dataclass(frozen=True, slots=True)
class ReminderReport:
    day: date
    digests: tuple[PostRecord, ...] = ()
    touches: tuple[TouchResult, ...] = ()
    birthday: str = "not_built: customers have no birthday field"

    @property
    def created(self) -> tuple[PostRecord, ...]:
        return self.digests + tuple(t.post for t in self.touches if t.post is not None)


def _title(rule: ReminderRule, day: date, subject: str | None = None) -> str:
    title = reminder_key(rule, day, subject)
    if len(title) <= MAX_TITLE_CHARS:
        return title
    digest = hashlib.sha256((subject or "").encode()).hexdigest()[:32]
    return reminder_key(rule, day, digest)


@dataclass
class ReminderService:
    """Creates reminder posts; `run_daily(now)` is the scheduler's ReminderPort."""

    sessions: async_sessionmaker[AsyncSession]
    clock: Clock = field(default_factory=SystemClock)
    config: ReminderConfig = field(default_factory=ReminderConfig)
    owner: str = ""  # the member told about customer-touch failures ("" = the first lead with a userid)

    def __post_init__(self) -> None:
        self.posts = PostRepository(self.sessions, self.clock)
        for text in (self.config.recall_text, self.config.repurchase_text):
            render("text", {"text": text}, TargetKind.SEGMENT.value)  # ContentError now, not at 10:00

    # ---- the daily run -------------------------------------------------------------------------------------

    async def run_daily(self, now: datetime) -> ReminderReport:
        """Every daily reminder due at `now`; safe to run again the same day (creates nothing twice)."""
        today = local_date(now, self.config.timezone)
        leads = await self.leads()
        digests = await self.digest(now, leads)
        owner = self.owner or next((lead.wecom_userid for lead in leads if lead.wecom_userid), None) or DEFAULT_OWNER
        recall = await self.churn_recall(now, owner)
        repurchase = await self.repurchase(now, owner)
        report = ReminderReport(today, tuple(digests), (recall, repurchase))
        log.info(
            "reminders.daily",
            day=today.isoformat(),
            digests=len(digests),
            recall=len(recall.due),
            repurchase=len(repurchase.due),
            created=len(report.created),
        )
        return report

    # ---- digest --------------------------------------------------------------------------------------------

    async def leads(self) -> list[Lead]:
        stmt = (
            select(StaffUser.username, StaffUser.wecom_userid, StaffUser.team)
            .where(StaffUser.active.is_(True), StaffUser.role == StaffRole.LEAD.value)
            .order_by(StaffUser.id)
        )
        async with self.sessions() as session:
            return [Lead(u, w, t) for u, w, t in (await session.execute(stmt)).all()]

    async def digest_figures(self, day: date) -> DigestFigures:
        """First-response SLA attainment and post deliveries of `day` (local), and the queue depth now.

        Attainment: first-response clocks fulfilled during the day (met = before their due instant).
        """
        start, end = day_bounds(day, self.config.timezone)
        met_case = func.sum(case((SlaEventRow.met.is_(True), 1), else_=0))
        sla = select(func.count(), met_case).where(
            SlaEventRow.clock == ClockKind.FIRST_RESPONSE.value,
            SlaEventRow.kind == SlaEventKind.FULFILLED.value,
            SlaEventRow.at >= start.timestamp(),
            SlaEventRow.at < end.timestamp(),
        )
        queue = select(func.count()).where(Conversation.status == ConversationStatus.QUEUED.value)

        def deliveries(state: DeliveryState, column: Any) -> Any:
            return select(func.count()).where(PostDelivery.state == state.value, column >= start, column < end)

        async with self.sessions() as session:
            total, met = (await session.execute(sla)).one()
            return DigestFigures(
                day=day,
                first_response_met=int(met or 0),
                first_response_total=int(total or 0),
                queue_depth=int((await session.execute(queue)).scalar_one()),
                posts_sent=await _count(session, deliveries(DeliveryState.SENT, PostDelivery.sent_at)),
                posts_failed=await _count(session, deliveries(DeliveryState.FAILED, PostDelivery.updated_at)),
                posts_missed=await _count(session, deliveries(DeliveryState.MISSED, PostDelivery.updated_at)),
            )

    async def digest(self, now: datetime, leads: Sequence[Lead] | None = None) -> list[PostRecord]:
        """One digest app message per lead with a userid, once a day."""
        today = local_date(now, self.config.timezone)
        recipients = leads_to_tell(await self.leads() if leads is None else leads)
        if not recipients:
            return []
        titles = {lead.wecom_userid: _title(ReminderRule.DIGEST, today, lead.wecom_userid) for lead in recipients}
        existing = await self._existing_titles(titles.values())
        todo = [lead for lead in recipients if titles[lead.wecom_userid] not in existing]
        if not todo:
            return []
        text = digest_text(await self.digest_figures(today - timedelta(days=1)))
        created = []
        for lead in todo:
            userid = str(lead.wecom_userid)
            created.append(
                await self.posts.add_post(
                    owner=userid,
                    title=titles[userid],
                    kind="text",
                    content={"text": text, "reminder": ReminderRule.DIGEST.value},
                    rule=Rule(kind="at", at=now.astimezone(UTC) + self.config.lead, timezone=self.config.timezone),
                    targets=[NewTarget(TargetKind.STAFF, userid)],
                )
            )
        return created

    # ---- customer touches ----------------------------------------------------------------------------------

    async def churn_recall(self, now: datetime, owner: str = DEFAULT_OWNER) -> TouchResult:
        facts = await self._recall_facts()
        due = due_for_recall(facts, now, self.config)
        return await self._touch(ReminderRule.CHURN_RECALL, due, now, owner, self.config.recall_text)

    async def repurchase(self, now: datetime, owner: str = DEFAULT_OWNER) -> TouchResult:
        facts = await self._repurchase_facts(now)
        due = due_for_repurchase(facts, now, self.config)
        return await self._touch(ReminderRule.REPURCHASE, due, now, owner, self.config.repurchase_text)

    async def _touch(self, rule: ReminderRule, due: Sequence[str], now: datetime, owner: str, text: str) -> TouchResult:
        """Mark the due customers with today's marker tag and make sure today's post for that segment exists."""
        today = local_date(now, self.config.timezone)
        if not due:
            return TouchResult(rule, skipped="no_customer_due")
        title = _title(rule, today)
        existing = await self._post_by_title(title)
        if existing is not None and any(
            d.state is not DeliveryState.SCHEDULED for d in await self.posts.deliveries(post_id=existing)
        ):
            # Today's touch went out already: these customers stay unmarked and are due again tomorrow.
            return TouchResult(rule, skipped="already_sent")
        marker = reminder_key(rule, today)
        await self._mark(due, marker, now)
        if existing is not None:
            return TouchResult(rule, due=tuple(due))
        post = await self.posts.add_post(
            owner=owner,
            title=title,
            kind="text",
            content={"text": text, "reminder": rule.value, "send_kind": "marketing"},
            rule=Rule(kind="at", at=send_at(now, self.config.touch_time, self.config), timezone=self.config.timezone),
            targets=[NewTarget(TargetKind.SEGMENT, marker)],
        )
        return TouchResult(rule, due=tuple(due), post=post)

    async def _mark(self, external_ids: Sequence[str], marker: str, now: datetime) -> None:
        async with self.sessions.begin() as session:
            rows = (
                await session.execute(
                    select(Customer.id).where(
                        Customer.external_id.in_(list(external_ids)), Customer.channel.in_(TAGGED_CHANNELS)
                    )
                )
            ).scalars()
            values = [{"customer_id": cid, "tag": marker, "source": TagSource.BOT.value, "set_at": now} for cid in rows]
            if values:
                await session.execute(
                    _insert(session, CustomerTag)
                    .values(values)
                    .on_conflict_do_nothing(
                        index_elements=[CustomerTag.customer_id, CustomerTag.tag, CustomerTag.source]
                    )
                )

    async def _last_marked(self, session: AsyncSession, rule: ReminderRule) -> dict[str, datetime]:
        stmt = (
            select(Customer.external_id, func.max(CustomerTag.set_at))
            .join(Customer, Customer.id == CustomerTag.customer_id)
            .where(
                CustomerTag.source == TagSource.BOT.value,
                CustomerTag.tag.startswith(marker_prefix(rule), autoescape=True),
            )
            .group_by(Customer.external_id)
        )
        return {ext: _utc(at) for ext, at in (await session.execute(stmt)).all()}

    async def _recall_facts(self) -> list[CustomerFacts]:
        stmt = (
            select(Customer.external_id, CustomerTag.tag)
            .join(Customer, Customer.id == CustomerTag.customer_id)
            .where(
                CustomerTag.source == TagSource.COMPUTED.value,
                CustomerTag.tag.in_(sorted(RECALL_TAGS)),
                Customer.channel.in_(TAGGED_CHANNELS),
            )
        )
        async with self.sessions() as session:
            tags: dict[str, set[str]] = {}
            for ext, tag in (await session.execute(stmt)).all():
                tags.setdefault(ext, set()).add(tag)
            touched = await self._last_marked(session, ReminderRule.CHURN_RECALL)
        return [CustomerFacts(ext, frozenset(t), last_recall_at=touched.get(ext)) for ext, t in tags.items()]

    async def _repurchase_facts(self, now: datetime) -> list[CustomerFacts]:
        today = local_date(now, self.config.timezone)
        oldest, _ = day_bounds(
            today - timedelta(days=self.config.repurchase_days + self.config.repurchase_catch_up_days),
            self.config.timezone,
        )
        _, newest = day_bounds(today - timedelta(days=self.config.repurchase_days), self.config.timezone)
        last = func.max(Order.paid_at)
        stmt = (
            select(Customer.external_id, last)
            .join(Customer, Customer.id == Order.customer_id)
            .group_by(Customer.external_id)
            .having(last >= oldest, last < newest)
        )
        async with self.sessions() as session:
            orders = {ext: _utc(at) for ext, at in (await session.execute(stmt)).all()}
            touched = await self._last_marked(session, ReminderRule.REPURCHASE)
        return [CustomerFacts(ext, last_order_at=at, last_repurchase_at=touched.get(ext)) for ext, at in orders.items()]

    # ---- staff follow-up tasks -----------------------------------------------------------------------------

    async def follow_up(
        self, *, staff: str, customer: str, at: datetime, note: str, now: datetime, owner: str | None = None
    ) -> tuple[PostRecord, bool]:
        """A one-off app message to `staff` at `at` about a customer: (post, created). The same task (staff,
        customer, minute) added again returns the existing post. ReminderInputError says what is wrong."""
        check_follow_up(staff, customer, note)
        staff, customer = staff.strip(), customer.strip()
        try:
            rule = validate_rule(Rule(kind="at", at=at.astimezone(UTC), timezone=self.config.timezone), now)
        except RuleError as exc:
            raise ReminderInputError(str(exc)) from None
        async with self.sessions() as session:
            names = (
                (
                    await session.execute(
                        select(Customer.name).where(Customer.external_id == customer).order_by(Customer.id)
                    )
                )
                .scalars()
                .all()
            )
        if not names:
            raise ReminderInputError(f"unknown customer {customer!r} (no 微信客服 or 客户联系 customer has this id)")
        local = at.astimezone(zone(self.config.timezone))
        at_text = local.strftime("%Y-%m-%d %H:%M")
        title = _title(ReminderRule.FOLLOW_UP, local.date(), f"{local:%H%M}:{staff}:{customer}")
        existing = await self._post_by_title(title)
        if existing is not None:
            post = await self.posts.get_post(existing)
            assert post is not None
            return post, False
        text = follow_up_text(customer, next((n for n in names if n), None), note, at_text)
        try:
            render("text", {"text": text}, TargetKind.STAFF.value)
        except ContentError as exc:
            raise ReminderInputError(f"--note: {exc}") from None
        post = await self.posts.add_post(
            owner=(owner or staff).strip() or staff,
            title=title,
            kind="text",
            content={"text": text, "reminder": ReminderRule.FOLLOW_UP.value, "customer": customer},
            rule=rule,
            targets=[NewTarget(TargetKind.STAFF, staff)],
        )
        return post, True

    # ---- look-ups ------------------------------------------------------------------------------------------

    async def _existing_titles(self, titles: Iterable[str]) -> set[str]:
        wanted = sorted(set(titles))
        if not wanted:
            return set()
        async with self.sessions() as session:
            return set((await session.execute(select(Post.title).where(Post.title.in_(wanted)))).scalars().all())

    async def _post_by_title(self, title: str) -> int | None:
        async with self.sessions() as session:
            found = await session.execute(select(Post.id).where(Post.title == title).order_by(Post.id).limit(1))
            value = found.scalar_one_or_none()
            return None if value is None else int(value)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def _count(session: AsyncSession, stmt: Any) -> int:
    return int((await session.execute(stmt)).scalar_one())
