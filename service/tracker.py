"""A job's life: submission, polls, cancellation, and applying kept callbacks.

Every change goes through ``Store.apply`` with an ``Observation``; this module only
decides *when* to ask the upstream and *what* to tell the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Unpack

from service.callbacks import notification
from service.callbacks.endpoint import JOB_CALLBACK_PATH
from service.config import Settings
from service.downloads.rules import result_json
from service.errors import ApiError
from service.jitter import spread
from service.jobs import (
    DownloadRequest,
    Job,
    Observation,
    Source,
    State,
    SubmitRequest,
    iso_utc,
    new_job_id,
)
from service.logs import short
from service.store import Applied, ApplyOptions, Store
from service.uploads.relay import Relay
from service.uploads.spool import Spool
from service.upstream.client import (
    QueryRefused,
    Submission,
    UpstreamClient,
    UpstreamError,
    UpstreamUnavailable,
    upstream_failure,
)
from service.upstream.instances import Upstreams
from service.values import message

__all__ = ["NOT_FOUND_LIMIT", "SENDING_CONNECTIONS", "SUBMIT_DEADLINE", "Tracker"]

log = logging.getLogger("bulkhook.jobs")

# A job still SUBMITTING this long after creation lost its submitter (a crash): fail it.
SUBMIT_DEADLINE = 3600.0
# Consecutive 404s from the status endpoint before a job is given up as lost upstream.
NOT_FOUND_LIMIT = 3
# Upstream connections for submissions beside the relays': uploads sent from their
# spool always find one, however many relays are under way.
SENDING_CONNECTIONS = 8


def _why(job: Job, manual: bool) -> str:
    """Which poll this was: each scheduled due time is polled once, by one replica."""
    if manual or job.next_poll_at is None:
        return "refresh requested"
    return f"poll due {iso_utc(job.next_poll_at)}"


def _same_direction(job: Job, direction: str) -> None:
    """A replayed Idempotency-Key answers with its job only for a request of the same
    direction: an upload is never answered with a download job, nor the reverse."""
    if job.direction != direction:
        raise ApiError(
            f"the Idempotency-Key belongs to {job.direction} job {job.id}; "
            f"use another key for this {direction}",
            code="idempotency_key_reused",
            status=409,
        )


def _shown(job: Job) -> dict[str, Any]:
    """A job as an error body carries it: the shape of ``GET /jobs/{id}``. A job that
    failed to start has no copy of failed records and no result to fetch."""
    body = job.to_json()
    body["failed_records"] = None
    body["result"] = result_json(job, None)
    return body


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _metadata(job_id: str, request: SubmitRequest) -> dict[str, Any]:
    """The caller's metaData, with the job's own id for its notification to name."""
    metadata = dict(request.metadata)
    metadata["callback-payload"] = job_id
    return metadata


def _accepted(submission: Submission) -> str:
    """The submit's timeline detail: the upstream job id, and the connector instance
    when the upstream names one (kept there: the job has no column for it)."""
    detail = f"upstream job {submission.id}"
    if submission.instance_id is not None:
        detail += f" (instanceId {submission.instance_id})"
    return detail


class Tracker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        upstream: UpstreamClient | Upstreams,
        public_url: str,
        wake: Callable[[], None] = lambda: None,
        ended: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        # Each connector instance's client; a job's calls go to its instance's.
        self.upstreams = upstream if isinstance(upstream, Upstreams) else Upstreams.single(upstream)
        self.public_url = public_url.rstrip("/")
        self._tasks: set[asyncio.Task[Any]] = set()
        self.relays = 0  # relays whose upstream request is under way
        # The poller's wake(), from the app: called when a job becomes due sooner.
        self.wake = wake
        # Wakes the work a job's end schedules (the copier, the fetcher), from the app.
        self.ended = ended

    # -- schedule -----------------------------------------------------------------

    def callback_url(self, job_id: str) -> str:
        return self.public_url + JOB_CALLBACK_PATH.format(job_id=job_id)

    def after_grace(self, now: float) -> float:
        return now + self.settings.callback_grace

    def next_poll(self, job: Job, now: float, polls: int) -> float:
        """Doubling from the poll interval, capped, with jitter; never past the timeout."""
        interval = min(
            self.settings.poll_max_interval, self.settings.poll_interval * 2.0 ** max(0, polls - 1)
        )
        interval *= spread(0.8, 1.0)
        return min(now + interval, job.created_at + self.settings.job_timeout)

    def backoff(self, job: Job, now: float, retry_after: float | None) -> float:
        wait = max(retry_after or 0.0, self.settings.poll_interval * spread(0.5, 1.0))
        return min(now + wait, job.created_at + self.settings.job_timeout)

    # -- submission ---------------------------------------------------------------

    def relay(self, request: SubmitRequest, spool: Spool, size: int) -> Relay | None:
        """Start sending an upload that is still arriving (``submit`` lets it end);
        ``None`` when ``max_relays`` are under way: that upload is sent once it is in."""
        if self.relays >= self.settings.max_relays:
            return None
        upstream = self.upstreams.get(request.instance)
        if upstream is None:
            return None  # refused once the whole body is in
        self.relays += 1
        job_id = new_job_id()
        return Relay(
            upstream,
            job_id=job_id,
            request=request,
            spool=spool,
            size=size,
            callback_url=self.callback_url(job_id),
            metadata=_metadata(job_id, request),
            on_done=self._relay_done,
        )

    def _relay_done(self) -> None:
        self.relays -= 1

    async def submit(
        self, request: SubmitRequest, file: Path, relay: Relay | None = None
    ) -> tuple[Job, bool]:
        """Record the job, then upload ``file`` (which this call removes when done),
        letting ``relay`` end if the upload is already on its way."""
        now = time.time()
        job = Job(
            id=relay.job_id if relay is not None else new_job_id(),
            hub=request.hub,
            object=request.object,
            path=request.path,
            state=State.SUBMITTING,
            created_at=now,
            updated_at=now,
            last_source=str(Source.SUBMIT),
            filename=request.filename,
            rows=request.rows,
            next_poll_at=now + SUBMIT_DEADLINE,
            instance=request.instance,
        )
        rows = f"{request.rows} row{'' if request.rows == 1 else 's'}"
        try:
            job, created = await self.store.create_job(
                job,
                idempotency_key=request.idempotency_key,
                detail=f"received {request.filename} ({rows})",
            )
        except BaseException:
            if relay is not None:
                await relay.abandon()
            _remove(file)
            raise
        if not created:
            if relay is not None:
                await relay.abandon()
            _remove(file)
            _same_direction(job, "upload")
            return job, False
        # Shielded: a client that stops waiting never stops (or cancels) the upload.
        task = asyncio.ensure_future(self._upload(job, request, file, relay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task), True

    async def _upload(
        self, job: Job, request: SubmitRequest, file: Path, relay: Relay | None
    ) -> Job:
        try:
            return await self._send(job, request, file, relay)
        finally:
            # Freeing a large file's blocks takes a while: off the loop and the answer.
            removal = asyncio.get_running_loop().run_in_executor(None, _remove, file)
            removal.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _send(self, job: Job, request: SubmitRequest, file: Path, relay: Relay | None) -> Job:
        try:
            submission = await relay.finish() if relay is not None else None
            if submission is None:
                submission = await self.upstreams.for_job(job).submit(
                    job.hub,
                    job.object,
                    file,
                    path=request.path,
                    filename=request.filename,
                    callback_url=self.callback_url(job.id),
                    metadata=_metadata(job.id, request),
                )
        except UpstreamError as exc:
            return await self._submit_failed(job, exc)
        return await self._accepted(job, submission)

    async def start_download(self, request: DownloadRequest) -> tuple[Job, bool]:
        """Record a download job, then start its bulk query upstream. A query the
        upstream refuses ends the job ``SUBMIT_FAILED`` with the upstream's message
        and raises ``upstream_query_refused`` (400) carrying the job."""
        now = time.time()
        job = Job(
            id=new_job_id(),
            hub=request.hub,
            object=request.object,
            path=None,
            state=State.SUBMITTING,
            created_at=now,
            updated_at=now,
            last_source=str(Source.SUBMIT),
            next_poll_at=now + SUBMIT_DEADLINE,
            direction="download",
            query=request.query,
            format=request.format,
            instance=request.instance,
        )
        job, created = await self.store.create_job(
            job,
            idempotency_key=request.idempotency_key,
            detail=f"download of {request.object} as {request.format} requested",
        )
        if not created:
            _same_direction(job, "download")
            return job, False
        # Shielded: a client that stops waiting never leaves the job half started.
        task = asyncio.ensure_future(self._query(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task), True

    async def _query(self, job: Job) -> Job:
        assert job.query is not None
        try:
            submission = await self.upstreams.for_job(job).start_query(
                job.hub,
                job.query,
                callback_url=self.callback_url(job.id),
                payload=job.id,
            )
        except QueryRefused as exc:
            error, _ = message(exc.message)
            applied = await self._apply(
                job.id,
                Observation(
                    Source.SUBMIT,
                    state=State.SUBMIT_FAILED,
                    upstream_error=error,
                    detail="the upstream refused the query",
                ),
            )
            assert applied is not None
            failed = await self._reload(applied.job)
            raise upstream_failure(
                "the upstream refused the query", exc, job=_shown(failed)
            ) from None
        except UpstreamError as exc:
            return await self._submit_failed(job, exc)
        return await self._accepted(job, submission)

    async def _accepted(self, job: Job, submission: Submission) -> Job:
        """Record the upstream's acceptance, then apply what raced it."""
        applied = await self._apply(
            job.id,
            Observation(
                Source.SUBMIT,
                status=submission.status or "CREATED",
                raw_status=str(submission.raw.get("status") or "") or None,
                detail=_accepted(submission),
            ),
            upstream_id=submission.id,
            next_poll_at=self.after_grace(time.time()),
        )
        assert applied is not None
        self.wake()
        await self.apply_kept(applied.job)
        fresh = await self.store.get_job(job.id)
        assert fresh is not None
        return fresh

    async def _submit_failed(self, job: Job, exc: UpstreamError) -> Job:
        if isinstance(exc, UpstreamUnavailable) and exc.request_sent:
            # No answer after the body went out: a job may exist upstream. Stay
            # SUBMITTING so its callback can still land; the deadline fails it otherwise.
            await self.store.reschedule(
                job.id,
                time.time() + SUBMIT_DEADLINE,
                detail=f"no answer from the upstream: {exc.message}; outcome unknown",
            )
            fresh = await self.store.get_job(job.id)
            assert fresh is not None
            raise ApiError(
                f"the upstream did not answer ({exc.message}); the job may exist upstream",
                code="upstream_outcome_unknown",
                status=502,
                job=_shown(fresh),
            )
        applied = await self._apply(
            job.id,
            Observation(Source.SUBMIT, state=State.SUBMIT_FAILED, detail=str(exc)),
        )
        assert applied is not None
        raise upstream_failure("the upstream refused the job", exc, job=_shown(applied.job))

    async def apply_kept(self, job: Job) -> None:
        """Apply callbacks that arrived before the job (or its upstream id) was known.

        They raced the submit. Each is checked against the job as it is now: a body
        whose ``callback-payload`` or upstream id names another job is not applied
        but noted in the timeline as refused (``Store.apply`` with its claim).
        """
        refs = [job.id, *([job.upstream_id] if job.upstream_id else [])]
        kept = await self.store.kept_for(refs, job.instance)
        for item in kept:
            if item.reason != "unknown_job":
                continue
            read = notification.read_body(item.body, item.received_at)
            if read is None or not read[1].names_a_job:
                continue  # bound to no job: never applied
            observation, claim = read
            detail = f"kept callback, delivery {item.webhook_id}"
            observation = dataclasses.replace(
                observation, detail="; ".join(p for p in (detail, observation.detail) if p)
            )
            applied = await self._apply(job.id, observation, kept_id=item.id, claim=claim)
            if applied is not None and applied.refused:
                log.warning(
                    "a kept callback was about another job: %s",
                    applied.refused,
                    extra={
                        "job_id": job.id,
                        "webhook_id": short(item.webhook_id),
                        "instance": job.instance,
                    },
                )

    # -- polling ------------------------------------------------------------------

    async def poll(self, job: Job, *, manual: bool = False) -> Job:
        """Ask the upstream for the job's status and record the answer.

        Transient failures reschedule and never fail the job; ``manual`` re-raises
        them so an operator's refresh gets an answer.
        """
        now = time.time()
        if job.upstream_id is None:
            if job.state == State.SUBMITTING and now >= job.created_at + SUBMIT_DEADLINE:
                await self._apply(
                    job.id,
                    Observation(
                        Source.POLL,
                        state=State.SUBMIT_FAILED,
                        detail="the upload never got an answer from the upstream",
                    ),
                )
            elif manual:
                raise ApiError(
                    "the job has not reached the upstream yet", code="not_submitted", status=409
                )
            return await self._reload(job)
        try:
            status = await self.upstreams.for_job(job).status(job.hub, job.upstream_id)
        except UpstreamError as exc:
            await self._poll_failed(job, exc, now)
            if manual:
                raise upstream_failure("the status poll failed", exc) from exc
            return await self._reload(job)
        observation = Observation(
            Source.POLL,
            status=status.status,
            raw_status=status.raw_status,
            records_count=status.records_count,
            records_failed_count=status.records_failed_count,
            upstream_error=status.error,
            detail="; ".join(part for part in (_why(job, manual), status.note) if part),
        )
        applied = await self._apply(
            job.id, observation, next_poll_at=self.next_poll(job, now, job.poll_count + 1)
        )
        if (
            applied is not None
            and not applied.job.terminal
            and now >= job.created_at + self.settings.job_timeout
        ):
            applied = await self._apply(
                job.id,
                Observation(
                    Source.TIMEOUT,
                    state=State.TIMED_OUT,
                    detail=f"not finished after {self.settings.job_timeout:g} s",
                ),
            )
        return applied.job if applied else await self._reload(job)

    async def _poll_failed(self, job: Job, exc: UpstreamError, now: float) -> None:
        if exc.status == 404:
            if job.not_found_count + 1 >= NOT_FOUND_LIMIT:
                await self._apply(
                    job.id,
                    Observation(
                        Source.POLL,
                        state=State.ABORTED,
                        detail=f"the upstream no longer knows job {job.upstream_id} "
                        f"({NOT_FOUND_LIMIT} status polls answered 404)",
                    ),
                )
                return
            await self.store.reschedule(
                job.id, self.backoff(job, now, None), detail=str(exc), not_found=True
            )
            return
        log.info(
            "status poll failed for job %s: %s",
            job.id,
            exc,
            extra={"job_id": job.id, "upstream_id": job.upstream_id, "instance": job.instance},
        )
        if now >= job.created_at + self.settings.job_timeout:
            await self._apply(
                job.id,
                Observation(
                    Source.TIMEOUT,
                    state=State.TIMED_OUT,
                    detail=f"not finished after {self.settings.job_timeout:g} s",
                ),
            )
            return
        await self.store.reschedule(
            job.id, self.backoff(job, now, exc.retry_after), detail=str(exc)
        )

    async def _apply(
        self, job_id: str, observation: Observation, **options: Unpack[ApplyOptions]
    ) -> Applied | None:
        """``Store.apply``, waking what a job's end schedules when the change ended it."""
        applied = await self.store.apply(job_id, observation, **options)
        if applied is not None and applied.ended:
            self.ended()
        return applied

    async def _reload(self, job: Job) -> Job:
        fresh = await self.store.get_job(job.id)
        return fresh if fresh is not None else job

    # -- cancellation -------------------------------------------------------------

    async def cancel(self, job: Job) -> Job:
        if job.terminal:
            raise ApiError(f"the job is already {job.state}", code="job_terminal", status=409)
        if job.upstream_id is None:
            raise ApiError(
                "the job has not reached the upstream yet", code="not_submitted", status=409
            )
        if job.state == State.CANCELLATION_PENDING:
            # Asked already, and the upstream is cancelling: asking again only earns a
            # refusal once it is done. The answer is the job as the upstream has it now.
            return await self.poll(job)
        try:
            answer = await self.upstreams.for_job(job).cancel(job.hub, job.upstream_id)
        except UpstreamError as exc:
            raise upstream_failure("the upstream refused to cancel", exc) from exc
        now = time.time()
        applied = await self._apply(
            job.id,
            Observation(
                Source.CANCEL,
                status=(answer.status if answer and answer.status else "CANCELLATION_PENDING"),
                raw_status=answer.raw_status if answer else None,
                upstream_error=answer.error if answer else None,
                detail="cancel requested",
            ),
            next_poll_at=now + self.settings.poll_interval,
        )
        assert applied is not None
        return applied.job
