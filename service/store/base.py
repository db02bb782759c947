"""The one store interface: every durable fact about jobs goes through it.

Implementations: ``sqlite`` (embedded default) and ``postgres``; ``activity``
holds their dashboard reads. Every method is a coroutine that never blocks the event
loop; ``apply`` is the only way a job's state changes, and it records the delivery,
decides, compares-and-sets the row and appends to the timeline in one transaction.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypedDict

from service.downloads.rules import FetchState
from service.errors import BulkhookError
from service.failed_records.rules import CopyState
from service.jobs import Decision, Job, Observation, State

__all__ = [
    "KEEP",
    "KEPT_BYTES",
    "KEPT_MAX",
    "Applied",
    "ApplyOptions",
    "CallbackRecord",
    "Claim",
    "Delivery",
    "KeptCallback",
    "Pruned",
    "Rejection",
    "Store",
    "StoreError",
]

# Rejected deliveries kept for the dashboard: the newest ones only, so a flood of forged
# callbacks cannot grow the database without bound (the metrics count every one).
REJECTIONS_KEPT = 10_000

# Verified callbacks kept because they cannot be applied yet (their job is not known, or
# not its upstream id) or at all (malformed): at most this many, of at most this many
# body bytes together; past either bound the oldest go first. Only a body signed with
# the instance's key is kept, so this bounds what a replayed genuine body can store.
KEPT_MAX = 10_000
KEPT_BYTES = 64 * 1024 * 1024


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()
"""Passed as ``next_poll_at`` to leave a job's poll schedule as it is."""


# Seconds a client is asked to wait before retrying while the store is unavailable.
STORE_RETRY_AFTER = 5


class StoreError(BulkhookError):
    """The store cannot be reached or written just now; the text says why (for the log).

    Each store raises it for its driver's errors that mean this, so callers never see
    a driver's exception for an outage. A request is answered
    ``503 store_unavailable``: nothing about it was wrong, and retrying later (as Open
    Connectors does with a callback) works once the store is back.
    """

    code = "store_unavailable"
    http_status = 503
    headers = MappingProxyType({"Retry-After": str(STORE_RETRY_AFTER)})

    @property
    def public_message(self) -> str:
        return "the store is unavailable just now; try again shortly"


class ApplyOptions(TypedDict, total=False):
    """``Store.apply``'s keyword arguments, for a caller that passes them on."""

    delivery: Delivery | None
    upstream_id: str | None
    next_poll_at: float | _Keep | None
    kept_id: int | None
    claim: Claim | None


# Slots: a frozen instance with them is a third cheaper to build, and one is built
# for every callback.
@dataclass(frozen=True, slots=True)
class Delivery:
    """One callback delivery, deduplicated by ``webhook_id`` and by ``digest``.

    ``digest`` is the SHA-256 (hex) of the raw body: the same body delivered again to
    the same job is a repeat whatever its webhook id, because the upstream's signature
    covers the body only and anyone holding one genuine body can send it again.
    """

    webhook_id: str
    received_at: float
    job_ref: str | None = None
    digest: str | None = None


# Slots: a frozen instance with them is a third cheaper to build, and one is built
# for every callback.
@dataclass(frozen=True, slots=True)
class Claim:
    """Which job a verified callback body says it is about, as far as it says.

    ``payload`` is the ``callback-payload`` (this service's job id, set at submission);
    ``upstream_id`` the body's ``id``/``jobId``. None when absent or not usable text.
    ``Store.apply`` checks a claim against the job's row in the same transaction.
    """

    payload: str | None
    upstream_id: str | None

    @property
    def names_a_job(self) -> bool:
        return self.payload is not None or self.upstream_id is not None


# Slots: a frozen instance with them is a third cheaper to build, and one is built
# for every callback.
@dataclass(frozen=True, slots=True)
class Applied:
    job: Job
    decision: Decision | None
    # The delivery had been recorded before: nothing was changed.
    duplicate: bool = False
    # The body is about another job (why, for the answer); nothing but the timeline
    # changed, and only the first time this body came.
    refused: str | None = None
    # The body names an upstream job but not this job, whose upstream id is not known
    # yet: nothing was recorded; keep it until the submit's answer says (Tracker).
    waiting: bool = False

    @property
    def ended(self) -> bool:
        """Whether this change ended the job: in the same transaction, the store
        scheduled what follows a job's end (a copy of failed records, a result's fetch)."""
        decision = self.decision
        return decision is not None and decision.changed and self.job.terminal


@dataclass(frozen=True)
class KeptCallback:
    id: int
    webhook_id: str
    job_ref: str | None
    received_at: float
    reason: str
    body: bytes
    instance: str = "default"


