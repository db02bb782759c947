"""The Open Connectors bulk API client, with its retry rules.

Reads (and cancel, which is safe to repeat) retry on 429, 5xx and timeouts with
bounded, jittered backoff that honours ``Retry-After``; a download retries the same
way until its body starts, never after. A submit (or a bulk query) creates a job
upstream and is not idempotent, so it is retried only when the request surely never
reached the upstream (connection refused, DNS) or when the upstream said 429/503 with
a ``Retry-After``. Every other failure is raised as an ``UpstreamError`` whose
``request_sent`` tells the caller whether a job may exist anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from service import values
from service.errors import ApiError, BulkhookError
from service.jitter import spread
from service.upstream.multipart import Chunk, FileStream, MultipartFile
from service.upstream.statuses import normalize_status

__all__ = [
    "DOWNLOAD_FORMATS",
    "Credentials",
    "Download",
    "ErrorPage",
    "JobStatus",
    "ListedJob",
    "QueryRefused",
    "RetryPolicy",
    "Submission",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamUnavailable",
    "upstream_failure",
]

_MAX_PAGES = 100_000
# Records asked for in the first page of a paged read whose record size is not known yet.
_FIRST_PAGE = 20
# The longest next-page token kept to resume a copy of failed records from.
_MAX_TOKEN = 4096
# An upstream message is shown and stored with the job; past this it is cut.
_MAX_MESSAGE = 2000


@dataclass(frozen=True)
class Credentials:
    user_secret: str | None = field(default=None, repr=False)
    org_secret: str | None = field(default=None, repr=False)
    element_token: str | None = field(default=None, repr=False)

    def header(self) -> str | None:
        parts = [
            f"{name} {value}"
            for name, value in (
                ("User", self.user_secret),
                ("Organization", self.org_secret),
                ("Element", self.element_token),
            )
            if value
        ]
        return ", ".join(parts) or None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 15.0
    # A Retry-After longer than this is not slept through: the error is raised with
    # its retry_after so the caller can reschedule instead of holding a request open.
    max_retry_after: float = 60.0

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return ceiling * spread(0.5, 1.0)


class UpstreamError(BulkhookError):
    """A call to the upstream failed. ``status`` is the upstream's HTTP status: None when
    no response came back, or none that could be used (answered ``upstream_unavailable``
    then, ``upstream_refused`` otherwise; both 502)."""

    code = "upstream_refused"
    http_status = 502

    def __init__(
        self,
        operation: str,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        request_sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.message = message
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after
        self.request_sent = request_sent
        if status is None:
            self.code = UpstreamUnavailable.code

    def __str__(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no response"
        request = f" (requestId {self.request_id})" if self.request_id else ""
        return f"upstream {self.operation} failed: {status}: {self.message}{request}"

    @property
    def fields(self) -> dict[str, Any]:
        return {"upstream_status": self.status, "upstream_request_id": self.request_id}


class UpstreamUnavailable(UpstreamError):
    """No HTTP response: connection refused, DNS failure, timeout, dropped connection."""

    code = "upstream_unavailable"


class QueryRefused(UpstreamError):
    """The upstream refused a bulk query (400): most often its CEQL does not parse. The
    upstream's message says why; the caller's request was wrong, so it is a 400 too."""

    code = "upstream_query_refused"
    http_status = 400


# A result format → the Accept header that asks the upstream for it.
DOWNLOAD_FORMATS = {
    "csv": "text/csv",
    "json": "application/json",
    "jsonl": "application/jsonl",
}
# The most of an error answer's body read while a download is refused.
_MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True)
class Download:
    """A result file as it arrives: its headers now, its bytes as they are read."""

    response: httpx.Response

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers

    @property
    def content_type(self) -> str | None:
        value: str | None = self.response.headers.get("content-type")
        return value

    @property
    def content_length(self) -> int | None:
        """The announced size, None when the upstream streams without one."""
        value = self.response.headers.get("content-length", "")
        return int(value) if value.isdigit() and len(value) <= 18 else None

    def aiter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The body, piece by piece, as it comes off the wire: never all of it at once."""
        return self.response.aiter_bytes(chunk_size)


