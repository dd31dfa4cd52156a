"""Runs INSIDE the throwaway reference environment (vibevoice==0.0.1, transformers==4.51.3),
never in vibecast's own: build a tiny random VibeVoice checkpoint in the official format and
record what the reference implementation computes on it. Driven by make_vibevoice_fixtures.py.

    python vibevoice_reference.py OUT_DIR
writes OUT_DIR/tiny/ (config.json, model.safetensors, tokenizer.json) and
OUT_DIR/reference.safetensors + OUT_DIR/reference.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from vibevoice.modular.configuration_vibevoice import VibeVoiceConfig
from vibevoice.modular.modeling_vibevoice_inference import (
    VibeVoiceForConditionalGenerationInference,
)
from vibevoice.modular.modular_vibevoice_text_tokenizer import VibeVoiceTextTokenizerFast
from vibevoice.modular.modular_vibevoice_tokenizer import VibeVoiceTokenizerStreamingCache
from vibevoice.processor.vibevoice_processor import VibeVoiceProcessor
from vibevoice.processor.vibevoice_tokenizer_processor import VibeVoiceTokenizerProcessor

SCRIPT = (
    "Speaker 1: Hello there, and welcome to the show.\n"
    "Speaker 2: Thanks, it is good to be here.\n"
    "Speaker 1: Shall we start?\n"
)
SEED = 7
CFG_SCALE = 1.3
STEPS = 5
# Found by a search over these four weights, the noise and the weights seed: with them the
# reference generates 69 tokens with diffusion runs, segment ends and restarts, a mid-segment
# speech_start and a final eos (reference.json records the counts).
ROW_WEIGHTS = {
    "<|vision_pad|>": 3.97,
    "<|vision_end|>": 2.89,
    "<|vision_start|>": 3.16,
    "<|endoftext|>": 2.39,
}
ROW_NOISE = 1.31
WEIGHTS_SEED = 11
SPECIAL = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>"]
CORPUS = [
    " Transform the text provided by various speakers into speech output, utilizing the distinct"
    " voice of each respective speaker.\n",
    " Voice input:\n Text input:\n Speech output:\n Speaker 0: Speaker 1: Speaker 2: Speaker 3:\n",
    SCRIPT,
    "The quick brown fox jumps over the lazy dog. Good morning, good evening, welcome back.",
    "Streaming speech, first audio, turns and voices: warm up, one line is enough here.",
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


def tiny_config(vocab: int) -> dict:
    codec = {
        "causal": True,
        "channels": 1,
        "conv_bias": True,
        "conv_norm": "none",
        "corpus_normalize": 0.0,
        "encoder_n_filters": 2,
        "decoder_n_filters": 2,
        "encoder_ratios": [8, 5, 5, 4, 2, 2],
        "decoder_ratios": [8, 5, 5, 4, 2, 2],
        "encoder_depths": "1-1-1-1-1-1-2",
        "decoder_depths": None,
        "disable_last_norm": True,
        "layer_scale_init_value": 1e-6,
        "layernorm": "RMSNorm",
        "layernorm_elementwise_affine": True,
        "layernorm_eps": 1e-5,
        "mixer_layer": "depthwise_conv",
        "pad_mode": "constant",
        "weight_init_value": 0.01,
    }
    return {
        "model_type": "vibevoice",
        "acoustic_vae_dim": 8,
        "semantic_vae_dim": 16,
        "acoustic_tokenizer_config": {
            **codec,
            "vae_dim": 8,
            "fix_std": 0.5,
            "std_dist_type": "gaussian",
        },
        "semantic_tokenizer_config": {
            **codec,
            "vae_dim": 16,
            "fix_std": 0,
            "std_dist_type": "none",
        },
        "decoder_config": {
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "hidden_act": "silu",
        },
        "diffusion_head_config": {
            "hidden_size": 32,
            "head_layers": 2,
            "head_ffn_ratio": 3.0,
            "latent_size": 8,
            "speech_vae_dim": 8,
            "rms_norm_eps": 1e-5,
            "ddpm_num_steps": 1000,
            "ddpm_num_inference_steps": 20,
            "ddpm_beta_schedule": "cosine",
            "prediction_type": "v_prediction",
            "ddpm_batch_mul": 4,
            "diffusion_type": "ddpm",
        },
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,  # the reference ties on this top-level flag
    }


# Gains that keep the tiny random model well-conditioned: with unit gains its autoregressive
# loop (audio -> semantic encoder -> LM -> next latent) is chaotic, and a 1e-6 change in one
# weight moves the output by ~1, which no two float implementations could agree on.
GAMMA = 0.1  # residual-branch scale of the codec blocks
CODEC_GAIN = 0.5
OUT_GAIN = 2.0  # the decoder's last conv: audio within about +-0.5


def randomize(model: VibeVoiceForConditionalGenerationInference, seed: int) -> None:
    """Every tensor random (the reference zero-initializes parts of the head), at sane scales."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(GAMMA * (1.0 + 0.2 * noise))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                gain = CODEC_GAIN if "tokenizer" in name else 1.0
                if name.startswith("model.acoustic_tokenizer.decoder.head"):
                    gain = OUT_GAIN
                p.copy_(gain * noise / math.sqrt(max(1, fan_in)))
    model.model.speech_scaling_factor.fill_(0.75)
    model.model.speech_bias_factor.fill_(-0.1)


