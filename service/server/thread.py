"""Run an ASGI app under a real uvicorn server on a loopback port, in a background thread.

Tests and ``bulkhook demo`` use ``ServerThread`` to stand up real servers on ephemeral
ports without a subprocess; each server has its own event loop.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from service.server.protocol import HEADER_TIMEOUT, http_protocol

__all__ = ["ServerThread", "StoppingServer", "bind_socket"]


class StoppingServer(uvicorn.Server):
    """uvicorn's server, telling the app (its ``stopping()``, if it has one) that it
    stops before it waits for the requests in flight: the app's answers held back on
    purpose (refusals of forged callbacks) are then sent at once, not after their delay.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopping = getattr(self.config.app, "stopping", None)
        if callable(stopping):
            stopping()
        await super().shutdown(sockets)


class ServerThread:
    """The socket is bound at construction, so ``url`` is known before the app exists
    (an app needs its own public URL to hand out callback URLs)."""

    def __init__(
        self,
        app: Any = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        header_timeout: float = HEADER_TIMEOUT,
        **uvicorn_options: Any,
    ) -> None:
        self._socket = bind_socket(host, port)
        self.host = host
        self.port = self._socket.getsockname()[1]
        self.app = app
        self._options = {
            "log_level": log_level,
            "http": http_protocol(header_timeout),
            # A response still streaming (a dashboard's events) is cut this long after
            # stop(), so the server, its lifespan and its poller end before stop returns.
            "timeout_graceful_shutdown": 3,
            **uvicorn_options,
        }
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, app: Any = None, timeout: float = 10.0) -> ServerThread:
        app = app if app is not None else self.app
        if app is None:
            raise ValueError("no app to serve")
        self.app = app
        config = uvicorn.Config(app, lifespan="auto", **self._options)
        server = self._server = StoppingServer(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket for uvicorn, bound now so its port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then,
    # and without it every keep-alive response waits ~40 ms on Nagle and delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        # One line naming the address: "[Errno 98] Address already in use" alone does
        # not say which, and a port past 65535 raises OverflowError, not OSError.
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OSError(
            getattr(exc, "errno", None), f"cannot listen on {host}:{port}: {reason}"
        ) from exc
    sock.set_inheritable(True)
    return sock
