"""Run every benchmark and print one table: `python bench/run.py [--quick]`.

Each figure is a ratio against a baseline measured in the same run (the machines are
shared and noisy), repeated to show the spread. Needs wrk and curl on the PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

from service.callbacks.signatures import sign
from service.jobs import TERMINAL

KEY = "bench-signature-key"
CONTACTS = ROOT / "service" / "samples" / "contacts.csv"
# Callbacks are spread over this many jobs, as a real endpoint's would be.
CALLBACK_JOBS = 200
# Tried in turn for the p99 at half load, until one reaches it.
HALF_LOAD_CONNECTIONS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32)
# The server stacks measured: uvicorn's HTTP parser and event loop, for the service
# (BULKHOOK_HTTP, BULKHOOK_LOOP) and for every baseline server alike. "standard" is
# what a plain install runs (uvicorn[standard]); "h11" is uvicorn's pure-Python one.
STACKS = {"standard": ("httptools", "uvloop"), "h11": ("h11", "asyncio")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    environment.update(env or {})
    environment.setdefault("PYTHONPATH", str(ROOT))
    proc = subprocess.Popen(
        args, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def service_env(work: Path, port: int, stack: str = "standard", **extra: str) -> dict[str, str]:
    http, loop = STACKS[stack]
    return {
        "BULKHOOK_HTTP": http,
        "BULKHOOK_LOOP": loop,
        "OC_SIGNATURE_KEYS": KEY,
        "BULKHOOK_DATABASE_URL": extra.pop("database", f"sqlite:///{work}/bulkhook.db"),
        "BULKHOOK_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "BULKHOOK_LOG_FORMAT": "json",
        **extra,
    }


def bulkhook(*args: str) -> list[str]:
    return [sys.executable, "-m", "service", *args]


# -- 1. callback ingestion -------------------------------------------------------------


def wrk(base: str, targets: Targets, connections: int, seconds: int) -> dict[str, float]:
    threads = min(2, connections)
    env = {
        **os.environ,
        "BENCH_TARGETS": str(targets.fresh(seconds)),
        "BENCH_THREADS": str(threads),
    }
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(BENCH / "callback.lua"),
            base,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latencies = {}
    for pct, value, unit in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        latencies[pct] = float(value) * scale
    return {
        "rps": rps,
        "p50": latencies["50"],
        "p99": latencies["99"],
        "errors": int(errors.group(1)) if errors else 0,
    }


def running_body(job_id: str, upstream_id: str, n: int) -> str:
    """A ``RUNNING`` callback body for a job, made unique by a sequence number ``n``
    (the service takes a body it has seen for a job before as a repeat)."""
    return json.dumps(
        {
            "id": upstream_id,
            "callback-payload": job_id,
            "status": "RUNNING",
            "recordsCount": 10,
            "sequence": n,
        }
    )


class Targets:
    """Signed RUNNING callbacks for wrk, one job's own per line, each body different.

    The service takes a body it has seen before for a job as a duplicate whatever its
    webhook id, so every wrk run gets a file of bodies never sent before (a sequence
    number in each), enough for the fastest rate either endpoint reaches.
    """

    def __init__(self, service: str, work: Path, jobs: int) -> None:
        self._work = work
        self._jobs: list[tuple[str, str]] = []
        self._sent = 0
        with httpx.Client(base_url=service, timeout=60) as client:
            for _ in range(jobs):
                with CONTACTS.open("rb") as handle:
                    response = client.post(
                        "/jobs", data={"object": "contact"}, files={"file": handle}
                    )
                job = response.json()
                assert response.status_code == 202, response.text
                self._jobs.append((job["id"], job["upstream_id"]))

    @property
    def paths(self) -> list[str]:
        """Each job's own callback URL (its path)."""
        return [f"/callbacks/jobs/{job_id}" for job_id, _ in self._jobs]

    def fresh(self, seconds: int, rate: int = 15_000) -> Path:
        lines = []
        for n in range(self._sent, self._sent + seconds * rate + 2_000):
            job_id, upstream_id = self._jobs[n % len(self._jobs)]
            body = running_body(job_id, upstream_id, n)
            lines.append(f"/callbacks/jobs/{job_id}\t{sign(KEY, body.encode())}\t{body}\n")
        self._sent += len(lines)
        path = self._work / "callbacks.tsv"
        path.write_text("".join(lines))
        return path


