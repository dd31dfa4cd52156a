"""The `vibecast.v1` messages: typed classes, msgpack encoding, and validation.

Every frame is a msgpack map with a string `type`. Parsing a client frame either returns one of
the client message classes or raises `ProtocolError` whose message names the field, the rule
and the fix. Policy limits (how many speakers or characters) are the server's to check; this
module checks shape and domain only. Server messages parse leniently: unknown fields are
ignored and unknown types come back as `Unknown`, so old clients keep working.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

PROTOCOL = "vibecast.v1"


class Code(StrEnum):
    BAD_MESSAGE = "bad_message"
    BAD_FIELD = "bad_field"
    TOO_MANY_SPEAKERS = "too_many_speakers"
    TOO_LONG = "too_long"
    TOO_BIG = "too_big"
    UNKNOWN_VOICE = "unknown_voice"
    BAD_VOICE_AUDIO = "bad_voice_audio"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    UNKNOWN_SESSION = "unknown_session"
    BUSY = "busy"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    IDLE_TIMEOUT = "idle_timeout"
    INTERNAL = "internal"
    CONTENT_REJECTED = "content_rejected"  # never fatal: refused before any work, no close code


# WebSocket close code sent after a fatal error with this code.
CLOSE_CODE = {
    Code.TOO_BIG: 1009,
    Code.BUSY: 1013,
    Code.RATE_LIMITED: 1013,
    Code.INTERNAL: 1011,
    Code.UNAUTHORIZED: 1008,
    Code.IDLE_TIMEOUT: 1008,
}


class ProtocolError(Exception):
    """A frame or request the server refuses; becomes an `error` message."""

    def __init__(
        self,
        code: Code,
        message: str,
        *,
        field: str | None = None,
        turn: int | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.turn = turn
        self.fatal = fatal

    def to_message(self) -> Error:
        return Error(self.code, self.message, self.fatal, self.turn, self.field)

    @property
    def close_code(self) -> int:
        return CLOSE_CODE.get(self.code, 1008)


# -- message classes -------------------------------------------------------------------------


class Message:
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue  # optional fields are left out rather than sent as nil
            out[f.name] = _plain(value)
        return out

    def pack(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, StrEnum):
        return str(value)
    return value


# client -> server


@dataclass
class SpeakerSpec:
    voice: str | None = None
    voice_audio: bytes | None = None
    voice_format: str | None = None
    name: str | None = None


@dataclass
class TurnSpec:
    speaker: int
    text: str
    stream: bool | None = None
    """True: the turn is open, `text` is only its beginning and `text` messages carry the rest
    (None, the same as False, keeps the field off the wire)."""


@dataclass
class FormatSpec:
    codec: str = "opus"
    sample_rate: int | None = None
    bitrate: int | None = None
    frame_ms: int | None = None


@dataclass
class Options:
    seed: int | None = None
    cfg_scale: float | None = None
    steps: int | None = None
    mode: str | None = None
    frames_per_turn: int | None = None
    from_turn: int | None = None


@dataclass
class Start(Message):
    type: ClassVar[str] = "start"
    speakers: list[SpeakerSpec]
    turns: list[TurnSpec]
    more: bool = False
    format: FormatSpec | None = None
    options: Options | None = None
    request_id: str | None = None


@dataclass
class Append(Message):
    type: ClassVar[str] = "append"
    turns: list[TurnSpec]
    more: bool = False


@dataclass
class Text(Message):
    """More text of the open turn (one opened with `stream: true`); `final`: its text is
    complete."""

    type: ClassVar[str] = "text"
    turn: int
    text: str
    final: bool = False


@dataclass
class Playback(Message):
    type: ClassVar[str] = "playback"
    played_ms: int


@dataclass
class Cancel(Message):
    type: ClassVar[str] = "cancel"


@dataclass
class Resume(Message):
    type: ClassVar[str] = "resume"
    session_id: str
    resume_token: str
    last_seq: int


# server -> client


@dataclass
class Ready(Message):
    type: ClassVar[str] = "ready"
    session_id: str
    resume_token: str
    model: dict[str, Any]
    format: dict[str, Any]
    speakers: list[dict[str, Any]]
    limits: dict[str, Any]
    protocol: str = PROTOCOL
    request_id: str | None = None
    turns: int | None = None


@dataclass
class Queued(Message):
    type: ClassVar[str] = "queued"
    position: int
    eta_s: float | None = None


@dataclass
class Appended(Message):
    type: ClassVar[str] = "appended"
    turns: int


@dataclass
class TurnStart(Message):
    type: ClassVar[str] = "turn_start"
    turn: int
    speaker: int
    text: str
    pts: int
    streamed: bool | None = None  # a turn whose text streamed in: `text` is what was known then


@dataclass
class Audio(Message):
    type: ClassVar[str] = "audio"
    seq: int
    turn: int
    pts: int
    samples: int
    packets: list[bytes] | None = None
    pcm: bytes | None = None


@dataclass
class TurnEnd(Message):
    type: ClassVar[str] = "turn_end"
    turn: int
    samples: int
    capped: bool | None = None  # the turn reached its length cap before the model ended it
    text: str | None = None  # a streamed turn's complete text


@dataclass
class Progress(Message):
    type: ClassVar[str] = "progress"
    generated_ms: int
    sent_ms: int
    turns_done: int
    turns_total: int
    rtf: float
    lead_ms: int | None = None


@dataclass
class Error(Message):
    type: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False
    turn: int | None = None
    field: str | None = None


@dataclass
class Cancelled(Message):
    type: ClassVar[str] = "cancelled"
    last_seq: int


@dataclass
class Done(Message):
    type: ClassVar[str] = "done"
    samples: int
    duration_ms: int
    turns: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Unknown:
    """A server message type this client does not know (from a newer server)."""

    type: str
    fields: dict[str, Any]


ClientMessage = Start | Append | Text | Playback | Cancel | Resume
ServerMessage = (
    Ready | Queued | Appended | TurnStart | Audio | TurnEnd | Progress | Error | Cancelled | Done
)

# -- validation helpers ------------------------------------------------------------------------

_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    bytes: "binary (msgpack bin)",
    list: "a list",
    dict: "a map",
}


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    for t in (bool, int, float, str, bytes, list, dict):
        if isinstance(value, t):
            return _NAMES[t].split(" ", 1)[1]
    return type(value).__name__


def _bad(path: str, rule: str, value: Any = dataclasses.MISSING) -> ProtocolError:
    got = "" if value is dataclasses.MISSING else f" (got {_kind(value)})"
    return ProtocolError(Code.BAD_FIELD, f"{path} {rule}{got}.", field=path)


def _get(obj: dict[str, Any], key: str, kind: type, path: str, required: bool = False) -> Any:
    full = f"{path}.{key}" if path else key
    if key not in obj or obj[key] is None:
        if required:
            raise ProtocolError(Code.BAD_FIELD, f"{full} is required and missing.", field=full)
        return None
    value = obj[key]
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _bad(full, f"must be {_NAMES[kind]}", value)
    return value


def _int_in(
    obj: dict[str, Any], key: str, path: str, lo: int, hi: int, required: bool = False
) -> int | None:
    value = _get(obj, key, int, path, required)
    if value is not None and not lo <= value <= hi:
        full = f"{path}.{key}" if path else key
        raise ProtocolError(
            Code.BAD_FIELD, f"{full} must be between {lo} and {hi} (got {value}).", field=full
        )
    return value


def _map(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, "must be a map", value)
    return value


# C0 and C1 control characters, DEL included; tab and line breaks are ordinary in a script.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MAX_NAME_CHARS = 100  # speaker names and voice names
MAX_REQUEST_ID_CHARS = 200
MAX_PLAYED_MS = 2**31 - 1  # ~24.8 days, far past any session; keeps the server's sums in range


def _no_control(text: str, where: str, turn: int | None = None, label: str | None = None) -> None:
    """`label` (default: `where`) is how the message names the text."""
    found = _CONTROL.search(text)
    if found:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"{label or where} contains the control character U+{ord(found.group()):04X} at "
            f"position {found.start()}; remove control characters (tabs and line breaks are "
            "fine).",
            field=where,
            turn=turn,
        )


def _short_name(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = _get(obj, key, str, where)
    if value is not None:
        if len(value) > MAX_NAME_CHARS:
            raise _bad(f"{where}.{key}", f"must be at most {MAX_NAME_CHARS} characters")
        _no_control(value, f"{where}.{key}")
    return value


def _turns(
    obj: dict[str, Any], path: str, n_speakers: int | None, first: int = 0
) -> list[TurnSpec]:
    raw = _get(obj, "turns", list, path, required=True)
    turns = []
    for i, item in enumerate(raw):
        where = f"turns[{i}]"
        t = _map(item, where)
        speaker = _get(t, "speaker", int, where, required=True)
        if speaker < 0 or (n_speakers is not None and speaker >= n_speakers):
            limit = f"0..{n_speakers - 1}" if n_speakers else "a speaker index"
            raise ProtocolError(
                Code.BAD_FIELD,
                f"{where}.speaker is {speaker}, but it must index the session's speakers "
                f"({limit}).",
                field=f"{where}.speaker",
                turn=first + i,
            )
        stream = bool(_get(t, "stream", bool, where))
        if stream and i != len(raw) - 1:
            # One open turn at a time, and nothing after it: the turns after an open one would
            # have to wait for text that has not come yet.
            raise ProtocolError(
                Code.BAD_FIELD,
                f"{where}.stream is true, but only the last turn of a message may be open; "
                "send the turns after it in an append once its text is final.",
                field=f"{where}.stream",
                turn=first + i,
            )
        text = _get(t, "text", str, where, required=True)
        if not stream and not text.strip():
            raise ProtocolError(
                Code.BAD_FIELD,
                f"{where}.text is empty; every turn needs something to say (drop the turn "
                "instead).",
                field=f"{where}.text",
                turn=first + i,
            )
        _no_control(text, f"{where}.text", first + i)
        turns.append(TurnSpec(speaker, text, True if stream else None))
    return turns


def _text(m: dict[str, Any]) -> Text:
    turn = _int_in(m, "turn", "text", 0, 2**31, required=True)
    assert turn is not None
    text = _get(m, "text", str, "text", required=True)
    final = bool(_get(m, "final", bool, "text"))
    if not text and not final:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"text.text is empty for turn {turn}; send some text, or final: true to end the turn.",
            field="text.text",
            turn=turn,
        )
    _no_control(text, "text.text", turn, f"text.text (turn {turn})")
    return Text(turn, text, final)


def _more(obj: dict[str, Any]) -> bool:
    more = _get(obj, "more", bool, "")
    return bool(more)


VOICE_FORMATS = ("wav", "ogg")
CODECS = ("opus", "pcm_s16le")


def parse_start(m: dict[str, Any]) -> Start:
    raw_speakers = _get(m, "speakers", list, "", required=True)
    if not raw_speakers:
        raise ProtocolError(
            Code.BAD_FIELD, "speakers is empty; give at least one speaker.", field="speakers"
        )
    speakers = []
    for i, item in enumerate(raw_speakers):
        where = f"speakers[{i}]"
        s = _map(item, where)
        name = _short_name(s, "name", where)
        voice = _short_name(s, "voice", where)
        audio = _get(s, "voice_audio", bytes, where)
        fmt = _get(s, "voice_format", str, where)
        if (voice is None) == (audio is None):
            raise ProtocolError(
                Code.BAD_FIELD,
                f"{where} needs exactly one of voice (a voice name from GET /v1/voices) or "
                "voice_audio (wav or ogg bytes).",
                field=f"{where}.voice",
            )
        if fmt is not None and fmt not in VOICE_FORMATS:
            raise _bad(f"{where}.voice_format", "must be 'wav' or 'ogg'")
        speakers.append(SpeakerSpec(voice, audio, fmt, name))
    turns = _turns(m, "", len(speakers))
    more = _more(m)
    if not turns and not more:
        raise ProtocolError(
            Code.BAD_FIELD,
            "turns is empty and more is false: there is nothing to say. Send at least one "
            "turn, or set more: true and add turns with append.",
            field="turns",
        )

    fmt_spec = None
    if m.get("format") is not None:
        f = _map(m["format"], "format")
        codec = _get(f, "codec", str, "format") or "opus"
        if codec not in CODECS:
            raise _bad("format.codec", "must be 'opus' or 'pcm_s16le'")
        rate = _get(f, "sample_rate", int, "format")
        if rate is not None:
            allowed = (8000, 12000, 16000, 24000, 48000)
            if codec == "opus" and rate not in allowed:
                raise _bad(
                    "format.sample_rate",
                    "must be one of 8000, 12000, 16000, 24000 or 48000 for opus",
                )
            if codec == "pcm_s16le" and not 8000 <= rate <= 48000:
                raise _bad("format.sample_rate", "must be between 8000 and 48000")
        bitrate = _int_in(f, "bitrate", "format", 6000, 256000)
        frame_ms = _get(f, "frame_ms", int, "format")
        if frame_ms is not None and frame_ms not in (10, 20, 40, 60):
            raise _bad("format.frame_ms", "must be 10, 20, 40 or 60")
        fmt_spec = FormatSpec(codec, rate, bitrate, frame_ms)

    options = None
    if m.get("options") is not None:
        o = _map(m["options"], "options")
        cfg = _get(o, "cfg_scale", float, "options")
        if cfg is not None and not 0.0 <= cfg <= 20.0:
            raise _bad("options.cfg_scale", "must be between 0 and 20")
        options = Options(
            seed=_int_in(o, "seed", "options", 0, 2**63 - 1),
            cfg_scale=cfg,
            steps=_int_in(o, "steps", "options", 1, 100),
            mode=_get(o, "mode", str, "options"),
            frames_per_turn=_int_in(o, "frames_per_turn", "options", 1, 10_000),
            from_turn=_int_in(o, "from_turn", "options", 0, 2**31),
        )
    request_id = _get(m, "request_id", str, "")
    if request_id is not None and (
        len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable()
    ):
        raise _bad(
            "request_id",
            f"must be at most {MAX_REQUEST_ID_CHARS} printable characters (no line breaks, tabs "
            "or other control characters; it is written to the server's log)",
        )
    return Start(speakers, turns, more, fmt_spec, options, request_id)


def parse_client(
    data: bytes, n_speakers: int | None = None, turns_before: int = 0
) -> ClientMessage:
    """Decode and validate one client frame.

    `n_speakers` (the session's speaker count) lets `append` check speaker indices, and
    `turns_before` numbers its turns in the session's script for error messages.
    """
    m = unpack(data)
    kind = m["type"]
    if kind == "start":
        return parse_start(m)
    if kind == "append":
        return Append(_turns(m, "", n_speakers, turns_before), _more(m))
    if kind == "text":
        return _text(m)
    if kind == "playback":
        played = _int_in(m, "played_ms", "", 0, MAX_PLAYED_MS, required=True)
        return Playback(played)  # type: ignore[arg-type]
    if kind == "cancel":
        return Cancel()
    if kind == "resume":
        return Resume(
            _get(m, "session_id", str, "", required=True),
            _get(m, "resume_token", str, "", required=True),
            _int_in(m, "last_seq", "", -1, 2**62, required=True),  # type: ignore[arg-type]
        )
    raise ProtocolError(
        Code.BAD_MESSAGE,
        f"unknown message type {kind!r}; a client sends start, append, text, playback, cancel "
        "or resume.",
        field="type",
    )


# Bounds on what one frame may hold, checked while it is unpacked so that a frame of 10 MB made of
# millions of tiny containers is refused after a few thousand of them instead of being built
# (10 M empty maps took ~1.5 s and ~700 MB). The largest legitimate frame is a `start` with
# `max_turns` turns: a list of 10,000 maps of two entries.
MAX_CONTAINER_LEN = 20_000  # entries of one list or map
MAX_ITEMS = 100_000  # entries of all lists and maps of one frame together


class _Budget:
    """Counts the entries of every list and map msgpack builds; raises past MAX_ITEMS."""

    def __init__(self) -> None:
        self.items = 0

    def seen(self, container: Any) -> Any:
        self.items += len(container)
        if self.items > MAX_ITEMS:
            raise _TooMany
        return container


class _TooMany(Exception):
    pass


def unpack(data: bytes) -> dict[str, Any]:
    """A msgpack map with a string `type`, or ProtocolError(bad_message)."""
    budget = _Budget()
    try:
        m = msgpack.unpackb(
            data,
            raw=False,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=0,
            list_hook=budget.seen,
            object_hook=budget.seen,
        )
    except _TooMany:
        raise ProtocolError(
            Code.BAD_MESSAGE,
            f"the frame holds more than {MAX_ITEMS} list and map entries; no vibecast.v1 "
            "message needs that many. Split the script with append.",
        ) from None
    except Exception as e:  # msgpack raises several unrelated classes for bad input
        raise ProtocolError(
            Code.BAD_MESSAGE,
            f"the frame is not valid msgpack, or holds a list or map of more than "
            f"{MAX_CONTAINER_LEN} entries ({type(e).__name__}); send one msgpack map per "
            "binary frame.",
        ) from None
    if not isinstance(m, dict):
        raise ProtocolError(
            Code.BAD_MESSAGE,
            f"the frame holds msgpack {_kind(m)}, not a map; send a map with a 'type' field.",
        )
    if not isinstance(m.get("type"), str):
        raise ProtocolError(
            Code.BAD_MESSAGE,
            "the map has no string 'type' field; every message names its type.",
            field="type",
        )
    return m


_SERVER_TYPES: dict[str, type[Message]] = {
    c.type: c
    for c in (Ready, Queued, Appended, TurnStart, Audio, TurnEnd, Progress, Error, Cancelled, Done)
}


def parse_server(data: bytes) -> ServerMessage | Unknown:
    """Decode a server frame for a client: unknown fields are dropped, unknown types kept."""
    m = unpack(data)
    cls = _SERVER_TYPES.get(m["type"])
    if cls is None:
        return Unknown(m["type"], m)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in m.items() if k in names})  # type: ignore[return-value]
