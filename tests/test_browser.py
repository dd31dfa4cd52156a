"""The live-playback page in a real browser: Debian's chromium, driven by Playwright (never
`playwright install`), against a live server with the default voice. Once with WebCodecs'
AudioDecoder, once with it removed so the WASM libopus fallback plays."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running_server

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which("chromium") is None,
        reason="Debian chromium is not installed (scripts/setup.sh --test)",
    ),
]

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
]

SCRIPT = """Speaker 1: Welcome back. Today we talk about streaming speech.
Speaker 2: Thanks for having me.
Speaker 3: Why does the first second matter so much?
Speaker 1: Because listeners decide right away.
Speaker 2: And then it has to keep going without gaps.
Speaker 3: That is what we are here to check."""

MAX_CHARS = 2000


@pytest.fixture(scope="module")
def live(piper, tmp_path_factory) -> Iterator[Any]:
    jobs = str(tmp_path_factory.mktemp("jobs"))
    with running_server(piper, max_chars=MAX_CHARS, jobs_dir=jobs) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS
        )
        yield b
        b.close()


def open_page(browser, live, fallback: bool, viewport=(1280, 800), init: str | None = None):
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    if fallback:
        page.add_init_script("delete window.AudioDecoder; delete window.AudioEncoder;")
    if init is not None:
        page.add_init_script(init)
    page.goto(live.http_url + "/")
    page.wait_for_function("window.vibecast && window.vibecast.ready", timeout=30000)
    return page, errors


def stats(page) -> dict[str, Any]:
    return page.evaluate("window.vibecast.stats")


@pytest.mark.parametrize("fallback", [False, True], ids=["webcodecs", "wasm"])
def test_play_a_dialogue(browser, live, artifacts: Path, fallback: bool) -> None:
    page, errors = open_page(browser, live, fallback)
    page.fill('[data-testid="script"]', SCRIPT)
    assert page.locator('[data-testid="turn-5"]').inner_text().startswith("Speaker 3")
    page.click('[data-testid="play"]')

    page.wait_for_function("window.vibecast.stats.ttfa_ms !== null", timeout=30000)
    s = stats(page)
    assert s["ttfa_ms"] < 1000, f"first decoded audio {s['ttfa_ms']} ms after the press"
    assert s["decoder"] == ("WASM (libopus)" if fallback else "WebCodecs")

    page.wait_for_function("window.vibecast.stats.current_turn >= 2", timeout=60000)
    name = "web_demo_playing_wasm.png" if fallback else "web_demo_playing.png"
    page.screenshot(path=str(artifacts / name))
    assert page.locator('[data-testid="turn-2"]').get_attribute("class").find("current") >= 0

    page.wait_for_function("window.vibecast.stats.state === 'done'", timeout=120000)
    s = stats(page)
    assert s["highlighted"] == [0, 1, 2, 3, 4, 5]  # every turn, in order, once
    assert s["session_samples"] > 48000 * 5
    assert abs(s["played_samples"] - s["session_samples"]) <= 960  # one 20 ms frame
    assert s["underruns"] == 0, f"underruns at {s['underrun_at']}"
    assert page.locator('[data-testid="status"]').inner_text() == "done"
    href = page.locator('[data-testid="download"]').get_attribute("href")
    assert href and href.endswith("/audio.opus")
    assert errors == []
    page.close()


@pytest.mark.parametrize("fallback", [False, True], ids=["webcodecs", "wasm"])
def test_stop_silences_at_once(browser, live, fallback: bool) -> None:
    page, errors = open_page(browser, live, fallback)
    page.fill('[data-testid="script"]', SCRIPT)
    page.click('[data-testid="play"]')
    page.wait_for_function("window.vibecast.stats.played_samples > 48000", timeout=60000)
    page.click('[data-testid="stop"]')
    page.wait_for_function(
        "window.vibecast.stats.state === 'stopped'"
        " && window.vibecast.stats.stop_silence_ms !== null",
        timeout=30000,  # a hang guard (once 10 s passed under a loaded 2-core run); the
    )  # silence itself is measured by the page and held to 200 ms below
    s = stats(page)
    assert s["stop_silence_ms"] < 200
    # The server closes the socket after `cancelled`: once closed, nothing more can arrive.
    page.wait_for_function("window.vibecast.stats.closed_code !== null", timeout=10000)
    after = stats(page)
    assert after["closed_code"] == 1000
    assert after["audio_after_cancel"] == 0
    assert after["played_samples"] == s["played_samples"]  # the player stayed silent
    assert errors == []
    page.close()


def test_over_limit_script_shows_the_error(browser, live) -> None:
    page, _ = open_page(browser, live, fallback=False)
    lines = [
        f"Speaker {1 + i % 3}: " + "This sentence is long enough to fill the script. " * 3
        for i in range(20)
    ]
    page.fill('[data-testid="script"]', "\n".join(lines))
    page.click('[data-testid="play"]')
    page.wait_for_function("window.vibecast.stats.error !== null", timeout=30000)
    error = page.locator("#error")
    assert error.is_visible()
    text = error.inner_text()
    assert "max_chars" in text and str(MAX_CHARS) in text
    bad = stats(page)["error"]["turn"]
    assert bad is not None and "bad" in page.locator(f'[data-testid="turn-{bad}"]').get_attribute(
        "class"
    )
    assert page.locator('[data-testid="play"]').is_enabled()  # a corrected script can be played
    page.close()


def test_a_speaker_can_use_an_uploaded_voice(browser, live, tmp_path: Path) -> None:
    import numpy as np

    from vibecast.protocol.wav import wav_bytes

    t = np.arange(3 * 24000) / 24000
    phase = 2 * np.pi * np.cumsum(180 * (1 + 0.05 * np.sin(2 * np.pi * 4 * t))) / 24000
    sample = tmp_path / "my-voice.wav"  # a voiced, speech-like tone at about 180 Hz
    harmonics = sum((np.sin(k * phase) / k for k in range(1, 8)), start=np.zeros_like(phase))
    sample.write_bytes(wav_bytes(0.3 * harmonics, 24000))
    page, errors = open_page(browser, live, fallback=False)
    page.fill(
        '[data-testid="script"]', "Speaker 1: This is my own voice.\nSpeaker 2: And this is Joe."
    )
    page.locator("#speakers input[type=file]").first.set_input_files(str(sample))
    page.wait_for_function(
        "document.querySelector('#speakers select').selectedOptions[0]"
        ".text.includes('my-voice.wav')"
    )
    page.click('[data-testid="play"]')
    page.wait_for_function("window.vibecast.stats.state === 'done'", timeout=60000)
    s = stats(page)
    assert [sp["voice"] for sp in s["speakers"]] == ["upload", "joe-high"]
    assert s["error"] is None and errors == []
    page.close()


def test_page_fits_a_phone(browser, live, artifacts: Path) -> None:
    page, _ = open_page(browser, live, fallback=False, viewport=(390, 844))
    page.fill('[data-testid="script"]', SCRIPT)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # no sideways scrolling
    page.screenshot(path=str(artifacts / "web_demo_phone.png"), full_page=True)
    page.close()


def test_the_jobs_panel_makes_a_job_and_offers_its_audio(browser, live) -> None:
    import io
    import urllib.request

    import soundfile

    page, errors = open_page(browser, live, fallback=False)
    page.fill("[data-testid=script]", SCRIPT)
    page.click("[data-testid=submit-job]")
    done = page.wait_for_selector("[data-testid=jobs] li[data-status=done]", timeout=60000)
    assert done is not None
    progress = done.query_selector(".job-progress")
    assert progress is not None and progress.inner_text().startswith("6/6 turns")
    link = done.query_selector(".job-download")
    assert link is not None
    href = link.get_attribute("href")
    assert href is not None
    with urllib.request.urlopen(href, timeout=60) as r:
        audio, rate = soundfile.read(io.BytesIO(r.read()))
    assert rate == 24000 and len(audio) / rate > 5
    # Reloaded, the page lists the job again: the server keeps it.
    page.reload()
    page.wait_for_function("window.vibecast && window.vibecast.ready", timeout=30000)
    assert page.query_selector("[data-testid=jobs] li[data-status=done]") is not None
    assert errors == []
    page.close()


@pytest.fixture(scope="module")
def drafting(piper, tmp_path_factory) -> Iterator[Any]:
    """A server with the turn cache on (the default of `vibecast serve`)."""
    folder = str(tmp_path_factory.mktemp("turns"))
    with running_server(piper, turn_cache=True, turn_cache_dir=folder) as server:
        yield server


def cache_counts(server) -> tuple[float, float]:
    from helpers import get_text, metric

    text = get_text(server.http_url + "/metrics")
    return metric(text, "vibecast_turn_cache_hits"), metric(text, "vibecast_turn_cache_misses")


def play_to_the_end(page) -> dict[str, Any]:
    page.click('[data-testid="play"]')
    page.wait_for_function("window.vibecast.stats.state === 'done'", timeout=120000)
    return stats(page)


def test_an_edited_script_plays_from_the_changed_line(browser, drafting) -> None:
    page, errors = open_page(browser, drafting, fallback=False)
    lines = SCRIPT.splitlines()[:4]
    page.fill('[data-testid="script"]', "\n".join(lines))
    first = play_to_the_end(page)
    assert first["from_turn"] == 0 and first["highlighted"] == [0, 1, 2, 3]

    # A finished take, one line edited: the page plays from that line; the two lines before it
    # come from the cache (made, not sent), the edited line and the one after it are new.
    lines[2] = "Speaker 3: Why would the first second matter at all?"
    page.fill('[data-testid="script"]', "\n".join(lines))
    hits, misses = cache_counts(drafting)
    again = play_to_the_end(page)
    assert again["from_turn"] == 2 and again["highlighted"] == [2, 3]
    assert again["underruns"] == 0
    h, m = cache_counts(drafting)
    assert (h - hits, m - misses) == (2, 2)

    # The listener's other choice: the whole take again, every turn from the cache.
    page.select_option('[data-testid="play-from"]', "top")
    page.fill('[data-testid="script"]', "\n".join(lines[:3] + ["Speaker 1: Listeners decide."]))
    hits, misses = cache_counts(drafting)
    top = play_to_the_end(page)
    assert top["from_turn"] == 0 and top["highlighted"] == [0, 1, 2, 3]
    h, m = cache_counts(drafting)
    assert (h - hits, m - misses) == (3, 1)

    # A take still playing: edit its last line and press Play; the new take starts there.
    page.select_option('[data-testid="play-from"]', "changed")
    page.click('[data-testid="play"]')
    page.wait_for_function("window.vibecast.stats.state === 'playing'", timeout=30000)
    page.fill('[data-testid="script"]', "\n".join(lines[:3] + ["Speaker 1: Decided, at once."]))
    edited = play_to_the_end(page)
    assert edited["from_turn"] == 3 and edited["highlighted"] == [3]
    assert page.locator('[data-testid="status"]').inner_text() == "done"
    assert errors == []
    page.close()


# Every frame the page sends on its WebSockets, as bytes, for the test to decode.
RECORD_SENT = """
window.sentFrames = [];
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  window.sentFrames.push(Array.from(new Uint8Array(data)));  // a copy of the bytes sent
  return send.call(this, data);
};
"""


def sent(page) -> list[dict[str, Any]]:
    import msgpack

    return [msgpack.unpackb(bytes(f)) for f in page.evaluate("window.sentFrames")]


def test_type_while_it_speaks(browser, live, artifacts: Path) -> None:
    page, errors = open_page(browser, live, fallback=False, init=RECORD_SENT)
    page.check('[data-testid="typing-mode"]')
    assert page.locator('[data-testid="script"]').is_hidden()
    assert page.locator('[data-testid="play"]').is_disabled()
    page.select_option('[data-testid="typing-speaker"]', "1")  # Speaker 2
    line = "Hello there, this line was typed while the page listened."
    page.click('[data-testid="typing-input"]')
    page.keyboard.type(line)
    # Each finished word went out as it was typed (those typed before `ready` once it came); the
    # last one waits for Enter.
    page.wait_for_function("window.vibecast.stats.text_streaming !== null", timeout=30000)
    frames = sent(page)
    assert frames[0]["type"] == "start"
    assert frames[0]["turns"] == [{"speaker": 1, "text": "", "stream": True}]
    assert frames[0]["more"] is True and len(frames[0]["speakers"]) == 4
    pieces = [f for f in frames if f["type"] == "text"]
    assert len(pieces) == len(line.split()) - 1  # a word at a time
    assert all(f["turn"] == 0 and not f["final"] for f in pieces)
    assert "".join(f["text"] for f in pieces) == line.rsplit(" ", 1)[0] + " "
    assert page.input_value('[data-testid="typing-input"]') == "listened."
    note = page.locator('[data-testid="typing-note"]').inner_text()
    assert "speaks each line when you press Enter" in note  # Piper: text_streaming false

    page.keyboard.press("Enter")
    page.wait_for_function(
        f"window.vibecast.stats.typed[0]?.spoken === {line!r}"
        " && window.vibecast.stats.played_samples > 48000",
        timeout=60000,
    )
    pieces = [f for f in sent(page) if f["type"] == "text"]
    assert pieces[-1] == {"type": "text", "turn": 0, "text": "listened.", "final": True}
    assert page.locator('[data-testid="turn-0"]').inner_text().endswith(line)
    page.screenshot(path=str(artifacts / "web_demo_typing.png"))

    # The next key opens the next line, for another speaker, in the same session.
    page.select_option('[data-testid="typing-speaker"]', "0")
    second = "And a second voice answers."
    page.keyboard.type(second)
    page.click('[data-testid="typing-end"]')
    page.wait_for_function(
        f"window.vibecast.stats.typed[1]?.spoken === {second!r}"
        " && window.vibecast.stats.highlighted.includes(1)",
        timeout=60000,
    )
    appended = [f for f in sent(page) if f["type"] == "append"]
    assert appended == [
        {"type": "append", "turns": [{"speaker": 0, "text": "", "stream": True}], "more": True}
    ]
    s = stats(page)
    assert s["highlighted"] == [0, 1] and s["error"] is None
    assert s["underruns"] == 0, f"underruns at {s['underrun_at']}"  # the pause is no underrun
    page.click('[data-testid="stop"]')
    page.wait_for_function("window.vibecast.stats.state === 'stopped'", timeout=30000)
    assert errors == []
    page.close()


def test_leaving_typing_mode_keeps_the_script_mode_as_it_was(browser, live) -> None:
    page, errors = open_page(browser, live, fallback=False)
    page.check('[data-testid="typing-mode"]')
    page.uncheck('[data-testid="typing-mode"]')
    page.fill('[data-testid="script"]', "Speaker 1: Back to the script.")
    assert page.locator('[data-testid="play"]').is_enabled()
    s = play_to_the_end(page)
    assert s["highlighted"] == [0] and s["error"] is None and errors == []
    page.close()
