"""`vibecast say --job`: submit a script as a job (docs/jobs.md), follow its progress, and
download the take when it is done; `--job ID` follows (or downloads) a job submitted before,
for instance after the terminal that submitted it was closed."""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .engine.script import parse_script
from .say import Progressbar, SayError, fetch_voices, http_url, speaker_specs

SUFFIXES = {".mp3": "mp3", ".opus": "opus", ".ogg": "opus", ".aac": "aac", ".flac": "flac"}
SUFFIXES |= {".wav": "wav", ".pcm": "pcm"}


def _request(url: str, token: str | None, body: Any = None) -> urllib.request.Request:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def _refused(e: urllib.error.HTTPError) -> SayError:
    try:
        error = json.loads(e.read())["error"]
        return SayError(f"the server refused it ({e.code} {error['code']}): {error['message']}")
    except (ValueError, KeyError, TypeError):
        return SayError(f"the server answered {e.code}")


def submit(
    script: str, url: str, token: str | None, voices: list[str] | None, seed: int | None
) -> str:
    lines = parse_script(script)
    n_speakers = max(line.speaker for line in lines) + 1
    speakers = speaker_specs(voices or [], n_speakers, fetch_voices(url, token))
    for s in speakers:
        if "voice_audio" in s:
            s["voice_audio"] = base64.b64encode(s["voice_audio"]).decode()
    body: dict[str, Any] = {
        "speakers": speakers,
        "turns": [{"speaker": line.speaker, "text": line.text} for line in lines],
    }
    if seed is not None:
        body["options"] = {"seed": seed}
    try:
        with urllib.request.urlopen(_request(http_url(url, "/v1/jobs"), token, body)) as r:
            return str(json.load(r)["id"])
    except urllib.error.HTTPError as e:
        raise _refused(e) from None


def follow(job_id: str, url: str, token: str | None, quiet: bool) -> dict[str, Any]:
    """Read the job's events to its end; returns its last status."""
    events = _request(http_url(url, f"/v1/jobs/{job_id}/events"), token)
    bar = None
    status: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(events) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                status = json.loads(line[6:])
                progress = status["progress"]
                if not quiet:
                    bar = bar or Progressbar(progress["turns_total"])
                    bar.show(progress["turns_done"], progress["seconds_done"])
    except urllib.error.HTTPError as e:
        raise _refused(e) from None
    if bar is not None:
        bar.end()
    return status


def download(job_id: str, url: str, token: str | None, out: Path) -> int:
    fmt = SUFFIXES[out.suffix.lower()]
    audio = _request(http_url(url, f"/v1/jobs/{job_id}/audio?format={fmt}"), token)
    try:
        with urllib.request.urlopen(audio) as r, out.open("wb") as f:
            size = 0
            while chunk := r.read(1 << 16):
                f.write(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as e:
        raise _refused(e) from None
    return size


def run_job(args: Any, script: str | None) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise SayError(
            f"cannot write {out.name}: with --job the output may end in {', '.join(SUFFIXES)}"
        )
    job_id = args.job
    if job_id == "new":
        assert script is not None
        job_id = submit(script, args.server, args.token, args.voice, args.seed)
        print(f"job {job_id} submitted; follow it again with --job {job_id}", file=sys.stderr)
    status = follow(job_id, args.server, args.token, args.quiet)
    if status.get("status") != "done":
        error = status.get("error") or {}
        raise SayError(
            f"job {job_id} ended {status.get('status')}"
            + (f": {error.get('code')}: {error.get('message')}" if error else "")
        )
    size = download(job_id, args.server, args.token, out)
    progress = status["progress"]
    print(
        f"wrote {out}: {size} bytes, {progress['seconds_done']:.2f} s, "
        f"{progress['turns_done']} turns (job {job_id})"
    )
    return 0