def uvicorn_flags(stack: str) -> list[str]:
    """A baseline server's uvicorn options for ``stack``: the service's own stack."""
    http, loop = STACKS[stack]
    return ["--http", http, "--loop", loop]


def fdatasync_ms(work: Path, count: int = 200) -> dict[str, float]:
    """The disk's own commit latency: 64 KiB written and ``fdatasync``-ed, ``count``
    times, in the directory the database lives in (a callback's ``synchronous=FULL``
    commit waits for one such sync of the log)."""
    path = work / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for n in range(count):
            os.pwrite(fd, b"x" * 65536, (n % 16) * 65536)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {"p50": round(times[len(times) // 2], 2), "p99": round(times[len(times) * 99 // 100], 2)}


def bench_callbacks(
    work: Path,
    repeats: int,
    seconds: int,
    latency_seconds: int,
    database: str | None = None,
    stack: str = "standard",
) -> dict[str, object]:
    bare_port, service_port = free_port(), free_port()
    bare = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(BENCH),
        "bare_app:app",
        "--port",
        str(bare_port),
        "--no-access-log",
        "--log-level",
        "warning",
        *uvicorn_flags(stack),
    ]
    env = service_env(work, service_port, stack, **({"database": database} if database else {}))
    with process(bare, work), process(bulkhook("serve", "--port", str(service_port)), work, env):
        bare_url = f"http://127.0.0.1:{bare_port}"
        service_url = f"http://127.0.0.1:{service_port}"
        wait_for(f"{bare_url}/docs")
        wait_for(f"{service_url}/healthz")
        targets = Targets(service_url, work, CALLBACK_JOBS)
        wrk(bare_url, targets, 64, 2)  # warm up both
        wrk(service_url, targets, 64, 2)
        ratios, bare_runs, service_runs = [], [], []
        for repeat in range(repeats):
            # Alternate which goes first, so a drift in the machine's speed favours neither.
            order = (service_url, bare_url) if repeat % 2 else (bare_url, service_url)
            runs = {url: wrk(url, targets, 64, seconds) for url in order}
            b, s = runs[bare_url], runs[service_url]
            bare_runs.append(b)
            service_runs.append(s)
            ratios.append(s["rps"] / b["rps"])
        half = statistics.median(r["rps"] for r in bare_runs) / 2
        # p99 at about half the bare endpoint's capacity: fewest connections reaching it.
        # The steps are fine because latency grows with connections: doubling them
        # could double the load past half and measure the p99 of a busier service.
        at_half, connections = None, 0
        for connections in HALF_LOAD_CONNECTIONS:
            at_half = wrk(service_url, targets, connections, latency_seconds)
            if at_half["rps"] >= half:
                break
        disk = fdatasync_ms(work)
    return {
        "bare_rps": [round(r["rps"]) for r in bare_runs],
        "service_rps": [round(r["rps"]) for r in service_runs],
        "ratio": [round(r, 2) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 2),
        "service_errors": sum(int(r["errors"]) for r in service_runs),
        "half_load_rps": round(at_half["rps"]) if at_half else None,
        "half_load_connections": connections,
        "half_load_p99_ms": at_half["p99"] if at_half else None,
        "bare_p99_ms": [r["p99"] for r in bare_runs],
        "disk_fdatasync_ms": disk,
    }


# -- 1b. callbacks under a flood of forged ones ------------------------------------------

# Connections of the forging wrk: as many as the genuine callbacks' wrk has.
FORGED_CONNECTIONS = 64


def forged_wrk(base: str, paths: Path, connections: int, seconds: int) -> subprocess.Popen[str]:
    """A wrk process sending forged callbacks (``forged.lua``) for ``seconds``."""
    env = {**os.environ, "BENCH_FORGED": str(paths)}
    return subprocess.Popen(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "forged.lua"),
            base,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def rejected(database: Path) -> tuple[int, int]:
    """(rows, their repeats summed) in ``rejected_callbacks``."""
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as conn:
        rows, repeats = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(repeats), 0) FROM rejected_callbacks"
        ).fetchone()
    return int(rows), int(repeats)


