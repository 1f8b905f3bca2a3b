"""CSAT: a 1–5 satisfaction survey after resolution, once per conversation, stored and reported.

When it is asked:
- resolve moved the kf session 3 → 4 (console resolve: `ResolveResult.end_msg_code`; or a servicer ended it in
  the WeCom client: `session_status_change` change_type 3 with `msg_code`): send_msg_on_event with that code.
  The code is single-use, valid 20 s, and only while the session is still ended (reference §4.4), so the survey
  is asked right at resolution; a code already older than 20 s is not even tried.
- no code (a console-mode conversation: the kf session stayed API-managed in 0/1): kf/send_msg, if the state
  is 0/1, the customer wrote within 48 h and fewer than 5 messages went out since (reference §4.3).

Once per conversation: the csat_surveys row (unique conversation_id) is inserted before the send, and only the
process whose insert went in sends. A call without a code for a session WeCom holds (2/3/4) takes no row: only
the code's holder can still reach the customer. A survey that cannot be sent keeps its row (no later retry) and
its reason is logged and stored (audit_log `csat.skipped`, see bot/storage/csat_repository.py); reports count it
apart from the surveys asked.

The answer: the customer clicks an item, a kf text with menu_id `csat:N` arrives (in a new conversation, since
the old one is resolved); the customer's newest delivered survey of that account gets the score, first answer
wins. The pipeline (bot/pipeline.py) sends the short thanks, once, when the session state allows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from bot.pipeline import KF_MAX_REPLIES_PER_MESSAGE, ReplySender
from bot.storage.csat_repository import CsatConversation, CsatReportRow, CsatRepository
from bot.storage.models import ConversationStatus
from bot.storage.repositories import Repositories
from bot.wecom.errors import WeComApiError
from handlers.csat import SATISFACTION_BAR, parse_score, satisfied, survey_menu, thanks_text
from handlers.domain import Channel, Clock, InboundMessage, OutboundMessage

log = structlog.get_logger(__name__)

END_CODE_TTL_S = 20.0  # the session-end msg_code (reference §4.4)
KF_WINDOW_S = 48 * 3600  # kf/send_msg: within 48 h of the customer's last message (reference §4.3)
KF_API_STATES = (None, 0, 1)  # kf/send_msg allowed (None: never read, a session the API still has)
ANSWER_WINDOW_S = 7 * 86400  # a click on a survey older than this is not recorded


class AskStatus(StrEnum):
    SENT = "sent"
    ALREADY_ASKED = "already_asked"  # another call (or process) asked this conversation first: nothing sent
    SKIPPED = "skipped"  # the row exists but the survey could not go out; `reason` says why
    NOT_APPLICABLE = "not_applicable"  # no such conversation, not a kf conversation, or not resolved


class SkipReason(StrEnum):
    CODE_EXPIRED = "code_expired"  # the end msg_code was older than 20 s before we tried
    KF_STATE = "kf_state"  # no code and the session is in the pool / with a servicer / ended (no row taken)
    WINDOW_48H = "window_48h"  # no code and the customer's last message is 48 h old (or unknown)
    QUOTA = "quota"  # no code and 5 messages already went out since the customer's last message
    REFUSED = "refused"  # WeCom said no (errcode in detail: 95002 expired, 95018 state, 40058 used code, ...)
    SEND_FAILED = "send_failed"  # transport failure: not retried (the code is single-use and short-lived)


@dataclass(frozen=True, slots=True)
class AskOutcome:
    status: AskStatus
    conversation_id: int
    reason: str | None = None
    errcode: int | None = None


class AnswerStatus(StrEnum):
    RECORDED = "recorded"  # this click stored the score
    ALREADY_ANSWERED = "already_answered"  # a score was stored before: this click changes nothing
    NO_SURVEY = "no_survey"  # no delivered survey of this customer within the answer window
    INVALID = "invalid"  # a `csat:` id that is not a score 1–5


@dataclass(frozen=True, slots=True)
class CsatAnswer:
    status: AnswerStatus
    score: int | None = None
    survey_id: int | None = None
    conversation_id: int | None = None

    @property
    def recorded(self) -> bool:
        return self.status is AnswerStatus.RECORDED

    @property
    def thanks(self) -> str | None:
        """The thanks text for this score (the pipeline sends it once, for the click that recorded it)."""
        return thanks_text(self.score) if self.score is not None else None


@dataclass(frozen=True, slots=True)
class CsatFigures:
    asked: int = 0  # surveys delivered
    skipped: int = 0  # surveys that could not be sent (not in `asked`)
    answered: int = 0
    score_sum: int = 0
    satisfied: int = 0  # answers 4–5

    @property
    def average(self) -> float | None:
        return round(self.score_sum / self.answered, 2) if self.answered else None

    @property
    def satisfied_share(self) -> float | None:
        """Share of answers that are 4–5 (the SOP's satisfaction figure)."""
        return round(self.satisfied / self.answered, 4) if self.answered else None

    @property
    def response_rate(self) -> float | None:
        return round(self.answered / self.asked, 4) if self.asked else None

    @property
    def meets_bar(self) -> bool | None:
        share = self.satisfied_share
        return None if share is None else share >= SATISFACTION_BAR

    def plus(self, other: CsatFigures) -> CsatFigures:
        return CsatFigures(
            self.asked + other.asked,
            self.skipped + other.skipped,
            self.answered + other.answered,
            self.score_sum + other.score_sum,
            self.satisfied + other.satisfied,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "asked": self.asked,
            "skipped": self.skipped,
            "answered": self.answered,
            "average": self.average,
            "satisfied_share": self.satisfied_share,
            "response_rate": self.response_rate,
            "meets_bar": self.meets_bar,
        }


@dataclass(frozen=True, slots=True)
class AgentFigures:
    agent_id: int | None
    username: str | None
    display_name: str | None
    team: str
    figures: CsatFigures


@dataclass(frozen=True, slots=True)
class CsatReport:
    since: datetime
    until: datetime
    team: str | None
    total: CsatFigures
    teams: dict[str, CsatFigures] = field(default_factory=dict)
    agents: list[AgentFigures] = field(default_factory=list)
    bar: float = SATISFACTION_BAR

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "team": self.team,
            "bar": self.bar,
            "total": self.total.to_json(),
            "teams": [{"team": name, **figures.to_json()} for name, figures in sorted(self.teams.items())],
            "agents": [
                {
                    "agent_id": a.agent_id,
                    "username": a.username,
                    "display_name": a.display_name,
                    "team": a.team,
                    **a.figures.to_json(),
                }
                for a in self.agents
            ],
        }


