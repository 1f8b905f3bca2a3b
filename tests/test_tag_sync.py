"""WeCom corp tags as a tag source (bot/tag_sync.py, wired into bot/pipeline.py), against the simulator.

Callbacks are processed the way a worker does (`Pipeline.process`), with the real WeComClient on both backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.pipeline import Pipeline
from bot.queue import QueueEntry
from bot.storage.db import create_session_factory
from bot.storage.models import Direction, MessageStatus
from bot.tag_sync import CorpTagSyncer, UnknownCorpTagError
from bot.wecom.simulator import push_contact_change, push_kf_customer_message
from bot.wecom.simulator.state import CorpTag, Fault
from handlers.domain import Channel
from handlers.tags import TagSource
from tests.conftest import TEST_CORP_ID, TEST_SECRET, Backend
from tests.test_kf_sync import KFID, Harness, callback_token, open_harness
from tests.test_scripted_e2e import rendered, reply_text

GET_PATH = "/cgi-bin/externalcontact/get"
TAG_LIST_PATH = "/cgi-bin/externalcontact/get_corp_tag_list"
MARK_PATH = "/cgi-bin/externalcontact/mark_tag"
HIGH_VALUE_ID = "etTAG00990001"


@pytest.fixture
async def h(backend: Backend) -> AsyncIterator[Harness]:
    async with open_harness(backend) as harness:
        # The SOP class 高价值 as a corp tag, beside the simulator's default 客户等级 group (VIP, 普通).
        harness.sim.corp_tags[HIGH_VALUE_ID] = CorpTag(HIGH_VALUE_ID, "高价值", "etGROUP0099", "客户分层", 1, 0)
        yield harness


def tag_id(h: Harness, name: str) -> str:
    [found] = [t.id for t in h.sim.corp_tags.values() if t.name == name]
    return found


def syncer(h: Harness) -> CorpTagSyncer:
    return CorpTagSyncer(
        h.client(TEST_SECRET),
        h.services.repos,
        create_session_factory(h.services.engine),
        clock=h.clock,
    )


def pipeline(h: Harness, tag_syncer: CorpTagSyncer | None, *, timeout_s: float = 5.0) -> Pipeline:
    base = h.pipeline()
    return Pipeline(
        h.services.repos,
        base._dispatcher,
        base._sender,
        base._kf_puller,
        h.clock,
        scripts=h.services.scripts,
        tag_syncer=tag_syncer,
        tag_sync_timeout_s=timeout_s,
    )


def entry(plaintext: str) -> QueueEntry:
    return QueueEntry(
        partition=0,
        entry_id="0-1",
        kind="callback",
        payload={"xml": plaintext, "received_at": 0.0},
        dedupe_key="test",
        attempts=0,
        enqueued_at=0.0,
    )


def calls(h: Harness, path: str) -> int:
    return len([c for c in h.sim.calls if c.path == path])


async def contact_event(
    h: Harness, p: Pipeline, change: str, customer: str, tags: set[str] | None = None, *, member: str = "zhangsan"
) -> None:
    """The member adds/edits the customer (tagging them as given, in WeCom), and the worker handles the event."""
    _code, delivery = push_contact_change(h.sim, change, member, customer)
    if tags is not None:
        follow = h.sim.contacts[customer].followers[member]
        follow.tags = {tag_id(h, name) for name in tags}
    await p.process(entry(delivery.plaintext))


async def contact_id(h: Harness, customer: str) -> int:
    row = await h.services.repos.conversations.get_customer(Channel.CONTACT, customer)
    assert row is not None
    return row.id


async def wecom_tags(h: Harness, customer_id: int) -> frozenset[str]:
    return (await h.services.repos.tags.tags_by_source(customer_id)).get(TagSource.WECOM, frozenset())


async def test_contact_added_with_corp_tags_stores_them_and_the_welcome_uses_them(h: Harness) -> None:
    s = syncer(h)
    await contact_event(h, pipeline(h, s), "add_external_contact", "wmTagged", {"高价值", "普通"})

    customer_id = await contact_id(h, "wmTagged")
    assert await wecom_tags(h, customer_id) == {"高价值", "普通"}
    row = await h.services.repos.conversations.get_customer(Channel.CONTACT, "wmTagged")
    assert row is not None and set(row.corp_tag_ids) == {HIGH_VALUE_ID, tag_id(h, "普通")}
    [welcome] = h.sim.sent_after(0, "wmTagged")
    assert welcome.api == "externalcontact/send_welcome_msg" and welcome.accepted
    [vip] = rendered("welcome.contact_added", "vip")
    assert welcome.content["text"] == vip.content
    [answer] = await h.services.repos.answers.answers_for_customer(customer_id)
    assert (answer.script_id, answer.variant) == ("welcome.contact_added", "vip")
    assert "高价值" in answer.tags


async def test_without_a_syncer_the_welcome_is_the_default(h: Harness) -> None:
    await contact_event(h, pipeline(h, None), "add_external_contact", "wmNoSync", {"高价值"})
    [welcome] = h.sim.sent_after(0, "wmNoSync")
    assert welcome.content["text"] == {"content": reply_text("welcome.contact_added", "default")}
    assert calls(h, GET_PATH) == 0


async def test_a_tag_removed_in_wecom_goes_on_the_next_sync_and_other_sources_stay(h: Harness) -> None:
    s = syncer(h)
    p = pipeline(h, s)
    await contact_event(h, p, "add_external_contact", "wmEdit", {"高价值", "VIP"})
    customer_id = await contact_id(h, "wmEdit")
    await h.services.repos.tags.set_bot_tag(customer_id, "已咨询")

    h.clock.advance(1)
    await contact_event(h, p, "edit_external_contact", "wmEdit", {"VIP"})

    assert await wecom_tags(h, customer_id) == {"VIP"}
    assert (await h.services.repos.tags.tags_by_source(customer_id))[TagSource.BOT] == {"已咨询"}
    row = await h.services.repos.conversations.get_customer(Channel.CONTACT, "wmEdit")
    assert row is not None and row.corp_tag_ids == (tag_id(h, "VIP"),)


async def test_tags_from_every_follower_are_collected_and_personal_tags_ignored(h: Harness) -> None:
    s = syncer(h)
    p = pipeline(h, s)
    await contact_event(h, p, "add_external_contact", "wmTwo", {"VIP"}, member="zhangsan")
    await contact_event(h, p, "add_external_contact", "wmTwo", {"高价值"}, member="lisi")
    assert await wecom_tags(h, await contact_id(h, "wmTwo")) == {"VIP", "高价值"}


async def test_no_relation_84061_clears_the_wecom_tags(h: Harness) -> None:
    s = syncer(h)
    await contact_event(h, pipeline(h, s), "add_external_contact", "wmGone", {"高价值"})
    customer_id = await contact_id(h, "wmGone")
    assert await wecom_tags(h, customer_id) == {"高价值"}

    push_contact_change(h.sim, "del_follow_user", "zhangsan", "wmGone")  # the customer deleted the member
    result = await s.sync_customer("wmGone")

    assert not result.tags.related and result.customer_ids == (customer_id,)
    assert await wecom_tags(h, customer_id) == frozenset()
    assert [c.errcode for c in h.sim.calls if c.path == GET_PATH][-1] == 84061


async def test_sync_failure_does_not_block_the_welcome(h: Harness) -> None:
    h.sim.faults.append(Fault(id=1, path=GET_PATH, remaining=1, errcode=60011))
    await contact_event(h, pipeline(h, syncer(h)), "add_external_contact", "wmFault", {"高价值"})

    [welcome] = h.sim.sent_after(0, "wmFault")
    assert welcome.accepted
    assert welcome.content["text"] == {"content": reply_text("welcome.contact_added", "default")}
    customer_id = await contact_id(h, "wmFault")
    assert await wecom_tags(h, customer_id) == frozenset()
    messages = h.services.repos.messages
    assert (
        await messages.count_messages(channel=Channel.CONTACT, direction=Direction.IN, status=MessageStatus.HANDLED)
        == 1
    )


async def test_a_slow_sync_is_cut_short_and_the_welcome_still_goes_out(h: Harness) -> None:
    h.sim.faults.append(Fault(id=1, path=GET_PATH, remaining=1, delay_s=3.0))
    await contact_event(h, pipeline(h, syncer(h), timeout_s=0.2), "add_external_contact", "wmSlow", {"高价值"})
    [welcome] = h.sim.sent_after(0, "wmSlow")
    assert welcome.accepted and welcome.api == "externalcontact/send_welcome_msg"


async def test_write_back_marks_the_tags_by_id_and_caches_the_tag_list(h: Harness) -> None:
    s = syncer(h)
    await contact_event(h, pipeline(h, s), "add_external_contact", "wmMark", {"普通"})

    added, removed = await s.write_back("zhangsan", "wmMark", add=["高价值", "VIP"], remove=["普通"])

    assert set(added) == {HIGH_VALUE_ID, tag_id(h, "VIP")} and removed == [tag_id(h, "普通")]
    assert h.sim.contacts["wmMark"].followers["zhangsan"].tags == {HIGH_VALUE_ID, tag_id(h, "VIP")}
    assert [c.errcode for c in h.sim.calls if c.path == MARK_PATH] == [0]

    await s.write_back("zhangsan", "wmMark", remove=["VIP"])
    assert calls(h, TAG_LIST_PATH) == 1  # cached
    assert h.sim.contacts["wmMark"].followers["zhangsan"].tags == {HIGH_VALUE_ID}

    # The next sync reads back what the bot wrote.
    await s.sync_customer("wmMark")
    assert await wecom_tags(h, await contact_id(h, "wmMark")) == {"高价值"}


async def test_unknown_tag_name_refreshes_once_then_refuses_without_calling_mark_tag(h: Harness) -> None:
    s = syncer(h)
    await contact_event(h, pipeline(h, s), "add_external_contact", "wmUnknown", set())
    with pytest.raises(UnknownCorpTagError) as info:
        await s.write_back("zhangsan", "wmUnknown", add=["不存在的标签"])
    assert info.value.unknown == ("不存在的标签",)
    assert calls(h, MARK_PATH) == 0 and calls(h, TAG_LIST_PATH) == 2


async def test_tag_list_cache_expires_and_change_external_tag_invalidates_it(h: Harness) -> None:
    s = syncer(h)
    p = pipeline(h, s)
    await contact_event(h, p, "add_external_contact", "wmCache", set())
    await s.write_back("zhangsan", "wmCache", add=["VIP"])
    await s.write_back("zhangsan", "wmCache", add=["普通"])
    assert calls(h, TAG_LIST_PATH) == 1

    # An operator renames 普通 to 标准 in the console; WeCom says so with change_external_tag.
    h.sim.corp_tags[tag_id(h, "普通")].name = "标准"
    xml = (
        f"<xml><ToUserName><![CDATA[{TEST_CORP_ID}]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>"
        "<CreateTime>1700000100</CreateTime><MsgType><![CDATA[event]]></MsgType>"
        "<Event><![CDATA[change_external_tag]]></Event><Id><![CDATA[etTAG00010002]]></Id>"
        "<TagType><![CDATA[tag]]></TagType><ChangeType><![CDATA[update]]></ChangeType></xml>"
    )
    await p.process(entry(xml))
    await s.write_back("zhangsan", "wmCache", remove=["标准"])
    assert calls(h, TAG_LIST_PATH) == 2
    assert h.sim.contacts["wmCache"].followers["zhangsan"].tags == {tag_id(h, "VIP")}

    h.clock.advance(301)  # past the cache's lifetime
    await s.write_back("zhangsan", "wmCache", add=["标准"])
    assert calls(h, TAG_LIST_PATH) == 3


async def test_kf_customer_is_synced_on_the_first_message_only(h: Harness) -> None:
    # The WeChat user is also a 客户联系 contact of zhangsan, tagged 高价值 there (same external_userid).
    push_contact_change(h.sim, "add_external_contact", "zhangsan", "wmKfVip", welcome_code=False)
    h.sim.contacts["wmKfVip"].followers["zhangsan"].tags = {HIGH_VALUE_ID}
    p = pipeline(h, syncer(h))

    for _ in range(2):
        _item, delivery = push_kf_customer_message(h.sim, "wmKfVip", "这个多少钱？")
        await h.puller().pull(KFID, callback_token(delivery))
        for queued in await h.take():
            await p.process(queued)

    assert calls(h, GET_PATH) == 1
    expected = [r.content for r in rendered("price.inquiry", "vip_advisor")]
    assert [s.content for s in h.sim.sent_after(0, "wmKfVip")] == expected * 2
    kf = await h.services.repos.conversations.get_customer(Channel.KF, "wmKfVip")
    assert kf is not None and await wecom_tags(h, kf.id) == {"高价值"}
    assert await wecom_tags(h, await contact_id(h, "wmKfVip")) == {"高价值"}  # the contact row was created


async def test_kf_customer_without_a_contact_relation_is_not_asked_again(h: Harness) -> None:
    p = pipeline(h, syncer(h))
    for _ in range(2):
        _item, delivery = push_kf_customer_message(h.sim, "wmKfPlain", "你好")
        await h.puller().pull(KFID, callback_token(delivery))
        for queued in await h.take():
            await p.process(queued)
    assert [c.errcode for c in h.sim.calls if c.path == GET_PATH] == [84061]
    assert len(h.sim.sent_after(0, "wmKfPlain")) == 2
    assert await h.services.repos.conversations.get_customer(Channel.CONTACT, "wmKfPlain") is None