def upstream_failure(what: str, exc: UpstreamError, **extra: Any) -> ApiError:
    """The answer to a request that needed the upstream: ``what`` failed, then the
    upstream's message, with the error's code, status and fields (and ``extra``)."""
    return ApiError(
        f"{what}: {exc.message}",
        code=exc.code,
        status=exc.http_status,
        **exc.fields,
        **extra,
    )


@dataclass(frozen=True)
class ErrorPage:
    """One page of a job's failed records, as the upstream sent them."""

    records: list[Any]
    next_token: str | None
    # The page's size on the wire, for sizing the next one.
    bytes: int


@dataclass(frozen=True)
class Submission:
    """The upstream's answer to a submit. ``id`` is the upstream job id as text, exactly
    as given (a JSON number's digits); ``instance_id`` the connector instance the
    upstream says holds the job, when it says so."""

    id: str
    status: str | None
    raw: Mapping[str, Any]
    instance_id: str | None = None


@dataclass(frozen=True)
class JobStatus:
    id: str
    status: str | None
    raw_status: str | None
    records_count: int | None
    records_failed_count: int | None
    raw: Mapping[str, Any]
    # The upstream's message (a failed job's ``error``), made storable.
    error: str | None = None
    # What in the body could not be used (a count out of range, a status that cannot
    # be stored), said so the job's timeline shows why a value is missing.
    note: str = ""

    @classmethod
    def from_body(cls, body: Mapping[str, Any], job_id: str | None = None) -> JobStatus:
        """Read what can be read; an unusable value is left out with a note, never
        raised, so one odd field cannot stop a job from being polled to its end."""
        notes: list[str] = []
        raw_status = body.get("status")
        status_text = values.text(raw_status)
        if raw_status is not None and status_text is None:
            notes.append("the upstream's status is not usable text")
        counts = []
        for name in ("recordsCount", "recordsFailedCount"):
            counts.append(_count(body.get(name)))
            if body.get(name) is not None and counts[-1] is None:
                notes.append(f"{name} ignored: not a count from 0 to {values.MAX_COUNT}")
        error, error_note = values.message(body.get("error"))
        if error_note:
            notes.append(error_note)
        return cls(
            id=_job_id(body.get("id")) or (job_id or ""),
            status=normalize_status(status_text),
            raw_status=status_text if isinstance(raw_status, str) else None,
            records_count=counts[0],
            records_failed_count=counts[1],
            raw=body,
            error=error,
            note="; ".join(notes),
        )


@dataclass(frozen=True)
class ListedJob:
    """One item of the upstream's job list (``GET /bulk/jobs``).

    The list names its fields unlike the status endpoint: ``recordCount`` and
    ``errorCount`` for the counts, ``jobState`` (on some instances ``status``) for the
    status, ``objectName`` and ``jobDirection``; its ``id`` is a JSON number. Read as
    tolerantly as a status body: an item without a usable id is left out of the list.
    """

    id: str
    object_name: str | None
    direction: str | None
    status: str | None
    raw_status: str | None
    records_count: int | None
    records_failed_count: int | None
    raw: Mapping[str, Any]

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> ListedJob | None:
        job_id = _job_id(item.get("id"))
        if job_id is None:
            return None
        raw_status = item.get("jobState")
        if raw_status is None:
            raw_status = item.get("status")
        status_text = values.text(raw_status)
        return cls(
            id=job_id,
            object_name=values.text(item.get("objectName")),
            direction=values.text(item.get("jobDirection")),
            status=normalize_status(status_text),
            raw_status=status_text,
            records_count=_count(item.get("recordCount")),
            records_failed_count=_count(item.get("errorCount")),
            raw=item,
        )


def _job_id(value: object) -> str | None:
    """An upstream job id: a string or an integer, kept exactly as given, as text."""
    return values.upstream_id(value)


def _count(value: object) -> int | None:
    return values.count(value)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_from(operation: str, response: httpx.Response) -> UpstreamError:
    return _error_of(
        operation,
        response.status_code,
        response.content,
        response.headers,
        response.reason_phrase,
    )


