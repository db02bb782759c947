"""``create_app(settings)``: the app's parts, each handed only what it uses; its routes
and error mapping; and the lifespan that opens, starts and stops the parts in order.

``Service`` is the app: Starlette, with the callback URLs answered ahead of its
middleware (``callbacks.endpoint``). Its ``components`` show what it was built from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service.api.guard import RequestGuard, ServedHosts, Tokens
from service.api.routes import JobApi, UploadLimits
from service.callbacks.endpoint import CALLBACK_PATHS, CallbackEndpoint, callback_route
from service.callbacks.pacing import Pacing
from service.callbacks.receiving import CallbackReceiver
from service.callbacks.rejections import RejectionLog
from service.callbacks.signatures import Keyring
from service.config import ConfigError, Settings, redact
from service.dashboard.routes import Dashboard
from service.downloads.access import Results
from service.downloads.fetcher import Fetcher
from service.downloads.results import ResultFiles
from service.errors import ApiError, BulkhookError, error_response, unexpected
from service.failed_records.copier import Copier
from service.logs import Repeats
from service.metrics import Metrics
from service.openapi import docs as apidocs
from service.openapi.jobs import openapi_spec
from service.poller import Poller
from service.sandbox import API_PREFIX, CONTROL_PREFIX, Sandbox, SandboxOptions
from service.store import Store, open_store, store_error
from service.store.retention import Pruner
from service.tracker import SENDING_CONNECTIONS, Tracker
from service.uploads.spool import AppSpool, default_root
from service.upstream.client import Credentials, RetryPolicy, UpstreamClient
from service.upstream.instances import Upstreams

__all__ = ["Components", "Service", "create_app"]

log = logging.getLogger("bulkhook")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@dataclasses.dataclass(frozen=True, slots=True)
class Components:
    """What ``create_app`` built the app from, for tests and operators to look at.

    Read-only: every handler was handed its own parts when it was built, so replacing
    one here would change nothing (``create_app(store=...)`` takes a store instead).
    """

    settings: Settings
    metrics: Metrics
    store: Store
    # The default instance's client (``upstreams[settings.default_instance]``).
    upstream: UpstreamClient
    # Every connector instance's client, by name.
    upstreams: Upstreams
    tracker: Tracker
    poller: Poller
    # The default instance's callback keys; ``keyrings`` every instance's, by name.
    keyring: Keyring
    keyrings: Mapping[str, Keyring]
    tokens: Tokens
    # ``spool.path`` is the app's own spool directory, claimed when it starts.
    spool: AppSpool
    # Download results: their state and stored files, as the job API serves them.
    results: Results
    sandbox: Sandbox | None


class Service(Starlette):
    """The app: Starlette, with the callback URLs answered before its middleware."""

    def __init__(
        self,
        *args: Any,
        callbacks: CallbackEndpoint,
        components: Components,
        pacing: Pacing,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._callbacks = callbacks
        self._components = components
        self._pacing = pacing
        # Every route but the callbacks: Starlette's middleware and routes.
        self._rest: ASGIApp = super().__call__

    def behind_proxies(self, trusted_hosts: str | list[str]) -> None:
        """Take the client's address and scheme from ``X-Forwarded-*`` headers sent by
        ``trusted_hosts`` (uvicorn's own proxy-header handling), on every route but
        the callbacks: nothing there reads the client's address, and the hot path
        skips the middleware's pass over each request's headers."""
        # uvicorn types ASGI apps more narrowly than Starlette: the same callables.
        self._rest = cast(ASGIApp, ProxyHeadersMiddleware(cast(Any, self._rest), trusted_hosts))

    @property
    def components(self) -> Components:
        return self._components

    def stopping(self) -> None:
        """The server stops (before it waits for the requests in flight): answers held
        back on purpose are sent now, so the wait is not as long as their delay."""
        self._pacing.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            matched, job_id, instance = callback_route(scope)
            if matched:
                await self._callbacks.handle(scope, receive, send, job_id, instance)
                return
        await self._rest(scope, receive, send)


def _answer(error: ApiError) -> Response:
    return error_response(
        error.status, error.code, error.message, headers=error.headers, **error.extra
    )


async def _own_error(request: Request, exc: Exception) -> Response:
    """The service's own errors, answered as ``unexpected`` maps them (as the callback
    endpoint answers them); any but an ``ApiError`` (a store outage, say) is logged."""
    assert isinstance(exc, BulkhookError)
    if not isinstance(exc, ApiError):
        log.error("%s on %s %s: %s", exc.code, request.method, request.url.path, redact(repr(exc)))
    return _answer(unexpected(exc, store_error))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client went away before its request's body ended (or was cut for being too
    slow): nothing is wrong with the service, and nobody reads the answer."""
    log.debug(
        "the client went away before the body of %s %s ended", request.method, request.url.path
    )
    return error_response(
        400,
        "incomplete_body",
        "the client went away before the body ended",
        headers={"Connection": "close"},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s: %s", request.method, request.url.path, redact(repr(exc)))
    return _answer(unexpected(exc, store_error))


def _prepare_results(files: ResultFiles) -> None:
    """The results directory, made (owner-only) if need be, without the temporary
    files of writes no process will finish (a killed one's)."""
    try:
        files.prepare()
    except OSError as exc:
        raise ConfigError(
            f"cannot use BULKHOOK_RESULTS_DIR {files.root}: {exc.strerror or exc}"
        ) from None
    removed = files.remove_leftovers()
    if removed:
        log.info("removed %d unfinished result files", len(removed))


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_spec())


