"""Live dashboard updates over Server-Sent Events, read from the store.

One change feed per app reads the store every ``TICK`` seconds while any stream is
open, and fans what changed out to every open stream: the store is read the same
number of times whether one tab is open or a hundred, and a job changed by any
replica shows up on every replica's dashboard. The feed starts with the first stream
and stops with the last one, or when the app stops.

A stream ends when its client goes (its next write fails), when the server starts
shutting down, and in any case after ``MAX_STREAM`` seconds: the browser's
EventSource then reconnects by itself and resumes from the ``Last-Event-ID`` it was
given, so nothing is missed, and no server ever waits on a dashboard tab to finish a
graceful shutdown.

A download's result is fetched after its job has completed, and the fetch changes
nothing of the job: a job page watching a completed download whose result is still
to come has its detail read again every tick until the result is stored or given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from service.dashboard.views import job_view
from service.jobs import Job

if TYPE_CHECKING:
    from service.store import Store

__all__ = ["Streams", "all_jobs", "one_job", "resume_point"]

log = logging.getLogger("bulkhook.dashboard")

TICK = 0.5
# ``updated_at`` is the observation's time, a little before its commit, and replicas'
# clocks differ a little: every read looks this far back (``seen`` drops repeats).
LOOKBACK = 5.0
# Timeline entries and refusals are numbered when written but may commit out of
# order (PostgreSQL): every read looks this many numbers back.
ID_LOOKBACK = 200
MAX_STREAM = 20.0
HEARTBEAT = 2.5
_PAGE = 200
_PAGES_PER_TICK = 10
# Ticks a stream may fall behind (a client that reads too slowly) before it is ended;
# its browser reconnects and resumes.
_BACKLOG = 100


class Renderer(Protocol):
    def render(self, name: str, **context: Any) -> str: ...

    async def detail(self, job: Job) -> dict[str, Any]: ...

    async def panel(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Tick:
    """What changed in one read of the store, shared by every stream."""

    # Every job read up to here (the resume point handed to browsers).
    cursor: float
    # Jobs changed (their version is new), each with its rendered table row.
    jobs: list[tuple[Job, str]]
    # The callbacks panel, rendered, when a delivery arrived.
    panel: str | None
    # Watched jobs that changed, whose timeline grew or whose result is on its way:
    # what the page shows of them (``Mark``) and the event's data, or None when the job
    # is gone.
    details: dict[str, tuple[Mark, dict[str, Any]] | None]


# What a job page shows changes with: the job's version, its timeline's entries (a
# hash of them: the refusals shown are the newest 100, so a new one may leave the
# length as it was), and its result (status, attempts, detail; None for an upload).
Mark = tuple[int, int, tuple[Any, ...] | None]

_END = object()


@dataclass(eq=False)
class _Subscriber:
    job_id: str | None
    queue: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(_BACKLOG))


class Streams:
    """An app's open streams and the change feed that serves them; tells every stream
    to end on app shutdown, or as soon as uvicorn starts a graceful shutdown (it waits
    for open responses *before* the lifespan ends)."""

    def __init__(self) -> None:
        self._closed = False
        self._subscribers: set[_Subscriber] = set()
        self._watched: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        # Where the feed's next read of changed jobs starts.
        self.read_from = 0.0
        # The callbacks panel as last rendered (None: not rendered for current streams).
        self.panel: str | None = None

    def close(self) -> None:
        self._closed = True
        self._stop()
        for subscriber in self._subscribers:
            _offer(subscriber, _END)

    @property
    def ending(self) -> bool:
        return self._closed or _server_exiting()

    def subscribe(self, store: Store, renderer: Renderer, job_id: str | None) -> _Subscriber:
        subscriber = _Subscriber(job_id)
        self._subscribers.add(subscriber)
        if job_id is not None:
            self._watched[job_id] += 1
        if self._task is None or self._task.done():
            self.read_from = time.time() - LOOKBACK
            self.panel = None
            self._task = asyncio.create_task(self._run(store, renderer))
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        if subscriber not in self._subscribers:
            return
        self._subscribers.discard(subscriber)
        if subscriber.job_id is not None:
            self._watched[subscriber.job_id] -= 1
            if self._watched[subscriber.job_id] <= 0:
                del self._watched[subscriber.job_id]
        if not self._subscribers:
            self._stop()

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, store: Store, renderer: Renderer) -> None:
        """Read the store once per tick and hand each stream what changed."""
        try:
            await self._feed(store, renderer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store went away: end; the browsers reconnect
            log.warning("dashboard streams ended: %r", exc)
            for subscriber in list(self._subscribers):
                _offer(subscriber, _END)

    async def _feed(self, store: Store, renderer: Renderer) -> None:
        cursor = self.read_from + LOOKBACK
        seen: dict[str, tuple[int, float]] = {}
        # Entries written before the feed started are not news.
        newest_seq, newest_refusal = await store.timeline_marks()
        events, refused = await store.timeline_changes(
            max(0, newest_seq - ID_LOOKBACK), max(0, newest_refusal - ID_LOOKBACK), ID_LOOKBACK
        )
        seen_entries = {("event", n) for n, _ in events} | {("refusal", n) for n, _ in refused}
        panel_mark: Any = ()
        # Watched jobs whose detail the feed has read, and those of them whose result
        # is on its way (read again every tick).
        known: set[str] = set()
        moving: set[str] = set()
        # Where the last tick stopped paging when more jobs changed than it may read.
        behind: tuple[float, str] | None = None
        while True:
            everyone = any(s.job_id is None for s in self._subscribers)
            changed, cursor, behind = await _changed_jobs(
                store, self.read_from, cursor, seen, behind
            )
            self.read_from = cursor - LOOKBACK
            seen = {k: v for k, v in seen.items() if v[1] >= cursor - 2 * LOOKBACK}
            touched = {job.id for job in changed}
            events, refused = await store.timeline_changes(
                max(0, newest_seq - ID_LOOKBACK),
                max(0, newest_refusal - ID_LOOKBACK),
                _PAGE * _PAGES_PER_TICK,
            )
            # A new entry may be dated before the newest delivery (a refusal is written
            # after its answer's delay, another replica commits late): the panel is
            # rendered again for it, not only when the newest delivery changes.
            fresh = False
            for kind, entries in (("event", events), ("refusal", refused)):
                for number, ref in entries:
                    if (kind, number) not in seen_entries:
                        fresh = True
                        if ref is not None:
                            touched.add(ref)
                    seen_entries.add((kind, number))
            newest_seq = max([newest_seq, *(n for n, _ in events)])
            newest_refusal = max([newest_refusal, *(n for n, _ in refused)])
            seen_entries = {
                (kind, n)
                for kind, n in seen_entries
                if n > (newest_seq if kind == "event" else newest_refusal) - ID_LOOKBACK
            }
            rows: list[tuple[Job, str]] = []
            panel: str | None = None
            if everyone:
                now = time.time()
                rows = [(job, _row(renderer, job, now)) for job in changed]
                newest = await store.recent_callbacks(1)
                mark = (newest[0].received_at, newest[0].webhook_id) if newest else None
                if mark != panel_mark or fresh or self.panel is None:
                    panel_mark = mark
                    view = await renderer.panel()
                    panel = self.panel = renderer.render("_callbacks.html", panel=view)
            else:
                panel_mark, self.panel = (), None
            watched = set(self._watched)
            known &= watched
            moving &= watched
            details = {
                job_id: await _detail(store, renderer, job_id)
                for job_id in (touched | moving | (watched - known)) & watched
            }
            for job_id, found in details.items():
                known.add(job_id)
                if found is not None and found[1]["result_moving"]:
                    moving.add(job_id)
                else:
                    moving.discard(job_id)
            tick = Tick(cursor, rows, panel, details)
            for subscriber in list(self._subscribers):
                _offer(subscriber, tick)
            await asyncio.sleep(TICK)


def _offer(subscriber: _Subscriber, item: Any) -> None:
    """Queue ``item``; a stream too far behind is told to end instead."""
    try:
        subscriber.queue.put_nowait(item)
    except asyncio.QueueFull:
        with contextlib.suppress(asyncio.QueueEmpty):
            subscriber.queue.get_nowait()
        subscriber.queue.put_nowait(_END)


async def _changed_jobs(
    store: Store,
    after: float,
    cursor: float,
    seen: dict[str, tuple[int, float]],
    behind: tuple[float, str] | None,
) -> tuple[list[Job], float, tuple[float, str] | None]:
    """Jobs whose version is new to ``seen``, changed after ``after`` (paged), and the
    cursor moved past them: everything up to LOOKBACK ago counts as read even when
    nothing changed, so a resumed stream does not replay the whole time it was open.

    More changes than a tick's pages: the read goes on from ``behind`` (where the last
    tick stopped, returned as the third value) instead of reading the same first pages
    again, and the cursor stays at the newest job read until the pages run dry."""
    changed: list[Job] = []
    after_id = ""
    if behind is not None:
        after, after_id = behind
    for _ in range(_PAGES_PER_TICK):
        jobs = await store.jobs_changed_since(after, after_id, _PAGE)
        for job in jobs:
            if seen.get(job.id, (-1, 0.0))[0] == job.version:
                continue
            seen[job.id] = (job.version, job.updated_at)
            cursor = max(cursor, job.updated_at)
            changed.append(job)
        if len(jobs) < _PAGE:
            return changed, max(cursor, time.time() - LOOKBACK), None
        after, after_id = jobs[-1].updated_at, jobs[-1].id
    return changed, cursor, (after, after_id)


async def _detail(
    store: Store, renderer: Renderer, job_id: str
) -> tuple[Mark, dict[str, Any]] | None:
    job = await store.get_job(job_id)
    if job is None:
        return None
    detail = await renderer.detail(job)
    view, result = detail["job"], detail.get("result")
    data = {
        "job": job.to_json(with_events=False),
        "detail": renderer.render("_detail.html", **detail),
        "terminal": view["terminal"],
        "has_failed": view["has_failed"],
        "result_moving": bool(result and result["moving"]),
    }
    entries = hash(tuple((e["at"], e["verdict"], e["detail"]) for e in detail["timeline"]))
    shown = (result["status"], result["attempts"], result["detail"]) if result else None
    return (job.version, entries, shown), data


def _server_exiting() -> bool:
    """Whether the uvicorn server in this process was told to exit (SIGTERM/SIGINT).

    uvicorn sends no ASGI event for it, but in the main thread its signal handler is a
    method of the server, whose ``should_exit`` it sets; ``bulkhook serve`` runs so.
    """
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(getattr(handler, "__self__", None), "should_exit", False) is True


def resume_point(value: str | None) -> float:
    """Where a stream starts: the last event id the browser saw, or when its page was
    rendered; never more than an hour back, never in the future."""
    now = time.time()
    try:
        point = float(value) if value and len(value) <= 64 else now
    except ValueError:
        point = now
    return min(max(point, now - 3600), now) if point == point else now  # NaN -> now


def _event(name: str, data: Any, event_id: str | None = None) -> str:
    lines = [f"id: {event_id}"] if event_id else []
    lines += [f"event: {name}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    return "\n".join(lines) + "\n\n"


def _row(renderer: Renderer, job: Job, now: float) -> str:
    return renderer.render("_row.html", job=job_view(job, now))


async def _messages(
    subscriber: _Subscriber, streams: Streams
) -> AsyncIterator[tuple[Tick | None, bool]]:
    """The feed's ticks for one stream until it should end (None when none came
    within a tick), each with whether a heartbeat is due."""
    started = last_beat = time.monotonic()
    while not streams.ending and time.monotonic() - started < MAX_STREAM:
        try:
            item = await asyncio.wait_for(subscriber.queue.get(), TICK)
        except TimeoutError:
            item = None
        if item is _END:
            return
        now = time.monotonic()
        beat = now - last_beat >= HEARTBEAT
        if beat:
            last_beat = now
        yield item, beat


async def _catch_up(
    store: Store, since: float, until: float, seen: dict[str, tuple[int, float]]
) -> AsyncIterator[Job]:
    """The jobs changed after a resumed stream's point, up to where the feed reads."""
    after, after_id = since - LOOKBACK, ""
    while True:
        jobs = await store.jobs_changed_since(after, after_id, _PAGE)
        for job in jobs:
            if seen.get(job.id, (-1, 0.0))[0] < job.version:
                seen[job.id] = (job.version, job.updated_at)
                yield job
        if len(jobs) < _PAGE or jobs[-1].updated_at > until:
            return
        after, after_id = jobs[-1].updated_at, jobs[-1].id


