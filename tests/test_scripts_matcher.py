"""Matcher and renderer: a customer with tags X writes Y -> this script and variant, and why."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from scripts_library import (
    DEFAULT_LIBRARY,
    Library,
    Matcher,
    Query,
    RenderError,
    build_library,
    load_library,
    normalize,
    render,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=SHANGHAI).timestamp()


@pytest.fixture(scope="module")
def library() -> Library:
    loaded = load_library(DEFAULT_LIBRARY)
    assert isinstance(loaded, Library), loaded
    return loaded


@pytest.fixture(scope="module")
def matcher(library: Library) -> Matcher:
    return Matcher(library)


def ask(matcher: Matcher, text: str, *tags: str, customer: str = "c1", now: float = NOW) -> tuple[str, str]:
    match = matcher.match(Query(text=text, tags=frozenset(tags), customer_id=customer, now=now))
    assert match is not None
    return match.script.id, match.variant.name


def test_new_customer_asking_price_gets_the_first_order_offer(matcher: Matcher) -> None:
    assert ask(matcher, "这个多少钱？", "新用户") == ("price.inquiry", "first_order")


def test_high_value_customer_gets_the_vip_advisor(matcher: Matcher) -> None:
    assert ask(matcher, "价格是多少", "高价值") == ("price.inquiry", "vip_advisor")
    assert ask(matcher, "价格是多少", "高价值", "新用户") == ("price.inquiry", "vip_advisor")  # higher priority


def test_silent_customer_gets_the_wake_up_offer(matcher: Matcher) -> None:
    assert ask(matcher, "多少钱", "沉默") == ("price.winback_silent", "default")
    assert ask(matcher, "多少钱", "流失", "高价值") == ("price.winback_silent", "default")
    # none_of: a silent customer who complained gets the ordinary price script
    assert ask(matcher, "多少钱", "沉默", "投诉过")[0] == "price.inquiry"


def test_traditional_and_full_width_text_match_simplified_keywords(matcher: Matcher) -> None:
    assert normalize("這個價格多少錢？ＡＢＣ") == "这个价格多少钱?abc"
    assert ask(matcher, "這個價格多少錢？", "新用户") == ("price.inquiry", "first_order")
    assert ask(matcher, "我的快遞到哪了") == ("order.logistics", "default")
    assert ask(matcher, "ＨＥＬＬＯ！")[0] == "greeting.hello"
    assert ask(matcher, "訂單號：２０２４０６１８０００１２３")[0] == "order.logistics"  # regex on normalised text


def test_traditional_keywords_in_the_library_match_simplified_text() -> None:
    text = "scripts:\n  - id: t\n    title: t\n    triggers: {keywords_any: [發貨]}\n    reply: [{text: hi}]\n"
    library = build_library({"s.yaml": text})
    assert isinstance(library, Library)
    assert Matcher(library).match(Query(text="什么时候发货", fallback_no_match=False)) is not None


def test_phrases_are_exact_and_keywords_all_needs_every_word(matcher: Matcher) -> None:
    assert ask(matcher, "你好！")[0] == "greeting.hello"
    assert ask(matcher, "你好，我想改地址")[0] == "order.change_address"  # phrase 你好 is not the whole text
    assert ask(matcher, "能改吗")[0] == "fallback.no_match"


def test_priority_beats_specificity_and_events_and_menus(matcher: Matcher) -> None:
    assert ask(matcher, "我要投诉，转人工")[0] == "handoff.human"
    welcome = matcher.match(Query(event="contact_added", tags=frozenset({"高价值"}), now=NOW))
    assert welcome is not None and (welcome.script.id, welcome.variant.name) == ("welcome.contact_added", "vip")
    menu = matcher.match(Query(text="订单与物流", menu_id="menu_order", now=NOW))
    assert menu is not None and menu.script.id == "order.logistics" and "menu_id 'menu_order'" in menu.reasons
    assert matcher.match(Query(text="天气不错", fallback_no_match=False, now=NOW)) is None


def test_ab_variants_are_sticky_and_roughly_weighted(matcher: Matcher) -> None:
    first = {f"cust{i}": ask(matcher, "多少钱", customer=f"cust{i}")[1] for i in range(2000)}
    again = {f"cust{i}": ask(matcher, "價格", customer=f"cust{i}")[1] for i in range(2000)}
    assert first == again
    counts = Counter(first.values())
    assert set(counts) == {"standard_a", "standard_b"}
    assert 850 <= counts["standard_a"] <= 1150
    match = matcher.match(Query(text="多少钱", customer_id="cust1", now=NOW))
    assert match is not None and match.assignment == "ab"


def test_weights_shift_the_split() -> None:
    text = """\
scripts:
  - id: t
    title: t
    triggers: {keywords_any: [x]}
    variants:
      - {name: a, weight: 9, reply: [{text: a}]}
      - {name: b, weight: 1, reply: [{text: b}]}
