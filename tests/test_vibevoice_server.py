"""VibeVoice through the server's engine loop: a session whose socket drops leaves its slot of
the batch (its state parked in host memory) for another session, and resumes, in whatever slot
is free then, with audio identical sample for sample to a session never interrupted."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from helpers import abort, decode_packets
from vibevoice_helpers import TINY, voice_dir

from vibecast.protocol import Audio, Client
from vibecast.server.config import ServerConfig
from vibecast.server.run import ServerThread

SPEAKERS = [{"voice": "ann"}, {"voice": "ben"}]
TURNS = [
    {"speaker": 0, "text": "Hello there, and welcome to the show."},
    {"speaker": 1, "text": "Thanks, it is good to be here."},
    {"speaker": 0, "text": "Shall we start?"},
]


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    voices = voice_dir(tmp_path_factory.mktemp("voices"))
    config = ServerConfig(port=0, model=str(TINY), voices=str(voices), device="cpu").replace(
        dtype="float32", diffusion_steps=3, max_sessions=1, resume_grace_s=120, turn_cache=False
    )
    with ServerThread(config) as server:
        yield server


def pcm(audio: list[Audio], pre_skip: int) -> np.ndarray:
    return decode_packets([p for a in audio for p in a.packets or []])[pre_skip:]


async def whole(url: str) -> np.ndarray:
    async with await Client.connect(url) as c:
        ready = await c.start(SPEAKERS, TURNS, options={"seed": 4})
        audio = [m async for m in c if isinstance(m, Audio)]
    return pcm(audio, ready.format["pre_skip"])


async def dropped_then_resumed(server: Any) -> tuple[np.ndarray, list[str]]:
    hub = server.state.sessions
    first = await Client.connect(server.ws_url)
    ready = await first.start(SPEAKERS, TURNS, options={"seed": 4})
    got: list[Audio] = []
    while len(got) < 2:
        if isinstance(msg := await first.recv(), Audio):
            got.append(msg)
    abort(first)
    sid = ready.session_id
    assert await asyncio.to_thread(hub.wait_for, lambda: not hub.sessions[sid].attached, 10)
    # The only slot is free again: another session runs start to end, never queued.
    async with await Client.connect(server.ws_url) as other:
        queued: list[Any] = []
        await other.start(SPEAKERS, TURNS[:1], options={"seed": 9}, on_queued=queued.append)
        kinds = [m.type async for m in other]
    assert queued == [] and kinds[-1] == "done"
    async with await Client.connect(server.ws_url) as again:
        await again.resume(sid, ready.resume_token, got[-1].seq)
        rest = [m async for m in again]
    audio = got + [m for m in rest if isinstance(m, Audio)]
    assert [a.seq for a in audio] == list(range(len(audio)))
    return pcm(audio, ready.format["pre_skip"]), [m.type for m in rest]


def test_a_dropped_session_frees_its_slot_and_resumes_exactly(one_slot) -> None:
    reference_pcm = asyncio.run(whole(one_slot.ws_url))
    resumed, kinds = asyncio.run(dropped_then_resumed(one_slot))
    assert kinds[-1] == "done"
    np.testing.assert_array_equal(resumed, reference_pcm)
