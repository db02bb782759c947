"""``bulkhook serve``: the service under uvicorn, saying at start-up what it runs on."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import ipaddress
import os
import socket
import sys
from pathlib import Path

import uvicorn

from service import errors
from service.app import create_app
from service.config import Settings, redact
from service.logs import chosen_format, lighten_records, log_config
from service.sandbox import API_PREFIX
from service.server.protocol import event_loop, http_implementation, http_protocol
from service.server.thread import StoppingServer, bind_socket
from service.store import StoreError, open_store
from service.uploads.spool import default_root, prepare_root

__all__ = ["YOUNG_THRESHOLD", "StartupError", "describe", "serve"]

# Allocations (less deallocations) between two young-generation collections when serving.
YOUNG_THRESHOLD = 10_000
_MAX_PORT = 65535


def _loopback_url(host: str, port: int) -> str:
    """A URL the service can reach itself on (for the embedded sandbox's callbacks)."""
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def describe(settings: Settings, url: str) -> list[str]:
    """What the operator needs to know at start-up; never a secret."""
    public = settings.public_url or url
    lines = [f"bulkhook: serving on {url} (callbacks: {public}/callbacks/jobs/<id>)"]
    login = " (log in with one of BULKHOOK_API_TOKENS)" if settings.api_tokens else ""
    lines.append(f"bulkhook: dashboard at {url}/{login}")
    lines.append(f"bulkhook: API docs at {url}/docs (OpenAPI description: {url}/openapi.json)")
    if settings.embedded:
        lines.append(
            f"bulkhook: OC_BASE_URL is unset: using the embedded sandbox upstream at "
            f"{public}/sandbox{API_PREFIX}"
        )
        if not settings.signature_keys:
            lines.append(
                "bulkhook: callbacks are verified with a signature key generated at start-up "
                "and shared with the embedded sandbox"
            )
    elif not settings.oc_instances:
        lines.append(f"bulkhook: upstream {redact(str(settings.oc_base_url))}")
        if not settings.signature_keys:
            lines.append(
                "bulkhook: WARNING: OC_SIGNATURE_KEYS is unset: every callback will be "
                "refused (401) and jobs will finish by polling"
            )
    else:
        for instance in settings.instances:
            default = " (default)" if instance.name == settings.default_instance else ""
            lines.append(
                f"bulkhook: instance {instance.name}{default}: upstream"
                f" {redact(str(instance.base_url))}, hub {instance.hub}"
            )
            if not instance.signature_keys:
                lines.append(
                    f"bulkhook: WARNING: instance {instance.name} has no signature key: its"
                    " callbacks will be refused (401) and its jobs will finish by polling"
                )
    lines.extend(f"bulkhook: WARNING: {warning}" for warning in settings.instance_warnings)
    lines.append(f"bulkhook: job state in {redact(settings.database_url.split('?', 1)[0])}")
    if not settings.api_tokens:
        lines.append("bulkhook: the job API is open (BULKHOOK_API_TOKENS unset)")
    lines.append("bulkhook: press Ctrl+C to stop")
    return lines


class StartupError(errors.BulkhookError):
    """The service cannot start; the message is one line saying what to fix."""

    code = "startup_failed"
    http_status = 503


async def _check_store(settings: Settings) -> None:
    store = open_store(settings.database_url)
    await store.open()
    await store.close()


def _prepare(settings: Settings, host: str, port: int) -> socket.socket:
    """The listening socket, once the port and the store are known to work: every
    start-up failure is found here, before anything claims to be serving."""
    if not 0 <= port <= _MAX_PORT:
        raise StartupError(f"--port must be from 0 to {_MAX_PORT}, got {port}")
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        raise StartupError(exc.strerror or str(exc)) from None
    spool = Path(settings.spool_dir or default_root())
    try:
        prepare_root(spool)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot use BULKHOOK_SPOOL_DIR {spool}: {exc.strerror}") from None
    results = Path(settings.results_dir)
    try:
        results.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(results, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot use BULKHOOK_RESULTS_DIR {results}: {exc.strerror or exc}"
        ) from None
    try:
        asyncio.run(_check_store(settings))
    except (StoreError, OSError) as exc:
        sock.close()
        raise StartupError(redact(str(exc))) from None
    return sock


def serve(settings: Settings, host: str, port: int) -> int:
    sock = _prepare(settings, host, port)
    port = sock.getsockname()[1]
    url = _loopback_url(host, port)
    if settings.public_url is None:
        settings = dataclasses.replace(settings, public_url=url)
    # The Host check answers for the address it listens on (every IP address when
    # that is 0.0.0.0 or ::).
    settings = dataclasses.replace(settings, bind_host=host)
    for line in describe(settings, url):
        print(line, flush=True)
    try:
        http = http_implementation(settings.http)
        loop = event_loop(settings.loop)
    except ValueError as exc:
        sock.close()
        raise StartupError(f"cannot serve with BULKHOOK_HTTP/BULKHOOK_LOOP: {exc}") from None
    print(f"bulkhook: HTTP parser {http}, event loop {loop}", flush=True)
    lighten_records()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_config=log_config(chosen_format(settings.log_format, sys.stderr), settings.log_level),
        log_level=settings.log_level,
        # One line per request would cost more than the callback itself; callbacks
        # log their own line (at debug) with the job and webhook ids instead.
        access_log=False,
        # The app handles them itself, on every route but the callbacks.
        proxy_headers=False,
        timeout_graceful_shutdown=30,
        # uvicorn's own protocol has no deadline for a request's headers.
        http=http_protocol(settings.header_timeout, http),
        loop=loop,
    )
    app.behind_proxies(config.forwarded_allow_ips)
    _Server(config).run(sockets=[sock])
    return 0


class _Server(StoppingServer):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What exists once the app has started (modules, routes, the store, the
        # clients, the sandbox) lives as long as the process: keep it out of the
        # collector's way. Left in, every full collection under load walked it all
        # and stalled the event loop for about 20 ms.
        gc.collect()
        gc.freeze()
        # Requests in flight hold a few hundred young objects (coroutines, futures,
        # buffers) that all die with their request: at the default threshold of 700 a
        # young collection walked them every ~35 callbacks, 2 % of the event loop's
        # time under load. Past this one, few requests ever trigger a collection.
        gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
