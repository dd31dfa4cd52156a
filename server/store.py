"""Session state that must outlive a socket: resume tokens, the admission queue, the ring of
sent frames, the fencing epoch of the session's writer, and the engine's rebuildable state. One
small interface with an in-memory default; across machines server/redis_store.py implements the
same calls on Redis (tok:{id}, a ZSET ring:{id} keyed by frame index, an INCR epoch:{id}, a ZSET
queue keyed by arrival), with the same semantics as below; tests/test_store.py runs one suite
against both.
"""

from __future__ import annotations

import hmac
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class RingFrame:
    index: int  # position in the session's message stream (every replayable message)
    seq: int | None  # audio seq, for audio messages
    end_pts: int  # samples of the session up to the end of this frame
    data: bytes  # the packed message as sent


class SessionStore(Protocol):
    shared: bool
    """Other processes (gateways) see this store: sessions save what another gateway needs to
    take them over (server/revive.py)."""

    def register(self, session_id: str, resume_token: str) -> None: ...

    def token_matches(self, session_id: str, resume_token: str) -> bool: ...

    def forget(self, session_id: str) -> None: ...

    def ring_append(self, session_id: str, frame: RingFrame, fence: int = 0) -> bool:
        """Keep a sent frame. `fence`: the epoch the writer holds the session under (0: none);
        False, and nothing kept, when another writer has attached since (in one step)."""

    def ring_after(self, session_id: str, last_seq: int) -> list[RingFrame] | None:
        """Frames after the audio frame `last_seq` (-1: from the start); None if trimmed away."""

    def ring_last(self, session_id: str) -> RingFrame | None:
        """The last frame sent (where another gateway goes on from)."""

    def ring_trim(self, session_id: str, keep_from_pts: int) -> None:
        """Drop frames that end before `keep_from_pts`."""

    def enqueue(self, session_id: str) -> None: ...

    def dequeue(self, session_id: str) -> None: ...

    def queue(self) -> list[str]:
        """Waiting session ids, first in line first."""

    def admit(self, session_id: str, capacity: int) -> bool:
        """In one step: if the session is first in the queue and fewer than `capacity` sessions
        run, move it from the queue to the running ones. With a shared store the queue and the
        count are every gateway's: admission is first come, first served across them."""

    def keep_running(self, session_ids: list[str]) -> None:
        """These sessions run (again, for a resumed one; a gateway says so every second or so);
        a running session nobody vouches for within RUNNING_TTL_S no longer counts (its
        gateway died)."""

    def release(self, session_id: str) -> None:
        """The session stopped running (ended, or its socket dropped)."""

    def running(self) -> int:
        """Sessions running, every gateway's."""

    def attach(self, session_id: str) -> int:
        """A writer takes the session over: bump and return its fencing epoch."""

    def epoch(self, session_id: str) -> int:
        """The current fencing epoch (0: never attached, or forgotten). A writer whose epoch
        differs is stale and must stop."""

    def save_state(self, session_id: str, part: str, data: bytes) -> None:
        """Keep one part of the session's rebuildable state (opaque bytes, by name: its start
        request, each finished turn's carry, ...); dropped for an unknown session."""

    def state(self, session_id: str, part: str) -> bytes | None: ...

    def close(self) -> None:
        """The server is stopping: let go of connections."""


RUNNING_TTL_S = 5.0


@dataclass
class _Ring:
    frames: deque[RingFrame] = field(default_factory=deque)
    first_index: int = 0  # index of frames[0], or of the next frame when empty
    trimmed_seq: int = -1  # the highest audio seq trimmed away


