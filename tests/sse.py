"""Helpers for the dashboard's tests: reading Server-Sent Events, forging a callback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from service.callbacks.signatures import sign

from .conftest import RunningService

SSE = {"Accept": "text/event-stream"}


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each Server-Sent Event, as they arrive."""
    name, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and data:
            yield name, json.loads(data)
            name, data = "message", ""


def forged(service: RunningService, job_id: str, marker: str) -> httpx.Response:
    """A callback signed with a key that is not the instance's: refused, and noted."""
    body = json.dumps({"status": "ERROR", "marker": marker}).encode()
    response: httpx.Response = service.http.post(
        f"/callbacks/jobs/{job_id}",
        content=body,
        headers={
            "Elements-Webhook-Signature": sign("not-the-instance-key", body),
            "Elements-Webhook-Id": f"forged-{marker}",
        },
    )
    return response
