"""The operator dashboard: which jobs are stuck, why one failed, and whether
callbacks arrive or are refused, without reading logs or writing curl commands.

Pages are rendered on the server from the store (so every replica shows the same
truth) with a little vanilla JavaScript from ``static/``; live updates come from
``live``. With ``BULKHOOK_API_TOKENS`` set, nothing but the login form is shown
without a token: a bearer header, or the HttpOnly cookie the login form sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from service.api.guard import Tokens, bearer
from service.api.routes import JobApi, stored_records
from service.callbacks.endpoint import read_body
from service.dashboard import failed, live
from service.dashboard.daycounts import DayCounts
from service.dashboard.failed import FailedTable, csv_chunks, stored_csv_chunks
from service.dashboard.views import callbacks_view, job_view, result_view, timeline_view
from service.errors import ApiError
from service.failed_records.rules import CopyState
from service.instances import valid_name
from service.jobs import Job, State
from service.metrics import Metrics
from service.store import Store
from service.upstream.client import UpstreamError, upstream_failure
from service.upstream.instances import Upstreams
from service.values import count, job_id_ok, safe_text

__all__ = ["COOKIE", "Dashboard", "failed_table"]

COOKIE = "bulkhook_token"
HERE = Path(__file__).resolve().parent
PAGE = 50
# Failed records shown per page of the job page's table, and the columns shown; the
# CSV has them all.
FAILED_PAGE = 100
FAILED_COLUMNS = 50
_SEARCH = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_CURSOR = re.compile(r"[A-Za-z0-9]{1,64}")
# No inline script or style anywhere, so the policy can forbid them.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer, browsers send "Origin: null" with
    # the login form, and the cross-site check could not tell it from a foreign one.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _unauthorized() -> ApiError:
    return ApiError(
        "a valid bearer token or dashboard login is required",
        code="unauthorized",
        status=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _older(state: State | None, search: str, instance: str, last_id: str) -> str:
    """The query string of the next page: the same filters, before the last job."""
    params = {"state": str(state or ""), "instance": instance, "q": search, "before": last_id}
    return urlencode({key: value for key, value in params.items() if value})


def _offered(configured: tuple[str, ...], chosen: str) -> list[str]:
    """The instances the filter offers: the configured ones, and the chosen one when it
    is not configured (any more): its jobs are still in the store."""
    return [*configured, chosen] if chosen and chosen not in configured else list(configured)


def _local_path(value: str | None) -> str:
    """Where to go after logging in: a path on this site, never another one."""
    if not value or not value.startswith("/") or value.startswith("//"):
        return "/"
    if "\\" in value or not value.isprintable():  # browsers drop tabs: "/\t/x" is "//x"
        return "/"
    return value


class Dashboard:
    """The dashboard's routes and templates, and the live streams it must end.

    Its job actions are the job API's own handlers (``jobs``), so they answer alike.
    """

    def __init__(
        self,
        *,
        store: Store,
        metrics: Metrics,
        tokens: Tokens,
        upstreams: Upstreams,
        jobs: JobApi,
        instances: Sequence[str] = (),
    ) -> None:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True
        )
        self.templates = Jinja2Templates(env=env)
        self.streams = live.Streams()
        self.day_counts = DayCounts()
        self._store = store
        self._metrics = metrics
        self._tokens = tokens
        # Each job's failed records are read from its own instance's upstream.
        self._upstreams = upstreams
        self._jobs = jobs
        # The configured connector instances' names, the default first: the jobs
        # table's filter offers them.
        self._instances = tuple(instances)
        # A download's result JSON and stored file, as the job API serves them.
        self._results = jobs.results

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/ui/login", self.login_form, methods=["GET"]),
            Route("/ui/login", self.login, methods=["POST"]),
            Route("/ui/logout", self.logout, methods=["POST"]),
            Route("/ui/jobs/{job_id}", self.job_page, methods=["GET"]),
            Route("/ui/jobs/{job_id}/failed", self.failed_fragment, methods=["GET"]),
            Route("/ui/jobs/{job_id}/failed.csv", self.failed_csv, methods=["GET"]),
            Route("/ui/jobs/{job_id}/result", self.result_file, methods=["GET"]),
            Route("/ui/jobs/{job_id}/cancel", self.cancel, methods=["POST"]),
            Route("/ui/jobs/{job_id}/refresh", self.refresh, methods=["POST"]),
            Route("/ui/callbacks", self.callbacks, methods=["GET"]),
            Route("/ui/stream", self.stream, methods=["GET"]),
            Mount("/ui/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # -- who may look -------------------------------------------------------------

    def credential(self, request: Request) -> str | None:
        """The valid token this request carries ("" when the API is open), else None: a
        bearer header, or the login cookie. Checked by ``guard.Tokens``, like the job
        API's."""
        tokens = self._tokens
        if not tokens.required:
            return ""
        given = bearer(request.headers.get("authorization", ""))
        if given and tokens.check(given, request.scope, "dashboard"):
            return given
        cookie = request.cookies.get(COOKIE, "")
        return cookie if cookie and tokens.check(cookie, request.scope, "dashboard") else None

    def _require(self, request: Request) -> None:
        """For the JSON, CSV and event-stream routes: a 401 error without a token."""
        if self.credential(request) is None:
            raise _unauthorized()

    # -- rendering ----------------------------------------------------------------

    def _page(
        self, request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        context = {"auth": self._tokens.required, **context}
        return self.templates.TemplateResponse(
            request, name, context, status_code=status, headers=_HEADERS
        )

    def _login_page(self, request: Request, target: str, error: str = "") -> Response:
        context = {"next": _local_path(target), "error": error, "title": "Log in"}
        return self._page(request, "login.html", context, status=401)

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(**context)

    async def panel(self) -> dict[str, Any]:
        now = time.time()
        recent = await self._store.recent_callbacks(20)
        counts = await self.day_counts.counts(self._store, now)
        return callbacks_view(recent, counts, self._metrics, now)

    # -- pages --------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        if self.credential(request) is None:
            return self._login_page(request, str(request.url.path))
        params = request.query_params
        chosen = (params.get("state") or "").upper()
        state_filter = State(chosen) if chosen in State.__members__ else None
        search = (params.get("q") or "").strip()[:100]
        before = params.get("before") or None
        if before is not None and not _CURSOR.fullmatch(before):
            before = None
        instance = (params.get("instance") or "").strip()[:100]
        problem, jobs = "", []
        if search and not _SEARCH.fullmatch(search):
            problem = "Search by a job id (or its start) or an upstream job id."
        elif instance and not valid_name(instance):
            problem = "Choose an instance by its name."
        else:
            jobs = await self._store.list_jobs(
                state=state_filter,
                limit=PAGE,
                before=before,
                search=search or None,
                instance=instance or None,
            )
        now = time.time()
        context = {
            "title": "Jobs",
            "jobs": [job_view(job, now) for job in jobs],
            "states": [str(s) for s in State],
            "chosen": str(state_filter or ""),
            "search": search,
            # A name no longer configured is offered too: its jobs are still listed.
            "instances": _offered(self._instances, instance if not problem else ""),
            "instance": instance if not problem else "",
            "problem": problem,
            "older": (
                _older(state_filter, search, instance, jobs[-1].id) if len(jobs) == PAGE else None
            ),
            "paged": before is not None,
            "since": f"{now:.3f}",
            "panel": await self.panel(),
        }
        return self._page(request, "index.html", context)

    async def job_page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if self.credential(request) is None:
            return self._login_page(request, f"/ui/jobs/{job_id}")
        # An id this service could never have made is not looked up.
        job = await self._store.get_job(job_id) if job_id_ok(job_id) else None
        if job is None:
            context = {"title": "No such job", "job_id": safe_text(job_id, 100)}
            return self._page(request, "missing.html", context, status=404)
        detail = await self.detail(job)
        return self._page(request, "job.html", {"title": f"Job {job.id}", **detail})

    async def detail(self, job: Job) -> dict[str, Any]:
        """What the job page and its live updates render: the job, its timeline and, for
        a download, its result."""
        rejected = await self._store.rejections_for(job.id)
        return {
            "job": job_view(job, time.time()),
            "timeline": timeline_view(job, rejected),
            "result": result_view(job, await self._results.state(job)),
        }

    # -- login --------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        target = _local_path(request.query_params.get("next"))
        if self.credential(request) is not None:
            return RedirectResponse(target, status_code=303)
        return self._login_page(request, target)

    async def login(self, request: Request) -> Response:
        # Cross-site form posts never get here: ``guard.RequestGuard`` refuses them.
        form = parse_qs((await read_body(request.receive, 8192)).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip()
        target = _local_path((form.get("next") or ["/"])[0])
        tokens = self._tokens
        if not tokens.required:
            return RedirectResponse(target, status_code=303)
        try:
            valid = tokens.check(given, request.scope, "dashboard")
        except ApiError as exc:
            page = self._login_page(request, target, error="Too many wrong tokens: wait a minute.")
            page.status_code = exc.status
            page.headers.update(exc.headers or {})
            return page
        if not valid:
            return self._login_page(request, target, error="That token is not valid.")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            given,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- failed records -----------------------------------------------------------

    async def _failed_job(self, request: Request) -> tuple[Job, CopyState | None]:
        """The job, and its copy of failed records when they are read from the store
        (the copy has ended with what it kept); None: read from the upstream."""
        self._require(request)
        job_id = request.path_params["job_id"]
        job = await self._store.get_job(job_id, with_events=False) if job_id_ok(job_id) else None
        if job is None:
            raise ApiError(f"no job {safe_text(job_id, 100)!r}", code="job_not_found", status=404)
        copy = await self._store.copy_state(job.id)
        if copy is not None and copy.served_from_store:
            return job, copy
        if job.upstream_id is None:
            raise ApiError("the job has not reached the upstream", code="not_submitted", status=409)
        return job, None

    def _pages(self, job: Job, stored: bool) -> AsyncIterator[list[Any]]:
        """The failed records page by page, from the store or from the upstream."""
        if stored:
            return failed.parsed(stored_records(self._store, job.id))
        assert job.upstream_id is not None
        return self._upstreams.for_job(job).error_pages(
            job.hub, job.upstream_id, page_bytes=failed.UPSTREAM_PAGE_BYTES
        )

    async def _failed_table(
        self, request: Request, upto: int | None = None
    ) -> tuple[Job, FailedTable, bool, CopyState | None]:
        """The job and its failed records, read page by page: all of them, or once more
        than ``upto`` are read. True when the table is complete; and the copy they were
        read from, if they were."""
        job, copy = await self._failed_job(request)
        table = FailedTable()
        pages = self._pages(job, copy is not None)
        try:
            async with contextlib.aclosing(pages):  # type: ignore[type-var]
                async for page in pages:
                    table.add(page)
                    if upto is not None and len(table) > upto:
                        return job, table, False, copy
        except UpstreamError as exc:
            what = "the upstream could not list the failed records"
            raise upstream_failure(what, exc) from exc
        return job, table, True, copy

    async def failed_fragment(self, request: Request) -> Response:
        """One page of the failed records as an HTML table (its first columns), loaded
        by the job page on demand, with links to the pages before and after."""
        try:
            number = _page_number(request.query_params.get("page"))
            start = (number - 1) * FAILED_PAGE
            job, table, complete, copy = await self._failed_table(request, upto=start + FAILED_PAGE)
        except ApiError as exc:
            html = self.render("_failed.html", error=exc.message, rows=[], columns=[])
            return HTMLResponse(html, status_code=exc.status, headers=_HEADERS)
        width = min(len(table.columns), FAILED_COLUMNS)
        rows = table.rows(start, start + FAILED_PAGE, width)
        total = len(table) if complete else max(len(table), job.records_failed_count or 0)
        # Thousands of cells: rendered on a thread, which hands the interpreter back to
        # the event loop every few milliseconds.
        html = await asyncio.to_thread(
            self.render,
            "_failed.html",
            error="",
            job=job,
            columns=table.columns[:width],
            all_columns=len(table.columns),
            columns_final=complete,
            rows=rows,
            total=total,
            first=start + 1,
            page=number,
            previous=number - 1 if number > 1 else None,
            next=number + 1 if len(table) > start + FAILED_PAGE else None,
            # What the service's copy left out (past the bound, or given up part way).
            kept_note=copy.detail if copy is not None and not copy.complete else "",
        )
        # A record may hold a lone surrogate (JSON can escape one), which no encoding
        # writes: shown as U+FFFD, as NUL is.
        return HTMLResponse(safe_text(html), headers=_HEADERS)

    async def failed_csv(self, request: Request) -> Response:
        """Every failed record and column, streamed in bounded chunks: from the store a
        page at a time (read twice: the columns first), else from the upstream."""
        job, copy = await self._failed_job(request)
        if copy is not None:
            chunks = stored_csv_chunks(lambda: self._pages(job, True))
        else:
            _, table, _, _ = await self._failed_table(request)
            chunks = csv_chunks(table)
        return StreamingResponse(
            chunks,
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="bulkhook-{job.id}-failed.csv"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    # -- a download's result -------------------------------------------------------

    async def result_file(self, request: Request) -> Response:
        """The job page's download button: the stored result, answered as the job API's
        ``GET /jobs/{id}/result`` answers it (type, ETag, ranges, 304), to a dashboard
        login as well as a bearer token."""
        self._require(request)
        job_id = request.path_params["job_id"]
        job = await self._store.get_job(job_id, with_events=False) if job_id_ok(job_id) else None
        if job is None:
            raise ApiError(f"no job {safe_text(job_id, 100)!r}", code="job_not_found", status=404)
        return await self._results.response(job, request.headers)

    # -- actions, callbacks, live -------------------------------------------------

    async def _delegate(self, request: Request, handler: Any) -> Response:
        """Run the job API's own handler, carrying the dashboard's token as a bearer
        header: the same checks, answers and error codes as ``POST /jobs/{id}/...``."""
        token = self.credential(request)
        if token is None:
            raise _unauthorized()
        if not job_id_ok(request.path_params["job_id"]):
            raise ApiError("no such job", code="job_not_found", status=404)
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
        if token:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        scope = {**request.scope, "headers": headers}
        return await handler(Request(scope, request.receive))  # type: ignore[no-any-return]

    async def cancel(self, request: Request) -> Response:
        return await self._delegate(request, self._jobs.cancel_job)

    async def refresh(self, request: Request) -> Response:
        return await self._delegate(request, self._jobs.refresh_job)

    async def callbacks(self, request: Request) -> Response:
        self._require(request)
        panel = await self.panel()
        return JSONResponse(panel["json"])

    async def stream(self, request: Request) -> Response:
        self._require(request)
        if "text/event-stream" not in request.headers.get("accept", ""):
            raise ApiError(
                "this is an event stream: send Accept: text/event-stream",
                code="not_acceptable",
                status=406,
            )
        job_id = request.query_params.get("job")
        if job_id and not job_id_ok(job_id):
            raise ApiError("no such job", code="job_not_found", status=404)
        if job_id:
            events = live.one_job(self._store, job_id, self.streams, self)
        else:
            since = live.resume_point(
                request.headers.get("last-event-id") or request.query_params.get("since")
            )
            events = live.all_jobs(self._store, since, self.streams, self)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def failed_table(records: list[Any]) -> tuple[list[str], list[list[str]]]:
    """Failed records as CSV columns and rows (see ``FailedTable``)."""
    table = FailedTable()
    table.add(records)
    return table.columns, table.rows(0, len(table))


def _page_number(value: str | None) -> int:
    """The failed records' page: a whole number from 1, else a 400."""
    if value is None:
        return 1
    number = count(value)
    if number is None or number < 1:
        raise ApiError("page must be a whole number from 1", code="bad_page", status=400)
    return number
