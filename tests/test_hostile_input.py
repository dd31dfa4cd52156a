"""Hostile and careless clients against a real server: nothing they send may freeze the other
sessions, exhaust memory, hold a slot nobody can use, forge a log line or drop a socket without
an error.

The heavy cases run beside a *victim*: a session streaming at the same time, whose largest gap
between audio messages must stay under half a second, while the process's peak resident memory
(VmHWM from /proc, reset first) stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import running_server
from helpers import SUBPROTOCOLS, abort, recv_message, speakers_of, turns_of
from test_bounded_decoding import ogg_stream
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from vibecast.protocol import Audio, Client, Done, Error, Progress
from vibecast.protocol.client import Closed
from vibecast.protocol.ogg import OggOpusWriter
from vibecast.protocol.wav import wav_bytes

MAX_GAP_S = 0.5
MAX_PEAK_GROWTH_MB = 400  # the unbounded versions of these attacks peaked at 2.8 to 6 GB


# -- building hostile files -----------------------------------------------------------------------


def ogg_of_packets(packets: list[bytes]) -> bytes:
    writer = OggOpusWriter(pre_skip=312, input_rate=48000, serial=7)
    return writer.header() + writer.write(packets) + writer.finish()


def wav_8bit(rate: int, seconds: float, rng: np.random.Generator) -> bytes:
    """Noise as 8-bit mono PCM: a large upload with nothing voiced in it."""
    body = rng.integers(0, 256, int(rate * seconds), dtype=np.uint8).tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate, 1, 8)
    chunks = (
        b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def start_frame(**over: Any) -> bytes:
    m: dict[str, Any] = {"type": "start", "speakers": speakers_of(1), "turns": turns_of()[:1]}
    m.update(over)
    return msgpack.packb(m, use_bin_type=True)


def upload(audio: bytes) -> bytes:
    return start_frame(speakers=[{"voice_audio": audio}])


# -- measuring ------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        status = f.read()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def reset_peak_rss() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    return peak_rss_mb()


async def replies(url: str, frame: bytes, count: int = 1) -> list[Any]:
    """Send one frame on a fresh connection; the first `count` replies (fewer if it closes)."""
    async with connect(url, subprotocols=SUBPROTOCOLS, max_size=None) as ws:
        await ws.send(frame)
        got: list[Any] = []
        while len(got) < count:
            try:
                got.append(await recv_message(ws))
            except ConnectionClosed:
                break  # after a fatal error, or `done`
        return got


async def beside_a_victim(
    url: str, attack: Callable[[], Coroutine[Any, Any, Any]]
) -> tuple[float, Any]:
    """Run `attack` while another session streams; (largest gap between its audio, result)."""
    async with await Client.connect(url) as victim:
        await victim.start(speakers_of(4), turns_of() * 4, options={"seed": 3})
        while not isinstance(await victim.recv(), Audio):
            pass
        arrivals = [time.monotonic()]
        task = asyncio.create_task(attack())
        while True:  # until the first audio after the attack finished
            msg = await victim.recv()
            assert not isinstance(msg, Done), "the victim ended before the attack: lengthen it"
            if isinstance(msg, Audio):
                arrivals.append(time.monotonic())
                if task.done():
                    break
        result = task.result()
        await victim.cancel()
        async for _ in victim:
            pass
    return float(np.max(np.diff(arrivals))), result


@pytest.fixture(scope="module")
def hostile(piper, tmp_path_factory):
    jobs = str(tmp_path_factory.mktemp("jobs"))
    with running_server(piper, resume_grace_s=600, jobs_dir=jobs) as server:
        yield server


def check_attack(server, frame: bytes) -> Error:
    base = reset_peak_rss()
    gap, got = asyncio.run(beside_a_victim(server.ws_url, lambda: replies(server.ws_url, frame)))
    growth = peak_rss_mb() - base
    assert gap < MAX_GAP_S, f"the victim went {gap:.2f} s without audio"
    assert growth < MAX_PEAK_GROWTH_MB, f"peak memory grew {growth:.0f} MB"
    assert got and isinstance(got[0], Error), got
    assert server.state.sessions.sessions.keys() == set() or all(
        s.state.value != "opening" for s in server.state.sessions.sessions.values()
    )
    return got[0]


# -- finding 1: Ogg uploads -----------------------------------------------------------------------


def test_ogg_of_tiny_packets_is_refused_from_their_toc_without_decoding(hostile) -> None:
    # 2-byte packets that each claim 120 ms of (lost) audio: ~1 MB would decode to 16 hours.
    ogg = ogg_of_packets([b"\xfb\x06"] * 500_000)
    assert 900_000 < len(ogg) < 2_000_000
    err = check_attack(hostile, upload(ogg))
    assert (err.code, err.field) == ("bad_voice_audio", "speakers[0].voice_audio")
    assert "120 s" in err.message


def test_ogg_of_a_few_long_packets_is_refused_at_the_duration_limit(hostile) -> None:
    ogg = ogg_of_packets([b"\xfb\x06"] * 1_100)  # 132 s of claimed audio in 2 kB
    got = asyncio.run(replies(hostile.ws_url, upload(ogg)))
    assert got[0].code == "bad_voice_audio" and "over 120 s" in got[0].message


def test_one_ten_megabyte_ogg_packet_is_reassembled_in_linear_time(hostile) -> None:
    ogg = ogg_stream([b"\xfc" + bytes(10_000_000 - 1)])  # one 20 ms TOC, then junk
    err = check_attack(hostile, upload(ogg))
    assert (err.code, err.field) == ("bad_voice_audio", "speakers[0].voice_audio")


# -- finding 2: pitch of a large WAV --------------------------------------------------------------


def test_large_high_rate_wav_is_analysed_in_bounded_memory(hostile) -> None:
    wav = wav_8bit(96000, 108.0, np.random.default_rng(0))  # 10.4 MB, under 120 s
    assert len(wav) > 10_000_000
    err = check_attack(hostile, upload(wav))
    # Noise has no pitch to match: refused after the analysis, which is what is measured here.
    assert (err.code, err.field) == ("bad_voice_audio", "speakers[0].voice_audio")
    assert "voiced speech" in err.message


# -- finding 11: msgpack bombs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [[{}] * 10_000_000, [[{}] * 20_000] * 500],
    ids=["ten million empty maps", "nested lists of maps"],
)
def test_frame_of_millions_of_containers_is_refused_cheaply(hostile, payload) -> None:
    frame = msgpack.packb({"type": "start", "speakers": payload})
    assert len(frame) > 9_000_000
    err = check_attack(hostile, frame)
    assert err.code == "bad_message" and not err.fatal


# -- finding 2 (the escape) and one error path: any exception reaches the client ------------------


class _Exploding:
    """The real backend, except that opening a session runs out of memory (as a 5 GB pitch
    analysis did): the one failure a test cannot cause for real without harming the machine."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_session(self, speakers: Any, params: Any) -> Any:
        raise MemoryError


