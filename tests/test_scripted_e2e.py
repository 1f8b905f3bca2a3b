"""Transcripts with the script library (话术库): a customer with tags X writes Y → exactly this variant is sent.

Through the whole stack (simulator → encrypted callback → queue → worker → WeCom API) on both backends, plus the
pipeline harness with an injected clock for cooldowns and kf service states. Expected replies are rendered from
the packaged library with its public API, so a copy edit in the YAML does not break these tests, while a wrong
script, variant or API does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from bot.app import ScriptBook, ScriptLibraryError, open_services
from bot.storage.models import AnswerStatus, ConversationStatus, MessageStatus
from bot.storage.repositories import AnswerRecord
from bot.wecom.parse import kf_message_to_inbound
from bot.wecom.simulator import (
    push_app_message,
    push_contact_change,
    push_kf_customer_message,
    push_kf_enter_session,
)
from handlers.domain import Channel
from handlers.tags import TagSource
from scripts_library import Library, Matcher, Query, Rendered, choose_variant, load_library, render
from tests.conftest import Backend, make_settings
from tests.test_e2e import DEADLINE_S, Stack, open_stack, until
from tests.test_kf_sync import KFID, Harness, callback_token, open_harness

LIBRARY = load_library()
assert isinstance(LIBRARY, Library), LIBRARY
MATCHER = Matcher(LIBRARY)


def rendered(script_id: str, variant: str | None = None, **values: str) -> list[Rendered]:
    """What the packaged library renders for a script's variant (the only one when variant is None)."""
    script = LIBRARY.get(script_id)
    assert script is not None, script_id
    if variant is None:
        [chosen] = script.variants
    else:
        [chosen] = [v for v in script.variants if v.name == variant]
    return render(LIBRARY, script, chosen, values)


def reply_text(script_id: str, variant: str | None = None, **values: str) -> str:
    """The text of a script's single text reply."""
    [item] = rendered(script_id, variant, **values)
    assert item.msgtype == "text"
    return str(item.content["content"])


def expected_ab_variant(script_id: str, customer: str, tags: frozenset[str] = frozenset()) -> str:
    script = LIBRARY.get(script_id)
    assert script is not None
    return choose_variant(script, tags, customer)[0].name


# ------------------------------------------------------------------------------------------- full stack


@pytest.fixture
async def stack(backend: Backend) -> AsyncIterator[Stack]:
    async with open_stack(backend) as opened:
        yield opened


async def customer_row(stack: Stack, channel: Channel, external_id: str) -> int:
    """Wait for the customer row the pipeline creates, and return its id."""
    found: dict[str, int] = {}

    async def exists() -> bool:
        customer = await stack.services.repos.conversations.get_customer(channel, external_id)
        if customer is not None:
            found["id"] = customer.id
        return customer is not None

    await until(exists, f"customer {external_id} to be stored")
    return found["id"]


async def opened_chat(stack: Stack, customer: str, tags: set[str]) -> int:
    """The customer opens the kf chat (no welcome code, so no welcome), then gets tags; returns the row id."""
    push_kf_enter_session(stack.sim, customer, welcome_code=False)
    customer_id = await customer_row(stack, Channel.KF, customer)
    if tags:
        await stack.services.repos.tags.replace_tags(customer_id, TagSource.BOT, tags)
    return customer_id


async def answers_of(stack: Stack, customer_id: int, count: int) -> list[AnswerRecord]:
    got: list[AnswerRecord] = []

    async def recorded() -> bool:
        got[:] = await stack.services.repos.answers.answers_for_customer(customer_id)
        return len(got) >= count

    await until(recorded, f"{count} answer(s) to be recorded")
    return got


# What a customer first seen now is computed to be, before the script for their first message is chosen.
NEWCOMER = frozenset({"新用户", "潜客", "rfm:none", "lifecycle:new", "activity:active"})
# An established, active customer: no SOP class, so only the A/B (or default) variants apply.
ESTABLISHED = frozenset({"rfm:low", "lifecycle:growing", "activity:active"})


