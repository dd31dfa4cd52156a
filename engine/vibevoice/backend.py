"""VibeVoice behind the engine's backend interface (`turns` mode; `continuous` via synth)."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...protocol.messages import Code, ProtocolError
from ..backend import SpeakerVoice, SynthesisParams, Turn, Voice
from ..pipeline import TurnFeed
from ..resample import resample
from ..scheduler import TurnRunner, capacity_from_speed
from ..voice_audio import decode_voice_audio
from .config import SAMPLE_RATE
from .generate import EncodedTurn, Runtime, VoiceSession, encode_turn, open_session, render_turn
from .weights import load_runtime

AUDIO_SUFFIXES = (".wav", ".ogg", ".opus")


def read_voice_file(path: Path, where: str) -> tuple[np.ndarray, int]:
    """A voice prompt from disk, checked like an upload; if bad, a ValueError naming `where`.

    The server's operator chose these files, so short prompts pass (the tiny parity fixtures'
    are 0.46 s); the 0.5 s minimum is a hint for people uploading a sample.
    """
    try:
        return decode_voice_audio(path.read_bytes(), min_seconds=0.1)
    except ProtocolError as e:
        raise ValueError(f"{where}: {e.message}") from None


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
        self._capacity = 1  # measured by warmup()

    @staticmethod
    def load(
        model: str, device: str = "auto", dtype: str = "auto", voices: str | None = None
    ) -> VibeVoiceBackend:
        rt = load_runtime(model, device, dtype)
        catalogue: dict[str, np.ndarray] = {}
        if voices:
            folder = Path(voices)
            if not folder.is_dir():
                raise ValueError(f"--voices {voices}: not a directory")
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in AUDIO_SUFFIXES:
                    catalogue[f.stem] = at_24k(*read_voice_file(f, f"--voices {voices}: {f.name}"))
            if not catalogue:
                raise ValueError(f"--voices {voices}: no .wav, .ogg or .opus files in it")
        return VibeVoiceBackend(rt, rt.name, catalogue)

    def voices(self) -> list[Voice]:
        return [
            Voice(name, name, f"voice prompt from {name} ({len(a) / SAMPLE_RATE:.1f} s)")
            for name, a in self._voices.items()
        ]

    def check_params(self, params: SynthesisParams) -> None:
        if params.mode not in self.modes:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.mode {params.mode!r} cannot stream; the server runs 'turns' (use "
                "`vibecast synth --mode continuous` for the reference's whole-script output).",
                field="options.mode",
            )

    def open_session(self, speakers: list[SpeakerVoice], params: SynthesisParams) -> _Session:
        # The server refuses names outside `voices()` before a session opens, so a miss here
        # is a caller's bug and a KeyError says so.
        wavs = [
            self._voices[str(sp.voice_id)] if sp.audio is None else at_24k(sp.audio, sp.audio_rate)
            for sp in speakers
        ]
        cfg = params.cfg_scale if params.cfg_scale is not None else 1.3
        steps = params.steps if params.steps is not None else 10
        return _Session(open_session(self.rt, wavs, params.seed, cfg, steps))

    def close_session(self, session: _Session) -> None:
        session.voice.slots = [None, None]

    def seconds_per_char(self) -> float:
        return 0.085

    def encode(self, session: _Session, turn: Turn, slot: int) -> EncodedTurn:
        return encode_turn(self.rt, session.voice, turn.speaker, turn.text, slot)

    def render(self, session: _Session, encoded: EncodedTurn) -> Generator[np.ndarray, None, None]:
        return render_turn(self.rt, session.voice, encoded)

    def warmup(self) -> None:
        wav = np.zeros(SAMPLE_RATE, np.float32)
        wav[::97] = 0.1  # something the normaliser can scale
        session = self.open_session(
            [SpeakerVoice("warmup", audio=wav, audio_rate=SAMPLE_RATE)],
            SynthesisParams(0, "turns", 1.3, 2),
        )
        encoded = self.encode(session, Turn(0, 0, "Warm up."), 0)
        start, frames = time.perf_counter(), 0
        for i, _ in enumerate(self.render(session, encoded)):
            if i == 0:  # the first frame pays for one-time set-up: measure from the second
                start, frames = time.perf_counter(), 0
            frames += 1
            if i >= 4:
                break
        self._capacity = capacity_from_speed(
            frames * 3200 / SAMPLE_RATE, time.perf_counter() - start
        )

    def runner(self, session: _Session, feed: TurnFeed) -> TurnRunner:
        return TurnRunner(self, session, feed)

    def realtime_capacity(self) -> int:
        return self._capacity
