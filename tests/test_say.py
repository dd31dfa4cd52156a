"""`vibecast say` as a person runs it: a script file in, a file out that other tools read."""

from __future__ import annotations

import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from helpers import decode_packets

from vibecast.protocol.ogg import read_ogg_opus

SCRIPT = """\
Speaker 1: Good evening, and welcome to the late show.
Speaker 2: Thanks. It is good to be back.
Speaker 1: Let's get right to it, shall we?
"""


def _say(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from vibecast.cli import main; main()", "say", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _reported(stdout: str) -> tuple[int, int]:
    m = re.search(r": (\d+) samples at (\d+) Hz", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


def test_say_writes_an_opus_file_of_the_reported_length(server, tmp_path: Path) -> None:
    script = tmp_path / "show.txt"
    script.write_text(SCRIPT)
    out = tmp_path / "show.opus"
    r = _say(str(script), "-o", str(out), "--server", server.ws_url, "--seed", "4")
    assert r.returncode == 0, r.stderr
    samples, rate = _reported(r.stdout)
    assert rate == 48000 and samples > 3 * 48000
    assert "turn 3/3" in r.stderr  # the progress report (a bar on a terminal)

    info = subprocess.run(["opusinfo", str(out)], capture_output=True, text=True)
    assert info.returncode == 0 and "WARNING" not in info.stdout + info.stderr, info.stdout
    wav = tmp_path / "decoded.wav"
    subprocess.run(["opusdec", "--quiet", "--rate", "48000", str(out), str(wav)], check=True)
    with wave.open(str(wav)) as w:
        assert w.getnframes() == samples

    # Our own reader and libopus agree with opusdec.
    ogg = read_ogg_opus(out.read_bytes())
    assert ogg.samples_48k == samples
    assert len(decode_packets(ogg.packets)) - ogg.pre_skip >= samples


def test_say_writes_wav_in_process_with_model(tmp_path: Path) -> None:
    script = tmp_path / "s.txt"
    script.write_text("Speaker 0: One line is enough here.\n")
    out = tmp_path / "s.wav"
    r = _say(str(script), "-o", str(out), "--model", "piper", "--quiet")
    assert r.returncode == 0, r.stderr
    samples, rate = _reported(r.stdout)
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnframes()) == (24000, samples)
        x = np.frombuffer(w.readframes(samples), "<i2")
    assert np.sqrt(np.mean((x / 32768.0) ** 2)) > 0.02


@pytest.mark.parametrize(
    ("script", "needle"),
    [("Narrator: hello\n", "expected 'Speaker N: text'"), ("Speaker 1:\n", "nothing to say")],
)
def test_say_refuses_a_bad_script_with_the_line(
    server, tmp_path: Path, script: str, needle: str
) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(script)
    r = _say(str(f), "-o", str(tmp_path / "x.opus"), "--server", server.ws_url)
    assert r.returncode == 2 and needle in r.stderr and "line 1" in r.stderr


def test_say_without_a_server_says_how_to_get_one(tmp_path: Path) -> None:
    f = tmp_path / "s.txt"
    f.write_text(SCRIPT)
    r = _say(str(f), "-o", str(tmp_path / "x.opus"), "--server", "ws://127.0.0.1:9/v1/stream")
    assert r.returncode == 2 and "vibecast serve" in r.stderr
