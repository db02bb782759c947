"""A faithful local Open Connectors for tests, the demo and development."""

from typing import Any

from service.sandbox.instance import OPERATIONS, Simulator
from service.sandbox.options import DEFAULT_HUBS, SandboxOptions
from service.sandbox.routes import API_PREFIX, CONTROL_PREFIX, build_app


class Sandbox(Simulator):
    """The simulator with its HTTP surface: serve ``app`` (it is a Starlette app)."""

    def __init__(self, options: SandboxOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.app = build_app(self)


__all__ = [
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DEFAULT_HUBS",
    "OPERATIONS",
    "Sandbox",
    "SandboxOptions",
]
