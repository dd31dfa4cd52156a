"""Shared fixtures: one warmed Piper backend for the whole run, and real uvicorn servers on
loopback ports that share it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vibecast.engine.piper_voice import PiperBackend
from vibecast.server.config import ServerConfig
from vibecast.server.run import ServerThread

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def piper() -> PiperBackend:
    backend = PiperBackend()
    backend.warmup()
    return backend


@contextlib.contextmanager
def running_server(backend: Any, **settings: Any) -> Iterator[ServerThread]:
    # The turn cache is off unless a test turns it on: tests must not replay each other's turns.
    config = ServerConfig(host="127.0.0.1", port=0, turn_cache=False).replace(**settings)
    server = ServerThread(config, backend=backend).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A throwaway redis-server (tests/redis_server.py) for the whole run."""
    from redis_server import running_redis

    with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
def server(piper: PiperBackend) -> Iterator[ServerThread]:
    """A default-config server for tests that do not change settings."""
    with running_server(piper) as s:
        yield s


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
