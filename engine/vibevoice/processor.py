"""The prompt layout of the reference processor, piece by piece (each piece tokenized alone):

    " Transform the text … respective speaker.\\n"                       system
    " Voice input:\\n" + per voice " Speaker i:" <start> <pad>·N_i <end> "\\n"   voices (if any)
    " Text input:\\n" + per line " Speaker k: text\\n"                      script
    " Speech output:\\n" <start>

N_i = ceil(samples / 3200); the <pad> positions receive the voice's acoustic embeddings.
`turns` mode encodes system + voices once (the prefix) and each turn as its own text block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .tokenizer import TextTokenizer

SYSTEM = (
    " Transform the text provided by various speakers into speech output, utilizing the "
    "distinct voice of each respective speaker.\n"
)
HOP = 3200


@dataclass
class Prompt:
    ids: list[int] = field(default_factory=list)
    voice_slots: list[int] = field(default_factory=list)  # positions that take voice frames

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)


def normalize_voice(wav: np.ndarray, target_db: float = -25.0, eps: float = 1e-6) -> np.ndarray:
    """Scale to `target_db` dBFS RMS, then down again if that would clip (as the reference)."""
    wav = np.asarray(wav, dtype=np.float32)
    rms = np.sqrt(np.mean(wav**2))
    wav = wav * (10 ** (target_db / 20) / (rms + eps))
    peak = np.max(np.abs(wav))
    return wav / (peak + eps) if peak > 1.0 else wav


def voice_frames(n_samples: int) -> int:
    return math.ceil(n_samples / HOP)


def prefix_prompt(tok: TextTokenizer, frames: list[int]) -> Prompt:
    p = Prompt()
    p.add(tok.encode(SYSTEM))
    if frames:
        p.add(tok.encode(" Voice input:\n"))
        for i, n in enumerate(frames):
            p.add(tok.encode(f" Speaker {i}:"))
            p.add([tok.speech_start])
            p.voice_slots.extend(range(len(p.ids), len(p.ids) + n))
            p.add([tok.speech_diffusion] * n)
            p.add([tok.speech_end])
            p.add(tok.encode("\n"))
    return p


def text_block(tok: TextTokenizer, lines: list[tuple[int, str]]) -> list[int]:
    ids = tok.encode(" Text input:\n")
    for speaker, text in lines:
        ids += tok.encode(f" Speaker {speaker}: {text.strip()}\n")
    return ids + tok.encode(" Speech output:\n") + [tok.speech_start]


def script_prompt(tok: TextTokenizer, lines: list[tuple[int, str]], frames: list[int]) -> Prompt:
    """The whole script in one context (`continuous` mode, as the reference)."""
    p = prefix_prompt(tok, frames)
    p.add(text_block(tok, lines))
    return p
