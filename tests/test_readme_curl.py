"""The README's curl examples of the OpenAI-compatible API work as printed (only the address is
the test server's)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import soundfile

README = Path(__file__).resolve().parent.parent / "README.md"


def curl_block() -> str:
    text = README.read_text()
    marker = text.index("<!-- readme-curl")
    match = re.search(r"```sh\n(.*?)```", text[marker:], re.DOTALL)
    assert match is not None
    return match.group(1)


def test_the_readme_curl_examples_work_as_printed(server, tmp_path: Path) -> None:
    script = curl_block().replace("http://127.0.0.1:8000", server.http_url)
    assert script.count("curl ") == 4
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    hello, rate = soundfile.read(tmp_path / "hello.mp3")
    assert rate == 24000 and len(hello) > 12000
    dialogue, rate = soundfile.read(tmp_path / "dialogue.wav")
    assert rate == 24000 and len(dialogue) > 24000
    assert '"type": "speech.audio.done"' in r.stdout
    assert '"id":"tts-1"' in r.stdout.replace(" ", "")
