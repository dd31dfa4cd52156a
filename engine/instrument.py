"""A backend wrapper that records when each stage of each turn starts and ends. Used by the
overlap tests and by `vibecast bench` to measure how much of the text stage the render hides."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Turn


@dataclass
class TimedBackend:
    inner: Any
    spans: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    slots: dict[int, int] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, session: Any, turn: Turn, slot: int) -> Any:
        self.slots[turn.index] = slot
        start = time.perf_counter()
        encoded = self.inner.encode(session, turn, slot)
        self.spans[("encode", turn.index)] = [start, time.perf_counter()]
        return (turn.index, encoded)

    def render(self, session: Any, encoded: Any) -> Generator[np.ndarray, None, None]:
        index, inner = encoded
        start = time.perf_counter()
        yield from self.inner.render(session, inner)
        self.spans[("render", index)] = [start, time.perf_counter()]

    def hidden_fraction(self, turns: int) -> float:
        """Share of turn i+1's encode time that ran while turn i was still rendering."""
        hidden = total = 0.0
        for i in range(turns - 1):
            e0, e1 = self.spans[("encode", i + 1)]
            _, r1 = self.spans[("render", i)]
            total += e1 - e0
            hidden += max(0.0, min(e1, r1) - e0)
        return hidden / total if total else 0.0
