"""The script format: one `Speaker N: text` line per turn (the format VibeVoice's demos read).

Lines that do not match are refused with their line number rather than dropped. Speaker
numbers may start at 0 or 1; 1-based scripts are shifted to 0-based, as the reference does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"^\s*speaker\s+(\d+)\s*:\s*(.*?)\s*$", re.IGNORECASE)


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
            raise ScriptError(f"line {number}: expected 'Speaker N: text', got {raw.strip()[:60]!r}")
        if not m.group(2):
            raise ScriptError(f"line {number}: Speaker {m.group(1)} has nothing to say")
        lines.append((int(m.group(1)), m.group(2)))
    if not lines:
        raise ScriptError("the script has no 'Speaker N: text' lines")
    shift = 1 if min(s for s, _ in lines) > 0 else 0
    return [ScriptLine(s - shift, t) for s, t in lines]
