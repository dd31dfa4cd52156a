"""The HTTP side's defences: API keys stay out of the logs, a session's audio goes only to the
identity that made it, X-Forwarded-For is believed only from a configured proxy, and /metrics
needs a key except from loopback."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from conftest import running_server
from helpers import run_session, speakers_of, turns_of
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from vibecast.protocol import PROTOCOL, Client, ServerError
from vibecast.protocol.ogg import read_ogg_opus
from vibecast.server.app import metrics_allowed
from vibecast.server.config import ServerConfig

KEY = "key-a-5f1c9e27"
OTHER = "key-b-0d84a3b6"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def uvicorn_request_lines() -> Iterator[list[str]]:
    """What uvicorn logs about requests, at INFO whatever level the server was started with.

    Enter it after the server exists: building uvicorn's config replaces the handlers on its
    loggers. uvicorn.access does not propagate, so caplog on the root logger would see nothing.
    """
    handler = _Lines()
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def http_get(
    server, path: str, headers: dict[str, str] | None = None, source: str | None = None
) -> tuple[int, bytes]:
    """Status and body of a GET, optionally from a chosen local address."""
    conn = http.client.HTTPConnection(
        server.config.host,
        server.config.port,
        timeout=30,
        source_address=(source, 0) if source else None,
    )
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def one_turn(url: str, headers: dict[str, str] | None = None) -> str:
    """Start a one-turn session; the last message's type, or the error code of a refused start."""
    ws = await connect(
        url, subprotocols=[Subprotocol(PROTOCOL)], additional_headers=headers, compression=None
    )
    async with Client(ws) as client:
        try:
            await client.start(speakers_of(1), turns_of()[:1])
        except ServerError as e:
            return e.code
        return [m async for m in client][-1].type


def session_end_clients(caplog) -> list[str]:
    return [
        dict(re.findall(r"(\w+)=(\S+)", r.getMessage()))["client"]
        for r in caplog.records
        if r.getMessage().startswith("session_end")
    ]


# -- the API key in the log -------------------------------------------------------------------


def test_a_key_given_as_token_never_reaches_the_log(piper) -> None:
    with running_server(piper, api_keys=(KEY,)) as server, uvicorn_request_lines() as lines:
        status, _ = http_get(server, f"/v1/voices?token={KEY}&x=1")
        assert status == 200
        assert http_get(server, "/v1/voices?token=a-near-miss-of-the-key")[0] == 401
        assert asyncio.run(one_turn(f"{server.ws_url}?token={KEY}")) == "done"
        logged = "\n".join(lines)

    # The lines were written, so their absence of the key means something.
    assert '"GET /v1/voices?token=REDACTED&x=1 HTTP/1.1" 200' in logged, logged
    assert '"GET /v1/voices?token=REDACTED HTTP/1.1" 401' in logged, logged
    assert '"WebSocket /v1/stream?token=REDACTED" [accepted]' in logged, logged
    assert KEY not in logged and "a-near-miss" not in logged


