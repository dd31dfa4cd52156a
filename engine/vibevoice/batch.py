"""One engine loop for every session: VibeVoice frames of many sessions in one decode step.

`Runtime.frames` (generate.py) runs one session: per frame an LM step of 2 rows, a CFG
diffusion of 2 rows, the streaming codec and the connectors, about 4,000 small operations.
Here `BatchEngine` runs that frame for up to `max_slots` sessions at once, with shapes that
never depend on which slots are live, so one step is one CUDA graph (graphs.py).

Pool layout (allocated once, written in place; S = max_slots, W = window):
    KV      (layers, 2S, kv_heads, W + 1, head_dim)  row 2i: slot i's positive stream,
            row 2i+1: its negative stream; index W is a scratch column that masked rows write
    h       (S, 2, H)     last hidden state of both rows      pos    (S, 2) int64, see `Slots`
    tokens  (S,) int64    the token each slot consumes next   n, cap (S,) frames done / allowed
    forced  (S,) int64    frames_per_turn, -1 = choose        cfg    (S, 1) float32
    active  (S,) bool     acoustic / semantic codec state: one flat (S, N) buffer each
    noise   (S, latent)   audio (S, 3200) float32, report (S, 3) int64: the step's outputs

Why a preallocated pool and not paged blocks. A slot never holds the script: in `turns` mode the
voice prefix and one turn, in `context` mode a window that slides at turn boundaries
(context.py), so its length is bounded when a turn starts (`check_turn` refuses a turn that
may not fit even alone, before anything is generated). Fixed rows waste what a slot leaves
unused (up to half the pool: the negative row only ever holds one turn's frames), but
- SDPA wants a contiguous (rows, heads, S, head_dim) cache; paged blocks need a block table
  and a paged-attention kernel (flash-attn, FlashInfer: not dependencies here), or a gather of
  every row's blocks each step, i.e. another read and write of all the KV per step;
- a CUDA graph needs fixed addresses, which a pool allocated once has for free.
Decode attention reads all W positions of every row (masked), per step 2S · W · 28.7 KB for
1.5B: S = 64, W = 4096 is 15 GB, 4.5 ms at 3.35 TB/s, against a 133 ms frame.

Memory (bf16). 1.5B: 28 layers × (K, V) × 2 KV heads × 128 × 2 B = 28,672 B per position and
row, 57 KB per slot-position: 235 MB per slot at W = 4096, 470 MB at 8192. On an 80 GB GPU,
less 5.4 GB of weights and ~6 GB for the graph pool, activations and prefill, ~68 GB of KV:
~290 slots at W = 4096, ~145 at 8192. 7B (4 KV heads): 57,344 B per position and row,
470 MB per slot at 4096; 80 − 18.7 − 6 ≈ 55 GB: ~117 slots at 4096, ~58 at 8192. Codec state
is 0.6 MB per slot (299k numbers). Beside the pool each session keeps its prefix and the text
being encoded in a 1-row cache (`Session.cache`): ~13 MB for 450 positions. W = 4096 holds
a 4-voice prefix of ~370 positions plus a turn of ~400 text tokens at today's cap (8 frames per
token + 60). Past ~100 slots compute, not memory, should set max_slots: scripts/gpu-check
measures where a step passes 133 ms.

One step (`decode_step`), in `Runtime.frames`' order, for every slot at once:
    token t (chosen at the end of the previous step, already on the device; masked if inactive)
    speech_end / eos: the turn is over (ENDED), the codec state of that slot is zeroed; in
        `context` mode speech_end is consumed like any input and the slot stops at the
        BOUNDARY until the host goes on or rebuilds its context (context.py)
    CFG diffusion of all 2S rows in one head batch -> latent (S, 64)
    acoustic decoder (S streams) -> audio (S, 3200) -> semantic encoder (S streams)
    next input = connectors(latent, features) where t is speech_diffusion, else embed(t)
    negative stream: restarts at 0 on speech_start, keeps its input only on diffusion frames
    one LM forward of 2S rows at their own positions; rows that do not step write to column W
    choose the next token (greedy over the valid ids, or forced), write the report
Codec state changes only where a slot diffused (codec `mask`), everything else per slot only
through torch.where, so an inactive slot is left bit-identical and the op count is constant.

The one sync. The host needs each slot's next token before the next step, but only to draw
noise for the slots that diffuse (per-session generators, in the reference's order:
`Runtime.noise`, once per diffusion frame). So: draw into `noise` (host loop, outside the
captured step), replay, copy `report` and `audio` to pinned host memory without blocking, wait
for that one event, read both. Prefill (`open`, `encode_turn`) runs apart from this loop, on a
stream the caller passes; `start_turn` copies its result into the pool on the decode stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ...protocol.messages import Code, ProtocolError
from .codec import Decoder, Encoder
from .config import SAMPLE_RATE
from .diffusion import Sampler
from .generate import FRAMES_PER_TOKEN, FRAMES_SLACK, Runtime
from .graphs import StepGraphs
from .lm import KVCache, Qwen2
from .processor import normalize_voice, prefix_prompt, text_block, voice_frames

# Report flags, one int64 per slot and step.
FRAME = 1  # the slot made a frame: its token was neither speech_end nor eos
AUDIO = 2  # that frame was speech_diffusion: the slot's row of `audio` holds 3200 new samples
ENDED = 4  # its token was speech_end or eos: the turn is over
CAPPED = 8  # this frame was the turn's last allowed one: the turn is over without speech_end
ACTIVE = 16  # the slot takes part in the next step
BOUNDARY = 32  # (context) the slot consumed speech_end: a turn is over, the host decides what next


@dataclass
class Weights:
    """What the step reads and never writes: modules, the valid-token table, token ids."""

    lm: Qwen2
    sampler: Sampler
    decoder: Decoder  # acoustic
    encoder: Encoder  # semantic
    acoustic_connector: nn.Module
    semantic_connector: nn.Module
    w_valid: torch.Tensor  # (n_valid, H): output-embedding rows of the tokens that may follow
    valid: torch.Tensor  # (n_valid,) int64 ids, ascending: argmax's first-max is the tie order
    scale: torch.Tensor  # 0-dim: latents are decoded as latent / scale - bias
    bias: torch.Tensor
    speech_start: int
    speech_end: int
    speech_diffusion: int
    eos: int
    scratch: int  # KV index that rows not stepping write to (== window: nobody attends it)


@dataclass
class Slots:
    """Device state of the first b slots, views of the pool: `decode_step` reads and writes it.

    `pos[:, 0]` is where the positive row's next input goes. `pos[:, 1]` is the negative
    stream's position as `Runtime.frames` keeps it: that of its last kept input (speech_start
    at 0 when a turn starts); a diffusion frame moves it on by one and writes there, a
    speech_start frame puts it back to 0, other frames write there speculatively.
    """

    cache: KVCache  # the whole pool; these slots own rows [0, 2b)
    h: torch.Tensor  # (b, 2, H)
    pos: torch.Tensor  # (b, 2) int64
    tokens: torch.Tensor  # (b,) int64: what each slot consumes next; always a valid id
    n: torch.Tensor  # (b,) int64: frames made in this turn
    cap: torch.Tensor  # (b,) int64: frames the turn may make (generate.py's max_steps)
    forced: torch.Tensor  # (b,) int64: frames_per_turn, or -1 to choose
    active: torch.Tensor  # (b,) bool
    context: torch.Tensor  # (b,) bool: `context` mode, speech_end is consumed and a boundary
    cfg: torch.Tensor  # (b, 1) float32
    noise: torch.Tensor  # (b, latent), model dtype: drawn by the host before the step
    acoustic_flat: torch.Tensor  # (b, Na): the acoustic decoder's streaming state
    acoustic: list[torch.Tensor]  # views of acoustic_flat, one per causal conv
    semantic_flat: torch.Tensor  # (b, Ns): the semantic encoder's
    semantic: list[torch.Tensor]
    audio: torch.Tensor  # (b, hop) float32, out
    inputs: torch.Tensor  # (b, H), out: the input each slot's rows consumed (context records)
    report: torch.Tensor  # (b, 3) int64, out: token consumed (-1: inactive), next, flags

    def first(self, b: int, decoder: Decoder, encoder: Encoder) -> Slots:
        """Views of slots [0, b): same memory, so a graph captured on them works in place."""
        return Slots(
            self.cache,
            self.h[:b],
            self.pos[:b],
            self.tokens[:b],
            self.n[:b],
            self.cap[:b],
            self.forced[:b],
            self.active[:b],
            self.context[:b],
            self.cfg[:b],
            self.noise[:b],
            self.acoustic_flat[:b],
            decoder.state_views(self.acoustic_flat[:b]),
            self.semantic_flat[:b],
            encoder.state_views(self.semantic_flat[:b]),
            self.audio[:b],
            self.inputs[:b],
            self.report[:b],
        )


@torch.no_grad()
def decode_step(w: Weights, s: Slots) -> None:
    """One frame for every slot in `s`. A function over tensors: no host reads, no branches
    on values, the same operations whatever is active (torch.compile fullgraph, CUDA graphs).
    """
    b, hidden = s.h.shape[0], s.h.shape[2]
    t, act, ctx = s.tokens, s.active, s.context  # NOTE: aliases, overwritten at the end
    consumed = torch.where(act, t, -1)  # (b,) the report's token column
    # `turns`: speech_end or eos ends the turn. `context`: only eos does; speech_end is an input
    # like any other (the reference's layout) and marks a turn boundary for the host.
    closes = act & ((t == w.speech_end) | (t == w.eos))
    ended = closes & ~(ctx & (t == w.speech_end))
    live = act & ~ended  # slots that make a frame
    diff = live & (t == w.speech_diffusion)
    restart = live & (t == w.speech_start)
    boundary = live & (t == w.speech_end)  # context slots only
    last = s.n + 1 >= s.cap  # the turn's last allowed frame
    # generate.py skips the LM after a turn's last frame; a context slot goes on, and its next
    # token is speech_end: the server closes the segment the model did not.
    stepped = live & (~last | ctx)
    capped = live & last & ~boundary

    # Speech for every slot; the codec keeps state only where `diff`, the rest is discarded.
    latent = w.sampler.sample_pairs(s.h.reshape(2 * b, hidden), s.noise, s.cfg)  # (b, latent)
    keep = diff[:, None, None]  # (b, 1, 1)
    audio = w.decoder.step((latent / w.scale - w.bias)[:, :, None], s.acoustic, keep)  # (b,1,hop)
    features = w.encoder.step(audio, s.semantic, keep)[:, :, 0]  # (b, semantic dim)
    speech = w.acoustic_connector(latent) + w.semantic_connector(features)  # (b, H)
    emb = torch.where(diff[:, None], speech, w.lm.embed_tokens(t))  # (b, H)
    # speech_end: the decoder and semantic encoder restart from silence (as Runtime.frames)
    s.acoustic_flat.masked_fill_(closes[:, None], 0)
    s.semantic_flat.masked_fill_(closes[:, None], 0)

    # Both rows of a slot consume `emb`: positive at pos[:, 0], negative at its new position.
    neg = torch.where(restart, 0, s.pos[:, 1] + diff.long())  # (b,)
    write = torch.stack([s.pos[:, 0], neg], dim=1)  # (b, 2)
    # NOTE: a row's later queries give the scratch column weight 0, and 0 · inf is NaN, so what
    # masked rows write there must be finite: it is, the model run on finite (stale) inputs.
    write = torch.where(stepped[:, None], write, w.scratch)
    x = emb[:, None].expand(b, 2, hidden).reshape(2 * b, 1, hidden)
    out = w.lm(x, write.reshape(2 * b, 1), s.cache, slice(0, 2 * b))  # (2b, 1, H)
    s.h.copy_(torch.where(stepped[:, None, None], out.view(b, 2, hidden), s.h))
    s.pos[:, 0].add_(stepped.long())
    s.pos[:, 1].copy_(torch.where(live, neg, s.pos[:, 1]))
    s.n.add_(live.long())

    # The next token, from the new positive hidden state (Runtime.choose), or forced.
    scores = (s.h[:, 0] @ w.w_valid.T).float()  # (b, n_valid)
    chosen = w.valid[scores.argmax(dim=-1)]
    forced = torch.where(s.n < s.forced, w.speech_diffusion, w.speech_end)
    chosen = torch.where(s.forced >= 0, forced, chosen)
    chosen = torch.where(ctx & last, w.speech_end, chosen)
    s.tokens.copy_(torch.where(stepped, chosen, t))
    going = stepped & ~boundary  # a context slot waits at a boundary until the host resumes it
    s.active.copy_(going)

    flags = (
        live.long() * FRAME
        + diff.long() * AUDIO
        + ended.long() * ENDED
        + capped.long() * CAPPED
        + going.long() * ACTIVE
        + boundary.long() * BOUNDARY
    )
    nxt = torch.where(stepped, chosen, -1)
    s.report.copy_(torch.stack([consumed, nxt, flags], dim=1))
    s.audio.copy_(audio[:, 0])
    s.inputs.copy_(emb)


# -- host side -------------------------------------------------------------------------------


@dataclass
class SlotFrame:
    """What one step did for one slot that took part in it."""

    slot: int
    token: int  # the token the slot consumed (the session's token path)
    audio: np.ndarray | None  # (3200,) float32 when the token was speech_diffusion
    ended: bool  # `turns`: speech_end or eos, the turn is over; `context`: eos
    capped: bool  # the turn reached its frame cap with this frame (`turns`: it is over)
    boundary: bool = False  # `context`: speech_end consumed; the slot waits for `go_on`/a rebuild
    input: torch.Tensor | None = None  # `context`, speech_diffusion: the frame's input embedding

    @property
    def done(self) -> bool:
        return self.ended or self.capped


@dataclass
class EncodedTurn:
    """A turn's text prefilled after its session's prefix, waiting for its slot."""

    slot: int
    turn: int
    length: int  # prefix + text (+ the kept turns' speech, in context mode) positions
    max_frames: int
    first: int  # the first token, chosen from the prefill's last hidden state
    prefill_s: float = 0.0  # how long the prefill took (a rebuild's cost)


@dataclass
class Session:
    """Host-side record of the session in a slot: what later turns need."""

    gen: torch.Generator  # voice latents, then one draw per diffusion frame
    cfg_scale: float
    frames_per_turn: int | None
    context: bool  # `context` mode: turns follow each other in one context (context.py)
    prefix_len: int
    cache: KVCache  # 1 row: the prefix, then what is being encoded after it
    h: torch.Tensor  # (1, H): last hidden state of that
    encoded: EncodedTurn | None = None
    copied: torch.cuda.Event | None = None  # CUDA: the pool holds `cache`; write it again


# The per-slot rows of `Slots` that make up a slot's state besides its KV rows.
_SLOT_ROWS = (
    "h",
    "pos",
    "tokens",
    "n",
    "cap",
    "forced",
    "context",
    "cfg",
    "acoustic_flat",
    "semantic_flat",
)


@dataclass
class Parked:
    """A slot's whole state in host memory, so that a session nobody listens to (its socket
    dropped, waiting for resume) holds no slot and no device memory for its turn."""

    session: Session
    k: torch.Tensor  # (layers, 2, kv_heads, used, head_dim): the slot's two rows, used part
    v: torch.Tensor
    rows: dict[str, torch.Tensor]  # one row of each of _SLOT_ROWS
    in_turn: bool
    next: int


def _on(stream: torch.cuda.Stream | None) -> AbstractContextManager[Any]:
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def padded_buckets(max_slots: int) -> list[int]:
    """nano-vllm's batch sizes: 1, 2, 4, 8, then every 16, and max_slots itself."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_slots} | set(range(16, max_slots, 16))
    return sorted(sizes | {max_slots})


