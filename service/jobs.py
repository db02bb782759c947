"""The job model and the one function that decides a job's next state. Pure: no I/O.

Every source of news (submission, callbacks, polls, cancellation, the timeout) becomes
an ``Observation``; ``decide`` turns the job's current state and that observation into
a ``Decision``. States only move forward, terminal states never change, and news that
would move a job backwards is recorded and ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TERMINAL",
    "Decision",
    "DownloadRequest",
    "Job",
    "Observation",
    "Source",
    "State",
    "SubmitRequest",
    "TimelineEntry",
    "decide",
    "iso_utc",
    "new_job_id",
]


class State(enum.StrEnum):
    SUBMITTING = "SUBMITTING"
    SUBMIT_FAILED = "SUBMIT_FAILED"
    CREATED = "CREATED"
    STARTED = "STARTED"
    RUNNING = "RUNNING"
    CANCELLATION_PENDING = "CANCELLATION_PENDING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"


class Source(enum.StrEnum):
    SUBMIT = "submit"
    CALLBACK = "callback"
    POLL = "poll"
    CANCEL = "cancel"
    TIMEOUT = "timeout"


TERMINAL = frozenset(
    {
        State.SUBMIT_FAILED,
        State.COMPLETED,
        State.ERROR,
        State.ABORTED,
        State.CANCELLED,
        State.TIMED_OUT,
    }
)

# How far along a job is; a state may only be replaced by one further along.
_PROGRESS = {
    State.SUBMITTING: 0,
    State.CREATED: 1,
    State.STARTED: 2,
    State.RUNNING: 3,
    State.CANCELLATION_PENDING: 4,
}
_FINAL = 5

# Upstream statuses (already normalised by ``service.upstream.statuses``) and the state
# each one means.
_FROM_UPSTREAM = {
    "CREATED": State.CREATED,
    "STARTED": State.STARTED,
    "RUNNING": State.RUNNING,
    "CANCELLATION_PENDING": State.CANCELLATION_PENDING,
    "COMPLETED": State.COMPLETED,
    "ERROR": State.ERROR,
    "ABORTED": State.ABORTED,
    "CANCELLED": State.CANCELLED,
}


def new_job_id() -> str:
    """Time-ordered, unguessable: sorting ids sorts jobs by creation."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Observation:
    """One piece of news about a job, from one source.

    ``status`` is a normalised upstream status or None (no readable status: a nudge).
    ``state`` forces a service-side state (``SUBMIT_FAILED``, ``TIMED_OUT``, or
    ``ABORTED`` when the upstream lost the job) and wins over ``status``.
    ``upstream_error`` is the upstream's message (its ``error``), already made storable
    (``values.message``); None when it gave none.
    """

    source: Source
    status: str | None = None
    raw_status: str | None = None
    records_count: int | None = None
    records_failed_count: int | None = None
    detail: str = ""
    upstream_error: str | None = None
    state: State | None = None
    at: float = field(default_factory=time.time)

    @classmethod
    def of(
        cls,
        source: Source,
        *,
        status: str | None,
        raw_status: str | None,
        records_count: int | None,
        records_failed_count: int | None,
        detail: str,
        at: float,
        upstream_error: str | None = None,
        state: State | None = None,
    ) -> Observation:
        """The same observation as ``__init__`` makes, every field given and already of
        its type, without the frozen ``__init__``'s ``object.__setattr__`` per field:
        that costs about a microsecond, once per callback (as ``Job.evolve`` does)."""
        observation = object.__new__(cls)
        observation.__dict__.update(
            source=source,
            status=status,
            raw_status=raw_status,
            records_count=records_count,
            records_failed_count=records_failed_count,
            detail=detail,
            upstream_error=upstream_error,
            state=state,
            at=at,
        )
        return observation

    def target(self) -> State | None:
        if self.state is not None:
            return self.state
        return _FROM_UPSTREAM.get(self.status) if self.status else None


@dataclass(frozen=True)
class SubmitRequest:
    """What an upload asks for, checked, before its job exists."""

    hub: str
    object: str
    # The upstream's optional ``path``; None: not given, and not sent.
    path: str | None
    filename: str
    rows: int
    metadata: Mapping[str, Any]
    idempotency_key: str | None = None
    # The connector instance the upload goes to.
    instance: str = "default"


@dataclass(frozen=True)
class DownloadRequest:
    """What a download (a bulk query) asks for, checked, before its job exists."""

    hub: str
    object: str
    # The CEQL text sent upstream.
    query: str
    # csv, json or jsonl: the result file's format.
    format: str
    idempotency_key: str | None = None
    # The connector instance the query goes to.
    instance: str = "default"


