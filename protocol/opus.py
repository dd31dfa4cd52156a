"""Opus over the system libopus, through opuslib's ctypes layer only.

opuslib's classes read past short buffers, have broken CTL setters and an exception whose str()
raises (shared/notes/opus-and-browser.md §1.5), so this module calls the C functions directly,
pads every frame itself and reports errors by number.
"""

from __future__ import annotations

import ctypes

import numpy as np

try:
    import opuslib.api.ctl as _ctl
    import opuslib.api.decoder as _dec
    import opuslib.api.encoder as _enc
    from opuslib import APPLICATION_AUDIO, SIGNAL_VOICE
except Exception as e:  # opuslib raises a bare Exception when libopus is missing
    raise ImportError(
        "libopus was not found: install the system package libopus0 (scripts/setup.sh does this)"
    ) from e

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MAX_PACKET = 4000  # bytes; far above 20 ms at 256 kbit/s


class OpusError(RuntimeError):
    pass


class OpusEncoder:
    """One continuous mono encoder: whole frames in, one packet per frame out."""

    def __init__(self, sample_rate: int = 48000, bitrate: int = 32000, frame_ms: int = 20) -> None:
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"Opus cannot encode at {sample_rate} Hz; use one of {OPUS_RATES}")
        self.sample_rate = sample_rate
        self.frame = sample_rate * frame_ms // 1000
        self._state = _enc.create_state(sample_rate, 1, APPLICATION_AUDIO)
        _enc.encoder_ctl(self._state, _ctl.set_bitrate, bitrate)
        _enc.encoder_ctl(self._state, _ctl.set_vbr, 1)
        _enc.encoder_ctl(self._state, _ctl.set_complexity, 10)
        _enc.encoder_ctl(self._state, _ctl.set_signal, SIGNAL_VOICE)
        self.lookahead = int(_enc.encoder_ctl(self._state, _ctl.get_lookahead))
        self._out = ctypes.create_string_buffer(MAX_PACKET)

    @property
    def pre_skip(self) -> int:
        """Samples at 48 kHz a decoder drops from the start (OpusHead / ready.format)."""
        return self.lookahead * 48000 // self.sample_rate

    def encode(self, frames: np.ndarray) -> list[bytes]:
        """Encode float32 samples whose length is a whole number of frames."""
        frames = np.ascontiguousarray(frames, dtype=np.float32)
        if len(frames) % self.frame:
            raise ValueError(
                f"{len(frames)} samples is not a whole number of {self.frame}-sample frames"
            )
        packets = []
        for i in range(0, len(frames), self.frame):
            chunk = frames[i : i + self.frame]
            n = _enc.libopus_encode_float(
                self._state,
                chunk.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                self.frame,
                self._out,
                MAX_PACKET,
            )
            if n < 0:
                raise OpusError(f"opus_encode_float failed with error {n}")
            packets.append(self._out.raw[:n])
        return packets

    def close(self) -> None:
        if self._state is not None:
            _enc.destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


class OpusDecoder:
    """Mono decoder; returns float32 samples at `sample_rate`."""

    def __init__(self, sample_rate: int = 48000) -> None:
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"Opus cannot decode at {sample_rate} Hz; use one of {OPUS_RATES}")
        self.sample_rate = sample_rate
        self._state = _dec.create_state(sample_rate, 1)
        self._max = sample_rate * 120 // 1000  # the longest Opus packet is 120 ms
        self._pcm = np.zeros(self._max, dtype=np.float32)

    def decode(self, packet: bytes) -> np.ndarray:
        n = _dec.libopus_decode_float(
            self._state,
            packet,
            len(packet),
            self._pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            self._max,
            0,
        )
        if n < 0:
            raise OpusError(f"opus_decode_float failed with error {n}")
        return self._pcm[:n].copy()

    def close(self) -> None:
        if self._state is not None:
            _dec.destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


def packet_samples(packet: bytes, sample_rate: int = 48000) -> int:
    """Duration of an Opus packet in samples at `sample_rate`, from its TOC byte (RFC 6716 §3.1)."""
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        per_frame = (10, 20, 40, 60)[config & 3] * 48
    elif config < 16:  # hybrid: 10, 20 ms
        per_frame = (10, 20)[config & 1] * 48
    else:  # CELT: 2.5, 5, 10, 20 ms
        per_frame = (120, 240, 480, 960)[config & 3]
    count = toc & 3
    if count == 0:
        frames = 1
    elif count in (1, 2):
        frames = 2
    else:
        frames = packet[1] & 0x3F
    return per_frame * frames * sample_rate // 48000
