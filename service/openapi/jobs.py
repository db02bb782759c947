"""The API description served at ``/openapi.json`` (OpenAPI 3.1), built fresh per call.

Everything here mirrors what ``service.api``, ``service.callbacks``, ``service.uploads`` and
``service.tracker`` actually answer: the JSON shapes of ``Job.to_json``/``TimelineEntry.to_json``,
and every error ``code`` a route can raise, listed in its response's description.
The embedded sandbox (mounted at ``/sandbox``) is not part of this API; the
dashboard's JSON, CSV and event-stream routes are, from ``dashboard``.
"""

from __future__ import annotations

from typing import Any

from service import __version__
from service.callbacks.endpoint import (
    CALLBACK_PATHS,
    DEFAULT_CALLBACK_PATH,
    INSTANCE_CALLBACK_PATH,
    JOB_CALLBACK_PATH,
)
from service.downloads.records import FORMATS
from service.downloads.rules import STATUSES as RESULT_STATUSES
from service.failed_records.rules import STATUSES
from service.jobs import Source, State
from service.openapi.dashboard import COOKIE_SCHEME, dashboard_paths, dashboard_schemas
from service.openapi.instances import (
    instance_field,
    instance_filter,
    instance_paths,
    instance_request_field,
    instance_schemas,
)
from service.openapi.parts import (
    JSON,
    Schema,
    enum_of,
    error,
    job_id_param,
    json_response,
    nullable,
    obj,
    operation,
    param,
    ref,
)
from service.openapi.results import result_operation
from service.values import MAX_MESSAGE

__all__ = ["openapi_spec"]

# The 400 codes of POST /jobs: the multipart body, the form fields, the CSV itself.
_MULTIPART_CODES = ("missing_file", "bad_upload", "bad_field", "malformed_multipart")
_FIELD_CODES = (
    "missing_object",
    "bad_object",
    "bad_hub",
    "bad_path",
    "bad_metadata",
    "bad_idempotency_key",
    "unknown_instance",
)
_CSV_CODES = ("empty_file", "binary_file", "not_utf8", "no_header", "no_rows")
# The 400 codes of a download request (a JSON body).
_DOWNLOAD_CODES = (
    "bad_json",
    "unknown_field",
    "missing_object",
    "bad_object",
    "bad_hub",
    "bad_query",
    "bad_format",
    "bad_idempotency_key",
    "bad_instance",
    "unknown_instance",
    "upstream_query_refused",
)
MAX_QUERY = 4000


