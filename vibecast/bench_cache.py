"""`vibecast bench --turn-cache`: what the turn cache saves a person drafting a script. One
server with the cache on (a fresh folder), one script of N turns, four takes in a row through
the WebSocket: made from scratch; the same again (every turn replayed); its last line edited
and played from that line (`from_turn`); the same edit played from the top. Each take's first
audio, wall time and the audio the model made for it."""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from typing import Any

from .bench import DIALOGUE, speaker_specs
from .protocol import Audio, Client, Done


async def take(
    url: str, speakers: list[dict[str, Any]], turns: list[dict[str, Any]], options: dict[str, Any]
) -> dict[str, float]:
    async with await Client.connect(url) as client:
        start = time.perf_counter()
        await client.start(speakers, turns, options=options)
        first = None
        done = None
        async for msg in client:
            if isinstance(msg, Audio) and first is None:
                first = time.perf_counter() - start
            elif isinstance(msg, Done):
                done = msg
        wall = time.perf_counter() - start
    assert done is not None and first is not None, "the take ended without audio"
    return {
        "first_audio_ms": round(first * 1000, 1),
        "wall_s": round(wall, 2),
        "audio_s": round(done.duration_ms / 1000, 1),
    }


def engine_seconds(http: str) -> float:
    import urllib.request

    with urllib.request.urlopen(http + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vibecast_engine_audio_seconds "):
                return float(line.split()[1])
    return 0.0


def run_cache_bench(args: Any) -> int:
    from .engine.loader import load_backend
    from .server.config import ServerConfig
    from .server.run import ServerThread

    n = args.turn_cache
    backend = load_backend(args.model, args.device, args.dtype, args.voices, 1, args.steps)
    with tempfile.TemporaryDirectory(prefix="vibecast-turns-") as folder:
        config = ServerConfig(host="127.0.0.1", port=0, model=backend.name, turn_cache_dir=folder)
        server = ServerThread(config, backend=backend).start()
        try:
            speakers = speaker_specs([v.id for v in backend.voices()])
            script = [DIALOGUE[i % len(DIALOGUE)] for i in range(n)]
            turns = [{"speaker": s, "text": f"{t} ({i + 1})"} for i, (s, t) in enumerate(script)]
            edited = turns[:-1] + [dict(turns[-1], text="The last line, rewritten for take two.")]
            options: dict[str, Any] = {"seed": secrets.randbits(48)}
            if args.frames_per_turn:
                options["frames_per_turn"] = args.frames_per_turn
            takes = [
                ("made from scratch", turns, options),
                ("the same again", turns, options),
                ("last line edited, from it", edited, dict(options, from_turn=n - 1)),
                ("last line edited, from the top", edited, options),
            ]
            results: list[dict[str, Any]] = []
            for name, script_turns, opts in takes:
                before = engine_seconds(server.http_url)
                r = asyncio.run(take(server.ws_url, speakers, script_turns, opts))
                made = round(engine_seconds(server.http_url) - before, 1)
                results.append({"take": name, **r, "engine_audio_s": made})
        finally:
            server.stop()
    print(f"{backend.name}: {n} turns, turn cache on")
    print(f"{'take':<32} {'first audio':>12} {'wall':>8} {'audio':>8} {'model made':>11}")
    for r in results:
        print(
            f"{r['take']:<32} {r['first_audio_ms']:>9.1f} ms {r['wall_s']:>6.2f} s "
            f"{r['audio_s']:>6.1f} s {r['engine_audio_s']:>9.1f} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": backend.name, "turns": n, "takes": results}, f, indent=2)
    return 0
