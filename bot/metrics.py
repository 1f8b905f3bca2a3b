"""Prometheus metrics, one registry per app so tests and several apps in one process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.callbacks = Counter(
            "wecom_callbacks_total",
            "Callbacks received, by outcome (accepted, duplicate, verified, rejected_*).",
            ["outcome"],
            registry=self.registry,
        )
        self.ack_latency = Histogram(
            "wecom_callback_ack_seconds",
            "Time from request start to the callback's response.",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "wecom_queue_depth", "Entries waiting or in flight across all partitions.", registry=self.registry
        )
        self.queue_lag = Gauge(
            "wecom_queue_lag_seconds", "Age of the oldest unacknowledged entry.", registry=self.registry
        )
        self.entries_processed = Counter(
            "wecom_queue_entries_total",
            "Queue entries finished by workers, by outcome (handled, failed, dead_lettered).",
            ["outcome"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "wecom_dead_letters", "Entries in the dead-letter stream.", registry=self.registry
        )
        self.api_calls = Counter(
            "wecom_api_calls_total",
            "WeCom API calls by path and errcode (transport errors use errcode 'transport').",
            ["path", "errcode"],
            registry=self.registry,
        )
        self.scripts_reloads = Counter(
            "wecom_scripts_reloads_total",
            "Script library reload attempts, by outcome (ok, invalid, error).",
            ["outcome"],
            registry=self.registry,
        )
        self.scripts_loaded_at = Gauge(
            "wecom_scripts_loaded_timestamp_seconds",
            "When the script library in use was loaded (epoch seconds).",
            registry=self.registry,
        )
        self.scripts_count = Gauge("wecom_scripts_count", "Scripts in the library in use.", registry=self.registry)
        self.scripts_reload_failing = Gauge(
            "wecom_scripts_reload_failing",
            "1 while the library on disk is invalid and the last good one is served, else 0.",
            registry=self.registry,
        )
        self.scripts_library = Info(
            "wecom_scripts_library", "Fingerprint of the script library in use.", registry=self.registry
        )
