"""The dashboard's machine-facing routes in ``/openapi.json``: its JSON, CSV and
event-stream answers (``service.dashboard``). Its HTML pages, login form and static files
are for browsers and are not described.

Every one of them takes the job API's bearer token or the dashboard's login cookie.
"""

from __future__ import annotations

from typing import Any

from service.dashboard.views import OUTCOMES as _OUTCOMES
from service.openapi.parts import (
    Schema,
    error,
    job_id_param,
    json_response,
    obj,
    operation,
    param,
    ref,
)
from service.openapi.results import result_operation

__all__ = ["COOKIE_SCHEME", "dashboard_paths", "dashboard_schemas"]

COOKIE_SCHEME = {
    "type": "apiKey",
    "in": "cookie",
    "name": "bulkhook_token",
    "description": "set by the dashboard's login form (HttpOnly, SameSite=Strict)",
}


def _secured(operation: Schema) -> Schema:
    operation["security"] = [{"bearer": []}, {"dashboardCookie": []}]
    return operation


def dashboard_schemas() -> dict[str, Schema]:
    counts = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
    return {
        "CallbackDelivery": obj(
            {
                "received_at": {"type": "string", "format": "date-time"},
                "outcome": {"type": "string", "enum": list(_OUTCOMES)},
                "job": {"type": ["string", "null"], "description": "the job (or reference)"},
                "webhook_id": {"type": ["string", "null"]},
                "detail": {"type": "string"},
                "repeats": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "how many deliveries the line stands for: more than 1"
                    " for the summary of refusals past those noted one by one each second",
                },
            }
        ),
        "CallbackActivity": obj(
            {
                "counts_24h": {**counts, "description": "every replica, from the store"},
                "replica_counts": {
                    **counts,
                    "description": "this process since it started (duplicates only here)",
                },
                "recent": {"type": "array", "items": ref("CallbackDelivery")},
            }
        ),
    }


def _action(action: str, summary: str) -> Schema:
    conflict = {
        "cancel": error("Not possible now", "job_terminal", "not_submitted", "unknown_instance"),
        "refresh": error(
            "Not submitted upstream yet, or its instance is no longer configured",
            "not_submitted",
            "unknown_instance",
        ),
    }[action]
    return _secured(
        operation(
            f"dashboard{action.title()}Job",
            f"{summary} (the dashboard's button: as POST /jobs/{{job_id}}/{action})",
            {
                "200": json_response(ref("Job"), "The job afterwards"),
                "403": error("A cross-origin request", "cross_origin"),
                "404": error("No such job", "job_not_found"),
                "409": conflict,
                "502": error("The upstream failed", "upstream_refused", "upstream_unavailable"),
            },
            params=[job_id_param()],
            secured=True,
        )
    )


def dashboard_paths() -> dict[str, Any]:
    stream = operation(
        "dashboardStream",
        "Live changes as Server-Sent Events: `job` events (every job, or only `job`) and "
        "`callbacks` events; the stream ends now and then, and EventSource resumes it "
        "from `Last-Event-ID`",
        {
            "200": {
                "description": "An event stream (`text/event-stream`)",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            "406": error("The request does not accept text/event-stream", "not_acceptable"),
        },
        params=[
            param("job", "query", {"type": "string"}, "follow this job only"),
            param("since", "query", {"type": "number"}, "send jobs changed after (epoch s)"),
            param("Last-Event-ID", "header", {"type": "string"}, "resume point"),
        ],
        secured=True,
    )
    failed_csv = operation(
        "dashboardFailedRecordsCsv",
        "The job's failed records as CSV: the upstream's fields, then the record's columns",
        {
            "200": {
                "description": "CSV, as an attachment",
                "content": {"text/csv": {"schema": {"type": "string"}}},
            },
            "404": error("No such job", "job_not_found"),
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
    callbacks = operation(
        "dashboardCallbacks",
        "Recent callback deliveries, refused ones included (never a body), and counts",
        {"200": json_response(ref("CallbackActivity"), "The callbacks panel's data")},
        secured=True,
    )
    return {
        "/ui/stream": {"get": _secured(stream)},
        "/ui/callbacks": {"get": _secured(callbacks)},
        "/ui/jobs/{job_id}/failed.csv": {"get": _secured(failed_csv)},
        "/ui/jobs/{job_id}/result": {
            "get": _secured(
                result_operation(
                    "dashboardJobResult",
                    "A download's result file (the job page's download button): as GET "
                    "/jobs/{job_id}/result",
                )
            )
        },
        "/ui/jobs/{job_id}/cancel": {"post": _action("cancel", "Cancel upstream")},
        "/ui/jobs/{job_id}/refresh": {"post": _action("refresh", "Poll the status now")},
    }
