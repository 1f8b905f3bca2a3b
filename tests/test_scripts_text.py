"""Normalisation's fast path gives exactly what NFKC, case folding and OpenCC's t2s converter give, and the
matcher's short path picks the winner that the full walk (`explain`) picks."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opencc_purepy import OpenCC

import scripts_library.text as text
from scripts_library import Library, Matcher, Query, build_library, normalize
from scripts_library.text import to_simplified

_OPENCC = OpenCC("t2s")


def reference_simplified(value: str) -> str:
    return str(_OPENCC.convert(value)) if value else value


def reference_normalize(value: str) -> str:
    """normalize as it was written before its fast path: NFKC, casefold, OpenCC over everything, \\s+ collapsed."""
    folded = unicodedata.normalize("NFKC", value).casefold()
    return re.sub(r"\s+", " ", reference_simplified(folded)).strip()


# --- the character table and the phrases ---------------------------------------------------------------------


def test_the_translate_table_maps_traditional_characters() -> None:
    t2s = text._char_t2s()
    assert t2s is not None
    assert t2s.chars[ord("這")] == "这" and t2s.chars[ord("價")] == "价"
    assert ord("格") not in t2s.chars  # the same in both scripts
    assert "這個價格".translate(t2s.bmp) == "这个价格"
    assert to_simplified("價格") == "价格"
    assert to_simplified("这个价格") == "这个价格"


def test_full_width_text_becomes_half_width() -> None:
    assert normalize("這個價格多少錢？ＡＢＣ") == "这个价格多少钱?abc"
    assert normalize("訂單號：２０２４０６１８　ｉＰｈｏｎｅ！！") == "订单号:20240618 iphone!!"
    assert normalize("（ＳＫＵ－１２）～") == "(sku-12)~"


@pytest.mark.parametrize(
    ("traditional", "simplified"),
    [
        ("一目瞭然", "一目了然"),  # 瞭 alone stays 瞭: only the phrase changes it
        ("乾坤", "乾坤"),  # 乾 alone becomes 干: the phrase keeps it
        ("乾淨", "干净"),
        ("請回覆我", "请回复我"),
        ("金項鍊和乾坤一擲", "金项链和乾坤一掷"),
    ],
)
def test_phrases_convert_as_the_converter_converts_them(traditional: str, simplified: str) -> None:
    assert to_simplified(traditional) == simplified == reference_simplified(traditional)


def test_without_the_tables_every_text_goes_through_opencc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text, "_char_t2s", lambda: None)
    assert to_simplified("這個一目瞭然") == "这个一目了然"
    assert to_simplified("") == ""


def _atoms() -> list[str]:
    t2s = text._char_t2s()
    assert t2s is not None
    chars = sorted(chr(code) for code in t2s.chars)
    phrases = sorted(t2s.phrases)
    return [
        *chars[::40],
        *chars[-10:],  # astral keys among them
        *phrases[::9],
        *(p[:-1] for p in phrases[::23]),
        *(p[1:] for p in phrases[::23]),
        *"瞭乾後髮發这个价格",
        *"，！？：；（）～\u3000ＡＢｃ１２ｶﾞ①㎏ﬁ",  # full width, half-width katakana, compatibility forms
        *"\u0301\u0308\u1100\u1161",  # combining marks, Hangul jamo (NFKC composes them)
        *" \t\n\u00a0\u2028",
        *"aBcİıſKß12.-",
        "\U00020000",
        "\U0002a6a5",
    ]


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_normalize_equals_nfkc_casefold_and_opencc(data: st.DataObject) -> None:
    value = "".join(data.draw(st.lists(st.sampled_from(_atoms()), max_size=24)))
    assert normalize(value) == reference_normalize(value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_normalize_equals_the_reference_on_any_text(value: str) -> None:
    assert normalize(value) == reference_normalize(value)


# --- the matcher's short path ----------------------------------------------------------------------------------

_PRODUCTS = ["红杯子", "杯子", "白杯子", "蓝伞", "伞", "红伞"]
_INTENTS = ["价格", "多少钱", "发货", "尺寸"]


def _library() -> Library:
    lines = ["scripts:"]
    n = 0

    def script(triggers: str, extra: str = "") -> None:
        nonlocal n
        n += 1
        lines.append(f"  - id: s{n:03d}\n    title: t\n    triggers: {triggers}\n{extra}    reply: [{{text: r{n}}}]")

    for p in _PRODUCTS:
        script(f"{{keywords_all: [{p}]}}")  # one word
        for i in _INTENTS:
            script(f"{{keywords_all: [{p}, {i}]}}")  # two words
            script(f"{{keywords_all: [{p}, {i}, 快]}}", "    priority: -1\n")  # three words, lower priority
        script(f"{{keywords_any: [{p}, 貴]}}", "    audience: {any_of: [高价值]}\n")
    script("{phrases: [红杯子多少钱]}")
    script("{keywords_all: [價格, 杯子]}")  # traditional in the library
    script("{regex: ['sku-\\d+']}")
    library = build_library({"s.yaml": "\n".join(lines) + "\n"})
    assert isinstance(library, Library), library
    return library


@pytest.fixture(scope="module")
def small() -> Matcher:
    return Matcher(_library())


@pytest.fixture(scope="module")
def ranked_by_tuples(small: Matcher) -> Matcher:
    plain = Matcher(small.library)
    plain._rank_base = None  # the plain ranking that the packed integer keys stand for
    return plain


_WORDS = [*_PRODUCTS, *_INTENTS, "快", "貴", "價格", "，", " ", "SKU-12", "红杯子多少钱", "啊"]


@settings(max_examples=400, deadline=None)
@given(words=st.lists(st.sampled_from(_WORDS), max_size=8), vip=st.booleans())
def test_match_picks_what_explain_picks(small: Matcher, ranked_by_tuples: Matcher, words: list[str], vip: bool) -> None:
    query = Query(text="".join(words), tags=frozenset({"高价值"} if vip else ()), fallback_no_match=False)
    got = small.match(query)
    assert got == small.explain(query).winner
    assert ranked_by_tuples.match(query) == got


def test_keywords_all_with_one_two_and_three_words(small: Matcher) -> None:
    def winner(message: str) -> tuple[str, ...]:
        found = small.match(Query(text=message, fallback_no_match=False))
        assert found is not None
        return found.reasons

    assert winner("杯子") == ("keywords_all 杯子", "priority 0")
    assert winner("杯子发货") == ("keywords_all 发货,杯子", "priority 0")
    assert winner("红杯子的价格") == ("keywords_all 价格,红杯子", "priority 0")  # also 杯子+价格, same strength
    assert winner("红杯子多少钱") == ("phrase '红杯子多少钱'", "priority 0")
    assert small.match(Query(text="价格", fallback_no_match=False)) is None
