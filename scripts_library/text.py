"""Text helpers: normalisation for matching, the placeholder template syntax, and the regex safety check."""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from opencc_purepy import OpenCC

_EDGE_PUNCT = " \t\r\n!?.,~:;。，！？、…~～：；\"'“”‘’()（）[]【】<>《》"


@lru_cache(maxsize=1)
def _t2s() -> OpenCC:
    return OpenCC("t2s")


@dataclass(frozen=True, slots=True)
class _CharT2S:
    """OpenCC's t2s dictionary (`merged_map`: phrases and single characters) arranged for CPython's C loops."""

    chars: dict[int, str]  # single-character keys that change: code point -> replacement
    bmp: str  # the same for the Basic Multilingual Plane as a dense string, which `str.translate` indexes faster
    convertible: re.Pattern[str]  # finds a character that converts (or any astral one)
    phrase_pairs: frozenset[str]  # the first two characters of every phrase key
    phrase_hint: re.Pattern[str]  # finds, at every position, a pair of characters that may start a phrase key
    phrase: re.Pattern[str]  # matches the longest phrase key starting at a position
    phrases: dict[str, str]


def _char_class(chars: Iterable[str]) -> str:
    return "[" + "".join(re.escape(c) for c in sorted(set(chars))) + "]"


@lru_cache(maxsize=1)
def _char_t2s() -> _CharT2S | None:
    """The converter's own t2s tables (None if they are not reachable: then every text goes through OpenCC)."""
    try:
        refs: Any = _t2s()._get_dict_refs("t2s")
        rounds = [r for r in (refs.round_1, refs.round_2, refs.round_3) if r]
        if len(rounds) != 1:  # t2s is one round today; several would chain, which this cannot
            return None
        mapping = {str(key): str(value) for key, value in rounds[0].merged_map.items()}
    except (AttributeError, TypeError):
        return None
    if not all(mapping) or any(len(value) != 1 for key, value in mapping.items() if len(key) == 1):
        return None
    chars = {ord(key): value for key, value in mapping.items() if len(key) == 1 and key != value}
    phrases = {key: value for key, value in mapping.items() if len(key) > 1}
    bmp = "".join(chars.get(code, chr(code)) for code in range(0xD800)) + "".join(
        chars.get(code, "\ufffd" if code < 0xE000 else chr(code)) for code in range(0xD800, 0x10000)
    )  # surrogate code points cannot be in a str; their slots are never looked up
    bmp_keys = [chr(code) for code in chars if code < 0x10000]
    # Python's regex engine checks a large character class by a bitmap only when it is all in the BMP
    convertible = re.compile(f"{_char_class(bmp_keys)}|[\U00010000-\U0010ffff]")
    by_first: dict[str, list[str]] = {}
    for key in phrases:
        by_first.setdefault(key[0], []).append(key[1:])
    # Alternatives longest first, so at a position the regex takes the longest key, as the converter does
    alternatives = (
        re.escape(first) + "(?:" + "|".join(re.escape(rest) for rest in sorted(rests, key=lambda r: (-len(r), r))) + ")"
        for first, rests in sorted(by_first.items())
    )
    return _CharT2S(
        chars=chars,
        bmp=bmp,
        convertible=convertible,
        phrase_pairs=frozenset(key[:2] for key in phrases),
        phrase_hint=re.compile(f"(?={_char_class(k[0] for k in phrases)}{_char_class(k[1] for k in phrases)})"),
        phrase=re.compile("|".join(alternatives)),
        phrases=phrases,
    )


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _translate_chars(t2s: _CharT2S, text: str) -> str:
    if not t2s.convertible.search(text):
        return text
    if _ASTRAL.search(text):
        return text.translate(t2s.chars)
    return text.translate(t2s.bmp)


def to_simplified(text: str) -> str:
    """OpenCC t2s, traditional -> simplified Chinese: the converter's output, without its per-character Python loop.

    The converter replaces, from left to right, the longest dictionary key starting at each position. A phrase key
    (一目瞭然 -> 一目了然, 乾坤 stays) can only start where its first two characters are; there the longest one
    that matches is taken, as the converter does. The text around phrases has only single-character keys, which
    `str.translate` replaces.
    """
    t2s = _char_t2s()
    if t2s is None:
        return str(_t2s().convert(text)) if text else text
    pairs = t2s.phrase_pairs
    out: list[str] = []
    pos = 0
    for hint in t2s.phrase_hint.finditer(text):
        start = hint.start()
        if start < pos or text[start : start + 2] not in pairs:
            continue
        found = t2s.phrase.match(text, start)
        if found is not None:
            out.append(_translate_chars(t2s, text[pos:start]))
            out.append(t2s.phrases[found.group()])
            pos = found.end()
    if not out:
        return _translate_chars(t2s, text)
    out.append(_translate_chars(t2s, text[pos:]))
    return "".join(out)


