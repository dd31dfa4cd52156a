"""A turn's text as token ids while it is still arriving (Realtime's streamed text).

The model reads a turn as the ids of `text.strip() + "\\n"` in windows of 5. When the text
comes in pieces (an LLM's output), a window may only be taken once its ids are the ones the
whole text will have, or the audio would differ from the same text sent whole. BPE merges
never cross the pre-tokenizer's pieces (words with their leading space, runs of digits or
punctuation), and every piece but the last is settled by the characters already there: the
pieces are found left to right, each ending where the next begins. So the ids of every
pre-token except the last one are final; the last may still grow ("hel" + "lo"), and so may
trailing spaces, which the final strip removes. When the turn's text is final, its ids are
those of the whole text, of which the settled ones are a prefix.
"""

from __future__ import annotations

import unicodedata

from .tokenizer import TextTokenizer

# The reference's file demo straightens these quotes before tokenizing; one character each, so
# doing it piece by piece is the same as doing it to the whole text.
_QUOTES = str.maketrans({"\u2019": "'", "\u201c": '"', "\u201d": '"'})


def clean(text: str) -> str:
    return unicodedata.normalize("NFC", text.translate(_QUOTES))


class TurnText:
    """The settled ids of one turn's text so far (`ids`), and whether they are all of it."""

    def __init__(self, tok: TextTokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.final = False
        self._seen = -1  # length of the text the ids were computed from

    def update(self, text: str, final: bool) -> None:
        """The turn's whole text so far (not a piece), and whether it is complete."""
        if self.final or (len(text) == self._seen and not final):
            return
        self._seen = len(text)
        if final:
            ids = self.tok.encode(clean(text).strip() + "\n")
            if ids[: len(self.ids)] != self.ids:
                # The argument in the module docstring says this cannot happen; if a tokenizer
                # breaks it, speaking on would repeat or lose words, so stop loudly.
                raise RuntimeError("the settled ids of a streamed turn are not a prefix of its ids")
            self.ids, self.final = ids, True
            return
        settled = self._settled(clean(text).lstrip())
        if len(settled) > len(self.ids):
            self.ids = settled

    def _settled(self, text: str) -> list[int]:
        tokenizer = self.tok.tokenizer
        pre = tokenizer.pre_tokenizer
        pieces = pre.pre_tokenize_str(text) if pre is not None else [(text, (0, len(text)))]
        if len(pieces) < 2:
            return []
        end = pieces[-1][1][0]  # where the last pre-token starts
        encoding = tokenizer.encode(text, add_special_tokens=False)
        # Tokens never straddle pre-tokens, so these are exactly the earlier pre-tokens' ids.
        pairs = zip(encoding.ids, encoding.offsets, strict=True)
        return [i for i, (_, stop) in pairs if stop <= end]
