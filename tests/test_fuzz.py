"""Fuzzing the protocol with hypothesis: at least 2,000 generated and mutated frames per run.
The server answers every one with a documented error (or accepts it: a valid start, or an
unknown field), never crashes, and well-formed sessions on another connection complete."""

from __future__ import annotations

import asyncio
import random
import threading

import msgpack
import pytest
from conftest import running_server
from helpers import get_json, run_session, speakers_of, turns_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from vibecast.protocol import PROTOCOL, Code, Error, Queued, Ready, parse_server

FRAMES_PER_EXAMPLE = 21
EXAMPLES = 100  # 100 × 21 = 2,100 frames
MAX_FRAME = 64 * 1024
DOCUMENTED = {c.value for c in Code}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)


def _blob(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# Big values grow from a small seed: hypothesis's own budget of random bytes stays small.
huge = st.one_of(
    st.tuples(st.integers(), st.integers(1000, 5000)).map(lambda t: _blob(*t).hex()),
    st.tuples(st.integers(), st.integers(40_000, 100_000)).map(lambda t: _blob(*t)),
    st.integers(2000, 4000).map(lambda n: list(range(-n, n, 2))),
)
deep = st.integers(min_value=50, max_value=3000).map(
    lambda n: {"type": "start", "speakers": [[[[{}]]]] * 1, "nest": _nest(n)}
)
voices = st.sampled_from(["joe", "joe-high", "nobody", "", "JOE"])
turn = st.fixed_dictionaries(
    {
        "speaker": st.one_of(st.integers(-2, 6), values),
        "text": st.one_of(st.text(max_size=60), values),
    }
)
speaker = st.one_of(
    st.fixed_dictionaries(
        {"voice": voices}, optional={"name": st.one_of(st.text(max_size=120), values)}
    ),
    st.fixed_dictionaries(
        {"voice_audio": st.binary(max_size=200)},
        optional={"voice_format": st.sampled_from(["wav", "ogg", "mp3"])},
    ),
    values,
)


_KNOWN = {"type", "speakers", "turns", "more", "format", "options", "request_id"}


def _nest(depth: int) -> list:
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


def _message(kind: str) -> st.SearchStrategy[dict]:
    fields = {
        "start": {
            "speakers": st.one_of(st.lists(speaker, max_size=6), values),
            "turns": st.one_of(st.lists(turn, max_size=5), values),
            "more": st.one_of(st.booleans(), values),
            "format": st.one_of(
                st.fixed_dictionaries(
                    {
                        "codec": st.sampled_from(["opus", "pcm_s16le", "mp3"]),
                        "sample_rate": st.sampled_from([8000, 44100, 48000, -1]),
                    }
                ),
                values,
            ),
            "options": st.one_of(
                st.fixed_dictionaries(
                    {"seed": values, "steps": values, "cfg_scale": values, "mode": values}
                ),
                values,
            ),
        },
        "append": {"turns": st.one_of(st.lists(turn, max_size=3), values), "more": values},
        "playback": {"played_ms": st.one_of(st.integers(), values)},
        "cancel": {},
        "resume": {
            "session_id": st.one_of(st.text(max_size=20), values),
            "resume_token": values,
            "last_seq": values,
        },
    }[kind]
    return st.fixed_dictionaries(
        {"type": st.just(kind)}, optional={**fields, "junk": values, "x" * 50: huge}
    )


# Well-formed messages with unknown fields: a start must be accepted, a resume refused cleanly.
valid = st.one_of(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda k: k not in _KNOWN), values, max_size=3
    ).map(
        lambda extra: {
            **extra,
            "type": "start",
            "speakers": [{"voice": "joe", "accent": "none"}],
            "turns": [{"speaker": 0, "text": "Hi.", "mood": 1}],
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("resume"),
            "session_id": st.text(max_size=20),
            "resume_token": st.text(max_size=20),
            "last_seq": st.integers(-1, 100),
        }
    ),
)

messages = st.one_of(
    valid,
    st.sampled_from(["start", "append", "playback", "cancel", "resume"]).flatmap(_message),
    st.dictionaries(st.text(max_size=10), values, max_size=5).map(
        lambda d: {**d, "type": d.get("type", "sing")}
    ),
    st.fixed_dictionaries({"type": values}),
    deep,
)


