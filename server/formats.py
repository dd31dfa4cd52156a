"""The HTTP API's audio formats, encoded as the audio is made, with PyAV (FFmpeg's muxers and
encoders: LAME for mp3, FFmpeg's aac and flac, libopus for Opus in Ogg).

Input is mono 16-bit PCM at 24 kHz (what the sessions of the HTTP API ask for). Each `push`
returns the bytes the muxer has written so far, so a response body streams as frames come.
The output is not seekable, so the muxers write their headers once, up front: the WAV header
and FLAC's STREAMINFO say "length unknown", and mp3 and aac carry no gapless information
(decoders play the encoder's priming samples, ~50 ms, before the speech).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

RATE = 24_000  # OpenAI's pcm is 24 kHz mono s16le; every format here starts from it


@dataclass(frozen=True)
class Format:
    container: str | None  # None: raw PCM, no container
    codec: str | None
    media_type: str
    bit_rate: int | None = None


FORMATS = {
    "mp3": Format("mp3", "libmp3lame", "audio/mpeg", 64_000),
    "opus": Format("ogg", "libopus", "audio/ogg", 32_000),
    "aac": Format("adts", "aac", "audio/aac", 64_000),
    "flac": Format("flac", "flac", "audio/flac"),
    "wav": Format("wav", "pcm_s16le", "audio/wav"),
    "pcm": Format(None, None, "audio/pcm"),
}


class _Collect(io.RawIOBase):
    """Where the muxer writes: kept until the caller takes it. Not seekable, on purpose."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self._parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class Tempo:
    """`speed` by FFmpeg's atempo (tempo without changing pitch): 0.25 to 4 in one chain, as
    one atempo stage covers 0.5 to 2 with the best quality."""

    def __init__(self, speed: float) -> None:
        self.graph = av.filter.Graph()
        src = self.graph.add_abuffer(format="s16", sample_rate=RATE, layout="mono")
        stages, left = [], speed
        while left < 0.5 or left > 2.0:
            step = 0.5 if left < 0.5 else 2.0
            stages.append(step)
            left /= step
        stages.append(left)
        node = src
        for s in stages:
            nxt = self.graph.add("atempo", f"{s:.6f}")
            node.link_to(nxt)
            node = nxt
        sink = self.graph.add("abuffersink")
        node.link_to(sink)
        self.graph.configure()
        self.pts = 0

    def push(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        if frame is not None:
            frame.pts = self.pts
            frame.time_base = Fraction(1, RATE)
            self.pts += frame.samples
        self.graph.push(frame)
        out: list[av.AudioFrame] = []
        while True:
            try:
                pulled = self.graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return out
            assert isinstance(pulled, av.AudioFrame)
            out.append(pulled)


class Encoder:
    """One response body: `push` PCM as it is made, `finish` at the end; each returns bytes."""

    def __init__(self, name: str, speed: float = 1.0) -> None:
        self.format = FORMATS[name]
        self.tempo = Tempo(speed) if speed != 1.0 else None
        self._sink = _Collect()
        self._out: av.container.OutputContainer | None = None
        if self.format.container is not None and self.format.codec is not None:
            self._out = av.open(self._sink, mode="w", format=self.format.container)
            stream = self._out.add_stream(self.format.codec, rate=RATE, layout="mono")
            assert isinstance(stream, av.AudioStream)
            if self.format.bit_rate:
                stream.bit_rate = self.format.bit_rate
            self._stream = stream

    def _frames(self, pcm: bytes | None) -> list[av.AudioFrame]:
        frame = None
        if pcm is not None:
            s16 = np.frombuffer(pcm, dtype="<i2")
            if not len(s16):
                return []
            frame = av.AudioFrame.from_ndarray(s16[None], format="s16", layout="mono")
            frame.sample_rate = RATE
        if self.tempo is not None:
            return self.tempo.push(frame)
        return [frame] if frame is not None else []

    def _write(self, frames: list[av.AudioFrame], flush: bool) -> bytes:
        if self._out is None:
            return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in frames)
        for f in frames:
            f.pts = None  # the encoder numbers the samples it is given
            self._out.mux(self._stream.encode(f))
        if flush:
            self._out.mux(self._stream.encode(None))
            self._out.close()
        return self._sink.take()

    def push(self, pcm: bytes) -> bytes:
        return self._write(self._frames(pcm), flush=False)

    def finish(self) -> bytes:
        return self._write(self._frames(None) if self.tempo is not None else [], flush=True)
