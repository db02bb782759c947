"""What a verified callback body says: its status, counts, the upstream's message (a
failed job's ``error``) and the job it names. Pure.

A body is parsed only after its signature held; its values are still untrusted
(``values``): an unusable count is ignored with a note, an unusable status makes the
callback a nudge, and a body ``json`` cannot read (a 5,000-digit number, nesting past
the recursion limit) is not a JSON object at all. The callback endpoint and the tracker
(applying callbacks kept until their job appeared) read bodies the same way here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from service import values
from service.jobs import Observation, Source
from service.logs import short
from service.store.base import Claim
from service.upstream.statuses import normalize_status

__all__ = [
    "claim",
    "claim_from_body",
    "nudge_only",
    "observation",
    "observation_from_body",
    "parse",
]


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


def _shown(value: Any) -> str:
    """An unusable value as a note may show it: short, storable, never a whole blob."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and not -(10**30) < value < 10**30:
        return f"a {len(str(abs(value)))}-digit number"
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return values.safe_text(short(text, 40) or "")


def _count(
    fields: tuple[dict[str, Any], dict[str, Any]], name: str, notes: list[str]
) -> int | None:
    value = _first(fields, name)
    if value is None:
        return None
    number = values.count(value)
    if number is None:
        notes.append(f"{name} ignored: {_shown(value)} is not a count")
    return number


def parse(body: bytes) -> dict[str, Any] | None:
    # ValueError covers a number too long to convert (a 5,000-digit integer) and
    # JSONDecodeError; RecursionError deep nesting.
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def observation(data: dict[str, Any], at: float, detail: str = "") -> Observation:
    fields = _fields(data)
    raw_status = values.text(_first(fields, "status", "jobStatus"))
    notes: list[str] = []
    records = _count(fields, "recordsCount", notes)
    failed = _count(fields, "recordsFailedCount", notes)
    error, error_note = values.message(_first(fields, "error"))
    return Observation(
        Source.CALLBACK,
        status=normalize_status(raw_status),
        raw_status=raw_status,
        records_count=records,
        records_failed_count=failed,
        upstream_error=error,
        at=at,
        detail="; ".join(part for part in (detail, *notes, error_note) if part),
    )


def observation_from_body(body: bytes, at: float) -> Observation | None:
    """What a verified callback body says; None when it is not a JSON object."""
    data = parse(body)
    return None if data is None else observation(data, at)


def claim(data: dict[str, Any]) -> Claim:
    """The job (our id, from callback-payload) and upstream job a body names."""
    fields = _fields(data)
    payload = values.text(_first(fields, "callback-payload", "callbackPayload"))
    upstream = values.text(_first(fields, "id", "jobId"))
    return Claim(payload, upstream)


def claim_from_body(body: bytes) -> Claim | None:
    """What a verified callback body says it is about; None when not a JSON object."""
    data = parse(body)
    return None if data is None else claim(data)


def nudge_only(observation: Observation) -> Observation:
    """A body naming no job can be about any job: it may only make this one poll."""
    said = observation.raw_status
    note = "the body names no job (no callback-payload, no id): taken as a nudge to poll now" + (
        f", its status {said} not applied" if said else ""
    )
    detail = "; ".join(part for part in (observation.detail, note) if part)
    return replace(
        observation,
        status=None,
        raw_status=None,
        records_count=None,
        records_failed_count=None,
        upstream_error=None,
        detail=detail,
    )