def bench_flood(
    work: Path, repeats: int, seconds: int, stack: str = "standard"
) -> dict[str, object]:
    """Genuine callbacks alone, then with a flood of forged ones at the same time."""
    port = free_port()
    database = work / "flood.db"
    env = service_env(work, port, stack, database=f"sqlite:///{database}")
    # BENCH_REFUSAL_DELAY=0 measures the flood without pacing, for comparison.
    if (delay := os.environ.get("BENCH_REFUSAL_DELAY")) is not None:
        env["BULKHOOK_REFUSAL_DELAY"] = delay
    with process(bulkhook("serve", "--port", str(port)), work, env):
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/healthz")
        targets = Targets(url, work, CALLBACK_JOBS)
        paths = work / "forged.txt"
        paths.write_text("".join(f"{path}\n" for path in targets.paths))
        wrk(url, targets, 64, 2)  # warm up
        alone, flooded, ratios, forged_rps = [], [], [], []
        rows_per_s, repeats_per_s = [], []
        statuses: dict[str, int] = {}
        for repeat in range(repeats):
            order = ("flood", "alone") if repeat % 2 else ("alone", "flood")
            runs: dict[str, dict[str, float]] = {}
            for kind in order:
                if kind == "alone":
                    runs[kind] = wrk(url, targets, 64, seconds)
                    continue
                # The flood starts a second early, so its answers are paced already.
                before, started = rejected(database), time.monotonic()
                forger = forged_wrk(url, paths, FORGED_CONNECTIONS, seconds + 2)
                time.sleep(1)
                runs[kind] = wrk(url, targets, 64, seconds)
                out, _ = forger.communicate()
                took = time.monotonic() - started
                time.sleep(1.5)  # the last second's summary rows are written
                after = rejected(database)
                rows_per_s.append(round((after[0] - before[0]) / took, 1))
                repeats_per_s.append(round((after[1] - before[1]) / took, 1))
                found = re.search(r"Requests/sec:\s+([\d.]+)", out)
                forged_rps.append(round(float(found.group(1)), 1) if found else 0.0)
                for status, count in re.findall(r"^status (\d+) (\d+)$", out, re.MULTILINE):
                    statuses[status] = statuses.get(status, 0) + int(count)
            alone.append(runs["alone"])
            flooded.append(runs["flood"])
            ratios.append(runs["flood"]["rps"] / runs["alone"]["rps"])
    return {
        "legit_rps_alone": [round(r["rps"]) for r in alone],
        "legit_rps_with_flood": [round(r["rps"]) for r in flooded],
        "ratio": [round(r, 2) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 2),
        "legit_errors": sum(int(r["errors"]) for r in alone + flooded),
        "forged_connections": FORGED_CONNECTIONS,
        "forged_rps": forged_rps,
        "forged_statuses": dict(sorted(statuses.items())),
        "rejected_rows_per_s": rows_per_s,
        "rejected_repeats_per_s": repeats_per_s,
    }


# -- 2. store at scale -----------------------------------------------------------------


