"""The double-buffered turn pipeline: the text stage of turn i+1 overlaps the acoustic stage of
turn i, and the audio is the same with the overlap turned off."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from helpers import DIALOGUE

from vibecast.engine.backend import SpeakerVoice, SynthesisParams, Turn
from vibecast.engine.instrument import TimedBackend
from vibecast.engine.pipeline import TurnAudio, TurnEnded, TurnFeed, TurnStarted, run_turns


def _run(backend: Any, overlap: bool, seed: int = 5) -> tuple[list[Any], TimedBackend]:
    inst = TimedBackend(backend)
    speakers = [SpeakerVoice(v.id, voice_id=v.id) for v in backend.voices()]
    session = backend.open_session(speakers, SynthesisParams(seed=seed, mode="turns"))
    turns = [Turn(i, s, t) for i, (s, t) in enumerate(DIALOGUE)]
    events = list(run_turns(inst, session, TurnFeed(turns), threading.Event(), overlap=overlap))
    return events, inst


@pytest.fixture(scope="module")
def runs(piper):
    return {overlap: _run(piper, overlap) for overlap in (True, False)}


def test_next_turn_encodes_while_this_one_renders(runs) -> None:
    _, inst = runs[True]
    for i in range(len(DIALOGUE) - 1):
        encode_next = inst.spans[("encode", i + 1)]
        render_this = inst.spans[("render", i)]
        assert encode_next[0] < render_this[1], f"turn {i + 1} was encoded after turn {i} rendered"
    # Two buffers, used alternately.
    assert [inst.slots[i] for i in range(len(DIALOGUE))] == [i % 2 for i in range(len(DIALOGUE))]


def test_without_overlap_stages_run_one_after_another(runs) -> None:
    _, inst = runs[False]
    for i in range(len(DIALOGUE) - 1):
        assert inst.spans[("encode", i + 1)][0] >= inst.spans[("render", i)][1]


def test_overlap_does_not_change_the_audio_or_its_order(runs) -> None:
    def summary(events: list[Any]) -> list[Any]:
        return [
            (type(e).__name__, getattr(e, "turn", None))
            if not isinstance(e, TurnAudio)
            else ("audio", e.turn, e.pcm.tobytes())
            for e in events
        ]

    with_overlap, _ = runs[True]
    without, _ = runs[False]
    assert summary(with_overlap) == summary(without)
    kinds = [type(e) for e in with_overlap]
    assert kinds.count(TurnStarted) == kinds.count(TurnEnded) == len(DIALOGUE)


def test_an_open_feed_waits_for_appended_turns_and_stops_on_close(piper) -> None:
    speakers = [SpeakerVoice("joe", voice_id="joe")]
    session = piper.open_session(speakers, SynthesisParams(seed=1, mode="turns"))
    feed = TurnFeed([Turn(0, 0, "First.")], more=True)
    seen: list[Any] = []
    it = run_turns(piper, session, feed, threading.Event())
    for event in it:
        seen.append(event)
        if isinstance(event, TurnEnded) and event.turn == 0:
            feed.add([Turn(1, 0, "Second.")], more=True)
        if isinstance(event, TurnEnded) and event.turn == 1:
            feed.close()
    ended = [e.turn for e in seen if isinstance(e, TurnEnded)]
    assert ended == [0, 1]


def test_stop_ends_the_pipeline_mid_turn(piper) -> None:
    speakers = [SpeakerVoice("joe", voice_id="joe")]
    session = piper.open_session(speakers, SynthesisParams(seed=1, mode="turns"))
    stop = threading.Event()
    turns = [
        Turn(i, 0, "A sentence that takes a while to say, and then some more.") for i in range(4)
    ]
    events = []
    for event in run_turns(piper, session, TurnFeed(turns), stop):
        events.append(event)
        if isinstance(event, TurnAudio):
            stop.set()
    assert sum(isinstance(e, TurnAudio) for e in events) == 1
    assert not any(isinstance(e, TurnEnded) for e in events)
