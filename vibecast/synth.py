"""`vibecast synth`: the 24 kHz float audio of a whole script, for parity checks and offline use."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from .engine.backend import SpeakerVoice, SynthesisParams, Turn
from .engine.pipeline import TurnAudio, TurnFeed
from .engine.script import ScriptError, parse_script
from .engine.vibevoice.backend import VibeVoiceBackend, at_24k, drive, read_voice_file
from .engine.vibevoice.generate import FRAMES_PER_TOKEN, FRAMES_SLACK
from .engine.vibevoice.weights import CheckpointError, load_runtime
from .protocol.messages import ProtocolError
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
    window = None  # context and turns: the server's window
    if mode == "continuous":  # context with a window that holds the whole script
        text = sum(len(rt.tok.encode(t)) + 8 for _, t in lines)
        need = (
            1024
            + text
            + sum(
                FRAMES_PER_TOKEN * (len(rt.tok.encode(t)) + 8) + FRAMES_SLACK + 3 for _, t in lines
            )
        )
        window = min(need, rt.cfg.lm.max_position_embeddings)
    backend = VibeVoiceBackend(rt, rt.name, {}, slots=1, window=window, steps=steps)
    params = SynthesisParams(seed, "turns" if mode == "turns" else "context", cfg_scale, steps)
    voices_ = [
        SpeakerVoice(f"speaker {i}", audio=w, audio_rate=24000)
        for i, w in enumerate(wavs[:speakers])
    ]
    slot = backend.open_session(voices_, params)
    turns = [Turn(i, speaker, text) for i, (speaker, text) in enumerate(lines)]
    backend.check_turns(slot, turns)
    chunks = [
        e.pcm for e in drive(backend.runner(slot, TurnFeed(turns))) if isinstance(e, TurnAudio)
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def run_synth(args: Any) -> int:
    try:
        script = Path(args.script).read_text("utf-8")
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
    except ProtocolError as e:
        print(f"vibecast synth: {e.message}", file=sys.stderr)
        return 2
    Path(args.out).write_bytes(wav_bytes(audio, 24000, float32=True))
    print(f"wrote {args.out}: {len(audio)} samples at 24000 Hz ({len(audio) / 24000:.2f} s)")
    return 0