def _schemas() -> dict[str, Schema]:
    date_time = {"type": "string", "format": "date-time"}
    count = nullable("integer", minimum=0)
    job_fields: dict[str, Schema] = {
        "id": {"type": "string", "description": "the service's own id"},
        "upstream_id": nullable("string", description="the upstream bulk job id, once known"),
        "direction": {
            "type": "string",
            "enum": ["upload", "download"],
            "description": "upload: a CSV loaded upstream; download: a bulk query whose "
            "result the service fetches and keeps",
        },
        "instance": instance_field(),
        "hub": {"type": "string"},
        "object": {"type": "string"},
        "path": nullable(
            "string",
            description="the upstream's `path`, as given; null when none was given (and "
            "for downloads)",
        ),
        "query": nullable("string", description="a download's CEQL query; null for uploads"),
        "format": {
            "type": ["string", "null"],
            "enum": [*FORMATS, None],
            "description": "a download's result format; null for uploads",
        },
        "state": enum_of(State),
        "upstream_status": nullable("string", description="the upstream status, raw"),
        "records_count": count,
        "records_failed_count": count,
        "upstream_error": nullable(
            "string",
            maxLength=MAX_MESSAGE,
            description="the upstream's message about the job, e.g. why it failed as a whole "
            f"(ABORTED or ERROR); null when it gave none. At most {MAX_MESSAGE:,} characters: "
            "a longer one is cut, and says so at its end",
        ),
        "succeeded": nullable(
            "boolean",
            description="true only for COMPLETED with no failed records; false for any other "
            "terminal state or failed records; null while running or when unknown",
        ),
        "created_at": date_time,
        "updated_at": date_time,
        "last_source": enum_of(Source),
    }
    timeline = {"type": "array", "items": ref("TimelineEntry")}
    error_detail = obj(
        {
            "code": {"type": "string", "description": "stable; see each response for its codes"},
            "message": {"type": "string"},
            "upstream_status": nullable("integer", description="the upstream's HTTP status"),
            "upstream_request_id": nullable("string"),
            "job": ref("Job"),
            "result": {
                **ref("DownloadResult"),
                "description": "with `result_not_stored`: where the result stands",
            },
        },
        required=["code", "message"],
    )
    return {
        "TimelineEntry": obj(
            {
                "at": date_time,
                "source": enum_of(Source),
                "state": enum_of(State),
                "detail": {"type": "string"},
            }
        ),
        "JobSummary": obj(job_fields),
        "Job": obj(
            {
                **job_fields,
                "events": timeline,
                "failed_records": {
                    "oneOf": [ref("FailedRecordsCopy"), {"type": "null"}],
                    "description": "the copy of the job's failed records kept by the "
                    "service; null when none is made (no failed records, or not ended)",
                },
                "result": {
                    "oneOf": [ref("DownloadResult"), {"type": "null"}],
                    "description": "a download's result as the service fetches and keeps "
                    "it; null for uploads",
                },
            },
            required=[*job_fields, "events"],
        ),
        "DownloadResult": obj(
            {
                "status": {
                    "type": "string",
                    "enum": list(RESULT_STATUSES),
                    "description": "pending: not fetched yet (the job has not completed, or "
                    "the fetch is due); fetching: an attempt is under way, or failed and "
                    "will be retried (detail says why); stored: the whole file is kept "
                    "(`url` serves it); failed: given up (detail says why)",
                },
                "format": enum_of(FORMATS),
                "bytes": count,
                "records": count,
                "sha256": nullable(
                    "string",
                    pattern="^[0-9a-f]{64}$",
                    description="the stored file's SHA-256, also its ETag",
                ),
                "detail": nullable(
                    "string",
                    description="why the last attempt failed or the fetch was given up; for "
                    "a stored result, a count that differs from the upstream's or a file "
                    "that is not well-formed",
                ),
                "attempts": {"type": "integer", "minimum": 0},
                "url": nullable("string", description="`/jobs/{id}/result` once stored"),
            }
        ),
        "FailedRecordsCopy": obj(
            {
                "status": {
                    "type": "string",
                    "enum": list(STATUSES),
                    "description": "pending: not started; copying: under way (or a retry "
                    "is due); copied: ended; failed: given up (detail says why)",
                },
                "kept": {"type": "integer", "minimum": 0, "description": "records stored"},
                "complete": {
                    "type": "boolean",
                    "description": "true when every failed record the upstream had is kept; "
                    "false while copying, past BULKHOOK_MAX_FAILED_RECORDS, or given up",
                },
                "detail": {
                    "type": "string",
                    "description": "what was left out and why, or the last failed try",
                },
            }
        ),
        "JobList": obj(
            {
                "jobs": {"type": "array", "items": ref("JobSummary")},
                "next_cursor": nullable("string", description="null on the last page"),
            }
        ),
        "FailedRecords": obj(
            {
                "job": {"type": "string"},
                "count": {"type": "integer", "minimum": 0},
                "source": {
                    "type": "string",
                    "enum": ["store", "upstream"],
                    "description": "store: the service's copy; upstream: read from the "
                    "upstream now, every page (before the copy has ended)",
                },
                "complete": {
                    "type": "boolean",
                    "description": "false when the store keeps only part of them",
                },
                "failed_records": {"oneOf": [ref("FailedRecordsCopy"), {"type": "null"}]},
                "errors": {
                    "type": "array",
                    "items": {},
                    "description": "as the upstream sent them; a record larger than 256 KiB "
                    "is kept as lineNumber, errorMessage and recordOmitted",
                },
            }
        ),
        "Objects": obj(
            {"hub": {"type": "string"}, "objects": {"type": "array", "items": {"type": "string"}}}
        ),
        "CallbackAck": obj(
            {
                "status": {"type": "string", "enum": ["accepted", "duplicate", "kept"]},
                "job": {"type": "string", "description": "present with 200"},
                "state": {**enum_of(State), "description": "present with 200"},
            },
            required=["status"],
        ),
        "Status": obj({"status": {"type": "string"}}),
        "Error": obj({"error": error_detail}),
    }


