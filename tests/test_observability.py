"""/metrics, /readyz and the one log line per session end."""

from __future__ import annotations

import asyncio
import logging
import re

import msgpack
from conftest import running_server
from helpers import get_json, get_text, metric, run_session, speakers_of, turns_of

from vibecast.protocol import Audio, Client


def test_readyz_and_healthz(server) -> None:
    assert get_json(server.http_url + "/healthz") == {"ok": True}
    ready = get_json(server.http_url + "/readyz")
    assert ready["ready"] is True and ready["model"].startswith("piper:")
    assert metric(get_text(server.http_url + "/metrics"), "vibecast_engine_ready") == 1


def test_metrics_count_what_happened(piper, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vibecast.sessions")
    with running_server(piper) as server:
        base = server.http_url
        result = asyncio.run(
            run_session(server.ws_url, speakers_of(2), turns_of()[:2], options={"seed": 3})
        )

        async def stalling_listener():
            async with await Client.connect(server.ws_url) as c:
                await c.start(speakers_of(2), turns_of()[:2])
                async for m in c:
                    if isinstance(m, Audio):
                        await c.playback(0)  # far behind: lead = everything sent so far
                        break
                await c.ws.send(msgpack.packb({"type": "dance"}))  # an unknown type: bad_message
                [m async for m in c]

        asyncio.run(stalling_listener())
        text = get_text(base + "/metrics")

    assert metric(text, "vibecast_sessions_total", 'outcome="done"') == 2
    assert metric(text, "vibecast_first_audio_seconds_count") == 2
    assert 0 < metric(text, "vibecast_first_audio_seconds_sum") < 60
    assert metric(text, "vibecast_real_time_factor_count") == 2
    sent = metric(text, "vibecast_audio_sent_seconds_total")
    assert abs(sent - (result.done.samples / 48000) * 2) < 20  # both sessions' audio
    assert metric(text, "vibecast_errors_total", 'code="bad_message"') == 1
    assert (
        metric(text, "vibecast_sessions_active") == 0
        and metric(text, "vibecast_sessions_queued") == 0
    )

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session_end")]
    assert len(lines) == 2
    line = next(x for x in lines if result.ready.session_id in x)
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    assert fields["outcome"] == "done" and fields["turns"] == "2/2"
    assert int(fields["samples"]) == result.done.samples
    assert int(fields["ttfa_ms"]) >= 0 and float(fields["rtf"]) > 0 and int(fields["wall_ms"]) > 0


def test_low_lead_is_counted(piper) -> None:
    with running_server(piper) as server:

        async def go():
            async with await Client.connect(server.ws_url) as c:
                await c.start(speakers_of(2), turns_of()[:2])
                async for m in c:
                    if isinstance(m, Audio):
                        # Played almost everything sent: less than a second ahead.
                        await c.playback(max(0, (m.pts + m.samples) // 48 - 500))
                        break
                [m async for m in c]

        asyncio.run(go())
        assert metric(get_text(server.http_url + "/metrics"), "vibecast_lead_below_1s_total") == 1
