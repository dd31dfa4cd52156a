"""`vibecast bench --soak MINUTES`: a long dialogue through a server process, with a listener
that plays at `--speed` times real time and reports its progress (`playback`), while the
server's resident memory is sampled. A benchmark: it prints numbers and asserts nothing.

Reported: memory growth from minute 2 of the audio to the end, pts gaps, listener stalls (its
buffer ran dry) and how often the server paused because the listener was max_lead_ms behind.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from .protocol import Audio, Client, Done, Progress, TurnStart

LINES = [
    "Welcome back to the show, where we talk about the craft of listening.",
    "Thanks for having me. I have been looking forward to this conversation for weeks.",
    "Let's start with something simple. What makes a voice pleasant to follow for an hour?",
    "Rhythm, mostly. People forgive a lot when the pauses land where they expect them.",
    "And when they do not? When a pause comes in the middle of a thought?",
    "Then the listener starts working harder, and after a while they stop listening at all.",
    "So a good conversation is also a kind of courtesy toward the audience.",
    "Exactly. You are carrying their attention, and you should not drop it.",
    "Does that change when the conversation is long, say forty minutes or more?",
    "It does. Over a long stretch, variety matters more than any single clever line.",
    "Variety in what sense? Topics, speakers, or the way things are said?",
    "All three, but the way things are said is the one people notice least and feel most.",
]
SCRIPT_CHARS_PER_MINUTE = 17.5 * 60  # the default voice reads about 17 characters of this a second


def script(minutes: float) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    chars = 0
    for i in itertools.count():
        text = LINES[i % len(LINES)]
        if i >= len(LINES):
            text = f"{text} That is point {i // len(LINES) + 1}."
        turns.append({"speaker": i % 4, "text": text})
        chars += len(text)
        if chars >= minutes * SCRIPT_CHARS_PER_MINUTE:
            return turns
    raise AssertionError("unreachable")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Listener:
    """Plays `speed` times faster than real time, from what it has received."""

    speed: float
    prebuffer_ms: float = 1000.0
    received_ms: float = 0.0
    played_ms: float = 0.0
    playing: bool = False
    last: float = 0.0
    stalls: int = 0
    stall_ms: float = 0.0
    finished: bool = False

    def tick(self, now: float) -> None:
        if not self.playing:
            if self.played_ms:  # stalled (not the start): the time counts until it plays again
                self.stall_ms += (now - self.last) * 1000
            self.last = now
            if self.received_ms - self.played_ms >= self.prebuffer_ms or (
                self.finished and self.received_ms > self.played_ms
            ):
                self.playing = True
            return
        self.played_ms += (now - self.last) * 1000 * self.speed
        self.last = now
        if self.played_ms >= self.received_ms:
            self.played_ms = self.received_ms
            if not self.finished:  # ran dry before the end: a stall
                self.stalls += 1
                self.playing = False


@dataclass
class Samples:
    rss: list[tuple[float, float]] = field(default_factory=list)  # (generated minutes, MB)


async def soak(
    url: str, pid: int | None, minutes: float, speed: float, token: str | None = None
) -> dict[str, Any]:
    """One long session with a listener at `speed`; `pid`: the server's process, whose memory
    is sampled (None: a server elsewhere, a cluster's: no memory figures)."""
    turns = script(minutes)
    listener = Listener(speed)
    samples = Samples()
    gaps = 0
    pts = 0
    paused_reports = 0
    max_lead = 0.0
    done: Done | None = None
    t0 = time.monotonic()
    async with await Client.connect(url, token=token) as client:
        ready = await client.start(
            [{"voice": v} for v in ("joe", "joe-high", "joe-deep", "joe-bright")],
            turns,
            options={"seed": secrets.randbits(48)},  # never from a turn cache
        )
        rate = ready.format["sample_rate"]
        lead_limit = ready.limits["max_lead_ms"]

        async def report() -> None:
            nonlocal paused_reports, max_lead
            while not listener.finished:  # after done the server closes: nothing more to report
                await asyncio.sleep(0.25)  # the listener's clock: a simulation, not a sync
                listener.tick(time.monotonic())
                try:
                    await client.playback(int(listener.played_ms))
                except ConnectionClosed:
                    break  # done arrived while this report waited
                if pid is not None:
                    samples.rss.append((listener.received_ms / 60000, rss_mb(pid)))
                lead = listener.received_ms - listener.played_ms
                max_lead = max(max_lead, lead)
                if lead >= lead_limit - 2500:  # within one chunk of the limit: the server waits
                    paused_reports += 1

        reporter = asyncio.create_task(report())
        async for msg in client:
            if isinstance(msg, TurnStart) and msg.pts != pts:
                gaps += 1
            if isinstance(msg, Audio):
                gaps += msg.pts != pts
                pts = msg.pts + msg.samples
                listener.received_ms = pts * 1000 / rate
            elif isinstance(msg, Done):
                done = msg
                listener.finished = True
            elif isinstance(msg, Progress):
                pass
        await reporter
    wall = time.monotonic() - t0
    assert done is not None, "the server closed before done"
    memory: dict[str, float | None] = dict.fromkeys(
        ("rss_mb_at_minute_2", "rss_mb_at_end", "rss_mb_peak", "rss_growth_pct")
    )
    if samples.rss:
        after_2 = [mb for m, mb in samples.rss if m >= 2.0]
        base = after_2[0] if after_2 else samples.rss[0][1]
        end = samples.rss[-1][1]
        memory = {
            "rss_mb_at_minute_2": round(base, 1),
            "rss_mb_at_end": round(end, 1),
            "rss_mb_peak": round(max(mb for _, mb in samples.rss), 1),
            "rss_growth_pct": round(100 * (end - base) / base, 2),
        }
    return {
        "audio_minutes": round(done.duration_ms / 60000, 2),
        "turns": done.turns,
        "speed": speed,
        "wall_s": round(wall, 1),
        **memory,
        "pts_gaps": gaps,
        "listener_stalls": listener.stalls,
        "listener_stall_ms": round(listener.stall_ms),
        "reports_at_max_lead": paused_reports,
        "largest_lead_ms": round(max_lead),
        "max_lead_ms": lead_limit,
    }


def run_soak(
    minutes: float,
    speed: float,
    model: str,
    lead_ms: int,
    out: str | None,
    server: str | None = None,
    token: str | None = None,
) -> int:
    if server is not None:  # a running server or cluster: its own limits apply
        return _report(asyncio.run(soak(server, None, minutes, speed, token)), out)
    cmd = [
        sys.executable,
        "-c",
        "from vibecast.cli import main; main()",
        "serve",
        "--port",
        "0",
        "--model",
        model,
        "--max-lead-ms",
        str(lead_ms),
        "--max-chars",
        "400000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:  # the server says where it listens once the engine is warm
            if "WebSocket ws://" in line:
                url = line.split("WebSocket ")[1].rstrip(")\n")
                break
        if url is None:
            raise SystemExit("vibecast bench --soak: the server did not start")
        result = asyncio.run(soak(url, proc.pid, minutes, speed))
    finally:
        proc.terminate()
        proc.wait(30)
    return _report(result, out)


def _report(result: dict[str, Any], out: str | None) -> int:
    print(json.dumps(result, indent=2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return 0
