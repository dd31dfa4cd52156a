"""`vibecast bench`: numbers, not assertions.

For any model:
- first audio: time from sending `start` to the first `audio` message, over `--runs` sessions
  of a 4-speaker script on a warm server (each cancelled once its first audio arrives);
- real-time factor of a 4-speaker, 8-turn dialogue, as the server reports it (engine compute /
  audio) and as the client sees it (wall / audio);
- with `--sessions N,...`: N sessions at once through the server's engine loop (aggregate
  frames per second, real-time factor per session, first audio, queue, stalls with
  `--listeners`, operations per decode step for a batched engine).
For the Piper voice: each default voice's median pitch and speaking rate, measured on the audio.
For VibeVoice: the time to compute one frame (LM step, CFG diffusion, decoder, semantic encoder).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed

from .engine.backend import SpeakerVoice
from .engine.pitch import median_f0
from .protocol import Audio, Cancelled, Client, Done, Error, Queued, ServerError, TurnEnd
from .protocol.opus import OpusDecoder
from .protocol.wav import wav_bytes

# Seeds no earlier run used: a server's turn cache must not answer a benchmark.
SEED = secrets.randbits(48)

DIALOGUE = [
    (0, "Welcome back to the show. Today we are talking about streaming speech."),
    (1, "Thanks for having me. It is a topic close to my heart."),
    (2, "Let's start simple. Why does the first second of audio matter so much?"),
    (3, "Because a listener decides in that second whether the thing feels alive."),
    (0, "And after that second, what keeps it feeling alive?"),
    (1, "No gaps, no clicks, and never running out of audio while the rest is made."),
    (2, "So the server has to stay ahead of the listener the whole time."),
    (3, "Exactly, and it should tell you how far ahead it is, every second."),
]


def _turns() -> list[dict[str, Any]]:
    return [{"speaker": s, "text": t} for s, t in DIALOGUE]


def synthetic_voice(i: int, seconds: float = 3.0) -> np.ndarray:
    """A harmonic tone with vibrato, for models that need a voice prompt and have none."""
    t = np.arange(int(24000 * seconds)) / 24000
    f0 = 110.0 * 2 ** (i / 4)
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / 24000
    harmonics = sum((np.sin(k * phase) / k for k in range(1, 6)), start=np.zeros_like(phase))
    return (0.2 * harmonics).astype(np.float32)


def speaker_specs(voices: list[str]) -> list[dict[str, Any]]:
    if voices:
        return [{"voice": voices[i % len(voices)]} for i in range(4)]
    return [
        {"voice_audio": wav_bytes(synthetic_voice(i), 24000), "voice_format": "wav"}
        for i in range(4)
    ]


def speaker_voices(backend: Any) -> list[SpeakerVoice]:
    voices = backend.voices()
    if voices:
        return [
            SpeakerVoice(voices[i % len(voices)].id, voice_id=voices[i % len(voices)].id)
            for i in range(4)
        ]
    return [SpeakerVoice(f"s{i}", audio=synthetic_voice(i), audio_rate=24000) for i in range(4)]


async def first_audio_times(
    url: str, token: str | None, speakers: list[dict[str, Any]], runs: int
) -> tuple[list[float], list[float]]:
    """(start -> first audio, cancel -> cancelled) in seconds, per warm run."""
    times, cancels = [], []
    for i in range(runs + 1):  # the first run warms caches and is not counted
        async with await Client.connect(url, token=token) as client:
            t0 = time.perf_counter()
            await client.start(speakers, _turns(), options={"seed": SEED + i})
            async for msg in client:
                if isinstance(msg, Audio) and msg.samples:
                    first = time.perf_counter()
                    await client.cancel()
                    break
            async for msg in client:  # until the server closes after `cancelled`
                if isinstance(msg, Cancelled) and i:
                    times.append(first - t0)
                    cancels.append(time.perf_counter() - first)
    return times, cancels


async def full_dialogue(
    url: str, token: str | None, speakers: list[dict[str, Any]], pitch: bool
) -> dict[str, Any]:
    decoder = OpusDecoder(48000)
    per_turn: dict[int, list[np.ndarray]] = {}
    async with await Client.connect(url, token=token) as client:
        t0 = time.perf_counter()
        ready = await client.start(speakers, _turns(), options={"seed": SEED})
        done: Done | None = None
        async for msg in client:
            if isinstance(msg, Audio) and msg.packets:
                per_turn.setdefault(msg.turn, []).extend(decoder.decode(p) for p in msg.packets)
            elif isinstance(msg, Done):
                done = msg
        wall = time.perf_counter() - t0
    assert done is not None, "the server closed before done"
    audio_s = done.duration_ms / 1000
    out: dict[str, Any] = {
        "audio_s": audio_s,
        "wall_s": round(wall, 3),
        "rtf_engine": done.stats.get("rtf"),
        "rtf_wall": round(wall / audio_s, 4) if audio_s else None,
    }
    if pitch:
        skip = ready.format["pre_skip"]
        voices = {}
        for speaker in range(4):
            turns = [t for t, (s, _) in enumerate(DIALOGUE) if s == speaker]
            audio = np.concatenate([np.concatenate(per_turn[t]) for t in turns])
            if turns[0] == 0:
                audio = audio[skip:]
            chars = sum(len(text) for s, text in DIALOGUE if s == speaker)
            voices[speakers[speaker]["voice"]] = {
                "median_f0_hz": round(median_f0(audio, 48000), 1),
                "chars_per_s": round(chars / (len(audio) / 48000), 1),
            }
        out["voices"] = voices
    return out


def frame_times(backend: Any, frames: int = 40, steps: int = 10) -> dict[str, Any]:
    """The cost of one VibeVoice frame, on the real hot path, independent of token choices."""
    import torch

    from .engine.vibevoice.generate import encode_turn, open_session

    rt = backend.rt
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    vs = open_session(rt, [synthetic_voice(0)], seed=0, cfg_scale=1.3, steps=steps)
    turn = encode_turn(rt, vs, 0, "A sentence long enough to give the frames some room to run.", 0)
    s = turn.streams
    times = []
    with torch.inference_mode():
        for i in range(frames + 5):
            sync()
            t0 = time.perf_counter()
            audio, emb = rt.speech(s, rt.noise(vs.gen), 1.3, steps, vs.acoustic, vs.semantic)
            s.advance_neg()
            rt.step(s, emb)
            rt.choose(s.h_pos)
            audio.cpu()
            sync()
            if i >= 5:  # after warm-up
                times.append(time.perf_counter() - t0)
    ms = [t * 1000 for t in times]
    return {
        "frames": len(ms),
        "diffusion_steps": steps,
        "p50_ms": round(statistics.median(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "rtf": round(statistics.median(ms) / (1000 * 3200 / 24000), 4),
        "device": str(rt.device),
        "dtype": str(rt.dtype).replace("torch.", ""),
    }


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def parse_counts(text: str) -> list[int]:
    """`--sessions 1,2,4,8,16` -> [1, 2, 4, 8, 16]."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"vibecast bench --sessions {text}: give numbers like 1,2,4,8") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"vibecast bench --sessions {text}: give session counts of 1 or more")
    return counts


