"""Prometheus metrics (`GET /metrics`), one registry per app so that several servers can live
in one process (the tests start many)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active = Gauge(
            "vibecast_sessions_active", "Sessions admitted and not yet ended", registry=r
        )
        self.detached = Gauge(
            "vibecast_sessions_detached",
            "Sessions whose socket dropped, held for resume",
            registry=r,
        )
        self.queued = Gauge("vibecast_sessions_queued", "Sessions waiting for capacity", registry=r)
        self.ttfa = Histogram(
            "vibecast_first_audio_seconds",
            "From start received to the first audio message sent",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=r,
        )
        self.rtf = Histogram(
            "vibecast_real_time_factor",
            "Engine compute time per second of audio, per finished session",
            buckets=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2),
            registry=r,
        )
        self.audio_sent = Counter(
            "vibecast_audio_sent_seconds", "Seconds of audio written to clients", registry=r
        )
        self.errors = Counter(
            "vibecast_errors", "Error messages sent, by code", ["code"], registry=r
        )
        self.sessions = Counter(
            "vibecast_sessions", "Sessions ended, by outcome", ["outcome"], registry=r
        )
        self.lead_low = Counter(
            "vibecast_lead_below_1s",
            "Playback reports showing less than 1 s of audio buffered ahead of the listener",
            registry=r,
        )
        self.engine_ready = Gauge(
            "vibecast_engine_ready", "1 once the engine is loaded and warm", registry=r
        )

    def track_active(self, count: Callable[[], int]) -> None:
        self.active.set_function(count)

    def track_engine(self, counters: Callable[[], dict[str, float]]) -> None:
        """The backend's own counters (`Backend.counters`), read at each scrape."""

        def reader(name: str) -> Callable[[], float]:
            return lambda: counters().get(name, 0.0)

        for name, help_ in (
            ("context_rebuilds", "Context windows rebuilt at turn boundaries (VibeVoice)"),
            ("context_rebuild_seconds", "Prefill time of those rebuilds"),
            ("engine_audio_seconds", "Audio the model made (turns replayed from the cache not)"),
            ("engine_frames", "Frames the model made, every session together (VibeVoice)"),
        ):
            Gauge(f"vibecast_{name}", help_, registry=self.registry).set_function(reader(name))

    def track_cache(self, counters: Callable[[], dict[str, float]]) -> None:
        """The turn cache's counters (server/turn_cache.py)."""

        def reader(name: str) -> Callable[[], float]:
            return lambda: counters()[name]

        for name, help_ in (
            ("hits", "Turns replayed from the turn cache instead of generated"),
            ("misses", "Turns the engine generated and the turn cache stored"),
            ("entries", "Turns in the turn cache"),
            ("bytes", "Size of the turn cache on disk"),
        ):
            Gauge(f"vibecast_turn_cache_{name}", help_, registry=self.registry).set_function(
                reader(name)
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)
