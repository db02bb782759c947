"""Fuzzing the edges: arbitrary callbacks and uploads never get a 5xx, and nothing
unverified changes a job."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.callbacks.signatures import sign

from .helpers import SIGNATURE_KEY, RunningSandbox, RunningService

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ORDER = ["SUBMITTING", "CREATED", "STARTED", "RUNNING", "CANCELLATION_PENDING"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
callback_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.integers(), st.text(max_size=12), st.none()),
        "jobId": st.one_of(st.integers(), st.text(max_size=12)),
        "status": st.one_of(
            st.sampled_from(["RUNNING", "COMPLETE", "COMPLETED", "ERROR", "CANCELED", "x"]),
            json_values,
        ),
        "recordsCount": json_values,
        "recordsFailedCount": json_values,
        "callback-payload": json_values,
        "message": json_values,
    },
)


@pytest.fixture
def target(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> tuple[RunningSandbox, RunningService, dict[str, Any]]:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=600)
    service = start_service(upstream, callback_grace=600, max_upload_bytes=512 * 1024)
    job = service.submit(contacts_csv).json()
    return upstream, service, job


def snapshot(service: RunningService, job_id: str) -> dict[str, Any]:
    return service.http.get(f"/jobs/{job_id}").json()


@FUZZ
@given(body=st.binary(max_size=300), header=st.text(max_size=60))
def test_unsigned_or_forged_bytes_are_refused_and_change_nothing(
    target: Any, body: bytes, header: str
) -> None:
    _, service, job = target
    before = snapshot(service, job["id"])
    headers = {"Elements-Webhook-Id": "fuzz"}
    # What an HTTP client can send at all: printable ASCII, no whitespace around it.
    if header.isascii() and header.isprintable() and header == header.strip():
        headers["Elements-Webhook-Signature"] = header
    for url in (f"/callbacks/jobs/{job['id']}", "/callbacks"):
        response = service.http.post(url, content=body, headers=headers)
        assert response.status_code == 401
    assert snapshot(service, job["id"]) == before


@FUZZ
@given(payload=st.one_of(callback_like, json_values), raw=st.binary(max_size=100))
def test_signed_arbitrary_bodies_never_get_a_5xx_or_move_a_job_back(
    target: Any, payload: Any, raw: bytes
) -> None:
    _, service, job = target
    before = snapshot(service, job["id"])
    for body in (json.dumps(payload).encode(), raw):
        headers = {"Elements-Webhook-Signature": sign(SIGNATURE_KEY, body)}
        for url in (f"/callbacks/jobs/{job['id']}", "/callbacks"):
            response = service.http.post(url, content=body, headers=headers)
            assert response.status_code in (200, 202, 400, 409), response.text
    after = snapshot(service, job["id"])
    if before["state"] in ORDER and after["state"] in ORDER:
        assert ORDER.index(after["state"]) >= ORDER.index(before["state"])
    if before["state"] not in ORDER:
        assert after["state"] == before["state"]


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


cells = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30)
uploads = st.one_of(
    st.binary(max_size=2000),
    st.lists(st.lists(cells, min_size=1, max_size=6), min_size=0, max_size=6).map(_csv),
    st.builds(lambda b: b"\xef\xbb\xbf" + b, st.binary(max_size=200)),
    st.builds(lambda n: b"Email\r\n" + b"a@b.co\r\n" * n, st.integers(0, 50)),
    st.builds(
        lambda n: b'Email,Note\n"x@y.co","line\nbreak ' + b"z" * n + b'"\n', st.integers(0, 9000)
    ),
    st.builds(
        lambda n: (",".join(f"c{i}" for i in range(n)) + "\n" + "1," * n + "\n").encode(),
        st.integers(1, 3000),
    ),
    st.builds(lambda b: b"Email,Name\n" + b + b"\n", st.binary(min_size=1, max_size=50)),
)


@FUZZ
@given(content=uploads)
def test_any_upload_gets_202_or_a_clear_4xx(
    target: Any, content: bytes, tmp_path_factory: Any
) -> None:
    upstream, service, _ = target
    submitted = upstream.sandbox.calls["submit"]
    path = tmp_path_factory.mktemp("fuzz") / "upload.csv"
    path.write_bytes(content)
    response = service.submit(path)
    assert response.status_code in (202, 400, 413), response.text
    if response.status_code != 202:
        assert "error" in response.json()
        assert upstream.sandbox.calls["submit"] == submitted
