"""The one store interface: every durable fact about jobs goes through it.

Implementations: ``sqlite.py`` (embedded default). Every method is a coroutine that
never blocks the event loop; ``apply`` is the only way a job's state changes, and it
records the delivery, decides, compares-and-sets the row and appends to the timeline
in one transaction.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from ..jobs import Decision, Job, Observation, State

__all__ = ["KEEP", "Applied", "Delivery", "KeptCallback", "Store", "StoreError"]


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()
"""Passed as ``next_poll_at`` to leave a job's poll schedule as it is."""


class StoreError(Exception):
    """The store is unreachable or refused a write."""


@dataclass(frozen=True)
class Delivery:
    """One callback delivery, deduplicated by ``webhook_id``."""

    webhook_id: str
    received_at: float
    job_ref: str | None = None


@dataclass(frozen=True)
class Applied:
    job: Job
    decision: Decision | None
    # The delivery had been recorded before: nothing was changed.
    duplicate: bool = False


@dataclass(frozen=True)
class KeptCallback:
    id: int
    webhook_id: str
    job_ref: str | None
    received_at: float
    reason: str
    body: bytes


class Store(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError unless the store answers."""

    @abc.abstractmethod
    async def create_job(
        self, job: Job, *, idempotency_key: str | None = None, detail: str = ""
    ) -> tuple[Job, bool]:
        """Insert ``job``; with a key already used, return that job and False instead."""

    @abc.abstractmethod
    async def get_job(self, job_id: str, *, with_events: bool = True) -> Job | None: ...

    @abc.abstractmethod
    async def find_by_upstream_id(self, upstream_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def list_jobs(
        self, *, state: State | None = None, limit: int = 50, before: str | None = None
    ) -> list[Job]:
        """Newest first; ``before`` is the id of the last job of the previous page."""

    @abc.abstractmethod
    async def apply(
        self,
        job_id: str,
        observation: Observation,
        *,
        delivery: Delivery | None = None,
        upstream_id: str | None = None,
        next_poll_at: float | _Keep | None = KEEP,
        kept_id: int | None = None,
    ) -> Applied | None:
        """Decide and record ``observation`` atomically; None when the job is unknown.

        The job returned carries no timeline (``get_job`` reads it): the timeline grows
        with every callback, and the hot path must not read it back.

        With ``delivery`` already recorded, nothing changes and ``duplicate`` is True.
        A terminal outcome clears the poll schedule whatever ``next_poll_at`` says.
        ``kept_id`` marks a kept callback as applied in the same transaction.
        """

    @abc.abstractmethod
    async def keep_callback(self, delivery: Delivery, *, reason: str, body: bytes) -> str:
        """Keep a verified callback that cannot be applied now.

        Returns ``"kept"``, ``"duplicate"`` (the delivery was seen before), or, for
        ``reason="unknown_job"``, ``"known"`` when the job named by ``job_ref`` exists
        by now (it raced in): nothing is kept and the caller applies it instead.
        """

    @abc.abstractmethod
    async def kept_for(self, refs: list[str]) -> list[KeptCallback]:
        """Unapplied callbacks kept for any of ``refs`` (job ids or upstream ids)."""

    @abc.abstractmethod
    async def claim_due(self, now: float, limit: int, owner: str, lease: float) -> list[Job]:
        """Due, unleased jobs, leased to ``owner`` for ``lease`` seconds."""

    @abc.abstractmethod
    async def reschedule(
        self,
        job_id: str,
        next_poll_at: float | None,
        *,
        detail: str | None = None,
        not_found: bool = False,
    ) -> None:
        """Set the next poll and release the lease after a poll that brought no news.

        ``detail`` notes why in the timeline; ``not_found`` counts a consecutive 404.
        """

    @abc.abstractmethod
    async def next_due_at(self) -> float | None: ...

    @abc.abstractmethod
    async def release_leases(self, owner: str) -> None: ...

    @abc.abstractmethod
    async def count_by_state(self) -> dict[str, int]: ...
