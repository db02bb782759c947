"""/openapi.json: a valid OpenAPI 3.1 document that describes every route served."""

from __future__ import annotations

from pathlib import Path

from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from service.app import create_app
from service.config import Settings
from service.openapi import openapi_spec

from .conftest import RunningService


def test_the_document_is_valid_openapi() -> None:
    validate(openapi_spec())


def test_every_route_served_is_described(tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/x.db"))
    served = set()
    for route in app.routes:
        if isinstance(route, Mount):
            assert route.path == "/sandbox"  # the embedded upstream, not our API
            continue
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((route.path, method.lower()))
    described = {
        (path, method) for path, item in openapi_spec()["paths"].items() for method in item
    }
    assert served == described


def test_secured_routes_are_exactly_the_job_and_object_routes() -> None:
    secured = {
        path
        for path, item in openapi_spec()["paths"].items()
        for operation in item.values()
        if operation.get("security")
    }
    assert secured == {
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/errors",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/refresh",
        "/objects",
    }


def test_it_is_served(start_service) -> None:  # type: ignore[no-untyped-def]
    service: RunningService = start_service(None)
    response = service.http.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == openapi_spec()
