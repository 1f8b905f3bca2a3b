"""Pure matcher: which script and variant answer a customer, and why the others did not."""

from __future__ import annotations

import functools
import hashlib
import re
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import ahocorasick  # type: ignore[import-not-found,import-untyped,unused-ignore]

from scripts_library._gc import gc_paused
from scripts_library.model import LIMITS, Library, Script, Variant
from scripts_library.text import core_span, normalize, normalize_phrase, normalize_term, required_literal

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


_NO_PAIRS: Mapping[str, tuple[int, ...]] = MappingProxyType({})
_NO_PARTNERS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Term:
    """What finding one normalised term in a message means: which scripts it triggers, or may trigger."""

    term: str
    any_of: tuple[int, ...] = ()  # scripts with it in keywords_any
    all_of: tuple[int, ...] = ()  # scripts with it in keywords_all
    # keywords_all scripts whose rarest required word it is, by their number of words: one (triggered by this
    # word alone), two (under their other word: triggered when that was found too), more (check all their words)
    anchor_of_one: tuple[int, ...] = ()
    anchor_of_two: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: _NO_PAIRS)
    anchor_partners: frozenset[str] = _NO_PARTNERS  # the keys of anchor_of_two
    anchor_of_more: tuple[int, ...] = ()
    phrase_of: tuple[int, ...] = ()  # scripts with it as an exact phrase
    regex_of: tuple[int, ...] = ()  # positions in Matcher._regexes whose required literal it is


