"""Generation: where a VibeVoice frame is computed.

One frame (133 ms, 3200 samples):
    LM step, positive + negative rows in one batch  -> token (one of speech_start/end/diffusion/eos)
    if diffusion: CFG diffusion (2 rows) -> latent -> streaming acoustic decoder -> audio
                  -> streaming semantic encoder -> connectors -> the next input embedding

The negative (unconditional) stream sees only the current turn's speech: it restarts at
position 0 at every speech_start and advances only on diffusion frames. Its forward runs
speculatively in the same batch as the positive one and is kept only when the token is
diffusion, which is what the reference's separate, conditional forward computes.

This is the single-session loop of `turns` mode (`open_session` / `encode_turn` /
`render_turn`): the system + voice prefix is encoded once, each turn prefills only its own text
on top of it and ends at speech_end. The server and `vibecast synth` run every mode on the
batched engine (batch.py, context.py); this loop stays as the plain statement of a frame that
the batched step is tested against.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .diffusion import Sampler
from .lm import KVCache
from .model import VibeVoice
from .processor import normalize_voice, prefix_prompt, text_block, voice_frames
from .tokenizer import TextTokenizer


@dataclass
class Streams:
    """A positive and a negative stream in one two-row KV cache.

    Their positions are kept twice: as ints for the host's decisions, and as a (2, 1) tensor on
    the device that the LM step reads, moved on in place, so no frame copies a position over.
    """

    cache: KVCache
    pos: int  # next position of the positive stream
    neg: int  # next position of the negative stream
    h_pos: torch.Tensor  # (1, H) last hidden state of each stream
    h_neg: torch.Tensor

    def __post_init__(self) -> None:
        self.at = torch.tensor([[self.pos], [self.neg]], device=self.h_pos.device)  # once a turn

    def advance_pos(self) -> None:
        self.pos += 1
        self.at[0] += 1

    def advance_neg(self) -> None:
        self.neg += 1
        self.at[1] += 1

    def restart_neg(self) -> None:
        self.neg = 0
        self.at[1] = 0


class Runtime:
    """A loaded model with what every session shares: weights, tables, samplers."""

    def __init__(
        self,
        model: VibeVoice,
        tok: TextTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        name: str = "vibevoice",
    ) -> None:
        self.model = model
        self.name = name  # `ready.model.name`: says which checkpoint (or random size) this is
        self.tok = tok
        self.device = device
        self.dtype = dtype
        self.cfg = model.cfg
        m = model.model
        self.lm = m.language_model
        self.valid = tok.valid_ids
        # Only a handful of tokens may follow: score those rows of the output embedding alone.
        self.w_valid = model.output_embeddings()[self.valid].clone()  # (n_valid, H)
        self.scale = m.speech_scaling_factor
        self.bias = m.speech_bias_factor
        self._samplers: dict[int, Sampler] = {}

    # -- pieces ------------------------------------------------------------------------------

    def sampler(self, steps: int) -> Sampler:
        if steps not in self._samplers:
            self._samplers[steps] = Sampler(
                self.model.model.prediction_head, steps, self.device, self.dtype
            )
        return self._samplers[steps]

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.lm.embed_tokens(torch.tensor([ids], device=self.device))  # (1, T, H)

    def voice_embeddings(self, wavs: list[np.ndarray], gen: torch.Generator) -> torch.Tensor:
        """Voice prompts (normalized, 24 kHz) -> connector outputs of their frames, (F, H).

        The latents are sampled as the reference does (`gaussian`: one random std per clip,
        then noise over the padded batch), in that order from `gen`.
        """
        acoustic = self.cfg.acoustic
        longest = max(len(w) for w in wavs)
        batch = torch.zeros(len(wavs), 1, longest, dtype=self.dtype, device=self.device)
        for i, w in enumerate(wavs):
            batch[i, 0, : len(w)] = torch.from_numpy(w).to(self.dtype)
        mean = self.model.model.acoustic_tokenizer.encoder(batch).permute(0, 2, 1)  # (K, T, 64)
        if acoustic.std_dist_type == "gaussian":
            std = torch.randn(len(wavs), generator=gen, device=self.device, dtype=self.dtype) * (
                acoustic.fix_std / 0.8
            )
            std = std[:, None, None]
        else:
            std = torch.tensor(acoustic.fix_std, device=self.device, dtype=self.dtype)
        # Noise shaped like `mean`, a permuted view: normal_ fills such a tensor in its own order,
        # and the reference's randn_like does exactly this, so the draws agree for a seed.
        z = mean + std * torch.empty_like(mean).normal_(generator=gen)
        emb = self.model.model.acoustic_connector((z + self.bias) * self.scale)
        keep = torch.zeros(mean.shape[:2], dtype=torch.bool, device=self.device)
        for i, w in enumerate(wavs):
            keep[i, : voice_frames(len(w))] = True
        return emb[keep]

    def prefill(
        self,
        cache: KVCache,
        row: int,
        ids: list[int],
        start: int,
        voice: torch.Tensor | None = None,
        slots: list[int] | None = None,
    ) -> torch.Tensor:
        """Run `ids` at positions start.. on one row; returns the last hidden state (1, H)."""
        x = self.embed(ids)
        if voice is not None and slots:
            x[0, torch.tensor(slots, device=self.device)] = voice
        positions = torch.arange(start, start + len(ids), device=self.device)[None]
        return self.lm(x, positions, cache, slice(row, row + 1))[:, -1]

    def step(self, s: Streams, emb: torch.Tensor) -> None:
        """Both streams consume `emb` (1, H) as one batch at their next positions."""
        x = emb[None].expand(2, 1, -1)
        h = self.lm(x, s.at, s.cache, slice(0, 2))[:, -1]
        s.h_pos, s.h_neg = h[:1], h[1:]
        s.advance_pos()

    def choose(self, h_pos: torch.Tensor) -> int:
        """Greedy choice among the allowed tokens (the host reads one number: the frame's sync)."""
        scores = (h_pos @ self.w_valid.T).float()
        return self.valid[int(scores.argmax())]

    def speech(
        self,
        s: Streams,
        noise: torch.Tensor,
        cfg_scale: float,
        steps: int,
        acoustic: list[torch.Tensor],
        semantic: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One speech frame: (audio (3200,), next input embedding (1, H))."""
        m = self.model.model
        latent = self.sampler(steps).sample(s.h_pos, s.h_neg, noise, cfg_scale)  # (1, 64)
        audio = m.acoustic_tokenizer.decoder.step(
            (latent / self.scale - self.bias)[:, :, None], acoustic
        )
        features = m.semantic_tokenizer.encoder.step(audio, semantic)[:, :, 0]  # (1, 128)
        emb = m.acoustic_connector(latent) + m.semantic_connector(features)
        return audio.reshape(-1), emb

    def sync(self) -> None:
        """Wait for this thread's stream (CUDA); once per session or turn, never per frame."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def noise(self, gen: torch.Generator) -> torch.Tensor:
        # The reference draws noise for both CFG rows and keeps only the first half.
        latent = self.cfg.acoustic.vae_dim
        return torch.randn((2, latent), generator=gen, device=self.device, dtype=self.dtype)[:1]

    def codec_states(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        m = self.model.model
        return (
            m.acoustic_tokenizer.decoder.new_state(1, self.device, self.dtype),
            m.semantic_tokenizer.encoder.new_state(1, self.device, self.dtype),
        )

    def frames(
        self,
        s: Streams,
        gen: torch.Generator,
        cfg_scale: float,
        steps: int,
        max_steps: int,
        acoustic: list[torch.Tensor],
        semantic: list[torch.Tensor],
        until_speech_end: bool,
        tokens: list[int] | None = None,
    ) -> Iterator[np.ndarray]:
        """The frame loop from a state whose streams have just been fed (prefill or step)."""
        tok = self.tok
        pending: torch.Tensor | None = None
        for n in range(max_steps):
            token = self.choose(s.h_pos)  # syncs: everything queued before is done
            if pending is not None:
                yield pending.numpy()
                pending = None
            if tokens is not None:
                tokens.append(token)
            if token == tok.eos or (until_speech_end and token == tok.speech_end):
                break
            if token == tok.speech_end:  # the decoder and semantic encoder restart from silence
                for state in (*acoustic, *semantic):
                    state.zero_()
            if token == tok.speech_start:  # the negative stream restarts with the new segment
                s.restart_neg()
            if token == tok.speech_diffusion:
                s.advance_neg()  # keep the negative forward that ran beside the positive one
                audio, emb = self.speech(s, self.noise(gen), cfg_scale, steps, acoustic, semantic)
                pending = audio.to("cpu", torch.float32, non_blocking=True)
            else:
                # A row of the table by a host int: a view, no index tensor copied over.
                emb = self.lm.embed_tokens.weight[token : token + 1]
            if n + 1 < max_steps:
                self.step(s, emb)
        if pending is not None:  # the step cap ended the loop: no token read has waited for it
            self.sync()
            yield pending.numpy()


# -- turns: prefix once, each turn on its own ------------------------------------------------------


@dataclass
class VoiceSession:
    prefix: KVCache  # row 0: system + voice prompts
    prefix_len: int
    slots: list[KVCache | None]  # the two turn buffers
    acoustic: list[torch.Tensor]
    semantic: list[torch.Tensor]
    gen: torch.Generator
    cfg_scale: float
    steps: int


@dataclass
class EncodedTurn:
    streams: Streams
    max_frames: int


FRAMES_PER_TOKEN = 8  # generous: speech runs about 2.5 frames per text token
FRAMES_SLACK = 60


@torch.no_grad()
def open_session(
    rt: Runtime, voices: list[np.ndarray], seed: int, cfg_scale: float, steps: int
) -> VoiceSession:
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    wavs = [normalize_voice(v) for v in voices]
    prompt = prefix_prompt(rt.tok, [voice_frames(len(w)) for w in wavs])
    prefix = KVCache.allocate(rt.cfg.lm, 1, len(prompt.ids), rt.device, rt.dtype)
    voice = rt.voice_embeddings(wavs, gen) if wavs else None
    rt.prefill(prefix, 0, prompt.ids, 0, voice, prompt.voice_slots)
    acoustic, semantic = rt.codec_states()
    # The turns' encode stream reads this prefix; it was written on this thread's stream.
    rt.sync()
    return VoiceSession(
        prefix, len(prompt.ids), [None, None], acoustic, semantic, gen, cfg_scale, steps
    )


@torch.no_grad()
def encode_turn(rt: Runtime, vs: VoiceSession, speaker: int, text: str, slot: int) -> EncodedTurn:
    """The text stage of one turn: its tokens after the prefix, in buffer `slot`."""
    ids = text_block(rt.tok, [(speaker, text)])
    max_frames = FRAMES_PER_TOKEN * len(ids) + FRAMES_SLACK
    need = vs.prefix_len + len(ids) + max_frames + 1
    if need > rt.cfg.lm.max_position_embeddings:
        raise ValueError(
            f"a turn of {len(ids)} tokens does not fit the model's "
            f"{rt.cfg.lm.max_position_embeddings}"
            "-position context with these voice prompts; split the turn"
        )
    cache = vs.slots[slot]
    if cache is None or cache.capacity < need:  # sized by the longest turn so far, not the script
        cache = vs.slots[slot] = KVCache.allocate(rt.cfg.lm, 2, need, rt.device, rt.dtype)
    cache.copy_prefix(vs.prefix, vs.prefix_len)
    h_pos = rt.prefill(cache, 0, ids, vs.prefix_len)
    h_neg = rt.prefill(cache, 1, [rt.tok.speech_start], 0)
    return EncodedTurn(Streams(cache, vs.prefix_len + len(ids), 0, h_pos, h_neg), max_frames)


@torch.no_grad()
def render_turn(
    rt: Runtime, vs: VoiceSession, turn: EncodedTurn
) -> Generator[np.ndarray, None, None]:
    """The acoustic stage: frames until speech_end, 3200 samples each, as they are made."""
    for state in (*vs.acoustic, *vs.semantic):
        state.zero_()
    yield from rt.frames(
        turn.streams,
        vs.gen,
        vs.cfg_scale,
        vs.steps,
        turn.max_frames + 1,
        vs.acoustic,
        vs.semantic,
        True,
    )
