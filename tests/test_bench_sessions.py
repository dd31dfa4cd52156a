"""`vibecast bench --sessions`: the many-sessions benchmark runs end to end through a real
server. With the tiny VibeVoice checkpoint and `frames_per_turn`, every turn of every session is
exactly that many frames, so the forced length reaches the engine from the client's `options`;
with the default voice, a server of capacity 1 queues the other listeners, tells them positions
that only go down, and serves them all. Structure only: no timing is asserted."""

from __future__ import annotations

import pytest
from vibevoice_helpers import TINY

from vibecast.bench import DIALOGUE, RealTimeListener, sessions_bench, synthetic_voice
from vibecast.engine.vibevoice.backend import VibeVoiceBackend
from vibecast.protocol.wav import wav_bytes

SAMPLES_PER_FRAME = 3200  # at 24 kHz


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    voices = tmp_path_factory.mktemp("voices")
    for i, name in enumerate(["ann", "ben"]):
        (voices / f"{name}.wav").write_bytes(wav_bytes(synthetic_voice(i, 1.0), 24000))
    backend = VibeVoiceBackend.load(str(TINY), "cpu", "float32", voices=str(voices))
    backend.warmup()
    return backend


def test_two_tiny_sessions_make_exactly_the_forced_frames(tiny) -> None:
    pcm = {"codec": "pcm_s16le", "sample_rate": 24000}  # no Opus padding at the script's end
    result = sessions_bench(tiny, [2], frames_per_turn=3, fmt=pcm)
    assert result["frames_per_turn"] == 3 and result["listeners"] is False
    [run] = result["runs"]
    assert run["sessions"] == 2 and run["capacity"] == 2
    assert run["done"] == 2 and run["admitted"] == 2 and run["queued"] == 0
    for key in ("frames_per_s", "x_real_time", "wall_s"):
        assert run[key] > 0, key
    for key in ("rtf_per_session", "first_audio_s"):
        assert set(run[key]) == {"p50", "p95", "max"} and run[key]["p50"] is not None
    assert run["ops_per_step"] > 0  # the batched engine counts what one step dispatches
    turns = len(DIALOGUE)
    for session in run["per_session"]:
        assert session["outcome"] == "done" and session["positions"] == []
        assert session["sample_rate"] == 24000
        assert session["turn_samples"] == [3 * SAMPLES_PER_FRAME] * turns
        assert session["samples_24k"] == turns * 3 * SAMPLES_PER_FRAME
    assert run["audio_s"] == pytest.approx(2 * turns * 3 * SAMPLES_PER_FRAME / 24000)


def test_listeners_beyond_capacity_wait_in_line_and_all_finish(piper) -> None:
    result = sessions_bench(piper, [3], listeners=True, capacity=1, turns=2)
    [run] = result["runs"]
    assert run["capacity"] == 1 and run["done"] == 3
    assert run["admitted"] == 1 and run["queued"] == 2
    for positions in run["positions"]:
        assert positions, "a queued session was told its position"
        assert all(1 <= p <= 2 for p in positions), positions  # two in line behind one
        assert all(b < a for a, b in zip(positions, positions[1:], strict=False)), positions
    for session in run["per_session"]:
        assert session["outcome"] == "done" and session["samples"] > 0
        assert session["stalls"] >= 0 and session["stall_s"] >= 0
    assert run["stalls"] == sum(s["stalls"] for s in run["per_session"])


def test_the_listener_counts_a_stall_from_running_dry_to_playing_again() -> None:
    listener = RealTimeListener(prebuffer_ms=250)
    listener.receive(0.0, 500)  # plays from t=0
    listener.receive(0.4, 100)  # in time: 100 ms left at t=0.4
    assert listener.stalls == 0 and listener.playing
    listener.receive(0.9, 200)  # ran dry at t=0.6; 200 ms is under the 375 ms cushion now
    assert listener.stalls == 1 and not listener.playing
    listener.receive(1.0, 200)  # 400 ms buffered: plays again, 0.4 s after running dry
    assert listener.playing and listener.stall_s == pytest.approx(0.4)
    listener.finish(1.2)
    assert listener.stalls == 1


def test_the_soak_runs_against_a_server_given_by_url(server, tmp_path) -> None:
    """`vibecast bench --soak M --server URL` (a cluster's gateways, say): the same listener and
    checks, without the memory figures it can only take from a server it started itself."""
    import json
    import subprocess
    import sys

    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-c", "from vibecast.cli import main; main()", "bench", "--soak"]
    args = ["0.2", "--speed", "20", "--server", server.ws_url, "--json", str(out)]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["pts_gaps"] == 0 and result["audio_minutes"] > 0.1
    assert result["rss_mb_peak"] is None
