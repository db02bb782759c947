"""What a download's result looks like from outside: its ``result`` JSON and the file.

``Results`` is the one place the job API (and any other page that shows or serves a
result, such as the dashboard) asks: it reads the fetch's state from the store and
serves a stored file from the results directory, so every replica answers alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from service.downloads.records import FORMATS, Format
from service.downloads.results import ResultFiles
from service.downloads.rules import result_json
from service.downloads.serving import result_response
from service.errors import ApiError
from service.jobs import Job
from service.store import Store

__all__ = ["Results"]


class Results:
    """A download job's ``result`` and its stored file, for whoever shows them."""

    def __init__(self, store: Store, files: ResultFiles) -> None:
        self._store = store
        self._files = files

    async def state(self, job: Job) -> dict[str, Any] | None:
        """The job's ``result``: None for an upload."""
        if not job.is_download:
            return None
        return result_json(job, await self._store.fetch_state(job.id))

    def filename(self, job: Job) -> str:
        return f"{job.object}-{job.id}.{job.format or 'csv'}"

    async def response(self, job: Job, request_headers: Mapping[str, str]) -> Response:
        """The stored file (ranges, ETag, 304) or 404: ``not_a_download`` for an
        upload, ``result_not_stored`` (carrying the ``result``) before it is stored."""
        if not job.is_download:
            raise ApiError(
                f"job {job.id} is an upload: it has no result", code="not_a_download", status=404
            )
        fetch = await self._store.fetch_state(job.id)
        shown = result_json(job, fetch)
        assert shown is not None
        fmt = fetch.format if fetch is not None else ""
        if fetch is None or not fetch.stored or fetch.sha256 is None or fmt not in FORMATS:
            raise ApiError(
                f"the job's result is not stored: it is {shown['status']}",
                code="result_not_stored",
                status=404,
                result=shown,
            )
        stored_format: Format = FORMATS[FORMATS.index(fmt)]
        return result_response(
            self._files.path(job.id, stored_format),
            stored_format,
            fetch.sha256,
            request_headers,
            filename=self.filename(job),
        )
