"""The script library's format and validator: every problem is reported with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts_library import DEFAULT_LIBRARY, LIMITS, Library, Problem, build_library, load_library, regex_problem


def problems_of(text: str, **extra: str) -> list[Problem]:
    result = build_library({"s.yaml": text, **extra})
    assert isinstance(result, list), "expected problems"
    return result


def lines(problems: list[Problem]) -> list[tuple[int, str]]:
    return [(p.line, p.message) for p in problems]


def has(problems: list[Problem], line: int, fragment: str) -> bool:
    return any(p.line == line and fragment in p.message for p in problems)


GOOD = """\
scripts:
  - id: price
    title: 价格
    examples: [多少钱]
    triggers:
      keywords_any: [价格, 多少钱]
    audience: {any_of: [新用户], none_of: [VIP]}
    priority: 3
    cooldown_seconds: 60
    active: {from: "2025-06-01", until: "2025-06-19 00:00", daily: "09:00-21:00"}
    variants:
      - name: vip
        tags: [高价值]
        priority: 5
        reply:
          - markdown: "**{customer_name}** 您好"
      - name: a
        weight: 3
        reply:
          - text: "价格见详情页 {{不是占位符}}"
          - image: {media_id: M1}
          - link: {title: 新人礼, desc: 立减, url: "https://x.example/a", thumb_media_id: T1}
          - msgmenu:
              head_content: 请选择
              list:
                - click: {id: m1, content: 价格}
                - view: {url: "https://x.example", content: 官网}
                - miniprogram: {appid: wx1, pagepath: p/index, content: 小程序}
                - text: {content: 说明, no_newline: 1}
      - name: b
        reply:
          - text: 另一种说法
"""


def test_the_shipped_library_is_valid() -> None:
    library = load_library(DEFAULT_LIBRARY)
    assert isinstance(library, Library), library
    assert 6 <= len(library.scripts) <= 20
    assert {"高价值", "沉默", "流失", "潜客", "新用户", "老客户"} <= library.tags


def test_a_full_script_round_trips_into_the_model() -> None:
    library = build_library({"s.yaml": GOOD, "tags.yaml": "tags: [VIP]\n"})
    assert isinstance(library, Library), library
    (script,) = library.scripts
    assert (script.id, script.title, script.file, script.line) == ("price", "价格", "s.yaml", 2)
    assert script.triggers.keywords_any == ("价格", "多少钱")
    assert script.audience.any_of == {"新用户"} and script.audience.none_of == {"VIP"}
    assert (script.priority, script.cooldown_seconds) == (3, 60)
    assert script.window is not None and script.window.daily_from is not None
    assert script.window.start is not None and script.window.start.utcoffset() is not None  # Asia/Shanghai
    vip, a, b = script.variants
    assert (vip.name, vip.tags, vip.priority) == ("vip", frozenset({"高价值"}), 5)
    assert (a.weight, b.weight) == (3, 1)
    assert [r.kind for r in a.replies] == ["text", "image", "link", "msgmenu"]
    menu = a.replies[3]
    assert [i.type for i in menu.items] == ["click", "view", "miniprogram", "text"]
    assert menu.items[3].no_newline is True


def test_yaml_syntax_error_has_its_line() -> None:
    found = problems_of("scripts:\n  - id: a\n    title: [unclosed\n    reply: x\n")
    assert len(found) == 1 and "YAML syntax error" in found[0].message
    assert found[0].line in (3, 4)


def test_duplicate_ids_across_files_point_at_both() -> None:
    one = "scripts:\n  - id: same\n    title: t\n    triggers: {keywords_any: [a]}\n    reply: [{text: hi}]\n"
    two = "scripts:\n  - id: other\n    title: t\n    triggers: {keywords_any: [b]}\n    reply: [{text: hi}]\n" + (
        "  - id: same\n    title: t\n    triggers: {keywords_any: [c]}\n    reply: [{text: hi}]\n"
    )
    result = build_library({"a.yaml": one, "b.yaml": two})
    assert isinstance(result, list)
    assert [str(p) for p in result] == ["b.yaml:6: duplicate id 'same' (first in a.yaml:2)"]


BAD = """\
scripts:
  - id: bad
    title: 坏例子
    triggers:
      keywords_any: [价格]
      regex: ['(a+)+$', '([', '(x|x)*y']
      events: [contact_added, moon_landing]
    audience:
      any_of: [新用户, 不存在的标签]
    variants:
      - name: default
        reply:
          - text: "你好 {customer_nmae}"
          - text: "坏括号 { 这里"
      - name: default
        reply: [{text: dup}]
    colour: red
"""


def test_every_problem_is_reported_with_its_line() -> None:
    found = problems_of(BAD)
    assert has(found, 6, "unsafe regex: nested quantifier")
    assert has(found, 6, "bad regex")
    assert has(found, 6, "overlapping branches")
    assert has(found, 7, "unknown event 'moon_landing'")
    assert has(found, 9, "unknown tag '不存在的标签'")
    assert has(found, 13, "unknown placeholder {customer_nmae}")
    assert has(found, 14, "stray '{'")
    assert has(found, 15, "duplicate variant name 'default'")
    assert has(found, 17, "unknown key 'colour'")
    assert all(p.file == "s.yaml" for p in found)


def test_content_over_wecom_limits() -> None:
    long_text = "字" * 683  # 2049 bytes
    long_md = "a" * 4097
    text = f"""\
