"""The callback routes as a bare ASGI endpoint, ahead of Starlette's middleware stack.

Callbacks are the one hot path: every delivery is read, verified, committed and
answered, often hundreds a second. The app (``service.app.Service``) hands
``POST /callbacks``, ``POST /callbacks/instances/{name}`` and
``POST /callbacks/jobs/{id}`` straight to ``CallbackEndpoint``, which reads the body
from ``receive`` (refusing past the size limit), calls ``callbacks.receive`` and writes
the answer; everything else goes through Starlette as usual. The same endpoint is also
mounted as a Starlette route, so other methods on those paths get the usual 405.
``CALLBACK_PATHS`` declares the URLs once: the fast path's ``callback_route``, the
app's routes and the OpenAPI description all read it.

Errors keep the one JSON shape and are mapped as the app's exception handler maps
them: ``ApiError`` becomes its answer, any other exception what ``errors.unexpected``
says (a ``BulkhookError`` its own code and status, such as 503 while the store is
unavailable; anything else 500).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from service.callbacks import receiving as callbacks
from service.callbacks.receiving import Answer, CallbackHeaders, CallbackReceiver, refusal_log
from service.errors import ApiError, BulkhookError, error_body, unexpected
from service.logs import short
from service.server.protocol import pause_body
from service.store import store_error

__all__ = [
    "CALLBACK_PATHS",
    "DEFAULT_CALLBACK_PATH",
    "INSTANCE_CALLBACK_PATH",
    "JOB_CALLBACK_PATH",
    "CallbackEndpoint",
    "callback_route",
    "read_body",
]

log = logging.getLogger("bulkhook")

# The callback URLs (POST only): a job's own, handed upstream with its submission; each
# connector instance's instance-wide one; and the default instance's instance-wide one.
JOB_CALLBACK_PATH = "/callbacks/jobs/{job_id}"
INSTANCE_CALLBACK_PATH = "/callbacks/instances/{instance}"
DEFAULT_CALLBACK_PATH = "/callbacks"
CALLBACK_PATHS = (JOB_CALLBACK_PATH, INSTANCE_CALLBACK_PATH, DEFAULT_CALLBACK_PATH)

_JOB_PREFIX = JOB_CALLBACK_PATH.removesuffix("{job_id}")
_INSTANCE_PREFIX = INSTANCE_CALLBACK_PATH.removesuffix("{instance}")
_SIGNATURE = b"elements-webhook-signature"
_WEBHOOK_ID = b"elements-webhook-id"
_CONTENT_LENGTH = b"content-length"
_JSON = (b"content-type", b"application/json")


# As Starlette's JSONResponse renders, so both paths answer byte for byte alike; one
# encoder for every answer (json.dumps with arguments builds a new one per call).
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _render(payload: Mapping[str, Any]) -> bytes:
    return _ENCODE(payload).encode("utf-8")


async def _send(send: Send, answer: Answer) -> None:
    body = _render(answer.payload)
    headers = [(b"content-length", str(len(body)).encode("latin-1")), _JSON]
    for name, value in (answer.headers or {}).items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _answer(exc: ApiError) -> Answer:
    return Answer(exc.status, error_body(exc.code, exc.message, **exc.extra), exc.headers)


def _too_large(limit: int) -> ApiError:
    return ApiError(f"the body is larger than {limit} bytes", code="too_large", status=413)


async def read_body(
    receive: Receive, limit: int, declared: int | None = None, first: Message | None = None
) -> bytes:
    """The raw body, refusing (413) as soon as it passes ``limit`` bytes (or declares to);
    ``first`` is its first message, if already received."""
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = first or await receive()
        first = None
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("the client went away")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class CallbackEndpoint:
    """ASGI app for the callback URLs; the job id or instance name comes from the path.

    It owns the aggregated log of refused callbacks (one per app, built in
    ``create_app``), so that a flood of them writes a bounded number of lines.
    """

    def __init__(self, receiver: CallbackReceiver) -> None:
        self._receiver = receiver
        self.refusals = refusal_log()
        self._pacing = receiver.pacing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope.get("path_params", {})
        await self.handle(scope, receive, send, params.get("job_id"), params.get("instance"))

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        job_id: str | None,
        instance: str | None = None,
    ) -> None:
        """Answer one delivery: to job ``job_id``'s URL, else to ``instance``'s
        instance-wide URL (the default instance's when None)."""
        receiver = self._receiver
        given: list[str] = []
        webhook_id: str | None = None
        declared: int | None = None
        for name, value in scope["headers"]:
            if name == _SIGNATURE:
                given.append(value.decode("latin-1"))
            elif name == _WEBHOOK_ID and webhook_id is None:
                webhook_id = value.decode("latin-1")
            elif name == _CONTENT_LENGTH and value.strip().isdigit():
                declared = int(value)
        headers = CallbackHeaders(tuple(given), webhook_id)
        if instance is not None:
            # No keys to verify with, and a name the sender picked: answered unread.
            unknown = callbacks.unknown_instance(receiver, instance, webhook_id, self.refusals)
            if unknown is not None:
                await self._reply(receive, send, unknown)
                return
        first: Message | None = None
        try:
            try:
                if declared is not None and declared > receiver.max_bytes:
                    raise _too_large(receiver.max_bytes)  # refused before it is read
                # A callback's body nearly always comes in one message: taken here, it
                # costs no coroutine of its own.
                first = await receive()
                body = first.get("body", b"")
                if (
                    first.get("more_body", False)
                    or first["type"] != "http.request"
                    or len(body) > receiver.max_bytes
                ):
                    body = await read_body(receive, receiver.max_bytes, declared, first)
            except ApiError as exc:
                # At a job's URL its instance is not looked up for a body never read.
                if job_id is not None:
                    label = callbacks.UNKNOWN
                else:
                    label = instance or receiver.default_instance
                answer = callbacks.refuse(
                    receiver, job_id, webhook_id, "too_large", exc, self.refusals, label
                )
            else:
                answer = await callbacks.receive(
                    receiver, job_id, headers, body, self.refusals, instance
                )
        except ApiError as exc:
            answer = _answer(exc)
        except ConnectionAbortedError:
            return
        except Exception as exc:
            what = exc.code if isinstance(exc, BulkhookError) else "unexpected error"
            log.error("%s on POST %s: %r", what, short(scope["path"], 200), exc)
            answer = _answer(unexpected(exc, store_error))
        first = None
        if answer.paced:
            body = b""  # not held while the answer waits: only the answer is
        await self._reply(receive, send, answer)
        if answer.after is not None:
            await answer.after()

    async def _reply(self, receive: Receive, send: Send, answer: Answer) -> None:
        """Send ``answer``; a paced one once the pacing delay passed, or at once and
        closing its connection when too many answers wait already. Nor does a paced
        answer hold what the server buffered of a body it refused unread."""
        if answer.paced:
            pause_body(receive)
            if not await self._pacing.hold():
                answer = answer.closing()
        await _send(send, answer)


def callback_route(scope: Scope) -> tuple[bool, str | None, str | None]:
    """(is this a callback URL, the job id it names, the instance it names) as
    Starlette's router would match; neither named at the default instance's URL."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path.startswith(_JOB_PREFIX):
        job_id = path[len(_JOB_PREFIX) :]
        if job_id and "/" not in job_id:
            return True, job_id, None
    elif path == DEFAULT_CALLBACK_PATH:
        return True, None, None
    elif path.startswith(_INSTANCE_PREFIX):
        instance = path[len(_INSTANCE_PREFIX) :]
        if instance and "/" not in instance:
            return True, None, instance
    return False, None, None
