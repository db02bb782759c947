"""The sandbox's HTTP surface: the bulk API under ``/elements/api-v2``, plus introspection.

``/_sandbox/stats`` and ``/_sandbox/faults`` are not part of Open Connectors; they let
tests in other processes count calls and script faults. Every such control route lives
under ``CONTROL_PREFIX``, which is what the embedding service guards with its tokens.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Message

from service.sandbox.ceql import QueryError, parse
from service.sandbox.exports import FORMATS
from service.sandbox.instance import Fault, SandboxJob, Simulator

__all__ = ["API_PREFIX", "CONTROL_PREFIX", "build_app"]

API_PREFIX = "/elements/api-v2"
CONTROL_PREFIX = "/_sandbox"
_AUTH_PART = re.compile(r"^(User|Organization|Element) \S+$")
_MAX_PAGE = 500
_DEFAULT_PAGE = 200

Handler = Callable[[Request], Awaitable[Response]]


# The numbers the sandbox's connector instances go by, one per hub in their order.
_INSTANCE_IDS = 31001


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"message": message, "requestId": str(uuid.uuid4())}
    return JSONResponse(body, status_code=status, headers=headers)


def _fault_response(fault: Fault) -> Response:
    return Response(
        fault.body(),
        status_code=fault.status,
        headers=fault.headers(),
        media_type="application/json",
    )


class _Cut(Exception):
    """Raised mid-response: the server drops the connection, as a transfer cut off."""


async def _cut(body: AsyncIterable[str | bytes | memoryview], after: int) -> AsyncIterator[bytes]:
    sent = 0
    async for piece in body:
        data = piece.encode() if isinstance(piece, str) else bytes(piece)
        if sent + len(data) > after:
            if after > sent:
                yield data[: after - sent]
            raise _Cut(f"download cut after {after} bytes, as injected")
        sent += len(data)
        yield data
    raise _Cut(f"download cut after {sent} bytes, as injected")


def _authorized(sandbox: Simulator, request: Request) -> bool:
    header = request.headers.get("authorization")
    if header is None:
        return False
    if sandbox.options.authorization is not None:
        return header == sandbox.options.authorization
    parts = [part.strip() for part in header.split(",")]
    return bool(parts) and all(_AUTH_PART.match(part) for part in parts)


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_token(token: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        return None
    kind, _, number = text.partition(":")
    return int(number) if kind == "offset" and number.isdigit() else None


def _page(request: Request, items: Sequence[Any]) -> Response:
    """Answer one page of ``items`` the way Open Connectors pages its lists."""
    raw_size = request.query_params.get("pageSize", str(_DEFAULT_PAGE))
    if not raw_size.isdigit() or not 1 <= int(raw_size) <= _MAX_PAGE:
        return _error(400, f"pageSize must be between 1 and {_MAX_PAGE}")
    size = int(raw_size)
    offset = 0
    token = request.query_params.get("nextPage")
    if token:
        decoded = _decode_token(token)
        if decoded is None:
            return _error(400, "Invalid nextPage token")
        offset = decoded
    chunk = list(items[offset : offset + size])
    headers = {"Elements-Returned-Count": str(len(chunk))}
    if offset + size < len(items):
        headers["Elements-Next-Page-Token"] = _encode_token(offset + size)
    return JSONResponse(chunk, headers=headers)


_MAX_METADATA = 64 * 1024


async def _metadata(raw: object) -> dict[str, Any] | None:
    """The ``metaData`` part: a JSON object sent as a string; absent means empty.

    Clients differ: Open Connectors' own test client sends it as a plain form field
    before the file, others after it, and some as a file part of its own (with a
    filename and ``application/json``); all three are read alike.
    """
    if raw is None:
        return {}
    if isinstance(raw, UploadFile):
        data = await raw.read(_MAX_METADATA + 1)
        await raw.close()
        if len(data) > _MAX_METADATA:
            return None
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _listed(job: SandboxJob, legacy: bool) -> dict[str, Any]:
    """A job as the job list shows it: a numeric id and the list's own field names,
    which are not the status endpoint's (``recordCount``, ``errorCount``, ``jobState``)."""
    body = job.status_body(legacy)
    listed = {
        "id": job.id,
        "objectName": job.object,
        "jobDirection": job.direction,
        "jobState": body["status"],
        "createdDate": body["createdDate"],
        "updatedDate": body["updatedDate"],
    }
    # A job that failed whole has no counts, only the upstream's message.
    for name, field in (("recordCount", "recordsCount"), ("errorCount", "recordsFailedCount")):
        if field in body:
            listed[name] = body[field]
    if "error" in body:
        listed["error"] = body["error"]
    return listed


