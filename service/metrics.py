"""Prometheus metrics, in a registry of the app's own (tests build many apps)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CallbackCounts", "Metrics"]

_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class CallbackCounts(Collector):
    """Callback deliveries by outcome and connector instance, and how long each took to
    acknowledge: the hot path's metrics.

    Counted in plain numbers on the event loop and turned into Prometheus families only
    when ``/metrics`` is read: a ``prometheus_client`` counter or histogram takes a lock
    and checks its value on every update, which cost more than the rest of a callback's
    bookkeeping. Bounded: outcomes are a fixed few, instances the configured ones (and
    ``unknown``).
    """

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], int] = {}
        self._buckets = [0] * (len(_ACK_BUCKETS) + 1)
        self._seconds = 0.0

    def count(self, outcome: str, instance: str) -> None:
        key = (outcome, instance)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def acknowledged(self, seconds: float) -> None:
        self._buckets[bisect.bisect_left(_ACK_BUCKETS, seconds)] += 1
        self._seconds += seconds

    def by_outcome(self) -> dict[str, int]:
        """Deliveries by outcome, every instance together."""
        totals: dict[str, int] = {}
        for (outcome, _instance), count in self.outcomes.items():
            totals[outcome] = totals.get(outcome, 0) + count
        return totals

    def collect(self) -> Iterator[Metric]:
        deliveries = CounterMetricFamily(
            "bulkhook_callbacks",
            "Callback deliveries by outcome and connector instance ('unknown': refused"
            " before the instance was known).",
            labels=["outcome", "instance"],
        )
        for (outcome, instance), count in sorted(self.outcomes.items()):
            deliveries.add_metric([outcome, instance], count)
        yield deliveries
        cumulative = list(itertools.accumulate(self._buckets))
        # As prometheus_client spells a bucket's bound (Python's repr for these).
        bounds = [repr(bound) for bound in _ACK_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "bulkhook_callback_ack_seconds",
            "From receiving a callback to acknowledging it.",
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=self._seconds,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.callbacks = CallbackCounts()
        self.registry.register(self.callbacks)
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

    def callback(self, outcome: str, instance: str) -> None:
        """Count one callback delivery by its outcome and the instance it was verified
        for; ``unknown`` when refused before that was known."""
        self.callbacks.count(outcome, instance)

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
