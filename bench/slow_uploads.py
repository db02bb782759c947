"""A flood of slow uploads: `python bench/slow_uploads.py [--clients 1000]`.

``bulkhook serve`` runs as a real process (embedded upstream, SQLite) on a loopback
port. ``--clients`` connections each start a 10 MB upload (``POST /jobs``) and then
send one byte a second, below the minimum rate, until the service cuts them. While
they are held open, signed callbacks and ``GET /healthz`` are sent one after the
other and timed. Once every slow client is gone: the service's sockets, its
connections by TCP state, the spool files left, and its CPU over the next 10 s.

With ``--leave-after N`` the slow clients hang up by themselves after N seconds,
before the service cuts them: what is left after is then what clients that leave
leave behind.

Bounded: the rate window is shortened (``--window``, 20 s) so the flood ends by
itself within about a minute; every wait has a deadline. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    CONTACTS,
    KEY,
    bulkhook,
    cpu_seconds,
    free_port,
    process,
    service_env,
    wait_for,
)

from service.callbacks.signatures import sign
from service.server.protocol import implementations

BOUNDARY = "slow-bench-boundary"
DECLARED = 10_000_000
JOBS = 20


def upload_head(port: int) -> bytes:
    preamble = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="object"\r\n\r\ncontact\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.csv"'
        "\r\nContent-Type: text/csv\r\n\r\nEmail,First,Last\r\n"
    ).encode()
    return (
        f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {DECLARED}\r\n\r\n"
    ).encode() + preamble


class Flood:
    """The slow clients, and what became of each."""

    def __init__(self, port: int, clients: int, deadline: float, leave: float | None) -> None:
        self.port, self.clients, self.deadline, self.leave = port, clients, deadline, leave
        self.open = 0
        self.outcomes: dict[str, int] = {}
        self.ended_after: list[float] = []

    async def one(self, started: asyncio.Event) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self._outcome("could not connect")
            started.set()
            return
        self.open += 1
        if self.open == self.clients:
            started.set()
        begun = time.monotonic()
        until = self.deadline
        if self.leave is not None:
            until = min(until, asyncio.get_running_loop().time() + self.leave)
        writer.write(upload_head(self.port))
        row = b"someone@example.com,Some,One\r\n"

        async def trickle() -> None:
            for index in range(DECLARED):
                await asyncio.sleep(1.0)
                writer.write(row[index % len(row) : index % len(row) + 1])
                await writer.drain()

        trickling = asyncio.ensure_future(trickle())
        answer = b""
        try:
            async with asyncio.timeout_at(until):
                while chunk := await reader.read(65536):
                    answer += chunk
            status = answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else ""
            self._outcome(f"answered {status}" if status else "closed without an answer")
        except TimeoutError:
            self._outcome("hung up" if until < self.deadline else "still open at the deadline")
        except OSError:
            self._outcome(f"closed with an answer {answer[9:12].decode()}" if answer else "reset")
        finally:
            self.ended_after.append(time.monotonic() - begun)
            self.open -= 1
            trickling.cancel()
            with contextlib.suppress(BaseException):
                await trickling
            writer.close()

    def _outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "count": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def held_sockets(pid: int, port: int) -> dict[str, dict[str, int]]:
    """The TCP sockets process ``pid`` holds a descriptor for, by state: its ends of
    its clients' connections (local port ``port``), and the rest (its upstream pools;
    the embedded upstream is the same process, its ends counted with the clients').
    A connection whose peer closed and the process never did is CLOSE_WAIT."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    counts: dict[str, dict[str, int]] = {"clients": {}, "pools": {}}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes and fields[3] != "0A":
                    side = "clients" if int(fields[1].rsplit(":", 1)[1], 16) == port else "pools"
                    name = TCP_STATES.get(fields[3], fields[3])
                    counts[side][name] = counts[side].get(name, 0) + 1
    return counts


