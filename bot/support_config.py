"""The support desk configuration (YAML, reviewed like the scripts): teams, business hours, SLA, handoff, texts.

`load_support_config(path)` reads and validates the file; every problem is reported as `file:key: cause`, all at
once, in a SupportConfigError. The path comes from the caller (the SUPPORT_CONFIG_PATH setting, when wired);
the default is the file shipped next to this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from handlers.business_hours import WEEKDAYS, BusinessCalendar
from handlers.domain import Channel
from handlers.handoff import HandoffTriggers, TagPolicy
from handlers.sla import DEFAULT_WARN_SHARE, Ladder, Priority, SlaPolicy, SlaRule

DEFAULT_SUPPORT_CONFIG_PATH = Path(__file__).with_name("support.yaml")

T = TypeVar("T")


class SupportConfigError(ValueError):
    """The support configuration is invalid; `problems` lists each as `file:key: cause`."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("invalid support configuration:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    calendar: BusinessCalendar
    leads: tuple[str, ...] = ()  # staff usernames

    @property
    def timezone(self) -> str:
        return self.calendar.timezone


@dataclass(frozen=True, slots=True)
class SupportTexts:
    """Customer-facing texts (Simplified Chinese); {next_open} and {agent_name} are filled in."""

    queued: str = "已为您转接人工客服，当前咨询的人较多，请您稍候～"
    out_of_hours: str = "现在是非工作时间，人工客服将于{next_open}上线，届时会第一时间回复您。"
    assigned: str = "您好，客服{agent_name}已为您接入，请问有什么可以帮您？"


@dataclass(frozen=True, slots=True)
class SupportConfig:
    teams: Mapping[str, Team]
    default_team: str
    policies: Mapping[str, SlaPolicy]
    default_policy: SlaPolicy
    rules: tuple[SlaRule, ...]
    triggers: HandoffTriggers
    texts: SupportTexts = field(default_factory=SupportTexts)
    skills_by_tag: tuple[tuple[str, str], ...] = ()  # a customer tag → a skill the agent must have
    source: str = "<memory>"

    def team(self, name: str | None) -> Team:
        """The named team, or the default one for None or an unknown name."""
        return self.teams.get(name or self.default_team) or self.teams[self.default_team]

    def policy(self, policy_id: str) -> SlaPolicy:
        """A policy by id (the default policy when it is no longer configured)."""
        return self.policies.get(policy_id, self.default_policy)


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, key: str, cause: str) -> None:
        self.items.append(f"{self.source}:{key}: {cause}")

    def check(self, key: str, build: Callable[[], T]) -> T | None:
        try:
            return build()
        except (ValueError, TypeError, KeyError, ZoneInfoNotFoundError) as exc:
            self.add(key, str(exc) or type(exc).__name__)
            return None


def _mapping(value: Any, key: str, problems: _Problems) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(key, "must be a mapping")
        return {}
    return value


def _list(value: Any, key: str, problems: _Problems) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(key, "must be a list")
        return []
    return value


def _strings(value: Any, key: str, problems: _Problems) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(_list(value, key, problems)):
        if isinstance(item, str | int) and not isinstance(item, bool) and str(item).strip():
            out.append(str(item).strip())
        else:
            problems.add(f"{key}[{i}]", "must be a non-empty string")
    return tuple(out)


def _seconds(value: Any, key: str, problems: _Problems, *, required: bool = False) -> float | None:
    if value is None:
        if required:
            problems.add(key, "is required (seconds)")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        problems.add(key, f"must be a positive number of seconds, got {value!r}")
        return None
    return float(value)


def _dates(value: Any, key: str, problems: _Problems) -> list[date]:
    out: list[date] = []
    for i, item in enumerate(_list(value, key, problems)):
        if isinstance(item, date):
            out.append(item)
            continue
        try:
            out.append(date.fromisoformat(str(item)))
        except ValueError:
            problems.add(f"{key}[{i}]", f"not a date (YYYY-MM-DD): {item!r}")
    return out


def _priority(value: Any, key: str, problems: _Problems, default: Priority) -> Priority:
    if value is None:
        return default
    try:
        return Priority(str(value))
    except ValueError:
        problems.add(key, f"unknown priority {value!r}: use {', '.join(p.value for p in Priority)}")
        return default


