"""The one JSON error shape, and the typed exceptions that map onto it.

Every error the service answers is ``{"error": {"code": "...", "message": "..."}}``,
with optional extra fields beside ``code`` and ``message``. ``code`` strings are
stable: clients may branch on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from service.store import unavailable

if TYPE_CHECKING:
    from service.upstream.client import UpstreamError

__all__ = ["ApiError", "error_body", "error_response", "unexpected", "upstream_failure"]

# Seconds a client is asked to wait before retrying while the store is unavailable.
STORE_RETRY_AFTER = 5


class ApiError(Exception):
    """An error with an HTTP status and a stable code; raise it anywhere in a request."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers
        self.extra = extra


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
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


def upstream_failure(what: str, exc: UpstreamError, **extra: Any) -> ApiError:
    """A 502 for an upstream failure: ``upstream_refused`` when it answered with an
    error, ``upstream_unavailable`` when no answer came."""
    return ApiError(
        f"{what}: {exc.message}",
        code="upstream_unavailable" if exc.status is None else "upstream_refused",
        status=502,
        upstream_status=exc.status,
        upstream_request_id=exc.request_id,
        **extra,
    )


def unexpected(exc: Exception) -> ApiError:
    """The answer to an exception no code path expected.

    ``503 store_unavailable`` (with ``Retry-After``) when the store cannot be reached or
    written just now: the request was fine and a retry will work once the store is
    back (Open Connectors redelivers a callback by itself). Anything else is a bug:
    ``500 internal_error``, its details in the log only.
    """
    if unavailable(exc):
        return ApiError(
            "the store is unavailable just now; try again shortly",
            code="store_unavailable",
            status=503,
            headers={"Retry-After": str(STORE_RETRY_AFTER)},
        )
    return ApiError("an unexpected error occurred", code="internal_error", status=500)