def _error_of(
    operation: str, status: int, content: bytes, headers: httpx.Headers, reason: str
) -> UpstreamError:
    """The error an answer says, from (the start of) its body: its ``message`` and
    ``requestId`` when that is the usual JSON, else its first text."""
    message, request_id = "", None
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("message"), str):
            message = values.safe_text(body["message"], _MAX_MESSAGE).strip()
        request_id = values.text(body.get("requestId"))
    if not message:
        text = content[:800].decode("utf-8", "replace")
        message = values.safe_text(text[:200]).strip() or reason
    return UpstreamError(
        operation,
        message,
        status=status,
        request_id=request_id,
        retry_after=parse_retry_after(headers.get("retry-after")),
    )


class UpstreamClient:
    """Two connection pools to one Open Connectors instance: one for submissions, one
    for everything else.

    A submission can hold its connection for as long as its upload takes to arrive (a
    relay) or to send: with one pool, uploads could take every connection and leave
    the status polls, cancels and discovery waiting. ``submit_connections`` bounds the
    submissions' own pool; ``connections`` the other one.
    """

    def __init__(
        self,
        base_url: str,
        credentials: Credentials | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: httpx.Timeout | float | None = None,
        on_call: Callable[[str, int | None], None] | None = None,
        connections: int = 100,
        submit_connections: int = 16,
    ) -> None:
        headers = {"Accept": "application/json", "User-Agent": "bulkhook"}
        auth = (credentials or Credentials()).header()
        if auth:
            headers["Authorization"] = auth
        timeout = timeout if timeout is not None else httpx.Timeout(30.0, connect=5.0)
        self._client, self._submits = (
            httpx.AsyncClient(
                base_url=base_url.rstrip("/"),
                headers=headers,
                timeout=timeout,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=min(size, 20)),
            )
            for size in (connections, submit_connections)
        )
        self._retry = retry or RetryPolicy()
        self._on_call = on_call

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._submits.aclose()

    # -- calls --------------------------------------------------------------------

    async def objects(self, hub: str) -> list[str]:
        response = await self._call("objects", "GET", f"/hubs/{_seg(hub)}/objects")
        body = _json(response, "objects")
        if not isinstance(body, list):
            raise UpstreamError("objects", "expected a JSON array of object names")
        return [str(name) for name in body]

    async def submit(
        self,
        hub: str,
        object_name: str,
        file: Path | FileStream,
        *,
        path: str | None = None,
        filename: str | None = None,
        callback_url: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Submission:
        """Upload ``file`` as a new bulk job.

        ``metaData`` is a plain form field before the file part, as Open Connectors'
        own test client sends it, so the whole body but its closing boundary is known
        before the file's first byte goes out. ``path`` is optional upstream and sent
        only when given.
        """
        filename = filename or (file.name if isinstance(file, Path) else "upload.csv")
        fields = {"metaData": json.dumps(metadata)} if metadata else {}
        upload = MultipartFile(file, filename=filename, fields=fields)
        headers = upload.headers
        if callback_url:
            headers["Elements-Async-Callback-Url"] = callback_url
        response = await self._call(
            "submit",
            "POST",
            f"/hubs/{_seg(hub)}/bulk/{_seg(object_name)}",
            params={"path": path} if path else None,
            headers=headers,
            content=lambda: upload.aiter(progress),
            idempotent=False,
        )
        body = _json(response, "submit")
        if not isinstance(body, dict):
            raise UpstreamError("submit", "the upstream accepted the upload but returned no job")
        job_id = _job_id(body.get("id"))
        if job_id is None:
            given = "no job id" if body.get("id") is None else "a job id that is not one"
            shown = "" if body.get("id") is None else f": {values.safe_text(repr(body['id']), 80)}"
            raise UpstreamError(
                "submit", f"the upstream accepted the upload but returned {given}{shown}"
            )
        return Submission(
            id=job_id,
            status=normalize_status(body.get("status")),
            raw=body,
            instance_id=_job_id(body.get("instanceId")),
        )

    async def status(self, hub: str, job_id: str | int) -> JobStatus:
        response = await self._call("status", "GET", _job_url(hub, job_id, "status"))
        body = _json(response, "status")
        if not isinstance(body, dict):
            raise UpstreamError("status", "expected a JSON object")
        status = JobStatus.from_body(body, str(job_id))
        # News about another job is no answer about this one: a failed poll, never
        # applied (the job is polled again later).
        if status.id != str(job_id):
            raise UpstreamError(
                "status", f"the answer is about upstream job {status.id[:64]}, not {job_id}"
            )
        return status

    async def errors(self, hub: str, job_id: str | int, *, page_size: int = 200) -> list[Any]:
        return await self._all_pages("errors", _job_url(hub, job_id, "errors"), {}, page_size)

    async def error_pages(
        self, hub: str, job_id: str | int, *, page_bytes: int, page_size: int = 200
    ) -> AsyncGenerator[list[Any], None]:
        """The failed records page by page, each page about ``page_bytes`` of JSON.

        A record can carry thousands of columns, so a page of a fixed number of records
        can be megabytes whose parsing holds the event loop: the first page is small,
        and each next page asks for as many records as fit ``page_bytes`` at the size
        the records had so far (between 1 and ``page_size``).
        """
        url = _job_url(hub, job_id, "errors")
        size = min(page_size, _FIRST_PAGE)
        token: str | None = None
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            query = {"pageSize": str(size)}
            if token:
                query["nextPage"] = token
            response = await self._call("errors", "GET", url, params=query)
            page = _json(response, "errors")
            if not isinstance(page, list):
                raise UpstreamError("errors", "expected a JSON array")
            if page:
                yield page
                per_record = max(1, len(response.content) // len(page))
                size = max(1, min(page_size, page_bytes // per_record))
            token = response.headers.get("elements-next-page-token") or None
            if not token or not page:
                return
            if token in seen:
                raise UpstreamError("errors", "the upstream repeated a page token")
            seen.add(token)
        raise UpstreamError("errors", f"more than {_MAX_PAGES} pages")

    async def error_page(
        self, hub: str, job_id: str | int, *, token: str | None, page_size: int
    ) -> ErrorPage:
        """One page of failed records: the first, or the one ``token`` names (an
        ``Elements-Next-Page-Token`` the upstream gave before), and the next page's
        token, None after the last page."""
        query = {"pageSize": str(page_size)}
        if token:
            query["nextPage"] = token
        response = await self._call("errors", "GET", _job_url(hub, job_id, "errors"), params=query)
        page = _json(response, "errors")
        if not isinstance(page, list):
            raise UpstreamError("errors", "expected a JSON array")
        following = response.headers.get("elements-next-page-token") or None
        if following is not None and following == token:
            raise UpstreamError("errors", "the upstream repeated a page token")
        if following is not None and (
            len(following) > _MAX_TOKEN or not values.is_clean(following)
        ):
            # It is stored to resume from: it must be text a store takes, and short.
            raise UpstreamError("errors", "the upstream's next page token is not usable")
        return ErrorPage(page, following if page else None, len(response.content))

    async def jobs(self, hub: str, *, page_size: int = 200) -> list[ListedJob]:
        """The hub's upload jobs, every page: what proves whether a submit whose answer
        was lost made a job upstream."""
        params = {"where": "job_direction='UPLOAD'"}
        items = await self._all_pages("jobs", f"/hubs/{_seg(hub)}/bulk/jobs", params, page_size)
        listed = (ListedJob.from_item(item) for item in items if isinstance(item, dict))
        return [job for job in listed if job is not None]

    async def cancel(self, hub: str, job_id: str | int) -> JobStatus | None:
        response = await self._call("cancel", "PUT", _job_url(hub, job_id, "cancel"))
        try:
            body = response.json()
        except (ValueError, RecursionError):
            return None
        return JobStatus.from_body(body, str(job_id)) if isinstance(body, dict) else None

    async def start_query(
        self,
        hub: str,
        query: str,
        *,
        callback_url: str | None = None,
        payload: Any = None,
        file_name: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Submission:
        """Start a bulk query (a download job) for the CEQL ``query``.

        ``payload`` goes out as ``metaData.callback-payload`` (any JSON value) so the
        job's callback names its job; ``params`` may carry ``lastRunDate``, ``from`` and
        ``to``. A query the upstream refuses with 400 raises ``QueryRefused``.
        """
        metadata: dict[str, Any] = {}
        if payload is not None:
            metadata["callback-payload"] = payload
        if file_name is not None:
            metadata["fileName"] = file_name
        headers: dict[str, str] = {}
        body: bytes | None = None
        if metadata:
            boundary = secrets.token_hex(16)
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
            body = (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="metaData"\r\n\r\n'
                f"{json.dumps(metadata)}\r\n--{boundary}--\r\n"
            ).encode()
        if callback_url:
            headers["Elements-Async-Callback-Url"] = callback_url

        async def once() -> AsyncIterator[Chunk]:
            if body is not None:
                yield body

        try:
            response = await self._call(
                "query",
                "POST",
                f"/hubs/{_seg(hub)}/bulk/query",
                params={**(params or {}), "q": query},
                headers=headers,
                content=once if body is not None else None,
                idempotent=False,
            )
        except UpstreamError as exc:
            if exc.status != 400:
                raise
            raise QueryRefused("query", exc.message, status=400, request_id=exc.request_id) from exc
        body_json = _json(response, "query")
        job_id = _job_id(body_json.get("id")) if isinstance(body_json, dict) else None
        if job_id is None:
            raise UpstreamError("query", "the upstream accepted the query but returned no job id")
        return Submission(
            id=job_id,
            status=normalize_status(body_json.get("status")),
            raw=body_json,
            instance_id=_job_id(body_json.get("instanceId")),
        )

    @contextlib.asynccontextmanager
    async def download(
        self, hub: str, job_id: str | int, object_name: str, *, format: str = "csv"
    ) -> AsyncIterator[Download]:
        """Open a query job's result file: ``async with client.download(...) as d`` then
        ``async for piece in d.aiter_bytes()``. The body is never buffered.

        Refusals before the body (429, 5xx, a timeout) are retried like any read, with
        ``Retry-After`` honoured; a failure while the body streams is the caller's to
        retry, from the start.
        """
        if format not in DOWNLOAD_FORMATS:
            raise ValueError(f"format must be one of {sorted(DOWNLOAD_FORMATS)}, got {format!r}")
        url = _job_url(hub, job_id, object_name)
        headers = {"Accept": DOWNLOAD_FORMATS[format]}
        policy = self._retry
        attempt = 0
        while True:
            attempt += 1
            outcome, retryable = await self._open(url, headers)
            if isinstance(outcome, httpx.Response):
                break
            if not retryable or attempt >= policy.attempts:
                raise outcome
            delay = (
                outcome.retry_after if outcome.retry_after is not None else policy.backoff(attempt)
            )
            if delay > policy.max_retry_after:
                raise outcome
            await asyncio.sleep(delay)
        try:
            yield Download(outcome)
        except httpx.TransportError as exc:
            what = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
            raise UpstreamUnavailable("download", f"{what} mid-file: {type(exc).__name__}") from exc
        except httpx.DecodingError as exc:
            # A Content-Encoding the body does not match: not a transport error, but the
            # upstream's fault all the same, and maybe not the next answer's.
            raise UpstreamUnavailable(
                "download", "the upstream's answer could not be decoded"
            ) from exc
        finally:
            await outcome.aclose()

    async def _open(
        self, url: str, headers: Mapping[str, str]
    ) -> tuple[httpx.Response | UpstreamError, bool]:
        """One try at a download's answer: the open response, or the error and whether
        it may be tried again."""
        request = self._client.build_request("GET", url, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._count("download", None)
            message = f"cannot connect: {exc}" if str(exc) else "cannot connect"
            return UpstreamUnavailable("download", message, request_sent=False), True
        except httpx.PoolTimeout:
            self._count("download", None)
            message = "no connection to the upstream came free in time; nothing was sent"
            return UpstreamUnavailable("download", message, request_sent=False), False
        except httpx.TransportError as exc:
            self._count("download", None)
            what = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
            return UpstreamUnavailable("download", f"{what}: {type(exc).__name__}"), True
        self._count("download", response.status_code)
        if response.is_success:
            return response, False
        try:
            # Only the start of an error answer: it is a message, not a file.
            kept = bytearray()
            async for piece in response.aiter_bytes():
                kept += piece
                if len(kept) >= _MAX_ERROR_BODY:
                    break
        except (httpx.TransportError, httpx.DecodingError):
            kept = bytearray()
        finally:
            await response.aclose()
        error = _error_of(
            "download", response.status_code, bytes(kept), response.headers, response.reason_phrase
        )
        status = response.status_code
        return error, status == 429 or status >= 500

    # -- plumbing -----------------------------------------------------------------

    async def _all_pages(
        self, operation: str, url: str, params: dict[str, str], page_size: int
    ) -> list[Any]:
        items: list[Any] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            query = dict(params, pageSize=str(page_size))
            if token:
                query["nextPage"] = token
            response = await self._call(operation, "GET", url, params=query)
            page = _json(response, operation)
            if not isinstance(page, list):
                raise UpstreamError(operation, "expected a JSON array")
            items.extend(page)
            token = response.headers.get("elements-next-page-token") or None
            if not token or not page:
                return items
            if token in seen:
                raise UpstreamError(operation, "the upstream repeated a page token")
            seen.add(token)
        raise UpstreamError(operation, f"more than {_MAX_PAGES} pages")

    async def _call(
        self,
        operation: str,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: Callable[[], AsyncIterator[Chunk]] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        policy = self._retry
        attempt = 0
        while True:
            attempt += 1
            error, retryable = await self._attempt(
                operation, method, url, params, headers, content, idempotent
            )
            if isinstance(error, httpx.Response):
                return error
            if not retryable or attempt >= policy.attempts:
                raise error
            delay = error.retry_after if error.retry_after is not None else policy.backoff(attempt)
            if delay > policy.max_retry_after:
                raise error
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        operation: str,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        content: Callable[[], AsyncIterator[Chunk]] | None,
        idempotent: bool,
    ) -> tuple[httpx.Response | UpstreamError, bool]:
        """One try: the response, or the error and whether this call may be repeated."""
        client = self._submits if operation == "submit" else self._client
        try:
            response = await client.request(
                method,
                url,
                params=params,
                headers=headers,
                # httpx streams any buffer it is given; its annotation names only bytes.
                content=content() if content is not None else None,  # type: ignore[arg-type]
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._count(operation, None)
            message = f"cannot connect: {exc}" if str(exc) else "cannot connect"
            return UpstreamUnavailable(operation, message, request_sent=False), True
        except httpx.PoolTimeout:
            # Every connection stayed busy: nothing of this request left the process.
            # Not repeated: a pool that stayed full this long is not about to free up.
            self._count(operation, None)
            message = "no connection to the upstream came free in time; nothing was sent"
            return UpstreamUnavailable(operation, message, request_sent=False), False
        except httpx.TransportError as exc:
            self._count(operation, None)
            what = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
            return UpstreamUnavailable(operation, f"{what}: {type(exc).__name__}"), idempotent
        self._count(operation, response.status_code)
        if response.is_success:
            return response, False
        error = _error_from(operation, response)
        status = response.status_code
        if idempotent:
            return error, status == 429 or status >= 500
        return error, status in (429, 503) and error.retry_after is not None

    def _count(self, operation: str, status: int | None) -> None:
        if self._on_call is not None:
            self._on_call(operation, status)


def _seg(value: str | int) -> str:
    return quote(str(value), safe="")


def _job_url(hub: str, job_id: str | int, action: str) -> str:
    return f"/hubs/{_seg(hub)}/bulk/{_seg(job_id)}/{action}"


def _json(response: httpx.Response, operation: str) -> Any:
    # ValueError covers malformed JSON, undecodable bytes and a number too long to
    # convert (a 5,000-digit count); RecursionError, nesting deeper than the parser.
    try:
        return response.json()
    except (ValueError, RecursionError) as exc:
        raise UpstreamError(operation, "the upstream answered with invalid JSON") from exc
