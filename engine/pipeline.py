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
    """The turns of one session, which may grow while it plays (`append` with `more`).

    The last turn may be open (`stream: true` on the wire): its text grows with `write` until
    a write with `final` closes it. An open turn is invisible to `peek`, `get` and `known`, so a
    backend that speaks whole turns waits for it as for a turn not yet appended; a backend that
    speaks text as it arrives reads it with `partial`. Every change wakes the waiters of `get`;
    the server also wakes the engine loop (scheduler.py's `wake`).
    """

    def __init__(
        self, turns: Sequence[Turn] = (), more: bool = False, open_last: bool = False
    ) -> None:
        self._turns: list[Turn] = []
        self._more = more
        self._open: int | None = None
        self._ended = False  # `close`d: nothing more comes, an open turn stays unfinished
        self._cond = threading.Condition()
        self.add(turns, more, open_last)

    def add(self, turns: Sequence[Turn], more: bool, open_last: bool = False) -> int:
        """Append `turns` (`open_last`: the last of them is open, its text may grow); `more`:
        turns may follow them. Returns how many turns there are, an open one included. No turn
        may be added while one is open (ValueError): its text comes first."""
        with self._cond:
            if turns and self._open is not None:
                raise ValueError(f"turn {self._open} is open: its text must be final first")
            if open_last and not turns:
                raise ValueError("open_last needs a turn to open")
            self._turns.extend(turns)
            if open_last:
                self._open = len(self._turns) - 1
            self._more = more
            self._cond.notify_all()
            return len(self._turns)

    def write(self, index: int, piece: str, final: bool) -> None:
        """Extend the open turn `index` by `piece`; `final`: its text is complete, and loses the
        whitespace at its ends as the text of every turn does. ValueError if `index` is not the
        open turn, or if its final text would be empty."""
        with self._cond:
            if self._ended or self._open is None or index != self._open:
                open_now = None if self._ended else self._open
                now = "no turn is" if open_now is None else f"turn {open_now} is"
                raise ValueError(f"turn {index} is not open ({now})")
            turn = self._turns[index]
            text = turn.text + piece
            if final:
                text = text.strip()
                if not text:
                    raise ValueError(f"turn {index} has no text to end with")
                self._open = None
            self._turns[index] = Turn(turn.index, turn.speaker, text)
            self._cond.notify_all()

    def close(self) -> None:
        """No more turns or text will come (the session ends or was cancelled). An open turn
        stays as it was, unfinished: never visible to `peek`, `get` or `known`."""
        with self._cond:
            self._more = False
            self._ended = True
            self._cond.notify_all()

    def _final(self) -> int:
        """How many turns are final: all but an open one, which is always the last."""
        return len(self._turns) - (self._open is not None)

    def peek(self, i: int) -> Turn | None:
        with self._cond:
            return self._turns[i] if i < self._final() else None

    def get(self, i: int) -> Turn | None:
        """Turn i once it is final, waiting for it while more may come; None when the script
        has ended without it."""
        with self._cond:
            self._cond.wait_for(lambda: i < self._final() or self._complete())
            return self._turns[i] if i < self._final() else None

    def partial(self, i: int) -> tuple[Turn, bool] | None:
        """Turn i, open or not, with its text so far, and whether that text is final; None if
        there is no turn i yet."""
        with self._cond:
            if i >= len(self._turns):
                return None
            return self._turns[i], i != self._open

    def known(self) -> list[Turn]:
        """The final turns received so far."""
        with self._cond:
            return self._turns[: self._final()]

    @property
    def open_turn(self) -> int | None:
        """The index of the open turn, whose text may still grow; None if there is none."""
        with self._cond:
            return None if self._ended else self._open

    @property
    def total(self) -> int:
        """Turns received so far, an open one included."""
        with self._cond:
            return len(self._turns)

    @property
    def more(self) -> bool:
        """Turns may still be added (an open turn's text may grow whatever this says)."""
        with self._cond:
            return self._more

    @property
    def complete(self) -> bool:
        """True once no more turns can be appended and no turn is open."""
        with self._cond:
            return self._complete()

    def _complete(self) -> bool:
        return not self._more and (self._open is None or self._ended)
