"""vibecast on Ray Serve (docs/scaleout.md): gateway replicas (this server's app, its model a
`RemoteBackend`) and engine replicas (a backend and its engine loop, `EngineService`), joined by
streaming deployment handles; the state that must outlive a process in Redis (`--store-url`).

Ray is optional (`pip install 'vibecast[cluster]'`): nothing here is imported by `vibecast
serve`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.metrics import Gauge

from ..engine.backend import Turn
from ..engine.serving import EngineService
from ..engine.wire import pack_turn, unpack_turn
from .config import ServerConfig

log = logging.getLogger("vibecast.cluster")

APP = "vibecast"
ALIVE_MS = 2000  # a stream whose gateway has not said it is alive for this long stops
PREFIX = "vibecast:"
SCRIPT_TTL_S = 2 * 3600  # a session's appended turns: longer than any session lasts


def _key(kind: str, name: str) -> str:
    return f"{PREFIX}{kind}:{name}"


class RedisLiveness:
    """The engine's side of engine/serving.py's `Liveness`, and where it says what it serves
    (`engine:{pid}` sets: which engine runs which stream, for operators and tests)."""

    def __init__(self, url: str) -> None:
        self._redis = aioredis.from_url(url)
        self._pid = os.getpid()

    async def acked(self, stream: str) -> int:
        value = await self._redis.get(_key("ack", stream))
        return int(value or 0)

    async def alive(self, stream: str) -> bool:
        return bool(await self._redis.exists(_key("alive", stream)))

    async def appended(self, script: str, have: int) -> tuple[list[Turn], bool]:
        raw = await self._redis.lrange(_key("turns", script), 0, -1)  # turns appended, in order
        turns = [t for t in map(unpack_turn, cast(list[bytes], raw)) if t.index >= have]
        return turns, bool(await self._redis.exists(_key("complete", script)))

    async def abandoned(self, stream: str) -> None:
        await self._redis.set(_key("abandoned", stream), time.time(), ex=3600)

    async def serving(self, stream: str, on: bool) -> None:
        key = _key("engine", str(self._pid))
        if on:
            await self._redis.sadd(key, stream)
            await self._redis.incr(_key("served", str(self._pid)))
        else:
            await self._redis.srem(key, stream)


class RayLink:
    """The gateway's side: streams over the engine deployment's handle, acknowledgements and
    liveness in Redis (server/remote.py's `EngineLink`)."""

    def __init__(self, handle: DeploymentHandle, url: str) -> None:
        self._handle = handle
        self._redis = redis.Redis.from_url(url)

    def describe(self) -> dict[str, Any]:
        return dict(self._handle.describe.remote().result())

    def stream(self, request: bytes) -> Iterable[bytes]:
        return cast(Iterable[bytes], self._handle.options(stream=True).stream.remote(request))

    def cancel(self, stream: Iterable[bytes]) -> None:
        if isinstance(stream, DeploymentResponseGenerator):
            stream.cancel()

    def ack(self, stream: str, batches: int) -> None:
        self._redis.set(_key("ack", stream), batches, ex=3600)

    def beat(self, streams: list[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for s in streams:
            pipe.set(_key("alive", s), 1, px=ALIVE_MS)
        pipe.execute()

    def done(self, stream: str) -> None:
        self._redis.delete(_key("alive", stream), _key("ack", stream))

    def append(self, script: str, turns: list[Turn], complete: bool) -> None:
        pipe = self._redis.pipeline(transaction=True)
        if turns:
            pipe.rpush(_key("turns", script), *(pack_turn(t) for t in turns))
            pipe.expire(_key("turns", script), SCRIPT_TTL_S)
        if complete:
            pipe.set(_key("complete", script), 1, ex=SCRIPT_TTL_S)
        pipe.execute()


EXPORT_S = 1.0  # how often replicas refresh the gauges Ray exports


def export(gauges: dict[str, str], read: Callable[[], dict[str, float]], url: str) -> None:
    """Publish `read()` as Ray Serve gauges every EXPORT_S, from a thread of this replica: Ray
    exports every replica's, tagged with its deployment and replica, on each node's metrics
    port (`ray start --metrics-export-port`), one Prometheus view of the cluster. Each round
    also stamps `exported:{pid}` in Redis: when each replica last reported."""
    made = {name: Gauge(f"vibecast_{name}", description=text) for name, text in gauges.items()}
    store = redis.Redis.from_url(url)
    stamp = _key("exported", str(os.getpid()))

    def loop() -> None:
        while True:
            for name, value in read().items():
                if name in made:
                    made[name].set(value)
            store.set(stamp, time.time(), ex=60)
            time.sleep(EXPORT_S)

    threading.Thread(target=loop, name="vibecast-metrics", daemon=True).start()


ENGINE_GAUGES = {
    "engine_streams": "Sessions this engine replica is generating",
    "engine_audio_seconds": "Audio this engine replica has made",
    "engine_frames": "Frames this engine replica has made (VibeVoice)",
    "context_rebuilds": "Context windows rebuilt at turn boundaries (VibeVoice)",
}
GATEWAY_GAUGES = {
    "gateway_sessions_active": "Sessions this gateway holds, admitted and not ended",
    "gateway_sessions_queued": "Sessions waiting for capacity, every gateway's (one queue)",
    "turn_cache_hits": "Turns this gateway replayed from the turn cache",
}


@serve.deployment(name="Engine")
class Engine:
    """One replica per GPU (or per CPU slice in tests): many sessions, one engine loop."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from ..engine.loader import load_backend

        config = _config(settings)
        backend = load_backend(config.model, config.device, config.dtype, config.voices)
        backend.warmup()
        assert config.store_url is not None
        self.service = EngineService(backend, RedisLiveness(config.store_url))
        redis.Redis.from_url(config.store_url).sadd(f"{PREFIX}engines", os.getpid())
        service = self.service
        export(
            ENGINE_GAUGES,
            lambda: {**service.backend.counters(), "engine_streams": len(service.streams)},
            config.store_url,
        )

    async def describe(self) -> dict[str, Any]:
        return self.service.describe()

    async def stream(self, request: bytes) -> AsyncIterator[bytes]:
        async for batch in self.service.stream(request):
            yield batch

    async def check_health(self) -> None:
        if not self.service.scheduler.alive():
            raise RuntimeError("the engine loop has stopped")


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """This server's app (WebSocket protocol, HTTP API, admission, resume) with the engines'
    model behind a RemoteBackend."""

    def __init__(self, settings: dict[str, Any], engines: DeploymentHandle, count: int) -> None:
        self.config = _config(settings)
        self.engines = engines
        self.count = count  # engine replicas: the capacity every gateway admits against
        assert self.config.store_url is not None
        redis.Redis.from_url(self.config.store_url).sadd(f"{PREFIX}gateways", os.getpid())

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app
        from .remote import RemoteBackend

        url = self.config.store_url
        assert url is not None
        link = RayLink(self.engines, url)
        app = create_app(self.config, lambda: RemoteBackend(link, self.count))
        state = app.state.vibecast

        def read() -> dict[str, float]:
            hub = state.sessions
            if hub is None:  # still starting
                return {}
            cache = hub.cache.counters() if hub.cache is not None else {}
            return {
                "gateway_sessions_active": hub.active_count(),
                "gateway_sessions_queued": len(hub.store.queue()),
                "turn_cache_hits": cache.get("hits", 0),
            }

        export(GATEWAY_GAUGES, read, url)
        return app


def _config(settings: dict[str, Any]) -> ServerConfig:
    settings = dict(settings)
    limits = settings.pop("limits", {})
    settings["api_keys"] = tuple(settings.get("api_keys", ()))
    return ServerConfig(**settings).replace(**limits)


def application(
    config: ServerConfig,
    engines: int,
    gateways: int,
    max_engines: int = 0,
    sessions_per_engine: int = 8,
) -> Any:
    """The Serve application: `gateways` gateway replicas and `engines` engine replicas, or,
    with `max_engines` above `engines`, between the two as Serve's autoscaler decides from the
    sessions each engine streams (`sessions_per_engine`: its target; one session is one
    ongoing request)."""
    if not config.store_url:
        raise ValueError("a cluster keeps its state in Redis: give --store-url redis://HOST:PORT")
    settings = dataclasses.asdict(config)
    # (Serve's decorators make deployments of the classes; mypy sees the classes.)
    gpus = {"num_gpus": 1} if config.device == "cuda" else {}  # one GPU per engine replica
    # Scaling down: an engine's sessions go on on the others (exact), so it may stop soon; a
    # gateway holds its clients' sockets, so it drains: it stops taking sessions and waits up
    # to the longest a session can last for the ones it has.
    scale: dict[str, Any] = {"num_replicas": engines}
    if max_engines > engines:
        scale = {
            "autoscaling_config": {
                "min_replicas": engines,
                "max_replicas": max_engines,
                "target_ongoing_requests": sessions_per_engine,
            }
        }
    engine = cast(Any, Engine).options(
        ray_actor_options=gpus, graceful_shutdown_timeout_s=10, **scale
    )
    gateway = cast(Any, Gateway).options(
        num_replicas=gateways, graceful_shutdown_timeout_s=config.limits.max_audio_s + 60
    )
    # Gateways admit against what the engines can reach: an autoscaled deployment's most.
    return gateway.bind(settings, engine.bind(settings), max(engines, max_engines))