# Full-width punctuation common in Chinese messages, each with what NFKC makes of it. Replaced before NFKC runs,
# most messages are then already normalised and NFKC's quick check returns them as they are, instead of
# decomposing and recomposing every character (the larger part of normalising a long message before). The result
# is the same: NFKC first decomposes each character to its compatibility form, which is exactly the replacement.
_PUNCT_NFKC = tuple((c, unicodedata.normalize("NFKC", c)) for c in "，！？：；（）～\u3000")
_FULL_WIDTH_RUN = re.compile("[\uff01-\uff5e]+")  # other full-width forms (letters, digits): NFKC per run


def _nfkc_run(m: re.Match[str]) -> str:
    return unicodedata.normalize("NFKC", m.group())


def normalize(text: str) -> str:
    """NFKC (full width -> half width), case-folded, traditional -> simplified, whitespace collapsed."""
    for punct, plain in _PUNCT_NFKC:
        if punct in text:
            text = text.replace(punct, plain)
    if not text.isascii():
        text = _FULL_WIDTH_RUN.sub(_nfkc_run, text)
    folded = unicodedata.normalize("NFKC", text).casefold()
    # str.split() and re's \s both split at exactly the characters str.isspace() accepts
    return " ".join(to_simplified(folded).split())


@lru_cache(maxsize=65_536)
def normalize_term(text: str) -> str:
    """`normalize` for library terms (keywords, phrases), memoised: a library repeats its words many times."""
    return normalize(text)


def core_span(text: str) -> tuple[int, int]:
    """The [start, end) of `text` without leading/trailing spaces and punctuation (what a phrase must equal)."""
    start, end = 0, len(text)
    while start < end and text[start] in _EDGE_PUNCT:
        start += 1
    while end > start and text[end - 1] in _EDGE_PUNCT:
        end -= 1
    return start, end


def normalize_phrase(text: str) -> str:
    """A phrase as it is compared: normalised, without edge punctuation."""
    norm = normalize_term(text)
    start, end = core_span(norm)
    return norm[start:end]


# --- placeholders ---------------------------------------------------------------------------------------------
# `{name}` is a placeholder, `{{` and `}}` are literal braces; anything else with a brace is an error.
# Rendering walks these tokens; it never calls str.format, so no attribute or index access is possible.

# Every alternative starts with a literal brace, so the regex engine skips ahead to the next brace instead of trying
# each position (twice as fast on replies); the same matches as {{ | }} | {name} | [{}] tried in that order.
_TOKEN = re.compile(r"\{(?:\{|([A-Za-z_][A-Za-z0-9_]*)\})?|\}\}?")


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Token:
    literal: str = ""
    placeholder: str = ""


class TemplateError(ValueError):
    pass


def parse_template(template: str) -> list[Token]:
    """Split a template into literal and placeholder tokens; raise TemplateError on a stray brace."""
    tokens: list[Token] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        if m.start() > pos:
            tokens.append(Token(literal=template[pos : m.start()]))
        found = m.group(0)
        if found == "{{":
            tokens.append(Token(literal="{"))
        elif found == "}}":
            tokens.append(Token(literal="}"))
        elif m.group(1):
            tokens.append(Token(placeholder=m.group(1)))
        else:
            raise _stray(m)
        pos = m.end()
    if pos < len(template):
        tokens.append(Token(literal=template[pos:]))
    return tokens


def _stray(m: re.Match[str]) -> TemplateError:
    found = m.group(0)
    return TemplateError(f"stray {found!r} at column {m.start() + 1} (write {found * 2} for a literal brace)")


@lru_cache(maxsize=65_536)
def template_parts(template: str) -> tuple[tuple[str, ...], int]:
    """What the validator needs of a template, memoised: its placeholders in order and the UTF-8 size of its
    literal text (`{{` and `}}` count one byte). Raises TemplateError as `parse_template` does.

    Counted from the encoded size minus the tokens, so no token objects are built: the loader checks every
    reply of a 10,000-script library with it.
    """
    size = len(template.encode())
    if "{" not in template and "}" not in template:
        return (), size
    found = _PLACEHOLDER.findall(template)
    if template.count("{") == len(found) == template.count("}"):
        # every brace belongs to one of the {name}s found, so there is nothing else for the tokens to be
        return tuple(found), size - sum(len(name) + 2 for name in found)  # names are ASCII
    names: list[str] = []
    for m in _TOKEN.finditer(template):
        name = m.group(1)
        if name:
            names.append(name)
            size -= len(name) + 2  # the name is ASCII
        elif m.end() - m.start() == 2:  # {{ or }}
            size -= 1
        else:
            raise _stray(m)
    return tuple(names), size


def placeholders_in(template: str) -> list[str]:
    """The placeholder names a template uses, in order."""
    return [t.placeholder for t in parse_template(template) if t.placeholder]


# --- regex safety ---------------------------------------------------------------------------------------------

_sre: Any = importlib.import_module("re._parser")  # the stdlib's own regex parser (no stub in typeshed)
_sre_compile: Any = importlib.import_module("re._compiler")  # and its compiler, which accepts a parsed pattern
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT"}
_WILD = "*"  # a first-character set that may overlap anything


