"""VibeVoice-Realtime-0.5B: the module tree, named exactly like the released checkpoint's 605
tensors, and what every Realtime session shares (`RealtimeRuntime`).

model.language_model.*              lower Qwen2 (4 layers), text only; its final norm is an
                                    identity, so the checkpoint has no `norm.weight` for it
model.tts_language_model.*          TTS Qwen2 (20 layers), over the lower LM's text states and
                                    the speech frames; its `embed_tokens` is in the checkpoint
                                    but never read (every input it takes is overwritten)
model.tts_input_types.weight        (2, H): row 1 is added to text positions, row 0 to frames
model.acoustic_tokenizer.decoder.*  the σ-VAE decoder, as 1.5B's (codec.py); no encoder
model.acoustic_connector.*          latent (64) -> H (model.py's Connector)
model.prediction_head.*             the diffusion head (diffusion.py)
model.speech_scaling_factor, model.speech_bias_factor
tts_eos_classifier.*                Linear(H, H) → ReLU → Linear(H, 1): sigmoid > 0.5 ends speech

How a turn is made (the reference's window loop; realtime_batch.py runs it batched):
  a voice preset's caches (presets.py) are the prefix of three streams: the lower LM, the TTS
  LM, and the TTS LM's negative (unconditional) stream, which never sees text;
  then windows: up to 5 text tokens through the lower LM, their states (+ type 1) through the
  TTS LM, then 6 frames, each: CFG diffusion of (positive, negative) last TTS states -> latent
  -> one decoder frame (3200 samples) -> connector(latent) + type 0 into both TTS streams ->
  the EOS classifier on the new positive state. When the text runs out, windows carry no
  text and frames go on until EOS or the context is full.
"""

from __future__ import annotations

import torch
from torch import nn

from .codec import Decoder
from .config import RealtimeConfig
from .diffusion import DiffusionHead, Sampler
from .layers import nest
from .lm import Qwen2
from .model import Connector
from .tokenizer import TextTokenizer

# The reference's window sizes: text tokens per window, then speech frames per window.
TEXT_WINDOW = 5
SPEECH_WINDOW = 6


class EosClassifier(nn.Module):
    """`tts_eos_classifier`: the probability (as a logit) that speech has ended."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(h)))


class RealtimeModel(nn.Module):
    def __init__(self, cfg: RealtimeConfig) -> None:
        super().__init__()
        h = cfg.tts.hidden_size
        self.language_model = Qwen2(cfg.lm, final_norm=False)
        self.tts_language_model = Qwen2(cfg.tts)
        self.tts_input_types = nn.Embedding(2, h)
        self.acoustic_tokenizer = nest(decoder=Decoder(cfg.acoustic))
        self.acoustic_connector = Connector(cfg.acoustic.vae_dim, h)
        self.prediction_head = DiffusionHead(cfg.head)
        self.register_buffer("speech_scaling_factor", torch.tensor(float("nan")))
        self.register_buffer("speech_bias_factor", torch.tensor(float("nan")))


class VibeVoiceRealtime(nn.Module):
    def __init__(self, cfg: RealtimeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = RealtimeModel(cfg)
        self.tts_eos_classifier = EosClassifier(cfg.tts.hidden_size)


class RealtimeRuntime:
    """A loaded Realtime model with what its sessions share: weights, tokenizer, samplers."""

    def __init__(
        self,
        model: VibeVoiceRealtime,
        tok: TextTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        name: str,
    ) -> None:
        self.model = model
        self.tok = tok
        self.device = device
        self.dtype = dtype
        self.name = name
        self.cfg = model.cfg
        self._samplers: dict[int, Sampler] = {}

    @property
    def decoder(self) -> Decoder:
        return self.model.model.acoustic_tokenizer.decoder  # type: ignore[return-value]

    def sampler(self, steps: int) -> Sampler:
        if steps not in self._samplers:
            self._samplers[steps] = Sampler(
                self.model.model.prediction_head, steps, self.device, self.dtype
            )
        return self._samplers[steps]

    def noise(self, gen: torch.Generator, out: torch.Tensor) -> None:
        """One frame's starting noise into `out` (latent,), fp32 on the CPU.

        As the reference: `torch.randn(2, latent)` in fp32 on the CPU (from the default
        generator there, a session's own here: the same numbers for the same seed), later cast
        to the model dtype on the device; the second row (the negative's) is drawn and never
        used."""
        out.copy_(torch.randn((2, out.shape[0]), generator=gen)[0])

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
