"""The statements both stores run for copies of failed records (``%s`` markers;
``retention.sqlite_sql`` gives SQLite's), and a copy's row as a ``CopyState``.

A copy is scheduled in the transaction that ends its job (``Store.apply``), so a job
that ended with failed records always has one, whatever happens to the process next.
Each page of records is stored in one transaction with the copy's progress, by the
holder of its lease only, and numbered on from the records kept before it: a copy cut
off at any point resumes from the last page stored, and never stores a page twice.
"""

from __future__ import annotations

from typing import Any

from service.failed_records.rules import CopyState, keeps_failed_records
from service.jobs import Job

__all__ = [
    "CLAIM_COPIES_POSTGRES",
    "CLAIM_COPIES_SQLITE",
    "COPY_COLUMNS",
    "ENQUEUE",
    "INSERT_RECORD",
    "LEASE",
    "NEXT_DUE",
    "READ_COPY",
    "READ_RECORDS",
    "RELEASE",
    "SAVE_COPY",
    "copy_state",
    "newly_failed",
    "save_params",
]

COPY_COLUMNS = "job_id, status, kept, complete, next_page, attempts, since, due_at, detail"

# The copy a job's end schedules (%s: job id, the time it ended, twice): due at once.
ENQUEUE = """INSERT INTO failed_copies (job_id, status, since, due_at)
    VALUES (%s, 'pending', %s, %s) ON CONFLICT DO NOTHING"""

# SQLite's claim (one writer: no other can take them in between); PostgreSQL's locks
# the due rows with SKIP LOCKED in the same statement as its update.
CLAIM_COPIES_SQLITE = """SELECT job_id FROM failed_copies WHERE due_at <= %s
    AND (lease_until IS NULL OR lease_until < %s) ORDER BY due_at LIMIT %s"""
CLAIM_COPIES_POSTGRES = f"""WITH due AS (
        SELECT job_id FROM failed_copies
        WHERE due_at <= %s AND (lease_until IS NULL OR lease_until < %s)
        ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED)
    UPDATE failed_copies SET lease_owner = %s, lease_until = %s
    FROM due WHERE failed_copies.job_id = due.job_id
    RETURNING {", ".join("failed_copies." + c.strip() for c in COPY_COLUMNS.split(","))}"""
LEASE = "UPDATE failed_copies SET lease_owner = %s, lease_until = %s WHERE job_id = %s"

# A copy's progress, by the holder of its lease, from the records kept so far
# (%s: status, kept, complete, next page, attempts, due, detail, lease owner, lease
# until; then job id, owner, the records kept before). No row: the lease was lost.
SAVE_COPY = """UPDATE failed_copies SET status = %s, kept = %s, complete = %s,
        next_page = %s, attempts = %s, due_at = %s, detail = %s,
        lease_owner = %s, lease_until = %s
    WHERE job_id = %s AND lease_owner = %s AND kept = %s"""
INSERT_RECORD = """INSERT INTO failed_records (job_id, seq, record) VALUES (%s, %s, %s)
    ON CONFLICT DO NOTHING"""

READ_COPY = f"SELECT {COPY_COLUMNS} FROM failed_copies WHERE job_id = %s"
READ_RECORDS = """SELECT seq, record FROM failed_records
    WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s"""
NEXT_DUE = "SELECT MIN(due_at) AS due FROM failed_copies WHERE due_at IS NOT NULL"
RELEASE = """UPDATE failed_copies SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = %s"""


def copy_state(row: Any) -> CopyState:
    """A ``failed_copies`` row (either driver's: both read by column name)."""
    return CopyState(
        job_id=row["job_id"],
        status=row["status"],
        kept=int(row["kept"]),
        complete=bool(row["complete"]),
        next_page=row["next_page"],
        attempts=int(row["attempts"]),
        since=float(row["since"]),
        due_at=row["due_at"],
        detail=row["detail"],
    )


def newly_failed(before: Job, after: Job) -> bool:
    """Whether the change from ``before`` to ``after`` schedules a copy (``ENQUEUE``)."""
    return keeps_failed_records(after) and not keeps_failed_records(before)


def save_params(
    state: CopyState, owner: str, lease_until: float | None, before: int
) -> tuple[Any, ...]:
    """``SAVE_COPY``'s parameters: the lease kept until ``lease_until``, or given up."""
    return (
        state.status,
        state.kept,
        int(state.complete),
        state.next_page,
        state.attempts,
        state.due_at,
        state.detail,
        owner if lease_until is not None else None,
        lease_until,
        state.job_id,
        owner,
        before,
    )
