"""Text helpers: normalisation for matching, the placeholder template syntax, and the regex safety check."""

from __future__ import annotations

import importlib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from opencc_purepy import OpenCC

_EDGE_PUNCT = " \t\r\n!?.,~:;。，！？、…~～：；\"'“”‘’()（）[]【】<>《》"
_SPACES = re.compile(r"\s+")


@lru_cache(maxsize=1)
def _t2s() -> OpenCC:
    return OpenCC("t2s")


@lru_cache(maxsize=1)
def _t2s_starters() -> frozenset[str] | None:
    """The first characters of every t2s dictionary key (None if the converter's tables are not reachable).

    The converter only ever replaces text where a key starts, so text without any of these converts to itself.
    """
    try:
        refs: Any = _t2s()._get_dict_refs("t2s")
        rounds = [r for r in (refs.round_1, refs.round_2, refs.round_3) if r]
        return frozenset(key[0] for r in rounds for key in r.merged_map if key)
    except (AttributeError, TypeError):
        return None


def normalize(text: str) -> str:
    """NFKC (full width -> half width), case-folded, traditional -> simplified, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    starters = _t2s_starters()
    if starters is None or not starters.isdisjoint(folded):
        folded = str(_t2s().convert(folded))
    return _SPACES.sub(" ", folded).strip()


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
