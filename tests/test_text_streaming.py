"""Text that streams in while it speaks (docs/protocol.md "Text that streams in"): a turn opened
with `stream: true` whose text comes in `text` pieces. With the default voice (Piper, which
speaks a streamed turn once its text is final) the audio equals the same text sent whole; every
refusal is an `error` naming the field and the turn, and the connection and other sessions go on;
the content filter finds a word split across pieces; the Python client's `stream_text`; the
cluster path (a gateway's RemoteBackend, engine/serving.py, in one process); and `TurnFeed`, the
interface a backend reads an open turn through. Real servers on loopback, real WebSocket clients,
real libopus."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import running_server
from helpers import DIALOGUE, SUBPROTOCOLS, SessionResult, recv_message, speakers_of, turns_of
from vibevoice_helpers import TINY, voice_dir
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from vibecast.engine.backend import Turn
from vibecast.engine.pipeline import TurnFeed
from vibecast.engine.serving import EngineService
from vibecast.protocol import Appended, Client, Done, Error, Queued, Ready, TurnEnd, TurnStart
from vibecast.server.config import ServerConfig
from vibecast.server.remote import RemoteBackend
from vibecast.server.run import ServerThread

WORDS = Path(__file__).resolve().parent / "fixtures" / "content_filter_words.txt"
HOOK = "test_content_filter:moderate"  # refuses text with "password" in it
MAX_CHARS = 400
WAIT_S = 60  # a hang guard for one message, never a measure


def frame(**m: Any) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def text(turn: int, piece: str, final: bool = False) -> bytes:
    return frame(type="text", turn=turn, text=piece, final=final)


def start(turns: list[dict[str, Any]], more: bool = False, **over: Any) -> bytes:
    m = {"type": "start", "speakers": speakers_of(2), "turns": turns, "more": more, **over}
    return msgpack.packb(m, use_bin_type=True)


def opened(words: str = "", speaker: int = 0) -> dict[str, Any]:
    return {"speaker": speaker, "text": words, "stream": True}


async def recv(ws: ClientConnection) -> Any:
    return await asyncio.wait_for(recv_message(ws), WAIT_S)


async def until(ws: ClientConnection, kind: type) -> tuple[Any, list[Any]]:
    """The next message of `kind`, and those before it."""
    seen = []
    while not isinstance(msg := await recv(ws), kind):
        seen.append(msg)
    return msg, seen


async def rest(ws: ClientConnection) -> list[Any]:
    """Every message up to the server's close."""
    got = []
    try:
        while True:
            got.append(await recv(ws))
    except ConnectionClosed:
        return got


def packets(messages: list[Any]) -> list[bytes]:
    return [p for m in messages if m.type == "audio" for p in m.packets or []]


def of(messages: list[Any], kind: type) -> list[Any]:
    return [m for m in messages if isinstance(m, kind)]


@pytest.fixture(scope="module")
def live(piper, tmp_path_factory) -> Iterator[Any]:
    jobs = str(tmp_path_factory.mktemp("jobs"))
    with running_server(piper, max_chars=MAX_CHARS, jobs_dir=jobs) as server:
        yield server


# -- the audio of a streamed turn -------------------------------------------------------------

SENTENCE = "Streaming speech starts before the sentence is finished."
# Split anywhere: mid-word, on spaces, one letter, and an empty final piece.
PIECES = ["Str", "eam", "ing spe", "ech", " ", "starts before the sent", "e", "nce is finished."]


async def whole(url: str, turns: list[dict[str, Any]]) -> list[Any]:
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start(turns, speakers=speakers_of(4), options={"seed": 3}))
        await until(ws, Ready)
        return await rest(ws)


async def streamed_sentence(url: str) -> tuple[Ready, list[Any]]:
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start([opened()], options={"seed": 3}))
        ready, _ = await until(ws, Ready)
        for piece in PIECES:
            await ws.send(text(0, piece))
        await ws.send(text(0, "", final=True))
        return ready, await rest(ws)


