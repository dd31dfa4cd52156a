"""A session whose server went away goes on on another server that shares its Redis store
(server/revive.py): the client resumes there with its token and last seq, and gets the rest
with no audio message missing or repeated, every turn started and ended once, and the same
length as an uninterrupted session."""

from __future__ import annotations

import asyncio

import numpy as np
from conftest import running_server
from helpers import abort, decode_packets, speakers_of, turns_of

from vibecast.protocol import Audio, Client, Done, TurnEnd, TurnStart

SEED = 31


async def whole(url: str) -> list:
    async with await Client.connect(url) as c:
        await c.start(speakers_of(4), turns_of(), options={"seed": SEED})
        return [m async for m in c]


def test_a_session_goes_on_on_another_server(piper, redis_url) -> None:
    settings = {"store_url": redis_url, "resume_grace_s": 60}
    with running_server(piper, **settings) as other:
        reference = asyncio.run(whole(other.ws_url))

        async def moved() -> list:
            with running_server(piper, **settings) as first:
                c = await Client.connect(first.ws_url)
                ready = await c.start(speakers_of(4), turns_of(), options={"seed": SEED})
                msgs: list = []
                while sum(isinstance(m, Audio) for m in msgs) < 40:  # into turn 1 or 2
                    msgs.append(await c.recv())
                last_seq = max(m.seq for m in msgs if isinstance(m, Audio))
                abort(c)
            # `first` is gone; the other server has never seen this session.
            assert other.state.sessions.get(ready.session_id) is None
            again = await Client.connect(other.ws_url)
            back = await again.resume(ready.session_id, ready.resume_token, last_seq)
            assert back.session_id == ready.session_id and back.format == ready.format
            msgs += [m async for m in again]
            return msgs

        msgs = asyncio.run(moved())
    audio = [m for m in msgs if isinstance(m, Audio)]
    assert [a.seq for a in audio] == list(range(len(audio)))  # none missing, none twice
    assert [m.turn for m in msgs if isinstance(m, TurnStart)] == list(range(8))
    assert [m.turn for m in msgs if isinstance(m, TurnEnd)] == list(range(8))
    done = [m for m in msgs if isinstance(m, Done)]
    want = next(m for m in reference if isinstance(m, Done))
    assert len(done) == 1 and done[0].samples == want.samples
    assert [m.samples for m in msgs if isinstance(m, TurnEnd)] == [
        m.samples for m in reference if isinstance(m, TurnEnd)
    ]
    # The same speech: the Opus encoder restarts where the session moved, so the decoded
    # audio is not bit-identical there, but it follows the uninterrupted take closely.
    got = decode_packets([p for a in audio for p in a.packets or []])
    ref = decode_packets([p for m in reference if isinstance(m, Audio) for p in m.packets or []])
    assert len(got) == len(ref)
    corr = float(np.dot(got, ref) / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert corr > 0.95, corr


def test_a_takeover_fences_out_a_gateway_that_is_still_alive(piper, redis_url) -> None:
    """The session's first server is alive (a partition, a slow socket): once another server
    takes the session over, the first stops writing it (its socket closes with 4001) and the
    ring holds only the new owner's frames, so the take-over's audio is still whole."""
    settings = {"store_url": redis_url, "resume_grace_s": 60}
    with running_server(piper, **settings) as first, running_server(piper, **settings) as second:

        async def both() -> tuple[list, int | None]:
            old = await Client.connect(first.ws_url)
            # Long enough that the first server cannot have sent all of it into the socket.
            ready = await old.start(speakers_of(4), turns_of() * 3, options={"seed": SEED})
            msgs: list = []
            while sum(isinstance(m, Audio) for m in msgs) < 30:
                msgs.append(await old.recv())
            last_seq = max(m.seq for m in msgs if isinstance(m, Audio))
            end = max(i for i, m in enumerate(msgs) if isinstance(m, Audio))
            del msgs[end + 1 :]
            new = await Client.connect(second.ws_url)
            await new.resume(ready.session_id, ready.resume_token, last_seq)
            msgs += [m async for m in new]
            async for _ in old:  # what the old server still had on its way, then its close
                pass
            return msgs, old.close_code

        msgs, old_close = asyncio.run(both())
        assert old_close == 4001
        assert not first.state.sessions.sessions  # let go, not ended: its state is the new one's
    audio = [m for m in msgs if isinstance(m, Audio)]
    assert [a.seq for a in audio] == list(range(len(audio)))
    assert [m.turn for m in msgs if isinstance(m, TurnEnd)] == list(range(24))
    assert sum(isinstance(m, Done) for m in msgs) == 1
