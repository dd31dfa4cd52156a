"""`vibecast cluster` as a person runs it: a local Ray instance, a gateway and an engine, the
state in a real redis-server; it prints where to connect, serves a session, and stops cleanly
on Ctrl-C. (tests/test_cluster.py checks the failures.)"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import pytest
from helpers import DIALOGUE, run_session, turns_of

pytest.importorskip("ray", reason="the cluster extra: pip install 'vibecast[cluster]'")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_vibecast_cluster_serves_a_session(redis_url: str) -> None:
    port = free_port()
    # Ray's socket paths must stay under 108 bytes: a short folder, not pytest's tmp_path.
    folder = tempfile.mkdtemp(prefix="vc-ray-", dir="/tmp")
    cmd = [sys.executable, "-c", "from vibecast.cli import main; main()", "cluster"]
    args = ["--store-url", redis_url, "--port", str(port), "--engines", "1", "--no-turn-cache"]
    env = dict(os.environ, RAY_TMPDIR=folder)
    proc = subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    reader: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "cluster ready" in line:
                break
        else:
            raise AssertionError("vibecast cluster exited:\n" + "".join(lines[-30:]))
        assert re.search(rf"ws://127\.0\.0\.1:{port}/v1/stream", line), line
        # Keep reading its output, or a full pipe would stop it.
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
        reader.start()
        url = f"ws://127.0.0.1:{port}/v1/stream"
        result = asyncio.run(run_session(url, turns=turns_of(DIALOGUE[:2]), options={"seed": 1}))
        assert result.done.turns == 2 and result.done.samples > 0
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        if reader is not None:
            reader.join(10)  # the pipe ends with the process
        assert proc.stdout is not None
        proc.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert code == 0, "".join(lines[-30:])


def test_vibecast_cluster_needs_a_store_url() -> None:
    cmd = [sys.executable, "-c", "from vibecast.cli import main; main()", "cluster"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--store-url redis://" in r.stderr