@dataclass(frozen=True)
class Pruned:
    """Rows removed by one ``Store.prune``, by table."""

    deliveries: int = 0
    rejections: int = 0
    kept: int = 0
    events: int = 0

    @property
    def total(self) -> int:
        return self.deliveries + self.rejections + self.kept + self.events


@dataclass(frozen=True)
class Rejection:
    """A callback refused before it could change anything (bad signature, too large).

    Never its body: an unverified body is attacker-controlled and is not even parsed.
    ``job_ref`` is the job id in the per-job URL, ``webhook_id`` the header, both as sent.
    """

    received_at: float
    reason: str
    detail: str
    job_ref: str | None = None
    webhook_id: str | None = None
    # How many refusals the row stands for: more than 1 for the summary of those past
    # the rows noted one by one each second (``callbacks.rejections``).
    repeats: int = 1


@dataclass(frozen=True)
class CallbackRecord:
    """One delivery as the dashboard lists it: accepted, kept or rejected; no body.

    ``outcome`` is ``accepted``, a kept reason (``unknown_job``, ``malformed``),
    ``wrong_job`` (verified, but about another job) or a rejection reason
    (``bad_signature``, ``too_large``, ``wrong_job`` at the instance-wide URL).
    """

    received_at: float
    outcome: str
    webhook_id: str | None
    job_ref: str | None
    detail: str
    # How many deliveries the line stands for (a summary of refusals: more than 1).
    repeats: int = 1


