"""Receiving job-completion callbacks.

Order matters: the body was read up to the size limit (``endpoint``), the per-job
URL's id is checked to be one of this service's job ids (``404 job_not_found`` if
not, before any other work), the signature is verified over those raw bytes, and
only then is the body parsed. The answer is given only after the store committed the
delivery, the observation and the timeline entry in one transaction.

A signed body is about one job. The upstream signs the body, not the URL, so a
genuine body can be replayed to any URL; what the body says it is about (its
``callback-payload``, this service's job id, and its upstream ``id``/``jobId``) is
checked against the job in the store's write (``store.plan.bind``):

- at ``/callbacks/jobs/{id}``: no such job is ``404 job_not_found``, nothing stored,
  whether the signature holds or not (the store is read only once it does not, or
  by the write itself);
  a body naming another job, or another upstream job than the job's, is
  ``409 wrong_job``, noted once in the job's timeline, the job unchanged; a body
  naming an upstream job while the job's upstream id is not known yet, and not
  naming this job by its payload, is kept (``202 kept``) and applied only if the
  submit's answer gives the job that upstream id; a body naming no job at all is
  taken as a nudge to poll now, its status not applied;
- at ``/callbacks``: a body whose payload and upstream id name two different jobs
  (or whose payload's job has another upstream id) is ``409 wrong_job``.

The same body delivered again to the same job is a repeat whatever its webhook id
(``200 duplicate``): the delivery is deduplicated by the body's SHA-256 per job too.
Values in a verified body are still untrusted (``values``): an unusable count is
ignored with a note, an unusable status makes the callback a nudge, and a body that
``json`` cannot parse (a 5,000-digit number, nesting past the recursion limit) is
``400 malformed_callback``, kept for inspection. Refusals are logged through
``logs.Repeats`` with ids cut short, so a flood writes a bounded number of lines.

Nothing here knows about HTTP framing: ``receive`` takes the headers that matter and
the raw body, and returns the ``Answer`` to send.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from service import values
from service.callbacks import notification, signatures
from service.callbacks.signatures import Keyring
from service.errors import ApiError, error_body
from service.jobs import Observation
from service.logs import Repeats, short
from service.metrics import Metrics
from service.store import Applied, Delivery, Store, StoreError
from service.store.base import Claim, Rejection

__all__ = [
    "Answer",
    "CallbackHeaders",
    "CallbackReceiver",
    "receive",
    "refusal_log",
    "refuse",
]

log = logging.getLogger("bulkhook.callbacks")


def refusal_log() -> Repeats:
    """The log of refused callbacks: a line per kind and ten seconds, the rest counted."""
    return Repeats(log)


@dataclass(frozen=True, slots=True)
class CallbackReceiver:
    """What receiving a callback uses, handed over by the app that built them."""

    store: Store
    keyring: Keyring
    metrics: Metrics
    # Asks the poller to look now: a verified callback that carried no usable status.
    wake: Callable[[], None]
    # How long after an applied callback the job's next poll is due.
    callback_grace: float
    # The largest body read; a longer one is refused unread (413).
    max_bytes: int
    # Wakes the work a job's end schedules (the copier, the fetcher), so it starts now
    # rather than at its next look at the store.
    ended: Callable[[], None] = lambda: None


@dataclass(frozen=True, slots=True)
class CallbackHeaders:
    """The request headers a callback is judged by, as sent."""

    signatures: tuple[str, ...] = ()
    webhook_id: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    payload: dict[str, Any]
    headers: Mapping[str, str] | None = None
    # Work that must not delay the answer: run once it has been sent.
    after: Callable[[], Awaitable[None]] | None = None


def refuse(
    receiver: CallbackReceiver,
    job_id: str | None,
    webhook_id: str | None,
    reason: str,
    error: ApiError,
    repeats: Repeats,
) -> Answer:
    """The refusal, counted and logged; it is noted for the dashboard only after it was
    sent.

    Noting it after answering keeps the refusal as prompt as ever (and best effort:
    it is answered even when the store is down). Only what identifies the delivery is
    kept, truncated: never the body, which is neither trusted nor parsed. A path id
    that cannot be a job id is not kept at all.
    """
    receiver.metrics.callback(reason)
    _log_refusal(repeats, reason, error.message, job_id, webhook_id)
    job_ref = job_id if job_id is not None and values.job_id_ok(job_id) else None
    rejection = Rejection(
        time.time(),
        reason,
        values.safe_text(error.message, 300),
        job_ref,
        (webhook_id or "").strip()[:200] or None,
    )

    async def note() -> None:
        try:
            await receiver.store.record_rejection(rejection)
        except Exception as exc:
            repeats.warning(
                "note_failed",
                "could not note a refused callback: %r",
                exc,
                extra={"outcome": reason},
            )

    payload = error_body(error.code, error.message, **error.extra)
    return Answer(error.status, payload, error.headers, after=note)


def _log_refusal(
    repeats: Repeats, outcome: str, message: str, job_id: str | None, webhook_id: str | None
) -> None:
    """One line per outcome and window; every id in it cut short (a sender picks them)."""
    repeats.warning(
        outcome,
        "callback refused (%s): %s",
        outcome,
        short(message, 200),
        extra={"job_id": short(job_id), "webhook_id": short(webhook_id), "outcome": outcome},
    )


def _no_job(
    receiver: CallbackReceiver, repeats: Repeats, job_id: str, webhook_id: str | None
) -> Answer:
    """A per-job URL that names no job: never genuine (a job's row exists before the
    upstream learns its URL), so nothing is stored, kept or verified further."""
    message = f"no job {short(job_id)!r}"
    receiver.metrics.callback("job_not_found")
    _log_refusal(repeats, "job_not_found", message, job_id, webhook_id)
    return Answer(404, error_body("job_not_found", message))


async def _may_exist(receiver: CallbackReceiver, job_id: str) -> bool:
    """Whether the job may exist; True when the store cannot say (the refusal is then
    answered as before: promptly, even while the store is down)."""
    try:
        return await receiver.store.get_job(job_id, with_events=False) is not None
    except Exception:
        return True


def _wrong_job(
    receiver: CallbackReceiver,
    repeats: Repeats,
    job_id: str,
    webhook_id: str,
    why: str,
    started: float,
) -> Answer:
    """A verified body about another job, refused by the store (in the job's timeline)."""
    message = f"the callback is not about job {job_id}: {why}; nothing changed"
    receiver.metrics.callback("wrong_job")
    receiver.metrics.callback_latency.observe(time.perf_counter() - started)
    _log_refusal(repeats, "wrong_job", message, job_id, webhook_id)
    return Answer(409, error_body("wrong_job", message))


def _answer(
    receiver: CallbackReceiver, applied: Applied, webhook_id: str, nudge: bool, started: float
) -> Answer:
    job = applied.job
    outcome = "duplicate" if applied.duplicate else "accepted"
    receiver.metrics.callback(outcome)
    receiver.metrics.callback_latency.observe(time.perf_counter() - started)
    if nudge and not applied.duplicate:
        receiver.wake()
    if applied.ended:
        receiver.ended()
    # Debug, as uvicorn's access log is off: a line per delivery cost a seventh of the
    # service's own work per callback, and every accepted or duplicate delivery is kept
    # anyway (the job's timeline, the dashboard's callback log, the metrics).
    log.debug(
        "callback %s: job %s is %s",
        outcome,
        job.id,
        job.state,
        extra={"job_id": job.id, "webhook_id": webhook_id, "outcome": outcome},
    )
    return Answer(200, {"status": outcome, "job": job.id, "state": str(job.state)})


async def _keep(
    receiver: CallbackReceiver, delivery: Delivery, body: bytes, started: float
) -> str | Answer:
    """Keep a callback that cannot be applied yet: ``"known"`` means apply it instead."""
    kept = await receiver.store.keep_callback(delivery, reason="unknown_job", body=body)
    if kept == "known":
        return kept
    receiver.metrics.callback("unknown_job" if kept == "kept" else "duplicate")
    receiver.metrics.callback_latency.observe(time.perf_counter() - started)
    return Answer(202, {"status": kept})


async def receive(
    receiver: CallbackReceiver,
    job_id: str | None,
    headers: CallbackHeaders,
    body: bytes,
    repeats: Repeats,
) -> Answer:
    """Verify, then record and apply one delivery; raises ApiError for a 4xx."""
    started = time.perf_counter()
    if job_id is not None and not values.job_id_ok(job_id):
        return _no_job(receiver, repeats, job_id, headers.webhook_id)
    given = headers.signatures
    verdict = None
    if len(given) > 1:
        problem = f"the {signatures.HEADER} header was given {len(given)} times"
    else:
        verdict = receiver.keyring.verify(given[0] if given else None, body)
        problem = f"signature check failed: {verdict.reason}"
    if verdict is None or not verdict.ok:
        if job_id is not None and not await _may_exist(receiver, job_id):
            # Read only once the check failed: a forgery to a made-up URL stores nothing.
            return _no_job(receiver, repeats, job_id, headers.webhook_id)
        error = ApiError(problem, code="bad_signature", status=401)
        return refuse(receiver, job_id, headers.webhook_id, "bad_signature", error, repeats)
    digest = hashlib.sha256(body).hexdigest()
    webhook_id = (headers.webhook_id or "").strip()[:200] or f"sha256:{digest}"
    now = time.time()
    data = notification.parse(body)
    if data is None:
        if job_id is not None and await receiver.store.get_job(job_id, with_events=False) is None:
            return _no_job(receiver, repeats, job_id, webhook_id)
        await receiver.store.keep_callback(
            Delivery(webhook_id, now, job_id, digest), reason="malformed", body=body
        )
        receiver.metrics.callback("malformed")
        raise ApiError("the callback body is not a JSON object", code="malformed_callback")
    observation, claim = notification.read(
        data,
        now,
        f"signature verified ({verdict.algorithm}, key {verdict.key_index}); delivery {webhook_id}",
    )
    if job_id is not None:
        return await _at_job_url(
            receiver, job_id, webhook_id, digest, observation, claim, body, repeats, started
        )
    return await _at_instance_url(
        receiver, webhook_id, digest, observation, claim, body, repeats, started
    )


async def _at_job_url(
    receiver: CallbackReceiver,
    job_id: str,
    webhook_id: str,
    digest: str,
    observation: Observation,
    claim: Claim,
    body: bytes,
    repeats: Repeats,
    started: float,
) -> Answer:
    now = observation.at
    delivery = Delivery(webhook_id, now, job_id, digest)
    if not claim.names_a_job:
        observation = notification.nudge_only(observation)
    nudge = observation.target() is None
    next_poll_at = now if nudge else now + receiver.callback_grace
    for _ in range(2):
        # One write does it all for a known job: check the claim, dedupe, decide, record.
        applied = await receiver.store.apply(
            job_id,
            observation,
            delivery=delivery,
            next_poll_at=next_poll_at,
            claim=claim if claim.names_a_job else None,
        )
        if applied is None:
            return _no_job(receiver, repeats, job_id, webhook_id)
        if applied.refused:
            return _wrong_job(receiver, repeats, job_id, webhook_id, applied.refused, started)
        if not applied.waiting:
            return _answer(receiver, applied, webhook_id, nudge, started)
        kept = await _keep(receiver, delivery, body, started)
        if isinstance(kept, Answer):
            return kept
    raise StoreError(f"job {job_id} kept changing while a callback was applied")


async def _at_instance_url(
    receiver: CallbackReceiver,
    webhook_id: str,
    digest: str,
    observation: Observation,
    claim: Claim,
    body: bytes,
    repeats: Repeats,
    started: float,
) -> Answer:
    now = observation.at
    nudge = observation.target() is None
    next_poll_at = now if nudge else now + receiver.callback_grace
    for _ in range(2):
        target: str | None = None
        if claim.upstream_id is not None:
            # Lookups by upstream id read the store once, as the payload's did before.
            other = await receiver.store.find_by_upstream_id(claim.upstream_id, "default")
            if other is not None and claim.payload is not None and other.id != claim.payload:
                why = (
                    f"its callback-payload names job {short(claim.payload)}, its id upstream"
                    f" job {short(claim.upstream_id)}, which is job {other.id}"
                )
                error = ApiError(
                    f"the callback names two different jobs: {why}; nothing changed",
                    code="wrong_job",
                    status=409,
                )
                return refuse(receiver, None, webhook_id, "wrong_job", error, repeats)
            target = other.id if other is not None else None
        if claim.payload is not None:
            target = claim.payload
        if target is not None and values.job_id_ok(target):
            applied = await receiver.store.apply(
                target,
                observation,
                delivery=Delivery(webhook_id, now, target, digest),
                next_poll_at=next_poll_at,
                claim=claim,
            )
            if applied is not None and applied.refused:
                return _wrong_job(receiver, repeats, target, webhook_id, applied.refused, started)
            if applied is not None and not applied.waiting:
                return _answer(receiver, applied, webhook_id, nudge, started)
        ref = claim.payload or claim.upstream_id
        kept = await _keep(receiver, Delivery(webhook_id, now, ref, digest), body, started)
        if isinstance(kept, Answer):
            return kept
    # Its reference is a known job's, yet it binds to none: a payload that is not one
    # of this service's job ids but some job's upstream id, say.
    error = ApiError(
        "the callback names no job of this service that it can be applied to; nothing changed",
        code="wrong_job",
        status=409,
    )
    return refuse(receiver, None, webhook_id, "wrong_job", error, repeats)
