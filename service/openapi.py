"""The API description served at ``/openapi.json`` (OpenAPI 3.1), built per call."""

from __future__ import annotations

from typing import Any

from . import __version__
from .jobs import State

__all__ = ["openapi_spec"]

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str, *codes: str) -> dict[str, Any]:
    listed = ", ".join(f"`{code}`" for code in codes)
    return _json(_ref("Error"), f"{description} (codes: {listed})")


def _job_id() -> dict[str, Any]:
    return {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _schemas() -> dict[str, Any]:
    event = {
        "type": "object",
        "required": ["at", "source", "state", "detail"],
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "source": {"type": "string"},
            "state": {"type": "string", "enum": [str(s) for s in State]},
            "detail": {"type": "string"},
        },
    }
    job_fields = {
        "id": {"type": "string"},
        "upstream_id": _nullable("string"),
        "hub": {"type": "string"},
        "object": {"type": "string"},
        "path": {"type": "string"},
        "state": {"type": "string", "enum": [str(s) for s in State]},
        "upstream_status": _nullable("string"),
        "records_count": _nullable("integer", minimum=0),
        "records_failed_count": _nullable("integer", minimum=0),
        "succeeded": _nullable("boolean"),
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "last_source": {
            "type": "string",
            "enum": ["submit", "callback", "poll", "cancel", "timeout"],
        },
    }
    summary = {"type": "object", "required": list(job_fields), "properties": job_fields}
    job = {
        "type": "object",
        "required": [*job_fields, "events"],
        "properties": {**job_fields, "events": {"type": "array", "items": _ref("Event")}},
    }
    return {
        "Event": event,
        "JobSummary": summary,
        "Job": job,
        "JobList": {
            "type": "object",
            "required": ["jobs", "next_cursor"],
            "properties": {
                "jobs": {"type": "array", "items": _ref("JobSummary")},
                "next_cursor": _nullable("string"),
            },
        },
        "FailedRecords": {
            "type": "object",
            "required": ["job", "count", "errors"],
            "properties": {
                "job": {"type": "string"},
                "count": {"type": "integer", "minimum": 0},
                "errors": {"type": "array", "items": {}},
            },
        },
        "Objects": {
            "type": "object",
            "required": ["hub", "objects"],
            "properties": {
                "hub": {"type": "string"},
                "objects": {"type": "array", "items": {"type": "string"}},
            },
        },
        "CallbackAck": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["accepted", "duplicate", "kept"]},
                "job": {"type": "string"},
                "state": {"type": "string"},
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}},
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
    }


def _secured(operation: dict[str, Any]) -> dict[str, Any]:
    operation["security"] = [{"bearer": []}]
    operation["responses"]["401"] = _error("a bearer token is required", "unauthorized")
    return operation


def _callback(summary: str, path_param: bool) -> dict[str, Any]:
    headers = [
        {
            "name": "Elements-Webhook-Signature",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "`sha256=` or `sha1=` and the base64 HMAC of the raw body",
        },
        {"name": "Elements-Webhook-Id", "in": "header", "schema": {"type": "string"}},
    ]
    return {
        "summary": summary,
        "parameters": ([_job_id()] if path_param else []) + headers,
        "requestBody": {"required": True, "content": {JSON: {"schema": {}}}},
        "responses": {
            "200": _json(_ref("CallbackAck"), "applied, or a repeated delivery"),
            "202": _json(_ref("CallbackAck"), "verified and kept for a job not known yet"),
            "400": _error("verified but not a JSON object; kept", "malformed_callback"),
            "401": _error("the signature does not hold", "bad_signature"),
            "404": _error("no such job", "not_found"),
            "413": _error("the body is over the limit", "too_large"),
        },
    }


def openapi_spec() -> dict[str, Any]:
    upstream_502 = _error(
        "the upstream failed",
        "upstream_refused",
        "upstream_unavailable",
        "upstream_outcome_unknown",
    )
    job_404 = _error("no such job", "job_not_found")
    upload = {
        "type": "object",
        "required": ["file", "object"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "object": {"type": "string"},
            "hub": {"type": "string"},
            "path": {"type": "string"},
            "metadata": {"type": "string", "description": "a JSON object, sent as metaData"},
        },
    }
    paths: dict[str, Any] = {
        "/jobs": {
            "post": _secured(
                {
                    "summary": "Submit a CSV as a bulk job",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"multipart/form-data": {"schema": upload}},
                    },
                    "responses": {
                        "200": _json(_ref("Job"), "the job a repeated Idempotency-Key made"),
                        "202": _json(_ref("Job"), "accepted by the upstream"),
                        "400": _error(
                            "a bad upload",
                            "missing_file",
                            "missing_object",
                            "bad_object",
                            "bad_hub",
                            "bad_metadata",
                            "bad_upload",
                            "bad_field",
                            "malformed_multipart",
                            "empty_file",
                            "binary_file",
                            "not_utf8",
                            "no_header",
                            "no_rows",
                            "bad_idempotency_key",
                        ),
                        "413": _error("the upload is over the limit", "upload_too_large"),
                        "415": _error("not multipart/form-data", "unsupported_media_type"),
                        "502": upstream_502,
                    },
                }
            ),
            "get": _secured(
                {
                    "summary": "List jobs, newest first",
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"type": "string", "enum": [str(s) for s in State]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(_ref("JobList"), "a page of jobs"),
                        "400": _error("a bad query", "bad_state", "bad_limit", "bad_cursor"),
                    },
                }
            ),
        },
        "/jobs/{job_id}": {
            "get": _secured(
                {
                    "summary": "One job with its timeline",
                    "parameters": [_job_id()],
                    "responses": {"200": _json(_ref("Job"), "the job"), "404": job_404},
                }
            )
        },
        "/jobs/{job_id}/errors": {
            "get": _secured(
                {
                    "summary": "The job's failed records, from every upstream page",
                    "parameters": [_job_id()],
                    "responses": {
                        "200": _json(_ref("FailedRecords"), "the failed records"),
                        "404": job_404,
                        "409": _error("not submitted yet", "not_submitted"),
                        "502": upstream_502,
                    },
                }
            )
        },
        "/objects": {
            "get": _secured(
                {
                    "summary": "The hub's objects, from the upstream",
                    "parameters": [{"name": "hub", "in": "query", "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json(_ref("Objects"), "object names"),
                        "400": _error("a bad hub name", "bad_hub"),
                        "404": _error("the upstream has no such hub", "hub_not_found"),
                        "502": upstream_502,
                    },
                }
            )
        },
        "/callbacks/jobs/{job_id}": {"post": _callback("The per-job callback URL", True)},
        "/callbacks": {"post": _callback("The instance-wide callback URL", False)},
        "/healthz": {
            "get": {"summary": "Liveness", "responses": {"200": _json(_ref("Status"), "alive")}}
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the store answers",
                "responses": {
                    "200": _json(_ref("Status"), "ready"),
                    "503": _error("the store is unreachable", "store_unavailable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
            }
        },
    }
    for action, summary in (("cancel", "Cancel upstream"), ("refresh", "Poll the status now")):
        paths[f"/jobs/{{job_id}}/{action}"] = {
            "post": _secured(
                {
                    "summary": summary,
                    "parameters": [_job_id()],
                    "responses": {
                        "200": _json(_ref("Job"), "the job afterwards"),
                        "404": job_404,
                        "409": _error("not possible now", "job_terminal", "not_submitted"),
                        "502": upstream_502,
                    },
                }
            )
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bulkhook",
            "version": __version__,
            "description": "Submit SAP Open Connectors bulk jobs, receive their verified "
            "callbacks, and follow every job to a terminal state.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
