"""The Starlette application: routes, lifespan, auth.

    WS  /v1/stream                    the vibecast.v1 protocol (server/connection.py)
    GET /                             the live-playback page (web_demo/)
    GET /v1/voices                    voices a `start` may name
    GET /v1/sessions/{id}/audio.opus  a session's audio as an Ogg Opus file
    GET /healthz                      the process is up
    GET /readyz                       the engine is loaded, warm, and not draining
    GET /metrics                      Prometheus (see `metrics_allowed` for who may read it)

The engine loads and warms up in the lifespan, before uvicorn opens the port, so no request
ever waits for a model load.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ..engine.backend import Backend
from ..protocol.messages import ProtocolError
from .archive import Archive
from .config import ServerConfig
from .connection import Connection, chosen_subprotocol
from .formats import FORMATS, Encoder
from .headless import open_session
from .identity import client_identity, is_loopback
from .jobs import FINISHED, Jobs
from .metrics import Metrics
from .openai_api import (
    MODEL_ALIASES,
    ApiError,
    SpeechRequest,
    models_body,
    read_form,
    read_json,
    speech_body,
    speech_response,
)
from .sessions import Sessions
from .store import JobRecord, MemoryStore, SessionStore

log = logging.getLogger("vibecast.server")

WEB_DEMO = Path(__file__).resolve().parent.parent / "web_demo"
STATIC = {
    "app.js": "text/javascript",
    "worklet.js": "text/javascript",
    "msgpack.js": "text/javascript",
    "player.js": "text/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
VENDOR = {"opus-decoder.min.js": "node_modules/opus-decoder/dist/opus-decoder.min.js"}


@dataclass
class AppState:
    config: ServerConfig
    load_backend: Callable[[], Backend]
    store: SessionStore = field(default_factory=MemoryStore)
    metrics: Metrics = field(default_factory=Metrics)
    backend: Backend | None = None
    sessions: Sessions | None = None
    archive: Archive | None = None
    jobs: Jobs | None = None
    draining: bool = False
    ready: threading.Event = field(default_factory=threading.Event)


def _key_name(
    config: ServerConfig, headers: dict[str, str], query: dict[str, str]
) -> str | None | Literal[False]:
    """None when no keys are configured; the matching key's label; False when refused."""
    if not config.api_keys:
        return None
    given = query.get("token")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:
        return False
    for i, key in enumerate(config.api_keys):
        if hmac.compare_digest(key.encode(), given.encode()):
            return f"#{i + 1}"  # never log the key itself
    return False


def metrics_allowed(
    config: ServerConfig, key_name: str | None | bool, client_host: str | None
) -> bool:
    """/metrics needs a key like every route once keys are configured, except from loopback,
    where a Prometheus agent on the same machine scrapes it; `metrics_public` opens it to all."""
    if not config.api_keys or config.metrics_public or isinstance(key_name, str):
        return True
    return client_host is not None and is_loopback(client_host)


