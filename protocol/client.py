"""An asyncio client for vibecast.v1, for apps, `vibecast say`, `vibecast bench` and the tests.

async with await Client.connect("ws://127.0.0.1:8000/v1/stream") as client:
    ready = await client.start(speakers=[{"voice": "joe"}], turns=[{"speaker": 0, "text": "Hi."}])
    async for message in client:
        ...  # TurnStart, Audio, TurnEnd, Progress, Done (then the server closes)
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from .messages import (
    PROTOCOL,
    Append,
    Cancel,
    Error,
    FormatSpec,
    Message,
    Options,
    Playback,
    Queued,
    Ready,
    Resume,
    ServerMessage,
    SpeakerSpec,
    Start,
    Text,
    TurnSpec,
    Unknown,
    parse_server,
)


class ServerError(Exception):
    """The server answered with an `error` message."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error

    @property
    def code(self) -> str:
        return self.error.code


class Closed(Exception):
    """The connection closed before the expected message."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


def _speaker(s: SpeakerSpec | Mapping[str, Any]) -> SpeakerSpec:
    return s if isinstance(s, SpeakerSpec) else SpeakerSpec(**s)


def _turn(t: TurnSpec | Mapping[str, Any]) -> TurnSpec:
    return t if isinstance(t, TurnSpec) else TurnSpec(**t)


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.turns = 0
        """Turns of the session's script sent so far (from `ready` on, counting each append's),
        an open one included: the next turn appended is turn `turns`."""

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None = None,
        open_timeout: float = 30.0,
        max_size: int | None = 64 * 1024 * 1024,
    ) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(
            url,
            subprotocols=[Subprotocol(PROTOCOL)],
            additional_headers=headers,
            open_timeout=open_timeout,
            max_size=max_size,
            compression=None,
        )
        return cls(ws)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.ws.close()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        await self.ws.send(message.pack())

    async def start(
        self,
        speakers: Sequence[SpeakerSpec | Mapping[str, Any]],
        turns: Sequence[TurnSpec | Mapping[str, Any]],
        more: bool = False,
        format: FormatSpec | Mapping[str, Any] | None = None,
        options: Options | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        on_queued: Callable[[Queued], Awaitable[None] | None] | None = None,
    ) -> Ready:
        """Send `start` and wait for `ready` (reporting `queued` updates on the way)."""
        fmt = FormatSpec(**format) if isinstance(format, Mapping) else format
        opts = Options(**options) if isinstance(options, Mapping) else options
        specs = [_turn(t) for t in turns]
        await self.send(Start([_speaker(s) for s in speakers], specs, more, fmt, opts, request_id))
        ready = await self._until_ready(on_queued)
        self.turns = ready.turns if ready.turns is not None else len(specs)
        return ready

    async def resume(self, session_id: str, resume_token: str, last_seq: int) -> Ready:
        """Continue a session after a dropped socket; messages after `last_seq` follow `ready`."""
        await self.send(Resume(session_id, resume_token, last_seq))
        ready = await self._until_ready(None)
        self.turns = ready.turns or 0
        return ready

    async def _until_ready(self, on_queued: Callable[[Queued], Any] | None) -> Ready:
        while True:
            msg = await self.recv()
            if isinstance(msg, Ready):
                return msg
            if isinstance(msg, Error):
                raise ServerError(msg)
            if isinstance(msg, Queued) and on_queued is not None:
                result = on_queued(msg)
                if result is not None:
                    await result

    async def append(
        self, turns: Sequence[TurnSpec | Mapping[str, Any]], more: bool = False
    ) -> None:
        specs = [_turn(t) for t in turns]
        await self.send(Append(specs, more))
        self.turns += len(specs)

    async def stream_text(
        self,
        pieces: AsyncIterable[str] | Iterable[str],
        speaker: int = 0,
        more: bool = True,
    ) -> int:
        """Speak text as it is produced (an LLM's reply, say): open a turn for `speaker` with an
        `append`, send each piece in a `text` message as it comes, then `final: true`; returns
        the turn's index. The session must have been started with `more: true`. `more`: turns
        may follow this one (False: the script ends with it).

        Pieces are joined exactly as given (split anywhere, mid-word too). Nothing answers a
        piece unless it is refused: errors arrive among the messages the caller reads, which it
        should be doing meanwhile (audio comes while the text still does). The turn is ended
        even when `pieces` raises, so what came is spoken and the script can go on."""
        turn = self.turns
        await self.append([TurnSpec(speaker, "", stream=True)], more)
        try:
            if isinstance(pieces, AsyncIterable):
                async for piece in pieces:
                    await self._piece(turn, piece)
            else:
                for piece in pieces:
                    await self._piece(turn, piece)
        finally:
            if self.ws.close_code is None:
                await self.send(Text(turn, "", final=True))
        return turn

    async def _piece(self, turn: int, piece: str) -> None:
        if piece:  # an empty piece says nothing, and only a final one may be empty
            await self.send(Text(turn, piece))

    async def playback(self, played_ms: int) -> None:
        await self.send(Playback(int(played_ms)))

    async def cancel(self) -> None:
        await self.send(Cancel())

    # -- receiving -------------------------------------------------------------------------------

    async def recv(self) -> ServerMessage | Unknown:
        try:
            data = await self.ws.recv()
        except websockets.ConnectionClosed as e:
            rcvd = e.rcvd
            raise Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from None
        if isinstance(data, str):
            raise ValueError("the server sent a text frame; vibecast.v1 uses binary frames only")
        return parse_server(data)

    def __aiter__(self) -> AsyncIterator[ServerMessage | Unknown]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[ServerMessage | Unknown]:
        while True:
            try:
                yield await self.recv()
            except Closed:
                return
