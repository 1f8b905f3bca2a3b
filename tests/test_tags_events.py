"""Computed tags recomputed on the events that change them, not only by the daily job (issue 3).

- a customer's own message (before dispatch, so the script for that very message sees the new tags)
- an order import (CSV or records) for exactly the customers whose orders were imported
- 客户联系 add_external_contact (新用户 for a customer first seen now)

Through the pipeline with the simulator and an injected clock, on both backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from bot.app import TagRecomputeAdapter, build_dispatcher
from bot.orders_import import import_orders, import_orders_records, parse_order_records, parse_orders_csv
from bot.pipeline import Pipeline
from bot.queue import QueueEntry
from bot.storage.db import create_session_factory
from bot.storage.models import CustomerTag
from bot.wecom.simulator import push_contact_change, push_kf_customer_message
from handlers.domain import Channel, InboundMessage, KfOrigin, OutboundMessage
from handlers.tags import TagConfig, TagSource, recompute_due_on_inbound
from scheduler.jobs import recompute_tags_job
from tests.conftest import Backend
from tests.test_kf_sync import KFID, Harness, callback_entry, callback_token, open_harness
from tests.test_scripted_e2e import rendered

DAY = 86_400.0
CHANGED = "computed tags changed"
FRESH = {"新用户", "潜客", "rfm:none", "lifecycle:new", "activity:active"}


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        yield harness


def now(h: Harness) -> datetime:
    return datetime.fromtimestamp(h.clock.now(), UTC)


def events_pipeline(h: Harness, sender: Any = None) -> Pipeline:
    """The worker's pipeline with event recompute on, as open_services builds it with settings.tag_config."""
    base = h.pipeline()
    return Pipeline(
        h.services.repos,
        build_dispatcher(),
        sender if sender is not None else base._sender,
        base._kf_puller,
        h.clock,
        scripts=h.services.scripts,
        tag_config=TagConfig(),
    )


async def daily_job(h: Harness) -> None:
    """The 03:30 job, with the thresholds the server runs with."""
    result = await recompute_tags_job(TagRecomputeAdapter(h.services.repos.tags, TagConfig()), now(h))
    assert result.failed == 0


async def kf_entries(h: Harness, customer: str, text: str) -> list[QueueEntry]:
    """The customer writes; the pull queues the message; returns the entries a worker would read."""
    _item, delivery = push_kf_customer_message(h.sim, customer, text)
    await h.puller().pull(KFID, callback_token(delivery))
    return await h.take()


