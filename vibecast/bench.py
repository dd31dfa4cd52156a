"""`vibecast bench`: numbers, not assertions.

For any model:
- first audio: time from sending `start` to the first `audio` message, over `--runs` sessions
  of a 4-speaker script on a warm server (each cancelled once its first audio arrives);
- real-time factor of a 4-speaker, 8-turn dialogue, as the server reports it (engine compute /
  audio) and as the client sees it (wall / audio);
- the same dialogue through the turn pipeline in this process, with and without the overlap,
  and the share of each next turn's text stage that ran hidden behind the current render.
For the Piper voice: each default voice's median pitch and speaking rate, measured on the audio.
For VibeVoice: the time to compute one frame (LM step, CFG diffusion, decoder, semantic encoder).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

from .engine.backend import SpeakerVoice
from .engine.pitch import median_f0
from .protocol import Audio, Cancelled, Client, Done
from .protocol.opus import OpusDecoder
from .protocol.wav import wav_bytes

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


def synthetic_voice(i: int, seconds: float = 3.0) -> np.ndarray:
    """A harmonic tone with vibrato, for models that need a voice prompt and have none."""
    t = np.arange(int(24000 * seconds)) / 24000
    f0 = 110.0 * 2 ** (i / 4)
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / 24000
    harmonics = sum((np.sin(k * phase) / k for k in range(1, 6)), start=np.zeros_like(phase))
    return (0.2 * harmonics).astype(np.float32)


def speaker_specs(voices: list[str]) -> list[dict[str, Any]]:
    if voices:
        return [{"voice": voices[i % len(voices)]} for i in range(4)]
    return [
        {"voice_audio": wav_bytes(synthetic_voice(i), 24000), "voice_format": "wav"}
        for i in range(4)
    ]


def speaker_voices(backend: Any) -> list[SpeakerVoice]:
    voices = backend.voices()
    if voices:
        return [
            SpeakerVoice(voices[i % len(voices)].id, voice_id=voices[i % len(voices)].id)
            for i in range(4)
        ]
    return [SpeakerVoice(f"s{i}", audio=synthetic_voice(i), audio_rate=24000) for i in range(4)]


async def first_audio_times(
    url: str, token: str | None, speakers: list[dict[str, Any]], runs: int
) -> tuple[list[float], list[float]]:
    """(start -> first audio, cancel -> cancelled) in seconds, per warm run."""
    times, cancels = [], []
    for i in range(runs + 1):  # the first run warms caches and is not counted
        async with await Client.connect(url, token=token) as client:
            t0 = time.perf_counter()
            await client.start(speakers, _turns(), options={"seed": i})
            async for msg in client:
                if isinstance(msg, Audio) and msg.samples:
                    first = time.perf_counter()
                    await client.cancel()
                    break
            async for msg in client:  # until the server closes after `cancelled`
                if isinstance(msg, Cancelled) and i:
                    times.append(first - t0)
                    cancels.append(time.perf_counter() - first)
    return times, cancels


async def full_dialogue(
    url: str, token: str | None, speakers: list[dict[str, Any]], pitch: bool
) -> dict[str, Any]:
    decoder = OpusDecoder(48000)
    per_turn: dict[int, list[np.ndarray]] = {}
    async with await Client.connect(url, token=token) as client:
        t0 = time.perf_counter()
        ready = await client.start(speakers, _turns(), options={"seed": 1})
        done: Done | None = None
        async for msg in client:
            if isinstance(msg, Audio) and msg.packets:
                per_turn.setdefault(msg.turn, []).extend(decoder.decode(p) for p in msg.packets)
            elif isinstance(msg, Done):
                done = msg
        wall = time.perf_counter() - t0
    assert done is not None, "the server closed before done"
    audio_s = done.duration_ms / 1000
    out: dict[str, Any] = {
        "audio_s": audio_s,
        "wall_s": round(wall, 3),
        "rtf_engine": done.stats.get("rtf"),
        "rtf_wall": round(wall / audio_s, 4) if audio_s else None,
    }
    if pitch:
        skip = ready.format["pre_skip"]
        voices = {}
        for speaker in range(4):
            turns = [t for t, (s, _) in enumerate(DIALOGUE) if s == speaker]
            audio = np.concatenate([np.concatenate(per_turn[t]) for t in turns])
            if turns[0] == 0:
                audio = audio[skip:]
            chars = sum(len(text) for s, text in DIALOGUE if s == speaker)
            voices[speakers[speaker]["voice"]] = {
                "median_f0_hz": round(median_f0(audio, 48000), 1),
                "chars_per_s": round(chars / (len(audio) / 48000), 1),
            }
        out["voices"] = voices
    return out


def frame_times(backend: Any, frames: int = 40, steps: int = 10) -> dict[str, Any]:
    """The cost of one VibeVoice frame, on the real hot path, independent of token choices."""
    import torch

    from .engine.vibevoice.generate import encode_turn, open_session

    rt = backend.rt
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    vs = open_session(rt, [synthetic_voice(0)], seed=0, cfg_scale=1.3, steps=steps)
    turn = encode_turn(rt, vs, 0, "A sentence long enough to give the frames some room to run.", 0)
    s = turn.streams
    times = []
    with torch.inference_mode():
        for i in range(frames + 5):
            sync()
            t0 = time.perf_counter()
            audio, emb = rt.speech(s, rt.noise(vs.gen), 1.3, steps, vs.acoustic, vs.semantic)
            s.neg += 1
            rt.step(s, emb)
            rt.choose(s.h_pos)
            audio.cpu()
            sync()
            if i >= 5:  # after warm-up
                times.append(time.perf_counter() - t0)
    ms = [t * 1000 for t in times]
    return {
        "frames": len(ms),
        "diffusion_steps": steps,
        "p50_ms": round(statistics.median(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "rtf": round(statistics.median(ms) / (1000 * 3200 / 24000), 4),
        "device": str(rt.device),
        "dtype": str(rt.dtype).replace("torch.", ""),
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
    is_vibevoice = hasattr(backend, "rt")
    server = None
    url = args.server
    if url is None:
        config = ServerConfig(host="127.0.0.1", port=0, model=args.model, max_sessions=1)
        server = ServerThread(config, backend=backend).start()
        url = server.ws_url
    try:
        if args.server is None:
            voices = [v.id for v in backend.voices()]
        else:
            from .say import fetch_voices

            voices = fetch_voices(url, args.token)
        speakers = speaker_specs(voices)
        ttfa, cancels = asyncio.run(first_audio_times(url, args.token, speakers, runs))
        dialogue = asyncio.run(full_dialogue(url, args.token, speakers, pitch=not is_vibevoice))
    finally:
        if server is not None:
            server.stop()
    result: dict[str, Any] = {
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
        "cancel_ms": {
            "p50": round(percentile(cancels, 50) * 1000, 1),
            "max": round(max(cancels) * 1000, 1),
        },
        "dialogue": dialogue,
    }
    if is_vibevoice:
        result["frame"] = frame_times(backend)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _print(r: dict[str, Any]) -> None:
    f, d = r["first_audio_ms"], r["dialogue"]
    print(f"model    {r['model']}")
    print(f"machine  {r['machine']}")
    print(
        f"first audio ({f['runs']} warm runs)  p50 {f['p50']} ms   p95 {f['p95']} ms   "
        f"(min {f['min']}, max {f['max']})"
    )
    print(f"cancel -> cancelled  p50 {r['cancel_ms']['p50']} ms   max {r['cancel_ms']['max']} ms")
    print(
        f"8-turn dialogue  {d['audio_s']:.1f} s audio in {d['wall_s']:.2f} s: RTF engine "
        f"{d['rtf_engine']}, RTF wall {d['rtf_wall']}"
    )
    for voice, v in d.get("voices", {}).items():
        print(
            f"voice {voice:12s} median F0 {v['median_f0_hz']:6.1f} Hz   {v['chars_per_s']} chars/s"
        )
    if "frame" in r:
        fr = r["frame"]
        print(
            f"frame  p50 {fr['p50_ms']} ms, mean {fr['mean_ms']} ms over {fr['frames']} frames "
            f"({fr['diffusion_steps']} diffusion steps, {fr['device']} {fr['dtype']}): "
            f"RTF {fr['rtf']}"
        )
