"""Paths and loaders the VibeVoice tests share."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vibecast.engine.vibevoice.generate import Runtime
from vibecast.engine.vibevoice.weights import load_runtime
from vibecast.protocol.wav import wav_bytes

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "vibevoice"  # CI has ../shared beside the clone
# A six-turn, two-speaker script the VibeVoice tests share.
DIALOGUE = [
    (0, "Hello there, and welcome to the show."),
    (1, "Thanks, it is good to be here."),
    (0, "Shall we start?"),
    (1, "Good morning, good evening, welcome back."),
    (0, "The quick brown fox jumps over the lazy dog."),
    (1, "One line is enough here."),
]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vibevoice"
TINY = FIXTURES / "tiny"


def reference() -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(FIXTURES / "reference.safetensors"), json.loads(
        (FIXTURES / "reference.json").read_text()
    )


def long_reference() -> tuple[dict[str, torch.Tensor], dict]:
    """The longer take (7 turns, 119 frames) and the rebuild fixture (vibevoice_reference.py)."""
    return load_file(FIXTURES / "long.safetensors"), json.loads(
        (FIXTURES / "long.json").read_text()
    )


def tiny_runtime() -> Runtime:
    return load_runtime(str(TINY), "cpu", "float32")


def voice_dir(folder: Path) -> Path:
    """`--voices` for the tiny model: the reference fixture's two prompts, as ann and ben."""
    fx, _ = reference()
    for i, name in enumerate(["ann", "ben"]):
        (folder / f"{name}.wav").write_bytes(wav_bytes(fx[f"voice_{i}"].numpy(), 24000))
    return folder
