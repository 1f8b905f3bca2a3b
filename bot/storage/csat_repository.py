"""SQL for the satisfaction survey (csat_surveys): the once-per-conversation claim, answers, skips and the report.

- The claim is an INSERT … ON CONFLICT (conversation_id) DO NOTHING: of two processes asking at once, the one
  whose row went in sends the survey; the other is told it was already asked. The row is written *before* the
  send, so a crash in between loses that survey rather than sending it twice (at most once).
- An answer is a conditional UPDATE (score IS NULL): the first click wins, later clicks change nothing.
- A survey that could not be sent (code expired, session state, quota, WeCom refusal) keeps its row (nobody asks
  again) and gets an audit_log entry `csat.skipped` on target `conversation:<id>` with the reason. csat_surveys
  has no column for it (asked_at is NOT NULL); reports leave skipped rows out of "asked" by that entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, and_, case, cast, exists, func, literal, or_, select, update

from bot.storage.models import AuditEntry, Conversation, CsatSurvey, Customer, Direction, Message, StaffUser
from bot.storage.repositories import _insert, _Repository, _rowcount
from handlers.csat import SATISFIED_MIN_SCORE
from handlers.domain import Channel

SKIPPED_ACTION = "csat.skipped"
BOT_ACTOR = "bot"


def conversation_target(conversation_id: int) -> str:
    return f"conversation:{conversation_id}"


@dataclass(frozen=True, slots=True)
class CsatConversation:
    """What the survey needs of a conversation: who to send to, where the kf session stands, who served it."""

    id: int
    channel: Channel
    account_id: str
    customer_id: int
    external_id: str
    status: str
    kf_service_state: int | None
    assignee_id: int | None
    team: str | None
    last_inbound_at: datetime | None


@dataclass(frozen=True, slots=True)
class SurveyRecord:
    id: int
    conversation_id: int
    agent_id: int | None
    asked_at: datetime
    score: int | None
    answered_at: datetime | None


@dataclass(frozen=True, slots=True)
class CsatReportRow:
    """Figures for one (team, agent) pair; skipped surveys are counted apart, never as asked."""

    team: str | None
    agent_id: int | None
    agent_username: str | None
    agent_name: str | None
    asked: int
    skipped: int
    answered: int
    score_sum: int
    satisfied: int


def _survey(row: CsatSurvey) -> SurveyRecord:
    return SurveyRecord(row.id, row.conversation_id, row.agent_id, row.asked_at, row.score, row.answered_at)


def _skipped_clause() -> Any:
    """SQL: this survey row has a `csat.skipped` audit entry (it was never delivered)."""
    target = literal("conversation:", String) + cast(CsatSurvey.conversation_id, String)
    return exists().where(AuditEntry.action == SKIPPED_ACTION, AuditEntry.target == target)


class CsatRepository(_Repository):
    async def conversation(self, conversation_id: int) -> CsatConversation | None:
        stmt = (
            select(Conversation, Customer.external_id)
            .join(Customer, Customer.id == Conversation.customer_id)
            .where(Conversation.id == conversation_id)
        )
        async with self._sessions() as session:
            row = (await session.execute(stmt)).one_or_none()
        if row is None:
            return None
        c: Conversation = row[0]
        return CsatConversation(
            id=c.id,
            channel=Channel(c.channel),
            account_id=c.account_id,
            customer_id=c.customer_id,
            external_id=str(row[1]),
            status=c.status,
            kf_service_state=c.kf_service_state,
            assignee_id=c.assignee_id,
            team=c.team,
            last_inbound_at=c.last_inbound_at,
        )

    async def claim(self, conversation_id: int, agent_id: int | None) -> int | None:
        """Insert the survey row (asked now); its id, or None when this conversation already has one."""
        async with self._sessions.begin() as session:
            stmt = (
                _insert(session, CsatSurvey)
                .values(conversation_id=conversation_id, agent_id=agent_id, asked_at=self._now())
                .on_conflict_do_nothing(index_elements=[CsatSurvey.conversation_id])
                .returning(CsatSurvey.id)
            )
            new_id = (await session.execute(stmt)).scalar_one_or_none()
        return None if new_id is None else int(new_id)

    async def survey_of(self, conversation_id: int) -> SurveyRecord | None:
        async with self._sessions() as session:
            row = (
                await session.scalars(select(CsatSurvey).where(CsatSurvey.conversation_id == conversation_id))
            ).one_or_none()
            return None if row is None else _survey(row)

    async def record_skip(self, conversation_id: int, reason: str, detail: dict[str, Any]) -> None:
        """Why this conversation's survey was not delivered (audit_log; see the module docstring)."""
        await self._audit(SKIPPED_ACTION, conversation_id, {"reason": reason, **detail})

    async def _audit(self, action: str, conversation_id: int, detail: dict[str, Any]) -> None:
        async with self._sessions.begin() as session:
            session.add(
                AuditEntry(
                    at=self._now(),
                    actor=BOT_ACTOR,
                    action=action,
                    target=conversation_target(conversation_id),
                    detail=detail,
                )
            )

    async def skip_reason(self, conversation_id: int) -> str | None:
        stmt = (
            select(AuditEntry.detail)
            .where(AuditEntry.action == SKIPPED_ACTION, AuditEntry.target == conversation_target(conversation_id))
            .order_by(AuditEntry.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            detail = (await session.execute(stmt)).scalar_one_or_none()
        return None if detail is None else str(detail.get("reason"))

    async def latest_delivered(
        self, channel: Channel, account_id: str, customer_id: int, asked_after: datetime
    ) -> SurveyRecord | None:
        """The customer's newest survey with this account that was delivered (not skipped), asked after a time."""
        stmt = (
            select(CsatSurvey)
            .join(Conversation, Conversation.id == CsatSurvey.conversation_id)
            .where(
                Conversation.channel == channel.value,
                Conversation.account_id == account_id,
                Conversation.customer_id == customer_id,
                CsatSurvey.asked_at >= asked_after,
                ~_skipped_clause(),
            )
            .order_by(CsatSurvey.asked_at.desc(), CsatSurvey.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            row = (await session.scalars(stmt)).one_or_none()
            return None if row is None else _survey(row)

    async def answer(self, survey_id: int, score: int) -> bool:
        """Store the score if the survey has none yet; True when this call stored it (first answer wins)."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(CsatSurvey)
                .where(CsatSurvey.id == survey_id, CsatSurvey.score.is_(None))
                .values(score=score, answered_at=self._now())
            )
            return _rowcount(result) == 1

    async def sent_since(self, channel: Channel, account_id: str, customer_id: int, since: datetime) -> int:
        """Messages the bot stored as sent to this customer since a time (for the 5-per-customer-message quota).

        Conservative: send_msg_on_event notices are counted too (they do not use the quota), so the bot may
        skip a survey it could still have sent, never send one WeCom refuses for the count.
        """
        stmt = select(func.count()).where(
            Message.direction == Direction.OUT.value,
            Message.channel == channel.value,
            Message.account_id == account_id,
            Message.customer_id == customer_id,
            Message.created_at >= since,
        )
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def report(
        self, since: datetime, until: datetime, team: str | None = None, *, default_team: str | None = None
    ) -> list[CsatReportRow]:
        """Per (team, agent): surveys asked in [since, until), skipped, answered, score sum and 4–5 answers.

        A conversation without a team (never handed to one) counts under `default_team`.
        """
        skipped = _skipped_clause()
        delivered = ~skipped
        stmt = (
            select(
                Conversation.team,
                CsatSurvey.agent_id,
                StaffUser.username,
                StaffUser.display_name,
                func.sum(case((delivered, 1), else_=0)),
                func.sum(case((skipped, 1), else_=0)),
                func.sum(case((and_(delivered, CsatSurvey.score.is_not(None)), 1), else_=0)),
                func.sum(case((delivered, func.coalesce(CsatSurvey.score, 0)), else_=0)),
                func.sum(case((and_(delivered, CsatSurvey.score >= SATISFIED_MIN_SCORE), 1), else_=0)),
            )
            .join(Conversation, Conversation.id == CsatSurvey.conversation_id)
            .outerjoin(StaffUser, StaffUser.id == CsatSurvey.agent_id)
            .where(CsatSurvey.asked_at >= since, CsatSurvey.asked_at < until)
            .group_by(Conversation.team, CsatSurvey.agent_id, StaffUser.username, StaffUser.display_name)
        )
        if team is not None:
            in_team = Conversation.team == team
            stmt = stmt.where(or_(in_team, Conversation.team.is_(None)) if team == default_team else in_team)
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).all()
        return [
            CsatReportRow(
                team=r[0] if r[0] is not None else default_team,
                agent_id=None if r[1] is None else int(r[1]),
                agent_username=r[2],
                agent_name=r[3],
                asked=int(r[4] or 0),
                skipped=int(r[5] or 0),
                answered=int(r[6] or 0),
                score_sum=int(r[7] or 0),
                satisfied=int(r[8] or 0),
            )
            for r in rows
        ]


__all__ = [
    "SKIPPED_ACTION",
    "CsatConversation",
    "CsatReportRow",
    "CsatRepository",
    "SurveyRecord",
    "conversation_target",
]
