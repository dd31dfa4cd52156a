"""VibeVoice-Realtime through a real server on loopback: text streamed over the WebSocket is
spoken exactly as the same text sent whole, sessions share the engine, presets are the voices,
and a session whose socket drops leaves its slot and resumes exactly."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import abort

from vibecast.protocol import Audio, Client
from vibecast.protocol.client import ServerError
from vibecast.protocol.messages import TurnEnd, TurnStart
from vibecast.protocol.wav import wav_bytes
from vibecast.server.config import ServerConfig
from vibecast.server.run import ServerThread

FIXTURES = Path(__file__).parent / "fixtures" / "realtime"
PCM = {"codec": "pcm_s16le", "sample_rate": 24000}
TEXT = "Hello there, and welcome to the show. Shall we start?"
OTHER = "Good morning, good evening, welcome back."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    voices = tmp_path_factory.mktemp("presets")
    shutil.copy(FIXTURES / "voice.pt", voices / "emma.pt")
    shutil.copy(FIXTURES / "voice.pt", voices / "davis.pt")
    config = ServerConfig(port=0, model=str(FIXTURES / "tiny"), voices=str(voices)).replace(
        device="cpu", dtype="float32", max_sessions=2, resume_grace_s=120, turn_cache=False
    )
    with ServerThread(config) as running:
        yield running


def pcm(messages: list[Any]) -> bytes:
    return b"".join(m.pcm for m in messages if isinstance(m, Audio) and m.pcm)


async def whole(url: str, text: str, seed: int = 3) -> bytes:
    async with await Client.connect(url) as c:
        await c.start(
            [{"voice": "emma"}], [{"speaker": 0, "text": text}], format=PCM, options={"seed": seed}
        )
        return pcm([m async for m in c])


async def streamed(url: str, parts: list[str], seed: int = 3) -> tuple[Any, list[Any]]:
    async with await Client.connect(url) as c:
        ready = await c.start(
            [{"voice": "emma"}], [], more=True, format=PCM, options={"seed": seed}
        )

        async def writer() -> None:
            await c.stream_text(iter(parts), speaker=0, more=False)

        task = asyncio.create_task(writer())
        messages = [m async for m in c]
        await task
    return ready, messages


def test_text_streamed_in_pieces_is_spoken_as_the_same_text_sent_whole(server: Any) -> None:
    want = asyncio.run(whole(server.ws_url, TEXT))
    cuts = [0, 3, 9, 10, 22, 37, 38, len(TEXT)]  # mid-word, at spaces, one character
    parts = [TEXT[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    ready, messages = asyncio.run(streamed(server.ws_url, parts))
    assert ready.model["text_streaming"] is True
    assert [m.type for m in messages][-1] == "done"
    start = next(m for m in messages if isinstance(m, TurnStart))
    end = next(m for m in messages if isinstance(m, TurnEnd))
    assert start.streamed and end.text == TEXT
    assert len(want) > 0 and pcm(messages) == want


def test_two_sessions_at_once_each_sound_as_alone(server: Any) -> None:
    alone = [asyncio.run(whole(server.ws_url, t, seed=s)) for s, t in ((1, TEXT), (2, OTHER))]

    async def both() -> list[bytes]:
        return list(
            await asyncio.gather(whole(server.ws_url, TEXT, 1), whole(server.ws_url, OTHER, 2))
        )

    assert asyncio.run(both()) == alone


def test_presets_are_the_voices_and_an_upload_is_refused_with_the_names(server: Any) -> None:
    sample = wav_bytes((0.1 * np.sin(np.arange(24000) / 9)).astype(np.float32), 24000)

    async def upload() -> ServerError:
        async with await Client.connect(server.ws_url) as c:
            with pytest.raises(ServerError) as refused:
                await c.start([{"voice_audio": sample}], [{"speaker": 0, "text": TEXT}])
            return refused.value

    error = asyncio.run(upload()).error
    assert error.code == "bad_field" and error.field == "speakers[0].voice"
    assert "presets" in error.message and "emma" in error.message and "davis" in error.message


def test_a_dropped_session_leaves_its_slot_and_resumes_exactly(server: Any) -> None:
    want = asyncio.run(whole(server.ws_url, TEXT, seed=5))
    hub = server.state.sessions

    async def run() -> bytes:
        first = await Client.connect(server.ws_url)
        ready = await first.start(
            [{"voice": "emma"}], [{"speaker": 0, "text": TEXT}], format=PCM, options={"seed": 5}
        )
        got: list[Audio] = []
        while len(got) < 3:
            if isinstance(msg := await first.recv(), Audio):
                got.append(msg)
        abort(first)
        sid = ready.session_id
        assert await asyncio.to_thread(hub.wait_for, lambda: not hub.sessions[sid].attached, 10)
        # Both slots are free for others meanwhile: two sessions run start to end.
        others = await asyncio.gather(
            whole(server.ws_url, OTHER, 7), whole(server.ws_url, OTHER, 8)
        )
        assert all(others)
        async with await Client.connect(server.ws_url) as again:
            await again.resume(sid, ready.resume_token, got[-1].seq)
            rest = [m async for m in again]
        audio = got + [m for m in rest if isinstance(m, Audio)]
        assert [a.seq for a in audio] == list(range(len(audio)))
        return pcm(audio)

    assert asyncio.run(run()) == want
