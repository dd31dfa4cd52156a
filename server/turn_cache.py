"""The turn cache: every turn the engine makes, on disk with its audio and the backend's state
after it (`TurnEnded.carry`), so that a script run again replays its unchanged turns instead of
generating them, and an edited one is generated from its first changed turn on.

Keys chain. Turn k's key hashes turn k - 1's key with turn k's speaker and text, and the chain
starts from everything else that shaped the audio: the backend's fingerprint (weights, steps,
window, dtype, device kind), each speaker's voice (its catalogue id, or a hash of the uploaded
samples), the seed and the synthesis parameters. An entry is therefore used exactly when the
script up to and including its turn is unchanged. In `context` mode a turn's key also says
whether it ended the script (the model may speak on after the last line). What a context turn
saw of the lines after it (the text block's lookahead) is not in its key: an edit replays the
turns before it as they were made beside the old line (docs/turn-cache.md).

One file per turn, safetensors: `pcm` (float32 at the backend's rate, exactly what the engine
made) and `carry.NAME` arrays; metadata says whether the turn was capped. Least recently used
entries go first once the folder passes its size bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from ..engine.backend import Carry, SpeakerVoice, SynthesisParams, Turn
from ..engine.pipeline import TurnAudio, TurnEnded, TurnStarted
from ..engine.scheduler import Events

CHUNK_S = 1.0  # audio a replay unit hands out: flow control paces a replay as it does the engine


def first_key(fingerprint: str, speakers: list[SpeakerVoice], params: SynthesisParams) -> str:
    """What every turn of a session shares: the start of its chain of keys."""
    voices = [
        s.voice_id
        if s.audio is None
        else f"{s.audio_rate}:{hashlib.sha256(np.ascontiguousarray(s.audio).tobytes()).hexdigest()}"
        for s in speakers
    ]
    p = params
    what = [fingerprint, voices, p.seed, p.mode, p.cfg_scale, p.steps, p.frames_per_turn]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def next_key(previous: str, turn: Turn, last: bool) -> str:
    what = [previous, turn.speaker, turn.text, last]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


class TurnCache:
    """Entries on disk under `folder`, at most `max_bytes` of them (least recently used go).
    Thread-safe: sessions store turns from their output workers and look them up from theirs."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = max_bytes
        self.hits = 0  # turns replayed
        self.misses = 0  # turns the engine made and stored
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] | None = None  # key -> bytes, least recent first
        self._bytes = 0

    def _index(self) -> OrderedDict[str, int]:
        """The entries on disk, oldest use first (read once, on first use, under the lock)."""
        if self._files is None:
            found = []
            if self.folder.is_dir():
                for f in self.folder.glob("*/*.tmp"):  # a write cut short by a crash
                    f.unlink(missing_ok=True)
                for f in self.folder.glob("*/*.safetensors"):
                    st = f.stat()
                    found.append((st.st_mtime_ns, f.stem, st.st_size))
            found.sort()
            self._files = OrderedDict((key, size) for _, key, size in found)
            self._bytes = sum(self._files.values())
        return self._files

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def find(self, key: str) -> Path | None:
        """The entry of `key`, marked as just used; None if there is none."""
        with self._lock:
            files = self._index()
            if key not in files:
                return None
            files.move_to_end(key)
            path = self.path(key)
            try:
                os.utime(path)  # the order survives a restart
            except FileNotFoundError:  # removed behind our back
                self._bytes -= files.pop(key)
                return None
            return path

    def put(self, key: str, pcm: np.ndarray, capped: bool, carry: Carry) -> None:
        arrays = {"pcm": np.ascontiguousarray(pcm, np.float32)}
        arrays |= {f"carry.{name}": np.ascontiguousarray(a) for name, a in carry.items()}
        data = save(arrays, metadata={"capped": "1" if capped else "0"})
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers see a whole entry or none
        with self._lock:
            files = self._index()
            self._bytes += len(data) - files.pop(key, 0)
            files[key] = len(data)
            self.misses += 1
            while self._bytes > self.max_bytes and len(files) > 1:
                old, size = files.popitem(last=False)
                self._bytes -= size
                self.path(old).unlink(missing_ok=True)

    def replayed(self) -> None:
        with self._lock:
            self.hits += 1

    def audio(self, path: Path) -> tuple[np.ndarray, bool]:
        with safe_open(path, "numpy") as f:
            return f.get_tensor("pcm"), f.metadata().get("capped") == "1"

    def carry(self, path: Path) -> Carry:
        with safe_open(path, "numpy") as f:
            return {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith("carry.")}

    def counters(self) -> dict[str, float]:
        with self._lock:
            files = self._index()
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(files),
                "bytes": self._bytes,
            }


class Carries(Sequence[Carry]):
    """The carries of replayed turns, read from disk when the backend asks for one (context
    mode reads only the turns that fit its window)."""

    def __init__(self, cache: TurnCache, paths: list[Path]) -> None:
        self._cache, self._paths = cache, paths

    def __len__(self) -> int:
        return len(self._paths)

    @overload
    def __getitem__(self, i: int) -> Carry: ...
    @overload
    def __getitem__(self, i: slice) -> list[Carry]: ...
    def __getitem__(self, i: int | slice) -> Carry | list[Carry]:
        if isinstance(i, slice):
            return [self._cache.carry(p) for p in self._paths[i]]
        return self._cache.carry(self._paths[i])


class Replay:
    """A runner (engine/scheduler.py) that replays cached turns as the engine made them: one
    unit per second of audio, so the loop's flow control paces it like generation. It runs no
    model; each turn's file is read when its turn comes."""

    group = None

    def __init__(self, cache: TurnCache, paths: list[Path], turns: list[Turn], rate: int) -> None:
        self._cache, self._paths, self._turns = cache, paths, turns
        self._chunk = int(CHUNK_S * rate)
        self._k = 0  # the turn being replayed
        self._pcm: np.ndarray | None = None
        self._capped = False
        self._at = 0

    def ready(self) -> bool:
        return True

    def run(self) -> Events | None:
        if self._pcm is None:
            if self._k == len(self._paths):
                return None
            self._pcm, self._capped = self._cache.audio(self._paths[self._k])
            self._at = 0
            self._cache.replayed()
            return [TurnStarted(self._turns[self._k])]
        k, start = self._k, self._at
        if start >= len(self._pcm):
            self._pcm, self._k = None, k + 1
            return [TurnEnded(k, capped=self._capped)]
        self._at = start + self._chunk
        return [TurnAudio(k, self._pcm[start : self._at])]

    def park(self) -> None:
        return None

    def close(self) -> None:
        return None
