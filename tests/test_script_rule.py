"""`Speaker N` numbers in a text script: the distinct numbers, sorted ascending, become speakers
0, 1, 2, ... The page's parser (web_demo/app.js) applies the same rule."""

from __future__ import annotations

import pytest

from vibecast.engine.script import ScriptError, parse_script


def speakers(text: str) -> list[int]:
    return [line.speaker for line in parse_script(text)]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("Speaker 0: a\nSpeaker 1: b\nSpeaker 0: c", [0, 1, 0]),
        ("Speaker 1: a\nSpeaker 2: b\nSpeaker 1: c", [0, 1, 0]),
        ("Speaker 1: a\nSpeaker 3: b\nSpeaker 1: c", [0, 1, 0]),  # a gap closes up
        ("Speaker 2: a\nSpeaker 1: b", [1, 0]),  # sorted, not in order of first appearance
        ("Speaker 7: a\nSpeaker 0: b\nSpeaker 4: c\nSpeaker 7: d", [2, 0, 1, 2]),
        ("Speaker 5: alone", [0]),
        ("speaker 01: a\nSPEAKER 1: b", [0, 0]),  # the number, not how it is written
    ],
)
def test_distinct_numbers_in_ascending_order_are_speakers(script: str, expected: list[int]) -> None:
    assert speakers(script) == expected


def test_text_comments_and_blank_lines() -> None:
    lines = parse_script("# a comment\n\n  Speaker 3 :  Hello there.  \nSpeaker 9: Hi.\n")
    assert [(line.speaker, line.text) for line in lines] == [(0, "Hello there."), (1, "Hi.")]


def test_only_ascii_digits_number_a_speaker() -> None:
    # The page's JavaScript \d matches 0-9 only; a script must not parse here and fail there.
    with pytest.raises(ScriptError, match="line 1"):
        parse_script("Speaker \u0663: text")
