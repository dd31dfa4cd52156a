"""The content filter on a real server: a listed word, a `re:` pattern or the hook's verdict
refuses a turn with `content_rejected` naming it, before any audio; near misses and unfiltered
servers play on; bad settings stop the server at start-up with a message naming the setting.

The hook the server imports is `moderate` below, imported by name like any operator's module
(pytest puts tests/ on sys.path, so this file is the module `test_content_filter`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import running_server
from helpers import SUBPROTOCOLS, recv_message, run_session, speakers_of
from websockets.asyncio.client import connect

from vibecast.protocol import Appended, Client, Done, Error, Ready, TurnStart
from vibecast.protocol.messages import Code, ProtocolError, TurnSpec
from vibecast.server.config import ServerConfig, load_config
from vibecast.server.content_filter import ContentFilter
from vibecast.server.run import ServerThread

WORDS = Path(__file__).resolve().parent / "fixtures" / "content_filter_words.txt"
HOOK = "test_content_filter:moderate"


def moderate(text: str) -> str | None:
    """The test server's hook: refuses passwords, and fails on 'kaboom' as a buggy hook would."""
    if "kaboom" in text:
        raise RuntimeError("the moderation service is down")
    if "password" in text.lower():
        return "it reads out a password."
    return None


@pytest.fixture(scope="module")
def filtered(piper) -> Iterator[ServerThread]:
    with running_server(piper, content_filter_words=str(WORDS), content_filter_hook=HOOK) as s:
        yield s


def start_frame(*texts: str, more: bool = False) -> bytes:
    turns = [{"speaker": i % 2, "text": t} for i, t in enumerate(texts)]
    return msgpack.packb(
        {"type": "start", "speakers": speakers_of(2), "turns": turns, "more": more}
    )


async def start_then_cancel(url: str, start: bytes) -> list[Any]:
    """Send `start`, then `cancel`, and return the two replies. The server reads a connection's
    frames in order, so a `not_started` answer to the cancel proves that the start made no
    session: nothing of it (ready, audio) was sent before, and nothing can come after."""
    async with connect(url, subprotocols=SUBPROTOCOLS) as ws:
        await ws.send(start)
        await ws.send(msgpack.packb({"type": "cancel"}))
        return [await asyncio.wait_for(recv_message(ws), 30) for _ in range(2)]


def refused(url: str, *texts: str) -> Error:
    """The content_rejected error for a start with `texts`, checked to have made no session."""
    first, second = asyncio.run(start_then_cancel(url, start_frame(*texts)))
    assert isinstance(first, Error) and first.code == Code.CONTENT_REJECTED, first
    assert first.fatal is False
    assert isinstance(second, Error) and second.code == Code.NOT_STARTED, second
    return first


def test_listed_word_in_turn_2_of_a_start_is_refused_before_any_audio(filtered) -> None:
    line = "Well, that was a total ASS of a move, if you ask me."
    err = refused(filtered.ws_url, "Good morning.", "Morning to you.", line, "Shall we go?")
    assert (err.turn, err.field) == (2, "turns[2].text")
    assert err.message == (
        'turns[2].text contains "ass", which this server\'s content filter does not accept; '
        "rephrase that line."
    )
    assert line not in err.message


def test_refused_start_can_be_corrected_on_the_same_connection(filtered) -> None:
    async def go() -> tuple[list[Any], int | None]:
        async with connect(filtered.ws_url, subprotocols=SUBPROTOCOLS) as ws:
            await ws.send(start_frame("Hello.", "A forbidden phrase."))
            await ws.send(start_frame("Hello.", "A permitted phrase."))
            got: list[Any] = []
            while not got or not isinstance(got[-1], Done):
                got.append(await asyncio.wait_for(recv_message(ws), 30))
            await asyncio.wait_for(ws.wait_closed(), 10)
            return got, ws.close_code

    got, close = asyncio.run(go())
    assert isinstance(got[0], Error) and got[0].code == Code.CONTENT_REJECTED
    assert got[0].turn == 1 and '"Forbidden phrase"' in got[0].message
    assert isinstance(got[1], Ready)  # the corrected start, and the session it began
    assert [m.text for m in got if isinstance(m, TurnStart)] == ["Hello.", "A permitted phrase."]
    assert not [m for m in got[1:] if isinstance(m, Error)]
    assert close == 1000


