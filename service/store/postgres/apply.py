"""Applying observations on PostgreSQL: every apply waiting runs in one transaction.

A round of applies costs two round trips in pipeline mode, however many it holds:

1. BEGIN; lock every job of the round (in id order, so that replicas' rounds never
   deadlock); record every delivery (those returned are new, the others repeats).
2. One statement writes the round (``_WRITE_ROUND``): every job applied to, each by a
   compare-and-set of its version, and every timeline entry in call order; then
   COMMIT.

Between the two, each call is judged on the locked row, in call order: its claim
(``plan.bind``), whether its delivery is new, and the plan of what it changes. A job
named by several calls takes them one after the other, and is written once, as the
last leaves it. A refused call keeps its recorded delivery (marked ``wrong_job``) and
adds a timeline entry only; one that must wait has its delivery removed again; an
apply that adopts an upstream id, ends an upload with failed records or completes a
download sends its statement for that (a lock, or an enqueue) ahead of the write.
These are rare: a round of plain callbacks is five statements however many it holds,
which is what makes a callback cheap; psycopg's work per statement (the query, its
parameters, its result) is what one statement per callback cost.

If anything in a round fails, a compare-and-set included, the round is rolled back and
its applies run again, each in a transaction of its own (``apply_one``), so a failure
is its caller's alone.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from service.jobs import Job, Observation
from service.store.base import Applied, Claim, Delivery, StoreError, _Keep
from service.store.copies import ENQUEUE, newly_failed
from service.store.fetches import ENQUEUE_FETCH, enqueue_params, newly_completed
from service.store.group_commit import Outcome
from service.store.plan import APPLY, Binding, Plan, bind, plan_apply, refusal_event

__all__ = ["ApplyCall", "Conn", "apply_one", "apply_round"]

Conn = psycopg.AsyncConnection[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class ApplyCall:
    """One ``Store.apply`` waiting for its round."""

    job_id: str
    observation: Observation
    delivery: Delivery | None
    upstream_id: str | None
    next_poll_at: float | _Keep | None
    kept_id: int | None
    claim: Claim | None = None

    def binding(self, job: Job) -> Binding:
        return bind(job, self.claim) if self.claim is not None else APPLY


_LOCK_JOB = "SELECT * FROM jobs WHERE id = %s FOR UPDATE"
# A round's jobs, locked in id order (so that replicas' rounds never deadlock). The
# ids are one JSON array: psycopg dumps a list element by element in Python, several
# times slower than ``json.dumps`` of the lot; the same holds for every list below.
_LOCK_JOBS = """SELECT * FROM jobs WHERE id IN (SELECT jsonb_array_elements_text(%s::jsonb))
    ORDER BY id FOR UPDATE"""
_RECORD_DELIVERY = """
    INSERT INTO deliveries (webhook_id, job_id, received_at, digest, outcome)
    VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING webhook_id"""
# A round's deliveries, those of known jobs only (an unknown job's callback is kept
# instead); the ones returned are new, the others repeats, by webhook id or by the
# same body for the same job (either unique key: no conflict target). One JSON array
# of [webhook id, job id, received at, digest] per delivery.
_RECORD_DELIVERIES = """
    INSERT INTO deliveries (webhook_id, job_id, received_at, digest)
    SELECT d->>0, d->>1, (d->>2)::float8, d->>3
    FROM jsonb_array_elements(%s::jsonb) AS d
    WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d->>1)
    ON CONFLICT DO NOTHING RETURNING webhook_id"""
_MARK_REFUSED = "UPDATE deliveries SET outcome = 'wrong_job' WHERE webhook_id = %s"
_FORGET_DELIVERY = "DELETE FROM deliveries WHERE webhook_id = %s"
_ADD_EVENT = """INSERT INTO events (job_id, at, source, state, detail)
    VALUES (%s, %s, %s, %s, %s)"""
# A kept callback about to be applied: handled from now on; a repeat if the same body
# was applied to the job already; else its delivery becomes the job's, so that the
# same body arriving later is a repeat.
_KEPT = "SELECT webhook_id, digest FROM kept_callbacks WHERE id = %s"
_SEEN_BODY = "SELECT 1 FROM deliveries WHERE job_id = %s AND digest = %s"
_CLAIM_KEPT_DELIVERY = """UPDATE deliveries SET job_id = %s, outcome = COALESCE(%s, outcome)
    WHERE webhook_id = %s"""
# Pairs with keep_callback: a callback racing the submit that records this upstream id
# is either kept before (and applied by the submitter) or sees the job (and applies).
_LOCK_UPSTREAM_ID = "SELECT pg_advisory_xact_lock(hashtext(%s))"
_MARK_KEPT_APPLIED = "UPDATE kept_callbacks SET applied_at = %s WHERE id = %s"


# The columns of a job a round writes, from the row as the round leaves it, and
# their types; a plan changes no others but the lease, which it only ever gives up.
_WRITTEN = (
    ("updated_at", "float8"),
    ("state", "text"),
    ("last_source", "text"),
    ("upstream_status", "text"),
    ("records_count", "bigint"),
    ("records_failed_count", "bigint"),
    ("upstream_error", "text"),
    ("upstream_id", "text"),
    ("poll_count", "integer"),
    ("not_found_count", "integer"),
    ("next_poll_at", "float8"),
)
_WRITES = frozenset({name for name, _kind in _WRITTEN} | {"lease_owner", "lease_until"})
_written = operator.attrgetter(*(name for name, _kind in _WRITTEN))
# A round's writes in one statement: every job applied to, by compare-and-set, then
# every timeline entry in call order. Each job is one JSON array of [id, version
# locked, version after, whether its lease goes, *_WRITTEN]; each entry one of [job
# id, at, source, state, detail, whether it is an apply's]. An apply's entry names its
# job through the update: a failed compare-and-set leaves it NULL, which the NOT NULL
# column refuses, failing the statement and its round.
_WRITE_ROUND = """
    WITH u AS (
        SELECT r->>0 AS id, (r->>1)::bigint AS version, (r->>2)::bigint AS next_version,
            (r->>3)::boolean AS release, {values}
        FROM jsonb_array_elements(%s::jsonb) AS r),
    updated AS (
        UPDATE jobs AS j SET {assignments},
            lease_owner = CASE WHEN u.release THEN NULL ELSE j.lease_owner END,
            lease_until = CASE WHEN u.release THEN NULL ELSE j.lease_until END,
            version = u.next_version
        FROM u WHERE j.id = u.id AND j.version = u.version
        RETURNING j.id)
    INSERT INTO events (job_id, at, source, state, detail)
    SELECT CASE WHEN (e->>5)::boolean THEN (SELECT id FROM updated WHERE id = e->>0)
            ELSE e->>0 END,
        (e->>1)::float8, e->>2, e->>3, e->>4
    FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS entries (e, n)
    ORDER BY n""".format(
    values=", ".join(f"(r->>{n})::{kind} AS {name}" for n, (name, kind) in enumerate(_WRITTEN, 4)),
    assignments=", ".join(f"{name} = u.{name}" for name, _kind in _WRITTEN),
)


def _adopted(call: ApplyCall) -> str | None:
    """The upstream id the job takes if it has none (``plan.bind`` allowed it)."""
    return call.claim.upstream_id if call.claim is not None else call.upstream_id


def _write_sql(plan: Plan) -> str:
    """The compare-and-set and its timeline entry, in one statement.

    The entry names the job through the update: a failed compare-and-set leaves it
    NULL, which the NOT NULL column refuses, failing the statement.
    """
    # One join, no generator: this runs for every callback.
    assignments = " = %s, ".join(plan.changes) + " = %s"
    return (
        f"WITH updated AS (UPDATE jobs SET {assignments}, version = version + 1 "
        "WHERE id = %s AND version = %s RETURNING id) "
        "INSERT INTO events (job_id, at, source, state, detail) "
        "VALUES ((SELECT id FROM updated), %s, %s, %s, %s)"
    )


def _plan(call: ApplyCall, job: Job) -> Plan:
    return plan_apply(
        job, call.observation, upstream_id=_adopted(call), next_poll_at=call.next_poll_at
    )


async def _write(conn: Conn, call: ApplyCall, job: Job, plan: Plan) -> None:
    """One apply's statements, as ``apply_one`` writes it."""
    await _before_write(conn, job, plan.applied_to(job), plan, call.observation.at)
    await conn.execute(
        _write_sql(plan),
        (*plan.changes.values(), job.id, job.version, call.observation.at, *plan.event),
    )