def _pack(m: object) -> bytes:
    try:
        return msgpack.packb(m, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return msgpack.packb({"type": "start", "unpackable": True})


@st.composite
def frames(draw) -> bytes | str:
    kind = draw(
        st.sampled_from(["message", "value", "truncated", "flipped", "garbage", "text", "huge"])
    )
    if kind == "message":
        return _pack(draw(messages))
    if kind == "value":
        return _pack(draw(values))
    if kind in ("truncated", "flipped"):
        data = bytearray(_pack(draw(messages)))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "truncated":
            return bytes(data[:i])
        data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=50))
    return _pack(
        {"type": "start", "blob": _blob(draw(st.integers()), MAX_FRAME + draw(st.integers(1, 100)))}
    )


@pytest.fixture(scope="module")
def fuzz_server(piper):
    with running_server(
        piper, max_frame_bytes=MAX_FRAME, max_sessions=16, starts_per_minute=100_000
    ) as server:
        yield server


@pytest.fixture(scope="module")
def neighbours(fuzz_server):
    """Well-formed sessions, one after another on their own connections, while the fuzz runs."""
    stop = threading.Event()
    results: list = []

    def loop() -> None:
        while not stop.is_set():
            results.append(
                asyncio.run(run_session(fuzz_server.ws_url, speakers_of(4), turns_of()[:3]))
            )

    t = threading.Thread(target=loop)
    t.start()
    yield results
    stop.set()
    t.join(120)


SUBPROTOCOLS = [Subprotocol(PROTOCOL)]


async def _exchange(url: str, batch: list[bytes | str]) -> list[str]:
    """Send each frame, read what it caused; reconnect after fatal errors and accepted starts."""
    seen: list[str] = []

    async def reconnect(old: ClientConnection | None) -> ClientConnection:
        if old is not None:  # wait for its TCP connection to end: no socket is left to the GC
            await old.close()
        return await connect(url, subprotocols=SUBPROTOCOLS, max_size=None, compression=None)

    ws = await reconnect(None)
    try:
        for frame in batch:
            if ws.close_code is not None:
                ws = await reconnect(ws)
            await ws.send(frame)
            reply = parse_server(await asyncio.wait_for(ws.recv(decode=False), 30))
            if isinstance(reply, Error):
                assert reply.code in DOCUMENTED, reply
                assert isinstance(reply.message, str) and len(reply.message) > 10
                seen.append(reply.code)
                if reply.fatal:
                    await asyncio.wait_for(ws.wait_closed(), 10)
                    assert ws.close_code in (1008, 1009, 1011, 1013), ws.close_code
                    ws = await reconnect(ws)
            elif isinstance(reply, (Ready, Queued)):  # a valid start (unknown fields ignored)
                seen.append(reply.type)
                await ws.send(msgpack.packb({"type": "cancel"}))
                async for _ in ws:
                    pass
                ws = await reconnect(ws)
            else:
                raise AssertionError(f"unexpected reply {reply!r} to {frame[:80]!r}")
    finally:
        await ws.close()
    return seen


SEEN: list[str] = []


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(batch=st.lists(frames(), min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
def test_fuzzed_frames_get_documented_answers(fuzz_server, neighbours, batch) -> None:
    SEEN.extend(asyncio.run(_exchange(fuzz_server.ws_url, batch)))


def test_after_the_fuzz(fuzz_server, neighbours) -> None:
    assert len(SEEN) >= EXAMPLES * FRAMES_PER_EXAMPLE  # every frame got its answer
    for answer in (
        "bad_message",
        "bad_field",
        "too_big",
        "not_started",
        "unknown_session",
        "ready",
    ):
        assert answer in SEEN, f"the fuzz never produced {answer}"
    assert get_json(fuzz_server.http_url + "/healthz") == {"ok": True}
    assert neighbours and all(r.kinds()[-1] == "done" and r.close_code == 1000 for r in neighbours)
    for r in neighbours:
        assert [a.seq for a in r.audio] == list(range(len(r.audio)))