async def all_jobs(
    store: Store, since: float, streams: Streams, renderer: Renderer
) -> AsyncIterator[str]:
    """``job`` events (the job and its table row) for every job changed after
    ``since``, and a ``callbacks`` event (the panel) whenever a delivery arrives."""
    yield "retry: 1000\n\n"
    subscriber = streams.subscribe(store, renderer, None)
    cursor = since
    seen: dict[str, tuple[int, float]] = {}
    try:
        # What changed since the browser's point, read here even when the feed reads
        # from before it: the feed may have read a change already, for other streams,
        # while this browser was reconnecting.
        async for job in _catch_up(store, since, streams.read_from + LOOKBACK, seen):
            cursor = max(cursor, job.updated_at)
            data = {
                "job": job.to_json(with_events=False),
                "row": _row(renderer, job, time.time()),
            }
            yield _event("job", data, f"{cursor:.6f}")
        if streams.panel is not None:
            yield _event("callbacks", {"panel": streams.panel}, f"{cursor:.6f}")
        async for tick, beat in _messages(subscriber, streams):
            sent = False
            if tick is not None:
                cursor = max(cursor, tick.cursor)
                for job, row in tick.jobs:
                    # A tick read before this stream's catch-up may hold an older version.
                    if seen.get(job.id, (-1, 0.0))[0] >= job.version:
                        continue
                    seen[job.id] = (job.version, job.updated_at)
                    data = {"job": job.to_json(with_events=False), "row": row}
                    yield _event("job", data, f"{cursor:.6f}")
                    sent = True
                seen = {k: v for k, v in seen.items() if v[1] >= cursor - 2 * LOOKBACK}
                if tick.panel is not None:
                    yield _event("callbacks", {"panel": tick.panel}, f"{cursor:.6f}")
                    sent = True
            if beat and not sent:
                # No event, but the resume point moves (an id alone dispatches nothing).
                yield f"id: {cursor:.6f}\n\n"
    except Exception as exc:  # the store went away: end; the browser reconnects
        log.warning("dashboard stream ended: %r", exc)
    finally:
        streams.unsubscribe(subscriber)


