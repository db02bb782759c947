"""Applying observations on PostgreSQL: every apply waiting runs in one transaction.

A round of applies costs two round trips in pipeline mode, however many it holds:
the first locks every job of the round (in id order, so that replicas' rounds never
deadlock) and records the deliveries; the second sends each job's compare-and-set with
its timeline entry, then COMMIT. Applied one by one, each callback cost four round
trips (BEGIN, the locked read, the write, COMMIT) and a commit of its own.

If anything in a round fails, the round is rolled back and its applies run again,
each in a transaction of its own (``apply_one``), so a failure is its caller's alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from ..jobs import Job, Observation
from .base import Applied, Delivery, StoreError, _Keep
from .plan import Plan, plan_apply
from .rounds import Outcome

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


_LOCK_JOB = "SELECT * FROM jobs WHERE id = %s FOR UPDATE"
_LOCK_JOBS = "SELECT * FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
# The delivery is recorded (or found recorded already) in the same statement that locks
# the job: ``fresh`` is false for a repeat.
_LOCK_JOB_AND_DEDUPE = """
    WITH delivered AS (
        INSERT INTO deliveries VALUES (%s, %s, %s)
        ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id
    )
    SELECT jobs.*, EXISTS (SELECT 1 FROM delivered) AS fresh
    FROM jobs WHERE id = %s FOR UPDATE"""
# A round's deliveries, those of known jobs only (an unknown job's callback is kept
# instead); the ones returned are new, the others repeats.
_RECORD_DELIVERIES = """
    INSERT INTO deliveries (webhook_id, job_id, received_at)
    SELECT webhook_id, job_id, received_at
    FROM unnest(%s::text[], %s::text[], %s::float8[]) AS d (webhook_id, job_id, received_at)
    WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d.job_id)
    ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id"""
# Pairs with keep_callback: a callback racing the submit that records this upstream id
# is either kept before (and applied by the submitter) or sees the job (and applies).
_LOCK_UPSTREAM_ID = "SELECT pg_advisory_xact_lock(hashtext(%s))"
_MARK_KEPT_APPLIED = "UPDATE kept_callbacks SET applied_at = %s WHERE id = %s"


def _write_sql(plan: Plan) -> str:
    """The compare-and-set and its timeline entry, in one statement.

    The entry names the job through the update: a failed compare-and-set leaves it
    NULL, which the NOT NULL column refuses, failing the statement and its round.
    """
    assignments = ", ".join(f"{name} = %s" for name in plan.changes)
    return (
        f"WITH updated AS (UPDATE jobs SET {assignments}, version = version + 1 "
        "WHERE id = %s AND version = %s RETURNING id) "
        "INSERT INTO events (job_id, at, source, state, detail) "
        "VALUES ((SELECT id FROM updated), %s, %s, %s, %s)"
    )


def _plan(call: ApplyCall, job: Job) -> Plan:
    return plan_apply(
        job, call.observation, upstream_id=call.upstream_id, next_poll_at=call.next_poll_at
    )


async def _write(conn: Conn, call: ApplyCall, job: Job, plan: Plan) -> None:
    if "upstream_id" in plan.changes:
        await conn.execute(_LOCK_UPSTREAM_ID, (plan.changes["upstream_id"],))
    await conn.execute(
        _write_sql(plan),  # type: ignore[arg-type]
        (*plan.changes.values(), job.id, job.version, call.observation.at, *plan.event),
    )
    if call.kept_id is not None:
        await conn.execute(_MARK_KEPT_APPLIED, (call.observation.at, call.kept_id))


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
                if call.delivery is not None:
                    if call.delivery.webhook_id not in new:
                        outcomes.append((True, Applied(job, None, duplicate=True)))
                        continue
                    new.discard(call.delivery.webhook_id)  # a second in this round repeats it
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


async def apply_one(conn: Conn, call: ApplyCall) -> Applied | None:
    """One call in a transaction of its own: a round's calls after the round failed."""
    async with conn.transaction():
        if call.delivery is None:
            row = await (await conn.execute(_LOCK_JOB, (call.job_id,))).fetchone()
            fresh = True
        else:
            delivery = call.delivery
            values = (delivery.webhook_id, call.job_id, delivery.received_at, call.job_id)
            row = await (await conn.execute(_LOCK_JOB_AND_DEDUPE, values)).fetchone()
            fresh = bool(row and row.pop("fresh"))
        if row is None:
            raise psycopg.Rollback()  # no such job: the delivery is not recorded
        job = Job.from_row(row)
        if not fresh:
            return Applied(job, None, duplicate=True)
        plan = _plan(call, job)
        try:
            await _write(conn, call, job, plan)
        except psycopg.errors.NotNullViolation as exc:
            raise StoreError(
                f"job {call.job_id} changed underneath (compare-and-set failed)"
            ) from exc
        return Applied(plan.applied_to(job), plan.decision)
    return None
