"""Download results: `python bench/downloads.py [--quick]`. Needs curl.

A result of about 1 GiB (64 MiB with ``--quick``): the CSV of the sandbox's ``generated``
object, whose records are computed from their index. The sandbox runs as a process of
its own (``bulkhook sandbox --generated-records N``) and ``bulkhook serve`` (SQLite,
its real uvicorn) has ``OC_BASE_URL`` pointed at it; each figure is set against a
baseline measured in the same run, on the same machine:

* fetch memory: the service's peak RSS (``VmHWM``) once it has fetched the results,
  against the target of 150 MiB (and its peak before the first fetch);
* fetch time: from the job's ``COMPLETED`` to its result ``stored``, against ``curl``
  of the same upstream file to ``/dev/null`` right after. Both ends are the service's
  own clock: the ``COMPLETED`` entry of the job's timeline, and the line the service
  logs once the stored result is recorded (``stored the result of job …``);
* serving: ``GET /jobs/{id}/result`` against a bare Starlette ``FileResponse`` of the
  same file ([`bare_file_app.py`](bare_file_app.py), uvicorn with the service's
  settings), both by ``curl`` to ``/dev/null``, alternating which goes first, several
  rounds; the ratio of each round, and their median.

Everything runs on loopback; files are removed at the end (``--keep`` leaves the work
directory). Bounded: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    BENCH,
    KEY,
    ROOT,
    STACKS,
    bulkhook,
    cpu_seconds,
    free_port,
    peak_rss_mib,
    wait_for,
)

from service.sandbox.exports import GENERATED_COLUMNS

AUTHORIZATION = "User u, Organization o, Element e"
RSS_TARGET_MIB = 150
FETCH_TARGET = 1.3
POLL = 0.1
SERVE_TARGET = 1.3
# Average length of the generated records' names, as the sandbox cycles through them.
_NAMES = 41 / 8 + 52 / 8


def csv_size(records: int) -> int:
    """About how many bytes the ``generated`` object's CSV of ``records`` rows holds:
    ``i,user{i}@example.com,First,Last,Company {i % 100}`` and CRLF per row."""
    size = len(",".join(GENERATED_COLUMNS)) + 2
    digits, low = 1, 1
    while low <= records:
        high = min(records, low * 10 - 1)
        # Two copies of the index, 30 fixed characters, the names, i % 100 (1.9 digits).
        size += round((high - low + 1) * (2 * digits + 30 + _NAMES + 1.9))
        digits, low = digits + 1, low * 10
    return size


def records_for(size: int) -> int:
    """The fewest records whose CSV holds at least ``size`` bytes."""
    low, high = 1, size
    while low < high:
        middle = (low + high) // 2
        if csv_size(middle) >= size:
            high = middle
        else:
            low = middle + 1
    return low


def vm_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def epoch(iso: str) -> float:
    """An API or log time (``2026-01-02T03:04:05.678Z``) in seconds since the epoch."""
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def started(
    args: list[str], cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A process with its own environment (no OC_/BULKHOOK_ from ours) logging to ``log``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    environment.update(env)
    environment.setdefault("PYTHONPATH", str(ROOT))
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=environment, stdout=out, stderr=out)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def curl(url: str, *headers: str, within: float) -> tuple[int, int, float, float]:
    """GET ``url`` to /dev/null, given up after ``within`` seconds: (status, bytes,
    seconds to the first byte and in all, as curl measured them)."""
    argv = ["curl", "-s", "--max-time", f"{max(within, 1):.0f}", "-o", "/dev/null", "-w"]
    argv.append("%{http_code} %{size_download} %{time_starttransfer} %{time_total}")
    for header in headers:
        argv += ["-H", header]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    code, size, first, seconds = out.split()
    return int(code), int(size), float(first), float(seconds)


@dataclass(frozen=True)
class Scheduled:
    """A process's seconds on a CPU and waiting in a run queue (all its threads)."""

    running: float
    waiting: float

    def __sub__(self, other: Scheduled) -> Scheduled:
        return Scheduled(self.running - other.running, self.waiting - other.waiting)

    def __str__(self) -> str:
        return f"{self.running:.1f} s on a CPU, {self.waiting:.1f} s waiting for one"


def scheduled(pid: int) -> Scheduled:
    """From /proc/<pid>/task/*/schedstat (nanoseconds running, waiting, slices)."""
    running = waiting = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            fields = (task / "schedstat").read_text().split()
            running += int(fields[0])
            waiting += int(fields[1])
    return Scheduled(running / 1e9, waiting / 1e9)