async def one_job(
    store: Store, job_id: str, streams: Streams, renderer: Renderer
) -> AsyncIterator[str]:
    """A ``job`` event (the job and its rendered detail) whenever the job or its
    timeline changes, starting with its current state; ``gone`` if it does not exist."""
    yield "retry: 1000\n\n"
    # Subscribed before the first read, so no change between the two is missed.
    subscriber = streams.subscribe(store, renderer, job_id)
    try:
        current = await _detail(store, renderer, job_id)
        if current is None:
            yield _event("gone", {"id": job_id[:100]})
            return
        yield _event("job", current[1])
        async for tick, beat in _messages(subscriber, streams):
            # A tick without this job (and a quiet moment) means no news: the page
            # keeps the last detail sent, never the one the stream started with.
            update = tick.details.get(job_id, current) if tick is not None else current
            if update is None:
                yield _event("gone", {"id": job_id[:100]})
                return
            # A tick read just before this stream first read the job may hold an older
            # version of it: only what is at least as new as the last sent is news.
            if update[0] != current[0] and update[0][0] >= current[0][0]:
                current = update
                yield _event("job", current[1])
            elif beat:
                yield ": keep-alive\n\n"
    except Exception as exc:
        log.warning("dashboard stream ended: %r", exc)
    finally:
        streams.unsubscribe(subscriber)
