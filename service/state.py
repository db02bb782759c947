"""Everything one running app owns, built in its lifespan and reached via ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings
from .metrics import Metrics
from .signatures import Keyring
from .store import Store
from .upstream import UpstreamClient

if TYPE_CHECKING:
    from .guard import Tokens
    from .poller import Poller
    from .sandbox import Sandbox
    from .tracker import Tracker

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
