"""Receiving job-completion callbacks.

Order matters: the body was read up to the size limit (``endpoint``), the instance
whose keys may verify it is settled (at ``/callbacks/jobs/{id}`` the job's, read by its
id and remembered, ``404 job_not_found`` when there is no such job; at
``/callbacks/instances/{name}`` that instance, ``/callbacks`` the default instance's),
the signature is verified over those raw bytes with that instance's keys only, and
only then is the body parsed. A body signed with another instance's key is refused like
any forgery (``401``), so a key leaked from one instance moves no other instance's job.
The answer is given only after the store committed the delivery, the observation and
the timeline entry in one transaction.

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
- at an instance-wide URL (``/callbacks`` is the default instance's): a body whose
  payload and upstream id name two different jobs (or whose payload's job has another
  upstream id), or whose payload names another instance's job, is ``409 wrong_job``;
  its upstream id is looked up among this instance's jobs only (two accounts can both
  have upstream job 1234), and a body about a job not known yet is kept with this
  instance, to be applied only to a job of it.

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

import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service import values
from service.callbacks import notification, signatures
from service.callbacks.job_instances import JobInstances
from service.callbacks.pacing import PACED, Pacing
from service.callbacks.rejections import RejectionLog
from service.callbacks.signatures import Keyring, Verification
from service.errors import ApiError, error_body
from service.jobs import Observation
from service.logs import Repeats, short
from service.metrics import Metrics
from service.store import Applied, Delivery, Store, StoreError
from service.store.base import Claim, Rejection

__all__ = [
    "UNKNOWN",
    "Answer",
    "CallbackHeaders",
    "CallbackReceiver",
    "receive",
    "refusal_log",
    "refuse",
    "unknown_instance",
]

log = logging.getLogger("bulkhook.callbacks")

# The instance label of a callback refused before its instance was known (a made-up
# job URL, a body too large to read at a job's URL, an instance not configured).
UNKNOWN = "unknown"


def refusal_log() -> Repeats:
    """The log of refused callbacks: a line per kind and ten seconds, the rest counted."""
    return Repeats(log)


@dataclass(frozen=True, slots=True)
class CallbackReceiver:
    """What receiving a callback uses, handed over by the app that built them."""

    store: Store
    # Each configured instance's keys, by its name: a callback is verified with its
    # instance's keys only.
    keyrings: Mapping[str, Keyring]
    # The instance whose instance-wide URL is ``/callbacks``.
    default_instance: str
    metrics: Metrics
    # Asks the poller to look now: a verified callback that carried no usable status.
    wake: Callable[[], None]
    # How long after an applied callback the job's next poll is due.
    callback_grace: float
    # The largest body read; a longer one is refused unread (413).
    max_bytes: int
    # Notes refused callbacks in the store, a bounded number of rows a second.
    rejections: RejectionLog
    # Holds the answers of refusals given before a signature verified.
    pacing: Pacing
    # Wakes the work a job's end schedules (the copier, the fetcher), so it starts now
    # rather than at its next look at the store.
    ended: Callable[[], None] = lambda: None
    # The instances of the jobs callbacks lately came for (a job's never changes).
    jobs: JobInstances = field(default_factory=JobInstances)


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
    # Sent only after the pacing delay: a refusal given before a signature verified.
    paced: bool = False

    def closing(self) -> Answer:
        """The same answer, sent now and closing its connection."""
        headers = {**(self.headers or {}), "Connection": "close"}
        return dataclasses.replace(self, headers=headers, paced=False)


def refuse(
    receiver: CallbackReceiver,
    job_id: str | None,
    webhook_id: str | None,
    reason: str,
    error: ApiError,
    repeats: Repeats,
    instance: str = UNKNOWN,
) -> Answer:
    """The refusal, counted, logged and noted for the dashboard; paced when it was
    given before the signature verified (``PACED``).

    The row is written after the answer was sent, keeping the refusal as prompt as
    ever (and best effort: it is answered even when the store is down), or not at all
    but counted into its second's summary (``rejections``). Only what identifies the
    delivery is kept, truncated: never the body, which is neither trusted nor parsed.
    A path id that cannot be a job id is not kept at all.
    """
    receiver.metrics.callback(reason, instance)
    _log_refusal(repeats, reason, error.message, job_id, webhook_id, instance)
    job_ref = job_id if job_id is not None and values.job_id_ok(job_id) else None
    rejection = Rejection(
        time.time(),
        reason,
        values.safe_text(error.message, 300),
        job_ref,
        (webhook_id or "").strip()[:200] or None,
    )
    note = receiver.rejections.note(rejection)
    payload = error_body(error.code, error.message, **error.extra)
    return Answer(error.status, payload, error.headers, after=note, paced=reason in PACED)


def unknown_instance(
    receiver: CallbackReceiver, name: str, webhook_id: str | None, repeats: Repeats
) -> Answer | None:
    """The answer at the instance-wide URL of an instance that is not configured (``404
    unknown_instance``, paced, nothing stored: there are no keys to verify with, and
    the name is the sender's); None for a configured one."""
    if name in receiver.keyrings:
        return None
    message = f"no connector instance {short(name)!r} is configured"
    receiver.metrics.callback("unknown_instance", UNKNOWN)
    _log_refusal(repeats, "unknown_instance", message, None, webhook_id, UNKNOWN)
    return Answer(404, error_body("unknown_instance", message), paced=True)


def _log_refusal(
    repeats: Repeats,
    outcome: str,
    message: str,
    job_id: str | None,
    webhook_id: str | None,
    instance: str,
) -> None:
    """One line per outcome and window; every id in it cut short (a sender picks them)."""
    repeats.warning(
        outcome,
        "callback refused (%s): %s",
        outcome,
        short(message, 200),
        extra={
            "job_id": short(job_id),
            "webhook_id": short(webhook_id),
            "outcome": outcome,
            "instance": instance,
        },
    )


def _no_job(
    receiver: CallbackReceiver, repeats: Repeats, job_id: str, webhook_id: str | None
) -> Answer:
    """A per-job URL that names no job: never genuine (a job's row exists before the
    upstream learns its URL), so nothing is stored, kept or verified further, and the
    answer is paced."""
    message = f"no job {short(job_id)!r}"
    receiver.metrics.callback("job_not_found", UNKNOWN)
    _log_refusal(repeats, "job_not_found", message, job_id, webhook_id, UNKNOWN)
    return Answer(404, error_body("job_not_found", message), paced=True)


async def _instance_of(receiver: CallbackReceiver, job_id: str) -> str | None:
    """The job's instance: remembered after the first read (it never changes); None
    when there is no such job."""
    instance = receiver.jobs.get(job_id)
    if instance is None:
        instance = await receiver.store.job_instance(job_id)
        if instance is not None:
            receiver.jobs.remember(job_id, instance)
    return instance


def _verify(keyring: Keyring, given: tuple[str, ...], body: bytes) -> Verification | str:
    """The verification under ``keyring`` when it holds, else what was wrong."""
    if len(given) > 1:
        return f"the {signatures.HEADER} header was given {len(given)} times"
    verdict = keyring.verify(given[0] if given else None, body)
    return verdict if verdict.ok else f"signature check failed: {verdict.reason}"


def _verified_by_none(receiver: CallbackReceiver, given: tuple[str, ...], body: bytes) -> bool:
    """Whether no configured key at all verifies the body: while the store cannot say
    which instance a job is of, such a body is refused at once, as ever (it could not be
    genuine under any instance); any other waits for the store."""
    return all(isinstance(_verify(keys, given, body), str) for keys in receiver.keyrings.values())


def _wrong_job(
    receiver: CallbackReceiver,
    repeats: Repeats,
    job_id: str,
    webhook_id: str,
    why: str,
    started: float,
    instance: str,
) -> Answer:
    """A verified body about another job, refused by the store (in the job's timeline)."""
    message = f"the callback is not about job {job_id}: {why}; nothing changed"
    receiver.metrics.callback("wrong_job", instance)
    receiver.metrics.callbacks.acknowledged(time.perf_counter() - started)
    _log_refusal(repeats, "wrong_job", message, job_id, webhook_id, instance)
    return Answer(409, error_body("wrong_job", message))


def _answer(
    receiver: CallbackReceiver,
    applied: Applied,
    webhook_id: str,
    nudge: bool,
    started: float,
    instance: str,
) -> Answer:
    job = applied.job
    outcome = "duplicate" if applied.duplicate else "accepted"
    receiver.metrics.callback(outcome, instance)
    receiver.metrics.callbacks.acknowledged(time.perf_counter() - started)
    if nudge and not applied.duplicate:
        receiver.wake()
    if applied.ended:
        receiver.ended()
    # Debug, as uvicorn's access log is off: a line per delivery cost a seventh of the
    # service's own work per callback, and every accepted or duplicate delivery is kept
    # anyway (the job's timeline, the dashboard's callback log, the metrics).
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "callback %s: job %s is %s",
            outcome,
            job.id,
            job.state,
            extra={
                "job_id": job.id,
                "webhook_id": webhook_id,
                "outcome": outcome,
                "instance": instance,
            },
        )
    return Answer(200, {"status": outcome, "job": job.id, "state": str(job.state)})


