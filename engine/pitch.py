"""Fundamental-frequency estimation (YIN), vectorised over frames.

The Piper voice uses it to match an uploaded voice sample's pitch; the tests and `vibecast bench`
use it to show that the four default speakers sound apart.
"""

from __future__ import annotations

import numpy as np

BLOCK_FRAMES = 64


def _cmnd(x: np.ndarray, starts: np.ndarray, n: int, span: int, lag_max: int) -> np.ndarray:
    """YIN's cumulative-mean-normalised difference of the frames at `starts`: (F, lag_max+1)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, span)[starts]  # (F, span)
    head = frames[:, :n]
    # d(tau) = sum_j (head[j] - frame[j+tau])^2 = E_head + E_shift(tau) - 2 r(tau)
    nfft = 1 << int(np.ceil(np.log2(span + n)))
    spec = np.fft.rfft(frames, nfft) * np.conj(np.fft.rfft(head, nfft))
    r = np.fft.irfft(spec, nfft)[:, : lag_max + 1]
    sq = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames**2, axis=1)], axis=1)
    taus = np.arange(lag_max + 1)
    e_shift = sq[:, taus + n] - sq[:, taus]
    d = np.maximum(e_shift[:, :1] + e_shift - 2.0 * r, 0.0)
    cum = np.cumsum(d[:, 1:], axis=1)
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(cum, 1e-20)
    return cmnd


def _dip(row: np.ndarray, lag_min: int, lag_max: int, threshold: float) -> float:
    """The lag (with sub-sample precision) of the first dip under `threshold`, or 0.0."""
    below = np.flatnonzero(row[lag_min:lag_max] < threshold)
    if not len(below):
        return 0.0
    tau = below[0] + lag_min
    while tau + 1 < lag_max and row[tau + 1] < row[tau]:
        tau += 1
    # Parabolic interpolation around the dip.
    a, b, c = row[tau - 1], row[tau], row[tau + 1]
    denom = a - 2 * b + c
    shift = 0.5 * (a - c) / denom if denom > 0 else 0.0
    return float(tau + shift)


def f0_track(
    x: np.ndarray,
    sample_rate: int,
    fmin: float = 55.0,
    fmax: float = 600.0,
    frame_s: float = 0.04,
    hop_s: float = 0.01,
    threshold: float = 0.2,
) -> np.ndarray:
    """F0 in Hz of each voiced frame (unvoiced and quiet frames are left out).

    Frames an octave off the track's median (YIN's usual mistake on the first harmonic or a
    subharmonic) are folded back, so a median over many frames measures the voice, not errors.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = int(frame_s * sample_rate)
    hop = int(hop_s * sample_rate)
    lag_min = max(2, int(sample_rate / fmax))
    lag_max = int(sample_rate / fmin)
    span = n + lag_max
    if len(x) < span:
        return np.zeros(0)
    starts = np.arange(0, len(x) - span + 1, hop)
    sq_x = np.concatenate([[0.0], np.cumsum(x * x)])
    level = np.sqrt((sq_x[starts + n] - sq_x[starts]) / n)
    loud = level > 0.1 * np.percentile(level, 90) + 1e-9

    out: list[float] = []
    voiced = np.flatnonzero(loud)
    # A block of frames at a time: whole-clip matrices of a 2-minute 96 kHz upload are ~GBs
    # (frames x FFT size); a block is a few MB whatever the clip's length or rate.
    for b in range(0, len(voiced), BLOCK_FRAMES):
        cmnd = _cmnd(x, starts[voiced[b : b + BLOCK_FRAMES]], n, span, lag_max)
        for row in cmnd:
            lag = _dip(row, lag_min, lag_max, threshold)
            if lag:
                out.append(sample_rate / lag)
    track = np.asarray(out)
    if len(track) > 4:
        m = np.median(track)
        track = np.where(track > 1.6 * m, track / 2, np.where(track < m / 1.6, track * 2, track))
    return track


def median_f0(x: np.ndarray, sample_rate: int) -> float:
    """Median F0 over voiced frames, or 0.0 when nothing is voiced."""
    track = f0_track(x, sample_rate)
    return float(np.median(track)) if len(track) else 0.0


def semitones(f_a: float, f_b: float) -> float:
    """Signed distance from f_b up to f_a in semitones."""
    return float(12.0 * np.log2(f_a / f_b))
