"""Real servers on ephemeral loopback ports, shared by the whole suite."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from service.sandbox import Sandbox
from service.server.thread import ServerThread
from service.store import Store, open_store

from .helpers import (
    CONFIGURED_SECRETS,
    SAMPLES,
    SIGNATURE_KEY,
    Receiver,
    RunningSandbox,
    RunningService,
)

if TYPE_CHECKING:
    pass


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session", autouse=True)
def suite_logs() -> Iterator[None]:
    """Capture every log record of the whole suite; no configured secret may appear."""
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(handler)
    root.setLevel(previous)
    text = "\n".join(handler.lines)
    leaked = [secret for secret in CONFIGURED_SECRETS if secret in text]
    assert not leaked, f"secrets in the suite's logs: {leaked}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def contacts_csv() -> Path:
    """The sample contacts from the Open Connectors docs: 10 rows, all valid."""
    return SAMPLES / "contacts.csv"


@pytest.fixture
def start_sandbox() -> Iterator[Callable[..., RunningSandbox]]:
    """Start a sandbox with the given options on its own uvicorn server."""
    servers: list[ServerThread] = []

    def start(**options: Any) -> RunningSandbox:
        options.setdefault("signature_key", SIGNATURE_KEY)
        options.setdefault("job_seconds", 0.2)
        options.setdefault("callback_retry_base", 0.01)
        sandbox = Sandbox(**options)
        server = ServerThread(sandbox.app).start()
        servers.append(server)
        return RunningSandbox(sandbox, server)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sandbox(start_sandbox: Callable[..., RunningSandbox]) -> RunningSandbox:
    return start_sandbox()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recorder = Receiver()
    app = Starlette(routes=[Route("/callbacks{rest:path}", recorder._endpoint, methods=["POST"])])
    recorder.server = ServerThread(app).start()
    yield recorder
    recorder.server.stop()


POSTGRES_URL = os.environ.get(
    "BULKHOOK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def postgres_base() -> str | None:
    """The PostgreSQL to test against; CI insists on it, elsewhere it may be absent."""
    import psycopg

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but {POSTGRES_URL} failed: {exc}")
        return None
    return POSTGRES_URL


def _with_search_path(url: str, schema: str) -> str:
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def _fresh_schema(base: str) -> Iterator[str]:
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[arg-type]
    try:
        yield _with_search_path(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")  # type: ignore[arg-type]


@pytest.fixture
def postgres_url(postgres_base: str | None) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema (skipped without PostgreSQL, except in CI)."""
    if postgres_base is None:
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL} (BULKHOOK_TEST_POSTGRES_URL)")
    with _fresh_schema(postgres_base) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bulkhook.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store of each kind, on a fresh database (``store_url``), for tests that
    call the store directly; closed after the test."""
    opened = open_store(store_url)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def start_service(store_url: str, tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Start the service against ``upstream`` (a RunningSandbox) or in embedded mode."""
    import httpx

    from service.app import create_app
    from service.config import Settings

    running: list[RunningService] = []

    def start(
        upstream: RunningSandbox | None = None,
        *,
        sandbox_options: Any = None,
        upstream_retry: Any = None,
        store: Any = None,
        pacing: Any = None,
        **overrides: Any,
    ) -> RunningService:
        server = ServerThread()
        values: dict[str, Any] = {
            "oc_base_url": upstream.api_url if upstream else None,
            "oc_user_secret": "user-secret",
            "oc_org_secret": "org-secret",
            "oc_element_token": "element-token",
            "signature_keys": (SIGNATURE_KEY,),
            "public_url": server.url,
            "database_url": store_url,
            "callback_grace": 5.0,
            "poll_interval": 0.3,
            "poll_max_interval": 1.0,
            "results_dir": str(tmp_path / "results"),
            # Refusals of forged callbacks wait a little, not the default second:
            # test_flood checks the default and the pacing itself.
            "refusal_delay": 0.01,
        }
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(
            settings,
            sandbox=sandbox_options,
            upstream_retry=upstream_retry,
            store=store,
            pacing=pacing,
        )
        server.start(app)
        service = RunningService(server, settings, httpx.Client(base_url=server.url, timeout=30))
        running.append(service)
        return service

    yield start
    for service in running:
        service.http.close()
        service.server.stop()