def _team(raw: Any, key: str, problems: _Problems) -> Team | None:
    body = _mapping(raw, key, problems)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.add(f"{key}.name", "is required")
        return None
    timezone = str(body.get("timezone") or "Asia/Shanghai")
    if problems.check(f"{key}.timezone", lambda: ZoneInfo(timezone)) is None:
        return None
    hours_raw = _mapping(body.get("hours"), f"{key}.hours", problems)
    if not hours_raw:
        problems.add(f"{key}.hours", "is required: weekday (mon..sun or a range like mon-fri) → [HH:MM-HH:MM, ...]")
        return None
    hours: dict[str, tuple[str, ...]] = {}
    for day, intervals in hours_raw.items():
        hours[str(day)] = _strings(intervals, f"{key}.hours.{day}", problems)
    makeup = str(body.get("makeup_weekday") or "mon")
    if makeup not in WEEKDAYS:
        problems.add(f"{key}.makeup_weekday", f"unknown weekday {makeup!r}")
        makeup = "mon"
    holidays = _dates(body.get("holidays"), f"{key}.holidays", problems)
    extra = _dates(body.get("extra_workdays"), f"{key}.extra_workdays", problems)
    calendar = problems.check(
        f"{key}.hours",
        lambda: BusinessCalendar.build(
            hours, timezone=timezone, holidays=holidays, extra_workdays=extra, makeup_weekday=makeup
        ),
    )
    leads = _strings(body.get("leads"), f"{key}.leads", problems)
    if calendar is None:
        return None
    return Team(name.strip(), calendar, leads)


def _policy(raw: Any, key: str, problems: _Problems, warn_share: float | None) -> SlaPolicy | None:
    body = _mapping(raw, key, problems)
    policy_id = body.get("id")
    if not isinstance(policy_id, str) or not policy_id.strip():
        problems.add(f"{key}.id", "is required")
        return None
    first = _seconds(body.get("first_response"), f"{key}.first_response", problems)
    next_response = _seconds(body.get("next_response"), f"{key}.next_response", problems)
    resolution = _seconds(body.get("resolution"), f"{key}.resolution", problems)
    escalate: list[float] = []
    for i, extra in enumerate(_list(body.get("escalate_after"), f"{key}.escalate_after", problems)):
        seconds = _seconds(extra, f"{key}.escalate_after[{i}]", problems)
        if seconds is not None:
            escalate.append(seconds)
    share = warn_share
    if "warn_share" in body:
        share = body["warn_share"]
    ladder = problems.check(f"{key}", lambda: Ladder(warn_share=share, escalate_after=tuple(escalate)))
    if ladder is None:
        return None
    if first is None and next_response is None and resolution is None:
        problems.add(key, "needs at least one of first_response, next_response, resolution")
        return None
    return SlaPolicy(policy_id.strip(), first, next_response, resolution, ladder)


def _rule(raw: Any, key: str, problems: _Problems, policies: Mapping[str, SlaPolicy]) -> SlaRule | None:
    body = _mapping(raw, key, problems)
    policy_id = body.get("policy")
    policy = policies.get(str(policy_id)) if policy_id is not None else None
    if policy is None:
        problems.add(f"{key}.policy", f"unknown policy {policy_id!r}")
        return None
    channels: set[Channel] = set()
    for i, name in enumerate(_strings(body.get("channels"), f"{key}.channels", problems)):
        try:
            channels.add(Channel(name))
        except ValueError:
            problems.add(f"{key}.channels[{i}]", f"unknown channel {name!r}: use {', '.join(c.value for c in Channel)}")
    priorities = {
        _priority(p, f"{key}.priorities[{i}]", problems, Priority.NORMAL)
        for i, p in enumerate(_list(body.get("priorities"), f"{key}.priorities", problems))
    }
    tags = frozenset(_strings(body.get("tags"), f"{key}.tags", problems))
    return SlaRule(policy, frozenset(channels), tags, frozenset(priorities))


