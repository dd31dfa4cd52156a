"""VibeVoice behind the engine's backend interface (`turns` mode; `continuous` via synth)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ...protocol.ogg import read_ogg_opus
from ...protocol.opus import OpusDecoder
from ...protocol.wav import read_wav
from ..backend import BadRequest, SpeakerVoice, SynthesisParams, Turn, Voice
from ..lanes import CpuLanes, CudaLanes
from ..resample import resample
from .config import SAMPLE_RATE
from .generate import EncodedTurn, Runtime, VoiceSession, encode_turn, open_session, render_turn
from .tokenizer import TextTokenizer
from .weights import load_model, random_model, resolve

AUDIO_SUFFIXES = (".wav", ".ogg", ".opus")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype in ("bf16", "bfloat16"):
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                raise ValueError(
                    f"--dtype bfloat16 needs an Ampere or newer GPU (compute capability 8.0+); "
                    f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Use --dtype float32."
                )
        return torch.bfloat16
    if dtype in ("fp32", "float32"):
        return torch.float32
    raise ValueError(f"--dtype {dtype}: use bfloat16 or float32")


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 and its rate, from WAV or Ogg Opus bytes."""
    if data[:4] == b"OggS":
        ogg = read_ogg_opus(data)
        decoder = OpusDecoder(48000)
        pcm = np.concatenate([decoder.decode(p) for p in ogg.packets])
        decoder.close()
        return pcm[ogg.pre_skip : ogg.pre_skip + ogg.samples_48k], 48000
    return read_wav(data)


def at_24k(audio: np.ndarray, rate: int) -> np.ndarray:
    return audio if rate == SAMPLE_RATE else resample(audio, rate, SAMPLE_RATE)


@dataclass
class _Session:
    voice: VoiceSession


class VibeVoiceBackend:
    modes = ("turns",)
    sample_rate = SAMPLE_RATE

    def __init__(self, rt: Runtime, name: str, voices: dict[str, np.ndarray]) -> None:
        self.rt = rt
        self.name = name
        self._voices = voices
        self.lanes = CudaLanes(rt.device) if rt.device.type == "cuda" else CpuLanes()

    @staticmethod
    def load(model: str, device: str = "auto", dtype: str = "auto", voices: str | None = None) -> VibeVoiceBackend:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        if model.startswith("random:"):  # released dimensions, random weights: for benchmarks
            size = model.split(":", 1)[1]
            rt = Runtime(random_model(size, dev, dt), TextTokenizer.placeholder(), dev, dt)
            name = f"vibevoice:random-{size}"
        else:
            directory = resolve(model)
            rt = Runtime(load_model(directory, dev, dt), TextTokenizer.load(directory), dev, dt)
            name = f"vibevoice:{directory.name}"
        catalogue: dict[str, np.ndarray] = {}
        if voices:
            folder = Path(voices)
            if not folder.is_dir():
                raise ValueError(f"--voices {voices}: not a directory")
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in AUDIO_SUFFIXES:
                    audio, rate = read_audio(f.read_bytes())
                    catalogue[f.stem] = at_24k(audio, rate)
            if not catalogue:
                raise ValueError(f"--voices {voices}: no .wav, .ogg or .opus files in it")
        return VibeVoiceBackend(rt, name, catalogue)

    def voices(self) -> list[Voice]:
        return [
            Voice(name, name, f"voice prompt from {name} ({len(a) / SAMPLE_RATE:.1f} s)")
            for name, a in self._voices.items()
        ]

    def check_params(self, params: SynthesisParams) -> None:
        if params.mode not in self.modes:
            raise BadRequest(
                "bad_field",
                "options.mode",
                f"options.mode {params.mode!r} cannot stream; the server runs 'turns' (use "
                "`vibecast synth --mode continuous` for the reference's whole-script output).",
            )

    def open_session(self, speakers: list[SpeakerVoice], params: SynthesisParams) -> _Session:
        wavs = []
        for i, sp in enumerate(speakers):
            if sp.audio is not None:
                wavs.append(at_24k(sp.audio, sp.audio_rate))
            elif sp.voice_id in self._voices:
                wavs.append(self._voices[sp.voice_id])
            else:
                raise BadRequest(
                    "unknown_voice",
                    f"speakers[{i}].voice",
                    f"speakers[{i}].voice is {sp.voice_id!r}, which this server does not have; "
                    f"choose one of: {', '.join(self._voices) or '(none: upload voice_audio)'}.",
                )
        cfg = params.cfg_scale if params.cfg_scale is not None else 1.3
        steps = params.steps if params.steps is not None else 10
        return _Session(open_session(self.rt, wavs, params.seed, cfg, steps))

    def close_session(self, session: _Session) -> None:
        session.voice.slots = [None, None]

    def seconds_per_char(self) -> float:
        return 0.085

    def encode(self, session: _Session, turn: Turn, slot: int) -> EncodedTurn:
        return encode_turn(self.rt, session.voice, turn.speaker, turn.text, slot)

    def render(self, session: _Session, encoded: EncodedTurn) -> Iterator[np.ndarray]:
        return render_turn(self.rt, session.voice, encoded)

    def warmup(self) -> None:
        wav = np.zeros(SAMPLE_RATE, np.float32)
        wav[::97] = 0.1  # something the normaliser can scale
        session = self.open_session(
            [SpeakerVoice("warmup", audio=wav, audio_rate=SAMPLE_RATE)], SynthesisParams(0, "turns", 1.3, 2)
        )
        encoded = self.encode(session, Turn(0, 0, "Warm up."), 0)
        for i, _ in enumerate(self.render(session, encoded)):
            if i >= 1:
                break
