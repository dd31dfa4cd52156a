"""API keys, the loopback-only default, and rate limits on session starts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error
from typing import Any

import pytest
from conftest import running_server
from helpers import get_text, speakers_of, turns_of
from websockets.exceptions import InvalidStatus

from vibecast.protocol import Client, ServerError
from vibecast.server.config import ServerConfig
from vibecast.server.run import check_exposure

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(piper):
    with running_server(piper, api_keys=(KEY, "other-key"), starts_per_minute=3) as server:
        yield server


async def short_session(url: str, token: str | None) -> str:
    async with await Client.connect(url, token=token) as c:
        await c.start(speakers_of(1), turns_of()[:1])
        return [m async for m in c][-1].type


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_missing_or_wrong_key_is_refused_at_the_handshake(guarded, token) -> None:
    with pytest.raises(InvalidStatus) as e:
        asyncio.run(short_session(guarded.ws_url, token))
    assert e.value.response.status_code == 401
    assert b"Authorization: Bearer" in e.value.response.body


def test_key_in_header_or_query_works(guarded, piper) -> None:
    assert asyncio.run(short_session(guarded.ws_url, KEY)) == "done"
    assert asyncio.run(short_session(f"{guarded.ws_url}?token={KEY}", None)) == "done"


def test_http_endpoints_need_the_key_too(guarded) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        get_text(guarded.http_url + "/v1/voices")
    e.value.close()
    assert e.value.code == 401
    assert "voices" in get_text(guarded.http_url + "/v1/voices", {"Authorization": f"Bearer {KEY}"})
    assert "voices" in get_text(guarded.http_url + f"/v1/voices?token={KEY}")
    # Probes stay open for the infrastructure; metrics too, from loopback.
    assert get_text(guarded.http_url + "/healthz")
    assert get_text(guarded.http_url + "/metrics")


def test_session_starts_are_rate_limited_per_key(piper) -> None:
    with running_server(piper, api_keys=(KEY, "other-key"), starts_per_minute=2) as server:

        async def go() -> list[Any]:
            results: list[Any] = []
            for _ in range(3):
                try:
                    results.append(await short_session(server.ws_url, KEY))
                except ServerError as e:
                    results.append(e.error)
            results.append(await short_session(server.ws_url, "other-key"))  # its own allowance
            return results

        first, second, third, other = asyncio.run(go())
        assert (first, second, other) == ("done", "done", "done")
        assert third.code == "rate_limited" and third.fatal and "Try again in" in third.message


def test_without_keys_the_server_stays_on_loopback() -> None:
    with pytest.raises(SystemExit, match="without API keys"):
        check_exposure(ServerConfig(host="0.0.0.0"))
    check_exposure(ServerConfig(host="0.0.0.0", api_keys=("k",)))
    check_exposure(ServerConfig(host="0.0.0.0", public=True))
    check_exposure(ServerConfig(host="127.0.0.1"))
    check_exposure(ServerConfig(host="::1"))


def test_serve_refuses_a_public_address_without_keys() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vibecast.cli import main; main()",
            "serve",
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "--api-key" in r.stderr
