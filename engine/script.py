"""The script format: one `Speaker N: text` line per turn (the format VibeVoice's demos read).

Lines that do not match are refused with their line number rather than dropped. The numbers
only name speakers: the distinct ones that appear, sorted ascending, become speakers 0, 1, 2, ...
("Speaker 1"/"Speaker 3" -> 0/1; "Speaker 2" first, then "Speaker 1" -> Speaker 1 is 0). The page
(web_demo/app.js `parse`) applies the same rule; docs/protocol.md "Scripts as text" states it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# [0-9], not \d: the page's JavaScript \d is ASCII only, while int() takes any script's digits.
_LINE = re.compile(r"^\s*speaker\s+([0-9]+)\s*:\s*(.*?)\s*$", re.IGNORECASE)


class ScriptError(ValueError):
    pass


@dataclass(frozen=True)
class ScriptLine:
    speaker: int
    text: str


def parse_script(text: str) -> list[ScriptLine]:
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = _LINE.match(raw)
        if m is None:
            raise ScriptError(
                f"line {number}: expected 'Speaker N: text', got {raw.strip()[:60]!r}"
            )
        if not m.group(2):
            raise ScriptError(f"line {number}: Speaker {m.group(1)} has nothing to say")
        lines.append((int(m.group(1)), m.group(2)))
    if not lines:
        raise ScriptError("the script has no 'Speaker N: text' lines")
    index = {n: i for i, n in enumerate(sorted({n for n, _ in lines}))}
    return [ScriptLine(index[n], t) for n, t in lines]
