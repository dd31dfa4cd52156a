"""A session's turns as units of work (engine/scheduler.py `TurnRunner`): the events in order,
an open script that waits for appended turns without blocking the loop, and a stop mid-turn."""

from __future__ import annotations

from typing import Any

import numpy as np
from helpers import DIALOGUE, drain

from vibecast.engine.backend import SpeakerVoice, SynthesisParams, Turn
from vibecast.engine.pipeline import TurnAudio, TurnEnded, TurnFeed, TurnStarted
from vibecast.engine.scheduler import TurnRunner


def _runner(piper: Any, feed: TurnFeed, seed: int = 5) -> TurnRunner:
    speakers = [SpeakerVoice(v.id, voice_id=v.id) for v in piper.voices()]
    return TurnRunner(piper, piper.open_session(speakers, SynthesisParams(seed, "turns")), feed)


def test_every_turn_starts_speaks_and_ends_in_order(piper) -> None:
    turns = [Turn(i, s, t) for i, (s, t) in enumerate(DIALOGUE[:3])]
    events = drain(_runner(piper, TurnFeed(turns)))
    kinds = [
        (type(e).__name__, e.turn if not isinstance(e, TurnStarted) else e.turn.index)
        for e in events
        if not isinstance(e, TurnAudio)
    ]
    assert kinds == [(k, i) for i in range(3) for k in ("TurnStarted", "TurnEnded")]
    for i in range(3):  # each turn's audio lies between its start and its end
        first = events.index(
            next(e for e in events if isinstance(e, TurnStarted) and e.turn.index == i)
        )
        last = events.index(next(e for e in events if isinstance(e, TurnEnded) and e.turn == i))
        assert any(isinstance(e, TurnAudio) and e.turn == i for e in events[first:last])


def test_the_same_seed_gives_the_same_audio(piper) -> None:
    turns = [Turn(i, s, t) for i, (s, t) in enumerate(DIALOGUE[:2])]

    def pcm(seed: int) -> bytes:
        events = drain(_runner(piper, TurnFeed(turns), seed))
        return b"".join(e.pcm.tobytes() for e in events if isinstance(e, TurnAudio))

    assert pcm(5) == pcm(5) != pcm(6)


def test_an_open_script_is_not_ready_until_a_turn_or_the_end_arrives(piper) -> None:
    feed = TurnFeed([Turn(0, 0, "First.")], more=True)
    runner = _runner(piper, feed)
    ended: list[int] = []
    while runner.ready():
        for e in runner.run() or []:
            if isinstance(e, TurnEnded):
                ended.append(e.turn)
    assert ended == [0]  # waits for text: the loop runs other sessions meanwhile
    feed.add([Turn(1, 0, "Second.")], more=True)
    assert runner.ready()
    while runner.ready():
        for e in runner.run() or []:
            if isinstance(e, TurnEnded):
                ended.append(e.turn)
    assert ended == [0, 1] and not runner.ready()
    feed.close()
    assert runner.ready() and runner.run() is None


def test_closing_mid_turn_stops_its_render(piper) -> None:
    turns = [Turn(0, 0, "A sentence that takes a while to say, and then some more of it.")]
    runner = _runner(piper, TurnFeed(turns))
    assert isinstance(runner.run()[0], TurnStarted)  # type: ignore[index]
    assert isinstance(runner.run()[0], TurnAudio)  # type: ignore[index]
    runner.close()
    assert runner._chunks is None


def test_a_turn_goes_on_from_any_of_its_marks_exactly(piper) -> None:
    """After each chunk the runner says where it could go on from (`TurnAudio.mark`); another
    runner given the turn before's carry and such a mark makes the rest of the turn, and of the
    script, sample for sample (what an engine taking over a lost one's session does)."""
    long = "This turn is long enough to take several vocoder windows. " * 4
    turns = [Turn(0, 0, "A short first turn."), Turn(1, 1, long), Turn(2, 0, "And a last one.")]
    events = drain(_runner(piper, TurnFeed(turns)))
    audio = [e for e in events if isinstance(e, TurnAudio)]
    carry = next(e.carry for e in events if isinstance(e, TurnEnded) and e.turn == 0)
    assert carry is not None
    marked = [i for i, e in enumerate(audio) if e.turn == 1 and e.mark is not None]
    assert len(marked) >= 3
    for i in (marked[0], marked[len(marked) // 2]):
        speakers = [SpeakerVoice(v.id, voice_id=v.id) for v in piper.voices()]
        session = piper.open_session(speakers, SynthesisParams(5, "turns"))
        again = TurnRunner(piper, session, TurnFeed(turns), [carry], audio[i].mark)
        rest = [e.pcm for e in drain(again) if isinstance(e, TurnAudio)]
        want = [e.pcm for e in audio[i + 1 :]]
        assert len(rest) == len(want)
        for got, expected in zip(rest, want, strict=True):
            assert np.array_equal(got, expected)