scripts:
  - id: big
    title: 太长
    triggers: {{keywords_any: [x]}}
    reply:
      - text: "{long_text}"
      - markdown: "{long_md}"
      - text: "{"字" * 670}{{customer_name}}"
"""
    found = problems_of(text)
    assert has(found, 6, "2049 bytes") and has(found, 6, "2048-byte limit")
    assert has(found, 7, "4096-byte limit")
    assert has(found, 8, "placeholders counted at 64 B")  # 2010 + 64 > 2048


def test_msgmenu_with_more_than_ten_click_items() -> None:
    items = "\n".join(f"          - click: {{id: m{i}, content: 选项{i}}}" for i in range(11))
    text = f"""\
scripts:
  - id: menu
    title: 菜单
    triggers: {{events: [kf_session_entered]}}
    reply:
      - msgmenu:
          list:
{items}
          - text: {{content: 纯文字不计数}}
"""
    found = problems_of(text)
    assert lines(found) == [(8, "msgmenu has 11 click/view/miniprogram items, over WeCom's limit of 10")]


def test_structure_problems() -> None:
    text = """\
scripts:
  - id: "bad id!"
    title: t
    reply: [{text: hi}]
  - id: tagged_only
    title: t
    triggers: {keywords_any: [x]}
    variants:
      - name: vip
        tags: [高价值]
        reply: [{text: hi}]
  - id: both
    title: t
    triggers: {keywords_any: [y]}
    reply: [{text: hi}]
    variants: []
  - id: aliased
    title: t
    triggers: {keywords_any: [z]}
    active: {from: "not a date", daily: "9-5", timezone: Mars/Base}
    reply: [{link: {title: "{coupon_code}", url: "https://x/{coupon_code}"}}]
"""
    found = problems_of(text)
    assert has(found, 2, "id 'bad id!' must be")
    assert has(found, 2, "at least one trigger")
    assert has(found, 9, "variants need a default")
    assert has(found, 12, "either reply or variants")
    assert has(found, 20, "unknown timezone 'Mars/Base'")
    assert has(found, 21, "placeholders are not allowed in link url")


def test_bad_window_values() -> None:
    text = """\
scripts:
  - id: w
    title: t
    triggers: {keywords_any: [z]}
    active:
      from: "not a date"
      daily: "9-5"
    reply: [{text: hi}]
"""
    found = problems_of(text)
    assert has(found, 6, "not a date/time") and has(found, 7, "not a range like 09:00-21:00")


def test_yaml_aliases_are_refused() -> None:
    text = "scripts:\n  - &s {id: a, title: t, triggers: {keywords_any: [x]}, reply: [{text: hi}]}\n  - *s\n"
    assert lines(problems_of(text)) == [(3, "YAML aliases (*name) are not allowed")]


def test_tags_and_placeholders_files_extend_the_vocabulary() -> None:
    text = """\
scripts:
  - id: t
    title: t
    triggers: {keywords_any: [x]}
    audience: {any_of: [企业客户]}
    reply: [{text: "{invoice_title}"}]
"""
    assert problems_of(text)  # unknown without the vocabulary files
    library = build_library(
        {
            "s.yaml": text,
            "tags.yaml": "tags: [企业客户]\n",
            "placeholders.yaml": "placeholders: {invoice_title: null}\n",
        }
    )
    assert isinstance(library, Library), library


def test_huge_files_are_refused_without_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * LIMITS.file_bytes + "\n", encoding="utf-8")
    result = load_library(tmp_path)
    assert isinstance(result, list)
    assert len(result) == 1 and "over the 1000000-byte cap" in result[0].message and result[0].line == 1


def test_load_single_file_uses_the_vocabulary_beside_it(tmp_path: Path) -> None:
    (tmp_path / "tags.yaml").write_text("tags: [企业客户]\n", encoding="utf-8")
    one = tmp_path / "one.yaml"
    one.write_text(
        "scripts:\n  - id: a\n    title: t\n    triggers: {keywords_any: [x]}\n"
        "    audience: {all_of: [企业客户]}\n    reply: [{text: hi}]\n",
        encoding="utf-8",
    )
    assert isinstance(load_library(one), Library)
    assert isinstance(load_library(tmp_path / "missing"), list)


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("(a+)+", "nested quantifier"),
        (r"(\d+\s?)*$", "nested quantifier"),
        ("(a|a)*", "overlapping branches"),
        ("(a|ab)+c", "overlapping branches"),
        (r"(.*)\1", "backreferences"),
        ("a" * 201, "longer than 200"),
        ("(", "bad regex"),
    ],
)
def test_unsafe_regexes_are_rejected(pattern: str, fragment: str) -> None:
    assert fragment in regex_problem(pattern, LIMITS.regex_chars)


@pytest.mark.parametrize(
    "pattern", [r"订单号?\s*[:：]?\s*\d{8,20}", r"(\d|[a-z])+", "(?>a+)+", r"^(退|换)货$", "a{2,5}b"]
)
def test_safe_regexes_pass(pattern: str) -> None:
    assert regex_problem(pattern, LIMITS.regex_chars) == ""
