"""CSAT: a 1–5 survey (kf msgmenu) after resolution, once per conversation, stored and reported.

Transcripts against the simulator (real msg_code rules: single use, 20 s, only in the state issued) on both
backends, through the pipeline with a ManualClock (no sleeps), as tests/test_handoff.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.app import Services, build_dispatcher, create_app, open_services
from bot.auth import new_token, token_hash
from bot.csat import AskStatus, CsatService, SkipReason
from bot.outbound import WeComSender
from bot.pipeline import CSAT_HANDLER, Pipeline
from bot.storage.csat_repository import SKIPPED_ACTION, CsatRepository, conversation_target
from bot.storage.db import create_session_factory
from bot.storage.models import ConversationStatus, MessageStatus, StaffRole
from bot.wecom.parse import kf_message_to_inbound
from bot.wecom.simulator import push_kf_customer_message, push_kf_event
from handlers.csat import (
    CLICK_CONTENT_MAX_BYTES,
    CLICK_ID_MAX_BYTES,
    EVENT_MENU_MAX_ITEMS,
    HEAD_TAIL_MAX_BYTES,
    THANKS_TEXT,
    THANKS_TEXT_LOW,
    SurveyMenuError,
    check_menu,
    parse_score,
    survey_menu,
)
from handlers.domain import Channel, InboundMessage, SystemClock
from tests.conftest import TEST_KF_SECRET, TEST_SECRET, Backend, make_settings
from tests.test_handoff import Desk, open_desk
from tests.test_kf_sync import KFID, callback_token

# ------------------------------------------------------------------------------------------- the pure part


def test_the_survey_is_five_click_items_best_first_within_the_platform_limits() -> None:
    menu = survey_menu()
    check_menu(menu)
    items = [(i["click"]["id"], i["click"]["content"]) for i in menu["list"]]
    assert items == [
        ("csat:5", "非常满意"),
        ("csat:4", "满意"),
        ("csat:3", "一般"),
        ("csat:2", "不满意"),
        ("csat:1", "非常不满意"),
    ]
    assert all(i["type"] == "click" for i in menu["list"]) and len(items) <= EVENT_MENU_MAX_ITEMS
    assert all(
        len(i.encode()) <= CLICK_ID_MAX_BYTES and 1 <= len(c.encode()) <= CLICK_CONTENT_MAX_BYTES for i, c in items
    )
    assert menu["head_content"] and len(menu["head_content"].encode()) <= HEAD_TAIL_MAX_BYTES
    assert menu["tail_content"] and len(menu["tail_content"].encode()) <= HEAD_TAIL_MAX_BYTES


def test_menu_limits_are_enforced() -> None:
    with pytest.raises(SurveyMenuError):
        survey_menu(head="长" * 400)  # 1200 bytes
    with pytest.raises(SurveyMenuError):
        survey_menu(labels=[(5, "")])
    with pytest.raises(SurveyMenuError):
        survey_menu(labels=[(5, "好" * 43)])  # 129 bytes
    eleven = {"list": [{"type": "click", "click": {"id": f"x{n}", "content": "a"}} for n in range(11)]}
    with pytest.raises(SurveyMenuError):
        check_menu(eleven)


@pytest.mark.parametrize(
    ("menu_id", "score"),
    [
        ("csat:1", 1),
        ("csat:5", 5),
        ("csat:0", None),
        ("csat:6", None),
        ("csat:x", None),
        ("csat:55", None),
        ("menu:5", None),
        (None, None),
        ("", None),
    ],
)
def test_menu_ids_parse_back_to_scores(menu_id: str | None, score: int | None) -> None:
    assert parse_score(menu_id) == score


# ------------------------------------------------------------------------------------------- transcripts


@dataclass
class CsatDesk:
    desk: Desk
    csat: CsatService
    repo: CsatRepository

    @property
    def sim(self) -> Any:
        return self.desk.sim

    def surveys(self, customer: str) -> list[tuple[str, dict[str, Any]]]:
        return [(api, c) for api, t, c in self.desk.sent(customer) if t == "msgmenu"]

    def texts(self, customer: str) -> list[str]:
        return [c["content"] for api, t, c in self.desk.sent(customer) if t == "text" and api == "kf/send_msg"]

    def menu_calls(self) -> list[Any]:
        return [s for s in self.sim.sent_after(0) if s.msgtype == "msgmenu"]

    def new_service(self) -> CsatService:
        """Another process: its own service over the same database."""
        h = self.desk.h
        sessions = create_session_factory(h.services.engine)
        sender = WeComSender(h.client(TEST_SECRET), h.client(TEST_KF_SECRET), h.services.settings.wecom_agent_id)
        return CsatService(CsatRepository(sessions, h.clock), h.services.repos, sender, h.clock)

    async def handed_to(self, customer: str, agent: str = "zhangsan") -> int:
        conversation_id = await self.desk.say(customer, "转人工")
        assert self.desk.kf(customer) == (3, agent)
        return conversation_id

    async def click(self, customer: str, score_label: str, menu_id: str) -> int:
        return await self.desk.say(customer, score_label, menu_id=menu_id)

    async def run_event(self, fields: dict[str, Any], *, advance: float = 0.0) -> None:
        _item, delivery = push_kf_event(self.sim, "session_status_change", fields)
        self.desk.h.clock.advance(advance)
        await self.desk.h.puller().pull(KFID, callback_token(delivery))
        for entry in await self.desk.h.take():
            await self.desk.pipeline.process(entry)


@contextlib.asynccontextmanager
async def open_csat(backend: Backend) -> AsyncIterator[CsatDesk]:
    async with open_desk(backend) as desk:
        h = desk.h
        sessions = create_session_factory(h.services.engine)
        repo = CsatRepository(sessions, h.clock)
        sender = WeComSender(h.client(TEST_SECRET), h.client(TEST_KF_SECRET), h.services.settings.wecom_agent_id)
        csat = CsatService(repo, h.services.repos, sender, h.clock, default_team="support")
        desk.pipeline = Pipeline(
            h.services.repos,
            build_dispatcher(),
            sender,
            h.puller(),
            h.clock,
            scripts=h.services.scripts,
            handoff=desk.service,
            csat=csat,
        )
        yield CsatDesk(desk, csat, repo)


@pytest.fixture
async def cd(backend: Backend) -> AsyncIterator[CsatDesk]:
    async with open_csat(backend) as opened:
        yield opened


async def test_resolve_sends_one_survey_with_the_end_code_and_the_first_click_is_stored_once(cd: CsatDesk) -> None:
    zhang = await cd.desk.agent("zhangsan")
    conversation_id = await cd.handed_to("wmHappy")
    result = await cd.desk.service.resolve(conversation_id)
    assert result.resolved and result.end_msg_code
    # The line the console's resolve action runs, right after resolve (the code lives 20 s).
    outcome = await cd.csat.ask(conversation_id, result.end_msg_code)
    assert outcome.status is AskStatus.SENT

    [(api, menu)] = cd.surveys("wmHappy")
    assert api == "kf/send_msg_on_event" and menu == survey_menu()
    [code_use] = [s for s in cd.menu_calls() if s.accepted]
    assert cd.sim.kf_codes[result.end_msg_code].used and code_use.api == "kf/send_msg_on_event"
    survey = await cd.repo.survey_of(conversation_id)
    assert survey is not None and survey.agent_id == zhang and survey.score is None

    answer_conversation = await cd.click("wmHappy", "非常满意", "csat:5")
    assert answer_conversation != conversation_id  # the resolved conversation stays resolved
    survey = await cd.repo.survey_of(conversation_id)
    assert survey is not None and survey.score == 5 and survey.answered_at is not None
    assert cd.texts("wmHappy")[-1] == THANKS_TEXT
    messages = await cd.desk.h.services.repos.messages.conversation_messages(answer_conversation)
    assert [m.handler for m in messages if m.direction.value == "in"] == [CSAT_HANDLER]
    texts_before = len(cd.texts("wmHappy"))

    # A second click is ignored (not an error): the first answer stays, no second thanks.
    await cd.click("wmHappy", "非常不满意", "csat:1")
    survey = await cd.repo.survey_of(conversation_id)
    assert survey is not None and survey.score == 5
    assert len(cd.texts("wmHappy")) == texts_before
    # Neither click ran the scripts nor the handoff triggers.
    row = await cd.desk.repo.conversation(answer_conversation)
    assert row is not None and row.status is ConversationStatus.BOT and row.no_match_streak == 0


async def test_a_retried_answer_entry_records_once_and_thanks_once(cd: CsatDesk) -> None:
    await cd.desk.agent("zhangsan")
    conversation_id = await cd.handed_to("wmRetry")
    result = await cd.desk.service.resolve(conversation_id)
    await cd.csat.ask(conversation_id, result.end_msg_code)

    item, delivery = push_kf_customer_message(cd.sim, "wmRetry", "不满意", menu_id="csat:2")
    await cd.desk.h.puller().pull(KFID, callback_token(delivery))
    [entry] = await cd.desk.h.take()
    await cd.desk.pipeline.process(entry)
    record = await cd.desk.h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    await cd.desk.h.services.repos.messages.mark_status(record.id, MessageStatus.RECEIVED)  # as if it crashed
    await cd.desk.pipeline.process(entry)
    await cd.desk.pipeline.process(entry)  # and once more, handled this time

    survey = await cd.repo.survey_of(conversation_id)
    assert survey is not None and survey.score == 2
    assert cd.texts("wmRetry").count(THANKS_TEXT_LOW) == 1
    assert not [c for c in cd.sim.calls if c.errcode not in (None, 0)]


async def test_resolving_twice_or_two_processes_asking_send_one_survey(cd: CsatDesk) -> None:
    await cd.desk.agent("zhangsan")
    conversation_id = await cd.handed_to("wmTwice")
    first = await cd.desk.service.resolve(conversation_id)
    second = await cd.desk.service.resolve(conversation_id)
    assert first.resolved and not second.resolved and second.end_msg_code is None

    other = cd.new_service()
    outcomes = await asyncio.gather(
        cd.csat.ask(conversation_id, first.end_msg_code),
        other.ask(conversation_id, first.end_msg_code),
        cd.csat.ask(conversation_id, second.end_msg_code),
    )
    # The console's line asks only when resolve says resolved; a codeless call for an ended session takes no row.
    assert sorted(o.status.value for o in outcomes) == ["already_asked", "sent", "skipped"]
    assert outcomes[2].reason == "kf_state"
    assert len(cd.surveys("wmTwice")) == 1
    assert len(cd.menu_calls()) == 1  # the losers never called WeCom


async def test_an_expired_end_code_is_not_tried_and_the_reason_is_stored(cd: CsatDesk) -> None:
    await cd.desk.agent("zhangsan", capacity=5)
    late = await cd.handed_to("wmLate")
    result = await cd.desk.service.resolve(late)
    issued_at = cd.desk.h.clock.now()
    cd.desk.h.clock.advance(21)

    outcome = await cd.csat.ask(late, result.end_msg_code, code_issued_at=issued_at)
    assert (outcome.status, outcome.reason) == (AskStatus.SKIPPED, SkipReason.CODE_EXPIRED.value)
    assert cd.menu_calls() == []  # WeCom was not called
    survey = await cd.repo.survey_of(late)
    assert survey is not None and survey.score is None  # the row stays: nobody asks again
    assert await cd.repo.skip_reason(late) == "code_expired"
    [audit] = await cd.desk.h.services.repos.audit.recent(target=conversation_target(late))
    assert audit.action == SKIPPED_ACTION and audit.actor == "bot"
    assert (await cd.csat.ask(late, result.end_msg_code)).status is AskStatus.ALREADY_ASKED

    # Without the issue time the call is made, and WeCom's refusal (95002 past the window) is stored.
    refused = await cd.handed_to("wmLate2")
    result2 = await cd.desk.service.resolve(refused)
    cd.desk.h.clock.advance(20)
    outcome = await cd.csat.ask(refused, result2.end_msg_code)
    assert (outcome.status, outcome.reason, outcome.errcode) == (AskStatus.SKIPPED, "refused", 95002)
    assert [s.errcode for s in cd.menu_calls()] == [95002]
    assert await cd.repo.skip_reason(refused) == "refused"
    # A customer who clicks an old menu of a skipped survey changes nothing.
    await cd.click("wmLate", "满意", "csat:4")
    survey = await cd.repo.survey_of(late)
    assert survey is not None and survey.score is None


async def test_a_servicer_ending_the_session_in_wecom_asks_with_the_event_code(cd: CsatDesk) -> None:
    await cd.desk.agent("zhangsan")
    conversation_id = await cd.handed_to("wmClient")
    code = end_in_wecom(cd, "wmClient")
    await cd.run_event(end_event("wmClient", code))

    row = await cd.desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.RESOLVED
    [(api, menu)] = cd.surveys("wmClient")
    assert api == "kf/send_msg_on_event" and menu == survey_menu() and cd.sim.kf_codes[code].used

    await cd.click("wmClient", "满意", "csat:4")
    survey = await cd.repo.survey_of(conversation_id)
    assert survey is not None and survey.score == 4


async def test_an_end_event_pulled_after_20_seconds_sends_nothing(cd: CsatDesk) -> None:
    await cd.desk.agent("zhangsan")
    conversation_id = await cd.handed_to("wmSlow")
    code = end_in_wecom(cd, "wmSlow")
    await cd.run_event(end_event("wmSlow", code), advance=25)

    row = await cd.desk.repo.conversation(conversation_id)
    assert row is not None and row.status is ConversationStatus.RESOLVED
    assert cd.menu_calls() == [] and not cd.sim.kf_codes[code].used
    assert await cd.repo.skip_reason(conversation_id) == "code_expired"


async def test_a_console_mode_resolve_without_a_code_asks_with_send_msg(cd: CsatDesk) -> None:
    services = cd.desk.h.services
    user = await services.repos.staff.add_user("console1", StaffRole.AGENT, display_name="工作台客服", team="support")
    await cd.desk.repo.set_agent_profile(user.id, capacity=5)
    await cd.desk.repo.set_presence(user.id, "online")
    conversation_id = await cd.desk.say("wmConsole", "转人工")
    row = await cd.desk.repo.conversation(conversation_id)
    assert row is not None and row.assignee_id == user.id and cd.desk.kf("wmConsole")[0] in (0, 1)

    result = await cd.desk.service.resolve(conversation_id)
    assert result.resolved and result.end_msg_code is None
    outcome = await cd.csat.ask(conversation_id, result.end_msg_code)
    assert outcome.status is AskStatus.SENT
    [(api, menu)] = cd.surveys("wmConsole")
    assert api == "kf/send_msg" and menu == survey_menu()


async def test_no_code_and_the_session_ended_or_out_of_the_48h_window_is_skipped(cd: CsatDesk) -> None:
    await cd.desk.agent("zhangsan")
    conversation_id = await cd.handed_to("wmNoCode")
    await cd.desk.service.resolve(conversation_id)  # the code is dropped: state 4, no send_msg possible
    outcome = await cd.csat.ask(conversation_id, None)
    assert (outcome.status, outcome.reason) == (AskStatus.SKIPPED, SkipReason.KF_STATE.value)
    assert cd.menu_calls() == []
    assert await cd.repo.survey_of(conversation_id) is None  # the end code's holder could still ask

    # Console mode (session left in 0/1) but the customer's last message is 48 h old: skipped, reason stored.
    services = cd.desk.h.services
    user = await services.repos.staff.add_user("console2", StaffRole.AGENT, display_name="工作台", team="support")
    await cd.desk.repo.set_agent_profile(user.id, capacity=5)
    await cd.desk.repo.set_presence(user.id, "online")
    zhang = await services.repos.staff.get_user("zhangsan")
    assert zhang is not None
    await cd.desk.repo.set_presence(zhang.id, "offline")
    old = await cd.desk.say("wmOld", "转人工")
    assert cd.desk.kf("wmOld")[0] in (0, 1)
    cd.desk.h.clock.advance(48 * 3600)
    assert (await cd.desk.service.resolve(old)).resolved
    outcome = await cd.csat.ask(old, None)
    assert (outcome.status, outcome.reason) == (AskStatus.SKIPPED, SkipReason.WINDOW_48H.value)
    assert await cd.repo.skip_reason(old) == "window_48h" and cd.menu_calls() == []


def end_in_wecom(cd: CsatDesk, customer: str) -> str:
    """What the simulator does not model by itself: a servicer ends the session in the WeCom client."""
    session = cd.sim.kf_sessions[(KFID, customer)]
    session.state, session.servicer_userid = 4, ""
    return str(cd.sim.new_kf_code("end", KFID, customer, 20, 4).code)


def end_event(customer: str, code: str) -> dict[str, Any]:
    return {"external_userid": customer, "change_type": 3, "old_servicer_userid": "zhangsan", "msg_code": code}


# ------------------------------------------------------------------------------------------- the report


async def _survey(
    cd: CsatDesk, customer: str, team: str | None, agent_id: int | None, score: int | None, *, skipped: bool = False
) -> int:
    """A resolved conversation with its survey row, straight through the repositories (the figures' inputs)."""
    repos = cd.desk.h.services.repos
    message = InboundMessage(
        channel=Channel.KF,
        msgid=f"m-{customer}",
        sender_id=customer,
        account_id=KFID,
        msgtype="text",
        created_at=int(cd.desk.h.clock.now()),
        text="hi",
        origin=3,
    )
    record = await repos.messages.record_inbound(message)
    assert record.conversation_id is not None
    conversation_id = record.conversation_id
    if team is not None:
        await cd.desk.repo.start_handoff(conversation_id, reason="phrase", team=team, priority="normal")
    await repos.conversations.set_conversation_status(conversation_id, ConversationStatus.RESOLVED)
    survey_id = await cd.repo.claim(conversation_id, agent_id)
    assert survey_id is not None
    if skipped:
        await cd.repo.record_skip(conversation_id, "code_expired", {})
    elif score is not None:
        assert await cd.repo.answer(survey_id, score)
    return conversation_id


async def test_report_figures_per_team_and_agent(cd: CsatDesk) -> None:
    zhang = await cd.desk.agent("zhangsan")
    li = await cd.desk.agent("lisi")
    for n, score in enumerate([5, 5, 4, 2]):
        await _survey(cd, f"wmZ{n}", "support", zhang, score)
    await _survey(cd, "wmL0", "support", li, 4)
    await _survey(cd, "wmL1", "support", li, None)  # asked, not answered
    await _survey(cd, "wmL2", "support", li, None, skipped=True)  # never delivered
    await _survey(cd, "wmV0", "vip", li, 1)
    await _survey(cd, "wmN0", None, None, 5)  # no team: counts under the default team

    now = datetime.fromtimestamp(cd.desk.h.clock.now(), UTC)
    report = await cd.csat.csat_report(now - timedelta(hours=1), now + timedelta(hours=1))
    total = report.total
    assert (total.asked, total.skipped, total.answered, total.score_sum, total.satisfied) == (8, 1, 7, 26, 5)
    assert total.average == round(26 / 7, 2) and total.satisfied_share == round(5 / 7, 4) and total.meets_bar is False
    support = report.teams["support"]
    assert (support.asked, support.answered, support.satisfied) == (7, 6, 5)
    assert support.average == round(25 / 6, 2) and support.response_rate == round(6 / 7, 4)
    vip = report.teams["vip"]
    assert (vip.asked, vip.answered, vip.average, vip.satisfied_share) == (1, 1, 1.0, 0.0)
    by_agent = {(a.team, a.username): a.figures for a in report.agents}
    z = by_agent[("support", "zhangsan")]
    assert (z.asked, z.answered, z.average, z.satisfied_share, z.meets_bar) == (4, 4, 4.0, 0.75, False)
    lsup = by_agent[("support", "lisi")]
    assert (lsup.asked, lsup.skipped, lsup.answered, lsup.average, lsup.meets_bar) == (2, 1, 1, 4.0, True)
    assert by_agent[("support", None)].answered == 1

    only_vip = await cd.csat.csat_report(now - timedelta(hours=1), now + timedelta(hours=1), "vip")
    assert list(only_vip.teams) == ["vip"] and only_vip.total.asked == 1
    with_default = await cd.csat.csat_report(now - timedelta(hours=1), now + timedelta(hours=1), "support")
    assert with_default.total.asked == 7
    empty = await cd.csat.csat_report(now + timedelta(hours=1), now + timedelta(hours=2))
    assert empty.total.asked == 0 and empty.total.average is None and empty.total.meets_bar is None


# ------------------------------------------------------------------------------------------- the endpoint


@dataclass
class ReportApi:
    client: TestClient
    services: Services
    tokens: dict[StaffRole, str]

    async def get(self, query: str, role: StaffRole) -> tuple[int, Any]:
        response = await self.client.get(
            f"/api/reports/csat?{query}", headers={"Authorization": f"Bearer {self.tokens[role]}"}
        )
        return response.status, await response.json()


@pytest.fixture
async def report_api(backend: Backend, tmp_path: Path) -> AsyncIterator[ReportApi]:
    settings = make_settings(backend, auto_migrate=True)
    async with open_services(settings, clock=SystemClock()) as services:
        tokens: dict[StaffRole, str] = {}
        for role in StaffRole:
            user = await services.repos.staff.add_user(f"u-{role.value}", role, team="support")
            tokens[role] = new_token()
            await services.repos.staff.add_token(user.id, "test", token_hash(tokens[role]))
        client = TestClient(TestServer(create_app(services, worker_count=0)))
        await client.start_server()
        try:
            yield ReportApi(client, services, tokens)
        finally:
            await client.close()


async def test_report_endpoint_is_for_leads_and_admins(report_api: ReportApi) -> None:
    services = report_api.services
    repo = CsatRepository(create_session_factory(services.engine), services.clock)
    lead = await services.repos.staff.get_user("u-lead")
    for n, score in enumerate([5, 3]):
        message = InboundMessage(
            channel=Channel.KF,
            msgid=f"api-{n}",
            sender_id=f"wmApi{n}",
            account_id=KFID,
            msgtype="text",
            created_at=int(services.clock.now()),
            text="hi",
            origin=3,
        )
        record = await services.repos.messages.record_inbound(message)
        assert record.conversation_id is not None
        survey_id = await repo.claim(record.conversation_id, getattr(lead, "id", None))
        assert survey_id is not None and await repo.answer(survey_id, score)

    today = date.today()
    query = f"since={(today - timedelta(days=1)).isoformat()}&until={(today + timedelta(days=1)).isoformat()}"
    status, body = await report_api.get(query, StaffRole.AGENT)
    assert status == 403 and body["error"] == "forbidden"
    status, body = await report_api.get(query, StaffRole.LEAD)
    assert status == 200
    assert body["total"] == {
        "asked": 2,
        "skipped": 0,
        "answered": 2,
        "average": 4.0,
        "satisfied_share": 0.5,
        "response_rate": 1.0,
        "meets_bar": False,
    }
    assert body["bar"] == 0.9 and [t["team"] for t in body["teams"]] == ["support"]
    assert (await report_api.get(query, StaffRole.ADMIN))[0] == 200
    assert (await report_api.get(f"{query}&team=vip", StaffRole.LEAD))[1]["total"]["asked"] == 0

    for bad in (
        "since=2024-13-01&until=2024-12-01",
        "since=2024-02-01",
        "since=2024-02-02&until=2024-02-01",
        "since=2020-01-01&until=2024-01-01",
        "since=20240101&until=2024-01-02",
    ):
        status, body = await report_api.get(bad, StaffRole.LEAD)
        assert status == 400 and body["error"] == "bad_field", bad
