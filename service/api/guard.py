"""Who may talk to the service: the hosts it answers for, browsers' cross-site requests,
and clients that keep presenting wrong tokens.

With the job API open on loopback, a page in the operator's browser could submit or
cancel jobs with a cross-site form POST, and DNS rebinding (the attacker's own name,
resolving to 127.0.0.1 a moment later) could read them. ``RequestGuard`` refuses both
before any route runs:

- a ``Host`` the service does not serve is ``421 host_not_allowed``. Served: loopback
  names and addresses, the bound address (every IP address when bound to ``0.0.0.0``
  or ``::``: a rebinding attack needs a name), ``BULKHOOK_PUBLIC_URL``'s host and
  ``BULKHOOK_ALLOWED_HOSTS``, on any port. A request without ``Host`` (HTTP/1.0) is
  taken to name the bound address.
- a ``POST``, ``PUT``, ``PATCH`` or ``DELETE`` that a browser marks cross-site
  (``Sec-Fetch-Site: cross-site`` or ``same-site``, or an ``Origin`` that is ``null`` or
  another host and port than the request's ``Host``) is ``403 cross_origin``. Clients
  that send neither header (curl, the CLI, scripts) pass.

The callback routes are exempt: the upstream calls them from anywhere, under whatever
``Host`` a proxy passes, and their signature is their defence. So are ``/healthz`` and
``/readyz``, which Kubernetes probes under the pod's IP.

``Tokens`` checks bearer tokens (job API, dashboard, the embedded sandbox's control
routes) in constant time over every configured token, counts and logs the wrong ones,
and slows a client that keeps guessing: after ``ATTEMPTS`` wrong tokens within
``WINDOW`` seconds, its further tokens are answered ``429 too_many_attempts`` unchecked
until the window ends. Other clients are unaffected; the table of clients is bounded.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from service.callbacks.endpoint import callback_route
from service.config import Settings
from service.errors import ApiError, error_response
from service.logs import Repeats, short
from service.metrics import Metrics

__all__ = [
    "ATTEMPTS",
    "CLIENTS",
    "WINDOW",
    "RequestGuard",
    "ServedHosts",
    "Tokens",
    "bearer",
    "cross_site",
    "route_path",
    "split_host",
]

log = logging.getLogger("bulkhook")

# Wrong tokens one client may send within WINDOW seconds before it is slowed down.
ATTEMPTS = 10
WINDOW = 60.0
# Clients remembered at most; past that the one whose last wrong token is oldest goes.
CLIENTS = 10_000

_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_EXEMPT = frozenset({"/callbacks", "/healthz", "/readyz"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_READ = frozenset({b"host", b"origin", b"sec-fetch-site", b"authorization"})
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def split_host(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a ``Host`` header or an origin's authority, the host lowercased
    without brackets or a trailing dot; None when it is not one."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        host, colon, port_text = value.partition(":")
        rest = colon + port_text
    port: int | None = None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or (digits and not (digits.isascii() and digits.isdigit())):
            return None
        port = int(digits) if digits else None  # "host:" has an empty port: the default
        if port is not None and port > 65535:
            return None
    host = host.lower().rstrip(".")
    return (host, port) if host else None


def _address(host: str) -> _Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ServedHosts:
    """The hosts this service answers for, from the settings."""

    def __init__(self, settings: Settings) -> None:
        self._names: set[str] = {"localhost"}
        self._suffixes: list[str] = []
        self._any_address = False
        self._any_host = False
        # As given to --host: a name, or an address (IPv6 with or without brackets).
        bound = (settings.bind_host or "").strip().removeprefix("[").removesuffix("]")
        if bound:
            address = _address(bound)
            if address is not None and address.is_unspecified:
                self._any_address = True
            else:
                self._names.add(self._normal(bound.rstrip(".")))
        if settings.public_url:
            public = urlsplit(settings.public_url).hostname
            if public:
                self._names.add(self._normal(public.rstrip(".")))
        for entry in settings.allowed_hosts:
            if entry == "*":
                self._any_host = True
            elif entry.startswith("*."):
                self._suffixes.append(entry[1:])
            else:
                self._names.add(self._normal(entry))

    @staticmethod
    def _normal(host: str) -> str:
        address = _address(host.lower())
        return str(address) if address is not None else host.lower()

    def serves(self, host: str | None) -> bool:
        """Is ``host`` (a Host header, None when absent) one this service answers for?"""
        if host is None or self._any_host:
            return True
        parts = split_host(host)
        if parts is None:
            return False
        name = parts[0]
        address = _address(name)
        if address is not None:
            return address.is_loopback or self._any_address or str(address) in self._names
        return name in self._names or any(name.endswith(s) for s in self._suffixes)


def cross_site(method: str, fetch_site: str | None, origin: str | None, host: str | None) -> bool:
    """Does a browser mark this request as coming from another site, where it would
    change something? ``host`` is the request's ``Host`` header."""
    if method not in _UNSAFE:
        return False
    if fetch_site is not None and fetch_site.strip().lower() in ("cross-site", "same-site"):
        return True
    if origin is None:
        return False
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return True
    default = _DEFAULT_PORTS.get(parts.scheme)
    source = split_host(parts.netloc) if default is not None else None
    target = split_host(host) if host is not None else None
    if source is None or target is None:
        return True  # "null", an opaque or malformed origin, or no Host to compare with
    return (source[0], source[1] or default) != (target[0], target[1] or default)


