"""Flow control and admission: a client that falls behind pauses its session with bounded
memory; past capacity sessions queue in order; past the queue they are refused."""

from __future__ import annotations

import asyncio

import pytest
from conftest import running_server
from helpers import speakers_of

from vibecast.protocol import (
    Audio,
    Client,
    Closed,
    Error,
    Queued,
    Ready,
    ServerError,
    SpeakerSpec,
    Start,
    TurnSpec,
)

LONG = [
    {
        "speaker": i % 2,
        "text": "A line long enough to make a few seconds of speech, and then a few more.",
    }
    for i in range(40)
]
LEAD_MS = 3000


def test_a_client_that_stops_reading_pauses_its_session(piper) -> None:
    with running_server(piper, max_lead_ms=LEAD_MS) as server:
        hub = server.state.sessions

        async def go():
            c = await Client.connect(server.ws_url)
            await c.start(speakers_of(2), LONG)  # about three minutes of speech
            await c.playback(0)  # "I have played nothing", then never reads again
            assert await asyncio.to_thread(
                hub.wait_for, lambda: any(s.paused for s in hub.sessions.values()), 60
            )
            session = next(iter(hub.sessions.values()))
            held = session.generated_ms
            # Paused once LEAD_MS ahead of what was played: what it holds is bounded by the lead,
            # not by the script.
            chunk_ms = 3100  # the largest chunk the slowest Piper style makes, rounded up
            assert LEAD_MS <= held <= LEAD_MS + chunk_ms
            assert session.output.pts * 1000 // 48000 == held

            await c.playback(held)  # reporting progress lets it go on, up to the next lead
            assert await asyncio.to_thread(
                hub.wait_for, lambda: session.generated_ms > held and session.paused, 60
            )
            assert held + LEAD_MS <= session.generated_ms <= held + LEAD_MS + chunk_ms
            await c.cancel()
            await c.close()

        asyncio.run(go())


def test_without_playback_reports_audio_comes_as_fast_as_it_is_made(piper) -> None:
    # A lead limit far below the script's length: were it applied without playback reports,
    # generation would stop at LEAD_MS and `done` would never come.
    with running_server(piper, max_lead_ms=LEAD_MS) as server:

        async def go():
            async with await Client.connect(server.ws_url) as c:
                ready = await c.start(speakers_of(2), LONG[:6])
                async with asyncio.timeout(120):
                    done = [m async for m in c][-1]
                return ready, done

        ready, done = asyncio.run(go())
    assert ready.limits["max_lead_ms"] == LEAD_MS
    assert done.type == "done" and done.duration_ms > 3 * LEAD_MS


def test_queue_positions_then_busy(piper) -> None:
    with running_server(piper, max_sessions=2, max_queue=1, max_lead_ms=LEAD_MS) as server:
        hub = server.state.sessions

        async def go():
            holders = []
            for _ in range(2):  # two sessions that hold their slots (paused by the lead limit)
                c = await Client.connect(server.ws_url)
                await c.start(speakers_of(2), LONG)
                await c.playback(0)
                holders.append(c)
            positions: list[int] = []
            waiting = await Client.connect(server.ws_url)
            started = asyncio.create_task(
                waiting.start(
                    speakers_of(2), LONG[:1], on_queued=lambda q: positions.append(q.position)
                )
            )
            await asyncio.to_thread(hub.wait_for, lambda: len(server.state.store.queue()) == 1, 10)
            # The queue (length 1) is full: the next one is refused, not left hanging.
            refused = await Client.connect(server.ws_url)
            with pytest.raises(ServerError) as busy:
                await refused.start(speakers_of(2), LONG[:1])
            with pytest.raises(Closed) as closed:
                await refused.recv()
            assert not started.done()
            await holders[0].cancel()  # a slot frees: the queued session starts
            ready = await asyncio.wait_for(started, 30)
            rest = [m async for m in waiting]
            for c in holders:
                await c.close()
            return positions, busy.value.error, closed.value.code, ready, rest

        positions, busy, code, ready, rest = asyncio.run(go())
        assert positions == [1]
        assert busy.code == "busy" and busy.fatal and code == 1013
        assert isinstance(ready, Ready)
        assert rest[-1].type == "done"
        assert any(isinstance(m, Audio) for m in rest)


def test_queued_session_can_be_cancelled(piper) -> None:
    with running_server(piper, max_sessions=1, max_lead_ms=LEAD_MS) as server:

        async def go():
            holder = await Client.connect(server.ws_url)
            await holder.start(speakers_of(2), LONG)
            await holder.playback(0)
            waiting = await Client.connect(server.ws_url)
            await waiting.send(Start([SpeakerSpec(voice="joe")], [TurnSpec(0, "Hi.")]))
            first = await waiting.recv()
            await waiting.cancel()
            rest = [m async for m in waiting]
            await holder.close()
            return first, rest, waiting.close_code

        first, rest, code = asyncio.run(go())
        assert isinstance(first, Queued) and first.position == 1
        assert [m.type for m in rest] == ["cancelled"] and rest[0].last_seq == -1
        assert code == 1000
        assert server.state.store.queue() == []


def test_error_code_is_in_the_documented_set(server) -> None:
    async def go():
        async with await Client.connect(server.ws_url) as c:
            await c.playback(5)
            return await c.recv()

    err = asyncio.run(go())
    assert isinstance(err, Error) and err.code == "not_started"
