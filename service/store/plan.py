"""A new job's row, and what applying an observation changes in one: pure, shared by
every store."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from service.jobs import TERMINAL, Decision, Job, Observation, Source, State, decide
from service.logs import short
from service.store.base import Claim, _Keep

__all__ = [
    "APPLY",
    "NEW_JOB_COLUMNS",
    "NEW_JOB_WIDTH",
    "WAIT",
    "Binding",
    "Plan",
    "bind",
    "new_job_row",
    "plan_apply",
    "refusal_event",
]

# The columns a new job's row is written with, in the order of ``new_job_row``.
NEW_JOB_COLUMNS = (
    "id, hub, object, path, filename, rows, state, created_at, updated_at, last_source,"
    " idempotency_key, next_poll_at, direction, query, format, instance"
)
NEW_JOB_WIDTH = NEW_JOB_COLUMNS.count(",") + 1


def new_job_row(job: Job, idempotency_key: str | None) -> tuple[Any, ...]:
    """A new job's row, as both stores insert it (``NEW_JOB_COLUMNS``)."""
    return (
        job.id,
        job.hub,
        job.object,
        job.path or "",  # no path given: '' in a column that is NOT NULL
        job.filename,
        job.rows,
        str(job.state),
        job.created_at,
        job.updated_at,
        job.last_source,
        idempotency_key,
        job.next_poll_at,
        job.direction,
        job.query,
        job.format,
        job.instance,
    )


@dataclass(frozen=True)
class Binding:
    """What a callback's claim means for one job: apply, wait, or refuse (why)."""

    wait: bool = False
    refused: str | None = None


APPLY = Binding()
WAIT = Binding(wait=True)


def bind(job: Job, claim: Claim) -> Binding:
    """Whether a verified body may change ``job``; pure, so both stores agree.

    The upstream signs the body, not the URL, so a genuine body can arrive at any
    job's URL. A body whose ``callback-payload`` names another job, or whose upstream
    id is not the job's, is refused. A body naming an upstream job but not this job,
    while this job's upstream id is not known yet, waits for the submit's answer:
    only a body whose payload names this job may give it an upstream id.
    """
    if claim.payload is not None and claim.payload != job.id:
        return Binding(refused=f"its callback-payload names job {short(claim.payload)}")
    if claim.upstream_id is not None:
        if job.upstream_id is not None and claim.upstream_id != job.upstream_id:
            return Binding(
                refused=f"it is about upstream job {short(claim.upstream_id)},"
                f" this job is upstream job {job.upstream_id}"
            )
        if job.upstream_id is None and claim.payload is None:
            return WAIT
    return APPLY


def refusal_event(job: Job, refused: str, detail: str) -> tuple[str, str, str]:
    """The timeline entry of a refused callback: (source, state, detail)."""
    text = f"refused: {refused}; nothing changed"
    return (str(Source.CALLBACK), str(job.state), f"{text}; {detail}" if detail else text)


# Slots: a frozen instance with them is a third cheaper to build, and one is built
# for every callback.
@dataclass(frozen=True, slots=True)
class Plan:
    decision: Decision
    # Column -> new value; the store adds ``version = version + 1`` and the CAS guard.
    changes: dict[str, Any]
    # The timeline entry: (source, state, detail).
    event: tuple[str, str, str]

    def applied_to(self, job: Job) -> Job:
        """The row as the store holds it after this plan (saves reading it back)."""
        fields = {name: value for name, value in self.changes.items() if name in _JOB_FIELDS}
        if "state" in fields:
            fields["state"] = State(fields["state"])
        fields["version"] = job.version + 1
        return job.updated(fields)


_JOB_FIELDS = frozenset(field.name for field in dataclasses.fields(Job))


def _describe(observation: Observation) -> str:
    parts = []
    if observation.raw_status or observation.status:
        parts.append(f"upstream says {observation.raw_status or observation.status}")
    if observation.records_count is not None:
        total, failed = observation.records_count, observation.records_failed_count
        parts.append(
            f"{total} record{'' if total == 1 else 's'}"
            + (f", {failed} failed" if failed is not None else "")
        )
    if observation.upstream_error is not None:
        parts.append(f"error: {observation.upstream_error}")
    if observation.detail:
        parts.append(observation.detail)
    return "; ".join(parts)


def plan_apply(
    job: Job,
    observation: Observation,
    *,
    upstream_id: str | None,
    next_poll_at: float | _Keep | None,
) -> Plan:
    decision = decide(job.state, observation)
    changes: dict[str, Any] = {"updated_at": observation.at}
    if decision.changed:
        changes["state"] = str(decision.state)
    if decision.accepted or decision.changed:
        changes["last_source"] = str(observation.source)
        if observation.raw_status or observation.status:
            changes["upstream_status"] = observation.raw_status or observation.status
        if observation.records_count is not None:
            changes["records_count"] = observation.records_count
        if observation.records_failed_count is not None:
            changes["records_failed_count"] = observation.records_failed_count
        # Like the counts: news without a message keeps the one recorded, so a late
        # status that says nothing about the failure cannot erase why it failed.
        if observation.upstream_error is not None:
            changes["upstream_error"] = observation.upstream_error
    if upstream_id is not None and job.upstream_id is None:
        changes["upstream_id"] = upstream_id
    if observation.source == Source.POLL:
        changes["poll_count"] = job.poll_count + 1
        changes["not_found_count"] = 0
    elif observation.source == Source.CALLBACK:
        changes["poll_count"] = 0
    if decision.state in TERMINAL:
        changes["next_poll_at"] = None
    elif not isinstance(next_poll_at, _Keep):
        changes["next_poll_at"] = next_poll_at
    if "next_poll_at" in changes or observation.source == Source.POLL:
        changes["lease_owner"] = None
        changes["lease_until"] = None
    described = _describe(observation)
    note = decision.note if not decision.changed else ""
    detail = f"{described}; {note}" if described and note else described or note
    return Plan(decision, changes, (str(observation.source), str(decision.state), detail))
