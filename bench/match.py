"""Script-matching benchmark: the real matcher against a naive loop over all scripts, on a 10,000-script library.

    .venv/bin/python bench/match.py                   # defaults finish in about 1-2 minutes

What it does, in one run (everything seeded, so every run sees the same library, customers and messages):

1. Generates a synthetic library in the real YAML format: 10,000 scripts in 20 files plus `tags.yaml` (495
   declared tags + the 5 built-in SOP tags = 500) and `placeholders.yaml`, in a temporary folder. Scripts pair
   products with intents (keywords_all), carry product-specific keywords_any, exact phrases, regexes (order
   numbers, SKU and style codes), kf menu ids and events; keywords are written in simplified or traditional
   Chinese, some with full-width letters and digits. About a third have an audience rule, a third per-tag
   variants, a tenth weighted A/B variants; some have a cooldown or an active window.
2. Load: `load_library(folder)` (read, YAML compose, full validation, model) timed once, then again (reload:
   unchanged files reuse their validation), then once more after one script file was edited (that file is read
   and validated again, the library-wide checks run over all). Build: `Matcher(library)` timed.
3. 100,000 customers, each with a tag set drawn from the 500 tags (skewed: the SOP tags and a few hundred others
   are common), and a stream of messages from realistic templates: product + intent questions (simplified,
   traditional, full-width), order numbers and SKU codes, menu clicks, events, small talk that matches nothing,
   and some long messages. Every Query (text, tags, customer, now, a cooldown lookup) is built before timing.
4. Match: `time.perf_counter_ns()` around each `Matcher.match(query)`, GC left on as in production; p50, p99,
   max and mean. The naive baseline is timed the same way on the same queries: it loops over every script,
   checks its triggers by substring / regex search on the normalised text (keywords normalised once, up front),
   its audience, window and cooldown, and picks with the same rule (priority, audience strictness, strength,
   id) and the same variant choice.
5. Check: the naive loop and the matcher pick the same script and variant for every message (exit 1 if not).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opencc_purepy import OpenCC  # noqa: E402

from scripts_library import (  # noqa: E402
    BUILTIN_TAGS,
    LIMITS,
    Library,
    Match,
    Matcher,
    Query,
    Script,
    choose_variant,
    load_library,
    normalize,
)
from scripts_library.text import core_span, normalize_phrase  # noqa: E402

SEED = 20261123
SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2025, 6, 10, 14, 0, tzinfo=SHANGHAI).timestamp()
P99_TARGET_MS = 0.5
LOAD_TARGET_S = 2.0

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

COLOURS = [
    "红",
    "白",
    "黑",
    "蓝",
    "粉",
    "灰",
    "米",
    "绿",
    "紫",
    "黄",
    "棕",
    "卡其",
    "藏青",
    "酒红",
    "奶白",
    "雾霾蓝",
    "焦糖",
    "薄荷",
]
ITEMS = [
    "连衣裙",
    "衬衫",
    "卫衣",
    "羽绒服",
    "风衣",
    "牛仔裤",
    "运动鞋",
    "帆布鞋",
    "凉鞋",
    "双肩包",
    "手提包",
    "钱包",
    "围巾",
    "帽子",
    "袜子",
    "睡衣",
    "面霜",
    "精华",
    "面膜",
    "口红",
    "粉底",
    "防晒霜",
    "洗面奶",
    "香水",
    "洗发水",
    "沐浴露",
    "牙刷",
    "电动牙刷",
    "吹风机",
    "保温杯",
    "茶具",
    "床单",
    "枕头",
    "被子",
    "毛巾",
    "拖鞋",
    "台灯",
    "耳机",
    "充电宝",
    "数据线",
    "手机壳",
    "键盘",
    "鼠标",
    "行李箱",
    "雨伞",
    "手表",
    "项链",
    "耳环",
    "戒指",
    "奶粉",
    "纸尿裤",
    "玩具",
    "童装",
    "坚果",
    "茶叶",
    "咖啡",
    "蜂蜜",
    "大米",
    "食用油",
]
# intent -> synonyms (keywords_all uses one of them; messages use any)
INTENTS: dict[str, list[str]] = {
    "price": ["多少钱", "价格", "怎么卖", "报价"],
    "discount": ["优惠", "打折", "便宜点", "折扣"],
    "size": ["尺码", "尺寸", "大小", "码数"],
    "stock": ["有货", "库存", "缺货", "补货"],
    "ship": ["发货", "几天到", "快递", "包邮"],
    "return": ["退货", "退款", "换货", "七天无理由"],
    "quality": ["质量", "正品", "材质", "做工"],
    "use": ["怎么用", "使用方法", "说明书", "安装"],
    "color": ["颜色", "色差", "配色", "什么色"],
    "gift": ["送礼", "礼盒", "包装", "贺卡"],
    "invoice": ["发票", "开票", "税号", "专票"],
    "warranty": ["保修", "质保", "维修", "售后"],
}
SMALL_TALK = [
    "今天天气不错", "哈哈哈", "好的谢谢", "嗯嗯", "我再看看", "晚安", "吃饭了吗", "你是机器人吗",
    "收到", "OK", "明白了", "稍等一下", "周末愉快", "辛苦了",
]  # fmt: skip
TAG_FAMILIES = {
    "地区": [
        "北京",
        "上海",
        "广州",
        "深圳",
        "杭州",
        "成都",
        "武汉",
        "西安",
        "南京",
        "重庆",
        "天津",
        "苏州",
        "长沙",
        "郑州",
        "青岛",
        "沈阳",
        "大连",
        "厦门",
        "宁波",
        "昆明",
    ],
    "兴趣": [
        "美妆",
        "护肤",
        "穿搭",
        "运动",
        "母婴",
        "数码",
        "家居",
        "美食",
        "宠物",
        "旅行",
        "读书",
        "健身",
        "摄影",
        "音乐",
        "游戏",
        "户外",
        "茶饮",
        "烘焙",
    ],
    "渠道": [
        "抖音",
        "小红书",
        "视频号",
        "公众号",
        "门店",
        "朋友推荐",
        "地推",
        "直播间",
        "社群",
        "官网",
        "小程序",
        "淘宝",
        "京东",
        "拼多多",
    ],
    "会员": ["普通会员", "银卡", "金卡", "铂金", "钻石", "黑卡", "年卡", "季卡", "月卡", "试用"],
    "年龄": ["00后", "95后", "90后", "85后", "80后", "70后", "学生", "宝妈", "白领", "退休"],
    "偏好": ["价格敏感", "品质优先", "爱囤货", "爱尝鲜", "常退货", "夜猫子", "周末购物", "满减党", "晒单达人", "复购"],
}


def build_tags(count: int) -> list[str]:
    """`count` declared tags besides the built-ins: family-value pairs, then numbered campaign tags."""
    out = [f"{family}:{value}" for family, values in TAG_FAMILIES.items() for value in values]
    n = 1
    while len(out) < count:
        out.append(f"活动{n:03d}期")
        n += 1
    return out[:count]


_FULL = {c: chr(ord(c) + 0xFEE0) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}


def full_width(text: str) -> str:
    return "".join(_FULL.get(c, c) for c in text)


def q(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is a subset of it)."""
    out = ['"']
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def qlist(items: list[str]) -> str:
    return "[" + ", ".join(q(i) for i in items) + "]"


