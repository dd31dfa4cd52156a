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
from .engine.vibevoice.presets import PresetError, load_preset
from .engine.vibevoice.realtime_backend import RealtimeBackend
from .engine.vibevoice.weights import CheckpointError, is_realtime, load_realtime, load_runtime
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


def synthesize_realtime(
    model: str,
    script: str,
    presets: list[str],
    seed: int,
    steps: int,
    cfg_scale: float,
    device: str,
    dtype: str,
) -> np.ndarray:
    """VibeVoice-Realtime: each turn from its speaker's preset, through the same engine the
    server runs. The noise comes from a generator seeded with `seed` at the start, which draws
    what the reference's file demo draws after `torch.manual_seed(seed)`. A script without
    `Speaker N:` lines is one turn of the first voice, as the reference demo reads a file."""
    try:
        lines = [(line.speaker, line.text) for line in parse_script(script)]
    except ScriptError:
        if any(_is_speaker_line(line) for line in script.splitlines()) or not script.strip():
            raise
        lines = [(0, script.strip())]
    speakers = max(s for s, _ in lines) + 1
    if len(presets) < speakers:
        raise ValueError(
            f"the script has {speakers} speakers but {len(presets)} --voice presets were given"
        )
    loaded = {}
    for path in presets[:speakers]:
        try:
            loaded[path] = load_preset(path)
        except PresetError as e:
            raise ValueError(f"--voice {path}: {e}") from None
    rt = load_realtime(model, device, dtype)
    backend = RealtimeBackend(rt, loaded, slots=1, steps=steps)
    params = SynthesisParams(seed, "turns", cfg_scale, steps)
    voices = [SpeakerVoice(f"speaker {i}", voice_id=p) for i, p in enumerate(presets[:speakers])]
    session = backend.open_session(voices, params)
    turns = [Turn(i, speaker, text) for i, (speaker, text) in enumerate(lines)]
    backend.check_turns(session, turns)
    runner = backend.runner(session, TurnFeed(turns))
    chunks = [e.pcm for e in drive(runner) if isinstance(e, TurnAudio)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _is_speaker_line(line: str) -> bool:
    return line.strip().lower().startswith("speaker")


def run_synth(args: Any) -> int:
    try:
        script = Path(args.script).read_text("utf-8")
        if is_realtime(args.model):
            audio = synthesize_realtime(
                args.model,
                script,
                args.voice,
                args.seed,
                args.steps or 5,
                args.cfg_scale if args.cfg_scale is not None else 1.5,
                args.device,
                args.dtype,
            )
        else:
            audio = synthesize(
                args.model,
                script,
                args.voice,
                args.mode,
                args.seed,
                args.steps or 10,
                args.cfg_scale if args.cfg_scale is not None else 1.3,
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