async def established(stack: Stack, customer_id: int) -> None:
    """Once the pipeline has computed the customer's tags, make them an established, active customer."""

    async def computed() -> bool:
        return TagSource.COMPUTED in await stack.services.repos.tags.tags_by_source(customer_id)

    await until(computed, "the computed tags of the first contact")
    await stack.services.repos.tags.replace_tags(customer_id, TagSource.COMPUTED, ESTABLISHED)


def bodies(sent: list[Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    return [(s.api, s.msgtype, s.content) for s in sent]


@pytest.mark.parametrize(
    ("tag", "variant"), [("高价值", "vip_advisor"), ("新用户", "first_order"), ("潜客", "first_order")]
)
async def test_tagged_customer_asking_price_gets_the_variant_for_the_tag(
    stack: Stack, tag: str, variant: str
) -> None:
    customer = f"wmPrice{variant}{len(tag)}"
    customer_id = await opened_chat(stack, customer, {tag})
    push_kf_customer_message(stack.sim, customer, "这个多少钱？")

    expected = rendered("price.inquiry", variant)
    sent = await stack.sim.wait_sent(0, count=len(expected), wait_s=DEADLINE_S, recipient=customer)
    [answer] = await answers_of(stack, customer_id, 1)

    assert bodies(stack.sim.sent_after(0, customer)) == [("kf/send_msg", r.msgtype, r.content) for r in expected]
    assert all(s.accepted for s in sent)
    assert (answer.script_id, answer.variant, answer.assignment) == ("price.inquiry", variant, "tag")
    assert answer.tags == {tag} | NEWCOMER and answer.status is AnswerStatus.SENT
    assert answer.replies == len(expected) and answer.channel is Channel.KF


async def test_kf_enter_session_gets_the_welcome_through_send_msg_on_event(stack: Stack) -> None:
    _item, code, _delivery = push_kf_enter_session(stack.sim, "wmWelcome", welcome_code=True)
    assert code is not None
    sent = await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="wmWelcome")
    customer_id = await customer_row(stack, Channel.KF, "wmWelcome")
    [answer] = await answers_of(stack, customer_id, 1)

    # A customer first seen now is a 新用户 by the time the welcome is chosen.
    [expected] = rendered("welcome.kf_session", "newcomer")
    assert bodies(sent) == [("kf/send_msg_on_event", "msgmenu", expected.content)]
    assert sent[0].accepted
    assert (answer.script_id, answer.variant, answer.status) == ("welcome.kf_session", "newcomer", AnswerStatus.SENT)
    assert [s.api for s in stack.sim.sent_after(0, "wmWelcome")] == ["kf/send_msg_on_event"]


async def test_contact_added_with_a_welcome_code_gets_send_welcome_msg(stack: Stack) -> None:
    code, _delivery = push_contact_change(stack.sim, "add_external_contact", "zhangsan", "wmContactNew")
    assert code is not None
    sent = await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="wmContactNew")
    customer_id = await customer_row(stack, Channel.CONTACT, "wmContactNew")
    [answer] = await answers_of(stack, customer_id, 1)

    text = reply_text("welcome.contact_added", "newcomer")  # added just now: a 新用户 before the welcome is chosen
    welcome = {"text": {"content": text}, "attachments": []}
    assert bodies(sent) == [("externalcontact/send_welcome_msg", "welcome", welcome)]
    assert sent[0].accepted
    assert (answer.script_id, answer.variant, answer.channel) == ("welcome.contact_added", "newcomer", Channel.CONTACT)


async def test_contact_added_without_a_welcome_code_sends_nothing_and_says_why(stack: Stack) -> None:
    push_contact_change(stack.sim, "add_external_contact", "lisi", "wmContactOld", welcome_code=False)
    customer_id = await customer_row(stack, Channel.CONTACT, "wmContactOld")

    async def handled() -> bool:
        return (
            await stack.services.repos.messages.count_messages(channel=Channel.CONTACT, status=MessageStatus.HANDLED)
            == 1
        )

    await until(handled, "the event to be handled")
    assert stack.sim.sent_after(0, "wmContactOld") == []
    assert not [c for c in stack.sim.calls if c.path.endswith("send_welcome_msg")]
    assert await stack.services.repos.answers.answers_for_customer(customer_id) == []
    conversation = await stack.services.repos.conversations.active_conversation(
        Channel.CONTACT, "lisi", customer_id
    )
    assert conversation is not None
    [event] = await stack.services.repos.messages.conversation_messages(conversation.id)
    assert event.handler == "contact_added_without_welcome_code"  # the stored reason nothing was sent