def test_re_pattern_refuses_the_turn_it_matches(filtered) -> None:
    err = refused(filtered.ws_url, "Call me on 555-0199 tonight.", "I will.")
    assert (err.turn, err.field) == (0, "turns[0].text")
    assert r"matches the pattern \b\d{3}-\d{4}\b" in err.message
    assert "555-0199" not in err.message


def test_hook_reason_refuses_the_turn(filtered) -> None:
    err = refused(filtered.ws_url, "Hi.", "Fine.", "Hello.", "My PASSWORD is hunter2.")
    assert (err.turn, err.field) == (3, "turns[3].text")
    assert err.message == (
        "turns[3].text was refused by this server's content filter: it reads out a password; "
        "rephrase that line."
    )


def test_crashing_hook_refuses_the_turn_and_logs_the_traceback(filtered, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="vibecast.content_filter"):
        err = refused(filtered.ws_url, "Hi.", "It all went kaboom.")
    assert (err.turn, err.field) == (1, "turns[1].text")
    assert err.message == (
        "the content filter failed on turns[1].text; the server's operator has been told."
    )
    assert "moderation service" not in err.message  # the hook's failure stays in the log
    logged = [r for r in caplog.records if r.name == "vibecast.content_filter"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    failure = logged[0].exc_info[1]
    assert failure is not None
    cause = failure.__cause__
    assert isinstance(cause, RuntimeError) and str(cause) == "the moderation service is down"


def test_append_with_a_listed_word_is_refused_and_the_session_goes_on(filtered) -> None:
    async def go() -> tuple[list[Any], int | None]:
        async with await Client.connect(filtered.ws_url) as client:
            await client.start(
                speakers_of(2),
                [{"speaker": 0, "text": "First."}, {"speaker": 1, "text": "Second."}],
                more=True,
            )
            # Both appends are read in order: the first is refused whole (its clean turn and
            # its more: false too), the second is taken as turns 2 and the end of the script.
            await client.append(
                [{"speaker": 0, "text": "Third."}, {"speaker": 1, "text": "You ass."}], more=False
            )
            await client.append([{"speaker": 0, "text": "Third, kindly."}], more=False)
            got = [m async for m in client]
            return got, client.close_code

    got, close = asyncio.run(go())
    errors = [m for m in got if isinstance(m, Error)]
    assert len(errors) == 1
    err = errors[0]
    assert (err.code, err.fatal, err.turn, err.field) == (
        Code.CONTENT_REJECTED,
        False,
        3,
        "turns[1].text",
    )
    assert err.message.startswith('turns[1].text (turn 3 of the script) contains "ass"')
    assert [m.turns for m in got if isinstance(m, Appended)] == [3]
    spoken = [m.text for m in got if isinstance(m, TurnStart)]
    assert spoken == ["First.", "Second.", "Third, kindly."]
    assert isinstance(got[-1], Done) and got[-1].turns == 3 and close == 1000


@pytest.mark.parametrize(
    ("text", "listed"),
    [
        ("ASS", "ass"),
        ("What an Ass-hat.", "ass"),
        ("(ass)", "ass"),
        ("a FORBIDDEN\n   phrase", "Forbidden phrase"),
        ("forbidden\tPhrase!", "Forbidden phrase"),
    ],
)
def test_listed_words_match_in_any_case_as_whole_words(text: str, listed: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        ContentFilter(str(WORDS)).check([TurnSpec(0, text)])
    assert caught.value.code == Code.CONTENT_REJECTED
    assert f'contains "{listed}"' in caught.value.message


@pytest.mark.parametrize(
    "text",
    [
        "The class will pass the brass exam.",  # 'ass' inside other words
        "Assets, assemblies and mass.",
        "forbiddenphrase",
        "forbidden phrases",  # the phrase, but as part of a longer word
        "phrase forbidden",
        "5555-01999",  # the pattern's \b keeps this from matching \d{3}-\d{4}
    ],
)
def test_near_misses_are_accepted(text: str) -> None:
    ContentFilter(str(WORDS)).check([TurnSpec(0, text)])  # raises if refused


def test_clean_script_with_near_misses_plays_to_done(filtered) -> None:
    turns = [
        {"speaker": 0, "text": "The class will pass the brass exam."},
        {"speaker": 1, "text": "Forbidden phrases are for other servers."},
    ]
    result = asyncio.run(run_session(filtered.ws_url, speakers_of(2), turns))
    assert not [m for m in result.messages if isinstance(m, Error)]
    assert result.done.turns == 2 and result.done.samples > 0 and result.close_code == 1000
    assert result.audio


def test_without_a_filter_nothing_is_refused(server) -> None:
    assert not server.state.sessions.content_filter.enabled
    turns = [
        {"speaker": 0, "text": "You ass, that is a forbidden phrase."},
        {"speaker": 1, "text": "Call 555-0199 with the password, kaboom."},
    ]
    result = asyncio.run(run_session(server.ws_url, speakers_of(2), turns))
    assert not [m for m in result.messages if isinstance(m, Error)]
    assert result.done.turns == 2 and result.close_code == 1000


def test_settings_come_from_the_environment_and_flags() -> None:
    config = load_config(env={"VIBECAST_CONTENT_FILTER_WORDS": str(WORDS)}, flags={})
    assert config.content_filter_words == str(WORDS) and config.content_filter_hook is None
    config = load_config(env={}, flags={"content_filter_hook": HOOK})
    assert config.content_filter_hook == HOOK
    assert ServerConfig().content_filter_words is None  # off by default


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize(
    ("words_text", "hook", "expected"),
    [
        (None, None, "missing.txt': cannot read the file (No such file or directory)."),
        ("# comment\nfine\nre:(unclosed\n", None, "line 3: re:(unclosed is not a valid regular"),
        (None, "no_such_moderation_module:check", "cannot import module 'no_such_moderation"),
    ],
    ids=["missing file", "bad regex", "unimportable hook"],
)
def test_bad_settings_stop_the_server_at_start_up(
    piper,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    words_text: str | None,
    hook: str | None,
    expected: str,
) -> None:
    if hook is not None:
        setting, value = "content_filter_hook", hook
    else:
        words = tmp_path / ("missing.txt" if words_text is None else "words.txt")
        if words_text is not None:
            words.write_text(words_text, "utf-8")
        setting, value = "content_filter_words", str(words)
    config = ServerConfig(host="127.0.0.1", port=0).replace(**{setting: value})
    server = ServerThread(config, backend=piper)
    # uvicorn logs the failed start-up, the ValueError's traceback included, on uvicorn.error,
    # and ends its thread with SystemExit(3), the status `vibecast serve` then exits with.
    lines = _Lines()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(lines)
    ended: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: ended.append(args.exc_value))
    try:
        with pytest.raises(RuntimeError, match="the server did not start"):
            server.start()
    finally:
        uvicorn_log.removeHandler(lines)
    said = f"ValueError: {setting} = {value!r}"
    assert any(said in line and expected in line for line in lines.lines), lines.lines
    assert len(ended) == 1 and isinstance(ended[0], SystemExit) and ended[0].code == 3


@pytest.mark.parametrize(
    ("file_text", "hook", "expected"),
    [
        (b"ok\nbad \xff\n", None, "line 2: byte 0xff is not UTF-8"),
        ("ok\nre:\n", None, "line 2: 're:' has no pattern after it"),
        ("re:x*\n", None, "line 1: re:x* matches empty text, so it would refuse every turn"),
        ("#\n" + "word " * 50 + "\n", None, "line 2: a word or phrase of 249 characters"),
        (None, "test_content_filter", "expected 'module:function'"),
        (None, "test_content_filter:nothing_here", "has no 'nothing_here'"),
        (None, "test_content_filter:HOOK", "'HOOK' is a str, not a function"),
        (None, "test_content_filter:_Lines.emit", "cannot be called with one argument"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting_and_the_problem(
    tmp_path: Path, file_text: str | bytes | None, hook: str | None, expected: str
) -> None:
    words = None
    if file_text is not None:
        path = tmp_path / "words.txt"
        path.write_bytes(file_text if isinstance(file_text, bytes) else file_text.encode())
        words = str(path)
    setting = "content_filter_words" if words else "content_filter_hook"
    with pytest.raises(ValueError) as caught:
        ContentFilter(words, hook)
    assert str(caught.value).startswith(setting + " = ")
    assert expected in str(caught.value)
