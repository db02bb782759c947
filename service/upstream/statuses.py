"""The upstream's job status vocabulary, and the spellings it uses interchangeably."""

from __future__ import annotations

__all__ = ["UPSTREAM_STATUSES", "normalize_status"]

UPSTREAM_STATUSES = frozenset(
    {
        "CREATED",
        "STARTED",
        "RUNNING",
        "COMPLETED",
        "ERROR",
        "ABORTED",
        "CANCELLED",
        "CANCELLATION_PENDING",
    }
)
_ALIASES = {"COMPLETE": "COMPLETED", "CANCELED": "CANCELLED"}


def normalize_status(value: object) -> str | None:
    """Map a raw status to one of ``UPSTREAM_STATUSES``, or None when it is not one."""
    if not isinstance(value, str):
        return None
    status = value.strip().upper()
    status = _ALIASES.get(status, status)
    return status if status in UPSTREAM_STATUSES else None