# Slots: a frozen instance with them is a third cheaper to build, and one is built
# for every callback.
@dataclass(frozen=True, slots=True)
class Decision:
    state: State
    changed: bool
    # Whether the observation's news was taken (counts, raw status); False when ignored.
    accepted: bool
    note: str


def decide(current: State, observation: Observation) -> Decision:
    target = observation.target()
    if target is None:
        return Decision(current, False, False, "no readable status")
    if current in TERMINAL:
        if target == current:
            return Decision(current, False, True, f"already {current}")
        return Decision(current, False, False, f"ignored: job is already {current}")
    if target == State.SUBMIT_FAILED and current != State.SUBMITTING:
        return Decision(current, False, False, "ignored: the upstream already accepted the job")
    rank = _FINAL if target in TERMINAL else _PROGRESS[target]
    here = _PROGRESS[current]
    if rank > here:
        return Decision(target, True, True, f"{current} → {target}")
    if rank == here:
        return Decision(current, False, True, f"still {current}")
    return Decision(current, False, False, f"ignored: {target} is behind {current}")


@dataclass(frozen=True)
class TimelineEntry:
    """One line of a job's timeline: what was learnt, from where, and the state after."""

    at: float
    source: str
    state: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso_utc(self.at),
            "source": self.source,
            "state": self.state,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Job:
    id: str
    hub: str
    object: str
    # None when the upload named no path (stored as '': the column is NOT NULL).
    path: str | None
    state: State
    created_at: float
    updated_at: float
    last_source: str
    upstream_id: str | None = None
    upstream_status: str | None = None
    records_count: int | None = None
    records_failed_count: int | None = None
    filename: str | None = None
    rows: int | None = None
    # The upstream's message about the job (why it failed), as last given.
    upstream_error: str | None = None
    version: int = 0
    next_poll_at: float | None = None
    # Status polls since the last submit or callback (drives the doubling interval).
    poll_count: int = 0
    # Consecutive polls answered 404.
    not_found_count: int = 0
    # "upload" or "download" (a bulk query: ``query`` and ``format`` say what for).
    direction: str = "upload"
    query: str | None = None
    format: str | None = None
    # The connector instance the job belongs to: its upstream, its callbacks' keys.
    instance: str = "default"
    events: tuple[TimelineEntry, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def is_download(self) -> bool:
        return self.direction == "download"

    def to_json(self, *, with_events: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "upstream_id": self.upstream_id,
            "direction": self.direction,
            "instance": self.instance,
            "hub": self.hub,
            "object": self.object,
            "path": self.path,
            "query": self.query,
            "format": self.format,
            "state": str(self.state),
            "upstream_status": self.upstream_status,
            "records_count": self.records_count,
            "records_failed_count": self.records_failed_count,
            "upstream_error": self.upstream_error,
            "succeeded": _succeeded(self),
            "created_at": iso_utc(self.created_at),
            "updated_at": iso_utc(self.updated_at),
            "last_source": self.last_source,
        }
        if with_events:
            body["events"] = [event.to_json() for event in self.events]
        return body

    def evolve(self, **changes: Any) -> Job:
        """A copy with ``changes`` (field names, values already of the field's type).

        ``dataclasses.replace`` re-runs every check of ``__init__``; this copies the
        fields as they are, which matters on the callback path.
        """
        job = object.__new__(Job)
        job.__dict__.update(self.__dict__, **changes)
        return job

    def updated(self, changes: Mapping[str, Any]) -> Job:
        """``evolve(**changes)`` for changes already in a mapping, without copying them
        into keyword arguments and back (twice): once per callback."""
        job = object.__new__(Job)
        fields = job.__dict__
        fields.update(self.__dict__)
        fields.update(changes)
        return job

    @classmethod
    def from_row(cls, row: Mapping[str, Any], events: tuple[TimelineEntry, ...] = ()) -> Job:
        """A job from a store row (a mapping with a column per field).

        Every field is set straight from its column, as ``evolve`` does: rows are read
        by the thousand (lists, the dashboard) and once per callback.
        """
        job = object.__new__(cls)
        job.__dict__.update(
            {name: row[name] for name in _COLUMNS},
            path=row["path"] or None,
            state=State(row["state"]),
            events=events,
        )
        return job


# The fields stored as columns of the same name (state and events need converting).
_COLUMNS = tuple(f.name for f in dataclasses.fields(Job) if f.name not in ("state", "events"))


def _succeeded(job: Job) -> bool | None:
    """True only for a COMPLETED job with no failed records: partial failure shows plainly."""
    if job.state != State.COMPLETED:
        return False if job.terminal else None
    return job.records_failed_count == 0 if job.records_failed_count is not None else None


def iso_utc(ts: float) -> str:
    """``ts`` (seconds since the epoch) as ISO-8601 UTC with milliseconds: how the API
    and every timeline detail write a time."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{seconds}.{int(ts * 1000) % 1000:03d}Z"
