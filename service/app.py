"""``create_app(settings)``: the routes, the error mapping, and the lifespan that owns
the store, the upstream client, the poller and, in embedded mode, the sandbox."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from service.api import routes as api
from service.api.guard import RequestGuard, ServedHosts, Tokens
from service.callbacks.endpoint import CallbackEndpoint, Service
from service.callbacks.signatures import Keyring
from service.config import Settings, redact
from service.dashboard.routes import Dashboard
from service.errors import ApiError, error_response, unexpected
from service.logs import Repeats
from service.metrics import Metrics
from service.openapi import docs as apidocs
from service.openapi.jobs import openapi_spec
from service.poller import Poller
from service.sandbox import API_PREFIX, CONTROL_PREFIX, Sandbox, SandboxOptions
from service.state import AppState
from service.store import open_store
from service.store.retention import Pruner
from service.tracker import SENDING_CONNECTIONS, Tracker
from service.uploads.spool import SpoolDirectory, default_root
from service.upstream.client import Credentials, RetryPolicy, UpstreamClient

__all__ = ["create_app"]

log = logging.getLogger("bulkhook")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s: %s", request.method, request.url.path, redact(repr(exc)))
    return await _api_error(request, unexpected(exc))


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_spec())


def create_app(
    settings: Settings,
    *,
    sandbox: SandboxOptions | None = None,
    upstream_retry: RetryPolicy | None = None,
) -> Service:
    """An independent app.

    ``sandbox`` tunes the embedded upstream (used only without OC_BASE_URL);
    ``upstream_retry`` overrides the upstream client's retry policy (tests shorten it).
    """
    public_url = (settings.public_url or "http://127.0.0.1:8000").rstrip("/")
    keys = settings.signature_keys
    dashboard = Dashboard()
    callbacks = CallbackEndpoint()
    routes: list[BaseRoute] = [
        *api.routes,
        Route("/callbacks/jobs/{job_id}", callbacks, methods=["POST"]),
        Route("/callbacks", callbacks, methods=["POST"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
        *dashboard.routes(),
        *apidocs.routes(),
    ]
    embedded: Sandbox | None = None
    control: str | None = None
    # Refused tokens, hosts and cross-site requests: one line per kind and window.
    repeats = Repeats(log)
    credentials = settings.credentials()
    if settings.embedded:
        options = sandbox or SandboxOptions()
        key = options.signature_key or (keys[0] if keys else secrets.token_urlsafe(32))
        if credentials.header() is None:
            # The embedded instance has credentials of its own, made up at start-up.
            credentials = Credentials(*(secrets.token_urlsafe(16) for _ in range(3)))
        embedded = Sandbox(
            dataclasses.replace(options, signature_key=key, authorization=credentials.header())
        )
        keys = keys or (key,)
        routes.append(Mount("/sandbox", app=embedded.app))
        control = f"/sandbox{CONTROL_PREFIX}"
        base_url = f"{public_url}/sandbox{API_PREFIX}"
    else:
        assert settings.oc_base_url is not None
        base_url = settings.oc_base_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metrics = Metrics()
        spool = SpoolDirectory.claim(settings.spool_dir or default_root())
        store = open_store(settings.database_url)
        try:
            await store.open()
        except BaseException:
            spool.close()
            raise
        upstream = UpstreamClient(
            base_url,
            credentials,
            retry=upstream_retry,
            on_call=metrics.upstream_call,
            submit_connections=settings.max_relays + SENDING_CONNECTIONS,
        )
        tracker = Tracker(settings, store, upstream, public_url)
        poller = Poller(store, tracker, metrics, settings.poll_rate, settings.poll_lease)
        tracker.wake = poller.wake
        app.state.bulkhook = AppState(
            settings=settings,
            public_url=public_url,
            keyring=Keyring(keys),
            metrics=metrics,
            store=store,
            upstream=upstream,
            tracker=tracker,
            poller=poller,
            tokens=Tokens(settings.api_tokens, metrics, repeats),
            sandbox=embedded,
            spool_dir=spool.path,
        )
        poller.start()
        # Old deliveries, refusals and timeline entries go, at start and hourly.
        pruner = Pruner(store, settings.retention)
        pruner.start()
        try:
            yield
        finally:
            dashboard.streams.close()
            await pruner.stop()
            callbacks.refusals.flush()
            await poller.stop()
            if embedded is not None:
                await embedded.aclose()
            await upstream.aclose()
            await store.close()
            repeats.flush()
            spool.close()

    guard = Middleware(RequestGuard, hosts=ServedHosts(settings), repeats=repeats, control=control)
    return Service(
        callbacks=callbacks,
        routes=routes,
        lifespan=lifespan,
        middleware=[guard],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
