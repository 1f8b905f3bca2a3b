"""The script library's typed model: scripts, triggers, audiences, variants, replies, limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time
from zoneinfo import ZoneInfo

# The five classes of the operating SOP; `tags.yaml` in a library folder may declare more.
BUILTIN_TAGS: frozenset[str] = frozenset({"高价值", "沉默", "流失", "潜客", "新用户"})

# Event names a script may trigger on; callers translate WeCom events into these.
KNOWN_EVENTS: frozenset[str] = frozenset(
    {
        "contact_added",  # 客户联系 add_external_contact
        "kf_session_entered",  # kf enter_session
        "kf_session_ended",  # kf session closed (closing / survey)
        "kf_queue_entered",  # kf session moved to the pool
        "no_match",  # nothing in the library matched the text
        "birthday",  # scheduled: the customer's birthday
        "handoff_requested",  # the customer asked for a human
    }
)

# Placeholder name -> fallback used when the caller has no value (None: the value is required).
# `placeholders.yaml` in a library folder may declare more or override fallbacks.
BUILTIN_PLACEHOLDERS: dict[str, str | None] = {
    "customer_name": "亲",
    "agent_name": "客服小助手",
    "shop_name": None,
    "coupon_code": None,
    "coupon_amount": None,
    "order_id": None,
    "tracking_no": None,
}


@dataclass(frozen=True, slots=True)
class Limits:
    """WeCom size limits in UTF-8 bytes (reference §4.3, §5.2, §5.3, §5.5) and library caps."""

    # message/send and robot text: 2048 B. The reference gives no kf text limit, so kf uses the same 2048 B.
    text_bytes: int = 2048
    markdown_bytes: int = 4096  # robot markdown / markdown_v2
    menu_head_tail_bytes: int = 1024
    menu_click_id_bytes: int = 128
    menu_click_content_bytes: int = 128
    menu_view_url_bytes: int = 2048
    menu_text_item_bytes: int = 256
    menu_items: int = 50
    menu_actionable_items: int = 10  # click + view + miniprogram, and the cap of send_msg_on_event
    link_title_bytes: int = 128  # as for robot news articles (§5.3); kf gives none
    link_desc_bytes: int = 512
    replies_per_variant: int = 5  # kf: at most 5 messages per customer message
    placeholder_value_bytes: int = 64  # a rendered value is cut to this, and the validator reserves it
    file_bytes: int = 1_000_000
    regex_chars: int = 200
    regex_input_chars: int = 2048  # regexes only see this much of a message


LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the library, located by file and 1-based line."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class Triggers:
    keywords_any: tuple[str, ...] = ()
    keywords_all: tuple[str, ...] = ()
    phrases: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    menu_ids: tuple[str, ...] = ()
    events: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Audience:
    any_of: frozenset[str] = frozenset()
    all_of: frozenset[str] = frozenset()
    none_of: frozenset[str] = frozenset()

    def admits(self, tags: frozenset[str]) -> bool:
        """Whether a customer with these tags is in the audience."""
        return (not self.any_of or bool(self.any_of & tags)) and self.all_of <= tags and not (self.none_of & tags)

    def why_not(self, tags: frozenset[str]) -> str:
        """Why a customer with these tags is not in the audience (empty when admitted)."""
        if self.any_of and not (self.any_of & tags):
            return "audience: needs any of " + ",".join(sorted(self.any_of))
        missing = self.all_of - tags
        if missing:
            return "audience: missing " + ",".join(sorted(missing))
        excluded = self.none_of & tags
        if excluded:
            return "audience: excludes " + ",".join(sorted(excluded))
        return ""

    @property
    def strictness(self) -> int:
        """More conditions = a narrower audience = more specific."""
        return len(self.all_of) + (1 if self.any_of else 0) + (1 if self.none_of else 0)


@dataclass(frozen=True, slots=True)
class MenuItem:
    type: str  # click, view, miniprogram, text
    content: str
    id: str = ""  # click
    url: str = ""  # view
    appid: str = ""  # miniprogram
    pagepath: str = ""  # miniprogram
    no_newline: bool = False  # text


@dataclass(frozen=True, slots=True)
class Reply:
    """One message of a reply. `kind` is text, markdown, image, file, link or msgmenu."""

    kind: str
    text: str = ""  # text / markdown content
    media_id: str = ""  # image / file; link thumbnail
    title: str = ""  # link
    desc: str = ""  # link
    url: str = ""  # link
    pic_url: str = ""  # link
    head_content: str = ""  # msgmenu
    tail_content: str = ""  # msgmenu
    items: tuple[MenuItem, ...] = ()  # msgmenu


@dataclass(frozen=True, slots=True)
class Variant:
    """A reply option. With `tags` it is a per-tag variant; several untagged ones form a weighted A/B test."""

    name: str
    replies: tuple[Reply, ...]
    tags: frozenset[str] = frozenset()
    priority: int = 0
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ActiveWindow:
    start: datetime | None = None  # aware
    until: datetime | None = None  # aware, exclusive
    daily_from: time | None = None
    daily_until: time | None = None  # exclusive; earlier than daily_from means the range wraps midnight
    timezone: str = "Asia/Shanghai"

    def why_inactive(self, now: float) -> str:
        """Empty when active at unix time `now`, else why not."""
        tz = ZoneInfo(self.timezone)
        local = datetime.fromtimestamp(now, tz)
        if self.start is not None and local < self.start:
            return f"window: starts {self.start.isoformat()}"
        if self.until is not None and local >= self.until:
            return f"window: ended {self.until.isoformat()}"
        if self.daily_from is not None and self.daily_until is not None:
            t = local.time().replace(tzinfo=None)
            lo, hi = self.daily_from, self.daily_until
            inside = lo <= t < hi if lo <= hi else (t >= lo or t < hi)
            if not inside:
                return f"window: daily {lo:%H:%M}-{hi:%H:%M} {self.timezone}, now {t:%H:%M}"
        return ""


@dataclass(frozen=True, slots=True)
class Script:
    id: str
    title: str
    file: str
    line: int
    variants: tuple[Variant, ...]
    examples: tuple[str, ...] = ()
    triggers: Triggers = field(default_factory=Triggers)
    audience: Audience = field(default_factory=Audience)
    window: ActiveWindow | None = None
    cooldown_seconds: int = 0
    priority: int = 0
    fallbacks: tuple[tuple[str, str], ...] = ()  # per-script placeholder fallbacks
    action: str = "reply"  # "handoff": after its reply, the conversation goes to a person


@dataclass(frozen=True, slots=True)
class Library:
    """A validated library: its scripts in id order, the tag vocabulary and the placeholder table."""

    scripts: tuple[Script, ...]
    tags: frozenset[str]
    placeholders: tuple[tuple[str, str | None], ...]

    def get(self, script_id: str) -> Script | None:
        """The script with this id, if any."""
        for script in self.scripts:
            if script.id == script_id:
                return script
        return None
