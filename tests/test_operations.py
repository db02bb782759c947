"""Running it: JSON logs, metrics, readiness, and a graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.callbacks.signatures import sign

from .helpers import SIGNATURE_KEY, RunningSandbox, RunningService, free_port, serve


def run_one_job(tmp_path: Path, contacts_csv: Path, **env: str) -> tuple[dict, list[dict]]:
    """Serve, complete one job by its callback, send one forged callback; the log lines."""
    process, url = serve(tmp_path, **env)
    try:
        with contacts_csv.open("rb") as handle:
            job = httpx.post(
                f"{url}/jobs", data={"object": "contact"}, files={"file": handle}, timeout=30
            ).json()
        deadline = time.monotonic() + 15
        while httpx.get(f"{url}/jobs/{job['id']}").json()["state"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        forged = httpx.post(f"{url}/callbacks/jobs/{job['id']}", content=b"{}")
        assert forged.status_code == 401
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    return job, [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_logs_are_json_lines_and_a_refused_callback_is_a_warning(
    tmp_path: Path, contacts_csv: Path
) -> None:
    job, entries = run_one_job(tmp_path, contacts_csv)
    assert {"ts", "level", "logger", "message"} <= set(entries[0])
    refused = [e for e in entries if e.get("outcome") == "bad_signature"]
    assert [(e["level"], e["job_id"]) for e in refused] == [("warning", job["id"])]
    # An accepted delivery is kept in the job's timeline, not logged at the default level.
    assert not [e for e in entries if e.get("outcome") == "accepted"]


def test_at_debug_level_each_accepted_callback_is_logged_with_its_ids(
    tmp_path: Path, contacts_csv: Path
) -> None:
    job, entries = run_one_job(tmp_path, contacts_csv, BULKHOOK_LOG_LEVEL="debug")
    accepted = [e for e in entries if e.get("outcome") == "accepted"]
    assert len(accepted) == 1
    assert accepted[0]["level"] == "debug"
    assert accepted[0]["job_id"] == job["id"]
    assert accepted[0]["webhook_id"]


def test_metrics_cover_callbacks_upstream_jobs_lag_and_latency(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox(job_seconds=0.3, drop_callbacks=0.0)
    service = start_service(upstream, callback_grace=0.2, poll_interval=0.2)
    job = service.submit(contacts_csv).json()
    service.wait_for(job["id"], {"COMPLETED"})
    service.http.post("/callbacks", content=b"{}")  # refused: counted
    text = service.http.get("/metrics").text
    for needle in (
        'bulkhook_callbacks_total{outcome="bad_signature"} 1.0',
        'bulkhook_upstream_calls_total{instance="default",operation="submit",status="200"} 1.0',
        'bulkhook_jobs{instance="default",state="COMPLETED"} 1.0',
        "bulkhook_poll_lag_seconds_count",
        "bulkhook_callback_ack_seconds_bucket",
    ):
        assert needle in text, needle


class TcpProxy:
    """A loopback TCP forwarder that can be cut, to make a database unreachable."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> None:
        async def go() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(5)

    def cut(self) -> None:
        async def go() -> None:
            assert self._server is not None
            self._server.close()
            for writer in self._writers:
                writer.close()
            self._writers.clear()

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(5)


def test_readiness_fails_while_the_store_is_unreachable(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    postgres_url: str,
) -> None:
    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.start()
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert url != postgres_url
    service = start_service(start_sandbox(), database_url=url)
    assert service.http.get("/readyz").status_code == 200
    proxy.cut()
    response = service.http.get("/readyz", timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "store_unavailable"
    assert service.http.get("/healthz").status_code == 200  # alive, just not ready
    proxy.start()
    deadline = time.monotonic() + 20
    while service.http.get("/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "did not recover"
        time.sleep(0.2)


def test_a_callback_during_a_store_outage_is_refused_and_its_redelivery_lands(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    postgres_url: str,
    contacts_csv: Path,
) -> None:
    """503 with Retry-After, nothing recorded; once the store is back, the retry applies."""
    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.start()
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    service = start_service(start_sandbox(drop_callbacks=1.0, job_seconds=30), database_url=url)
    job = service.submit(contacts_csv).json()
    body = json.dumps({"id": job["upstream_id"], "status": "COMPLETED"}).encode()
    headers = {
        "Elements-Webhook-Id": "w-outage",
        "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body),
    }
    proxy.cut()
    refused = service.http.post(f"/callbacks/jobs/{job['id']}", content=body, headers=headers)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"
    assert int(refused.headers["Retry-After"]) > 0
    proxy.start()
    deadline = time.monotonic() + 20
    while True:
        again = service.http.post(
            f"/callbacks/jobs/{job['id']}", content=body, headers=headers, timeout=30
        )
        if again.status_code != 503:
            break
        assert time.monotonic() < deadline, "the store did not come back"
        time.sleep(0.2)
    assert again.status_code == 200
    assert again.json()["status"] == "accepted"  # not a repeat: the refused one left no trace
    assert service.wait_for(job["id"], {"COMPLETED"})["state"] == "COMPLETED"


@pytest.fixture
def slow_fleet(tmp_path: Path, start_sandbox: Callable[..., RunningSandbox]) -> Iterator[tuple]:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=30)
    env = {
        "OC_BASE_URL": upstream.api_url,
        "OC_USER_SECRET": "user-secret",
        "OC_ORG_SECRET": "org-secret",
        "OC_ELEMENT_TOKEN": "element-token",
        "OC_SIGNATURE_KEYS": SIGNATURE_KEY,
        "BULKHOOK_CALLBACK_GRACE": "0.5",
        "BULKHOOK_POLL_INTERVAL": "5",
        "BULKHOOK_POLL_RATE": "1",
        "BULKHOOK_LOG_FORMAT": "text",
    }
    process, url = serve(tmp_path, **env)
    try:
        yield process, url, tmp_path / "bulkhook.db"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_sigterm_drains_requests_stops_polling_and_releases_leases(
    slow_fleet: tuple, contacts_csv: Path
) -> None:
    process, url, database = slow_fleet
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(8):
            with contacts_csv.open("rb") as handle:
                assert (
                    http.post(
                        "/jobs", data={"object": "contact"}, files={"file": handle}
                    ).status_code
                    == 202
                )
    time.sleep(1.0)  # all 8 are due; at 1 poll/s most sit leased behind the rate limit
    with sqlite3.connect(database) as conn:
        leased = conn.execute("SELECT COUNT(*) FROM jobs WHERE lease_owner IS NOT NULL").fetchone()[
            0
        ]
    assert leased > 0

    # A request in flight when SIGTERM arrives still gets its answer.
    port = int(url.rsplit(":", 1)[1])
    body = contacts_csv.read_bytes()
    boundary = "b0undary"
    payload = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="object"\r\n\r\ncontact\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n\r\n'
        ).encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    sock = socket.create_connection(("127.0.0.1", port), 10)
    sock.sendall(
        "POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload[:100]
    )
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)  # no new connections
    sock.sendall(payload[100:])
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 202 "), answer[:200]
    # uvicorn re-raises SIGTERM once it has shut down cleanly, so the exit says so too.
    assert process.wait(30) in (0, -signal.SIGTERM)
    stderr = process.communicate(timeout=10)[1]
    assert "Application shutdown complete" in stderr

    with sqlite3.connect(database) as conn:
        leased = conn.execute("SELECT COUNT(*) FROM jobs WHERE lease_owner IS NOT NULL").fetchone()[
            0
        ]
        total = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert leased == 0
    assert total == 9
