"""OpenAI-compatible speech: `POST /v1/audio/speech`, `GET /v1/audio/voices`, `GET /v1/models`.

A request becomes a session like a WebSocket `start` (the same checks, limits, admission queue
and engine loop), asking for 24 kHz PCM, which `formats.Encoder` turns into the response format
as it is made. There is no socket to resume on: a client that goes away cancels its session.

Request fields beyond OpenAI's (docs/openai.md): `voices` gives each speaker of a `Speaker N:`
dialogue its voice, `seed` makes the audio repeatable, `mode` picks a generation mode. Other
unknown fields are ignored, as OpenAI's clients send newer fields than a server may know.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine.script import ScriptError, parse_script
from ..protocol.messages import (
    Audio,
    Code,
    FormatSpec,
    Options,
    ProtocolError,
    SpeakerSpec,
    Start,
    TurnSpec,
)
from .formats import FORMATS, RATE, Encoder
from .headless import messages_of
from .session import Session
from .sessions import Sessions

log = logging.getLogger("vibecast.openai")

# OpenAI's model names, all served by the loaded model.
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's voice names, mapped onto this server's voices in catalogue order.
OPENAI_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
)
STATUS = {
    Code.UNAUTHORIZED: 401,
    Code.TOO_BIG: 413,
    Code.BUSY: 429,
    Code.RATE_LIMITED: 429,
    Code.INTERNAL: 500,
}


class ApiError(Exception):
    """A refused request, in OpenAI's error shape with our message and code."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    @staticmethod
    def of(e: ProtocolError, turns_field: str | None = None) -> ApiError:
        """`turns_field`: what the caller calls the script (the speech API's `input`)."""
        field = e.field
        if turns_field is not None and field is not None and field.startswith("turns"):
            field = turns_field  # the message still names the line
        return ApiError(STATUS.get(Code(e.code), 400), e.code, e.message, field)

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status)


MAX_BRACKETS = 200_000


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; a body over `limit` bytes is refused before it is read."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            415,
            "bad_content_type",
            f"Content-Type is {kind or 'missing'!r}; send the request as application/json.",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_big", f"the body is {declared} bytes; at most {limit} are read.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_big", f"the body is over {limit} bytes; send less.")
    # Millions of tiny containers parse into gigabytes of Python objects, holding the GIL for
    # seconds; a request has a few dozen (brackets in its text count too: the bound leaves room).
    brackets = body.count(b"{") + body.count(b"[")
    if brackets > MAX_BRACKETS:
        raise ApiError(
            400,
            "bad_message",
            f"the body has {brackets} JSON containers ('{{' and '['), over {MAX_BRACKETS}; a "
            "request needs a few dozen.",
        )
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_message", f"the body is not JSON: {e}.") from None
    except RecursionError:  # 100,000 nested brackets: refused, not a crashed request
        raise ApiError(400, "bad_message", "the body nests too deeply to be a request.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_message", "the body must be a JSON object.")
    return data


FILE_FORMATS = {".wav": "wav", ".ogg": "ogg", ".opus": "ogg"}