def run_bench(args: Any) -> int:
    from .engine.loader import load_backend
    from .server.config import ServerConfig
    from .server.run import ServerThread

    runs = max(10, args.runs)
    counts = parse_counts(args.sessions) if args.sessions else None
    # A batched engine holds as many sessions as its slots: enough for the largest run.
    slots = max(counts) if counts and not args.listeners else None
    backend = load_backend(args.model, args.device, args.dtype, args.voices, slots)
    backend.warmup()
    if counts:
        many = sessions_bench(
            backend,
            counts,
            args.frames_per_turn,
            args.listeners,
            args.capacity,
            url=args.server,
            token=args.token,
        )
        print_sessions(many)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(many, f, indent=2)
        return 0
    is_vibevoice = hasattr(backend, "rt")
    server = None
    url = args.server
    if url is None:
        config = ServerConfig(
            host="127.0.0.1", port=0, model=args.model, max_sessions=1, turn_cache=False
        )
        server = ServerThread(config, backend=backend).start()
        url = server.ws_url
    try:
        if args.server is None:
            voices = [v.id for v in backend.voices()]
        else:
            from .say import fetch_voices

            voices = fetch_voices(url, args.token)
        speakers = speaker_specs(voices)
        ttfa, cancels = asyncio.run(first_audio_times(url, args.token, speakers, runs))
        dialogue = asyncio.run(full_dialogue(url, args.token, speakers, pitch=not is_vibevoice))
    finally:
        if server is not None:
            server.stop()
    result: dict[str, Any] = {
        "model": backend.name,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}",
        "first_audio_ms": {
            "runs": len(ttfa),
            "p50": round(percentile(ttfa, 50) * 1000, 1),
            "p95": round(percentile(ttfa, 95) * 1000, 1),
            "min": round(min(ttfa) * 1000, 1),
            "max": round(max(ttfa) * 1000, 1),
        },
        "cancel_ms": {
            "p50": round(percentile(cancels, 50) * 1000, 1),
            "max": round(max(cancels) * 1000, 1),
        },
        "dialogue": dialogue,
    }
    if is_vibevoice and not getattr(backend, "streams_text", False):  # Realtime: --stream-text
        result["frame"] = frame_times(backend)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _print(r: dict[str, Any]) -> None:
    f, d = r["first_audio_ms"], r["dialogue"]
    print(f"model    {r['model']}")
    print(f"machine  {r['machine']}")
    print(
        f"first audio ({f['runs']} warm runs)  p50 {f['p50']} ms   p95 {f['p95']} ms   "
        f"(min {f['min']}, max {f['max']})"
    )
    print(f"cancel -> cancelled  p50 {r['cancel_ms']['p50']} ms   max {r['cancel_ms']['max']} ms")
    print(
        f"8-turn dialogue  {d['audio_s']:.1f} s audio in {d['wall_s']:.2f} s: RTF engine "
        f"{d['rtf_engine']}, RTF wall {d['rtf_wall']}"
    )
    for voice, v in d.get("voices", {}).items():
        print(
            f"voice {voice:12s} median F0 {v['median_f0_hz']:6.1f} Hz   {v['chars_per_s']} chars/s"
        )
    if "frame" in r:
        fr = r["frame"]
        print(
            f"frame  p50 {fr['p50_ms']} ms, mean {fr['mean_ms']} ms over {fr['frames']} frames "
            f"({fr['diffusion_steps']} diffusion steps, {fr['device']} {fr['dtype']}): "
            f"RTF {fr['rtf']}"
        )


