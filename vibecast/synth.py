"""`vibecast synth`: the 24 kHz float audio of a whole script, for parity checks and offline use."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine.script import ScriptError, parse_script
from .engine.vibevoice.backend import at_24k, read_voice_file
from .engine.vibevoice.generate import encode_turn, generate_continuous, open_session, render_turn
from .engine.vibevoice.weights import CheckpointError, load_runtime
from .protocol.wav import wav_bytes


def synthesize(
    model: str,
    script: str,
    voices: list[str],
    mode: str,
    seed: int,
    steps: int,
    cfg_scale: float,
    device: str,
    dtype: str,
) -> np.ndarray:
    lines = [(line.speaker, line.text) for line in parse_script(script)]
    wavs = [at_24k(*read_voice_file(Path(v), f"--voice {v}")) for v in voices]
    speakers = max(s for s, _ in lines) + 1
    if len(wavs) < speakers:
        raise ValueError(
            f"the script has {speakers} speakers but {len(wavs)} --voice files were given"
        )
    rt = load_runtime(model, device, dtype)
    if mode == "continuous":
        _, audio = generate_continuous(rt, lines, wavs, cfg_scale, steps, seed)
        return audio
    session = open_session(rt, wavs[:speakers], seed, cfg_scale, steps)
    chunks = []
    for i, (speaker, text) in enumerate(lines):
        chunks += list(render_turn(rt, session, encode_turn(rt, session, speaker, text, i % 2)))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def run_synth(args: Any) -> int:
    try:
        script = Path(args.script).read_text("utf-8")
        with torch.inference_mode():
            audio = synthesize(
                args.model,
                script,
                args.voice,
                args.mode,
                args.seed,
                args.steps,
                args.cfg_scale,
                args.device,
                args.dtype,
            )
    except (OSError, ValueError, ScriptError, CheckpointError) as e:
        print(f"vibecast synth: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_bytes(wav_bytes(audio, 24000, float32=True))
    print(f"wrote {args.out}: {len(audio)} samples at 24000 Hz ({len(audio) / 24000:.2f} s)")
    return 0
