"""The loader's shortcuts change nothing: libyaml with its cheap tag resolution gives what the pure-Python
parser gives, a reload that reuses validated files gives what a fresh build gives, and the template and regex
checks agree with the straightforward versions they replace."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scripts_library.loader as loader
from scripts_library import Library, Problem, build_library, load_library, regex_problem
from scripts_library.text import TemplateError, parse_template, template_parts

Built = Library | list[Problem]


@contextmanager
def pure_python_and_uncached() -> Iterator[None]:
    """The reference path: PyYAML's own parser and resolver, and every file validated afresh."""
    saved = loader._FAST_LOADER, loader._checked
    loader._FAST_LOADER, loader._checked = None, {}
    try:
        yield
    finally:
        loader._FAST_LOADER, loader._checked = saved


def reference(sources: dict[str, str]) -> Built:
    with pure_python_and_uncached():
        return build_library(sources)


# --- generated libraries, tricky YAML included -----------------------------------------------------------------

IDS = ["a", "b", "a", "x.y-1", "bad id", "", "~", "null", "123", "&anc c", "*anc", "!!str 5", "'q'", '"價格"', "id_長"]
TITLES = ["t", "", "~", "[1, 2]", "{a: b}", "價格", "yes", '"\\ttab"', "No", "0o17", "*anc"]
TRIGGERS = [
    "{keywords_any: [價格, 多少钱]}",
    "{keywords_all: [ＡＢＣ, 尺碼]}",
    "{keywords_any: [' ']}",
    "{regex: ['(a+)+', '[', 'sku\\d+']}",
    "{events: [no_match, moon]}",
    "{menu_ids: [m1]}",
    "{phrases: ~}",
    "{}",
    "[a]",
    "{keywords_any: [a], keywords_any: [b]}",
    "{? [a] : b}",
    "{keywords_any: [&k 价格, *k]}",
    "{keywords_any: [null, true, 1.5, 2025-01-01]}",
    "{colour: red}",
]
AUDIENCES = ["{any_of: [VIP]}", "{none_of: [高价值, 未知]}", "{all_of: ~}", "[VIP]", "{any_of: [VIP], any_of: [x]}"]
NUMBERS = ["1", "-5", "x", "1.5", "0x10", "~", "-2000", "'7'", "[1]"]
ACTIVE = [
    '{from: "2025-06-01", until: "2025-06-19 00:00", daily: "09:00-21:00"}',
    '{from: "2025-07-01", until: "2025-06-01"}',
    '{timezone: Mars/Base, daily: "9-5"}',
    "{from: 2025-06-01}",
]
FALLBACKS = ["{customer_name: 您}", "{nope: x}", "{customer_name: '{x}'}", "[a]"]
REPLIES = [
    '[{text: "{customer_name}您好"}]',
    '[{text: "坏括号 { 这里"}]',
    '[{text: "{{literal}}"}, {image: {media_id: M1}}]',
    "[{markdown: '**b**'}, {link: {title: t, url: 'https://x.example'}}]",
    "[{link: {title: t}}]",
    "[{msgmenu: {list: [{click: {id: m, content: c}}, {text: {content: t, no_newline: yes}}]}}]",
    "[{msgmenu: {list: []}}]",
    "[{text: a, markdown: b}]",
    "[]",
    "hello",
    "[{text: ~}]",
    "[{file: {}}]",
]
VARIANTS = [
    "[{name: a, reply: [{text: x}]}, {name: b, tags: [VIP], priority: 2, reply: [{text: y}]}]",
    "[{name: a, tags: [VIP], reply: [{text: x}]}]",
    "[{name: a, reply: [{text: x}]}, {name: a, reply: [{text: y}]}]",
    "[{reply: [{text: x}]}, {name: b}]",
    "[{name: a, weight: 0, reply: [{text: x}]}]",
    "[]",
]
PREFIXES = ["", "\ufeff", "%YAML 1.1\n---\n", "# 注释\n"]


