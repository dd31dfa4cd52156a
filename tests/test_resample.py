"""The streaming resampler: streaming equals offline, lengths are exact, and a tone keeps its
pitch."""

from __future__ import annotations

import numpy as np
import pytest

from vibecast.engine.resample import Resampler, resample

RATES = [
    (24000, 48000),
    (22050, 24000),
    (22050 * 1.26, 24000),
    (22050 * 0.8, 24000),
    (48000, 16000),
]


@pytest.mark.parametrize(("fin", "fout"), RATES)
def test_streaming_equals_offline(fin: float, fout: float) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(20011).astype(np.float32) * 0.3
    offline = resample(x, fin, fout)
    for trial in range(3):
        r = Resampler(fin, fout)
        cuts = np.sort(rng.integers(0, len(x), size=12 + trial * 20))
        parts = [r.push(p) for p in np.split(x, cuts)]
        streamed = np.concatenate(parts + [r.flush()])
        assert streamed.shape == offline.shape
        np.testing.assert_array_equal(streamed, offline)


@pytest.mark.parametrize(("fin", "fout"), RATES)
def test_length_is_ceil_of_ratio(fin: float, fout: float) -> None:
    for n in (0, 1, 5, 999, 4801):
        y = resample(np.ones(n, np.float32), fin, fout)
        assert len(y) == int(np.ceil(n * fout / fin - 1e-9))


@pytest.mark.parametrize(("fin", "fout"), RATES)
def test_tone_frequency_and_level_survive(fin: float, fout: float) -> None:
    f = 440.0
    t = np.arange(int(fin * 0.5)) / fin
    y = resample(np.sin(2 * np.pi * f * t).astype(np.float32), fin, fout)
    core = y[len(y) // 4 : 3 * len(y) // 4]  # away from the zero-padded edges
    spectrum = np.abs(np.fft.rfft(core * np.hanning(len(core))))
    peak_hz = np.argmax(spectrum) * fout / len(core)
    assert abs(peak_hz - f) < fout / len(core) * 1.5
    assert np.sqrt(np.mean(core**2)) == pytest.approx(np.sqrt(0.5), rel=0.01)


def test_downsampling_removes_content_above_the_new_nyquist() -> None:
    fin, fout = 48000, 16000
    t = np.arange(fin) / fin
    y = resample(np.sin(2 * np.pi * 12000 * t).astype(np.float32), fin, fout)  # 12 kHz > 8 kHz
    assert np.sqrt(np.mean(y[2000:-2000] ** 2)) < 0.01