# -- many sessions at once: `vibecast bench --sessions 1,2,4,8,16` --------------------------------

FRAMES_PER_S = 7.5  # VibeVoice frames per second of audio (3200 samples at 24 kHz)


@dataclass
class RealTimeListener:
    """A client that plays in real time from what it has received, as the page's player does:
    it waits for `prebuffer_ms` before the first sound and again after running dry (with a
    cushion 1.5 times larger, at most 1 s). A stall is a time the buffer ran dry before the end;
    its duration runs from the moment it ran dry until playback starts again."""

    prebuffer_ms: float = 250.0
    received_ms: float = 0.0
    played_ms: float = 0.0
    playing: bool = False
    finished: bool = False  # `done` arrived: nothing more is coming
    since: float = 0.0  # when `played_ms` was last brought up to date
    dry_at: float | None = None
    stalls: int = 0
    stall_s: float = 0.0

    def advance(self, now: float) -> None:
        if self.playing:
            played = self.played_ms + (now - self.since) * 1000
            if played >= self.received_ms:
                dry = self.since + (self.received_ms - self.played_ms) / 1000
                self.played_ms = self.received_ms
                self.playing = False
                if not self.finished:
                    self.stalls += 1
                    self.dry_at = dry
                    self.prebuffer_ms = min(1000.0, self.prebuffer_ms * 1.5)
            else:
                self.played_ms = played
        self.since = now

    def receive(self, now: float, ms: float) -> None:
        self.advance(now)  # first: had it run dry before this arrived?
        self.received_ms += ms
        self._maybe_play(now)

    def finish(self, now: float) -> None:
        self.advance(now)
        self.finished = True
        self._maybe_play(now)

    def _maybe_play(self, now: float) -> None:
        buffered = self.received_ms - self.played_ms
        if self.playing or buffered <= 0:
            return
        if buffered >= self.prebuffer_ms or self.finished:
            if self.dry_at is not None:
                self.stall_s += now - self.dry_at
                self.dry_at = None
            self.playing = True
            self.since = now