def test_a_turn_streamed_in_pieces_sounds_as_the_same_text_sent_whole(live) -> None:
    assert "".join(PIECES) == SENTENCE
    reference = asyncio.run(whole(live.ws_url, [{"speaker": 0, "text": SENTENCE}]))
    ready, got = asyncio.run(streamed_sentence(live.ws_url))

    assert ready.model["text_streaming"] is False  # Piper speaks a streamed turn once final
    assert packets(got) == packets(reference) and packets(got)
    (start_msg,) = of(got, TurnStart)
    (end,) = of(got, TurnEnd)
    assert start_msg.streamed is True and start_msg.text == SENTENCE  # final when it started
    assert end.text == SENTENCE
    assert end.samples == of(reference, TurnEnd)[0].samples
    assert of(got, Done)[0].samples == of(reference, Done)[0].samples
    # A turn sent whole says neither.
    assert of(reference, TurnStart)[0].streamed is None and of(reference, TurnEnd)[0].text is None


async def streamed_dialogue(url: str) -> list[Any]:
    """Turn 0 whole, turn 1 opened by the start and streamed, turn 2 appended whole for another
    speaker once turn 1 is final, turn 3 opened by an append (the script's last) and streamed."""
    texts = [t for _, t in DIALOGUE[:4]]
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(
            start(
                [{"speaker": 0, "text": texts[0]}, opened(texts[1][:7], 1)],
                more=True,
                speakers=speakers_of(4),
                options={"seed": 3},
            )
        )
        ready, _ = await until(ws, Ready)
        assert ready.turns == 2
        await ws.send(text(1, texts[1][7:20]))
        await ws.send(text(1, texts[1][20:], final=True))
        await ws.send(frame(type="append", turns=[{"speaker": 2, "text": texts[2]}], more=True))
        first, seen = await until(ws, Appended)
        await ws.send(frame(type="append", turns=[opened("", 3)], more=False))
        second, more_seen = await until(ws, Appended)
        assert (first.turns, second.turns) == (3, 4)
        for i in range(0, len(texts[3]), 5):
            await ws.send(text(3, texts[3][i : i + 5]))
        await ws.send(text(3, "", final=True))
        return seen + more_seen + await rest(ws)


def test_a_dialogue_of_whole_and_streamed_turns_sounds_as_the_whole_dialogue(live) -> None:
    reference = asyncio.run(whole(live.ws_url, turns_of(DIALOGUE[:4])))
    got = asyncio.run(streamed_dialogue(live.ws_url))
    assert packets(got) == packets(reference)
    starts = of(got, TurnStart)
    assert [s.streamed for s in starts] == [None, True, None, True]
    assert [s.speaker for s in starts] == [s for s, _ in DIALOGUE[:4]]
    assert [e.text for e in of(got, TurnEnd)] == [None, DIALOGUE[1][1], None, DIALOGUE[3][1]]
    assert of(got, Done)[0].turns == 4


# -- refusals: each names its field and turn, and the session goes on ------------------------

