"""From engine PCM to `audio` messages, for one session.

Rules (docs/protocol.md, "Audio"):
- Samples are counted at `format.sample_rate`; the engine's rate is converted per turn.
- Every turn is padded with silence to whole frames, so a packet never spans two turns and
  `turn_start.pts` of turn i+1 is `turn_start.pts + turn_end.samples` of turn i.
- One continuous Opus encoder per session. When the last turn is known to be last as it ends,
  its padding also makes (length + encoder lookahead) a whole number of frames and the lookahead
  is flushed in its last packet: decoding every packet and dropping pre_skip gives exactly
  `done.samples`. When the script ends only later (an append with more: false), one extra
  `audio` message with `samples: 0` carries the flush.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.resample import Resampler
from ..protocol.messages import Audio, TurnEnd, TurnStart
from ..protocol.opus import OpusEncoder


@dataclass(frozen=True)
class OutputFormat:
    codec: str  # "opus" | "pcm_s16le"
    sample_rate: int
    bitrate: int
    frame_ms: int

    @property
    def frame(self) -> int:
        return self.sample_rate * self.frame_ms // 1000


class AudioOutput:
    def __init__(self, fmt: OutputFormat, engine_rate: int) -> None:
        self.fmt = fmt
        self.engine_rate = engine_rate
        self.encoder = (
            OpusEncoder(fmt.sample_rate, fmt.bitrate, fmt.frame_ms) if fmt.codec == "opus" else None
        )
        self.seq = 0
        self.pts = 0  # samples of the session sent so far
        self._turn_pts = 0
        self._pending = np.zeros(0, np.float32)  # less than one frame, waiting for more
        self._resampler: Resampler | None = None
        self._skip = 0  # samples of the current turn another gateway already sent

    @property
    def pre_skip(self) -> int:
        return self.encoder.pre_skip if self.encoder else 0

    def format_info(self) -> dict[str, object]:
        f = self.fmt
        info: dict[str, object] = {
            "codec": f.codec,
            "sample_rate": f.sample_rate,
            "channels": 1,
            "frame_ms": f.frame_ms,
            "bitrate": f.bitrate if self.encoder else f.sample_rate * 16,
            "pre_skip": self.pre_skip,
        }
        return info

    def _message(self, turn: int, frames: np.ndarray, samples: int) -> Audio:
        if self.encoder is not None:
            msg = Audio(self.seq, turn, self.pts, samples, packets=self.encoder.encode(frames))
        else:
            pcm = (np.clip(frames, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
            msg = Audio(self.seq, turn, self.pts, samples, pcm=pcm)
        self.seq += 1
        self.pts += samples
        return msg

    def turn_start(self, turn: int, speaker: int, text: str) -> TurnStart:
        self._turn_pts = self.pts
        self._resampler = Resampler(self.engine_rate, self.fmt.sample_rate)
        return TurnStart(turn, speaker, text, self.pts)

    def go_on(self, seq: int, pts: int) -> None:
        """A session taken over from another gateway: its messages go on from these."""
        self.seq, self.pts = seq, pts

    def go_on_in_turn(self, turn_pts: int, sent: int) -> None:
        """Right after `turn_start` of the turn in progress when the session was taken over:
        it started at `turn_pts`, and its first `sent` samples (whole frames) went out."""
        self._turn_pts, self._skip = turn_pts, sent

    def audio(self, turn: int, pcm: np.ndarray) -> Audio | None:
        assert self._resampler is not None, "audio before turn_start"
        x = np.concatenate([self._pending, self._resampler.push(pcm)])
        if self._skip:
            drop = min(self._skip, len(x))
            x, self._skip = x[drop:], self._skip - drop
        whole = len(x) - len(x) % self.fmt.frame
        self._pending = x[whole:]
        return self._message(turn, x[:whole], whole) if whole else None

    def turn_end(self, turn: int, last: bool) -> tuple[Audio | None, TurnEnd]:
        """Close the turn; `last`: no turn follows, so also flush the encoder's lookahead."""
        assert self._resampler is not None, "turn_end before turn_start"
        x = np.concatenate([self._pending, self._resampler.flush()])
        self._pending = np.zeros(0, np.float32)
        self._resampler = None
        frame = self.fmt.frame
        lookahead = self.encoder.lookahead if (self.encoder and last) else 0
        counted = len(x) + (-(len(x) + lookahead) % frame)  # audio + silence counted in the turn
        frames = np.zeros(counted + lookahead, np.float32)
        frames[: len(x)] = x
        msg = self._message(turn, frames, counted) if len(frames) else None
        return msg, TurnEnd(turn, self.pts - self._turn_pts)

    def end_of_stream(self, last_turn: int) -> Audio | None:
        """Flush the encoder when the last turn was closed without knowing it was last."""
        if self.encoder is None:
            return None
        flush = np.zeros(-(-self.encoder.lookahead // self.fmt.frame) * self.fmt.frame, np.float32)
        return self._message(last_turn, flush, 0)

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