def fill_sqlite(path: Path, jobs: int) -> str:

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    from service.store.sqlite import store as store_sqlite

    store_sqlite._migrate(conn)
    states = ["COMPLETED"] * 6 + ["RUNNING", "CREATED", "ERROR", "CANCELLED"]
    now = time.time()
    rows = (
        (
            f"{int((now - jobs + n) * 1000):012x}{n:012x}",
            f"u{n}",
            "marketing",
            "contact",
            "/c.csv",
            "c.csv",
            10,
            states[n % 10],
            states[n % 10],
            10,
            0,
            now - jobs + n,
            now - jobs + n,
            "poll",
            # Jobs still running are due for a poll in the next hour, except 100 due now.
            None if states[n % 10] in TERMINAL else now + (n % 3600 if n > 10_000 else -1),
        )
        for n in range(jobs)
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, upstream_id, hub, object, path, filename, rows, state, upstream_status, records_count, records_failed_count, created_at, updated_at, last_source, next_poll_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    sample = f"{int((now - jobs + jobs // 2) * 1000):012x}{jobs // 2:012x}"
    conn.executemany(
        "INSERT INTO events (job_id, at, source, state, detail) VALUES (?,?,?,?,?)",
        [(sample, now, "poll", "COMPLETED", "upstream says COMPLETED")] * 5,
    )
    conn.execute("COMMIT")
    conn.close()
    return sample


def claim_due_ms(database: Path) -> tuple[float, int]:
    """The poller's claim query on the full store: (median ms, due jobs it found)."""
    from service.store.sqlite.store import CLAIM_DUE

    conn = sqlite3.connect(database)
    times, found = [], 0
    for _ in range(200):
        now = time.time()
        started = time.perf_counter()
        found = len(conn.execute(CLAIM_DUE, (now, now, 100)).fetchall())
        times.append((time.perf_counter() - started) * 1000)
    conn.close()
    return round(statistics.median(times), 3), found


def timed_gets(url: str, count: int) -> list[float]:
    times = []
    with httpx.Client(timeout=30) as client:
        client.get(url)
        for _ in range(count):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return times


def bench_store(work: Path, jobs: int, stack: str = "standard") -> dict[str, object]:
    database = work / "million.db"
    started = time.monotonic()
    sample = fill_sqlite(database, jobs)
    filled = time.monotonic() - started
    claim = claim_due_ms(database)
    port = free_port()
    env = service_env(work, port, stack, database=f"sqlite:///{database}")
    with process(bulkhook("serve", "--port", str(port)), work, env):
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/healthz")
        health = statistics.median(timed_gets(f"{base}/healthz", 200))
        listing = statistics.median(timed_gets(f"{base}/jobs?state=RUNNING&limit=100", 200))
        one = statistics.median(timed_gets(f"{base}/jobs/{sample}", 200))
    return {
        "jobs": jobs,
        "fill_seconds": round(filled, 1),
        "healthz_median_ms": round(health, 2),
        "list_running_100_median_ms": round(listing, 2),
        "get_job_median_ms": round(one, 2),
        "poller_claim_query_median_ms": claim[0],
        "poller_claim_query_due_jobs": claim[1],
        "list_ratio_to_healthz": round(listing / health, 1),
        "get_ratio_to_healthz": round(one / health, 1),
    }


# -- 3. upload -------------------------------------------------------------------------


def make_csv(path: Path, size: int) -> None:
    line = b"someone.with.a.long.name@example.com,Firstname,Lastname,Some Title,(555) 555-1234,Company,http://www.example.com\n"
    block = line * (1 << 20 // len(line) + 1)
    with path.open("wb") as out:
        out.write(
            b"C_EmailAddress,C_FirstName,C_LastName,C_Title,C_BusPhone,C_Company,C_Website1\n"
        )
        written = 0
        while written < size:
            out.write(block)
            written += len(block)


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def bench_upload(work: Path, size: int, repeats: int, stack: str = "standard") -> dict[str, object]:
    upload = work / "big.csv"
    make_csv(upload, size)
    os.sync()  # a fresh 1 GiB of dirty pages would be written back during the uploads
    sandbox_port, service_port = free_port(), free_port()
    sandbox = bulkhook(
        "sandbox", "--port", str(sandbox_port), "--job-seconds", "1", "--signature-key", KEY
    )
    env = service_env(
        work,
        service_port,
        stack,
        OC_BASE_URL=f"http://127.0.0.1:{sandbox_port}/elements/api-v2",
        OC_USER_SECRET="u",
        OC_ORG_SECRET="o",
        OC_ELEMENT_TOKEN="e",
        BULKHOOK_MAX_UPLOAD_BYTES=str(4 << 30),
    )
    with (
        process(sandbox, work),
        process(bulkhook("serve", "--port", str(service_port)), work, env) as service,
    ):
        wait_for(f"http://127.0.0.1:{sandbox_port}/")
        wait_for(f"http://127.0.0.1:{service_port}/healthz")
        direct_cmd = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Authorization: User u",
            "-F",
            f"file=@{upload}",
            f"http://127.0.0.1:{sandbox_port}/elements/api-v2/hubs/marketing/bulk/contact?path=/big.csv",
        ]
        service_cmd = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-F",
            "object=contact",
            "-F",
            f"file=@{upload}",
            f"http://127.0.0.1:{service_port}/jobs",
        ]
        stats = f"http://127.0.0.1:{sandbox_port}/_sandbox/stats"

        def quiet_sandbox() -> None:
            # The sandbox reads each uploaded file once more to run its job; start the
            # next upload only when it is done, so every upload meets the same machine.
            while True:
                running = httpx.get(stats, timeout=30).json()["jobs_by_status"]
                if not set(running) - {"COMPLETED", "ERROR", "ABORTED", "CANCELLED"}:
                    return
                time.sleep(0.5)

        # One unmeasured round first: both servers' first large upload pays for warming
        # up (allocator arenas, connections, the page cache).
        for command in (direct_cmd, service_cmd):
            quiet_sandbox()
            subprocess.run(command, capture_output=True, check=True)
        direct, through = [], []
        for _ in range(repeats):
            quiet_sandbox()
            started = time.monotonic()
            code = subprocess.run(direct_cmd, capture_output=True, text=True, check=True).stdout
            direct.append(time.monotonic() - started)
            assert code == "200", code
            quiet_sandbox()
            started = time.monotonic()
            code = subprocess.run(service_cmd, capture_output=True, text=True, check=True).stdout
            through.append(time.monotonic() - started)
            assert code == "202", code
        rss = peak_rss_mib(service.pid)
    upload.unlink()
    return {
        "size_mib": round(size / (1 << 20)),
        "direct_seconds": [round(t, 1) for t in direct],
        "service_seconds": [round(t, 1) for t in through],
        "ratio": [round(b / a, 2) for a, b in zip(direct, through, strict=True)],
        "ratio_median": round(
            statistics.median(b / a for a, b in zip(direct, through, strict=True)), 2
        ),
        "service_peak_rss_mib": round(rss),
    }


