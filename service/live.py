"""Live dashboard updates over Server-Sent Events, read from the store.

Each stream polls the store every ``TICK`` seconds and sends what changed, so a job
changed by any replica shows up on every replica's dashboard. A stream ends when its
client goes (Starlette cancels it), when the server starts shutting down, and in any
case after ``MAX_STREAM`` seconds: the browser's EventSource then reconnects by itself
and resumes from the ``Last-Event-ID`` it was given, so nothing is missed, and no
server ever waits on a dashboard tab to finish a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from .jobs import Job
from .views import job_view

if TYPE_CHECKING:
    from .state import AppState

__all__ = ["Streams", "all_jobs", "one_job", "resume_point"]

log = logging.getLogger("bulkhook.dashboard")

TICK = 0.5
# ``updated_at`` is the observation's time, a little before its commit, and replicas'
# clocks differ a little: every read looks this far back (``seen`` drops repeats).
LOOKBACK = 5.0
MAX_STREAM = 20.0
HEARTBEAT = 2.5
_PAGE = 200
_PAGES_PER_TICK = 10


class Renderer(Protocol):
    def render(self, name: str, **context: Any) -> str: ...

    async def detail(self, state: AppState, job: Job) -> dict[str, Any]: ...

    async def panel(self, state: AppState) -> dict[str, Any]: ...


class Streams:
    """Tells every open stream to end: on app shutdown, or as soon as uvicorn starts a
    graceful shutdown (it waits for open responses *before* the lifespan ends)."""

    def __init__(self) -> None:
        self._closed = False

    def close(self) -> None:
        self._closed = True

    @property
    def ending(self) -> bool:
        return self._closed or _server_exiting()


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
        point = float(value) if value else now
    except ValueError:
        point = now
    return min(max(point, now - 3600), now) if point == point else now  # NaN -> now


def _event(name: str, data: Any, event_id: str | None = None) -> str:
    lines = [f"id: {event_id}"] if event_id else []
    lines += [f"event: {name}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    return "\n".join(lines) + "\n\n"


async def _ticks(streams: Streams) -> AsyncIterator[bool]:
    """Yield once per tick until the stream should end; True when a heartbeat is due."""
    started = last_beat = time.monotonic()
    while not streams.ending and time.monotonic() - started < MAX_STREAM:
        now = time.monotonic()
        beat = now - last_beat >= HEARTBEAT
        if beat:
            last_beat = now
        yield beat
        await asyncio.sleep(TICK)


async def all_jobs(
    state: AppState, since: float, streams: Streams, renderer: Renderer
) -> AsyncIterator[str]:
    """``job`` events (the job and its table row) for every job changed after
    ``since``, and a ``callbacks`` event (the panel) whenever a delivery arrives."""
    yield "retry: 1000\n\n"
    cursor = since
    seen: dict[str, tuple[int, float]] = {}
    panel_mark: Any = ()
    try:
        async for beat in _ticks(streams):
            sent = False
            after, after_id = cursor - LOOKBACK, ""
            for _ in range(_PAGES_PER_TICK):
                jobs = await state.store.jobs_changed_since(after, after_id, _PAGE)
                for job in jobs:
                    if seen.get(job.id, (-1, 0.0))[0] == job.version:
                        continue
                    seen[job.id] = (job.version, job.updated_at)
                    cursor = max(cursor, job.updated_at)
                    row = renderer.render("_row.html", job=job_view(job, time.time()))
                    data = {"job": job.to_json(with_events=False), "row": row}
                    yield _event("job", data, f"{cursor:.6f}")
                    sent = True
                if len(jobs) < _PAGE:
                    break
                after, after_id = jobs[-1].updated_at, jobs[-1].id
            # Everything up to LOOKBACK ago has been read: move on even when nothing
            # changed, so a resumed stream does not replay the whole time the tab was open.
            cursor = max(cursor, time.time() - LOOKBACK)
            seen = {k: v for k, v in seen.items() if v[1] >= cursor - 2 * LOOKBACK}
            newest = await state.store.recent_callbacks(1)
            mark = (newest[0].received_at, newest[0].webhook_id) if newest else None
            if mark != panel_mark:
                panel_mark = mark
                panel = await renderer.panel(state)
                html = renderer.render("_callbacks.html", panel=panel)
                yield _event("callbacks", {"panel": html}, f"{cursor:.6f}")
                sent = True
            if beat and not sent:
                # No event, but the resume point moves (an id alone dispatches nothing).
                yield f"id: {cursor:.6f}\n\n"
    except Exception as exc:  # the store went away: end; the browser reconnects
        log.warning("dashboard stream ended: %r", exc)


async def one_job(
    state: AppState, job_id: str, streams: Streams, renderer: Renderer
) -> AsyncIterator[str]:
    """A ``job`` event (the job and its rendered detail) whenever the job or its
    timeline changes, starting with its current state; ``gone`` if it does not exist."""
    yield "retry: 1000\n\n"
    last: tuple[int, int] | None = None
    try:
        async for beat in _ticks(streams):
            job = await state.store.get_job(job_id)
            if job is None:
                yield _event("gone", {"id": job_id[:100]})
                return
            detail = await renderer.detail(state, job)
            mark = (job.version, len(detail["timeline"]))
            if mark != last:
                last = mark
                view = detail["job"]
                data = {
                    "job": job.to_json(with_events=False),
                    "detail": renderer.render("_detail.html", **detail),
                    "terminal": view["terminal"],
                    "has_failed": view["has_failed"],
                }
                yield _event("job", data)
            elif beat:
                yield ": keep-alive\n\n"
    except Exception as exc:
        log.warning("dashboard stream ended: %r", exc)
