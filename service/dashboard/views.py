"""What the dashboard's templates show, computed from jobs and deliveries (pure).

Kept apart from the routes so the page, its live updates and the JSON answer derive
every label, tone and count the same way.
"""

from __future__ import annotations

import time
from typing import Any

from service.jobs import Job, Source, State
from service.metrics import Metrics
from service.store.base import CallbackRecord

__all__ = [
    "OUTCOMES",
    "age",
    "callbacks_view",
    "clock",
    "job_view",
    "result_view",
    "size",
    "timeline_view",
]

# Every outcome a delivery can have, in the order the panel lists them.
OUTCOMES = (
    "accepted",
    "duplicate",
    "unknown_job",
    "malformed",
    "wrong_job",
    "bad_signature",
    "too_large",
)
_REFUSED = {"bad_signature", "too_large", "wrong_job"}
_BAD = {State.ERROR, State.ABORTED, State.SUBMIT_FAILED, State.TIMED_OUT}
_MUTED = {State.CANCELLED, State.CANCELLATION_PENDING}


def age(seconds: float) -> str:
    """Short and coarse, like the table's JavaScript redraws it (static/dashboard.js)."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def size(count: int) -> str:
    """A byte count as people read it, with the exact count beside it from 1 KiB on:
    ``512 bytes``, ``1.2 MiB (1,234,567 bytes)``."""
    exact = f"{count:,} byte{'' if count == 1 else 's'}"
    if count < 1024:
        return exact
    value = count / 1024
    units = ["KiB", "MiB", "GiB", "TiB"]
    while round(value, 1) >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]} ({exact})"


def clock(ts: float) -> str:
    millis = int(ts * 1000) % 1000
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{millis:03d}"


def _tone(job: Job) -> str:
    """The badge colour: partial failure is not success, and shows as its own tone."""
    if job.state == State.COMPLETED:
        return "partial" if job.records_failed_count else "ok"
    if job.state in _BAD:
        return "bad"
    if job.state in _MUTED:
        return "muted"
    return "live"


def job_view(job: Job, now: float) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": str(job.state),
        "tone": _tone(job),
        "object": job.object,
        "hub": job.hub,
        "path": job.path,
        "upstream_id": job.upstream_id,
        "upstream_status": job.upstream_status,
        "records": job.records_count,
        "failed": job.records_failed_count,
        "upstream_error": job.upstream_error,
        "rows": job.rows,
        "direction": job.direction,
        "instance": job.instance,
        "is_download": job.is_download,
        "query": job.query,
        "format": job.format,
        "filename": job.filename,
        "last_source": job.last_source,
        "age": age(now - job.created_at),
        "created_ms": int(job.created_at * 1000),
        "created": clock(job.created_at),
        "updated": clock(job.updated_at),
        "terminal": job.terminal,
        "can_cancel": not job.terminal and job.upstream_id is not None,
        # Failed records can be listed once the upstream has the job and reports any
        # (or has not said how many yet).
        "has_failed": not job.is_download
        and job.upstream_id is not None
        and job.terminal
        and job.records_failed_count != 0,
    }


_RESULT_TONES = {"pending": "muted", "fetching": "live", "stored": "ok", "failed": "bad"}


def result_view(job: Job, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A download's ``result`` (its API JSON) as the job page shows it; None for an
    upload. ``moving``: the service is still to fetch it, so the page's live stream
    asks again (the fetch changes nothing of the job itself)."""
    if result is None:
        return None
    status = result["status"]
    stored = status == "stored"
    return {
        "status": status,
        "tone": _RESULT_TONES.get(status, "live"),
        "format": result["format"],
        "size": size(result["bytes"]) if result.get("bytes") is not None else None,
        "records": result.get("records"),
        "sha256": result.get("sha256"),
        "detail": result.get("detail"),
        "attempts": result.get("attempts", 0),
        "download": f"/ui/jobs/{job.id}/result" if stored else None,
        "moving": job.state == State.COMPLETED and status in ("pending", "fetching"),
    }


def _verdict(source: str) -> str:
    """Every callback in a timeline was verified: an unverified one is refused before
    it can reach the store (refusals are merged in from their own table)."""
    return "verified" if source == Source.CALLBACK else ""


def timeline_view(job: Job, rejected: list[CallbackRecord]) -> list[dict[str, Any]]:
    """The job's timeline with the callbacks refused at its URL merged in by time:
    submitted, each callback with its verification outcome, each poll, each change."""
    entries: list[dict[str, Any]] = [
        {
            "at": event.at,
            "clock": clock(event.at),
            "source": event.source,
            "state": event.state,
            "detail": event.detail,
            "verdict": _verdict(event.source),
            "refused": False,
        }
        for event in job.events
    ]
    entries += [
        {
            "at": record.received_at,
            "clock": clock(record.received_at),
            "source": "callback",
            "state": "",
            "detail": record.detail,
            "verdict": f"refused: {record.outcome.replace('_', ' ')}",
            "refused": True,
        }
        for record in rejected
    ]
    return sorted(entries, key=lambda entry: entry["at"])


def _replica_counts(metrics: Metrics) -> dict[str, int]:
    """This process's counters since it started (duplicates are only counted here:
    a repeat delivery is acknowledged without being stored again)."""
    return metrics.callbacks.by_outcome()


def callbacks_view(
    recent: list[CallbackRecord], counts: dict[str, int], metrics: Metrics, now: float
) -> dict[str, Any]:
    replica = _replica_counts(metrics)
    day = [(outcome, counts.get(outcome, 0)) for outcome in OUTCOMES if outcome != "duplicate"]
    rows = [
        {
            "clock": clock(record.received_at),
            "age": age(now - record.received_at),
            "outcome": record.outcome,
            "refused": record.outcome in _REFUSED,
            "job_ref": record.job_ref,
            "linked": record.outcome == "accepted" and record.job_ref is not None,
            "webhook_id": record.webhook_id,
            "detail": record.detail,
            "repeats": record.repeats,
        }
        for record in recent
    ]
    return {
        "day": day,
        "replica": [(outcome, replica.get(outcome, 0)) for outcome in OUTCOMES],
        "recent": rows,
        "json": {
            "counts_24h": dict(day),
            "replica_counts": {outcome: replica.get(outcome, 0) for outcome in OUTCOMES},
            "recent": [
                {
                    "received_at": clock(record.received_at).replace(" ", "T") + "Z",
                    "outcome": record.outcome,
                    "job": record.job_ref,
                    "webhook_id": record.webhook_id,
                    "detail": record.detail,
                    "repeats": record.repeats,
                }
                for record in recent
            ],
        },
    }
