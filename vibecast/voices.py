"""`vibecast voices convert`: VibeVoice-Realtime voice presets (.pt) to .safetensors.

The .pt presets are pickles; we read them with an allow-list and never run code from them
(engine/vibevoice/presets.py, docs/voice-presets.md). Converting once gives plain tensor files
that load without any unpickling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main_convert(paths: list[str], out: str | None) -> int:
    """Converts each preset; one line per file written, one line on stderr per file refused.
    Returns 0, or 2 if any file was refused (the others are still converted)."""
    from .engine.vibevoice.presets import ENTRIES, PresetError, convert, load_preset

    code = 0
    written: set[Path] = set()
    for p in paths:
        src = Path(p)
        dst = Path(out) / f"{src.stem}.safetensors" if out else None
        target = (dst or src.with_suffix(".safetensors")).resolve()
        if target in written:  # two inputs of one name into one --out directory
            print(
                f"vibecast voices convert: {src}: {target} was already written from another "
                "file of the same name; not overwriting it",
                file=sys.stderr,
            )
            code = 2
            continue
        try:
            path = convert(src, dst)
        except PresetError as e:
            print(f"vibecast voices convert: {e}", file=sys.stderr)
            code = 2
            continue
        except OSError as e:
            print(f"vibecast voices convert: {src}: cannot write: {e}", file=sys.stderr)
            code = 2
            continue
        written.add(target)
        # Report from the file just written, so the line describes what will be served.
        preset = load_preset(path)
        streams = preset.streams()
        lengths = ", ".join(f"{e} {streams[e].length}" for e in ENTRIES)
        dtype = str(preset.lm.hidden.dtype).removeprefix("torch.")
        print(f"{src.name} -> {path}: {lengths} positions ({dtype})")
    return code


def _run(args: argparse.Namespace) -> int:
    return main_convert(args.presets, args.out)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `vibecast voices convert ...` on the main parser's subparsers; the parsed
    arguments carry `func(args) -> int`, the exit code."""
    voices = sub.add_parser(
        "voices", help="VibeVoice-Realtime voice presets (docs/voice-presets.md)"
    )
    actions = voices.add_subparsers(dest="voices_command", required=True)
    convert = actions.add_parser(
        "convert",
        help="read .pt voice presets without running code from them and write .safetensors",
        description="Read VibeVoice-Realtime-0.5B voice presets (.pt) through an allow-list, "
        "never running code from them, and write each as <name>.safetensors beside it (or in "
        "--out DIR). A file holding anything but a preset's tensors is refused (exit code 2).",
    )
    convert.add_argument("presets", nargs="+", metavar="PRESET.pt", help="preset files to convert")
    convert.add_argument("--out", metavar="DIR", help="write the .safetensors files here")
    convert.set_defaults(func=_run)
