"""`turns` mode: the prefix is encoded once, each turn is its own generation, run as units of
work for the engine loop; memory does not grow with the number of turns."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import drain
from vibevoice_helpers import DIALOGUE, reference, tiny_runtime

from vibecast.engine.backend import SpeakerVoice, SynthesisParams, Turn
from vibecast.engine.pipeline import TurnAudio, TurnEnded, TurnFeed
from vibecast.engine.vibevoice.backend import VibeVoiceBackend
from vibecast.protocol.messages import Code, ProtocolError

SCRIPT = DIALOGUE


@pytest.fixture(scope="module")
def backend() -> VibeVoiceBackend:
    fx, _ = reference()
    voices = {"alice": fx["voice_0"].numpy(), "bob": fx["voice_1"].numpy()}
    return VibeVoiceBackend(tiny_runtime(), "vibevoice:tiny", voices)


def run(backend, turns, seed=3):
    """Every event of the turns, and the capacity of the session's own text cache after them."""
    slot = backend.open_session(
        [SpeakerVoice("A", voice_id="alice"), SpeakerVoice("B", voice_id="bob")],
        SynthesisParams(seed, "turns", 1.3, None),
    )
    runner = backend.runner(slot, TurnFeed([Turn(i, s, t) for i, (s, t) in enumerate(turns)]))
    events = drain(runner)
    capacity = backend.engine.sessions[slot].cache.capacity
    runner.close()
    return events, capacity


def audio_of(events) -> list[np.ndarray]:
    per_turn: dict[int, list[np.ndarray]] = {}
    for e in events:
        if isinstance(e, TurnAudio):
            per_turn.setdefault(e.turn, []).append(e.pcm)
    return [np.concatenate(per_turn.get(i, [np.zeros(0, np.float32)])) for i in range(len(SCRIPT))]


def test_six_turns_end_at_speech_end(backend) -> None:
    events, _ = run(backend, SCRIPT)
    assert [e.turn for e in events if isinstance(e, TurnEnded)] == list(range(6))
    assert not any(e.capped for e in events if isinstance(e, TurnEnded))
    audio = audio_of(events)
    assert all(len(a) % 3200 == 0 for a in audio)  # whole frames of 3200 samples
    assert sum(len(a) for a in audio) > 0


def test_memory_does_not_grow_with_turns(backend) -> None:
    # The pool is allocated once; a session's own cache is sized by its longest turn, so twice
    # as many turns of the same lengths take the same memory.
    pool = backend.engine.state.cache.k.data_ptr(), backend.engine.state.cache.k.shape
    _, six = run(backend, SCRIPT)
    _, twelve = run(backend, SCRIPT * 2)
    assert six == twelve
    assert (backend.engine.state.cache.k.data_ptr(), backend.engine.state.cache.k.shape) == pool


def test_the_seed_makes_it_repeatable(backend) -> None:
    a = audio_of(run(backend, SCRIPT[:2], seed=9)[0])
    b = audio_of(run(backend, SCRIPT[:2], seed=9)[0])
    c = audio_of(run(backend, SCRIPT[:2], seed=10)[0])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(len(x) and not np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_turns_mode_streams_continuous_mode_refused(backend) -> None:
    with pytest.raises(ProtocolError, match="continuous") as refused:
        backend.check_params(SynthesisParams(0, "continuous"))
    assert (refused.value.code, refused.value.field) == (Code.BAD_FIELD, "options.mode")


def test_the_catalogue_is_what_the_server_checks_names_against(backend) -> None:
    # The server refuses a name outside `voices()` before any session opens (test_bad_input.py),
    # so every listed name must open a session and an unlisted one never reaches the backend.
    assert sorted(v.id for v in backend.voices()) == ["alice", "bob"]
    params = SynthesisParams(0, "turns", 1.3, 2)
    session = backend.open_session([SpeakerVoice("A", voice_id="bob")], params)
    backend.close_session(session)