def survey_key(conversation_id: int) -> str:
    """The kf msgid of a conversation's survey (≤ 32 bytes of [0-9a-zA-Z_-]): the same on every attempt."""
    digest = hashlib.sha1(f"csat:{conversation_id}".encode()).hexdigest()[:27]  # noqa: S324
    return f"csat{digest}"


class CsatReporter:
    """The CSAT report (no WeCom access: the admin API builds one from the engine)."""

    def __init__(self, repo: CsatRepository, *, default_team: str | None = None) -> None:
        self.repo = repo
        self._default_team = default_team

    async def csat_report(self, since: datetime, until: datetime, team: str | None = None) -> CsatReport:
        """Asked (delivered), skipped, answered, average and share of 4–5 in [since, until), per team and agent.

        A conversation never handed to a team counts under the default team.
        """
        rows = await self.repo.report(since, until, team, default_team=self._default_team)
        teams: dict[str, CsatFigures] = {}
        agents: dict[tuple[str, int | None], AgentFigures] = {}
        total = CsatFigures()
        for row in rows:
            figures = _figures(row)
            name = row.team or ""
            total = total.plus(figures)
            teams[name] = teams.get(name, CsatFigures()).plus(figures)
            known = agents.get((name, row.agent_id))  # a team-less row merged into the default team's
            merged = known.figures.plus(figures) if known is not None else figures
            agents[(name, row.agent_id)] = AgentFigures(row.agent_id, row.agent_username, row.agent_name, name, merged)
        ordered = sorted(agents.values(), key=lambda a: (a.team, a.agent_id is None, a.agent_id or 0))
        return CsatReport(since, until, team, total, teams, ordered)


def _figures(row: CsatReportRow) -> CsatFigures:
    return CsatFigures(row.asked, row.skipped, row.answered, row.score_sum, row.satisfied)


