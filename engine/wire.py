"""What crosses between a gateway and a remote engine (server/remote.py, server/cluster.py), as
msgpack bytes: a stream request (a session's voices, settings and script, and the carries of the
turns already spoken) and batches of its events. Arrays travel as (dtype, shape, bytes), so a
carry and a turn's audio arrive exactly as they were made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .backend import Carry, SpeakerVoice, SynthesisParams, Turn
from .pipeline import PipelineEvent, TurnAudio, TurnEnded, TurnStarted


def _array(a: np.ndarray) -> list[Any]:
    a = np.ascontiguousarray(a)
    return [a.dtype.str, list(a.shape), a.tobytes()]


def _from(x: list[Any]) -> np.ndarray:
    dtype, shape, data = x
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def _carry(c: Carry | None) -> dict[str, list[Any]] | None:
    return None if c is None else {k: _array(v) for k, v in c.items()}


def _uncarry(c: dict[str, list[Any]] | None) -> Carry | None:
    return None if c is None else {k: _from(v) for k, v in c.items()}


def pack_turn(t: Turn) -> bytes:
    return msgpack.packb([t.index, t.speaker, t.text], use_bin_type=True)


def unpack_turn(data: bytes) -> Turn:
    return Turn(*msgpack.unpackb(data, raw=False))


def pack_carry(c: Carry) -> bytes:
    return msgpack.packb(_carry(c), use_bin_type=True)


def unpack_carry(data: bytes) -> Carry:
    c = _uncarry(msgpack.unpackb(data, raw=False))
    assert c is not None
    return c


@dataclass
class StreamRequest:
    """One session's generation on an engine, from turn len(replayed) on."""

    stream: str  # this stream's id: the keys of its acknowledgements and liveness
    speakers: list[SpeakerVoice]
    params: SynthesisParams
    turns: list[Turn]
    replayed: list[Carry] = field(default_factory=list)
    script: str = ""  # where turns appended later arrive (the session's, across its streams)
    more: bool = False  # turns may be appended
    within: Carry | None = None  # a mark of turn len(replayed) to go on from

    def pack(self) -> bytes:
        p = self.params
        return msgpack.packb(
            {
                "stream": self.stream,
                "speakers": [
                    [s.name, s.voice_id, None if s.audio is None else _array(s.audio), s.audio_rate]
                    for s in self.speakers
                ],
                "params": [p.seed, p.mode, p.cfg_scale, p.steps, p.frames_per_turn],
                "turns": [[t.index, t.speaker, t.text] for t in self.turns],
                "replayed": [_carry(c) for c in self.replayed],
                "script": self.script,
                "more": self.more,
                "within": _carry(self.within),
            },
            use_bin_type=True,
        )

    @staticmethod
    def unpack(data: bytes) -> StreamRequest:
        m = msgpack.unpackb(data, raw=False)
        speakers = [
            SpeakerVoice(name, voice_id, None if audio is None else _from(audio), rate)
            for name, voice_id, audio, rate in m["speakers"]
        ]
        replayed = [_uncarry(c) for c in m["replayed"]]
        return StreamRequest(
            m["stream"],
            speakers,
            SynthesisParams(*m["params"]),
            [Turn(*t) for t in m["turns"]],
            [c for c in replayed if c is not None],
            m["script"],
            m["more"],
            _uncarry(m["within"]),
        )


@dataclass
class RemoteError:
    """An error the engine ends a stream with: a ProtocolError's fields (or `internal`)."""

    code: str
    message: str
    field: str | None = None
    turn: int | None = None


def pack_events(events: list[PipelineEvent] | RemoteError) -> bytes:
    if isinstance(events, RemoteError):
        x = events
        return msgpack.packb([["x", x.code, x.message, x.field, x.turn]], use_bin_type=True)
    out: list[list[Any]] = []
    for e in events:
        if isinstance(e, TurnStarted):
            out.append(["s", e.turn.index])
        elif isinstance(e, TurnAudio):
            out.append(["a", e.turn, _array(e.pcm), _carry(e.mark)])
        else:
            out.append(["e", e.turn, e.capped, _carry(e.carry)])
    return msgpack.packb(out, use_bin_type=True)


def unpack_events(data: bytes, turns: Any) -> list[PipelineEvent] | RemoteError:
    """`turns.peek(i)` gives turn i (the session's feed): a start names its turn by index."""
    events: list[PipelineEvent] = []
    for item in msgpack.unpackb(data, raw=False):
        kind = item[0]
        if kind == "x":
            return RemoteError(*item[1:])
        if kind == "s":
            turn = turns.peek(item[1])
            assert turn is not None, f"the engine started turn {item[1]}, unknown here"
            events.append(TurnStarted(turn))
        elif kind == "a":
            events.append(TurnAudio(item[1], _from(item[2]), _uncarry(item[3])))
        else:
            events.append(TurnEnded(item[1], item[2], _uncarry(item[3])))
    return events
