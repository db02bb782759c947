"""The statements both stores run for the fetches of download results (``%s``
markers; ``retention.sqlite_sql`` gives SQLite's), and a fetch's row as a
``FetchState``.

A fetch is scheduled in the transaction that completes its download job
(``Store.apply``), so a completed download always has one, whatever happens to the
process next. Only the holder of a fetch's lease writes it; a lease that runs out
(its holder killed) lets another replica, or the restarted one, try again.
"""

from __future__ import annotations

from typing import Any

from service.downloads.rules import FetchState
from service.jobs import Job, State

__all__ = [
    "CLAIM_FETCHES_POSTGRES",
    "CLAIM_FETCHES_SQLITE",
    "ENQUEUE_FETCH",
    "FETCH_COLUMNS",
    "LEASE_FETCH",
    "NEXT_FETCH_DUE",
    "READ_FETCH",
    "RELEASE_FETCHES",
    "SAVE_FETCH",
    "enqueue_params",
    "fetch_state",
    "newly_completed",
    "save_fetch_params",
]

FETCH_COLUMNS = (
    "job_id, status, format, bytes, records, sha256, detail, attempts, not_found, since, due_at"
)

# The fetch a download's completion schedules (%s: job id, format, the time it
# completed, twice): due at once.
ENQUEUE_FETCH = """INSERT INTO result_fetches (job_id, status, format, since, due_at)
    VALUES (%s, 'pending', %s, %s, %s) ON CONFLICT DO NOTHING"""

# SQLite's claim (one writer: no other can take them in between); PostgreSQL's locks
# the due rows with SKIP LOCKED in the same statement as its update. A claimed fetch
# is ``fetching``: an attempt is under way.
CLAIM_FETCHES_SQLITE = """SELECT job_id FROM result_fetches WHERE due_at <= %s
    AND (lease_until IS NULL OR lease_until < %s) ORDER BY due_at LIMIT %s"""
CLAIM_FETCHES_POSTGRES = f"""WITH due AS (
        SELECT job_id FROM result_fetches
        WHERE due_at <= %s AND (lease_until IS NULL OR lease_until < %s)
        ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED)
    UPDATE result_fetches SET lease_owner = %s, lease_until = %s, status = 'fetching'
    FROM due WHERE result_fetches.job_id = due.job_id
    RETURNING {", ".join("result_fetches." + c.strip() for c in FETCH_COLUMNS.split(","))}"""
LEASE_FETCH = """UPDATE result_fetches SET lease_owner = %s, lease_until = %s,
    status = 'fetching' WHERE job_id = %s"""

# A fetch's outcome (or its lease renewed), by the holder of its lease only (%s:
# status, bytes, records, sha256, detail, attempts, not found, due, lease owner, lease
# until; then job id and owner). No row: the lease was lost.
SAVE_FETCH = """UPDATE result_fetches SET status = %s, bytes = %s, records = %s,
        sha256 = %s, detail = %s, attempts = %s, not_found = %s, due_at = %s,
        lease_owner = %s, lease_until = %s
    WHERE job_id = %s AND lease_owner = %s"""

READ_FETCH = f"SELECT {FETCH_COLUMNS} FROM result_fetches WHERE job_id = %s"
NEXT_FETCH_DUE = "SELECT MIN(due_at) AS due FROM result_fetches WHERE due_at IS NOT NULL"
RELEASE_FETCHES = """UPDATE result_fetches SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = %s"""


def fetch_state(row: Any) -> FetchState:
    """A ``result_fetches`` row (either driver's: both read by column name)."""
    return FetchState(
        job_id=row["job_id"],
        status=row["status"],
        format=row["format"],
        since=float(row["since"]),
        bytes=None if row["bytes"] is None else int(row["bytes"]),
        records=None if row["records"] is None else int(row["records"]),
        sha256=row["sha256"],
        detail=row["detail"],
        attempts=int(row["attempts"]),
        not_found=int(row["not_found"]),
        due_at=row["due_at"],
    )


def newly_completed(before: Job, after: Job) -> bool:
    """Whether the change from ``before`` to ``after`` schedules a fetch
    (``ENQUEUE_FETCH``): a download that has just completed."""
    return after.is_download and after.state == State.COMPLETED and before.state != State.COMPLETED


def enqueue_params(job: Job, at: float) -> tuple[Any, ...]:
    """``ENQUEUE_FETCH``'s parameters for ``job``, completed at ``at``."""
    return (job.id, job.format or "csv", at, at)


def save_fetch_params(state: FetchState, owner: str, lease_until: float | None) -> tuple[Any, ...]:
    """``SAVE_FETCH``'s parameters: the lease kept until ``lease_until``, or given up."""
    return (
        state.status,
        state.bytes,
        state.records,
        state.sha256,
        state.detail,
        state.attempts,
        state.not_found,
        state.due_at,
        owner if lease_until is not None else None,
        lease_until,
        state.job_id,
        owner,
    )
