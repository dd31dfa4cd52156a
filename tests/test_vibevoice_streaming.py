"""Streaming equals offline for every streaming module of the speech tokenizers, and a reset
state is as good as a fresh one."""

from __future__ import annotations

import pytest
import torch

from vibecast.engine.vibevoice.codec import (
    Block,
    CausalConv1d,
    CausalConvTranspose1d,
    Decoder,
    Encoder,
)
from vibecast.engine.vibevoice.config import CodecConfig


def tiny_codec(depths: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 2)) -> CodecConfig:
    return CodecConfig(
        vae_dim=8,
        n_filters=2,
        ratios=(8, 5, 5, 4, 2, 2),
        encoder_depths=depths,
        decoder_depths=tuple(reversed(depths)),
        layernorm_eps=1e-5,
        layer_scale=True,
        last_norm=False,
        conv_bias=True,
        fix_std=0.5,
        std_dist_type="gaussian",
    )


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights scaled by fan-in, so signals stay O(1) through seven stages."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return module


def stream(module, x: torch.Tensor, cuts: list[int], state: list[torch.Tensor]) -> torch.Tensor:
    pieces = torch.tensor_split(x, cuts, dim=-1)
    return torch.cat(
        [
            module.step(p, state) if not isinstance(module, Block) else module(p, state)
            for p in pieces
        ],
        -1,
    )


def state_for(*modules) -> list[torch.Tensor]:
    states: list[torch.Tensor] = []
    for m in modules:
        m.slot = len(states)
        states.append(torch.zeros(1, *m.state_shape()))
    return states


@pytest.mark.parametrize(
    ("kernel", "stride", "groups"), [(7, 1, 1), (7, 1, 4), (16, 8, 1), (4, 2, 1), (10, 5, 1)]
)
@torch.no_grad()
def test_causal_conv(kernel: int, stride: int, groups: int) -> None:
    conv = randomize(CausalConv1d(4, 4, kernel, stride, groups=groups))
    x = torch.randn(1, 4, stride * 37)
    offline = conv(x)
    assert offline.shape[-1] == 37
    for cuts in ([stride * 5], [stride * i for i in (1, 2, 3, 10, 30)], []):
        torch.testing.assert_close(
            stream(conv, x, cuts, state_for(conv)), offline, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("stride", [2, 4, 5, 8])
@torch.no_grad()
def test_causal_conv_transpose(stride: int) -> None:
    up = randomize(CausalConvTranspose1d(6, 3, 2 * stride, stride))
    x = torch.randn(1, 6, 23)
    offline = up(x)
    assert offline.shape[-1] == 23 * stride
    for cuts in ([1], [1, 2, 3, 7, 20], [11]):
        torch.testing.assert_close(stream(up, x, cuts, state_for(up)), offline, rtol=0, atol=1e-5)


@torch.no_grad()
def test_block() -> None:
    block = randomize(Block(8, tiny_codec()))
    conv = block.mixer.conv
    x = torch.randn(1, 8, 50)
    offline = block(x)
    torch.testing.assert_close(
        stream(block, x, [3, 10, 11, 40], state_for(conv)), offline, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("frames_per_chunk", [1, 2, 3])
@torch.no_grad()
def test_whole_decoder_and_encoder(frames_per_chunk: int) -> None:
    cfg = tiny_codec()
    decoder, encoder = randomize(Decoder(cfg), 1), randomize(Encoder(cfg), 2)
    latents = torch.randn(1, 8, 7)
    audio = decoder(latents)
    assert audio.shape == (1, 1, 7 * 3200)
    cuts = list(range(frames_per_chunk, 7, frames_per_chunk))
    state = decoder.new_state(1, "cpu", torch.float32)
    scale = float(audio.abs().max())
    assert scale > 0.1
    torch.testing.assert_close(
        stream(decoder, latents, cuts, state), audio, rtol=0, atol=1e-5 * scale
    )
    features = encoder(audio)
    assert features.shape == (1, 8, 7)
    state = encoder.new_state(1, "cpu", torch.float32)
    streamed = stream(encoder, audio, [c * 3200 for c in cuts], state)
    torch.testing.assert_close(streamed, features, rtol=0, atol=1e-5 * float(features.abs().max()))


@torch.no_grad()
def test_zeroed_state_equals_a_fresh_one() -> None:
    decoder = randomize(Decoder(tiny_codec()), 3)
    latents = torch.randn(1, 8, 3)
    state = decoder.new_state(1, "cpu", torch.float32)
    first = decoder.step(latents, state)
    decoder.step(torch.randn(1, 8, 2), state)  # something else in between
    for s in state:
        s.zero_()
    torch.testing.assert_close(decoder.step(latents, state), first, rtol=0, atol=0)
