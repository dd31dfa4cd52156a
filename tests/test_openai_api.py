"""The OpenAI-compatible speech API (server/openai_api.py) through the official `openai`
package, unmodified, pointed at a real server with `base_url`; every format decoded by a decoder
that is not our encoder (libsndfile through soundfile, or FFmpeg's decoders through PyAV)."""

from __future__ import annotations

import http.client
import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import openai
import pytest
import soundfile
from conftest import running_server

SEED = {"seed": 7}
LINE = "Hello there, and welcome to the show."
LONG = "\n".join(
    f"Speaker {1 + i % 2}: This is line {i} of a long dialogue, read at an even pace."
    for i in range(24)
)
# What a decoder may add to the audio it was given: an encoder's priming samples (mp3, aac:
# a stream without gapless headers plays them) plus one codec frame of padding.
SLACK = {"mp3": 1105 + 2 * 576, "aac": 1024 + 1024, "opus": 480, "flac": 0, "wav": 0}


@pytest.fixture(scope="module")
def api(piper):
    with running_server(piper) as server:
        yield server


@pytest.fixture(scope="module")
def client(api) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=api.http_url + "/v1", api_key="-", max_retries=0) as c:
        yield c


def speak(client: openai.OpenAI, fmt: str, text: str = LINE, **extra: Any) -> bytes:
    response = client.audio.speech.create(
        model="tts-1",
        voice="alloy",
        input=text,
        response_format=fmt,  # type: ignore[arg-type]
        extra_body={**SEED, **extra},
    )
    return response.content


def decoded_samples(fmt: str, data: bytes) -> int:
    """Samples at 24 kHz, by an independent decoder."""
    if fmt in ("mp3", "wav", "opus"):  # libsndfile
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32")
        assert rate == 24000
        return len(audio)
    with av.open(io.BytesIO(data), mode="r") as container:  # FFmpeg's aac and flac decoders
        stream = container.streams.audio[0]
        n = sum(f.samples for f in container.decode(stream))
        return n * 24000 // stream.rate


@pytest.fixture(scope="module")
def pcm(client) -> bytes:
    return speak(client, "pcm")


def test_pcm_is_raw_16_bit_24khz_speech(pcm) -> None:
    samples = np.frombuffer(pcm, dtype="<i2")
    assert 1.0 < len(samples) / 24000 < 5.0
    assert np.abs(samples).max() > 3000  # speech, not silence


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_each_format_decodes_to_the_speech_length(client, pcm, fmt) -> None:
    data = speak(client, fmt)
    expected = len(pcm) // 2  # the same seed: the same speech
    got = decoded_samples(fmt, data)
    assert expected <= got + 480 and got <= expected + SLACK[fmt], (got, expected)


def test_wav_and_flac_hold_exactly_the_pcm(client, pcm) -> None:
    wav, _ = soundfile.read(io.BytesIO(speak(client, "wav")), dtype="int16")
    np.testing.assert_array_equal(wav, np.frombuffer(pcm, dtype="<i2"))
    with av.open(io.BytesIO(speak(client, "flac")), mode="r") as c:
        flac = np.concatenate([f.to_ndarray()[0] for f in c.decode(c.streams.audio[0])])
    np.testing.assert_array_equal(flac, np.frombuffer(pcm, dtype="<i2"))


def test_speed_changes_the_length_not_the_pitch_range(client, pcm) -> None:
    fast = np.frombuffer(speak(client, "pcm", speed=2.0), dtype="<i2")
    assert abs(len(fast) - len(pcm) // 4) <= 2400  # half the samples, within 0.1 s


class _HeldFeed:
    """A session's script in which only the first turn is there until the test says so: the
    engine speaks turn 0, then waits as it does for a client's `append`."""

    def __init__(self, feed: Any, gate: threading.Event) -> None:
        self._feed, self._gate = feed, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._feed, name)

    def peek(self, i: int) -> Any:
        return self._feed.peek(i) if i == 0 or self._gate.is_set() else None

    @property
    def complete(self) -> bool:
        return self._gate.is_set() and self._feed.complete


