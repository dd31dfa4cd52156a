"""Numerical parity with the reference implementation (vibevoice 0.0.1 on transformers 4.51.3),
recorded on a tiny random checkpoint by scripts/make_vibevoice_fixtures.py; fp32 on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from vibevoice_helpers import TINY, reference, tiny_runtime

from vibecast.engine.script import parse_script
from vibecast.engine.vibevoice.lm import KVCache
from vibecast.engine.vibevoice.processor import normalize_voice, script_prompt, voice_frames
from vibecast.protocol.wav import read_wav, wav_bytes


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def rt():
    return tiny_runtime()


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float((a - b).abs().max())
    assert diff <= tol, diff
    return diff


@torch.no_grad()
def test_lm_hidden_states(ref, rt) -> None:
    fx, _ = ref
    ids = fx["lm_ids"]
    cache = KVCache.allocate(rt.cfg.lm, 1, ids.shape[1], "cpu", torch.float32)
    h = rt.lm(rt.lm.embed_tokens(ids), torch.arange(ids.shape[1])[None], cache, slice(0, 1))
    close(h, fx["lm_hidden"], 1e-5)


@torch.no_grad()
def test_diffusion_head_evaluation(ref, rt) -> None:
    fx, _ = ref
    head = rt.model.model.prediction_head
    v = head(fx["head_x"], head.time_embedding(fx["head_t"]), head.cond_proj(fx["head_cond"]))
    close(v, fx["head_v"], 1e-5)


@torch.no_grad()
def test_cfg_sampling_of_a_frame(ref, rt) -> None:
    fx, meta = ref
    out = rt.sampler(meta["steps"]).sample(
        fx["cfg_pos"], fx["cfg_neg"], fx["cfg_noise"][:1], meta["cfg_scale"]
    )
    close(out, fx["cfg_out"], 1e-5)


def frame_by_frame(module, x: torch.Tensor, hop: int) -> torch.Tensor:
    """Streaming: feed one latent frame (hop = 1) or 3200 samples (hop = 3200) at a time."""
    state = module.new_state(1, "cpu", torch.float32)
    return torch.cat(
        [module.step(x[..., i : i + hop], state) for i in range(0, x.shape[-1], hop)], -1
    )


@torch.no_grad()
def test_streaming_decoder_audio(ref, rt) -> None:
    fx, _ = ref
    decoder = rt.model.model.acoustic_tokenizer.decoder
    close(frame_by_frame(decoder, fx["dec_latents"], 1), fx["dec_streaming"], 1e-5)
    close(decoder(fx["dec_latents"]), fx["dec_offline"], 1e-5)


@torch.no_grad()
def test_semantic_encoder_features(ref, rt) -> None:
    fx, _ = ref
    encoder = rt.model.model.semantic_tokenizer.encoder
    close(
        frame_by_frame(encoder, fx["sem_audio"], 3200).permute(0, 2, 1), fx["sem_streaming"], 1e-5
    )
    close(encoder(fx["sem_audio"]).permute(0, 2, 1), fx["sem_offline"], 1e-5)


@torch.no_grad()
def test_acoustic_encoder_of_voice_prompts(ref, rt) -> None:
    fx, _ = ref
    mean = rt.model.model.acoustic_tokenizer.encoder(fx["enc_audio"]).permute(0, 2, 1)
    close(mean, fx["enc_mean"], 1e-5)


def _lines(meta) -> list[tuple[int, str]]:
    return [(line.speaker, line.text) for line in parse_script(meta["script"])]


def test_prompt_layout_is_the_reference_processors(ref, rt) -> None:
    fx, meta = ref
    wavs = [normalize_voice(fx[f"voice_{i}"].numpy()) for i in range(2)]
    prompt = script_prompt(rt.tok, _lines(meta), [voice_frames(len(w)) for w in wavs])
    assert prompt.ids == meta["prompt_ids"]
    assert [prompt.ids[i] for i in prompt.voice_slots] == [rt.tok.speech_diffusion] * sum(
        voice_frames(len(w)) for w in wavs
    )


@pytest.mark.parametrize("mode", ["context", "continuous"])
def test_synth_command_writes_the_same_audio(ref, tmp_path: Path, mode: str) -> None:
    """`context` (the default window) and `continuous` (a window for the whole script) are one
    code path; both hold this script whole, so both are the reference's generate."""
    fx, meta = ref
    script = tmp_path / "script.txt"
    script.write_text(meta["script"])
    voices = []
    for i in range(2):
        path = tmp_path / f"voice{i}.wav"
        path.write_bytes(wav_bytes(fx[f"voice_{i}"].numpy(), 24000, float32=True))
        voices += ["--voice", str(path)]
    out = tmp_path / "out.wav"
    cmd = [
        sys.executable,
        "-c",
        "from vibecast.cli import main; main()",
        "synth",
        "--model",
        str(TINY),
        "--script",
        str(script),
        *voices,
        "--mode",
        mode,
        "--seed",
        str(meta["seed"]),
        "--steps",
        str(meta["steps"]),
        "--cfg-scale",
        str(meta["cfg_scale"]),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    audio, rate = read_wav(out.read_bytes())
    assert rate == 24000
    assert np.abs(audio - fx["gen_audio"].numpy()).max() <= 1e-4