def shape_special_rows(
    model: VibeVoiceForConditionalGenerationInference,
    prompt: torch.Tensor,
    tok: Tokenizer,
    seed: int,
) -> None:
    """Random weights choose one token forever. Point the four allowed tokens' output rows
    (lm_head: this tiny model is untied, like the 7B) along the LM's mean hidden direction with
    different weights, so that generation mostly diffuses, now and then ends a segment, starts
    another, and finally stops: every branch of the loop gets exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h = model.model.language_model(input_ids=prompt).last_hidden_state[0]
        d = torch.nn.functional.normalize(h.mean(0), dim=0)
        emb = model.lm_head.weight
        for token, beta in ROW_WEIGHTS.items():
            i = tok.token_to_id(token)
            emb[i] = beta * d + ROW_NOISE * torch.randn(emb.shape[1], generator=g) / math.sqrt(
                emb.shape[1]
            )


def voices() -> list[np.ndarray]:
    """Two synthetic voice prompts: harmonic tones with vibrato and a little noise."""
    rng = np.random.default_rng(3)
    out = []
    for n, f0 in ((11000, 140.0), (7500, 210.0)):
        t = np.arange(n) / 24000
        phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / 24000
        wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + 0.01 * rng.standard_normal(n)
        out.append(wave.astype(np.float32))
    return out


def main(out: Path, weights_seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tiny = out / "tiny"
    tiny.mkdir(exist_ok=True)
    tok = tiny_tokenizer()
    tok.save(str(tiny / "tokenizer.json"))
    config = VibeVoiceConfig(**tiny_config(tok.get_vocab_size()))
    torch.manual_seed(0)
    model = VibeVoiceForConditionalGenerationInference(config)
    randomize(model, weights_seed)
    processor0 = VibeVoiceProcessor(
        tokenizer=VibeVoiceTextTokenizerFast.from_pretrained(tiny),
        audio_processor=VibeVoiceTokenizerProcessor(),
    )
    prompt = processor0(text=[SCRIPT], voice_samples=[voices()], return_tensors="pt")["input_ids"]
    shape_special_rows(model, prompt, tok, weights_seed)
    model.to(torch.bfloat16).save_pretrained(tiny, safe_serialization=True)
    (tiny / "generation_config.json").unlink(missing_ok=True)  # transformers' extra, not ours

    # Everything below runs the reference as a user would: loaded from the files, in fp32.
    ref = VibeVoiceForConditionalGenerationInference.from_pretrained(
        tiny, torch_dtype=torch.float32
    )
    ref.eval()
    m = ref.model
    fx: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(11)

    with torch.no_grad():
        ids = torch.tensor([tok.encode(CORPUS[0]).ids])
        fx["lm_ids"] = ids
        fx["lm_hidden"] = m.language_model(input_ids=ids).last_hidden_state

        x = torch.randn(3, 8, generator=g)
        t = torch.tensor([999.0, 500.0, 100.0])
        cond = torch.randn(3, 32, generator=g)
        fx.update(
            head_x=x, head_t=t, head_cond=cond, head_v=m.prediction_head(x, t, condition=cond)
        )

        pos, neg = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
        ref.set_ddpm_inference_steps(STEPS)
        torch.manual_seed(5)
        noise = torch.randn(2, 8)
        torch.manual_seed(5)
        fx.update(
            cfg_pos=pos,
            cfg_neg=neg,
            cfg_noise=noise,
            cfg_out=ref.sample_speech_tokens(pos, neg, cfg_scale=CFG_SCALE),
        )

        latents = torch.randn(1, 8, 6, generator=g)
        cache = VibeVoiceTokenizerStreamingCache()
        idx = torch.tensor([0])
        frames = [
            m.acoustic_tokenizer.decode(
                latents[:, :, i : i + 1], cache=cache, sample_indices=idx, use_cache=True
            )
            for i in range(6)
        ]
        fx.update(
            dec_latents=latents,
            dec_streaming=torch.cat(frames, -1),
            dec_offline=m.acoustic_tokenizer.decode(latents),
        )

        audio = torch.randn(1, 1, 4 * 3200, generator=g) * 0.3
        cache = VibeVoiceTokenizerStreamingCache()
        feats = [
            m.semantic_tokenizer.encode(
                audio[..., i * 3200 : (i + 1) * 3200],
                cache=cache,
                sample_indices=idx,
                use_cache=True,
            ).mean
            for i in range(4)
        ]
        fx.update(
            sem_audio=audio,
            sem_streaming=torch.cat(feats, 1),
            sem_offline=m.semantic_tokenizer.encode(audio).mean,
        )

        clip = torch.randn(2, 1, 9000, generator=g) * 0.2
        fx.update(enc_audio=clip, enc_mean=m.acoustic_tokenizer.encode(clip).mean)

    processor = VibeVoiceProcessor(
        tokenizer=VibeVoiceTextTokenizerFast.from_pretrained(tiny),
        audio_processor=VibeVoiceTokenizerProcessor(),
    )
    v = voices()
    inputs, tokens, speech, _ = generate(ref, processor, SCRIPT, v, SEED)
    fx.update(voice_0=torch.from_numpy(v[0]), voice_1=torch.from_numpy(v[1]))
    fx["gen_audio"] = speech
    save_file(
        {
            k: t.contiguous().float() if t.is_floating_point() else t.contiguous()
            for k, t in fx.items()
        },
        out / "reference.safetensors",
    )
    t_ = processor.tokenizer
    summary = {
        "script": SCRIPT,
        "seed": SEED,
        "cfg_scale": CFG_SCALE,
        "steps": STEPS,
        "weights_seed": weights_seed,
        "prompt_ids": inputs["input_ids"][0].tolist(),
        "tokens": tokens,
        "counts": {
            name: tokens.count(i)
            for name, i in (
                ("diffusion", t_.speech_diffusion_id),
                ("speech_end", t_.speech_end_id),
                ("speech_start", t_.speech_start_id),
                ("eos", t_.eos_id),
            )
        },
    }
    (out / "reference.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["counts"]), len(tokens), "tokens,", fx["gen_audio"].numel(), "samples")
    record_long(ref, processor, out, fx["gen_audio"])


def generate(ref, processor, script: str, wavs: list[np.ndarray], seed: int):
    """The reference's whole-script generate, as a user runs it; also returns every input the
    positive stream consumed, (1, prompt + generated - 1, H): a pre-hook on the LM's caller."""
    inputs = processor(
        text=[script],
        voice_samples=[wavs],
        padding=True,
        return_tensors="pt",
        return_attention_mask=True,
    )
    seen: list[tuple[int, torch.Tensor]] = []

    def hook(_module, _args, kwargs):
        seen.append((id(kwargs["past_key_values"]), kwargs["inputs_embeds"].detach().clone()))

    handle = ref.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ref.set_ddpm_inference_steps(STEPS)
        torch.manual_seed(seed)
        result = ref.generate(
            **inputs,
            max_new_tokens=None,
            cfg_scale=CFG_SCALE,
            tokenizer=processor.tokenizer,
            generation_config={"do_sample": False},
            verbose=False,
            show_progress_bar=False,
        )
    finally:
        handle.remove()
    positive = seen[0][0]  # the prefill is the positive stream's first call
    consumed = torch.cat([x for cache, x in seen if cache == positive], dim=1)
    prompt_len = inputs["input_ids"].shape[1]
    tokens = result.sequences[0, prompt_len:].tolist()
    speech = result.speech_outputs[0].reshape(-1).float()
    return inputs, tokens, speech, consumed


