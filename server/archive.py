"""Every Opus packet a session made, spooled to a temporary file, for
`GET /v1/sessions/{id}/audio.opus`. Memory stays flat however long the session (90 minutes of
32 kbit/s Opus is about 22 MB on disk). Finished sessions are kept for `ttl_s`, at most
`max_sessions` of them, oldest dropped first. Each entry belongs to the client identity that
made it (server/identity.py); only that identity may download it.
"""

from __future__ import annotations

import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from ..protocol.ogg import OggOpusWriter


@dataclass
class _Entry:
    file: IO[bytes]
    pre_skip: int
    rate: int
    owner: str
    samples: int | None = None  # set when the session finished
    ended_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Archive:
    def __init__(self, max_sessions: int = 64, ttl_s: float = 3600.0) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def begin(self, session_id: str, pre_skip: int, rate: int, owner: str) -> None:
        entry = _Entry(tempfile.TemporaryFile(prefix="vibecast-"), pre_skip, rate, owner)
        with self._lock:
            self._entries[session_id] = entry

    def write(self, session_id: str, packets: list[bytes]) -> None:
        entry = self._entries.get(session_id)
        if entry is None:
            return
        blob = b"".join(struct.pack("<H", len(p)) + p for p in packets)
        with entry.lock:
            entry.file.seek(0, 2)
            entry.file.write(blob)

    def finish(self, session_id: str, samples: int | None) -> None:
        """The session ended; with `samples`, the file ends after exactly that many."""
        entry = self._entries.get(session_id)
        if entry is not None and entry.ended_at is None:
            entry.samples = samples
            entry.ended_at = time.monotonic()
        self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            ended = sorted(
                (e.ended_at, sid) for sid, e in self._entries.items() if e.ended_at is not None
            )
            drop = [sid for t, sid in ended if now - t > self.ttl_s]
            keep = [sid for t, sid in ended if now - t <= self.ttl_s]
            drop += keep[: max(0, len(keep) - self.max_sessions)]
            gone = [self._entries.pop(sid) for sid in drop]
        for entry in gone:
            with entry.lock:
                entry.file.close()

    def has(self, session_id: str) -> bool:
        self._expire()
        return session_id in self._entries

    def owned_by(self, session_id: str, owner: str) -> bool:
        """Kept, and made by `owner`."""
        self._expire()
        entry = self._entries.get(session_id)
        return entry is not None and entry.owner == owner

    def ogg(self, session_id: str) -> Iterator[bytes]:
        """The session's audio as an Ogg Opus file, page by page (what exists so far)."""
        entry = self._entries[session_id]
        writer = OggOpusWriter(entry.pre_skip, entry.rate)
        yield writer.header(comments=[f"VIBECAST_SESSION={session_id}"])
        offset = 0
        while True:
            with entry.lock:
                if entry.file.closed:
                    return
                entry.file.seek(offset)
                chunk = entry.file.read(1 << 16)
            if not chunk:
                break
            packets, used = [], 0
            while used + 2 <= len(chunk):
                (n,) = struct.unpack_from("<H", chunk, used)
                if used + 2 + n > len(chunk):
                    break
                packets.append(chunk[used + 2 : used + 2 + n])
                used += 2 + n
            offset += used
            yield writer.write(packets)
        samples_48k = None
        if entry.samples is not None:
            samples_48k = entry.samples * 48000 // entry.rate
        yield writer.finish(samples_48k)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            with entry.lock:
                entry.file.close()
