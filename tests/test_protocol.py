"""Message classes, msgpack encoding and validation of client frames."""

from __future__ import annotations

import msgpack
import pytest

from vibecast.protocol import (
    Append,
    Audio,
    Cancel,
    Done,
    Playback,
    ProtocolError,
    Ready,
    Resume,
    Start,
    parse_client,
    parse_server,
)
from vibecast.protocol.messages import Text, TurnEnd, TurnStart, Unknown


def pack(**m) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def ok_turn() -> dict:
    return {"speaker": 0, "text": "Hi."}


def ok_start(**over):
    m = {"type": "start", "speakers": [{"voice": "joe"}], "turns": [{"speaker": 0, "text": "Hi."}]}
    m.update(over)
    return m


def test_start_round_trip_with_every_field() -> None:
    start = parse_client(
        pack(
            **ok_start(
                speakers=[
                    {"voice": "joe", "name": "Ann"},
                    {"voice_audio": b"RIFF", "voice_format": "wav"},
                ],
                turns=[{"speaker": 1, "text": "Hello", "extra": "ignored"}],
                more=True,
                format={"codec": "pcm_s16le", "sample_rate": 16000},
                options={"seed": 7, "cfg_scale": 1.5, "steps": 10, "mode": "turns"},
                request_id="r1",
                unknown_field={"nested": [1, 2]},
            )
        )
    )
    assert isinstance(start, Start)
    assert start.speakers[0].name == "Ann" and start.speakers[1].voice_audio == b"RIFF"
    assert start.turns[0].speaker == 1 and start.more is True
    assert start.format is not None and start.options is not None
    assert start.format.codec == "pcm_s16le" and start.format.sample_rate == 16000
    assert start.options.seed == 7 and start.options.cfg_scale == 1.5
    again = parse_client(start.pack())
    assert again == start


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    [
        (b"", "bad_message", None),
        (b"\x92\x01", "bad_message", None),  # truncated msgpack
        (msgpack.packb("start"), "bad_message", None),
        (pack(kind="start"), "bad_message", "type"),
        (pack(type=5), "bad_message", "type"),
        (pack(type="start"), "bad_field", "speakers"),
        (pack(**ok_start(speakers=[])), "bad_field", "speakers"),
        (pack(**ok_start(speakers=[{}])), "bad_field", "speakers[0].voice"),
        (
            pack(**ok_start(speakers=[{"voice": "a", "voice_audio": b"x"}])),
            "bad_field",
            "speakers[0].voice",
        ),
        (pack(**ok_start(speakers=[{"voice": 3}])), "bad_field", "speakers[0].voice"),
        (
            pack(**ok_start(speakers=[{"voice": "a", "voice_format": "mp3"}])),
            "bad_field",
            "speakers[0].voice_format",
        ),
        (pack(**ok_start(speakers=["joe"])), "bad_field", "speakers[0]"),
        (pack(**ok_start(turns=[{"speaker": True, "text": "x"}])), "bad_field", "turns[0].speaker"),
        (pack(**ok_start(turns=[{"speaker": -1, "text": "x"}])), "bad_field", "turns[0].speaker"),
        (pack(**ok_start(turns=[{"speaker": 0}])), "bad_field", "turns[0].text"),
        (pack(**ok_start(turns=[])), "bad_field", "turns"),
        (
            pack(**ok_start(format={"codec": "opus", "sample_rate": 44100})),
            "bad_field",
            "format.sample_rate",
        ),
        (pack(**ok_start(format={"frame_ms": 25})), "bad_field", "format.frame_ms"),
        (pack(**ok_start(format={"bitrate": 1})), "bad_field", "format.bitrate"),
        (pack(**ok_start(options={"steps": 0})), "bad_field", "options.steps"),
        (pack(**ok_start(options={"cfg_scale": "high"})), "bad_field", "options.cfg_scale"),
        (pack(**ok_start(options={"seed": -1})), "bad_field", "options.seed"),
        (pack(**ok_start(request_id="x" * 500)), "bad_field", "request_id"),
        (pack(type="playback"), "bad_field", "played_ms"),
        (pack(type="playback", played_ms=-5), "bad_field", "played_ms"),
        (pack(type="resume", session_id="s", resume_token="t"), "bad_field", "last_seq"),
        (pack(type="append", turns="nope"), "bad_field", "turns"),
        (pack(type="text", text="Hi"), "bad_field", "text.turn"),
        (pack(type="text", turn=-1, text="Hi"), "bad_field", "text.turn"),
        (pack(type="text", turn=True, text="Hi"), "bad_field", "text.turn"),
        (pack(type="text", turn=0), "bad_field", "text.text"),
        (pack(type="text", turn=0, text=5), "bad_field", "text.text"),
        (pack(type="text", turn=0, text=""), "bad_field", "text.text"),
        (pack(type="text", turn=0, text="Hi", final="yes"), "bad_field", "text.final"),
        (pack(type="text", turn=0, text="a\x00b"), "bad_field", "text.text"),
        (
            pack(**ok_start(turns=[{"speaker": 0, "text": "", "stream": True}, ok_turn()])),
            "bad_field",
            "turns[0].stream",
        ),
        (
            pack(**ok_start(turns=[{"speaker": 0, "text": "x", "stream": "yes"}])),
            "bad_field",
            "turns[0].stream",
        ),
        (
            pack(**ok_start(turns=[{"speaker": 0, "text": "", "stream": False}])),
            "bad_field",
            "turns[0].text",
        ),
        (
            pack(**ok_start(turns=[{"speaker": 0, "text": "\x1b[2J", "stream": True}])),
            "bad_field",
            "turns[0].text",
        ),
    ],
)
def test_bad_client_frames(frame: bytes, code: str, field: str | None) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client(frame)
    assert (info.value.code, info.value.field) == (code, field)
    assert not info.value.fatal
    assert info.value.message.endswith(".")