# (name, start turns, more, frames after ready, code, field, turn, words in the message,
#  frames that finish the session, the text turn 0 ends with)
CASES: list[tuple[str, list[dict[str, Any]], bool, list[bytes], str, str, int | None, str]] = [
    (
        "text for a turn that is not the open one",
        [opened("Hello")],
        False,
        [text(5, " there.")],
        "bad_field",
        "text.turn",
        5,
        "the open turn is 0",
    ),
    (
        "an empty piece that is not final",
        [opened("Hello")],
        False,
        [text(0, "")],
        "bad_field",
        "text.text",
        0,
        "final: true",
    ),
    (
        "a control character",
        [opened("Hello")],
        False,
        [text(0, " the\x07re")],
        "bad_field",
        "text.text",
        0,
        "text.text (turn 0) contains the control character U+0007",
    ),
    (
        "final with nothing to say",
        [opened("")],
        False,
        [text(0, "   ", final=True)],
        "bad_field",
        "text.text",
        0,
        "nothing to say",
    ),
    (
        "a turn index that is not an integer",
        [opened("Hello")],
        False,
        [frame(type="text", turn="0", text=" there.")],
        "bad_field",
        "text.turn",
        None,
        "must be an integer",
    ),
    (
        "a piece past max_chars",
        [opened("Hello")],
        False,
        [text(0, " there" * 80)],
        "too_long",
        "text.text",
        0,
        "limits.max_chars). This piece was not added",
    ),
    (
        "an append with turns while a turn is open",
        [opened("Hello")],
        True,
        [frame(type="append", turns=[{"speaker": 1, "text": "Hi."}], more=False)],
        "bad_field",
        "append.turns",
        0,
        'finish its text with {type: "text", turn: 0, final: true} first',
    ),
    (
        "stream on a turn that is not the last",
        [{"speaker": 0, "text": "Hello"}],
        True,
        [frame(type="append", turns=[opened("A"), {"speaker": 1, "text": "B."}], more=False)],
        "bad_field",
        "turns[0].stream",
        1,
        "only the last turn of a message may be open",
    ),
]


async def refused_then_finished(
    url: str, turns: list[dict[str, Any]], more: bool, bad: list[bytes]
) -> tuple[Error, list[Any], int | None]:
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start(turns, more))
        await until(ws, Ready)
        for f in bad:
            await ws.send(f)
        error, _ = await until(ws, Error)
        # The connection goes on: the turn takes its last words, the script its end.
        if turns[-1].get("stream"):
            await ws.send(text(0, " there.", final=True))
        if more:
            await ws.send(frame(type="append", turns=[], more=False))
        return error, await rest(ws), ws.close_code


@pytest.mark.parametrize(
    ("turns", "more", "bad", "code", "field", "turn", "says"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_a_refused_message_is_answered_and_the_session_goes_on(
    live, turns, more, bad, code, field, turn, says
) -> None:
    error, after, close_code = asyncio.run(refused_then_finished(live.ws_url, turns, more, bad))
    assert (error.code, error.field, error.turn, error.fatal) == (code, field, turn, False)
    assert says in error.message, error.message
    assert not of(after, Error), of(after, Error)
    assert of(after, Done) and close_code == 1000
    ended = of(after, TurnEnd)[0]
    if turns[-1].get("stream"):  # the refused piece was not added
        assert ended.text == f"{turns[-1]['text']} there.".strip()


async def finalized_twice(url: str) -> tuple[list[Error], list[Any]]:
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start([opened("Hello")], more=True))
        await until(ws, Ready)
        await ws.send(text(0, " there.", final=True))
        await ws.send(text(0, " And more."))  # after its final
        after_final, _ = await until(ws, Error)
        await ws.send(frame(type="append", turns=[{"speaker": 1, "text": "Hi."}], more=True))
        await until(ws, Appended)
        await ws.send(text(1, " again."))  # turn 1 was sent whole: no turn is open
        none_open, _ = await until(ws, Error)
        await ws.send(frame(type="append", turns=[], more=False))
        return [after_final, none_open], await rest(ws)


def test_text_after_a_turn_is_final_or_for_a_whole_turn_is_refused(live) -> None:
    (after_final, none_open), after = asyncio.run(finalized_twice(live.ws_url))
    assert (after_final.code, after_final.field, after_final.turn) == ("bad_field", "text.turn", 0)
    assert "turn 0's text is final already" in after_final.message
    assert (none_open.code, none_open.field, none_open.turn) == ("bad_field", "text.turn", 1)
    assert "no turn is" in none_open.message and "stream: true" in none_open.message
    assert not after_final.fatal and not none_open.fatal
    assert [e.text for e in of(after, TurnEnd)] == ["Hello there.", None]
    assert of(after, Done)


async def closed_then_spoken(url: str) -> list[Any]:
    """An append {more: false} with no turns while a turn is open: the script ends after it."""
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start([{"speaker": 1, "text": "First."}, opened("Sec")], more=True))
        await until(ws, Ready)
        await ws.send(frame(type="append", turns=[], more=False))
        appended, _ = await until(ws, Appended)
        assert appended.turns == 2
        await ws.send(frame(type="append", turns=[{"speaker": 0, "text": "Third."}]))
        refused, _ = await until(ws, Error)
        assert (refused.code, refused.field) == ("bad_message", "more")
        assert "turn 1, still open, is its last" in refused.message
        await ws.send(text(1, "ond.", final=True))
        return await rest(ws)


