"""Jobs: a script too long to wait for, submitted over HTTP, made in the background and kept.

A job is a session like any other (the same checks, admission queue, limits and engine loop),
read by a task of this server instead of a socket. Its metadata lives in a `JobStore` (SQLite
by default), its audio in files, one per turn: `turn-00012.pcm` (16-bit, 24 kHz, mono) is
written as `.part` while the turn is spoken and renamed when it ends, and only then is the
job's `turns_done` moved on. So a job whose process died resumes, on the next start, from its
last finished turn: no turn is missing and none is repeated. The audio of a job is the turn
files in order; while it runs, the finished turns and the one being spoken are a playable prefix.

Retention: finished jobs older than `jobs_max_age_s` go, then the oldest finished ones while
all jobs' audio is over `jobs_max_bytes` (checked at start-up and whenever a job ends).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..protocol.messages import Audio as AudioMessage
from ..protocol.messages import (
    Code,
    FormatSpec,
    ProtocolError,
    Start,
    TurnEnd,
    TurnStart,
    parse_start,
)
from .config import ServerConfig
from .formats import RATE
from .headless import messages_of, open_session
from .job_store import SqliteJobStore
from .session import Session
from .sessions import Sessions
from .store import JobRecord, JobStore

log = logging.getLogger("vibecast.jobs")

FINISHED = ("done", "failed", "cancelled")
CHUNK = 1 << 16  # bytes read at a time from a turn file


def parse_job(body: dict[str, Any]) -> Start:
    """A job's body is a WebSocket `start` as JSON; `voice_audio` is base64 text there."""
    body = dict(body, type="start")
    speakers = body.get("speakers")
    if isinstance(speakers, list):
        fixed = []
        for i, s in enumerate(speakers):
            if isinstance(s, dict) and isinstance(s.get("voice_audio"), str):
                try:
                    s = dict(s, voice_audio=base64.b64decode(s["voice_audio"], validate=True))
                except ValueError:
                    raise ProtocolError(
                        Code.BAD_FIELD,
                        f"speakers[{i}].voice_audio is not base64; send the file's bytes as "
                        "base64 text.",
                        field=f"speakers[{i}].voice_audio",
                    ) from None
            fixed.append(s)
        body["speakers"] = fixed
    start = parse_start(body)
    if start.more:
        raise ProtocolError(
            Code.BAD_FIELD,
            "more: a job's script is whole when it is submitted; leave more out.",
            field="more",
        )
    if start.turns and start.turns[-1].stream:
        i = len(start.turns) - 1
        raise ProtocolError(
            Code.BAD_FIELD,
            f"turns[{i}].stream: a job's script is whole when it is submitted, so its text cannot "
            "stream in; send the turn's whole text and leave stream out.",
            field=f"turns[{i}].stream",
            turn=i,
        )
    if start.options is not None and start.options.from_turn:
        raise ProtocolError(
            Code.BAD_FIELD,
            "options.from_turn: a job makes the whole script (its unchanged turns come from the "
            "turn cache); fetch one turn with GET /v1/jobs/{id}/turns/{k}/audio.",
            field="options.from_turn",
        )
    # Jobs keep 24 kHz PCM; any format is made from it when the audio is fetched.
    start.format = FormatSpec("pcm_s16le", RATE, None, 20)
    return start


