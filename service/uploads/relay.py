"""An upload relayed upstream while it is still arriving, with its end held back.

Spooling a whole file before sending it on doubles a submit's wall time. Everything
the request carries besides the file is known before its first byte goes out: the
query, the callback URL and the ``metaData`` field (with the job's own id as its
``callback-payload``), which goes before the file part. A relay sends that and the file
part as the file arrives, but keeps back the body's last bytes, the line break and the
closing boundary after the file, until the CSV has been checked and the job recorded.
Without them the upstream has no complete request and so no job: a relay that is cut
off creates nothing upstream, and the upload goes the ordinary way, sent again from its
spool with the submit retry rules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from service.uploads.spool import Bytes, Spool
from service.upstream.client import Submission, UpstreamClient, UpstreamError, UpstreamUnavailable
from service.upstream.multipart import FileStream

if TYPE_CHECKING:
    from service.jobs import SubmitRequest

__all__ = ["RELAY_MIN_BYTES", "Relay"]

log = logging.getLogger("bulkhook.jobs")

# Smaller uploads are spooled whole first: relaying them saves nothing measurable, and
# a whole body in hand lets an upstream that answers early be heard. A relay starts
# only once this much of the file has arrived, not when a Content-Length promises it:
# a client that promises much and sends little never gets a connection upstream.
RELAY_MIN_BYTES = 4 << 20


class Relay:
    def __init__(
        self,
        upstream: UpstreamClient,
        *,
        job_id: str,
        request: SubmitRequest,
        spool: Spool,
        size: int,
        callback_url: str,
        metadata: Mapping[str, Any],
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """``on_done`` is called once the upstream request is over, however it ended."""
        self.job_id = job_id
        self.request = request
        self.size = size
        self._spool = spool
        self._gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Whether the current attempt's body got past the gate: from then on the
        # upstream may hold the whole request, and a failure's outcome is unknown.
        self._ended = False
        self._task = asyncio.ensure_future(
            upstream.submit(
                request.hub,
                request.object,
                FileStream(size, self._chunks),
                path=request.path,
                filename=request.filename,
                callback_url=callback_url,
                metadata=metadata,
            )
        )
        if on_done is not None:
            self._task.add_done_callback(lambda _: on_done())

    async def _chunks(self) -> AsyncIterator[Bytes]:
        self._ended = False
        async for chunk in self._spool.follow(self.size):
            yield chunk
        # The body's closing boundary follows these chunks: it waits for the gate.
        await asyncio.shield(self._gate)
        self._ended = True

    async def finish(self) -> Submission | None:
        """Let the body end and wait for the upstream's answer.

        ``None`` when the relay failed before its end was sent: the upstream holds no
        job from it, and the upload is to be sent again.
        """
        if not self._gate.done():
            self._gate.set_result(None)
        try:
            return await self._task
        except UpstreamError as exc:
            if self._ended:
                raise
            failure: Exception = exc
        except Exception as exc:
            if self._ended:
                raise UpstreamUnavailable(
                    "submit", f"the upload failed: {type(exc).__name__}"
                ) from exc
            failure = exc
        log.info(
            "the relayed upload of job %s failed before its end was sent (%s); sending it again",
            self.job_id,
            failure,
            extra={"job_id": self.job_id},
        )
        return None

    async def abandon(self) -> None:
        """Cut the request off before its end: the upstream never gets a whole one."""
        self._task.cancel()
        await asyncio.wait([self._task])
        if not self._task.cancelled():
            self._task.exception()  # retrieved: the relay's failure no longer matters
