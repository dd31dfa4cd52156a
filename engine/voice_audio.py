"""Decode a voice sample (an upload's `voice_audio`, a `--voices` file) to mono float32.

Accepted: WAV (PCM 8/16/24/32-bit or 32-bit float, any rate, any channel count) and Ogg Opus.
The format is sniffed from the bytes; `voice_format`, when given, must agree.

The work is bounded by the length limit before it is done: a WAV's length is known from its
size, and an Ogg Opus stream's from the TOC byte of each packet, summed before any packet is
decoded. (A megabyte of 2-byte Opus packets that each claim 120 ms would otherwise decode to
hours of concealment noise.) Callers run this off the event loop.
"""

from __future__ import annotations

import numpy as np

from ..protocol.messages import Code, ProtocolError
from ..protocol.ogg import read_ogg_opus
from ..protocol.opus import OpusDecoder, OpusError, packet_samples
from ..protocol.wav import read_wav, too_long

MIN_SECONDS = 0.5
MAX_SECONDS = 120.0
_MAX_PACKET_48K = 5760  # 120 ms: the longest an Opus packet may be (RFC 6716 §3.2.5)


def _ogg_duration_48k(packets: list[bytes], limit: int) -> int:
    """Samples at 48 kHz the packets decode to, from their TOC bytes; stops past `limit`."""
    total = 0
    for i, p in enumerate(packets):
        if not p or (p[0] & 3 == 3 and len(p) < 2):
            raise ValueError(f"Opus packet {i} is empty or cut short")
        n = packet_samples(p)
        if not 0 < n <= _MAX_PACKET_48K:
            raise ValueError(f"Opus packet {i} claims {n / 48:.1f} ms; a packet holds 2.5-120 ms")
        total += n
        if total > limit:
            break
    return total


def _ogg(data: bytes) -> tuple[np.ndarray, int]:
    limit = int(MAX_SECONDS * 48000)
    # Even the shortest packets (2.5 ms) cannot hold the limit in fewer than this many.
    ogg = read_ogg_opus(data, max_packets=limit // 120 + 1)
    claimed = _ogg_duration_48k(ogg.packets, limit + ogg.pre_skip)
    if claimed > limit + ogg.pre_skip:
        raise ValueError(
            f"its packets hold over {MAX_SECONDS:g} s; trim it to {MAX_SECONDS:g} s or less"
        )
    decoder = OpusDecoder(48000)
    try:
        pcm = np.concatenate([decoder.decode(p) for p in ogg.packets] or [np.zeros(0, np.float32)])
    except OpusError as e:
        raise ValueError(f"the Opus audio does not decode ({e})") from None
    finally:
        decoder.close()
    return pcm[ogg.pre_skip : ogg.pre_skip + ogg.samples_48k], 48000


def decode_voice_audio(
    data: bytes,
    declared: str | None = None,
    field: str | None = None,
    min_seconds: float = MIN_SECONDS,
) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate), or ProtocolError(bad_voice_audio) naming `field`."""
    where = field or "the voice sample"

    def refuse(reason: str) -> ProtocolError:
        return ProtocolError(
            Code.BAD_VOICE_AUDIO,
            f"{where} cannot be used: {reason}. Send a WAV or Ogg Opus file of "
            f"{min_seconds:g} to {MAX_SECONDS:g} s of clear speech.",
            field=field,
        )

    kind = "wav" if data[:4] == b"RIFF" else "ogg" if data[:4] == b"OggS" else None
    if kind is None:
        raise refuse("it is neither a WAV file nor an Ogg Opus file")
    if declared is not None and declared != kind:
        raise refuse(f"voice_format says {declared!r} but the bytes are {kind}")
    try:
        x, rate = read_wav(data, max_seconds=MAX_SECONDS) if kind == "wav" else _ogg(data)
    except ValueError as e:
        raise refuse(str(e)) from None
    seconds = len(x) / rate
    if seconds < min_seconds:
        raise refuse(
            f"it holds {seconds:.2f} s of audio; give at least {min_seconds:g} s of speech"
        )
    if seconds > MAX_SECONDS:
        raise refuse(too_long(seconds, MAX_SECONDS))
    if not np.isfinite(x).all():
        raise refuse("it contains samples that are not finite numbers")
    return np.ascontiguousarray(x, dtype=np.float32), rate
