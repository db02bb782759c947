"""The one JSON error shape: {"error": {"code": "...", "message": "..."}}."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import psycopg
import pytest

from service.errors import ApiError, error_body, error_response, unexpected
from service.store import StoreError

from .helpers import RunningService, assert_error


def test_error_body_shape() -> None:
    assert error_body("job_not_found", "no job 'x'") == {
        "error": {"code": "job_not_found", "message": "no job 'x'"}
    }
    assert error_body("upstream_refused", "no", upstream_status=400) == {
        "error": {"code": "upstream_refused", "message": "no", "upstream_status": 400}
    }


def test_error_response_carries_status_headers_and_body() -> None:
    response = error_response(401, "unauthorized", "token", headers={"WWW-Authenticate": "Bearer"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert json.loads(response.body) == {"error": {"code": "unauthorized", "message": "token"}}


def test_api_error_defaults_and_overrides() -> None:
    plain = ApiError("bad")
    assert (plain.status, plain.code, plain.message) == (400, "bad_request", "bad")
    custom = ApiError("gone", code="job_not_found", status=404, job="x")
    assert (custom.status, custom.code, custom.extra) == (404, "job_not_found", {"job": "x"})


def _sqlite_error(tmp_path: Path, sql: str, *, read_only: bool = False) -> sqlite3.Error:
    path = tmp_path / "x.db"
    sqlite3.connect(path).execute("CREATE TABLE IF NOT EXISTS t (x)").connection.commit()
    conn = sqlite3.connect(f"file:{path}?mode=ro" if read_only else path, uri=read_only)
    with pytest.raises(sqlite3.Error) as caught:
        conn.execute(sql)
    conn.close()
    return caught.value


def test_an_unavailable_store_is_a_503_to_retry_and_anything_else_a_500(
    tmp_path: Path,
) -> None:
    outages = [
        StoreError("cannot open the store"),
        _sqlite_error(tmp_path, "INSERT INTO t VALUES (1)", read_only=True),
        psycopg.OperationalError("connection refused"),
    ]
    for exc in outages:
        error = unexpected(exc)
        assert (error.status, error.code) == (503, "store_unavailable"), exc
        assert error.headers is not None and int(error.headers["Retry-After"]) > 0
    bugs = [
        _sqlite_error(tmp_path, "SELECT nope FROM t"),
        psycopg.ProgrammingError("syntax error"),
        KeyError("x"),
    ]
    for exc in bugs:
        error = unexpected(exc)
        assert (error.status, error.code) == (500, "internal_error"), exc
        assert str(exc) not in error.message  # the details go to the log only


def test_every_kind_of_error_uses_the_shape(start_service) -> None:  # type: ignore[no-untyped-def]
    service: RunningService = start_service(None)
    assert_error(service.http.get("/nowhere"), 404, "not_found")
    assert_error(service.http.delete("/jobs"), 405, "method_not_allowed")
    assert_error(service.http.get("/jobs/unknown"), 404, "job_not_found")
    assert_error(service.http.get("/jobs?limit=0"), 400, "bad_limit")
    assert_error(service.http.get("/jobs?state=DONE"), 400, "bad_state")
    assert_error(service.http.post("/jobs", json={}), 415, "unsupported_media_type")
    assert_error(service.http.post("/callbacks", content=b"{}"), 401, "bad_signature")
