"""The sandbox upstream: the bulk API of DESIGN §2, signed callbacks, every fault."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.signatures import Verdict, verify

from .conftest import SIGNATURE_KEY, Receiver, RunningSandbox, write_csv

StartSandbox = Callable[..., RunningSandbox]
AUTH = {"Authorization": "User u, Organization o, Element e"}


def client(sandbox: RunningSandbox) -> httpx.Client:
    return httpx.Client(base_url=sandbox.api_url, headers=AUTH, timeout=10)


def submit(
    sandbox: RunningSandbox,
    file: Path,
    *,
    callback: str | None = None,
    metadata: dict[str, Any] | None = None,
    obj: str = "contact",
) -> httpx.Response:
    headers = {"Elements-Async-Callback-Url": callback} if callback else {}
    data = {"metaData": json.dumps(metadata)} if metadata is not None else {}
    with client(sandbox) as http, file.open("rb") as handle:
        return http.post(
            f"/hubs/marketing/bulk/{obj}",
            params={"path": f"/{file.name}"},
            files={"file": (file.name, handle, "text/csv")},
            data=data,
            headers=headers,
        )


def status(sandbox: RunningSandbox, job_id: int | str) -> dict[str, Any]:
    with client(sandbox) as http:
        return http.get(f"/hubs/marketing/bulk/{job_id}/status").json()


def wait_status(sandbox: RunningSandbox, job_id: int, wanted: str, within: float = 10) -> float:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if status(sandbox, job_id)["status"] == wanted:
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never became {wanted}")


def test_root_answers_for_scripts_that_wait(sandbox: RunningSandbox) -> None:
    assert httpx.get(sandbox.url + "/").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer x"}, {"Authorization": "User"}, {"Authorization": "Root r"}],
)
def test_the_api_requires_authorization(sandbox: RunningSandbox, headers: dict) -> None:
    response = httpx.get(f"{sandbox.api_url}/hubs/marketing/objects", headers=headers)
    assert response.status_code == 401
    assert "Invalid Organization or User secret" in response.json()["message"]


def test_an_exact_authorization_can_be_required(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(authorization="User a, Organization b")
    url = f"{sandbox.api_url}/hubs/marketing/objects"
    assert httpx.get(url, headers=AUTH).status_code == 401
    assert httpx.get(url, headers={"Authorization": "User a, Organization b"}).status_code == 200


def test_objects_and_unknown_hubs(sandbox: RunningSandbox) -> None:
    with client(sandbox) as http:
        assert http.get("/hubs/marketing/objects").json() == [
            "activities",
            "contact",
            "campaign",
            "list",
            "account",
        ]
        assert http.get("/hubs/nowhere/objects").status_code == 404


def test_a_job_runs_asynchronously_and_calls_back_signed(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(job_seconds=0.6)
    response = submit(
        sandbox, contacts_csv, callback=receiver.url, metadata={"callback-payload": "j-42"}
    )
    assert response.status_code == 200
    created = response.json()
    assert isinstance(created["id"], int) and created["status"] == "CREATED"
    assert status(sandbox, created["id"])["status"] in {"CREATED", "RUNNING"}
    wait_status(sandbox, created["id"], "RUNNING")
    wait_status(sandbox, created["id"], "COMPLETED")
    final = status(sandbox, created["id"])
    assert (final["recordsCount"], final["recordsFailedCount"]) == (10, 0)
    [delivery] = receiver.wait_for(1)
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["elements-webhook-id"]
    result = verify(delivery.headers["elements-webhook-signature"], delivery.body, [SIGNATURE_KEY])
    assert result.ok and result.algorithm == "sha256"
    body = json.loads(delivery.body)
    assert (body["id"], body["status"], body["recordsCount"]) == (
        str(created["id"]),
        "COMPLETED",
        10,
    )
    assert body["callback-payload"] == "j-42"


def test_bad_emails_fail_and_are_listed_page_by_page(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    rows = [
        ["Name", "C_EmailAddress"],
        *[[f"n{i}", "" if i % 2 else "bad@" if i % 3 else f"ok{i}@x.io"] for i in range(9)],
    ]
    upload = write_csv(tmp_path / "rows.csv", rows)
    job_id = submit(sandbox, upload).json()["id"]
    wait_status(sandbox, job_id, "COMPLETED")
    assert status(sandbox, job_id)["recordsFailedCount"] == 7
    seen, token, pages = [], None, 0
    with client(sandbox) as http:
        while True:
            params = {"pageSize": 2, **({"nextPage": token} if token else {})}
            page = http.get(f"/hubs/marketing/bulk/{job_id}/errors", params=params)
            assert page.headers["elements-returned-count"] == str(len(page.json()))
            seen += page.json()
            pages += 1
            token = page.headers.get("elements-next-page-token")
            if token is None:
                break
        bad = http.get(f"/hubs/marketing/bulk/{job_id}/errors", params={"nextPage": "@@"})
    assert pages == 4
    assert sorted(e["record"]["Name"] for e in seen) == sorted(
        f"n{i}" for i in range(9) if i not in (0, 6)
    )
    assert {e["errorMessage"] for e in seen} == {
        "C_EmailAddress is empty",
        "C_EmailAddress is not a valid email address",
    }
    assert bad.status_code == 400


@pytest.mark.parametrize("content", [b"Email,Name\n\xff\xfe,x\n", b"", b"\n\n"])
def test_a_file_that_cannot_load_ends_in_error(
    sandbox: RunningSandbox, tmp_path: Path, content: bytes
) -> None:
    upload = tmp_path / "x.csv"
    upload.write_bytes(content)
    job_id = submit(sandbox, upload).json()["id"]
    wait_status(sandbox, job_id, "ERROR")
    assert status(sandbox, job_id)["errorMessage"]


def test_sha1_instances(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(signature_algo="sha1")
    submit(sandbox, contacts_csv, callback=receiver.url)
    [delivery] = receiver.wait_for(1)
    header = delivery.headers["elements-webhook-signature"]
    assert header.startswith("sha1=")
    assert verify(header, delivery.body, [SIGNATURE_KEY]).ok


def test_wrong_key(start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path) -> None:
    sandbox = start_sandbox(wrong_key=True)
    submit(sandbox, contacts_csv, callback=receiver.url)
    [delivery] = receiver.wait_for(1)
    result = verify(delivery.headers["elements-webhook-signature"], delivery.body, [SIGNATURE_KEY])
    assert result.verdict is Verdict.MISMATCH


def test_unsigned_without_a_key(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(signature_key=None)
    submit(sandbox, contacts_csv, callback=receiver.url)
    [delivery] = receiver.wait_for(1)
    assert "elements-webhook-signature" not in delivery.headers


def test_drop_callbacks(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(drop_callbacks=1.0)
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    wait_status(sandbox, job_id, "COMPLETED")
    time.sleep(0.3)
    assert receiver.deliveries == []
    assert sandbox.sandbox.stats()["callbacks"]["dropped"] == 1


def test_duplicate_callbacks(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(duplicate_callbacks=1.0)
    submit(sandbox, contacts_csv, callback=receiver.url)
    first, second = receiver.wait_for(2)
    assert first.body == second.body
    assert first.headers["elements-webhook-id"] == second.headers["elements-webhook-id"]


def test_callback_delay(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(callback_delay=0.8, job_seconds=0.1)
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    completed_at = wait_status(sandbox, job_id, "COMPLETED")
    [delivery] = receiver.wait_for(1)
    assert delivery.at - completed_at >= 0.7


def test_job_seconds(start_sandbox: StartSandbox, contacts_csv: Path) -> None:
    sandbox = start_sandbox(job_seconds=2.0)
    job_id = submit(sandbox, contacts_csv).json()["id"]
    time.sleep(1.2)
    assert status(sandbox, job_id)["status"] == "RUNNING"


def test_redelivery_until_a_2xx(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    receiver.answers = [500, 503]
    sandbox = start_sandbox(callback_retry_base=0.01)
    submit(sandbox, contacts_csv, callback=receiver.url)
    deliveries = receiver.wait_for(3)
    assert len(deliveries) == 3
    assert len({d.headers["elements-webhook-id"] for d in deliveries}) == 1
    deadline = time.monotonic() + 5
    while sandbox.sandbox.callbacks["delivered"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the sandbox counts once the 200 has come back
    assert sandbox.sandbox.callbacks["delivered"] == 1
    assert sandbox.sandbox.callbacks["failed"] == 2


def test_the_instance_wide_callback_url(
    start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path
) -> None:
    sandbox = start_sandbox(callback_url=receiver.url)
    submit(sandbox, contacts_csv)
    assert len(receiver.wait_for(1)) == 1


def test_legacy_status_names(start_sandbox: StartSandbox, contacts_csv: Path) -> None:
    sandbox = start_sandbox(legacy_status_names=True, job_seconds=0.1)
    job_id = submit(sandbox, contacts_csv).json()["id"]
    wait_status(sandbox, job_id, "COMPLETE")


def test_fail_rate_one_fails_every_call(start_sandbox: StartSandbox, contacts_csv: Path) -> None:
    sandbox = start_sandbox(fail_rate=1.0, retry_after=2)
    statuses = set()
    with client(sandbox) as http:
        for _ in range(20):
            response = http.get("/hubs/marketing/objects")
            statuses.add(response.status_code)
            if response.status_code == 429:
                assert response.headers["retry-after"] == "2"
    assert statuses == {429, 500}


def test_fail_rate_half_fails_some(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(fail_rate=0.5, seed=11)
    with client(sandbox) as http:
        codes = [http.get("/hubs/marketing/objects").status_code for _ in range(40)]
    assert 200 in codes and (set(codes) - {200}) <= {429, 500} and len(set(codes)) > 1


def test_a_submit_500_by_chance_still_creates_the_job(
    start_sandbox: StartSandbox, contacts_csv: Path
) -> None:
    sandbox = start_sandbox()
    sandbox.sandbox.inject_fault("submit", 500, after_processing=True)
    assert submit(sandbox, contacts_csv).status_code == 500
    assert len(sandbox.sandbox.jobs) == 1


def test_scripted_faults_over_http(sandbox: RunningSandbox, contacts_csv: Path) -> None:
    job_id = submit(sandbox, contacts_csv).json()["id"]
    spec = {"operation": "status", "status": 429, "retry_after": 2}
    assert httpx.post(f"{sandbox.url}/_sandbox/faults", json=spec).status_code == 200
    with client(sandbox) as http:
        refused = http.get(f"/hubs/marketing/bulk/{job_id}/status")
        answered = http.get(f"/hubs/marketing/bulk/{job_id}/status")
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "2")
    assert answered.status_code == 200
    bad = httpx.post(f"{sandbox.url}/_sandbox/faults", json={"operation": "nope", "status": 1})
    assert bad.status_code == 400
    stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
    assert stats["calls"]["status"] == 2 and stats["jobs"] == 1


def test_cancel(start_sandbox: StartSandbox, receiver: Receiver, contacts_csv: Path) -> None:
    sandbox = start_sandbox(job_seconds=2)
    job_id = submit(sandbox, contacts_csv, callback=receiver.url).json()["id"]
    with client(sandbox) as http:
        response = http.put(f"/hubs/marketing/bulk/{job_id}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "CANCELLATION_PENDING"
        wait_status(sandbox, job_id, "CANCELLED")
        again = http.put(f"/hubs/marketing/bulk/{job_id}/cancel")
    assert again.status_code == 400
    [delivery] = receiver.wait_for(1)
    assert json.loads(delivery.body)["status"] == "CANCELLED"


def test_jobs_are_listed_page_by_page(sandbox: RunningSandbox, contacts_csv: Path) -> None:
    ids = {submit(sandbox, contacts_csv).json()["id"] for _ in range(3)}
    listed, token = [], None
    with client(sandbox) as http:
        while True:
            params = {
                "where": "job_direction='UPLOAD'",
                "pageSize": 1,
                **({"nextPage": token} if token else {}),
            }
            page = http.get("/hubs/marketing/bulk/jobs", params=params)
            listed += page.json()
            token = page.headers.get("elements-next-page-token")
            if not token:
                break
    assert {int(job["id"]) for job in listed} == ids


def test_submit_needs_a_known_object_a_path_and_a_file(
    sandbox: RunningSandbox, contacts_csv: Path
) -> None:
    assert submit(sandbox, contacts_csv, obj="widgets").status_code == 404
    with client(sandbox) as http:
        assert (
            http.post("/hubs/marketing/bulk/contact?path=/x.csv", files={"x": b"y"}).status_code
            == 400
        )
        assert http.post("/hubs/marketing/bulk/contact", files={"file": b"y"}).status_code == 400
        assert http.post("/hubs/marketing/bulk/contact?path=/x", json={}).status_code == 415


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_sandbox_command(contacts_csv: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OC_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "sandbox",
            "--port",
            str(port),
            "--job-seconds",
            "0.1",
            "--signature-key",
            "sandbox-key-7f3a",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the sandbox did not start"
                time.sleep(0.1)
        api = url + "/elements/api-v2"
        with contacts_csv.open("rb") as handle:
            job = httpx.post(
                f"{api}/hubs/marketing/bulk/contact?path=/c.csv",
                files={"file": ("c.csv", handle)},
                headers=AUTH,
            ).json()
        deadline = time.monotonic() + 10
        while (
            httpx.get(f"{api}/hubs/marketing/bulk/{job['id']}/status", headers=AUTH).json()[
                "status"
            ]
            != "COMPLETED"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "signed with sha256" in output
    assert "sandbox-key-7f3a" not in output


def test_the_sandbox_command_refuses_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "sandbox", "--fail-rate", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--fail-rate" in result.stderr
