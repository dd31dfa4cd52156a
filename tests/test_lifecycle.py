"""A session's life under the real protocol: cancel, dropped sockets, idle connections,
appended turns, and the limits it is told about."""

from __future__ import annotations

import asyncio

import pytest
from conftest import running_server
from helpers import abort, get_text, metric, speakers_of, turns_of

from vibecast.protocol import Appended, Audio, Cancelled, Client, Closed, Done, Error, TurnEnd

LONG = [
    {"speaker": i % 2, "text": "This is a fairly long line that keeps the engine busy for a while."}
    for i in range(12)
]


@pytest.fixture(scope="module")
def quick(piper):
    """No resume grace: a dropped socket frees its session at once."""
    with running_server(piper, resume_grace_s=0, idle_timeout_s=1.0) as server:
        yield server


def test_cancel_mid_turn_sends_no_audio_after_cancelled(quick) -> None:
    async def go():
        async with await Client.connect(quick.ws_url) as c:
            await c.start(speakers_of(2), LONG, options={"seed": 1})
            got = []
            async for m in c:
                got.append(m)
                if isinstance(m, Audio) and m.seq == 1:
                    await c.cancel()
            return got, c.close_code

    got, close = asyncio.run(go())
    kinds = [m.type for m in got]
    assert "cancelled" in kinds and "done" not in kinds
    after = kinds[kinds.index("cancelled") + 1 :]
    assert after == []  # nothing at all follows cancelled; then the server closes
    assert close == 1000
    cancelled = next(m for m in got if isinstance(m, Cancelled))
    assert cancelled.last_seq == max(m.seq for m in got if isinstance(m, Audio))
    # The engine thread stops and the session is freed.
    hub = quick.state.sessions
    assert hub.wait_for(lambda: not hub.sessions, timeout=10)


async def start_then_drop(server, seen: list | None = None) -> None:
    """Start a long session, wait for its first audio, then drop the TCP connection."""
    c = await Client.connect(server.ws_url)
    await c.start(speakers_of(2), LONG)
    async for m in c:
        if isinstance(m, Audio):
            break
    if seen is not None:
        seen.extend(server.state.sessions.sessions.values())  # before the drop frees them
    abort(c)


def test_twenty_abrupt_disconnects_leave_nothing_running(quick) -> None:
    hub = quick.state.sessions
    sessions: list = []

    async def all_of_them():
        for _ in range(20):
            await start_then_drop(quick, sessions)

    asyncio.run(all_of_them())
    assert hub.wait_for(lambda: not hub.sessions, timeout=10)
    assert len(set(sessions)) == 20
    assert all(s.join(timeout=5) for s in sessions)  # every engine thread has ended
    text = get_text(quick.http_url + "/metrics")
    assert metric(text, "vibecast_sessions_active") == 0
    assert metric(text, "vibecast_sessions_total", 'outcome="abandoned"') >= 20


def test_dropped_socket_is_held_for_the_grace_period_then_freed(piper) -> None:
    with running_server(piper, resume_grace_s=1.0) as server:
        hub = server.state.sessions
        asyncio.run(start_then_drop(server))
        assert hub.wait_for(lambda: any(not s.attached for s in hub.sessions.values()), timeout=5)
        assert metric(get_text(server.http_url + "/metrics"), "vibecast_sessions_detached") == 1
        assert hub.wait_for(lambda: not hub.sessions, timeout=10)  # the grace ran out


def test_idle_connection_is_closed_with_a_reason(quick) -> None:
    async def go():
        async with await Client.connect(quick.ws_url) as c:
            msg = await c.recv()
            with pytest.raises(Closed) as closed:
                await c.recv()
            return msg, closed.value.code

    msg, code = asyncio.run(go())
    assert isinstance(msg, Error) and msg.code == "idle_timeout" and msg.fatal
    assert "idle_timeout_s" in msg.message and code == 1008


def test_open_script_without_appends_times_out(quick) -> None:
    async def go():
        async with await Client.connect(quick.ws_url) as c:
            await c.start(speakers_of(1), [{"speaker": 0, "text": "Hello."}], more=True)
            return [m async for m in c]

    got = asyncio.run(go())
    assert [m.type for m in got if m.type != "progress"][-1] == "error"
    err = [m for m in got if isinstance(m, Error)][-1]
    assert err.code == "idle_timeout" and "more: false" in err.message


def test_append_grows_the_script_and_more_false_ends_it(quick) -> None:
    async def go():
        async with await Client.connect(quick.ws_url) as c:
            await c.start(speakers_of(2), [{"speaker": 0, "text": "First."}], more=True)
            got = []
            async for m in c:
                got.append(m)
                if isinstance(m, TurnEnd) and m.turn == 0:
                    await c.append([{"speaker": 1, "text": "Second."}], more=True)
                if isinstance(m, TurnEnd) and m.turn == 1:
                    await c.append([], more=False)
            return got

    got = asyncio.run(go())
    appended = [m for m in got if isinstance(m, Appended)]
    assert [a.turns for a in appended] == [2, 2]
    done = [m for m in got if isinstance(m, Done)]
    assert done and done[0].turns == 2
    # The script ended after its last turn closed: the flush travels in a samples-0 message.
    audio = [m for m in got if isinstance(m, Audio)]
    assert audio[-1].samples == 0 and audio[-1].packets


def test_append_problems_are_reported(quick) -> None:
    async def go():
        async with await Client.connect(quick.ws_url) as c:
            await c.start(speakers_of(2), turns_of()[:1])
            await c.append([{"speaker": 5, "text": "who?"}])
            return [m async for m in c]

    got = asyncio.run(go())
    errors = [m for m in got if isinstance(m, Error)]
    assert (
        errors[0].code == "bad_field"
        and errors[0].field == "turns[0].speaker"
        and errors[0].turn == 1
    )
    assert got[-1].type == "done"  # the session itself carried on


def test_limits_come_from_config_and_are_echoed(piper) -> None:
    with running_server(piper, max_chars=321, max_speakers=2, max_lead_ms=4000) as server:

        async def go():
            async with await Client.connect(server.ws_url) as c:
                ready = await c.start(speakers_of(2), [{"speaker": 0, "text": "Hi."}])
                [m async for m in c]
                return ready

        ready = asyncio.run(go())
        assert ready.limits["max_chars"] == 321 and ready.limits["max_speakers"] == 2
        assert ready.limits["max_lead_ms"] == 4000

        async def too_long():
            async with await Client.connect(server.ws_url) as c:
                from vibecast.protocol import ServerError

                with pytest.raises(ServerError) as e:
                    await c.start(speakers_of(2), [{"speaker": 0, "text": "x" * 400}])
                return e.value.error

        err = asyncio.run(too_long())
        assert err.code == "too_long" and err.turn == 0 and "321" in err.message
