"""The downloads benchmark, run end to end at a small size so that it keeps working.

Its figures are not judged here (no timing assertions); what is checked is what the
benchmark itself checks on the way: the result is fetched whole (its size and record
count as the sandbox made them), and the bytes served are the stored result's
(SHA-256). The 1 GiB run is ``bench/downloads.py`` without options, by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_downloads_benchmark_fetches_and_serves_a_small_result(tmp_path: Path) -> None:
    argv = [sys.executable, "bench/downloads.py", "--mib", "1", "--repeats", "1"]
    argv += ["--rounds", "1", "--dir", str(tmp_path)]
    # Its own process group: on a timeout the sandbox and the service go with it.
    with subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"the benchmark did not end within 90 s:\n{out}") from None
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert any(line.startswith("result: 1 MiB of CSV, 20,005 records") for line in lines), out
    for figure in ("fetch: service peak RSS", "fetch: COMPLETED → stored", "serve: GET"):
        assert any(line.startswith(figure) for line in lines), (figure, out)
    # Its work directory (database, results, logs) is removed.
    assert list(tmp_path.iterdir()) == []
