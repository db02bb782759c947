"""The HTTP protocol every server of the project runs: uvicorn's, with a deadline for
a request's headers (and for its body, unless it is an upload).

uvicorn times a connection out only while it idles after a response (keep-alive): a
client that connects and sends nothing, or trickles a request's headers a byte at a
time, holds its connection for ever. ``http_protocol`` adds a deadline: a request's
headers must be complete ``header_timeout`` seconds after the connection opened (the
first request) or after the request's first bytes arrived (each further one; the
keep-alive timeout bounds the wait for them); past it, the connection is closed. The
deadline covers a request's body too, except an upload's (``POST /jobs`` with a file),
whose pace the upload rules judge: a callback, a form or a download's JSON is small,
and one trickled a byte at a time would hold its connection just as long.

``pause_body`` lets an app that answers late without reading a request's body (a
refused callback's answer waits on purpose) free what the server buffered of it
meanwhile: uvicorn reads a body ahead of the app, up to 64 KiB and a read's worth past
that, which a thousand such requests would make a quarter of a gigabyte.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.downloads.requests import is_json

__all__ = [
    "HEADER_TIMEOUT",
    "event_loop",
    "http_implementation",
    "http_protocol",
    "implementations",
    "pause_body",
]

HEADER_TIMEOUT = 10.0


if TYPE_CHECKING:
    from starlette.types import Receive
    from uvicorn._types import HTTPScope

    _Protocol = H11Protocol  # what the mixin below needs of either uvicorn protocol
else:
    _Protocol = object


class _HeaderDeadline(_Protocol):
    """The deadline, over either of uvicorn's HTTP/1.1 protocols.

    A timer runs from ``connection_made``, and from the first bytes of any later
    request that does not arrive whole at once, until its headers (and its body,
    unless it is an upload) are in. A request that arrives in one piece, as nearly all
    do on a kept-alive connection, costs no timer at all: only a check after each read.
    """

    header_timeout = HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A read that completed a request, as nearly every callback's single read does,
        # is settled by the first test, inline: ``_awaiting_request`` is called only
        # after a partial read or once the response is complete.
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            if self._header_timer is not None:
                self._stop_header_timer()
        elif self._awaiting_request():
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)
        elif self._header_timer is not None:
            self._stop_header_timer()

    def _awaiting_request(self) -> bool:
        """No request is being served on the connection whose headers, and body unless
        it is an upload, are complete (both protocols start a request's cycle as soon
        as its headers are parsed, and clear ``more_body`` once its body is in)."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return True
        return cycle.more_body and not _is_upload(cycle.scope)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        # A connection upgraded to another protocol (a WebSocket) is no longer ours.
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            return
        if self._awaiting_request():
            self.transport.close()


def _cycles() -> tuple[type[Any], ...]:
    """uvicorn's request-response cycles, one per HTTP implementation installed."""
    cycles: list[type[Any]] = [h11_impl.RequestResponseCycle]
    if importlib.util.find_spec("httptools"):
        from uvicorn.protocols.http import httptools_impl

        cycles.append(httptools_impl.RequestResponseCycle)
    return tuple(cycles)


_CYCLES = _cycles()


def pause_body(receive: Receive) -> None:
    """Drop what the server has read of the request's body and read no more of it until
    the answer is sent; the app will not read it. uvicorn then reads on as before,
    discarding the rest, for as long as the deadline allows. Under another server, for
    which ``receive`` is not uvicorn's, nothing happens."""
    cycle = getattr(receive, "__self__", None)
    if isinstance(cycle, _CYCLES) and not cycle.response_complete:
        cycle.flow.pause_reading()
        cycle.body = bytearray()


def _is_upload(scope: HTTPScope) -> bool:
    """A file upload: ``POST /jobs`` but not a download's (JSON: at most 64 KiB, as
    small as a form, so it keeps to the deadline)."""
    if scope["method"] != "POST" or scope["path"].rstrip("/") != "/jobs":
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return not is_json(value.decode("latin-1"))
    return True


def implementations() -> tuple[str, ...]:
    """The HTTP parsers uvicorn can run here, the one it prefers first."""
    return ("httptools", "h11") if importlib.util.find_spec("httptools") else ("h11",)


def event_loop(choice: str = "auto") -> str:
    """The event loop ``choice`` names (``auto``: uvloop if installed, as uvicorn picks);
    ValueError if it is not installed here."""
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "auto":
        return "uvloop" if installed else "asyncio"
    if choice == "uvloop" and not installed:
        raise ValueError("uvloop is not installed")
    if choice not in ("uvloop", "asyncio"):
        raise ValueError(f"unknown event loop {choice!r}")
    return choice


def http_implementation(choice: str = "auto") -> str:
    """The HTTP parser ``choice`` names (``auto``: the one uvicorn prefers); ValueError
    if it is not installed here."""
    if choice == "auto":
        return implementations()[0]
    if choice not in implementations():
        raise ValueError(f"{choice} is not installed")
    return choice


def http_protocol(
    header_timeout: float = HEADER_TIMEOUT, implementation: str = "auto"
) -> type[asyncio.Protocol]:
    """uvicorn's protocol for ``implementation`` (``auto``: httptools if installed, as
    uvicorn picks), with the header deadline; for ``uvicorn.Config(http=...)``."""
    implementation = http_implementation(implementation)
    base: type[asyncio.Protocol]
    if implementation == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    elif implementation == "h11":
        base = H11Protocol
    else:
        raise ValueError(f"unknown HTTP implementation {implementation!r}")
    name = f"HeaderDeadline{base.__name__}"
    return type(name, (_HeaderDeadline, base), {"header_timeout": header_timeout})
