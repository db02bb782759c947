"""The store's callback path on its own: event-loop CPU per ``Store.apply``.

    python bench/store_apply.py                                    # SQLite (a temporary file)
    python bench/store_apply.py --url postgresql://postgres@127.0.0.1/bench
    python bench/store_apply.py --url ... --applies 20000 --concurrency 48 --repeat 3

``--jobs`` jobs are created (each with an upstream id, as after its submit), then
``--concurrency`` callers each apply signed-callback-like ``RUNNING`` observations in
turn, round-robin over the jobs, each with a fresh webhook id and body digest and the
claim a callback body carries: what ``callbacks.receiving`` hands the store for a
callback at a job's URL. No HTTP, no verification: only the store. Prints, per run,
the event loop thread's CPU time (``time.thread_time``) per apply, the wall time per
apply and the mean round size; on PostgreSQL also the CPU time its server processes
serving this database spent per apply, when they run on this machine (``/proc``). On
PostgreSQL the run uses a schema of its own, dropped at the end; the database needs no
other preparation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from service.jobs import Job, Observation, Source, State, new_job_id
from service.store import Store, open_store
from service.store.base import Claim, Delivery


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    """The URL to open: a temporary SQLite file, or a fresh schema in ``url``."""
    if url is None:
        with tempfile.TemporaryDirectory() as work:
            yield f"sqlite:///{Path(work) / 'bench.db'}"
        return
    if not url.startswith(("postgresql://", "postgres://")):
        yield url
        return
    import psycopg
    from psycopg import sql

    schema = sql.Identifier(f"bench_{secrets.token_hex(4)}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    try:
        joiner = "&" if "?" in url else "?"
        yield f"{url}{joiner}options=-csearch_path%3D{schema.as_string()}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))


@contextlib.asynccontextmanager
async def _opened(url: str) -> AsyncIterator[Store]:
    store = open_store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def submitted_jobs(store: Store, count: int) -> list[tuple[str, str]]:
    """``count`` submitted jobs: (job id, upstream id)."""
    made = []
    for n in range(count):
        now = time.time()
        job = Job(
            id=new_job_id(),
            hub="marketing",
            object="contact",
            path="/contacts.csv",
            state=State.SUBMITTING,
            created_at=now,
            updated_at=now,
            last_source="submit",
            filename="contacts.csv",
            rows=10,
        )
        created, _ = await store.create_job(job)
        upstream_id = str(1000 + n)
        submitted = Observation(Source.SUBMIT, status="CREATED", raw_status="CREATED", at=now)
        await store.apply(created.id, submitted, upstream_id=upstream_id, next_poll_at=now + 60)
        made.append((created.id, upstream_id))
    return made


async def _callback(store: Store, job_id: str, upstream_id: str, n: int) -> None:
    now = time.time()
    observation = Observation.of(
        Source.CALLBACK,
        status="RUNNING",
        raw_status="RUNNING",
        records_count=10,
        records_failed_count=None,
        detail="",
        at=now,
    )
    digest = hashlib.sha256(secrets.token_bytes(16)).hexdigest()  # a body never sent before
    applied = await store.apply(
        job_id,
        observation,
        delivery=Delivery(f"hook-{n}-{secrets.token_hex(4)}", now, job_id, digest),
        next_poll_at=now + 5.0,
        claim=Claim(job_id, upstream_id),
    )
    assert applied is not None and not (applied.duplicate or applied.refused or applied.waiting)


async def _run(store: Store, jobs: list[tuple[str, str]], applies: int, concurrency: int) -> None:
    turns = iter(range(applies))

    async def caller() -> None:
        for n in turns:
            job_id, upstream_id = jobs[n % len(jobs)]
            await _callback(store, job_id, upstream_id, n)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


def _server_cpu(url: str) -> float | None:
    """Seconds of CPU used so far by the server processes serving ``url``'s database
    (but this one's), or None when they cannot be seen (another machine, no ``/proc``)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        pids = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    ticks = 0
    try:
        for (pid,) in pids:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    except (FileNotFoundError, PermissionError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def _rounds(store: Store) -> list[int]:
    """Every round's size, recorded by wrapping PostgreSQL's round runner (SQLite's
    rounds are its writer's, not counted)."""
    sizes: list[int] = []
    rounds = getattr(store, "_applies", None)
    if rounds is not None:
        run = rounds._run

        async def counted(items: list[object]) -> object:
            sizes.append(len(items))
            return await run(items)

        rounds._run = counted
    return sizes


async def main(args: argparse.Namespace) -> None:
    with _database(args.url) as url:
        async with _opened(url) as store:
            jobs = await submitted_jobs(store, args.jobs)
            await _run(store, jobs, min(args.applies, 2_000), args.concurrency)  # warm-up
            sizes = _rounds(store)
            cpu = []
            for _ in range(args.repeat):
                del sizes[:]
                server = await asyncio.to_thread(_server_cpu, url)
                started, started_cpu = time.perf_counter(), time.thread_time()
                await _run(store, jobs, args.applies, args.concurrency)
                used = time.thread_time() - started_cpu
                wall = time.perf_counter() - started
                server_after = await asyncio.to_thread(_server_cpu, url)
                cpu.append(used / args.applies * 1e6)
                extra = f", {statistics.mean(sizes):.1f} applies a round" if sizes else ""
                if server is not None and server_after is not None:
                    extra += f"; server CPU {(server_after - server) / args.applies * 1e6:.1f} µs"
                print(
                    f"{url.split(':', 1)[0]}: {args.applies} applies, {args.concurrency} at a"
                    f" time: {cpu[-1]:.1f} µs event-loop CPU and"
                    f" {wall / args.applies * 1e6:.1f} µs wall per apply{extra}"
                )
            print(f"median: {statistics.median(cpu):.1f} µs event-loop CPU per apply")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a PostgreSQL URL (default: a temporary SQLite file)")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--applies", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--asyncio", action="store_true", help="asyncio's loop, not uvloop")
    arguments = parser.parse_args()
    if arguments.asyncio:
        asyncio.run(main(arguments))
    else:
        import uvloop

        uvloop.run(main(arguments))
