"""A faithful local Open Connectors for tests, the demo and development."""

from .instance import OPERATIONS, Sandbox
from .options import DEFAULT_HUBS, SandboxOptions
from .routes import API_PREFIX, CONTROL_PREFIX

__all__ = [
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DEFAULT_HUBS",
    "OPERATIONS",
    "Sandbox",
    "SandboxOptions",
]
