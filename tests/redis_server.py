"""A throwaway redis-server for the tests: Debian's binary on a free loopback port, no
persistence, stopped at the end (conftest.py's `redis_url` fixture runs one for the whole run).
The Redis variants of a suite fail, never skip, without the binary: CI must run them.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import pytest

READY = "Ready to accept connections"
START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(binary: str, folder: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    """One try: the process, its port, and its output up to the ready line, or to its end when
    it exits (the port can be taken between `_free_port` and the bind)."""
    port = _free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    args += ["no", "--dir", folder, "--loglevel", "notice"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    # No polling: the server says when it listens. A server that hangs instead is killed, which
    # ends its output and this loop.
    watchdog = threading.Timer(START_TIMEOUT_S, proc.kill)
    watchdog.start()
    log: list[str] = []
    try:
        for line in proc.stdout:
            log.append(line)
            if READY in line:
                break
    finally:
        watchdog.cancel()
    return proc, port, log


def _drain(proc: subprocess.Popen[str], log: list[str]) -> None:
    # Keep reading so that the server never blocks on a full pipe.
    assert proc.stdout is not None
    log.extend(proc.stdout)


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """A fresh redis-server for the block: yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH: `scripts/setup.sh --test` installs it "
            "(Debian package redis-server)",
            pytrace=False,
        )
    with tempfile.TemporaryDirectory(prefix="vibecast-redis-") as folder:
        for _ in range(5):
            proc, port, log = _start(binary, folder)
            if log and READY in log[-1]:
                break
            proc.wait()  # its output ended: it exited (port taken) or was killed
            assert proc.stdout is not None
            proc.stdout.close()
        else:
            pytest.fail("redis-server did not start:\n" + "".join(log), pytrace=False)
        drainer = threading.Thread(target=_drain, args=(proc, log), daemon=True)
        drainer.start()
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            drainer.join()
            assert proc.stdout is not None
            proc.stdout.close()
