"""Forged or damaged callbacks get 401 and change nothing: job, timeline, deliveries."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.callbacks.signatures import sign

from .helpers import SIGNATURE_KEY, RunningSandbox, RunningService

BODY_FIELDS = {"status": "COMPLETED", "recordsCount": 10, "recordsFailedCount": 0}


@pytest.fixture
def target(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> tuple[RunningService, dict[str, Any], bytes]:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=60)
    service = start_service(upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    body = json.dumps({"id": job["upstream_id"], **BODY_FIELDS}).encode()
    return service, job, body


def observed(service: RunningService, job_id: str) -> tuple[Any, ...]:
    job = service.http.get(f"/jobs/{job_id}").json()
    deliveries = service.query("SELECT * FROM deliveries ORDER BY webhook_id")
    kept = service.query("SELECT * FROM kept_callbacks ORDER BY id")
    return job, deliveries, kept


def post(service: RunningService, job_id: str, body: bytes, headers: list[tuple[str, str]]) -> Any:
    return service.http.post(
        f"/callbacks/jobs/{job_id}",
        content=body,
        headers=[("Content-Type", "application/json"), ("Elements-Webhook-Id", "w-1"), *headers],
    )


def _flip_last_digest_byte(header: str) -> str:
    algo, encoded = header.split("=", 1)
    digest = bytearray(base64.b64decode(encoded))
    digest[-1] ^= 1
    return f"{algo}={base64.b64encode(bytes(digest)).decode()}"


FORGERIES: dict[str, Callable[[bytes], tuple[bytes, list[tuple[str, str]]]]] = {
    "wrong key": lambda b: (b, [("Elements-Webhook-Signature", sign("not-the-key", b))]),
    "no header": lambda b: (b, []),
    "empty header": lambda b: (b, [("Elements-Webhook-Signature", "")]),
    "junk digest": lambda b: (b, [("Elements-Webhook-Signature", "sha256=junk")]),
    "not base64": lambda b: (b, [("Elements-Webhook-Signature", "sha256=@@@@====")]),
    "short digest": lambda b: (
        b,
        [("Elements-Webhook-Signature", "sha256=" + base64.b64encode(b"x" * 16).decode())],
    ),
    "another body's signature": lambda b: (
        b,
        [("Elements-Webhook-Signature", sign(SIGNATURE_KEY, b.replace(b"10", b"11")))],
    ),
    "one byte truncated": lambda b: (
        b[:-1],
        [("Elements-Webhook-Signature", sign(SIGNATURE_KEY, b))],
    ),
    "one byte extended": lambda b: (
        b + b" ",
        [("Elements-Webhook-Signature", sign(SIGNATURE_KEY, b))],
    ),
    "one digest bit": lambda b: (
        b,
        [("Elements-Webhook-Signature", _flip_last_digest_byte(sign(SIGNATURE_KEY, b)))],
    ),
    "unknown algorithm": lambda b: (
        b,
        [("Elements-Webhook-Signature", "sha512=" + base64.b64encode(b"x" * 64).decode())],
    ),
    "header given twice": lambda b: (
        b,
        [
            ("Elements-Webhook-Signature", sign(SIGNATURE_KEY, b)),
            ("Elements-Webhook-Signature", sign(SIGNATURE_KEY, b)),
        ],
    ),
    "valid then junk": lambda b: (
        b,
        [
            ("Elements-Webhook-Signature", sign(SIGNATURE_KEY, b)),
            ("Elements-Webhook-Signature", "sha256=junk"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forgery_is_401_and_changes_nothing(
    target: tuple[RunningService, dict[str, Any], bytes], name: str
) -> None:
    service, job, body = target
    before = observed(service, job["id"])
    sent_body, headers = FORGERIES[name](body)
    response = post(service, job["id"], sent_body, headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "bad_signature"
    assert observed(service, job["id"]) == before


def raw_post(service: RunningService, path: str, head: bytes, body: bytes) -> bytes:
    """Send bytes httpx would refuse to send (it strips no whitespace, it rejects it)."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + head
        + b"\r\n"
        + body
    )
    with socket.create_connection((service.server.host, service.server.port), 10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_surrounding_whitespace_in_the_header_is_tolerated(
    target: tuple[RunningService, dict[str, Any], bytes],
) -> None:
    service, job, body = target
    head = (
        b"Elements-Webhook-Id: w-ws\r\n"
        + b"Elements-Webhook-Signature: \t "
        + sign(SIGNATURE_KEY, body).encode()
        + b" \t\r\n"
    )
    answer = raw_post(service, f"/callbacks/jobs/{job['id']}", head, body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert service.http.get(f"/jobs/{job['id']}").json()["state"] == "COMPLETED"


def test_the_genuine_callback_still_works_after_the_forgeries(
    target: tuple[RunningService, dict[str, Any], bytes],
) -> None:
    service, job, body = target
    for name, forge in FORGERIES.items():
        sent_body, headers = forge(body)
        assert post(service, job["id"], sent_body, headers).status_code == 401, name
    genuine = post(
        service, job["id"], body, [("Elements-Webhook-Signature", sign(SIGNATURE_KEY, body))]
    )
    assert genuine.status_code == 200
    job_now, deliveries, _ = observed(service, job["id"])
    assert job_now["state"] == "COMPLETED"
    assert [d[0] for d in deliveries] == ["w-1"]
    metrics = service.http.get("/metrics").text
    counter = 'bulkhook_callbacks_total{instance="default",outcome="bad_signature"}'
    assert f"{counter} {len(FORGERIES)}.0" in metrics