def _triggers(raw: Any, problems: _Problems, team_names: frozenset[str]) -> HandoffTriggers:
    body = _mapping(raw, "handoff", problems)
    defaults = HandoffTriggers()
    limit = body.get("no_match_limit", defaults.no_match_limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        problems.add("handoff.no_match_limit", f"must be a whole number ≥ 0 (0: off), got {limit!r}")
        limit = defaults.no_match_limit
    policies: list[TagPolicy] = []
    for i, item in enumerate(_list(body.get("tag_policies"), "handoff.tag_policies", problems)):
        key = f"handoff.tag_policies[{i}]"
        entry = _mapping(item, key, problems)
        tags = frozenset(_strings(entry.get("tags"), f"{key}.tags", problems))
        if not tags:
            problems.add(f"{key}.tags", "needs at least one tag")
            continue
        team = entry.get("team")
        if team is not None and str(team) not in team_names:
            problems.add(f"{key}.team", f"unknown team {team!r}")
            team = None
        policies.append(
            TagPolicy(tags, _priority(entry.get("priority"), f"{key}.priority", problems, Priority.HIGH), team)
        )
    return HandoffTriggers(
        phrases=_strings(body["phrases"], "handoff.phrases", problems) if "phrases" in body else defaults.phrases,
        complaint_words=(
            _strings(body["complaint_words"], "handoff.complaint_words", problems)
            if "complaint_words" in body
            else defaults.complaint_words
        ),
        menu_ids=(
            frozenset(_strings(body["menu_ids"], "handoff.menu_ids", problems))
            if "menu_ids" in body
            else defaults.menu_ids
        ),
        no_match_limit=limit,
        tag_policies=tuple(policies),
        complaint_priority=_priority(
            body.get("complaint_priority"), "handoff.complaint_priority", problems, defaults.complaint_priority
        ),
    )


def _texts(raw: Any, problems: _Problems) -> SupportTexts:
    body = _mapping(raw, "texts", problems)
    defaults = SupportTexts()
    values: dict[str, str] = {}
    for name in ("queued", "out_of_hours", "assigned"):
        value = body.get(name, getattr(defaults, name))
        if not isinstance(value, str) or not value.strip():
            problems.add(f"texts.{name}", "must be a non-empty text")
            continue
        if len(value.encode()) > 2048:
            problems.add(f"texts.{name}", "is longer than 2048 bytes (the kf text limit)")
            continue
        values[name] = value
    if "{next_open}" not in values.get("out_of_hours", "{next_open}"):
        problems.add("texts.out_of_hours", "must say when the team opens: include {next_open}")
    return SupportTexts(**values)


def parse_support_config(data: Any, source: str = "<memory>") -> SupportConfig:
    """Validate a parsed YAML document; SupportConfigError lists every problem."""
    problems = _Problems(source)
    root = _mapping(data, "(root)", problems)
    teams: dict[str, Team] = {}
    for i, raw in enumerate(_list(root.get("teams"), "teams", problems)):
        team = _team(raw, f"teams[{i}]", problems)
        if team is None:
            continue
        if team.name in teams:
            problems.add(f"teams[{i}].name", f"duplicate team {team.name!r}")
        teams[team.name] = team
    if not teams and not problems.items:
        problems.add("teams", "needs at least one team")
    default_team = str(root.get("default_team") or (next(iter(teams)) if teams else ""))
    if teams and default_team not in teams:
        problems.add("default_team", f"unknown team {default_team!r}")

    sla = _mapping(root.get("sla"), "sla", problems)
    warn_share = sla.get("warn_share", DEFAULT_WARN_SHARE)
    if warn_share is not None and (
        isinstance(warn_share, bool) or not isinstance(warn_share, int | float) or not 0 < warn_share < 1
    ):
        problems.add("sla.warn_share", f"must be a share between 0 and 1 (e.g. 0.8), got {warn_share!r}")
        warn_share = DEFAULT_WARN_SHARE
    policies: dict[str, SlaPolicy] = {}
    for i, raw in enumerate(_list(sla.get("policies"), "sla.policies", problems)):
        policy = _policy(raw, f"sla.policies[{i}]", problems, warn_share)
        if policy is None:
            continue
        if policy.policy_id in policies:
            problems.add(f"sla.policies[{i}].id", f"duplicate policy {policy.policy_id!r}")
        policies[policy.policy_id] = policy
    if not policies:
        policies["default"] = SlaPolicy("default", ladder=Ladder(warn_share=warn_share))
    default_id = str(sla.get("default_policy") or next(iter(policies)))
    default_policy = policies.get(default_id)
    if default_policy is None:
        problems.add("sla.default_policy", f"unknown policy {default_id!r}")
        default_policy = next(iter(policies.values()))
    rules = [
        rule
        for i, raw in enumerate(_list(sla.get("rules"), "sla.rules", problems))
        if (rule := _rule(raw, f"sla.rules[{i}]", problems, policies)) is not None
    ]
    triggers = _triggers(root.get("handoff"), problems, frozenset(teams))
    handoff = _mapping(root.get("handoff"), "handoff", problems)
    skills_by_tag = tuple(
        (str(tag), str(skill))
        for tag, skill in _mapping(handoff.get("skills_by_tag"), "handoff.skills_by_tag", problems).items()
    )
    texts = _texts(root.get("texts"), problems)
    known = {"teams", "default_team", "sla", "handoff", "texts"}
    for key in root:
        if key not in known:
            problems.add(str(key), f"unknown key: use {', '.join(sorted(known))}")
    if problems.items:
        raise SupportConfigError(problems.items)
    return SupportConfig(
        teams=teams,
        default_team=default_team,
        policies=policies,
        default_policy=default_policy,
        rules=tuple(rules),
        triggers=triggers,
        texts=texts,
        skills_by_tag=skills_by_tag,
        source=source,
    )


def load_support_config(path: Path | str | None = None) -> SupportConfig:
    """Read and validate the support configuration (the shipped bot/support.yaml by default)."""
    file = Path(path) if path is not None else DEFAULT_SUPPORT_CONFIG_PATH
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SupportConfigError([f"{file}: cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(parse)"
        raise SupportConfigError([f"{file}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return parse_support_config(data, str(file))