def test_an_append_that_ends_the_script_while_a_turn_is_open(live) -> None:
    after = asyncio.run(closed_then_spoken(live.ws_url))
    assert [e.text for e in of(after, TurnEnd)] == [None, "Second."]
    assert of(after, Done)[0].turns == 2


async def text_before_start(url: str) -> Any:
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(text(0, "Hello"))
        return await recv(ws)


def test_text_before_start_is_refused(live) -> None:
    error = asyncio.run(text_before_start(live.ws_url))
    assert isinstance(error, Error) and (error.code, error.fatal) == ("not_started", False)
    assert "text before start" in error.message


def test_text_before_ready_is_refused_while_queued(piper) -> None:
    with running_server(piper, max_sessions=1) as server:

        async def go() -> tuple[Any, Error, list[Any]]:
            holder = await Client.connect(server.ws_url)
            await holder.start(speakers_of(1), [], more=True)  # holds the one slot, idle
            async with connect(server.ws_url, subprotocols=SUBPROTOCOLS) as ws:
                await ws.send(start([opened("Hello")]))
                queued = await recv(ws)
                await ws.send(text(0, " there.", final=True))
                error = await recv(ws)
                await holder.cancel()  # the slot frees: the queued session starts
                await until(ws, Ready)
                await ws.send(text(0, " there.", final=True))
                after = await rest(ws)
            await holder.close()
            return queued, error, after

        queued, error, after = asyncio.run(go())
    assert isinstance(queued, Queued) and queued.position == 1
    assert isinstance(error, Error) and (error.code, error.fatal) == ("not_started", False)
    assert "text before ready" in error.message and error.turn == 0
    assert of(after, TurnEnd)[0].text == "Hello there." and of(after, Done)


# Each refused on a session whose turn 0 is open.
REFUSED = [
    text(5, " there."),
    text(0, ""),
    text(0, " the\x07re"),
    frame(type="text", turn="0", text=" there."),
    text(0, " there" * 80),
    frame(type="append", turns=[{"speaker": 1, "text": "Hi."}], more=False),
    frame(type="append", turns=[opened("A"), {"speaker": 1, "text": "B."}], more=False),
    frame(type="sing"),
    b"\xc1",
]


async def errors_beside(url: str) -> list[Error]:
    """A session that sends one refused message after another, while another one plays."""
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start([opened("Hello")], more=True))
        await until(ws, Ready)
        errors = []
        for f in REFUSED:
            await ws.send(f)
            errors.append((await until(ws, Error))[0])
        await ws.send(text(0, " there.", final=True))
        await ws.send(frame(type="append", turns=[], more=False))
        await rest(ws)
        return errors


def test_refusals_leave_other_sessions_untouched(live) -> None:
    script = turns_of(DIALOGUE[:3])
    alone = asyncio.run(whole(live.ws_url, script))

    async def together() -> tuple[list[Any], list[Error]]:
        return await asyncio.gather(whole(live.ws_url, script), errors_beside(live.ws_url))

    beside, errors = asyncio.run(together())
    assert len(errors) == len(REFUSED) and not any(e.fatal for e in errors)
    assert packets(beside) == packets(alone) and of(beside, Done) and not of(beside, Error)


