"""`vibecast say`: a script file in, an .opus or .wav file out, through a vibecast server."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .engine.script import ScriptError, parse_script
from .protocol import Audio, Client, Done, Progress, Ready, TurnEnd, TurnStart
from .protocol.ogg import OggOpusWriter
from .protocol.opus import OpusDecoder
from .protocol.wav import wav_bytes

PLAYERS = {
    "pw-play": ["pw-play", "--format", "s16", "--rate", "{rate}", "--channels", "1", "-"],
    "paplay": ["paplay", "--raw", "--format=s16le", "--channels=1", "--rate={rate}"],
    "aplay": ["aplay", "-q", "-f", "S16_LE", "-c", "1", "-r", "{rate}"],
    "ffplay": [
        "ffplay",
        "-loglevel",
        "error",
        "-nodisp",
        "-autoexit",
        "-f",
        "s16le",
        "-ar",
        "{rate}",
        "-i",
        "-",
    ],
}


class SayError(Exception):
    pass


def http_url(ws_url: str, path: str) -> str:
    base = ws_url.split("/v1/stream")[0]
    return base.replace("ws://", "http://", 1).replace("wss://", "https://", 1) + path


def fetch_voices(ws_url: str, token: str | None) -> list[str]:
    request = urllib.request.Request(http_url(ws_url, "/v1/voices"))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return [v["id"] for v in json.load(r)["voices"]]
    except OSError as e:
        raise SayError(
            f"cannot reach the server at {http_url(ws_url, '/')} ({e}); start one with "
            "`vibecast serve`, or pass --model piper to synthesize without a server"
        ) from None


def speaker_specs(voices: list[str], n_speakers: int, available: list[str]) -> list[dict[str, Any]]:
    specs = []
    for i in range(n_speakers):
        choice = voices[i] if i < len(voices) else available[i % len(available)]
        path = Path(choice)
        if path.suffix.lower() in (".wav", ".ogg", ".opus") and path.is_file():
            fmt = "wav" if path.suffix.lower() == ".wav" else "ogg"
            specs.append({"voice_audio": path.read_bytes(), "voice_format": fmt, "name": path.stem})
        else:
            specs.append({"voice": choice})
    return specs


def open_player(rate: int) -> subprocess.Popen[bytes]:
    for name, argv in PLAYERS.items():
        if shutil.which(name):
            cmd = [a.format(rate=rate) for a in argv]
            return subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    raise SayError(
        "--play-while needs an audio player on PATH: pw-play, paplay (pulseaudio-utils), "
        "aplay (alsa-utils) or ffplay (ffmpeg)"
    )


@dataclass
class Progressbar:
    total: int
    out: IO[str] = field(default_factory=lambda: sys.stderr)
    started: float = field(default_factory=time.monotonic)

    def show(self, turns_done: int, audio_s: float) -> None:
        wall = time.monotonic() - self.started
        speed = f"{audio_s / wall:.1f}x real time" if wall > 0 else ""
        if self.out.isatty():
            width = 30
            filled = int(width * turns_done / max(1, self.total))
            bar = "#" * filled + "." * (width - filled)
            self.out.write(
                f"\r[{bar}] {turns_done}/{self.total} turns, {audio_s:.1f} s audio, {speed} "
            )
        else:
            self.out.write(f"turn {turns_done}/{self.total}: {audio_s:.1f} s audio, {speed}\n")
        self.out.flush()

    def end(self) -> None:
        if self.out.isatty():
            self.out.write("\n")


async def say(
    script: str,
    out: Path,
    url: str,
    token: str | None = None,
    voices: list[str] | None = None,
    seed: int | None = None,
    play_while: bool = False,
    quiet: bool = False,
    from_turn: int = 0,
) -> tuple[Ready, Done]:
    lines = parse_script(script)
    n_speakers = max(line.speaker for line in lines) + 1
    suffix = out.suffix.lower()
    if suffix not in (".opus", ".ogg", ".wav"):
        raise SayError(f"cannot write {out.name}: the output must end in .opus, .ogg or .wav")
    available = fetch_voices(url, token)
    speakers = speaker_specs(voices or [], n_speakers, available)
    codec = "pcm_s16le" if suffix == ".wav" else "opus"
    rate = 24000 if codec == "pcm_s16le" else 48000
    fmt = {"codec": codec, "sample_rate": rate}
    if not 0 <= from_turn < len(lines):
        raise SayError(
            f"--from-turn {from_turn}: the script has {len(lines)} turns, 0 .. {len(lines) - 1}"
        )
    options: dict[str, Any] = {} if seed is None else {"seed": seed}
    if from_turn:
        options["from_turn"] = from_turn
    turns = [{"speaker": line.speaker, "text": line.text} for line in lines]

    player = open_player(rate) if play_while else None
    decoder = OpusDecoder(48000) if (player and codec == "opus") else None
    packets: list[bytes] = []
    pcm: list[bytes] = []
    bar = None if quiet else Progressbar(len(turns) - from_turn)
    async with await Client.connect(url, token=token) as client:
        ready: Ready = await client.start(speakers, turns, format=fmt, options=options or None)
        rate = ready.format["sample_rate"]
        skip = ready.format["pre_skip"] if decoder else 0
        done = None
        turns_done = 0
        sent = 0
        async for msg in client:
            if isinstance(msg, Audio):
                sent += msg.samples
                if msg.packets is not None:
                    packets.extend(msg.packets)
                    if decoder and player and player.stdin:
                        x = np.concatenate([decoder.decode(p) for p in msg.packets])
                        x, skip = x[skip:], max(0, skip - len(x))
                        player.stdin.write((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
                if msg.pcm is not None:
                    pcm.append(msg.pcm)
                    if player and player.stdin:
                        player.stdin.write(msg.pcm)
            elif isinstance(msg, TurnEnd):
                turns_done += 1
                if bar:
                    bar.show(turns_done, sent / rate)
            elif isinstance(msg, Done):
                done = msg
            elif isinstance(msg, (TurnStart, Progress)):
                pass
        if done is None:
            raise SayError(
                f"the server closed the connection before done (code {client.close_code})"
            )
    if bar:
        bar.end()
    if player is not None:
        if player.stdin:
            player.stdin.close()
        player.wait()

    if codec == "opus":
        writer = OggOpusWriter(ready.format["pre_skip"], rate)
        data = writer.header() + writer.write(packets) + writer.finish(done.samples * 48000 // rate)
    else:
        samples = np.frombuffer(b"".join(pcm), "<i2")[: done.samples].astype(np.float32) / 32768
        data = wav_bytes(samples, rate)
    out.write_bytes(data)
    return ready, done


def run_say(args: Any) -> int:
    script = None
    if args.script is None and args.job in (None, "new"):
        print("vibecast say: give the script file (or --job ID to follow a job)", file=sys.stderr)
        return 2
    if args.script is not None:
        try:
            path = Path(args.script)
            script = path.read_text("utf-8") if args.script != "-" else sys.stdin.read()
            parse_script(script)
        except (OSError, UnicodeDecodeError, ScriptError) as e:
            print(f"vibecast say: {args.script}: {e}", file=sys.stderr)
            return 2
    if args.job is not None:
        from .say_job import run_job

        if args.from_turn:
            print(
                "vibecast say: --from-turn does not go with --job: a job makes the whole "
                "script; its unchanged turns come from the turn cache",
                file=sys.stderr,
            )
            return 2
        try:
            return run_job(args, script)
        except SayError as e:
            print(f"vibecast say: {e}", file=sys.stderr)
            return 2
    assert script is not None
    out = Path(args.out)
    if args.model:
        from .server.config import ServerConfig
        from .server.run import ServerThread

        config = ServerConfig(
            host="127.0.0.1",
            port=0,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            voices=args.voices,
        )
        server = ServerThread(config).start()
        url = server.ws_url
    else:
        server = None
        url = args.server
    try:
        ready, done = asyncio.run(
            say(
                script,
                out,
                url,
                args.token,
                args.voice,
                args.seed,
                args.play_while,
                args.quiet,
                args.from_turn,
            )
        )
    except SayError as e:
        print(f"vibecast say: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    print(
        f"wrote {out}: {done.samples} samples at {ready.format['sample_rate']} Hz "
        f"({done.duration_ms / 1000:.2f} s), {done.turns} turns, first audio after "
        f"{done.stats.get('ttfa_ms')} ms"
    )
    return 0