class Store(abc.ABC):
    # (most kept callbacks, most bytes of their bodies together): KEPT_MAX, KEPT_BYTES
    kept_limits: tuple[int, int]

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
    async def find_by_upstream_id(self, upstream_id: str, instance: str) -> Job | None:
        """The newest job of ``instance`` with that upstream id: upstream ids are
        unique only within one instance (two accounts can both have job 1234)."""

    @abc.abstractmethod
    async def job_instance(self, job_id: str) -> str | None:
        """The connector instance of job ``job_id``; None when there is no such job.

        One keyed read of one column: a callback at a job's URL needs it before its
        signature can be checked (with that instance's keys), and nothing else.
        """

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        state: State | None = None,
        limit: int = 50,
        before: str | None = None,
        search: str | None = None,
        direction: str | None = None,
        instance: str | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` is the id of the last job of the previous page.

        ``search`` keeps the jobs whose id starts with it or whose upstream id is it;
        ``direction`` (``upload`` or ``download``) the jobs of that direction;
        ``instance`` the jobs of that connector instance.
        """

    @abc.abstractmethod
    async def jobs_changed_since(self, after: float, after_id: str, limit: int) -> list[Job]:
        """Jobs ordered by (``updated_at``, ``id``) after that pair, for live views.

        Every replica's changes are in the store, so a dashboard polling this sees them
        all; callers re-read a few seconds back because ``updated_at`` is the
        observation's time, which can precede its commit.
        """

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
        claim: Claim | None = None,
    ) -> Applied | None:
        """Decide and record ``observation`` atomically; None when the job is unknown.

        The job returned carries no timeline (``get_job`` reads it): the timeline grows
        with every callback, and the hot path must not read it back.

        With ``delivery`` already recorded (its webhook id, or its digest for this job),
        nothing changes and ``duplicate`` is True.
        A terminal outcome clears the poll schedule whatever ``next_poll_at`` says.
        ``kept_id`` marks a kept callback as applied in the same transaction (a kept
        body already applied to this job is a duplicate).

        ``claim`` (a callback's) is checked against the job's row (``plan.bind``): a
        body about another job is ``refused`` (noted once in the timeline, the delivery
        recorded so a replay adds nothing), one that must wait is ``waiting`` (nothing
        recorded), and otherwise its upstream id is adopted when the job has none yet.
        """

    @abc.abstractmethod
    async def keep_callback(
        self, delivery: Delivery, *, reason: str, body: bytes, instance: str = "default"
    ) -> str:
        """Keep a verified callback that cannot be applied now; ``instance`` is the
        instance whose key verified it, the only one whose jobs it may be applied to.

        Returns ``"kept"``, ``"duplicate"`` (the webhook id was seen before, or the same
        body is kept for the same reference already), or, for ``reason="unknown_job"``,
        ``"known"`` when ``job_ref`` is by now the upstream id of a job of ``instance``,
        or the id of such a job whose upstream id is known (it raced in): nothing is
        kept and the caller applies it instead. Kept callbacks stay within ``KEPT_MAX``
        and ``KEPT_BYTES`` (the store's ``kept_limits``) per connector instance, the oldest
        of that instance removed first.
        """

    @abc.abstractmethod
    async def kept_for(self, refs: list[str], instance: str = "default") -> list[KeptCallback]:
        """Unapplied callbacks kept for any of ``refs`` (job ids or upstream ids) that
        ``instance``'s key verified."""

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

    @abc.abstractmethod
    async def count_by_instance(self) -> dict[str, dict[str, int]]:
        """Jobs per instance and state: ``{instance: {state: n}}``."""

    @abc.abstractmethod
    async def record_rejection(self, rejection: Rejection) -> None:
        """Note a refused callback for the dashboard (the newest REJECTIONS_KEPT stay)."""

    @abc.abstractmethod
    async def recent_callbacks(self, limit: int = 50) -> list[CallbackRecord]:
        """The newest deliveries of every outcome, newest first."""

    @abc.abstractmethod
    async def rejections_for(self, job_ref: str, limit: int = 100) -> list[CallbackRecord]:
        """Callbacks refused at ``job_ref``'s own URL, oldest first (for its timeline:
        the ones accepted are in the timeline already)."""

    @abc.abstractmethod
    async def callback_counts(self, since: float) -> dict[str, int]:
        """Deliveries received since ``since``, by outcome (as in CallbackRecord)."""

    @abc.abstractmethod
    async def callback_counts_by_minute(
        self, since: float, until: float
    ) -> dict[int, dict[str, int]]:
        """Deliveries received from ``since`` until before ``until``, by outcome, for
        each minute of receipt (``received_at // 60``) that had any."""

    @abc.abstractmethod
    async def timeline_marks(self) -> tuple[int, int]:
        """The newest timeline event's ``seq`` and refused callback's id (0: none)."""

    @abc.abstractmethod
    async def timeline_changes(
        self, after_seq: int, after_rejection: int, limit: int
    ) -> tuple[list[tuple[int, str | None]], list[tuple[int, str | None]]]:
        """Timeline events after ``after_seq`` and refused callbacks after
        ``after_rejection``, oldest first, at most ``limit`` of each, as
        ``(seq or id, job id or the refused callback's job reference)``."""

    @abc.abstractmethod
    async def prune(self, before: float, *, batch: int = 1000) -> Pruned:
        """Remove what is older than ``before``: deliveries, refusals, applied kept
        callbacks and timeline entries, ``batch`` rows per transaction so that no
        write waits long behind it. Jobs themselves stay."""

    # -- failed records kept after the upstream forgets them (``store.copies``) -----

    @abc.abstractmethod
    async def claim_copies(
        self, now: float, limit: int, owner: str, lease: float
    ) -> list[CopyState]:
        """Copies of failed records due now and not leased, leased to ``owner``."""

    @abc.abstractmethod
    async def save_copy(
        self,
        state: CopyState,
        owner: str,
        records: Sequence[str] = (),
        *,
        lease_until: float | None = None,
    ) -> bool:
        """Record a copy's progress and append ``records`` (JSON text, storable) after
        the ``state.kept - len(records)`` kept before, in one transaction; the lease is
        kept until ``lease_until``, or given up. False, with nothing written, when
        ``owner`` no longer holds the lease or another wrote the same page."""

    @abc.abstractmethod
    async def copy_state(self, job_id: str) -> CopyState | None:
        """The copy of a job's failed records; None when none was scheduled."""

    @abc.abstractmethod
    async def failed_records(self, job_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        """Kept failed records numbered after ``after``, in order: (number, JSON text)."""

    @abc.abstractmethod
    async def next_copy_due(self) -> float | None: ...

    @abc.abstractmethod
    async def release_copy_leases(self, owner: str) -> None: ...

    # -- the fetches of download results (``store.fetches``) ------------------------

    @abc.abstractmethod
    async def claim_fetches(
        self, now: float, limit: int, owner: str, lease: float
    ) -> list[FetchState]:
        """Fetches due now and not leased, leased to ``owner`` (and ``fetching``)."""

    @abc.abstractmethod
    async def save_fetch(
        self, state: FetchState, owner: str, *, lease_until: float | None = None
    ) -> bool:
        """Record a fetch as ``state`` says, the lease kept until ``lease_until`` (a
        renewal, during a long fetch) or given up. False, with nothing written, when
        ``owner`` no longer holds the lease."""

    @abc.abstractmethod
    async def fetch_state(self, job_id: str) -> FetchState | None:
        """The fetch of a download's result; None when none was scheduled."""

    @abc.abstractmethod
    async def next_fetch_due(self) -> float | None: ...

    @abc.abstractmethod
    async def release_fetch_leases(self, owner: str) -> None: ...
