"""WAV files: read any common PCM or float layout (voice uploads), write 16-bit mono."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np


def seconds_over(seconds: float, limit: float) -> str:
    """`seconds` with as many decimals as it takes to print above `limit` ("120.1", not "120")."""
    for places in range(1, 7):
        text = f"{seconds:.{places}f}"
        if float(text) > limit:
            return text
    return f"{seconds:.6f}"


def too_long(seconds: float, limit: float) -> str:
    return f"it is {seconds_over(seconds, limit)} s long; trim it to {limit:g} s or less"


def read_wav(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate); channels are averaged. Raises ValueError.

    With `max_seconds`, a longer file is refused from its header, before any sample is read.
    """
    # The stdlib reader refuses WAVE_FORMAT_IEEE_FLOAT (3) and EXTENSIBLE, so walk the chunks.
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file (no RIFF/WAVE header)")
    pos, fmt, body = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        chunk = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt = chunk
        elif cid == b"data":
            body = chunk
        pos += 8 + size + (size & 1)
    if fmt is None or body is None or len(fmt) < 16:
        raise ValueError("the WAV file has no fmt or data chunk")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: real tag in the sub-format
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or not 4000 <= rate <= 192000:
        raise ValueError(f"the WAV header is not usable ({channels} channels at {rate} Hz)")
    width = bits // 8
    usable = len(body) - len(body) % (width * channels) if width else 0
    raw = body[:usable]
    if max_seconds is not None and width and usable / (width * channels) / rate > max_seconds:
        raise ValueError(too_long(usable / (width * channels) / rate, max_seconds))
    if tag == 3 and bits == 32:
        x = np.frombuffer(raw, "<f4").astype(np.float32)
    elif tag == 1 and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == 1 and bits == 32:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    elif tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / 8388608.0
    else:
        raise ValueError(
            f"WAV sample format {tag} with {bits} bits is not supported; use 16-bit PCM or "
            "32-bit float"
        )
    return x.reshape(-1, channels).mean(axis=1), rate


def wav_bytes(x: np.ndarray, rate: int, float32: bool = False) -> bytes:
    """Mono WAV bytes: 16-bit PCM, or 32-bit float (format 3) to keep samples exact."""
    if float32:
        body = np.asarray(x, dtype="<f4").tobytes()
        fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
        chunks = (
            b"fmt "
            + struct.pack("<I", len(fmt))
            + fmt
            + b"data"
            + struct.pack("<I", len(body))
            + body
        )
        return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()
