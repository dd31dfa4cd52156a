"""Loading the official checkpoints: a local directory or a hub id, one file or shards, and
the runtime built from one (`load_runtime`), for the server and `vibecast synth` alike.

The module tree is built on the meta device and every tensor is assigned straight from the
safetensors files in the requested dtype, so no random init happens and no second copy is
made. A missing, unexpected or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import RealtimeConfig, VibeVoiceConfig, load_config
from .generate import Runtime
from .model import VibeVoice
from .realtime import RealtimeRuntime, VibeVoiceRealtime
from .tokenizer import TextTokenizer

Model = VibeVoice | VibeVoiceRealtime


class CheckpointError(ValueError):
    pass


def resolve(model: str) -> Path:
    """A local directory as is; anything else is a hub id, downloaded (or found in the cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; is it a VibeVoice model directory?")
        return path
    if path.exists() or model.startswith((".", "/")):
        raise CheckpointError(f"--model {model}: not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # the hub client raises many unrelated types
        raise CheckpointError(
            f"--model {model}: not a local directory, and fetching it from the Hugging Face hub "
            f"failed ({type(e).__name__}: {e}). Download it elsewhere and pass the directory."
        ) from None


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors or model.safetensors.index.json."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{directory} has neither model.safetensors nor model.safetensors.index.json"
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def build(cfg: VibeVoiceConfig | RealtimeConfig) -> Model:
    """The module tree a config describes (1.5B/7B, or Realtime-0.5B)."""
    return VibeVoiceRealtime(cfg) if isinstance(cfg, RealtimeConfig) else VibeVoice(cfg)


def is_realtime(model: str) -> bool:
    """Whether `--model` names VibeVoice-Realtime (a directory or `random:realtime-*`), read
    from its config.json; a hub id not downloaded yet is fetched for that."""
    if model.startswith("random:"):
        return model.split(":", 1)[1].startswith("realtime")
    config = json.loads((resolve(model) / "config.json").read_text("utf-8"))
    return bool(config.get("model_type") == "vibevoice_streaming")


def load_model(
    directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Model:
    cfg = load_config(directory / "config.json")
    with torch.device("meta"):
        model = build(cfg)
    expected = expected_tensors(model)
    files = checkpoint_files(directory)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{directory}: the checkpoint does not match config.json: {'; '.join(parts)}. "
            "Is this a VibeVoice checkpoint (1.5B, 7B or Realtime-0.5B) in the official layout?"
        )
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise CheckpointError(
                        f"{name} has shape {list(tensor.shape)} in {file.name} but config.json "
                        f"implies {list(expected[name])}"
                    )
                state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for name in ("speech_scaling_factor", "speech_bias_factor"):
        value = getattr(model.model, name)
        if not torch.isfinite(value):
            raise CheckpointError(f"model.{name} in the checkpoint is not a finite number")
    model.eval().requires_grad_(False)
    return model


CONFIGS = (
    Path(__file__).resolve().parent
)  # vibevoice-1.5b.json, vibevoice-7b.json: the released dimensions


def random_model(size: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Model:
    """A model of the released dimensions with random weights (`--model random:1.5b`), for
    measuring speed where the real weights cannot be had. Its audio is noise."""
    path = CONFIGS / f"vibevoice-{size}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem.split("-", 1)[1] for p in CONFIGS.glob("vibevoice-*.json")))
        raise CheckpointError(f"--model random:{size}: no such size; known: {known}")
    cfg = load_config(path)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in name or name.endswith("gamma"):
                p.fill_(1.0 if "norm" in name else 0.1)
            else:
                p.zero_()
        model.model.speech_scaling_factor.fill_(0.2)
        model.model.speech_bias_factor.fill_(-0.05)
    return model.eval().requires_grad_(False)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype in ("bf16", "bfloat16"):
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                raise ValueError(
                    f"--dtype bfloat16 needs an Ampere or newer GPU (compute capability 8.0+); "
                    f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Use --dtype float32."
                )
        return torch.bfloat16
    if dtype in ("fp32", "float32"):
        return torch.float32
    raise ValueError(f"--dtype {dtype}: use bfloat16 or float32")


def load_runtime(model: str, device: str = "auto", dtype: str = "auto") -> Runtime:
    """`--model`, `--device`, `--dtype` as given on the command line -> a ready runtime.

    `model` is a directory, a hub id, or `random:SIZE` (released dimensions, random weights).
    """
    weights, tok, dev, dt, name = _load(model, device, dtype)
    if not isinstance(weights, VibeVoice):
        raise CheckpointError(f"--model {model} is VibeVoice-Realtime, not 1.5B/7B")
    return Runtime(weights, tok, dev, dt, name)


def load_realtime(model: str, device: str = "auto", dtype: str = "auto") -> RealtimeRuntime:
    """`load_runtime` for Realtime-0.5B (a directory, a hub id, `random:realtime-0.5b`)."""
    weights, tok, dev, dt, name = _load(model, device, dtype)
    if not isinstance(weights, VibeVoiceRealtime):
        raise CheckpointError(f"--model {model} is VibeVoice 1.5B/7B, not Realtime")
    return RealtimeRuntime(weights, tok, dev, dt, name)


def _load(
    model: str, device: str, dtype: str
) -> tuple[Model, TextTokenizer, torch.device, torch.dtype, str]:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if model.startswith("random:"):
        size = model.split(":", 1)[1]
        weights = random_model(size, dev, dt)
        return weights, TextTokenizer.placeholder(), dev, dt, f"vibevoice:random-{size}"
    directory = resolve(model)
    weights = load_model(directory, dev, dt)
    return weights, TextTokenizer.load(directory), dev, dt, f"vibevoice:{directory.name}"