# Values the validator accepts (with tags.yaml declaring VIP and 價格), so that whole libraries come out valid too.
GOOD = {
    "title": ["t", "價格", "yes", '"\\ttab"', "No", "0o17"],
    "triggers": [*TRIGGERS[:2], "{regex: ['sku\\d+']}", "{events: [no_match]}", "{menu_ids: [m1]}"],
    "audience": [*AUDIENCES[:1], "{all_of: [價格], none_of: [高价值]}"],
    "priority": ["1", "-5", "'7'", "0x10"],
    "cooldown_seconds": ["1", "0", "'7'"],
    "active": [*ACTIVE[:1], "{from: 2025-06-01}", "{daily: '21:00-09:00', timezone: Asia/Tokyo}"],
    "fallbacks": FALLBACKS[:1],
    "reply": [*REPLIES[:1], *REPLIES[2:6], "hello"],
    "variants": VARIANTS[:1],
    "examples": ["[多少钱, 價格]", "多少钱"],
}


@st.composite
def script_block(draw: st.DrawFn, index: int) -> str:
    good = draw(st.integers(0, 3)) > 0
    lines = [f"id: s{index}" if good else f"id: {draw(st.sampled_from(IDS))}"]
    fields: list[tuple[str, list[str]]] = [
        ("title", TITLES),
        ("triggers", TRIGGERS),
        ("audience", AUDIENCES),
        ("priority", NUMBERS),
        ("cooldown_seconds", NUMBERS),
        ("active", ACTIVE),
        ("fallbacks", FALLBACKS),
        ("reply", REPLIES),
        ("variants", VARIANTS),
        ("examples", ["[多少钱, 價格]", "~", "{a: b}"]),
    ]
    reply_or_variants = draw(st.sampled_from(["reply", "variants"]))
    for key, choices in fields:
        needed = key in ("title", "triggers", reply_or_variants)
        if good and (needed or (key not in ("reply", "variants") and draw(st.booleans()))):
            lines.append(f"{key}: {draw(st.sampled_from(GOOD[key]))}")
        elif not good and draw(st.booleans()):
            lines.append(f"{key}: {draw(st.sampled_from(choices))}")
    if not good and draw(st.integers(0, 4)) == 0:
        lines.append(draw(st.sampled_from(["id: again", "\ttitle: tab", "extra: 1", "[broken", "title: &t x"])))
    return "  - " + "\n    ".join(lines) + "\n"


@st.composite
def library_sources(draw: st.DrawFn) -> dict[str, str]:
    sources: dict[str, str] = {}
    count = 0
    for index in range(draw(st.integers(1, 3))):
        blocks = []
        for _ in range(draw(st.integers(1, 4))):
            blocks.append(draw(script_block(count)))
            count += 1
        header = draw(st.sampled_from(["scripts:\n"] * 8 + ["scripts: ~\n", "other: 1\n"]))
        sources[f"lib/s{index}.yaml"] = draw(st.sampled_from(PREFIXES)) + header + "".join(blocks)
    sources["lib/tags.yaml"] = draw(st.sampled_from(["tags: [VIP, 價格]\n"] * 4 + ["tags: [VIP]\n", "tags: ~\n"]))
    if draw(st.booleans()):
        sources["lib/placeholders.yaml"] = draw(
            st.sampled_from(["placeholders: {shop: 小店}\n", "placeholders: {bad-name: x}\n"])
        )
    return sources


@settings(max_examples=300, deadline=None)
@given(library_sources())
def test_libyaml_and_cached_builds_match_the_pure_python_build(sources: dict[str, str]) -> None:
    expected = reference(sources)
    assert build_library(sources) == expected  # libyaml, validating every file
    assert build_library(sources) == expected  # libyaml, every file from the cache


# --- the file cache ---------------------------------------------------------------------------------------------

ONE = "scripts:\n  - id: one\n    title: t\n    triggers: {keywords_any: [a]}\n    reply: [{text: hi}]\n"
TWO = "scripts:\n  - id: two\n    title: t\n    audience: {any_of: [VIP]}\n    triggers: {events: [no_match]}\n" + (
    "    reply: [{text: '{shop} 您好'}]\n"
)


