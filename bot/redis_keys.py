"""Every Redis key shape the bot uses, in one place."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

CONSUMER_GROUP = "workers"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = "wecom"

    def dedupe(self, dedupe_key: str) -> str:
        """Seen-marker for one callback or kf message (MsgId, or the composite event key)."""
        return f"{self.prefix}:dedupe:{dedupe_key}"

    def inbound_stream(self, partition: int) -> str:
        """Inbound work for one partition; a conversation always maps to the same partition."""
        return f"{self.prefix}:inbound:{partition}"

    def dead_letters(self) -> str:
        return f"{self.prefix}:dead-letters"

    def partition_lease(self, partition: int) -> str:
        """Which worker owns a partition; only the owner reads it, which keeps per-customer order."""
        return f"{self.prefix}:lease:{partition}"

    def workers(self) -> str:
        """Sorted set of live worker ids scored by their last heartbeat (ms)."""
        return f"{self.prefix}:workers"

    def delivery_count(self, partition: int) -> str:
        """Hash: stream entry id -> failed attempts so far."""
        return f"{self.prefix}:attempts:{partition}"

    def access_token(self, corp_id: str, secret: str) -> str:
        return f"{self.prefix}:token:{corp_id}:{secret_fingerprint(secret)}"

    def access_token_lock(self, corp_id: str, secret: str) -> str:
        return f"{self.prefix}:token-lock:{corp_id}:{secret_fingerprint(secret)}"

    def kf_sync_lock(self, open_kfid: str) -> str:
        return f"{self.prefix}:kf-sync-lock:{open_kfid}"

    def kf_sync_pending(self, open_kfid: str) -> str:
        """Set while a pull is wanted for an account, so a callback during a pull is not lost."""
        return f"{self.prefix}:kf-sync-pending:{open_kfid}"

    def handoff_drain_lock(self) -> str:
        """Held while one process assigns queued conversations, so two drains never fill one agent's last slot."""
        return f"{self.prefix}:handoff-drain-lock"

    def scripts_version(self) -> str:
        """Fingerprint of the script library the fleet last switched to; every process converges on it."""
        return f"{self.prefix}:scripts:version"

    def post_rate(self, channel: str, subject: str) -> str:
        """Sorted set of recent scheduled-post sends (ms scores) for one robot name or member userid."""
        return f"{self.prefix}:post-rate:{channel}:{subject}"

    def scheduler_leader(self) -> str:
        """The scheduling leader's lock: `token|expires_at_ms`, only the holder renews it."""
        return f"{self.prefix}:scheduler-leader"

    def card_window(self, member_id: int) -> str:
        """Sorted set of the app cards sent to one member in the last hour (score: ms), for WeCom's limit."""
        return f"{self.prefix}:cards:window:{member_id}"

    def card_pace(self, member_id: int) -> str:
        """The instant (ms) until which a member's paced (SLA) cards wait."""
        return f"{self.prefix}:cards:pace:{member_id}"

    def card_held(self, member_id: int, *, urgent: bool) -> str:
        """List of the cards held for a member's next digest (JSON), urgent and paced apart."""
        return f"{self.prefix}:cards:held:{'urgent' if urgent else 'paced'}:{member_id}"

    def card_held_members(self) -> str:
        """Set of the member ids that have held cards (what the flush visits)."""
        return f"{self.prefix}:cards:held-members"

    def llm_tokens(self, day: str) -> str:
        """Tokens the LLM used on one Asia/Shanghai calendar day (YYYY-MM-DD), for LLM_DAILY_TOKEN_CAP."""
        return f"{self.prefix}:llm:tokens:{day}"

    def llm_audit(self, day: str) -> str:
        """List of one day's LLM calls (JSON: masked prompt, raw output, decision), newest first, capped, expiring."""
        return f"{self.prefix}:llm:audit:{day}"


def secret_fingerprint(secret: str) -> str:
    """Secrets never appear in key names; a short hash tells tokens of different secrets apart."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]