def create_app(
    config: ServerConfig,
    load_backend: Callable[[], Backend],
    store: SessionStore | None = None,
) -> Starlette:
    if store is None and config.store_url:
        from .redis_store import RedisStore

        store = RedisStore(config.store_url)
    state = AppState(config, load_backend, store=store or MemoryStore())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backend = await asyncio.to_thread(state.load_backend)
        await asyncio.to_thread(backend.warmup)
        state.backend = backend
        state.archive = Archive(config.archive_sessions, config.archive_ttl_s)
        catalogue = {v.id: v.description for v in backend.voices()}
        state.sessions = Sessions(
            backend, config, state.store, state.archive, state.metrics, catalogue
        )
        state.metrics.track_active(state.sessions.active_count)
        state.metrics.track_engine(state.backend.counters)
        if state.sessions.cache is not None:
            state.metrics.track_cache(state.sessions.cache.counters)
        state.jobs = Jobs(state.sessions, config)
        state.jobs.resume()
        state.metrics.engine_ready.set(1)
        log.info(
            "engine %s ready (%d voices, %d sessions at once)",
            backend.name,
            len(catalogue),
            state.sessions.capacity,
        )
        state.ready.set()
        try:
            yield
        finally:
            state.draining = True
            state.metrics.engine_ready.set(0)
            sessions = list(state.sessions.sessions.values())
            state.jobs.close()  # their sessions stop below; each job resumes at the next start
            for session in sessions:
                session.stop()
            # Let the engine loop finish its current unit before the event loop goes away.
            await asyncio.to_thread(lambda: [s.join(10) for s in sessions])
            state.sessions.close()
            await asyncio.to_thread(state.sessions.scheduler.close)
            state.archive.close()
            state.store.close()

    def authorized(request: Request | WebSocket) -> str | None | Literal[False]:
        return _key_name(config, dict(request.headers), dict(request.query_params))

    def refuse() -> Response:
        return JSONResponse(
            {
                "error": "unauthorized",
                "message": "this server needs an API key: send 'Authorization: Bearer KEY' "
                "or add ?token=KEY to the URL.",
            },
            status_code=401,
        )

    async def stream(ws: WebSocket) -> None:
        key = authorized(ws)
        if key is False:
            state.metrics.errors.labels(code="unauthorized").inc()
            await ws.send_denial_response(refuse())
            return
        await ws.accept(subprotocol=chosen_subprotocol(ws))
        assert state.sessions is not None and state.backend is not None
        conn = Connection(ws, state.sessions, client_identity(ws, key or None), state.backend.name)
        await conn.run()

    async def index(request: Request) -> Response:
        return FileResponse(WEB_DEMO / "index.html", media_type="text/html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name in STATIC:
            return FileResponse(WEB_DEMO / name, media_type=STATIC[name])
        if name in VENDOR and (WEB_DEMO / VENDOR[name]).exists():
            return FileResponse(WEB_DEMO / VENDOR[name], media_type="text/javascript")
        return JSONResponse({"error": "not_found", "message": f"no file {name!r}"}, status_code=404)

    async def voices(request: Request) -> Response:
        if authorized(request) is False:
            return refuse()
        assert state.backend is not None
        return JSONResponse(
            {
                "model": state.backend.name,
                "voices": [
                    {"id": v.id, "name": v.name, "description": v.description}
                    for v in state.backend.voices()
                ],
            }
        )

    async def audio_file(request: Request) -> Response:
        key = authorized(request)
        if key is False:
            return refuse()
        session_id = request.path_params["session_id"]
        assert state.archive is not None
        # Someone else's session gets the very answer an unknown one does, so ids cannot be probed.
        if not state.archive.owned_by(session_id, client_identity(request, key or None)):
            return JSONResponse(
                {
                    "error": "unknown_session",
                    "message": f"no audio is kept for session {session_id!r}: it never existed, "
                    f"streamed pcm_s16le, or ended more than {config.archive_ttl_s:.0f} s ago.",
                },
                status_code=404,
            )
        return StreamingResponse(
            state.archive.ogg(session_id),
            media_type="audio/ogg",
            headers={"Content-Disposition": f'attachment; filename="vibecast-{session_id}.opus"'},
        )

    def api_refusal(e: ApiError) -> Response:
        state.metrics.errors.labels(code=e.code).inc()
        return e.response()

    def api(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        """The HTTP API's boundary: a refusal becomes OpenAI's error shape, with our code."""

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return api_refusal(e)
            except ProtocolError as e:
                return api_refusal(ApiError.of(e))

        return answer

    def caller(request: Request) -> str:
        """Who is asking (for ownership and rate limits); refuses a missing key or a server
        that is not taking work."""
        key = authorized(request)
        if key is False:
            raise ApiError(401, "unauthorized", "send 'Authorization: Bearer KEY' with an API key.")
        if state.sessions is None or state.jobs is None or state.draining:
            raise ApiError(503, "not_ready", "the engine is loading or the server is stopping.")
        return client_identity(request, key or None)

    def served_models() -> list[str]:
        assert state.backend is not None
        return [state.backend.name, *MODEL_ALIASES]

    @api
    async def audio_speech(request: Request) -> Response:
        client = caller(request)
        assert state.sessions is not None and state.backend is not None
        data = await read_json(request, config.limits.max_frame_bytes)
        req = SpeechRequest(data, served_models(), [v.id for v in state.backend.voices()])
        try:
            session = await open_session(state.sessions, req.start(), client)
        except ProtocolError as e:  # the caller wrote `input`, not turns
            raise ApiError.of(e, "input") from None
        return speech_response(req, speech_body(state.sessions, session, req, len(req.input)))

    def job_of(request: Request) -> tuple[Jobs, str, JobRecord]:
        owner = caller(request)
        assert state.jobs is not None
        job_id = request.path_params["job_id"]
        job = state.jobs.get(job_id, owner)
        if job is None:  # someone else's job is answered as one that does not exist
            raise ApiError(404, "unknown_job", f"no job {job_id!r} here for this key.", "id")
        return state.jobs, owner, job

    @api
    async def jobs_create(request: Request) -> Response:
        owner = caller(request)
        assert state.jobs is not None
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            body = await read_form(request, config.limits.max_frame_bytes)
        else:
            body = await read_json(request, config.limits.max_frame_bytes)
        job = await state.jobs.submit(body, owner)
        return JSONResponse(state.jobs.status(job), status_code=202)

    @api
    async def jobs_list(request: Request) -> Response:
        owner = caller(request)
        assert state.jobs is not None
        return JSONResponse({"jobs": [state.jobs.status(j) for j in state.jobs.owned_by(owner)]})

    @api
    async def job_get(request: Request) -> Response:
        jobs, _, job = job_of(request)
        if request.method == "DELETE":
            job = await jobs.cancel(job)
        return JSONResponse(jobs.status(job))

    @api
    async def job_events(request: Request) -> Response:
        jobs, owner, job = job_of(request)

        async def events() -> AsyncIterator[bytes]:
            last = None
            while (current := jobs.get(job.id, owner)) is not None:
                body = jobs.status(current)
                if body != last:
                    last = body
                    yield f"event: status\ndata: {json.dumps(body)}\n\n".encode()
                if current.status in FINISHED:
                    return
                async with jobs.changed:
                    await jobs.changed.wait()

        return StreamingResponse(events(), media_type="text/event-stream")

    @api
    async def job_audio(request: Request) -> Response:
        jobs, _, job = job_of(request)
        fmt = request.query_params.get("format", "wav")
        if fmt not in FORMATS:
            raise ApiError(
                400, "bad_field", f"format must be one of {', '.join(FORMATS)}.", "format"
            )
        turn = request.path_params.get("turn")
        if turn is not None and not 0 <= turn < job.turns_done:
            raise ApiError(
                404,
                "unknown_turn",
                f"turn {turn} of job {job.id} is not finished; {job.turns_done} of "
                f"{job.turns_total} are.",
                "turn",
            )

        def body() -> Iterator[bytes]:
            encoder = Encoder(fmt)
            for pcm in jobs.pcm(job, turn):
                if out := encoder.push(pcm):
                    yield out
            if out := encoder.finish():
                yield out

        name = f"vibecast-{job.id}" + (f"-turn{turn}" if turn is not None else "")
        return StreamingResponse(
            iterate_in_threadpool(body()),
            media_type=FORMATS[fmt].media_type,
            headers={"Content-Disposition": f'attachment; filename="{name}.{fmt}"'},
        )

    async def audio_voices(request: Request) -> Response:
        if authorized(request) is False:
            return refuse()
        assert state.backend is not None
        voices = [
            {"id": v.id, "name": v.name, "description": v.description}
            for v in state.backend.voices()
        ]
        return JSONResponse({"voices": voices})

    async def models(request: Request) -> Response:
        if authorized(request) is False:
            return refuse()
        return JSONResponse(models_body(served_models()[0]))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        ready = state.backend is not None and not state.draining
        body = {
            "ready": ready,
            "model": state.backend.name if state.backend else None,
            "capacity": state.sessions.capacity if state.sessions else None,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        host = request.client.host if request.client else None
        if not metrics_allowed(config, authorized(request), host):
            return refuse()
        if state.sessions is not None:
            state.metrics.detached.set(state.sessions.detached_count())
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app = Starlette(
        routes=[
            WebSocketRoute("/v1/stream", stream),
            Route("/", index),
            Route("/v1/voices", voices),
            Route("/v1/audio/speech", audio_speech, methods=["POST"]),
            Route("/v1/audio/voices", audio_voices),
            Route("/v1/models", models),
            Route("/v1/jobs", jobs_create, methods=["POST"]),
            Route("/v1/jobs", jobs_list, methods=["GET"]),
            Route("/v1/jobs/{job_id}", job_get, methods=["GET", "DELETE"]),
            Route("/v1/jobs/{job_id}/events", job_events),
            Route("/v1/jobs/{job_id}/audio", job_audio),
            Route("/v1/jobs/{job_id}/turns/{turn:int}/audio", job_audio),
            Route("/v1/sessions/{session_id}/audio.opus", audio_file),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/{name}", static),
        ],
        lifespan=lifespan,
    )
    app.state.vibecast = state
    return app
