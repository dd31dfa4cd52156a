"""The module tree against the released checkpoints' names and shapes, and loading rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from vibevoice_helpers import SHARED, TINY

from vibecast.engine.vibevoice.config import VibeVoiceConfig
from vibecast.engine.vibevoice.model import VibeVoice
from vibecast.engine.vibevoice.weights import CheckpointError, load_model


@pytest.mark.parametrize("size", ["1.5b", "7b"])
def test_module_tree_matches_the_released_checkpoint(size: str) -> None:
    cfg = VibeVoiceConfig.from_file(SHARED / f"config-{size}.json")
    with torch.device("meta"):
        model = VibeVoice(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    keys = json.loads((SHARED / "checkpoint-keys" / f"keys_vibevoice-{size}.json").read_text())
    assert sorted(set(keys["keys"]) - set(ours)) == []  # nothing missing
    assert sorted(set(ours) - set(keys["keys"])) == []  # nothing extra
    assert {k: keys["keys"][k] for k in ours} == ours  # the same shapes
    assert sum(v.numel() for v in model.state_dict().values()) == keys["params"]
    assert ("lm_head.weight" in ours) == (size == "7b")  # tied for 1.5B, separate for 7B


def test_realtime_checkpoint_is_refused_clearly() -> None:
    d = json.loads((SHARED / "config-1.5b.json").read_text())
    d["model_type"] = "vibevoice_streaming"
    with pytest.raises(ValueError, match="Realtime-0.5B"):
        VibeVoiceConfig.from_dict(d)


def test_vibepod_and_vibevoice_names_are_both_accepted() -> None:
    d = json.loads((SHARED / "config-1.5b.json").read_text())
    assert d["model_type"] == "vibepod"
    a = VibeVoiceConfig.from_dict(d)
    d["model_type"] = "vibevoice"
    assert VibeVoiceConfig.from_dict(d) == a


def _copy_tiny(tmp: Path) -> Path:
    out = tmp / "m"
    shutil.copytree(TINY, out)
    return out


def test_tiny_checkpoint_loads_strictly() -> None:
    model = load_model(TINY, "cpu", torch.float32)
    assert model.cfg.lm.tie_word_embeddings is False
    factor = model.model.speech_scaling_factor
    assert isinstance(factor, torch.Tensor) and torch.isfinite(factor)
    assert not any(p.is_meta for p in model.parameters())


def test_tied_checkpoint_without_lm_head_loads(tmp_path: Path) -> None:
    d = _copy_tiny(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["decoder_config"]["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    state = load_file(d / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, d / "model.safetensors")
    model = load_model(d, "cpu", torch.float32)
    assert model.output_embeddings() is model.model.language_model.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    d = _copy_tiny(tmp_path)
    state = load_file(d / "model.safetensors")
    names = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in halves.items():
        save_file({k: state[k] for k in part}, d / file)
    (d / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, part in halves.items() for k in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_model(d, "cpu", torch.float32)
    single = load_model(TINY, "cpu", torch.float32)
    for (k, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda s: s.pop("model.prediction_head.cond_proj.weight"),
            "missing (first: model.prediction_head.cond_proj.weight",
        ),
        (
            lambda s: s.__setitem__("model.extra.weight", torch.zeros(1)),
            "unexpected (first: model.extra.weight",
        ),
        (
            lambda s: s.__setitem__("model.acoustic_connector.fc1.bias", torch.zeros(3)),
            "model.acoustic_connector.fc1.bias has shape [3]",
        ),
    ],
)
def test_bad_checkpoints_name_the_tensor(tmp_path: Path, change, needle: str) -> None:
    d = _copy_tiny(tmp_path)
    state = load_file(d / "model.safetensors")
    change(state)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_model(d, "cpu", torch.float32)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        from vibecast.engine.vibevoice.weights import resolve

        resolve(str(tmp_path))
