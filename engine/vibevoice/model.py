"""The VibeVoice module tree, named exactly like the released checkpoints' tensors.

model.language_model.*      Qwen2 decoder (lm.py)
model.acoustic_tokenizer.*  σ-VAE encoder + decoder (codec.py)
model.semantic_tokenizer.*  semantic encoder (codec.py)
model.acoustic_connector.*  latent (64) -> LM space
model.semantic_connector.*  semantic features (128) -> LM space
model.prediction_head.*     diffusion head (diffusion.py)
model.speech_scaling_factor, model.speech_bias_factor   0-dim buffers from the checkpoint
lm_head.weight              only when embeddings are not tied (7B)
"""

from __future__ import annotations

import torch
from torch import nn

from .codec import Decoder, Encoder
from .config import VibeVoiceConfig
from .diffusion import DiffusionHead
from .lm import Qwen2
from .norm import RMSNorm


class Connector(nn.Module):
    """fc1 → RMSNorm → fc2 (no activation), into the LM's hidden size."""

    def __init__(self, dim_in: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.norm = RMSNorm(hidden, 1e-6)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class AcousticTokenizer(nn.Module):
    def __init__(self, cfg: VibeVoiceConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg.acoustic)
        self.decoder = Decoder(cfg.acoustic)


class SemanticTokenizer(nn.Module):
    def __init__(self, cfg: VibeVoiceConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg.semantic)


class VibeVoiceModel(nn.Module):
    def __init__(self, cfg: VibeVoiceConfig) -> None:
        super().__init__()
        h = cfg.lm.hidden_size
        self.language_model = Qwen2(cfg.lm)
        self.acoustic_tokenizer = AcousticTokenizer(cfg)
        self.semantic_tokenizer = SemanticTokenizer(cfg)
        self.acoustic_connector = Connector(cfg.acoustic.vae_dim, h)
        self.semantic_connector = Connector(cfg.semantic.vae_dim, h)
        self.prediction_head = DiffusionHead(cfg.head)
        self.register_buffer("speech_scaling_factor", torch.tensor(float("nan")))
        self.register_buffer("speech_bias_factor", torch.tensor(float("nan")))


class VibeVoice(nn.Module):
    def __init__(self, cfg: VibeVoiceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = VibeVoiceModel(cfg)
        if not cfg.lm.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.lm.hidden_size, cfg.lm.vocab_size, bias=False)

    def output_embeddings(self) -> torch.Tensor:
        """(vocab, H): lm_head, or the input embeddings when they are tied (1.5B)."""
        if self.cfg.lm.tie_word_embeddings:
            return self.model.language_model.embed_tokens.weight
        return self.lm_head.weight
