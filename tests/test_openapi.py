"""The API description: valid OpenAPI 3.1, complete, and served at /openapi.json."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from service import __version__
from service.app import create_app
from service.callbacks import signatures
from service.config import Settings
from service.jobs import State
from service.openapi.jobs import openapi_spec

from .helpers import SIGNATURE_KEY, RunningSandbox, RunningService

_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
_PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/callbacks"}
# Served but deliberately not described: the dashboard's HTML pages, its HTML fragment
# and its login form are for browsers, not API clients (the dashboard's JSON, CSV and
# event-stream routes are described). Its static files are the /ui/static mount.
_HTML_ONLY = {
    ("/", "GET"),
    ("/ui/login", "GET"),
    ("/ui/login", "POST"),
    ("/ui/logout", "POST"),
    ("/ui/jobs/{job_id}", "GET"),
    ("/ui/jobs/{job_id}/failed", "GET"),
    ("/docs", "GET"),
}


def _operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in spec["paths"].items()
        for method in item
        if method in _METHODS
    }


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = openapi_spec()
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"] == "bulkhook"
    assert spec["info"]["version"] == __version__


def test_every_route_the_app_serves_is_described(tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/x.db"))
    served: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Mount):
            assert route.path in {"/sandbox", "/ui/static", "/docs/static"}, route.path
            continue
        assert isinstance(route, Route)
        served |= {(route.path, method) for method in route.methods or () if method != "HEAD"}
    assert served
    assert served >= _HTML_ONLY, "a route excluded from the comparison is no longer served"
    assert _operations(openapi_spec()) == served - _HTML_ONLY


def test_security_covers_the_job_and_object_routes_only() -> None:
    spec = openapi_spec()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            public = path in _PUBLIC or path.startswith("/callbacks/")
            assert ("security" in operation) is not public, (method, path)
            assert ("401" in operation["responses"]) is (not public or "callbacks" in path)


def test_every_response_is_described_and_every_ref_resolves() -> None:
    spec = openapi_spec()
    schemas = spec["components"]["schemas"]
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert refs
    for ref in refs:
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for path, item in spec["paths"].items():
        for operation in item.values():
            for status, response in operation["responses"].items():
                assert response["description"], (path, status)
                if status == "416":  # a range past the end of a result: no body at all
                    assert "content" not in response, path
                elif status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }
                    assert "Error codes: `" in response["description"], (path, status)
    job_list = spec["paths"]["/jobs"]["get"]["parameters"]
    state = next(param for param in job_list if param["name"] == "state")
    assert state["schema"]["enum"] == [str(s) for s in State]


def test_the_document_is_built_fresh_on_every_call() -> None:
    first = openapi_spec()
    first["paths"].clear()
    first["components"]["schemas"]["Job"]["properties"].clear()
    second = openapi_spec()
    assert second["paths"]
    assert second["components"]["schemas"]["Job"]["properties"]
    assert second == openapi_spec()


def test_the_service_serves_the_document(start_service: Callable[..., RunningService]) -> None:
    service = start_service(None)
    response = service.http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == openapi_spec()


def _conforms(spec: dict[str, Any], name: str, body: Any) -> None:
    """``body`` is valid against ``components.schemas[name]`` (refs resolve in ``spec``)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(body)