LONG_SCRIPT = (
    "Speaker 1: Good morning, good evening, welcome back to the show.\n"
    "Speaker 2: Thanks, it is good to be here again.\n"
    "Speaker 3: The quick brown fox jumps over the lazy dog.\n"
    "Speaker 1: Shall we start with the first question?\n"
    "Speaker 2: One line is enough here, warm up.\n"
    "Speaker 3: Streaming speech, first audio, turns and voices.\n"
    "Speaker 1: Hello there, and welcome to the show.\n"
)
LONG_SEED = 19  # 119 frames; one ulp on the voices moves its audio by 4e-6 (seed 10: 7e-5)
DROP = 4  # the rebuild fixture drops the first turns of the long take, keeps the next two


def record_long(ref, processor, out: Path, short_audio: torch.Tensor) -> None:
    """A longer take (several turns, 60+ frames), the same runs again on one thread (a fixture
    must not hinge on rounding), and the LM forward over a context with its first turns
    dropped: what a window rebuild must reproduce."""
    tok = processor.tokenizer
    wavs = voices()
    rng = np.random.default_rng(5)
    t = np.arange(9000) / 24000
    third = (0.2 * np.sin(2 * np.pi * 175.0 * t) + 0.01 * rng.standard_normal(len(t))).astype(
        np.float32
    )
    wavs = [*wavs, third]
    inputs, tokens, speech, consumed = generate(ref, processor, LONG_SCRIPT, wavs, LONG_SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, tokens_1, speech_1, _ = generate(ref, processor, LONG_SCRIPT, wavs, LONG_SEED)
    _, short_1, short_speech_1, _ = generate(ref, processor, SCRIPT, voices(), SEED)
    torch.set_num_threads(threads)
    assert tokens_1 == tokens
    # Thread counts barely change this tiny model's kernels, so also nudge every voice sample
    # by one ulp: how far that moves the audio is how far fp32 rounding alone can move it.
    ulp = [np.nextafter(w, np.float32(np.inf)) for w in wavs]
    _, tokens_u, speech_u, _ = generate(ref, processor, LONG_SCRIPT, ulp, LONG_SEED)
    ulp_short = [np.nextafter(w, np.float32(np.inf)) for w in voices()]
    _, short_u, short_speech_u, _ = generate(ref, processor, SCRIPT, ulp_short, SEED)
    assert tokens_u == tokens

    # The rebuilt context: the prefix as the reference embedded it, the text block of the
    # lines from DROP on, then what the positive consumed while speaking turns DROP.. (turn k:
    # the inputs after the k-th speech_end, up to and including the next one; the leading
    # speech_start of turn DROP is the text block's own).
    ids = inputs["input_ids"][0].tolist()
    header = tok.encode(" Text input:\n", add_special_tokens=False)
    start = next(i for i in range(len(ids)) if ids[i : i + len(header)] == header)
    lines = [line for line in LONG_SCRIPT.splitlines() if line]
    texts = [line.split(":", 1)[1].strip() for line in lines]
    speakers = [int(line.split(":")[0].split()[1]) - 1 for line in lines]
    block = list(header)
    for speaker, text in list(zip(speakers, texts, strict=True))[DROP:]:
        block += tok.encode(f" Speaker {speaker}: {text}\n", add_special_tokens=False)
    block += tok.encode(" Speech output:\n", add_special_tokens=False) + [tok.speech_start_id]
    generated = consumed[0, len(ids) :]  # (generated - 1, H): tokens[j]'s input at row j
    ends = [j for j, t in enumerate(tokens[:-1]) if t == tok.speech_end_id]
    keep_from = ends[DROP - 1] + 1  # turn DROP's first input
    keep_to = ends[DROP + 1] + 1  # through turn DROP + 1's speech_end
    kept = list(range(keep_from, keep_to))
    if tokens[keep_from] == tok.speech_start_id:
        kept = kept[1:]
    embed = ref.model.get_input_embeddings()
    seq = torch.cat(
        [consumed[:, :start], embed(torch.tensor([block])), generated[None, kept]], dim=1
    )
    with torch.no_grad():
        lm = ref.model.language_model(inputs_embeds=seq, use_cache=True)
    cache = lm.past_key_values
    fx = {
        "long_audio": speech,
        "long_audio_1thread": speech_1,
        "short_audio_1thread": short_speech_1,
        "long_consumed": consumed[0],
        "voice_2": torch.from_numpy(third),
        "rebuild_hidden": lm.last_hidden_state[0, -1],
        "rebuild_k0": cache.key_cache[0][0, :, start:],
        "rebuild_v0": cache.value_cache[0][0, :, start:],
        "rebuild_k1": cache.key_cache[-1][0, :, start:],
        "rebuild_v1": cache.value_cache[-1][0, :, start:],
    }
    save_file({k: v.contiguous().float() for k, v in fx.items()}, out / "long.safetensors")
    counts = {
        name: tokens.count(i)
        for name, i in (
            ("diffusion", tok.speech_diffusion_id),
            ("speech_end", tok.speech_end_id),
            ("speech_start", tok.speech_start_id),
            ("eos", tok.eos_id),
        )
    }
    summary = {
        "script": LONG_SCRIPT,
        "seed": LONG_SEED,
        "prompt_ids": ids,
        "prefix_len": start,
        "tokens": tokens,
        "counts": counts,
        "drop": DROP,
        "rebuild_ids": [*block, *[tokens[j] for j in kept]],
        "rebuild_frames": [j for j in kept if tokens[j] == tok.speech_diffusion_id],
        "threads": threads,
        "one_thread_max_diff": {
            "short": float((short_speech_1 - short_audio).abs().max()),
            "long": float((speech_1 - speech).abs().max()),
        },
        "one_ulp_max_diff": {
            "short": float((short_speech_u - short_audio).abs().max())
            if short_u == short_1
            else None,
            "long": float((speech_u - speech).abs().max()),
        },
    }
    assert short_1 == json.loads((out / "reference.json").read_text())["tokens"]
    (out / "long.json").write_text(json.dumps(summary, indent=1))
    print("long:", json.dumps(counts), summary["one_thread_max_diff"], summary["one_ulp_max_diff"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else WEIGHTS_SEED)
