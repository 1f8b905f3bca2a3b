"""Settings loaded once at start-up from the environment and `.env`, then passed down explicitly."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from handlers.intent import DEFAULT_ORDER_PATTERNS, compile_order_patterns
from handlers.tags import TagConfig

DEFAULT_API_BASE = "https://qyapi.weixin.qq.com"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/wecom-bot.sqlite3"


_TAG_DEFAULTS = TagConfig()
Thresholds = Annotated[tuple[int, int, int, int], NoDecode]  # env: four comma-separated numbers, e.g. "7,30,90,180"


class SettingsError(Exception):
    """A bad setting; the message is one line naming the variable and what is wrong."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    wecom_corp_id: str = ""
    wecom_token: str = ""
    wecom_aes_key: str = ""
    wecom_agent_id: int | None = None
    wecom_secret: str = ""
    wecom_kf_secret: str = ""
    wecom_api_base: str = DEFAULT_API_BASE

    database_url: str = DEFAULT_DATABASE_URL
    # PostgreSQL connections kept open per process (half as many again may open at peaks). Sized for the
    # workers' partitions, the SLA sweep's concurrent actions and the web console at once: a smaller pool makes
    # every peak open and close connections, each a new login and a cold prepared-statement cache.
    database_pool_size: int = Field(default=20, ge=1, le=500)
    redis_url: str = ""
    redis_key_prefix: str = "wecom"
    redis_max_connections: int = Field(default=64, ge=2, le=10_000)

    bot_host: str = "0.0.0.0"  # noqa: S104 - a server is meant to listen on all interfaces in a container
    bot_port: int = Field(default=8080, ge=1, le=65535)
    bot_public_url: str = ""

    auto_migrate: bool = False

    log_level: str = "INFO"
    log_json: bool = False

    callback_max_body_bytes: int = Field(default=1_048_576, ge=1024)
    callback_max_clock_skew_s: int = Field(default=86_400, ge=60)
    dedupe_ttl_s: int = Field(default=86_400, ge=60)

    queue_partitions: int = Field(default=8, ge=1, le=1024)
    worker_concurrency: int = Field(default=1, ge=0, le=64)
    dead_letter_after: int = Field(default=5, ge=1, le=100)
    reclaim_idle_ms: int = Field(default=30_000, ge=100)
    lease_ttl_ms: int = Field(default=10_000, ge=500)

    http_timeout_s: float = Field(default=10.0, gt=0)
    api_max_retries: int = Field(default=3, ge=0, le=10)

    sandbox_sim_port: int = Field(default=8081, ge=0, le=65535)

    # The script library (话术库) folder; loaded and validated once at start-up. Empty: the packaged library.
    scripts_path: str = ""
    # Hot reload: how often every process checks the library folder (and the fleet's version in Redis); 0: never.
    scripts_reload_interval_s: float = Field(default=2.0, ge=0)
    # Handoff: teams, business hours, SLA policies, handoff triggers and notices (YAML). Empty: bot/support.yaml.
    support_config_path: str = ""

    # Computed customer tags (handlers/tags.py documents each threshold); checked together at start-up.
    tag_recency_days: Thresholds = _TAG_DEFAULTS.recency_days
    tag_frequency_orders: Thresholds = _TAG_DEFAULTS.frequency_orders
    tag_monetary_cents: Thresholds = _TAG_DEFAULTS.monetary_cents
    tag_window_days: int = _TAG_DEFAULTS.window_days
    tag_rfm_high_total: int = _TAG_DEFAULTS.rfm_high_total
    tag_rfm_medium_total: int = _TAG_DEFAULTS.rfm_medium_total
    tag_new_days: int = _TAG_DEFAULTS.new_days
    tag_active_days: int = _TAG_DEFAULTS.active_days
    tag_churned_days: int = _TAG_DEFAULTS.churned_days
    tag_dormant_order_days: int = _TAG_DEFAULTS.dormant_order_days
    tag_mature_orders: int = _TAG_DEFAULTS.mature_orders
    # The daily recompute of every customer's computed tags: a crontab line in TAG_RECOMPUTE_TIMEZONE.
    tag_recompute_enabled: bool = True
    tag_recompute_cron: str = "30 3 * * *"
    tag_recompute_timezone: str = "Asia/Shanghai"
    tag_recompute_page_size: int = Field(default=500, ge=1, le=10_000)
    tag_recompute_max_customers: int = Field(default=1_000_000, ge=1)

    # Scheduled posts (docs/scheduling.md): one leader per fleet ticks the delivery engine every few seconds.
    posts_enabled: bool = True
    posts_tick_interval_s: float = Field(default=5.0, ge=0.5, le=300)
    posts_grace_s: int = Field(default=900, ge=0)  # a slot later than this is marked missed and reported
    posts_lease_s: int = Field(default=120, ge=10)  # a delivery left in `sending` this long is reclaimed
    posts_max_attempts: int = Field(default=5, ge=1, le=50)
    posts_retry_base_s: float = Field(default=30.0, gt=0)
    posts_retry_cap_s: float = Field(default=900.0, gt=0)
    posts_robot_per_minute: int = Field(default=20, ge=1, le=20)  # WeCom: 20 per robot per minute
    posts_staff_per_minute: int = Field(default=30, ge=1, le=30)  # WeCom: 30 app messages per member per minute
    posts_mass_poll_interval_s: int = Field(default=60, ge=5)
    posts_mass_remind_after_s: int = Field(default=4 * 3600, ge=60)
    posts_mass_deadline_s: int = Field(default=24 * 3600, ge=60)
    scheduler_leader_ttl_ms: int = Field(default=5000, ge=300, le=600_000)
    # Reminders (docs/scheduling.md, Reminders): daily digest to leads, churn-recall and repurchase touches.
    reminders_enabled: bool = True
    reminders_cron: str = "0 9-11 * * *"  # Asia/Shanghai; each run is idempotent for the local day
    reminders_repurchase_days: int = Field(default=30, ge=1, le=3650)  # days after the last order
    reminders_recall_cooldown_days: int = Field(default=30, ge=1, le=3650)  # no second recall within this
    reminders_owner: str = ""  # member told about failed customer touches ("" = the first lead with a userid)
    # Protecting the audience of customer-facing posts (docs/audience.md): quiet hours in the recipient's timezone,
    # daily caps of marketing sends per customer and per group, the de-duplication window. 0 / "" switch a rule off.
    audience_quiet_hours: str = "22:00-08:00"
    audience_customer_daily_cap: int = Field(default=3, ge=0, le=1000)
    audience_group_daily_cap: int = Field(default=5, ge=0, le=1000)
    audience_dedupe_window_s: int = Field(default=7 * 86_400, ge=0, le=366 * 86_400)
    audience_max_hold_s: int = Field(default=3 * 86_400, ge=3600)  # a send held later than this after its slot: skipped

    # LLM assist (docs/llm.md): off unless OPENAI_BASE_URL and OPENAI_MODEL are both set. Any OpenAI-compatible API.
    openai_base_url: str = ""
    openai_api_key: SecretStr = SecretStr("")  # never logged; local servers (vLLM, llama.cpp) may need none
    openai_model: str = ""
    llm_routing_budget_ms: int = Field(default=1500, ge=10, le=30_000)  # then the fallback answers, at once
    llm_min_confidence: float = Field(default=0.7, ge=0, le=1)  # a less confident label counts as "none"
    llm_daily_token_cap: int = Field(default=200_000, ge=1)  # per Asia/Shanghai calendar day, fleet-wide
    llm_breaker_failures: int = Field(default=5, ge=1, le=1000)  # failures in a row that open the breaker
    llm_breaker_cooldown_s: float = Field(default=60.0, gt=0, le=86_400)  # model skipped this long, then a trial
    llm_audit_retention_days: int = Field(default=7, ge=1, le=365)  # masked prompts and outputs kept in Redis
    llm_audit_max_per_day: int = Field(default=10_000, ge=1, le=1_000_000)
    # Order-number regexes masked before text leaves the process (env: a JSON list of strings).
    llm_pii_order_patterns: Annotated[tuple[str, ...], NoDecode] = DEFAULT_ORDER_PATTERNS

    @field_validator("openai_base_url")
    @classmethod
    def _openai_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (e.g. https://api.deepseek.com/v1)")
        return value.rstrip("/")

    @field_validator("llm_pii_order_patterns", mode="before")
    @classmethod
    def _order_patterns(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError('must be a JSON list of regexes, e.g. ["\\\\d{12,20}"]') from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("must be a JSON list of regexes (strings)")
        if isinstance(value, list | tuple):
            compile_order_patterns(value)  # ValueError names the regex that does not compile
            return tuple(value)
        return value

    @property
    def llm_enabled(self) -> bool:
        """LLM assist is on only with both a base URL and a model."""
        return bool(self.openai_base_url and self.openai_model)

    @field_validator("tag_recency_days", "tag_frequency_orders", "tag_monetary_cents", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            if len(parts) != 4 or not all(parts):
                raise ValueError("must be four comma-separated whole numbers, e.g. 7,30,90,180")
            return tuple(parts)
        return value

    @field_validator("tag_recompute_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Shanghai)") from None
        return value

    @field_validator("audience_quiet_hours")
    @classmethod
    def _quiet_hours(cls, value: str) -> str:
        from handlers.audience import QuietHours

        if value.strip():
            QuietHours.parse(value.strip())  # ValueError says what is wrong
        return value.strip()

    @field_validator("reminders_cron")
    @classmethod
    def _reminders_cron(cls, value: str) -> str:
        from scheduler.slots import RuleError, cron_trigger

        try:
            cron_trigger(value, "Asia/Shanghai")
        except (RuleError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _tag_settings_consistent(self) -> Settings:
        try:
            self.tag_config  # noqa: B018 - TagConfig checks the thresholds against each other
        except ValueError as exc:
            raise ValueError(f"TAG_* thresholds: {exc}") from None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(self.tag_recompute_cron, timezone=self.tag_recompute_timezone)
        except ValueError as exc:
            raise ValueError(f"TAG_RECOMPUTE_CRON: not a crontab line (minute hour day month weekday): {exc}") from None
        return self

    @field_validator("wecom_aes_key")
    @classmethod
    def _aes_key_shape(cls, value: str) -> str:
        if not value:
            return value
        if len(value) != 43:
            raise ValueError(f"must be exactly 43 characters (got {len(value)})")
        try:
            key = base64.b64decode(value + "=", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64 (copy EncodingAESKey from the WeCom admin console)") from None
        if len(key) != 32:
            raise ValueError("does not decode to a 32-byte AES key")
        return value

    @field_validator("wecom_api_base", "bot_public_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_driver(cls, value: str) -> str:
        for plain, async_driver in (
            ("postgres://", "postgresql+asyncpg://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return async_driver + value[len(plain):]
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("must be a postgresql:// or sqlite:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL (leave unset for in-process fakeredis)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return upper

    @property
    def tag_config(self) -> TagConfig:
        """The computed-tag thresholds (TAG_* variables; TagConfig's defaults when unset)."""
        return TagConfig(
            recency_days=self.tag_recency_days,
            frequency_orders=self.tag_frequency_orders,
            monetary_cents=self.tag_monetary_cents,
            window_days=self.tag_window_days,
            rfm_high_total=self.tag_rfm_high_total,
            rfm_medium_total=self.tag_rfm_medium_total,
            new_days=self.tag_new_days,
            active_days=self.tag_active_days,
            churned_days=self.tag_churned_days,
            dormant_order_days=self.tag_dormant_order_days,
            mature_orders=self.tag_mature_orders,
        )

    @property
    def sandbox(self) -> bool:
        """No WeCom credentials: run against the in-process simulator."""
        return not (self.wecom_corp_id and self.wecom_secret)

    @property
    def kf_secret(self) -> str:
        return self.wecom_kf_secret or self.wecom_secret

    @property
    def scripts_dir(self) -> Path:
        """The script library folder: SCRIPTS_PATH, or the library packaged with the bot."""
        if self.scripts_path:
            return Path(self.scripts_path)
        from scripts_library import DEFAULT_LIBRARY

        return DEFAULT_LIBRARY

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    def sqlite_path(self) -> Path | None:
        prefix = "sqlite+aiosqlite:///"
        if self.database_url.startswith(prefix) and ":memory:" not in self.database_url:
            return Path(self.database_url[len(prefix):])
        return None

    def check_complete(self) -> None:
        """Outside sandbox mode every credential the callback needs must be present."""
        if self.sandbox:
            return
        for name in ("wecom_token", "wecom_aes_key"):
            if not getattr(self, name):
                raise SettingsError(f"{name.upper()}: required when WECOM_CORP_ID and WECOM_SECRET are set")


def load_settings(**overrides: Any) -> Settings:
    """Read settings; raise SettingsError with one clear line on the first bad value."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"{name}: {message}") from None
    settings.check_complete()
    return settings