class _Held:
    """The real backend, with every session's turns after the first held by `gate`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def runner(self, session: Any, feed: Any, replayed: Any = ()) -> Any:
        return self._inner.runner(session, _HeldFeed(feed, self.gate), replayed)


@pytest.fixture
def held(piper):
    backend = _Held(piper)
    with (
        running_server(backend) as server,
        openai.OpenAI(base_url=server.http_url + "/v1", api_key="-") as client,
    ):
        yield backend, server, client


def test_the_body_streams_while_the_speech_is_made(held) -> None:
    backend, server, client = held
    hub = server.state.sessions
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=LONG, response_format="pcm", extra_body=SEED
    ) as response:
        chunks = response.iter_bytes(4096)
        first = next(chunks)
        # The first bytes are here while the session is still on its first of 24 turns.
        (session,) = hub.sessions.values()
        assert first and session.outcome is None and session.counters.turns_done <= 1
        backend.gate.set()
        hub.scheduler.wake()
        rest = b"".join(chunks)
    assert len(first + rest) // 2 / 24000 > 30  # the whole dialogue came


def test_sse_gives_deltas_then_done_with_usage(client) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input=LINE,
        response_format="pcm",
        stream_format="sse",
        extra_body=SEED,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"}
    import base64

    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(audio) > 24000  # over half a second of 16-bit audio
    usage = events[-1]["usage"]
    assert usage["input_tokens"] == len(LINE)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_a_dialogue_gives_each_speaker_the_voice_asked_for(client) -> None:
    script = "Speaker 1: Good morning.\nSpeaker 2: Good evening."
    same = speak(client, "pcm", script, voices={"1": "joe", "2": "joe"})
    apart = speak(client, "pcm", script, voices={"1": "joe", "2": "joe-deep"})
    assert same != apart  # speaker 2's voice changed and nothing else did
    n = min(len(same), len(apart)) // 4  # speaker 1's first half-line: the same either way
    assert same[:n] == apart[:n]


def test_voices_and_models_list_what_the_server_has(api, client) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "piper:en_US-joe-medium" and "tts-1" in ids
    with urllib.request.urlopen(api.http_url + "/v1/audio/voices") as r:
        voices = json.loads(r.read())["voices"]
    assert [v["id"] for v in voices] == ["joe", "joe-high", "joe-deep", "joe-bright"]


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_errors_come_in_openais_shape_with_the_field_and_a_fix(client) -> None:
    e = error_of(lambda: client.audio.speech.create(model="nope", voice="alloy", input=LINE))
    assert e.status_code == 404 and e.body["code"] == "model_not_found"  # type: ignore[index]
    assert "GET /v1/models" in e.body["message"]  # type: ignore[index]
    e = error_of(lambda: client.audio.speech.create(model="tts-1", voice="zed", input=LINE))
    assert e.status_code == 400 and e.body["param"] == "voice"  # type: ignore[index]
    e = error_of(
        lambda: client.audio.speech.create(
            model="tts-1",
            voice="alloy",
            input=LINE,
            response_format="ogg",
        )
    )
    assert e.status_code == 400 and e.body["param"] == "response_format"  # type: ignore[index]
    e = error_of(
        lambda: client.audio.speech.create(model="tts-1", voice="alloy", input=LINE, speed=9)
    )
    assert e.status_code == 400 and e.body["param"] == "speed"  # type: ignore[index]
    e = error_of(
        lambda: client.audio.speech.create(
            model="tts-1", voice="alloy", input="Speaker 1: hi\nnot a line"
        )
    )
    assert e.status_code == 400 and "line 2" in e.body["message"]  # type: ignore[index]


JSON = {"Content-Type": "application/json"}


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as r:
            r.read()  # to the end, so that the connection closes cleanly
            return r.status, {}
    except urllib.error.HTTPError as e:
        with e:  # an error response holds its socket until closed
            return e.code, json.loads(e.read())


def test_a_body_too_big_or_not_json_is_refused_before_it_is_read(api) -> None:
    url = api.http_url + "/v1/audio/speech"
    status, body = post(url, b"{}", {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]["message"]
    # A declared 10 MB body: the answer comes before a byte of it is sent.
    limit = api.config.limits.max_frame_bytes
    conn = http.client.HTTPConnection("127.0.0.1", api.config.port, timeout=10)
    conn.putrequest("POST", "/v1/audio/speech")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and json.loads(answer.read())["error"]["code"] == "too_big"
    conn.close()
    for junk in (b"[1, 2]", b"{", b"[" * 200_000 + b"]" * 200_000, b"\xff\xfe"):
        status, body = post(url, junk, {"Content-Type": "application/json"})
        assert status == 400 and body["error"]["code"] == "bad_message"
    # Fields of the wrong type name the field; unknown fields are ignored (OpenAI's clients
    # send newer ones than a server knows).
    status, body = post(
        url, json.dumps({"model": "tts-1", "voice": 3, "input": "x"}).encode(), JSON
    )
    assert status == 400 and body["error"]["param"] == "voice"
    status, body = post(
        url, json.dumps({"model": "tts-1", "voice": "alloy", "input": ["x"]}).encode(), JSON
    )
    assert status == 400 and body["error"]["param"] == "input"
    fine = {"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "pcm"}
    status, _ = post(url, json.dumps({**fine, "future_field": 1}).encode(), JSON)
    assert status == 200


def test_keys_are_checked_like_the_websockets(piper) -> None:
    with running_server(piper, api_keys=("sesame",)) as server:
        url = server.http_url + "/v1"
        with openai.OpenAI(base_url=url, api_key="nope", max_retries=0) as wrong:
            e = error_of(
                lambda: wrong.audio.speech.create(model="tts-1", voice="alloy", input=LINE)
            )
        assert e.status_code == 401
        with openai.OpenAI(base_url=url, api_key="sesame", max_retries=0) as right:
            assert right.audio.speech.create(model="tts-1", voice="alloy", input=LINE).content


def test_a_client_that_leaves_cancels_its_session(held) -> None:
    _, server, client = held
    hub = server.state.sessions
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=LONG, response_format="pcm", extra_body=SEED
    ) as response:
        chunks = response.iter_bytes(4096)  # kept: dropping the iterator closes the body
        next(chunks)
        (session,) = hub.sessions.values()
        assert session.outcome is None
    # Closing the response mid-body closes the connection: the server ends the session.
    assert hub.wait_for(lambda: session.id not in hub.sessions, 10)
    assert session.outcome is not None and session.outcome.value == "cancelled"


def test_a_full_server_answers_429_and_a_stopping_one_503(piper) -> None:
    backend = _Held(piper)
    with (
        running_server(backend, max_sessions=1, max_queue=0) as server,
        openai.OpenAI(base_url=server.http_url + "/v1", api_key="-", max_retries=0) as client,
    ):
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=LONG, response_format="pcm"
        ) as response:
            chunks = response.iter_bytes(4096)
            next(chunks)  # the one slot is taken, and nobody may wait
            e = error_of(lambda: client.audio.speech.create(model="tts-1", voice="joe", input="x"))
            assert e.status_code == 429 and e.body["code"] == "busy"  # type: ignore[index]
            backend.gate.set()
            server.state.sessions.scheduler.wake()
        # What the lifespan sets when the server begins to stop (SIGTERM).
        server.state.draining = True
        e = error_of(lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="x"))
        assert e.status_code == 503
        server.state.draining = False


def test_the_content_filter_refuses_a_line_naming_it(piper) -> None:
    words = Path(__file__).resolve().parent / "fixtures" / "content_filter_words.txt"
    with (
        running_server(piper, content_filter_words=str(words)) as server,
        openai.OpenAI(base_url=server.http_url + "/v1", api_key="-", max_retries=0) as client,
    ):
        script = "Speaker 1: All fine here.\nSpeaker 2: Still fine.\nSpeaker 1: What an ass."
        e = error_of(lambda: client.audio.speech.create(model="tts-1", voice="joe", input=script))
        body: Any = e.body
        assert e.status_code == 400 and body["code"] == "content_rejected"
        assert body["param"] == "input" and "turns[2]" in body["message"]
        assert not server.state.sessions.sessions  # nothing was made for it