async def say(h: Harness, pipeline: Pipeline, customer: str, text: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The customer writes, the worker handles it; returns what the bot sent to the customer in answer."""
    before = len(h.sim.sent_after(0, customer))
    for entry in await kf_entries(h, customer, text):
        await pipeline.process(entry)
    return [(s.msgtype, s.content) for s in h.sim.sent_after(0, customer)[before:]]


def expected(script_id: str, variant: str) -> list[tuple[str, Mapping[str, Any]]]:
    return [(r.msgtype, r.content) for r in rendered(script_id, variant)]


async def computed(h: Harness, customer_id: int) -> frozenset[str]:
    return (await h.services.repos.tags.tags_by_source(customer_id)).get(TagSource.COMPUTED, frozenset())


async def customer_id(h: Harness, channel: Channel, external_id: str) -> int:
    row = await h.services.repos.conversations.get_customer(channel, external_id)
    assert row is not None
    return row.id


def changes(logs: list[dict[str, Any]], customer: int) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == CHANGED and e["customer_id"] == customer]


def test_recompute_is_due_on_a_message_only_when_the_tags_can_change() -> None:
    assert recompute_due_on_inbound(frozenset())
    assert recompute_due_on_inbound(frozenset({"沉默", "activity:silent", "潜客"}))
    assert recompute_due_on_inbound(frozenset({"流失", "activity:churned", "lifecycle:dormant"}))
    assert not recompute_due_on_inbound(frozenset({"潜客", "activity:active", "lifecycle:growing", "rfm:none"}))


# ------------------------------------------------------------------------------ a customer writes


async def test_silent_customer_who_writes_is_answered_as_active(h: Harness) -> None:
    pipeline = events_pipeline(h)
    await say(h, pipeline, "wmSilent", "你好")
    kf_id = await customer_id(h, Channel.KF, "wmSilent")
    assert await computed(h, kf_id) == FRESH  # the first message computes the tags at once

    h.clock.advance(60 * DAY)
    await daily_job(h)
    assert await computed(h, kf_id) == {"沉默", "潜客", "rfm:none", "lifecycle:growing", "activity:silent"}

    with capture_logs() as logs:
        sent = await say(h, pipeline, "wmSilent", "这个多少钱？")

    # Not the wake-up variant for 沉默: the recompute ran before the script was chosen.
    assert sent == expected("price.inquiry", "first_order")
    active = {"潜客", "rfm:none", "lifecycle:growing", "activity:active"}
    assert await computed(h, kf_id) == active
    [answer] = (await h.services.repos.answers.answers_for_customer(kf_id))[-1:]
    assert (answer.script_id, answer.variant) == ("price.inquiry", "first_order")
    assert answer.tags == active
    [change] = changes(logs, kf_id)
    assert (change["added"], change["removed"], change["reason"]) == (
        ["activity:active"],
        ["activity:silent", "沉默"],
        "inbound",
    )
    # Exactly what the daily job gives for this customer at this moment.
    assert await h.services.repos.tags.recompute_computed_tags(kf_id, now(h), TagConfig()) == active


async def test_active_customer_writing_again_costs_no_recompute(h: Harness) -> None:
    pipeline = events_pipeline(h)
    await say(h, pipeline, "wmChatty", "你好")
    kf_id = await customer_id(h, Channel.KF, "wmChatty")
    async with create_session_factory(h.services.engine)() as session:
        stmt = select(CustomerTag.set_at).where(CustomerTag.customer_id == kf_id)
        first_set = set((await session.execute(stmt)).scalars().all())
    h.clock.advance(3600)

    await say(h, pipeline, "wmChatty", "你好")

    async with create_session_factory(h.services.engine)() as session:
        assert set((await session.execute(stmt)).scalars().all()) == first_set  # not rewritten


class FlakySender:
    """Fails the first send (as a crash after the recompute would), then sends through the real sender."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.failures = 0

    async def send(self, reply: OutboundMessage, idempotency_key: str, *, resend: bool = False) -> str | None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("worker died mid-message")
        result: str | None = await self._real.send(reply, idempotency_key, resend=resend)
        return result


async def test_churned_to_active_is_recorded_once_when_the_worker_retries(h: Harness) -> None:
    sender = FlakySender(h.pipeline()._sender)
    pipeline = events_pipeline(h, sender)
    await say(h, pipeline, "wmGoneAway", "你好")
    kf_id = await customer_id(h, Channel.KF, "wmGoneAway")
    h.clock.advance(100 * DAY)
    await daily_job(h)
    assert {"流失", "activity:churned", "lifecycle:dormant"} <= await computed(h, kf_id)

    sender.failures = 1
    before = len(h.sim.sent_after(0, "wmGoneAway"))
    [entry] = await kf_entries(h, "wmGoneAway", "这个多少钱？")
    with capture_logs() as logs:
        with pytest.raises(ConnectionError):
            await pipeline.process(entry)  # left pending: the worker runs it again
        await pipeline.process(entry)
        await pipeline.process(entry)  # and once more after it was handled: a no-op

    sent = [(s.msgtype, s.content) for s in h.sim.sent_after(0, "wmGoneAway")[before:]]
    assert sent == expected("price.inquiry", "first_order")  # not the win-back for 流失
    [change] = changes(logs, kf_id)
    assert "activity:active" in change["added"]
    assert {"流失", "activity:churned", "lifecycle:dormant"} <= set(change["removed"])
    assert await computed(h, kf_id) == {"潜客", "rfm:none", "lifecycle:growing", "activity:active"}


async def test_the_contact_row_of_the_same_person_is_recomputed_too(h: Harness) -> None:
    pipeline = events_pipeline(h)
    _code, delivery = push_contact_change(h.sim, "add_external_contact", "zhangsan", "wmBoth", welcome_code=False)
    await pipeline.process(callback_entry(delivery.plaintext))
    contact = await customer_id(h, Channel.CONTACT, "wmBoth")
    h.clock.advance(45 * DAY)
    await daily_job(h)
    assert "沉默" in await computed(h, contact)

    await say(h, pipeline, "wmBoth", "你好")  # on kf: the same WeChat user, the same facts

    kf = await customer_id(h, Channel.KF, "wmBoth")
    assert await computed(h, kf) == await computed(h, contact)
    assert "activity:active" in await computed(h, contact)


# ------------------------------------------------------------------------------ contact added


async def test_contact_added_is_a_new_user_before_the_welcome_is_chosen(h: Harness) -> None:
    _code, delivery = push_contact_change(h.sim, "add_external_contact", "zhangsan", "wmJustAdded")
    with capture_logs() as logs:
        await events_pipeline(h).process(callback_entry(delivery.plaintext))

    contact = await customer_id(h, Channel.CONTACT, "wmJustAdded")
    assert await computed(h, contact) == FRESH
    [answer] = await h.services.repos.answers.answers_for_customer(contact)
    assert (answer.script_id, answer.variant) == ("welcome.contact_added", "newcomer")
    [change] = changes(logs, contact)
    assert change["reason"] == "contact_added" and "新用户" in change["added"]


async def test_contact_added_who_bought_long_ago_is_not_a_new_user(h: Harness) -> None:
    paid = (now(h) - timedelta(days=200)).isoformat()
    report = await import_orders(
        f"external_userid,order_id,amount,paid_at\nwmOldBuyer,SO-1,80,{paid}\n", h.services.repos.tags, now=now(h)
    )
    assert report.ok
    _code, delivery = push_contact_change(h.sim, "add_external_contact", "zhangsan", "wmOldBuyer")
    await events_pipeline(h).process(callback_entry(delivery.plaintext))

    contact = await customer_id(h, Channel.CONTACT, "wmOldBuyer")
    tags = await computed(h, contact)
    assert "新用户" not in tags and "潜客" not in tags and "lifecycle:dormant" in tags


# ------------------------------------------------------------------------------ orders


def record(customer: str, order_id: str, amount: object, days_ago: int, at: datetime) -> dict[str, object]:
    return {
        "external_userid": customer,
        "order_id": order_id,
        "amount": amount,
        "paid_at": (at - timedelta(days=days_ago)).isoformat(),
    }


async def set_at(h: Harness, customer: int) -> set[datetime]:
    async with create_session_factory(h.services.engine)() as session:
        stmt = select(CustomerTag.set_at).where(
            CustomerTag.customer_id == customer, CustomerTag.source == TagSource.COMPUTED.value
        )
        return {v.astimezone(UTC) for v in (await session.execute(stmt)).scalars().all()}


async def test_order_records_recompute_exactly_the_customers_that_bought(h: Harness) -> None:
    repo = h.services.repos.tags
    start = now(h)
    seed = [record("wmBuyer", "SO-0", "20", 40, start), record("wmBystander", "SO-B", "20", 40, start)]
    assert (await import_orders_records(seed, repo, now=start, tag_config=TagConfig())).ok
    await say(h, events_pipeline(h), "wmBuyer", "你好")  # the buyer also writes on kf: a second row
    await daily_job(h)
    buyer = await customer_id(h, Channel.CONTACT, "wmBuyer")
    bystander = await customer_id(h, Channel.CONTACT, "wmBystander")
    buyer_kf = await customer_id(h, Channel.KF, "wmBuyer")
    bystander_tags, bystander_set = await computed(h, bystander), await set_at(h, bystander)
    assert "高价值" not in await computed(h, buyer)

    h.clock.advance(3600)
    at = now(h)
    big = [record("wmBuyer", f"SO-{d}", 600, d, at) for d in (1, 5, 9)]  # R5 F3 M5: high
    progress: list[tuple[str, int, int]] = []
    with capture_logs() as logs:
        report = await import_orders_records(
            [*big, {"external_userid": "wmBuyer", "order_id": "SO-X", "amount": "1,000", "paid_at": "2025-01-01"}],
            repo,
            now=at,
            tag_config=TagConfig(),
            on_progress=lambda *p: progress.append(p),
        )

    assert (report.imported, report.tags_recomputed, report.tags_changed) == (3, 2, 2)
    [bad] = report.bad
    csv_bad = parse_orders_csv('external_userid,order_id,amount,paid_at\nwmBuyer,SO-X,"1,000",2025-01-01\n', at)
    assert (bad.line, bad.reason) == (4, csv_bad.bad[0].reason)  # the same rule, the record's index as line
    assert ("tagged", 1, 1) in progress
    for row in (buyer, buyer_kf):
        assert {"高价值", "rfm:high", "activity:active"} <= await computed(h, row)
        assert await set_at(h, row) == {at}
    assert await computed(h, bystander) == bystander_tags and await set_at(h, bystander) == bystander_set
    assert {e["customer_id"] for e in logs if e["event"] == CHANGED} == {buyer, buyer_kf}
    assert {e["reason"] for e in logs if e["event"] == CHANGED} == {"orders"}

    again = await import_orders_records(big, repo, now=at, tag_config=TagConfig())
    assert (again.imported, again.unchanged, again.tags_recomputed) == (0, 3, 0)  # nothing new, nothing redone


async def test_a_re_import_heals_customers_whose_recompute_was_missed(h: Harness) -> None:
    repo = h.services.repos.tags
    at = now(h)
    rows = [record("wmMissed", "SO-M", "30", 2, at)]
    await import_orders_records(rows, repo, now=at, tag_config=TagConfig())
    missed = await customer_id(h, Channel.CONTACT, "wmMissed")
    await repo.replace_tags(missed, TagSource.COMPUTED, [])  # as if the recompute after the import had failed

    report = await import_orders_records(rows, repo, now=at, tag_config=TagConfig())

    assert (report.imported, report.unchanged, report.tags_recomputed) == (0, 1, 1)
    assert "rfm:low" in await computed(h, missed)


async def test_csv_import_recomputes_with_the_config_it_is_given(h: Harness) -> None:
    repo = h.services.repos.tags
    paid = (now(h) - timedelta(days=3)).isoformat()
    text = f"external_userid,order_id,amount,paid_at\nwmCsv,SO-C,12,{paid}\n"
    progress: list[tuple[str, int, int]] = []
    report = await import_orders(
        text, repo, now=now(h), tag_config=TagConfig(), on_progress=lambda *p: progress.append(p)
    )
    assert report.ok and report.tags_recomputed == 1
    assert [p[0] for p in progress] == ["validated", "written", "tagged"]
    assert "rfm:low" in await computed(h, await customer_id(h, Channel.CONTACT, "wmCsv"))

    untouched = await import_orders(text.replace("SO-C", "SO-D"), repo, now=now(h))  # no config: the job's task
    assert untouched.tags_recomputed == 0


def test_order_records_are_validated_like_csv_rows() -> None:
    at = datetime(2025, 6, 1, 4, 0, tzinfo=UTC)
    parsed = parse_order_records(
        [
            {"external_userid": "wmA", "order_id": 1001, "amount": 199.5, "paid_at": "2025-05-01 10:00:00"},
            {"external_userid": "wmA", "order_id": "1001", "amount": "1", "paid_at": "2025-05-01 10:00:00"},
            {"external_userid": "wmB", "order_id": "SO-2", "amount": True, "paid_at": "2025-05-01 10:00:00"},
            {"external_userid": "wmB", "order_id": "SO-3", "amount": "1"},
            "not a record",
            {"external_userid": "wmC", "order_id": "SO-4", "amount": 0.1 + 0.2, "paid_at": at},
            {"external_userid": "wmD", "order_id": "SO-5", "amount": 5, "paid_at": datetime(2025, 5, 1, 10, 0)},
        ],
        at,
    )
    [first, naive] = parsed.rows
    paid = datetime(2025, 5, 1, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
    assert (first.order_id, first.amount_cents, first.paid_at) == ("1001", 19950, paid)
    assert (naive.line, naive.amount_cents, naive.paid_at) == (7, 500, paid)
    reasons = {b.line: b.reason for b in parsed.bad}
    assert reasons[2].startswith("duplicate order_id '1001'")
    assert reasons[3] == "amount must be a string, got bool"
    assert reasons[4] == "paid_at is empty"
    assert reasons[5].startswith("not an object")
    assert "is not yuan" in reasons[6]


# ------------------------------------------------------------------------------ the daily job


async def test_the_daily_job_records_changes_the_same_way(h: Harness) -> None:
    written = InboundMessage(
        Channel.KF, "m-job", "wmJob", KFID, "text", int(h.clock.now()), text="在吗", origin=KfOrigin.CUSTOMER
    )
    await h.services.repos.messages.record_inbound(written)
    kf_id = await customer_id(h, Channel.KF, "wmJob")
    with capture_logs() as logs:
        await daily_job(h)
        h.clock.advance(40 * DAY)
        await daily_job(h)
    first, second = changes(logs, kf_id)
    assert set(first["added"]) == FRESH and first["removed"] == [] and first["reason"] == "recompute"
    assert "沉默" in second["added"] and "新用户" in second["removed"]
