"""VibeVoice-Realtime-0.5B in plain PyTorch: names and shapes of the official checkpoint, parity
with the reference on a tiny checkpoint, sessions batched in one engine, text streamed in.

Fixtures (tests/fixtures/realtime/, made by scripts/make_realtime_fixtures.py with Microsoft's
code): `tiny/` a random checkpoint in the official layout, `voice.pt` a preset the reference
made for it, `reference.*` what the reference's file demo generated with them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vibecast.engine.backend import SpeakerVoice, SynthesisParams, Turn
from vibecast.engine.pipeline import TurnAudio, TurnEnded, TurnFeed, TurnStarted
from vibecast.engine.vibevoice.batch import count_ops
from vibecast.engine.vibevoice.config import RealtimeConfig, load_config
from vibecast.engine.vibevoice.presets import load_preset
from vibecast.engine.vibevoice.realtime import VibeVoiceRealtime
from vibecast.engine.vibevoice.realtime_backend import (
    RealtimeBackend,
    RealtimeRunner,
    RealtimeSession,
)
from vibecast.engine.vibevoice.realtime_batch import frame_step, text_step
from vibecast.engine.vibevoice.weights import load_realtime

SHARED = Path(__file__).resolve().parents[2] / "shared" / "vibevoice"
FIXTURES = Path(__file__).parent / "fixtures" / "realtime"
TINY = FIXTURES / "tiny"
VOICE = FIXTURES / "voice.pt"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
RECORDED = load_file(str(FIXTURES / "reference.safetensors"))
CASES = REFERENCE["cases"]


# -- names and shapes ----------------------------------------------------------------------------


def test_module_tree_equals_the_official_605_tensor_key_list() -> None:
    keys_file = SHARED / "checkpoint-keys" / "keys_vibevoice-realtime-0.5b.json"
    keys = json.loads(keys_file.read_text())
    cfg = load_config(Path(__file__).parents[1] / "engine/vibevoice/vibevoice-realtime-0.5b.json")
    assert isinstance(cfg, RealtimeConfig)
    assert (cfg.lm.num_hidden_layers, cfg.tts.num_hidden_layers) == (4, 20)
    with torch.device("meta"):
        model = VibeVoiceRealtime(cfg)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert len(ours) == keys["tensors"] == 605
    assert ours == keys["keys"]  # the same names, each with the same shape
    assert sum(t.numel() for t in model.state_dict().values()) == keys["params"]


def test_a_split_that_leaves_no_lower_lm_is_refused() -> None:
    d = json.loads((TINY / "config.json").read_text())
    d["tts_backbone_num_hidden_layers"] = d["decoder_config"]["num_hidden_layers"]
    with pytest.raises(ValueError, match="tts_backbone_num_hidden_layers"):
        RealtimeConfig.from_dict(d)


# -- the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> RealtimeBackend:
    rt = load_realtime(str(TINY), "cpu", "float32")
    return RealtimeBackend(rt, {"voice": load_preset(VOICE)}, slots=4, window=1024, steps=5)


def open_session(
    backend: RealtimeBackend, seed: int, cfg: float, frames: int | None = None
) -> RealtimeSession:
    params = SynthesisParams(seed, "turns", cfg, 5, frames_per_turn=frames)
    return backend.open_session([SpeakerVoice("a", voice_id="voice")], params)


def collect(events: list, audio: list[np.ndarray], ends: list[TurnEnded]) -> None:
    for e in events:
        if isinstance(e, TurnAudio):
            audio.append(e.pcm)
        elif isinstance(e, TurnEnded):
            ends.append(e)


def speak(backend: RealtimeBackend, seed: int, cfg: float, text: str) -> tuple[np.ndarray, int]:
    """One turn alone in the engine: (audio, frames)."""
    session = open_session(backend, seed, cfg)
    runner = backend.runner(session, TurnFeed([Turn(0, 0, text)]))
    audio: list[np.ndarray] = []
    ends: list[TurnEnded] = []
    try:
        while (events := runner.run()) is not None:
            collect(events, audio, ends)
    finally:
        runner.close()
    assert len(ends) == 1 and not ends[0].capped
    return np.concatenate(audio), len(audio)


# -- parity with the reference ---------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(CASES)))
def test_audio_and_end_of_speech_frame_equal_the_reference(
    backend: RealtimeBackend, case: int
) -> None:
    c = CASES[case]
    audio, frames = speak(backend, c["seed"], c["cfg_scale"], c["text"])
    want = RECORDED["audio" + c["suffix"]].numpy().reshape(-1)
    assert frames == c["frames"] == c["eos_frame"] + 1  # ends after the same frame
    assert audio.shape == want.shape
    assert float(np.abs(audio - want).max()) <= 1e-4


def test_synth_command_writes_the_references_audio(tmp_path: Path) -> None:
    from vibecast.cli import main
    from vibecast.protocol.wav import read_wav

    c = CASES[0]
    script = tmp_path / "script.txt"
    script.write_text(c["text"])  # plain text: one turn, as the reference's file demo reads it
    out = tmp_path / "out.wav"
    args = ["synth", "--model", str(TINY), "--script", str(script), "--voice", str(VOICE)]
    args += ["--seed", str(c["seed"]), "--steps", "5", "--cfg-scale", str(c["cfg_scale"])]
    args += ["--dtype", "float32", "--device", "cpu", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    audio, rate = read_wav(out.read_bytes())
    want = RECORDED["audio" + c["suffix"]].numpy().reshape(-1)
    assert rate == 24000 and audio.shape == want.shape
    assert float(np.abs(audio - want).max()) <= 1e-4


# -- batched ---------------------------------------------------------------------------------------


TEXTS = [
    "Hello there, and welcome to the show.",
    "Good morning, good evening, welcome back.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech, first audio, turns and voices.",
]


def test_four_sessions_in_one_batch_each_equal_its_solo_run(backend: RealtimeBackend) -> None:
    solo = [speak(backend, 10 + i, 1.5, t)[0] for i, t in enumerate(TEXTS)]
    sessions = [open_session(backend, 10 + i, 1.5) for i in range(len(TEXTS))]
    runners = [
        backend.runner(s, TurnFeed([Turn(0, 0, t)])) for s, t in zip(sessions, TEXTS, strict=True)
    ]
    audio: dict[RealtimeRunner, list[np.ndarray]] = {r: [] for r in runners}
    live = list(runners)
    steps_together = 0
    while live:
        results = backend.group.run(list(live))
        steps_together += len(live) > 1
        for r, events in results.items():
            assert isinstance(r, RealtimeRunner) and not isinstance(events, BaseException)
            if events is None:
                live.remove(r)
            else:
                collect(events, audio[r], [])
    for r in runners:
        r.close()
    assert steps_together > 10  # they really shared steps
    for r, want in zip(runners, solo, strict=True):
        got = np.concatenate(audio[r])
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-5


def test_steps_trace_whole_and_their_op_counts_do_not_grow_with_sessions(
    backend: RealtimeBackend,
) -> None:
    engine = backend.engine
    preset = backend.preset("voice")
    sessions = [open_session(backend, i, 1.5) for i in range(engine.max_slots)]
    try:
        counts = []
        for k in (1, engine.max_slots):  # sessions taking part in the step
            for s in sessions:
                engine.start_turn(s.slot, preset)
            engine.pool.n_text.copy_(torch.tensor([3] * k + [0] * (engine.max_slots - k)))
            engine.pool.active.copy_(torch.arange(engine.max_slots) < k)
            counts.append(
                (
                    count_ops(lambda: text_step(engine.w, engine.pool)),
                    count_ops(lambda: frame_step(engine.w, engine.pool)),
                )
            )
        assert counts[0] == counts[1]
        for step in (text_step, frame_step):
            compiled = torch.compile(step, backend="eager", fullgraph=True)  # raises on a break
            compiled(engine.w, engine.pool)
    finally:
        for s in sessions:
            backend.close_session(s)


# -- text that streams in --------------------------------------------------------------------------

WHOLE = "Hello there, and welcome to the show. Shall we start?"


def pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def stream_turn(
    backend: RealtimeBackend, parts: list[str], when: Callable[[RealtimeRunner, int], bool]
) -> tuple[np.ndarray, int, list[Turn]]:
    """One streamed turn: piece k is written once `when(runner, unit)` says so (after the
    turn opened). Returns (audio, units the session sat out waiting for text, turn_starts)."""
    session = open_session(backend, 3, 1.5)
    feed = TurnFeed([Turn(0, 0, parts[0])], more=False, open_last=True)
    runner = backend.runner(session, feed)
    audio: list[np.ndarray] = []
    started: list[Turn] = []
    waited = unit = 0
    left = list(parts[1:])
    try:
        while True:
            while left and when(runner, unit):
                feed.write(0, left.pop(0), final=not left)
            if not left and feed.open_turn is not None:
                feed.write(0, "", final=True)
            if not runner.ready():
                waited += 1
                assert left, "a session with all its text must never wait"
                feed.write(0, left.pop(0), final=len(left) == 0)
                continue
            events = runner.run()
            unit += 1
            if events is None:
                break
            started += [e.turn for e in events if isinstance(e, TurnStarted)]
            collect(events, audio, [])
    finally:
        runner.close()
    return np.concatenate(audio), waited, started


@pytest.mark.parametrize(
    "cuts",
    [[], [3], [7, 8, 9, 20], list(range(1, len(WHOLE), 4)), [len(WHOLE) - 1]],
    ids=["whole", "mid-word", "small", "every-4-chars", "last-char"],
)
def test_pieces_that_come_faster_than_speech_give_the_whole_texts_audio(
    backend: RealtimeBackend, cuts: list[int]
) -> None:
    want, _ = speak(backend, 3, 1.5, WHOLE)
    # Every piece is there before the engine needs it: all written before the second unit.
    got, waited, started = stream_turn(backend, pieces(WHOLE, cuts), lambda r, unit: unit >= 1)
    assert waited == 0
    assert got.shape == want.shape and float(np.abs(got - want).max()) == 0.0
    assert len(started) == 1 and WHOLE.startswith(started[0].text)


def test_pieces_that_come_slower_only_pause_the_audio(backend: RealtimeBackend) -> None:
    want, frames = speak(backend, 3, 1.5, WHOLE)
    words = WHOLE.split(" ")
    parts = [w + " " for w in words[:-1]] + [words[-1]]
    # A piece only when the session has nothing left to say: it waits for every window.
    got, waited, _ = stream_turn(backend, parts, lambda r, unit: False)
    assert waited >= 3  # it did sit out steps, waiting for text
    # No frame repeated, none missing: the same frames, in order, only later in time.
    assert got.shape == want.shape and float(np.abs(got - want).max()) == 0.0
    assert len(got) == frames * 3200


def test_dialogue_turns_speak_with_their_speakers_presets(backend: RealtimeBackend) -> None:
    voice = load_preset(VOICE)
    other = load_preset(VOICE)
    other.name = "other"
    other.tts_lm.v.mul_(0.5)  # another voice: what its prompt holds differs
    two = RealtimeBackend(backend.rt, {"voice": voice, "other": other}, slots=2, window=1024)
    speakers = [SpeakerVoice("a", voice_id="voice"), SpeakerVoice("b", voice_id="other")]
    turns = [Turn(0, 0, TEXTS[0]), Turn(1, 1, TEXTS[1])]

    def take(feed: TurnFeed, replayed: list) -> tuple[dict[int, np.ndarray], list[TurnEnded]]:
        session = two.open_session(speakers, SynthesisParams(3, "turns", 1.5, 5))
        runner = two.runner(session, feed, replayed)
        audio: dict[int, list[np.ndarray]] = {}
        ends: list[TurnEnded] = []
        while (events := runner.run()) is not None:
            for e in events:
                if isinstance(e, TurnAudio):
                    audio.setdefault(e.turn, []).append(e.pcm)
            collect(events, [], ends)
        runner.close()
        return {t: np.concatenate(a) for t, a in audio.items()}, ends

    both, ends = take(TurnFeed(turns), [])
    assert [e.turn for e in ends] == [0, 1]
    # Turn 1 again, on its own, from turn 0's carry (what the turn cache does): the same audio,
    # so it was made from the second speaker's preset and the generator where turn 0 left it.
    again, _ = take(TurnFeed(turns), [ends[0].carry])
    assert list(again) == [1] and np.array_equal(again[1], both[1])
    # And that preset matters: speaker 0's voice for the same line gives other audio.
    swapped, _ = take(TurnFeed([turns[0], Turn(1, 0, TEXTS[1])]), [ends[0].carry])
    assert not np.array_equal(swapped[1][: len(both[1])], both[1][: len(swapped[1])])


def test_a_parked_session_comes_back_in_another_slot_exactly_where_it_was(
    backend: RealtimeBackend,
) -> None:
    want, _ = speak(backend, 8, 1.5, TEXTS[2])
    session = open_session(backend, 8, 1.5)
    runner = backend.runner(session, TurnFeed([Turn(0, 0, TEXTS[2])]))
    audio: list[np.ndarray] = []
    for _ in range(9):  # into its second window
        events = runner.run()
        assert events is not None
        collect(events, audio, [])
    first = runner.slot
    runner.park()
    blocker = open_session(backend, 0, 1.5)  # takes the freed slot
    assert blocker.slot == first
    while (events := runner.run()) is not None:
        collect(events, audio, [])
    assert runner.slot != first
    runner.close()
    backend.close_session(blocker)
    got = np.concatenate(audio)
    assert got.shape == want.shape and float(np.abs(got - want).max()) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_replay_what_the_eager_steps_compute() -> None:
    rt = load_realtime(str(TINY), "cuda", "float32")
    presets = {"voice": load_preset(VOICE)}
    takes = []
    for graphs in (False, True):
        b = RealtimeBackend(rt, presets, slots=2, window=512, graphs=graphs)
        takes.append(speak(b, 5, 1.5, TEXTS[0])[0])
    assert takes[0].shape == takes[1].shape
    assert float(np.abs(takes[0] - takes[1]).max()) <= 1e-5
