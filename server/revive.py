"""Taking over a session whose gateway died (a cluster's gateways share a Redis store).

While a session runs, its gateway keeps in the store what another gateway needs to go on with
it: the validated start request (part `spec`), each finished turn's carry (`carry:K`), and where
the turn in progress started (`at`, when its `turn_start` went out); the ring holds the frames
sent. A client that reconnects to another gateway with its token and last seq gets the frames it
missed from the ring, and then the rest of the session: the engine goes on after the last
finished turn, and the output drops what was already sent of the turn in progress, whole frames
(docs/scaleout.md says what a listener hears at the splice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from ..engine.backend import Carry, SpeakerVoice, SynthesisParams, Turn
from ..engine.wire import pack_carry, unpack_carry
from ..protocol.messages import Audio, TurnEnd, TurnStart, parse_server
from .output import OutputFormat
from .store import SessionStore

if TYPE_CHECKING:
    from .session import SessionSpec


@dataclass
class Continuation:
    """Where a taken-over session goes on."""

    carries: list[Carry]  # of turns 0 .. turn - 1
    turn: int  # the turn the engine makes next
    started: bool  # its turn_start was sent: do not send it again
    turn_pts: int  # where it started (when started)
    skip: int  # its samples already sent (whole frames, at the output rate)
    seq: int  # the next audio seq
    pts: int  # samples of the session sent so far
    index: int  # the next frame's place in the ring
    fence: int  # the epoch this gateway took the session over with


def save_spec(store: SessionStore, session_id: str, spec: SessionSpec) -> None:
    f, p = spec.format, spec.params
    data = {
        "speakers": [
            [
                s.name,
                s.voice_id,
                None if s.audio is None else pack_carry({"a": s.audio}),
                s.audio_rate,
            ]
            for s in spec.speakers
        ],
        "turns": [[t.index, t.speaker, t.text] for t in spec.turns],
        "more": spec.more,
        "format": [f.codec, f.sample_rate, f.bitrate, f.frame_ms],
        "params": [p.seed, p.mode, p.cfg_scale, p.steps, p.frames_per_turn],
        "request_id": spec.request_id,
        "client": spec.client,
        "from_turn": spec.from_turn,
    }
    store.save_state(session_id, "spec", msgpack.packb(data, use_bin_type=True))
    store.save_state(session_id, "gateway", str(os.getpid()).encode())  # for operators, tests


def load_spec(store: SessionStore, session_id: str) -> SessionSpec | None:
    from .session import SessionSpec  # session.py saves through this module

    raw = store.state(session_id, "spec")
    if raw is None:
        return None
    m: dict[str, Any] = msgpack.unpackb(raw, raw=False)
    speakers = [
        SpeakerVoice(name, voice_id, None if audio is None else unpack_carry(audio)["a"], rate)
        for name, voice_id, audio, rate in m["speakers"]
    ]
    return SessionSpec(
        speakers,
        [Turn(*t) for t in m["turns"]],
        m["more"],
        OutputFormat(*m["format"]),
        SynthesisParams(*m["params"]),
        m["request_id"],
        m["client"],
        m["from_turn"],
    )


def save_carry(store: SessionStore, session_id: str, turn: int, carry: Carry) -> None:
    store.save_state(session_id, f"carry:{turn}", pack_carry(carry))


def save_turn_start(store: SessionStore, session_id: str, turn: int, pts: int) -> None:
    store.save_state(session_id, "at", msgpack.packb([turn, pts]))


def continuation(store: SessionStore, session_id: str, last_seq: int) -> Continuation | None:
    """Where the session goes on, from what its dead gateway left; None if it cannot (it had
    ended, or a turn's carry is missing). Takes the session's fencing epoch first, so that its
    old gateway, if it is alive after all, can add nothing to the ring after this reads it."""
    fence = store.attach(session_id)
    frames = store.ring_after(session_id, last_seq)
    last = store.ring_last(session_id)
    if frames is None:
        return None
    seqs = [f.seq for f in frames if f.seq is not None]
    seq = max([last_seq, *seqs]) + 1
    pts = last.end_pts if last is not None else 0
    turn, started, turn_pts, skip = 0, False, 0, 0
    if last is not None:
        msg = parse_server(last.data)
        if isinstance(msg, TurnEnd):
            turn = msg.turn + 1
        elif isinstance(msg, TurnStart):
            turn, started, turn_pts = msg.turn, True, msg.pts
        elif isinstance(msg, Audio) and msg.samples == 0:
            turn = msg.turn + 1  # the stream's final flush: every turn was made
        elif isinstance(msg, Audio):
            at = store.state(session_id, "at")
            if at is None:
                return None
            turn, turn_pts = msgpack.unpackb(at)
            if turn != msg.turn:
                return None
            started, skip = True, pts - turn_pts
        else:
            return None  # the terminal message went out: nothing to go on with
    carries = []
    for k in range(turn):
        raw = store.state(session_id, f"carry:{k}")
        if raw is None:
            return None
        carries.append(unpack_carry(raw))
    index = last.index + 1 if last is not None else 0
    return Continuation(carries, turn, started, turn_pts, skip, seq, pts, index, fence)