"""
    library = build_library({"s.yaml": text})
    assert isinstance(library, Library)
    m = Matcher(library)
    counts = Counter(m.match(Query(text="x", customer_id=str(i))).variant.name for i in range(3000))  # type: ignore[union-attr]
    assert 2550 <= counts["a"] <= 2850


def test_cooldown_uses_the_injected_last_sent_lookup(matcher: Matcher) -> None:
    def sent_an_hour_ago(script_id: str) -> float | None:
        return NOW - 3600 if script_id == "price.winback_silent" else None

    q = Query(text="多少钱", tags=frozenset({"沉默"}), now=NOW, last_sent=sent_an_hour_ago)
    explained = matcher.explain(q)
    assert explained.winner is not None and explained.winner.script.id == "price.inquiry"
    (miss,) = [c for c in explained.near_misses if c.script.id == "price.winback_silent"]
    assert miss.lost_because == "cooldown: sent 3600s ago, cooldown 604800s"
    later = Query(text="多少钱", tags=frozenset({"沉默"}), now=NOW + 604800, last_sent=sent_an_hour_ago)
    assert matcher.match(later).script.id == "price.winback_silent"  # type: ignore[union-attr]


def test_active_window_and_daily_hours_with_an_injected_now(matcher: Matcher) -> None:
    def at(year: int, month: int, day: int, hour: int, minute: int) -> float:
        return datetime(year, month, day, hour, minute, tzinfo=SHANGHAI).timestamp()

    assert ask(matcher, "618有什么活动", now=at(2025, 6, 10, 10, 0))[0] == "promo.618"
    # Outside its window the 618 script loses (and says why); the everyday promotions script answers instead.
    early = matcher.explain(Query(text="618有什么活动", now=at(2025, 6, 10, 7, 59)))  # before 08:00
    assert early.winner is not None and early.winner.script.id == "promo.activity"
    assert [c.lost_because for c in early.near_misses if c.script.id == "promo.618"] == [
        "window: daily 08:00-23:30 Asia/Shanghai, now 07:59"
    ]
    assert ask(matcher, "618有什么活动", now=at(2025, 6, 10, 7, 59))[0] == "promo.activity"
    ended = matcher.explain(Query(text="618有什么活动", now=at(2025, 6, 19, 10, 0)))  # ended
    assert ended.winner is not None and ended.winner.script.id == "promo.activity"
    assert [c.lost_because for c in ended.near_misses if c.script.id == "promo.618"] == [
        "window: ended 2025-06-19T00:00:00+08:00"
    ]
    assert ask(matcher, "618", now=at(2025, 6, 10, 7, 59))[0] == "fallback.no_match"  # only 618 was triggered
    explained = matcher.explain(Query(text="618", now=at(2025, 5, 1, 10, 0)))
    assert [c.lost_because for c in explained.near_misses] == ["window: starts 2025-06-01T00:00:00+08:00"]


def test_explain_names_the_winner_and_the_near_misses(matcher: Matcher) -> None:
    lines = matcher.explain(Query(text="價格多少錢", tags=frozenset({"新用户"}), customer_id="c9", now=NOW)).lines()
    text = "\n".join(lines)
    assert "winner: price.inquiry (商品价格咨询)" in text
    assert "variant: first_order (tag)" in text
    assert "because keywords_any 价格,多少钱" in text
    assert "price.winback_silent: lost, audience: needs any of 沉默,流失" in text


def test_render_fills_placeholders_with_values_then_fallbacks(library: Library, matcher: Matcher) -> None:
    match = matcher.match(Query(text="多少钱", tags=frozenset({"新用户"}), now=NOW))
    assert match is not None
    messages = render(library, match.script, match.variant, {"customer_name": "王芳"})
    assert messages[0].msgtype == "text" and messages[0].content["content"].startswith("王芳您好")
    assert messages[1].msgtype == "link" and messages[1].content["thumb_media_id"] == "MEDIA_NEWCOMER_THUMB"
    anonymous = render(library, match.script, match.variant, {})
    assert anonymous[0].content["content"].startswith("亲您好")  # built-in fallback


def test_render_refuses_a_missing_required_value(library: Library) -> None:
    # The shipped library only uses no-fallback placeholders with a fallback, so build one that does not.
    text = "scripts:\n  - id: t\n    title: t\n    triggers: {keywords_any: [x]}\n"
    text += "    reply: [{text: '{coupon_code}'}]\n"
    bare = build_library({"s.yaml": text})
    assert isinstance(bare, Library)
    script = bare.get("t")
    assert script is not None
    with pytest.raises(RenderError, match=r"no value for \{coupon_code\}"):
        render(bare, script, script.variants[0], {"customer_name": "王芳"})
    for shipped in library.scripts:  # and every shipped script renders with no values at all
        for variant in shipped.variants:
            render(library, shipped, variant, {})
    coupon = library.get("promo.coupon")
    assert coupon is not None  # this script declares its own fallback
    (msg,) = render(library, coupon, coupon.variants[0], {})
    assert "WELCOME20" in msg.content["content"]


def test_render_is_safe_against_hostile_values(library: Library) -> None:
    script = library.get("promo.618")
    assert script is not None
    hostile = {"customer_name": "<@all>[点我](http://evil)\n{coupon_code}" + "长" * 100}
    (msg,) = render(library, script, script.variants[0], hostile)
    body = msg.content["content"]
    assert msg.msgtype == "markdown"
    assert "<@all>" not in body and "](" not in body and "\n{coupon_code}" not in body
    assert "＜@all＞" in body
    greeting = library.get("greeting.hello")
    assert greeting is not None
    (plain,) = render(library, greeting, greeting.variants[0], {"customer_name": "{0.__class__}"})
    assert plain.content["content"].startswith("{0.__class__}您好")  # values are never formatted


def test_msgmenu_renders_in_kf_shape(library: Library) -> None:
    script = library.get("welcome.kf_session")
    assert script is not None
    (menu,) = render(library, script, script.variants[0], {})
    assert menu.msgtype == "msgmenu"
    assert menu.content["head_content"].startswith("您好，我是小满优选")
    assert menu.content["list"][0] == {"type": "click", "click": {"id": "menu_price", "content": "商品价格与优惠"}}
