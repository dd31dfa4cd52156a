"""The Qwen2.5 text tokenizer, with VibeVoice's speech tokens looked up by their strings.

VibeVoice repositories ship no tokenizer files: `preprocessor_config.json` names the Qwen2.5 base
repository to take `tokenizer.json` from. A `tokenizer.json` inside the model directory wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

SPECIAL = {
    "speech_start": "<|vision_start|>",
    "speech_end": "<|vision_end|>",
    "speech_diffusion": "<|vision_pad|>",
    "eos": "<|endoftext|>",
    "pad": "<|image_pad|>",
}


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    speech_start: int
    speech_end: int
    speech_diffusion: int
    eos: int
    pad: int

    @staticmethod
    def from_tokenizer(tokenizer: Tokenizer) -> TextTokenizer:
        ids = {}
        for role, token in SPECIAL.items():
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"the tokenizer has no {token} token ({role}); is it Qwen2.5's?")
            ids[role] = i
        return TextTokenizer(tokenizer, **ids)

    @staticmethod
    def load(model_dir: Path) -> TextTokenizer:
        local = model_dir / "tokenizer.json"
        if local.is_file():
            return TextTokenizer.from_tokenizer(Tokenizer.from_file(str(local)))
        pre = model_dir / "preprocessor_config.json"
        base = "Qwen/Qwen2.5-1.5B"
        if pre.is_file():
            base = json.loads(pre.read_text()).get("language_model_pretrained_name", base)
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(base, "tokenizer.json")
        except Exception as e:  # the hub client raises many unrelated types
            raise ValueError(
                f"{model_dir} has no tokenizer.json and fetching it from {base} failed "
                f"({type(e).__name__}); put Qwen2.5's tokenizer.json into the model directory"
            ) from None
        return TextTokenizer.from_tokenizer(Tokenizer.from_file(path))

    @staticmethod
    def placeholder() -> TextTokenizer:
        """A byte tokenizer with the special tokens, for random-weight models (benchmarks)."""
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {chr(c) if chr(c).isprintable() else f"<0x{c:02X}>": c for c in range(256)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(SPECIAL.values()))
        return TextTokenizer.from_tokenizer(tok)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def valid_ids(self) -> list[int]:
        """The tokens generation may choose, ascending (the reference's tie order)."""
        return sorted({self.speech_start, self.speech_end, self.speech_diffusion, self.eos})
