"""Jobs (server/jobs.py) through a real server: submitted, followed by server-sent events,
downloaded; the same audio as a WebSocket session of the same script and seed; a playable
preview while it runs; cancelled; private to its key; and finished after a SIGKILL and a
restart with no turn missing or repeated."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from conftest import running_server
from test_openai_api import _Held

from vibecast.protocol import Audio, Client

VOICES = [{"voice": "joe"}, {"voice": "joe-deep"}]


def script(lines: int) -> list[dict[str, Any]]:
    return [
        {"speaker": i % 2, "text": f"This is line {i} of a long script, read for the job test."}
        for i in range(lines)
    ]


def call(
    url: str, body: Any = None, method: str | None = None, key: str | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            raw = r.read()
            kind = r.headers.get("content-type", "")
            return r.status, json.loads(raw) if kind.startswith("application/json") else raw
    except urllib.error.HTTPError as e:
        with e:  # an error response holds its socket until closed
            return e.code, json.loads(e.read())


def follow(base: str, job_id: str, until: Any, key: str | None = None) -> dict[str, Any]:
    """Read the job's server-sent events until `until(status)` holds; returns that status."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{base}/v1/jobs/{job_id}/events", headers=headers)
    with urllib.request.urlopen(request, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: "):
                status = json.loads(line[6:])
                if until(status):
                    return status
    raise AssertionError("the event stream ended first")


def wav_pcm(data: bytes) -> np.ndarray:
    audio, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000
    return audio


async def websocket_pcm(url: str, turns: list[dict[str, Any]], seed: int) -> np.ndarray:
    async with await Client.connect(url) as client:
        await client.start(
            VOICES,
            turns,
            format={"codec": "pcm_s16le", "sample_rate": 24000},
            options={"seed": seed},
        )
        pcm = [m.pcm async for m in client if isinstance(m, Audio) and m.pcm]
    return np.frombuffer(b"".join(pcm), dtype="<i2")


@pytest.fixture(scope="module")
def jobs_server(piper, tmp_path_factory):
    with running_server(piper, jobs_dir=str(tmp_path_factory.mktemp("jobs"))) as server:
        yield server


def test_a_three_minute_job_is_the_websocket_sessions_audio(jobs_server) -> None:
    base, turns = jobs_server.http_url, script(64)
    status, job = call(
        f"{base}/v1/jobs", {"speakers": VOICES, "turns": turns, "options": {"seed": 5}}
    )
    assert status == 202 and job["status"] in ("queued", "running")
    assert job["progress"]["turns_total"] == 64
    done = follow(base, job["id"], lambda s: s["status"] == "done")
    assert done["progress"]["turns_done"] == 64 and done["progress"]["seconds_done"] > 180
    status, wav = call(f"{base}/v1/jobs/{job['id']}/audio?format=wav")
    assert status == 200
    whole = wav_pcm(wav)
    ws = asyncio.run(websocket_pcm(jobs_server.ws_url, turns, 5))
    np.testing.assert_array_equal(whole, ws)
    # One turn alone, in another format: decodes to that turn's share of the take.
    status, mp3 = call(f"{base}/v1/jobs/{job['id']}/turns/3/audio?format=mp3")
    turn, rate = soundfile.read(io.BytesIO(mp3))
    assert status == 200 and rate == 24000 and 0.5 < len(turn) / rate < 10


def test_the_preview_of_a_running_job_is_a_playable_prefix(piper, tmp_path) -> None:
    backend = _Held(piper)  # only turn 0 is spoken until the gate opens
    with running_server(backend, jobs_dir=str(tmp_path)) as server:
        base = server.http_url
        turns = script(6)
        _, job = call(
            f"{base}/v1/jobs", {"speakers": VOICES, "turns": turns, "options": {"seed": 2}}
        )
        running = follow(base, job["id"], lambda s: s["progress"]["turns_done"] == 1)
        assert running["status"] == "running"
        _, preview = call(f"{base}/v1/jobs/{job['id']}/audio?format=wav")
        prefix = wav_pcm(preview)
        assert len(prefix) > 12000
        status, body = call(f"{base}/v1/jobs/{job['id']}/turns/4/audio")
        assert status == 404 and body["error"]["code"] == "unknown_turn"
        backend.gate.set()
        server.state.sessions.scheduler.wake()
        follow(base, job["id"], lambda s: s["status"] == "done")
        _, whole = call(f"{base}/v1/jobs/{job['id']}/audio?format=wav")
        final = wav_pcm(whole)
        assert len(final) > len(prefix)
        np.testing.assert_array_equal(final[: len(prefix)], prefix)


def test_a_job_can_be_cancelled_and_is_private_to_its_key(piper, tmp_path) -> None:
    backend = _Held(piper)
    with running_server(backend, jobs_dir=str(tmp_path), api_keys=("alice", "bob")) as server:
        base = server.http_url
        body = {"speakers": VOICES, "turns": script(4)}
        status, job = call(f"{base}/v1/jobs", body, key="alice")
        assert status == 202
        follow(base, job["id"], lambda s: s["status"] == "running", key="alice")
        for url, method in (
            (f"{base}/v1/jobs/{job['id']}", None),
            (f"{base}/v1/jobs/{job['id']}/audio", None),
            (f"{base}/v1/jobs/{job['id']}", "DELETE"),
        ):
            status, answer = call(url, method=method, key="bob")
            assert status == 404 and answer["error"]["code"] == "unknown_job"
        status, listed = call(f"{base}/v1/jobs", key="bob")
        assert status == 200 and listed["jobs"] == []
        status, cancelled = call(f"{base}/v1/jobs/{job['id']}", method="DELETE", key="alice")
        assert status == 200 and cancelled["status"] == "cancelled"
        hub = server.state.sessions
        assert hub.wait_for(lambda: not hub.sessions, 10)  # its session ended with it
        status, listed = call(f"{base}/v1/jobs", key="alice")
        assert [j["status"] for j in listed["jobs"]] == ["cancelled"]


def test_bad_jobs_are_refused_before_they_are_kept(jobs_server) -> None:
    base = jobs_server.http_url
    status, body = call(f"{base}/v1/jobs", {"speakers": VOICES, "turns": []})
    assert status == 400 and body["error"]["param"] == "turns"
    status, body = call(f"{base}/v1/jobs", {"speakers": [{"voice": "nobody"}], "turns": script(1)})
    assert status == 400 and body["error"]["code"] == "unknown_voice"
    status, body = call(
        f"{base}/v1/jobs",
        {"speakers": [{"voice_audio": "@@", "voice_format": "wav"}], "turns": script(1)},
    )
    assert status == 400 and body["error"]["param"] == "speakers[0].voice_audio"
    status, body = call(
        f"{base}/v1/jobs", {"speakers": VOICES, "turns": script(2), "options": {"from_turn": 1}}
    )
    assert status == 400 and body["error"]["param"] == "options.from_turn"
    status, body = call(f"{base}/v1/jobs/nope")
    assert status == 404
    # The HTTP side's guards, as for the speech API: type, declared size, depth.
    request = urllib.request.Request(
        f"{base}/v1/jobs", data=b"{}", headers={"Content-Type": "text/plain"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 415
    info.value.close()
    conn = http.client.HTTPConnection("127.0.0.1", jobs_server.config.port, timeout=30)
    conn.putrequest("POST", "/v1/jobs")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(jobs_server.config.limits.max_frame_bytes + 1))
    conn.endheaders()
    assert conn.getresponse().status == 413  # answered before a byte of the body was sent
    conn.close()
    deep = urllib.request.Request(
        f"{base}/v1/jobs",
        data=b"[" * 100_000 + b"]" * 100_000,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(deep, timeout=30)
    assert info.value.code == 400
    info.value.close()


class Served:
    """`vibecast serve --jobs-dir FOLDER` in its own process, at the address it prints once
    its engine is warm."""

    def __init__(self, folder: Path) -> None:
        cmd = [
            sys.executable,
            "-c",
            "from vibecast.cli import main; main()",
            "serve",
            "--port",
            "0",
            "--jobs-dir",
            str(folder),
            "--no-turn-cache",
        ]
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        out = self.process.stdout
        assert out is not None
        for line in out:
            if "vibecast: ready." in line:
                found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
                assert found, line
                self.base = f"http://127.0.0.1:{found.group(1)}"
                break
        else:
            raise AssertionError("the server exited before it was ready")
        # Keep reading its log, or a full pipe would stop it; the pipe closes at its end.
        self._drain = threading.Thread(target=self._read_to_end, daemon=True)
        self._drain.start()

    def _read_to_end(self) -> None:
        out = self.process.stdout
        assert out is not None
        with out:
            for _ in out:
                pass

    def stop(self, sig: int) -> None:
        self.process.send_signal(sig)
        self.process.wait(30)
        self._drain.join(30)


def test_a_job_killed_mid_run_finishes_after_a_restart(tmp_path) -> None:
    folder = tmp_path / "jobs"
    first = Served(folder)
    base = first.base
    try:
        _, job = call(
            f"{base}/v1/jobs", {"speakers": VOICES, "turns": script(40), "options": {"seed": 9}}
        )
        follow(base, job["id"], lambda s: s["progress"]["turns_done"] >= 5)
    finally:
        first.stop(signal.SIGKILL)
    on_disk = sorted(p.name for p in (folder / job["id"]).iterdir())
    assert 5 <= sum(name.endswith(".pcm") for name in on_disk) < 40  # killed mid-job
    second = Served(folder)
    base = second.base
    try:
        done = follow(base, job["id"], lambda s: s["status"] in ("done", "failed"))
        assert done["status"] == "done" and done["progress"]["turns_done"] == 40
        files = sorted(p.name for p in (folder / job["id"]).iterdir())
        assert files == [f"turn-{k:05d}.pcm" for k in range(40)]  # none missing, none twice
        sizes = [(folder / job["id"] / f).stat().st_size for f in files]
        assert min(sizes) > 24000  # every turn holds speech (over half a second)
        _, wav = call(f"{base}/v1/jobs/{job['id']}/audio?format=wav")
        assert len(wav_pcm(wav)) * 2 == sum(sizes)
    finally:
        second.stop(signal.SIGTERM)


def say(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from vibecast.cli import main; main()", "say", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_say_job_submits_follows_and_downloads(jobs_server, tmp_path) -> None:
    show = tmp_path / "show.txt"
    show.write_text("Speaker 1: Welcome back to the show.\nSpeaker 2: Glad to be here again.\n")
    out = tmp_path / "show.mp3"
    r = say(str(show), "-o", str(out), "--job", "--server", jobs_server.ws_url, "--seed", "4")
    assert r.returncode == 0, r.stderr
    job_id = re.search(r"job (\S+) submitted", r.stderr)
    assert job_id and "2 turns" in r.stdout
    audio, rate = soundfile.read(out)
    assert rate == 24000 and len(audio) / rate > 2
    # Later, from anywhere: the same job by its id, in another format.
    again = tmp_path / "again.wav"
    r = say("-o", str(again), "--job", job_id.group(1), "--server", jobs_server.ws_url, "--quiet")
    assert r.returncode == 0, r.stderr
    assert abs(len(soundfile.read(again)[0]) - len(audio)) < 24000 * 0.2
    r = say("-o", str(again), "--job", "nope", "--server", jobs_server.ws_url)
    assert r.returncode == 2 and "unknown_job" in r.stderr


def test_a_job_waits_for_a_full_server_instead_of_failing(piper, tmp_path) -> None:
    backend = _Held(piper)
    with running_server(backend, jobs_dir=str(tmp_path), max_sessions=1, max_queue=0) as server:
        base = server.http_url
        _, first = call(f"{base}/v1/jobs", {"speakers": VOICES, "turns": script(3)})
        follow(base, first["id"], lambda s: s["status"] == "running")  # holds the one slot
        status, second = call(f"{base}/v1/jobs", {"speakers": VOICES, "turns": script(2)})
        assert status == 202
        status, now = call(f"{base}/v1/jobs/{second['id']}")
        assert now["status"] == "queued"  # a WebSocket start would have been refused `busy`
        backend.gate.set()
        server.state.sessions.scheduler.wake()
        assert follow(base, second["id"], lambda s: s["status"] in FINISHED_)["status"] == "done"
        assert follow(base, first["id"], lambda s: s["status"] in FINISHED_)["status"] == "done"


FINISHED_ = ("done", "failed", "cancelled")


def multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: name -> (filename or None, content)."""
    boundary = "vibecast-test-boundary"
    parts = []
    for name, (filename, content) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        parts.append(content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def test_a_job_takes_voice_files_as_multipart(jobs_server, tmp_path) -> None:
    from vibecast.protocol.wav import wav_bytes

    t = np.arange(24000 * 2) / 24000
    sample = wav_bytes((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 24000)
    request = {"speakers": [{"voice": "joe"}, {"name": "Guest"}], "turns": script(2)}
    body, kind = multipart(
        {"request": (None, json.dumps(request).encode()), "voice_1": ("guest.wav", sample)}
    )
    post = urllib.request.Request(
        f"{jobs_server.http_url}/v1/jobs", data=body, headers={"Content-Type": kind}
    )
    with urllib.request.urlopen(post, timeout=60) as r:
        job = json.loads(r.read())
    assert r.status == 202
    done = follow(jobs_server.http_url, job["id"], lambda s: s["status"] in FINISHED_)
    assert done["status"] == "done" and done["progress"]["turns_done"] == 2
    # A part that names no speaker is refused, naming it.
    body, kind = multipart(
        {"request": (None, json.dumps(request).encode()), "voice_7": ("x.wav", sample)}
    )
    post = urllib.request.Request(
        f"{jobs_server.http_url}/v1/jobs", data=body, headers={"Content-Type": kind}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(post, timeout=60)
    with info.value as e:
        assert e.code == 400 and json.loads(e.read())["error"]["param"] == "voice_7"


def test_jobs_kept_in_redis_are_seen_by_another_server(piper, redis_url, tmp_path) -> None:
    """With --store-url the job table is in Redis: a second server on the same Redis and the
    same audio folder lists and serves the first one's job (as gateways of a cluster do)."""
    from vibecast.server.redis_store import RedisJobStore

    settings = {"store_url": redis_url, "jobs_dir": str(tmp_path)}
    with running_server(piper, **settings) as first:
        status, job = call(f"{first.http_url}/v1/jobs", {"speakers": VOICES, "turns": script(2)})
        assert status == 202
        follow(first.http_url, job["id"], lambda s: s["status"] == "done")
        _, made = call(f"{first.http_url}/v1/jobs/{job['id']}/audio?format=wav")
    kept = RedisJobStore(redis_url)
    try:
        record = kept.get(job["id"])
        assert record is not None and (record.status, record.turns_done) == ("done", 2)
        assert not (tmp_path / "jobs.sqlite3").exists()  # nothing of it went to SQLite
    finally:
        kept.close()
    with running_server(piper, **settings) as second:
        status, listed = call(f"{second.http_url}/v1/jobs")
        assert status == 200 and job["id"] in [j["id"] for j in listed["jobs"]]
        status, wav = call(f"{second.http_url}/v1/jobs/{job['id']}/audio?format=wav")
        assert status == 200 and wav == made
