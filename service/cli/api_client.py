"""A small synchronous client of bulkhook's own HTTP API, used by the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from service.config import redact
from service.errors import BulkhookError
from service.jobs import TERMINAL
from service.upstream.multipart import MultipartFile

__all__ = ["ServiceClient", "ServiceError", "ServiceUnreachable"]


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
        return ServiceUnreachable(f"cannot reach the service at {redact(self.url)}: {exc}")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_success:
            return _json(response)
        raise _error(response)

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
        return self._request("POST", "/jobs", content=body.iter(progress), headers=headers)  # type: ignore[no-any-return]

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
        return self._request("POST", "/jobs", json=body)  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{quote(job_id, safe='')}")  # type: ignore[no-any-return]

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
        return self._request("GET", "/jobs", params=params)  # type: ignore[no-any-return]

    def instances(self) -> dict[str, Any]:
        """The service's connector instances (no secrets: the service never sends any)."""
        return self._request("GET", "/instances")  # type: ignore[no-any-return]

    def errors(self, job_id: str) -> dict[str, Any]:
        """The job's failed records, every upstream page of them."""
        return self._request("GET", f"/jobs/{quote(job_id, safe='')}/errors")  # type: ignore[no-any-return]

    def failed_csv(self, job_id: str, sink: BinaryIO) -> None:
        """Write the dashboard's CSV of the job's failed records (every column, cells a
        spreadsheet would run neutralised) to ``sink`` as it arrives."""
        path = f"/ui/jobs/{quote(job_id, safe='')}/failed.csv"
        try:
            with self._http.stream("GET", path) as response:
                if not response.is_success:
                    response.read()
                    raise _error(response)
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