def test_a_job_cannot_stream_its_text(live) -> None:
    body = {"speakers": speakers_of(1), "turns": [{"speaker": 0, "text": "Hi", "stream": True}]}
    request = urllib.request.Request(
        live.http_url + "/v1/jobs",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=WAIT_S)
    with refused.value as response:
        error = json.loads(response.read())["error"]
    assert response.code == 400 and error["param"] == "turns[0].stream"
    assert "a job's script is whole when it is submitted" in error["message"]


# -- idle ---------------------------------------------------------------------------------------


def test_an_open_turn_without_text_times_out(piper) -> None:
    with running_server(piper, idle_timeout_s=1.0) as server:

        async def go() -> tuple[list[Any], int | None]:
            async with connect(server.ws_url, subprotocols=SUBPROTOCOLS) as ws:
                await ws.send(start([{"speaker": 0, "text": "Hi."}, opened("Hel")]))
                await until(ws, Ready)
                return await rest(ws), ws.close_code

        after, code = asyncio.run(go())
    error = of(after, Error)[0]
    assert (error.code, error.fatal, code) == ("idle_timeout", True, 1008)
    assert "turn 1 is open (stream: true) but no text came" in error.message
    assert [e.turn for e in of(after, TurnEnd)] == [0]  # the turn before it was spoken


def test_a_text_piece_is_activity(live) -> None:
    hub = live.state.sessions

    async def go() -> tuple[float, float, str, list[Any]]:
        async with connect(live.ws_url, subprotocols=SUBPROTOCOLS) as ws:
            await ws.send(start([opened("Hel")]))
            ready, _ = await until(ws, Ready)
            session = hub.get(ready.session_id)
            before = session.touched
            await ws.send(text(0, "lo"))
            # Frames are handled in order: once the refusal of the next one comes back, the
            # piece before it has been taken.
            await ws.send(text(9, "x"))
            await until(ws, Error)
            after = session.touched
            so_far = session.feed.partial(0)[0].text
            await ws.send(text(0, " there.", final=True))
            return before, after, so_far, await rest(ws)

    before, after, so_far, messages = asyncio.run(go())
    assert after > before  # the idle clock (connection.py's `_tick`) starts again
    assert so_far == "Hello"
    assert of(messages, TurnEnd)[0].text == "Hello there."


# -- the content filter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filtered(piper) -> Iterator[Any]:
    with running_server(piper, content_filter_words=str(WORDS), content_filter_hook=HOOK) as s:
        yield s


async def pieces_through_filter(url: str, pieces: list[str]) -> tuple[list[Error], list[Any]]:
    """Send `pieces` of turn 0, one at a time, collecting the refusals (each piece is followed
    by a refused probe, so every piece's answer, or lack of one, is known before the next)."""
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start([opened("Well,")]))
        await until(ws, Ready)
        errors = []
        for piece in pieces:
            await ws.send(text(0, piece))
            await ws.send(text(7, "probe"))
            while (error := (await until(ws, Error))[0]).turn != 7:
                errors.append(error)
        await ws.send(text(0, "", final=True))
        return errors, await rest(ws)


def test_the_filter_finds_a_word_split_across_pieces(filtered) -> None:
    pieces = [" a cl", "ass act, a", "ss", "nd fine", " too. Forbid", "den  ph", "rase", "."]
    errors, after = asyncio.run(pieces_through_filter(filtered.ws_url, pieces))
    assert [(e.code, e.field, e.turn, e.fatal) for e in errors] == [
        ("content_rejected", "text.text", 0, False),
        ("content_rejected", "text.text", 0, False),
    ]
    assert errors[0].message.startswith('text.text (turn 0) contains "ass"')  # "a" + "ss"
    assert 'contains "Forbidden phrase"' in errors[1].message  # over three pieces
    assert "this piece was not added" in errors[0].message
    # "cl" + "ass" is "class", a whole other word; the refused pieces are not in the turn.
    assert of(after, TurnEnd)[0].text == "Well, a class act, and fine too. Forbidden  ph."