def test_vibecast_serve_keeps_the_key_out_of_its_log() -> None:
    """The command configures logging its own way (uvicorn's handlers at INFO, to stdout and
    stderr), so check what it actually prints."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from vibecast.cli import main; main()",
            "serve",
            "--port",
            "0",
            "--api-key",
            KEY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = threading.Timer(180, proc.kill)  # a hung server ends the output, failing the test
    deadline.start()
    printed: list[str] = []
    output = proc.stdout
    assert output is not None

    def read_until(needle: str) -> str:
        for line in output:
            printed.append(line)
            if needle in line:
                return line
        raise AssertionError(f"the server's output ended before {needle!r}:\n{''.join(printed)}")

    try:
        announced = re.search(r":(\d+)/ ", read_until("vibecast: ready."))
        assert announced, printed
        port = int(announced.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/v1/voices?token={KEY}")
        assert conn.getresponse().status == 200
        conn.close()
        read_until("GET /v1/voices?token=")
        assert asyncio.run(one_turn(f"ws://127.0.0.1:{port}/v1/stream?token={KEY}")) == "done"
        read_until('"WebSocket /v1/stream?token=')
    finally:
        deadline.cancel()
        proc.kill()
        proc.wait(30)
        output.close()
    logged = "".join(printed)
    assert "GET /v1/voices?token=REDACTED HTTP/1.1" in logged, logged
    assert '"WebSocket /v1/stream?token=REDACTED" [accepted]' in logged, logged
    assert KEY not in logged


# -- who may download a session's audio -------------------------------------------------------


def test_only_the_key_that_made_a_session_can_download_it(piper) -> None:
    with running_server(piper, api_keys=(KEY, OTHER)) as server:
        url = f"{server.ws_url}?token={KEY}"
        result = asyncio.run(run_session(url, speakers_of(1), turns_of()[:1]))
        sid = result.ready.session_id
        path = f"/v1/sessions/{sid}/audio.opus"
        other_status, other_body = http_get(server, path, {"Authorization": f"Bearer {OTHER}"})
        unknown_status, unknown_body = http_get(
            server, "/v1/sessions/no-such-session/audio.opus", {"Authorization": f"Bearer {OTHER}"}
        )
        owner_status, owner_body = http_get(server, f"{path}?token={KEY}")

    assert other_status == unknown_status == 404
    # Word for word what an unknown id gets, so another key cannot learn the session exists.
    unknown_as_sid = unknown_body.replace(b"no-such-session", sid.encode())
    assert json.loads(other_body) == json.loads(unknown_as_sid)
    assert owner_status == 200
    assert read_ogg_opus(owner_body).packets == [p for a in result.audio for p in a.packets or []]


def test_without_keys_a_session_belongs_to_the_address_that_made_it(piper) -> None:
    with running_server(piper) as server:
        result = asyncio.run(run_session(server.ws_url, speakers_of(1), turns_of()[:1]))
        path = f"/v1/sessions/{result.ready.session_id}/audio.opus"
        # 127.0.0.2 is loopback too, but another address: another client as far as the server knows.
        elsewhere, body = http_get(server, path, source="127.0.0.2")
        same, audio = http_get(server, path, source="127.0.0.1")

    assert elsewhere == 404 and json.loads(body)["error"] == "unknown_session"
    assert same == 200 and read_ogg_opus(audio).packets


# -- X-Forwarded-For --------------------------------------------------------------------------


def forged(i: int) -> dict[str, str]:
    return {"X-Forwarded-For": f"203.0.113.{i}"}


def test_forwarded_for_from_an_unconfigured_client_is_ignored(piper, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vibecast.sessions")
    with running_server(piper, starts_per_minute=2) as server:

        async def four():
            return [await one_turn(server.ws_url, forged(i)) for i in range(1, 5)]

        outcomes = asyncio.run(four())

    assert outcomes == ["done", "done", "rate_limited", "rate_limited"]
    assert session_end_clients(caplog) == ["ip:127.0.0.1", "ip:127.0.0.1"]
    assert "203.0.113" not in caplog.text


def test_forwarded_for_from_a_configured_proxy_is_believed(piper, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vibecast.sessions")
    with running_server(piper, starts_per_minute=2, forwarded_allow_ips="127.0.0.1") as server:

        async def four():
            return [await one_turn(server.ws_url, forged(i)) for i in range(1, 5)]

        outcomes = asyncio.run(four())

    assert outcomes == ["done"] * 4  # four clients behind the proxy, each with its own allowance
    assert sorted(session_end_clients(caplog)) == [f"ip:203.0.113.{i}" for i in range(1, 5)]


# -- /metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key_name", "host", "allowed"),
    [
        ({}, None, "203.0.113.7", True),  # no keys: the server is on loopback unless --public
        ({"api_keys": ("k",)}, False, "203.0.113.7", False),
        ({"api_keys": ("k",)}, False, "2001:db8::7", False),
        ({"api_keys": ("k",)}, False, None, False),
        ({"api_keys": ("k",)}, "#1", "203.0.113.7", True),
        ({"api_keys": ("k",)}, False, "127.0.0.1", True),
        ({"api_keys": ("k",)}, False, "::1", True),
        ({"api_keys": ("k",), "metrics_public": True}, False, "203.0.113.7", True),
    ],
)
def test_who_may_read_metrics(settings, key_name, host, allowed) -> None:
    assert metrics_allowed(ServerConfig(**settings), key_name, host) is allowed


def test_metrics_over_http_need_a_key_except_from_loopback(piper) -> None:
    # Through a trusted proxy the server sees the forwarded, non-loopback address of the client.
    outside = {"X-Forwarded-For": "203.0.113.9"}
    with running_server(piper, api_keys=(KEY,), forwarded_allow_ips="127.0.0.1") as server:
        local = http_get(server, "/metrics")
        remote = http_get(server, "/metrics", outside)
        keyed = {**outside, "Authorization": f"Bearer {KEY}"}
        remote_with_key = http_get(server, "/metrics", keyed)
    with running_server(
        piper, api_keys=(KEY,), forwarded_allow_ips="127.0.0.1", metrics_public=True
    ) as server:
        public = http_get(server, "/metrics", outside)

    assert local[0] == 200 and b"vibecast_engine_ready" in local[1]
    assert remote[0] == 401 and b"vibecast_" not in remote[1]
    assert remote_with_key[0] == 200 and b"vibecast_engine_ready" in remote_with_key[1]
    assert public[0] == 200 and b"vibecast_engine_ready" in public[1]


def outward_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
        except OSError:
            return None
        host = s.getsockname()[0]
    return None if host.startswith("127.") else host


def test_metrics_need_a_key_from_a_real_non_loopback_address(piper) -> None:
    host = outward_address()
    if host is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with running_server(piper, host=host, api_keys=(KEY,)) as server:
        without = http_get(server, "/metrics", source=host)
        with_key = http_get(server, "/metrics", {"Authorization": f"Bearer {KEY}"}, source=host)

    assert without[0] == 401
    assert with_key[0] == 200 and b"vibecast_engine_ready" in with_key[1]