def test_an_exception_while_opening_reaches_the_client_and_frees_the_slot(piper) -> None:
    with running_server(_Exploding(piper), resume_grace_s=600) as server:
        got = asyncio.run(replies(server.ws_url, start_frame(), count=5))
        hub = server.state.sessions
        assert [m.code for m in got if isinstance(m, Error)] == ["internal"]
        assert got[-1].fatal and "out of memory" in got[-1].message
        assert hub.wait_for(lambda: not hub.sessions and not hub.running, 10)


# -- finding 3: held slots ------------------------------------------------------------------------


class _Gated:
    """The real backend, with `open_session` held until the test lets it go."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_session(self, speakers: Any, params: Any) -> Any:
        self.gate.wait(30)
        return self._inner.open_session(speakers, params)


def test_a_session_dropped_while_opening_is_freed_at_once(piper) -> None:
    backend = _Gated(piper)
    with running_server(backend, resume_grace_s=600) as server:
        hub = server.state.sessions

        async def drop_while_opening() -> None:
            client = await Client.connect(server.ws_url)
            await client.ws.send(start_frame())
            opening = lambda: any(s.state.value == "opening" for s in hub.sessions.values())  # noqa: E731
            assert await asyncio.to_thread(hub.wait_for, opening, 10)
            abort(client)

        try:
            asyncio.run(drop_while_opening())
            # No resume token was ever sent, so nothing can come back for it: freed well
            # inside the 600 s grace.
            assert hub.wait_for(lambda: not hub.sessions and not hub.running, 10)
        finally:
            backend.gate.set()


def test_dropped_sessions_neither_hold_slots_nor_compute(piper) -> None:
    with running_server(piper, max_sessions=4, resume_grace_s=600) as server:
        hub = server.state.sessions

        async def main() -> tuple[list[Any], list[str]]:
            dropped = []
            for _ in range(6):  # a page reloaded six times
                client = await Client.connect(server.ws_url)
                ready = await client.start(speakers_of(4), turns_of() * 4)
                dropped.append(ready.session_id)
                abort(client)

            def paused() -> bool:
                held = [s for s in hub.sessions.values() if s.id in dropped]
                return len(held) == 6 and all(not s.attached and s.paused for s in held)

            assert await asyncio.to_thread(hub.wait_for, paused, 20)
            made = {sid: hub.sessions[sid].counters.generated for sid in dropped}
            async with await Client.connect(server.ws_url) as fresh:
                seen: list[Any] = []
                await fresh.start(speakers_of(2), turns_of()[:2], on_queued=seen.append)
                messages = [m async for m in fresh]
            assert made == {sid: hub.sessions[sid].counters.generated for sid in dropped}
            return seen, [m.type for m in messages]

        queued, kinds = asyncio.run(main())
        assert queued == [], "the new session waited behind sessions nobody is listening to"
        assert kinds[-1] == "done"


def test_playback_past_the_limit_is_refused_and_the_session_lives_on(hostile) -> None:
    async def main() -> tuple[Error, list[Any]]:
        async with await Client.connect(hostile.ws_url) as client:
            await client.start(speakers_of(1), turns_of()[:1], more=True)
            await client.playback(2**64 - 1)
            while not isinstance(msg := await client.recv(), Error):
                pass
            # The progress ticker, which the overflow used to kill, still runs.
            while not isinstance(await client.recv(), Progress):
                pass
            await client.append([], more=False)
            return msg, [m async for m in client]

    err, rest = asyncio.run(main())
    assert (err.code, err.field, err.fatal) == ("bad_field", "played_ms", False)
    assert rest[-1].type == "done"


def test_empty_appends_do_not_keep_an_open_script_alive(piper) -> None:
    with running_server(piper, idle_timeout_s=1.0) as server:

        async def main() -> Error:
            async with await Client.connect(server.ws_url) as client:
                await client.start(speakers_of(1), [{"speaker": 0, "text": "Hi."}], more=True)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    await client.append([], more=True)
                    while True:
                        msg = await client.recv()
                        if isinstance(msg, Error):
                            return msg
                        if msg.type == "appended":
                            break
            raise AssertionError("15 s of empty appends kept the script open")

        err = asyncio.run(main())
        assert err.code == "idle_timeout" and err.fatal


def test_bad_frames_before_start_do_not_reset_the_idle_timer(piper) -> None:
    with running_server(piper, idle_timeout_s=1.0) as server:

        async def main() -> Error:
            async with connect(server.ws_url, subprotocols=SUBPROTOCOLS) as ws:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    await ws.send(b"\x00")
                    msg = await recv_message(ws)
                    assert isinstance(msg, Error)
                    if msg.code != "bad_message":
                        return msg
            raise AssertionError("15 s of bad frames kept the connection waiting for start")

        err = asyncio.run(main())
        assert err.code == "idle_timeout" and err.fatal


# -- findings 6 to 9 and 12 -----------------------------------------------------------------------


def test_request_id_with_a_line_break_is_refused(hostile) -> None:
    forged = "x\nsession_end id=FORGED outcome=done client=ip:1.2.3.4"
    got = asyncio.run(replies(hostile.ws_url, start_frame(request_id=forged)))
    assert (got[0].code, got[0].field) == ("bad_field", "request_id")
    assert "printable" in got[0].message


def test_request_id_is_logged_quoted_on_one_line(hostile, caplog) -> None:
    rid = 'a "quoted" id with spaces outcome=done'
    with caplog.at_level(logging.INFO, logger="vibecast.sessions"):
        got = asyncio.run(replies(hostile.ws_url, start_frame(request_id=rid), count=1000))
        assert got[-1].type == "done"
        hub = hostile.state.sessions
        assert hub.wait_for(lambda: got[0].session_id not in hub.sessions, 10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session_end")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert 'request_id="a \\"quoted\\" id with spaces outcome=done"' in lines[0]


def test_non_ascii_resume_token_gets_unknown_session(hostile) -> None:
    async def main() -> list[Any]:
        async with await Client.connect(hostile.ws_url) as owner:
            ready = await owner.start(speakers_of(1), turns_of()[:1], more=True)
            frame = msgpack.packb(
                {
                    "type": "resume",
                    "session_id": ready.session_id,
                    "resume_token": "é" * 32,
                    "last_seq": -1,
                }
            )
            got = await replies(hostile.ws_url, frame)
            await owner.append([], more=False)
            return got

    got = asyncio.run(main())
    assert (got[0].code, got[0].field, got[0].fatal) == ("unknown_session", "session_id", False)


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_text_are_refused_naming_the_turn(hostile, char) -> None:
    turns = [{"speaker": 0, "text": "Fine."}, {"speaker": 0, "text": f"Hello{char}world."}]
    got = asyncio.run(replies(hostile.ws_url, start_frame(turns=turns)))
    assert (got[0].code, got[0].field, got[0].turn) == ("bad_field", "turns[1].text", 1)
    assert f"U+{ord(char):04X}" in got[0].message


def test_a_resume_takes_over_and_closes_the_old_connection(hostile) -> None:
    async def main() -> tuple[int | None, list[str]]:
        old = await Client.connect(hostile.ws_url)
        ready = await old.start(speakers_of(1), turns_of()[:1], more=True)
        async with await Client.connect(hostile.ws_url) as new:
            await new.resume(ready.session_id, ready.resume_token, -1)
            closed = None
            try:
                async with asyncio.timeout(10):
                    while True:
                        await old.recv()
            except Closed as e:
                closed = e.code
            await new.append([{"speaker": 0, "text": "Now from the new one."}], more=False)
            kinds = [m.type async for m in new]
        return closed, kinds

    code, kinds = asyncio.run(main())
    assert code == 4001
    assert kinds.count("turn_end") == 2 and kinds[-1] == "done"


def test_voice_just_over_two_minutes_says_by_how_much(hostile) -> None:
    t = np.arange(int(8000 * 120.1)) / 8000
    wav = wav_bytes((0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 8000)
    got = asyncio.run(replies(hostile.ws_url, upload(wav)))
    assert got[0].code == "bad_voice_audio"
    assert "120.1 s long; trim it to 120 s or less" in got[0].message


def test_a_huge_voice_name_is_refused_without_echoing_it(hostile) -> None:
    frame = start_frame(speakers=[{"voice": "v" * 1_000_000}])
    got = asyncio.run(replies(hostile.ws_url, frame))
    assert (got[0].code, got[0].field) == ("bad_field", "speakers[0].voice")
    assert len(got[0].message) < 300


# -- the HTTP routes: the same attacks as bodies of POST /v1/audio/speech and /v1/jobs ------------


def http_post(url: str, body: bytes, kind: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": kind}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()
            return r.status, {}
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def check_http_attack(server, path: str, body: bytes, kind: str) -> tuple[int, dict[str, Any]]:
    url = server.http_url + path
    base = reset_peak_rss()
    gap, got = asyncio.run(
        beside_a_victim(server.ws_url, lambda: asyncio.to_thread(http_post, url, body, kind))
    )
    growth = peak_rss_mb() - base
    assert gap < MAX_GAP_S, f"the victim went {gap:.2f} s without audio"
    assert growth < MAX_PEAK_GROWTH_MB, f"peak memory grew {growth:.0f} MB"
    return got


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/jobs"])
def test_a_json_body_of_millions_of_objects_is_refused_cheaply(hostile, path: str) -> None:
    body = b'{"input": [' + b",".join([b"{}"] * 3_000_000) + b"]}"
    assert len(body) > 8_000_000
    status, answer = check_http_attack(hostile, path, body, "application/json")
    assert status == 400 and answer["error"]["code"] == "bad_message"
    assert "containers" in answer["error"]["message"]


def test_a_job_with_an_ogg_bomb_for_a_voice_is_refused_cheaply(hostile) -> None:
    ogg = ogg_of_packets([b"\xfb\x06"] * 500_000)  # 16 hours of claimed audio in 1 MB
    request = {"speakers": [{"name": "Guest"}], "turns": turns_of()[:1]}
    boundary = "hostile-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n\r\n'.encode()
        + json.dumps(request).encode()
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="voice_0"; '
        'filename="bomb.ogg"\r\n\r\n'.encode()
        + ogg
        + f"\r\n--{boundary}--\r\n".encode()
    )
    kind = f"multipart/form-data; boundary={boundary}"
    status, answer = check_http_attack(hostile, "/v1/jobs", body, kind)
    assert status == 400 and answer["error"]["code"] == "bad_voice_audio"
    assert answer["error"]["param"] == "speakers[0].voice_audio"
