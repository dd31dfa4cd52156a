"""`vibecast bench --context-minutes M`: one VibeVoice session in `context` mode through a
script of M minutes (every turn forced to a fixed length), sampling the process's resident
memory each minute of speech and counting the context rebuilds and their prefill time."""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from .engine.backend import SynthesisParams, Turn
from .engine.pipeline import TurnAudio, TurnFeed
from .engine.vibevoice.backend import VibeVoiceBackend, drive
from .engine.vibevoice.config import SAMPLE_RATE

FRAMES_PER_MINUTE = 450  # 7.5 frames per second


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def long_take(
    backend: VibeVoiceBackend, minutes: float, frames_per_turn: int, seed: int = 0
) -> dict[str, Any]:
    from .bench import speaker_voices

    frames = round(minutes * FRAMES_PER_MINUTE)
    turns = [
        Turn(i, i % 4, f"Line {i} of a long take, said at a length the benchmark sets.")
        for i in range(-(-frames // frames_per_turn))
    ]
    params = SynthesisParams(seed, "context", frames_per_turn=frames_per_turn)
    slot = backend.open_session(speaker_voices(backend), params)
    rebuilds = backend.group.rebuilds, backend.group.rebuild_s
    samples: list[dict[str, float]] = []
    made = 0
    start = time.perf_counter()
    for event in drive(backend.runner(slot, TurnFeed(turns))):
        if isinstance(event, TurnAudio):
            made += 1
            if made % FRAMES_PER_MINUTE == 0:
                sample = {
                    "minute": made / FRAMES_PER_MINUTE,
                    "rss_mb": round(rss_mb(), 1),
                    "rebuilds": backend.group.rebuilds - rebuilds[0],
                }
                if backend.rt.device.type == "cuda":
                    sample["gpu_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
                samples.append(sample)
    wall = time.perf_counter() - start
    count = backend.group.rebuilds - rebuilds[0]
    prefill = backend.group.rebuild_s - rebuilds[1]
    at5 = next((s["rss_mb"] for s in samples if s["minute"] >= 5), None)
    return {
        "model": backend.name,
        "minutes": made / FRAMES_PER_MINUTE,
        "audio_s": made * 3200 / SAMPLE_RATE,
        "turns": len(turns),
        "frames_per_turn": frames_per_turn,
        "window": backend.engine.window,
        "wall_s": round(wall, 1),
        "frames_per_s": round(made / wall, 1),
        "rebuilds": count,
        "rebuild_prefill_s": round(prefill, 3),
        "rebuild_ms": round(1000 * prefill / count, 2) if count else None,
        "rebuild_ms_per_turn": round(1000 * prefill / len(turns), 3),
        "rss_growth_from_minute_5": (
            round(samples[-1]["rss_mb"] / at5 - 1, 4) if at5 and samples else None
        ),
        "samples": samples,
    }


def run_context_bench(args: Any) -> int:
    from .engine.loader import load_backend

    backend = load_backend(args.model, args.device, args.dtype, args.voices, 1, args.steps)
    if not isinstance(backend, VibeVoiceBackend):
        raise SystemExit("vibecast bench --context-minutes: needs a VibeVoice --model")
    r = long_take(backend, args.context_minutes, args.frames_per_turn or 100)
    print(
        f"{r['model']}: {r['minutes']:.1f} min of speech in context mode, {r['turns']} turns of "
        f"{r['frames_per_turn']} frames, window {r['window']} positions, {r['wall_s']} s "
        f"({r['frames_per_s']} frames/s)"
    )
    print(f"{'minute':>7} {'RSS MB':>8} {'rebuilds':>9} {'GPU MB':>8}")
    for s in r["samples"]:
        gpu = f"{s['gpu_mb']:>8.1f}" if "gpu_mb" in s else f"{'':>8}"
        print(f"{s['minute']:>7.0f} {s['rss_mb']:>8.1f} {s['rebuilds']:>9} {gpu}")
    growth = r["rss_growth_from_minute_5"]
    print(
        f"rebuilds: {r['rebuilds']}, prefill {r['rebuild_prefill_s']} s in all, "
        f"{r['rebuild_ms']} ms each, {r['rebuild_ms_per_turn']} ms per turn; resident memory "
        f"from minute 5 to the end: "
        + (f"{100 * growth:+.1f} %" if growth is not None else "n/a (shorter than 5 minutes)")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