@dataclass
class Fetch:
    job_id: str
    sha256: str
    bytes: int
    records: int
    completed_at: float  # the timeline's COMPLETED entry
    stored_at: float  # the service's log line, once the stored result is recorded
    seen_stored_after: float  # by polling GET /jobs/{id}, from the COMPLETED entry
    # When the sandbox was first seen answering the download (polled), from COMPLETED.
    seen_started_after: float
    service_cpu: float  # CPU seconds the service spent from submit to stored
    direct: float  # curl of the same upstream file
    # The sandbox's time on a CPU and waiting for one while it sent the file to the
    # service (from the download seen begun to stored) and to curl.
    sandbox_fetch: Scheduled
    sandbox_curl: Scheduled

    @property
    def seconds(self) -> float:
        return self.stored_at - self.completed_at


@dataclass
class Figures:
    result_bytes: int = 0
    records: int = 0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_sampled_mib: float = 0.0
    fetches: list[Fetch] = field(default_factory=list)
    served: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    # Seconds to the first byte of each.
    served_first: list[float] = field(default_factory=list)
    bare_first: list[float] = field(default_factory=list)


class Bench:
    def __init__(self, work: Path, records: int, deadline: float, stack: str = "standard") -> None:
        self.work = work
        self.records = records
        self.deadline = deadline
        self.results = work / "results"
        self.service_log = work / "service.log"
        self.sandbox_port = free_port()
        self.service_port = free_port()
        self.service = f"http://127.0.0.1:{self.service_port}"
        self.sandbox = f"http://127.0.0.1:{self.sandbox_port}"
        self.figures = Figures()
        self.sandbox_pid = 0
        self.stack = stack

    @contextlib.contextmanager
    def servers(self) -> Iterator[int]:
        """The sandbox and the service; the service's pid."""
        sandbox_args = bulkhook(
            "sandbox",
            "--port",
            str(self.sandbox_port),
            "--job-seconds",
            "1",
            "--signature-key",
            KEY,
            "--generated-records",
            str(self.records),
        )
        env = {
            "OC_SIGNATURE_KEYS": KEY,
            "OC_BASE_URL": f"{self.sandbox}/elements/api-v2",
            "OC_USER_SECRET": "u",
            "OC_ORG_SECRET": "o",
            "OC_ELEMENT_TOKEN": "e",
            "BULKHOOK_DATABASE_URL": f"sqlite:///{self.work}/bulkhook.db",
            "BULKHOOK_PUBLIC_URL": self.service,
            "BULKHOOK_RESULTS_DIR": str(self.results),
            "BULKHOOK_LOG_FORMAT": "json",
            "BULKHOOK_HTTP": STACKS[self.stack][0],
            "BULKHOOK_LOOP": STACKS[self.stack][1],
        }
        with (
            started(sandbox_args, self.work, {}, self.work / "sandbox.log") as sandbox,
            started(
                bulkhook("serve", "--port", str(self.service_port)),
                self.work,
                env,
                self.service_log,
            ) as service,
        ):
            wait_for(f"{self.sandbox}/")
            wait_for(f"{self.service}/healthz")
            self.sandbox_pid = sandbox.pid
            yield service.pid

    def fetch(self, client: httpx.Client, pid: int) -> Fetch:
        """One download job, from submit to stored, then curl of its upstream file."""
        cpu = cpu_seconds(pid)
        downloads = self.downloads_started(client)
        response = client.post("/jobs", json={"object": "generated", "format": "csv"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        started_seen = None
        sandbox_before = scheduled(self.sandbox_pid)
        while True:
            assert time.monotonic() < self.deadline, "the fetch did not end in time"
            self.figures.rss_sampled_mib = max(self.figures.rss_sampled_mib, vm_rss_mib(pid))
            job = client.get(f"/jobs/{job_id}").json()
            # The sandbox is asked only until the service's download has begun.
            if started_seen is None and self.downloads_started(client) > downloads:
                started_seen = time.time()
                sandbox_before = scheduled(self.sandbox_pid)
            status = job["result"]["status"]
            assert job["state"] not in ("ERROR", "ABORTED", "CANCELLED", "SUBMIT_FAILED"), job
            if status == "failed":
                raise RuntimeError(f"the fetch failed: {job['result']}")
            if status == "stored":
                seen_stored = time.time()
                sandbox_fetch = scheduled(self.sandbox_pid)
                break
            # Not more often: each poll is work for the service's event loop too.
            time.sleep(POLL)
        cpu = cpu_seconds(pid) - cpu
        result = job["result"]
        completed = [e for e in job["events"] if e["state"] == "COMPLETED"]
        completed_at = epoch(completed[0]["at"])
        sandbox_fetch = sandbox_fetch - sandbox_before
        sandbox_before = scheduled(self.sandbox_pid)
        code, size, _, direct = curl(
            f"{self.sandbox}/elements/api-v2/hubs/marketing/bulk/{job['upstream_id']}/generated",
            f"Authorization: {AUTHORIZATION}",
            "Accept: text/csv",
            within=self.left(),
        )
        sandbox_curl = scheduled(self.sandbox_pid) - sandbox_before
        assert code == 200 and size == result["bytes"], (code, size, result)
        assert result["records"] == self.records, result
        return Fetch(
            job_id,
            result["sha256"],
            result["bytes"],
            result["records"],
            completed_at,
            self.stored_logged(job_id),
            seen_stored - completed_at,
            (started_seen or seen_stored) - completed_at,
            cpu,
            direct,
            sandbox_fetch,
            sandbox_curl,
        )

    def downloads_started(self, client: httpx.Client) -> int:
        stats = client.get(f"{self.sandbox}/_sandbox/stats").json()
        return int(stats["calls"].get("download", 0))

    def stored_logged(self, job_id: str) -> float:
        """When the service logged the job's result as stored (its own clock)."""
        for line in self.service_log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            entry: dict[str, Any] = json.loads(line)
            if entry.get("job_id") == job_id and entry["message"].startswith("stored the result"):
                return epoch(entry["ts"])
        raise RuntimeError(f"no 'stored' line for job {job_id} in the service's log")

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.monotonic()

    def sha256_of(self, url: str) -> str:
        argv = ["curl", "-sf", "--max-time", f"{max(self.left(), 1):.0f}", url]
        with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            digest = hashlib.sha256()
            while chunk := proc.stdout.read(1 << 20):
                digest.update(chunk)
        assert proc.returncode == 0, url
        return digest.hexdigest()

    def serve(self, job_id: str, sha256: str, rounds: int) -> None:
        """``GET /jobs/{id}/result`` against a bare FileResponse of the same file."""
        (path,) = self.results.glob(f"{job_id}.*")
        port = free_port()
        bare_args = [
            sys.executable,
            str(BENCH / "bare_file_app.py"),
            str(port),
            str(path),
            *STACKS[self.stack],
        ]
        with started(bare_args, self.work, {}, self.work / "bare.log"):
            bare = f"http://127.0.0.1:{port}/file"
            wait_for(bare)
            served = f"{self.service}/jobs/{job_id}/result"
            size = path.stat().st_size
            for url in (bare, served):  # warm both: the page cache, the connections
                assert curl(url, within=self.left())[:2] == (200, size), url
            assert self.sha256_of(served) == sha256, "the served bytes are not the result's"
            for round_ in range(rounds):
                assert time.monotonic() < self.deadline, "serving did not end in time"
                order = (served, bare) if round_ % 2 else (bare, served)
                times = {}
                for url in order:
                    code, got, first, seconds = curl(url, within=self.left())
                    assert (code, got) == (200, size), (url, code, got)
                    times[url] = (first, seconds)
                self.figures.served.append(times[served][1])
                self.figures.bare.append(times[bare][1])
                self.figures.served_first.append(times[served][0])
                self.figures.bare_first.append(times[bare][0])

    def run(self, repeats: int, rounds: int) -> Figures:
        self.results.mkdir(mode=0o700)
        with self.servers() as pid, httpx.Client(base_url=self.service, timeout=60) as client:
            self.figures.rss_before_mib = peak_rss_mib(pid)
            for _ in range(repeats):
                fetch = self.fetch(client, pid)
                self.figures.fetches.append(fetch)
                # Only the last result is served below: the others go, to spare the disk.
                if len(self.figures.fetches) > 1:
                    for path in self.results.glob(f"{self.figures.fetches[-2].job_id}.*"):
                        path.unlink()
            self.figures.rss_peak_mib = peak_rss_mib(pid)
            last = self.figures.fetches[-1]
            self.figures.result_bytes, self.figures.records = last.bytes, last.records
            self.serve(last.job_id, last.sha256, rounds)
        return self.figures


def ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.1f} ms"


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else f"missed by {value / target - 1:.0%}"


def table(figures: Figures) -> str:
    fetches = figures.fetches
    fetch_ratios = [f.seconds / f.direct for f in fetches]
    serve_ratios = [s / b for s, b in zip(figures.served, figures.bare, strict=True)]
    fetch_median = statistics.median(fetch_ratios)
    serve_median = statistics.median(serve_ratios)
    mib = figures.result_bytes / (1 << 20)
    rows = [
        ("figure", "measured", "baseline", "target"),
        (
            "fetch: service peak RSS (VmHWM)",
            f"{figures.rss_peak_mib:.0f} MiB (VmRSS sampled: {figures.rss_sampled_mib:.0f})",
            f"{figures.rss_before_mib:.0f} MiB before the first fetch",
            f"≤ {RSS_TARGET_MIB} MiB: {verdict(figures.rss_peak_mib, RSS_TARGET_MIB)}",
        ),
        (
            "fetch: COMPLETED → stored",
            ", ".join(f"{f.seconds:.2f}" for f in fetches) + " s",
            "curl: " + ", ".join(f"{f.direct:.2f}" for f in fetches) + " s",
            f"≤ {FETCH_TARGET}x: median {fetch_median:.2f} "
            f"({', '.join(f'{r:.2f}' for r in fetch_ratios)}): "
            f"{verdict(fetch_median, FETCH_TARGET)}",
        ),
        (
            "serve: GET /jobs/{id}/result",
            ", ".join(f"{s:.3f}" for s in figures.served) + " s",
            "bare FileResponse: " + ", ".join(f"{b:.3f}" for b in figures.bare) + " s",
            f"≤ {SERVE_TARGET}x: median {serve_median:.2f} "
            f"({', '.join(f'{r:.2f}' for r in serve_ratios)}): "
            f"{verdict(serve_median, SERVE_TARGET)}",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"result: {mib:.0f} MiB of CSV, {figures.records:,} records",
        *(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
            for row in rows
        ),
        f"fetch details (polled every {POLL * 1000:.0f} ms):",
        *(
            f"  {n}. the download seen begun {f.seen_started_after:.2f} s and stored "
            f"{f.seen_stored_after:.2f} s after COMPLETED (from begun to stored "
            f"{(f.seconds - f.seen_started_after) / f.direct:.2f}x curl); service CPU "
            f"{f.service_cpu:.1f} s ({f.service_cpu / mib * 1024:.1f} s/GiB); the sandbox "
            f"sending to the service: {f.sandbox_fetch}; to curl: {f.sandbox_curl}"
            for n, f in enumerate(fetches, 1)
        ),
        f"serve details: first byte after {ms(figures.served_first)} (service), "
        f"{ms(figures.bare_first)} (bare), median",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, fewer repeats")
    parser.add_argument("--mib", type=int, help="the result's size in MiB (default 1024, 64)")
    parser.add_argument("--repeats", type=int, help="fetches (default 3, 2 with --quick)")
    parser.add_argument("--rounds", type=int, help="serving rounds (default 9, 5)")
    parser.add_argument("--dir", type=Path, help="where the work directory goes")
    parser.add_argument("--keep", action="store_true", help="leave the work directory")
    parser.add_argument(
        "--stack",
        choices=[*STACKS, "both"],
        default="both",
        help="the server stack measured: standard (httptools, uvloop), h11, or both",
    )
    args = parser.parse_args()
    if not shutil.which("curl"):
        print("bench needs curl (Debian package curl)", file=sys.stderr)
        return 2
    size = (args.mib or (64 if args.quick else 1024)) << 20
    repeats = args.repeats or (2 if args.quick else 3)
    rounds = args.rounds or (5 if args.quick else 9)
    records = records_for(size)
    free = shutil.disk_usage(args.dir or tempfile.gettempdir()).free
    if free < 3 * size:
        print(f"bench needs {3 * size >> 20} MiB of free disk", file=sys.stderr)
        return 2
    import uvicorn

    print(
        f"cores: {os.cpu_count()}; python {sys.version.split()[0]}; uvicorn "
        f"{uvicorn.__version__}; {records:,} generated records (about {size >> 20} MiB of CSV)",
        flush=True,
    )
    # Generous: the sandbox makes the file at 15-20 MB/s on a slow machine, and each
    # repeat reads it twice.
    deadline = time.monotonic() + 300 + repeats * 4 * size / 5e6
    for stack in list(STACKS) if args.stack == "both" else [args.stack]:
        work = Path(tempfile.mkdtemp(prefix="bulkhook-bench-downloads-", dir=args.dir))
        try:
            figures = Bench(work, records, deadline, stack).run(repeats, rounds)
        finally:
            if args.keep:
                print(f"work directory kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        print(f"\nstack: {stack} ({' + '.join(STACKS[stack])})")
        print(table(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