# -- 4. poller at scale -----------------------------------------------------------------


def metric(text: str, name: str, label: str) -> float:
    # Any other labels (the connector instance) may follow the one looked for.
    found = re.search(rf'^{name}{{[^}}]*"{label}"[^}}]*}} ([\d.e+]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def submit_all(service: str, jobs: int, concurrency: int = 16) -> None:
    import asyncio

    payload = CONTACTS.read_bytes()
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=service, timeout=120) as client:

        async def one() -> None:
            async with sem:
                response = await client.post(
                    "/jobs", data={"object": "contact"}, files={"file": ("c.csv", payload)}
                )
                assert response.status_code == 202, response.text

        await asyncio.gather(*(one() for _ in range(jobs)))


def bench_poller(work: Path, jobs: int, rate: int, stack: str = "standard") -> dict[str, object]:
    """Every callback dropped: each job must finish by polling, within the rate budget."""
    sandbox_port, service_port = free_port(), free_port()
    sandbox = bulkhook(
        "sandbox",
        "--port",
        str(sandbox_port),
        "--job-seconds",
        "2",
        "--drop-callbacks",
        "1",
        "--signature-key",
        KEY,
    )
    database = work / "poller.db"
    env = service_env(
        work,
        service_port,
        stack,
        database=f"sqlite:///{database}",
        OC_BASE_URL=f"http://127.0.0.1:{sandbox_port}/elements/api-v2",
        OC_USER_SECRET="u",
        OC_ORG_SECRET="o",
        OC_ELEMENT_TOKEN="e",
        BULKHOOK_CALLBACK_GRACE="1",
        BULKHOOK_POLL_INTERVAL="1",
        BULKHOOK_POLL_MAX_INTERVAL="4",
        BULKHOOK_POLL_RATE=str(rate),
    )
    sandbox_stats = f"http://127.0.0.1:{sandbox_port}/_sandbox/stats"
    service = f"http://127.0.0.1:{service_port}"
    with (
        process(sandbox, work),
        process(bulkhook("serve", "--port", str(service_port)), work, env) as proc,
    ):
        wait_for(sandbox_stats)
        wait_for(f"{service}/healthz")
        started = time.monotonic()
        submitter = subprocess.Popen(  # its own process: its CPU is not the service's
            [sys.executable, __file__, "--submit", service, str(jobs)], cwd=work
        )
        samples: list[tuple[float, int]] = []
        converged_after = None
        deadline = started + 600
        while time.monotonic() < deadline:
            time.sleep(1)
            calls = httpx.get(sandbox_stats).json()["calls"].get("status", 0)
            samples.append((time.monotonic(), calls))
            if submitter.poll() is None:
                continue
            done = metric(httpx.get(f"{service}/metrics").text, "bulkhook_jobs", "COMPLETED")
            if done >= jobs:
                converged_after = time.monotonic() - started
                break
        submitter.wait(60)
        # Nothing due any more: what does the service cost while it waits?
        time.sleep(2)
        before = cpu_seconds(proc.pid)
        time.sleep(10)
        idle_cpu = (cpu_seconds(proc.pid) - before) / 10
        states = httpx.get(f"{service}/metrics").text
        busiest = httpx.get(sandbox_stats).json()["status_calls_busiest_second"]
    rates = [(c2 - c1) / (t2 - t1) for (t1, c1), (t2, c2) in itertools.pairwise(samples)]
    from service.store.sqlite.store import CLAIM_DUE

    conn = sqlite3.connect(database)
    plan = conn.execute(f"EXPLAIN QUERY PLAN {CLAIM_DUE}", (time.time(), time.time(), 100))
    plan_text = "; ".join(row[-1] for row in plan)
    conn.close()
    return {
        "jobs": jobs,
        "poll_rate_budget": rate,
        "status_calls": samples[-1][1] if samples else 0,
        "status_calls_busiest_second": busiest,
        "status_calls_per_s_median": round(statistics.median(rates), 1) if rates else None,
        "completed": int(metric(states, "bulkhook_jobs", "COMPLETED")),
        "converged_seconds": round(converged_after, 1) if converged_after else None,
        "idle_cpu_percent": round(idle_cpu * 100, 2),
        "claim_query_plan": plan_text,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument(
        "--only",
        choices=["callbacks", "flood", "poller", "store", "upload"],
        action="append",
    )
    parser.add_argument(
        "--stack",
        choices=[*STACKS, "both"],
        default="both",
        help="the server stack measured: standard (httptools, uvloop), h11, or both",
    )
    parser.add_argument("--submit", nargs=2, metavar=("URL", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.submit:  # the poller benchmark's submitter, run as a process of its own
        import asyncio

        asyncio.run(submit_all(args.submit[0], int(args.submit[1])))
        return 0
    if not shutil.which("wrk") or not shutil.which("curl"):
        print("bench needs wrk and curl (Debian packages wrk, curl)", file=sys.stderr)
        return 2
    only = set(args.only or ["callbacks", "flood", "poller", "store", "upload"])
    stacks = list(STACKS) if args.stack == "both" else [args.stack]
    import uvicorn

    print(
        f"cores: {os.cpu_count()}; python {sys.version.split()[0]}; uvicorn "
        f"{uvicorn.__version__}, one worker; stacks: "
        + ", ".join(f"{name} ({' + '.join(STACKS[name])})" for name in stacks)
    )
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bulkhook-bench-") as tmp:
        work = Path(tmp)
        for stack in stacks:
            # A directory of its own per stack: its databases start empty.
            (work / stack).mkdir()
            run_stack(work / stack, only, stack, args.quick, results)
    for name, figures in results.items():
        print(f"\n{name}")
        for key, value in figures.items():  # type: ignore[union-attr]
            print(f"  {key:<28} {value}")
    return 0


def run_stack(
    work: Path, only: set[str], stack: str, quick: bool, results: dict[str, object]
) -> None:
    """Every chosen benchmark on one server stack, its figures named after it."""
    if "callbacks" in only:
        # Many short pairs: the bare and service runs of a pair are seconds apart,
        # so a shared machine's speed (seen to drift by 15 % within a minute) is
        # the same for both.
        pairs = dict(seconds=2, latency_seconds=4) if quick else dict(seconds=3, latency_seconds=8)
        results[f"callbacks (SQLite, {stack})"] = bench_callbacks(
            work, repeats=4 if quick else 15, stack=stack, **pairs
        )
        pg = os.environ.get("BULKHOOK_BENCH_POSTGRES_URL")
        if pg:
            results[f"callbacks (PostgreSQL, {stack})"] = bench_callbacks(
                work, repeats=4 if quick else 9, database=pg, stack=stack, **pairs
            )
    if "flood" in only:
        results[f"flood (SQLite, {stack})"] = bench_flood(
            work, repeats=3 if quick else 6, seconds=2 if quick else 3, stack=stack
        )
    if "poller" in only:
        results[f"poller ({stack})"] = bench_poller(
            work, 1_000 if quick else 10_000, 100 if quick else 200, stack
        )
    if "store" in only:
        results[f"store ({stack})"] = bench_store(work, 100_000 if quick else 1_000_000, stack)
    if "upload" in only:
        results[f"upload ({stack})"] = bench_upload(
            work, (64 << 20) if quick else (1 << 30), 2 if quick else 5, stack
        )


if __name__ == "__main__":
    sys.exit(main())
