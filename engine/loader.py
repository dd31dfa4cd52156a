"""Pick and load the backend that `--model` names."""

from __future__ import annotations

from pathlib import Path

from .backend import Backend


def load_backend(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    voices: str | None = None,
    slots: int | None = None,
    steps: int = 0,
    window: int | None = None,
) -> Backend:
    """'piper' (default voice), a Piper .onnx file, or a VibeVoice directory or hub id (1.5B,
    7B, or Realtime-0.5B, told apart by its config.json)."""
    if model == "piper":
        from .piper_voice import PiperBackend

        return PiperBackend()
    if model.endswith(".onnx"):
        from .piper_voice import PiperBackend

        path = Path(model)
        if not path.is_file() or not Path(f"{model}.json").is_file():
            raise FileNotFoundError(
                f"--model {model}: a Piper voice needs both {path.name} and {path.name}.json"
            )
        return PiperBackend(path)
    from .vibevoice.weights import is_realtime

    if is_realtime(model):
        from .vibevoice.realtime_backend import RealtimeBackend

        return RealtimeBackend.load(model, device, dtype, voices, slots, steps or 5, window)
    from .vibevoice.backend import VibeVoiceBackend

    return VibeVoiceBackend.load(model, device, dtype, voices, slots, steps or 10, window)
