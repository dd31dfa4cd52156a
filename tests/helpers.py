"""Helpers the tests share: run a session over a real WebSocket, decode its audio."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from vibecast.bench import DIALOGUE  # 4 speakers, 8 turns
from vibecast.protocol import PROTOCOL, Audio, Client, Done, Error, Progress, Ready, parse_server
from vibecast.protocol.opus import OpusDecoder

VOICES = ["joe", "joe-high", "joe-deep", "joe-bright"]
SUBPROTOCOLS = [Subprotocol(PROTOCOL)]


def drain(runner: Any) -> list[Any]:
    """Every event of an engine runner, run unit by unit to its end (no engine loop)."""
    events: list[Any] = []
    while (unit := runner.run()) is not None:
        events += unit
    return events


async def recv_message(ws: ClientConnection) -> Any:
    """The next server message on a raw websockets connection."""
    data = await ws.recv()
    assert isinstance(data, bytes), "vibecast.v1 sends binary frames only"
    return parse_server(data)


def turns_of(dialogue: list[tuple[int, str]] = DIALOGUE) -> list[dict[str, Any]]:
    return [{"speaker": s, "text": t} for s, t in dialogue]


def speakers_of(n: int = 4) -> list[dict[str, Any]]:
    return [{"voice": VOICES[i % len(VOICES)], "name": f"S{i}"} for i in range(n)]


@dataclass
class SessionResult:
    ready: Ready
    messages: list[Any] = field(default_factory=list)  # everything after ready, in order
    close_code: int | None = None

    @property
    def audio(self) -> list[Audio]:
        return [m for m in self.messages if isinstance(m, Audio)]

    @property
    def done(self) -> Done:
        done = [m for m in self.messages if isinstance(m, Done)]
        assert len(done) == 1, f"expected one done, got {self.kinds()}"
        return done[0]

    def kinds(self) -> list[str]:
        return [m.type for m in self.messages if not isinstance(m, Progress)]


async def run_session(
    url: str,
    speakers: list[dict[str, Any]] | None = None,
    turns: list[dict[str, Any]] | None = None,
    **start: Any,
) -> SessionResult:
    async with await Client.connect(url) as client:
        ready = await client.start(speakers or speakers_of(), turns or turns_of(), **start)
        result = SessionResult(ready)
        async for msg in client:
            result.messages.append(msg)
        result.close_code = client.close_code
    return result


def decode_packets(packets: list[bytes], rate: int = 48000) -> np.ndarray:
    decoder = OpusDecoder(rate)
    try:
        return np.concatenate([decoder.decode(p) for p in packets])
    finally:
        decoder.close()


def decode_session(result: SessionResult) -> np.ndarray:
    """The session's audio as a client plays it: all packets, pre-skip dropped."""
    rate = result.ready.format["sample_rate"]
    x = decode_packets([p for a in result.audio for p in (a.packets or [])], rate)
    return x[result.ready.format["pre_skip"] * rate // 48000 :]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def first_error(messages: list[Any]) -> Error:
    errors = [m for m in messages if isinstance(m, Error)]
    assert errors, f"expected an error, got {[m.type for m in messages]}"
    return errors[0]


def abort(client: Client) -> None:
    """Drop the TCP connection without a WebSocket close, as a network failure does."""
    client.ws.transport.abort()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def get_text(url: str, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()
