"""Reply scripts (话术库) as reviewed YAML: model, loader/validator, pure matcher and safe renderer."""

from scripts_library.loader import DEFAULT_LIBRARY, build_library, load_library
from scripts_library.matcher import Candidate, Explanation, Match, Matcher, Query, choose_variant, sticky_bucket
from scripts_library.model import (
    BUILTIN_PLACEHOLDERS,
    BUILTIN_TAGS,
    KNOWN_EVENTS,
    LIMITS,
    ActiveWindow,
    Audience,
    Library,
    Limits,
    MenuItem,
    Problem,
    Reply,
    Script,
    Triggers,
    Variant,
)
from scripts_library.render import Rendered, RenderError, render
from scripts_library.text import normalize, regex_problem

__all__ = [
    "BUILTIN_PLACEHOLDERS",
    "BUILTIN_TAGS",
    "DEFAULT_LIBRARY",
    "KNOWN_EVENTS",
    "LIMITS",
    "ActiveWindow",
    "Audience",
    "Candidate",
    "Explanation",
    "Library",
    "Limits",
    "Match",
    "Matcher",
    "MenuItem",
    "Problem",
    "Query",
    "RenderError",
    "Rendered",
    "Reply",
    "Script",
    "Triggers",
    "Variant",
    "build_library",
    "choose_variant",
    "load_library",
    "normalize",
    "regex_problem",
    "render",
    "sticky_bucket",
]
