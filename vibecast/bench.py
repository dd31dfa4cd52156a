"""`vibecast bench`: numbers, not assertions.

- first audio: time from sending `start` to the first `audio` message, over `--runs` sessions
  on a warm server (each cancelled once its first audio arrives), p50 and p95;
- real-time factor of a whole 4-speaker, 8-turn dialogue (engine compute / audio length, as
  the server reports it, and client wall time / audio length);
- the same dialogue through the turn pipeline in this process, with and without overlap;
- each default voice's median pitch and speaking rate, measured on the audio.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import threading
import time
from typing import Any

import numpy as np

from .engine.backend import SpeakerVoice, SynthesisParams, Turn
from .engine.pipeline import TurnAudio, TurnFeed, run_turns
from .engine.pitch import median_f0
from .protocol import Audio, Client, Done, TurnEnd
from .protocol.opus import OpusDecoder

DIALOGUE = [
    (0, "Welcome back to the show. Today we are talking about streaming speech."),
    (1, "Thanks for having me. It is a topic close to my heart."),
    (2, "Let's start simple. Why does the first second of audio matter so much?"),
    (3, "Because a listener decides in that second whether the thing feels alive."),
    (0, "And after that second, what keeps it feeling alive?"),
    (1, "No gaps, no clicks, and never running out of audio while the rest is made."),
    (2, "So the server has to stay ahead of the listener the whole time."),
    (3, "Exactly, and it should tell you how far ahead it is, every second."),
]


def _turns() -> list[dict[str, Any]]:
    return [{"speaker": s, "text": t} for s, t in DIALOGUE]


async def first_audio_times(url: str, token: str | None, voices: list[str], runs: int) -> list[float]:
    speakers = [{"voice": voices[i % len(voices)]} for i in range(4)]
    times = []
    for i in range(runs + 1):  # the first run warms caches and is not counted
        async with await Client.connect(url, token=token) as client:
            t0 = time.perf_counter()
            await client.start(speakers, _turns(), options={"seed": i})
            async for msg in client:
                if isinstance(msg, Audio):
                    if i:
                        times.append(time.perf_counter() - t0)
                    await client.cancel()
                    break
            async for _ in client:  # drain until the server closes after `cancelled`
                pass
    return times


async def full_dialogue(url: str, token: str | None, voices: list[str]) -> dict[str, Any]:
    speakers = [{"voice": voices[i % len(voices)]} for i in range(4)]
    decoder = OpusDecoder(48000)
    per_turn: dict[int, list[np.ndarray]] = {}
    async with await Client.connect(url, token=token) as client:
        t0 = time.perf_counter()
        ready = await client.start(speakers, _turns(), options={"seed": 1})
        skip = ready.format["pre_skip"]
        done: Done | None = None
        async for msg in client:
            if isinstance(msg, Audio) and msg.packets:
                per_turn.setdefault(msg.turn, []).extend(decoder.decode(p) for p in msg.packets)
            elif isinstance(msg, Done):
                done = msg
            elif isinstance(msg, TurnEnd):
                pass
        wall = time.perf_counter() - t0
    assert done is not None, "the server closed before done"
    audio_s = done.duration_ms / 1000
    voices_out = {}
    for speaker in range(4):
        chunks = [np.concatenate(per_turn[t]) for t, (s, _) in enumerate(DIALOGUE) if s == speaker]
        audio = np.concatenate(chunks)
        if speaker == DIALOGUE[0][0]:
            audio = audio[skip:]
        chars = sum(len(text) for s, text in DIALOGUE if s == speaker)
        voices_out[speakers[speaker]["voice"]] = {
            "median_f0_hz": round(median_f0(audio, 48000), 1),
            "chars_per_s": round(chars / (len(audio) / 48000), 1),
        }
    return {
        "audio_s": audio_s,
        "wall_s": round(wall, 3),
        "rtf_engine": done.stats.get("rtf"),
        "rtf_wall": round(wall / audio_s, 4),
        "ttfa_ms": done.stats.get("ttfa_ms"),
        "voices": voices_out,
    }


def pipeline_walls(backend: Any, repeats: int = 3) -> dict[str, Any]:
    speakers = [SpeakerVoice(v.id, voice_id=v.id) for v in backend.voices()[:4]]
    turns = [Turn(i, s % len(speakers), t) for i, (s, t) in enumerate(DIALOGUE)]
    walls: dict[str, list[float]] = {"pipelined": [], "sequential": []}
    samples = 0
    for r in range(repeats):
        for name, overlap in (("pipelined", True), ("sequential", False)):
            session = backend.open_session(speakers, SynthesisParams(seed=r, mode=backend.modes[0]))
            t0 = time.perf_counter()
            samples = sum(
                len(e.pcm)
                for e in run_turns(backend, session, TurnFeed(turns), threading.Event(), overlap)
                if isinstance(e, TurnAudio)
            )
            walls[name].append(time.perf_counter() - t0)
            backend.close_session(session)
    pipelined = statistics.median(walls["pipelined"])
    sequential = statistics.median(walls["sequential"])
    return {
        "audio_s": round(samples / backend.sample_rate, 2),
        "pipelined_s": round(pipelined, 3),
        "sequential_s": round(sequential, 3),
        "saved_pct": round(100 * (1 - pipelined / sequential), 1),
    }


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run_bench(args: Any) -> int:
    from .engine.loader import load_backend
    from .server.config import ServerConfig
    from .server.run import ServerThread

    runs = max(10, args.runs)
    backend = load_backend(args.model, args.device, args.dtype, args.voices)
    backend.warmup()
    server = None
    url = args.server
    if url is None:
        config = ServerConfig(host="127.0.0.1", port=0, model=args.model, max_sessions=1)
        server = ServerThread(config, backend=backend).start()
        url = server.ws_url
    try:
        voices = [v.id for v in backend.voices()] if args.server is None else _server_voices(url, args.token)
        ttfa = asyncio.run(first_audio_times(url, args.token, voices, runs))
        dialogue = asyncio.run(full_dialogue(url, args.token, voices))
    finally:
        if server is not None:
            server.stop()
    walls = pipeline_walls(backend)
    result = {
        "model": backend.name,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}",
        "first_audio_ms": {
            "runs": len(ttfa),
            "p50": round(percentile(ttfa, 50) * 1000, 1),
            "p95": round(percentile(ttfa, 95) * 1000, 1),
            "min": round(min(ttfa) * 1000, 1),
            "max": round(max(ttfa) * 1000, 1),
        },
        "dialogue": dialogue,
        "pipeline": walls,
    }
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _server_voices(url: str, token: str | None) -> list[str]:
    from .say import fetch_voices

    return fetch_voices(url, token)


def _print(r: dict[str, Any]) -> None:
    f, d, p = r["first_audio_ms"], r["dialogue"], r["pipeline"]
    print(f"model    {r['model']}")
    print(f"machine  {r['machine']}")
    print(f"first audio ({f['runs']} warm runs)  p50 {f['p50']} ms   p95 {f['p95']} ms   "
          f"(min {f['min']}, max {f['max']})")
    print(f"8-turn dialogue  {d['audio_s']:.1f} s audio in {d['wall_s']:.2f} s: RTF engine "
          f"{d['rtf_engine']}, RTF wall {d['rtf_wall']}")
    print(f"pipeline  pipelined {p['pipelined_s']} s  sequential {p['sequential_s']} s  "
          f"({p['saved_pct']}% saved, {p['audio_s']} s audio)")
    for voice, v in d["voices"].items():
        print(f"voice {voice:12s} median F0 {v['median_f0_hz']:6.1f} Hz   {v['chars_per_s']} chars/s")
