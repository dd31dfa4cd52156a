"""GET /v1/sessions/{id}/audio.opus: a valid Ogg Opus file of exactly the session's audio."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.error
import urllib.request
import wave
from pathlib import Path

import pytest
from helpers import SUBPROTOCOLS, run_session, speakers_of, turns_of
from websockets.asyncio.client import connect

from vibecast.protocol import PROTOCOL
from vibecast.protocol.ogg import read_ogg_opus


def test_download_is_the_session_exactly(server, tmp_path: Path) -> None:
    result = asyncio.run(
        run_session(server.ws_url, speakers_of(3), turns_of()[:3], options={"seed": 2})
    )
    url = f"{server.http_url}/v1/sessions/{result.ready.session_id}/audio.opus"
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers["Content-Type"] == "audio/ogg"
        assert "attachment" in r.headers["Content-Disposition"]
        data = r.read()
    path = tmp_path / "s.opus"
    path.write_bytes(data)
    info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True)
    assert info.returncode == 0 and "WARNING" not in info.stdout + info.stderr, info.stdout
    subprocess.run(
        ["opusdec", "--quiet", "--rate", "48000", str(path), str(tmp_path / "s.wav")], check=True
    )
    with wave.open(str(tmp_path / "s.wav")) as w:
        assert w.getnframes() == result.done.samples
    ogg = read_ogg_opus(data)
    streamed = [p for a in result.audio for p in a.packets or []]
    assert ogg.packets == streamed  # the very packets streamed


@pytest.mark.parametrize("session", ["no-such-session", "pcm"])
def test_download_that_cannot_exist_is_a_404_with_a_reason(server, session: str) -> None:
    if session == "pcm":
        result = asyncio.run(
            run_session(
                server.ws_url, speakers_of(1), turns_of()[:1], format={"codec": "pcm_s16le"}
            )
        )
        session = result.ready.session_id
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server.http_url}/v1/sessions/{session}/audio.opus", timeout=10)
    body = e.value.read().decode()
    e.value.close()
    assert e.value.code == 404 and "pcm_s16le" in body


def test_no_per_message_deflate_for_audio(server) -> None:
    async def go():
        async with connect(server.ws_url, subprotocols=SUBPROTOCOLS) as ws:  # offers deflate
            assert ws.response is not None
            return ws.response.headers.get("Sec-WebSocket-Extensions"), ws.subprotocol

    extensions, subprotocol = asyncio.run(go())
    assert extensions is None and subprotocol == PROTOCOL
