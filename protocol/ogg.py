"""Ogg Opus files (RFC 7845 on RFC 3533): written from the packets a session streamed, and read
back for voice uploads and tests.

Granule positions count 48 kHz samples including pre-skip. The last page's granule is set to
pre_skip + the session's length, so players trim the encoder's flush padding (end trimming).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .opus import packet_samples


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()
# Ogg's CRC is the MSB-first twin of zlib's LSB-first CRC-32 (same polynomial). Reversing the
# bits of every byte turns one into the other, so zlib's C loop does the work: ~1000x faster
# than a Python loop over the bytes, which took ~0.7 s per 10 MB of upload.
_REVERSED_BYTES = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def ogg_crc_slow(data: bytes) -> int:
    """The definition, byte by byte (the tests check `ogg_crc` against it)."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[((crc >> 24) ^ b) & 0xFF]
    return crc


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, init 0, no final xor (not zlib's)."""
    # zlib.crc32(d, 0xFFFFFFFF) runs the reflected CRC from register 0 and xors the result with
    # 0xFFFFFFFF; undo that xor, then reverse the 32 bits back to MSB-first order.
    reflected = zlib.crc32(data.translate(_REVERSED_BYTES), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def opus_head(pre_skip: int, input_rate: int, channels: int = 1) -> bytes:
    """The 19-byte OpusHead (mapping family 0); also WebCodecs' `description` for Opus."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, input_rate, 0, 0)


def opus_tags(vendor: str = "vibecast", comments: Iterable[str] = ()) -> bytes:
    v = vendor.encode()
    items = [c.encode() for c in comments]
    body = struct.pack("<I", len(v)) + v + struct.pack("<I", len(items))
    for c in items:
        body += struct.pack("<I", len(c)) + c
    return b"OpusTags" + body


def _page(packets: list[bytes], granule: int, serial: int, seq: int, flags: int) -> bytes:
    lacing = bytearray()
    for p in packets:
        lacing += b"\xff" * (len(p) // 255) + bytes([len(p) % 255])
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, seq, 0, len(lacing))
    page = bytearray(header + lacing + b"".join(packets))
    struct.pack_into("<I", page, 22, ogg_crc(bytes(page)))
    return bytes(page)


class OggOpusWriter:
    """Writes pages as packets arrive; `finish` closes the stream with end trimming."""

    PACKETS_PER_PAGE = 50  # about a second of 20 ms packets, as libopusenc does

    def __init__(self, pre_skip: int, input_rate: int, serial: int | None = None) -> None:
        self.pre_skip = pre_skip
        self.serial = serial if serial is not None else int.from_bytes(os.urandom(4), "little")
        self._seq = 0
        self._granule = 0  # 48 kHz samples in the packets of pages written so far
        self._held: list[bytes] = []
        self._input_rate = input_rate

    def _emit(self, packets: list[bytes], granule: int, flags: int) -> bytes:
        page = _page(packets, granule, self.serial, self._seq, flags)
        self._seq += 1
        return page

    def header(self, comments: Iterable[str] = ()) -> bytes:
        head = self._emit([opus_head(self.pre_skip, self._input_rate)], 0, 0x02)
        return head + self._emit([opus_tags(comments=comments)], 0, 0)

    def write(self, packets: Iterable[bytes]) -> bytes:
        """Pages for whole groups of packets; the rest waits so `finish` has a last page to trim."""
        out = bytearray()
        for p in packets:
            self._held.append(p)
            # 255 lacing values per page: keep well inside with at most 50 packets of < 2 KB.
            if len(self._held) > self.PACKETS_PER_PAGE:
                group, self._held = self._held[:-1], self._held[-1:]
                self._granule += sum(packet_samples(q) for q in group)
                out += self._emit(group, self._granule, 0)
        return bytes(out)

    def finish(self, samples_48k: int | None = None) -> bytes:
        """Last page (EOS). With `samples_48k`, playback ends after exactly that many samples."""
        self._granule += sum(packet_samples(q) for q in self._held)
        granule = self._granule
        if samples_48k is not None:
            granule = min(granule, self.pre_skip + samples_48k)
        page = self._emit(self._held, granule, 0x04)
        self._held = []
        return page


@dataclass
class OggOpus:
    pre_skip: int
    input_rate: int
    channels: int
    packets: list[bytes]
    final_granule: int

    @property
    def samples_48k(self) -> int:
        """Playback length at 48 kHz after pre-skip and end trimming."""
        return max(0, self.final_granule - self.pre_skip)


def _pages(data: bytes) -> Iterator[tuple[int, int, int, bytes, bytes]]:
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS":
            raise ValueError(f"not an Ogg page at byte {pos}")
        if len(data) < pos + 27:
            raise ValueError("the Ogg data ends inside a page header")
        _, version, flags, granule, serial, _, crc, n = struct.unpack_from("<4sBBqIIIB", data, pos)
        lacing = data[pos + 27 : pos + 27 + n]
        size = sum(lacing)
        end = pos + 27 + n + size
        if version != 0 or len(lacing) < n or end > len(data):
            raise ValueError(f"truncated or unsupported Ogg page at byte {pos}")
        page = bytearray(data[pos:end])
        struct.pack_into("<I", page, 22, 0)
        if ogg_crc(bytes(page)) != crc:
            raise ValueError(f"Ogg page at byte {pos} fails its checksum")
        yield flags, granule, serial, bytes(lacing), data[pos + 27 + n : end]
        pos = end


def read_ogg_opus(data: bytes, max_packets: int | None = None) -> OggOpus:
    """Parse the first logical stream of an Ogg Opus file. Raises ValueError if it is not one.

    Work is linear in the size of `data`. With `max_packets`, parsing stops with ValueError once
    the stream holds more audio packets than that (callers bound what they will decode).
    """
    packets: list[bytes] = []
    pieces: list[bytes] = []  # of the packet that continues on the next lacing value or page
    serial = None
    granule = 0
    for _, page_granule, page_serial, lacing, body in _pages(data):
        if serial is None:
            serial = page_serial
        elif page_serial != serial:
            continue
        offset = 0
        for lace in lacing:
            pieces.append(body[offset : offset + lace])
            offset += lace
            if lace < 255:
                packets.append(b"".join(pieces))
                pieces = []
                if max_packets is not None and len(packets) > max_packets + 2:
                    raise ValueError(f"the Ogg stream holds more than {max_packets} packets")
        if page_granule >= 0:
            granule = page_granule
    if len(packets) < 2 or not packets[0].startswith(b"OpusHead") or len(packets[0]) < 19:
        raise ValueError("not an Ogg Opus stream (no OpusHead)")
    _, _, channels, pre_skip, rate, _, mapping = struct.unpack_from("<8sBBHIhB", packets[0])
    if mapping != 0 or channels not in (1, 2):
        raise ValueError("only mono or stereo Ogg Opus (mapping family 0) is supported")
    return OggOpus(pre_skip, rate, channels, packets[2:], granule)
