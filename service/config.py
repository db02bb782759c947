"""Settings from the environment and a ``.env`` file.

A typo in an interval or a database URL should stop start-up with one line naming
the variable, not surface hours later as a job that is never polled. The checks run
in ``__post_init__`` so settings built in code obey the same rules. Secrets (upstream
credentials, signature keys, API tokens, a database password) never appear in
``repr()`` or an error message, because both end up in logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from service import instances
from service.callbacks.pacing import DEFAULT_DELAY
from service.errors import BulkhookError
from service.instances import Instance
from service.upstream.client import Credentials
from service.values import is_clean, name_problem

__all__ = ["ConfigError", "Settings", "redact"]

_SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})
_SHOW_MAX = 40
_MIN_RETENTION = 5 * 86400
# Failed records kept per job, at most: each up to 256 KiB of JSON, so the bound keeps
# one job's copy far below what a disk holds.
_MOST_FAILED_RECORDS = 1_000_000
# The longest the answer to a refused unverified callback may be held back.
_MOST_REFUSAL_DELAY = 10.0
# From "//" to the last "@" before the next space, quote or end: greedy, because a
# password may itself hold "@" or "/".
_USERINFO = re.compile(r"//[^\s'\"]*@")
# What deploy/bulkhook.env.example holds where a real value must go.
_PLACEHOLDER = "REPLACE_ME"
# OC_BASE_URL without these cannot reach a real instance: every call is a hub call,
# which Open Connectors authorizes with the User and Organization secrets and the
# instance's Element token.
_CREDENTIALS = {
    "oc_user_secret": "OC_USER_SECRET",
    "oc_org_secret": "OC_ORG_SECRET",
    "oc_element_token": "OC_ELEMENT_TOKEN",
}
# Kinds whose value is one word of a few, any case.
_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "log_format": ("auto", "json", "text"),
        "log_level": ("debug", "info", "warning", "error"),
        "http": ("auto", "httptools", "h11"),
        "loop": ("auto", "uvloop", "asyncio"),
    }
)

# Field -> (environment variable, kind). The kind picks both the parser for the raw
# string and the check in __post_init__, so the two cannot drift apart.
_VARS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "oc_base_url": ("OC_BASE_URL", "url"),
        "oc_user_secret": ("OC_USER_SECRET", "secret"),
        "oc_org_secret": ("OC_ORG_SECRET", "secret"),
        "oc_element_token": ("OC_ELEMENT_TOKEN", "secret"),
        "oc_hub": ("OC_HUB", "hub"),
        "oc_instances": ("OC_INSTANCES", "instances"),
        "signature_keys": ("OC_SIGNATURE_KEYS", "secrets"),
        "public_url": ("BULKHOOK_PUBLIC_URL", "url"),
        "database_url": ("BULKHOOK_DATABASE_URL", "database"),
        "api_tokens": ("BULKHOOK_API_TOKENS", "secrets"),
        "allow_open_api": ("BULKHOOK_ALLOW_OPEN_API", "bool"),
        "allowed_hosts": ("BULKHOOK_ALLOWED_HOSTS", "hosts"),
        "callback_grace": ("BULKHOOK_CALLBACK_GRACE", "seconds"),
        "poll_interval": ("BULKHOOK_POLL_INTERVAL", "seconds"),
        "poll_max_interval": ("BULKHOOK_POLL_MAX_INTERVAL", "seconds"),
        "poll_rate": ("BULKHOOK_POLL_RATE", "rate"),
        "poll_lease": ("BULKHOOK_POLL_LEASE", "seconds"),
        "job_timeout": ("BULKHOOK_JOB_TIMEOUT", "seconds"),
        "max_callback_bytes": ("BULKHOOK_MAX_CALLBACK_BYTES", "bytes"),
        "refusal_delay": ("BULKHOOK_REFUSAL_DELAY", "delay"),
        "max_upload_bytes": ("BULKHOOK_MAX_UPLOAD_BYTES", "bytes"),
        "header_timeout": ("BULKHOOK_HEADER_TIMEOUT", "seconds"),
        "body_timeout": ("BULKHOOK_BODY_TIMEOUT", "seconds"),
        "upload_min_rate": ("BULKHOOK_UPLOAD_MIN_RATE", "bytes"),
        "upload_rate_window": ("BULKHOOK_UPLOAD_RATE_WINDOW", "seconds"),
        "max_relays": ("BULKHOOK_MAX_RELAYS", "count"),
        "retention": ("BULKHOOK_RETENTION", "retention"),
        "max_failed_records": ("BULKHOOK_MAX_FAILED_RECORDS", "records"),
        "spool_dir": ("BULKHOOK_SPOOL_DIR", "path"),
        "results_dir": ("BULKHOOK_RESULTS_DIR", "directory"),
        "log_format": ("BULKHOOK_LOG_FORMAT", "log_format"),
        "log_level": ("BULKHOOK_LOG_LEVEL", "log_level"),
        "http": ("BULKHOOK_HTTP", "http"),
        "loop": ("BULKHOOK_LOOP", "loop"),
    }
)
_WANTED: Mapping[str, str] = MappingProxyType(
    {
        "seconds": "a positive number of seconds",
        "delay": f"a number of seconds from 0 (no delay) to {_MOST_REFUSAL_DELAY:g}",
        "rate": "a positive number of polls per second",
        "retention": "a number of seconds, at least 432000 (5 days: Open Connectors"
        " redelivers a callback for about four)",
        "bytes": "a positive whole number of bytes",
        "count": "a positive whole number",
        "records": f"a whole number of records from 1 to {_MOST_FAILED_RECORDS}",
        "bool": "one of 1/true/yes/0/false/no",
        **{kind: f"one of {'/'.join(words)}" for kind, words in _CHOICES.items()},
    }
)


class ConfigError(BulkhookError):
    """A setting is unusable; the message is one line fit to print before exiting."""

    code = "bad_setting"
    http_status = 503


def redact(text: str) -> str:
    """``text`` with every URL's userinfo hidden: a database password or upstream
    credentials sit there. Every URL the service prints or logs goes through this;
    hiding too much is harmless."""
    return _USERINFO.sub("//***@", text)


def _show(value: object) -> str:
    """A non-secret value for a message, cut short so a pasted blob stays one line."""
    if isinstance(value, str):
        text = redact(value)
        return repr(text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX] + "…")
    return repr(value)


def _parse(var: str, kind: str, raw: str) -> Any:
    """Turn an environment string into the field's type; range checks come later."""
    if kind == "instances":
        try:
            return instances.parse_names(raw)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if kind in ("secrets", "hosts"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind not in _WANTED:
        return raw
    if kind in ("seconds", "rate", "retention", "delay"):
        with contextlib.suppress(ValueError):
            return float(raw)
    elif kind in ("bytes", "count", "records") and raw.isascii() and raw.isdigit():
        return int(raw)
    elif kind == "bool" and raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
    elif raw.lower() in _CHOICES.get(kind, ()):
        return raw.lower()
    raise ConfigError(f"{var} must be {_WANTED[kind]}, got {_show(raw)}")


def _check_secret(var: str, value: object) -> str:
    # A secret with whitespace, a comma or a control character would corrupt the
    # Authorization header or the comma-separated list it came from.
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{var} must be a non-empty string (value not shown)")
    if any(ch.isspace() or ch == "," or not ch.isprintable() for ch in value):
        raise ConfigError(
            f"{var} must not contain whitespace, commas or control characters (value not shown)"
        )
    return value


def _check_url(var: str, value: object) -> str:
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
        _ = parts and parts.port  # raises on a non-numeric or out-of-range port
    except ValueError:
        parts = None
    if not parts or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{var} must be an http(s) URL with a host, got {_show(value)}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{var} must not have a query or fragment, got {_show(value)}")
    return str(value).rstrip("/")  # callback URLs are built by appending "/callbacks/..."


# A DNS name, or one with "*." in front for any name under it; no port, no scheme.
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


def _check_host(var: str, value: object) -> str:
    """One served host: a name, ``*.name``, an IP address, or ``*`` for any host."""
    name = value.strip().lower().rstrip(".") if isinstance(value, str) else ""
    if name == "*" or _HOST_NAME.fullmatch(name):
        return name
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
    raise ConfigError(
        f"{var} must list host names (like api.example.com or *.example.com) or IP"
        f" addresses, without scheme or port, got {_show(value)}"
    )


def _check_database(var: str, value: object) -> str:
    if isinstance(value, str) and value.startswith(_SQLITE):
        if value.removeprefix(_SQLITE) in ("", ":memory:"):
            raise ConfigError(
                f"{var} needs a file path after sqlite:/// (not :memory: - job state must"
                " survive a restart), e.g. sqlite:///./bulkhook.db"
            )
        return value
    if isinstance(value, str) and value.startswith(_POSTGRES):
        return value
    raise ConfigError(f"{var} must be sqlite:///<path> or postgresql://..., got {_show(value)}")


def _check(var: str, kind: str, value: Any) -> Any:
    """The validated (and normalised) value of one field."""
    if kind in ("url", "secret") and value in (None, ""):
        return None
    if kind == "url":
        return _check_url(var, value)
    if kind == "secret":
        return _check_secret(var, value)
    if kind == "secrets":
        if isinstance(value, str) or not isinstance(value, tuple | list):
            raise ConfigError(f"{var} must be a sequence of strings (value not shown)")
        return tuple(_check_secret(var, item) for item in value)
    if kind == "hosts":
        if isinstance(value, str) or not isinstance(value, tuple | list):
            raise ConfigError(f"{var} must be a sequence of host names, got {_show(value)}")
        return tuple(_check_host(var, item) for item in value)
    if kind == "hub":
        problem = name_problem(value) if isinstance(value, str) else "it is not text"
        if problem is not None:
            raise ConfigError(f"{var} is not a usable hub name ({problem}), got {_show(value)}")
        return value
    if kind == "instances":
        if isinstance(value, str) or not isinstance(value, tuple | list):
            raise ConfigError(f"{var} must be a sequence of instance names")
        try:
            return instances.parse_names(",".join(str(name) for name in value))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if kind == "database":
        return _check_database(var, value)
    if kind in ("path", "directory"):
        if isinstance(value, Path):
            value = str(value)
        if (value is None and kind == "path") or (
            isinstance(value, str) and value.strip() and is_clean(value)
        ):
            return value
        raise ConfigError(f"{var} must be a directory path, got {_show(value)}")
    if kind == "bool" and isinstance(value, bool):
        return value
    if value in _CHOICES.get(kind, ()):
        return value
    whole = isinstance(value, int) and not isinstance(value, bool)
    if kind in ("bytes", "count") and whole and value > 0:
        return value
    if kind == "records" and whole and 0 < value <= _MOST_FAILED_RECORDS:
        return value
    # seconds / rate: a zero, negative, NaN or infinite interval would stall or spin.
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("seconds", "rate") and number and math.isfinite(value) and value > 0:
        return float(value)
    if kind == "delay" and number and 0 <= value <= _MOST_REFUSAL_DELAY:
        return float(value)
    # A shorter retention would forget a delivery the upstream may still send again.
    if kind == "retention" and number and math.isfinite(value) and value >= _MIN_RETENTION:
        return float(value)
    raise ConfigError(f"{var} must be {_WANTED[kind]}, got {_show(value)}")


# What a per-instance variable must hold, for a message that never shows the value.
_NAMED_WANTED: Mapping[str, str] = MappingProxyType(
    {
        "url": "an http(s) URL with a host and no query or fragment",
        "secret": "a non-empty value without whitespace, commas or control characters",
        "secrets": "a comma-separated list of values without whitespace or control characters",
        "hub": "a usable hub name",
    }
)


def _check_named(var: str, kind: str, raw: str) -> Any:
    """One per-instance variable, parsed and checked like its unnamed default."""
    try:
        return _check(var, kind, _parse(var, kind, raw))
    except ConfigError:
        raise ConfigError(f"{var}: must be {_NAMED_WANTED[kind]} (value not shown)") from None


def _is_loopback(host: str) -> bool:
    """Only literal loopback addresses count: a name other than localhost is not resolved."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@dataclass(frozen=True, repr=False)
class Settings:
    oc_base_url: str | None = None
    oc_user_secret: str | None = field(default=None, repr=False)
    oc_org_secret: str | None = field(default=None, repr=False)
    oc_element_token: str | None = field(default=None, repr=False)
    oc_hub: str = "marketing"
    signature_keys: tuple[str, ...] = field(default=(), repr=False)
    # Named connector instances (OC_INSTANCES); none: the unnamed OC_* variables
    # configure the one instance "default".
    oc_instances: tuple[str, ...] = ()
    # The per-instance variables (OC_<NAME>_*) as read, checked when the instances are
    # built; their unnamed OC_* counterparts are the defaults.
    instance_env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    public_url: str | None = None
    database_url: str = "sqlite:///./bulkhook.db"
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    allow_open_api: bool = False
    # Hosts served besides loopback, the bound address and BULKHOOK_PUBLIC_URL's host.
    allowed_hosts: tuple[str, ...] = ()
    callback_grace: float = 60.0
    poll_interval: float = 15.0
    poll_max_interval: float = 300.0
    poll_rate: float = 10.0
    # How long a replica's claim on a due job lasts; a dead replica's jobs are taken
    # over once it expires. Longer than one status poll can take (with its retries).
    poll_lease: float = 120.0
    job_timeout: float = 259200.0
    max_callback_bytes: int = 1048576
    # Seconds the answer to a callback refused before its signature verified (forged,
    # made-up job, unknown instance, too large) waits before it is sent; 0: none.
    refusal_delay: float = DEFAULT_DELAY
    max_upload_bytes: int = 2147483648
    # A connection whose request headers are not complete this long after it opened
    # (or after its last response) is closed: it holds a socket and serves no one.
    header_timeout: float = 10.0
    # The longest gap between two reads of an upload's body, and the least bytes per
    # second it must bring in each window of upload_rate_window seconds (the first
    # window is its grace): slower uploads are cut with 408 upload_too_slow.
    body_timeout: float = 60.0
    upload_min_rate: int = 1024
    upload_rate_window: float = 60.0
    # Uploads relayed upstream while they arrive, at most; past it one is spooled whole.
    max_relays: int = 8
    # Seconds deliveries, refused callbacks, applied kept callbacks and timeline entries
    # are kept (30 days); at least 5 days, past the upstream's redelivery window.
    retention: float = 2592000.0
    # Failed records copied into the store per job (the upstream forgets them after
    # three days); past it the job says how many were kept.
    max_failed_records: int = 10_000
    # Where uploads are spooled while they arrive; None: bulkhook-spool in the
    # system's temporary directory. Each running app works in a locked directory of
    # its own below it, and removes those of apps that died.
    spool_dir: str | None = None
    # Where download results are kept (created owner-only at start-up); in a fleet, a
    # volume every replica mounts: any replica serves any result.
    results_dir: str = "bulkhook-results"
    # Structured JSON lines for log collectors, or plain text for a terminal; auto: text
    # when stderr is a terminal, JSON otherwise.
    log_format: str = "auto"
    # debug also logs every accepted or duplicate callback delivery.
    log_level: str = "info"
    # What ``bulkhook serve`` runs on: uvicorn's HTTP parser and event loop. auto takes
    # httptools and uvloop (installed with the service), as uvicorn does.
    http: str = "auto"
    loop: str = "auto"
    # Where ``bulkhook serve`` listens: not read from the environment but set by the
    # command, so the Host check serves that address. None: in-process (tests, the demo).
    bind_host: str | None = None
    # Built from the above: every connector instance in order, the default one's name
    # (the first), and one warning per pair of instances sharing a signature key.
    instances: tuple[Instance, ...] = field(init=False, repr=False, compare=False)
    default_instance: str = field(init=False)
    instance_warnings: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in _VARS:
                continue
            var, kind = _VARS[f.name]
            object.__setattr__(self, f.name, _check(var, kind, getattr(self, f.name)))
        missing = [var for name, var in _CREDENTIALS.items() if getattr(self, name) is None]
        if self.oc_base_url is not None and missing and not self.oc_instances:
            raise ConfigError(
                f"OC_BASE_URL is set, so the upstream needs its credentials: set"
                f" {', '.join(missing)} (or unset OC_BASE_URL to use the embedded sandbox)"
            )
        if self.poll_interval > self.poll_max_interval:
            raise ConfigError(
                f"BULKHOOK_POLL_INTERVAL ({self.poll_interval:g}) must not exceed"
                f" BULKHOOK_POLL_MAX_INTERVAL ({self.poll_max_interval:g})"
            )
        built = self._build_instances()
        object.__setattr__(self, "instances", built)
        object.__setattr__(self, "default_instance", built[0].name)
        object.__setattr__(self, "instance_warnings", tuple(instances.shared_keys(built)))

    def _build_instances(self) -> tuple[Instance, ...]:
        unnamed: dict[str, Any] = {
            "element_token": self.oc_element_token,
            "signature_keys": self.signature_keys,
            "hub": self.oc_hub,
            "base_url": self.oc_base_url,
            "user_secret": self.oc_user_secret,
            "org_secret": self.oc_org_secret,
        }
        if not self.oc_instances:
            return (Instance(name=instances.DEFAULT, **unnamed),)
        try:
            return instances.build(self.oc_instances, self.instance_env, unnamed, _check_named)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def instance(self, name: str) -> Instance | None:
        """The configured instance called ``name``, if any."""
        return next((item for item in self.instances if item.name == name), None)

    def __repr__(self) -> str:
        # Hand-written so that a password inside database_url is hidden too.
        shown = []
        for f in dataclasses.fields(self):
            if f.repr:
                value = getattr(self, f.name)
                shown.append(f"{f.name}={redact(value) if isinstance(value, str) else value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """The environment wins over the file so a deployment can override a checked-in
        ``.env``. The file is read literally (no ``${VAR}`` expansion), so a secret
        containing ``$`` survives and the result depends only on ``environ``."""
        env = os.environ if environ is None else environ
        from_file: Mapping[str, str | None] = {}
        if env_file is not None and Path(env_file).is_file():
            from_file = dotenv_values(env_file, interpolate=False)

        def read(var: str) -> str:
            raw = (env.get(var) or "").strip() or (from_file.get(var) or "").strip()
            if _PLACEHOLDER in raw:
                # The value is not shown: it may be a secret with the placeholder in it.
                raise ConfigError(
                    f"{var} still holds the placeholder {_PLACEHOLDER} from the example"
                    " settings file: set its real value (or remove the line)"
                )
            return raw

        values: dict[str, Any] = {}
        for name, (var, kind) in _VARS.items():
            raw = read(var)
            if raw:
                values[name] = _parse(var, kind, raw)
        named: dict[str, str] = {}
        for instance in values.get("oc_instances", ()):
            for setting in instances.SETTINGS:
                var = instances.variable(instance, setting)
                if raw := read(var):
                    named[var] = raw
        return cls(**values, instance_env=named)

    def credentials(self) -> Credentials:
        return Credentials(self.oc_user_secret, self.oc_org_secret, self.oc_element_token)

    @property
    def embedded(self) -> bool:
        """Without an upstream URL the service runs against its own sandbox."""
        return self.oc_base_url is None and not self.oc_instances

    @property
    def sqlite_path(self) -> str | None:
        """What the SQLite store opens; None when the state lives in PostgreSQL."""
        if self.database_url.startswith(_SQLITE):
            return self.database_url.removeprefix(_SQLITE)
        return None

    def replace(self, **changes: Any) -> Settings:
        """Like ``dataclasses.replace``; the copy goes through the same validation."""
        return dataclasses.replace(self, **changes)

    def check_bind(self, host: str) -> None:
        """An open job API is safe only where nothing else can reach it."""
        if self.api_tokens or self.allow_open_api or _is_loopback(host):
            return
        raise ConfigError(
            f"BULKHOOK_API_TOKENS is not set, so the job API would be open to anyone on"
            f" {_show(host)}, which is not a loopback address: set BULKHOOK_API_TOKENS,"
            " or BULKHOOK_ALLOW_OPEN_API=1 to accept an open API"
            " (e.g. behind an authenticating proxy)"
        )
