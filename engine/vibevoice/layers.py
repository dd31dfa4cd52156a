"""Building blocks that more than one part of VibeVoice uses: the LM, the diffusion head, the codec.

Attribute names here are checkpoint tensor names, so changing one breaks loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """The gated MLP of Qwen2's layers and of the diffusion head's layers."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def nest(**children: nn.Module) -> nn.Module:
    """A container whose only job is to put `children` under the checkpoint's names."""
    box = nn.Module()
    for name, child in children.items():
        box.add_module(name, child)
    return box
