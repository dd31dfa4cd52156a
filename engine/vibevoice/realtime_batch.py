"""One engine loop for every VibeVoice-Realtime session: text windows and speech frames of all
sessions in two batched device steps (where a Realtime frame is computed).

Pool (allocated once, written in place; S = max_slots, W = window, H = hidden):
    lm     KVCache (lm layers, S, kv_heads, W + 1, head_dim)    row i: slot i's lower LM
    tts    KVCache (tts layers, 2S, kv_heads, W + 1, head_dim)  row 2i: slot i's positive TTS
           stream, row 2i+1: its negative one; index W is the scratch column masked rows write
    h      (S, 2, H)     last TTS state of both rows    pos   (S, 3) int64: the next position of
                                                               the lower LM, TTS +, TTS − rows
    text   (S, 5) int64  this step's text window        n_text (S,) int64: its length, 0: none
    active (S,) bool     makes a frame this step        cfg (S, 1) f32, noise (S, latent)
    acoustic decoder state (S, N)                       audio (S, hop) f32, eos (S,) bool: out

A step of the engine is `text_step` (only when some slot starts a window with text: its ids
through the lower LM, then the TTS LM's positive rows) followed by `frame_step` (every slot in
a window makes a frame: CFG diffusion of both rows, a decoder frame, the frame's embedding into
both TTS rows, the EOS check). Both are functions over the pool with no host reads and no
branches on values, the same operations whatever is active: one CUDA graph each, and a
session's audio does not depend on who else is in the batch (all S slots always run, masked).

The window loop itself (which slot takes text, when a turn ends) is the host's
(realtime_backend.py): it knows every position without asking the device, and reads back one
thing per step, the EOS flags with the audio. Memory (bf16, 0.5B: 20 TTS layers × 2 KV heads ×
64 × 2 B × (K, V) = 10 KB per position and row): 2 rows × 8192 positions = 168 MB per slot,
plus the lower LM's 4 layers (17 MB); 64 slots at the model's full 8k context are ~12 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from .batch import count_ops
from .codec import Decoder
from .diffusion import Sampler
from .graphs import StepGraphs
from .lm import KVCache, Qwen2
from .presets import Preset
from .realtime import TEXT_WINDOW, RealtimeRuntime


@dataclass
class Weights:
    """What the steps read and never write."""

    lm: Qwen2  # lower, text only
    tts: Qwen2
    types: torch.Tensor  # (2, H): 0 speech, 1 text
    sampler: Sampler
    decoder: Decoder
    connector: nn.Module
    eos: nn.Module
    scale: torch.Tensor  # 0-dim: latents are decoded as latent / scale - bias
    bias: torch.Tensor
    scratch: int  # the KV index rows that do not step write to (== window: nobody reads it)


@dataclass
class Pool:
    """The device state of every slot (layout in the module docstring)."""

    lm: KVCache
    tts: KVCache
    h: torch.Tensor
    pos: torch.Tensor
    text: torch.Tensor
    n_text: torch.Tensor
    active: torch.Tensor
    cfg: torch.Tensor
    noise: torch.Tensor
    acoustic_flat: torch.Tensor
    acoustic: list[torch.Tensor]
    audio: torch.Tensor
    eos: torch.Tensor


@torch.no_grad()
def text_step(w: Weights, s: Pool) -> None:
    """Slots with n_text > 0 take their window: its ids through the lower LM at its next
    positions, those states (+ the text type) through the positive TTS row. The last state
    becomes the positive condition of the slot's next frame."""
    b, hidden = s.h.shape[0], s.h.shape[2]
    k = torch.arange(TEXT_WINDOW, device=s.text.device)
    valid = k[None] < s.n_text[:, None]  # (b, 5)
    lm_at = torch.where(valid, s.pos[:, 0:1] + k, w.scratch)
    states = w.lm(w.lm.embed_tokens(s.text), lm_at, s.lm, slice(0, b))  # (b, 5, H), not normed
    tts_at = torch.where(valid, s.pos[:, 1:2] + k, w.scratch)
    out = w.tts(states + w.types[1], tts_at, s.tts, slice(0, 2 * b, 2))  # (b, 5, H)
    last = (s.n_text - 1).clamp(min=0)[:, None, None].expand(b, 1, hidden)
    took = (s.n_text > 0)[:, None]
    s.h[:, 0].copy_(torch.where(took, out.gather(1, last)[:, 0], s.h[:, 0]))
    s.pos[:, 0:2].add_(s.n_text[:, None])