def _callback(
    op_id: str,
    summary: str,
    params: list[Schema],
    unauthorized: Schema,
    not_found: Schema | None,
) -> Schema:
    """A callback URL's operation; ``unauthorized`` and ``not_found`` differ by URL."""
    headers = [
        param(
            "Elements-Webhook-Signature",
            "header",
            {"type": "string"},
            "`sha256=` (or legacy `sha1=`) and the base64 HMAC of the raw body",
            required=True,
        ),
        param(
            "Elements-Webhook-Id",
            "header",
            {"type": "string"},
            "delivery id for deduplication; the body's SHA-256 when absent",
        ),
    ]
    return operation(
        op_id,
        summary,
        {
            "200": json_response(
                ref("CallbackAck"), "Applied (`accepted`) or a repeat (`duplicate`)"
            ),
            "202": json_response(
                ref("CallbackAck"), "Verified, job not known yet: `kept` (or repeat)"
            ),
            "400": error("Verified but not a JSON object; kept", "malformed_callback"),
            "401": unauthorized,
            **({"404": not_found} if not_found is not None else {}),
            "409": error(
                "Verified, but the body is about another job (at an instance-wide URL, also"
                " one of another instance): nothing changed (at the per-job URL the refusal"
                " is in the job's timeline)",
                "wrong_job",
            ),
            "413": error("The body is over BULKHOOK_MAX_CALLBACK_BYTES", "too_large"),
            "503": error(
                "The store is unavailable just now: nothing was recorded; redeliver later",
                "store_unavailable",
                **{"Retry-After": "seconds to wait"},
            ),
        },
        params=[*params, *headers],
        body={"required": True, "content": {JSON: {"schema": {}}}},
    )


