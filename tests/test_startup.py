"""`bulkhook serve` as a real process: every start-up failure is one line naming what to
fix, a non-zero exit, and comes before anything claims to be serving; no URL it prints
shows a password."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .helpers import SIGNATURE_KEY, RunningSandbox, free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "bulkhook.env.example"
CREDENTIALS = {
    "OC_USER_SECRET": "user-secret",
    "OC_ORG_SECRET": "org-secret",
    "OC_ELEMENT_TOKEN": "element-token",
}


def environment(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    return {**clean, **env}


def serve(
    cwd: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """``bulkhook serve`` that is expected to stop on its own."""
    env.setdefault("BULKHOOK_DATABASE_URL", f"sqlite:///{cwd / 'bulkhook.db'}")
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=environment(**env),
        check=False,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """The failure as the operator sees it: one line, naming what to fix, nothing else."""
    assert result.returncode != 0, result.stdout + result.stderr
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "serving on" not in output
    assert "Traceback" not in output
    for name in names:
        assert name in output, output
    return output


def test_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, "--port", str(port))
    assert_one_line_failure(result, f"cannot listen on 127.0.0.1:{port}", "in use")
    assert not (tmp_path / "bulkhook.db").exists()


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_a_port_out_of_range(tmp_path: Path, port: str) -> None:
    assert_one_line_failure(serve(tmp_path, "--port", port), "--port", port)


def test_a_host_that_cannot_be_bound(tmp_path: Path) -> None:
    port = str(free_port())
    result = serve(tmp_path, "--host", "192.0.2.1", "--port", port, BULKHOOK_API_TOKENS="t")
    assert_one_line_failure(result, "cannot listen on 192.0.2.1")


def not_a_database(tmp_path: Path) -> str:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a SQLite database file" * 100)
    return str(path)


def below_a_file(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file" / "state.db")


@pytest.mark.parametrize(
    "where",
    [
        lambda tmp: str(tmp),  # a directory
        below_a_file,
        not_a_database,
        lambda tmp: "/proc/bulkhook.db",  # a place nobody can create a file
    ],
    ids=["a-directory", "below-a-file", "not-a-database", "unwritable"],
)
def test_an_sqlite_file_that_cannot_be_opened(tmp_path: Path, where: object) -> None:
    path = where(tmp_path)  # type: ignore[operator]
    result = serve(tmp_path, "--port", str(free_port()), BULKHOOK_DATABASE_URL=f"sqlite:///{path}")
    assert_one_line_failure(result, "cannot open the SQLite database", path)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port whose connections are accepted by the kernel but never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_an_unreachable_postgresql_fails_at_once(tmp_path: Path) -> None:
    closed = free_port()
    url = f"postgresql://bh:S3cretPassw0rd@127.0.0.1:{closed}/bulkhook"
    result = serve(tmp_path, "--port", str(free_port()), BULKHOOK_DATABASE_URL=url)
    line = assert_one_line_failure(result, "cannot open the PostgreSQL store", str(closed))
    assert "S3cretPassw0rd" not in line


def test_a_postgresql_that_never_answers_fails_within_seconds(
    tmp_path: Path, silent_server: int
) -> None:
    url = f"postgresql://bh:S3cretPassw0rd@127.0.0.1:{silent_server}/bulkhook"
    started = time.monotonic()
    result = serve(tmp_path, "--port", str(free_port()), BULKHOOK_DATABASE_URL=url)
    elapsed = time.monotonic() - started
    line = assert_one_line_failure(result, "cannot open the PostgreSQL store")
    assert "S3cretPassw0rd" not in line
    assert elapsed < 12, elapsed  # a connect timeout of 5 s, not the pool's 15 s of retries


def placeholders() -> list[str]:
    text = EXAMPLE.read_text()
    return re.findall(r"^([A-Z_]+)=REPLACE_ME$", text, flags=re.MULTILINE)


def test_the_example_file_has_placeholders_to_test() -> None:
    assert {"OC_USER_SECRET", "OC_SIGNATURE_KEYS", "BULKHOOK_API_TOKENS"} <= set(placeholders())


@pytest.mark.parametrize("var", placeholders())
def test_a_placeholder_left_in_the_environment(tmp_path: Path, var: str) -> None:
    env = {"OC_BASE_URL": "https://api.example.com/elements/api-v2", **CREDENTIALS}
    env[var] = "REPLACE_ME"
    result = serve(tmp_path, "--port", str(free_port()), **env)
    assert_one_line_failure(result, var, "REPLACE_ME")


def test_the_example_file_copied_unchanged_does_not_start(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(EXAMPLE.read_text())
    result = serve(tmp_path, "--port", str(free_port()))
    assert_one_line_failure(result, "REPLACE_ME")


@pytest.mark.parametrize(
    "missing",
    [
        ("OC_USER_SECRET", "OC_ORG_SECRET", "OC_ELEMENT_TOKEN"),
        ("OC_ORG_SECRET",),
        ("OC_ELEMENT_TOKEN",),
        ("OC_USER_SECRET", "OC_ELEMENT_TOKEN"),
    ],
)
def test_an_upstream_without_credentials(tmp_path: Path, missing: tuple[str, ...]) -> None:
    env = {k: v for k, v in CREDENTIALS.items() if k not in missing}
    result = serve(
        tmp_path,
        "--port",
        str(free_port()),
        OC_BASE_URL="https://api.example.com/elements/api-v2",
        **env,
    )
    line = assert_one_line_failure(result, "OC_BASE_URL", *missing)
    for present in set(CREDENTIALS) - set(missing):
        assert present not in line


# -- what a started service prints ------------------------------------------------------


def test_the_banner_shows_no_password_of_the_store_or_the_upstream(
    tmp_path: Path, sandbox: RunningSandbox, postgres_url: str
) -> None:
    # The test server trusts loopback, so the password is carried but not needed.
    database = re.sub(r"//([^:@/]+)@", r"//\1:S3cretPassw0rd@", postgres_url)
    assert "S3cretPassw0rd" in database
    upstream = sandbox.api_url.replace("http://", "http://oc-user:Upstr3amPassw0rd@")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=environment(
            BULKHOOK_DATABASE_URL=database,
            OC_BASE_URL=upstream,
            OC_SIGNATURE_KEYS=SIGNATURE_KEY,
            BULKHOOK_LOG_FORMAT="text",
            **CREDENTIALS,
        ),
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "serving on" in output, output
    assert "postgresql://***@" in output
    assert "http://***@127.0.0.1" in output
    assert "S3cretPassw0rd" not in output
    assert "Upstr3amPassw0rd" not in output


def spool_writable_by_others(tmp_path: Path) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o777)
    return spool


def spool_through_a_link(tmp_path: Path) -> Path:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "spool").symlink_to(tmp_path / "elsewhere")
    return tmp_path / "spool"


@pytest.mark.parametrize(
    ("make", "problem"),
    [(spool_writable_by_others, "writable by other users"), (spool_through_a_link, "link")],
)
def test_a_spool_directory_others_could_read_or_swap(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    spool = make(tmp_path)
    result = serve(tmp_path, "--port", str(free_port()), BULKHOOK_SPOOL_DIR=str(spool))
    assert_one_line_failure(result, "BULKHOOK_SPOOL_DIR", problem)


def test_a_spool_directory_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    spool = tmp_path / "file" / "spool"
    result = serve(tmp_path, "--port", str(free_port()), BULKHOOK_SPOOL_DIR=str(spool))
    assert_one_line_failure(result, "BULKHOOK_SPOOL_DIR", str(spool))


def test_the_cli_shows_no_password_of_the_service_url(tmp_path: Path) -> None:
    url = f"http://ops:S3cretPassw0rd@127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "service", "jobs", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environment(),
        check=False,
    )
    assert result.returncode != 0
    assert "cannot reach the service at http://***@127.0.0.1" in result.stderr
    assert "S3cretPassw0rd" not in result.stdout + result.stderr
