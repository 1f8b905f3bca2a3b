"""LLM intent routing at the edge: any OpenAI-compatible model, bounded by a time budget, a breaker and a token cap.

`IntentRouter.classify` never raises and never takes longer than its budget: whatever goes wrong (slow model,
429, 5xx, a refused key, output that is not the strict JSON answer, Redis trouble) ends as the label "none",
which the pipeline answers with the library's no-match fallback, exactly as without a model. The customer's
text is masked (handlers.intent.mask_pii) before it leaves the process, and each call is audited in Redis with
the masked prompt and the raw output, kept LLM_AUDIT_RETENTION_DAYS.

The circuit breaker is per process: after LLM_BREAKER_FAILURES failures in a row the model is skipped for
LLM_BREAKER_COOLDOWN_S, then one trial call decides whether it closes again. The daily token cap is shared by
the fleet through Redis (a day is a calendar day in Asia/Shanghai); concurrent calls near the cap may pass it
by the few calls in flight.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import openai
import redis.asyncio as redis_asyncio
import structlog
from openai.types.chat import ChatCompletionMessageParam

from bot.redis_keys import RedisKeys
from bot.settings import Settings
from handlers.domain import Clock
from handlers.intent import (
    FAILURE_OUTCOMES,
    IntentCandidate,
    IntentDecision,
    IntentOutcome,
    audit_record,
    build_prompt,
    compile_order_patterns,
    labels,
    mask_pii,
    none_decision,
    parse_decision,
)

log = structlog.get_logger(__name__)

CAP_TIMEZONE = ZoneInfo("Asia/Shanghai")  # the token cap's day, and the audit's day lists
MAX_OUTPUT_TOKENS = 64  # the strict answer is ~20 tokens; a model that rambles is cut off (and malformed)
TOKENS_TTL_S = 3 * 86_400  # a day's token count outlives the day by a margin, then goes


@dataclass(frozen=True, slots=True)
class LlmConfig:
    """What the router needs from settings (OPENAI_*, LLM_*)."""

    base_url: str
    model: str
    api_key: str = field(default="", repr=False)
    budget_s: float = 1.5
    min_confidence: float = 0.7
    daily_token_cap: int = 200_000
    breaker_failures: int = 5
    breaker_cooldown_s: float = 60.0
    audit_retention_days: int = 7
    audit_max_per_day: int = 10_000
    order_patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> LlmConfig | None:
        """None unless both OPENAI_BASE_URL and OPENAI_MODEL are set (LLM assist is off by default)."""
        if not settings.llm_enabled:
            return None
        return cls(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=settings.openai_api_key.get_secret_value(),
            budget_s=settings.llm_routing_budget_ms / 1000,
            min_confidence=settings.llm_min_confidence,
            daily_token_cap=settings.llm_daily_token_cap,
            breaker_failures=settings.llm_breaker_failures,
            breaker_cooldown_s=settings.llm_breaker_cooldown_s,
            audit_retention_days=settings.llm_audit_retention_days,
            audit_max_per_day=settings.llm_audit_max_per_day,
            order_patterns=compile_order_patterns(settings.llm_pii_order_patterns),
        )


def cap_day(now: float) -> str:
    """The Asia/Shanghai calendar day of a unix time, as YYYY-MM-DD."""
    return datetime.fromtimestamp(now, CAP_TIMEZONE).date().isoformat()


def day_end(now: float) -> float:
    """The unix time of the Asia/Shanghai midnight that ends the day of `now`."""
    local = datetime.fromtimestamp(now, CAP_TIMEZONE)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), CAP_TIMEZONE)
    return midnight.timestamp()


class CircuitBreaker:
    """Closed until `threshold` failures in a row; then open for `cooldown_s`; then one trial call at a time."""

    def __init__(self, threshold: int, cooldown_s: float, clock: Clock) -> None:
        self._threshold = threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self.failures = 0
        self.open_until: float | None = None
        self._trial_running = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self.open_until is None:
            return "closed"
        return "open" if self._clock.now() < self.open_until else "half_open"

    def admit(self) -> Literal["call", "trial"] | None:
        """Whether a call may go out now: "call" (closed), "trial" (the one probe after the cooldown) or None."""
        state = self.state
        if state == "closed":
            return "call"
        if state == "open" or self._trial_running:
            return None
        self._trial_running = True
        return "trial"

    def record(self, ok: bool, *, trial: bool) -> None:
        if trial:
            self._trial_running = False
        if ok:
            if self.open_until is not None:
                log.info("llm circuit breaker closed")
            self.failures = 0
            self.open_until = None
            return
        self.failures += 1
        if self.failures >= self._threshold and (trial or self.open_until is None):
            self.open_until = self._clock.now() + self._cooldown_s
            log.warning("llm circuit breaker open", failures=self.failures, cooldown_s=self._cooldown_s)


def _chat_messages(prompt: Sequence[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    out: list[ChatCompletionMessageParam] = []
    for message in prompt:
        if message["role"] == "system":
            out.append({"role": "system", "content": message["content"]})
        else:
            out.append({"role": "user", "content": message["content"]})
    return out


class IntentRouter:
    """Classifies a customer's text into a script id, "handoff" or "none" (handlers.intent.IntentClassifier)."""

    def __init__(
        self,
        config: LlmConfig,
        redis: redis_asyncio.Redis,
        keys: RedisKeys,
        clock: Clock,
        *,
        client: openai.AsyncOpenAI | None = None,
        boundary: Callable[[], str] = lambda: secrets.token_hex(8),
    ) -> None:
        self.config = config
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._boundary = boundary
        self._client = client or openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "unused",  # local servers take any key; the SDK insists on one
            max_retries=0,  # a retry would not fit the budget: the fallback is the retry
            timeout=config.budget_s,
        )
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s, clock)

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: redis_asyncio.Redis, keys: RedisKeys, clock: Clock
    ) -> IntentRouter | None:
        """The router for these settings, or None when LLM assist is off."""
        config = LlmConfig.from_settings(settings)
        if config is None:
            if settings.openai_base_url or settings.openai_model:
                missing = "OPENAI_MODEL" if settings.openai_base_url else "OPENAI_BASE_URL"
                log.warning("llm assist off: both OPENAI_BASE_URL and OPENAI_MODEL are needed", missing=missing)
            return None
        log.info("llm intent routing on", base_url=config.base_url, model=config.model, budget_s=config.budget_s)
        return cls(config, redis, keys, clock)

    async def aclose(self) -> None:
        await self._client.close()

    async def classify(self, text: str, candidates: Sequence[IntentCandidate], *, ref: str = "") -> IntentDecision:
        """A script id, "handoff" or "none" for `text`, within the time budget; never raises."""
        if not candidates:
            return none_decision(IntentOutcome.NO_CANDIDATES)
        now = self._clock.now()
        day = cap_day(now)
        if not await self._under_cap(day):
            log.info("llm intent skipped", outcome=IntentOutcome.TOKEN_CAP.value, ref=ref)
            return none_decision(IntentOutcome.TOKEN_CAP)
        admitted = self.breaker.admit()
        if admitted is None:
            log.info("llm intent skipped", outcome=IntentOutcome.BREAKER_OPEN.value, ref=ref)
            return none_decision(IntentOutcome.BREAKER_OPEN)
        prompt = build_prompt(candidates, mask_pii(text, self.config.order_patterns), boundary=self._boundary())
        started = time.perf_counter()
        output: str | None = None
        tokens = 0
        status: int | None = None
        try:
            async with asyncio.timeout(self.config.budget_s):
                response = await self._client.chat.completions.create(
                    model=self.config.model,
                    messages=_chat_messages(prompt),
                    temperature=0,
                    max_tokens=MAX_OUTPUT_TOKENS,
                    response_format={"type": "json_object"},
                    timeout=self.config.budget_s,
                )
        except (TimeoutError, openai.APITimeoutError):
            decision = none_decision(IntentOutcome.TIMEOUT)
        except openai.APIStatusError as exc:
            status = exc.status_code
            decision = none_decision(IntentOutcome.ERROR)
        except Exception as exc:  # connection refused, a body that is not a completion, ...: all just "none"
            log.warning("llm call failed", error=type(exc).__name__, ref=ref)
            decision = none_decision(IntentOutcome.ERROR)
        else:
            choice = response.choices[0] if response.choices else None
            output = choice.message.content if choice is not None else None
            usage = response.usage
            # A server that reports no usage is charged an estimate, so the cap still holds.
            tokens = usage.total_tokens if usage is not None else sum(len(m["content"]) for m in prompt) // 2
            decision = parse_decision(output, labels(candidates), self.config.min_confidence)
        latency_ms = round((time.perf_counter() - started) * 1000)
        self.breaker.record(decision.outcome not in FAILURE_OUTCOMES, trial=admitted == "trial")
        log.info(
            "llm intent classified",
            outcome=decision.outcome.value,
            label=decision.label,
            model_label=decision.model_label,
            confidence=decision.confidence,
            latency_ms=latency_ms,
            tokens=tokens,
            http_status=status,
            breaker=self.breaker.state,
            ref=ref,
        )
        record = audit_record(
            at=self._clock.now(),
            model=self.config.model,
            prompt=prompt,
            output=output,
            decision=decision,
            latency_ms=latency_ms,
            tokens=tokens,
            ref=ref,
        )
        # Relative to our clock, not Redis's: the list lives until the day ends, then the retention.
        audit_ttl_s = round(day_end(now) - now) + self.config.audit_retention_days * 86_400
        await self._account(day, audit_ttl_s, tokens, record)
        return decision

    async def _under_cap(self, day: str) -> bool:
        try:
            used = await self._redis.get(self._keys.llm_tokens(day))
        except Exception as exc:  # the cap cannot be checked: the model is not asked
            log.warning("llm token count unreadable; model skipped", error=type(exc).__name__)
            return False
        return int(used or 0) < self.config.daily_token_cap

    async def _account(self, day: str, audit_ttl_s: int, tokens: int, record: dict[str, object]) -> None:
        """Add the call's tokens to the day's count and its record to the day's audit list.

        The list keeps the day's newest LLM_AUDIT_MAX_PER_DAY records and expires LLM_AUDIT_RETENTION_DAYS after
        the day ends, so no record outlives the retention by more than a day.
        """
        audit_key = self._keys.llm_audit(day)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if tokens:
                    pipe.incrby(self._keys.llm_tokens(day), tokens)
                    pipe.expire(self._keys.llm_tokens(day), TOKENS_TTL_S)
                pipe.lpush(audit_key, json.dumps(record, ensure_ascii=False))
                pipe.ltrim(audit_key, 0, self.config.audit_max_per_day - 1)
                pipe.expire(audit_key, audit_ttl_s)
                await pipe.execute()
        except Exception as exc:  # accounting must not cost the customer an answer
            log.warning("llm usage or audit not recorded", error=type(exc).__name__)

    async def audit_entries(self, day: str, limit: int = 100) -> list[dict[str, object]]:
        """The day's latest audit records, newest first."""
        raw = await self._redis.lrange(self._keys.llm_audit(day), 0, limit - 1)
        return [json.loads(item) for item in raw]

    async def tokens_used(self, day: str) -> int:
        """Tokens counted for a day so far."""
        return int(await self._redis.get(self._keys.llm_tokens(day)) or 0)
