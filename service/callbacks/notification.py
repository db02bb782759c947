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

__all__ = ["nudge_only", "parse", "read", "read_body"]

# Each field's names, in the order they are looked for.
_STATUS = ("status", "jobStatus")
_RECORDS = ("recordsCount",)
_FAILED = ("recordsFailedCount",)
_ERROR = ("error",)
_PAYLOAD = ("callback-payload", "callbackPayload")
_UPSTREAM_ID = ("id", "jobId")


def _first(sources: tuple[dict[str, Any], ...], names: tuple[str, ...]) -> Any:
    for source in sources:
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


def _count(value: Any, name: str, notes: list[str]) -> int | None:
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


def read(data: dict[str, Any], at: float, detail: str = "") -> tuple[Observation, Claim]:
    """What a body says (its status, counts and message) and the job it names, in one pass.

    Event-style bodies nest their fields under ``message``; a top-level field wins.
    Every callback comes through here, so the fields are looked up once each and the
    observation is built without the frozen dataclass's per-field ``__init__``.
    """
    message = data.get("message")
    sources = (data, message) if isinstance(message, dict) else (data,)
    raw_status = values.text(_first(sources, _STATUS))
    notes: list[str] = []
    records = _count(_first(sources, _RECORDS), "recordsCount", notes)
    failed = _count(_first(sources, _FAILED), "recordsFailedCount", notes)
    error, error_note = values.message(_first(sources, _ERROR))
    if error_note:
        notes.append(error_note)
    if notes:
        detail = "; ".join(part for part in (detail, *notes) if part)
    observation = Observation.of(
        Source.CALLBACK,
        status=normalize_status(raw_status),
        raw_status=raw_status,
        records_count=records,
        records_failed_count=failed,
        detail=detail,
        at=at,
        upstream_error=error,
    )
    claim = Claim(
        values.text(_first(sources, _PAYLOAD)), values.text(_first(sources, _UPSTREAM_ID))
    )
    return observation, claim


def read_body(body: bytes, at: float) -> tuple[Observation, Claim] | None:
    """``read`` of a raw verified body; None when it is not a JSON object."""
    data = parse(body)
    return None if data is None else read(data, at)


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
