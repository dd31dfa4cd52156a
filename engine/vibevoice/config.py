"""VibeVoice model configuration, read from the official `config.json`.

The released files name their types `vibevoice*`; the training configs in the official
repository say `vibepod*`. Both are accepted. Per-call settings (cfg scale, steps, seed) are
not here: they live in engine.backend.SynthesisParams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SAMPLE_RATE = 24000


@dataclass(frozen=True)
class LMConfig:
    """The Qwen2.5 decoder."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class CodecConfig:
    """One speech tokenizer (σ-VAE acoustic, or semantic): a causal conv encoder and decoder."""

    vae_dim: int
    n_filters: int
    ratios: tuple[int, ...]  # decoder order, e.g. (8, 5, 5, 4, 2, 2); the encoder reverses it
    encoder_depths: tuple[int, ...]
    decoder_depths: tuple[int, ...]
    layernorm_eps: float
    layer_scale: bool  # blocks carry gamma / ffn_gamma
    last_norm: bool
    conv_bias: bool
    fix_std: float
    std_dist_type: str
    kernel_size: int = 7
    last_kernel_size: int = 7

    @property
    def hop(self) -> int:
        """Audio samples per latent frame (3200 for the released models)."""
        n = 1
        for r in self.ratios:
            n *= r
        return n


@dataclass(frozen=True)
class HeadConfig:
    """The diffusion head and its noise schedule."""

    hidden_size: int
    layers: int
    ffn_ratio: float
    latent_size: int
    rms_norm_eps: float
    train_steps: int
    beta_schedule: str
    prediction_type: str
    inference_steps: int

    @property
    def ffn_dim(self) -> int:
        return int(self.hidden_size * self.ffn_ratio)


@dataclass(frozen=True)
class VibeVoiceConfig:
    lm: LMConfig
    acoustic: CodecConfig
    semantic: CodecConfig
    head: HeadConfig

    @staticmethod
    def from_file(path: str | Path) -> VibeVoiceConfig:
        return VibeVoiceConfig.from_dict(json.loads(Path(path).read_text("utf-8")))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> VibeVoiceConfig:
        kind = str(d.get("model_type", ""))
        if kind == "vibevoice_streaming":
            raise ValueError(
                "this is VibeVoice-Realtime-0.5B: read it with RealtimeConfig (load_config does)"
            )
        if kind not in ("vibevoice", "vibepod"):
            raise ValueError(
                f"config.json has model_type {kind!r}; expected 'vibevoice' (or 'vibepod')"
            )
        return VibeVoiceConfig(
            lm=_lm(d["decoder_config"]),
            acoustic=_codec(d["acoustic_tokenizer_config"], "acoustic_tokenizer_config"),
            semantic=_codec(d["semantic_tokenizer_config"], "semantic_tokenizer_config"),
            head=_head(d["diffusion_head_config"]),
        )


@dataclass(frozen=True)
class RealtimeConfig:
    """VibeVoice-Realtime-0.5B (`model_type: vibevoice_streaming`): the Qwen2.5 decoder split in
    two, a lower text-only LM (`lm`, its first layers) under a TTS LM (`tts`, the rest), which
    takes the lower LM's text states and the speech frames. No semantic tokenizer, and of the
    acoustic tokenizer only the decoder is in the checkpoint."""

    lm: LMConfig
    tts: LMConfig
    acoustic: CodecConfig
    head: HeadConfig

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RealtimeConfig:
        if d.get("model_type") != "vibevoice_streaming":
            raise ValueError(
                f"config.json has model_type {d.get('model_type')!r}; expected "
                "'vibevoice_streaming' (VibeVoice-Realtime-0.5B)"
            )
        whole = _lm(d["decoder_config"])
        upper = int(d.get("tts_backbone_num_hidden_layers", 20))
        if not 0 < upper < whole.num_hidden_layers:
            raise ValueError(
                f"tts_backbone_num_hidden_layers is {upper}; it must be between 1 and the "
                f"decoder's {whole.num_hidden_layers} layers minus one"
            )
        return RealtimeConfig(
            lm=replace(whole, num_hidden_layers=whole.num_hidden_layers - upper),
            tts=replace(whole, num_hidden_layers=upper),
            acoustic=_codec(d["acoustic_tokenizer_config"], "acoustic_tokenizer_config"),
            head=_head(d["diffusion_head_config"]),
        )


