"""What flows from the engine to a session: a session's script (`TurnFeed`, which may grow while
it plays) and the events of its generation (a turn starts, audio of a turn, a turn ends)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backend import Carry, Turn


@dataclass(frozen=True)
class TurnStarted:
    turn: Turn


@dataclass(frozen=True)
class TurnAudio:
    turn: int
    pcm: np.ndarray  # mono float32 at backend.sample_rate
    mark: Carry | None = None
    """Where the backend can go on from after this chunk, within its turn (`runner(...,
    within=mark)`); None: only from the turn's start."""


@dataclass(frozen=True)
class TurnEnded:
    turn: int
    capped: bool = False  # cut at the turn's frame cap: the model had not ended it
    carry: Carry | None = None
    """What the backend needs to go on after this turn (its `runner(..., replayed)`), as named
    arrays: the turn cache stores it with the turn's audio. None: nothing to store (a turn
    that was itself replayed from the cache)."""


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

    def known(self) -> list[Turn]:
        """The turns received so far."""
        with self._cond:
            return list(self._turns)

    @property
    def total(self) -> int:
        with self._cond:
            return len(self._turns)

    @property
    def complete(self) -> bool:
        """True once no more turns can be appended."""
        with self._cond:
            return not self._more
