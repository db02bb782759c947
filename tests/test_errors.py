"""The one JSON error shape: {"error": {"code": "...", "message": "..."}}."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

import service
from service.cli.api_client import ServiceError, ServiceUnreachable
from service.config import ConfigError
from service.downloads.results import ResultNameError
from service.errors import ApiError, BulkhookError, error_body, error_response, unexpected
from service.jobs import new_job_id
from service.sandbox.ceql import QueryError
from service.server.serve import StartupError
from service.store import StoreError, store_error
from service.uploads.spool import SpoolError
from service.upstream.client import QueryRefused, UpstreamError, UpstreamUnavailable

from .helpers import RunningService, assert_error, signed


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
        error = unexpected(exc, store_error)
        assert (error.status, error.code) == (503, "store_unavailable"), exc
        assert error.headers is not None and int(error.headers["Retry-After"]) > 0
    bugs = [
        _sqlite_error(tmp_path, "SELECT nope FROM t"),
        psycopg.ProgrammingError("syntax error"),
        KeyError("x"),
    ]
    for exc in bugs:
        error = unexpected(exc, store_error)
        assert (error.status, error.code) == (500, "internal_error"), exc
        assert str(exc) not in error.message  # the details go to the log only


def test_every_kind_of_error_uses_the_shape(start_service) -> None:  # type: ignore[no-untyped-def]
    service: RunningService = start_service(None)
    assert_error(service.http.get("/nowhere"), 404, "not_found")
    assert_error(service.http.delete("/jobs"), 405, "method_not_allowed")
    assert_error(service.http.get("/jobs/unknown"), 404, "job_not_found")
    assert_error(service.http.get("/jobs?limit=0"), 400, "bad_limit")
    assert_error(service.http.get("/jobs?state=DONE"), 400, "bad_state")
    assert_error(
        service.http.post("/jobs", content=b"{}", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(service.http.post("/jobs", json={}), 400, "missing_object")
    assert_error(service.http.get("/jobs?direction=up"), 400, "bad_direction")
    assert_error(service.http.post("/callbacks", content=b"{}"), 401, "bad_signature")


# Each of the service's own errors, as raised, with the code and status it answers with:
# the codes are part of the API, so changing one here is changing the API.
OWN_ERRORS: dict[type[BulkhookError], tuple[BulkhookError, str, int]] = {
    ApiError: (ApiError("no"), "bad_request", 400),
    StoreError: (StoreError("database is locked"), "store_unavailable", 503),
    UpstreamError: (UpstreamError("status", "no such job", status=404), "upstream_refused", 502),
    UpstreamUnavailable: (
        UpstreamUnavailable("status", "cannot connect"),
        "upstream_unavailable",
        502,
    ),
    QueryRefused: (
        QueryRefused("query", "Error parsing query: expected 'from'", status=400),
        "upstream_query_refused",
        400,
    ),
    QueryError: (QueryError("expected 'from' at the end of the query"), "query_invalid", 400),
    SpoolError: (SpoolError("the file is 3 bytes, not 4"), "upload_unreadable", 400),
    ResultNameError: (ResultNameError("not a job id: '../x'"), "bad_result_name", 400),
    ConfigError: (ConfigError("BULKHOOK_POLL_RATE must be a number"), "bad_setting", 503),
    StartupError: (StartupError("address already in use"), "startup_failed", 503),
    ServiceError: (ServiceError(502, "service_error", "the service failed"), "service_error", 502),
    ServiceUnreachable: (ServiceUnreachable("cannot reach it"), "service_unreachable", 502),
}


def _every_error_class() -> set[type[BulkhookError]]:
    """Every subclass of BulkhookError in the package, each module imported first."""
    for module in pkgutil.walk_packages(service.__path__, "service."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: set[type[BulkhookError]] = set()
    pending = [BulkhookError]
    while pending:
        for subclass in pending.pop().__subclasses__():
            found.add(subclass)
            pending.append(subclass)
    return found


def test_every_own_error_has_a_distinct_stable_code_and_a_status_that_is_not_500() -> None:
    assert _every_error_class() == set(OWN_ERRORS), "a new error needs its code and status here"
    codes = {cls: cls.code for cls in OWN_ERRORS}
    assert len(set(codes.values())) == len(codes), codes
    assert BulkhookError.code not in codes.values()  # internal_error: a bug's
    for cls, (error, code, status) in OWN_ERRORS.items():
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", cls.code), cls
        assert (error.code, error.http_status) == (code, status), cls
        assert (cls.code, cls.http_status) == (code, status), cls
        answer = unexpected(error)
        assert (answer.status, answer.code) == (status, code), cls


def test_an_upstream_error_without_a_status_is_answered_as_unavailable() -> None:
    """An answer the service could not use says no more than none at all."""
    error = UpstreamError("submit", "the upstream accepted the upload but returned no job id")
    answer = unexpected(error)
    assert (answer.status, answer.code) == (502, "upstream_unavailable")
    assert answer.extra == {"upstream_status": None, "upstream_request_id": None}


@pytest.mark.parametrize("cls", list(OWN_ERRORS), ids=lambda cls: cls.__name__)
def test_no_route_answers_a_500_for_an_own_error(
    start_service: Callable[..., RunningService],
    monkeypatch: pytest.MonkeyPatch,
    cls: type[BulkhookError],
) -> None:
    """Raised under a job API route and under the callback endpoint (the store's reads
    raise it), each answers its own status and code in the one shape."""
    error, code, status = OWN_ERRORS[cls]
    service = start_service(None)
    store = service.components.store

    async def failing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(store, "get_job", failing)
    monkeypatch.setattr(store, "find_by_upstream_id", failing)
    body = json.dumps({"id": "4242", "status": "RUNNING"}).encode()
    answers = [
        service.http.get(f"/jobs/{new_job_id()}"),
        service.http.post("/callbacks", content=body, headers=signed(body, "w-1")),
    ]
    for response in answers:
        assert_error(response, status, code)
        if cls is StoreError:
            assert int(response.headers["Retry-After"]) > 0
            assert "locked" not in response.text  # the details go to the log only
