"""RMS normalisation as every part of VibeVoice computes it: in fp32, cast back, then scaled."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, dim: int = -1) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y