async def read_form(request: Request, limit: int) -> dict[str, Any]:
    """A multipart body (a job with voice files): the part `request` is the JSON body, and a
    file part `voice_N` is speaker N's voice sample. Its size must be declared, and is bounded
    before anything is read."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise ApiError(411, "length_required", "a multipart body needs a Content-Length.")
    if int(declared) > limit:
        raise ApiError(413, "too_big", f"the body is {declared} bytes; at most {limit} are read.")
    async with request.form(max_files=16, max_fields=16, max_part_size=limit) as form:
        raw = form.get("request")
        if not isinstance(raw, str):
            raise ApiError(
                400,
                "bad_field",
                "the form needs a text part `request` holding the JSON.",
                "request",
            )
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, "bad_message", f"`request` is not JSON: {e}.", "request") from None
        if not isinstance(data, dict) or not isinstance(data.get("speakers"), list):
            raise ApiError(
                400, "bad_field", "`request` must be an object with a speakers list.", "request"
            )
        speakers = data["speakers"]
        for name, value in form.multi_items():
            if name == "request":
                continue
            index = name.removeprefix("voice_")
            if isinstance(value, str) or not index.isdigit() or int(index) >= len(speakers):
                raise ApiError(
                    400,
                    "bad_field",
                    f"form part {name!r}: expected voice_N, a file for speakers[N] "
                    f"(0..{len(speakers) - 1}).",
                    name,
                )
            suffix = "." + (value.filename or "").rsplit(".", 1)[-1].lower()
            if suffix not in FILE_FORMATS:
                raise ApiError(
                    400, "bad_voice_audio", f"{name}: send a .wav, .ogg or .opus file.", name
                )
            speaker = dict(speakers[int(index)]) if isinstance(speakers[int(index)], dict) else {}
            speaker.update(voice_audio=await value.read(), voice_format=FILE_FORMATS[suffix])
            speakers[int(index)] = speaker
    return data


def _field(data: dict[str, Any], name: str, kind: type, required: bool = False) -> Any:
    value = data.get(name)
    if value is None:
        if required:
            raise ApiError(400, "bad_field", f"{name} is required.", name)
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ApiError(400, "bad_field", f"{name} must be a {kind.__name__}.", name)
    return value


class SpeechRequest:
    """The fields of a `POST /v1/audio/speech` body, checked."""

    def __init__(self, data: dict[str, Any], models: list[str], voices: list[str]) -> None:
        self.model = _field(data, "model", str, required=True)
        if self.model not in models:
            raise ApiError(
                404,
                "model_not_found",
                f"model {self.model!r} is not served here; use one of {', '.join(models)} "
                "(GET /v1/models).",
                "model",
            )
        self.input = _field(data, "input", str, required=True)
        if not self.input.strip():
            raise ApiError(400, "bad_field", "input is empty; give the text to speak.", "input")
        self.format = _field(data, "response_format", str) or "mp3"
        if self.format not in FORMATS:
            raise ApiError(
                400,
                "bad_field",
                f"response_format {self.format!r} is not one of {', '.join(FORMATS)}.",
                "response_format",
            )
        self.speed = _field(data, "speed", float) or 1.0
        if not 0.25 <= self.speed <= 4.0:
            raise ApiError(400, "bad_field", "speed must be from 0.25 to 4.0.", "speed")
        self.stream_format = _field(data, "stream_format", str) or "audio"
        if self.stream_format not in ("audio", "sse"):
            raise ApiError(
                400, "bad_field", "stream_format must be 'audio' or 'sse'.", "stream_format"
            )
        _field(data, "instructions", str)  # accepted; no model here takes a style prompt
        self.seed = _field(data, "seed", int)
        self.mode = _field(data, "mode", str)
        voice = _field(data, "voice", str, required=True)
        self.voice = self._voice(voice, voices, "voice")
        extra = data.get("voices")
        if extra is not None and not isinstance(extra, dict | list):
            raise ApiError(
                400,
                "bad_field",
                'voices must map speaker numbers to voices: {"1": "ann", "2": "ben"}, or list '
                "them in speaker order.",
                "voices",
            )
        self.voices = self._speaker_voices(extra or {}, voices)

    @staticmethod
    def _voice(name: Any, voices: list[str], where: str) -> str:
        if not isinstance(name, str):
            raise ApiError(400, "bad_field", f"{where} must be a voice name.", where)
        if name in voices:
            return name
        if name.lower() in OPENAI_VOICES and voices:
            return voices[OPENAI_VOICES.index(name.lower()) % len(voices)]
        known = ", ".join(voices) or "(none)"
        raise ApiError(
            400,
            "unknown_voice",
            f"{where} is {name!r}; this server has {known} (GET /v1/audio/voices), and maps "
            "OpenAI's voice names onto them.",
            where,
        )

    def _speaker_voices(self, given: dict | list, voices: list[str]) -> dict[int, str]:
        items = given.items() if isinstance(given, dict) else enumerate(given)
        out: dict[int, str] = {}
        for key, name in items:
            if not str(key).isdigit():
                raise ApiError(400, "bad_field", f"voices key {key!r} is not a number.", "voices")
            out[int(key)] = self._voice(name, voices, f"voices[{key}]")
        return out

    def start(self) -> Start:
        """The session a WebSocket client would start for this request (pcm at 24 kHz)."""
        lines = [line for line in self.input.splitlines() if line.strip()]
        if lines and lines[0].lstrip().lower().startswith("speaker"):
            try:
                script = parse_script(self.input)
            except ScriptError as e:
                raise ApiError(400, "bad_field", f"input: {e}", "input") from None
            # Numbers as written map to speakers 0, 1, ... (engine/script.py); voices are keyed
            # by the numbers as written, so a dialogue reads "Speaker 1" -> voices["1"].
            written = sorted({int(_number(line)) for line in lines})
            turns = [TurnSpec(line.speaker, line.text) for line in script]
            speakers = [SpeakerSpec(voice=self.voices.get(n, self.voice)) for n in written]
        else:
            turns = [TurnSpec(0, line.strip()) for line in lines]
            speakers = [SpeakerSpec(voice=self.voice)]
        return Start(
            speakers=speakers,
            turns=turns,
            format=FormatSpec("pcm_s16le", RATE, None, 20),
            options=Options(seed=self.seed, mode=self.mode),
        )


def _number(line: str) -> str:
    return line.split(":", 1)[0].split()[-1]


async def pcm_of(hub: Sessions, session: Session) -> AsyncIterator[bytes]:
    """The session's audio as 16-bit PCM, as it is made (headless.messages_of)."""
    async for msg in messages_of(hub, session):
        if isinstance(msg, Audio) and msg.pcm:
            yield msg.pcm


