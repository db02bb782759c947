"""``bulkhook serve``: what start-up built is kept out of the garbage collector's way."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import uvicorn

from service.app import create_app
from service.config import Settings
from service.servers import bind_socket
from service.serving import _Server


def test_what_start_up_built_is_frozen_out_of_the_collector(tmp_path: Path) -> None:
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
            state = app.state.bulkhook
            tracked = [obj for obj in gc.get_objects() if obj is state or obj is state.store]
            made_now = {"a": [1]}  # what is built after start-up is collected as usual
            return bool(tracked), any(obj is made_now for obj in gc.get_objects())
        finally:
            server.should_exit = True
            await task

    try:
        start_up_tracked, later_tracked = asyncio.run(started_and_tracked())
    finally:
        gc.unfreeze()
    assert not start_up_tracked
    assert later_tracked
