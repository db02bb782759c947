"""The service's own cost per callback, with the app called directly (no HTTP server).

    python bench/callback_path.py                 # SQLite, 20,000 callbacks, 32 at a time
    python bench/callback_path.py --postgres URL  # the same on PostgreSQL (an empty database)
    valgrind --tool=callgrind --instr-atstart=no python bench/callback_path.py --callgrind

The app is built by ``create_app`` and run through its lifespan, as ``bulkhook serve``
runs it; jobs are written into its store beforehand, each with an upstream id. Each
callback is a signed ``RUNNING`` body for one of 200 jobs, with a webhook id and body
never sent before, handed to the app as uvicorn would (an ASGI scope, one ``receive``
message, ``send`` collecting the answer), ``--concurrency`` at a time, on uvloop. Prints the
event-loop thread's CPU time per callback (``time.thread_time``; the commit's fsync
runs on a thread of its own) and the wall time. Every answer is checked to be
``200 accepted``. Under ``--callgrind`` only the measured callbacks are counted
(``callgrind_control`` is not needed: the harness toggles collection itself through
``valgrind``'s client request, when run under it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.app import create_app
from service.callbacks.signatures import sign
from service.config import Settings
from service.server.serve import YOUNG_THRESHOLD

sys.path.insert(0, str(ROOT / "bench"))

from run import KEY, running_body
from store_apply import submitted_jobs

JOBS = 200


class Callbacks:
    """Signed RUNNING callbacks, each body and webhook id new, round-robin over jobs."""

    def __init__(self, jobs: list[tuple[str, str]]) -> None:
        self._jobs = jobs
        self._sent = 0

    def next(self) -> tuple[dict[str, Any], bytes]:
        n = self._sent
        self._sent += 1
        job_id, upstream_id = self._jobs[n % len(self._jobs)]
        body = running_body(job_id, upstream_id, n).encode()
        headers = [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"elements-webhook-id", f"bench-{n}".encode()),
            (b"elements-webhook-signature", sign(KEY, body).encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": f"/callbacks/jobs/{job_id}",
            "raw_path": f"/callbacks/jobs/{job_id}".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        return scope, body


async def call(app: Any, scope: dict[str, Any], body: bytes) -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = sent[0]["status"]
    answer = json.loads(sent[1]["body"])
    if status != 200 or answer["status"] != "accepted":
        raise RuntimeError(f"callback answered {status} {answer}")


async def run(database: str, count: int, concurrency: int, callgrind: bool) -> dict[str, float]:
    settings = Settings.from_env(
        {"OC_SIGNATURE_KEYS": KEY, "BULKHOOK_DATABASE_URL": database, "BULKHOOK_LOG_FORMAT": "json"}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        store = app.components.store
        callbacks = Callbacks(await submitted_jobs(store, JOBS))

        async def batch(requests: list[tuple[dict[str, Any], bytes]]) -> None:
            await asyncio.gather(*[call(app, scope, body) for scope, body in requests])

        for _ in range(10):  # warm up: caches, statements, the first rounds
            await batch([callbacks.next() for _ in range(concurrency)])
        rounds = count // concurrency
        # Made beforehand: signing and encoding the requests is the sender's work.
        batches = [[callbacks.next() for _ in range(concurrency)] for _ in range(rounds)]
        # As ``bulkhook serve`` leaves the collector once the app has started.
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        if callgrind:
            toggle(True)
        cpu, wall = time.thread_time(), time.perf_counter()
        for requests in batches:
            await batch(requests)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if callgrind:
            toggle(False)
        done = rounds * concurrency
    return {"callbacks": done, "cpu_us": cpu / done * 1e6, "wall_us": wall / done * 1e6}


def toggle(on: bool) -> None:
    """Switch callgrind's collection on or off: ``callgrind_control`` asks the running
    valgrind, which answers while this process sleeps."""
    import os
    import subprocess

    asked = subprocess.Popen(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())])
    while asked.poll() is None:
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", metavar="URL", help="an empty PostgreSQL database")
    parser.add_argument("--callbacks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args()
    runs = []
    for _ in range(1 if args.callgrind else args.repeats):
        with tempfile.TemporaryDirectory(prefix="bulkhook-path-") as tmp:
            database = args.postgres or f"sqlite:///{tmp}/bulkhook.db"
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runs.append(
                    runner.run(run(database, args.callbacks, args.concurrency, args.callgrind))
                )
    cpu = [r["cpu_us"] for r in runs]
    wall = [r["wall_us"] for r in runs]
    print(
        f"{'PostgreSQL' if args.postgres else 'SQLite'}, {runs[0]['callbacks']:.0f} callbacks,"
        f" {args.concurrency} at a time: event-loop CPU per callback"
        f" {', '.join(f'{c:.1f}' for c in cpu)} µs (median {statistics.median(cpu):.1f});"
        f" wall {statistics.median(wall):.1f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