def test_real_answers_match_the_schemas(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    spec = openapi_spec()
    service = start_service(start_sandbox())
    submitted = service.submit(contacts_csv)
    assert submitted.status_code == 202, submitted.text
    _conforms(spec, "Job", submitted.json())
    job_id = submitted.json()["id"]
    done = service.wait_for(job_id, {"COMPLETED"})
    _conforms(spec, "Job", done)
    assert done["succeeded"] is True
    listed = service.http.get("/jobs", params={"limit": 1}).json()
    _conforms(spec, "JobList", listed)
    assert listed["next_cursor"] == job_id
    _conforms(spec, "FailedRecords", service.http.get(f"/jobs/{job_id}/errors").json())
    _conforms(spec, "Objects", service.http.get("/objects").json())
    terminal = service.http.post(f"/jobs/{job_id}/cancel")
    assert terminal.status_code == 409
    _conforms(spec, "Error", terminal.json())
    unsigned = service.http.post(f"/callbacks/jobs/{job_id}", json={"status": "COMPLETED"})
    assert unsigned.status_code == 401
    _conforms(spec, "Error", unsigned.json())
    own = json.dumps({"id": done["upstream_id"], "status": "COMPLETED"}).encode()
    other = b'{"id": "no-such-upstream-job", "status": "COMPLETED"}'
    for path, body, status in (
        (f"/callbacks/jobs/{job_id}", own, 200),
        ("/callbacks", other, 202),
        (f"/callbacks/jobs/{job_id}", other, 409),
    ):
        headers = {
            "Elements-Webhook-Signature": signatures.sign(SIGNATURE_KEY, body),
            "Elements-Webhook-Id": f"openapi-{status}",
        }
        ack = service.http.post(path, content=body, headers=headers)
        assert ack.status_code == status, ack.text
        if status == 409:
            assert ack.json()["error"]["code"] == "wrong_job"
            _conforms(spec, "Error", ack.json())
            continue
        assert ack.json()["status"] == ("accepted" if status == 200 else "kept")
        _conforms(spec, "CallbackAck", ack.json())


def test_docs_render_the_description_from_local_assets(start_service) -> None:  # type: ignore[no-untyped-def]
    service = start_service(None)
    page = service.http.get("/docs")
    assert page.status_code == 200
    assert "/openapi.json" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing remote
    for asset in ("/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"):
        response = service.http.get(asset)
        assert response.status_code == 200
        assert len(response.content) > 10_000


def test_a_job_failed_upstream_matches_the_schema_with_its_message_cut_to_size(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    spec = openapi_spec()
    upstream = start_sandbox(fail_whole=1.0, fail_whole_message="X" * 9000)
    service = start_service(upstream)
    job_id = service.submit(contacts_csv).json()["id"]
    done = service.wait_for(job_id, {"ABORTED"})
    assert (
        len(done["upstream_error"])
        == spec["components"]["schemas"]["Job"]["properties"]["upstream_error"]["maxLength"]
    )
    _conforms(spec, "Job", done)
    _conforms(spec, "JobList", service.http.get("/jobs").json())


def test_a_job_with_kept_failed_records_matches_the_schemas(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    spec = openapi_spec()
    service = start_service(start_sandbox())
    file = tmp_path / "failing.csv"
    file.write_text("Name,Email\r\nA,\r\nB,b@x.io\r\n", encoding="utf-8")
    job_id = service.submit(file).json()["id"]
    service.wait_for(job_id, {"COMPLETED"})
    upstream = service.http.get(f"/jobs/{job_id}/errors").json()
    _conforms(spec, "FailedRecords", upstream)
    deadline = time.monotonic() + 30
    job = service.http.get(f"/jobs/{job_id}").json()
    while job["failed_records"]["status"] != "copied":
        assert time.monotonic() < deadline, job["failed_records"]
        time.sleep(0.05)
        job = service.http.get(f"/jobs/{job_id}").json()
    _conforms(spec, "Job", job)
    stored = service.http.get(f"/jobs/{job_id}/errors")
    assert stored.headers["content-type"] == "application/json"
    _conforms(spec, "FailedRecords", stored.json())
    assert stored.json()["source"] == "store" and stored.json()["errors"] == upstream["errors"]


def test_the_description_names_downloads_and_their_result_route() -> None:
    spec = openapi_spec()
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    download = body["application/json"]["schema"]
    assert download["required"] == ["object"] and download["additionalProperties"] is False
    assert download["properties"]["format"]["enum"] == ["csv", "json", "jsonl"]
    listing = spec["paths"]["/jobs"]["get"]["parameters"]
    direction = next(param for param in listing if param["name"] == "direction")
    assert direction["schema"]["enum"] == ["upload", "download"]
    job = spec["components"]["schemas"]["Job"]["properties"]
    assert {"direction", "query", "format", "result"} <= set(job)
    for path in ("/jobs/{job_id}/result", "/ui/jobs/{job_id}/result"):
        responses = spec["paths"][path]["get"]["responses"]
        assert {"200", "206", "304", "404", "416"} <= set(responses), path
        assert set(responses["200"]["content"]) == {
            "text/csv; charset=utf-8",
            "application/json",
            "application/x-ndjson",
        }
        assert "`result_not_stored`" in responses["404"]["description"]


def test_real_download_answers_match_the_schemas(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    spec = openapi_spec()
    service = start_service(start_sandbox(job_seconds=1.0))
    upload = service.submit(contacts_csv).json()
    service.wait_for(upload["id"], {"COMPLETED"})
    started = service.download("contact", format="json")
    assert started.status_code == 202, started.text
    _conforms(spec, "Job", started.json())
    job_id = started.json()["id"]
    early = service.http.get(f"/jobs/{job_id}/result")
    assert early.status_code == 404
    assert early.json()["error"]["code"] == "result_not_stored"
    _conforms(spec, "Error", early.json())
    stored = service.wait_for_result(job_id, {"stored"})
    _conforms(spec, "Job", stored)
    assert stored["result"]["url"] == f"/jobs/{job_id}/result"
    _conforms(spec, "JobList", service.http.get("/jobs", params={"direction": "download"}).json())
    _conforms(spec, "JobList", service.http.get("/jobs", params={"direction": "upload"}).json())
    result = service.http.get(f"/jobs/{job_id}/result")
    described = spec["paths"]["/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert result.headers["content-type"] in described
    refused = service.download("contact", query="select * from contact wher x")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "upstream_query_refused"
    _conforms(spec, "Error", refused.json())
    _conforms(spec, "Job", refused.json()["error"]["job"])
    for answer in (
        service.http.get(f"/jobs/{upload['id']}/result"),
        service.http.get("/jobs", params={"direction": "sideways"}),
        service.http.post("/jobs", json={"object": "contact", "colour": "blue"}),
    ):
        assert answer.status_code in (400, 404), answer.text
        _conforms(spec, "Error", answer.json())


def test_the_instance_filter_is_described_as_the_service_checks_it(
    start_service: Callable[..., RunningService],
) -> None:
    """A value the description allows is served; one it refuses is a 400."""
    service = start_service(None)
    spec = service.http.get("/openapi.json").json()
    for path in ("/jobs", "/objects"):
        params = spec["paths"][path]["get"]["parameters"]
        schema = next(p["schema"] for p in params if p["name"] == "instance")
        for value in ("default", "a" * 41, "Default", "-crm", "crm_2"):
            allowed = re.fullmatch(schema["pattern"].strip("^$"), value) is not None
            status = service.http.get(path, params={"instance": value}).status_code
            assert (status == 400) is not allowed, (path, value, status)