def create_app(
    settings: Settings,
    *,
    sandbox: SandboxOptions | None = None,
    upstream_retry: RetryPolicy | None = None,
    store: Store | None = None,
    pacing: Pacing | None = None,
) -> Service:
    """An independent app.

    ``sandbox`` tunes the embedded upstream (used only without OC_BASE_URL);
    ``upstream_retry`` overrides the upstream client's retry policy (tests shorten it);
    ``store`` is used instead of the one ``settings.database_url`` names (not opened
    yet: the app opens and closes it, as its own; tests wrap the real one to watch it);
    ``pacing`` holds refusals' answers instead of one built from
    ``settings.refusal_delay`` (tests bound the answers waiting lower).
    """
    public_url = (settings.public_url or "http://127.0.0.1:8000").rstrip("/")
    default = settings.instances[0]
    keys = default.signature_keys
    embedded: Sandbox | None = None
    control: str | None = None
    credentials = Credentials(default.user_secret, default.org_secret, default.element_token)
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
        control = f"/sandbox{CONTROL_PREFIX}"
        base_url = f"{public_url}/sandbox{API_PREFIX}"
    else:
        assert default.base_url is not None
        base_url = default.base_url

    # Refused tokens, hosts and cross-site requests: one line per kind and window.
    repeats = Repeats(log)
    metrics = Metrics()
    store = store if store is not None else open_store(settings.database_url)

    def client(name: str, url: str, credentials: Credentials) -> UpstreamClient:
        def on_call(operation: str, status: int | None) -> None:
            metrics.upstream_call(operation, status, name)

        return UpstreamClient(
            url,
            credentials,
            retry=upstream_retry,
            on_call=on_call,
            submit_connections=settings.max_relays + SENDING_CONNECTIONS,
        )

    # One client per connector instance: its own URL, credentials and connections.
    clients = {default.name: client(default.name, base_url, credentials)}
    for instance in settings.instances[1:]:
        assert instance.base_url is not None  # only a single instance is embedded
        clients[instance.name] = client(
            instance.name,
            instance.base_url,
            Credentials(instance.user_secret, instance.org_secret, instance.element_token),
        )
    upstreams = Upstreams(clients, default.name)
    upstream = upstreams.default
    for warning in settings.instance_warnings:
        log.warning(warning)
    # Failed records copied into the store when a job ends with them, retried like polls.
    copier = Copier(
        store,
        upstreams,
        max_records=settings.max_failed_records,
        retry_first=settings.poll_interval,
        retry_most=settings.poll_max_interval,
        lease=settings.poll_lease,
    )
    # Download results fetched into the results directory when a download completes.
    files = ResultFiles(Path(settings.results_dir))
    results = Results(store, files)
    fetcher = Fetcher(
        store,
        upstreams,
        files,
        metrics,
        retry_first=settings.poll_interval,
        retry_most=settings.poll_max_interval,
        lease=settings.poll_lease,
    )

    def work_after_end() -> None:
        """A job just ended: what its end scheduled starts now, not at the next look."""
        copier.wake()
        fetcher.wake()

    # The tracker wakes the poller, which polls through the tracker: both share the event.
    due_sooner = asyncio.Event()
    tracker = Tracker(
        settings, store, upstreams, public_url, wake=due_sooner.set, ended=work_after_end
    )
    poller = Poller(
        store, tracker, metrics, settings.poll_rate, settings.poll_lease, wake=due_sooner
    )
    # Each instance's callbacks are verified with its own keys only; the embedded
    # sandbox (single-instance only) signs with the default instance's key, or one
    # made up at start-up.
    keyrings = {instance.name: Keyring(instance.signature_keys) for instance in settings.instances}
    if embedded is not None:
        keyrings[settings.default_instance] = Keyring(keys)
    keyring = keyrings[settings.default_instance]
    tokens = Tokens(settings.api_tokens, metrics, repeats)
    spool = AppSpool(settings.spool_dir or default_root())
    # Old deliveries, refusals and timeline entries go, at start and hourly.
    pruner = Pruner(store, settings.retention)

    jobs = JobApi(
        tracker=tracker,
        store=store,
        upstreams=upstreams,
        # The embedded instance's key may be made up at start-up: it counts as set.
        instances=(dataclasses.replace(default, signature_keys=keys), *settings.instances[1:]),
        tokens=tokens,
        metrics=metrics,
        limits=UploadLimits(
            max_bytes=settings.max_upload_bytes,
            body_timeout=settings.body_timeout,
            min_rate=settings.upload_min_rate,
            rate_window=settings.upload_rate_window,
        ),
        spool=spool,
        results=results,
    )
    # Refused callbacks: noted at a bounded number of rows a second, and those refused
    # before a signature verified answered late.
    rejections = RejectionLog(store.record_rejection)
    pacing = pacing if pacing is not None else Pacing(settings.refusal_delay)
    callbacks = CallbackEndpoint(
        CallbackReceiver(
            store=store,
            keyrings=keyrings,
            default_instance=settings.default_instance,
            metrics=metrics,
            wake=poller.wake,
            callback_grace=settings.callback_grace,
            max_bytes=settings.max_callback_bytes,
            rejections=rejections,
            pacing=pacing,
            ended=work_after_end,
        )
    )
    dashboard = Dashboard(
        store=store,
        metrics=metrics,
        tokens=tokens,
        upstreams=upstreams,
        jobs=jobs,
        instances=[instance.name for instance in settings.instances],
    )
    routes: list[BaseRoute] = [
        *jobs.routes(),
        *(Route(path, callbacks, methods=["POST"]) for path in CALLBACK_PATHS),
        Route("/openapi.json", _openapi, methods=["GET"]),
        *dashboard.routes(),
        *apidocs.routes(),
    ]
    if embedded is not None:
        routes.append(Mount("/sandbox", app=embedded.app))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        spool.claim()
        try:
            await asyncio.to_thread(_prepare_results, files)
            await store.open()
        except BaseException:
            spool.close()
            raise
        poller.start()
        copier.start()
        fetcher.start()
        pruner.start()
        try:
            yield
        finally:
            dashboard.streams.close()
            await pruner.stop()
            pacing.stop()
            await rejections.aclose()
            callbacks.refusals.flush()
            await fetcher.stop()
            await copier.stop()
            await poller.stop()
            if embedded is not None:
                await embedded.aclose()
            await upstreams.aclose()
            await store.close()
            repeats.flush()
            spool.close()

    guard = Middleware(
        RequestGuard,
        hosts=ServedHosts(settings),
        repeats=repeats,
        control=control,
        tokens=tokens,
    )
    return Service(
        callbacks=callbacks,
        pacing=pacing,
        components=Components(
            settings=settings,
            metrics=metrics,
            store=store,
            upstream=upstream,
            upstreams=upstreams,
            tracker=tracker,
            poller=poller,
            keyring=keyring,
            keyrings=MappingProxyType(keyrings),
            tokens=tokens,
            spool=spool,
            results=results,
            sandbox=embedded,
        ),
        routes=routes,
        lifespan=lifespan,
        middleware=[guard],
        exception_handlers={
            BulkhookError: _own_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            ConnectionAbortedError: _client_gone,
            Exception: _unexpected,
        },
    )