class Matcher:
    """Built once per library: one Aho-Corasick automaton over every keyword, phrase and regex literal, plus indexes.

    `match` takes a short path: keywords_all scripts are found through their rarest word only, a regex runs only
    when its required literal is in the text, and the winner is the first eligible script in rank order, with
    no near-miss bookkeeping. `explain` does the full walk. Both choose the same winner.
    """

    def __init__(self, library: Library) -> None:
        with gc_paused():
            self._build(library)

    def _build(self, library: Library) -> None:
        self.library = library
        self.scripts = library.scripts
        self._automaton = ahocorasick.Automaton()
        any_of: dict[str, list[int]] = {}
        all_of: dict[str, list[int]] = {}
        phrase_of: dict[str, list[int]] = {}
        regex_of: dict[str, list[int]] = {}
        self._required: list[frozenset[str]] = []
        self._any_terms: list[tuple[str, ...]] = []  # per script: its distinct normalised keywords_any
        self._phrase_terms: list[tuple[str, ...]] = []  # per script: its distinct normalised phrases
        self._regexes: list[tuple[int, str, re.Pattern[str]]] = []
        self._unfiltered_regexes: tuple[int, ...] = ()  # positions of regexes without a usable literal
        unfiltered: list[int] = []
        self._regexes_of: dict[int, list[int]] = {}  # script -> its positions in _regexes
        self._by_menu: dict[str, list[int]] = {}
        self._by_event: dict[str, list[int]] = {}
        for index, script in enumerate(self.scripts):
            t = script.triggers
            any_terms = tuple(dict.fromkeys(term for term in map(normalize_term, t.keywords_any) if term))
            self._any_terms.append(any_terms)
            for term in any_terms:  # two keywords may normalise alike; they count once
                any_of.setdefault(term, []).append(index)
            required = frozenset(normalize_term(kw) for kw in t.keywords_all)
            self._required.append(required)
            for kw in required:
                all_of.setdefault(kw, []).append(index)
            phrase_terms = tuple(dict.fromkeys(term for term in map(normalize_phrase, t.phrases) if term))
            self._phrase_terms.append(phrase_terms)
            for term in phrase_terms:
                phrase_of.setdefault(term, []).append(index)
            for pattern in t.regex:
                literal = required_literal(pattern)
                if literal:
                    regex_of.setdefault(literal, []).append(len(self._regexes))
                else:
                    unfiltered.append(len(self._regexes))
                self._regexes_of.setdefault(index, []).append(len(self._regexes))
                self._regexes.append((index, pattern, re.compile(pattern, re.IGNORECASE)))
            for menu_id in t.menu_ids:
                self._by_menu.setdefault(menu_id, []).append(index)
            for event in t.events:
                self._by_event.setdefault(event, []).append(index)
        self._unfiltered_regexes = tuple(unfiltered)
        # The choice rule is (priority desc, audience strictness desc, strength desc, id). `_group` numbers the
        # (priority, strictness) pairs in that order and `_id_rank` the ids, so that sorting the tuples
        # (group, -strength, id rank, index) orders scripts exactly as `_decide`'s sort keys do.
        scripts = self.scripts
        groups = sorted({(-s.priority, -s.audience.strictness) for s in scripts})
        group_of = {pair: n for n, pair in enumerate(groups)}
        self._group: list[int] = [group_of[(-s.priority, -s.audience.strictness)] for s in scripts]
        self._id_rank: list[int] = [0] * len(scripts)
        by_rank = sorted(range(len(scripts)), key=lambda i: scripts[i].id)
        for position, index in enumerate(by_rank):
            self._id_rank[index] = position
        # The same order as one integer per script, in a flat array: a long message triggers ~100 scripts, and
        # building and sorting their keys this way takes less than half the time tuples take. Bits, high to low:
        # group | (max strength - strength) | id rank. A smaller key ranks first.
        self._id_bits = max(1, (len(scripts) - 1).bit_length())
        group_bits = max(1, max(self._group, default=0).bit_length())
        self._strength_bits = max(8, 30 - self._id_bits - group_bits)  # keys stay one-digit ints if they can
        self._by_rank = array("q", by_rank)
        weakest = ((1 << self._strength_bits) - 1) << self._id_bits
        base = [
            (g << (self._strength_bits + self._id_bits)) | weakest | r
            for g, r in zip(self._group, self._id_rank, strict=True)
        ]
        self._rank_base: array[int] | None = array("q", base) if max(base, default=0) < 1 << 62 else None
        self._phrase_index: dict[str, tuple[int, ...]] = {term: tuple(of) for term, of in phrase_of.items()}
        anchor_of_one: dict[str, list[int]] = {}
        anchor_of_two: dict[str, dict[str, list[int]]] = {}
        anchor_of_more: dict[str, list[int]] = {}
        for index, required in enumerate(self._required):
            if not required:
                continue
            anchor, *others = sorted(required, key=lambda kw: (len(all_of[kw]), kw))
            if not others:
                anchor_of_one.setdefault(anchor, []).append(index)
            elif len(others) == 1:
                anchor_of_two.setdefault(anchor, {}).setdefault(others[0], []).append(index)
            else:
                anchor_of_more.setdefault(anchor, []).append(index)
        terms = {*any_of, *all_of, *phrase_of, *regex_of}
        # One string object per term, so that set operations between found terms and partner words compare
        # pointers and never have to read the strings themselves (a long message checks hundreds).
        canonical = {term: term for term in terms}
        for term in terms:
            two = anchor_of_two.get(term)
            pairs = {canonical[other]: tuple(of) for other, of in two.items()} if two else _NO_PAIRS
            entry = _Term(
                term,
                tuple(any_of.get(term, ())),
                tuple(all_of.get(term, ())),
                tuple(anchor_of_one.get(term, ())),
                pairs,
                frozenset(pairs) if two else _NO_PARTNERS,
                tuple(anchor_of_more.get(term, ())),
                tuple(phrase_of.get(term, ())),
                tuple(regex_of.get(term, ())),
            )
            self._automaton.add_word(term, entry)
        self._has_terms = bool(terms)
        if self._has_terms:
            self._automaton.make_automaton()

    # --- triggers ------------------------------------------------------------------------------------------

    def _text_hits(self, norm: str) -> tuple[dict[int, _Hit], dict[int, str]]:
        """Scripts whose text triggers fire, and keywords_all scripts that missed some words (near misses)."""
        any_found: dict[int, set[str]] = {}
        all_found: dict[int, set[str]] = {}
        phrase_found: dict[int, str] = {}
        regex_due: set[int] = set(self._unfiltered_regexes)
        lo, hi = core_span(norm)
        limit = LIMITS.regex_input_chars
        if self._has_terms and norm:
            entry: _Term
            for end, entry in self._automaton.iter(norm):
                term = entry.term
                for index in entry.any_of:
                    any_found.setdefault(index, set()).add(term)
                for index in entry.all_of:
                    all_found.setdefault(index, set()).add(term)
                if entry.phrase_of and end - len(term) + 1 == lo and end == hi - 1:
                    for index in entry.phrase_of:
                        phrase_found[index] = term
                if entry.regex_of and end < limit:
                    regex_due.update(entry.regex_of)
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
        bounded = norm[:limit]
        for position in sorted(regex_due):  # in library order, as a full scan would run them
            index, pattern, compiled = self._regexes[position]
            if compiled.search(bounded):
                hit = hits.setdefault(index, _Hit())
                hit.reasons.append(f"regex {pattern!r}")
                hit.strength += 1
        for index in partial.keys() & hits.keys():
            del partial[index]
        return hits, partial

    def _text_strengths(self, norm: str) -> dict[int, int]:
        """`match`'s path: the strength of every script whose text triggers fire, and nothing else."""
        strength: dict[int, int] = {}
        regex_due: set[int] = set(self._unfiltered_regexes)
        limit = LIMITS.regex_input_chars
        if self._has_terms:
            get = strength.get
            # each distinct term once: keywords count once however often they occur
            found: dict[str, _Term] = {entry.term: entry for _, entry in self._automaton.iter(norm)}
            seen = set(found)
            required = self._required
            for entry in found.values():
                for index in entry.any_of:
                    strength[index] = get(index, 0) + 1
                for index in entry.anchor_of_one:
                    strength[index] = get(index, 0) + 1
                if entry.anchor_of_two:  # only the scripts whose other word was found too, not every one
                    pairs = entry.anchor_of_two
                    for other in entry.anchor_partners & seen:
                        for index in pairs[other]:
                            strength[index] = get(index, 0) + 2
                for index in entry.anchor_of_more:
                    words = required[index]
                    if words <= seen:
                        strength[index] = get(index, 0) + len(words)
                if entry.regex_of:
                    regex_due.update(entry.regex_of)
            if len(norm) > limit:  # a regex runs only when its literal is within the part it searches
                regex_due = set(self._unfiltered_regexes)
                for _, entry in self._automaton.iter(norm[:limit]):
                    regex_due.update(entry.regex_of)
            lo, hi = core_span(norm)
            for index in self._phrase_index.get(norm[lo:hi], ()):  # a message has one core: each phrase counts once
                strength[index] = get(index, 0) + PHRASE_STRENGTH
        if regex_due:
            bounded = norm[:limit]
            regexes = self._regexes
            for position in regex_due:
                index, _, compiled = regexes[position]
                if compiled.search(bounded):
                    strength[index] = strength.get(index, 0) + 1
        return strength

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

    def _first_eligible(self, strength: dict[int, int], query: Query, reasons: Callable[[int], _Hit]) -> Match | None:
        """`_decide` without near misses: rank the triggered scripts and take the first one that may answer."""
        if not strength:
            return None
        scripts = self.scripts
        base = self._rank_base
        order: Iterable[int]
        if base is not None and max(strength.values()) < 1 << self._strength_bits:
            shift = self._id_bits
            keys = [base[i] - (s << shift) for i, s in strength.items()]
            keys.sort()
            mask, by_rank = (1 << shift) - 1, self._by_rank
            order = (by_rank[key & mask] for key in keys)  # decoded lazily: the first one usually wins
        else:
            group, id_rank = self._group, self._id_rank
            order = [i for *_, i in sorted([(group[i], -s, id_rank[i], i) for i, s in strength.items()])]
        tags = query.tags
        for index in order:
            script = scripts[index]
            if not script.audience.admits(tags):
                continue
            if script.window is not None and script.window.why_inactive(query.now):
                continue
            if script.cooldown_seconds:
                last = query.last_sent(script.id)
                if last is not None and query.now - last < script.cooldown_seconds:
                    continue
            return self._decide({index: reasons(index)}, {}, query, [])  # the winner, worded as `explain` does
        return None

    def _text_hit(self, norm: str, index: int) -> _Hit:
        """One script's text hit with its reasons, as `_text_hits` words them."""
        hit = _Hit()
        found = [term for term in self._any_terms[index] if term in norm]
        if found:
            hit.reasons.append("keywords_any " + ",".join(sorted(found)))
            hit.strength += len(found)
        required = self._required[index]
        if required and all(kw in norm for kw in required):
            hit.reasons.append("keywords_all " + ",".join(sorted(required)))
            hit.strength += len(required)
        lo, hi = core_span(norm)
        if norm[lo:hi] in self._phrase_terms[index]:
            hit.reasons.append(f"phrase {norm[lo:hi]!r}")
            hit.strength += PHRASE_STRENGTH
        bounded = norm[: LIMITS.regex_input_chars]
        for position in self._regexes_of.get(index, ()):
            _, pattern, compiled = self._regexes[position]
            if compiled.search(bounded):
                hit.reasons.append(f"regex {pattern!r}")
                hit.strength += 1
        return hit

    def match(self, query: Query) -> Match | None:
        """The script and variant that answer this query, or None (the same winner `explain` names)."""
        if query.menu_id:
            menu = query.menu_id
            found = dict.fromkeys(self._by_menu.get(menu, ()), 1)
            winner = self._first_eligible(found, query, lambda _: _Hit([f"menu_id {menu!r}"], 1))
            if winner is not None:
                return winner
        norm = normalize(query.text) if query.text else ""
        if norm:
            winner = self._first_eligible(self._text_strengths(norm), query, lambda i: self._text_hit(norm, i))
            if winner is not None:
                return winner
        events: list[str] = []
        if query.event:
            events.append(query.event)
        if query.text is not None and query.fallback_no_match and not query.event:
            events.append("no_match")
        for event in events:
            found = dict.fromkeys(self._by_event.get(event, ()), 1)
            winner = self._first_eligible(found, query, functools.partial(_event_hit, event))
            if winner is not None:
                return winner
        return None


def _event_hit(event: str, _index: int) -> _Hit:
    return _Hit([f"event {event!r}"], 1)