async def run(
    clients: int, window: float, body_timeout: float, leave: float | None
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bulkhook-slow-") as tmp:
        work = Path(tmp)
        spool = work / "spool"
        spool.mkdir()
        port = free_port()
        env = service_env(
            work,
            port,
            BULKHOOK_UPLOAD_RATE_WINDOW=str(window),
            BULKHOOK_BODY_TIMEOUT=str(body_timeout),
            BULKHOOK_LOG_LEVEL="warning",
            TMPDIR=str(spool),  # where the service spools uploads
        )
        base = f"http://127.0.0.1:{port}"
        with process(bulkhook("serve", "--port", str(port)), work, env) as proc:
            wait_for(f"{base}/healthz")
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                callbacks = []
                for _ in range(JOBS):
                    with CONTACTS.open("rb") as handle:
                        answer = await http.post(
                            "/jobs", data={"object": "contact"}, files={"file": handle}
                        )
                    job = answer.json()
                    body = json.dumps(
                        {"id": job["upstream_id"], "status": "RUNNING", "recordsCount": 10}
                    ).encode()
                    callbacks.append((f"/callbacks/jobs/{job['id']}", body))
                await asyncio.sleep(1)
                before = held_sockets(proc.pid, port)

                bound = window + body_timeout + 60
                deadline = time.monotonic() + bound
                flood = Flood(port, clients, asyncio.get_running_loop().time() + bound, leave)
                started = asyncio.Event()
                tasks = [asyncio.ensure_future(flood.one(started)) for _ in range(clients)]
                await asyncio.wait_for(started.wait(), 60)
                held_open = flood.open
                timings: dict[str, list[float]] = {"callback": [], "healthz": []}
                failures = 0
                sent = 0
                while flood.open >= 0.9 * clients and time.monotonic() < deadline:
                    path, body = callbacks[sent % len(callbacks)]
                    headers = {
                        "Content-Type": "application/json",
                        "Elements-Webhook-Id": f"slow-bench-{sent}",
                        "Elements-Webhook-Signature": sign(KEY, body),
                    }
                    sent += 1
                    for kind, call in (
                        ("callback", http.post(path, content=body, headers=headers)),
                        ("healthz", http.get("/healthz")),
                    ):
                        begun = time.monotonic()
                        try:
                            answer = await call
                            failures += answer.status_code >= 300
                        except httpx.TransportError:
                            failures += 1
                        timings[kind].append(time.monotonic() - begun)
                    await asyncio.sleep(0.05)
                await asyncio.gather(*tasks)
            await asyncio.sleep(2)  # the service's last closes
            after: dict[str, object] = {
                "sockets_held_before": before,
                "sockets_held_after": held_sockets(proc.pid, port),
                "spool_files_after": len(list(spool.iterdir())),
            }
            before_cpu = cpu_seconds(proc.pid)
            await asyncio.sleep(10)
            after["cpu_percent_next_10s"] = round((cpu_seconds(proc.pid) - before_cpu) * 10, 2)
    cut = sorted(flood.ended_after)
    return {
        "slow_clients": clients,
        "held_open_at_once": held_open,
        "during_flood": {
            "callback": summary(timings["callback"]),
            "healthz": summary(timings["healthz"]),
            "non_2xx_or_failed": failures,
        },
        "slow_clients_ended": flood.outcomes,
        "ended_after_s": {"min": round(cut[0], 1), "max": round(cut[-1], 1)} if cut else {},
        "after": after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--window", type=float, default=20.0, help="BULKHOOK_UPLOAD_RATE_WINDOW")
    parser.add_argument("--body-timeout", type=float, default=60.0, help="BULKHOOK_BODY_TIMEOUT")
    parser.add_argument(
        "--leave-after", type=float, help="the slow clients hang up after this many seconds"
    )
    args = parser.parse_args()
    print(
        f"cores: {os.cpu_count()}; python {sys.version.split()[0]}; uvicorn"
        f" {uvicorn.__version__} ({implementations()[0]}, one worker)"
    )
    result = asyncio.run(run(args.clients, args.window, args.body_timeout, args.leave_after))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