def _accepted(header: str | None) -> str | None:
    """The result format an ``Accept`` header asks for: CSV when it names none (or
    any type), None when it names only types the platform does not write."""
    if not header or not header.strip():
        return "csv"
    for part in header.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in FORMATS:
            return FORMATS[media]
        if media in ("*/*", "text/*"):
            return "csv"
    return None


_MEDIA = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "jsonl": "application/jsonl",
}
_DIRECTIONS = {
    "": None,
    "job_direction='upload'": "UPLOAD",
    "job_direction='download'": "DOWNLOAD",
}


def build_app(sandbox: Simulator) -> Starlette:
    def operation(name: str) -> Callable[[Handler], Handler]:
        """Wrap a handler with the checks every API call goes through."""

        def wrap(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                if not _authorized(sandbox, request):
                    return _error(
                        401,
                        "Invalid Organization or User secret, or invalid Element token provided.",
                    )
                hub = request.path_params["hub"]
                if hub not in sandbox.options.hubs:
                    return _error(404, f"No element instance found for hub '{hub}'")
                fault = sandbox.take_fault(name)
                if fault is not None and fault.cut_after is not None:
                    response = await handler(request)
                    if isinstance(response, StreamingResponse):
                        response.body_iterator = _cut(response.body_iterator, fault.cut_after)
                    return response
                if fault is not None and not fault.after_processing:
                    # Read what the client sent, as a real server would before answering.
                    async for _ in request.stream():
                        pass
                    return _fault_response(fault)
                response = await handler(request)
                if fault is not None and response.status_code < 400:
                    return _fault_response(fault)
                return response

            return endpoint

        return wrap

    @operation("objects")
    async def objects(request: Request) -> Response:
        return JSONResponse(list(sandbox.object_names(request.path_params["hub"])))

    @operation("submit")
    async def submit(request: Request) -> Response:
        hub = request.path_params["hub"]
        object_name = request.path_params["object"]
        if object_name not in sandbox.options.hubs[hub]:
            return _error(404, f"Object '{object_name}' is not available in hub '{hub}'")
        # Optional, as upstream: a file without one loads the object itself.
        path = request.query_params.get("path") or None
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return _error(415, "Expected multipart/form-data with a 'file' part")
        receive = request.receive

        async def counted() -> Message:
            message = await receive()
            sandbox.upload_bytes += len(message.get("body", b""))
            return message

        try:
            # Two files at most: the CSV, and metaData when a client sends it as one.
            form = await Request(request.scope, counted).form(max_files=2, max_fields=10)
        except ClientDisconnect:
            sandbox.uploads_cut += 1
            return _error(400, "The upload ended before its body was complete")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            await form.close()
            return _error(400, "The multipart part 'file' is required")
        metadata = await _metadata(form.get("metaData"))
        if metadata is None:
            await form.close()
            return _error(400, "metaData must be a JSON object encoded as a string")
        job = sandbox.create_job(
            hub=hub,
            object_name=object_name,
            path=path,
            upload=upload.file,
            callback_url=request.headers.get("elements-async-callback-url"),
            metadata=metadata,
        )
        # As Open Connectors sometimes does, the answer names the connector instance.
        instance = _INSTANCE_IDS + list(sandbox.options.hubs).index(hub)
        return JSONResponse({"id": job.id, "status": job.status, "instanceId": instance})

    @operation("query")
    async def query(request: Request) -> Response:
        hub = request.path_params["hub"]
        metadata: dict[str, Any] | None = {}
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=10)
            except ClientDisconnect:
                return _error(400, "The request ended before its body was complete")
            metadata = await _metadata(form.get("metaData"))
            await form.close()
            if metadata is None:
                return _error(400, "metaData must be a JSON object encoded as a string")
        else:
            async for _ in request.stream():
                pass
        # lastRunDate, from and to are accepted and ignored: records carry no dates here.
        try:
            parsed = parse(request.query_params.get("q", ""))
        except QueryError as exc:
            return _error(400, f"Error parsing query: {exc}")
        if parsed.object not in sandbox.object_names(hub):
            return _error(400, f"Object '{parsed.object}' is not available in hub '{hub}'")
        job = sandbox.create_query_job(
            hub=hub,
            query=parsed,
            callback_url=request.headers.get("elements-async-callback-url"),
            metadata=metadata or {},
        )
        return JSONResponse({"id": job.id, "status": job.status})

    @operation("download")
    async def download(request: Request) -> Response:
        job = _job_or_404(request)
        if isinstance(job, Response):
            return job
        if job.direction != "DOWNLOAD" or job.object != request.path_params["object"]:
            return _error(404, f"No {request.path_params['object']} results for bulk job {job.id}")
        if job.status != "COMPLETED":
            return _error(404, f"Bulk job {job.id} is {job.status}: its results are not ready")
        fmt = _accepted(request.headers.get("accept"))
        if fmt is None:
            return _error(406, "Accept must be text/csv, application/json or application/jsonl")
        # A sync iterator: Starlette takes each piece in a worker thread, off the loop.
        return StreamingResponse(sandbox.result(job, fmt), media_type=_MEDIA[fmt])

    def _job_or_404(request: Request) -> Any:
        job = sandbox.find_job(request.path_params["hub"], request.path_params["job_id"])
        if job is None:
            return _error(404, f"No bulk job found with id {request.path_params['job_id']}")
        return job

    @operation("status")
    async def status(request: Request) -> Response:
        job = _job_or_404(request)
        if isinstance(job, Response):
            return job
        sandbox.status_calls[str(job.id)] += 1
        sandbox.status_log.append((time.time(), str(job.id)))
        return JSONResponse(job.status_body(sandbox.options.legacy_status_names))

    @operation("errors")
    async def errors(request: Request) -> Response:
        job = _job_or_404(request)
        if isinstance(job, Response):
            return job
        return _page(request, job.scan.failed if job.scan else [])

    @operation("cancel")
    async def cancel(request: Request) -> Response:
        job = _job_or_404(request)
        if isinstance(job, Response):
            return job
        if not sandbox.request_cancel(job):
            return _error(400, f"Bulk job {job.id} is already {job.status} and cannot be cancelled")
        return JSONResponse(job.status_body(sandbox.options.legacy_status_names))

    @operation("jobs")
    async def jobs(request: Request) -> Response:
        where = request.query_params.get("where", "")
        hub = request.path_params["hub"]
        direction = where.replace(" ", "").replace('"', "'").lower()
        if direction not in _DIRECTIONS:
            return _error(400, "Only where=job_direction='UPLOAD' or 'DOWNLOAD' is supported")
        legacy = sandbox.options.legacy_status_names
        listed = [
            _listed(job, legacy)
            for job in sandbox.kept_jobs()
            if job.hub == hub and _DIRECTIONS[direction] in (None, job.direction)
        ]
        return _page(request, listed)

    async def root(request: Request) -> Response:
        return JSONResponse({"service": "bulkhook sandbox", "api": API_PREFIX})

    async def stats(request: Request) -> Response:
        return JSONResponse(sandbox.stats())

    async def faults(request: Request) -> Response:
        try:
            spec = json.loads(await request.body())
            sandbox.inject_fault(
                spec.get("operation"),
                int(spec["status"]),
                retry_after=spec.get("retry_after"),
                times=int(spec.get("times", 1)),
                after_processing=bool(spec.get("after_processing", False)),
                body=spec.get("body"),
                raw_body=spec.get("raw_body"),
                skip=spec.get("skip", 0),
                cut_after=spec.get("cut_after"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, f"bad fault: {exc}")
        return JSONResponse({"ok": True})

    bulk = "/hubs/{hub}/bulk"
    api = [
        Route("/hubs/{hub}/objects", objects, methods=["GET"]),
        Route(bulk + "/jobs", jobs, methods=["GET"]),
        Route(bulk + "/{job_id}/status", status, methods=["GET"]),
        Route(bulk + "/{job_id}/errors", errors, methods=["GET"]),
        Route(bulk + "/{job_id}/cancel", cancel, methods=["PUT"]),
        Route(bulk + "/{job_id}/{object}", download, methods=["GET"]),
        Route(bulk + "/query", query, methods=["POST"]),
        Route(bulk + "/{object}", submit, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await sandbox.aclose()

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", root, methods=["GET"]),
            Route(CONTROL_PREFIX + "/stats", stats, methods=["GET"]),
            Route(CONTROL_PREFIX + "/faults", faults, methods=["POST"]),
            Mount(API_PREFIX, routes=api),
        ],
    )
