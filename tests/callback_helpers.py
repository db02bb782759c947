"""Sending signed callbacks to a running service, and reading what they did."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from service.callbacks.signatures import sign

from .conftest import SIGNATURE_KEY, RunningService


def signed(body: bytes, webhook_id: str) -> dict[str, str]:
    """The headers Open Connectors sends with a body signed by the instance's key."""
    return {
        "Content-Type": "application/json",
        "Elements-Webhook-Id": webhook_id,
        "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body),
    }


def genuine(job: dict[str, Any], **fields: Any) -> bytes:
    """The body the upstream sends when ``job`` completes: its ids, status and counts."""
    body = {
        "id": job["upstream_id"],
        "status": "COMPLETED",
        "recordsCount": 10,
        "recordsFailedCount": 0,
        "callback-payload": job["id"],
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def deliver(service: RunningService, path: str, body: bytes, webhook_id: str) -> httpx.Response:
    return service.http.post(path, content=body, headers=signed(body, webhook_id))


def job_url(job: dict[str, Any]) -> str:
    return f"/callbacks/jobs/{job['id']}"


def job_now(service: RunningService, job_id: str) -> dict[str, Any]:
    response = service.http.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def essentials(job: dict[str, Any]) -> tuple[Any, ...]:
    """What a callback about another job must never change."""
    return (
        job["state"],
        job["upstream_id"],
        job["records_count"],
        job["records_failed_count"],
        job["upstream_status"],
    )


def refusals(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["detail"].startswith("refused:")]


def counted(service: RunningService, outcome: str) -> float:
    """``bulkhook_callbacks_total{outcome=...}``, 0 when never counted."""
    text = service.http.get("/metrics").text
    match = re.search(rf'bulkhook_callbacks_total\{{outcome="{outcome}"\}} (\S+)', text)
    return float(match.group(1)) if match else 0.0