async def _bench_session(
    url: str,
    token: str | None,
    speakers: list[dict[str, Any]],
    turns: list[dict[str, Any]],
    options: dict[str, Any],
    listen: bool,
    fmt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One client: `start`, then everything until the server closes; times from `start`."""
    positions: list[int] = []
    listener = RealTimeListener()
    turn_samples: list[int] = []
    first_audio: float | None = None
    done: Done | None = None
    error = None
    reporter: asyncio.Task[None] | None = None

    def on_queued(q: Queued) -> None:
        positions.append(q.position)

    async with await Client.connect(url, token=token) as client:

        async def report() -> None:  # like the page: `playback` twice a second while it plays
            while not listener.finished:
                await asyncio.sleep(0.5)
                listener.advance(time.perf_counter())
                try:
                    await client.playback(int(listener.played_ms))
                except ConnectionClosed:
                    return

        t0 = time.perf_counter()
        try:
            ready = await client.start(
                speakers, turns, format=fmt, options=options, on_queued=on_queued
            )
        except ServerError as e:
            return {"outcome": e.code, "positions": positions, "error": str(e)}
        ready_s = time.perf_counter() - t0
        rate = ready.format["sample_rate"]
        async for msg in client:
            now = time.perf_counter()
            if isinstance(msg, Audio) and msg.samples:
                if first_audio is None:
                    first_audio = now - t0
                    if listen:
                        reporter = asyncio.create_task(report())
                listener.receive(now, msg.samples * 1000 / rate)
            elif isinstance(msg, TurnEnd):
                turn_samples.append(msg.samples)
            elif isinstance(msg, Done):
                done = msg
                listener.finish(now)
            elif isinstance(msg, Error):
                error = f"{msg.code}: {msg.message}"
        wall = time.perf_counter() - t0
        listener.finished = True
        if reporter is not None:
            reporter.cancel()
    samples = done.samples if done else sum(turn_samples)
    return {
        "outcome": "done" if done else (error or "closed before done"),
        "positions": positions,
        "queued": bool(positions),
        "ready_s": round(ready_s, 4),
        "first_audio_s": round(first_audio, 4) if first_audio is not None else None,
        "wall_s": round(wall, 4),
        "sample_rate": rate,
        "samples": samples,
        "samples_24k": samples * 24000 // rate,
        "turn_samples": turn_samples,
        "audio_s": round(samples / rate, 4),
        "rtf": round(wall * rate / samples, 4) if samples else None,
        "rtf_engine": done.stats.get("rtf") if done else None,
        "stalls": listener.stalls if listen else None,
        "stall_s": round(listener.stall_s, 3) if listen else None,
    }


def _ops_per_step(backend: Any) -> float | None:
    """Operations the engine issues per decode step, when it can say (a later engine will)."""
    ops = getattr(backend, "ops_per_step", None)
    if callable(ops):
        ops = ops()
    return None if ops is None else float(ops)


def _quantiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "max": None}
    return {
        "p50": round(percentile(xs, 50), 4),
        "p95": round(percentile(xs, 95), 4),
        "max": round(max(xs), 4),
    }


async def session_batch(
    url: str,
    token: str | None,
    speakers: list[dict[str, Any]],
    n: int,
    turns: int = len(DIALOGUE),
    frames_per_turn: int | None = None,
    listen: bool = False,
    fmt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`n` clients send `start` at once, each with the dialogue (its first `turns` turns), in
    format `fmt` (default: the server's, 48 kHz Opus)."""
    script = _turns()[:turns]

    def options(i: int) -> dict[str, Any]:
        o: dict[str, Any] = {"seed": SEED + i}
        if frames_per_turn is not None:
            o["frames_per_turn"] = frames_per_turn
        return o

    t0 = time.perf_counter()
    sessions = await asyncio.gather(
        *(_bench_session(url, token, speakers, script, options(i), listen, fmt) for i in range(n))
    )
    wall = time.perf_counter() - t0
    audio = sum(s.get("audio_s", 0.0) for s in sessions)
    admitted = [s for s in sessions if not s.get("positions")]
    queued = [s for s in sessions if s.get("positions")]

    def first(group: list[dict[str, Any]]) -> list[float]:
        return [s["first_audio_s"] for s in group if s.get("first_audio_s") is not None]

    rtfs = [s["rtf"] for s in sessions if s.get("rtf") is not None]
    stalls = [s for s in sessions if s.get("stalls") is not None]
    return {
        "sessions": n,
        "done": sum(s["outcome"] == "done" for s in sessions),
        "admitted": len(admitted),
        "queued": len(queued),
        "positions": [s["positions"] for s in queued],
        "wall_s": round(wall, 3),
        "audio_s": round(audio, 3),
        "frames_per_s": round(audio * FRAMES_PER_S / wall, 2),
        "x_real_time": round(audio / wall, 3),
        "rtf_per_session": _quantiles(rtfs),
        "first_audio_s": _quantiles(first(sessions)),
        "first_audio_admitted_s": _quantiles(first(admitted)),
        "first_audio_queued_s": _quantiles(first(queued)),
        "stalls": sum(s["stalls"] for s in stalls) if stalls else None,
        "stall_s": round(sum(s["stall_s"] for s in stalls), 3) if stalls else None,
        "stalls_admitted": sum(s["stalls"] for s in stalls if not s["positions"])
        if stalls
        else None,
        "per_session": sessions,
    }


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process), from /proc (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime


def _cpu_use(before: tuple[int, int] | None, wall: float) -> tuple[float | None, float | None]:
    """(CPU seconds this process used, share of the machine's CPU other processes used) since
    `before`: the first is steadier than wall time on a shared machine, the second says how
    much others skewed the run."""
    after = _cpu_ticks()
    if before is None or after is None or wall <= 0:
        return None, None
    hz = os.sysconf("SC_CLK_TCK")
    own = after[1] - before[1]
    other = (after[0] - before[0]) - own
    capacity = wall * hz * (os.cpu_count() or 1)
    return round(own / hz, 2), round(100 * max(0, other) / capacity, 1)


def sessions_bench(
    backend: Any,
    counts: list[int],
    frames_per_turn: int | None = None,
    listeners: bool = False,
    capacity: int | None = None,
    turns: int = len(DIALOGUE),
    url: str | None = None,
    token: str | None = None,
    fmt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """For each n in `counts`: n sessions started at once through a server on loopback (one
    started here for `backend`, or the one at `url`).

    The server admits all n (max_sessions = n), unless `listeners`: then it keeps its default
    capacity (or `capacity`) and the rest wait in its queue. Listeners play in real time and
    report `playback` as the page does; the others read as fast as the server sends.
    """
    from .server.config import ServerConfig
    from .server.run import ServerThread

    voices = [v.id for v in backend.voices()]
    if url is not None:
        from .say import fetch_voices

        voices = fetch_voices(url, token)
    speakers = speaker_specs(voices)
    runs = []
    warm = False
    for n in counts:
        server = None
        target = url
        slots = None
        if target is None:
            # Listeners: the server's own capacity (measured at warm-up) unless one is given.
            slots = (capacity or 0) if listeners else (capacity or n)
            config = ServerConfig(
                host="127.0.0.1",
                port=0,
                turn_cache=False,
                model=backend.name,
                max_sessions=slots,
                max_queue=max(32, n),
                starts_per_minute=100_000,
            )
            server = ServerThread(config, backend=backend).start()
            target = server.ws_url
            slots = server.state.sessions.capacity
        try:
            if not warm:  # one short session first: caches, samplers, the Opus encoder
                asyncio.run(session_batch(target, token, speakers, 1, 1, frames_per_turn, fmt=fmt))
                warm = True
            load_before = _load_avg()
            ticks = _cpu_ticks()
            run = asyncio.run(
                session_batch(target, token, speakers, n, turns, frames_per_turn, listeners, fmt)
            )
        finally:
            if server is not None:
                server.stop()
        run["capacity"] = slots
        run["ops_per_step"] = _ops_per_step(backend) if url is None else None
        run["load_avg_before"] = load_before
        run["load_avg_after"] = _load_avg()
        own_cpu, run["other_cpu_pct"] = _cpu_use(ticks, run["wall_s"])
        run["cpu_s"] = own_cpu
        frames = run["audio_s"] * FRAMES_PER_S
        run["cpu_ms_per_frame"] = round(1000 * own_cpu / frames, 2) if own_cpu and frames else None
        runs.append(run)
    base = runs[0]["frames_per_s"] if runs and runs[0]["sessions"] == 1 else None
    for run in runs:
        run["speedup_vs_1"] = round(run["frames_per_s"] / base, 2) if base else None
    return {
        "model": backend.name,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "turns": turns,
        "frames_per_turn": frames_per_turn,
        "listeners": listeners,
        "runs": runs,
    }


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _fmt(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def print_sessions(r: dict[str, Any]) -> None:
    fpt = r["frames_per_turn"]
    print(f"model    {r['model']}")
    print(f"machine  {r['machine']}")
    print(
        f"script   {r['turns']} turns, "
        + (f"{fpt} frames per turn (forced), " if fpt else "")
        + ("listeners play in real time" if r["listeners"] else "clients read at full speed")
    )
    columns = (
        f"{'N':>3} {'slots':>5} {'done':>4} {'queued':>6} {'audio s':>8} {'wall s':>7} "
        f"{'frames/s':>9} {'vs N=1':>6} {'RTF p50':>7} {'RTF max':>7} {'1st ms p50':>10} "
        f"{'p95':>6} {'stalls':>6} {'stall s':>7} {'ops/step':>8} {'CPU ms/frame':>12} "
        f"{'other CPU':>9}"
    )
    print(columns)
    for run in r["runs"]:
        rtf, fa = run["rtf_per_session"], run["first_audio_s"]
        ops = run["ops_per_step"]
        other = run.get("other_cpu_pct")
        print(
            f"{run['sessions']:>3} {_fmt(run['capacity']):>5} {run['done']:>4} "
            f"{run['queued']:>6} {run['audio_s']:>8.1f} {run['wall_s']:>7.2f} "
            f"{run['frames_per_s']:>9.1f} {_fmt(run['speedup_vs_1'], digits=2):>6} "
            f"{_fmt(rtf['p50'], digits=3):>7} {_fmt(rtf['max'], digits=3):>7} "
            f"{_fmt(fa['p50'], 1000):>10} {_fmt(fa['p95'], 1000):>6} {_fmt(run['stalls']):>6} "
            f"{_fmt(run['stall_s'], digits=2):>7} {'n/a' if ops is None else f'{ops:.0f}':>8} "
            f"{_fmt(run.get('cpu_ms_per_frame'), digits=2):>12} "
            f"{'-' if other is None else f'{other:.0f} %':>9}"
        )
        if run["queued"]:
            adm, que = run["first_audio_admitted_s"], run["first_audio_queued_s"]
            positions = ", ".join("→".join(map(str, p)) for p in run["positions"])
            print(f"    queue positions told: {positions}")
            print(
                f"    first audio: admitted p50 {_fmt(adm['p50'], 1000)} ms, p95 "
                f"{_fmt(adm['p95'], 1000)} ms; queued p50 {_fmt(que['p50'], 1000)} ms, max "
                f"{_fmt(que['max'], 1000)} ms; stalls in admitted sessions "
                f"{_fmt(run['stalls_admitted'])}"
            )
