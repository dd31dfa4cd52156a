"""The Qwen2.5 decoder with a preallocated KV cache written in place.

One `forward` serves prefill and decode. A cache holds a few rows (streams), e.g. the positive
and the negative (classifier-free guidance) stream of one turn, so both run as one batch and
the weights are read once. Within a row, cache index == RoPE position, so attention needs no
separate lengths: a query at position p attends to cache entries 0..p. Restarting a stream at
position 0 therefore hides everything it wrote before, without clearing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .layers import SwiGLU
from .norm import RMSNorm


@dataclass
class KVCache:
    """k, v: (layers, rows, kv_heads, capacity, head_dim), allocated once, written in place."""

    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def allocate(
        cfg: LMConfig, rows: int, capacity: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def copy_prefix(self, source: KVCache, length: int, row: int = 0) -> None:
        """Put positions 0..length-1 of `source` row 0 into `row` (a turn reuses the prefix)."""
        self.k[:, row, :, :length].copy_(source.k[:, 0, :, :length])
        self.v[:, row, :, :length].copy_(source.v[:, 0, :, :length])


def rope(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (R, T, head_dim), in fp32 then cast, half-split layout."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * hd, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (R, T, H)
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # (R, kv_heads, S, hd): this layer, these rows (a view)
        v_cache: torch.Tensor,
        positions: torch.Tensor,  # (R, T)
        mask: torch.Tensor,  # (R, 1, T, S) bool
    ) -> torch.Tensor:
        r, t, _ = x.shape
        q = self.q_proj(x).view(r, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(r, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(r, t, self.n_kv, self.head_dim)
        q = _rotate(q, cos[:, :, None], sin[:, :, None]).transpose(1, 2)  # (R, nh, T, hd)
        k = _rotate(k, cos[:, :, None], sin[:, :, None])
        rows = torch.arange(r, device=x.device)[:, None].expand(r, t)
        # Write this step's keys and values at their positions: k_cache[row, :, pos] = k[row, t].
        k_cache[rows, :, positions] = k
        v_cache[rows, :, positions] = v
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(r, t, -1))


class Layer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    """`model.language_model` in the checkpoint (a plain Qwen2Model: no lm_head here).

    `final_norm=False`: Realtime's lower LM, whose final norm is an identity (its states go on
    into the TTS LM's first layer, which norms them itself), so the checkpoint has no weight."""

    def __init__(self, cfg: LMConfig, final_norm: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if final_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (R, T, H) input embeddings
        positions: torch.Tensor,  # (R, T) int64: RoPE position == cache index
        cache: KVCache,
        rows: slice,  # which cache rows these R streams use (a slice, so no copy is made)
    ) -> torch.Tensor:
        """Hidden states (R, T, H), final-normed; writes K/V of the T new positions.

        `rows` may be strided (Realtime: `slice(0, 2S, 2)`, the positive TTS rows): a view."""
        cos, sin = rope(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        span = torch.arange(cache.capacity, device=x.device)
        mask = (span[None, None, :] <= positions[:, :, None])[:, None]  # (R, 1, T, S)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn(
                layer.input_layernorm(x),
                cos,
                sin,
                cache.k[i, rows],
                cache.v[i, rows],
                positions,
                mask,
            )
            x = x + attn
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x if self.norm is None else self.norm(x)
