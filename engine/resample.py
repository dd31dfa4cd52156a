"""Band-limited resampling at any ratio, fed chunk by chunk.

Used twice: the Piper voice plays its 22.05 kHz output back at a shifted rate to change pitch
(22050·p Hz → 24 kHz), and the server converts the engine's 24 kHz to the client's format rate.

Output sample k sits at input time t_k = k·step, computed from k itself rather than accumulated,
so feeding the same signal in any chunking gives bit-identical output (tests/test_resample.py).
"""

from __future__ import annotations

import math

import numpy as np

_PHASES = 512  # rows of the tabulated kernel; linear interpolation between rows


def _kernel_table(half_width: int, cutoff: float, beta: float, phases: int = _PHASES) -> np.ndarray:
    """Kaiser-windowed sinc sampled at `phases` sub-sample offsets: (phases + 1, 2·half_width)."""
    frac = np.arange(phases + 1, dtype=np.float64)[:, None] / phases
    taps = np.arange(-half_width + 1, half_width + 1, dtype=np.float64)[None, :]
    u = taps - frac  # distance from the output instant to each input sample, in input samples
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, 1.0))) / np.i0(beta)
    kernel = cutoff * np.sinc(cutoff * u) * window
    return (kernel / kernel.sum(axis=1, keepdims=True)).astype(np.float32)  # unity gain at DC


class Resampler:
    """Streaming resampler from `in_rate` to `out_rate` (mono float32).

    `push(x)` returns every output sample whose input neighbourhood is complete; `flush()` pads
    the end with silence and returns the rest, so the total is ceil(n_in · out_rate / in_rate).
    """

    def __init__(self, in_rate: float, out_rate: float, zero_crossings: int = 16) -> None:
        self.step = float(in_rate) / float(out_rate)  # input samples per output sample
        cutoff = min(1.0, 1.0 / self.step) * 0.96  # keep a little below the lower Nyquist
        self.half = int(math.ceil(zero_crossings / cutoff))
        self._table = _kernel_table(self.half, cutoff, beta=8.0)
        self._taps = np.arange(-self.half + 1, self.half + 1)
        self._buf = np.zeros(0, dtype=np.float32)  # input not yet consumed
        self._buf_start = 0  # absolute input index of _buf[0]
        self._n_in = 0  # input samples received
        self._k = 0  # next output index
        self.identity = in_rate == out_rate
        # Upsampling by a whole factor L (24 -> 48 kHz): L fixed phases, one correlation each.
        ratio = float(out_rate) / float(in_rate)
        self.factor = int(round(ratio)) if ratio > 1 and abs(ratio - round(ratio)) < 1e-12 else 0
        if self.factor:
            self._phase_kernels = list(
                _kernel_table(self.half, cutoff, beta=8.0, phases=self.factor)[: self.factor]
            )

    def _emit(self, k_end: int, padded: np.ndarray) -> np.ndarray:
        if k_end <= self._k:
            return np.zeros(0, dtype=np.float32)
        if self.factor:
            return self._emit_phases(k_end, padded)
        t = np.arange(self._k, k_end, dtype=np.float64) * self.step
        base = np.floor(t)
        pos = (t - base) * _PHASES
        row = pos.astype(np.int64)
        a = (pos - row).astype(np.float32)[:, None]
        weights = self._table[row] * (1.0 - a) + self._table[np.minimum(row + 1, _PHASES)] * a
        # Indices below 0 fall into the zero history kept at the front of `padded`.
        idx = base.astype(np.int64)[:, None] + self._taps[None, :] - self._buf_start + self.half
        out = np.einsum("ij,ij->i", padded[idx], weights)
        self._k = k_end
        return out.astype(np.float32, copy=False)

    def _emit_phases(self, k_end: int, padded: np.ndarray) -> np.ndarray:
        # Outputs come in whole groups of L (all phases of one input position), since both
        # the ready point and the flush end are multiples of L.
        factor = self.factor
        m0, m1 = self._k // factor, k_end // factor  # input positions covered
        lo = m0 - self.half + 1 - self._buf_start + self.half  # index of x[m0 - half + 1]
        segment = padded[lo : lo + (m1 - m0) + 2 * self.half - 1]
        out = np.empty((m1 - m0, factor), dtype=np.float32)
        for j, kernel in enumerate(self._phase_kernels):
            out[:, j] = np.correlate(segment, kernel, mode="valid")  # sum_i x[m + tap_i] · w_j[i]
        self._k = k_end
        return out.reshape(-1)

    def _window(self, tail: int) -> np.ndarray:
        return np.concatenate(
            [np.zeros(self.half, np.float32), self._buf, np.zeros(tail, np.float32)]
        )

    def _trim(self) -> None:
        # Keep only what the next output still needs: taps reach `half` samples back.
        first_needed = int(math.floor(self._k * self.step)) - self.half + 1
        drop = max(0, first_needed - self._buf_start)
        if drop:
            self._buf = self._buf[drop:]
            self._buf_start += drop

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.identity:
            return x.copy()
        self._buf = np.concatenate([self._buf, x])
        self._n_in += len(x)
        # Output k is ready once floor(t_k) + half < n_in, so all its right taps exist.
        k_end = int(math.floor((self._n_in - self.half) / self.step)) + 1
        while k_end > self._k and math.floor((k_end - 1) * self.step) + self.half >= self._n_in:
            k_end -= 1
        # Before the first input we pretend zeros, so left taps at negative indices are silence.
        out = self._emit(max(k_end, self._k), self._window(0))
        self._trim()
        return out

    def save(self) -> dict[str, np.ndarray]:
        """Where the stream is: what `load` needs to go on exactly from here."""
        pos = np.array([self._buf_start, self._n_in, self._k], np.int64)
        return {"buf": self._buf.copy(), "pos": pos}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self._buf = state["buf"].astype(np.float32)
        self._buf_start, self._n_in, self._k = (int(v) for v in state["pos"])

    def flush(self) -> np.ndarray:
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        k_end = int(math.ceil(self._n_in / self.step))
        out = self._emit(k_end, self._window(self.half + 1))
        self._trim()
        return out


def resample(x: np.ndarray, in_rate: float, out_rate: float) -> np.ndarray:
    """One-shot resampling; equals feeding `Resampler` in any chunking."""
    r = Resampler(in_rate, out_rate)
    return np.concatenate([r.push(x), r.flush()])
