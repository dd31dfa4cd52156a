"""The per-frame diffusion head and its sampler (DPM-Solver++ 2M, cosine schedule, v-prediction).

The schedule is a handful of scalars per step, computed once (`Schedule`); the timestep
embeddings of those steps are fixed too (`Sampler.t_emb`). Classifier-free guidance runs the
positive and negative conditions as one batch of 2N rows per step: `sample` takes them as two
blocks (one session), `sample_pairs` interleaved with a scale per stream (batched sessions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import HeadConfig
from .layers import SwiGLU, nest
from .norm import RMSNorm


class _HeadLayer(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.ffn = SwiGLU(h, cfg.ffn_dim)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 3 * h, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        return x + gate * self.ffn(self.norm(x) * (1 + scale) + shift)


class _FinalLayer(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.norm_final = RMSNorm(h, cfg.rms_norm_eps, affine=False)
        self.linear = nn.Linear(h, cfg.latent_size, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal features of t, [cos | sin], in fp32, then cast to t's dtype."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


class DiffusionHead(nn.Module):
    """`model.prediction_head`: v = head(x_noisy, t, condition)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.noisy_images_proj = nn.Linear(cfg.latent_size, h, bias=False)
        self.cond_proj = nn.Linear(h, h, bias=False)
        self.t_embedder = nest(
            mlp=nn.Sequential(nn.Linear(256, h, bias=False), nn.SiLU(), nn.Linear(h, h, bias=False))
        )
        self.layers = nn.ModuleList(_HeadLayer(cfg) for _ in range(cfg.layers))
        self.final_layer = _FinalLayer(cfg)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.t_embedder.mlp(timestep_features(t))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (N, latent), t_emb (1 or N, H) from `time_embedding`, cond (N, H) already projected."""
        c = cond + t_emb
        h = self.noisy_images_proj(x)
        for layer in self.layers:
            h = layer(h, c)
        return self.final_layer(h, c)


@dataclass
class Schedule:
    """DPM-Solver++ (2nd order midpoint, final step 1st order to sigma 0) for `steps` steps.

    Per step i, with model output m_i = v-prediction:
        x0_i  = alpha_i · x − sigma_i · m_i
        x    ← ratio_i · x − e_i · x0_i − 0.5 · e_i · k_i · (x0_i − x0_{i−1})
    where k_i = 0 on first-order steps (the first and the last).
    """

    timesteps: torch.Tensor  # (steps,) int64
    alpha: torch.Tensor  # (steps,) float32
    sigma: torch.Tensor
    ratio: torch.Tensor
    e: torch.Tensor
    k: torch.Tensor

    @staticmethod
    def build(cfg: HeadConfig, steps: int) -> Schedule:
        if (
            cfg.beta_schedule not in ("cosine", "squaredcos_cap_v2")
            or cfg.prediction_type != "v_prediction"
        ):
            raise ValueError("only the cosine schedule with v-prediction is implemented")
        n = cfg.train_steps

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=torch.float32,
        )
        cumprod = torch.cumprod(1.0 - betas, dim=0)
        timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        all_sigmas = (((1 - cumprod) / cumprod) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
        sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))

        def alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = 1 / ((s**2 + 1) ** 0.5)
            return a, s * a

        alpha, sigma, ratio, e, k = [], [], [], [], []
        for i in range(steps):
            a_s, s_s = alpha_sigma(sig[i])
            a_t, s_t = alpha_sigma(sig[i + 1])
            lam_t = torch.log(a_t) - torch.log(s_t)
            lam_s = torch.log(a_s) - torch.log(s_s)
            h = lam_t - lam_s
            alpha.append(a_s)
            sigma.append(s_s)
            ratio.append(s_t / s_s)
            e.append(a_t * (torch.exp(-h) - 1.0))
            if 0 < i < steps - 1:  # second order: needs the previous x0
                a_p, s_p = alpha_sigma(sig[i - 1])
                lam_p = torch.log(a_p) - torch.log(s_p)
                k.append(1.0 / ((lam_s - lam_p) / h))
            else:
                k.append(torch.tensor(0.0))
        f32 = torch.float32
        return Schedule(
            torch.from_numpy(timesteps),
            torch.stack(alpha).to(f32),
            torch.stack(sigma).to(f32),
            torch.stack(ratio).to(f32),
            torch.stack(e).to(f32),
            torch.stack(k).to(f32),
        )

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(
            *(
                getattr(self, f).to(device)
                for f in ("timesteps", "alpha", "sigma", "ratio", "e", "k")
            )
        )


class Sampler:
    """CFG sampling of one latent frame per stream, with everything per-step precomputed."""

    def __init__(
        self, head: DiffusionHead, steps: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.head = head
        self.schedule = Schedule.build(head.cfg, steps).to(device)
        with torch.no_grad():
            t = self.schedule.timesteps.to(dtype)  # the reference embeds timesteps in model dtype
            self.t_emb = head.time_embedding(t)  # (steps, H)
        self.dtype = dtype
        steps_n = self.schedule.steps
        self.second_order = [0 < i < steps_n - 1 for i in range(steps_n)]  # host-side: no syncs

    @torch.no_grad()
    def sample(
        self, cond_pos: torch.Tensor, cond_neg: torch.Tensor, noise: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """cond_*: (N, H) LM hidden states; noise: (N, latent) -> (N, latent), scaled space."""
        n = cond_pos.shape[0]
        s = self.schedule
        cond = self.head.cond_proj(torch.cat([cond_pos, cond_neg], dim=0))  # once per frame
        x = noise
        x0_prev = None
        for i in range(s.steps):
            v = self.head(torch.cat([x, x], dim=0), self.t_emb[i : i + 1], cond)
            v_pos, v_neg = v[:n], v[n:]
            guided = v_neg + cfg_scale * (v_pos - v_neg)
            x, x0_prev = self._update(i, x, guided, x0_prev)
        return x

    def _update(
        self, i: int, x: torch.Tensor, guided: torch.Tensor, x0_prev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DPM-Solver++ step i from the guided v-prediction: (next x, this step's x0)."""
        s = self.schedule
        x0 = s.alpha[i] * x - s.sigma[i] * guided  # in the model dtype, as the reference
        xf = x.float()
        if x0_prev is None or not self.second_order[i]:
            nxt = s.ratio[i] * xf - s.e[i] * x0
        else:
            nxt = s.ratio[i] * xf - s.e[i] * x0 - 0.5 * s.e[i] * (s.k[i] * (x0 - x0_prev))
        return nxt.to(self.dtype), x0

    @torch.no_grad()
    def sample_pairs(
        self, cond: torch.Tensor, noise: torch.Tensor, cfg_scale: torch.Tensor
    ) -> torch.Tensor:
        """`sample` for N streams at once, rows paired as the batched KV pool lays them out.

        cond (2N, H): row 2i the positive, 2i+1 the negative condition of stream i;
        noise (N, latent); cfg_scale (N, 1) float32, one scale per stream -> (N, latent).
        The same arithmetic as `sample` row for row: the guidance product is taken in fp32 and
        rounded once to the model dtype, which is what a Python-float scale does in `sample`.
        A fixed number of operations whatever the values (no host branches on tensors).
        """
        n = noise.shape[0]
        s = self.schedule
        c = self.head.cond_proj(cond)  # (2N, H), once per frame
        x = noise
        x0_prev = None
        for i in range(s.steps):
            pair = x[:, None].expand(n, 2, -1).reshape(2 * n, -1)  # (2N, latent): x_i twice
            v = self.head(pair, self.t_emb[i : i + 1], c).view(n, 2, -1)
            v_pos, v_neg = v[:, 0], v[:, 1]
            guided = v_neg + (cfg_scale * (v_pos - v_neg)).to(v.dtype)
            x, x0_prev = self._update(i, x, guided, x0_prev)
        return x
