"""The API description served at ``/openapi.json`` (OpenAPI 3.1), built fresh per call.

Everything here mirrors what ``api.py``, ``callbacks.py``, ``uploads.py`` and
``tracker.py`` actually answer: the JSON shapes of ``Job.to_json``/``Event.to_json``,
and every error ``code`` a route can raise, listed in its response's description.
The embedded sandbox (mounted at ``/sandbox``) is not part of this API; the
dashboard's JSON, CSV and event-stream routes are, from ``openapi_dashboard.py``.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .jobs import Source, State

__all__ = ["openapi_spec"]

JSON = "application/json"
Schema = dict[str, Any]

# The 400 codes of POST /jobs: the multipart body, the form fields, the CSV itself.
_MULTIPART_CODES = ("missing_file", "bad_upload", "bad_field", "malformed_multipart")
_FIELD_CODES = (
    "missing_object",
    "bad_object",
    "bad_hub",
    "bad_path",
    "bad_metadata",
    "bad_idempotency_key",
)
_CSV_CODES = ("empty_file", "binary_file", "not_utf8", "no_header", "no_rows")


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


def _object(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    needed = list(properties) if required is None else required
    return {"type": "object", "required": needed, "properties": properties}


def _enum(values: Any) -> Schema:
    return {"type": "string", "enum": [str(value) for value in values]}


def _json(schema: Schema, description: str, **headers: str) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


def _error(description: str, *codes: str, **headers: str) -> Schema:
    listed = ", ".join(f"`{code}`" for code in codes)
    return _json(_ref("Error"), f"{description}. Error codes: {listed}.", **headers)


def _param(name: str, where: str, schema: Schema, description: str = "", **extra: Any) -> Schema:
    param: Schema = {"name": name, "in": where, "schema": schema, **extra}
    if description:
        param["description"] = description
    return param


def _job_id() -> Schema:
    return _param("job_id", "path", {"type": "string"}, "the job's id", required=True)


def _op(
    op_id: str,
    summary: str,
    responses: dict[str, Schema],
    *,
    params: list[Schema] | None = None,
    body: Schema | None = None,
    secured: bool = False,
) -> Schema:
    """One operation; ``secured`` adds the bearer requirement and its 401."""
    operation: Schema = {"operationId": op_id, "summary": summary}
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = dict(responses)
    if secured:
        operation["security"] = [{"bearer": []}]
        operation["responses"]["401"] = _error(
            "A valid bearer token is required", "unauthorized", **{"WWW-Authenticate": "Bearer"}
        )
    return operation


def _schemas() -> dict[str, Schema]:
    date_time = {"type": "string", "format": "date-time"}
    count = _nullable("integer", minimum=0)
    job_fields: dict[str, Schema] = {
        "id": {"type": "string", "description": "the service's own id"},
        "upstream_id": _nullable("string", description="the upstream bulk job id, once known"),
        "hub": {"type": "string"},
        "object": {"type": "string"},
        "path": {"type": "string"},
        "state": _enum(State),
        "upstream_status": _nullable("string", description="the upstream status, raw"),
        "records_count": count,
        "records_failed_count": count,
        "succeeded": _nullable(
            "boolean",
            description="true only for COMPLETED with no failed records; false for any other "
            "terminal state or failed records; null while running or when unknown",
        ),
        "created_at": date_time,
        "updated_at": date_time,
        "last_source": _enum(Source),
    }
    timeline = {"type": "array", "items": _ref("Event")}
    error_detail = _object(
        {
            "code": {"type": "string", "description": "stable; see each response for its codes"},
            "message": {"type": "string"},
            "upstream_status": _nullable("integer", description="the upstream's HTTP status"),
            "upstream_request_id": _nullable("string"),
            "job": _ref("Job"),
        },
        required=["code", "message"],
    )
    return {
        "Event": _object(
            {
                "at": date_time,
                "source": _enum(Source),
                "state": _enum(State),
                "detail": {"type": "string"},
            }
        ),
        "JobSummary": _object(job_fields),
        "Job": _object({**job_fields, "events": timeline}),
        "JobList": _object(
            {
                "jobs": {"type": "array", "items": _ref("JobSummary")},
                "next_cursor": _nullable("string", description="null on the last page"),
            }
        ),
        "FailedRecords": _object(
            {
                "job": {"type": "string"},
                "count": {"type": "integer", "minimum": 0},
                "errors": {"type": "array", "items": {}, "description": "as the upstream sent"},
            }
        ),
        "Objects": _object(
            {"hub": {"type": "string"}, "objects": {"type": "array", "items": {"type": "string"}}}
        ),
        "CallbackAck": _object(
            {
                "status": {"type": "string", "enum": ["accepted", "duplicate", "kept"]},
                "job": {"type": "string", "description": "present with 200"},
                "state": {**_enum(State), "description": "present with 200"},
            },
            required=["status"],
        ),
        "Status": _object({"status": {"type": "string"}}),
        "Error": _object({"error": error_detail}),
    }


def _callback(op_id: str, summary: str, params: list[Schema]) -> Schema:
    headers = [
        _param(
            "Elements-Webhook-Signature",
            "header",
            {"type": "string"},
            "`sha256=` (or legacy `sha1=`) and the base64 HMAC of the raw body",
            required=True,
        ),
        _param(
            "Elements-Webhook-Id",
            "header",
            {"type": "string"},
            "delivery id for deduplication; the body's SHA-256 when absent",
        ),
    ]
    return _op(
        op_id,
        summary,
        {
            "200": _json(_ref("CallbackAck"), "Applied (`accepted`) or a repeat (`duplicate`)"),
            "202": _json(_ref("CallbackAck"), "Verified, job not known yet: `kept` (or repeat)"),
            "400": _error("Verified but not a JSON object; kept", "malformed_callback"),
            "401": _error("The signature is missing or does not hold", "bad_signature"),
            "404": _error(
                "The per-job URL names no job: nothing stored (never a genuine callback)",
                "job_not_found",
            ),
            "409": _error(
                "Verified, but the body is about another job: nothing changed (at the"
                " per-job URL the refusal is in the job's timeline)",
                "wrong_job",
            ),
            "413": _error("The body is over BULKHOOK_MAX_CALLBACK_BYTES", "too_large"),
            "503": _error(
                "The store is unavailable just now: nothing was recorded; redeliver later",
                "store_unavailable",
                **{"Retry-After": "seconds to wait"},
            ),
        },
        params=[*params, *headers],
        body={"required": True, "content": {JSON: {"schema": {}}}},
    )


def _paths() -> dict[str, Schema]:
    job_404 = _error("No such job", "job_not_found")
    location = {"Location": "`/jobs/{id}`"}
    upload = _object(
        {
            "file": {
                "type": "string",
                "format": "binary",
                "contentMediaType": "text/csv",
                "description": "send it after the other fields: a large file then goes on "
                "to the upstream while it arrives",
            },
            "object": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^/]+$"},
            "hub": {"type": "string", "maxLength": 200, "description": "default OC_HUB"},
            "path": {"type": "string", "description": "default `/<filename>`"},
            "metadata": {
                "type": "string",
                "contentMediaType": JSON,
                "contentSchema": {"type": "object"},
                "description": "a JSON object, passed upstream as `metaData`",
            },
        },
        required=["file", "object"],
    )
    list_params = [
        _param("state", "query", _enum(State)),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
        _param(
            "cursor", "query", {"type": "string", "maxLength": 64}, "`next_cursor` of the last page"
        ),
    ]
    job_action_409 = {
        "cancel": _error("Not possible now", "job_terminal", "not_submitted"),
        "refresh": _error("Not submitted upstream yet", "not_submitted"),
    }
    job_action_502 = {
        "cancel": _error("The upstream failed", "upstream_refused", "upstream_unavailable"),
        "refresh": _error("The status poll failed", "upstream_refused", "upstream_unavailable"),
    }
    paths: dict[str, Schema] = {
        "/jobs": {
            "post": _op(
                "submitJob",
                "Validate a CSV and submit it upstream as a bulk job",
                {
                    "200": _json(
                        _ref("Job"),
                        "The job an earlier request with this Idempotency-Key made",
                        **location,
                        **{"Idempotent-Replayed": "`true`"},
                    ),
                    "202": _json(_ref("Job"), "Accepted by the upstream", **location),
                    "400": _error("A bad upload", *_MULTIPART_CODES, *_FIELD_CODES, *_CSV_CODES),
                    "413": _error("Over BULKHOOK_MAX_UPLOAD_BYTES", "upload_too_large"),
                    "408": _error(
                        "The upload's body came too slowly (BULKHOOK_BODY_TIMEOUT, "
                        "BULKHOOK_UPLOAD_MIN_RATE); nothing was kept",
                        "upload_too_slow",
                    ),
                    "415": _error("Not multipart/form-data", "unsupported_media_type"),
                    "507": _error(
                        "No room to spool the upload; nothing was kept", "insufficient_storage"
                    ),
                    "502": _error(
                        "The upstream refused or did not answer; `job` holds the job "
                        "(SUBMIT_FAILED, or still SUBMITTING when the outcome is unknown)",
                        "upstream_refused",
                        "upstream_unavailable",
                        "upstream_outcome_unknown",
                    ),
                },
                params=[
                    _param(
                        "Idempotency-Key",
                        "header",
                        {"type": "string", "minLength": 1, "maxLength": 200},
                        "the same key returns the same job, with no second upload",
                    )
                ],
                body={"required": True, "content": {"multipart/form-data": {"schema": upload}}},
                secured=True,
            ),
            "get": _op(
                "listJobs",
                "List jobs, newest first (without timelines)",
                {
                    "200": _json(_ref("JobList"), "A page of jobs"),
                    "400": _error("A bad query", "bad_state", "bad_limit", "bad_cursor"),
                },
                params=list_params,
                secured=True,
            ),
        },
        "/jobs/{job_id}": {
            "get": _op(
                "getJob",
                "One job with its timeline",
                {"200": _json(_ref("Job"), "The job"), "404": job_404},
                params=[_job_id()],
                secured=True,
            )
        },
        "/jobs/{job_id}/errors": {
            "get": _op(
                "getJobErrors",
                "The job's failed records, from every page of the upstream errors endpoint",
                {
                    "200": _json(_ref("FailedRecords"), "The failed records"),
                    "404": job_404,
                    "409": _error("Not submitted upstream yet", "not_submitted"),
                    "502": _error(
                        "The upstream failed", "upstream_refused", "upstream_unavailable"
                    ),
                },
                params=[_job_id()],
                secured=True,
            )
        },
    }
    for action, summary in (("cancel", "Cancel upstream"), ("refresh", "Poll the status now")):
        paths[f"/jobs/{{job_id}}/{action}"] = {
            "post": _op(
                f"{action}Job",
                summary,
                {
                    "200": _json(_ref("Job"), "The job afterwards"),
                    "404": job_404,
                    "409": job_action_409[action],
                    "502": job_action_502[action],
                },
                params=[_job_id()],
                secured=True,
            )
        }
    paths["/objects"] = {
        "get": _op(
            "listObjects",
            "The hub's objects, proxied from the upstream",
            {
                "200": _json(_ref("Objects"), "Object names"),
                "400": _error("A bad hub name", "bad_hub"),
                "404": _error("The upstream knows no such hub", "hub_not_found"),
                "502": _error("The upstream failed", "upstream_refused", "upstream_unavailable"),
            },
            params=[_param("hub", "query", {"type": "string", "maxLength": 200}, "default OC_HUB")],
            secured=True,
        )
    }
    paths["/callbacks/jobs/{job_id}"] = {
        "post": _callback("jobCallback", "The per-job callback URL given upstream", [_job_id()])
    }
    paths["/callbacks"] = {
        "post": _callback("instanceCallback", "The instance-wide callback URL", [])
    }
    paths["/healthz"] = {"get": _op("healthz", "Liveness", {"200": _json(_ref("Status"), "ok")})}
    paths["/readyz"] = {
        "get": _op(
            "readyz",
            "Readiness: the store answers",
            {
                "200": _json(_ref("Status"), "ready"),
                "503": _error("The store is unreachable", "store_unavailable"),
            },
        )
    }
    paths["/metrics"] = {
        "get": _op(
            "metrics",
            "Prometheus metrics",
            {
                "200": {
                    "description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        )
    }
    paths["/openapi.json"] = {
        "get": _op("openapi", "This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")})
    }
    return paths


def _guarded(paths: dict[str, Any]) -> dict[str, Any]:
    """The answers ``guard.RequestGuard`` and ``guard.Tokens`` give on every route they
    cover: all but the callbacks and the probes, which answer under any Host."""
    for path, item in paths.items():
        if path.startswith("/callbacks") or path in ("/healthz", "/readyz"):
            continue
        for method, operation in item.items():
            responses = operation["responses"]
            responses.setdefault(
                "421",
                _error(
                    "The Host header names a host this service does not serve", "host_not_allowed"
                ),
            )
            if method in ("post", "put", "patch", "delete"):
                responses.setdefault(
                    "403", _error("A browser marked the request cross-site", "cross_origin")
                )
            if "security" in operation:
                responses.setdefault(
                    "429",
                    _error(
                        "Too many wrong tokens from this client lately; not checked",
                        "too_many_attempts",
                        **{"Retry-After": "seconds until tokens are checked again"},
                    ),
                )
    return paths


def openapi_spec() -> dict[str, Any]:
    """The whole document; a new dict on every call, safe to mutate."""
    from .openapi_dashboard import COOKIE_SCHEME, dashboard_paths, dashboard_schemas

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bulkhook",
            "version": __version__,
            "description": "Submit SAP Open Connectors bulk jobs, receive their verified "
            "callbacks, and follow every job to a terminal state. Every error is "
            '`{"error": {"code", "message", ...}}`; `code` is stable. The job and object '
            "routes need a bearer token when BULKHOOK_API_TOKENS is set (the dashboard's "
            "routes also take its login cookie). Every route but the callbacks and the "
            "probes answers only for the hosts the service serves (421 `host_not_allowed`) "
            "and refuses browsers' cross-site changes (403 `cross_origin`).",
        },
        "paths": _guarded({**_paths(), **dashboard_paths()}),
        "components": {
            "schemas": {**_schemas(), **dashboard_schemas()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "dashboardCookie": dict(COOKIE_SCHEME),
            },
        },
    }
