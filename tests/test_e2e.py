"""A 4-speaker, 8-turn dialogue through a real server and a real WebSocket client: message
order, gapless seq, continuous pts and exact length after Opus decoding, with the default voice
and with the tiny VibeVoice checkpoint; and, for the default voice, speech in every turn,
plausible durations and four speakers that sound apart. (The tiny VibeVoice model has random
weights: its audio is noise, so only the protocol checks apply to it.)"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from helpers import (
    DIALOGUE,
    SessionResult,
    decode_session,
    get_text,
    metric,
    run_session,
    turns_of,
)
from vibevoice_helpers import TINY, voice_dir

from vibecast.engine.pitch import median_f0, semitones
from vibecast.protocol import Appended, Audio, Client, Progress, TurnEnd, TurnStart
from vibecast.server.config import ServerConfig
from vibecast.server.run import ServerThread


@pytest.fixture(scope="module")
def piper_dialogue(server):
    return asyncio.run(run_session(server.ws_url, options={"seed": 11}))


@pytest.fixture(scope="module")
def vibevoice_server(tmp_path_factory):
    """`vibecast serve --model DIR --voices DIR` with the tiny model, `context` by default."""
    voices = voice_dir(tmp_path_factory.mktemp("voices"))
    config = ServerConfig(
        port=0, model=str(TINY), voices=str(voices), device="cpu", dtype="float32"
    ).replace(diffusion_steps=3, turn_cache=False)
    with ServerThread(config) as server:
        yield server


VIBEVOICE_SPEAKERS = [{"voice": ["ann", "ben"][i % 2]} for i in range(4)]


@pytest.fixture(scope="module")
def vibevoice_dialogue(vibevoice_server):
    """The whole dialogue at once, in `context` mode (the default; said here to be sure)."""
    return asyncio.run(
        run_session(
            vibevoice_server.ws_url, VIBEVOICE_SPEAKERS, options={"seed": 2, "mode": "context"}
        )
    )


async def appended_session(url: str) -> SessionResult:
    """Three turns, three more once turn 1 starts, the last two once turn 5 (the last one known
    then) starts: each batch joins the model's text block at the next context rebuild, and the
    session may have to wait at a turn boundary for the text (random weights may end turns
    without audio, so the appends follow turns, not audio)."""
    turns = turns_of()
    async with await Client.connect(url) as client:
        ready = await client.start(VIBEVOICE_SPEAKERS, turns[:3], more=True, options={"seed": 2})
        result = SessionResult(ready)
        pending = [(1, turns[3:6], True), (5, turns[6:], False)]
        async for msg in client:
            result.messages.append(msg)
            if pending and isinstance(msg, TurnStart) and msg.turn == pending[0][0]:
                _, more_turns, more = pending.pop(0)
                await client.append(more_turns, more=more)
        result.close_code = client.close_code
    return result


@pytest.fixture(scope="module")
def vibevoice_appended(vibevoice_server):
    before = metric(get_text(vibevoice_server.http_url + "/metrics"), "vibecast_context_rebuilds")
    result = asyncio.run(appended_session(vibevoice_server.ws_url))
    after = metric(get_text(vibevoice_server.http_url + "/metrics"), "vibecast_context_rebuilds")
    return result, after - before


def test_appended_turns_join_the_context_by_a_rebuild(vibevoice_appended) -> None:
    result, rebuilds = vibevoice_appended
    assert result.done.turns == len(DIALOGUE)
    assert rebuilds >= 1  # turn 3's line was not in the first text block


@pytest.fixture(params=["piper", "vibevoice", "vibevoice_appended"])
def dialogue(request):
    return request.getfixturevalue(f"{request.param}_dialogue")


@pytest.fixture(scope="module")
def vibevoice_appended_dialogue(vibevoice_appended):
    return vibevoice_appended[0]


def test_messages_come_in_protocol_order(dialogue) -> None:
    kinds = dialogue.kinds()
    assert kinds[-1] == "done"
    # Per turn: turn_start, then at least one audio, then turn_end.
    # `appended` acknowledges an append whenever it arrives; the turns' messages go around it.
    appended = [m for m in dialogue.messages if isinstance(m, Appended)]
    assert [m.turns for m in appended] in ([], [6, 8])
    turn_messages = [m for m in dialogue.messages if not isinstance(m, Progress | Appended)][:-1]
    groups = [list(g) for _, g in itertools.groupby(turn_messages, key=lambda m: m.turn)]
    assert [g[0].turn for g in groups] == list(range(len(DIALOGUE)))
    for turn, group in enumerate(groups):
        assert isinstance(group[0], TurnStart) and group[0].turn == turn
        assert group[0].speaker == DIALOGUE[turn][0] and group[0].text == DIALOGUE[turn][1]
        assert isinstance(group[-1], TurnEnd)
        assert all(isinstance(m, Audio) for m in group[1:-1])
    assert dialogue.close_code == 1000


def test_every_piper_turn_has_audio(piper_dialogue) -> None:
    turns_with_audio = {a.turn for a in piper_dialogue.audio if a.samples}
    assert turns_with_audio == set(range(len(DIALOGUE)))


def test_seq_is_gapless_and_pts_continuous(dialogue) -> None:
    audio = dialogue.audio
    assert [a.seq for a in audio] == list(range(len(audio)))
    pts = 0
    turn_start_pts = {}
    for m in dialogue.messages:
        if isinstance(m, TurnStart):
            assert m.pts == pts
            turn_start_pts[m.turn] = m.pts
        elif isinstance(m, Audio):
            assert m.pts == pts
            pts += m.samples
        elif isinstance(m, TurnEnd):
            assert m.samples == pts - turn_start_pts[m.turn]
    assert dialogue.done.samples == pts
    assert dialogue.done.turns == len(DIALOGUE)


def test_decoded_length_equals_done_samples(dialogue) -> None:
    fmt = dialogue.ready.format
    assert fmt["codec"] == "opus" and fmt["sample_rate"] == 48000 and fmt["pre_skip"] == 312
    assert dialogue.done.samples > 0
    assert len(decode_session(dialogue)) == dialogue.done.samples
    # Every packet is one 20 ms frame, as announced.
    assert all(len(a.packets) * 960 >= a.samples for a in dialogue.audio)


def _turn_audio(dialogue) -> list[np.ndarray]:
    x = decode_session(dialogue)
    starts = [m.pts for m in dialogue.messages if isinstance(m, TurnStart)]
    ends = starts[1:] + [dialogue.done.samples]
    return [x[a:b] for a, b in zip(starts, ends, strict=True)]


def test_every_turn_has_speech_of_plausible_length(piper_dialogue) -> None:
    for (_speaker, text), audio in zip(DIALOGUE, _turn_audio(piper_dialogue), strict=True):
        seconds = len(audio) / 48000
        rms_db = 20 * np.log10(np.sqrt(np.mean(audio**2)) + 1e-12)
        assert rms_db > -35, f"turn {text!r} is near silent ({rms_db:.1f} dBFS)"
        # People read 8-25 characters a second; allow for a pause at the turn's end.
        assert len(text) / 25 <= seconds <= len(text) / 8 + 1.0, (text, seconds)


def test_four_speakers_differ_in_pitch(piper_dialogue) -> None:
    per_speaker: dict[int, list[np.ndarray]] = {}
    for (speaker, _), audio in zip(DIALOGUE, _turn_audio(piper_dialogue), strict=True):
        per_speaker.setdefault(speaker, []).append(audio)
    medians = {s: median_f0(np.concatenate(a), 48000) for s, a in per_speaker.items()}
    assert all(60 < f < 400 for f in medians.values()), medians
    for a, b in itertools.combinations(sorted(medians), 2):
        gap = abs(semitones(medians[a], medians[b]))
        assert gap >= 2.0, f"speakers {a} and {b} are only {gap:.2f} semitones apart: {medians}"
