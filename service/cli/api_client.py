"""A small synchronous client of bulkhook's own HTTP API, used by the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from service.config import redact
from service.errors import BulkhookError
from service.jobs import TERMINAL
from service.upstream.multipart import MultipartFile
from service.values import job_id_ok

__all__ = ["NOT_BULKHOOK", "ServiceClient", "ServiceError", "ServiceUnreachable", "shown_url"]


class ServiceError(BulkhookError):
    """The service answered with an error: its HTTP ``status`` (``http_status`` too) and
    its JSON ``code`` and ``message``."""

    code = "service_error"
    http_status = 502

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = status
        self.code = code
        self.message = message
        self.body = body


class ServiceUnreachable(BulkhookError):
    """No answer from the service at all: not listening, or the connection failed."""

    code = "service_unreachable"
    http_status = 502


# The code of a ServiceError for a success answer that is not what bulkhook's API
# sends: a proxy's login page, an empty object, another program on the port. Reading
# on would crash on a missing field or print something that is not the answer asked for.
NOT_BULKHOOK = "not_bulkhook"


@dataclass(frozen=True)
class _Expected:
    """What a command reads from an answer: ``noun`` names it in a message, ``fits``
    says whether the decoded JSON holds the fields the command uses."""

    noun: str
    fits: Callable[[Any], bool]


def _text(value: Any, *keys: str) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(key), str) for key in keys)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_result(value: Any) -> bool:
    """A download's result as the CLI prints and checks it: a stored one has its size
    and SHA-256."""
    if value is None:
        return True
    if not _text(value, "status"):
        return False
    return value["status"] != "stored" or (_count(value.get("bytes")) and _text(value, "sha256"))


def _is_job(value: Any) -> bool:
    if not _text(value, "id", "state", "object", "hub", "last_source", "updated_at"):
        return False
    events = value.get("events", [])
    return (
        # The id goes into the next request's path: it must be one the service makes.
        job_id_ok(value["id"])
        and _is_result(value.get("result"))
        and isinstance(events, list)
        and all(_text(event, "at", "source", "state") for event in events)
    )


def _is_page(value: Any) -> bool:
    jobs = value.get("jobs") if isinstance(value, dict) else None
    return isinstance(jobs, list) and all(_is_job(job) for job in jobs)


def _is_instances(value: Any) -> bool:
    listed = value.get("instances") if isinstance(value, dict) else None
    return isinstance(listed, list) and all(
        _text(instance, "name") and isinstance(instance.get("jobs", {}), dict)
        for instance in listed
    )


def _is_errors(value: Any) -> bool:
    return (
        _text(value, "job") and _count(value.get("count")) and isinstance(value.get("errors"), list)
    )


_JOB = _Expected("a job", _is_job)
_PAGE = _Expected("a list of jobs", _is_page)
_INSTANCES = _Expected("a list of connector instances", _is_instances)
_ERRORS = _Expected("a job's failed records", _is_errors)


def shown_url(url: str) -> str:
    """``url`` fit to print: its userinfo and its query string (where a token may have
    been put) hidden."""
    return redact(url.split("#", 1)[0].split("?", 1)[0])


class ServiceClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, read=max(timeout, 600.0)),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, exc: httpx.TransportError) -> ServiceUnreachable:
        return ServiceUnreachable(f"cannot reach the service at {shown_url(self.url)}: {exc}")

    def _not_bulkhook(self, response: httpx.Response, what: str) -> ServiceError:
        media = response.headers.get("content-type", "").split(";")[0].strip()
        message = (
            f"the service at {shown_url(self.url)} answered something that is not bulkhook's"
            f" API (HTTP {response.status_code}, {_printable_media(media)}, {what})"
        )
        return ServiceError(response.status_code, NOT_BULKHOOK, message)

    def _request(
        self, method: str, path: str, expected: _Expected, **kwargs: Any
    ) -> dict[str, Any]:
        """The answer's JSON, once it is known to be ``expected``: every command reads
        its fields without checking them again."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if not response.is_success:
            raise _error(response)
        try:
            answer = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._not_bulkhook(response, "not JSON") from None
        if not isinstance(answer, dict) or not expected.fits(answer):
            raise self._not_bulkhook(response, f"not {expected.noun}")
        return answer

    def submit(
        self,
        file: Path,
        *,
        object_name: str,
        hub: str | None = None,
        path: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        instance: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        fields = {"object": object_name}
        if instance is not None:
            fields["instance"] = instance
        if hub:
            fields["hub"] = hub
        if path:
            fields["path"] = path
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        body = MultipartFile(file, fields=fields)
        headers = body.headers
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._request("POST", "/jobs", _JOB, content=body.iter(progress), headers=headers)

    def export(
        self,
        *,
        object_name: str,
        query: str | None = None,
        hub: str | None = None,
        result_format: str | None = None,
        instance: str | None = None,
    ) -> dict[str, Any]:
        """Start a download job: the upstream runs ``query`` (default: every record)."""
        body: dict[str, str] = {"object": object_name}
        fields = (("query", query), ("hub", hub), ("format", result_format), ("instance", instance))
        for name, value in fields:
            if value is not None:
                body[name] = value
        return self._request("POST", "/jobs", _JOB, json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{quote(job_id, safe='')}", _JOB)

    def jobs(
        self,
        *,
        state: str | None = None,
        direction: str | None = None,
        instance: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if direction:
            params["direction"] = direction
        if instance is not None:
            params["instance"] = instance
        return self._request("GET", "/jobs", _PAGE, params=params)

    def instances(self) -> dict[str, Any]:
        """The service's connector instances (no secrets: the service never sends any)."""
        return self._request("GET", "/instances", _INSTANCES)

    def errors(self, job_id: str) -> dict[str, Any]:
        """The job's failed records, every upstream page of them."""
        return self._request("GET", f"/jobs/{quote(job_id, safe='')}/errors", _ERRORS)

    def failed_csv(self, job_id: str, sink: BinaryIO) -> None:
        """Write the dashboard's CSV of the job's failed records (every column, cells a
        spreadsheet would run neutralised) to ``sink`` as it arrives."""
        path = f"/ui/jobs/{quote(job_id, safe='')}/failed.csv"
        try:
            with self._http.stream("GET", path) as response:
                if not response.is_success:
                    response.read()
                    raise _error(response)
                media = response.headers.get("content-type", "").split(";")[0].strip()
                if media.lower() != "text/csv":
                    raise self._not_bulkhook(response, "not CSV")
                for chunk in response.iter_bytes():
                    sink.write(chunk)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def result(self, job_id: str, write: Callable[[bytes], object]) -> None:
        """Stream the job's stored result into ``write`` as it arrives."""
        path = f"/jobs/{quote(job_id, safe='')}/result"
        try:
            with self._http.stream("GET", path) as response:
                if not response.is_success:
                    response.read()
                    raise _error(response)
                for chunk in response.iter_bytes():
                    write(chunk)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def follow(
        self, job_id: str, *, interval: float = 0.5, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield the job each time its state changes, until it is terminal."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            job = self.job(job_id)
            if job["state"] != last:
                last = job["state"]
                yield job
            if job["state"] in TERMINAL:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['state']}")
            time.sleep(interval)


def _printable_media(media: str) -> str:
    """A content type fit for a one-line message."""
    text = "".join(ch if ch.isprintable() else " " for ch in media[:80])
    return text or "no content type"


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _error(response: httpx.Response) -> ServiceError:
    """The service's error answer as an exception (its JSON ``code`` and ``message``)."""
    body = _json(response)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return ServiceError(
            response.status_code,
            str(error.get("code", "error")),
            str(error.get("message", "")),
            body,
        )
    return ServiceError(response.status_code, "http_error", response.reason_phrase, body)