def test_the_hook_sees_a_word_split_across_pieces(filtered) -> None:
    errors, after = asyncio.run(
        pieces_through_filter(filtered.ws_url, [" my pass", "word is", "."])
    )
    assert [(e.code, e.field, e.turn) for e in errors] == [("content_rejected", "text.text", 0)]
    assert "it reads out a password" in errors[0].message
    assert of(after, TurnEnd)[0].text == "Well, my pass."


# -- the Python client --------------------------------------------------------------------------


async def llm() -> AsyncIterator[str]:
    """Text as a language model gives it: pieces that end anywhere."""
    for piece in ["Sure", ", here", " is a sh", "ort answer", " for", " you", "."]:
        yield piece


def test_stream_text_speaks_text_as_it_comes(live) -> None:
    async def go() -> tuple[int, int, SessionResult]:
        async with await Client.connect(live.ws_url) as client:
            ready = await client.start(speakers_of(2), turns_of(DIALOGUE[:1]), more=True)
            result = SessionResult(ready)
            reply = asyncio.create_task(client.stream_text(llm(), speaker=1, more=False))
            async for msg in client:
                result.messages.append(msg)
            return await reply, client.turns, result

    turn, turns, result = asyncio.run(go())
    assert (turn, turns) == (1, 2)
    ends = of(result.messages, TurnEnd)
    assert [e.turn for e in ends] == [0, 1]
    assert ends[1].text == "Sure, here is a short answer for you."
    starts = of(result.messages, TurnStart)
    assert starts[1].speaker == 1 and starts[1].streamed is True
    assert result.done.turns == 2 and not of(result.messages, Error)


def test_stream_text_ends_the_turn_when_its_text_fails(live) -> None:
    async def broken() -> AsyncIterator[str]:
        yield "Half a sentence"
        raise RuntimeError("the model went away")

    async def go() -> tuple[BaseException | None, list[Any]]:
        async with await Client.connect(live.ws_url) as client:
            await client.start(speakers_of(2), [], more=True)
            failed = None
            try:
                await client.stream_text(broken(), more=False)
            except RuntimeError as e:
                failed = e
            return failed, [m async for m in client]

    failed, messages = asyncio.run(go())
    assert isinstance(failed, RuntimeError)
    assert of(messages, TurnEnd)[0].text == "Half a sentence"  # what came is spoken
    assert of(messages, Done)


# -- the cluster path: a gateway's RemoteBackend and an EngineService, in one process ---------


class Liveness:
    """engine/serving.py's `Liveness` in memory (Redis in a cluster)."""

    def __init__(self) -> None:
        self.acks: dict[str, int] = {}
        self.turns: dict[str, list[Turn]] = defaultdict(list)
        self.ended: set[str] = set()
        self.lock = threading.Lock()

    async def acked(self, stream: str) -> int:
        with self.lock:
            return self.acks.get(stream, 0)

    async def alive(self, stream: str) -> bool:
        return True

    async def serving(self, stream: str, on: bool) -> None:
        return None

    async def appended(self, script: str, have: int) -> tuple[list[Turn], bool]:
        with self.lock:
            return [t for t in self.turns[script] if t.index >= have], script in self.ended

    async def abandoned(self, stream: str) -> None:
        return None


class _Stream:
    def __init__(self, items: Iterator[bytes], future: Any) -> None:
        self.items, self.future = items, future

    def __iter__(self) -> Iterator[bytes]:
        return self.items


