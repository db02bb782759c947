"""``bulkhook serve``: what it says at start-up, and the garbage collector kept out of
the way of requests."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import uvicorn

from service.app import create_app
from service.config import Settings
from service.server.serve import YOUNG_THRESHOLD, _Server, describe
from service.server.thread import bind_socket


def test_the_banner_names_the_dashboard_the_api_docs_and_how_to_stop(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/bulkhook.db")
    banner = "\n".join(describe(settings, "http://127.0.0.1:8000"))
    assert "dashboard at http://127.0.0.1:8000/\n" in banner
    assert "API docs at http://127.0.0.1:8000/docs " in banner
    assert "http://127.0.0.1:8000/openapi.json" in banner
    assert banner.endswith("press Ctrl+C to stop")
    guarded = "\n".join(describe(settings.replace(api_tokens=("t0ken",)), "http://[::1]:9000"))
    assert "dashboard at http://[::1]:9000/ (log in with one of BULKHOOK_API_TOKENS)" in guarded
    assert "t0ken" not in guarded


def test_start_up_is_frozen_and_young_collections_are_rare(tmp_path: Path) -> None:
    # Left in, every full collection under load walked the store, the clients and the
    # sandbox, stalling the event loop for ~20 ms at a time.
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/bulkhook.db"))
    server = _Server(uvicorn.Config(app, log_config=None))
    sock = bind_socket("127.0.0.1", 0)

    async def started_and_tracked() -> tuple[bool, bool]:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                assert not task.done(), "the server did not start"
                await asyncio.sleep(0.01)
            parts = app.components
            tracked = [obj for obj in gc.get_objects() if obj is parts or obj is parts.store]
            made_now = {"a": [1]}  # what is built after start-up is collected as usual
            return bool(tracked), any(obj is made_now for obj in gc.get_objects())
        finally:
            server.should_exit = True
            await task

    thresholds = gc.get_threshold()
    try:
        start_up_tracked, later_tracked = asyncio.run(started_and_tracked())
        young = gc.get_threshold()[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert not start_up_tracked
    assert later_tracked
    # Young collections run every YOUNG_THRESHOLD allocations, not every 700.
    assert young == YOUNG_THRESHOLD > thresholds[0]
