"""Resume after a dropped socket: the audio continues from the next message with no sample
missing or repeated, and equals an uninterrupted session with the same seed."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from conftest import running_server
from helpers import abort, decode_packets, speakers_of, turns_of

from vibecast.protocol import Audio, Client, Done, Error, ServerError, TurnEnd, TurnStart

SEED = 21


@pytest.fixture(scope="module", params=["memory", "redis"])
def resumable(piper, request):
    """The same checks with the session state in this process and in Redis (--store-url)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    with running_server(piper, resume_grace_s=30, store_url=url) as server:
        yield server


async def uninterrupted(url: str) -> tuple[list, np.ndarray]:
    async with await Client.connect(url) as c:
        ready = await c.start(speakers_of(4), turns_of(), options={"seed": SEED})
        msgs = [m async for m in c]
    audio = [m for m in msgs if isinstance(m, Audio)]
    packets = [p for a in audio for p in (a.packets or [])]
    return msgs, decode_packets(packets)[ready.format["pre_skip"] :]


async def interrupted(server, drop_after: int, gap: bool) -> tuple[list, np.ndarray, int | None]:
    url, hub = server.ws_url, server.state.sessions
    first = await Client.connect(url)
    ready = await first.start(speakers_of(4), turns_of(), options={"seed": SEED})
    msgs: list = []
    while sum(isinstance(m, Audio) for m in msgs) < drop_after:
        msgs.append(await first.recv())
    last_seq = max(m.seq for m in msgs if isinstance(m, Audio))
    abort(first)
    if gap:  # resume only after the server has noticed the drop (and kept generating)
        detached = lambda: all(not s.attached for s in hub.sessions.values())  # noqa: E731
        assert await asyncio.to_thread(hub.wait_for, detached, 10)
    second = await Client.connect(url)
    again = await second.resume(ready.session_id, ready.resume_token, last_seq)
    assert again.session_id == ready.session_id and again.format == ready.format
    async for m in second:
        msgs.append(m)
    audio = [m for m in msgs if isinstance(m, Audio)]
    pcm = decode_packets([p for a in audio for p in (a.packets or [])])[ready.format["pre_skip"] :]
    return msgs, pcm, second.close_code


def test_resume_at_random_points_gives_the_same_audio(resumable) -> None:
    reference_msgs, reference = asyncio.run(uninterrupted(resumable.ws_url))
    n_audio = sum(isinstance(m, Audio) for m in reference_msgs)
    rng = random.Random(5)
    for drop_after in sorted(rng.sample(range(1, n_audio - 1), 3)):
        msgs, pcm, close = asyncio.run(interrupted(resumable, drop_after, gap=drop_after % 2 == 0))
        audio = [m for m in msgs if isinstance(m, Audio)]
        assert [a.seq for a in audio] == list(range(len(audio)))  # none missing, none twice
        assert [m.turn for m in msgs if isinstance(m, TurnStart)] == list(range(8))
        assert [m.turn for m in msgs if isinstance(m, TurnEnd)] == list(range(8))
        done = [m for m in msgs if isinstance(m, Done)]
        assert len(done) == 1 and close == 1000
        assert len(pcm) == len(reference)
        np.testing.assert_array_equal(pcm, reference)  # sample for sample


def test_resume_from_the_very_start(resumable) -> None:
    async def go():
        first = await Client.connect(resumable.ws_url)
        ready = await first.start(speakers_of(2), turns_of()[:2], options={"seed": SEED})
        abort(first)
        second = await Client.connect(resumable.ws_url)
        await second.resume(ready.session_id, ready.resume_token, -1)
        return [m async for m in second]

    msgs = asyncio.run(go())
    audio = [m for m in msgs if isinstance(m, Audio)]
    assert audio[0].seq == 0 and [a.seq for a in audio] == list(range(len(audio)))
    assert msgs[-1].type == "done"


def test_resume_takes_over_a_socket_that_still_looks_open(resumable) -> None:
    async def go():
        first = await Client.connect(resumable.ws_url)
        ready = await first.start(speakers_of(4), turns_of(), options={"seed": SEED})
        got = [await first.recv() for _ in range(3)]
        last = max([m.seq for m in got if isinstance(m, Audio)], default=-1)
        # No abort: the old socket stays open (a half-open connection the server cannot see).
        second = await Client.connect(resumable.ws_url)
        await second.resume(ready.session_id, ready.resume_token, last)
        rest = [m async for m in second]
        old = [m async for m in first]  # the old connection is closed by the server
        return got + rest, got + old, first.close_code

    msgs, old, old_close = asyncio.run(go())
    audio = [m for m in msgs if isinstance(m, Audio)]
    assert [a.seq for a in audio] == list(range(len(audio)))
    assert msgs[-1].type == "done"
    # The old socket got a prefix of the audio (what was sent before the takeover), then the
    # takeover's close: not the rest of the session, and no terminal message.
    old_seqs = [m.seq for m in old if isinstance(m, Audio)]
    assert old_seqs == list(range(len(old_seqs))) and len(old_seqs) < len(audio)
    assert old_close == 4001 and not any(m.type in ("done", "cancelled") for m in old)


@pytest.mark.parametrize(
    ("change", "needle"),
    [("token", "resume_token"), ("session", "resume_token"), ("seq", "never sent")],
)
def test_bad_resumes_are_refused(resumable, change: str, needle: str) -> None:
    async def go():
        first = await Client.connect(resumable.ws_url)
        ready = await first.start(speakers_of(4), turns_of(), options={"seed": SEED})
        await first.recv()
        abort(first)
        second = await Client.connect(resumable.ws_url)
        sid, token, seq = ready.session_id, ready.resume_token, 0
        if change == "token":
            token = "wrong"
        elif change == "session":
            sid = "nope"
        else:
            seq = 10_000
        with pytest.raises(ServerError) as e:
            await second.resume(sid, token, seq)
        await second.close()
        return e.value.error

    err: Error = asyncio.run(go())
    assert err.code == "unknown_session" and needle in err.message and not err.fatal
