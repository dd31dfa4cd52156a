"""`vibecast bench --stream-text`: VibeVoice-Realtime with its text arriving word by word, as
an LLM writes it. Measures first audio from the first text piece, and each word's lag from
arriving to the start of the audio of the window that holds it (the model speaks a window's
5 text tokens in the 6 frames after it, so that frame is where the word's audio begins).

Runs in this process on the engine loop the server uses (engine/scheduler.py), so the numbers
are the engine's, without the network. `realtime_steps` times the batched steps alone
(scripts/gpu-check): text window and frame, at a number of sessions.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

from .engine.backend import SpeakerVoice, SynthesisParams, Turn
from .engine.pipeline import PipelineEvent, TurnAudio, TurnFeed
from .engine.scheduler import Scheduler
from .engine.vibevoice.realtime import SPEECH_WINDOW, TEXT_WINDOW
from .engine.vibevoice.realtime_backend import RealtimeBackend
from .engine.vibevoice.realtime_text import clean

TEXT = (
    "Streaming speech starts before the sentence is finished. Each word is spoken a moment "
    "after it arrives, while the language model is still writing the rest of the answer, and "
    "the listener never waits for the whole paragraph."
)


class _Sink:
    """Records when each unit's events came out of the engine."""

    def __init__(self) -> None:
        self.events: list[tuple[float, PipelineEvent]] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def lead_s(self) -> float:
        return 0.0

    def wants_more(self) -> bool:
        return True

    def put(self, events: list[PipelineEvent], busy_s: float) -> None:
        now = time.perf_counter()
        self.events += [(now, e) for e in events]

    def hold(self, held: bool) -> None:
        return None

    def end(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()


def stream_text(
    backend: RealtimeBackend, words_per_s: float, text: str = TEXT, forced: bool = False
) -> dict[str, Any]:
    """One session whose single turn arrives a word at a time, `words_per_s` words a second.
    `forced`: random weights, whose EOS classifier fires anywhere: the turn lasts exactly as
    many frames as its windows need."""
    words = text.split(" ")
    parts = [w + " " for w in words[:-1]] + [words[-1]]
    tok = backend.rt.tok
    ids = len(tok.encode(clean(text).strip() + "\n"))
    frames = SPEECH_WINDOW * (-(-ids // TEXT_WINDOW) + 1) if forced else None
    params = SynthesisParams(0, "turns", None, None, frames_per_turn=frames)
    voice = backend.voices()[0].id
    session = backend.open_session([SpeakerVoice("bench", voice_id=voice)], params)
    feed = TurnFeed([Turn(0, 0, "")], more=False, open_last=True)
    sink = _Sink()
    loop = Scheduler("bench")
    try:
        loop.add(backend.runner(session, feed), sink)
        arrived = []
        for i, part in enumerate(parts):
            arrived.append(time.perf_counter())
            feed.write(0, part, final=i == len(parts) - 1)
            loop.wake()
            time.sleep(1 / words_per_s)  # the writer's pace (a benchmark, not a test)
        sink.done.wait()
    finally:
        loop.close()  # closes the runner, which frees the slot
    if sink.error is not None:
        raise sink.error
    audio = [t for t, e in sink.events if isinstance(e, TurnAudio)]
    lags = []
    for i in range(len(words)):
        # The word's last token: words end at pre-token boundaries, so the ids of the text up
        # to it are a prefix of the whole text's ids.
        last = len(tok.encode(clean(" ".join(words[: i + 1])).strip())) - 1
        first_frame = SPEECH_WINDOW * (last // TEXT_WINDOW)
        if first_frame < len(audio):
            lags.append(1000 * (audio[first_frame] - arrived[i]))
    return {
        "words": len(words),
        "words_per_s": words_per_s,
        "text_tokens": ids,
        "frames": len(audio),
        "first_audio_ms": round(1000 * (audio[0] - arrived[0]), 1) if audio else None,
        "word_lag_ms": {
            "p50": round(statistics.median(lags), 1),
            "p95": round(sorted(lags)[int(0.95 * (len(lags) - 1))], 1),
            "max": round(max(lags), 1),
        }
        if lags
        else None,
        "audio_s": round(len(audio) * 3200 / 24000, 2),
        "wall_s": round(audio[-1] - arrived[0], 2) if audio else None,
    }


def realtime_steps(
    backend: RealtimeBackend, sessions: int, steps: int = 20, warmup: int = 3
) -> dict[str, float]:
    """The batched steps with `sessions` slots all speaking (the engine's max_slots must hold
    them): ms per frame step and per text step, frames per second, real time per session."""
    engine = backend.engine
    preset = backend.preset(backend.voices()[0].id)
    for i in range(sessions):
        engine.open(i, i, 1.5)
        engine.start_turn(i, preset)
    slots = list(range(sessions))
    window = {i: [backend.rt.tok.eos] * TEXT_WINDOW for i in slots}

    def timed(fn: Any, n: int) -> float:
        for _ in range(warmup):
            fn()
        backend.rt.sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        backend.rt.sync()
        return (time.perf_counter() - start) / n

    try:
        frame_s = timed(lambda: engine.step({}, slots), steps)
        both_s = timed(lambda: engine.step(window, slots), max(2, steps // SPEECH_WINDOW))
    finally:
        for i in slots:
            engine.close(i)
    text_ops, frame_ops = engine.ops_per_step()
    return {
        "sessions": sessions,
        "frame_ms": 1000 * frame_s,
        "text_window_ms": 1000 * (both_s - frame_s),
        "frames_per_s": sessions / frame_s,
        # a window: one text step and 6 frames; 6 frames are 0.8 s of audio
        "realtime_x": (SPEECH_WINDOW * 3200 / 24000) / (both_s + (SPEECH_WINDOW - 1) * frame_s),
        "ops_frame": frame_ops,
        "ops_text": text_ops,
    }


def run_stream_text_bench(args: Any) -> int:
    from .engine.loader import load_backend

    backend = load_backend(args.model, args.device, args.dtype, args.voices)
    if not isinstance(backend, RealtimeBackend):
        print("vibecast bench --stream-text: --model must be VibeVoice-Realtime")
        return 2
    backend.warmup()
    forced = backend.name.startswith("vibevoice:random")
    results: dict[str, Any] = {"model": backend.name, "device": str(backend.rt.device)}
    results["runs"] = [stream_text(backend, rate, forced=forced) for rate in args.words_per_s]
    most = backend.engine.max_slots
    results["steps"] = [realtime_steps(backend, n) for n in sorted({1, min(4, most), most})]
    for r in results["runs"]:
        lag = r["word_lag_ms"] or {}
        print(
            f"{r['words_per_s']:5.1f} words/s: first audio {r['first_audio_ms']} ms after the "
            f"first word; word to its audio p50 {lag.get('p50')} ms, p95 {lag.get('p95')} ms, "
            f"max {lag.get('max')} ms; {r['audio_s']} s of audio in {r['wall_s']} s"
        )
    for s in results["steps"]:
        print(
            f"{s['sessions']:4d} sessions: frame {s['frame_ms']:.1f} ms, text window "
            f"{s['text_window_ms']:.1f} ms, {s['frames_per_s']:.1f} frames/s, "
            f"{s['realtime_x']:.2f}x real time each, ops {s['ops_text']}+{s['ops_frame']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