class BatchEngine:
    """Up to `max_slots` VibeVoice sessions in `turns` mode, stepped together.

    Responsibilities: the pool (layout in the module docstring) and the slots' lifecycle
    (`open`, `encode_turn` + `start_turn` = `begin_turn`, `pause`, `resume`, `close`), and
    `step`, which makes one frame for every active slot with one host sync.

    Buckets. By default every step runs all max_slots slots, inactive ones masked: then a
    session's frames do not depend on who else is in the batch, bit for bit, because every
    kernel always sees the same shapes (GEMM and conv kernels pick other algorithms, with
    other rounding, for other batch sizes, and an autoregressive loop amplifies that; a seed
    would stop reproducing with the server's load). What that costs at low occupancy is the
    masked rows' share of the step: weights are read once either way, the KV of masked rows
    and their codec convolutions are not free. `buckets=padded_buckets(max_slots)` trades the
    reproducibility for that: a step then runs slots [0, b) for the smallest bucket b above
    the highest active slot, with a CUDA graph per bucket (largest first, one memory pool, as
    nano-vllm). Slots never move either way: the views of [0, b) have fixed addresses, so no
    KV is copied to pack a batch, and holes are masked; `free_slot` hands out the lowest free
    slot, which keeps the active set near the front.
    """

    def __init__(
        self,
        rt: Runtime,
        max_slots: int,
        window: int,
        steps: int = 10,
        buckets: Sequence[int] | None = None,
        graphs: bool | None = None,
    ) -> None:
        self.rt = rt
        self.max_slots = max_slots
        self.window = window
        self.steps = steps  # diffusion steps: one number for the batch (one op count)
        self.buckets = sorted(buckets) if buckets is not None else [max_slots]
        if self.buckets[-1] != max_slots:
            raise ValueError(f"the largest bucket must be max_slots ({max_slots})")
        self.frames_per_token = FRAMES_PER_TOKEN  # the frame cap of a turn, as generate.py
        self.frames_slack = FRAMES_SLACK
        dev, dt, cfg, tok = rt.device, rt.dtype, rt.cfg, rt.tok
        m = rt.model.model
        self.w = Weights(
            rt.lm,
            rt.sampler(steps),
            m.acoustic_tokenizer.decoder,
            m.semantic_tokenizer.encoder,
            m.acoustic_connector,
            m.semantic_connector,
            rt.w_valid,
            torch.tensor(rt.valid, device=dev),
            cast(torch.Tensor, rt.scale),
            cast(torch.Tensor, rt.bias),
            tok.speech_start,
            tok.speech_end,
            tok.speech_diffusion,
            tok.eos,
            window,
        )
        s = max_slots
        hop = cfg.acoustic.hop

        def zeros(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
            return torch.zeros(shape, device=dev, dtype=dtype)

        acoustic_flat, acoustic = self.w.decoder.flat_state(s, dev, dt)
        semantic_flat, semantic = self.w.encoder.flat_state(s, dev, dt)
        i64 = torch.int64
        self.state = Slots(
            KVCache.allocate(cfg.lm, 2 * s, window + 1, dev, dt),
            zeros(s, 2, cfg.lm.hidden_size),
            zeros(s, 2, dtype=i64),
            torch.full((s,), tok.eos, device=dev, dtype=i64),
            zeros(s, dtype=i64),
            torch.ones(s, device=dev, dtype=i64),
            torch.full((s,), -1, device=dev, dtype=i64),
            zeros(s, dtype=torch.bool),
            zeros(s, dtype=torch.bool),
            zeros(s, 1, dtype=torch.float32),
            zeros(s, cfg.acoustic.vae_dim),
            acoustic_flat,
            acoustic,
            semantic_flat,
            semantic,
            zeros(s, hop, dtype=torch.float32),
            zeros(s, cfg.lm.hidden_size),
            zeros(s, 3, dtype=i64),
        )
        self._views = {b: self.state.first(b, self.w.decoder, self.w.encoder) for b in self.buckets}
        # Every turn's negative stream starts as [speech_start] at position 0, whatever the
        # session: prefilled once here, copied into row 2i+1 by `start_turn`.
        with torch.no_grad():
            self._neg = KVCache.allocate(cfg.lm, 1, 1, dev, dt)
            self._h_neg = rt.prefill(self._neg, 0, [tok.speech_start], 0)  # (1, H)

        self.sessions: list[Session | None] = [None] * s
        self._active = [False] * s  # host mirror of state.active, from the last report
        self._paused = [False] * s
        self._next = [tok.eos] * s  # host mirror of state.tokens
        self._counting: list[int] | None = None
        cuda = dev.type == "cuda"
        self._graphs: StepGraphs | None = None
        if cuda:
            # Outputs land in pinned memory without blocking; one event says both arrived.
            self._report_host = torch.empty((s, 3), dtype=i64, pin_memory=True)
            self._audio_host = torch.empty((s, hop), dtype=torch.float32, pin_memory=True)
            self._inputs_host = torch.empty((s, cfg.lm.hidden_size), dtype=dt, pin_memory=True)
            self._done = torch.cuda.Event()
            if graphs is None or graphs:
                # Captured now, with every slot inactive: warm-up runs change nothing but the
                # outputs and the scratch column (the masking makes that so).
                self._graphs = StepGraphs(
                    lambda b: decode_step(self.w, self._views[b]), self.buckets, dev
                )
        elif graphs:
            raise ValueError("CUDA graphs need a CUDA device")

    # -- slots ---------------------------------------------------------------------------------

    def free_slot(self) -> int | None:
        """The lowest slot without a session (keeps buckets small), or None if all are taken."""
        return next((i for i, sess in enumerate(self.sessions) if sess is None), None)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.no_grad()
    def open(
        self,
        slot: int,
        voices: list[np.ndarray],
        seed: int,
        cfg_scale: float,
        frames_per_turn: int | None = None,
        stream: torch.cuda.Stream | None = None,
        context: bool = False,
    ) -> None:
        """A session in `slot`: its system + voice prefix prefilled once, as `open_session`.

        The number of diffusion steps is the engine's, the same for every slot (a step has one
        op count). Runs on `stream` when given (CUDA): nothing here touches the pool, so it
        may run on another thread while the loop steps; `start_turn` and `step` may not.
        """
        if self.sessions[slot] is not None:
            raise ValueError(f"slot {slot} already holds a session")
        rt = self.rt
        with _on(stream):
            gen = torch.Generator(device=rt.device).manual_seed(seed)
            wavs = [normalize_voice(v) for v in voices]
            prompt = prefix_prompt(rt.tok, [voice_frames(len(w)) for w in wavs])
            n = len(prompt.ids)
            # Exactly the prefix, as open_session: attention kernels round differently when a
            # cache ends right after the keys they read, so this keeps the prefix bit-identical
            # to generate.py's; `encode_turn` grows it for the text.
            cache = KVCache.allocate(rt.cfg.lm, 1, n, rt.device, rt.dtype)
            voice = rt.voice_embeddings(wavs, gen) if wavs else None
            rt.prefill(cache, 0, prompt.ids, 0, voice, prompt.voice_slots)
            h = torch.zeros(1, rt.cfg.lm.hidden_size, device=rt.device, dtype=rt.dtype)
        self.sessions[slot] = Session(gen, cfg_scale, frames_per_turn, context, n, cache, h)

    def check_turn(self, slot: int, speaker: int, text: str, turn: int) -> tuple[list[int], int]:
        """(text block ids, frame cap) of a turn, or ProtocolError(too_long) naming it when
        prefix + text + its frame cap may not fit the window (and the model's positions).
        Cheap (a tokenization): the server checks every turn with it when it arrives."""
        sess = self.sessions[slot]
        if sess is None:
            raise ValueError(f"slot {slot} holds no session")
        ids = text_block(self.rt.tok, [(speaker, text)])
        if sess.frames_per_turn is not None:
            max_frames = sess.frames_per_turn
        else:
            max_frames = self.frames_per_token * len(ids) + self.frames_slack
        need = sess.prefix_len + len(ids) + max_frames + 3  # speech_start, speech_end, 1 more
        room = min(self.window, self.rt.cfg.lm.max_position_embeddings)
        if need > room:
            raise ProtocolError(
                Code.TOO_LONG,
                f"turns[{turn}] has {len(ids)} text tokens; after the {sess.prefix_len}-position "
                f"voice prefix it may need {need} positions with up to {max_frames} frames, and "
                f"this server holds {room} per session. Split the turn into shorter ones.",
                field=f"turns[{turn}].text",
                turn=turn,
            )
        return ids, max_frames

    @torch.no_grad()
    def encode_turn(
        self,
        slot: int,
        speaker: int,
        text: str,
        turn: int = 0,
        stream: torch.cuda.Stream | None = None,
    ) -> EncodedTurn:
        """The text stage of a `turns` turn, as generate.py's `encode_turn`: its text block
        alone after the prefix. Raises ProtocolError(too_long) when it may not fit."""
        ids, max_frames = self.check_turn(slot, speaker, text, turn)
        return self.encode(slot, ids, turn=turn, max_frames=max_frames, stream=stream)

    @torch.no_grad()
    def encode(
        self,
        slot: int,
        ids: list[int],
        frames: torch.Tensor | None = None,
        at: Sequence[int] = (),
        *,
        turn: int,
        max_frames: int,
        stream: torch.cuda.Stream | None = None,
    ) -> EncodedTurn:
        """Prefill `ids` after the slot's prefix in the session's own cache, with `frames`
        (F, H) as the inputs at positions `at` of `ids` (a context's speech, context.py). The
        slot may be stepping meanwhile: this writes only the session's cache, on `stream`.
        Everything it takes is plain data (ids, a host tensor), so a session's context can be
        rebuilt in another process from what it saved."""
        sess = self.sessions[slot]
        if sess is None:
            raise ValueError(f"slot {slot} holds no session")
        rt = self.rt
        length = sess.prefix_len + len(ids)
        if length + max_frames + 3 > self.window:
            raise ValueError(f"slot {slot}: {length} positions and {max_frames} frames overflow")
        started = time.perf_counter()
        with _on(stream):
            if sess.copied is not None:  # the pool may still be copying the previous turn
                torch.cuda.current_stream().wait_event(sess.copied)
            if sess.cache.capacity < length:  # sized by the longest context so far
                grown = KVCache.allocate(rt.cfg.lm, 1, length + 256, rt.device, rt.dtype)
                grown.copy_prefix(sess.cache, sess.prefix_len)
                sess.cache = grown
            inputs = frames.to(rt.device, rt.dtype) if frames is not None else None
            sess.h.copy_(rt.prefill(sess.cache, 0, ids, sess.prefix_len, inputs, list(at)))
            if sess.frames_per_turn is not None:
                first = rt.tok.speech_diffusion if sess.frames_per_turn > 0 else rt.tok.speech_end
            else:
                # The one read of a turn's text stage, on its own stream: the decode loop needs
                # the first token on the host to know whether to draw noise for it.
                first = rt.choose(sess.h)
            if stream is not None:  # done before the loop thread copies it into the pool
                stream.synchronize()
        sess.encoded = EncodedTurn(
            slot, turn, length, max_frames, first, time.perf_counter() - started
        )
        return sess.encoded

    @torch.no_grad()
    def start_turn(self, enc: EncodedTurn, first: int | None = None) -> None:
        """Put an encoded context into its slot's rows (on the decode stream) and activate it,
        as `render_turn` starts: prefix + text (+ kept speech) in the positive row,
        [speech_start] at 0 in the negative row, codec state zeroed. `first` replaces the
        token the prefill chose (context.py's rules for eos and forced turns)."""
        i = enc.slot
        sess = self.sessions[i]
        if sess is None or sess.encoded is not enc:
            raise ValueError(f"slot {i}: this turn is not the one its session encoded last")
        if self._active[i] or self._paused[i]:
            raise ValueError(f"slot {i} is still in a turn")
        s, length = self.state, enc.length
        s.cache.k[:, 2 * i, :, :length].copy_(sess.cache.k[:, 0, :, :length])
        s.cache.v[:, 2 * i, :, :length].copy_(sess.cache.v[:, 0, :, :length])
        s.cache.k[:, 2 * i + 1, :, :1].copy_(self._neg.k[:, 0])
        s.cache.v[:, 2 * i + 1, :, :1].copy_(self._neg.v[:, 0])
        s.h[i, 0].copy_(sess.h[0])
        s.h[i, 1].copy_(self._h_neg[0])
        s.pos[i, 0] = length
        s.pos[i, 1] = 0
        s.context[i] = sess.context
        s.cfg[i, 0] = sess.cfg_scale
        s.acoustic_flat[i].zero_()
        s.semantic_flat[i].zero_()
        if self.rt.device.type == "cuda":
            sess.copied = torch.cuda.Event()
            sess.copied.record()
        sess.encoded = None
        self._go(i, enc.max_frames, enc.first if first is None else first)

    def go_on(self, slot: int, max_frames: int | None, first: int) -> None:
        """`context`: the slot waits at a turn boundary; its next turn starts right here, in the
        same context, with `first` as its next token (usually the one the model chose).
        `max_frames` None: the same turn goes on (its frame count and cap stay)."""
        if self._active[slot] or self._paused[slot]:
            raise ValueError(f"slot {slot} is still in a turn")
        if max_frames is not None:
            self._go(slot, max_frames, first)
        else:
            self.set_next(slot, first)
            self.state.active[slot] = True
            self._active[slot] = True

    def _go(self, i: int, max_frames: int, first: int) -> None:
        sess = self.sessions[i]
        assert sess is not None
        s = self.state
        # A turn that opens with speech_start spends a token on it: count it in the cap and,
        # for a forced turn, before its frames (so the turn still has exactly F of them).
        lead = int(first == self.rt.tok.speech_start)
        s.tokens[i] = first
        s.n[i] = 0
        s.cap[i] = max_frames + 1 + lead
        s.forced[i] = -1 if sess.frames_per_turn is None else sess.frames_per_turn + lead
        s.active[i] = True
        self._active[i] = True
        self._next[i] = first

    def next_token(self, slot: int) -> int:
        """The token the slot consumes next (chosen at the end of its last step)."""
        return self._next[slot]

    def set_next(self, slot: int, token: int) -> None:
        """Replace the token an active slot consumes next (context.py: eos before the end)."""
        self.state.tokens[slot] = token
        self._next[slot] = token

    def begin_turn(
        self,
        slot: int,
        speaker: int,
        text: str,
        turn: int = 0,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """`encode_turn` then `start_turn`: the next frames of `slot` are this turn's."""
        self.start_turn(self.encode_turn(slot, speaker, text, turn, stream))

    def pause(self, slot: int) -> None:
        """Leave the slot out of steps, its state untouched, until `resume`."""
        if self._active[slot]:
            self.state.active[slot] = False
            self._active[slot], self._paused[slot] = False, True

    def resume(self, slot: int) -> None:
        if self._paused[slot]:
            self.state.active[slot] = True
            self._active[slot], self._paused[slot] = True, False

    def stop_turn(self, slot: int) -> None:
        """Abandon the slot's turn (the client cancelled it); the session stays for the next."""
        self.state.active[slot] = False
        self._active[slot] = self._paused[slot] = False

    def close(self, slot: int) -> None:
        self.stop_turn(slot)
        self.sessions[slot] = None

    @torch.no_grad()
    def park(self, slot: int) -> Parked:
        """Move the slot's state to host memory and free the slot (the loop's thread)."""
        sess = self.sessions[slot]
        if sess is None:
            raise ValueError(f"slot {slot} holds no session")
        s = self.state
        used = min(int(s.pos[slot].max()) + 1, self.window)  # a host read, outside any step
        rows = slice(2 * slot, 2 * slot + 2)
        parked = Parked(
            sess,
            s.cache.k[:, rows, :, :used].to("cpu", copy=True),
            s.cache.v[:, rows, :, :used].to("cpu", copy=True),
            {name: getattr(s, name)[slot].to("cpu", copy=True) for name in _SLOT_ROWS},
            self.in_turn(slot),
            self._next[slot],
        )
        self.close(slot)
        return parked

    @torch.no_grad()
    def unpark(self, parked: Parked, slot: int) -> None:
        """Put a parked state into a free slot, exactly as it was; it steps after `resume`."""
        if self.sessions[slot] is not None:
            raise ValueError(f"slot {slot} already holds a session")
        s, used = self.state, parked.k.shape[3]
        rows = slice(2 * slot, 2 * slot + 2)
        s.cache.k[:, rows, :, :used].copy_(parked.k)
        s.cache.v[:, rows, :, :used].copy_(parked.v)
        for name, value in parked.rows.items():
            getattr(s, name)[slot].copy_(value)
        self.sessions[slot] = parked.session
        self._paused[slot] = parked.in_turn  # held until the loop picks it: `resume`
        self._next[slot] = parked.next

    def in_turn(self, slot: int) -> bool:
        return self._active[slot] or self._paused[slot]

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> list[SlotFrame]:
        """One frame for every active slot; returns what each of them did."""
        live = [i for i, a in enumerate(self._active) if a]
        if not live:
            return []
        b = self.bucket(live[-1] + 1)
        noise = self.state.noise
        for i in live:
            if self._next[i] == self.rt.tok.speech_diffusion:
                # Runtime.noise, from the session's generator, once per diffusion frame: the
                # reference's draw order within a session. NOTE: outside the captured step, as
                # a graph cannot replay per-session generators and the number of draws varies.
                sess = self.sessions[i]
                assert sess is not None
                noise[i].copy_(self.rt.noise(sess.gen)[0])
        self._run(b)
        # Only context sessions keep their frames' inputs: without one, they are not fetched.
        context = any(self.sessions[i] is not None and self.sessions[i].context for i in live)
        report, audio, inputs = self._fetch(b, context)
        frames = []
        for i in live:
            token, nxt, flags = (int(x) for x in report[i])
            self._active[i] = bool(flags & ACTIVE)
            if flags & (ACTIVE | BOUNDARY):
                self._next[i] = nxt
            sess = self.sessions[i]
            keep = flags & AUDIO and sess is not None and sess.context
            frames.append(
                SlotFrame(
                    i,
                    token,
                    audio[i].copy() if flags & AUDIO else None,
                    bool(flags & ENDED),
                    bool(flags & CAPPED),
                    bool(flags & BOUNDARY),
                    inputs[i].clone() if keep else None,
                )
            )
        return frames

    def measure_step(self) -> tuple[list[SlotFrame], int]:
        """`step`, run eagerly, with the operations its device step dispatched counted."""
        self._counting = []
        try:
            frames = self.step()
            return frames, self._counting[0] if self._counting else 0
        finally:
            self._counting = None

    def _run(self, b: int) -> None:
        if self._counting is not None:
            self._counting.append(count_ops(lambda: decode_step(self.w, self._views[b])))
        elif self._graphs is not None:
            self._graphs.replay(b)
        else:
            decode_step(self.w, self._views[b])

    def _fetch(self, b: int, inputs: bool) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """The step's one device-to-host read: the report, the audio and the inputs of slots
        [0, b) (the inputs: a context session keeps its frames' for rebuilds, a few KB each)."""
        s = self.state
        if self.rt.device.type != "cuda":
            return s.report[:b].numpy(), s.audio[:b].numpy(), s.inputs[:b]
        self._report_host[:b].copy_(s.report[:b], non_blocking=True)
        self._audio_host[:b].copy_(s.audio[:b], non_blocking=True)
        if inputs:
            self._inputs_host[:b].copy_(s.inputs[:b], non_blocking=True)
        self._done.record()
        self._done.synchronize()
        return self._report_host[:b].numpy(), self._audio_host[:b].numpy(), self._inputs_host[:b]


# -- measuring -------------------------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """How many aten operations `fn` dispatches (each is a kernel launch, eagerly)."""
    with _OpCounter() as counter:
        fn()
    return counter.n


BENCH_TEXT = "Speed is measured, not the words."


def bench_steps(
    rt: Runtime,
    slots: int,
    steps: int,
    *,
    graphs: bool | None = None,
    diffusion_steps: int = 10,
    warmup: int = 3,
    window: int = 0,
) -> dict[str, float]:
    """`slots` sessions in one engine, `steps` decode steps timed after `warmup` ones.

    Every turn is forced to diffuse throughout (random weights would end turns early), so
    each step is a full frame for every slot. Decode attention reads the whole window, so
    pass the window a server would run (e.g. 4096) to time that; by default it is as small
    as the benchmark's turns allow. Returns the step time, aggregate frames per second,
    times real time per session (a frame is 133 ms), and operations per step.
    """
    frames = warmup + steps + 2
    text_len = len(text_block(rt.tok, [(0, BENCH_TEXT)]))
    need = len(prefix_prompt(rt.tok, []).ids) + text_len + frames + 1
    window = max(window, -(-need // 64) * 64)
    engine = BatchEngine(rt, slots, window, diffusion_steps, graphs=graphs)
    for i in range(slots):
        engine.open(i, [], seed=i, cfg_scale=1.3, frames_per_turn=frames)
        engine.begin_turn(i, 0, BENCH_TEXT)
    for _ in range(warmup):
        engine.step()
    rt.sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()  # ends with its sync
    seconds = time.perf_counter() - start
    _, ops = engine.measure_step()
    step_s = seconds / steps
    frame_s = rt.cfg.acoustic.hop / SAMPLE_RATE
    return {
        "slots": slots,
        "window": window,
        "graphs": float(engine._graphs is not None),
        "step_ms": 1000 * step_s,
        "frames_per_s": slots / step_s,
        "realtime_x": frame_s / step_s,
        "ops_per_step": ops,
    }
