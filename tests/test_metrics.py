"""The callback metrics as ``/metrics`` shows them and the dashboard reads them."""

from __future__ import annotations

from service.metrics import Metrics


def test_callback_outcomes_and_ack_times_are_exposed_as_prometheus_counts() -> None:
    metrics = Metrics()
    metrics.callback("accepted", "crm")
    metrics.callback("accepted", "shop")
    metrics.callback("accepted", "shop")
    metrics.callback("bad_signature", "unknown")
    metrics.callbacks.acknowledged(0.0004)
    metrics.callbacks.acknowledged(0.003)
    metrics.callbacks.acknowledged(0.005)  # a bound belongs to its own bucket
    metrics.callbacks.acknowledged(7.0)
    page = metrics.render({}).decode().splitlines()
    assert 'bulkhook_callbacks_total{instance="shop",outcome="accepted"} 2.0' in page
    assert 'bulkhook_callbacks_total{instance="crm",outcome="accepted"} 1.0' in page
    assert 'bulkhook_callbacks_total{instance="unknown",outcome="bad_signature"} 1.0' in page
    assert 'bulkhook_callback_ack_seconds_bucket{le="0.001"} 1.0' in page
    assert 'bulkhook_callback_ack_seconds_bucket{le="0.0025"} 1.0' in page
    assert 'bulkhook_callback_ack_seconds_bucket{le="0.005"} 3.0' in page
    assert 'bulkhook_callback_ack_seconds_bucket{le="1.0"} 3.0' in page
    assert 'bulkhook_callback_ack_seconds_bucket{le="+Inf"} 4.0' in page
    assert "bulkhook_callback_ack_seconds_count 4.0" in page
    assert "bulkhook_callback_ack_seconds_sum 7.0084" in page


def test_the_dashboard_counts_each_outcome_over_every_instance() -> None:
    metrics = Metrics()
    for instance in ("crm", "shop", "shop"):
        metrics.callback("duplicate", instance)
    assert metrics.callbacks.by_outcome() == {"duplicate": 3}
