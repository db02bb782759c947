"""Run every benchmark and print one table: `python bench/run.py [--quick]`.

Each figure is a ratio against a baseline measured in the same run (the machines are
shared and noisy), repeated to show the spread. Needs wrk and curl on the PATH.
"""

from __future__ import annotations

import argparse
import contextlib
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

from service.signatures import sign  # noqa: E402

KEY = "bench-signature-key"
CONTACTS = ROOT / "service" / "samples" / "contacts.csv"


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


def service_env(work: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        "OC_SIGNATURE_KEYS": KEY,
        "BULKHOOK_DATABASE_URL": extra.pop("database", f"sqlite:///{work}/bulkhook.db"),
        "BULKHOOK_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "BULKHOOK_LOG_FORMAT": "json",
        **extra,
    }


def bulkhook(*args: str) -> list[str]:
    return [sys.executable, "-m", "service", *args]


# -- 1. callback ingestion -------------------------------------------------------------


def wrk(url: str, body: bytes, connections: int, seconds: int) -> dict[str, float]:
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_SIGNATURE": sign(KEY, body)}
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(BENCH / "callback.lua"),
            url,
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


def bench_callbacks(
    work: Path, repeats: int, seconds: int, database: str | None = None
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
    ]
    env = service_env(work, service_port, **({"database": database} if database else {}))
    with process(bare, work), process(bulkhook("serve", "--port", str(service_port)), work, env):
        wait_for(
            f"http://127.0.0.1:{bare_port}/callbacks/jobs/x".replace("/callbacks/jobs/x", "/docs")
        )
        wait_for(f"http://127.0.0.1:{service_port}/healthz")
        service = f"http://127.0.0.1:{service_port}"
        with CONTACTS.open("rb") as handle:
            job = httpx.post(
                f"{service}/jobs", data={"object": "contact"}, files={"file": handle}, timeout=60
            ).json()
        body = json.dumps(
            {"id": job["upstream_id"], "status": "RUNNING", "recordsCount": 10}
        ).encode()
        bare_url = f"http://127.0.0.1:{bare_port}/callbacks/jobs/{job['id']}"
        service_url = f"{service}/callbacks/jobs/{job['id']}"
        wrk(bare_url, body, 64, 2)  # warm up both
        wrk(service_url, body, 64, 2)
        ratios, bare_runs, service_runs = [], [], []
        for _ in range(repeats):
            b = wrk(bare_url, body, 64, seconds)
            s = wrk(service_url, body, 64, seconds)
            bare_runs.append(b)
            service_runs.append(s)
            ratios.append(s["rps"] / b["rps"])
        half = statistics.median(r["rps"] for r in bare_runs) / 2
        # p99 at about half the bare endpoint's capacity: fewest connections reaching it.
        at_half = None
        for connections in (1, 2, 4, 8, 16):
            at_half = wrk(service_url, body, connections, seconds)
            if at_half["rps"] >= half:
                break
    return {
        "bare_rps": [round(r["rps"]) for r in bare_runs],
        "service_rps": [round(r["rps"]) for r in service_runs],
        "ratio": [round(r, 2) for r in ratios],
        "service_errors": sum(int(r["errors"]) for r in service_runs),
        "half_load_rps": round(at_half["rps"]) if at_half else None,
        "half_load_p99_ms": at_half["p99"] if at_half else None,
        "bare_p99_ms": [r["p99"] for r in bare_runs],
    }


# -- 2. store at scale -----------------------------------------------------------------


def fill_sqlite(path: Path, jobs: int) -> str:
    from service.store.sqlite import MIGRATIONS, _migrate  # noqa: F401 - builds the schema

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    from service.store import sqlite as store_sqlite

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
        )
        for n in range(jobs)
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, upstream_id, hub, object, path, filename, rows, state, upstream_status, records_count, records_failed_count, created_at, updated_at, last_source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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


def bench_store(work: Path, jobs: int) -> dict[str, object]:
    database = work / "million.db"
    started = time.monotonic()
    sample = fill_sqlite(database, jobs)
    filled = time.monotonic() - started
    port = free_port()
    env = service_env(work, port, database=f"sqlite:///{database}")
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


def bench_upload(work: Path, size: int) -> dict[str, object]:
    upload = work / "big.csv"
    make_csv(upload, size)
    sandbox_port, service_port = free_port(), free_port()
    sandbox = bulkhook(
        "sandbox", "--port", str(sandbox_port), "--job-seconds", "1", "--signature-key", KEY
    )
    env = service_env(
        work,
        service_port,
        OC_BASE_URL=f"http://127.0.0.1:{sandbox_port}/elements/api-v2",
        OC_USER_SECRET="u",
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
        direct, through = [], []
        for _ in range(2):
            started = time.monotonic()
            code = subprocess.run(direct_cmd, capture_output=True, text=True, check=True).stdout
            direct.append(time.monotonic() - started)
            assert code == "200", code
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
        "service_peak_rss_mib": round(rss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--only", choices=["callbacks", "store", "upload"], action="append")
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("curl"):
        print("bench needs wrk and curl (Debian packages wrk, curl)", file=sys.stderr)
        return 2
    only = set(args.only or ["callbacks", "store", "upload"])
    print(f"cores: {os.cpu_count()}; python {sys.version.split()[0]}")
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bulkhook-bench-") as tmp:
        work = Path(tmp)
        if "callbacks" in only:
            results["callbacks (SQLite)"] = bench_callbacks(
                work, 2 if args.quick else 3, 5 if args.quick else 10
            )
            pg = os.environ.get("BULKHOOK_BENCH_POSTGRES_URL")
            if pg:
                results["callbacks (PostgreSQL)"] = bench_callbacks(
                    work, 2, 5 if args.quick else 10, pg
                )
        if "store" in only:
            results["store"] = bench_store(work, 100_000 if args.quick else 1_000_000)
        if "upload" in only:
            results["upload"] = bench_upload(work, (64 << 20) if args.quick else (1 << 30))
    for name, figures in results.items():
        print(f"\n{name}")
        for key, value in figures.items():  # type: ignore[union-attr]
            print(f"  {key:<28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
