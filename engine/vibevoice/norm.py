"""RMS normalisation as every part of VibeVoice computes it: in fp32, cast back, then scaled."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Over the last axis of (..., D), or with `channels_first` over C of the codec's (B, C, T).

    `affine=False` is the diffusion head's final norm, which the checkpoint stores no weight for.
    """

    def __init__(
        self, dim: int, eps: float, affine: bool = True, channels_first: bool = False
    ) -> None:
        super().__init__()
        self.eps = eps
        self.axis = 1 if channels_first else -1
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(self.axis, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is None:
            return y
        return y * (self.weight[:, None] if self.axis == 1 else self.weight)