class Jobs:
    def __init__(self, hub: Sessions, config: ServerConfig) -> None:
        self.hub = hub
        self.config = config
        self.folder = Path(config.jobs_dir).expanduser()
        self._store: JobStore | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sessions: dict[str, Session] = {}
        self._started: dict[str, tuple[float, int]] = {}  # when it ran, samples it had then
        self.changed = asyncio.Condition()

    @property
    def store(self) -> JobStore:
        """Opened on first use, so a server that never sees a job writes nothing to disk."""
        if self._store is None:
            if self.config.store_url:
                from .redis_store import RedisJobStore

                self._store = RedisJobStore(self.config.store_url)
            else:
                self._store = SqliteJobStore(self.folder / "jobs.sqlite3")
        return self._store

    def resume(self) -> None:
        """At start-up: every job a dead process left queued or running goes on."""
        if not self.config.store_url and not (self.folder / "jobs.sqlite3").exists():
            return
        self.clean()
        for job in self.store.all():
            if job.status not in FINISHED:
                log.info("job %s resumes from turn %d", job.id, job.turns_done)
                self._launch(job)

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._store is not None:
            self._store.close()

    # -- what the routes call ------------------------------------------------------------------

    async def submit(self, body: dict[str, Any], owner: str) -> JobRecord:
        start = parse_job(body)
        self.hub.check_rate(owner)
        await self.hub.validate(start, owner)  # every check a session gets, before it is kept
        # Kept as JSON: uploaded voice files as base64 text, as a JSON body sends them.
        request = dict(body)
        request["speakers"] = [
            dict(s, voice_audio=base64.b64encode(s["voice_audio"]).decode())
            if isinstance(s, dict) and isinstance(s.get("voice_audio"), bytes)
            else s
            for s in body.get("speakers") or []
        ]
        chars = sum(len(t.text) for t in start.turns)
        job = JobRecord(
            id=secrets.token_hex(9),  # hex: never starts with "-" (`say --job ID`)
            owner=owner,
            request=json.dumps(request),
            created=time.time(),
            updated=time.time(),
            turns_total=len(start.turns),
            audio_s_estimate=chars * self.hub.backend.seconds_per_char(),
        )
        self.store.put(job)
        self._launch(job)
        return job

    def _any(self) -> bool:
        """Whether any job was ever kept here (reading must not create the database)."""
        return self._store is not None or (self.folder / "jobs.sqlite3").exists()

    def get(self, job_id: str, owner: str) -> JobRecord | None:
        """The job if `owner` made it; anyone else gets what an unknown id gets."""
        job = self.store.get(job_id) if self._any() else None
        return job if job is not None and job.owner == owner else None

    def owned_by(self, owner: str) -> list[JobRecord]:
        return self.store.owned_by(owner) if self._any() else []

    async def cancel(self, job: JobRecord) -> JobRecord:
        session = self._sessions.get(job.id)
        if session is not None:
            session.cancel()
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        current = self.store.get(job.id) or job
        if current.status not in FINISHED:
            await self._update(current, status="cancelled")
        return self.store.get(job.id) or current

    def status(self, job: JobRecord) -> dict[str, Any]:
        """What `GET /v1/jobs/{id}` says."""
        body: dict[str, Any] = {
            "id": job.id,
            "status": job.status,
            "created": job.created,
            "position": self._position(job),
            "progress": {
                "turns_done": job.turns_done,
                "turns_total": job.turns_total,
                "seconds_done": round(job.samples_done / RATE, 3),
                "seconds_estimate": round(max(job.audio_s_estimate, job.samples_done / RATE), 1),
                "eta_s": self._eta(job),
            },
        }
        if job.error_code:
            body["error"] = {"code": job.error_code, "message": job.error_message}
        return body

    def pcm(self, job: JobRecord, turn: int | None = None) -> Iterator[bytes]:
        """The job's audio so far (finished turns, then the one being spoken), or one turn."""
        folder = self.folder / job.id
        if turn is not None:
            paths = [folder / f"turn-{turn:05d}.pcm"]
        else:
            paths = [folder / f"turn-{k:05d}.pcm" for k in range(job.turns_done)]
            paths.append(folder / f"turn-{job.turns_done:05d}.part")
        for path in paths:
            try:
                f = path.open("rb")
            except FileNotFoundError:  # the turn in progress just ended: its .pcm is next time
                continue
            with f:
                while data := f.read(CHUNK):
                    yield data[: len(data) - len(data) % 2]

    # -- running -------------------------------------------------------------------------------

    def _launch(self, job: JobRecord) -> None:
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job))

    async def _update(self, job: JobRecord, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(job, name, value)
        job.updated = time.time()
        self.store.put(job)
        async with self.changed:
            self.changed.notify_all()

    async def _run(self, job: JobRecord) -> None:
        try:
            await self._speak(job)
        except ProtocolError as e:
            await self._update(job, status="failed", error_code=e.code, error_message=e.message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - this job's boundary: it fails, the server goes on
            log.exception("job %s failed", job.id)
            await self._update(
                job, status="failed", error_code="internal", error_message=f"{e}"[:200]
            )
        finally:
            self._tasks.pop(job.id, None)
            self._sessions.pop(job.id, None)
            self._started.pop(job.id, None)
            if job.status in FINISHED:
                self.clean()

    async def _speak(self, job: JobRecord) -> None:
        """Speak the turns not yet on disk, in a session of their own, into turn files."""
        start = parse_job(json.loads(job.request))
        offset = job.turns_done
        start.turns = start.turns[offset:]
        folder = self.folder / job.id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"turn-{offset:05d}.part").unlink(missing_ok=True)  # a dead run's unfinished turn
        if not start.turns:
            await self._update(job, status="done")
            return

        def created(session: Session) -> None:
            self._sessions[job.id] = session

        while True:
            try:
                session = await open_session(self.hub, start, job.owner, created, count=False)
                break
            except ProtocolError as e:
                if e.code != Code.BUSY or job.status not in ("queued", "running"):
                    raise
                await self.hub.room()  # the queue is full: the job waits, it is not refused
        await self._update(job, status="running")
        self._started[job.id] = (time.monotonic(), job.samples_done)
        out = None
        try:
            async for msg in messages_of(self.hub, session):
                if isinstance(msg, TurnStart):
                    out = (folder / f"turn-{offset + msg.turn:05d}.part").open("wb")
                elif isinstance(msg, AudioMessage) and msg.pcm and out is not None:
                    out.write(msg.pcm)
                    out.flush()
                    job.samples_done += len(msg.pcm) // 2
                elif isinstance(msg, TurnEnd) and out is not None:
                    out.close()
                    out = None
                    k = offset + msg.turn
                    (folder / f"turn-{k:05d}.part").rename(folder / f"turn-{k:05d}.pcm")
                    await self._update(job, turns_done=k + 1)
        finally:
            if out is not None:
                out.close()
        if session.outcome is not None and session.outcome.value == "cancelled":
            await self._update(job, status="cancelled")
        else:
            await self._update(job, status="done")

    def _position(self, job: JobRecord) -> int | None:
        session = self._sessions.get(job.id)
        if job.status != "queued" or session is None:
            return None
        queue = self.hub.store.queue()
        return queue.index(session.id) + 1 if session.id in queue else None

    def _eta(self, job: JobRecord) -> float | None:
        if job.status != "running" or job.id not in self._started:
            return None
        since, samples = self._started[job.id]
        made = (job.samples_done - samples) / RATE
        if made <= 0:
            return None
        left = max(job.audio_s_estimate - job.samples_done / RATE, 0.0)
        return round(left * (time.monotonic() - since) / made, 1)

    # -- retention -----------------------------------------------------------------------------

    def _size(self, job_id: str) -> int:
        folder = self.folder / job_id
        return sum(p.stat().st_size for p in folder.glob("*")) if folder.is_dir() else 0

    def clean(self) -> None:
        now = time.time()
        finished = [j for j in self.store.all() if j.status in FINISHED]
        total = sum(self._size(j.id) for j in self.store.all())
        for job in finished:  # oldest first
            old = now - job.updated > self.config.jobs_max_age_s
            if old or total > self.config.jobs_max_bytes:
                total -= self._size(job.id)
                shutil.rmtree(self.folder / job.id, ignore_errors=True)
                self.store.delete(job.id)
                log.info("job %s removed (%s)", job.id, "age" if old else "size")