async def _keep(
    receiver: CallbackReceiver, delivery: Delivery, body: bytes, started: float, instance: str
) -> str | Answer:
    """Keep a callback that cannot be applied yet: ``"known"`` means apply it instead."""
    kept = await receiver.store.keep_callback(
        delivery, reason="unknown_job", body=body, instance=instance
    )
    if kept == "known":
        return kept
    receiver.metrics.callback("unknown_job" if kept == "kept" else "duplicate", instance)
    receiver.metrics.callbacks.acknowledged(time.perf_counter() - started)
    return Answer(202, {"status": kept})


async def receive(
    receiver: CallbackReceiver,
    job_id: str | None,
    headers: CallbackHeaders,
    body: bytes,
    repeats: Repeats,
    instance: str | None = None,
) -> Answer:
    """Verify, then record and apply one delivery; raises ApiError for a 4xx.

    ``job_id`` is the per-job URL's; otherwise the delivery came to the instance-wide
    URL of ``instance`` (the default instance's when None), which must be configured
    (``unknown_instance`` answers for one that is not, before the body is read).
    """
    started = time.perf_counter()
    given = headers.signatures
    if job_id is not None:
        if not values.job_id_ok(job_id):
            return _no_job(receiver, repeats, job_id, headers.webhook_id)
        # Remembered after the first callback: one dictionary lookup, no store round trip.
        instance = receiver.jobs.get(job_id)
        if instance is None:
            try:
                instance = await _instance_of(receiver, job_id)
            except StoreError:
                if _verified_by_none(receiver, given, body):
                    error = ApiError(
                        "signature check failed: no configured key verifies the body",
                        code="bad_signature",
                        status=401,
                    )
                    return refuse(
                        receiver, job_id, headers.webhook_id, "bad_signature", error, repeats
                    )
                raise
            if instance is None:
                return _no_job(receiver, repeats, job_id, headers.webhook_id)
    elif instance is None:
        instance = receiver.default_instance
    keyring = receiver.keyrings.get(instance)
    if keyring is None:
        # Only a job's instance can be missing here (the endpoint answers an instance
        # URL's first): a job of an instance no longer configured.
        error = ApiError(
            f"job {job_id} is of connector instance {short(instance)!r}, which is not"
            " configured: there is no key to verify its callbacks with",
            code="unknown_instance",
            status=401,
        )
        return refuse(
            receiver, job_id, headers.webhook_id, "unknown_instance", error, repeats, instance
        )
    verified = _verify(keyring, given, body)
    if isinstance(verified, str):
        error = ApiError(verified, code="bad_signature", status=401)
        return refuse(
            receiver, job_id, headers.webhook_id, "bad_signature", error, repeats, instance
        )
    digest = hashlib.sha256(body).hexdigest()
    webhook_id = (headers.webhook_id or "").strip()[:200] or f"sha256:{digest}"
    now = time.time()
    data = notification.parse(body)
    if data is None:
        await receiver.store.keep_callback(
            Delivery(webhook_id, now, job_id, digest),
            reason="malformed",
            body=body,
            instance=instance,
        )
        receiver.metrics.callback("malformed", instance)
        raise ApiError("the callback body is not a JSON object", code="malformed_callback")
    observation, claim = notification.read(
        data,
        now,
        f"signature verified ({verified.algorithm}, key {verified.key_index});"
        f" delivery {webhook_id}",
    )
    if job_id is not None:
        return await _at_job_url(
            receiver,
            instance,
            job_id,
            webhook_id,
            digest,
            observation,
            claim,
            body,
            repeats,
            started,
        )
    return await _at_instance_url(
        receiver, instance, webhook_id, digest, observation, claim, body, repeats, started
    )


