"""The `vibecast` command: serve, cluster, say, bench, synth, voices."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from .server.config import FIELDS


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting in server/config.py; names match the file and VIBECAST_* vars."""
    p.add_argument("--config", help="TOML file with settings (flags and VIBECAST_* override it)")
    for name, kind in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_const", const=True, default=None)
            off = "--no-" + name.replace("_", "-")  # for the settings that are on by default
            p.add_argument(off, dest=name, action="store_const", const=False, default=None)
        elif name == "api_keys":
            p.add_argument(
                "--api-key",
                dest="api_keys",
                action="append",
                metavar="KEY",
                help="accept this API key (repeat for several)",
            )
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper())


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server.config import load_config
    from .server.run import app_state, bind, check_exposure, uvicorn_config

    flags = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    try:
        config = load_config(args.config, flags=flags)
    except (ValueError, OSError) as e:
        print(f"vibecast serve: {e}", file=sys.stderr)
        return 2
    check_exposure(config)
    try:
        sock = bind(config.host, config.port)  # bound here, so --port 0 can say which port it got
    except OSError as e:
        print(
            f"vibecast serve: cannot listen on {config.host}:{config.port}: {e.strerror}",
            file=sys.stderr,
        )
        return 2
    config = config.replace(port=sock.getsockname()[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"vibecast: loading {config.model} ...", flush=True)
    server = uvicorn.Server(uvicorn_config(config, log_level="info"))
    state = app_state(server)

    def announce() -> None:
        state.ready.wait()
        print(
            f"vibecast: ready. Open http://{host}:{config.port}/ to listen "
            f"(WebSocket ws://{host}:{config.port}/v1/stream)",
            flush=True,
        )

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from .server.config import load_config
    from .server.run import check_exposure

    flags = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    try:
        config = load_config(args.config, flags=flags)
        check_exposure(config)
        if not config.store_url:
            raise ValueError(
                "a cluster keeps its state in Redis: give --store-url redis://HOST:PORT"
            )
    except (ValueError, OSError) as e:
        print(f"vibecast cluster: {e}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve

        from .server.cluster import APP, application
    except ImportError:
        print(
            "vibecast cluster: Ray is not installed: pip install 'vibecast[cluster]'",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    app = application(
        config, args.engines, args.gateways, args.max_engines, args.sessions_per_engine
    )
    serve.run(app, name=APP, route_prefix="/")
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(
        f"vibecast: cluster ready ({args.gateways} gateway(s), {args.engines} engine(s)). "
        f"Open http://{host}:{config.port}/ (WebSocket ws://{host}:{config.port}/v1/stream)",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vibecast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (default voice: Piper joe, on CPU)")
    _add_server_flags(serve)

    cluster = sub.add_parser(
        "cluster", help="run gateways and engine replicas on a Ray cluster (docs/scaleout.md)"
    )
    _add_server_flags(cluster)
    cluster.add_argument("--engines", type=int, default=1, help="engine replicas (one per GPU)")
    cluster.add_argument("--gateways", type=int, default=1, help="gateway replicas")
    cluster.add_argument(
        "--max-engines",
        type=int,
        default=0,
        help="autoscale engine replicas between --engines and this (Serve's autoscaler)",
    )
    cluster.add_argument(
        "--sessions-per-engine",
        type=int,
        default=8,
        help="with --max-engines: the sessions one engine should stream (its target load)",
    )
    cluster.add_argument(
        "--address",
        help="the Ray cluster to join (e.g. auto, or ray://HEAD:10001); default: start one here",
    )

    say = sub.add_parser("say", help="speak a script file into an .opus or .wav file")
    say.add_argument("script", nargs="?", help="file of 'Speaker N: text' lines ('-' for stdin)")
    say.add_argument("-o", "--out", required=True, help="output file: .opus, .ogg or .wav")
    say.add_argument("--server", default="ws://127.0.0.1:8000/v1/stream", help="server to use")
    say.add_argument("--token", help="API key, when the server needs one")
    say.add_argument(
        "--voice",
        action="append",
        metavar="VOICE",
        help="voice of the next speaker: a name from GET /v1/voices or a .wav/.ogg "
        "sample (repeat per speaker; default: the server's voices in order)",
    )
    say.add_argument("--seed", type=int, help="another take (default 0: the same audio each run)")
    say.add_argument(
        "--from-turn",
        type=int,
        default=0,
        metavar="K",
        help="write the audio from turn K on (0 = the first line); the turns before it are "
        "still spoken for the context, from the server's turn cache when unchanged",
    )
    say.add_argument("--play-while", action="store_true", help="play the audio as it arrives")
    say.add_argument("--quiet", action="store_true", help="no progress bar")
    say.add_argument(
        "--model",
        help="synthesize in this process instead of using a server "
        "(piper, a Piper .onnx, or a VibeVoice directory/hub id)",
    )
    say.add_argument("--voices", help="with --model: a directory of voice samples")
    say.add_argument(
        "--job",
        nargs="?",
        const="new",
        metavar="ID",
        help="as a job the server keeps (docs/jobs.md): submit the script, show its progress, "
        "download the take when done (the output may be .mp3, .opus, .aac, .flac, .wav, .pcm); "
        "--job ID follows and downloads a job submitted before",
    )
    say.add_argument("--device", default="auto", help="with --model: cuda, cpu or auto")
    say.add_argument("--dtype", default="auto", help="with --model: bfloat16, float32 or auto")

    bench = sub.add_parser("bench", help="measure first-audio time, real-time factor, overlap")
    bench.add_argument("--server", help="measure this running server (default: start one)")
    bench.add_argument("--token", help="API key for --server")
    bench.add_argument("--model", default="piper", help="the model to load when no --server")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto")
    bench.add_argument("--voices", help="directory of voice samples for the model")
    bench.add_argument("--runs", type=int, default=10, help="first-audio samples to take (>= 10)")
    bench.add_argument("--json", help="also write the results to this file")
    bench.add_argument(
        "--sessions",
        metavar="N[,N...]",
        help="instead: N sessions started at once, for each N (e.g. 1,2,4,8,16): aggregate "
        "frames per second, real-time factor per session, first audio, queue, stalls",
    )
    bench.add_argument(
        "--frames-per-turn",
        type=int,
        metavar="F",
        help="with --sessions, VibeVoice: every turn is exactly F frames (random weights end "
        "turns early)",
    )
    bench.add_argument(
        "--listeners",
        action="store_true",
        help="with --sessions: clients play in real time and report playback (stalls are "
        "counted); the server keeps its default capacity and queues the rest",
    )
    bench.add_argument(
        "--capacity",
        type=int,
        metavar="K",
        help="with --sessions: the server's max_sessions (default: N; with --listeners, the "
        "capacity the server measures at start-up)",
    )
    bench.add_argument(
        "--context-minutes",
        type=float,
        metavar="M",
        help="instead, VibeVoice: one session in context mode through M minutes of speech "
        "(turns of --frames-per-turn frames, default 100): resident memory each minute, "
        "context rebuilds and their prefill cost per turn",
    )
    bench.add_argument(
        "--turn-cache",
        type=int,
        metavar="N",
        help="instead: a script of N turns taken four times on a server with the turn cache "
        "(from scratch, again, last line edited from it and from the top): first audio, wall "
        "time, audio the model made (docs/turn-cache.md)",
    )
    bench.add_argument("--steps", type=int, default=10, help="VibeVoice: diffusion steps per frame")
    bench.add_argument(
        "--stream-text",
        action="store_true",
        help="instead, VibeVoice-Realtime: a turn whose text arrives word by word (at each "
        "--words-per-s): first audio after the first word, each word's lag to its audio, and "
        "the batched steps' times",
    )
    bench.add_argument(
        "--words-per-s",
        type=float,
        nargs="+",
        default=[20.0, 2.0],
        metavar="R",
        help="with --stream-text: how fast the words arrive (default: 20, faster than speech, "
        "and 2, slower)",
    )
    bench.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="instead: a dialogue this long through a server process, played --speed "
        "times faster than real time, sampling the server's memory",
    )
    bench.add_argument("--speed", type=float, default=10.0, help="with --soak: listener speed")
    bench.add_argument(
        "--max-lead-ms", type=int, default=30_000, help="with --soak: the server's lead limit"
    )

    synth = sub.add_parser("synth", help="VibeVoice: write the 24 kHz audio of a whole script")
    synth.add_argument("--model", required=True, help="VibeVoice directory or hub id")
    synth.add_argument(
        "--script",
        required=True,
        help="file of 'Speaker N: text' lines (Realtime: or plain text, one turn of the voice)",
    )
    synth.add_argument(
        "--voice",
        action="append",
        default=[],
        help="per speaker: a voice sample (1.5B/7B) or a voice preset .pt/.safetensors (Realtime)",
    )
    synth.add_argument(
        "--mode",
        default="context",
        choices=["context", "continuous", "turns"],
        help="context (default): the dialogue in the model's context over a sliding window; "
        "continuous: one window for the whole script; turns: each turn on its own",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--steps", type=int, help="diffusion steps per frame (default 10; Realtime: 5)"
    )
    synth.add_argument("--cfg-scale", type=float, help="guidance (default 1.3; Realtime: 1.5)")
    synth.add_argument("--dtype", default="float32")
    synth.add_argument("--device", default="cpu")
    synth.add_argument("--out", required=True, help="output .wav (32-bit float, 24 kHz)")

    from .voices import add_parser as add_voices

    add_voices(sub)

    args = parser.parse_args(argv)
    if args.command == "voices":
        code = args.func(args)
    elif args.command == "serve":
        code = _serve(args)
    elif args.command == "cluster":
        code = _cluster(args)
    elif args.command == "say":
        from .say import run_say

        code = run_say(args)
    elif args.command == "bench" and args.context_minutes:
        from .bench_context import run_context_bench

        code = run_context_bench(args)
    elif args.command == "bench" and args.stream_text:
        from .bench_realtime import run_stream_text_bench

        code = run_stream_text_bench(args)
    elif args.command == "bench" and args.turn_cache:
        from .bench_cache import run_cache_bench

        code = run_cache_bench(args)
    elif args.command == "bench" and args.soak:
        from .soak import run_soak

        code = run_soak(
            args.soak, args.speed, args.model, args.max_lead_ms, args.json, args.server, args.token
        )
    elif args.command == "bench":
        from .bench import run_bench

        code = run_bench(args)
    else:
        from .synth import run_synth

        code = run_synth(args)
    sys.exit(code)