def bearer(header: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; "" for anything else."""
    scheme, _, given = header.partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def _client(scope: Scope) -> str:
    """Whom to count wrong tokens against: the peer's address (as uvicorn's proxy
    headers set it), an IPv6 client by its /64, since one host usually holds them all."""
    client = scope.get("client")
    host = str(client[0]) if client else ""
    address = _address(host)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address) if address is not None else host or "unknown"


class Tokens:
    """The configured bearer tokens, and the clients that keep presenting wrong ones."""

    def __init__(
        self,
        tokens: tuple[str, ...],
        metrics: Metrics,
        repeats: Repeats,
        *,
        attempts: int = ATTEMPTS,
        window: float = WINDOW,
        clients: int = CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = tuple(token.encode() for token in tokens)
        self._metrics = metrics
        self._repeats = repeats
        self._attempts = attempts
        self._window = window
        self._clients = clients
        self._clock = clock
        # client -> [when its first wrong token of the window came, wrong tokens since]
        self._wrong: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def required(self) -> bool:
        """False when no token is configured: the API is open."""
        return bool(self._tokens)

    def check(self, given: str, scope: Scope, where: str) -> bool:
        """Is ``given`` a configured token? "" is no attempt (False, not counted).

        Raises ``429 too_many_attempts`` without comparing while the client is over its
        limit. ``where`` (api, dashboard, sandbox) labels the metric and the log line.
        """
        if not given:
            return False
        client = _client(scope)
        now = self._clock()
        entry = self._wrong.get(client)
        if entry is not None and now - entry[0] >= self._window:
            del self._wrong[client]
            entry = None
        if entry is not None and entry[1] >= self._attempts:
            self._metrics.auth_failures.labels(where, "throttled").inc()
            wait = max(1, math.ceil(entry[0] + self._window - now))
            raise ApiError(
                f"too many wrong tokens from this client: try again in {wait} s",
                code="too_many_attempts",
                status=429,
                headers={"Retry-After": str(wait)},
            )
        candidate = given.encode("utf-8", "replace")
        matched = False
        for token in self._tokens:  # every one, so the time says nothing about which
            matched |= hmac.compare_digest(candidate, token)
        if not matched:
            self._count(client, where, now, entry)
        return matched

    def _count(self, client: str, where: str, now: float, entry: list[float] | None) -> None:
        if entry is None:
            entry = self._wrong[client] = [now, 0]
            if len(self._wrong) > self._clients:
                self._wrong.popitem(last=False)
        else:
            self._wrong.move_to_end(client)
        entry[1] += 1
        self._metrics.auth_failures.labels(where, "wrong").inc()
        shown = short(client)
        self._repeats.warning(
            "wrong_token",
            "refused a wrong token (%s) from %s",
            where,
            shown,
            extra={"outcome": "wrong_token"},
        )
        if entry[1] == self._attempts:
            self._repeats.warning(
                "too_many_attempts",
                "%s sent %d wrong tokens within %g s: its tokens are refused unchecked until"
                " the window ends",
                shown,
                self._attempts,
                self._window,
                extra={"outcome": "too_many_attempts"},
            )


def route_path(scope: Scope) -> str:
    """The path as the router matches it: without the root path a proxy mounts us at."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _headers(scope: Scope) -> Mapping[bytes, str]:
    """The first value of each header this guard reads."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _READ and name not in found:
            found[name] = value.decode("latin-1")
    return found


class RequestGuard:
    """ASGI middleware: the Host check, the cross-site refusal, and the bearer token on
    the embedded sandbox's control routes (``control``: their path prefix, or None;
    they take the job API's ``tokens``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: ServedHosts,
        repeats: Repeats,
        control: str | None,
        tokens: Tokens,
    ) -> None:
        self.app = app
        self._hosts = hosts
        self._repeats = repeats
        self._control = control
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        # Only the callback URLs themselves: any other path under /callbacks/ gets the
        # Host check (a redirect to the path with its slash dropped is built from Host).
        if path in _EXEMPT or callback_route(scope)[0]:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get(b"host")
        refusal = self._refusal(scope, path, headers, host)
        if refusal is not None:
            response = error_response(
                refusal.status, refusal.code, refusal.message, headers=refusal.headers
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(
        self, scope: Scope, path: str, headers: Mapping[bytes, str], host: str | None
    ) -> ApiError | None:
        if not self._hosts.serves(host):
            self._repeats.warning(
                "host_not_allowed",
                "refused a request for host %r (not served; see BULKHOOK_ALLOWED_HOSTS)",
                short(host),
                extra={"outcome": "host_not_allowed"},
            )
            return ApiError(
                "this service does not answer for the host this request names; an operator"
                " can add it to BULKHOOK_ALLOWED_HOSTS",
                code="host_not_allowed",
                status=421,
            )
        method = scope["method"]
        if cross_site(method, headers.get(b"sec-fetch-site"), headers.get(b"origin"), host):
            self._repeats.warning(
                "cross_origin",
                "refused a cross-site %s %s from origin %r",
                method,
                short(path),
                short(headers.get(b"origin")),
                extra={"outcome": "cross_origin"},
            )
            return ApiError(
                "cross-site requests that change something are refused",
                code="cross_origin",
                status=403,
            )
        if self._control is not None and (
            path == self._control or path.startswith(self._control + "/")
        ):
            return _control_refusal(self._tokens, scope, headers)
        return None


def _control_refusal(tokens: Tokens, scope: Scope, headers: Mapping[bytes, str]) -> ApiError | None:
    """The sandbox's control routes (fault injection, stats) take the job API's tokens."""
    if not tokens.required:
        return None
    try:
        if tokens.check(bearer(headers.get(b"authorization", "")), scope, "sandbox"):
            return None
    except ApiError as exc:
        return exc
    return ApiError(
        "a valid bearer token is required",
        code="unauthorized",
        status=401,
        headers={"WWW-Authenticate": "Bearer"},
    )
