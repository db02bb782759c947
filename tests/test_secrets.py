"""Configured secrets never appear in logs, error bodies or start-up output."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.callbacks.signatures import sign

from .helpers import SIGNATURE_KEY, RunningSandbox, RunningService, free_port, wait_healthy

SECRETS = {
    "OC_USER_SECRET": "user-Secret-1f9a",
    "OC_ORG_SECRET": "org-Secret-77c2",
    "OC_ELEMENT_TOKEN": "element-Token-e01b",
    "BULKHOOK_API_TOKENS": "api-Token-aa01,api-Token-bb02",
}


def assert_clean(text: str) -> None:
    for value in [*SECRETS.values(), "api-Token-aa01", "api-Token-bb02", SIGNATURE_KEY]:
        for part in value.split(","):
            assert part not in text, f"secret {part[:6]}… leaked"


def test_no_secret_in_logs_or_error_bodies(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = start_sandbox(job_seconds=0.2)
    service = start_service(
        upstream,
        oc_user_secret=SECRETS["OC_USER_SECRET"],
        oc_org_secret=SECRETS["OC_ORG_SECRET"],
        oc_element_token=SECRETS["OC_ELEMENT_TOKEN"],
        api_tokens=("api-Token-aa01", "api-Token-bb02"),
    )
    bodies: list[str] = []
    auth = {"Authorization": "Bearer api-Token-bb02"}
    bodies.append(service.http.get("/jobs").text)  # no token
    bodies.append(service.http.get("/jobs", headers={"Authorization": "Bearer wrong"}).text)
    bodies.append(service.submit(contacts_csv).text)
    job = service.submit(contacts_csv, headers=auth).json()
    with httpx.Client(base_url=service.url, headers=auth) as http:
        deadline = time.monotonic() + 10
        while http.get(f"/jobs/{job['id']}").json()["state"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bodies.append(http.get(f"/jobs/{job['id']}").text)
        bodies.append(http.get("/objects?hub=nowhere").text)
        upstream.sandbox.inject_fault("submit", 400)
        bodies.append(service.submit(contacts_csv, headers=auth).text)
    body = json.dumps({"id": job["upstream_id"], "status": "RUNNING"}).encode()
    for signature in (sign("forged", body), "sha256=junk", sign(SIGNATURE_KEY, body)):
        bodies.append(
            service.http.post(
                "/callbacks",
                content=body,
                headers={"Elements-Webhook-Signature": signature, "Elements-Webhook-Id": signature},
            ).text
        )
    bodies.append(repr(service.settings))
    assert caplog.records, "nothing was logged: the check would prove nothing"
    assert_clean(caplog.text)
    assert_clean("\n".join(bodies))


def test_serve_prints_no_secret(tmp_path: Path, contacts_csv: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    env.update(SECRETS, OC_SIGNATURE_KEYS=SIGNATURE_KEY)
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        headers = {"Authorization": "Bearer api-Token-aa01"}
        httpx.get(f"{url}/jobs", headers=headers, timeout=10)
        httpx.get(f"{url}/jobs", timeout=10)
        httpx.post(f"{url}/callbacks", content=b"{}", timeout=10)
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "serving on" in output
    assert_clean(output)


def test_a_bad_secret_value_is_named_not_shown(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    env["OC_USER_SECRET"] = "has space user-Secret-1f9a"
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "OC_USER_SECRET" in result.stderr
    assert_clean(result.stdout + result.stderr)
