"""Applying observations on PostgreSQL: every apply waiting runs in one transaction.

A round of applies costs two round trips in pipeline mode, however many it holds:
the first locks every job of the round (in id order, so that replicas' rounds never
deadlock) and records the deliveries; the second sends each job's compare-and-set with
its timeline entry, then COMMIT. Applied one by one, each callback cost four round
trips (BEGIN, the locked read, the write, COMMIT) and a commit of its own.

If anything in a round fails, the round is rolled back and its applies run again,
each in a transaction of its own (``apply_one``), so a failure is its caller's alone.

A callback's claim (``plan.bind``) is judged on the locked row, in the second round
trip: a refused one keeps its recorded delivery (marked ``wrong_job``) and adds one
timeline entry, one that must wait has its delivery removed again. Neither costs a
round trip more.
"""

from __future__ import annotations

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
_LOCK_JOBS = "SELECT * FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
_RECORD_DELIVERY = """
    INSERT INTO deliveries (webhook_id, job_id, received_at, digest, outcome)
    VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING webhook_id"""
# A round's deliveries, those of known jobs only (an unknown job's callback is kept
# instead); the ones returned are new, the others repeats, by webhook id or by the
# same body for the same job (either unique key: no conflict target).
_RECORD_DELIVERIES = """
    INSERT INTO deliveries (webhook_id, job_id, received_at, digest)
    SELECT webhook_id, job_id, received_at, digest
    FROM unnest(%s::text[], %s::text[], %s::float8[], %s::text[])
        AS d (webhook_id, job_id, received_at, digest)
    WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d.job_id)
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


def _adopted(call: ApplyCall) -> str | None:
    """The upstream id the job takes if it has none (``plan.bind`` allowed it)."""
    return call.claim.upstream_id if call.claim is not None else call.upstream_id


def _write_sql(plan: Plan) -> str:
    """The compare-and-set and its timeline entry, in one statement.

    The entry names the job through the update: a failed compare-and-set leaves it
    NULL, which the NOT NULL column refuses, failing the statement and its round.
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
    if "upstream_id" in plan.changes:
        await conn.execute(_LOCK_UPSTREAM_ID, (plan.changes["upstream_id"],))
    await conn.execute(
        _write_sql(plan),
        (*plan.changes.values(), job.id, job.version, call.observation.at, *plan.event),
    )
    after = plan.applied_to(job)
    at = call.observation.at
    if newly_failed(job, after):
        # The copy of its failed records, in the transaction that ends the job.
        await conn.execute(ENQUEUE, (job.id, at, at))
    if newly_completed(job, after):
        # The fetch of its result, in the transaction that completes the job.
        await conn.execute(ENQUEUE_FETCH, enqueue_params(after, at))


async def _refuse(conn: Conn, call: ApplyCall, job: Job, refused: str) -> None:
    """The timeline entry of a refused callback; the job's row is left as it is."""
    event = refusal_event(job, refused, call.observation.detail)
    await conn.execute(_ADD_EVENT, (job.id, call.observation.at, *event))


async def apply_round(conn: Conn, calls: Sequence[ApplyCall]) -> list[Outcome]:
    """Every call in one transaction; raises (and rolls back) if any statement fails."""
    deliveries = [(call.delivery, call.job_id) for call in calls if call.delivery is not None]
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            locked = await conn.execute(_LOCK_JOBS, (sorted({call.job_id for call in calls}),))
            recorded = None
            if deliveries:
                recorded = await conn.execute(
                    _RECORD_DELIVERIES,
                    (
                        [delivery.webhook_id for delivery, _ in deliveries],
                        [job_id for _, job_id in deliveries],
                        [delivery.received_at for delivery, _ in deliveries],
                        [delivery.digest for delivery, _ in deliveries],
                    ),
                )
            jobs = {row["id"]: Job.from_row(row) for row in await locked.fetchall()}
            new = {row["webhook_id"] for row in await recorded.fetchall()} if recorded else set()
            outcomes: list[Outcome] = []
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
                if binding.refused:
                    if call.delivery is not None:
                        await conn.execute(_MARK_REFUSED, (call.delivery.webhook_id,))
                    await _refuse(conn, call, job, binding.refused)
                    outcomes.append((True, Applied(job, None, refused=binding.refused)))
                    continue
                plan = _plan(call, job)
                await _write(conn, call, job, plan)
                jobs[job.id] = plan.applied_to(job)
                outcomes.append((True, Applied(jobs[job.id], plan.decision)))
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
