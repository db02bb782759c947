"""Receiving job-completion callbacks (DESIGN §3 "Receiving a callback").

Order matters: read at most the size limit, verify the signature over the raw bytes,
and only then parse. The answer is sent only after the store committed the delivery,
the observation and the timeline entry in one transaction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import signatures
from .errors import ApiError, error_response
from .jobs import Observation, Source
from .statuses import normalize_status
from .store import Delivery
from .store.base import Rejection

if TYPE_CHECKING:
    from .state import AppState

__all__ = ["observation_from_body", "read_limited", "receive_callback"]

log = logging.getLogger("bulkhook.callbacks")
_WEBHOOK_ID = "elements-webhook-id"


async def read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ApiError(f"the body is larger than {limit} bytes", code="too_large", status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(f"the body is larger than {limit} bytes", code="too_large", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _as_dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _first(data: Mapping[str, Any], *names: str) -> Any:
    message = _as_dict(data.get("message"))
    for source in (data, message):
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


def parse_body(body: bytes) -> Mapping[str, Any] | None:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, Mapping) else None


def observation_from_body(body: bytes, at: float) -> Observation | None:
    """What a verified callback body says; None when it is not a JSON object."""
    data = parse_body(body)
    if data is None:
        return None
    raw_status = _text(_first(data, "status", "jobStatus"))
    return Observation(
        Source.CALLBACK,
        status=normalize_status(raw_status),
        raw_status=raw_status,
        records_count=_count(_first(data, "recordsCount")),
        records_failed_count=_count(_first(data, "recordsFailedCount")),
        at=at,
    )


def _refs(data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(our job id from callback-payload, the upstream job id) named by a body."""
    payload = _text(_first(data, "callback-payload", "callbackPayload"))
    upstream = _text(_first(data, "id", "jobId"))
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


def _refused(
    request: Request, state: AppState, job_id: str | None, reason: str, error: ApiError
) -> Response:
    """The refusal, counted; it is noted for the dashboard only after it was sent.

    Noting it after answering keeps the refusal as prompt as ever (and best effort:
    it is answered even when the store is down). Only what identifies the delivery is
    kept, truncated: never the body, which is neither trusted nor parsed.
    """
    state.metrics.callbacks.labels(reason).inc()
    webhook_id = (request.headers.get(_WEBHOOK_ID) or "").strip()[:200] or None
    rejection = Rejection(
        time.time(), reason, error.message[:300], job_id[:200] if job_id else None, webhook_id
    )

    async def note() -> None:
        try:
            await state.store.record_rejection(rejection)
        except Exception as exc:
            log.warning("could not note a refused callback: %r", exc, extra={"outcome": reason})

    response = error_response(error.status, error.code, error.message, headers=error.headers)
    response.background = BackgroundTask(note)
    return response


async def receive_callback(request: Request, state: AppState, job_id: str | None) -> Response:
    started = time.perf_counter()
    metrics = state.metrics
    try:
        body = await read_limited(request, state.settings.max_callback_bytes)
    except ApiError as exc:
        return _refused(request, state, job_id, "too_large", exc)
    given = request.headers.getlist(signatures.HEADER)
    if len(given) > 1:
        return _refused(
            request,
            state,
            job_id,
            "bad_signature",
            ApiError(
                f"the {signatures.HEADER} header was given {len(given)} times",
                code="bad_signature",
                status=401,
            ),
        )
    verdict = signatures.verify(given[0] if given else None, body, state.signature_keys)
    if not verdict.ok:
        log.warning(
            "callback refused: %s",
            verdict.verdict.value,
            extra={"job_id": job_id, "outcome": "bad_signature"},
        )
        return _refused(
            request,
            state,
            job_id,
            "bad_signature",
            ApiError(f"signature check failed: {verdict.reason}", code="bad_signature", status=401),
        )
    webhook_id = request.headers.get(_WEBHOOK_ID) or f"sha256:{hashlib.sha256(body).hexdigest()}"
    webhook_id = webhook_id.strip()[:200]
    now = time.time()
    data = parse_body(body)
    if data is None:
        await state.store.keep_callback(
            Delivery(webhook_id, now, job_id), reason="malformed", body=body
        )
        metrics.callbacks.labels("malformed").inc()
        raise ApiError("the callback body is not a JSON object", code="malformed_callback")
    observation = observation_from_body(body, now)
    assert observation is not None
    observation = dataclasses.replace(
        observation,
        detail=f"signature verified ({verdict.algorithm}, key {verdict.key_index}); "
        f"delivery {webhook_id}",
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
        metrics.callbacks.labels("unknown_job" if kept == "kept" else "duplicate").inc()
        metrics.callback_latency.observe(time.perf_counter() - started)
        return JSONResponse({"status": kept}, status_code=202)
    if applied is None:
        raise ApiError("the job could not be found", code="not_found", status=404)
    job = applied.job
    outcome = "duplicate" if applied.duplicate else "accepted"
    metrics.callbacks.labels(outcome).inc()
    metrics.callback_latency.observe(time.perf_counter() - started)
    if nudge and not applied.duplicate:
        state.poller.wake()
    log.info(
        "callback %s: job %s is %s",
        outcome,
        job.id,
        applied.job.state,
        extra={"job_id": job.id, "webhook_id": webhook_id, "outcome": outcome},
    )
    return JSONResponse({"status": outcome, "job": applied.job.id, "state": str(applied.job.state)})
