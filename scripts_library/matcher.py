"""Pure matcher: which script and variant answer a customer, and why the others did not."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import ahocorasick  # type: ignore[import-not-found,import-untyped,unused-ignore]

from scripts_library.model import LIMITS, Library, Script, Variant
from scripts_library.text import core_span, normalize, normalize_phrase

PHRASE_STRENGTH = 100  # an exact phrase is more specific than any number of keywords


def _never_sent(_script_id: str) -> float | None:
    return None


@dataclass(frozen=True, slots=True)
class Query:
    """What the matcher sees: a message (text and/or menu click) or an event, about one customer, at `now`."""

    text: str | None = None
    event: str | None = None
    menu_id: str | None = None
    tags: frozenset[str] = frozenset()
    customer_id: str = ""
    now: float = 0.0  # unix seconds
    last_sent: Callable[[str], float | None] = _never_sent  # script id -> when it last went to this customer
    fallback_no_match: bool = True  # text that matches nothing falls back to `no_match` event scripts


@dataclass(frozen=True, slots=True)
class Match:
    script: Script
    variant: Variant
    reasons: tuple[str, ...]
    assignment: str  # "tag" (per-tag variant), "default", or "ab" (weighted, sticky per customer)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A script that was triggered (or nearly) but did not win."""

    script: Script
    reasons: tuple[str, ...]
    lost_because: str


@dataclass(frozen=True, slots=True)
class Explanation:
    winner: Match | None
    near_misses: tuple[Candidate, ...]
    normalized_text: str = ""

    def lines(self) -> list[str]:
        """Human-readable lines, as `wecom-bot scripts explain` prints them."""
        out = [f"normalised text: {self.normalized_text!r}"] if self.normalized_text else []
        if self.winner is None:
            out.append("winner: none (no script answers)")
        else:
            w = self.winner
            out.append(f"winner: {w.script.id} ({w.script.title}) [{w.script.file}:{w.script.line}]")
            out.append(f"variant: {w.variant.name} ({w.assignment})")
            out.extend(f"  because {reason}" for reason in w.reasons)
        if self.near_misses:
            out.append("near misses:")
            for c in self.near_misses:
                why = "; ".join(c.reasons) or "-"
                out.append(f"  {c.script.id}: lost, {c.lost_because} (triggered by {why})")
        return out


@dataclass(slots=True)
class _Hit:
    reasons: list[str] = field(default_factory=list)
    strength: int = 0