@torch.no_grad()
def frame_step(w: Weights, s: Pool) -> None:
    """One speech frame for every active slot, in the reference's order: diffusion from both
    rows' last states, the decoder frame, connector(latent) + the speech type into the positive
    and the negative row (one batch), then the EOS classifier on the new positive state."""
    b, hidden = s.h.shape[0], s.h.shape[2]
    act = s.active
    latent = w.sampler.sample_pairs(s.h.reshape(2 * b, hidden), s.noise, s.cfg)  # (b, latent)
    audio = w.decoder.step((latent / w.scale - w.bias)[:, :, None], s.acoustic, act[:, None, None])
    emb = w.connector(latent) + w.types[0]  # (b, H)
    at = torch.where(act[:, None], s.pos[:, 1:3], w.scratch)  # (b, 2)
    x = emb[:, None].expand(b, 2, hidden).reshape(2 * b, 1, hidden)
    out = w.tts(x, at.reshape(2 * b, 1), s.tts, slice(0, 2 * b)).view(b, 2, hidden)
    s.h.copy_(torch.where(act[:, None, None], out, s.h))
    s.pos[:, 1:3].add_(act.long()[:, None])
    # In the model dtype, as the reference compares it.
    s.eos.copy_(act & (torch.sigmoid(w.eos(s.h[:, 0]))[:, 0] > 0.5))
    s.audio.copy_(audio[:, 0])


@dataclass
class Frame:
    """What one step did for one slot that made a frame."""

    slot: int
    audio: np.ndarray  # (3200,) float32
    eos: bool  # the classifier said speech is over after this frame


@dataclass
class Session:
    gen: torch.Generator  # CPU: the reference draws its noise on the CPU, in fp32
    cfg_scale: float


@dataclass
class Parked:
    """A slot's whole state in host memory, so that a session nobody listens to (its socket
    dropped, waiting for `resume`) holds no slot: the used part of its three KV rows, its rows
    of the other buffers, and the host's mirror of its positions."""

    session: Session
    kv: list[torch.Tensor]  # lm k, lm v, tts k, tts v: (layers, rows, kv_heads, used, head_dim)
    rows: dict[str, torch.Tensor]
    used: list[int]


_ROWS = ("h", "pos", "cfg", "acoustic_flat")  # the per-slot rows of `Pool` besides the KV