class LocalLink:
    """server/remote.py's `EngineLink` to an EngineService on an event loop of its own thread
    (Ray Serve's handles and Redis in a cluster)."""

    def __init__(self, service: EngineService, liveness: Liveness) -> None:
        self.service, self.liveness = service, liveness
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def describe(self) -> dict[str, Any]:
        return self.service.describe()

    def stream(self, request: bytes) -> _Stream:
        out: queue.Queue[bytes | BaseException | None] = queue.Queue()

        async def pump() -> None:
            try:
                async for data in self.service.stream(request):
                    out.put(data)
                out.put(None)
            except asyncio.CancelledError:  # the gateway let go of the stream
                out.put(RuntimeError("the stream was cancelled"))
                raise
            except Exception as e:  # the engine failed: the gateway's runner sees it
                out.put(e)
                raise

        def items() -> Iterator[bytes]:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        return _Stream(items(), asyncio.run_coroutine_threadsafe(pump(), self.loop))

    def cancel(self, stream: Any) -> None:
        stream.future.cancel()

    def ack(self, stream: str, batches: int) -> None:
        with self.liveness.lock:
            self.liveness.acks[stream] = batches

    def beat(self, streams: list[str]) -> None:
        return None

    def done(self, stream: str) -> None:
        return None

    def append(self, script: str, turns: list[Turn], complete: bool) -> None:
        with self.liveness.lock:
            self.liveness.turns[script] += turns
            if complete:
                self.liveness.ended.add(script)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


@pytest.fixture(scope="module")
def gateway(piper) -> Iterator[Any]:
    liveness = Liveness()
    service = EngineService(piper, liveness)
    link = LocalLink(service, liveness)
    backend = RemoteBackend(link)
    try:
        with running_server(backend) as server:
            yield server
    finally:
        backend.close()
        link.close()
        service.scheduler.close()


def test_a_gateway_speaks_a_streamed_turn_once_its_text_is_final(gateway, live) -> None:
    reference = asyncio.run(whole(live.ws_url, turns_of(DIALOGUE[:4])))
    got = asyncio.run(streamed_dialogue(gateway.ws_url))
    assert packets(got) == packets(reference)
    assert [e.text for e in of(got, TurnEnd)] == [None, DIALOGUE[1][1], None, DIALOGUE[3][1]]


def test_a_gateway_does_not_claim_to_stream_text(gateway) -> None:
    ready, got = asyncio.run(streamed_sentence(gateway.ws_url))
    assert ready.model["text_streaming"] is False
    assert of(got, TurnEnd)[0].text == SENTENCE


# -- VibeVoice (the tiny checkpoint): a backend that checks a turn's length in text tokens ------


@pytest.fixture(scope="module")
def vibevoice(tmp_path_factory) -> Iterator[ServerThread]:
    voices = voice_dir(tmp_path_factory.mktemp("voices"))
    config = ServerConfig(port=0, model=str(TINY), voices=str(voices), device="cpu").replace(
        dtype="float32", diffusion_steps=3, turn_cache=False
    )
    with ServerThread(config) as server:
        yield server


async def streamed_to_vibevoice(url: str, words: list[str]) -> tuple[Ready, list[Any], Any]:
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        speakers = [{"voice": "ann"}, {"voice": "ben"}]
        turns = [{"speaker": 0, "text": "Hello there."}, opened("", 1)]
        await ws.send(start(turns, speakers=speakers, options={"seed": 2}))
        ready, _ = await until(ws, Ready)
        for i in range(0, len(words), 50):
            await ws.send(text(1, " ".join(words[i : i + 50]) + " "))
        await ws.send(text(1, "", final=True))
        return ready, await rest(ws), ws.close_code


def test_vibevoice_speaks_a_streamed_turn_once_its_text_is_final(vibevoice) -> None:
    words = "Thanks, it is good to be here.".split()
    ready, after, code = asyncio.run(streamed_to_vibevoice(vibevoice.ws_url, words))
    assert ready.model["text_streaming"] is False
    assert [e.text for e in of(after, TurnEnd)] == [None, " ".join(words)]
    assert of(after, Done) and code == 1000


def test_a_streamed_turn_too_long_for_the_model_ends_the_session_when_final(vibevoice) -> None:
    # Each piece is within the limits; the whole turn is more text tokens than the model's
    # window holds with the speech they would take. Found once the text is final, as text
    # sent cannot be taken back: fatal, and the last message.
    words = [f"word{i}" for i in range(400)]
    _, after, code = asyncio.run(streamed_to_vibevoice(vibevoice.ws_url, words))
    error = after[-1]
    assert isinstance(error, Error), [m.type for m in after]
    assert (error.code, error.fatal, error.field, error.turn) == ("too_long", True, "text.text", 1)
    assert "text tokens" in error.message and code == 1008