def load_config(path: str | Path) -> VibeVoiceConfig | RealtimeConfig:
    """The config of a model directory's `config.json`, by its model_type."""
    d = json.loads(Path(path).read_text("utf-8"))
    if d.get("model_type") == "vibevoice_streaming":
        return RealtimeConfig.from_dict(d)
    return VibeVoiceConfig.from_dict(d)


def _lm(lm: dict[str, Any]) -> LMConfig:
    if lm.get("model_type", "qwen2") != "qwen2":
        raise ValueError(
            f"decoder_config.model_type is {lm.get('model_type')!r}; only qwen2 is supported"
        )
    if lm.get("use_sliding_window") or lm.get("rope_scaling"):
        raise ValueError("sliding-window attention and rope scaling are not supported")
    return LMConfig(
        hidden_size=lm["hidden_size"],
        num_hidden_layers=lm["num_hidden_layers"],
        num_attention_heads=lm["num_attention_heads"],
        num_key_value_heads=lm["num_key_value_heads"],
        intermediate_size=lm["intermediate_size"],
        vocab_size=lm["vocab_size"],
        rope_theta=float(lm.get("rope_theta", 1e6)),
        rms_norm_eps=float(lm.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=lm.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(lm.get("tie_word_embeddings", False)),
    )


def _head(head: dict[str, Any]) -> HeadConfig:
    return HeadConfig(
        hidden_size=head["hidden_size"],
        layers=head["head_layers"],
        ffn_ratio=float(head["head_ffn_ratio"]),
        latent_size=head["latent_size"],
        rms_norm_eps=float(head.get("rms_norm_eps", 1e-5)),
        train_steps=head.get("ddpm_num_steps", 1000),
        beta_schedule=head.get("ddpm_beta_schedule", "cosine"),
        prediction_type=head.get("prediction_type", "v_prediction"),
        inference_steps=head.get("ddpm_num_inference_steps", 20),
    )


def _depths(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(x) for x in value.split("-"))
    return tuple(int(x) for x in value)


def _codec(c: dict[str, Any], name: str) -> CodecConfig:
    expected = {
        "layernorm": "RMSNorm",
        "mixer_layer": "depthwise_conv",
        "conv_norm": "none",
        "pad_mode": "constant",
        "causal": True,
    }
    for key, want in expected.items():
        if key in c and c[key] != want:
            raise ValueError(f"{name}.{key} is {c[key]!r}; vibecast implements {want!r} only")
    encoder_depths = _depths(c.get("encoder_depths", "3-3-3-3-3-3-8"))
    decoder = c.get("decoder_depths")
    decoder_depths = _depths(decoder) if decoder is not None else tuple(reversed(encoder_depths))
    ratios = tuple(c.get("encoder_ratios", c.get("decoder_ratios", (8, 5, 5, 4, 2, 2))))
    if tuple(c.get("decoder_ratios", ratios)) != ratios:
        raise ValueError(
            f"{name}: encoder_ratios and decoder_ratios differ, which is not supported"
        )
    if c.get("encoder_n_filters", 32) != c.get("decoder_n_filters", c.get("encoder_n_filters", 32)):
        raise ValueError(f"{name}: encoder and decoder n_filters differ, which is not supported")
    return CodecConfig(
        vae_dim=c["vae_dim"],
        n_filters=c.get("encoder_n_filters", 32),
        ratios=ratios,
        encoder_depths=encoder_depths,
        decoder_depths=decoder_depths,
        layernorm_eps=float(c.get("layernorm_eps", 1e-5)),
        layer_scale=float(c.get("layer_scale_init_value", 0)) > 0,
        last_norm=not c.get("disable_last_norm", False),
        conv_bias=bool(c.get("conv_bias", True)),
        fix_std=float(c.get("fix_std", 0.0)),
        std_dist_type=str(c.get("std_dist_type", "none")),
    )
