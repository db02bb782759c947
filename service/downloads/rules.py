"""Where a download's result stands, and when a failed fetch is tried again or given
up. Pure: no I/O.

A completed download job has one fetch: ``pending`` until its first attempt,
``fetching`` while an attempt is under way or after one failed and another is due
(``detail`` says why the last failed), ``stored`` once the whole file is kept, and
``failed`` when given up (``detail`` says why). A fetch is given up after
``NOT_FOUND_LIMIT`` answers of 404 or 410 in a row, or once ``UPSTREAM_KEEPS`` has
passed since the job completed: the upstream keeps a result three days. No attempt is
due after that deadline, whatever ``Retry-After`` asked: the one at the deadline is the
last.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from service.jitter import spread
from service.jobs import Job, State

__all__ = [
    "NOT_FOUND_LIMIT",
    "STATUSES",
    "UPSTREAM_KEEPS",
    "FetchState",
    "after_failure",
    "backoff",
    "count_note",
    "result_json",
]

# Seconds the upstream keeps a query's result after the job completes.
UPSTREAM_KEEPS = 3 * 86400.0
# Answers of 404 or 410 in a row after which the upstream surely has no result.
NOT_FOUND_LIMIT = 3
STATUSES = ("pending", "fetching", "stored", "failed")
# The longest note kept with a fetch.
_DETAIL = 2000


def backoff(attempts: int, first: float, most: float, retry_after: float | None) -> float:
    """Seconds before the next try after ``attempts`` failed ones: doubling from
    ``first`` up to ``most``, less up to 20 % of jitter, and never before the
    upstream's ``Retry-After``."""
    wait = min(most, first * 2.0 ** max(0, attempts - 1)) * spread(0.8, 1.0)
    if retry_after is None or math.isnan(retry_after):
        return wait
    # May be infinite: the caller bounds the due time, not this.
    return max(wait, retry_after)


def count_note(counted: int | None, stored: int) -> str | None:
    """What a stored result says when it holds another number of records than the
    upstream counted for its job; None when they agree (or nothing was counted)."""
    if counted is None or counted == stored:
        return None
    return f"the upstream counted {counted} records; the file holds {stored}"


@dataclass(frozen=True)
class FetchState:
    """Where the fetch of one download's result stands (a row of ``result_fetches``)."""

    job_id: str
    status: str
    format: str
    since: float
    bytes: int | None = None
    records: int | None = None
    sha256: str | None = None
    detail: str | None = None
    attempts: int = 0
    # 404 or 410 answers in a row.
    not_found: int = 0
    due_at: float | None = None

    @property
    def stored(self) -> bool:
        return self.status == "stored"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "format": self.format,
            "bytes": self.bytes,
            "records": self.records,
            "sha256": self.sha256,
            "detail": self.detail,
            "attempts": self.attempts,
            "url": f"/jobs/{self.job_id}/result" if self.stored else None,
        }


def result_json(job: Job, fetch: FetchState | None) -> dict[str, Any] | None:
    """A job's ``result``: None for an upload; a download still under way is
    ``pending``, and one that ended otherwise than ``COMPLETED`` is ``failed``: there
    never will be a result, and a client waiting for one stops."""
    if not job.is_download:
        return None
    if fetch is not None:
        return fetch.to_json()
    if job.terminal and job.state != State.COMPLETED:
        detail = f"the job ended {job.state}: there is no result to fetch"
        return FetchState(
            job.id, "failed", job.format or "csv", job.updated_at, detail=detail
        ).to_json()
    return FetchState(job.id, "pending", job.format or "csv", job.updated_at).to_json()


def after_failure(
    state: FetchState,
    now: float,
    why: str,
    *,
    not_found: bool,
    retry_after: float | None,
    first: float,
    most: float,
) -> FetchState:
    """The fetch after an attempt that failed for ``why``: due again after the
    backoff, or ``failed`` when the upstream surely has no result any more."""
    attempts = state.attempts + 1
    misses = state.not_found + 1 if not_found else 0
    if misses >= NOT_FOUND_LIMIT:
        reason = f"{why}; given up: {NOT_FOUND_LIMIT} answers in a row said there is no result"
        return _ended(state, attempts, misses, reason)
    if now >= state.since + UPSTREAM_KEEPS:
        reason = f"{why}; given up: the upstream keeps a result three days"
        return _ended(state, attempts, misses, reason)
    # However long the upstream asks to wait (``Retry-After: 1e9``, or ``inf``), the
    # next attempt comes by the deadline: one last try while the result may still be
    # there, given up if it fails, and never a due time decades away (or infinite).
    deadline = state.since + UPSTREAM_KEEPS
    due = min(now + backoff(attempts, first, most, retry_after), deadline)
    return dataclasses.replace(
        state,
        status="fetching",
        attempts=attempts,
        not_found=misses,
        due_at=due,
        detail=why[:_DETAIL],
    )


def _ended(state: FetchState, attempts: int, misses: int, reason: str) -> FetchState:
    return dataclasses.replace(
        state,
        status="failed",
        attempts=attempts,
        not_found=misses,
        due_at=None,
        detail=reason[:_DETAIL],
    )
