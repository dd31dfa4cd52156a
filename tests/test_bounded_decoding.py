"""The decoders that read client bytes: the same answers as the plain definitions, with work and
memory bounded whatever the input."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from vibecast.engine import pitch
from vibecast.engine.voice_audio import decode_voice_audio
from vibecast.protocol.messages import ProtocolError
from vibecast.protocol.ogg import (
    OggOpusWriter,
    ogg_crc,
    ogg_crc_slow,
    opus_head,
    opus_tags,
    read_ogg_opus,
)
from vibecast.protocol.opus import OpusEncoder


def ogg_stream(packets: list[bytes], serial: int = 5) -> bytes:
    """An Ogg Opus stream of any packets, of any size and content (RFC 3533 pages, one packet
    continued over as many pages as it needs): what a hostile client can send."""
    laced: list[tuple[bytes, bool]] = []  # (segment, ends a packet)
    for p in [opus_head(312, 48000), opus_tags(), *packets]:
        for at in range(0, len(p) + 1, 255):
            piece = p[at : at + 255]
            laced.append((piece, len(piece) < 255))
            if len(piece) < 255:
                break
    out = bytearray()
    seq, continued = 0, False
    for first in range(0, len(laced), 255):
        group = laced[first : first + 255]
        last = first + 255 >= len(laced)
        flags = (0x01 if continued else 0) | (0x02 if seq == 0 else 0) | (0x04 if last else 0)
        lacing = bytes(len(piece) for piece, _ in group)
        header = struct.pack(
            "<4sBBqIIIB", b"OggS", 0, flags, 0 if group[-1][1] else -1, serial, seq, 0, len(lacing)
        )
        page = bytearray(header + lacing + b"".join(piece for piece, _ in group))
        struct.pack_into("<I", page, 22, ogg_crc(bytes(page)))
        out += page
        seq, continued = seq + 1, not group[-1][1]
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, 3, 27, 255, 4096, 65_307])
def test_fast_ogg_crc_equals_the_definition(size: int) -> None:
    data = os.urandom(size)
    assert ogg_crc(data) == ogg_crc_slow(data)


def test_a_packet_spanning_many_pages_comes_back_whole() -> None:
    big = os.urandom(3 * 255 * 255 + 17)  # continued over four pages
    small = [b"\xfc" + bytes(40), b"\xfc" + bytes(255), b"\xfc" + bytes(254)]
    assert read_ogg_opus(ogg_stream([*small, big, *small])).packets == [*small, big, *small]


def test_packet_count_bound_stops_parsing() -> None:
    writer = OggOpusWriter(pre_skip=312, input_rate=48000, serial=1)
    ogg = writer.header() + writer.write([b"\xfc\x00"] * 200) + writer.finish()
    assert len(read_ogg_opus(ogg, max_packets=200).packets) == 200
    with pytest.raises(ValueError, match="more than 199 packets"):
        read_ogg_opus(ogg, max_packets=199)


def test_a_real_ogg_upload_decodes_to_its_length() -> None:
    enc = OpusEncoder(48000)
    x = (0.3 * np.sin(2 * np.pi * 200 * np.arange(48000 * 2) / 48000)).astype(np.float32)
    pad = -(len(x) + enc.lookahead) % enc.frame
    packets = enc.encode(np.concatenate([x, np.zeros(pad + enc.lookahead, np.float32)]))
    writer = OggOpusWriter(enc.pre_skip, 48000, serial=3)
    ogg = writer.header() + writer.write(packets) + writer.finish(len(x))
    pcm, rate = decode_voice_audio(ogg, "ogg")
    assert rate == 48000 and len(pcm) == len(x)


@pytest.mark.parametrize("packet", [b"", b"\xff"], ids=["empty", "code 3 without a count"])
def test_malformed_packets_are_refused_by_name(packet: bytes) -> None:
    ogg = ogg_stream([b"\xfc\x00", packet, b"\xfc\x00"])
    with pytest.raises(ProtocolError, match="packet 1 is empty or cut short"):
        decode_voice_audio(ogg, field="speakers[0].voice_audio")


def test_pitch_in_blocks_equals_pitch_in_one_go(monkeypatch) -> None:
    rate = 24000
    t = np.arange(rate * 4) / rate
    f = 110 + 30 * np.sin(2 * np.pi * 0.7 * t)
    x = np.sin(2 * np.pi * np.cumsum(f) / rate) + 0.05 * np.random.default_rng(1).standard_normal(
        len(t)
    )
    blocked = pitch.f0_track(x, rate)
    monkeypatch.setattr(pitch, "BLOCK_FRAMES", 10**9)
    whole = pitch.f0_track(x, rate)
    assert len(blocked) > 300 and np.array_equal(blocked, whole)
