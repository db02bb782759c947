"""Everything one running app owns, built in its lifespan and reached via ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.callbacks.signatures import Keyring
from service.config import Settings
from service.metrics import Metrics
from service.store import Store
from service.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from service.api.guard import Tokens
    from service.poller import Poller
    from service.sandbox import Sandbox
    from service.tracker import Tracker

__all__ = ["AppState"]


@dataclass
class AppState:
    settings: Settings
    public_url: str
    keyring: Keyring
    metrics: Metrics
    store: Store
    upstream: UpstreamClient
    tracker: Tracker
    poller: Poller
    tokens: Tokens
    sandbox: Sandbox | None = None
    # This app's own spool directory (None: the system's temporary directory).
    spool_dir: Path | None = None
