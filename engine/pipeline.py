"""The double-buffered turn pipeline.

While turn i renders (acoustic stage, on this thread or the render stream), turn i+1 is encoded
(text stage, on a worker thread and the encode stream) into the other of two buffers. Audio
order, turn boundaries and sample positions do not depend on the overlap: `overlap=False` runs
the same calls one after the other and must give identical audio (tests/test_pipeline.py).

Buffer reuse: turn i+2 encodes into the slot turn i rendered from. Its encode waits, on the
device, for the mark recorded after turn i's render (write-after-read), and on the host it
cannot start before turn i+1 has begun rendering.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend, Turn


@dataclass(frozen=True)
class TurnStarted:
    turn: Turn


@dataclass(frozen=True)
class TurnAudio:
    turn: int
    pcm: np.ndarray  # mono float32 at backend.sample_rate


@dataclass(frozen=True)
class TurnEnded:
    turn: int


PipelineEvent = TurnStarted | TurnAudio | TurnEnded


class TurnFeed:
    """The turns of one session, which may grow while it plays (`append` with `more`)."""

    def __init__(self, turns: Sequence[Turn] = (), more: bool = False) -> None:
        self._turns = list(turns)
        self._more = more
        self._cond = threading.Condition()

    def add(self, turns: Sequence[Turn], more: bool) -> int:
        with self._cond:
            self._turns.extend(turns)
            self._more = more
            self._cond.notify_all()
            return len(self._turns)

    def close(self) -> None:
        """No more turns will come (the session ends or was cancelled)."""
        self.add((), more=False)

    def peek(self, i: int) -> Turn | None:
        with self._cond:
            return self._turns[i] if i < len(self._turns) else None

    def get(self, i: int) -> Turn | None:
        """Turn i, waiting for it while more may come; None when the script has ended."""
        with self._cond:
            self._cond.wait_for(lambda: i < len(self._turns) or not self._more)
            return self._turns[i] if i < len(self._turns) else None

    @property
    def total(self) -> int:
        with self._cond:
            return len(self._turns)

    @property
    def complete(self) -> bool:
        """True once no more turns can be appended."""
        with self._cond:
            return not self._more


def run_turns(
    backend: Backend,
    session: Any,
    feed: TurnFeed,
    stop: threading.Event,
    overlap: bool = True,
) -> Iterator[PipelineEvent]:
    """Render every turn of `feed` in order, encoding the next turn while the current renders."""
    lanes = backend.lanes
    released: list[Any] = [None, None]  # per slot: mark after the last render that read it
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") if overlap else None

    def encode(turn: Turn) -> Any:
        slot = turn.index % 2
        with lanes.encode():
            lanes.wait(released[slot])
            encoded = backend.encode(session, turn, slot)
            return encoded, lanes.mark()

    def submit(turn: Turn) -> Future[Any]:
        if pool is not None:
            return pool.submit(encode, turn)
        done: Future[Any] = Future()
        done.set_result(turn)  # encoded lazily, just before render, when not overlapping
        return done

    def result(turn: Turn, pending: Future[Any]) -> tuple[Any, Any]:
        return pending.result() if pool is not None else encode(turn)

    try:
        turn = feed.get(0)
        pending = submit(turn) if turn is not None else None
        while turn is not None and pending is not None and not stop.is_set():
            encoded, ready = result(turn, pending)
            nxt = feed.peek(turn.index + 1)
            pending = submit(nxt) if nxt is not None else None
            yield TurnStarted(turn)
            chunks = backend.render(session, encoded)
            with lanes.render():
                lanes.wait(ready)
            while not stop.is_set():
                with lanes.render():
                    pcm = next(chunks, None)
                if pcm is None:
                    break
                if len(pcm):
                    yield TurnAudio(turn.index, pcm)
            with lanes.render():
                released[turn.index % 2] = lanes.mark()
            if stop.is_set():
                chunks.close()
                break
            yield TurnEnded(turn.index)
            if nxt is None:  # not known when this turn began: wait for an append or the end
                nxt = feed.get(turn.index + 1)
                pending = submit(nxt) if nxt is not None else None
            turn = nxt
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
