"""1,000 concurrent callback connections on loopback: zero errors, zero lost."""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable
from pathlib import Path

import httpx

from service.callbacks.signatures import sign

from .helpers import SIGNATURE_KEY, RunningSandbox, RunningService

CONNECTIONS = 1000
JOBS = 20


async def storm(url: str, jobs: list[dict]) -> list[int | str]:
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=0)
    timeout = httpx.Timeout(60.0, pool=60.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(n: int) -> int | str:
            job = jobs[n % len(jobs)]
            body = json.dumps({"id": job["upstream_id"], "status": "RUNNING", "n": n}).encode()
            headers = {
                "Content-Type": "application/json",
                "Elements-Webhook-Id": f"load-{n}",
                "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body),
            }
            try:
                response = await client.post(
                    f"{url}/callbacks/jobs/{job['id']}", content=body, headers=headers
                )
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return response.status_code

        return await asyncio.gather(*(one(n) for n in range(CONNECTIONS)))


def test_a_thousand_concurrent_callbacks(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * CONNECTIONS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * CONNECTIONS), hard))
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=120)
    service = start_service(upstream, callback_grace=600)
    jobs = [service.submit(contacts_csv).json() for _ in range(JOBS)]
    outcomes = asyncio.run(storm(service.url, jobs))
    errors = [o for o in outcomes if o != 200]
    assert errors == [], f"{len(errors)} failed: {sorted(set(map(str, errors)))}"
    [(stored,)] = service.query("SELECT COUNT(*) FROM deliveries")
    [(events,)] = service.query("SELECT COUNT(*) FROM events WHERE source = 'callback'")
    assert stored == CONNECTIONS
    assert events == CONNECTIONS