class MemoryStore:
    """The in-process default. Thread-safe: the engine threads and the event loop share it."""

    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._rings: dict[str, _Ring] = {}
        self._queue: dict[str, int] = {}
        self._arrival = itertools.count()
        self._epochs: dict[str, int] = {}
        self._running: set[str] = set()
        self._states: dict[str, dict[str, bytes]] = {}

    def register(self, session_id: str, resume_token: str) -> None:
        # A session starts afresh: an empty ring and no engine state. The epoch stays, so that a
        # writer attached before cannot mistake the new session for its own.
        with self._lock:
            self._tokens[session_id] = resume_token
            self._rings[session_id] = _Ring()
            self._states.pop(session_id, None)

    def token_matches(self, session_id: str, resume_token: str) -> bool:
        with self._lock:
            known = self._tokens.get(session_id)
        # As bytes: compare_digest refuses str with non-ASCII characters (a client's typo must
        # get `unknown_session`, not a traceback).
        return known is not None and hmac.compare_digest(known.encode(), resume_token.encode())

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._tokens.pop(session_id, None)
            self._rings.pop(session_id, None)
            self._queue.pop(session_id, None)
            self._epochs.pop(session_id, None)  # epoch 0: every writer left is stale
            self._running.discard(session_id)
            self._states.pop(session_id, None)

    def ring_append(self, session_id: str, frame: RingFrame, fence: int = 0) -> bool:
        with self._lock:
            if fence and self._epochs.get(session_id, 0) != fence:
                return False
            ring = self._rings.get(session_id)
            if ring is not None:
                if not ring.frames:
                    ring.first_index = frame.index
                ring.frames.append(frame)
            return True

    def ring_after(self, session_id: str, last_seq: int) -> list[RingFrame] | None:
        with self._lock:
            ring = self._rings.get(session_id)
            if ring is None or last_seq < ring.trimmed_seq:
                return None
            frames = list(ring.frames)
        if last_seq < 0:
            return frames if ring.trimmed_seq < 0 else None
        for i, f in enumerate(frames):
            if f.seq == last_seq:
                return frames[i + 1 :]
        # last_seq is not in the ring: it is either the last trimmed frame or not sent yet.
        return frames if last_seq == ring.trimmed_seq else None

    def ring_last(self, session_id: str) -> RingFrame | None:
        with self._lock:
            ring = self._rings.get(session_id)
            return ring.frames[-1] if ring and ring.frames else None

    def ring_trim(self, session_id: str, keep_from_pts: int) -> None:
        with self._lock:
            ring = self._rings.get(session_id)
            while ring and ring.frames and ring.frames[0].end_pts < keep_from_pts:
                gone = ring.frames.popleft()
                ring.first_index = gone.index + 1
                if gone.seq is not None:
                    ring.trimmed_seq = gone.seq

    def enqueue(self, session_id: str) -> None:
        with self._lock:
            self._queue.setdefault(session_id, next(self._arrival))

    def dequeue(self, session_id: str) -> None:
        with self._lock:
            self._queue.pop(session_id, None)

    def queue(self) -> list[str]:
        with self._lock:
            return sorted(self._queue, key=self._queue.__getitem__)

    def admit(self, session_id: str, capacity: int) -> bool:
        with self._lock:
            first = min(self._queue, key=self._queue.__getitem__, default=None)
            if first != session_id or len(self._running) >= capacity:
                return False
            del self._queue[session_id]
            self._running.add(session_id)
            return True

    def keep_running(self, session_ids: list[str]) -> None:
        with self._lock:  # (one process: nothing expires, but a resumed session comes back)
            self._running.update(session_ids)

    def release(self, session_id: str) -> None:
        with self._lock:
            self._running.discard(session_id)

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def close(self) -> None:
        return None

    def attach(self, session_id: str) -> int:
        with self._lock:
            epoch = self._epochs.get(session_id, 0) + 1
            self._epochs[session_id] = epoch
            return epoch

    def epoch(self, session_id: str) -> int:
        with self._lock:
            return self._epochs.get(session_id, 0)

    def save_state(self, session_id: str, part: str, data: bytes) -> None:
        # Like ring_append: a late engine thread must not bring back a forgotten session.
        with self._lock:
            if session_id in self._tokens:
                self._states.setdefault(session_id, {})[part] = data

    def state(self, session_id: str, part: str) -> bytes | None:
        with self._lock:
            return self._states.get(session_id, {}).get(part)


@dataclass
class JobRecord:
    """A job (server/jobs.py) as the store keeps it: plain fields, so any store can hold it."""

    id: str
    owner: str  # client identity (API key name or address): only it sees the job
    request: str  # the `start` body as JSON (voice uploads base64)
    created: float
    status: str = "queued"  # queued, running, done, failed, cancelled
    updated: float = 0.0
    turns_total: int = 0
    turns_done: int = 0  # turns whose audio is complete on disk, in order
    samples_done: int = 0  # 24 kHz samples in those turns
    audio_s_estimate: float = 0.0
    error_code: str | None = None
    error_message: str | None = None


class JobStore(Protocol):
    """Where jobs' metadata lives: SQLite on one machine (server/job_store.py); the scale-out
    issue puts the same calls on Redis or Postgres."""

    def put(self, job: JobRecord) -> None:
        """Insert or replace."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def owned_by(self, owner: str) -> list[JobRecord]:
        """Newest first."""

    def all(self) -> list[JobRecord]:
        """Oldest first."""

    def delete(self, job_id: str) -> None: ...

    def close(self) -> None: ...
