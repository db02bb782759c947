"""The service's own errors, and the one JSON shape every error is answered in.

Every error the service answers is ``{"error": {"code": "...", "message": "..."}}``,
with optional extra fields beside ``code`` and ``message``. ``code`` strings are
stable: clients may branch on them.

Every error the service raises on purpose derives from ``BulkhookError``, which gives
it a ``code`` and the HTTP status (``http_status``) it is answered with. The
hierarchy, each with its code and status:

* ``BulkhookError`` -- the base. Raised as such it is a bug: ``internal_error``, 500.

  * ``ApiError`` -- an answer decided where it is raised: ``bad_request``, 400, unless
    it names its own code and status (``job_not_found`` 404, ``bad_signature`` 401,
    ``upstream_outcome_unknown`` 502, ...). Any extra fields go into the body.
  * ``StoreError`` (``service.store``) -- the store cannot be reached or written just
    now: ``store_unavailable``, 503, with ``Retry-After``. The stores raise it for
    their driver's errors that say so (a lost connection, a locked or full database);
    a driver error that says anything else is a bug.
  * ``UpstreamError`` (``service.upstream.client``) -- Open Connectors answered with
    an error: ``upstream_refused``, 502, with ``upstream_status`` and
    ``upstream_request_id``; ``upstream_unavailable`` when no status came back.

    * ``UpstreamUnavailable`` -- no HTTP response at all (connection refused,
      timeout, dropped): ``upstream_unavailable``, 502.
    * ``QueryRefused`` -- the upstream refused a bulk query with 400 (its CEQL does
      not parse): ``upstream_query_refused``, 400, with the upstream's message.

  * ``QueryError`` (``service.sandbox.ceql``) -- the sandbox cannot parse a bulk
    query: ``query_invalid``, 400 (the sandbox answers it as the platform does).
  * ``SpoolError`` (``service.uploads.spool``) -- an upload's temporary file cannot be
    read to the size it was announced with: ``upload_unreadable``, 400.
  * ``ConfigError`` (``service.config``) -- a setting is unusable:
    ``bad_setting``, 503.
  * ``StartupError`` (``service.server.serve``) -- ``bulkhook serve`` cannot start:
    ``startup_failed``, 503.
  * ``ServiceError`` (``service.cli.api_client``) -- the CLI's side of an error the
    service answered: that answer's code and status (``service_error``, 502, by
    default).
  * ``ServiceUnreachable`` (``service.cli.api_client``) -- the CLI cannot reach the
    service: ``service_unreachable``, 502.

The client reads ``public_message`` (by default the exception's text; a store outage
says only that it is one, its details go to the log) and ``fields``. The CLI ends a
command with its own ``CommandError``, which carries an exit status, not an error
kind; it reports the errors above.

``unexpected`` is the one mapping from an exception to its answer: the app's
exception handler and the callback endpoint both answer through it. What is not a
``BulkhookError`` is a bug (``internal_error``, 500, details in the log only), unless the
caller's ``translate`` says otherwise: the app passes the store's, so a driver error that
escapes a store still reads as the outage it is. This module imports no feature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.responses import JSONResponse

__all__ = [
    "ApiError",
    "BulkhookError",
    "Translation",
    "error_body",
    "error_response",
    "unexpected",
]


class BulkhookError(Exception):
    """The base of the service's own errors: a stable ``code`` and an ``http_status``."""

    code: str = "internal_error"
    http_status: int = 500
    # Headers the answer carries (``Retry-After``, say).
    headers: Mapping[str, str] | None = None

    @property
    def public_message(self) -> str:
        """What the client is told: the text, unless a subclass keeps details back."""
        return str(self)

    @property
    def fields(self) -> dict[str, Any]:
        """Fields the error body carries beside ``code`` and ``message``."""
        return {}


class ApiError(BulkhookError):
    """An error with an HTTP status and a stable code; raise it anywhere in a request."""

    code = "bad_request"
    http_status = 400

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.http_status = status
        self.headers = headers
        self.extra = extra

    @property
    def status(self) -> int:
        """``http_status``, under the name request code reads it by."""
        return self.http_status

    @property
    def public_message(self) -> str:
        return self.message

    @property
    def fields(self) -> dict[str, Any]:
        return self.extra


# Another package's exception as the service's own error; None for one it does not know.
Translation = Callable[[BaseException], "BulkhookError | None"]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    # Imported here: the CLI's errors derive from this module too, and a command does
    # not wait for Starlette to load.
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


def unexpected(exc: BaseException, translate: Translation | None = None) -> ApiError:
    """The answer to an exception the request's own code did not answer.

    A ``BulkhookError`` is answered with its code, status, headers and fields:
    ``503 store_unavailable`` (with ``Retry-After``) when the store cannot be reached
    or written just now, so the client retries (Open Connectors redelivers a callback
    by itself), ``502`` for the upstream, and so on. Anything else is a bug:
    ``500 internal_error``, its details in the log only, unless ``translate`` makes it
    one of the service's own errors.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BulkhookError):
        error: BulkhookError | None = exc
    else:
        error = translate(exc) if translate is not None else None
    if error is None:
        return ApiError("an unexpected error occurred", code="internal_error", status=500)
    return ApiError(
        error.public_message,
        code=error.code,
        status=error.http_status,
        headers=error.headers,
        **error.fields,
    )
