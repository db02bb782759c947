"""The background fetch of download results into the results directory.

Like the copier of failed records: a fetch is scheduled in the transaction that
completes its download job, due times and leases live in the store, and with several
replicas each fetch runs on one while any replica serves the stored file from the
shared results directory. The result streams from the upstream into
``ResultFiles.write`` (a temporary file renamed when whole), so memory stays at one
batch however large it is, and a reader never finds part of a file. The lease is
renewed every third of its length while the file arrives; a replica that loses it
(it stalled past its lease, another took over) stops.

An attempt that fails (429, 5xx, a timeout, a file cut off mid-way, a disk error, or
any other error, logged with its traceback) is tried again later, from the start,
doubling from the poll interval to the largest one and never before ``Retry-After``;
``rules.after_failure`` says when it is given up. A
process killed mid-fetch leaves its lease to run out and its temporary file to the next
attempt, which removes it before it writes (``ResultFiles.remove_temporaries``).
Nothing here changes a job's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time

from service.background import DueWork
from service.downloads.records import FORMATS, Format
from service.downloads.results import ResultFiles, StoredResult
from service.downloads.rules import FetchState, after_failure, count_note
from service.jobs import Job
from service.metrics import Metrics
from service.store import Store
from service.upstream.client import UpstreamClient, UpstreamError
from service.upstream.instances import Upstreams
from service.values import safe_text

__all__ = ["Fetcher"]

log = logging.getLogger("bulkhook.downloads")

# Fetches run at once, at most: each holds one batch in memory and one connection.
_CONCURRENCY = 4
# How often the store is asked for due fetches when nothing says sooner.
_MAX_SLEEP = 1.0
# The longest note kept with a fetch.
_DETAIL = 2000


class _LeaseLost(Exception):
    """Another replica holds the fetch now: this one stops, writing nothing."""


class Fetcher(DueWork):
    def __init__(
        self,
        store: Store,
        upstream: UpstreamClient | Upstreams,
        files: ResultFiles,
        metrics: Metrics,
        *,
        retry_first: float,
        retry_most: float,
        lease: float,
    ) -> None:
        super().__init__("fetcher", log, None)
        self.store = store
        # Each connector instance's client: a result comes from its job's instance.
        self.upstreams = upstream if isinstance(upstream, Upstreams) else Upstreams.single(upstream)
        self.files = files
        self.metrics = metrics
        self.retry_first = retry_first
        self.retry_most = retry_most
        self.lease = lease
        self.owner = f"fetcher-{secrets.token_hex(4)}"

    async def tick(self) -> int:
        """Claim the fetches due now (as many as there is room for) and start them."""
        room = _CONCURRENCY - len(self._inflight)
        if room <= 0:
            return 0
        claimed = await self.store.claim_fetches(time.time(), room, self.owner, self.lease)
        for state in claimed:
            self._spawn(self._fetch_logged(state))
        return len(claimed)

    async def _release(self) -> None:
        await self.store.release_fetch_leases(self.owner)

    async def _sleep_time(self, claimed: int) -> float:
        if len(self._inflight) >= _CONCURRENCY:
            return _MAX_SLEEP
        if claimed:
            return 0.0  # there may be more due right now
        return self._until(await self.store.next_fetch_due(), _MAX_SLEEP)

    async def _fetch_logged(self, state: FetchState) -> None:
        try:
            await self.fetch(state)
        except _LeaseLost:
            log.info("the fetch of job %s's result went to another replica", state.job_id)
        except Exception as exc:
            # The store failed us (or a bug): the lease runs out and the fetch is due
            # again.
            log.warning("fetching the result of job %s failed: %r", state.job_id, exc)

    async def fetch(self, state: FetchState) -> None:
        """One attempt at ``state``'s result, while this replica holds its lease."""
        state = dataclasses.replace(state, status="fetching")
        job = await self.store.get_job(state.job_id, with_events=False)
        if job is None or job.upstream_id is None or state.format not in FORMATS:
            await self._save(
                dataclasses.replace(
                    state, status="failed", due_at=None, detail="the job has no upstream result"
                )
            )
            self.metrics.download("failed", job.instance if job is not None else "unknown")
            return
        if job.instance not in self.upstreams:
            why = f"the job's connector instance {job.instance!r} is not configured"
            await self._failed(state, why, False, None, job.instance)
            return
        fmt: Format = FORMATS[FORMATS.index(state.format)]
        attempt = asyncio.ensure_future(self._download(job, fmt))
        keeper = asyncio.ensure_future(self._keep_lease(state, attempt))
        try:
            stored = await attempt
        except asyncio.CancelledError:
            if keeper.done() and not keeper.cancelled() and keeper.result():
                raise _LeaseLost() from None
            raise
        except UpstreamError as exc:
            not_found = exc.status in (404, 410)
            await self._failed(state, str(exc), not_found, exc.retry_after, job.instance)
            return
        except OSError as exc:
            why = f"the result could not be written: {exc}"
            await self._failed(state, why, False, None, job.instance)
            return
        except Exception as exc:
            # An error no rule above names (a library's surprise, a bug): a failed
            # attempt like any other, so it is backed off, counted and given up in
            # time instead of claimed again every lease, for ever.
            log.error(
                "fetching the result of job %s raised %s",
                state.job_id,
                type(exc).__name__,
                exc_info=exc,
                extra={"job_id": state.job_id, "instance": job.instance},
            )
            why = f"unexpected error: {type(exc).__name__}: {exc}"
            await self._failed(state, why, False, None, job.instance)
            return
        finally:
            if not attempt.done():
                attempt.cancel()
            # A renewal under way ends before the outcome is written, never after it.
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keeper
        notes = (stored.detail, count_note(job.records_count, stored.records))
        done = dataclasses.replace(
            state,
            status="stored",
            bytes=stored.bytes,
            records=stored.records,
            sha256=stored.sha256,
            detail=safe_text("; ".join(n for n in notes if n), _DETAIL) or None,
            attempts=state.attempts + 1,
            not_found=0,
            due_at=None,
        )
        await self._save(done)
        self.metrics.download("stored", job.instance)
        self.metrics.result_bytes.inc(stored.bytes)
        log.info(
            "stored the result of job %s: %d bytes, %d records",
            job.id,
            stored.bytes,
            stored.records,
            extra={"job_id": job.id, "instance": job.instance},
        )

    async def _download(self, job: Job, fmt: Format) -> StoredResult:
        """The result streamed into the results directory, after removing what an
        attempt before (cut off by a kill) left."""
        assert job.upstream_id is not None
        await asyncio.to_thread(self.files.remove_temporaries, job.id)
        async with self.upstreams.for_job(job).download(
            job.hub, job.upstream_id, job.object, format=fmt
        ) as download:
            return await self.files.write(job.id, fmt, download.aiter_bytes())

    async def _keep_lease(self, state: FetchState, attempt: asyncio.Future[StoredResult]) -> bool:
        """Renews the lease every third of its length while ``attempt`` runs; True,
        with the attempt cancelled, once the lease is lost.

        A renewal the store fails is tried again at the next interval (the lease has
        two more thirds to run): the attempt stops only when the store says another
        replica holds the fetch, not on a passing store error.
        """
        failing = False
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                kept = await self.store.save_fetch(
                    state, self.owner, lease_until=time.time() + self.lease
                )
            except Exception as exc:
                if not failing:
                    log.warning(
                        "renewing the lease on job %s's fetch failed, to be tried again: %r",
                        state.job_id,
                        exc,
                        extra={"job_id": state.job_id},
                    )
                failing = True
                continue
            failing = False
            if not kept:
                attempt.cancel()
                return True

    async def _failed(
        self,
        state: FetchState,
        why: str,
        not_found: bool,
        retry_after: float | None,
        instance: str,
    ) -> None:
        after = after_failure(
            state,
            time.time(),
            safe_text(why, _DETAIL),
            not_found=not_found,
            retry_after=retry_after,
            first=self.retry_first,
            most=self.retry_most,
        )
        await self._save(after)
        given_up = after.status == "failed"
        self.metrics.download("failed" if given_up else "retried", instance)
        log.warning(
            "fetching the result of job %s %s: %s",
            state.job_id,
            "was given up" if given_up else "failed, to be tried again",
            why,
            extra={"job_id": state.job_id, "instance": instance},
        )

    async def _save(self, state: FetchState) -> None:
        if not await self.store.save_fetch(state, self.owner):
            raise _LeaseLost()
