"""Streamed text: the ids settled from a turn's text so far are always a prefix of the ids of
the whole text, wherever the pieces were cut (realtime_text.py's argument, checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vibecast.engine.vibevoice.realtime_text import TurnText, clean
from vibecast.engine.vibevoice.tokenizer import SPECIAL, TextTokenizer

TINY = Path(__file__).parent / "fixtures" / "vibevoice" / "tiny" / "tokenizer.json"
# Qwen2.5's pre-tokenizer pattern (its tokenizer.json), with its NFC normalizer: the real
# tokenizer's rules, on a small vocabulary trained here.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    "Hello there, and welcome to the show.",
    "  It's 42 o'clock...  really?! \u201cYes\u201d, she said \u2019twice\u2019.  ",
    "a   b  c\n\nd. e,f -- g\t\th",
    "Numbers: 3.14159, 2026-12-01 and 123abc; don't won't I'll we've.",
    "caf\u00e9 na\u0308ive \U0001f600 emoji, \u00fcber Stra\u00dfe, \u4f60\u597d\u3002",
]


def qwen_like() -> TextTokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 30, trainer)
    return TextTokenizer.from_tokenizer(tok)


@pytest.fixture(scope="module", params=["tiny", "qwen-like", "placeholder"])
def tok(request: pytest.FixtureRequest) -> TextTokenizer:
    if request.param == "tiny":
        return TextTokenizer.from_tokenizer(Tokenizer.from_file(str(TINY)))
    if request.param == "qwen-like":
        return qwen_like()
    return TextTokenizer.placeholder()


def whole(tok: TextTokenizer, text: str) -> list[int]:
    return tok.encode(clean(text).strip() + "\n")


def stream(tok: TextTokenizer, text: str, cuts: list[int]) -> TurnText:
    """Feed `text` as the pieces `cuts` make, checking the prefix property at every piece."""
    turn = TurnText(tok)
    target = whole(tok, text)
    for cut in sorted(cuts):
        turn.update(text[:cut], final=False)
        assert turn.ids == target[: len(turn.ids)], (text[:cut], turn.ids)
    turn.update(text, final=True)
    return turn


@pytest.mark.parametrize("text", TEXTS)
def test_every_single_cut_settles_a_prefix_and_ends_equal(tok: TextTokenizer, text: str) -> None:
    for cut in range(len(text) + 1):
        assert stream(tok, text, [cut]).ids == whole(tok, text)


@pytest.mark.parametrize("text", TEXTS)
def test_character_by_character_settles_all_but_the_last_word(
    tok: TextTokenizer, text: str
) -> None:
    turn = TurnText(tok)
    for cut in range(1, len(text) + 1):
        turn.update(text[:cut], final=False)
    target = whole(tok, text)
    assert turn.ids == target[: len(turn.ids)]
    # Everything before the last word is settled before the turn is final.
    head = clean(text).strip().rsplit(None, 1)[0]
    assert len(turn.ids) >= len(tok.encode(head)) - 1


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(TEXTS),
    st.lists(st.integers(min_value=0, max_value=80), max_size=12),
)
def test_any_split_of_a_text_gives_the_whole_texts_ids(text: str, cuts: list[int]) -> None:
    tok = qwen_like()
    assert stream(tok, text, [min(c, len(text)) for c in cuts]).ids == whole(tok, text)


def test_settled_ids_never_shrink_and_final_is_sticky() -> None:
    tok = TextTokenizer.from_tokenizer(Tokenizer.from_file(str(TINY)))
    turn = TurnText(tok)
    turn.update("Hello there, and wel", final=False)
    before = list(turn.ids)
    assert before  # "Hello", " there", ","... are settled
    turn.update("Hello there, and wel", final=False)
    assert turn.ids == before
    turn.update("Hello there, and welcome.", final=True)
    assert turn.final and turn.ids == whole(tok, "Hello there, and welcome.")
    turn.update("Hello there, and welcome. More", final=False)  # after final: ignored
    assert turn.ids == whole(tok, "Hello there, and welcome.")
