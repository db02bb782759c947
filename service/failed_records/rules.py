"""What is copied, how each record is kept, and how a copy is described. Pure: no I/O.

A job's failed records are copied when it has ended with failures: a terminal job with
an upstream id and ``records_failed_count`` above 0. A job that ended ``ERROR`` or
``ABORTED`` without a count (a whole-file failure, or a job the upstream lost) is
copied too, since only the upstream knows whether it holds records for it; a job
``TIMED_OUT`` or ``CANCELLED`` without a count is not (nothing says it failed a row),
nor a job that never reached the upstream, nor a download (it loads no records, so
none can fail).

Each record is kept as the upstream's JSON, as text that both stores take (valid
UTF-8, no NUL: ``values.json_text``), and at most ``MAX_RECORD_BYTES`` of it: a larger
record is kept as a stub with its line number and message and says what was left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.jitter import spread
from service.jobs import TERMINAL, Job, State
from service.values import json_text, safe_text

__all__ = [
    "MAX_RECORD_BYTES",
    "STATUSES",
    "UPSTREAM_KEEPS",
    "CopyState",
    "backoff",
    "keeps_failed_records",
    "stored_record",
]

# The bytes of JSON kept per record: a record of a few thousand columns fits; what is
# larger is kept as a stub. With BULKHOOK_MAX_FAILED_RECORDS this bounds a job's copy.
MAX_RECORD_BYTES = 256 * 1024
# Seconds the upstream keeps a job's failed records after it ends: a copy that has not
# succeeded by then cannot, and ends ``failed``.
UPSTREAM_KEEPS = 3 * 86400.0
# pending: not started; copying: some pages stored, more to come (or a retry due);
# copied: ended, every record kept or the bound reached; failed: given up.
STATUSES = ("pending", "copying", "copied", "failed")
# The upstream's fields a stub keeps, each cut to this many characters.
_STUB_TEXT = 1000


def keeps_failed_records(job: Job) -> bool:
    """Whether ``job``'s failed records are to be copied (see the module's docstring)."""
    if job.upstream_id is None or job.state not in TERMINAL or job.state == State.SUBMIT_FAILED:
        return False
    if job.is_download:
        return False  # a bulk query loads no records: none of them can fail
    if job.records_failed_count is not None:
        return job.records_failed_count > 0
    return job.state in (State.ERROR, State.ABORTED)


def stored_record(record: Any) -> str:
    """``record`` as the JSON text the store keeps: storable, and at most
    ``MAX_RECORD_BYTES`` long (else a stub that says how large it was)."""
    try:
        text = json_text(record)
    except (ValueError, RecursionError):
        text = None
    if text is not None and len(text.encode("utf-8")) <= MAX_RECORD_BYTES:
        return text
    stub: dict[str, Any] = {}
    if isinstance(record, dict):
        line = record.get("lineNumber")
        if isinstance(line, int) and not isinstance(line, bool) and abs(line) < 10**15:
            stub["lineNumber"] = line
        message = record.get("errorMessage")
        if isinstance(message, str):
            stub["errorMessage"] = safe_text(message, _STUB_TEXT)
    size = f"{len(text.encode('utf-8'))} bytes" if text is not None else "not storable JSON"
    stub["recordOmitted"] = f"the record was {size}; at most {MAX_RECORD_BYTES} are kept"
    return json.dumps(stub, ensure_ascii=True)


def backoff(attempts: int, first: float, most: float, retry_after: float | None) -> float:
    """Seconds before the next try after ``attempts`` failed ones: doubling from
    ``first`` up to ``most``, less up to 20 % of jitter, and never before the
    upstream's ``Retry-After``."""
    wait = min(most, first * 2.0 ** max(0, attempts - 1)) * spread(0.8, 1.0)
    return max(wait, retry_after or 0.0)


@dataclass(frozen=True)
class CopyState:
    """Where a job's copy of its failed records stands (one row of ``failed_copies``)."""

    job_id: str
    status: str
    kept: int
    complete: bool
    next_page: str | None
    attempts: int
    since: float
    due_at: float | None
    detail: str

    @property
    def ended(self) -> bool:
        return self.status in ("copied", "failed")

    @property
    def served_from_store(self) -> bool:
        """Whether the records are answered from the store: once the copy ended with
        what it kept (all of them, the bound's worth, or some before it gave up). A copy
        that ended with none of the records its job counts is not: the upstream may list
        them by the time someone looks."""
        if self.status == "copied":
            return self.complete or self.kept > 0
        return self.status == "failed" and self.kept > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "kept": self.kept,
            "complete": self.complete,
            "detail": self.detail,
        }