async def test_no_match_gets_the_polite_answer(stack: Stack) -> None:
    customer_id = await opened_chat(stack, "wmNoMatch", set())
    push_kf_customer_message(stack.sim, "wmNoMatch", "今天天气怎么样")
    sent = await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="wmNoMatch")
    [answer] = await answers_of(stack, customer_id, 1)

    assert bodies(sent) == [("kf/send_msg", "text", {"content": reply_text("fallback.no_match")})]
    assert answer.script_id == "fallback.no_match"


async def test_kf_menu_click_answers_with_the_menu_script(stack: Stack) -> None:
    customer_id = await opened_chat(stack, "wmMenuClick", {"高价值"})
    push_kf_customer_message(stack.sim, "wmMenuClick", "商品价格与优惠", menu_id="menu_price")
    sent = await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="wmMenuClick")
    [answer] = await answers_of(stack, customer_id, 1)

    [expected] = rendered("price.inquiry", "vip_advisor")
    assert bodies(sent) == [("kf/send_msg", "text", expected.content)]
    assert (answer.script_id, answer.variant) == ("price.inquiry", "vip_advisor")


async def test_ab_assignment_is_sticky_across_messages_and_recorded(stack: Stack) -> None:
    customers = ["wmAbOne", "wmAbTwo", "wmAbThree", "wmAbFour"]
    variants = {c: expected_ab_variant("price.inquiry", c) for c in customers}
    assert len(set(variants.values())) == 2, "the sample should cover both arms of the test"
    ids = {c: await opened_chat(stack, c, set()) for c in customers}
    for customer_id in ids.values():
        await established(stack, customer_id)  # a newcomer would get the first-order variant instead
    for text in ("这个多少钱？", "价格是多少"):
        for customer in customers:
            push_kf_customer_message(stack.sim, customer, text)
    for customer in customers:
        sent = await stack.sim.wait_sent(0, count=2, wait_s=DEADLINE_S, recipient=customer)
        answers = await answers_of(stack, ids[customer], 2)
        expected = rendered("price.inquiry", variants[customer])
        assert bodies(sent) == [("kf/send_msg", r.msgtype, r.content) for r in expected] * 2
        assert [(a.script_id, a.variant, a.assignment) for a in answers] == [
            ("price.inquiry", variants[customer], "ab")
        ] * 2


async def test_app_message_gets_a_scripted_answer_through_message_send(stack: Stack) -> None:
    push_app_message(stack.sim, "zhangsan", "你好")
    sent = await stack.sim.wait_sent(0, count=1, wait_s=DEADLINE_S, recipient="zhangsan")
    customer_id = await customer_row(stack, Channel.APP, "zhangsan")
    [answer] = await answers_of(stack, customer_id, 1)
    assert bodies(sent) == [("message/send", "text", {"content": reply_text("greeting.hello", "default")})]
    assert answer.script_id == "greeting.hello" and answer.tags == frozenset()


# ------------------------------------------------------------------------------------------- harness


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        yield harness


async def say(h: Harness, customer: str, text: str) -> int:
    """The customer writes and the pipeline handles it; returns the inbound message's row id."""
    item, delivery = push_kf_customer_message(h.sim, customer, text)
    await h.puller().pull(KFID, callback_token(delivery))
    pipeline = h.pipeline()
    for entry in await h.take():
        await pipeline.process(entry)
    record = await h.services.repos.messages.record_inbound(kf_message_to_inbound(item))
    assert record.status is MessageStatus.HANDLED
    return record.id


