"""No acknowledged callback is lost, even when the service is killed with SIGKILL.

The service runs as a real process on a real SQLite file. Signed callbacks are fired
at it concurrently; the process is killed mid-stream; after a restart every callback
that got a 2xx is in the store, and the jobs finish by polling.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.callbacks.signatures import sign

from .helpers import SIGNATURE_KEY, RunningSandbox, free_port, wait_healthy

JOBS = 20
CALLBACKS_PER_JOB = 12
KILL_AFTER_ACKS = 80


class ServiceProcess:
    def __init__(self, upstream: RunningSandbox, database: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))},
            "OC_BASE_URL": upstream.api_url,
            "OC_USER_SECRET": "user-secret",
            "OC_ORG_SECRET": "org-secret",
            "OC_ELEMENT_TOKEN": "element-token",
            "OC_SIGNATURE_KEYS": SIGNATURE_KEY,
            "BULKHOOK_DATABASE_URL": f"sqlite:///{database}",
            "BULKHOOK_PUBLIC_URL": self.url,
            "BULKHOOK_CALLBACK_GRACE": "1",
            "BULKHOOK_POLL_INTERVAL": "0.5",
            "BULKHOOK_POLL_MAX_INTERVAL": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_healthy(self.url, self.process)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def service_process(
    start_sandbox: Callable[..., RunningSandbox], tmp_path: Path
) -> Iterator[tuple[RunningSandbox, ServiceProcess, Path]]:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=4)
    database = tmp_path / "bulkhook.db"
    process = ServiceProcess(upstream, database, free_port())
    process.start()
    try:
        yield upstream, process, database
    finally:
        process.stop()


async def fire(url: str, jobs: list[dict], kill: Callable[[], None]) -> tuple[set[str], set[str]]:
    """Send every callback concurrently; kill the service once enough were acked."""
    acked: set[str] = set()
    sent: set[str] = set()
    killed = asyncio.Event()
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:

        async def one(job: dict, n: int) -> None:
            webhook_id = f"{job['id']}-{n}"
            body = json.dumps(
                {"id": job["upstream_id"], "status": "RUNNING", "recordsCount": n}
            ).encode()
            headers = {
                "Content-Type": "application/json",
                "Elements-Webhook-Id": webhook_id,
                "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body),
            }
            sent.add(webhook_id)
            try:
                response = await client.post(
                    f"{url}/callbacks/jobs/{job['id']}", content=body, headers=headers
                )
            except httpx.TransportError:
                return
            if 200 <= response.status_code < 300:
                acked.add(webhook_id)
                if len(acked) >= KILL_AFTER_ACKS and not killed.is_set():
                    killed.set()
                    kill()

        await asyncio.gather(*(one(job, n) for n in range(CALLBACKS_PER_JOB) for job in jobs))
    return sent, acked


def test_acknowledged_callbacks_survive_kill_9(
    service_process: tuple[RunningSandbox, ServiceProcess, Path], contacts_csv: Path
) -> None:
    upstream, process, database = service_process
    jobs = []
    with httpx.Client(base_url=process.url, timeout=30) as http:
        for _ in range(JOBS):
            with contacts_csv.open("rb") as handle:
                response = http.post(
                    "/jobs",
                    data={"object": "contact"},
                    files={"file": ("contacts.csv", handle, "text/csv")},
                )
            assert response.status_code == 202
            jobs.append(response.json())

    sent, acked = asyncio.run(fire(process.url, jobs, process.kill))
    assert process.process is not None and process.process.returncode == -signal.SIGKILL
    assert len(sent) == JOBS * CALLBACKS_PER_JOB
    assert KILL_AFTER_ACKS <= len(acked) < len(sent)

    with sqlite3.connect(database) as conn:
        stored = {row[0] for row in conn.execute("SELECT webhook_id FROM deliveries")}
        details = [row[0] for row in conn.execute("SELECT detail FROM events")]
    applied = {w for w in acked if any(f"delivery {w}" in d for d in details)}
    print(f"\nsent {len(sent)}, acknowledged {len(acked)}, applied {len(applied)}")
    assert acked <= stored, f"lost: {sorted(acked - stored)[:5]}"
    assert applied == acked

    process.start()  # same database, same port
    with httpx.Client(base_url=process.url, timeout=30) as http:
        deadline = time.monotonic() + 30
        pending = {job["id"] for job in jobs}
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                if http.get(f"/jobs/{job_id}").json()["state"] == "COMPLETED":
                    pending.discard(job_id)
            time.sleep(0.2)
    assert not pending, f"{len(pending)} jobs did not finish after the restart"
    assert len(upstream.sandbox.jobs) == JOBS
