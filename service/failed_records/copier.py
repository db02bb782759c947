"""The background copy of failed records into the store, page by page.

Like the poller: due times and leases live in the store (a copy is scheduled in the
transaction that ends its job), so a restart resumes a copy from its last stored
page, and with several replicas each copy runs on one. Each page is stored as it
arrives, with the copy's progress, so memory holds one page at a time. A copy stops
at ``max_records`` and says so. A failed page is retried later like a poll, doubling
from the poll interval to the largest one and honouring ``Retry-After``; a refusal
(a 4xx other than 429) ends the copy ``failed`` once ``REFUSALS`` tries in a row have
failed, and nothing is retried once the upstream has surely forgotten the records
(``rules.UPSTREAM_KEEPS`` after the job ended). Nothing here changes a job's state.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time

from service.background import DueWork
from service.failed_records.rules import UPSTREAM_KEEPS, CopyState, backoff, stored_record
from service.jobs import Job
from service.store import Store
from service.upstream.client import UpstreamClient, UpstreamError
from service.upstream.instances import Upstreams
from service.values import safe_text

__all__ = ["EMPTY_LISTINGS", "REFUSALS", "Copier"]

log = logging.getLogger("bulkhook.failed")

# Copies run at once, at most: each holds one page in memory.
_CONCURRENCY = 4
# How often the store is asked for due copies when nothing says sooner.
_MAX_SLEEP = 1.0
# Records asked for in a copy's first page, and the JSON aimed at per page after it.
_FIRST_PAGE = 20
_PAGE_BYTES = 512 * 1024
_MOST_PER_PAGE = 200
# The longest note kept with a copy.
_DETAIL = 2000
# Failed tries in a row after which a refusal gives a copy up.
REFUSALS = 3
# Listings in a row that show none of the failed records a job counts, after which the
# copy ends with none kept (and the records are asked of the upstream when looked at).
EMPTY_LISTINGS = 5


def _bounded_detail(kept: int, job: Job) -> str:
    total = job.records_failed_count
    of = f" of {total}" if total is not None and total > kept else ""
    return (
        f"the first {kept}{of} failed records are kept (BULKHOOK_MAX_FAILED_RECORDS);"
        " the rest were not copied"
    )


class Copier(DueWork):
    def __init__(
        self,
        store: Store,
        upstream: UpstreamClient | Upstreams,
        *,
        max_records: int,
        retry_first: float,
        retry_most: float,
        lease: float,
    ) -> None:
        super().__init__("copier", log, None)
        self.store = store
        # Each connector instance's client: a job's failed records are its instance's.
        self.upstreams = upstream if isinstance(upstream, Upstreams) else Upstreams.single(upstream)
        self.max_records = max_records
        self.retry_first = retry_first
        self.retry_most = retry_most
        self.lease = lease
        self.owner = f"copier-{secrets.token_hex(4)}"

    async def tick(self) -> int:
        """Claim the copies due now (as many as there is room for) and start them."""
        room = _CONCURRENCY - len(self._inflight)
        if room <= 0:
            return 0
        claimed = await self.store.claim_copies(time.time(), room, self.owner, self.lease)
        for state in claimed:
            self._spawn(self._copy_logged(state))
        return len(claimed)

    async def _release(self) -> None:
        await self.store.release_copy_leases(self.owner)

    async def _sleep_time(self, claimed: int) -> float:
        """How long to sleep before the next tick, unless a copy ending wakes it."""
        if len(self._inflight) >= _CONCURRENCY:
            return _MAX_SLEEP
        if claimed:
            return 0.0  # there may be more due right now
        return self._until(await self.store.next_copy_due(), _MAX_SLEEP)

    async def _copy_logged(self, state: CopyState) -> None:
        try:
            await self.copy(state)
        except Exception as exc:
            # The store failed us (or a bug): the lease runs out and the copy is due
            # again, from its last stored page.
            log.warning("copying the failed records of job %s failed: %r", state.job_id, exc)

    async def copy(self, state: CopyState) -> None:
        """Copy ``state``'s job's failed records from its next page on, while this
        replica holds its lease."""
        job = await self.store.get_job(state.job_id, with_events=False)
        if job is None or job.upstream_id is None:
            await self._end(state, "failed", complete=False, detail="the job has no upstream id")
            return
        upstream = self.upstreams.get(job.instance)
        if upstream is None:
            # Retried like an upstream failure: the instance may be configured again.
            why = f"the job's connector instance {job.instance!r} is not configured"
            await self._attempt_failed(state, UpstreamError("errors", why), job.instance)
            return
        token = state.next_page
        size = _FIRST_PAGE
        while True:
            room = self.max_records - state.kept
            try:
                page = await upstream.error_page(
                    job.hub, job.upstream_id, token=token, page_size=max(1, min(size, room))
                )
            except UpstreamError as exc:
                await self._attempt_failed(state, exc, job.instance)
                return
            records = [stored_record(record) for record in page.records[:room]]
            kept = state.kept + len(records)
            more = page.next_token is not None or len(page.records) > room
            now = time.time()
            expected = min(job.records_failed_count or 0, self.max_records)
            if not more and kept == 0 < expected and state.attempts + 1 < EMPTY_LISTINGS:
                # The job counts failures the upstream does not list yet (its list can
                # lag the job's end): ask again later rather than keep nothing for good.
                await self._attempt_failed(
                    state,
                    UpstreamError(
                        "errors",
                        f"the upstream lists none of the {expected} failed records yet",
                    ),
                    job.instance,
                )
                return
            if not more or kept >= self.max_records:
                detail = _bounded_detail(kept, job) if more else ""
                short = not more and kept < expected
                if short:
                    detail = (
                        f"the upstream listed {kept} of the {job.records_failed_count}"
                        " failed records the job counts"
                    )
                done = dataclasses.replace(
                    state,
                    status="copied",
                    kept=kept,
                    complete=not more and not short,
                    next_page=None,
                    attempts=0,
                    due_at=None,
                    detail=detail,
                )
                if await self.store.save_copy(done, self.owner, records):
                    log.info(
                        "kept %d failed records of job %s%s",
                        kept,
                        job.id,
                        "" if not more else " (the bound)",
                        extra={"job_id": job.id, "instance": job.instance},
                    )
                return
            state = dataclasses.replace(
                state,
                status="copying",
                kept=kept,
                next_page=page.next_token,
                attempts=0,
                due_at=now,
                detail="",
            )
            if not await self.store.save_copy(
                state, self.owner, records, lease_until=now + self.lease
            ):
                return  # another replica holds it now
            token = page.next_token
            if records:
                per_record = max(1, page.bytes // len(page.records))
                size = max(1, min(_MOST_PER_PAGE, _PAGE_BYTES // per_record))

    async def _attempt_failed(self, state: CopyState, exc: UpstreamError, instance: str) -> None:
        now = time.time()
        attempts = state.attempts + 1
        refused = exc.status is not None and 400 <= exc.status < 500 and exc.status != 429
        if refused and attempts >= REFUSALS:
            await self._end(state, "failed", complete=False, detail=f"{exc}; given up")
            return
        if now >= state.since + UPSTREAM_KEEPS:
            detail = f"{exc}; given up: the upstream keeps failed records three days"
            await self._end(state, "failed", complete=False, detail=detail)
            return
        wait = backoff(attempts, self.retry_first, self.retry_most, exc.retry_after)
        log.info(
            "copying the failed records of job %s failed, again in %.1f s: %s",
            state.job_id,
            wait,
            exc,
            extra={"job_id": state.job_id, "instance": instance},
        )
        retry = dataclasses.replace(
            state, attempts=attempts, due_at=now + wait, detail=safe_text(str(exc), _DETAIL)
        )
        await self.store.save_copy(retry, self.owner)

    async def _end(self, state: CopyState, status: str, *, complete: bool, detail: str) -> None:
        log.warning(
            "copying the failed records of job %s ended %s: %s",
            state.job_id,
            status,
            detail,
            extra={"job_id": state.job_id},
        )
        ended = dataclasses.replace(
            state,
            status=status,
            complete=complete,
            next_page=None,
            due_at=None,
            detail=safe_text(detail, _DETAIL),
        )
        await self.store.save_copy(ended, self.owner)
