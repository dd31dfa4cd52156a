"""Decode an uploaded voice sample (`voice_audio`) to mono float32.

Accepted: WAV (PCM 8/16/24/32-bit or 32-bit float, any rate, any channel count) and Ogg Opus.
The format is sniffed from the bytes; `voice_format`, when given, must agree.
"""

from __future__ import annotations

import numpy as np

from ..protocol.ogg import read_ogg_opus
from ..protocol.opus import OpusDecoder, OpusError
from ..protocol.wav import read_wav

MAX_SECONDS = 120.0


class VoiceAudioError(ValueError):
    pass


def _ogg(data: bytes) -> tuple[np.ndarray, int]:
    ogg = read_ogg_opus(data)
    decoder = OpusDecoder(48000)
    try:
        pcm = np.concatenate([decoder.decode(p) for p in ogg.packets] or [np.zeros(0, np.float32)])
    except OpusError as e:
        raise ValueError(f"the Opus audio does not decode ({e})") from None
    finally:
        decoder.close()
    return pcm[ogg.pre_skip : ogg.pre_skip + ogg.samples_48k], 48000


def decode_voice_audio(data: bytes, declared: str | None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate). Raises VoiceAudioError with a reason to show."""
    kind = "wav" if data[:4] == b"RIFF" else "ogg" if data[:4] == b"OggS" else None
    if kind is None:
        raise VoiceAudioError("it is neither a WAV file nor an Ogg Opus file")
    if declared is not None and declared != kind:
        raise VoiceAudioError(f"voice_format says {declared!r} but the bytes are {kind}")
    try:
        x, rate = read_wav(data) if kind == "wav" else _ogg(data)
    except ValueError as e:
        raise VoiceAudioError(str(e)) from None
    seconds = len(x) / rate
    if seconds < 0.5:
        raise VoiceAudioError(f"it holds {seconds:.2f} s of audio; give at least 0.5 s of speech")
    if seconds > MAX_SECONDS:
        raise VoiceAudioError(f"it is {seconds:.0f} s long; trim it to {MAX_SECONDS:.0f} s or less")
    if not np.isfinite(x).all():
        raise VoiceAudioError("it contains samples that are not finite numbers")
    return np.ascontiguousarray(x, dtype=np.float32), rate
