"""The output stage's rules: whole frames per turn, continuous pts, and an exact end."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import decode_packets

from vibecast.server.output import AudioOutput, OutputFormat


def speak(out: AudioOutput, turns: list[int], last_known: bool) -> list:
    """Push turns of the given lengths (engine samples, 24 kHz) through the output stage."""
    rng = np.random.default_rng(0)
    msgs: list = []
    for i, n in enumerate(turns):
        msgs.append(out.turn_start(i, 0, "t"))
        for chunk in np.array_split(rng.standard_normal(n).astype(np.float32) * 0.1, 5):
            m = out.audio(i, chunk)
            if m is not None:
                msgs.append(m)
        m, end = out.turn_end(i, last=last_known and i == len(turns) - 1)
        msgs += [x for x in (m, end) if x is not None]
    if not last_known:
        tail = out.end_of_stream(len(turns) - 1)
        if tail is not None:
            msgs.append(tail)
    return msgs


@pytest.mark.parametrize("rate", [48000, 24000, 16000])
@pytest.mark.parametrize("last_known", [True, False])
def test_opus_turns_are_whole_frames_and_the_end_is_exact(rate: int, last_known: bool) -> None:
    fmt = OutputFormat("opus", rate, 32000, 20)
    out = AudioOutput(fmt, 24000)
    msgs = speak(out, [24000 + 17, 12345, 7001], last_known)
    audio = [m for m in msgs if m.type == "audio"]
    starts = [m for m in msgs if m.type == "turn_start"]
    ends = [m for m in msgs if m.type == "turn_end"]
    assert [a.seq for a in audio] == list(range(len(audio)))
    for s, e in zip(starts[:-1], ends[:-1], strict=True):
        assert e.samples % fmt.frame == 0  # padded to whole frames
        assert s.pts % fmt.frame == 0
    total = out.pts
    for n, e in zip([24000 + 17, 12345, 7001], ends, strict=True):
        assert e.samples >= int(np.ceil(n * rate / 24000))  # nothing cut
    decoded = decode_packets([p for a in audio for p in a.packets], rate)
    assert out.encoder is not None
    skip = out.encoder.lookahead
    if last_known:
        assert len(decoded) - skip == total  # exact
        assert audio[-1].samples > 0
    else:
        assert total <= len(decoded) - skip < total + fmt.frame  # the protocol's general promise
        assert audio[-1].samples == 0  # the flush-only message


def test_pcm_counts_samples_at_the_format_rate() -> None:
    out = AudioOutput(OutputFormat("pcm_s16le", 16000, 0, 20), 24000)
    msgs = speak(out, [24000, 4800], True)
    audio = [m for m in msgs if m.type == "audio"]
    assert sum(len(a.pcm) // 2 for a in audio) == out.pts == sum(a.samples for a in audio)
    assert out.pts % 320 == 0 and out.pts >= 16000 + 3200
    assert out.format_info()["pre_skip"] == 0
