"""Receiving job-completion callbacks (DESIGN §3 "Receiving a callback").

Order matters: the body was read up to the size limit (``ingress.py``), the signature
is verified over those raw bytes, and only then is the body parsed. The answer is
given only after the store committed the delivery, the observation and the timeline
entry in one transaction.

Nothing here knows about HTTP framing: ``receive`` takes the headers that matter and
the raw body, and returns the ``Answer`` to send.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import signatures
from .errors import ApiError, error_body
from .jobs import Observation, Source
from .statuses import normalize_status
from .store import Delivery
from .store.base import Rejection

if TYPE_CHECKING:
    from .state import AppState

__all__ = ["Answer", "CallbackHeaders", "observation_from_body", "receive", "refuse"]

log = logging.getLogger("bulkhook.callbacks")


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


def _fields(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body's top level, and the ``message`` object event-style bodies nest under."""
    message = data.get("message")
    return data, message if isinstance(message, dict) else {}


def _first(fields: tuple[dict[str, Any], dict[str, Any]], *names: str) -> Any:
    for source in fields:
        for name in names:
            value = source.get(name)
            if value is not None and value != "":
                return value
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text[:200] or None


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _observation(data: dict[str, Any], at: float, detail: str = "") -> Observation:
    fields = _fields(data)
    raw_status = _text(_first(fields, "status", "jobStatus"))
    return Observation(
        Source.CALLBACK,
        status=normalize_status(raw_status),
        raw_status=raw_status,
        records_count=_count(_first(fields, "recordsCount")),
        records_failed_count=_count(_first(fields, "recordsFailedCount")),
        at=at,
        detail=detail,
    )


def observation_from_body(body: bytes, at: float) -> Observation | None:
    """What a verified callback body says; None when it is not a JSON object."""
    data = _parse(body)
    return None if data is None else _observation(data, at)


def _refs(data: dict[str, Any]) -> tuple[str | None, str | None]:
    """(our job id from callback-payload, the upstream job id) named by a body."""
    fields = _fields(data)
    payload = _text(_first(fields, "callback-payload", "callbackPayload"))
    upstream = _text(_first(fields, "id", "jobId"))
    return payload, upstream


async def _find_job_id(
    state: AppState, job_id: str | None, payload_id: str | None, upstream_id: str | None
) -> str | None:
    """The per-job URL names the job; the instance-wide one needs a lookup."""
    if job_id is not None:
        return job_id
    if payload_id is not None and await state.store.get_job(payload_id, with_events=False):
        return payload_id
    if upstream_id is not None:
        job = await state.store.find_by_upstream_id(upstream_id)
        return job.id if job else None
    return None


def refuse(
    state: AppState,
    job_id: str | None,
    webhook_id: str | None,
    reason: str,
    error: ApiError,
) -> Answer:
    """The refusal, counted; it is noted for the dashboard only after it was sent.

    Noting it after answering keeps the refusal as prompt as ever (and best effort:
    it is answered even when the store is down). Only what identifies the delivery is
    kept, truncated: never the body, which is neither trusted nor parsed.
    """
    state.metrics.callback(reason)
    rejection = Rejection(
        time.time(),
        reason,
        error.message[:300],
        job_id[:200] if job_id else None,
        (webhook_id or "").strip()[:200] or None,
    )

    async def note() -> None:
        try:
            await state.store.record_rejection(rejection)
        except Exception as exc:
            log.warning("could not note a refused callback: %r", exc, extra={"outcome": reason})

    payload = error_body(error.code, error.message, **error.extra)
    return Answer(error.status, payload, error.headers, after=note)


async def receive(
    state: AppState, job_id: str | None, headers: CallbackHeaders, body: bytes
) -> Answer:
    """Verify, then record and apply one delivery; raises ApiError for a 4xx."""
    started = time.perf_counter()
    metrics = state.metrics
    given = headers.signatures
    if len(given) > 1:
        error = ApiError(
            f"the {signatures.HEADER} header was given {len(given)} times",
            code="bad_signature",
            status=401,
        )
        return refuse(state, job_id, headers.webhook_id, "bad_signature", error)
    verdict = state.keyring.verify(given[0] if given else None, body)
    if not verdict.ok:
        log.warning(
            "callback refused: %s",
            verdict.verdict.value,
            extra={"job_id": job_id, "outcome": "bad_signature"},
        )
        error = ApiError(
            f"signature check failed: {verdict.reason}", code="bad_signature", status=401
        )
        return refuse(state, job_id, headers.webhook_id, "bad_signature", error)
    webhook_id = headers.webhook_id or f"sha256:{hashlib.sha256(body).hexdigest()}"
    webhook_id = webhook_id.strip()[:200]
    now = time.time()
    data = _parse(body)
    if data is None:
        await state.store.keep_callback(
            Delivery(webhook_id, now, job_id), reason="malformed", body=body
        )
        metrics.callback("malformed")
        raise ApiError("the callback body is not a JSON object", code="malformed_callback")
    observation = _observation(
        data,
        now,
        f"signature verified ({verdict.algorithm}, key {verdict.key_index}); delivery {webhook_id}",
    )
    payload_id, upstream_id = _refs(data)
    nudge = observation.target() is None
    applied = None
    for _ in range(2):
        # One write does it all for a known job: dedupe, decide, record.
        target = await _find_job_id(state, job_id, payload_id, upstream_id)
        if target is not None:
            applied = await state.store.apply(
                target,
                observation,
                delivery=Delivery(webhook_id, now, target),
                upstream_id=upstream_id,
                next_poll_at=now if nudge else now + state.settings.callback_grace,
            )
        if applied is not None:
            break
        ref = job_id or payload_id or upstream_id
        kept = await state.store.keep_callback(
            Delivery(webhook_id, now, ref), reason="unknown_job", body=body
        )
        if kept == "known":
            continue
        metrics.callback("unknown_job" if kept == "kept" else "duplicate")
        metrics.callback_latency.observe(time.perf_counter() - started)
        return Answer(202, {"status": kept})
    if applied is None:
        raise ApiError("the job could not be found", code="not_found", status=404)
    job = applied.job
    outcome = "duplicate" if applied.duplicate else "accepted"
    metrics.callback(outcome)
    metrics.callback_latency.observe(time.perf_counter() - started)
    if nudge and not applied.duplicate:
        state.poller.wake()
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
