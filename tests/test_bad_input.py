"""Bad input gets its documented error with a sentence a person can act on; the process stays
up; and a new session on a new connection works afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
from helpers import SUBPROTOCOLS, get_json, recv_message, run_session, speakers_of, turns_of
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from vibecast.protocol import Error


def start(**over: Any) -> bytes:
    m = {"type": "start", "speakers": speakers_of(2), "turns": turns_of()[:2]}
    m.update(over)
    return msgpack.packb(m)


async def exchange(url: str, *frames: bytes | str, replies: int = 1) -> tuple[list[Any], Any]:
    """Send frames, collect `replies` messages (or until close); return them and the close."""
    async with connect(url, subprotocols=SUBPROTOCOLS, max_size=None) as ws:
        for f in frames:
            await ws.send(f)
        got: list[Any] = []
        while len(got) < replies:
            try:
                got.append(await asyncio.wait_for(recv_message(ws), 30))
            except ConnectionClosed:
                break  # the server closed after a fatal error or the end of the session
        if got and isinstance(got[-1], Error) and got[-1].fatal:
            await asyncio.wait_for(ws.wait_closed(), 10)  # the server closes after a fatal error
        return got, ws.close_code


CASES: list[tuple[str, list[bytes | str], str, str | None, bool]] = [
    # (name, frames, expected code, field, fatal)
    ("text frame", ["hello"], "bad_message", None, False),
    ("not msgpack", [b"\xc1\xc1\xc1"], "bad_message", None, False),
    ("msgpack but not a map", [msgpack.packb([1, 2, 3])], "bad_message", None, False),
    ("unknown type", [msgpack.packb({"type": "sing"})], "bad_message", "type", False),
    ("5 speakers", [start(speakers=speakers_of(5))], "too_many_speakers", "speakers", False),
    (
        "speaker out of range",
        [start(turns=[{"speaker": 2, "text": "Hi."}])],
        "bad_field",
        "turns[0].speaker",
        False,
    ),
    (
        "empty turn",
        [start(turns=[{"speaker": 0, "text": "Hi."}, {"speaker": 1, "text": "  "}])],
        "bad_field",
        "turns[1].text",
        False,
    ),
    (
        "unknown voice",
        [start(speakers=[{"voice": "nobody"}], turns=[{"speaker": 0, "text": "Hi."}])],
        "unknown_voice",
        "speakers[0].voice",
        False,
    ),
    (
        "append before start",
        [msgpack.packb({"type": "append", "turns": []})],
        "not_started",
        None,
        False,
    ),
    ("wrong field type", [start(more="yes")], "bad_field", "more", False),
    ("bad codec", [start(format={"codec": "mp3"})], "bad_field", "format.codec", False),
]


@pytest.mark.parametrize(
    ("name", "frames", "code", "field", "fatal"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_frame_gets_its_error(server, name, frames, code, field, fatal) -> None:
    got, _ = asyncio.run(exchange(server.ws_url, *frames))
    assert got and isinstance(got[0], Error), got
    err = got[0]
    assert (err.code, err.field, err.fatal) == (code, field, fatal)
    assert len(err.message) > 30 and err.message.rstrip().endswith(".")
    if field:  # the sentence names what to fix
        assert field.split("[")[0].split(".")[0] in err.message


def test_turn_errors_name_the_turn(server) -> None:
    got, _ = asyncio.run(
        exchange(
            server.ws_url, start(turns=[{"speaker": 0, "text": "a"}, {"speaker": 9, "text": "b"}])
        )
    )
    assert got[0].turn == 1


def test_connection_survives_non_fatal_errors_and_then_starts(server) -> None:
    frames: list[bytes | str] = [b"\x00\x01", "text", start()]
    got, close = asyncio.run(exchange(server.ws_url, *frames, replies=100))
    kinds = [m.type for m in got]
    assert kinds[:3] == ["error", "error", "ready"]
    assert kinds[-1] == "done" and close == 1000


def test_second_start_is_refused_while_the_first_plays_on(server) -> None:
    got, close = asyncio.run(exchange(server.ws_url, start(), start(), replies=1000))
    errors = [m for m in got if isinstance(m, Error)]
    assert [e.code for e in errors] == ["already_started"]
    assert got[-1].type == "done" and close == 1000


def test_frame_over_the_limit_is_refused_and_closed(server) -> None:
    limit = server.config.limits.max_frame_bytes
    huge = msgpack.packb({"type": "start", "pad": b"\x00" * (limit + 1)})
    got, close = asyncio.run(exchange(server.ws_url, huge))
    assert got[0].code == "too_big" and got[0].fatal
    assert close == 1009


def test_ten_megabyte_voice_upload_is_refused(server) -> None:
    blob = b"RIFF" + b"\x00" * (10 * 1024 * 1024)
    frame = start(
        speakers=[{"voice_audio": blob, "voice_format": "wav"}],
        turns=[{"speaker": 0, "text": "Hi."}],
    )
    got, close = asyncio.run(exchange(server.ws_url, frame))
    assert got[0].code == "too_big" and close == 1009


def test_bad_voice_audio(server) -> None:
    frame = start(
        speakers=[{"voice_audio": b"RIFF....WAVEjunk"}], turns=[{"speaker": 0, "text": "Hi."}]
    )
    got, _ = asyncio.run(exchange(server.ws_url, frame))
    assert got[0].code == "bad_voice_audio" and got[0].field == "speakers[0].voice_audio"


def test_server_is_still_up_and_serves_a_new_session(server) -> None:
    for case in CASES:  # every bad frame above, then a good session
        asyncio.run(exchange(server.ws_url, *case[1]))
    assert get_json(server.http_url + "/healthz") == {"ok": True}
    result = asyncio.run(run_session(server.ws_url, speakers_of(2), turns_of()[:2]))
    assert result.kinds()[-1] == "done" and result.close_code == 1000
    assert result.done.samples > 48000
