"""SQL for scheduled posts: posts and targets, delivery rows (one per post, target and slot), group robots and
customer-group mass-message tasks.

Every state move of a delivery is a conditional UPDATE (on its state and, while it is being sent, on the claim
token), so two scheduler instances racing on one row never both act on it. Webhook keys are secrets: records
hide them from repr, and nothing here logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from bot.storage.models import (
    Conversation,
    Customer,
    CustomerTag,
    DeliveryState,
    GroupRobot,
    MassMessageTask,
    MassTaskStatus,
    Post,
    PostDelivery,
    PostStatus,
    PostTarget,
    PostTouch,
    TargetKind,
)
from bot.storage.repositories import MAX_ERROR_CHARS, _as_utc, _insert, _Repository, _rowcount
from scheduler.slots import Rule, slot_key

# Channels where a second call after an unknown outcome could post twice (WeCom has no idempotency key there).
AT_MOST_ONCE_KINDS = frozenset({TargetKind.ROBOT.value, TargetKind.GROUP_CHAT.value})


class DuplicateName(Exception):
    """A group robot with this name exists already."""


@dataclass(frozen=True, slots=True)
class TargetRecord:
    id: int
    post_id: int
    kind: TargetKind
    ref: str
    params: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind.value}:{self.ref}"


@dataclass(frozen=True, slots=True)
class PostRecord:
    id: int
    owner: str
    title: str
    kind: str
    content: Mapping[str, Any]
    rule: Rule
    status: PostStatus
    materialised_until: datetime | None
    created_at: datetime
    cancelled_at: datetime | None
    targets: tuple[TargetRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    id: int
    post_id: int
    target_id: int
    target_kind: TargetKind
    slot_at: datetime
    idempotency_key: str
    state: DeliveryState
    attempts: int
    holds: int
    next_attempt_at: datetime
    claimed_at: datetime | None
    claim_token: str | None
    call_started_at: datetime | None
    errcode: int | None
    errmsg: str | None
    reason: str | None
    task_msgid: str | None
    detail: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


@dataclass(frozen=True, slots=True)
class RobotRecord:
    id: int
    name: str
    webhook_key: str = field(repr=False)  # a secret
    created_at: datetime | None = None

    @property
    def masked_key(self) -> str:
        return f"…{self.webhook_key[-4:]}" if len(self.webhook_key) > 8 else "…"


@dataclass(frozen=True, slots=True)
class MassTaskRecord:
    id: int
    msgid: str
    delivery_id: int
    chat_id: str
    sender: str
    status: MassTaskStatus
    created_at: datetime
    checked_at: datetime | None
    reminded_at: datetime | None
    confirmed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Touch:
    """One customer-facing send to one recipient (customer: external_userid; group: `robot:{name}` or chat_id)."""

    recipient_kind: str  # handlers.audience.RecipientKind value: customer | group
    recipient_id: str
    fingerprint: str
    marketing: bool


@dataclass(frozen=True, slots=True)
class NewTarget:
    kind: TargetKind
    ref: str
    params: Mapping[str, Any] = field(default_factory=dict)


def _target(row: PostTarget) -> TargetRecord:
    return TargetRecord(row.id, row.post_id, TargetKind(row.kind), row.ref, dict(row.params or {}))


def _post(row: Post, targets: Iterable[PostTarget] = ()) -> PostRecord:
    rule = Rule(
        kind=row.rule_kind,
        at=row.run_at,
        cron=row.cron,
        timezone=row.timezone,
        sop_plan=row.sop_plan,
        sop_offset_s=row.sop_offset_s,
    )
    return PostRecord(
        id=row.id,
        owner=row.owner,
        title=row.title,
        kind=row.kind,
        content=dict(row.content or {}),
        rule=rule,
        status=PostStatus(row.status),
        materialised_until=row.materialised_until,
        created_at=row.created_at,
        cancelled_at=row.cancelled_at,
        targets=tuple(_target(t) for t in targets),
    )


def _delivery(row: PostDelivery) -> DeliveryRecord:
    return DeliveryRecord(
        id=row.id,
        post_id=row.post_id,
        target_id=row.target_id,
        target_kind=TargetKind(row.target_kind),
        slot_at=row.slot_at,
        idempotency_key=row.idempotency_key,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        holds=row.holds,
        next_attempt_at=row.next_attempt_at,
        claimed_at=row.claimed_at,
        claim_token=row.claim_token,
        call_started_at=row.call_started_at,
        errcode=row.errcode,
        errmsg=row.errmsg,
        reason=row.reason,
        task_msgid=row.task_msgid,
        detail=dict(row.detail or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
        sent_at=row.sent_at,
    )


def _task(row: MassMessageTask) -> MassTaskRecord:
    return MassTaskRecord(
        id=row.id,
        msgid=row.msgid,
        delivery_id=row.delivery_id,
        chat_id=row.chat_id,
        sender=row.sender,
        status=MassTaskStatus(row.status),
        created_at=row.created_at,
        checked_at=row.checked_at,
        reminded_at=row.reminded_at,
        confirmed_at=row.confirmed_at,
    )


class PostRepository(_Repository):
    """Posts, targets, deliveries, robots and mass-message tasks."""

    # ---- posts ---------------------------------------------------------------------------------------------

    async def add_post(
        self,
        *,
        owner: str,
        title: str,
        kind: str,
        content: Mapping[str, Any],
        rule: Rule,
        targets: Sequence[NewTarget],
    ) -> PostRecord:
        """Store a post with its targets (validated by the caller) in one transaction."""
        now = self._now()
        async with self._sessions.begin() as session:
            post = Post(
                owner=owner,
                title=title,
                kind=kind,
                content=dict(content),
                rule_kind=rule.kind,
                run_at=rule.at,
                cron=rule.cron,
                timezone=rule.timezone,
                sop_plan=rule.sop_plan,
                sop_offset_s=rule.sop_offset_s,
                status=PostStatus.ACTIVE.value,
                # Slots from the creation instant on; a rule never reaches back before its post existed.
                materialised_until=now,
                created_at=now,
            )
            session.add(post)
            await session.flush()
            rows = [PostTarget(post_id=post.id, kind=t.kind.value, ref=t.ref, params=dict(t.params)) for t in targets]
            session.add_all(rows)
            await session.flush()
            return _post(post, rows)

    async def get_post(self, post_id: int) -> PostRecord | None:
        async with self._sessions() as session:
            row = await session.get(Post, post_id)
            if row is None:
                return None
            targets = (
                await session.scalars(select(PostTarget).where(PostTarget.post_id == post_id).order_by(PostTarget.id))
            ).all()
            return _post(row, targets)

    async def list_posts(self, *, status: PostStatus | None = None, limit: int = 500) -> list[PostRecord]:
        """Posts newest first, each with its targets."""
        stmt = select(Post).order_by(Post.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(Post.status == status.value)
        async with self._sessions() as session:
            posts = (await session.scalars(stmt)).all()
            return await self._with_targets(session, posts)

    async def _with_targets(self, session: Any, posts: Sequence[Post]) -> list[PostRecord]:
        ids = [p.id for p in posts]
        by_post: dict[int, list[PostTarget]] = {i: [] for i in ids}
        if ids:
            stmt = select(PostTarget).where(PostTarget.post_id.in_(ids)).order_by(PostTarget.id)
            for target in (await session.scalars(stmt)).all():
                by_post[target.post_id].append(target)
        return [_post(p, by_post[p.id]) for p in posts]

    async def schedulable_posts(self, until: datetime, *, limit: int = 10_000) -> list[PostRecord]:
        """Active calendar posts (one-off or cron) whose rows are not materialised up to `until` yet."""
        stmt = (
            select(Post)
            .where(
                Post.status == PostStatus.ACTIVE.value,
                Post.rule_kind.in_(("at", "cron")),
                or_(Post.materialised_until.is_(None), Post.materialised_until < until),
            )
            .order_by(Post.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return await self._with_targets(session, (await session.scalars(stmt)).all())

    async def cancel_post(self, post_id: int) -> int | None:
        """Cancel a post; its scheduled deliveries become skipped (reason cancelled). None if no such post."""
        now = self._now()
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Post)
                .where(Post.id == post_id, Post.status == PostStatus.ACTIVE.value)
                .values(status=PostStatus.CANCELLED.value, cancelled_at=now)
            )
            if _rowcount(result) == 0 and await session.get(Post, post_id) is None:
                return None
            skipped = await session.execute(
                update(PostDelivery)
                .where(PostDelivery.post_id == post_id, PostDelivery.state == DeliveryState.SCHEDULED.value)
                .values(state=DeliveryState.SKIPPED.value, reason="cancelled", updated_at=now)
            )
            return _rowcount(skipped)

    # ---- deliveries ----------------------------------------------------------------------------------------

    async def materialise(self, post: PostRecord, slots: Sequence[datetime], until: datetime, now: datetime) -> int:
        """Insert a scheduled row per (target, slot) unless it exists; move the post's watermark up to `until`.

        Idempotent and race-safe: rows are keyed by slot, and the watermark only ever moves forward.
        """
        inserted = 0
        async with self._sessions.begin() as session:
            for slot in slots:
                for target in post.targets:
                    stmt = (
                        _insert(session, PostDelivery)
                        .values(
                            post_id=post.id,
                            target_id=target.id,
                            target_kind=target.kind.value,
                            slot_at=slot,
                            idempotency_key=slot_key(post.id, target.id, slot),
                            state=DeliveryState.SCHEDULED.value,
                            attempts=0,
                            holds=0,
                            next_attempt_at=slot,
                            detail={},
                            created_at=now,
                            updated_at=now,
                        )
                        .on_conflict_do_nothing(index_elements=[PostDelivery.idempotency_key])
                        .returning(PostDelivery.id)
                    )
                    inserted += (await session.execute(stmt)).scalar_one_or_none() is not None
            await session.execute(
                update(Post)
                .where(Post.id == post.id, or_(Post.materialised_until.is_(None), Post.materialised_until < until))
                .values(materialised_until=until)
            )
        return inserted

    async def mark_missed(self, cutoff: datetime, now: datetime) -> list[DeliveryRecord]:
        """Scheduled rows whose slot is before `cutoff` and that were never tried nor held: now missed."""
        stmt = (
            update(PostDelivery)
            .where(
                PostDelivery.state == DeliveryState.SCHEDULED.value,
                PostDelivery.attempts == 0,
                PostDelivery.holds == 0,
                PostDelivery.slot_at < cutoff,
            )
            .values(state=DeliveryState.MISSED.value, reason="missed_grace_window", updated_at=now)
            .returning(PostDelivery)
        )
        async with self._sessions.begin() as session:
            return [_delivery(row) for row in (await session.scalars(stmt)).all()]

    async def reclaim_expired(self, cutoff: datetime, now: datetime) -> tuple[int, list[DeliveryRecord]]:
        """Rows stuck in sending since before `cutoff` (their sender died): (retried count, failed rows).

        Retried: no WeCom call had started, or the channel is idempotent (kf msgid, app duplicate check).
        Failed with reason outcome_unknown: a robot or mass-message call had started; WeCom may have posted it,
        and a second call could post it twice, so at most once wins over at least once.
        """
        stuck = and_(
            PostDelivery.state == DeliveryState.SENDING.value,
            PostDelivery.claimed_at < cutoff,
            PostDelivery.task_msgid.is_(None),
        )
        unsafe = and_(PostDelivery.call_started_at.is_not(None), PostDelivery.target_kind.in_(AT_MOST_ONCE_KINDS))
        async with self._sessions.begin() as session:
            retried = await session.execute(
                update(PostDelivery)
                .where(stuck, ~unsafe)
                .values(
                    state=DeliveryState.SCHEDULED.value,
                    next_attempt_at=now,
                    claim_token=None,
                    claimed_at=None,
                    reason="lease_expired",
                    updated_at=now,
                )
            )
            failed = await session.scalars(
                update(PostDelivery)
                .where(stuck, unsafe)
                .values(state=DeliveryState.FAILED.value, reason="outcome_unknown", claim_token=None, updated_at=now)
                .returning(PostDelivery)
            )
            return _rowcount(retried), [_delivery(row) for row in failed.all()]

    async def claim_due(self, now: datetime, token: str, *, limit: int = 200) -> list[DeliveryRecord]:
        """Move due scheduled rows to sending under `token`; a row is claimed by exactly one caller."""
        due = (
            select(PostDelivery.id)
            .where(PostDelivery.state == DeliveryState.SCHEDULED.value, PostDelivery.next_attempt_at <= now)
            .order_by(PostDelivery.next_attempt_at, PostDelivery.id)
            .limit(limit)
        )
        stmt = (
            update(PostDelivery)
            .where(PostDelivery.id.in_(due.scalar_subquery()), PostDelivery.state == DeliveryState.SCHEDULED.value)
            .values(
                state=DeliveryState.SENDING.value,
                claimed_at=now,
                claim_token=token,
                call_started_at=None,
                updated_at=now,
            )
            .returning(PostDelivery)
        )
        async with self._sessions.begin() as session:
            rows = [_delivery(row) for row in (await session.scalars(stmt)).all()]
        return sorted(rows, key=lambda d: (d.next_attempt_at, d.id))

    async def begin_call(self, delivery_id: int, token: str, now: datetime) -> bool:
        """Record that a WeCom call starts now; False when the claim was lost (do not call)."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(PostDelivery)
                .where(
                    PostDelivery.id == delivery_id,
                    PostDelivery.state == DeliveryState.SENDING.value,
                    PostDelivery.claim_token == token,
                )
                .values(attempts=PostDelivery.attempts + 1, call_started_at=now, updated_at=now)
            )
            return _rowcount(result) == 1

    async def finish(
        self,
        delivery_id: int,
        token: str,
        state: DeliveryState,
        now: datetime,
        *,
        errcode: int | None = None,
        errmsg: str | None = None,
        reason: str | None = None,
        next_attempt_at: datetime | None = None,
        held: bool = False,
        detail: Mapping[str, Any] | None = None,
        task_msgid: str | None = None,
    ) -> bool:
        """Leave `sending` for `state` (scheduled again for a retry or a hold); False if the claim was lost."""
        values: dict[str, Any] = {"state": state.value, "updated_at": now, "reason": reason}
        if state is not DeliveryState.SENDING:
            values.update(claim_token=None)
        if errcode is not None or errmsg is not None:
            values.update(errcode=errcode, errmsg=(errmsg or "")[:MAX_ERROR_CHARS])
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        if held:
            values["holds"] = PostDelivery.holds + 1
        if detail is not None:
            values["detail"] = dict(detail)
        if task_msgid is not None:
            values["task_msgid"] = task_msgid
        if state is DeliveryState.SENT:
            values["sent_at"] = now
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(PostDelivery)
                .where(
                    PostDelivery.id == delivery_id,
                    PostDelivery.state == DeliveryState.SENDING.value,
                    PostDelivery.claim_token == token,
                )
                .values(**values)
            )
            return _rowcount(result) == 1

    async def deliveries(
        self, *, post_id: int | None = None, state: DeliveryState | None = None
    ) -> list[DeliveryRecord]:
        """Delivery rows, by slot then target."""
        stmt = select(PostDelivery).order_by(PostDelivery.slot_at, PostDelivery.target_id, PostDelivery.id)
        if post_id is not None:
            stmt = stmt.where(PostDelivery.post_id == post_id)
        if state is not None:
            stmt = stmt.where(PostDelivery.state == state.value)
        async with self._sessions() as session:
            return [_delivery(row) for row in (await session.scalars(stmt)).all()]

    async def get_delivery(self, delivery_id: int) -> DeliveryRecord | None:
        async with self._sessions() as session:
            row = await session.get(PostDelivery, delivery_id)
            return None if row is None else _delivery(row)

    async def posts_by_id(self, ids: Iterable[int]) -> dict[int, PostRecord]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        async with self._sessions() as session:
            posts = (await session.scalars(select(Post).where(Post.id.in_(wanted)))).all()
            return {p.id: p for p in await self._with_targets(session, posts)}

    # ---- group robots --------------------------------------------------------------------------------------

    async def add_robot(self, name: str, webhook_key: str) -> RobotRecord:
        now = self._now()
        try:
            async with self._sessions.begin() as session:
                row = GroupRobot(name=name, webhook_key=webhook_key, created_at=now)
                session.add(row)
                await session.flush()
                return RobotRecord(row.id, row.name, row.webhook_key, row.created_at)
        except IntegrityError:
            raise DuplicateName(name) from None

    async def get_robot(self, name: str) -> RobotRecord | None:
        async with self._sessions() as session:
            row = (await session.scalars(select(GroupRobot).where(GroupRobot.name == name))).one_or_none()
            return None if row is None else RobotRecord(row.id, row.name, row.webhook_key, row.created_at)

    async def list_robots(self) -> list[RobotRecord]:
        async with self._sessions() as session:
            rows = (await session.scalars(select(GroupRobot).order_by(GroupRobot.name))).all()
            return [RobotRecord(r.id, r.name, r.webhook_key, r.created_at) for r in rows]

    # ---- customer-group mass messages ---------------------------------------------------------------------

    async def count_mass_tasks(self, chat_id: str, start: datetime, end: datetime) -> int:
        """Mass-message tasks this bot created for a customer group in [start, end)."""
        stmt = select(func.count()).where(
            MassMessageTask.chat_id == chat_id, MassMessageTask.created_at >= start, MassMessageTask.created_at < end
        )
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def record_mass_task(
        self, delivery_id: int, token: str, *, msgid: str, chat_id: str, sender: str, now: datetime
    ) -> bool:
        """Store the created task and tie it to its delivery (which stays sending until confirmed)."""
        async with self._sessions.begin() as session:
            session.add(
                MassMessageTask(
                    msgid=msgid,
                    delivery_id=delivery_id,
                    chat_id=chat_id,
                    sender=sender,
                    status=MassTaskStatus.PENDING.value,
                    created_at=now,
                    checked_at=now,
                )
            )
            result = await session.execute(
                update(PostDelivery)
                .where(PostDelivery.id == delivery_id, PostDelivery.claim_token == token)
                .values(task_msgid=msgid, reason="awaiting_confirmation", updated_at=now)
            )
            return _rowcount(result) == 1

    async def mass_tasks_to_check(self, checked_before: datetime, *, limit: int = 200) -> list[MassTaskRecord]:
        stmt = (
            select(MassMessageTask)
            .where(
                MassMessageTask.status == MassTaskStatus.PENDING.value,
                or_(MassMessageTask.checked_at.is_(None), MassMessageTask.checked_at <= checked_before),
            )
            .order_by(MassMessageTask.checked_at, MassMessageTask.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [_task(row) for row in (await session.scalars(stmt)).all()]

    async def mass_tasks(self, *, chat_id: str | None = None) -> list[MassTaskRecord]:
        stmt = select(MassMessageTask).order_by(MassMessageTask.id)
        if chat_id is not None:
            stmt = stmt.where(MassMessageTask.chat_id == chat_id)
        async with self._sessions() as session:
            return [_task(row) for row in (await session.scalars(stmt)).all()]

    async def task_checked(self, task_id: int, now: datetime, *, reminded: bool = False) -> bool:
        """Note a poll; with reminded, also that the owner was reminded (True only for the first reminder)."""
        values: dict[str, Any] = {"checked_at": now}
        conditions = [MassMessageTask.id == task_id, MassMessageTask.status == MassTaskStatus.PENDING.value]
        if reminded:
            values["reminded_at"] = now
            conditions.append(MassMessageTask.reminded_at.is_(None))
        async with self._sessions.begin() as session:
            return _rowcount(await session.execute(update(MassMessageTask).where(*conditions).values(**values))) == 1

    async def close_task(self, task: MassTaskRecord, confirmed: bool, now: datetime) -> bool:
        """Confirmed: the task and its delivery are done (sent). Else unconfirmed, and the delivery failed."""
        status = MassTaskStatus.CONFIRMED if confirmed else MassTaskStatus.UNCONFIRMED
        async with self._sessions.begin() as session:
            moved = await session.execute(
                update(MassMessageTask)
                .where(MassMessageTask.id == task.id, MassMessageTask.status == MassTaskStatus.PENDING.value)
                .values(status=status.value, checked_at=now, confirmed_at=now if confirmed else None)
            )
            if _rowcount(moved) == 0:
                return False
            delivery_values: dict[str, Any] = {"claim_token": None, "updated_at": now}
            if confirmed:
                delivery_values.update(state=DeliveryState.SENT.value, sent_at=now, reason=None)
            else:
                delivery_values.update(state=DeliveryState.FAILED.value, reason="unconfirmed")
            await session.execute(
                update(PostDelivery)
                .where(PostDelivery.id == task.delivery_id, PostDelivery.state == DeliveryState.SENDING.value)
                .values(**delivery_values)
            )
            return True

    # ---- 微信客服 customers of a segment ------------------------------------------------------------------

    async def kf_segment(self, tags: Sequence[str], window_start: datetime) -> tuple[list[tuple[str, str]], int]:
        """(external_userid, open_kfid) of kf customers with any of `tags` who wrote since `window_start`,
        and how many customers with those tags are outside their 48 h window."""
        tagged = select(CustomerTag.customer_id).where(CustomerTag.tag.in_(list(tags))).distinct().subquery()
        latest = (
            select(
                Conversation.customer_id,
                Conversation.account_id,
                func.max(Conversation.last_inbound_at).label("last_in"),
            )
            .where(Conversation.channel == "kf")
            .group_by(Conversation.customer_id, Conversation.account_id)
            .subquery()
        )
        stmt = (
            select(Customer.external_id, latest.c.account_id, latest.c.last_in)
            .join(tagged, tagged.c.customer_id == Customer.id)
            .join(latest, latest.c.customer_id == Customer.id, isouter=True)
            .where(Customer.channel == "kf")
            .order_by(Customer.id)
        )
        inside: list[tuple[str, str]] = []
        outside: set[str] = set()
        async with self._sessions() as session:
            for external_id, account_id, last_in in (await session.execute(stmt)).all():
                if account_id is not None and last_in is not None and _as_utc(last_in) >= window_start:
                    inside.append((external_id, account_id))
                else:
                    outside.add(external_id)
        reached = {ext for ext, _ in inside}
        return inside, len(outside - reached)

    # ---- audience history (touches) ----------------------------------------------------------------------

    async def record_touches(self, delivery_id: int, touches: Sequence[Touch], now: datetime) -> int:
        """Record sends made by a delivery (once per recipient: a repeat is ignored); how many were new."""
        if not touches:
            return 0
        inserted = 0
        async with self._sessions.begin() as session:
            for touch in touches:
                stmt = (
                    _insert(session, PostTouch)
                    .values(
                        delivery_id=delivery_id,
                        recipient_kind=touch.recipient_kind,
                        recipient_id=touch.recipient_id,
                        fingerprint=touch.fingerprint,
                        marketing=touch.marketing,
                        sent_at=now,
                    )
                    .on_conflict_do_nothing(
                        index_elements=[PostTouch.delivery_id, PostTouch.recipient_kind, PostTouch.recipient_id]
                    )
                    .returning(PostTouch.id)
                )
                inserted += (await session.execute(stmt)).scalar_one_or_none() is not None
        return inserted

    async def touched_by(self, delivery_id: int) -> set[str]:
        """The recipients this delivery has reached already (a retried or held delivery skips them)."""
        stmt = select(PostTouch.recipient_id).where(PostTouch.delivery_id == delivery_id)
        async with self._sessions() as session:
            return set((await session.scalars(stmt)).all())

    async def count_touches(self, recipient_kind: str, recipient_id: str, start: datetime, end: datetime) -> int:
        """Marketing sends to one recipient in [start, end) (the daily caps)."""
        stmt = select(func.count()).where(
            PostTouch.recipient_kind == recipient_kind,
            PostTouch.recipient_id == recipient_id,
            PostTouch.marketing.is_(True),
            PostTouch.sent_at >= start,
            PostTouch.sent_at < end,
        )
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def recent_fingerprints(self, recipient_kind: str, recipient_id: str, since: datetime) -> dict[str, datetime]:
        """fingerprint -> the last time it was sent to this recipient, for sends at or after `since` (de-dup)."""
        stmt = (
            select(PostTouch.fingerprint, func.max(PostTouch.sent_at))
            .where(
                PostTouch.recipient_kind == recipient_kind,
                PostTouch.recipient_id == recipient_id,
                PostTouch.sent_at >= since,
            )
            .group_by(PostTouch.fingerprint)
        )
        async with self._sessions() as session:
            return {fp: _as_utc(at) for fp, at in (await session.execute(stmt)).all()}