def _first_chars(seq: Any) -> set[Any]:
    """Characters a sub-pattern may start with; {_WILD} when not a small literal set (conservative)."""
    for op, av in seq:
        name = str(op)
        if name == "LITERAL":
            return {av}
        if name == "IN":
            chars: set[Any] = set()
            for iop, iav in av:
                iname = str(iop)
                if iname == "LITERAL":
                    chars.add(iav)
                elif iname == "RANGE" and iav[1] - iav[0] <= 256:
                    chars.update(range(iav[0], iav[1] + 1))
                else:
                    return {_WILD}
            return chars
        if name == "SUBPATTERN":
            return _first_chars(av[3])
        if name in ("AT",):
            continue
        return {_WILD}
    return set()


def _overlap(a: set[Any], b: set[Any]) -> bool:
    return _WILD in a or _WILD in b or bool(a & b) or not a or not b


def _contains_repeat(seq: Any) -> bool:
    for op, av in seq:
        name = str(op)
        if name in _REPEATS and av[1] > 1:
            return True
        if name == "SUBPATTERN" and _contains_repeat(av[3]):
            return True
        if name == "BRANCH" and any(_contains_repeat(alt) for alt in av[1]):
            return True
        if name in ("ASSERT", "ASSERT_NOT") and _contains_repeat(av[1]):
            return True
    return False


def _ambiguous_branch(seq: Any) -> bool:
    """An alternation whose alternatives may start with the same character (like (a|a) or (a|ab))."""
    for op, av in seq:
        name = str(op)
        if name == "BRANCH":
            firsts = [_first_chars(alt) for alt in av[1]]
            for i, fa in enumerate(firsts):
                if any(_overlap(fa, fb) for fb in firsts[i + 1 :]):
                    return True
        if name == "SUBPATTERN" and _ambiguous_branch(av[3]):
            return True
    return False


def _unsafe(seq: Any) -> str:
    for op, av in seq:
        name = str(op)
        if name == "GROUPREF" or name == "GROUPREF_EXISTS":
            return "backreferences are not allowed"
        if name in _REPEATS and av[1] > 1:
            body = av[2]
            if _contains_repeat(body):
                return "nested quantifier (like (a+)+) can backtrack catastrophically"
            if _ambiguous_branch(body):
                return "repeated alternation with overlapping branches (like (a|a)*) can backtrack catastrophically"
            found = _unsafe(body)
            if found:
                return found
        elif name == "SUBPATTERN":
            found = _unsafe(av[3])
            if found:
                return found
        elif name == "BRANCH":
            for alt in av[1]:
                found = _unsafe(alt)
                if found:
                    return found
        elif name in ("ASSERT", "ASSERT_NOT"):
            found = _unsafe(av[1])
            if found:
                return found
        elif name == "POSSESSIVE_REPEAT" or name == "ATOMIC_GROUP":
            found = _unsafe(av[2] if name == "POSSESSIVE_REPEAT" else av)
            if found:
                return found
    return ""


@lru_cache(maxsize=16_384)  # pure: a reload re-checks the same patterns
def regex_problem(pattern: str, max_chars: int) -> str:
    """Empty when the pattern compiles and is safe to run on untrusted text, else the cause."""
    if len(pattern) > max_chars:
        return f"regex longer than {max_chars} characters"
    try:
        parsed = _sre.parse(pattern)
        _sre_compile.compile(parsed)  # what re.compile does after parsing: a third of a cold load's regex time
    except re.error as exc:
        return f"bad regex: {exc}"
    cause = _unsafe(list(parsed))
    return f"unsafe regex: {cause}" if cause else ""


def _literal_char(c: str) -> str | None:
    """`c` as it must appear in normalised text for a case-insensitive regex literal to match there; None when
    that is not certain. Safe: ASCII digits and punctuation, ASCII letters lowered (normalised text is
    case-folded) except i, k and s (which IGNORECASE also matches to ı, İ, K and ſ), and CJK characters."""
    if c.isascii():
        if c.isalpha():
            return None if c in "iksIKS" else c.lower()
        return c if c.isprintable() else None
    code = ord(c)
    if 0x3000 <= code <= 0x303F or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF:
        return c
    return None


def required_literal(pattern: str) -> str:
    """The longest run of literal characters any match of `pattern` must contain ("" if none is certain).

    Only top-level literals of the pattern's main sequence count, and only characters `_literal_char` vouches
    for; anything else (classes, repeats, groups, branches, anchors) ends a run. The matcher runs the regex
    only on texts containing this literal, which cannot change whether it matches.
    """
    try:
        parsed = _sre.parse(pattern, re.IGNORECASE)
    except (re.error, RecursionError):
        return ""
    best = ""
    run: list[str] = []
    for op, av in parsed:
        char = _literal_char(chr(av)) if str(op) == "LITERAL" else None
        if char is not None:
            run.append(char)
            continue
        if len(run) > len(best):
            best = "".join(run)
        run = []
    if len(run) > len(best):
        best = "".join(run)
    return best
