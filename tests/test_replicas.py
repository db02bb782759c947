"""Three replicas on one PostgreSQL: every job finishes, each due poll is made once,
a replica killed with SIGKILL loses nothing, and any replica takes any callback."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from service.callbacks.signatures import sign

from .helpers import SIGNATURE_KEY, RunningSandbox, free_port

JOBS = 200
REPLICAS = 3
POLL_INTERVAL = 0.5


class Replica:
    def __init__(self, upstream: RunningSandbox, database_url: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
        env.update(
            OC_BASE_URL=upstream.api_url,
            OC_USER_SECRET="user-secret",
            OC_ORG_SECRET="org-secret",
            OC_ELEMENT_TOKEN="element-token",
            OC_SIGNATURE_KEYS=SIGNATURE_KEY,
            BULKHOOK_DATABASE_URL=database_url,
            BULKHOOK_PUBLIC_URL=self.url,
            BULKHOOK_CALLBACK_GRACE="1",
            BULKHOOK_POLL_INTERVAL=str(POLL_INTERVAL),
            BULKHOOK_POLL_MAX_INTERVAL="1",
            BULKHOOK_POLL_RATE="40",
            BULKHOOK_POLL_LEASE="3",
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"replica {self.url} did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def fleet(
    start_sandbox: Callable[..., RunningSandbox], postgres_url: str
) -> Iterator[tuple[RunningSandbox, list[Replica], str]]:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=2.0)
    replicas = [Replica(upstream, postgres_url) for _ in range(REPLICAS)]
    try:
        for replica in replicas:
            replica.wait_ready()
        yield upstream, replicas, postgres_url
    finally:
        for replica in replicas:
            replica.stop()


def submit(url: str, upload: Path) -> dict:
    with upload.open("rb") as handle:
        response = httpx.post(
            f"{url}/jobs",
            data={"object": "contact"},
            files={"file": (upload.name, handle, "text/csv")},
            timeout=60,
        )
    assert response.status_code == 202, response.text
    return response.json()


def states(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
    return dict(rows)


def test_three_replicas_share_one_truth(
    fleet: tuple[RunningSandbox, list[Replica], str], contacts_csv: Path
) -> None:
    upstream, replicas, database_url = fleet
    urls = itertools.cycle([replica.url for replica in replicas])
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        jobs = list(
            pool.map(
                lambda url: (url, submit(url, contacts_csv)), [next(urls) for _ in range(JOBS)]
            )
        )

    # A callback delivered to any replica updates a job submitted on another.
    for index, (url, job) in enumerate(jobs[:12]):
        other = replicas[(index + 1) % REPLICAS].url
        assert other != url
        body = json.dumps({"id": job["upstream_id"], "status": "COMPLETED", "recordsCount": 10})
        response = httpx.post(
            f"{other}/callbacks/jobs/{job['id']}",
            content=body,
            headers={
                "Elements-Webhook-Id": f"cross-{index}",
                "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body.encode()),
            },
        )
        assert response.json()["state"] == "COMPLETED"

    # Kill one replica outright while the others are polling.
    time.sleep(1.5)
    victim = replicas[0]
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(10)

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and states(database_url).get("COMPLETED", 0) < JOBS:
        time.sleep(0.5)
    final = states(database_url)
    print(f"\nstates {final}; status polls {len(upstream.sandbox.status_log)}")
    assert final == {"COMPLETED": JOBS}

    with psycopg.connect(database_url) as conn:
        sources = dict(
            conn.execute("SELECT last_source, COUNT(*) FROM jobs GROUP BY last_source").fetchall()
        )
    assert sources.get("callback") == 12
    assert sources.get("poll") == JOBS - 12

    # No job was polled twice for the same due time: each poll names the due time it
    # was claimed for, and no (job, due time) pair appears twice.
    with psycopg.connect(database_url) as conn:
        polls = conn.execute(
            "SELECT job_id, detail FROM events WHERE source = 'poll' AND detail LIKE %s",
            ("%poll due %",),
        ).fetchall()
    due = Counter(
        (job_id, detail.split("poll due ", 1)[1].split(";", 1)[0]) for job_id, detail in polls
    )
    assert len(polls) >= JOBS - 12
    assert [key for key, count in due.items() if count > 1] == []
    assert len(upstream.sandbox.jobs) == JOBS