class CsatService(CsatReporter):
    """Ask once per resolved conversation, record the first answer, report."""

    def __init__(
        self,
        repo: CsatRepository,
        repos: Repositories,
        sender: ReplySender,
        clock: Clock,
        *,
        default_team: str | None = None,
        answer_window_s: float = ANSWER_WINDOW_S,
    ) -> None:
        super().__init__(repo, default_team=default_team)
        self.repos = repos
        self._sender = sender
        self._clock = clock
        self._answer_window_s = answer_window_s

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), UTC)

    # ------------------------------------------------------------------ asking

    async def ask(
        self, conversation_id: int, end_msg_code: str | None, *, code_issued_at: float | None = None
    ) -> AskOutcome:
        """Send the survey of a resolved conversation, at most once; never raises for WeCom's answers.

        `end_msg_code`: the msg_code of the move to 4 (resolve's trans, or the session_status_change event);
        None for a session the API still has (0/1), then kf/send_msg is used if the state, window and quota allow.
        `code_issued_at`: when the code was issued (the event's send_time), if known; default now.
        """
        conversation = await self.repo.conversation(conversation_id)
        if (
            conversation is None
            or conversation.channel is not Channel.KF
            or conversation.status != ConversationStatus.RESOLVED.value
        ):
            return AskOutcome(AskStatus.NOT_APPLICABLE, conversation_id)
        if end_msg_code is None and conversation.kf_service_state not in KF_API_STATES:
            # Only the holder of the end code can still reach this customer: this call must not take the
            # conversation's one survey from it (no row, nothing stored; the code holder asks).
            log.warning(
                "csat survey not sent: no end code and the kf session is not the API's",
                conversation_id=conversation_id,
                kf_state=conversation.kf_service_state,
            )
            return AskOutcome(AskStatus.SKIPPED, conversation_id, SkipReason.KF_STATE.value)
        survey_id = await self.repo.claim(conversation_id, conversation.assignee_id)
        if survey_id is None:
            log.info("csat survey already asked", conversation_id=conversation_id)
            return AskOutcome(AskStatus.ALREADY_ASKED, conversation_id)
        reason = await self._precheck(conversation, end_msg_code, code_issued_at)
        if reason is not None:
            return await self._skip(conversation, reason, with_code=end_msg_code is not None)
        reply = OutboundMessage(
            channel=Channel.KF,
            to=conversation.external_id,
            account_id=conversation.account_id,
            msgtype="msgmenu",
            content=survey_menu(),
            welcome_code=end_msg_code,
        )
        key = survey_key(conversation_id)
        try:
            await self._sender.send(reply, key)
        except WeComApiError as exc:
            return await self._skip(
                conversation, SkipReason.REFUSED, with_code=end_msg_code is not None, errcode=exc.errcode
            )
        except Exception as exc:  # the code is single-use and lives 20 s: a later retry would not help
            return await self._skip(
                conversation, SkipReason.SEND_FAILED, with_code=end_msg_code is not None, error=type(exc).__name__
            )
        await self.repos.messages.record_outbound_message(
            reply, key, sent_at=self._now(), conversation_id=conversation_id
        )
        log.info(
            "csat survey sent",
            conversation_id=conversation_id,
            survey_id=survey_id,
            via="send_msg_on_event" if end_msg_code else "send_msg",
        )
        return AskOutcome(AskStatus.SENT, conversation_id)

    async def _precheck(
        self, conversation: CsatConversation, code: str | None, code_issued_at: float | None
    ) -> SkipReason | None:
        now = self._clock.now()
        if code is not None:
            issued = code_issued_at if code_issued_at is not None else now
            return SkipReason.CODE_EXPIRED if now - issued >= END_CODE_TTL_S else None
        last = conversation.last_inbound_at
        if last is None or now - last.timestamp() >= KF_WINDOW_S:
            return SkipReason.WINDOW_48H
        sent = await self.repo.sent_since(conversation.channel, conversation.account_id, conversation.customer_id, last)
        if sent >= KF_MAX_REPLIES_PER_MESSAGE:
            return SkipReason.QUOTA
        return None

    async def _skip(
        self, conversation: CsatConversation, reason: SkipReason, *, with_code: bool, **detail: Any
    ) -> AskOutcome:
        stored = {"via": "send_msg_on_event" if with_code else "send_msg", "kf_state": conversation.kf_service_state}
        stored.update({k: v for k, v in detail.items() if v is not None})
        log.warning("csat survey not sent", conversation_id=conversation.id, reason=reason.value, **stored)
        await self.repo.record_skip(conversation.id, reason.value, stored)
        return AskOutcome(AskStatus.SKIPPED, conversation.id, reason.value, detail.get("errcode"))

    # ------------------------------------------------------------------ answers

    async def record_answer(self, message: InboundMessage, customer_id: int) -> CsatAnswer:
        """A click on the survey (kf text with menu_id `csat:N`): store the score once, first answer wins."""
        score = parse_score(message.menu_id)
        if score is None:
            log.info("csat answer with an unknown menu id", menu_id=(message.menu_id or "")[:32])
            return CsatAnswer(AnswerStatus.INVALID)
        after = self._now() - timedelta(seconds=self._answer_window_s)
        survey = await self.repo.latest_delivered(message.channel, message.account_id, customer_id, after)
        if survey is None:
            log.info("csat answer without a survey", customer_id=customer_id, score=score)
            return CsatAnswer(AnswerStatus.NO_SURVEY, score)
        if await self.repo.answer(survey.id, score):
            log.info(
                "csat answer recorded",
                conversation_id=survey.conversation_id,
                agent_id=survey.agent_id,
                score=score,
                satisfied=satisfied(score),
            )
            return CsatAnswer(AnswerStatus.RECORDED, score, survey.id, survey.conversation_id)
        log.info("csat answer ignored: already answered", conversation_id=survey.conversation_id, score=score)
        return CsatAnswer(AnswerStatus.ALREADY_ANSWERED, score, survey.id, survey.conversation_id)


if TYPE_CHECKING:
    from bot.pipeline import CsatPort

    def _is_a_pipeline_port(service: CsatService) -> CsatPort:
        return service


__all__: Sequence[str] = [
    "AnswerStatus",
    "AskOutcome",
    "AskStatus",
    "CsatAnswer",
    "CsatFigures",
    "CsatReport",
    "CsatReporter",
    "CsatService",
    "SkipReason",
    "survey_key",
]
