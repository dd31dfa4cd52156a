"""Runs INSIDE the throwaway reference environment (transformers==4.51.3, diffusers==0.35.1, the
CPU torch), with a checkout of microsoft/VibeVoice first on PYTHONPATH; never in vibecast's own.
Builds a tiny random VibeVoice-Realtime-0.5B checkpoint in the official layout, a tiny voice
preset made by the reference's own forward passes, and records what the reference's file demo
(realtime_model_inference_from_file.py: DPM-Solver++ 2M, 5 steps) generates from them.
Driven by make_realtime_fixtures.py.

    python realtime_reference.py OUT_DIR             record the fixtures
    python realtime_reference.py OUT_DIR --search    search the EOS constants (prints them)

writes OUT_DIR/tiny/ (config.json, model.safetensors in bf16, tokenizer.json), OUT_DIR/voice.pt
and OUT_DIR/reference.safetensors + OUT_DIR/reference.json.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import vibevoice
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from vibevoice.modular.configuration_vibevoice_streaming import VibeVoiceStreamingConfig
from vibevoice.modular.modeling_vibevoice_streaming_inference import (
    VibeVoiceStreamingForConditionalGenerationInference as Realtime,
)
from vibevoice.modular.modular_vibevoice_text_tokenizer import VibeVoiceTextTokenizerFast
from vibevoice.processor.vibevoice_streaming_processor import VibeVoiceStreamingProcessor
from vibevoice.processor.vibevoice_tokenizer_processor import VibeVoiceTokenizerProcessor

# The commit of microsoft/VibeVoice these fixtures were recorded against.
REFERENCE_COMMIT = "e73d1e17c3754f046352014856a922f8208fb5d3"
# The released model.safetensors' 605 tensor names, layer indices folded to N, with each one's
# rank: what the tiny checkpoint must reproduce. Cross-checked against the full key list when
# this machine has it (KEYS).
_QWEN_LAYER = [
    *[
        f"self_attn.{p}_proj.{w} {2 if w == 'weight' else 1}"
        for p in "qkv"
        for w in ("weight", "bias")
    ],
    "self_attn.o_proj.weight 2",
    *[f"mlp.{p}_proj.weight 2" for p in ("gate", "up", "down")],
    "input_layernorm.weight 1",
    "post_attention_layernorm.weight 1",
]
_DEC = "model.acoustic_tokenizer.decoder"
_HEAD = "model.prediction_head"
OFFICIAL_LAYOUT = {
    line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
    for line in [
        *[
            f"model.{stack}.embed_tokens.weight 2"
            for stack in ("language_model", "tts_language_model")
        ],
        *[
            f"model.{stack}.layers.N.{x}"
            for stack in ("language_model", "tts_language_model")
            for x in _QWEN_LAYER
        ],
        "model.tts_language_model.norm.weight 1",  # the lower LM's final norm is an identity
        "model.tts_input_types.weight 2",
        f"{_DEC}.upsample_layers.N.N.conv.conv.weight 3",
        f"{_DEC}.upsample_layers.N.N.conv.conv.bias 1",
        f"{_DEC}.upsample_layers.N.N.convtr.convtr.weight 3",
        f"{_DEC}.upsample_layers.N.N.convtr.convtr.bias 1",
        *[
            f"{_DEC}.stages.N.N.{x} 1"
            for x in ("norm.weight", "ffn_norm.weight", "gamma", "ffn_gamma")
        ],
        f"{_DEC}.stages.N.N.mixer.conv.conv.conv.weight 3",
        f"{_DEC}.stages.N.N.mixer.conv.conv.conv.bias 1",
        *[
            f"{_DEC}.stages.N.N.ffn.linear{i}.{w} {2 if w == 'weight' else 1}"
            for i in (1, 2)
            for w in ("weight", "bias")
        ],
        f"{_DEC}.head.conv.conv.weight 3",
        f"{_DEC}.head.conv.conv.bias 1",
        *[
            f"model.acoustic_connector.fc{i}.{w} {2 if w == 'weight' else 1}"
            for i in (1, 2)
            for w in ("weight", "bias")
        ],
        "model.acoustic_connector.norm.weight 1",
        "model.speech_scaling_factor 0",
        "model.speech_bias_factor 0",
        f"{_HEAD}.noisy_images_proj.weight 2",
        f"{_HEAD}.cond_proj.weight 2",
        f"{_HEAD}.t_embedder.mlp.N.weight 2",
        *[f"{_HEAD}.layers.N.ffn.{p}_proj.weight 2" for p in ("gate", "up", "down")],
        f"{_HEAD}.layers.N.norm.weight 1",
        f"{_HEAD}.layers.N.adaLN_modulation.N.weight 2",
        f"{_HEAD}.final_layer.linear.weight 2",
        f"{_HEAD}.final_layer.adaLN_modulation.N.weight 2",
        *[
            f"tts_eos_classifier.fc{i}.{w} {2 if w == 'weight' else 1}"
            for i in (1, 2)
            for w in ("weight", "bias")
        ],
    ]
}
# Sizes that do not scale with the model: the decoder's conv kernels (7; 2 x each upsampling
# ratio), the two input types, the EOS classifier's single logit.
OFFICIAL_SIZES = {
    f"{_DEC}.upsample_layers.0.0.conv.conv.weight": (2, 7),
    **{
        f"{_DEC}.upsample_layers.{i}.0.convtr.convtr.weight": (2, k)
        for i, k in enumerate((16, 10, 10, 8, 4, 4), start=1)
    },
    f"{_DEC}.head.conv.conv.weight": (2, 7),
    "model.tts_input_types.weight": (0, 2),
    "tts_eos_classifier.fc2.weight": (0, 1),
}
KEYS = Path("/work/shared/vibevoice/checkpoint-keys/keys_vibevoice-realtime-0.5b.json")
FRAME = 3200  # samples per latent frame at 24 kHz
STEPS = 5  # the file demo's set_ddpm_inference_steps(num_steps=5)
TEXT_WINDOW, SPEECH_WINDOW = 5, 6  # the reference's window sizes, for the checks below
NEGATIVE_TOKEN = "<|image_pad|>"  # the reference's negative (and pad) token

PROMPT_TEXT = " Speaker voice: warm, clear and calm.\n"
PROMPT_FRAMES = 7  # speech frames after the prompt text in the preset's TTS-LM stream
PRESET_SEED = 5
CASES: list[dict[str, Any]] = [
    {
        "suffix": "",
        "text": "Hello there, and welcome to the show. A quick brown fox jumps over.",
        "seed": 4,
        "cfg_scale": 1.3,
    },
    {
        "suffix": "_b",
        "text": "Wait, is it 9 already? Good morning: streaming speech works!",
        "seed": 1,
        "cfg_scale": 1.5,
    },
]
# EOS: chosen by `--search` (weights seeds 1-12 x generation seeds 1-8 per case). With these the
# classifier fires on its own 4 (case a) and 3 (case b) frames into the first speech-only window
# (frames 27 and 26; the text fills windows 0-3), mid-window, so the rest of that window is
# computed and dropped. Its input projected on fc2's direction first crosses the threshold,
# z = 0.3082, there; every earlier frame stays at least 0.036 (0.076 of z's spread) below it.
# The wider margins found fired on the first frame after the text (0.117: seeds 6; 6, 1) or, in
# case a, on a window's last frame, dropping nothing (0.086: seeds 6; 3, 1).
WEIGHTS_SEED = 6
EOS_SCALE = 16.0  # a power of two: fc2's random direction is scaled without extra bf16 rounding
EOS_BIAS = -4.9375  # -16 x 0.3086, exact in bf16: the threshold the search chose, rounded
EOS_FRAMES = (24, 32)  # the window of frames in which EOS must fire (both cases)

SPECIAL = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", NEGATIVE_TOKEN]
CORPUS = [
    PROMPT_TEXT,
    *[str(case["text"]) + "\n" for case in CASES],
    "Transform the text into speech with the voice of the prompt, one window at a time.\n",
    "Streaming speech, first audio, turns and voices: warm up, one line is enough here.\n",
]


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE with Qwen2.5's special tokens, small enough for a tiny vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def tiny_config(vocab: int) -> dict[str, Any]:
    """The official config.json's shape, shrunk: 5 decoder layers, 3 of them the TTS LM's."""
    codec = {
        "causal": True,
        "channels": 1,
        "conv_bias": True,
        "conv_norm": "none",
        "corpus_normalize": 0.0,
        "decoder_depths": None,  # the reversed encoder depths, as in the official config
        "decoder_n_filters": 2,
        "decoder_ratios": [8, 5, 5, 4, 2, 2],  # 3200 samples per frame
        "disable_last_norm": True,
        "encoder_depths": "1-1-1-1-1-1-1",
        "encoder_n_filters": 2,
        "encoder_ratios": [8, 5, 5, 4, 2, 2],
        "fix_std": 0.5,
        "layer_scale_init_value": 1e-6,
        "layernorm": "RMSNorm",
        "layernorm_elementwise_affine": True,
        "layernorm_eps": 1e-5,
        "mixer_layer": "depthwise_conv",
        "pad_mode": "constant",
        "std_dist_type": "gaussian",
        "vae_dim": 8,
        "weight_init_value": 0.01,
    }
    return {
        "model_type": "vibevoice_streaming",
        "architectures": ["VibeVoiceStreamingForConditionalGenerationInference"],
        "acoustic_vae_dim": 8,
        "tts_backbone_num_hidden_layers": 3,
        "acoustic_tokenizer_config": codec,
        "decoder_config": {
            "model_type": "qwen2",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 5,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "max_window_layers": 5,
            "rope_scaling": None,
            "sliding_window": None,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "use_cache": True,
        },
        "diffusion_head_config": {
            "hidden_size": 64,
            "head_layers": 2,
            "head_ffn_ratio": 3.0,
            "latent_size": 8,
            "speech_vae_dim": 8,
            "rms_norm_eps": 1e-5,
            "ddpm_num_steps": 1000,
            "ddpm_num_inference_steps": 5,
            "ddpm_beta_schedule": "cosine",
            "prediction_type": "v_prediction",
            "ddpm_batch_mul": 4,
            "diffusion_type": "ddpm",
        },
        "torch_dtype": "bfloat16",
    }


# Scales that keep the tiny random model's feedback loop (latent -> connector -> TTS LM ->
# diffusion condition -> latent) well-conditioned: a rounding difference must stay a rounding
# difference over 60 frames, or no second implementation could match it.
GAMMA = 0.1  # residual-branch scale of the codec blocks
CODEC_GAIN = 0.5
OUT_GAIN = 2.0  # the decoder's last conv: audio within about +-0.5
SCALING_FACTOR, BIAS_FACTOR = 0.8, -0.05
# Half the connector's output and the head's condition projection: at unit gains, 1 ulp on each
# latent moved case b's latents by 1e-2 within 50 frames; at these, by 1e-6.
GAINS = {"model.acoustic_connector.fc2.": 0.5, "model.prediction_head.cond_proj.": 0.5}


def randomize(model: Realtime, seed: int, eos_scale: float, eos_bias: float) -> None:
    """Every tensor random at a sane scale (the reference zero-initializes parts of the head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(GAMMA * (1.0 + 0.2 * noise))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "embed_tokens" in name or "tts_input_types" in name:
                p.copy_(0.5 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                gain = CODEC_GAIN if "acoustic_tokenizer" in name else 1.0
                if name.startswith("model.acoustic_tokenizer.decoder.head"):
                    gain = OUT_GAIN
                gain = next((v for k, v in GAINS.items() if name.startswith(k)), gain)
                p.copy_(gain * noise / math.sqrt(max(1, fan_in)))
        fc2 = model.tts_eos_classifier.fc2
        fc2.weight.mul_(eos_scale)
        fc2.bias.fill_(eos_bias)
        model.model.speech_scaling_factor.fill_(SCALING_FACTOR)
        model.model.speech_bias_factor.fill_(BIAS_FACTOR)


def official(name: str) -> bool:
    """Whether the released checkpoint has this tensor: it ships no acoustic encoder."""
    return not name.startswith("model.acoustic_tokenizer.encoder.")


def pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".N", name)


def check_layout(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    """The saved key set is the official one modulo layer counts and sizes."""
    if KEYS.is_file():
        keys = json.loads(KEYS.read_text())["keys"]
        assert len(keys) == 605
        assert {pattern(k): len(shape) for k, shape in keys.items()} == OFFICIAL_LAYOUT
        for k, (axis, size) in OFFICIAL_SIZES.items():
            assert keys[k][axis] == size, k
    ours = {pattern(k): t.dim() for k, t in state.items()}
    assert ours == OFFICIAL_LAYOUT, sorted(set(ours.items()) ^ set(OFFICIAL_LAYOUT.items()))
    for k, (axis, size) in OFFICIAL_SIZES.items():
        assert state[k].shape[axis] == size, k
    for k, t in state.items():
        if k.endswith("mixer.conv.conv.conv.weight"):
            assert t.shape[2] == 7, k
    dec = cfg["decoder_config"]
    n_tts = cfg["tts_backbone_num_hidden_layers"]
    for stack, n in (
        ("language_model", dec["num_hidden_layers"] - n_tts),
        ("tts_language_model", n_tts),
    ):
        found = {int(k.split(".")[3]) for k in state if k.startswith(f"model.{stack}.layers.")}
        assert found == set(range(n)), (stack, found)
    assert all(t.dtype == torch.bfloat16 for t in state.values())


def build(tiny: Path, seed: int, eos_scale: float, eos_bias: float) -> None:
    """Write tiny/: tokenizer.json, config.json and a bf16 model.safetensors, official layout."""
    tiny.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    tok.save(str(tiny / "tokenizer.json"))
    cfg = tiny_config(tok.get_vocab_size())
    config = VibeVoiceStreamingConfig(**copy.deepcopy(cfg))
    torch.manual_seed(0)
    model = Realtime(config)
    randomize(model, seed, eos_scale, eos_bias)
    state = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if official(k)
    }
    check_layout(state, cfg)
    save_file(state, str(tiny / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tiny)  # the reference's own config.json writer (non-default fields)


def load(tiny: Path) -> tuple[Realtime, VibeVoiceStreamingProcessor]:
    """As the file demo loads on CPU: fp32, sdpa, device_map cpu. Checks that every saved tensor
    arrived unchanged (bf16 values, now fp32)."""
    model = Realtime.from_pretrained(
        tiny, torch_dtype=torch.float32, device_map="cpu", attn_implementation="sdpa"
    )
    model.eval()
    live = model.state_dict()
    for k, v in load_file(str(tiny / "model.safetensors")).items():
        assert live[k].dtype == torch.float32 and torch.equal(live[k], v.float()), k
    processor = VibeVoiceStreamingProcessor(
        tokenizer=VibeVoiceTextTokenizerFast.from_pretrained(tiny),
        audio_processor=VibeVoiceTokenizerProcessor(),
    )
    assert len(processor.tokenizer) == model.config.decoder_config.vocab_size
    return model, processor


def make_preset(model: Realtime, processor: VibeVoiceStreamingProcessor) -> dict[str, Any]:
    """A voice preset made with the reference's own passes, in the official structure: a dict of
    four BaseModelOutputWithPast (full-length last_hidden_state, DynamicCache).

    lm:         forward_lm over the prompt text's ids (positions 0..L-1);
    tts_lm:     forward_tts_lm over those lower-LM states as text (type 1, positions 0..L-1),
                then forward_tts_lm over PROMPT_FRAMES speech frames, acoustic_connector of
                random latents (type 0, positions L..L+S-1), continuing the same cache;
    neg_lm, neg_tts_lm: the same two text passes over the single negative token (position 0).
    """
    tok = processor.tokenizer
    ids = torch.tensor([tok.encode(PROMPT_TEXT, add_special_tokens=False)])
    neg = torch.tensor([[tok.convert_tokens_to_ids(NEGATIVE_TOKEN)]])
    g = torch.Generator().manual_seed(PRESET_SEED)
    latents = torch.randn(1, PROMPT_FRAMES, model.config.acoustic_vae_dim, generator=g)
    preset: dict[str, Any] = {}
    with torch.no_grad():
        for prefix, text_ids, frames in (("", ids, latents), ("neg_", neg, None)):
            n = text_ids.shape[1]
            lm = model.forward_lm(
                input_ids=text_ids,
                attention_mask=torch.ones_like(text_ids),
                position_ids=torch.arange(n)[None],
                use_cache=True,
                return_dict=True,
            )
            tts = model.forward_tts_lm(
                input_ids=text_ids,
                attention_mask=torch.ones_like(text_ids),
                position_ids=torch.arange(n)[None],
                lm_last_hidden_state=lm.last_hidden_state,
                tts_text_masks=torch.ones_like(text_ids[:, -1:]),
                use_cache=True,
                return_dict=True,
            )
            hidden = [tts.last_hidden_state]
            cache = tts.past_key_values
            if frames is not None:
                s = frames.shape[1]
                dummy = torch.ones(1, s, dtype=torch.long)  # overwritten, as generate's are
                speech = model.forward_tts_lm(
                    input_ids=dummy,
                    attention_mask=torch.ones(1, n + s, dtype=torch.long),
                    position_ids=torch.arange(n, n + s)[None],
                    cache_position=torch.arange(n, n + s),
                    past_key_values=cache,
                    lm_last_hidden_state=model.model.acoustic_connector(frames),
                    tts_text_masks=torch.zeros_like(dummy[:, -1:]),
                    use_cache=True,
                    return_dict=True,
                )
                hidden.append(speech.last_hidden_state)
                cache = speech.past_key_values
            output = type(lm)  # transformers' BaseModelOutputWithPast
            assert output.__name__ == "BaseModelOutputWithPast"
            assert type(cache).__name__ == "DynamicCache"
            preset[prefix + "lm"] = output(
                last_hidden_state=lm.last_hidden_state, past_key_values=lm.past_key_values
            )
            preset[prefix + "tts_lm"] = output(
                last_hidden_state=torch.cat(hidden, dim=1), past_key_values=cache
            )
    for entry in preset.values():
        cache = entry.past_key_values
        assert cache.get_seq_length() == entry.last_hidden_state.shape[1]
    return {k: preset[k] for k in ("lm", "tts_lm", "neg_lm", "neg_tts_lm")}


class Recorder:
    """Wraps forward_lm, forward_tts_lm and sample_speech_tokens (instance attributes that
    shadow the methods generate calls) and hooks the EOS classifier, without touching the
    reference's files. Records every call in order."""

    def __init__(self, model: Realtime, neg_cache: Any, stop_after: int | None = None) -> None:
        self.model = model
        self.neg_cache = neg_cache
        self.stop_after = stop_after
        self.calls: list[list[Any]] = []  # [kind, first position, count]
        self.lm_hidden: list[torch.Tensor] = []
        self.tts_text: list[torch.Tensor] = []
        self.tts_speech: list[torch.Tensor] = []
        self.neg_speech: list[torch.Tensor] = []
        self.cond: list[torch.Tensor] = []
        self.neg_cond: list[torch.Tensor] = []
        self.noise: list[torch.Tensor] = []
        self.latents: list[torch.Tensor] = []
        self.eos_logit: list[torch.Tensor] = []
        self.eos_input: list[torch.Tensor] = []
        self.nudge: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._inside_tts = 0

    def stop(self) -> bool:
        return self.stop_after is not None and len(self.latents) >= self.stop_after

    @contextmanager
    def installed(self) -> Iterator[Recorder]:
        model = self.model
        lm, tts, sample = model.forward_lm, model.forward_tts_lm, model.sample_speech_tokens

        def forward_lm(*args: Any, **kwargs: Any) -> Any:
            out = lm(*args, **kwargs)
            pos = kwargs["position_ids"][0]
            self.calls.append(["lm", int(pos[0]), len(pos)])
            self.lm_hidden.append(out.last_hidden_state[0].detach().clone())
            return out

        def forward_tts_lm(*args: Any, **kwargs: Any) -> Any:
            self._inside_tts += 1
            try:
                out = tts(*args, **kwargs)
            finally:
                self._inside_tts -= 1
            negative = kwargs["past_key_values"] is self.neg_cache
            text = bool(kwargs["tts_text_masks"].all())
            pos = kwargs["position_ids"][0]
            kind = ("neg_" if negative else "") + ("tts_text" if text else "tts_speech")
            self.calls.append([kind, int(pos[0]), len(pos)])
            h = out.last_hidden_state[0].detach().clone()
            {"tts_text": self.tts_text, "tts_speech": self.tts_speech}.get(
                kind, self.neg_speech
            ).append(h)
            return out

        def sample_speech_tokens(condition: Any, neg_condition: Any, cfg_scale: float) -> Any:
            state = torch.get_rng_state()  # peek at the noise the call is about to draw
            self.noise.append(torch.randn(2, model.config.acoustic_vae_dim))
            after = torch.get_rng_state()
            torch.set_rng_state(state)
            out = sample(condition, neg_condition, cfg_scale=cfg_scale)
            assert torch.equal(torch.get_rng_state(), after), "the sampler drew other noise"
            if self.nudge is not None:
                out = self.nudge(out)
            self.cond.append(condition[0].detach().clone())
            self.neg_cond.append(neg_condition[0].detach().clone())
            self.latents.append(out[0].detach().clone())
            self.calls.append(["sample", len(self.latents) - 1, 1])
            return out

        def on_eos(_module: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if not self._inside_tts:  # generate's own check, not forward_tts_lm's logits
                self.eos_input.append(args[0][0].detach().clone())
                self.eos_logit.append(out.reshape(-1)[0].detach().clone())

        model.forward_lm = forward_lm
        model.forward_tts_lm = forward_tts_lm
        model.sample_speech_tokens = sample_speech_tokens
        handle = model.tts_eos_classifier.register_forward_hook(on_eos)
        try:
            yield self
        finally:
            handle.remove()
            for name in ("forward_lm", "forward_tts_lm", "sample_speech_tokens"):
                delattr(model, name)


def generate(
    model: Realtime,
    processor: VibeVoiceStreamingProcessor,
    preset: dict[str, Any],
    case: dict[str, Any],
    stop_after: int | None = None,
    nudge: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Any, Any, Recorder]:
    """The file demo's generation call, recorded."""
    inputs = processor.process_input_with_cached_prompt(
        text=case["text"],
        cached_prompt=preset,
        padding=True,
        return_tensors="pt",
        return_attention_mask=True,
    )
    prefilled = copy.deepcopy(preset)
    rec = Recorder(model, prefilled["neg_tts_lm"].past_key_values, stop_after)
    rec.nudge = nudge
    with rec.installed():
        model.set_ddpm_inference_steps(num_steps=STEPS)
        torch.manual_seed(case["seed"])
        out = model.generate(
            **inputs,
            max_new_tokens=None,
            cfg_scale=case["cfg_scale"],
            tokenizer=processor.tokenizer,
            generation_config={"do_sample": False},
            all_prefilled_outputs=prefilled,
            verbose=False,
            show_progress_bar=False,
            stop_check_fn=rec.stop if stop_after is not None else None,
        )
    return inputs, out, rec


def text_windows(processor: VibeVoiceStreamingProcessor, text: str) -> int:
    ids = processor.tokenizer.encode(text.strip() + "\n", add_special_tokens=False)
    return -(-len(ids) // TEXT_WINDOW)


def search(out: Path) -> None:
    """Find WEIGHTS_SEED, the cases' seeds and the EOS threshold: generate with EOS disabled,
    project the classifier's hidden layer (relu(fc1(h)) for each frame's new positive TTS-LM
    state h) on fc2's random direction (z_t), and look for a threshold theta that z_t first
    crosses inside EOS_FRAMES and after the last text window, in both cases, with the widest
    margin relative to z's spread. Then EOS_SCALE is a power of two (logits of a useful size)
    and EOS_BIAS = -EOS_SCALE * theta, rounded to a value bf16 holds exactly."""
    best: list[tuple[float, str]] = []
    for seed in range(1, 13):
        tiny = out / f"search-{seed}"
        build(tiny, seed, 1.0, -1e4)
        model, processor = load(tiny)
        preset = make_preset(model, processor)
        fc2 = model.tts_eos_classifier.fc2.weight[0].detach()
        first_allowed = [
            max(EOS_FRAMES[0], SPEECH_WINDOW * text_windows(processor, c["text"])) for c in CASES
        ]
        zs: list[dict[int, torch.Tensor]] = [{}, {}]
        for i, case in enumerate(CASES):
            for gen_seed in range(1, 9):
                run = {**case, "seed": gen_seed}
                _, _, rec = generate(model, processor, preset, run, stop_after=EOS_FRAMES[1] + 1)
                fc1 = model.tts_eos_classifier.fc1
                with torch.no_grad():
                    f = torch.relu(fc1(torch.stack(rec.eos_input)))
                zs[i][gen_seed] = f @ fc2
        for a_seed, za in zs[0].items():
            spread = float(za.std())
            for t in range(first_allowed[0], EOS_FRAMES[1] + 1):
                lo, hi = float(za[:t].max()), float(za[t])
                if hi <= lo:
                    continue
                theta = (lo + hi) / 2
                margin_a = (hi - lo) / 2
                for b_seed, zb in zs[1].items():
                    above = (zb > theta).nonzero()
                    if len(above) == 0:
                        continue
                    tb = int(above[0])
                    if not first_allowed[1] <= tb <= EOS_FRAMES[1]:
                        continue
                    margin_b = min(float(zb[tb]) - theta, theta - float(zb[:tb].max()))
                    margin = min(margin_a, margin_b) / spread
                    best.append(
                        (
                            margin,
                            f"WEIGHTS_SEED={seed} theta={theta:.5f} spread={spread:.4f} "
                            f"seeds=({a_seed}, {b_seed}) eos frames=({t}, {tb})",
                        )
                    )
        print(seed, "best so far:", max(best) if best else None, flush=True)
    for margin, line in sorted(best)[-10:]:
        print(f"margin {margin:.3f}: {line}")


def record(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tiny = out / "tiny"
    build(tiny, WEIGHTS_SEED, EOS_SCALE, EOS_BIAS)
    model, processor = load(tiny)
    preset = make_preset(model, processor)
    torch.save(preset, out / "voice.pt")
    # Everything below runs the reference as the file demo does: from the files, in fp32.
    voice = torch.load(out / "voice.pt", map_location="cpu", weights_only=False)
    tok = processor.tokenizer
    fx: dict[str, torch.Tensor] = {}
    cases = []
    for case in CASES:
        sfx = case["suffix"]
        inputs, result, rec = generate(model, processor, voice, case)
        audio = result.speech_outputs[0].reshape(-1).float()
        assert audio.numel() % FRAME == 0
        frames = audio.numel() // FRAME
        probs = torch.sigmoid(torch.stack(rec.eos_logit))
        fired = (probs > 0.5).nonzero()
        assert len(fired) > 0 and int(fired[0]) == frames - 1, "EOS did not end the take"
        windows = text_windows(processor, case["text"])
        assert frames - 1 >= SPEECH_WINDOW * windows, "EOS fired before the text ran out"
        assert EOS_FRAMES[0] <= frames - 1 <= EOS_FRAMES[1], frames
        assert float(audio.std()) > 0.02, "the tiny model's audio is near silence"
        ids = tok.encode(case["text"].strip() + "\n", add_special_tokens=False)
        assert inputs["tts_text_ids"][0].tolist() == ids
        lm_tokens = sum(h.shape[0] for h in rec.lm_hidden)
        assert lm_tokens == len(ids) and len(rec.lm_hidden) == windows
        fx.update(
            {
                "audio" + sfx: audio,
                "latents" + sfx: torch.stack(rec.latents[:frames]),
                "eos_prob" + sfx: probs[:frames],
                "eos_logit" + sfx: torch.stack(rec.eos_logit[:frames]),
                "lm_hidden_0" + sfx: rec.lm_hidden[0],
                "tts_hidden_text_0" + sfx: rec.tts_text[0],
                "lm_hidden" + sfx: torch.cat(rec.lm_hidden),
                "tts_hidden_text" + sfx: torch.cat(rec.tts_text),
                "tts_hidden_speech" + sfx: torch.cat(rec.tts_speech[:frames]),
                "neg_hidden_speech" + sfx: torch.cat(rec.neg_speech[:frames]),
                "cond" + sfx: torch.stack(rec.cond[:frames]),
                "neg_cond" + sfx: torch.stack(rec.neg_cond[:frames]),
                "noise" + sfx: torch.stack(rec.noise[:frames]),
            }
        )
        logits = torch.stack(rec.eos_logit[:frames])
        # How far 1 ulp on every latent moves the audio: the fixture must not hinge on rounding.
        _, nudged, _ = generate(
            model, processor, voice, case, nudge=lambda x: torch.nextafter(x, x + 1)
        )
        nudged_audio = nudged.speech_outputs[0].reshape(-1).float()
        assert nudged_audio.shape == audio.shape, "1 ulp per latent moved the EOS frame"
        cases.append(
            {
                "suffix": sfx,
                "text": case["text"],
                "seed": case["seed"],
                "cfg_scale": case["cfg_scale"],
                "steps": STEPS,
                "tts_text_ids": ids,
                "text_windows": windows,
                "frames": frames,
                "samples": audio.numel(),
                "eos_frame": frames - 1,
                "reached_max": bool(result.reach_max_step_sample.any()),
                "frames_sampled": len(rec.latents),  # the EOS window's remaining frames too
                "sequences_len": result.sequences.shape[1],
                "audio_std": float(audio.std()),
                "audio_peak": float(audio.abs().max()),
                "eos_margin_logit": float(logits.abs().min()),
                "one_ulp_latent_audio_max_diff": float((nudged_audio - audio).abs().max()),
                "calls": rec.calls,
            }
        )
        print(json.dumps({k: v for k, v in cases[-1].items() if k != "calls"}), flush=True)
    save_file(
        {k: v.contiguous().float() for k, v in fx.items()}, str(out / "reference.safetensors")
    )

    # Self-consistency: a fresh load of the saved checkpoint and preset regenerates the same audio.
    again, processor_again = load(tiny)
    voice_again = torch.load(out / "voice.pt", map_location="cpu", weights_only=False)
    written = load_file(str(out / "reference.safetensors"))
    for case in CASES:
        _, result, _ = generate(again, processor_again, voice_again, case)
        audio = result.speech_outputs[0].reshape(-1).float()
        assert torch.equal(audio, written["audio" + case["suffix"]]), case["suffix"]

    lengths = {k: int(v.last_hidden_state.shape[1]) for k, v in voice.items()}
    first = cases[0]
    summary = {
        "reference": {
            "repo": "microsoft/VibeVoice",
            "commit": REFERENCE_COMMIT,
            "path": "demo/realtime_model_inference_from_file.py (model.generate, DPM-Solver++)",
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "diffusers": version("diffusers"),
        },
        "timesteps": [int(t) for t in model.model.noise_scheduler.timesteps],
        "weights_seed": WEIGHTS_SEED,
        "eos_scale": EOS_SCALE,
        "eos_bias": EOS_BIAS,
        "preset": {
            "prompt_text": PROMPT_TEXT,
            "prompt_ids": tok.encode(PROMPT_TEXT, add_special_tokens=False),
            "prompt_frames": PROMPT_FRAMES,
            "seed": PRESET_SEED,
            "negative_id": tok.convert_tokens_to_ids(NEGATIVE_TOKEN),
            "lengths": lengths,
        },
        "calls_format": "every recorded call in order: [kind, first position, positions]; "
        "kinds lm, tts_text, tts_speech, neg_tts_speech; for sample, [sample, frame, 1]",
        # The first case's fields at the top level too.
        **{k: first[k] for k in first if k not in ("suffix", "calls")},
        "cases": cases,
    }
    (out / "reference.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("preset lengths", lengths)


def main() -> None:
    # from_pretrained lists the acoustic encoder's tensors as newly initialized: the official
    # checkpoint has none (generation never encodes audio), so that warning is expected.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    assert "site-packages" not in vibevoice.__file__, (
        f"imported {vibevoice.__file__}: put the VibeVoice checkout first on PYTHONPATH"
    )
    out = Path(sys.argv[1])
    if "--search" in sys.argv[2:]:
        with tempfile.TemporaryDirectory() as tmp:
            search(Path(tmp))
    else:
        record(out)


if __name__ == "__main__":
    main()
