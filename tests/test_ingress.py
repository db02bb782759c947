"""The callback URLs are served ahead of Starlette's stack, and answer just like it."""

from __future__ import annotations

import json

import pytest

from service.callbacks.signatures import sign
from service.errors import error_response

from .helpers import RunningService, assert_error


def test_other_methods_and_paths_still_get_starlettes_answers(start_service) -> None:  # type: ignore[no-untyped-def]
    service: RunningService = start_service(None)
    assert_error(service.http.get("/callbacks/jobs/x"), 405, "method_not_allowed")
    assert_error(service.http.put("/callbacks"), 405, "method_not_allowed")
    assert_error(service.http.post("/callbacks/jobs/a/b", content=b"{}"), 404, "not_found")
    assert_error(service.http.post("/callbacks/jobs/", content=b"{}"), 404, "not_found")


def test_an_error_is_the_same_bytes_as_every_other_error(start_service) -> None:  # type: ignore[no-untyped-def]
    service: RunningService = start_service(None)
    response = service.http.post("/callbacks", content=b"{}")
    message = response.json()["error"]["message"]
    expected = error_response(401, "bad_signature", message)
    assert response.status_code == 401
    assert response.content == expected.body
    assert response.headers["content-type"] == expected.headers["content-type"]
    assert response.headers["content-length"] == str(len(expected.body))


@pytest.mark.parametrize("chunks", [1, 7])
def test_a_body_in_many_pieces_is_verified_whole(start_service, chunks: int) -> None:  # type: ignore[no-untyped-def]
    service: RunningService = start_service(None)
    key = service.components.keyring.keys[0]
    body = json.dumps({"id": "nobody-knows", "status": "RUNNING", "pad": "x" * 5000}).encode()
    size = -(-len(body) // chunks)
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    response = service.http.post(
        "/callbacks",
        content=iter(pieces),
        headers={"Elements-Webhook-Signature": sign(key, body), "Elements-Webhook-Id": "w1"},
    )
    # Verified, parsed, and kept for a job that may yet appear.
    assert (response.status_code, response.json()) == (202, {"status": "kept"})


def test_a_body_past_the_limit_is_refused_while_it_streams(start_service) -> None:  # type: ignore[no-untyped-def]
    service: RunningService = start_service(None, max_callback_bytes=1000)
    pieces = [b"x" * 600, b"y" * 600]  # no Content-Length: chunked
    response = service.http.post("/callbacks/jobs/x", content=iter(pieces))
    assert_error(response, 413, "too_large")