def _paths() -> dict[str, Schema]:
    job_404 = error("No such job", "job_not_found")
    location = {"Location": "`/jobs/{id}`"}
    object_name = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^/]+$"}
    upload = obj(
        {
            "file": {
                "type": "string",
                "format": "binary",
                "contentMediaType": "text/csv",
                "description": "send it after the other fields: a large file then goes on "
                "to the upstream while it arrives",
            },
            "object": object_name,
            "instance": instance_request_field(),
            "hub": {"type": "string", "maxLength": 200, "description": "default: the instance's"},
            "path": {
                "type": "string",
                "maxLength": 1000,
                "description": "the upstream's optional `path` (a nested sub-resource); sent "
                "upstream only when given, with a leading `/` added if missing",
            },
            "metadata": {
                "type": "string",
                "contentMediaType": JSON,
                "contentSchema": {"type": "object"},
                "description": "a JSON object, passed upstream as `metaData`",
            },
        },
        required=["file", "object"],
    )
    download = {
        **obj(
            {
                "object": object_name,
                "query": {
                    "type": "string",
                    "maxLength": MAX_QUERY,
                    "description": "the CEQL query the upstream runs, which must read "
                    "`object` (`from <object>`: the result is fetched as that object); "
                    "default `select * from <object>`",
                },
                "instance": instance_request_field(),
                "hub": {
                    "type": "string",
                    "maxLength": 200,
                    "description": "default: the instance's",
                },
                "format": {**enum_of(FORMATS), "default": "csv", "description": "the result's"},
            },
            required=["object"],
        ),
        "additionalProperties": False,
    }
    list_params = [
        param("state", "query", enum_of(State)),
        param(
            "direction",
            "query",
            {"type": "string", "enum": ["upload", "download"]},
            "only uploads, or only downloads",
        ),
        instance_filter(
            "only the jobs of this instance (a name no longer configured matches the jobs "
            "that have it)"
        ),
        param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
        param(
            "cursor", "query", {"type": "string", "maxLength": 64}, "`next_cursor` of the last page"
        ),
    ]
    job_action_409 = {
        "cancel": error("Not possible now", "job_terminal", "not_submitted", "unknown_instance"),
        "refresh": error(
            "Not submitted upstream yet, or its instance is no longer configured",
            "not_submitted",
            "unknown_instance",
        ),
    }
    job_action_502 = {
        "cancel": error("The upstream failed", "upstream_refused", "upstream_unavailable"),
        "refresh": error("The status poll failed", "upstream_refused", "upstream_unavailable"),
    }
    paths: dict[str, Schema] = {
        "/jobs": {
            "post": operation(
                "submitJob",
                "Start a bulk job: a CSV upload (multipart/form-data) or a download, a bulk "
                "query whose result the service fetches (a JSON body)",
                {
                    "200": json_response(
                        ref("Job"),
                        "The job an earlier request with this Idempotency-Key made",
                        **location,
                        **{"Idempotent-Replayed": "`true`"},
                    ),
                    "202": json_response(ref("Job"), "Accepted by the upstream", **location),
                    "400": error(
                        "A bad upload or download request; a query the upstream cannot run is "
                        "`upstream_query_refused` (its message quoted, `job` the job, "
                        "SUBMIT_FAILED)",
                        *dict.fromkeys(
                            (*_MULTIPART_CODES, *_FIELD_CODES, *_CSV_CODES, *_DOWNLOAD_CODES)
                        ),
                    ),
                    "409": error(
                        "The Idempotency-Key belongs to a job of the other direction (an "
                        "upload's key on a download, or the reverse); nothing was started",
                        "idempotency_key_reused",
                    ),
                    "413": error(
                        "Over BULKHOOK_MAX_UPLOAD_BYTES (an upload) or 64 KiB (a download request)",
                        "upload_too_large",
                    ),
                    "408": error(
                        "The upload's body came too slowly (BULKHOOK_BODY_TIMEOUT, "
                        "BULKHOOK_UPLOAD_MIN_RATE); nothing was kept",
                        "upload_too_slow",
                    ),
                    "415": error(
                        "Neither multipart/form-data nor application/json",
                        "unsupported_media_type",
                    ),
                    "507": error(
                        "No room to spool the upload; nothing was kept", "insufficient_storage"
                    ),
                    "502": error(
                        "The upstream refused or did not answer; `job` holds the job "
                        "(SUBMIT_FAILED, or still SUBMITTING when the outcome is unknown)",
                        "upstream_refused",
                        "upstream_unavailable",
                        "upstream_outcome_unknown",
                    ),
                },
                params=[
                    param(
                        "Idempotency-Key",
                        "header",
                        {"type": "string", "minLength": 1, "maxLength": 200},
                        "the same key returns the same job, with no second upload",
                    )
                ],
                body={
                    "required": True,
                    "description": "multipart/form-data uploads a CSV; application/json asks "
                    "for a download",
                    "content": {
                        "multipart/form-data": {"schema": upload},
                        JSON: {"schema": download},
                    },
                },
                secured=True,
            ),
            "get": operation(
                "listJobs",
                "List jobs, newest first (without timelines)",
                {
                    "200": json_response(ref("JobList"), "A page of jobs"),
                    "400": error(
                        "A bad query",
                        "bad_state",
                        "bad_direction",
                        "bad_instance",
                        "bad_limit",
                        "bad_cursor",
                    ),
                },
                params=list_params,
                secured=True,
            ),
        },
        "/jobs/{job_id}": {
            "get": operation(
                "getJob",
                "One job with its timeline",
                {"200": json_response(ref("Job"), "The job"), "404": job_404},
                params=[job_id_param()],
                secured=True,
            )
        },
        "/jobs/{job_id}/result": {
            "get": result_operation("getJobResult", "A download's result file, as stored")
        },
        "/jobs/{job_id}/errors": {
            "get": operation(
                "getJobErrors",
                "The job's failed records: from the store once the service's copy has "
                "ended, else from every page of the upstream errors endpoint",
                {
                    "200": json_response(ref("FailedRecords"), "The failed records"),
                    "404": job_404,
                    "409": error(
                        "Not submitted upstream yet, or its instance is no longer configured",
                        "not_submitted",
                        "unknown_instance",
                    ),
                    "502": error("The upstream failed", "upstream_refused", "upstream_unavailable"),
                },
                params=[job_id_param()],
                secured=True,
            )
        },
    }
    for action, summary in (("cancel", "Cancel upstream"), ("refresh", "Poll the status now")):
        paths[f"/jobs/{{job_id}}/{action}"] = {
            "post": operation(
                f"{action}Job",
                summary,
                {
                    "200": json_response(ref("Job"), "The job afterwards"),
                    "404": job_404,
                    "409": job_action_409[action],
                    "502": job_action_502[action],
                },
                params=[job_id_param()],
                secured=True,
            )
        }
    paths["/objects"] = {
        "get": operation(
            "listObjects",
            "The hub's objects, proxied from the upstream",
            {
                "200": json_response(ref("Objects"), "Object names"),
                "400": error("A bad hub or instance name", "bad_hub", "unknown_instance"),
                "404": error("The upstream knows no such hub", "hub_not_found"),
                "502": error("The upstream failed", "upstream_refused", "upstream_unavailable"),
            },
            params=[
                instance_filter("the instance whose upstream is asked (default: the default one)"),
                param(
                    "hub",
                    "query",
                    {"type": "string", "maxLength": 200},
                    "default: the instance's hub",
                ),
            ],
            secured=True,
        )
    }
    bad_signature = "The signature is missing or does not hold under the instance's keys"
    paths[JOB_CALLBACK_PATH] = {
        "post": _callback(
            "jobCallback",
            "The per-job callback URL given upstream; verified with the job's instance's keys",
            [job_id_param()],
            error(
                f"{bad_signature} (the job's), or the job's instance is no longer configured",
                "bad_signature",
                "unknown_instance",
            ),
            error(
                "The per-job URL names no job: nothing stored (never a genuine callback)",
                "job_not_found",
            ),
        )
    }
    paths[INSTANCE_CALLBACK_PATH] = {
        "post": _callback(
            "instanceCallback",
            "A connector instance's instance-wide callback URL; verified with its keys",
            [
                param(
                    "instance",
                    "path",
                    {"type": "string"},
                    "the connector instance's name (OC_INSTANCES)",
                    required=True,
                )
            ],
            error(bad_signature, "bad_signature"),
            error("No such connector instance is configured: nothing stored", "unknown_instance"),
        )
    }
    paths[DEFAULT_CALLBACK_PATH] = {
        "post": _callback(
            "defaultInstanceCallback",
            "The default connector instance's instance-wide callback URL",
            [],
            error(bad_signature, "bad_signature"),
            None,
        )
    }
    paths["/healthz"] = {
        "get": operation("healthz", "Liveness", {"200": json_response(ref("Status"), "ok")})
    }
    paths["/readyz"] = {
        "get": operation(
            "readyz",
            "Readiness: the store answers",
            {
                "200": json_response(ref("Status"), "ready"),
                "503": error("The store is unreachable", "store_unavailable"),
            },
        )
    }
    paths["/metrics"] = {
        "get": operation(
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
        "get": operation(
            "openapi", "This document", {"200": json_response({"type": "object"}, "OpenAPI 3.1")}
        )
    }
    return paths


def _guarded(paths: dict[str, Any]) -> dict[str, Any]:
    """The answers ``guard.RequestGuard`` and ``guard.Tokens`` give on every route they
    cover: all but the callbacks and the probes, which answer under any Host."""
    for path, item in paths.items():
        if path in CALLBACK_PATHS or path in ("/healthz", "/readyz"):
            continue
        for method, spec in item.items():
            responses = spec["responses"]
            responses.setdefault(
                "421",
                error(
                    "The Host header names a host this service does not serve", "host_not_allowed"
                ),
            )
            if method in ("post", "put", "patch", "delete"):
                responses.setdefault(
                    "403", error("A browser marked the request cross-site", "cross_origin")
                )
            if "security" in spec:
                responses.setdefault(
                    "429",
                    error(
                        "Too many wrong tokens from this client lately; not checked",
                        "too_many_attempts",
                        **{"Retry-After": "seconds until tokens are checked again"},
                    ),
                )
    return paths


def openapi_spec() -> dict[str, Any]:
    """The whole document; a new dict on every call, safe to mutate."""

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
        "paths": _guarded({**_paths(), **instance_paths(), **dashboard_paths()}),
        "components": {
            "schemas": {**_schemas(), **instance_schemas(), **dashboard_schemas()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "dashboardCookie": dict(COOKIE_SCHEME),
            },
        },
    }
