"""Where uploads are spooled: a directory each running app owns and locks, swept of dead
apps' files at start-up; and a full disk, which answers 507 and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.uploads.spool import SpoolDirectory

from .helpers import StartSandbox, StartService, eventually, free_port, wait_healthy

BOUNDARY = "spool-test-boundary"
ROW = b"someone@example.com,Someone Withalongername,Example Company Limited\r\n"


def csv_bytes(size: int) -> bytes:
    header = b"Email,Name,Company\r\n"
    return header + ROW * (size // len(ROW) + 1)


def spooled(root: Path) -> list[Path]:
    """The upload files under ``root``, whichever app they belong to."""
    return sorted(root.glob("*/bulkhook-upload-*"))


@contextlib.contextmanager
def serve_process(
    tmp_path: Path, port: int, preexec_fn: Callable[[], None] | None = None, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``bulkhook serve`` on embedded defaults, ready to take requests; ``preexec_fn``
    runs in its process before it starts (to set a limit, say)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    environment.update(BULKHOOK_DATABASE_URL=f"sqlite:///{tmp_path / 'served.db'}", **env)
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=environment,
        preexec_fn=preexec_fn,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, within=30)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def start_upload(port: int, data: bytes, declared: int) -> socket.socket:
    """A POST /jobs whose body is only partly sent: the rest never comes."""
    preamble = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="object"\r\n\r\ncontact\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    head = (
        f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(head + preamble + data)
    return client


def test_a_killed_process_leaves_its_spool_and_the_next_start_removes_it_only(
    tmp_path: Path, start_sandbox: StartSandbox, start_service: StartService
) -> None:
    root = tmp_path / "spool"
    live = start_service(start_sandbox(), spool_dir=str(root))
    live_dir = live.components.spool.path
    assert live_dir.parent == root
    in_progress = live_dir / "bulkhook-upload-in-progress.csv"
    in_progress.write_bytes(b"Email\r\n")  # an upload the live app is receiving

    port = free_port()
    with serve_process(tmp_path, port, BULKHOOK_SPOOL_DIR=str(root)) as process:
        client = start_upload(port, csv_bytes(3 << 20), declared=64 << 20)
        eventually(
            lambda: any(p.parent != live_dir and p.stat().st_size for p in spooled(root)), 30
        )
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        client.close()
    left = [p for p in spooled(root) if p.parent != live_dir]
    assert left, "kill -9 leaves the dead process's upload behind"

    restarted = start_service(start_sandbox(), spool_dir=str(root))
    assert not any(path.exists() for path in left)
    assert not left[0].parent.exists()
    assert in_progress.read_bytes() == b"Email\r\n"  # the live app's file is untouched
    assert {p.name for p in root.iterdir()} == {live_dir.name, restarted.components.spool.path.name}
    assert live.http.get("/healthz").status_code == 200


def test_an_app_that_stops_removes_its_spool_directory(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    first = SpoolDirectory.claim(root)
    second = SpoolDirectory.claim(root)
    assert first.path != second.path
    assert first.path.is_dir() and second.path.is_dir()  # a live claim is never swept
    first.close()
    assert not first.path.exists()
    assert [p.name for p in root.iterdir()] == [second.path.name]
    second.close()


def test_an_uploads_spool_file_is_in_the_apps_directory(
    tmp_path: Path, start_sandbox: StartSandbox, start_service: StartService
) -> None:
    root = tmp_path / "spool"
    service = start_service(start_sandbox(), spool_dir=str(root))
    port = int(service.url.rsplit(":", 1)[1])
    client = start_upload(port, csv_bytes(2 << 20), declared=64 << 20)
    try:
        eventually(lambda: bool(spooled(root)), 30)
        assert [p.parent for p in spooled(root)] == [service.components.spool.path]
    finally:
        client.close()
    eventually(lambda: not spooled(root), 30)  # the client went away: the file goes too


# -- a full disk ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system of its own, so filling it harms nothing else."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def post_csv(url: str, content: bytes) -> httpx.Response:
    files = {"file": ("big.csv", content, "text/csv")}
    return httpx.post(f"{url}/jobs", data={"object": "contact"}, files=files, timeout=60)


def test_a_full_spool_disk_is_507_and_leaves_nothing_behind(
    small_disk: Path, start_sandbox: StartSandbox, start_service: StartService
) -> None:
    upstream = start_sandbox()
    # Below the mount point, whose mode (1777) lets every user write.
    root = small_disk / "spool"
    service = start_service(upstream, spool_dir=str(root))
    response = post_csv(service.url, csv_bytes(3 << 20))  # more than the disk holds
    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "insufficient_storage"
    assert spooled(root) == []
    assert service.http.get("/jobs").json()["jobs"] == []
    assert upstream.sandbox.calls["submit"] == 0
    assert upstream.sandbox.jobs == {}
    # The room is back once the refused upload is gone: the next upload is taken.
    small = post_csv(service.url, csv_bytes(100_000))
    assert small.status_code == 202, small.text


def test_a_file_size_limit_is_507_too(tmp_path: Path) -> None:
    """Under RLIMIT_FSIZE a write fails with EFBIG (Python ignores SIGXFSZ)."""
    limit = 2 << 20

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spool = str(tmp_path / "spool")
    with serve_process(tmp_path, port, limit_file_size, BULKHOOK_SPOOL_DIR=spool):
        response = post_csv(url, csv_bytes(3 << 20))
        assert response.status_code == 507, response.text
        assert response.json()["error"]["code"] == "insufficient_storage"
        assert spooled(tmp_path / "spool") == []
        assert httpx.get(f"{url}/jobs").json()["jobs"] == []
        assert post_csv(url, csv_bytes(100_000)).status_code == 202
