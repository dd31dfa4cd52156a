"""`context` mode: a session's turns spoken in one context, in the reference's layout, over a
window of positions that slides at turn boundaries.

What the positive stream of a slot holds (P = the cached system + voice prefix):

    P | " Text input:\\n" lines[first:end] " Speech output:\\n" <speech_start> |
      | speech of turns first .. k-1, as the model produced it | turn k, being spoken

Turn k of a session is the model's k-th speech segment: it ends where the model consumes
speech_end. The text block holds the lines of the kept turns and a lookahead of those that
follow, as the reference sees the script ahead. When turn k would not fit (its frame cap past
the window), or its line is not in the text block (it was appended, or past the lookahead), the
slot's context is rebuilt at the boundary: the prefix cache stays, the oldest turns go (down to
half the window, so rebuilds are rare), the lookahead is extended, and the new text block plus
the kept turns' recorded inputs are prefilled as one job. A turn's record is what the positive
stream consumed: token ids, and for each speech_diffusion frame its input embedding
(acoustic_connector(latent) + semantic_connector(features), (H,), a few KB). Codec state starts
every turn from zeros and the negative stream restarts at speech_start, as in the reference, so
the record is all a rebuild needs: plain data, which another process can rebuild from.

The server's rules where the model and the script disagree (docs/modes.md):
- eos while lines remain (or may be appended): the server closes the open segment with
  speech_end, and the next turn opens with speech_start;
- a turn reaching its frame cap: the server closes it with speech_end (`turn_end.capped`);
- past the last line of a complete script the model may speak on (as the reference does) until
  its eos or the last turn's cap: that speech is the last turn's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backend import Carry
from .processor import text_block
from .tokenizer import TextTokenizer


@dataclass
class TurnRecord:
    """What the positive stream consumed while one turn was spoken, in order."""

    tokens: list[int] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)  # (H,) host, one per diffusion

    def add(self, token: int, frame: torch.Tensor | None) -> None:
        self.tokens.append(token)
        if frame is not None:
            self.frames.append(frame)


def context_inputs(
    tok: TextTokenizer,
    lines: list[tuple[int, str]],
    first: int,
    end: int,
    records: list[TurnRecord],
) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """What a rebuild prefills after the prefix: (ids, frames (F, H) or None, the positions of
    `ids` that take the frames). `records` are turns first, first + 1, ... in order."""
    ids = text_block(tok, lines[first:end])
    frames: list[torch.Tensor] = []
    at: list[int] = []
    for j, rec in enumerate(records):
        tokens = rec.tokens
        if j == 0 and first > 0 and tokens[:1] == [tok.speech_start]:
            tokens = tokens[1:]  # the text block ends with the speech_start that opens it
        it = iter(rec.frames)
        for t in tokens:
            if t == tok.speech_diffusion:
                at.append(len(ids))
                frames.append(next(it))
            ids.append(t)
    return ids, (torch.stack(frames) if frames else None), at


@dataclass
class Saved:
    """A context session between turns k - 1 and k, as plain data (ints and host tensors):
    `as_dict` / `from_dict` go through safetensors, pickle-free `torch.load`, Redis."""

    next: int  # k: the turn to speak next
    first: int  # the first turn kept in the window
    records: list[TurnRecord]  # turns first .. k - 1
    rng: torch.Tensor  # uint8: the session's generator state (noise draws continue from it)

    def as_dict(self) -> dict[str, object]:
        return {
            "next": self.next,
            "first": self.first,
            "rng": self.rng,
            "records": [
                {
                    "tokens": torch.tensor(r.tokens, dtype=torch.int64),
                    "frames": torch.stack(r.frames) if r.frames else torch.zeros(0),
                }
                for r in self.records
            ],
        }

    @staticmethod
    def from_dict(d: dict) -> Saved:
        records = [
            TurnRecord(r["tokens"].tolist(), list(r["frames"].unbind(0))) for r in d["records"]
        ]
        return Saved(int(d["next"]), int(d["first"]), records, d["rng"])

    @staticmethod
    def from_carries(carries: Sequence[Carry], budget: int, dtype: torch.dtype) -> Saved:
        """Turns 0 .. n - 1 replayed from the turn cache (each turn's `record_carry`): the last
        turns whose records fit `budget` positions are kept (the next turn's rebuild drops more
        if it needs the room), so only those are read."""
        n = first = len(carries)
        used = 0
        while first > 0 and used + len(carries[first - 1]["tokens"]) <= budget:
            first -= 1
            used += len(carries[first]["tokens"])
        records = [
            TurnRecord(
                c["tokens"].tolist(), list(torch.from_numpy(c["frames"]).to(dtype).unbind(0))
            )
            for c in (carries[j] for j in range(first, n))
        ]
        return Saved(n, first, records, torch.from_numpy(carries[n - 1]["rng"].copy()))


def record_carry(record: TurnRecord, hidden: int) -> Carry:
    """A finished turn's record as arrays (frames in float32: exact for bf16 too)."""
    frames = torch.stack(record.frames).float() if record.frames else torch.zeros(0, hidden)
    return {"tokens": np.array(record.tokens, np.int64), "frames": frames.numpy()}


class Window:
    """Which turns a slot's context holds, and when and how it slides (one per session)."""

    def __init__(self, tok: TextTokenizer, budget: int, prefix: int) -> None:
        self.tok = tok
        self.budget = budget  # positions of the slot's row
        self.prefix = prefix
        self.first = 0  # the first kept turn: its line opens the text block
        self.end = 0  # the text block holds lines [first, end)
        self.records: list[TurnRecord] = []  # turns first .. (the last one may be in progress)
        self.used = 0  # positions the row holds
        self._lines: list[int] = []  # tokens of each line in a text block
        self._frame = len(text_block(tok, []))  # " Text input:\n" + " Speech output:\n" + start

    def _text(self, lines: list[tuple[int, str]], d: int, e: int) -> int:
        while len(self._lines) < len(lines):
            speaker, text = lines[len(self._lines)]
            self._lines.append(len(text_block(self.tok, [(speaker, text)])) - self._frame)
        return self._frame + sum(self._lines[d:e])

    def _speech(self, d: int, k: int) -> int:
        kept = self.records[d - self.first : k - self.first]
        n = sum(len(r.tokens) for r in kept)
        if kept and d > 0 and kept[0].tokens[:1] == [self.tok.speech_start]:
            n -= 1
        return n

    def plan(self, lines: list[tuple[int, str]], k: int, cap: int) -> tuple[int, int] | None:
        """Before turn k (whose frame cap is `cap`): None if it starts in place, else the
        (first, end) of the context to rebuild. `lines` are the script's lines known so far."""
        room = cap + 3  # its frames, a leading speech_start, the closing speech_end, one more
        if k < self.end and self.used + room <= self.budget:
            return None
        lookahead = self.budget // 4

        def fit(d: int) -> tuple[int, int]:
            base = self.prefix + self._speech(d, k) + room
            e = k + 1
            while (
                e < len(lines)
                and self._text(lines, d, e + 1) <= lookahead
                and base + self._text(lines, d, e + 1) <= self.budget
            ):
                e += 1
            return base + self._text(lines, d, e), e

        d = self.first
        need, e = fit(d)
        while d < k and (need > self.budget or (d > self.first and need > self.budget // 2)):
            d += 1  # a turn goes: once dropping, make room for several turns
            need, e = fit(d)
        if need > self.budget:  # the server checked each turn alone fits: a bug if not
            raise ValueError(f"turn {k} does not fit a window of {self.budget} positions")
        return d, e

    def rebuilt(self, first: int, end: int, length: int) -> None:
        """The slot now holds the context `plan` chose, `length` positions long."""
        self.records = self.records[first - self.first :]
        self.first, self.end, self.used = first, end, length

    def inputs(
        self, lines: list[tuple[int, str]], first: int, end: int, k: int
    ) -> tuple[list[int], torch.Tensor | None, list[int]]:
        return context_inputs(
            self.tok, lines, first, end, self.records[first - self.first : k - self.first]
        )

    def save(self, next_turn: int, rng: torch.Tensor) -> Saved:
        return Saved(next_turn, self.first, list(self.records), rng)

    def restore(self, saved: Saved) -> None:
        """Turns first .. next - 1 kept, nothing in the slot yet: the next turn rebuilds."""
        self.first, self.records = saved.first, list(saved.records)
        self.end = self.used = 0

    def consumed(self, token: int, frame: torch.Tensor | None) -> None:
        self.records[-1].add(token, frame)
        self.used += 1
