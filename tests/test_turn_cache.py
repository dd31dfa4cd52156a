"""The turn cache (server/turn_cache.py): a repeated script is replayed with no engine work, an
edited one is generated from its first changed turn, `options.from_turn` sends audio from a
turn on, and the cache is bounded, persistent and can be turned off. Real servers on loopback,
real WebSocket clients, Piper and the tiny VibeVoice checkpoint."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import running_server
from helpers import DIALOGUE, SessionResult, get_text, metric, run_session, turns_of
from vibevoice_helpers import TINY, voice_dir

from vibecast.engine.backend import SpeakerVoice, SynthesisParams, Turn
from vibecast.protocol import Audio, ServerError, TurnEnd, TurnStart
from vibecast.server.config import ServerConfig
from vibecast.server.run import ServerThread
from vibecast.server.turn_cache import TurnCache, first_key, next_key


def run(url: str, turns: list[tuple[int, str]], **options: object) -> SessionResult:
    opts = {"seed": 5, **options}
    return asyncio.run(run_session(url, turns=turns_of(turns), options=opts))


def packets(result: SessionResult) -> list[bytes]:
    return [p for a in result.audio for p in a.packets or []]


def turn_samples(result: SessionResult) -> dict[int, int]:
    return {m.turn: m.samples for m in result.messages if isinstance(m, TurnEnd)}


def counters(server: ServerThread, *names: str) -> dict[str, float]:
    text = get_text(server.http_url + "/metrics")
    return {n: metric(text, f"vibecast_{n}") for n in names}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


WATCH = ("engine_audio_seconds", "turn_cache_hits", "turn_cache_misses")


@pytest.fixture(scope="module")
def cached(piper, tmp_path_factory):
    folder = tmp_path_factory.mktemp("turns")
    with running_server(piper, turn_cache=True, turn_cache_dir=str(folder)) as server:
        yield server


def test_a_repeated_script_is_replayed_with_no_engine_work(cached) -> None:
    script = [(s, f"{t} (repeat)") for s, t in DIALOGUE]
    before = counters(cached, *WATCH)
    first = run(cached.ws_url, script)
    middle = counters(cached, *WATCH)
    second = run(cached.ws_url, script)
    after = counters(cached, *WATCH)

    made = delta(before, middle)
    assert made["turn_cache_misses"] == len(script) and made["turn_cache_hits"] == 0
    assert made["engine_audio_seconds"] > 0
    replayed = delta(middle, after)
    assert replayed == {
        "engine_audio_seconds": 0,
        "turn_cache_hits": len(script),
        "turn_cache_misses": 0,
    }
    # The same PCM through a fresh Opus encoder: the same packets, turn for turn.
    assert packets(second) == packets(first)
    assert turn_samples(second) == turn_samples(first)
    print(
        f"\nfirst audio: generated {first.done.stats['ttfa_ms']} ms, "
        f"from the turn cache {second.done.stats['ttfa_ms']} ms"
    )


def test_an_edit_regenerates_from_the_changed_turn_exactly_as_a_fresh_run(piper, cached) -> None:
    script = [(s, f"{t} (edit)") for s, t in DIALOGUE]
    run(cached.ws_url, script)
    edited = list(script)
    edited[5] = (edited[5][0], "This line was rewritten after the first take.")
    before = counters(cached, *WATCH)
    again = run(cached.ws_url, edited)
    d = delta(before, counters(cached, *WATCH))
    assert (d["turn_cache_hits"], d["turn_cache_misses"]) == (5, 3)  # turns 5, 6, 7 are new

    # The engine went on after the replayed turns as if it had spoken them: the take equals
    # the edited script made from scratch on a server without the cache.
    with running_server(piper) as plain:
        fresh = run(plain.ws_url, edited)
    assert packets(again) == packets(fresh)


def test_from_turn_sends_the_turns_from_that_one_on(cached) -> None:
    script = [(s, f"{t} (from)") for s, t in DIALOGUE]
    whole = run(cached.ws_url, script)
    before = counters(cached, *WATCH)
    tail = run(cached.ws_url, script, from_turn=6)
    d = delta(before, counters(cached, *WATCH))
    assert d == {"engine_audio_seconds": 0, "turn_cache_hits": len(script), "turn_cache_misses": 0}
    assert [m.turn for m in tail.messages if isinstance(m, TurnStart)] == [6, 7]
    assert turn_samples(tail) == {k: v for k, v in turn_samples(whole).items() if k >= 6}
    assert tail.done.turns == len(script)
    assert sum(a.samples for a in tail.audio if isinstance(a, Audio)) == tail.done.samples


def test_from_turn_without_the_cache_makes_the_turns_before_it_unsent(server) -> None:
    result = run(server.ws_url, DIALOGUE[:3], from_turn=2)
    assert [m.turn for m in result.messages if isinstance(m, TurnStart)] == [2]
    assert list(turn_samples(result)) == [2]


@pytest.mark.parametrize(("value", "says"), [(3, "0 .. 2"), (-1, "between 0"), ("2", "")])
def test_a_bad_from_turn_is_refused(server, value: object, says: str) -> None:
    with pytest.raises(ServerError) as refused:
        run(server.ws_url, DIALOGUE[:3], from_turn=value)
    error = refused.value.error
    assert error.code == "bad_field" and error.field == "options.from_turn"
    assert says in error.message


def test_a_repeated_openai_speech_request_comes_from_the_cache(cached) -> None:
    import openai

    with openai.OpenAI(base_url=cached.http_url + "/v1", api_key="-", max_retries=0) as client:

        def speak() -> bytes:
            text = "Speaker 1: An intro we use every week.\nSpeaker 2: And its answer."
            r = client.audio.speech.create(
                model="tts-1", voice="alloy", input=text, response_format="wav"
            )
            return r.content

        before = counters(cached, *WATCH)
        first = speak()
        middle = counters(cached, *WATCH)
        second = speak()
        after = counters(cached, *WATCH)
    assert delta(before, middle)["turn_cache_misses"] == 2
    assert delta(middle, after) == {
        "engine_audio_seconds": 0,
        "turn_cache_hits": 2,
        "turn_cache_misses": 0,
    }
    assert second == first


def test_without_the_cache_every_take_is_generated(server) -> None:
    script = DIALOGUE[:2]
    before = counters(server, "engine_audio_seconds")
    run(server.ws_url, script)
    middle = counters(server, "engine_audio_seconds")
    run(server.ws_url, script)
    after = counters(server, "engine_audio_seconds")
    assert after["engine_audio_seconds"] - middle["engine_audio_seconds"] > 0
    assert middle["engine_audio_seconds"] - before["engine_audio_seconds"] > 0
    assert "vibecast_turn_cache_hits" not in get_text(server.http_url + "/metrics")


def test_the_cache_is_bounded_least_recently_used_first_and_outlives_the_process(
    tmp_path: Path,
) -> None:
    cache = TurnCache(tmp_path, max_bytes=3 * 5000)
    pcm = np.zeros(1000, np.float32)  # 4000 bytes of audio, ~4.2 KB on disk
    rng = {"rng": np.arange(8, dtype=np.uint8)}
    for key in ("aa01", "bb02", "cc03"):
        cache.put(key, pcm, False, rng)
    assert cache.find("aa01") is not None  # now the most recent
    cache.put("dd04", pcm, True, rng)  # over the bound: bb02, the least recently used, goes
    assert cache.find("bb02") is None and not cache.path("bb02").exists()
    assert cache.counters()["entries"] == 3 and cache.counters()["bytes"] <= 3 * 5000

    again = TurnCache(tmp_path, max_bytes=3 * 5000)  # a new process: the same entries
    found = again.find("dd04")
    assert found is not None
    audio, capped = again.audio(found)
    assert capped and np.array_equal(audio, pcm)
    assert np.array_equal(again.carry(found)["rng"], rng["rng"])


def test_keys_change_with_what_shaped_the_audio() -> None:
    voice = np.linspace(-0.5, 0.5, 2400, dtype=np.float32)
    speakers = [SpeakerVoice("A", voice_id="joe"), SpeakerVoice("B", audio=voice, audio_rate=24000)]
    params = SynthesisParams(seed=1, mode="context")
    base = first_key("model", speakers, params)
    other_voice = [speakers[0], SpeakerVoice("B", audio=voice * 0.9, audio_rate=24000)]
    for changed in (
        first_key("other model", speakers, params),
        first_key("model", other_voice, params),
        first_key("model", speakers, SynthesisParams(seed=2, mode="context")),
        first_key("model", speakers, SynthesisParams(seed=1, mode="turns")),
        first_key("model", speakers, SynthesisParams(seed=1, mode="context", cfg_scale=2.0)),
    ):
        assert changed != base
    assert first_key("model", speakers, params) == base  # names are not part of it
    turn = Turn(0, 1, "Hello.")
    key = next_key(base, turn, False)
    assert key != next_key(base, Turn(0, 0, "Hello."), False)
    assert key != next_key(base, turn, True)
    assert key == next_key(base, Turn(0, 1, "Hello."), False)


# -- VibeVoice, `context` mode: an edit of the last line of a 20-turn script ------------------


@pytest.fixture(scope="module")
def vibevoice_cached(tmp_path_factory):
    voices = voice_dir(tmp_path_factory.mktemp("voices"))
    config = ServerConfig(
        port=0, model=str(TINY), voices=str(voices), device="cpu", dtype="float32"
    ).replace(
        diffusion_steps=3,
        turn_cache=True,
        turn_cache_dir=str(tmp_path_factory.mktemp("turns")),
    )
    with ServerThread(config) as server:
        yield server


FRAMES = 3  # every turn exactly this many frames (random weights end turns at random)
VV = ("engine_frames", "context_rebuilds", "turn_cache_hits", "turn_cache_misses")


def vibevoice_run(server: ServerThread, script: list[tuple[int, str]]) -> SessionResult:
    speakers = [{"voice": "ann"}, {"voice": "ben"}]
    options = {"seed": 3, "frames_per_turn": FRAMES}
    return asyncio.run(
        run_session(server.ws_url, speakers=speakers, turns=turns_of(script), options=options)
    )


def test_editing_the_last_of_20_context_turns_makes_only_that_turn(vibevoice_cached) -> None:
    script = [(i % 2, f"Line {i} of the draft, as first written.") for i in range(20)]
    before = counters(vibevoice_cached, *VV)
    first = vibevoice_run(vibevoice_cached, script)
    middle = counters(vibevoice_cached, *VV)
    edited = script[:-1] + [(1, "The closing line, rewritten.")]
    second = vibevoice_run(vibevoice_cached, edited)
    after = counters(vibevoice_cached, *VV)

    made = delta(before, middle)
    assert made["engine_frames"] == 20 * FRAMES and made["turn_cache_misses"] == 20
    edit = delta(middle, after)
    # One turn made: its frames alone, after one rebuild of the context from the 19 stored
    # turns' records (token ids and frame inputs).
    assert edit == {
        "engine_frames": FRAMES,
        "context_rebuilds": 1,
        "turn_cache_hits": 19,
        "turn_cache_misses": 1,
    }
    per_turn = 3200 * FRAMES * 48000 // 24000
    samples = turn_samples(second)
    assert [samples[k] for k in range(19)] == [per_turn] * 19  # the last one ends the stream
    assert samples == turn_samples(first)
    # The replayed turns are the first take's audio; only the last turn's differs.
    n = 19 * per_turn // 960  # 20 ms packets of the replayed turns
    assert packets(second)[:n] == packets(first)[:n]
    assert packets(second)[n:] != packets(first)[n:]


def test_say_from_turn_writes_the_edited_line_on(cached, tmp_path: Path) -> None:
    script = tmp_path / "draft.txt"
    lines = ["Speaker 1: A first line for say.", "Speaker 2: A second one.", "Speaker 1: The end."]
    script.write_text("\n".join(lines) + "\n")
    whole = tmp_path / "whole.wav"
    assert _say(str(script), "-o", str(whole), "--server", cached.ws_url).returncode == 0
    lines[2] = "Speaker 1: The end, said better."
    script.write_text("\n".join(lines) + "\n")
    before = counters(cached, *WATCH)
    tail = tmp_path / "tail.wav"
    r = _say(str(script), "-o", str(tail), "--server", cached.ws_url, "--from-turn", "2")
    assert r.returncode == 0, r.stderr
    d = delta(before, counters(cached, *WATCH))
    assert (d["turn_cache_hits"], d["turn_cache_misses"]) == (2, 1)
    edited = tmp_path / "edited.wav"  # the whole edited script, now all from the cache
    assert _say(str(script), "-o", str(edited), "--server", cached.ws_url).returncode == 0
    full, part = wav_samples(edited), wav_samples(tail)
    assert 0 < len(part) < len(full) and np.array_equal(full[-len(part) :], part)

    r = _say(str(script), "-o", str(tail), "--server", cached.ws_url, "--from-turn", "3")
    assert r.returncode == 2 and "0 .. 2" in r.stderr


def _say(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from vibecast.cli import main; main()", "say", "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def wav_samples(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_bench_turn_cache_reports_the_four_takes(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    cmd = [sys.executable, "-c", "from vibecast.cli import main; main()", "bench"]
    r = subprocess.run(
        [*cmd, "--turn-cache", "4", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    takes = {t["take"]: t for t in json.loads(out.read_text())["takes"]}
    made = {name: t["engine_audio_s"] for name, t in takes.items()}
    assert made["made from scratch"] > made["last line edited, from it"] > 0
    assert made["the same again"] == made["last line edited, from the top"] == 0
    assert "the same again" in r.stdout


def test_a_turns_mode_edit_equals_a_fresh_take(vibevoice_cached, tmp_path: Path) -> None:
    """VibeVoice `turns` mode: after the replayed turns the engine goes on from their saved
    generator state, so the take is the one a server without the cache makes."""
    script = [(i % 2, f"Turn {i} on its own.") for i in range(4)]
    speakers = [{"voice": "ann"}, {"voice": "ben"}]
    options = {"seed": 8, "frames_per_turn": FRAMES, "mode": "turns"}

    def take(server: ServerThread, lines: list[tuple[int, str]]) -> SessionResult:
        return asyncio.run(
            run_session(server.ws_url, speakers=speakers, turns=turns_of(lines), options=options)
        )

    take(vibevoice_cached, script)
    edited = script[:2] + [(0, "Turn 2, edited."), script[3]]
    before = counters(vibevoice_cached, *VV)
    again = take(vibevoice_cached, edited)
    d = delta(before, counters(vibevoice_cached, *VV))
    assert (d["turn_cache_hits"], d["engine_frames"]) == (2, 2 * FRAMES)

    config = vibevoice_cached.config.replace(turn_cache=False, port=0)
    with ServerThread(config) as plain:
        fresh = take(plain, edited)
    assert packets(again) == packets(fresh)


def test_a_cache_folder_that_cannot_be_written_does_not_fail_the_take(
    piper, tmp_path: Path, caplog
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    with running_server(piper, turn_cache=True, turn_cache_dir=str(blocker / "turns")) as s:
        result = run(s.ws_url, DIALOGUE[:2])
        assert result.done.turns == 2 and len(turn_samples(result)) == 2
        assert counters(s, "turn_cache_misses")["turn_cache_misses"] == 0
    assert "could not store turn 0" in caplog.text
