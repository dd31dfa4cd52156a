"""The speech tokenizers: causal convolutional encoders and decoder (σ-VAE acoustic, semantic).

Modules hold weights only. Streaming state lives outside them, one preallocated buffer per
causal conv (`new_state`), written in place on every `step`, so that any number of sessions
share one set of weights. Offline `forward` and chunk-by-chunk `step` give the same output
(tests/test_vibevoice_streaming.py) for chunks that are whole latent frames (3200 samples).

Batched sessions (batch.py) step all streams at once with a `mask` (B, 1, 1): a stream whose
mask is False computes like the others but keeps its state, so shapes never depend on which
streams are live (CUDA graphs). Their state can be one flat (B, N) buffer (`flat_state`),
every conv's buffer a view of it, so that zeroing or copying one stream is one operation.

Module paths reproduce the checkpoint's names (…stages.3.1.mixer.conv.conv.conv.weight), which
is why a few containers exist only to nest a name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CodecConfig
from .layers import nest
from .norm import RMSNorm


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: `context` = kernel - stride samples of left history."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        self.conv = nest(conv=nn.Conv1d(cin, cout, kernel, stride, groups=groups, bias=bias))
        self.kernel, self.stride, self.cin = kernel, stride, cin
        self.context = kernel - stride
        self.slot = -1  # index of this conv's buffer in a state list

    @property
    def weight_conv(self) -> nn.Conv1d:
        return self.conv.conv  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero history on the left; on the right, enough zeros for a whole last output frame.
        t = x.shape[-1]
        frames = math.ceil((t - self.kernel + self.context) / self.stride + 1)
        extra = (frames - 1) * self.stride + self.kernel - self.context - t
        return self.weight_conv(F.pad(x, (self.context, extra)))

    def step(
        self, x: torch.Tensor, states: list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        state = states[self.slot]  # (B, cin, context)
        full = torch.cat([state, x], dim=-1)
        tail = full[..., full.shape[-1] - self.context :]
        # mask (B, 1, 1): where False the stream keeps its state (torch.where: static shapes)
        state.copy_(tail if mask is None else torch.where(mask, tail, state))
        return self.weight_conv(full)

    def state_shape(self) -> tuple[int, int]:
        return self.cin, self.context


class CausalConvTranspose1d(nn.Module):
    """Upsampling by `stride` with kernel 2·stride; the causal trim drops the right overhang.

    With kernel <= 2·stride an output frame depends on its input frame and the one before, so
    the streaming state is the previous input frame (zeros before the first).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, bias: bool = True) -> None:
        super().__init__()
        if kernel > 2 * stride:
            raise ValueError("streaming needs kernel <= 2 * stride")
        self.convtr = nest(convtr=nn.ConvTranspose1d(cin, cout, kernel, stride, bias=bias))
        self.kernel, self.stride, self.cin = kernel, stride, cin
        self.slot = -1

    @property
    def weight_conv(self) -> nn.ConvTranspose1d:
        return self.convtr.convtr  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_conv(x)
        return y[..., : x.shape[-1] * self.stride]

    def step(
        self, x: torch.Tensor, states: list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        state = states[self.slot]  # (B, cin, 1)
        y = self.weight_conv(torch.cat([state, x], dim=-1))
        last = x[..., -1:]
        state.copy_(last if mask is None else torch.where(mask, last, state))
        return y[..., self.stride : self.stride * (x.shape[-1] + 1)]

    def state_shape(self) -> tuple[int, int]:
        return self.cin, 1


class Block(nn.Module):
    """Norm → depthwise causal conv → scale → residual, then norm → GELU MLP → scale → residual."""

    def __init__(self, dim: int, cfg: CodecConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, cfg.layernorm_eps, channels_first=True)
        self.mixer = nest(
            conv=CausalConv1d(dim, dim, cfg.kernel_size, groups=dim, bias=cfg.conv_bias)
        )
        self.ffn_norm = RMSNorm(dim, cfg.layernorm_eps, channels_first=True)
        self.ffn = nest(
            linear1=nn.Linear(dim, 4 * dim, bias=cfg.conv_bias),
            linear2=nn.Linear(4 * dim, dim, bias=cfg.conv_bias),
        )
        self.gamma: nn.Parameter | None = None
        self.ffn_gamma: nn.Parameter | None = None
        if cfg.layer_scale:
            self.gamma = nn.Parameter(torch.ones(dim))
            self.ffn_gamma = nn.Parameter(torch.ones(dim))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # channels last for the linears: (B, T, C)
        h = self.ffn.linear2(F.gelu(self.ffn.linear1(h)))
        return h.transpose(1, 2)

    def _scaled(self, x: torch.Tensor, gamma: nn.Parameter | None) -> torch.Tensor:
        return x * gamma[:, None] if gamma is not None else x

    def forward(
        self,
        x: torch.Tensor,
        states: list[torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        conv: CausalConv1d = self.mixer.conv  # type: ignore[assignment]
        h = self.norm(x)
        h = conv(h) if states is None else conv.step(h, states, mask)
        x = x + self._scaled(h, self.gamma)
        return x + self._scaled(self._mlp(self.ffn_norm(x)), self.ffn_gamma)


class _Stack(nn.Module):
    """Shared by encoder and decoder: (resampling layer, stage of blocks) × 7, then the head."""

    stages: nn.ModuleList
    head: CausalConv1d
    norm: nn.Module | None

    @property
    def resamplers(self) -> nn.ModuleList:
        raise NotImplementedError

    def _number_slots(self) -> None:
        self._streaming: list[nn.Module] = []
        for m in self.modules():
            if isinstance(m, (CausalConv1d, CausalConvTranspose1d)):
                m.slot = len(self._streaming)
                self._streaming.append(m)

    def new_state(
        self, batch: int, device: torch.device | str, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Zeroed streaming state for `batch` streams: one buffer per causal conv."""
        return [
            torch.zeros(batch, *m.state_shape(), device=device, dtype=dtype)
            for m in self._streaming
        ]

    def state_size(self) -> int:
        """State numbers per stream, all convs together: N of a flat (B, N) state."""
        return sum(cin * context for cin, context in (m.state_shape() for m in self._streaming))

    def state_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A state list whose buffers are views of `flat` (B, N): conv j's (B, cin, context) is
        columns [offset_j, offset_j + cin·context) of every row, so writes land in `flat`."""
        views, offset = [], 0
        for m in self._streaming:
            cin, context = m.state_shape()
            views.append(flat[:, offset : offset + cin * context].unflatten(1, (cin, context)))
            offset += cin * context
        return views

    def flat_state(
        self, batch: int, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Zeroed state for `batch` streams as one (B, N) buffer and the state list over it."""
        flat = torch.zeros(batch, self.state_size(), device=device, dtype=dtype)
        return flat, self.state_views(flat)

    def _run(
        self, x: torch.Tensor, states: list[torch.Tensor] | None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        for resample, stage in zip(self.resamplers, self.stages, strict=True):
            layer = resample[0]
            x = layer(x) if states is None else layer.step(x, states, mask)
            for block in stage:
                x = block(x, states, mask)
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x) if states is None else self.head.step(x, states, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Offline: the whole signal at once (zero history before it)."""
        return self._run(x, None)

    def step(
        self, x: torch.Tensor, states: list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Streaming: the next chunk, continuing from `states` (updated in place).

        `mask` (B, 1, 1) bool: only streams where it is True advance their state; the others
        compute all the same (their output is the caller's to ignore) and keep it.
        """
        return self._run(x, states, mask)


class Encoder(_Stack):
    """Audio (B, 1, T) → latents (B, vae_dim, T / hop)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        nf, ratios = cfg.n_filters, list(reversed(cfg.ratios))
        layers = [nn.ModuleList([CausalConv1d(1, nf, cfg.kernel_size, bias=cfg.conv_bias)])]
        for i, r in enumerate(ratios):
            conv = CausalConv1d(nf * 2**i, nf * 2 ** (i + 1), 2 * r, r, bias=cfg.conv_bias)
            layers.append(nn.ModuleList([conv]))
        self.downsample_layers = nn.ModuleList(layers)
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(nf * 2**i, cfg) for _ in range(depth))
            for i, depth in enumerate(cfg.encoder_depths)
        )
        top = nf * 2 ** (len(cfg.encoder_depths) - 1)
        self.norm = RMSNorm(top, cfg.layernorm_eps, channels_first=True) if cfg.last_norm else None
        self.head = CausalConv1d(top, cfg.vae_dim, cfg.last_kernel_size, bias=cfg.conv_bias)
        self._number_slots()

    @property
    def resamplers(self) -> nn.ModuleList:
        return self.downsample_layers


class Decoder(_Stack):
    """Latents (B, vae_dim, F) → audio (B, 1, F · hop)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        nf, n = cfg.n_filters, len(cfg.decoder_depths)
        layers = [
            nn.ModuleList(
                [CausalConv1d(cfg.vae_dim, nf * 2 ** (n - 1), cfg.kernel_size, bias=cfg.conv_bias)]
            )
        ]
        for i, r in enumerate(cfg.ratios):
            up = CausalConvTranspose1d(
                nf * 2 ** (n - 1 - i), nf * 2 ** (n - 2 - i), 2 * r, r, bias=cfg.conv_bias
            )
            layers.append(nn.ModuleList([up]))
        self.upsample_layers = nn.ModuleList(layers)
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(nf * 2 ** (n - 1 - i), cfg) for _ in range(depth))
            for i, depth in enumerate(cfg.decoder_depths)
        )
        self.norm = RMSNorm(nf, cfg.layernorm_eps, channels_first=True) if cfg.last_norm else None
        self.head = CausalConv1d(nf, 1, cfg.last_kernel_size, bias=cfg.conv_bias)
        self._number_slots()

    @property
    def resamplers(self) -> nn.ModuleList:
        return self.upsample_layers