async def test_cooldown_suppresses_a_repeat_inside_its_window(h: Harness) -> None:
    script = LIBRARY.get("promo.coupon")
    assert script is not None and script.cooldown_seconds > 0
    coupon = reply_text("promo.coupon")
    # What the library answers instead while the coupon script cools down (computed, not assumed).
    instead = MATCHER.match(
        Query(text="有优惠券吗", customer_id="wmCool", now=h.clock.now(), last_sent=lambda _s: h.clock.now())
    )
    assert instead is not None and instead.script.id != "promo.coupon"

    first = await say(h, "wmCool", "有优惠券吗")
    h.clock.advance(script.cooldown_seconds - 60)
    second = await say(h, "wmCool", "有优惠券吗")
    h.clock.advance(120)  # now past the cooldown
    third = await say(h, "wmCool", "有优惠券吗")

    contents = [s.content for s in h.sim.sent_after(0, "wmCool")]
    expected_instead = [r.content for r in render(LIBRARY, instead.script, instead.variant, {})]
    assert contents == [{"content": coupon}, *expected_instead, {"content": coupon}]
    answers = h.services.repos.answers
    assert [a.script_id for a in await answers.answers_for(first)] == ["promo.coupon"]
    assert [a.script_id for a in await answers.answers_for(second)] == [instead.script.id]
    assert [a.script_id for a in await answers.answers_for(third)] == ["promo.coupon"]


@pytest.mark.parametrize("state", [2, 3, 4])
async def test_no_kf_send_while_the_session_is_not_the_bots(h: Harness, state: int) -> None:
    await say(h, "wmHuman", "你好")  # answered: the session is the bot's
    customer = await h.services.repos.conversations.get_customer(Channel.KF, "wmHuman")
    assert customer is not None
    conversation = await h.services.repos.conversations.active_conversation(Channel.KF, KFID, customer.id)
    assert conversation is not None
    await h.services.repos.conversations.set_conversation_status(
        conversation.id, ConversationStatus.OPEN, kf_service_state=state
    )
    calls_before = len([c for c in h.sim.calls if c.path.endswith("kf/send_msg")])

    message_id = await say(h, "wmHuman", "你好")

    assert len([c for c in h.sim.calls if c.path.endswith("kf/send_msg")]) == calls_before
    assert len(h.sim.sent_after(0, "wmHuman")) == 1
    [answer] = await h.services.repos.answers.answers_for(message_id)
    assert answer.status is AnswerStatus.SUPPRESSED
    assert await h.services.repos.outbox.replies_for(message_id) == []
    # A suppressed answer does not count as sent for cooldowns.
    sent_times = await h.services.repos.answers.last_sent_times(customer.id)
    assert set(sent_times) == {"greeting.hello"}


# ------------------------------------------------------------------------------------------- start-up


def _write_library(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scripts.yaml").write_text(text, encoding="utf-8")
    return folder


GOOD = """\
scripts:
  - id: only.hello
    title: 打招呼
    triggers:
      phrases: [你好]
    reply:
      - text: "你好呀"
"""

BAD = """\
scripts:
  - id: dup
    title: a
    triggers: {phrases: [a]}
    reply: [{text: "a {no_such_placeholder}"}]
  - id: dup
    title: b
    triggers: {phrases: [b]}
    reply: [{text: "b"}]
"""


async def test_an_invalid_library_stops_start_up_naming_scripts_path(tmp_path: Path) -> None:
    folder = _write_library(tmp_path / "lib", BAD)
    settings = make_settings(None, scripts_path=str(folder), database_url=f"sqlite:///{tmp_path}/x.sqlite3")
    with pytest.raises(ScriptLibraryError) as info:
        async with open_services(settings):
            pytest.fail("start-up should have stopped")
    message = str(info.value)
    assert message.startswith("SCRIPTS_PATH:") and str(folder) in message
    assert "scripts.yaml:" in message and len(info.value.problems) >= 2


def test_reload_swaps_atomically_and_keeps_the_last_good_library(tmp_path: Path) -> None:
    folder = _write_library(tmp_path / "lib", GOOD)
    book = ScriptBook.load(folder)
    before = book.matcher
    assert [s.id for s in book.library.scripts] == ["only.hello"]

    _write_library(folder, BAD)
    assert book.reload() is False
    assert book.matcher is before and book.last_problems  # still serving the last good one, and why not

    _write_library(folder, GOOD.replace("only.hello", "only.hi"))
    assert book.reload() is True
    assert [s.id for s in book.library.scripts] == ["only.hi"] and not book.last_problems