# ---------------------------------------------------------------------------------------------------------------
# Library
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class World:
    products: list[str]
    skus: list[str]  # sku codes used by regex scripts
    styles: list[str]  # style codes used by regex scripts
    phrases: list[str]
    menus: list[str]
    tags: list[str]  # all 500
    script_ids: list[str]


def generate_library(folder: Path, n_scripts: int, n_tags: int, files: int, rng: random.Random) -> World:
    s2t = OpenCC("s2t")
    declared = build_tags(n_tags - len(BUILTIN_TAGS))
    all_tags = sorted(BUILTIN_TAGS) + declared
    # tag popularity for audiences: SOP tags and the first families are used most
    weights = [40.0] * len(BUILTIN_TAGS) + [8.0 / (1 + i / 40) for i in range(len(declared))]
    products = [c + i for i in ITEMS for c in COLOURS]  # 1,116 products
    rng.shuffle(products)
    (folder / "tags.yaml").write_text(
        "# synthetic tags for bench/match.py\ntags:\n" + "".join(f"  - {q(t)}\n" for t in declared), encoding="utf-8"
    )
    (folder / "placeholders.yaml").write_text(
        "placeholders:\n  shop_name: 小满优选\n  advisor_name: 专属顾问\n  product: 这款商品\n", encoding="utf-8"
    )
    (folder / "common.yaml").write_text(
        """scripts:
  - id: handoff.human
    title: 转人工
    triggers:
      keywords_any: [转人工, 人工客服, 找人工, 真人客服]
      phrases: [人工]
      events: [handoff_requested]
    priority: 100
    reply:
      - text: "好的，正在为您转接人工客服，请稍候～"
  - id: fallback.no_match
    title: 未匹配时的礼貌回复
    triggers:
      events: [no_match]
    priority: -100
    reply:
      - text: "抱歉，我还没理解您的问题。您可以换个说法，或回复“转人工”联系客服。"
""",
        encoding="utf-8",
    )
    skus: list[str] = []
    styles: list[str] = []
    phrases: list[str] = []
    menus: list[str] = []
    ids: list[str] = []
    per_file = -(-n_scripts // files)
    intent_names = list(INTENTS)

    def pick_tags(k: int) -> list[str]:
        got: set[str] = set()
        while len(got) < k:
            got.add(rng.choices(all_tags, weights)[0])
        return sorted(got)

    def maybe_variant_text(text: str) -> str:
        r = rng.random()
        if r < 0.2:
            return str(s2t.convert(text))  # traditional keyword
        if r < 0.25:
            return full_width(text)
        return text

    for f in range(files):
        lines = ["scripts:"]
        for k in range(f * per_file, min(n_scripts, (f + 1) * per_file)):
            product = products[k % len(products)]
            intent = intent_names[(k // len(products)) % len(intent_names)]
            syn = INTENTS[intent]
            sid = f"p{k // 1000:02d}.{intent}.{k:05d}"
            ids.append(sid)
            lines.append(f"  - id: {sid}")
            lines.append(f"    title: {q(product + ' ' + syn[0] + ' 话术 ' + str(k))}")
            lines.append(f"    examples: {qlist([product + syn[0] + '？', '请问' + product + syn[1]])}")
            lines.append("    triggers:")
            kind = rng.random()
            if kind < 0.55:  # product x intent
                lines.append(f"      keywords_all: {qlist([maybe_variant_text(product), rng.choice(syn)])}")
            elif kind < 0.80:  # product-specific wording
                words = [maybe_variant_text(product + w) for w in rng.sample(syn, 2)]
                lines.append(f"      keywords_any: {qlist(words)}")
            elif kind < 0.85:  # an exact phrase
                phrase = f"{product}{syn[0]}"
                phrases.append(phrase)
                lines.append(f"      phrases: {qlist([phrase, maybe_variant_text(product + syn[1])])}")
            elif kind < 0.95:  # regexes: order numbers, sku and style codes
                r = rng.random()
                if r < 0.1:
                    pattern = rf"订单号?[:：]?\s*{k % 10}\d{{9,17}}"
                    lines.append(f"      regex: {qlist([pattern])}")
                elif r < 0.6:
                    sku = f"{rng.randrange(1000, 99999)}"
                    skus.append(sku)
                    pattern = rf"(?:sku|货号)[-_ ]?{sku}\b"
                    lines.append(f"      regex: {qlist([pattern])}")
                else:
                    style = f"{rng.choice('ABCDEFGHJMNPQRTUVWXYZ')}{rng.choice('ABCDEFGHJMNPQRTUVWXYZ')}"
                    style += str(rng.randrange(100, 999))
                    styles.append(style)
                    pattern = rf"款号\s*{style}(?:-\d{{1,3}})?"
                    lines.append(f"      regex: {qlist([pattern])}")
                lines.append(f"      keywords_any: {qlist([maybe_variant_text(product + syn[0])])}")
            else:  # menu click plus a keyword
                menu = f"menu_{k:05d}"
                menus.append(menu)
                lines.append(f"      menu_ids: [{menu}]")
                lines.append(f"      keywords_any: {qlist([product + syn[2]])}")
            if k % 2000 == 7:
                lines.append(f"      events: [{rng.choice(['contact_added', 'kf_session_entered', 'birthday'])}]")
            if k % 5000 == 11:
                lines.append("      events: [no_match]")
            if rng.random() < 0.33:
                lines.append("    audience:")
                r = rng.random()
                if r < 0.6:
                    lines.append(f"      any_of: {qlist(pick_tags(rng.randint(1, 3)))}")
                elif r < 0.8:
                    lines.append(f"      all_of: {qlist(pick_tags(rng.randint(1, 2)))}")
                else:
                    lines.append(f"      any_of: {qlist(pick_tags(2))}")
                if rng.random() < 0.3:
                    lines.append(f"      none_of: {qlist(pick_tags(1))}")
            if rng.random() < 0.3:
                lines.append(f"    priority: {rng.choice([5, 10, 10, 20, 50])}")
            if rng.random() < 0.05:
                lines.append(f"    cooldown_seconds: {rng.choice([3600, 86400, 604800])}")
            if rng.random() < 0.01:
                lines.append("    active:")
                start, until = rng.choice([("06-01", "06-19"), ("06-01", "12-31"), ("07-01", "12-31")])
                lines.append(f"      from: 2025-{start} 00:00")
                lines.append(f"      until: 2025-{until} 00:00")
                lines.append('      daily: "08:00-23:30"')
            r = rng.random()
            answer = f"{{customer_name}}您好，关于{product}的{syn[0]}：详情请看商品页，有问题随时找{{agent_name}}。"
            if r < 0.3:  # per-tag variants and a default
                lines.append("    variants:")
                for n, tag_set in enumerate([pick_tags(1), pick_tags(2)][: rng.randint(1, 2)]):
                    lines.append(f"      - name: tagged{n}")
                    lines.append(f"        tags: {qlist(tag_set)}")
                    lines.append(f"        priority: {rng.choice([0, 10, 20])}")
                    lines.append(f"        reply: [{{text: {q('尊敬的' + answer)}}}]")
                lines.append("      - name: default")
                lines.append(f"        reply: [{{text: {q(answer)}}}]")
            elif r < 0.4:  # weighted A/B
                lines.append("    variants:")
                for n in range(rng.randint(2, 3)):
                    lines.append(f"      - name: ab{n}")
                    lines.append(f"        weight: {rng.choice([1, 2, 5])}")
                    lines.append(f"        reply: [{{text: {q(answer + '（' + 'ABC'[n] + '）')}}}]")
            elif r < 0.45:  # a link card
                lines.append("    reply:")
                lines.append(f"      - text: {q(answer)}")
                lines.append(f"      - link: {{title: {q(product + '详情')}, url: https://shop.example.com/p/{k}}}")
            else:
                lines.append(f"    reply: [{{text: {q(answer)}}}]")
        (folder / f"scripts_{f:02d}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return World(products, skus, styles, phrases, menus, all_tags, ids)


# ---------------------------------------------------------------------------------------------------------------
# Customers and messages
# ---------------------------------------------------------------------------------------------------------------


def generate_customers(n: int, tags: list[str], rng: random.Random) -> list[frozenset[str]]:
    builtin = sorted(BUILTIN_TAGS)
    others = [t for t in tags if t not in BUILTIN_TAGS]
    weights = [1.0 / (1 + i / 25) for i in range(len(others))]
    out: list[frozenset[str]] = []
    pool: dict[tuple[str, ...], frozenset[str]] = {}
    for _ in range(n):
        got = set(rng.sample(builtin, rng.choice([0, 1, 1, 1, 2])))
        got.update(rng.choices(others, weights, k=rng.choice([0, 1, 2, 3, 4, 6, 8, 12])))
        key = tuple(sorted(got))
        out.append(pool.setdefault(key, frozenset(got)))  # identical sets shared, as a tag cache would
    return out


def generate_messages(n: int, world: World, rng: random.Random) -> list[tuple[str | None, str | None, str | None]]:
    """(text, menu_id, event) triples."""
    s2t = OpenCC("s2t")
    out: list[tuple[str | None, str | None, str | None]] = []
    intents = list(INTENTS.values())
    for _ in range(n):
        r = rng.random()
        product = rng.choice(world.products)
        syn = rng.choice(intents)
        if r < 0.45:
            text = rng.choice(
                [
                    f"{product}{rng.choice(syn)}？",
                    f"请问{product}{rng.choice(syn)}",
                    f"你好，想问下{product}{rng.choice(syn)}，还有{rng.choice(rng.choice(intents))}",
                    f"{rng.choice(syn)}，{product}",
                    f"我买的{product}，{rng.choice(syn)}呢？{rng.choice(world.products)}也是",
                ]
            )
        elif r < 0.55 and world.phrases:
            text = rng.choice(world.phrases) + rng.choice(["", "？", "!", "～"])
        elif r < 0.63:
            if rng.random() < 0.5 and world.skus:
                text = f"SKU-{rng.choice(world.skus)} {rng.choice(syn)}"
            elif world.styles:
                text = f"款号 {rng.choice(world.styles)}-{rng.randrange(1, 99)} 是{product}吗"
            else:
                text = f"{product}{rng.choice(syn)}"
        elif r < 0.68:
            text = f"订单号：{rng.randrange(10**11, 10**12)} {rng.choice(['到哪了', '怎么还没发货', '退款'])}"
        elif r < 0.73 and world.menus:
            out.append((rng.choice(["价格与优惠", "订单", "售后"]), rng.choice(world.menus), None))
            continue
        elif r < 0.75:
            out.append((None, None, rng.choice(["contact_added", "kf_session_entered", "birthday"])))
            continue
        elif r < 0.88:
            text = rng.choice([*SMALL_TALK, "转人工", "人工！", "我要找人工客服"]) + rng.choice(["", "。", "!", "～～"])
        elif r < 0.93:  # long messages: several products and intents
            parts = [
                f"{rng.choice(world.products)}{rng.choice(rng.choice(intents))}" for _ in range(rng.randint(8, 30))
            ]
            text = "，".join(parts) + "。麻烦尽快回复，谢谢！"
        else:
            text = f"{product}{rng.choice(syn)}{rng.choice(['', '？', '呀'])}"
        u = rng.random()
        if u < 0.2:
            text = str(s2t.convert(text))
        elif u < 0.3:
            text = full_width(text)
        out.append((text, None, None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Naive baseline
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Naive:
    script: Script
    any_: tuple[str, ...]
    all_: tuple[str, ...]
    phrases: tuple[str, ...]
    regexes: tuple[tuple[str, re.Pattern[str]], ...]
    menus: frozenset[str]
    events: frozenset[str]


class NaiveMatcher:
    """A loop over all scripts: substring search for keywords, equality for phrases, regex search, then the rule."""

    def __init__(self, library: Library) -> None:
        self.rows = [
            _Naive(
                s,
                tuple(dict.fromkeys(normalize(k) for k in s.triggers.keywords_any)),
                tuple(dict.fromkeys(normalize(k) for k in s.triggers.keywords_all)),
                tuple(normalize_phrase(p) for p in s.triggers.phrases),
                tuple((p, re.compile(p, re.IGNORECASE)) for p in s.triggers.regex),
                frozenset(s.triggers.menu_ids),
                frozenset(s.triggers.events),
            )
            for s in library.scripts
        ]

    def _pick(self, found: list[tuple[_Naive, int]], query: Query) -> Match | None:
        best: tuple[tuple[int, int, int, str], Script] | None = None
        for row, strength in found:
            s = row.script
            if not s.audience.admits(query.tags):
                continue
            if s.window is not None and s.window.why_inactive(query.now):
                continue
            if s.cooldown_seconds:
                last = query.last_sent(s.id)
                if last is not None and query.now - last < s.cooldown_seconds:
                    continue
            key = (-s.priority, -s.audience.strictness, -strength, s.id)
            if best is None or key < best[0]:
                best = (key, s)
        if best is None:
            return None
        variant, how = choose_variant(best[1], query.tags, query.customer_id)
        return Match(best[1], variant, (), how)

    def match(self, query: Query) -> Match | None:
        stages: list[list[tuple[_Naive, int]]] = []
        if query.menu_id:
            stages.append([(r, 1) for r in self.rows if query.menu_id in r.menus])
        norm = normalize(query.text) if query.text else ""
        if norm:
            lo, hi = core_span(norm)
            core = norm[lo:hi]
            bounded = norm[: LIMITS.regex_input_chars]
            found: list[tuple[_Naive, int]] = []
            for r in self.rows:
                strength = 0
                hit = False
                for k in r.any_:
                    if k in norm:
                        strength += 1
                        hit = True
                if r.all_ and all(k in norm for k in r.all_):
                    strength += len(r.all_)
                    hit = True
                for p in r.phrases:
                    if p == core:
                        strength += 100
                        hit = True
                        break
                for _, rx in r.regexes:
                    if rx.search(bounded):
                        strength += 1
                        hit = True
                if hit:
                    found.append((r, strength))
            stages.append(found)
        if query.event:
            stages.append([(r, 1) for r in self.rows if query.event in r.events])
        if query.text is not None and query.fallback_no_match and not query.event:
            stages.append([(r, 1) for r in self.rows if "no_match" in r.events])
        for found in stages:
            winner = self._pick(found, query)
            if winner is not None:
                return winner
        return None


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def pct(sorted_ns: list[int], p: float) -> float:
    """The p-th percentile (nearest rank) in milliseconds."""
    k = max(0, min(len(sorted_ns) - 1, round(p / 100 * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[k] / 1e6


def timed(
    fn: Callable[[Query], Match | None], queries: list[Query], label: str
) -> tuple[list[int], list[Match | None]]:
    out_ns: list[int] = []
    results: list[Match | None] = []
    clock = time.perf_counter_ns
    step = max(1, len(queries) // 5)
    t0 = time.perf_counter()
    for i, query in enumerate(queries):
        start = clock()
        result = fn(query)
        out_ns.append(clock() - start)
        results.append(result)
        if (i + 1) % step == 0:
            print(f"  [{label}] {i + 1}/{len(queries)} messages, {time.perf_counter() - t0:.1f}s", flush=True)
    return out_ns, results


def summary(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {
        "p50": pct(s, 50),
        "p99": pct(s, 99),
        "max": s[-1] / 1e6,
        "mean": statistics.fmean(s) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", type=int, default=10_000, help="scripts in the library (10000)")
    p.add_argument("--tags", type=int, default=500, help="tags, the 5 built-in SOP tags included (500)")
    p.add_argument("--customers", type=int, default=100_000, help="customers (100000)")
    p.add_argument("--messages", type=int, default=5_000, help="messages matched by both matchers (5000)")
    p.add_argument("--files", type=int, default=20, help="YAML files the scripts are spread over (20)")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed ({SEED})")
    args = p.parse_args(argv)
    if min(args.scripts, args.customers, args.messages, args.files) < 1 or args.tags < len(BUILTIN_TAGS) + 1:
        p.error("counts must be positive and --tags above 5")
    started = time.monotonic()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    rng = random.Random(args.seed)
    normalize("預熱")  # load the OpenCC dictionaries once, as a running server has
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="wecom-match-bench-") as tmp_name:
        folder = Path(tmp_name)
        t = time.perf_counter()
        world = generate_library(folder, args.scripts, args.tags, args.files, rng)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(
            f"generated {args.scripts + 2} scripts in {args.files + 3} files ({size / 1e6:.1f} MB), "
            f"{len(world.tags)} tags, in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
        loads: list[float] = []
        library: Library | None = None
        for label in ("load", "reload", "reload, one file edited"):
            if label.endswith("edited"):
                edited = folder / "scripts_00.yaml"
                edited.write_text(edited.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
            t = time.perf_counter()
            loaded = load_library(folder)
            loads.append(time.perf_counter() - t)
            if not isinstance(loaded, Library):
                for problem in loaded[:20]:
                    print(f"PROBLEM in generated library: {problem}")
                return 1
            library = loaded
            print(f"{label}: load_library({len(loaded.scripts)} scripts) in {loads[-1]:.2f}s", flush=True)
    assert library is not None
    if len(library.tags) != args.tags:
        problems.append(f"library has {len(library.tags)} tags, expected {args.tags}")
    t = time.perf_counter()
    matcher = Matcher(library)
    build_s = time.perf_counter() - t
    print(f"Matcher(library) built in {build_s:.2f}s", flush=True)
    t = time.perf_counter()
    naive = NaiveMatcher(library)
    print(f"naive baseline prepared in {time.perf_counter() - t:.2f}s", flush=True)

    t = time.perf_counter()
    customers = generate_customers(args.customers, world.tags, rng)
    raw = generate_messages(args.messages, world, rng)
    cooldown_ids = [s.id for s in library.scripts if s.cooldown_seconds]
    sent: dict[int, dict[str, float]] = {}
    for c in rng.sample(range(args.customers), args.customers // 10):  # a tenth got some cooled-down script lately
        sent[c] = {
            sid: NOW - rng.choice([600, 7200, 172800]) for sid in rng.sample(cooldown_ids, min(20, len(cooldown_ids)))
        }
    empty: dict[str, float] = {}
    queries: list[Query] = []
    for text, menu, event in raw:
        c = rng.randrange(args.customers)
        history = sent.get(c, empty)
        queries.append(
            Query(
                text=text,
                event=event,
                menu_id=menu,
                tags=customers[c],
                customer_id=f"wm{c:07d}",
                now=NOW + rng.randrange(0, 86400),
                last_sent=history.get,
            )
        )
    mean_tags = statistics.fmean(len(c) for c in customers)
    print(
        f"{args.customers} customers (mean {mean_tags:.1f} tags), {len(queries)} queries built in "
        f"{time.perf_counter() - t:.1f}s",
        flush=True,
    )

    # warm-up: a few hundred queries through both, not timed
    for query in queries[:300]:
        matcher.match(query)
        naive.match(query)
    print("matching (GC on, perf_counter_ns around each call)", flush=True)
    fast_ns, fast = timed(matcher.match, queries, "matcher")
    naive_ns, slow = timed(naive.match, queries, "naive")

    mismatches = 0
    outcomes = {"no answer": 0, "text": 0, "no_match fallback": 0, "menu": 0, "event": 0}
    for query, a, b in zip(queries, fast, slow, strict=True):
        ka = (a.script.id, a.variant.name) if a else None
        kb = (b.script.id, b.variant.name) if b else None
        if ka != kb:
            mismatches += 1
            if mismatches <= 10:
                print(f"MISMATCH {query.text!r} menu={query.menu_id} event={query.event}: matcher {ka}, naive {kb}")
        if a is None:
            outcomes["no answer"] += 1
        elif query.event:
            outcomes["event"] += 1
        elif query.menu_id and any(r.startswith("menu_id") for r in a.reasons):
            outcomes["menu"] += 1
        elif "no_match" in a.script.triggers.events and any(r.startswith("event") for r in a.reasons):
            outcomes["no_match fallback"] += 1
        else:
            outcomes["text"] += 1
    if mismatches:
        problems.append(f"{mismatches} of {len(queries)} messages: matcher and naive loop chose differently")
    explained = sum(1 for query, a in zip(queries[:2000], fast, strict=False) if matcher.explain(query).winner == a)
    if explained != min(2000, len(queries)):
        problems.append("Matcher.explain(...).winner differs from Matcher.match(...)")

    fs, ns = summary(fast_ns), summary(naive_ns)
    print()
    print("=" * 78)
    print(
        f"library: {len(library.scripts)} scripts, {len(library.tags)} tags, "
        f"{sum(len(s.triggers.regex) for s in library.scripts)} regexes; "
        f"{args.customers} customers; {len(queries)} messages"
    )
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    print(f"same winner (script and variant) as the naive loop: {len(queries) - mismatches}/{len(queries)}")
    print(
        f"load_library: {loads[0]:.2f}s, reload {loads[1]:.2f}s, reload with one file edited {loads[2]:.2f}s "
        f"(target ≤ {LOAD_TARGET_S:g} s); "
        f"Matcher build {build_s:.2f}s"
    )
    print("| matcher | p50 | p99 | max | mean |")
    print("|---|---:|---:|---:|---:|")
    for label, s in (("naive loop over all scripts", ns), ("Matcher.match", fs)):
        print(f"| {label} | {s['p50']:.3f} ms | {s['p99']:.3f} ms | {s['max']:.2f} ms | {s['mean']:.3f} ms |")
    print(
        f"| **naive / Matcher** | {ns['p50'] / fs['p50']:.0f}× | {ns['p99'] / fs['p99']:.0f}× | "
        f"{ns['max'] / fs['max']:.0f}× | {ns['mean'] / fs['mean']:.0f}× |"
    )
    ok_p99 = fs["p99"] <= P99_TARGET_MS
    ok_load = max(loads) <= LOAD_TARGET_S
    print(f"match p99 {fs['p99']:.3f} ms (target ≤ {P99_TARGET_MS} ms): {'met' if ok_p99 else 'NOT met'}")
    print(f"load/reload {max(loads):.2f} s (target ≤ {LOAD_TARGET_S:g} s): {'met' if ok_load else 'NOT met'}")
    print(f"GC collections during the run: {[g['collections'] for g in gc.get_stats()]}")
    print(f"total wall time {time.monotonic() - started:.0f}s")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