class RealtimeEngine:
    """Up to `max_slots` Realtime sessions stepped together. Responsibilities: the pool, a
    slot's life (`open`, `start_turn`, `close`) and `step`, with one host sync per step.
    Every step runs all slots (static shapes: a seed's audio does not depend on the load)."""

    def __init__(
        self,
        rt: RealtimeRuntime,
        max_slots: int,
        window: int,
        steps: int = 5,
        graphs: bool | None = None,
    ) -> None:
        self.rt = rt
        self.max_slots = max_slots
        self.window = window
        self.steps = steps
        dev, dt, cfg = rt.device, rt.dtype, rt.cfg
        m = rt.model.model
        self.w = Weights(
            m.language_model,
            m.tts_language_model,
            m.tts_input_types.weight,
            rt.sampler(steps),
            rt.decoder,
            m.acoustic_connector,
            rt.model.tts_eos_classifier,
            cast(torch.Tensor, m.speech_scaling_factor),
            cast(torch.Tensor, m.speech_bias_factor),
            window,
        )
        s, hidden, i64 = max_slots, cfg.tts.hidden_size, torch.int64

        def zeros(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
            return torch.zeros(shape, device=dev, dtype=dtype)

        acoustic_flat, acoustic = self.w.decoder.flat_state(s, dev, dt)
        self.pool = Pool(
            KVCache.allocate(cfg.lm, s, window + 1, dev, dt),
            KVCache.allocate(cfg.tts, 2 * s, window + 1, dev, dt),
            zeros(s, 2, hidden),
            zeros(s, 3, dtype=i64),
            zeros(s, TEXT_WINDOW, dtype=i64),
            zeros(s, dtype=i64),
            zeros(s, dtype=torch.bool),
            zeros(s, 1, dtype=torch.float32),
            zeros(s, cfg.acoustic.vae_dim),
            acoustic_flat,
            acoustic,
            zeros(s, cfg.acoustic.hop, dtype=torch.float32),
            zeros(s, dtype=torch.bool),
        )
        cuda = dev.type == "cuda"
        # Host side of the per-step inputs: text ids, their count, who speaks, noise (fp32).
        self._stage = (
            torch.zeros((s, TEXT_WINDOW), dtype=i64, pin_memory=cuda),
            torch.zeros(s, dtype=i64, pin_memory=cuda),
            torch.zeros(s, dtype=torch.bool, pin_memory=cuda),
            torch.zeros((s, cfg.acoustic.vae_dim), pin_memory=cuda),
        )
        self.sessions: list[Session | None] = [None] * s
        self._used = [[0, 0, 0] for _ in range(s)]  # host mirror of pos: no reads needed
        self.frames = 0  # frames made, every session together
        self._graphs: tuple[StepGraphs, StepGraphs] | None = None
        if cuda:
            self._audio_host = torch.empty((s, cfg.acoustic.hop), pin_memory=True)
            self._eos_host = torch.empty((s,), dtype=torch.bool, pin_memory=True)
            self._done = torch.cuda.Event()
            if graphs is None or graphs:
                # Captured with nothing active: a warm-up run writes only outputs and scratch.
                self._graphs = (
                    StepGraphs(lambda _: text_step(self.w, self.pool), [s], dev),
                    StepGraphs(lambda _: frame_step(self.w, self.pool), [s], dev),
                )
        elif graphs:
            raise ValueError("CUDA graphs need a CUDA device")

    # -- slots ---------------------------------------------------------------------------------

    def free_slot(self) -> int | None:
        return next((i for i, sess in enumerate(self.sessions) if sess is None), None)

    def open(self, slot: int, seed: int, cfg_scale: float) -> Session:
        if self.sessions[slot] is not None:
            raise ValueError(f"slot {slot} already holds a session")
        session = self.sessions[slot] = Session(torch.Generator().manual_seed(seed), cfg_scale)
        return session

    def close(self, slot: int) -> None:
        self.sessions[slot] = None

    @torch.no_grad()
    def park(self, slot: int) -> Parked:
        """Move the slot's state to host memory and free the slot."""
        sess = self.sessions[slot]
        if sess is None:
            raise ValueError(f"slot {slot} holds no session")
        p, used = self.pool, self._used[slot]
        lm, tts = used[0], max(used[1], used[2])
        kv = [
            p.lm.k[:, slot : slot + 1, :, :lm].to("cpu", copy=True),
            p.lm.v[:, slot : slot + 1, :, :lm].to("cpu", copy=True),
            p.tts.k[:, 2 * slot : 2 * slot + 2, :, :tts].to("cpu", copy=True),
            p.tts.v[:, 2 * slot : 2 * slot + 2, :, :tts].to("cpu", copy=True),
        ]
        rows = {name: getattr(p, name)[slot].to("cpu", copy=True) for name in _ROWS}
        self.sessions[slot] = None
        return Parked(sess, kv, rows, list(used))

    @torch.no_grad()
    def unpark(self, parked: Parked, slot: int) -> None:
        """Put a parked state into a free slot, exactly as it was."""
        if self.sessions[slot] is not None:
            raise ValueError(f"slot {slot} already holds a session")
        p = self.pool
        lm_k, lm_v, tts_k, tts_v = parked.kv
        p.lm.k[:, slot : slot + 1, :, : lm_k.shape[3]].copy_(lm_k)
        p.lm.v[:, slot : slot + 1, :, : lm_v.shape[3]].copy_(lm_v)
        p.tts.k[:, 2 * slot : 2 * slot + 2, :, : tts_k.shape[3]].copy_(tts_k)
        p.tts.v[:, 2 * slot : 2 * slot + 2, :, : tts_v.shape[3]].copy_(tts_v)
        for name, value in parked.rows.items():
            getattr(p, name)[slot].copy_(value)
        self.sessions[slot] = parked.session
        self._used[slot] = list(parked.used)

    def room(self, slot: int) -> int:
        """Positions the slot's turn has left in its fullest row (a text token takes one in
        the lower LM and the positive TTS row, a frame one in both TTS rows)."""
        return self.window - max(self._used[slot])

    @torch.no_grad()
    def start_turn(self, slot: int, preset: Preset) -> None:
        """The slot's three streams start from the preset's caches (shared by every session
        that speaks with it, copied into the slot), the decoder from silence."""
        sess = self.sessions[slot]
        if sess is None:
            raise ValueError(f"slot {slot} holds no session")
        p, i = self.pool, slot
        lengths = (preset.lm.length, preset.tts_lm.length, preset.neg_tts_lm.length)
        if max(lengths) >= self.window:
            raise ValueError(f"preset {preset.name} does not fit the {self.window}-position window")
        for cache, row, stream in (
            (p.lm, i, preset.lm),
            (p.tts, 2 * i, preset.tts_lm),
            (p.tts, 2 * i + 1, preset.neg_tts_lm),
        ):
            cache.k[:, row, :, : stream.length].copy_(stream.k)
            cache.v[:, row, :, : stream.length].copy_(stream.v)
        p.h[i, 0].copy_(preset.tts_lm.hidden[-1])
        p.h[i, 1].copy_(preset.neg_tts_lm.hidden[-1])
        p.pos[i] = torch.tensor(lengths)
        p.cfg[i, 0] = sess.cfg_scale
        p.acoustic_flat[i].zero_()
        self._used[i] = list(lengths)

    # -- the loop ------------------------------------------------------------------------------

    def step(self, windows: dict[int, list[int]], speaking: list[int]) -> list[Frame]:
        """Run the text windows given (slot -> up to 5 ids; empty: none), then a frame for
        every slot in `speaking`; returns those frames. The caller keeps both within `room`."""
        p = self.pool
        # The step's inputs are written into host buffers kept for it, then copied over once
        # each (the previous step's copies are done: `_fetch` waited for its outputs).
        text, n, active, noise = self._stage
        if any(windows.values()):
            n.zero_()
            for slot, ids in windows.items():
                if len(ids) > TEXT_WINDOW or len(ids) > self.room(slot):
                    raise ValueError(f"slot {slot}: a window of {len(ids)} does not fit")
                text[slot, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
                n[slot] = len(ids)
                self._used[slot][0] += len(ids)
                self._used[slot][1] += len(ids)
            p.text.copy_(text, non_blocking=True)
            p.n_text.copy_(n, non_blocking=True)
            self._run(0)
        if not speaking:
            self.rt.sync()  # the staged text must be copied before a next step rewrites it
            return []
        active.zero_()
        for slot in speaking:
            sess = self.sessions[slot]
            if sess is None or self.room(slot) < 1:
                raise ValueError(f"slot {slot} cannot make a frame")
            active[slot] = True
            # Noise for this frame from the session's generator, outside the captured step:
            # a graph cannot replay per-session generators.
            self.rt.noise(sess.gen, noise[slot])
            self._used[slot][1] += 1
            self._used[slot][2] += 1
        p.active.copy_(active, non_blocking=True)
        p.noise.copy_(noise, non_blocking=True)  # cast to the model dtype here, as the reference
        self._run(1)
        audio, eos = self._fetch()
        self.frames += len(speaking)
        return [Frame(i, audio[i].copy(), bool(eos[i])) for i in speaking]

    def _run(self, which: int) -> None:
        if self._graphs is not None:
            self._graphs[which].replay(self.max_slots)
        elif which == 0:
            text_step(self.w, self.pool)
        else:
            frame_step(self.w, self.pool)

    def _fetch(self) -> tuple[np.ndarray, np.ndarray]:
        """The step's one device-to-host read: audio and EOS flags of every slot."""
        p = self.pool
        if self.rt.device.type != "cuda":
            return p.audio.numpy(), p.eos.numpy()
        self._audio_host.copy_(p.audio, non_blocking=True)
        self._eos_host.copy_(p.eos, non_blocking=True)
        self._done.record()
        self._done.synchronize()
        return self._audio_host.numpy(), self._eos_host.numpy()

    def ops_per_step(self) -> tuple[int, int]:
        """Operations the text step and the frame step dispatch (eagerly): fixed numbers.
        Run with nothing in either step, so the pool is left as it was (outputs aside)."""
        self.pool.n_text.zero_()
        self.pool.active.zero_()
        return (
            count_ops(lambda: text_step(self.w, self.pool)),
            count_ops(lambda: frame_step(self.w, self.pool)),
        )