def test_an_unchanged_file_is_revalidated_when_the_vocabulary_changes() -> None:
    declared = {"one.yaml": ONE, "two.yaml": TWO, "tags.yaml": "tags: [VIP]\n", "placeholders.yaml": PH}
    assert isinstance(build_library(declared), Library)
    for vocabulary in ({"tags.yaml": "tags: [other]\n"}, {"placeholders.yaml": "placeholders: {}\n"}):
        changed = {**declared, **vocabulary}
        found = build_library(changed)
        assert isinstance(found, list) and found == reference(changed)
        assert all(p.file == "two.yaml" for p in found)
    assert isinstance(build_library(declared), Library)


PH = "placeholders: {shop: 小店}\n"


def test_an_id_moving_between_cached_files_is_still_a_duplicate() -> None:
    base = {"a.yaml": ONE, "b.yaml": TWO, "tags.yaml": "tags: [VIP]\n", "placeholders.yaml": PH}
    assert isinstance(build_library(base), Library)
    clash = {**base, "c.yaml": ONE.replace("reply: [{text: hi}]", "reply: [{text: '{nope}'}]")}
    found = build_library(clash)
    assert found == reference(clash)
    assert [str(p) for p in found] == ["c.yaml:2: duplicate id 'one' (first in a.yaml:2)"]  # its own problem hidden
    renamed = {**base, "0.yaml": ONE}  # now the copy in a.yaml is the second one
    assert [str(p) for p in build_library(renamed)] == ["a.yaml:2: duplicate id 'one' (first in 0.yaml:2)"]


def test_a_reload_sees_an_edited_file_and_reuses_the_rest(tmp_path: Path) -> None:
    (tmp_path / "tags.yaml").write_text("tags: [VIP]\n", encoding="utf-8")
    (tmp_path / "placeholders.yaml").write_text(PH, encoding="utf-8")
    (tmp_path / "a.yaml").write_text(ONE, encoding="utf-8")
    (tmp_path / "b.yaml").write_text(TWO, encoding="utf-8")
    first = load_library(tmp_path)
    assert isinstance(first, Library)
    (tmp_path / "a.yaml").write_text(ONE.replace("title: t", "title: 改过"), encoding="utf-8")
    second = load_library(tmp_path)
    assert isinstance(second, Library)
    one, two = second.scripts
    assert one.title == "改过"
    assert two is first.scripts[1]  # b.yaml was not validated again
    with pure_python_and_uncached():
        assert load_library(tmp_path) == second


def test_the_cache_keeps_one_version_per_file_and_a_bounded_number_of_files() -> None:
    for n in range(3):
        build_library({"a.yaml": ONE.replace("title: t", f"title: t{n}")})
    assert sum(1 for name in loader._checked if name == "a.yaml") == 1
    assert len(loader._checked) <= loader._CHECKED_FILES


# --- template and regex checks ----------------------------------------------------------------------------------


def parts_from_tokens(template: str) -> tuple[tuple[str, ...], int]:
    tokens = parse_template(template)
    names = tuple(t.placeholder for t in tokens if t.placeholder)
    return names, sum(len(t.literal.encode()) for t in tokens if not t.placeholder)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="{}{}ab_1 中價", max_size=24))
def test_template_parts_agree_with_the_tokens(template: str) -> None:
    try:
        expected: tuple[tuple[str, ...], int] | str = parts_from_tokens(template)
    except TemplateError as exc:
        expected = str(exc)
    try:
        got: tuple[tuple[str, ...], int] | str = template_parts(template)
    except TemplateError as exc:
        got = str(exc)
    assert got == expected


@pytest.mark.filterwarnings("ignore::FutureWarning")  # "possible nested set" and the like, from re itself
@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab()|*+?[]{}\\d12^$.-<=!:", max_size=14))
def test_regex_problem_reports_bad_regex_exactly_when_re_compile_fails(pattern: str) -> None:
    try:
        re.compile(pattern)
        compiles = True
    except re.error:
        compiles = False
    assert regex_problem(pattern, 200).startswith("bad regex") is not compiles
