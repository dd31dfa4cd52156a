"""Where VibeVoice's inputs come from: hub ids, voice files, devices and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vibecast.engine.vibevoice.backend import at_24k
from vibecast.engine.vibevoice.weights import CheckpointError, pick_dtype, resolve
from vibecast.engine.voice_audio import decode_voice_audio
from vibecast.protocol.ogg import OggOpusWriter
from vibecast.protocol.opus import OpusEncoder
from vibecast.protocol.wav import wav_bytes


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # these machines reach no hub
    with pytest.raises(CheckpointError, match="Download it elsewhere and pass the directory"):
        resolve("someone/VibeVoice-Nothing")


def tone(rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_voice_files_in_wav_or_ogg_opus_come_out_at_24k() -> None:
    audio, rate = decode_voice_audio(wav_bytes(tone(16000), 16000))
    assert rate == 16000 and len(at_24k(audio, rate)) == 24000
    enc = OpusEncoder(48000)
    x = tone(48000)
    n = len(x) + (-(len(x) + enc.lookahead) % enc.frame)
    padded = np.zeros(n + enc.lookahead, np.float32)
    padded[: len(x)] = x
    writer = OggOpusWriter(enc.pre_skip, 48000)
    data = writer.header() + writer.write(enc.encode(padded)) + writer.finish(len(x))
    audio, rate = decode_voice_audio(data)
    assert rate == 48000 and len(audio) == len(x)
    resampled = at_24k(audio, rate)
    assert len(resampled) == 24000
    spectrum = np.abs(np.fft.rfft(resampled[6000:18000]))
    assert abs(np.argmax(spectrum) * 24000 / 12000 - 220) < 4  # still a 220 Hz tone


def test_a_bad_file_in_the_voices_folder_is_named(monkeypatch, tmp_path) -> None:
    import re
    import shutil

    from vibevoice_helpers import TINY

    from vibecast.engine.vibevoice import weights
    from vibecast.engine.vibevoice.backend import VibeVoiceBackend

    shutil.copy(TINY / "config.json", tmp_path / "vibevoice-tiny.json")
    monkeypatch.setattr(weights, "CONFIGS", tmp_path)
    folder = tmp_path / "voices"
    folder.mkdir()
    (folder / "alice.wav").write_bytes(wav_bytes(tone(16000), 16000))
    (folder / "blip.wav").write_bytes(wav_bytes(tone(16000, 0.05), 16000))  # under the minimum
    with pytest.raises(ValueError, match=re.escape(f"--voices {folder}: blip.wav: ") + ".*0.05 s"):
        VibeVoiceBackend.load("random:tiny", device="cpu", dtype="float32", voices=str(folder))
    (folder / "blip.wav").unlink()
    backend = VibeVoiceBackend.load("random:tiny", "cpu", "float32", voices=str(folder))
    assert [v.id for v in backend.voices()] == ["alice"]


def test_bfloat16_is_refused_on_a_gpu_older_than_ampere(monkeypatch) -> None:
    # Simulated: there is no GPU on these machines, so torch.cuda's answers are stubbed.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match="Ampere or newer.*Tesla T4 is 7.5.*--dtype float32"):
        pick_dtype("bfloat16", torch.device("cuda"))
    assert pick_dtype("float32", torch.device("cuda")) is torch.float32
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="use bfloat16 or float32"):
        pick_dtype("float16", torch.device("cpu"))


def test_random_weights_of_a_released_size_run_the_frame_benchmark(monkeypatch, tmp_path) -> None:
    # `--model random:1.5b` builds the released dimensions with random weights, to measure speed
    # on a GPU; here the same path runs with the tiny dimensions so it fits on this machine.
    import shutil

    from vibevoice_helpers import TINY

    from vibecast.bench import frame_times
    from vibecast.engine.vibevoice import weights
    from vibecast.engine.vibevoice.backend import VibeVoiceBackend

    shutil.copy(TINY / "config.json", tmp_path / "vibevoice-tiny.json")
    monkeypatch.setattr(weights, "CONFIGS", tmp_path)
    backend = VibeVoiceBackend.load("random:tiny", device="cpu", dtype="float32")
    assert backend.name == "vibevoice:random-tiny" and backend.voices() == []
    result = frame_times(backend, frames=3, steps=2)
    assert result["frames"] == 3 and result["p50_ms"] > 0 and result["device"] == "cpu"