def speech_body(
    hub: Sessions, session: Session, req: SpeechRequest, chars: int
) -> Callable[[], AsyncIterator[bytes]]:
    async def audio() -> AsyncIterator[bytes]:
        encoder = Encoder(req.format, req.speed)
        try:
            async for pcm in pcm_of(hub, session):
                if out := encoder.push(pcm):
                    yield out
            if out := encoder.finish():
                yield out
        except ProtocolError as e:  # headers are sent: the body just ends; the log says why
            log.warning("speech for %s ended early: %s %s", session.id, e.code, e.message)

    async def sse() -> AsyncIterator[bytes]:
        encoder = Encoder(req.format, req.speed)
        made = 0

        def event(data: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        def delta(out: bytes) -> bytes:
            return event({"type": "speech.audio.delta", "audio": base64.b64encode(out).decode()})

        try:
            async for pcm in pcm_of(hub, session):
                made += len(pcm) // 2
                if out := encoder.push(pcm):
                    yield delta(out)
            if out := encoder.finish():
                yield delta(out)
        except ProtocolError as e:
            yield event({"type": "error", "error": {"code": e.code, "message": e.message}})
            return
        frames = made // (RATE // 50)  # output counted in 20 ms frames of audio
        usage = {"input_tokens": chars, "output_tokens": frames, "total_tokens": chars + frames}
        yield event({"type": "speech.audio.done", "usage": usage})

    return sse if req.stream_format == "sse" else audio


def models_body(name: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "vibecast"}
            for m in (name, *MODEL_ALIASES)
        ],
    }


def speech_response(req: SpeechRequest, body: Callable[[], AsyncIterator[bytes]]) -> Response:
    if req.stream_format == "sse":
        return StreamingResponse(body(), media_type="text/event-stream")
    return StreamingResponse(body(), media_type=FORMATS[req.format].media_type)