async def _refuse(conn: Conn, call: ApplyCall, job: Job, refused: str) -> None:
    """The timeline entry of a refused callback; the job's row is left as it is."""
    event = refusal_event(job, refused, call.observation.detail)
    await conn.execute(_ADD_EVENT, (job.id, call.observation.at, *event))


async def _before_write(conn: Conn, job: Job, after: Job, plan: Plan, at: float) -> None:
    """What a round sends ahead of its write for one apply, rarely anything: the lock
    of an upstream id the job adopts, the copy or the fetch its change schedules."""
    if "upstream_id" in plan.changes:
        await conn.execute(_LOCK_UPSTREAM_ID, (plan.changes["upstream_id"],))
    if newly_failed(job, after):
        # The copy of its failed records, in the transaction that ends the job.
        await conn.execute(ENQUEUE, (job.id, at, at))
    if newly_completed(job, after):
        # The fetch of its result, in the transaction that completes the job.
        await conn.execute(ENQUEUE_FETCH, enqueue_params(after, at))


async def apply_round(conn: Conn, calls: Sequence[ApplyCall]) -> list[Outcome]:
    """Every call in one transaction; raises (and rolls back) if any statement fails."""
    deliveries = [
        (delivery.webhook_id, call.job_id, delivery.received_at, delivery.digest)
        for call in calls
        if (delivery := call.delivery) is not None
    ]
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            ids = json.dumps(list({call.job_id for call in calls}))
            locked = await conn.execute(_LOCK_JOBS, (ids,))
            recorded = None
            if deliveries:
                recorded = await conn.execute(_RECORD_DELIVERIES, (json.dumps(deliveries),))
            jobs = {row["id"]: Job.from_row(row) for row in await locked.fetchall()}
            new = {row["webhook_id"] for row in await recorded.fetchall()} if recorded else set()
            outcomes: list[Outcome] = []
            # Each job applied to: the version it was locked at, whether its lease goes.
            written: dict[str, tuple[int, bool]] = {}
            # The round's timeline entries, in call order: (job id, at, source, state,
            # detail, whether the entry is an apply's and so names the job's update).
            events: list[tuple[Any, ...]] = []
            for call in calls:
                job = jobs.get(call.job_id)
                if job is None:
                    outcomes.append((True, None))
                    continue
                binding = call.binding(job)
                fresh = True
                if call.delivery is not None:
                    fresh = call.delivery.webhook_id in new
                    new.discard(call.delivery.webhook_id)  # a second in this round repeats it
                if binding.wait:
                    if fresh and call.delivery is not None:
                        await conn.execute(_FORGET_DELIVERY, (call.delivery.webhook_id,))
                    outcomes.append((True, Applied(job, None, waiting=True)))
                    continue
                if not fresh:
                    outcomes.append(
                        (True, Applied(job, None, duplicate=True, refused=binding.refused))
                    )
                    continue
                at = call.observation.at
                if binding.refused:
                    if call.delivery is not None:
                        await conn.execute(_MARK_REFUSED, (call.delivery.webhook_id,))
                    event = refusal_event(job, binding.refused, call.observation.detail)
                    events.append((job.id, at, *event, False))
                    outcomes.append((True, Applied(job, None, refused=binding.refused)))
                    continue
                plan = _plan(call, job)
                if not _WRITES.issuperset(plan.changes):
                    # Never so today; were it, the round's calls would run apart.
                    raise RuntimeError(f"a round does not write {set(plan.changes) - _WRITES}")
                after = plan.applied_to(job)
                await _before_write(conn, job, after, plan, at)
                release = "lease_owner" in plan.changes
                if (earlier := written.get(job.id)) is not None:
                    written[job.id] = (earlier[0], earlier[1] or release)
                else:
                    written[job.id] = (job.version, release)
                events.append((job.id, at, *plan.event, True))
                jobs[job.id] = after
                outcomes.append((True, Applied(after, plan.decision)))
            if events:
                rows = [
                    (job_id, version, jobs[job_id].version, release, *_written(jobs[job_id]))
                    for job_id, (version, release) in written.items()
                ]
                await conn.execute(_WRITE_ROUND, (json.dumps(rows), json.dumps(events)))
            await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await conn.execute("ROLLBACK")
        raise
    return outcomes


