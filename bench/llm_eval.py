"""Intent-routing accuracy on a labelled evaluation set: keywords alone, and with the model when one is configured.

    .venv/bin/python bench/llm_eval.py                      # keywords only (the bot with the LLM off)
    OPENAI_BASE_URL=... OPENAI_MODEL=... .venv/bin/python bench/llm_eval.py   # also with the model on

The set is `bench/data/intent_eval.yaml`: 200 customer questions, each labelled with the script that should
answer or "handoff". A question is routed as the pipeline routes a customer's text with no tags: the handoff
triggers of the shipped support config first (phrases, complaint words), then the library's matcher; a script
that is a handoff action counts as "handoff", and the no-match fallback counts as "none" (always wrong: every
question has a right answer). With the model on, the questions that keywords leave at "none" go to the model.

Prints the accuracy, the confusion per label and the misses; `--json FILE` writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bot.support_config import load_support_config  # noqa: E402
from handlers.domain import Channel, InboundMessage, KfOrigin  # noqa: E402
from handlers.handoff import handoff_script_ids, no_match_script_ids, text_trigger  # noqa: E402
from scripts_library import Library, Matcher, Query, load_library  # noqa: E402

EVAL_SET = ROOT / "bench" / "data" / "intent_eval.yaml"
HANDOFF = "handoff"
NONE = "none"


def load_questions(path: Path = EVAL_SET) -> list[tuple[str, str]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [(str(item["q"]), str(item["label"])) for item in data["questions"]]


def keyword_route(text: str, library: Library, matcher: Matcher) -> str:
    """What the bot with the LLM off does with this text: a script id, "handoff" or "none"."""
    triggers = load_support_config().triggers
    message = InboundMessage(Channel.KF, "eval", "wmEval", "wkEval", "text", 0, text=text, origin=KfOrigin.CUSTOMER)
    match = matcher.match(Query(text=text, now=time.time()))
    answered = [match.script.id] if match is not None else []
    if text_trigger(message, triggers, answered, handoff_script_ids(library)) is not None:
        return HANDOFF
    if match is None or match.script.id in no_match_script_ids(library):
        return NONE
    return match.script.id


def score(predicted: list[str], questions: list[tuple[str, str]]) -> dict[str, Any]:
    right = sum(p == label for p, (_q, label) in zip(predicted, questions, strict=True))
    per_label: dict[str, list[int]] = {}
    for p, (_q, label) in zip(predicted, questions, strict=True):
        per_label.setdefault(label, [0, 0])
        per_label[label][0] += p == label
        per_label[label][1] += 1
    return {
        "accuracy": right / len(questions),
        "right": right,
        "total": len(questions),
        "per_label": {label: f"{r}/{n}" for label, (r, n) in sorted(per_label.items())},
        "unrouted": sum(p == NONE for p in predicted),
        "misses": [
            {"q": q, "label": label, "got": p}
            for p, (q, label) in zip(predicted, questions, strict=True)
            if p != label
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--show-misses", type=int, default=20, help="misses to print (20)")
    args = parser.parse_args(argv)

    questions = load_questions()
    library = load_library()
    assert isinstance(library, Library), library
    matcher = Matcher(library)
    off = [keyword_route(q, library, matcher) for q, _label in questions]
    results: dict[str, Any] = {"keywords_only": score(off, questions)}

    figures = results["keywords_only"]
    print(f"evaluation set: {len(questions)} questions, {len(Counter(label for _q, label in questions))} labels")
    print(
        f"model off (keywords only): accuracy {figures['accuracy']:.1%} ({figures['right']}/{figures['total']}), "
        f"left to the fallback {figures['unrouted']}"
    )
    for label, ratio in figures["per_label"].items():
        print(f"  {label:<22} {ratio}")
    for miss in figures["misses"][: args.show_misses]:
        print(f"  miss: {miss['q']!r} → {miss['got']} (should be {miss['label']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
