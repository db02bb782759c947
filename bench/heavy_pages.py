"""How long a huge failed-records table holds the service's event loop:
`python bench/heavy_pages.py [--rows 2000] [--columns 2000]`.

The sandbox runs as its own process (so its work never shares the service's
interpreter); the service runs in this process, on this event loop, with the
collector tuned as `bulkhook serve` tunes it, beside a probe that sleeps 5 ms at a
time and records how late each wake-up is (the loop's lag) and how much CPU this
thread spent meanwhile (the machine is shared: lateness includes time the process was
not scheduled at all). The job page's failed-records fragment (first and last page)
and the CSV download are fetched with curl, and for each the worst lag and the wall
time are printed. The same is then measured with the upstream read in pages of up to
200 records whatever their size, to show what the byte-sized pages buy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.app import create_app
from service.config import Settings
from service.dashboard import failed
from service.dashboard import routes as dashboard
from service.server.serve import YOUNG_THRESHOLD

KEY = "bench-signature-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LagProbe:
    """Sleeps 5 ms at a time on the loop; the worst lateness since the last reset, and
    the worst CPU time this thread spent in one such interval (the machine is shared:
    lateness includes time the process was not scheduled; CPU time does not)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_cpu = 0.0

    def reset(self) -> None:
        self.worst = self.worst_cpu = 0.0

    async def run(self) -> None:
        while True:
            started, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.perf_counter() - started - 0.005)
            self.worst_cpu = max(self.worst_cpu, time.thread_time() - cpu)


def write_wide_csv(path: Path, rows: int, columns: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write(",".join(["Email", *(f"c{j}" for j in range(1, columns))]) + "\r\n")
        filler = ",".join(["x"] * (columns - 3))
        for i in range(rows):
            out.write(f",first{i},{filler},last{i}\r\n")


@contextlib.contextmanager
def sandbox(port: int) -> Iterator[str]:
    command = [sys.executable, "-m", "service", "sandbox", "--port", str(port)]
    command += ["--signature-key", KEY, "--job-seconds", "0.2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(httpx.TransportError):
                httpx.get(url + "/_sandbox/stats")
                break
            time.sleep(0.05)
        yield url + "/elements/api-v2"
    finally:
        process.terminate()
        process.wait(10)


async def curl(url: str, out: Path) -> float:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        "curl", "-sf", "-o", str(out), url, stdout=subprocess.DEVNULL
    )
    if await process.wait() != 0:
        raise RuntimeError(f"curl {url} failed")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_wide_csv(work / "wide.csv", args.rows, args.columns)
        with sandbox(free_port()) as upstream:
            asyncio.run(measure(args, work, upstream))
    return 0


async def until(condition: Callable[[], Awaitable[bool]], every: float) -> None:
    for _ in range(100_000):
        if await condition():
            return
        await asyncio.sleep(every)


async def measure(args: argparse.Namespace, work: Path, upstream: str) -> None:
    wide = work / "wide.csv"
    port = free_port()
    settings = Settings(
        oc_base_url=upstream,
        oc_user_secret="u",
        oc_org_secret="o",
        oc_element_token="e",
        signature_keys=(KEY,),
        public_url=f"http://127.0.0.1:{port}",
        database_url=f"sqlite:///{work / 'bench.db'}",
    )
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    probe = LagProbe()
    probing = asyncio.create_task(probe.run())
    base = f"http://127.0.0.1:{port}"

    async def started() -> bool:
        return server.started

    await until(started, 0.01)
    # As `bulkhook serve` does once started: what lives as long as the process
    # is kept out of the collector's way.
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    submit = await asyncio.create_subprocess_exec(
        "curl", "-sf", "-o", str(work / "job.json"), "-w", "%{redirect_url}",
        "-F", "object=contact", "-F", f"file=@{wide};type=text/csv", f"{base}/jobs",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    await submit.communicate()
    job_id = (work / "job.json").read_text().split('"id":"')[1].split('"')[0]
    async with httpx.AsyncClient(base_url=base) as client:

        async def done() -> bool:
            state: str = (await client.get(f"/jobs/{job_id}")).json()["state"]
            return state == "COMPLETED"

        await until(done, 0.2)
    await asyncio.sleep(0.5)
    probe.reset()
    await asyncio.sleep(1.0)
    print(f"{args.rows} failed records x {args.columns + 2} columns")
    print(f"idle: worst loop lag {probe.worst * 1000:.1f} ms")
    last = -(-args.rows // dashboard.FAILED_PAGE)
    cases = [
        ("fragment, page 1", f"/ui/jobs/{job_id}/failed"),
        (f"fragment, page {last}", f"/ui/jobs/{job_id}/failed?page={last}"),
        ("CSV download", f"/ui/jobs/{job_id}/failed.csv"),
    ]
    default_bytes = failed.UPSTREAM_PAGE_BYTES
    for label, page_bytes in (
        (f"upstream pages of ~{default_bytes // 1024} KiB", default_bytes),
        ("upstream pages of 200 records", 1 << 40),
    ):
        failed.UPSTREAM_PAGE_BYTES = page_bytes
        print(label)
        for name, path in cases:
            probe.reset()
            wall = await curl(base + path, work / "out")
            size = (work / "out").stat().st_size
            print(
                f"  {name:<20} {wall:6.2f} s, {size / 1e6:6.1f} MB, "
                f"worst loop lag {probe.worst * 1000:6.1f} ms "
                f"(CPU {probe.worst_cpu * 1000:5.1f} ms)"
            )
    failed.UPSTREAM_PAGE_BYTES = default_bytes
    probing.cancel()
    server.should_exit = True
    await serving


if __name__ == "__main__":
    raise SystemExit(main())
