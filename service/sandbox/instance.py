"""The state of one simulated Open Connectors instance: its jobs, faults and callbacks.

Jobs run on the event loop of the server that hosts the sandbox: each one is a task
that walks ``CREATED`` → ``STARTED`` → ``RUNNING`` → a terminal status and then
delivers a signed callback, with the redelivery schedule of the real platform (scaled
by ``callback_retry_base``). A job that fails as a whole ends ``ABORTED`` instead of
``RUNNING``, with the platform's message as its ``error``.

A bulk query is a job of the same kind whose work is reading the records its object
holds (those completed uploads loaded) instead of reading a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import anyio.to_thread
import httpx

from service.callbacks.signatures import HEADER as SIGNATURE_HEADER
from service.callbacks.signatures import sign
from service.sandbox.ceql import Query
from service.sandbox.exports import (
    GENERATED,
    GENERATED_COLUMNS,
    ObjectRecords,
    encode,
    generated_records,
)
from service.sandbox.options import SandboxOptions
from service.sandbox.records import ScanResult, scan_csv

__all__ = ["OPERATIONS", "Fault", "SandboxJob", "Simulator"]

OPERATIONS = ("objects", "submit", "status", "errors", "cancel", "jobs", "query", "download")
TERMINAL = frozenset({"COMPLETED", "ERROR", "ABORTED", "CANCELLED"})
_LEGACY = {"COMPLETED": "COMPLETE", "CANCELLED": "CANCELED"}


@dataclass
class Fault:
    """An answer the sandbox gives instead of (or after) doing the real work.

    ``after_processing`` models the ambiguous failure: the upstream did the work (a job
    exists) but the client only sees the error.
    """

    operation: str | None
    status: int
    retry_after: float | None = None
    after_processing: bool = False
    remaining: int = 1
    # The exact body to answer (JSON text), for an upstream that says something odd
    # with any status, 200 included; None: an error body like Open Connectors' own.
    content: str | None = None
    # Calls of its operation answered normally before it fires (a fault mid-way).
    skip: int = 0
    # For a download: answer it as usual but drop the connection after this many bytes
    # of the file, as a transfer cut mid-way (the status is then the usual 200).
    cut_after: int | None = None

    def body(self) -> bytes:
        if self.content is not None:
            return self.content.encode("utf-8", "surrogatepass")
        message = "Too many requests" if self.status == 429 else "Injected upstream failure"
        return json.dumps({"message": message, "requestId": str(uuid.uuid4())}).encode()

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": f"{self.retry_after:g}"}


@dataclass
class SandboxJob:
    id: int
    hub: str
    object: str
    path: str | None
    callback_url: str | None
    metadata: dict[str, Any]
    status: str = "CREATED"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # When it reached a terminal status: it is forgotten ``retention`` seconds later.
    ended_at: float | None = None
    scan: ScanResult | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    # Set at submission when the fault dice (``fail_whole``) fail the job as a whole.
    abort_with: str | None = None
    # The platform's message for a job that failed (ERROR or ABORTED).
    error: str | None = None
    # "UPLOAD", or "DOWNLOAD" for a bulk query, whose query and matched records (read
    # when it runs; None for the generated object, computed again when downloaded).
    direction: str = "UPLOAD"
    query: Query | None = None
    matched: list[dict[str, str]] | None = None
    columns: list[str] = field(default_factory=list)

    def status_body(self, legacy: bool) -> dict[str, Any]:
        scan = self.scan or ScanResult()
        status = _LEGACY.get(self.status, self.status) if legacy else self.status
        body: dict[str, Any] = {
            "id": str(self.id),
            "status": status,
            "objectName": self.object,
            "jobDirection": self.direction,
            "recordsCount": scan.records,
            "recordsFailedCount": len(scan.failed),
            "createdDate": _iso(self.created_at),
            "updatedDate": _iso(self.updated_at),
        }
        if self.status == "ABORTED":
            # Nothing of the file was loaded: no counts to give.
            del body["recordsCount"], body["recordsFailedCount"]
        if self.error:
            body["error"] = self.error
        return body


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Simulator:
    """One simulated instance. ``app`` is its ASGI app; ``aclose`` stops its jobs."""

    def __init__(self, options: SandboxOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either options or keyword arguments, not both")
        self.options = options or SandboxOptions(**kwargs)
        self._rng = random.Random(self.options.seed)
        self.jobs: dict[int, SandboxJob] = {}
        # What each (hub, object) holds: the rows its completed uploads loaded.
        self.objects: dict[tuple[str, str], ObjectRecords] = {}
        self._next_id = 1000 + self._rng.randrange(9000)
        self._faults: list[Fault] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._callback_key = self.options.signature_key
        if self.options.wrong_key:
            self._callback_key = secrets.token_urlsafe(32)
        self.calls: Counter[str] = Counter()
        self.status_calls: Counter[str] = Counter()
        # (wall time, job id) of every answered status call, for rate and dedupe checks.
        self.status_log: list[tuple[float, str]] = []
        self.callbacks: Counter[str] = Counter()
        # Upload bodies: bytes received so far (counting uploads still arriving), and
        # how many ended before they were whole (the client went away: no job).
        self.upload_bytes = 0
        self.uploads_cut = 0
        self.callback_log: list[dict[str, Any]] = []
        # Jobs forgotten after their retention ran out (asked about afterwards).
        self.forgotten = 0

    # -- faults -------------------------------------------------------------------

    def inject_fault(
        self,
        operation: str | None,
        status: int,
        *,
        retry_after: float | None = None,
        times: int = 1,
        after_processing: bool = False,
        body: Any = None,
        raw_body: str | None = None,
        skip: int = 0,
        cut_after: int | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``operation`` (None: any) with ``status``,
        and with ``body`` (any JSON value) or ``raw_body`` (JSON text sent as it is, for
        what a JSON encoder would refuse to write, e.g. a 5,000-digit number) if given;
        the first ``skip`` calls are answered as usual (a failure mid-way). With
        ``cut_after`` (downloads only, ``status`` 200) the result file is sent as usual
        but the connection drops after that many bytes of it."""
        if operation is not None and operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        content = raw_body if raw_body is not None else None
        if body is not None and raw_body is not None:
            raise ValueError("give body or raw_body, not both")
        if body is not None:
            content = json.dumps(body)  # escapes NUL and lone surrogates as \u sequences
        if content is not None and not isinstance(content, str):
            raise ValueError("raw_body must be a string")
        if cut_after is not None and (
            isinstance(cut_after, bool)
            or not isinstance(cut_after, int)
            or cut_after < 0
            or operation != "download"
            or status != 200
            or content is not None
        ):
            raise ValueError(
                "cut_after must be a whole number of bytes from 0, for the operation"
                f" download with status 200 and no body, got {cut_after!r}"
            )
        # Checked here, not when the fault fires: a bad spec must be refused up front
        # instead of breaking the response of some later, unrelated call.
        lowest = 200 if content is not None or cut_after is not None else 400
        if isinstance(status, bool) or not isinstance(status, int) or not lowest <= status <= 599:
            raise ValueError(
                f"status must be an HTTP status from {lowest} to 599"
                f"{' with a body' if content is not None else ''}, got {status!r}"
            )
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, int | float)
            or not math.isfinite(retry_after)
            or retry_after < 0
        ):
            raise ValueError(f"retry_after must be a non-negative number, got {retry_after!r}")
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times!r}")
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be a whole number from 0, got {skip!r}")
        self._faults.append(
            Fault(operation, status, retry_after, after_processing, times, content, skip, cut_after)
        )

    def take_fault(self, operation: str) -> Fault | None:
        """Count the call and decide whether it fails: scripted faults first, then chance."""
        self.calls[operation] += 1
        for fault in self._faults:
            if fault.operation in (None, operation) and fault.skip > 0:
                fault.skip -= 1
                continue
            if fault.operation in (None, operation) and fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        if self.options.fail_rate and self._rng.random() < self.options.fail_rate:
            if self._rng.random() < 0.5:
                return Fault(operation, 429, retry_after=self.options.retry_after)
            return Fault(operation, 500, after_processing=operation == "submit")
        return None

    # -- jobs ---------------------------------------------------------------------

    def create_job(
        self,
        *,
        hub: str,
        object_name: str,
        path: str | None,
        upload: BinaryIO,
        callback_url: str | None,
        metadata: dict[str, Any],
    ) -> SandboxJob:
        job = SandboxJob(
            id=self._next_id,
            hub=hub,
            object=object_name,
            path=path,
            callback_url=callback_url or self.options.callback_url,
            metadata=metadata,
        )
        # Thrown here, in the order jobs are submitted, so a seed repeats which fail.
        if self.options.fail_whole and self._rng.random() < self.options.fail_whole:
            job.abort_with = self.options.fail_whole_message
        self._next_id += 1
        self.jobs[job.id] = job
        self._spawn(self._run(job, lambda: self._load(job, upload)))
        return job

    def object_names(self, hub: str) -> tuple[str, ...]:
        names = self.options.hubs[hub]
        return (*names, GENERATED) if self.options.generated_records else names

    def create_query_job(
        self, *, hub: str, query: Query, callback_url: str | None, metadata: dict[str, Any]
    ) -> SandboxJob:
        """A bulk query: it runs like an upload and then holds the matching records."""
        job = SandboxJob(
            id=self._next_id,
            hub=hub,
            object=query.object,
            path=None,
            callback_url=callback_url or self.options.callback_url,
            metadata=metadata,
            direction="DOWNLOAD",
            query=query,
        )
        self._next_id += 1
        self.jobs[job.id] = job
        self._spawn(self._run(job, lambda: self._select(job, query)))
        return job

    async def _load(self, job: SandboxJob, upload: BinaryIO) -> ScanResult:
        try:
            upload.seek(0)
            return await anyio.to_thread.run_sync(
                lambda: scan_csv(upload, keep_rows=self.options.max_records)
            )
        finally:
            upload.close()

    async def _select(self, job: SandboxJob, query: Query) -> ScanResult:
        """Read the records the query matches now, as the platform does when it runs."""
        if query.object == GENERATED:
            job.columns = list(query.fields or GENERATED_COLUMNS)
            count = self.options.generated_records

            def counted() -> int:
                return sum(1 for _ in query.select(generated_records(count)))

            return ScanResult(records=await anyio.to_thread.run_sync(counted))
        held = self.objects.get((job.hub, query.object)) or ObjectRecords()
        job.columns = list(query.fields or held.columns)
        # Taken on the loop, where uploads change the object; matched off it.
        records = list(held.rows.values())
        job.matched = await anyio.to_thread.run_sync(lambda: list(query.select(records)))
        return ScanResult(records=len(job.matched))

    def result(self, job: SandboxJob, fmt: str) -> Iterator[bytes]:
        """The query's result file, piece by piece."""
        if job.matched is not None:
            records: Iterable[dict[str, str]] = job.matched
        else:
            assert job.query is not None
            records = job.query.select(generated_records(self.options.generated_records))
        return encode(records, job.columns, fmt)

    def find_job(self, hub: str, job_id: str) -> SandboxJob | None:
        try:
            job = self.jobs.get(int(job_id))
        except ValueError:
            return None
        if job is not None and self._expired(job, time.time()):
            del self.jobs[job.id]
            self.forgotten += 1
            return None
        return job if job is not None and job.hub == hub else None

    def kept_jobs(self) -> list[SandboxJob]:
        """The jobs not forgotten yet, oldest first."""
        now = time.time()
        return [job for job in self.jobs.values() if not self._expired(job, now)]

    def _expired(self, job: SandboxJob, now: float) -> bool:
        return job.ended_at is not None and now - job.ended_at >= self.options.retention

    def request_cancel(self, job: SandboxJob) -> bool:
        if job.status in TERMINAL or job.status == "CANCELLATION_PENDING":
            return job.status == "CANCELLATION_PENDING"
        self._set_status(job, "CANCELLATION_PENDING")
        job.cancel_requested.set()
        return True

    def _set_status(self, job: SandboxJob, status: str) -> None:
        job.status = status
        job.updated_at = time.time()
        if status in TERMINAL and job.ended_at is None:
            job.ended_at = job.updated_at

    async def _cancelled_within(self, job: SandboxJob, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.cancel_requested.wait(), timeout=seconds)
        # A cancel that came as the wait ran out counts too: its status is set already,
        # and the next stage must not write over it.
        return job.cancel_requested.is_set()

    async def _run(self, job: SandboxJob, load: Callable[[], Awaitable[ScanResult]]) -> None:
        """A quarter of ``job_seconds`` each ``CREATED`` and ``STARTED``, then half
        ``RUNNING``; a job failing as a whole ends ``ABORTED`` where it would have
        started running, as the platform refuses such a file once it reads it."""
        quarter = self.options.job_seconds / 4
        scan = job.scan = await load()
        aborted = job.abort_with or scan.aborted
        if not await self._cancelled_within(job, quarter):
            self._set_status(job, "STARTED")
            if not await self._cancelled_within(job, quarter):
                if aborted:
                    self._end(job, "ABORTED", aborted)
                else:
                    self._set_status(job, "RUNNING")
                    if not await self._cancelled_within(job, 2 * quarter):
                        self._end(job, "ERROR" if scan.error else "COMPLETED", scan.error)
        if job.status == "COMPLETED" and job.direction == "UPLOAD":
            held = self.objects.setdefault((job.hub, job.object), ObjectRecords())
            identifier = job.metadata.get("identifierFieldName")
            held.upsert(scan.header, scan.rows, identifier, self.options.max_records)
        # The object holds them now; the job keeps only its counts and failed rows.
        scan.rows = []
        if job.status == "CANCELLATION_PENDING":
            await asyncio.sleep(min(0.05, quarter))
            self._set_status(job, "CANCELLED")
        await self._notify(job)

    def _end(self, job: SandboxJob, status: str, error: str | None) -> None:
        job.error = error
        self._set_status(job, status)

    # -- callbacks ----------------------------------------------------------------

    def callback_body(self, job: SandboxJob) -> bytes:
        body = job.status_body(self.options.legacy_status_names)
        payload = job.metadata.get("callback-payload")
        if payload is not None:
            body["callback-payload"] = payload
        return json.dumps(body, separators=(",", ":")).encode()

    async def _notify(self, job: SandboxJob) -> None:
        if not job.callback_url:
            return
        if self._rng.random() < self.options.drop_callbacks:
            self.callbacks["dropped"] += 1
            return
        body = self.callback_body(job)
        headers = {
            "Content-Type": "application/json",
            "Elements-Webhook-Id": str(uuid.uuid4()),
        }
        if self._callback_key:
            headers[SIGNATURE_HEADER] = sign(self._callback_key, body, self.options.signature_algo)
        copies = 2 if self._rng.random() < self.options.duplicate_callbacks else 1
        if copies == 2:
            self.callbacks["duplicated"] += 1
        if self.options.callback_delay:
            await asyncio.sleep(self.options.callback_delay)
        for _ in range(copies):
            await self._deliver(job.callback_url, body, headers)

    async def _deliver(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10.0)
        for attempt in range(self.options.callback_retries + 1):
            if attempt:
                self.callbacks["redelivered"] += 1
                await asyncio.sleep(self.options.callback_retry_base * 4**attempt)
            self.callbacks["sent"] += 1
            try:
                response = await self._client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                outcome: int | str = type(exc).__name__
            else:
                outcome = response.status_code
            self.callback_log.append(
                {"url": url, "webhook_id": headers["Elements-Webhook-Id"], "outcome": outcome}
            )
            if isinstance(outcome, int) and 200 <= outcome < 300:
                self.callbacks["delivered"] += 1
                return
            self.callbacks["failed"] += 1

    # -- lifecycle ----------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, Any]:
        by_status = Counter(job.status for job in self.jobs.values())
        return {
            "jobs": len(self.jobs),
            "jobs_by_status": dict(by_status),
            "calls": dict(self.calls),
            "status_calls": dict(self.status_calls),
            "callbacks": dict(self.callbacks),
            # The most status calls answered within one second of the clock: what an
            # upstream enforcing a per-second budget would count.
            "status_calls_busiest_second": max(
                Counter(int(at) for at, _ in self.status_log).values(), default=0
            ),
            "forgotten": self.forgotten,
            "upload_bytes": self.upload_bytes,
            "uploads_cut": self.uploads_cut,
        }

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None
