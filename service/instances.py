"""Named connector instances: which Open Connectors accounts the service talks to.

A team often has one Open Connectors instance per SaaS application, each with its own
element token, hub, base URL and signature key. ``OC_INSTANCES=crm,shop`` names them;
each name ``N`` reads ``OC_<N>_*`` variables and falls back to the unnamed ``OC_*``
ones. Without ``OC_INSTANCES`` the unnamed variables configure the single instance
``default``, as they always did.

Pure: the caller reads the environment and checks each value (``check``); this module
only names variables, applies the fallbacks and says what is missing or shared. A
problem is a ``ValueError`` whose message starts with the variable it is about and
never holds a value, because start-up prints it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT",
    "SETTINGS",
    "Instance",
    "build",
    "parse_names",
    "shared_keys",
    "valid_name",
    "variable",
]

# The one instance of a deployment that names none.
DEFAULT = "default"

# An instance name: it becomes part of variable names, URLs and metric labels.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")

# Per-instance setting -> (variable suffix, kind the caller checks it as).
SETTINGS: Mapping[str, tuple[str, str]] = {
    "element_token": ("ELEMENT_TOKEN", "secret"),
    "signature_keys": ("SIGNATURE_KEYS", "secrets"),
    "hub": ("HUB", "hub"),
    "base_url": ("BASE_URL", "url"),
    "user_secret": ("USER_SECRET", "secret"),
    "org_secret": ("ORG_SECRET", "secret"),
}
# What a real upstream needs, in the order a message names them.
_CREDENTIALS = ("user_secret", "org_secret", "element_token")


@dataclass(frozen=True)
class Instance:
    """One connector instance: where its upstream is and what its callbacks are
    verified with. ``base_url`` None: the embedded sandbox (single instance only)."""

    name: str
    base_url: str | None
    hub: str
    signature_keys: tuple[str, ...] = field(default=(), repr=False)
    user_secret: str | None = field(default=None, repr=False)
    org_secret: str | None = field(default=None, repr=False)
    element_token: str | None = field(default=None, repr=False)


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def variable(name: str, setting: str) -> str:
    """The variable of ``setting`` for instance ``name``: ``OC_<NAME>_<SUFFIX>``."""
    return f"OC_{name.upper().replace('-', '_')}_{SETTINGS[setting][0]}"


def parse_names(raw: str) -> tuple[str, ...]:
    """The names in ``OC_INSTANCES``, in order; an empty value names none."""
    names = [part.strip() for part in raw.split(",")]
    if names == [""]:
        return ()
    seen: set[str] = set()
    for name in names:
        if not valid_name(name):
            shown = repr(name) if len(name) <= 40 and name.isprintable() else "a name"
            raise ValueError(
                f"OC_INSTANCES: {shown} is not a valid instance name (1-40 lower-case"
                " letters, digits and '-', starting with a letter or digit)"
            )
        if name in seen:
            raise ValueError(f"OC_INSTANCES: {name!r} is named twice")
        seen.add(name)
    return tuple(names)


def build(
    names: tuple[str, ...],
    raw: Mapping[str, str],
    defaults: Mapping[str, Any],
    check: Callable[[str, str, str], Any],
) -> tuple[Instance, ...]:
    """The named instances: each setting from its own variable in ``raw`` (checked by
    ``check(variable, kind, value)``), else from ``defaults`` (the unnamed settings,
    checked already). Every instance needs a base URL and its credentials."""
    instances = []
    for name in names:
        values: dict[str, Any] = {}
        for setting, (_, kind) in SETTINGS.items():
            var = variable(name, setting)
            text = raw.get(var, "").strip()
            values[setting] = check(var, kind, text) if text else defaults.get(setting)
        if values["base_url"] is None:
            raise ValueError(
                f"{variable(name, 'base_url')}: instance {name!r} has no upstream: set it"
                " or OC_BASE_URL (the embedded sandbox serves only a deployment without"
                " OC_INSTANCES)"
            )
        missing = [variable(name, setting) for setting in _CREDENTIALS if not values[setting]]
        if missing:
            raise ValueError(
                f"{missing[0]}: instance {name!r} needs its credentials: set"
                f" {', '.join(missing)} (or the unnamed OC_* variables they fall back to)"
            )
        values["signature_keys"] = tuple(values["signature_keys"] or ())
        instances.append(Instance(name=name, **values))
    return tuple(instances)


def shared_keys(instances: tuple[Instance, ...]) -> list[str]:
    """A warning per pair of instances sharing a signature key (never the key): such a
    key verifies either's callbacks, so a job's callbacks are not kept to its own."""
    warnings = []
    for i, first in enumerate(instances):
        for second in instances[i + 1 :]:
            if set(first.signature_keys) & set(second.signature_keys):
                warnings.append(
                    f"instances {first.name!r} and {second.name!r} share a signature key:"
                    " a callback signed with it is accepted for either's jobs; give each"
                    f" its own ({variable(first.name, 'signature_keys')},"
                    f" {variable(second.name, 'signature_keys')})"
                )
    return warnings
