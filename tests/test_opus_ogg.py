"""Opus through libopus and Ogg Opus files: lookahead, exact lengths, and files other tools
accept."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from vibecast.protocol.ogg import OggOpusWriter, ogg_crc, opus_head, read_ogg_opus
from vibecast.protocol.opus import OpusDecoder, OpusEncoder, packet_samples


def tone(n: int, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 330 * np.arange(n) / rate)).astype(np.float32)


@pytest.mark.parametrize("rate", [48000, 24000, 16000])
def test_lookahead_flush_gives_the_exact_length(rate: int) -> None:
    enc = OpusEncoder(rate)
    assert enc.pre_skip == 312  # 6.5 ms, always counted at 48 kHz
    n = rate + 77
    padded = n + (-(n + enc.lookahead) % enc.frame)
    x = np.zeros(padded + enc.lookahead, np.float32)
    x[:n] = tone(n, rate)
    packets = enc.encode(x)
    assert all(packet_samples(p, rate) == enc.frame for p in packets)
    y = np.concatenate([OpusDecoder(rate).decode(p) for p in packets])
    assert len(y) - enc.lookahead == padded
    # The decoded audio lines up with the input once the lookahead is dropped: a burst that
    # starts at 0.5 s starts there in the output too (Opus at 32 kbit/s keeps the envelope,
    # not the waveform).
    burst = np.zeros(padded + enc.lookahead, np.float32)
    onset = rate // 2
    burst[onset : onset + rate // 4] = tone(rate // 4, rate)
    enc2, dec2 = OpusEncoder(rate), OpusDecoder(rate)
    z = np.concatenate([dec2.decode(p) for p in enc2.encode(burst)])[enc2.lookahead :]
    heard = int(np.argmax(np.abs(z) > 0.05))
    assert abs(heard - onset) <= rate // 500  # within 2 ms


def test_encoder_refuses_partial_frames() -> None:
    with pytest.raises(ValueError):
        OpusEncoder(48000).encode(np.zeros(100, np.float32))


def test_crc_matches_the_ogg_reference_value() -> None:
    # The CRC of "OggS" with this polynomial (0x04C11DB7, unreflected), computed by hand.
    assert ogg_crc(b"") == 0
    assert ogg_crc(b"\x00") == 0
    assert ogg_crc(b"\x01") == 0x04C11DB7


def test_ogg_file_is_valid_for_opusinfo_and_trims_to_the_sample(tmp_path: Path) -> None:
    rate = 48000
    enc = OpusEncoder(rate)
    n = 2 * rate + 500
    padded = n + (-(n + enc.lookahead) % enc.frame)
    x = np.zeros(padded + enc.lookahead, np.float32)
    x[:n] = tone(n, rate)
    packets = enc.encode(x)
    writer = OggOpusWriter(enc.pre_skip, rate)
    data = writer.header() + writer.write(packets) + writer.finish(n)
    path = tmp_path / "t.opus"
    path.write_bytes(data)
    info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True)
    assert info.returncode == 0 and "WARNING" not in info.stdout + info.stderr, info.stdout
    subprocess.run(["opusdec", "--quiet", str(path), str(tmp_path / "t.wav")], check=True)
    with wave.open(str(tmp_path / "t.wav")) as w:
        assert w.getnframes() == n
    back = read_ogg_opus(data)
    assert back.packets == packets and back.samples_48k == n and back.pre_skip == 312


def test_packets_of_255_bytes_lace_correctly() -> None:
    packets = [bytes([0xFC]) + b"\x00" * 254, bytes([0xFC]) + b"\x00" * 509, bytes([0xFC])]
    writer = OggOpusWriter(312, 48000)
    data = writer.header() + writer.write(packets) + writer.finish()
    assert read_ogg_opus(data).packets == packets


def test_reader_rejects_corruption() -> None:
    writer = OggOpusWriter(312, 48000)
    data = bytearray(writer.header() + writer.finish())
    data[40] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        read_ogg_opus(bytes(data))
    with pytest.raises(ValueError):
        read_ogg_opus(b"RIFF0000WAVE")
    assert opus_head(312, 24000)[:8] == b"OpusHead" and len(opus_head(312, 24000)) == 19