async def _claim_kept(conn: Conn, call: ApplyCall, refused: str | None) -> bool:
    """Mark the kept callback handled; False when its body was applied to the job."""
    assert call.kept_id is not None
    await conn.execute(_MARK_KEPT_APPLIED, (call.observation.at, call.kept_id))
    kept = await (await conn.execute(_KEPT, (call.kept_id,))).fetchone()
    if kept is None:
        return True
    if kept["digest"] is not None:
        seen = await (await conn.execute(_SEEN_BODY, (call.job_id, kept["digest"]))).fetchone()
        if seen is not None:
            return False
    outcome = "wrong_job" if refused else None
    await conn.execute(_CLAIM_KEPT_DELIVERY, (call.job_id, outcome, kept["webhook_id"]))
    return True


async def apply_one(conn: Conn, call: ApplyCall) -> Applied | None:
    """One call in a transaction of its own: a kept callback's, or a round's calls
    after the round failed."""
    result: Applied | None = None
    async with conn.transaction():
        row = await (await conn.execute(_LOCK_JOB, (call.job_id,))).fetchone()
        if row is None:
            raise psycopg.Rollback()  # no such job: nothing is recorded
        job = Job.from_row(row)
        binding = call.binding(job)
        if binding.wait:
            return Applied(job, None, waiting=True)
        if call.delivery is not None:
            delivery = call.delivery
            values = (
                delivery.webhook_id,
                call.job_id,
                delivery.received_at,
                delivery.digest,
                "wrong_job" if binding.refused else None,
            )
            if await (await conn.execute(_RECORD_DELIVERY, values)).fetchone() is None:
                return Applied(job, None, duplicate=True, refused=binding.refused)
        if call.kept_id is not None and not await _claim_kept(conn, call, binding.refused):
            return Applied(job, None, duplicate=True, refused=binding.refused)
        if binding.refused:
            await _refuse(conn, call, job, binding.refused)
            return Applied(job, None, refused=binding.refused)
        plan = _plan(call, job)
        try:
            await _write(conn, call, job, plan)
        except psycopg.errors.NotNullViolation as exc:
            raise StoreError(
                f"job {call.job_id} changed underneath (compare-and-set failed)"
            ) from exc
        result = Applied(plan.applied_to(job), plan.decision)
    return result