def sticky_bucket(script_id: str, customer_id: str, total: int) -> int:
    """A stable number in [0, total) for this customer and script (same input, same output, any process)."""
    digest = hashlib.sha256(f"{script_id}\x00{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % total


def choose_variant(script: Script, tags: frozenset[str], customer_id: str) -> tuple[Variant, str]:
    """Per-tag variants (highest priority, then name) beat the default; several defaults are a sticky A/B test."""
    tagged = [v for v in script.variants if v.tags and v.tags & tags]
    if tagged:
        top = max(v.priority for v in tagged)
        group = sorted((v for v in tagged if v.priority == top), key=lambda v: v.name)
        if len(group) == 1:
            return group[0], "tag"
        kind = "tag+ab"
    else:
        group = sorted((v for v in script.variants if not v.tags), key=lambda v: v.name)
        if len(group) == 1:
            return group[0], "default"
        kind = "ab"
    bucket = sticky_bucket(script.id, customer_id, sum(v.weight for v in group))
    for variant in group:
        if bucket < variant.weight:
            return variant, kind
        bucket -= variant.weight
    return group[-1], kind  # unreachable: the buckets cover the total weight


class Matcher:
    """Built once per library: one Aho-Corasick automaton over every keyword and phrase, plus indexes."""

    def __init__(self, library: Library) -> None:
        self.library = library
        self.scripts = library.scripts
        self._automaton = ahocorasick.Automaton()
        terms: dict[str, list[tuple[int, str]]] = {}
        self._required: list[frozenset[str]] = []
        self._regexes: list[tuple[int, str, re.Pattern[str]]] = []
        self._by_menu: dict[str, list[int]] = {}
        self._by_event: dict[str, list[int]] = {}
        for index, script in enumerate(self.scripts):
            t = script.triggers
            for kw in t.keywords_any:
                terms.setdefault(normalize(kw), []).append((index, "any"))
            required = frozenset(normalize(kw) for kw in t.keywords_all)
            self._required.append(required)
            for kw in required:
                terms.setdefault(kw, []).append((index, "all"))
            for phrase in t.phrases:
                terms.setdefault(normalize_phrase(phrase), []).append((index, "phrase"))
            for pattern in t.regex:
                self._regexes.append((index, pattern, re.compile(pattern, re.IGNORECASE)))
            for menu_id in t.menu_ids:
                self._by_menu.setdefault(menu_id, []).append(index)
            for event in t.events:
                self._by_event.setdefault(event, []).append(index)
        for term, entries in terms.items():
            self._automaton.add_word(term, (term, tuple(entries)))
        self._has_terms = bool(terms)
        if self._has_terms:
            self._automaton.make_automaton()

    # --- triggers ------------------------------------------------------------------------------------------

    def _text_hits(self, norm: str) -> tuple[dict[int, _Hit], dict[int, str]]:
        """Scripts whose text triggers fire, and keywords_all scripts that missed some words (near misses)."""
        any_found: dict[int, set[str]] = {}
        all_found: dict[int, set[str]] = {}
        phrase_found: dict[int, str] = {}
        lo, hi = core_span(norm)
        if self._has_terms and norm:
            for end, (term, entries) in self._automaton.iter(norm):
                start = end - len(term) + 1
                for index, kind in entries:
                    if kind == "any":
                        any_found.setdefault(index, set()).add(term)
                    elif kind == "all":
                        all_found.setdefault(index, set()).add(term)
                    elif start == lo and end == hi - 1:
                        phrase_found[index] = term
        hits: dict[int, _Hit] = {}
        partial: dict[int, str] = {}
        for index, found in any_found.items():
            hit = hits.setdefault(index, _Hit())
            hit.reasons.append("keywords_any " + ",".join(sorted(found)))
            hit.strength += len(found)
        for index, found in all_found.items():
            required = self._required[index]
            if found >= required:
                hit = hits.setdefault(index, _Hit())
                hit.reasons.append("keywords_all " + ",".join(sorted(required)))
                hit.strength += len(required)
            else:
                partial[index] = "keywords_all missing " + ",".join(sorted(required - found))
        for index, phrase in phrase_found.items():
            hit = hits.setdefault(index, _Hit())
            hit.reasons.append(f"phrase {phrase!r}")
            hit.strength += PHRASE_STRENGTH
        bounded = norm[: LIMITS.regex_input_chars]
        for index, pattern, compiled in self._regexes:
            if compiled.search(bounded):
                hit = hits.setdefault(index, _Hit())
                hit.reasons.append(f"regex {pattern!r}")
                hit.strength += 1
        for index in partial.keys() & hits.keys():
            del partial[index]
        return hits, partial

    def _id_hits(self, index: dict[str, list[int]], key: str, label: str) -> dict[int, _Hit]:
        return {i: _Hit([f"{label} {key!r}"], 1) for i in index.get(key, [])}

    # --- choice --------------------------------------------------------------------------------------------

    def _decide(
        self, hits: dict[int, _Hit], partial: dict[int, str], query: Query, misses: list[Candidate]
    ) -> Match | None:
        eligible: list[tuple[Script, _Hit]] = []
        for index, hit in hits.items():
            script = self.scripts[index]
            why = script.audience.why_not(query.tags)
            if not why and script.window is not None:
                why = script.window.why_inactive(query.now)
            if not why and script.cooldown_seconds:
                last = query.last_sent(script.id)
                if last is not None and query.now - last < script.cooldown_seconds:
                    why = f"cooldown: sent {int(query.now - last)}s ago, cooldown {script.cooldown_seconds}s"
            if why:
                misses.append(Candidate(script, tuple(hit.reasons), why))
            else:
                eligible.append((script, hit))
        for index, why in partial.items():
            misses.append(Candidate(self.scripts[index], (), why))
        if not eligible:
            return None
        eligible.sort(key=lambda sh: (-sh[0].priority, -sh[0].audience.strictness, -sh[1].strength, sh[0].id))
        best, best_hit = eligible[0]
        for script, hit in eligible[1:]:
            if script.priority != best.priority:
                why = f"lower priority {script.priority} < {best.priority}"
            elif script.audience.strictness != best.audience.strictness:
                why = f"broader audience ({script.audience.strictness} < {best.audience.strictness} conditions)"
            elif hit.strength != best_hit.strength:
                why = f"less specific match ({hit.strength} < {best_hit.strength})"
            else:
                why = f"same rank, id sorts after {best.id!r}"
            misses.append(Candidate(script, tuple(hit.reasons), why))
        variant, assignment = choose_variant(best, query.tags, query.customer_id)
        reasons = [*best_hit.reasons]
        if best.audience.strictness:
            reasons.append("audience admits tags " + (",".join(sorted(query.tags)) or "(none)"))
        reasons.append(f"priority {best.priority}")
        return Match(best, variant, tuple(reasons), assignment)

    def explain(self, query: Query) -> Explanation:
        """The winner (or None), why, and the triggered scripts that lost and why."""
        misses: list[Candidate] = []
        norm = normalize(query.text) if query.text else ""
        stages: list[tuple[dict[int, _Hit], dict[int, str]]] = []
        if query.menu_id:
            stages.append((self._id_hits(self._by_menu, query.menu_id, "menu_id"), {}))
        if norm:
            stages.append(self._text_hits(norm))
        if query.event:
            stages.append((self._id_hits(self._by_event, query.event, "event"), {}))
        if query.text is not None and query.fallback_no_match and not query.event:
            stages.append((self._id_hits(self._by_event, "no_match", "event"), {}))
        for hits, partial in stages:
            winner = self._decide(hits, partial, query, misses)
            if winner is not None:
                return Explanation(winner, tuple(misses), norm)
        return Explanation(None, tuple(misses), norm)

    def match(self, query: Query) -> Match | None:
        """The script and variant that answer this query, or None."""
        return self.explain(query).winner