async def _at_job_url(
    receiver: CallbackReceiver,
    instance: str,
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
            return _wrong_job(
                receiver, repeats, job_id, webhook_id, applied.refused, started, instance
            )
        if not applied.waiting:
            return _answer(receiver, applied, webhook_id, nudge, started, instance)
        kept = await _keep(receiver, delivery, body, started, instance)
        if isinstance(kept, Answer):
            return kept
    raise StoreError(f"job {job_id} kept changing while a callback was applied")


def _not_ours(
    receiver: CallbackReceiver, instance: str, webhook_id: str, why: str, repeats: Repeats
) -> Answer:
    """A verified body at an instance-wide URL about no job it may change; nothing changed."""
    error = ApiError(f"{why}; nothing changed", code="wrong_job", status=409)
    return refuse(receiver, None, webhook_id, "wrong_job", error, repeats, instance)


async def _at_instance_url(
    receiver: CallbackReceiver,
    instance: str,
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
    payload = claim.payload
    for _ in range(2):
        target: str | None = None
        if claim.upstream_id is not None:
            # Upstream ids are unique only within an instance: looked up among its jobs.
            other = await receiver.store.find_by_upstream_id(claim.upstream_id, instance)
            if other is not None and payload is not None and other.id != payload:
                return _not_ours(
                    receiver,
                    instance,
                    webhook_id,
                    "the callback names two different jobs: its callback-payload names job"
                    f" {short(payload)}, its id upstream job {short(claim.upstream_id)},"
                    f" which is job {other.id}",
                    repeats,
                )
            target = other.id if other is not None else None
        if payload is not None:
            if target is None and values.job_id_ok(payload):
                owner = await _instance_of(receiver, payload)
                if owner is not None and owner != instance:
                    return _not_ours(
                        receiver,
                        instance,
                        webhook_id,
                        f"its callback-payload names job {payload}, which is not a job of"
                        f" connector instance {instance!r}",
                        repeats,
                    )
            target = payload
        if target is not None and values.job_id_ok(target):
            applied = await receiver.store.apply(
                target,
                observation,
                delivery=Delivery(webhook_id, now, target, digest),
                next_poll_at=next_poll_at,
                claim=claim,
            )
            if applied is not None and applied.refused:
                return _wrong_job(
                    receiver, repeats, target, webhook_id, applied.refused, started, instance
                )
            if applied is not None and not applied.waiting:
                return _answer(receiver, applied, webhook_id, nudge, started, instance)
        ref = payload or claim.upstream_id
        delivery = Delivery(webhook_id, now, ref, digest)
        kept = await _keep(receiver, delivery, body, started, instance)
        if isinstance(kept, Answer):
            return kept
    # Its reference is a known job's, yet it binds to none: a payload that is not one
    # of this service's job ids but some job's upstream id, say.
    return _not_ours(
        receiver,
        instance,
        webhook_id,
        "the callback names no job of this service that it can be applied to",
        repeats,
    )
