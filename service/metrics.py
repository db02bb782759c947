"""Prometheus metrics, in a registry of the app's own (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.callbacks = Counter(
            "bulkhook_callbacks",
            "Callback deliveries by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.upstream_calls = Counter(
            "bulkhook_upstream_calls",
            "Calls to the upstream by operation, HTTP status ('none': no response) and"
            " connector instance.",
            ["operation", "status", "instance"],
            registry=self.registry,
        )
        self.jobs = Gauge(
            "bulkhook_jobs",
            "Jobs in the store by state and connector instance.",
            ["state", "instance"],
            registry=self.registry,
        )
        self.poll_lag = Histogram(
            "bulkhook_poll_lag_seconds",
            "How late a due status poll started.",
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300),
            registry=self.registry,
        )
        self.callback_latency = Histogram(
            "bulkhook_callback_ack_seconds",
            "From receiving a callback to acknowledging it.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "bulkhook_auth_failures",
            "Refused token attempts by where (api, dashboard, sandbox) and outcome"
            " (wrong: a token that matched none; throttled: refused unchecked, too many wrong).",
            ["where", "outcome"],
            registry=self.registry,
        )
        self.downloads = Counter(
            "bulkhook_downloads",
            "Fetches of download results by outcome (stored, failed: given up, retried)"
            " and connector instance.",
            ["outcome", "instance"],
            registry=self.registry,
        )
        self.result_bytes = Counter(
            "bulkhook_result_bytes",
            "Bytes of download results stored.",
            registry=self.registry,
        )
        # One child per outcome, kept: ``labels()`` takes a lock and builds a key per call.
        self._outcomes: dict[str, Counter] = {}

    def callback(self, outcome: str) -> None:
        """Count one callback delivery by its outcome (the hot path's one counter)."""
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.callbacks.labels(outcome)
        child.inc()

    def download(self, outcome: str, instance: str) -> None:
        """Count one fetch attempt of a download result by how it ended."""
        self.downloads.labels(outcome, instance).inc()

    def upstream_call(self, operation: str, status: int | None, instance: str) -> None:
        self.upstream_calls.labels(operation, str(status) if status else "none", instance).inc()

    def render(self, jobs: dict[str, dict[str, int]]) -> bytes:
        """The page, with the jobs gauge set from ``jobs`` (instance -> state -> n)."""
        for instance, by_state in jobs.items():
            for state, count in by_state.items():
                self.jobs.labels(state, instance).set(count)
        return generate_latest(self.registry)
