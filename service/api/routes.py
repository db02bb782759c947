"""The job API: submit (an upload or a download), list, inspect, fetch a result,
cancel, refresh, discover; and the connector instances jobs are submitted to."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from service.api.guard import Tokens, bearer
from service.config import redact
from service.downloads.access import Results
from service.downloads.requests import download_request, is_json, read_bounded
from service.errors import ApiError
from service.failed_records.rules import CopyState
from service.instances import Instance, valid_name
from service.jobs import Job, State, SubmitRequest
from service.metrics import Metrics
from service.store import Store, StoreError
from service.tracker import Tracker
from service.uploads.receiving import FileStart, receive_upload
from service.uploads.relay import RELAY_MIN_BYTES, Relay
from service.uploads.spool import AppSpool
from service.upstream.client import UpstreamError, upstream_failure
from service.upstream.instances import Upstreams, unknown_instance
from service.values import is_clean, job_id_ok, name_problem

__all__ = ["JobApi", "UploadLimits"]

_MAX_FIELD = 200
_MAX_LIMIT = 500
_MAX_PATH = 1000
_DIRECTIONS = ("upload", "download")
# Kept failed records read from the store per page: the first page this many, each
# next one as many as fit about _STORED_PAGE_BYTES of JSON at the size they had so
# far. A record can be thousands of columns (30 KB), and turning a page into a table
# holds the event loop: a page stays as small as an upstream page of them.
_STORED_FIRST = 20
_STORED_MOST = 500
_STORED_PAGE_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """How large an upload may be, and how slowly it may arrive before it is cut."""

    max_bytes: int
    body_timeout: float
    min_rate: int
    rate_window: float


def _name(value: str | None, field: str, *, required: bool = False) -> str | None:
    """An object or hub name, checked before it becomes a segment of an upstream URL."""
    value = (value or "").strip()
    if not value:
        if required:
            raise ApiError(f"the form field '{field}' is required", code=f"missing_{field}")
        return None
    problem = name_problem(value)
    if problem is not None:
        raise ApiError(f"'{field}' is not a valid name: {problem}", code=f"bad_{field}")
    return value


def _path(value: str | None) -> str | None:
    """The upstream's optional ``path``: None when not given (blank counts as not given),
    so the upstream decides what a file without one means, as it does for its own clients."""
    path = (value or "").strip()
    if not path:
        return None
    if len(path) > _MAX_PATH or not path.isprintable() or not is_clean(path):
        raise ApiError(
            f"'path' must be printable text of at most {_MAX_PATH} characters", code="bad_path"
        )
    return path if path.startswith("/") else f"/{path}"


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is out of range")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _metadata(raw: str | None) -> dict[str, Any]:
    """The upload's ``metadata``, as JSON the upstream can read back: NaN, Infinity
    and numbers past a double (``1e999``) would go upstream as ``Infinity``."""
    if raw is None or not raw.strip():
        return {}
    if not is_clean(raw):
        raise ApiError("'metadata' contains a NUL or an unpaired surrogate", code="bad_metadata")
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(f"'metadata' is not JSON: {exc.msg}", code="bad_metadata") from None
    except (ValueError, RecursionError) as exc:
        # A number too long to convert, or nesting deeper than the parser goes.
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:100]
        raise ApiError(f"'metadata' is not usable JSON: {what}", code="bad_metadata") from None
    if not isinstance(value, dict):
        raise ApiError("'metadata' must be a JSON object", code="bad_metadata")
    return value


async def stored_records(store: Store, job_id: str) -> AsyncIterator[list[str]]:
    """A job's kept failed records (JSON text), a page of about 512 KiB at a time, in
    order."""
    after = 0
    page = _STORED_FIRST
    while True:
        rows = await store.failed_records(job_id, after, page)
        if rows:
            records = [record for _, record in rows]
            yield records
            after = rows[-1][0]
            per_record = max(1, sum(len(record) for record in records) // len(records))
            if len(rows) < page:
                return
            page = max(1, min(_STORED_MOST, _STORED_PAGE_BYTES // per_record))
        else:
            return


async def _stored_errors(store: Store, job: Job, copy: CopyState) -> AsyncIterator[bytes]:
    """The errors answer, written from the store a page of records at a time: the
    records are stored as JSON text, so they go out as they were stored."""
    head = {
        "job": job.id,
        "count": copy.kept,
        "source": "store",
        "complete": copy.complete,
        "failed_records": copy.to_json(),
    }
    yield (json.dumps(head)[:-1] + ', "errors": [').encode()
    first = True
    async for records in stored_records(store, job.id):
        joined = ",".join(records)
        yield (joined if first else "," + joined).encode()
        first = False
    yield b"]}"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


class JobApi:
    """The job API's routes, built with what they use."""

    def __init__(
        self,
        *,
        tracker: Tracker,
        store: Store,
        upstreams: Upstreams,
        instances: Sequence[Instance],
        tokens: Tokens,
        metrics: Metrics,
        limits: UploadLimits,
        spool: AppSpool,
        results: Results,
    ) -> None:
        self._tracker = tracker
        self._store = store
        self._upstreams = upstreams
        # Every configured instance by name, in order; the first is the default one,
        # the instance of a request that names none. Its hub is the hub of a request
        # naming none.
        self._instances = {instance.name: instance for instance in instances}
        self._default = instances[0].name
        self._tokens = tokens
        self._metrics = metrics
        self._limits = limits
        self._spool = spool
        self._results = results

    @property
    def results(self) -> Results:
        """Download results (their ``result`` JSON and stored files), for the pages
        that show them beside the job API."""
        return self._results

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/jobs", self.submit_job, methods=["POST"]),
            Route("/jobs", self.list_jobs, methods=["GET"]),
            Route("/jobs/{job_id}", self.get_job, methods=["GET"]),
            Route("/jobs/{job_id}/errors", self.job_errors, methods=["GET"]),
            Route("/jobs/{job_id}/result", self.job_result, methods=["GET"]),
            Route("/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"]),
            Route("/jobs/{job_id}/refresh", self.refresh_job, methods=["POST"]),
            Route("/objects", self.objects, methods=["GET"]),
            Route("/instances", self.instances, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    def _authorize(self, request: Request) -> None:
        """Bearer-token check for the job API (``guard.Tokens``: constant time over every
        configured token; a client that keeps guessing gets 429 instead)."""
        if not self._tokens.required:
            return
        given = bearer(request.headers.get("authorization", ""))
        if not self._tokens.check(given, request.scope, "api"):
            raise ApiError(
                "a valid bearer token is required",
                code="unauthorized",
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _job_or_404(self, job_id: str, *, with_events: bool = True) -> Job:
        # An id this service cannot have issued is not looked up: no store has to carry
        # a NUL, a lone surrogate or 15 KB of it, and the answer quotes none of it.
        possible = job_id_ok(job_id)
        job = await self._store.get_job(job_id, with_events=with_events) if possible else None
        if job is None:
            shown = repr(job_id) if possible else "with that id"
            raise ApiError(f"no job {shown}", code="job_not_found", status=404)
        return job

    def _instance(self, name: str | None) -> Instance:
        """The configured instance a request names (blank or absent: the default)."""
        name = (name or "").strip() or self._default
        instance = self._instances.get(name)
        if instance is None:
            raise unknown_instance(name)
        return instance

    def _submit_request(
        self, fields: dict[str, str], filename: str, rows: int, key: str | None
    ) -> SubmitRequest:
        object_name = _name(fields.get("object"), "object", required=True)
        instance = self._instance(fields.get("instance"))
        hub = _name(fields.get("hub"), "hub") or instance.hub
        path = _path(fields.get("path"))
        return SubmitRequest(
            hub=hub,
            object=str(object_name),
            path=path,
            filename=filename,
            rows=rows,
            metadata=_metadata(fields.get("metadata")),
            idempotency_key=key,
            instance=instance.name,
        )

    async def submit_job(self, request: Request) -> Response:
        self._authorize(request)
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key.strip()) <= _MAX_FIELD and key.isprintable()):
            raise ApiError(
                "Idempotency-Key must be 1 to 200 printable characters", code="bad_idempotency_key"
            )
        key = key.strip() if key else None
        if is_json(request.headers.get("content-type", "")):
            return await self._start_download(request, key)
        relay: Relay | None = None

        async def on_file(start: FileStart) -> None:
            # A large file whose fields came first, whose size is known and whose first
            # RELAY_MIN_BYTES are in goes upstream while the rest arrives, if a relay is
            # free; anything else is spooled whole and sent afterwards.
            nonlocal relay
            if start.size is None or start.size < RELAY_MIN_BYTES:
                return
            if len(self._upstreams) > 1 and "instance" not in start.fields:
                # The instance may still come after the file: not a byte goes to an
                # upstream before it is known whose the upload is.
                return
            try:
                early = self._submit_request(start.fields, start.filename, 0, key)
            except ApiError:
                return  # reported once the whole body is in, in its usual order
            relay = self._tracker.relay(early, start.spool, start.size)

        limits = self._limits
        try:
            upload = await receive_upload(
                request,
                max_bytes=limits.max_bytes,
                directory=self._spool.path,
                on_file=on_file,
                announce_after=RELAY_MIN_BYTES,
                body_timeout=limits.body_timeout,
                min_rate=limits.min_rate,
                rate_window=limits.rate_window,
            )
        except BaseException:
            if relay is not None:
                await relay.abandon()
            raise
        try:
            submit = self._submit_request(upload.fields, upload.filename, upload.summary.rows, key)
            if relay is not None and (
                upload.summary.size != relay.size
                or replace(relay.request, rows=submit.rows) != submit
            ):
                # Not what was relayed (fields after the file, an unusual ending): send anew.
                await relay.abandon()
                relay = None
        except BaseException:
            if relay is not None:
                await relay.abandon()
            upload.path.unlink(missing_ok=True)
            raise
        # From here the tracker owns the temporary file (and the relay) and removes it.
        job, created = await self._tracker.submit(submit, upload.path, relay)
        return await self._submitted(job, created)

    async def _start_download(self, request: Request, key: str | None) -> Response:
        body = await read_bounded(request.stream(), request.headers.get("content-length"))
        hubs = {name: instance.hub for name, instance in self._instances.items()}
        download = download_request(body, hubs=hubs, key=key)
        job, created = await self._tracker.start_download(download)
        return await self._submitted(job, created)

    async def _submitted(self, job: Job, created: bool) -> Response:
        """The answer to a submission: 202 for a new job, 200 for a replayed key."""
        if not created:
            headers = {"Location": f"/jobs/{job.id}", "Idempotent-Replayed": "true"}
            return await self._job_answer(job, 200, headers)
        return await self._job_answer(job, 202, {"Location": f"/jobs/{job.id}"})

    async def list_jobs(self, request: Request) -> Response:
        self._authorize(request)
        params = request.query_params
        state_filter = params.get("state")
        if state_filter is not None and (
            not state_filter.isascii() or state_filter.upper() not in State.__members__
        ):
            shown = state_filter[:40] if is_clean(state_filter[:40]) else "given"
            raise ApiError(f"unknown state {shown!r}", code="bad_state")
        raw_limit = params.get("limit", "50")
        # isascii: "²".isdigit() is true, and int("²") raises.
        if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4) or not (
            1 <= int(raw_limit) <= _MAX_LIMIT
        ):
            raise ApiError(f"limit must be between 1 and {_MAX_LIMIT}", code="bad_limit")
        cursor = params.get("cursor") or None
        if cursor is not None and not job_id_ok(cursor):
            raise ApiError("cursor is not valid", code="bad_cursor")
        direction = params.get("direction")
        if direction is not None and direction not in _DIRECTIONS:
            raise ApiError("direction must be upload or download", code="bad_direction")
        # A name no longer configured still finds the jobs that have it.
        instance = params.get("instance")
        if instance is not None and not valid_name(instance):
            raise ApiError(
                "instance must be 1 to 40 lower-case letters, digits and '-'", code="bad_instance"
            )
        limit = int(raw_limit)
        jobs = await self._store.list_jobs(
            state=State(state_filter.upper()) if state_filter else None,
            limit=limit,
            before=cursor,
            direction=direction,
            instance=instance,
        )
        next_cursor = jobs[-1].id if len(jobs) == limit else None
        return JSONResponse(
            {"jobs": [job.to_json(with_events=False) for job in jobs], "next_cursor": next_cursor}
        )

    async def _job_answer(
        self, job: Job, status: int = 200, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        """One job's JSON, with where the copy of its failed records stands and, for a
        download, its result."""
        copy = await self._store.copy_state(job.id)
        body = job.to_json()
        body["failed_records"] = copy.to_json() if copy is not None else None
        body["result"] = await self._results.state(job)
        return JSONResponse(body, status_code=status, headers=headers)

    async def get_job(self, request: Request) -> Response:
        self._authorize(request)
        return await self._job_answer(await self._job_or_404(request.path_params["job_id"]))

    async def job_errors(self, request: Request) -> Response:
        """From the store once the copy has ended with what it kept; before that (or
        without one: a job still running) from the upstream, every page."""
        self._authorize(request)
        job = await self._job_or_404(request.path_params["job_id"], with_events=False)
        copy = await self._store.copy_state(job.id)
        if copy is not None and copy.served_from_store:
            return StreamingResponse(
                _stored_errors(self._store, job, copy), media_type="application/json"
            )
        if job.upstream_id is None:
            raise ApiError("the job has not reached the upstream", code="not_submitted", status=409)
        shown = copy.to_json() if copy is not None else None
        try:
            errors = await self._upstreams.for_job(job).errors(job.hub, job.upstream_id)
        except UpstreamError as exc:
            what = "the upstream could not list the failed records"
            if copy is not None and not copy.ended:
                what += " (the service's own copy is not complete yet)"
            raise upstream_failure(what, exc, failed_records=shown) from exc
        return JSONResponse(
            {
                "job": job.id,
                "count": len(errors),
                "source": "upstream",
                "complete": True,
                "failed_records": shown,
                "errors": errors,
            }
        )

    async def job_result(self, request: Request) -> Response:
        """A download's stored result file (ranges, ETag); 404 until it is stored."""
        self._authorize(request)
        job = await self._job_or_404(request.path_params["job_id"], with_events=False)
        return await self._results.response(job, request.headers)

    async def cancel_job(self, request: Request) -> Response:
        self._authorize(request)
        job = await self._job_or_404(request.path_params["job_id"], with_events=False)
        job = await self._tracker.cancel(job)
        return await self._job_answer(await self._job_or_404(job.id))

    async def refresh_job(self, request: Request) -> Response:
        self._authorize(request)
        job = await self._job_or_404(request.path_params["job_id"], with_events=False)
        if not job.terminal:
            await self._tracker.poll(job, manual=True)
        return await self._job_answer(await self._job_or_404(job.id))

    async def objects(self, request: Request) -> Response:
        self._authorize(request)
        instance = self._instance(request.query_params.get("instance"))
        hub = _name(request.query_params.get("hub"), "hub") or instance.hub
        try:
            names = await self._upstreams.named(instance.name).objects(hub)
        except UpstreamError as exc:
            if exc.status == 404:
                raise ApiError(
                    f"the upstream knows no hub {hub!r}: {exc.message}",
                    code="hub_not_found",
                    status=404,
                ) from exc
            raise upstream_failure("the upstream could not list objects", exc) from exc
        return JSONResponse({"hub": hub, "objects": names})

    async def instances(self, request: Request) -> Response:
        """The configured instances: names, hubs, where their upstream is, whether a
        signature key is set, their jobs. Never a credential or a key."""
        self._authorize(request)
        counts = await self._store.count_by_instance()
        listed = []
        for name, instance in self._instances.items():
            by_state = counts.get(name, {})
            listed.append(
                {
                    "name": name,
                    "default": name == self._default,
                    "hub": instance.hub,
                    "base_url": redact(instance.base_url) if instance.base_url else "embedded",
                    "signature_key_set": bool(instance.signature_keys),
                    "signature_keys": len(instance.signature_keys),
                    "jobs": {"total": sum(by_state.values()), "by_state": by_state},
                }
            )
        return JSONResponse({"instances": listed})

    async def readyz(self, request: Request) -> Response:
        try:
            await self._store.ping()
        except (StoreError, OSError) as exc:
            raise ApiError(
                f"the store is not reachable: {exc}", code="store_unavailable", status=503
            ) from exc
        return JSONResponse({"status": "ready"})

    async def metrics(self, request: Request) -> Response:
        body = self._metrics.render(await self._store.count_by_instance())
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")