# -- the feed: how a backend sees an open turn -------------------------------------------------


def test_an_open_turn_is_invisible_until_its_text_is_final() -> None:
    feed = TurnFeed([Turn(0, 0, "Hi.")])
    assert feed.add([Turn(1, 1, " Hel")], more=False, open_last=True) == 2
    assert (feed.open_turn, feed.total, feed.complete) == (1, 2, False)
    assert feed.peek(1) is None and feed.known() == [Turn(0, 0, "Hi.")]
    assert feed.partial(1) == (Turn(1, 1, " Hel"), False)
    assert feed.partial(0) == (Turn(0, 0, "Hi."), True) and feed.partial(2) is None
    feed.write(1, "lo th", final=False)
    feed.write(1, "ere. ", final=False)
    assert feed.peek(1) is None and feed.partial(1) == (Turn(1, 1, " Hello there. "), False)
    feed.write(1, "", final=True)
    final = Turn(1, 1, "Hello there.")  # the whole text loses its ends' whitespace
    assert feed.peek(1) == final and feed.known()[-1] == final
    assert (feed.open_turn, feed.complete) == (None, True)
    assert feed.partial(1) == (final, True) and feed.get(1) == final and feed.get(2) is None


def test_the_feed_refuses_what_an_open_turn_does_not_allow() -> None:
    feed = TurnFeed([Turn(0, 0, "")], more=True, open_last=True)
    with pytest.raises(ValueError, match="turn 3 is not open"):
        feed.write(3, "x", final=False)
    with pytest.raises(ValueError, match="its text must be final first"):
        feed.add([Turn(1, 1, "Next.")], more=True)
    with pytest.raises(ValueError, match="no text to end with"):
        feed.write(0, "  ", final=True)
    assert feed.open_turn == 0 and feed.partial(0) == (Turn(0, 0, ""), False)  # unchanged
    assert feed.add([], more=False) == 1 and not feed.complete  # no turns after the open one
    feed.write(0, "Done.", final=True)
    assert feed.complete
    with pytest.raises(ValueError, match="turn 0 is not open"):
        feed.write(0, " More.", final=False)


class Watched(threading.Condition):
    """A condition that tells when a waiter goes (back) to sleep on it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.sleeping.set()
        return super().wait(timeout)


def test_a_waiter_is_woken_by_every_piece_and_gets_the_turn_once_final() -> None:
    feed = TurnFeed([Turn(0, 0, "One.")], more=True)
    feed.add([Turn(1, 1, "Tw")], more=False, open_last=True)
    cond = Watched()
    feed._cond = cond
    got: list[Turn | None] = []
    waiter = threading.Thread(target=lambda: got.append(feed.get(1)))
    waiter.start()
    assert cond.sleeping.wait(WAIT_S)  # waiting for turn 1
    cond.sleeping.clear()
    feed.write(1, "o", final=False)
    assert cond.sleeping.wait(WAIT_S)  # woken by the piece, and asleep again: not final yet
    assert got == [] and waiter.is_alive()
    feed.write(1, ".", final=True)
    waiter.join(WAIT_S)
    assert got == [Turn(1, 1, "Two.")]


def test_closing_the_feed_releases_a_waiter_for_an_unfinished_turn() -> None:
    feed = TurnFeed([Turn(0, 0, "Unfinish")], more=False, open_last=True)
    got: list[Turn | None] = []
    waiter = threading.Thread(target=lambda: got.append(feed.get(0)))
    waiter.start()
    feed.close()
    waiter.join(WAIT_S)
    assert got == [None] and feed.complete and feed.open_turn is None
    assert feed.partial(0) == (Turn(0, 0, "Unfinish"), False)  # never final
    with pytest.raises(ValueError, match="no turn is"):
        feed.write(0, "ed.", final=True)