def test_empty_turns_are_fine_when_more_will_come() -> None:
    start = parse_client(pack(**ok_start(turns=[], more=True)))
    assert isinstance(start, Start)
    assert start.turns == [] and start.more


def test_append_checks_speaker_against_the_session_and_numbers_turns() -> None:
    frame = pack(type="append", turns=[{"speaker": 0, "text": "a"}, {"speaker": 3, "text": "b"}])
    with pytest.raises(ProtocolError) as info:
        parse_client(frame, n_speakers=2, turns_before=10)
    assert info.value.turn == 11 and info.value.field == "turns[1].speaker"
    assert isinstance(parse_client(pack(type="append", turns=[], more=False), 2), Append)


def test_small_client_messages() -> None:
    assert parse_client(pack(type="cancel")) == Cancel()
    assert parse_client(pack(type="playback", played_ms=1200)) == Playback(1200)
    assert parse_client(
        pack(type="resume", session_id="a", resume_token="b", last_seq=4)
    ) == Resume("a", "b", 4)


def test_server_messages_parse_leniently() -> None:
    audio = Audio(3, 1, 960, 960, packets=[b"\x01\x02"])
    data = msgpack.packb({**audio.to_dict(), "future_field": 1})
    assert parse_server(data) == audio
    assert isinstance(parse_server(pack(type="something_new", x=1)), Unknown)
    done = Done(100, 2, 1, {"ttfa_ms": 5})
    assert parse_server(done.pack()) == done


def test_optional_fields_are_left_out_not_nil() -> None:
    ready = Ready("s", "t", {}, {}, [], {})
    assert "request_id" not in ready.to_dict()
    audio = Audio(0, 0, 0, 960, packets=[b"x"]).to_dict()
    assert "pcm" not in audio and isinstance(audio["packets"][0], bytes)


def test_a_turn_may_open_with_stream_and_text_messages_carry_the_rest() -> None:
    frame = pack(**ok_start(turns=[ok_turn(), {"speaker": 0, "text": "", "stream": True}]))
    start = parse_client(frame)
    assert isinstance(start, Start)
    assert [t.stream for t in start.turns] == [None, True] and start.turns[1].text == ""
    assert "stream" not in start.to_dict()["turns"][0]  # left off the wire unless true
    assert parse_client(start.pack()) == start
    # An append may open one too; its text so far may be blank: more of it follows.
    append = parse_client(pack(type="append", turns=[{"speaker": 0, "text": " ", "stream": True}]))
    assert isinstance(append, Append) and append.turns[0].stream is True

    assert parse_client(pack(type="text", turn=3, text="mid-wo")) == Text(3, "mid-wo", False)
    final = parse_client(pack(type="text", turn=3, text="", final=True))
    assert final == Text(3, "", True)  # empty only with final
    assert parse_client(Text(7, "rd.\tand\n more", True).pack()) == Text(7, "rd.\tand\n more", True)


def test_a_bad_text_piece_names_its_turn() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client(pack(type="text", turn=4, text="ok\x07"))
    assert (info.value.field, info.value.turn) == ("text.text", 4)
    assert info.value.message.startswith("text.text (turn 4) contains the control character U+0007")
    with pytest.raises(ProtocolError) as info:
        parse_client(pack(type="unheard"))
    assert "text" in info.value.message  # the list of what a client sends


def test_streamed_turn_fields_of_server_messages() -> None:
    start = TurnStart(2, 1, "Hello th", 960, streamed=True)
    assert parse_server(start.pack()) == start
    end = TurnEnd(2, 4800, text="Hello there.")
    assert parse_server(end.pack()) == end
    plain = TurnStart(0, 0, "Hi.", 0).to_dict()
    assert "streamed" not in plain and "text" not in TurnEnd(0, 960).to_dict()
