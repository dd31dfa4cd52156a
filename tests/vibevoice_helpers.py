"""Paths and loaders the VibeVoice tests share."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vibecast.engine.vibevoice.generate import Runtime
from vibecast.engine.vibevoice.weights import load_runtime

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "vibevoice"  # CI has ../shared beside the clone
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vibevoice"
TINY = FIXTURES / "tiny"


def reference() -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(FIXTURES / "reference.safetensors"), json.loads(
        (FIXTURES / "reference.json").read_text()
    )


def tiny_runtime() -> Runtime:
    return load_runtime(str(TINY), "cpu", "float32")
