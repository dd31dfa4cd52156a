"""Server settings and limits, from one place.

Precedence: command-line flags > environment (VIBECAST_<NAME>) > a TOML file (--config) >
defaults. Every field below is settable each way; names are the same everywhere, e.g.
`max_chars` is `--max-chars`, VIBECAST_MAX_CHARS and `max_chars = ...` in the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Enforced before any work starts; echoed to clients in `ready.limits`."""

    max_speakers: int = 4
    max_turns: int = 10_000
    max_chars: int = 100_000
    max_audio_s: float = 96 * 60
    max_lead_ms: int = 60_000
    """How far generation may run ahead of what the client reports as played."""
    idle_timeout_s: float = 120.0
    """A connection that sends no start, or an open script that gets no append, for this long."""
    max_frame_bytes: int = 10 * 1024 * 1024

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "piper"
    """'piper' (the embedded default voice), a Piper .onnx file, or a VibeVoice directory/hub id."""
    voices: str | None = None
    """Directory of voice samples (name = file stem) for models that clone voices."""
    device: str = "auto"
    diffusion_steps: int = 0
    """VibeVoice: diffusion steps per frame, the same for every session (they share a batch);
    0: the model's own default, 10 for 1.5B/7B, 5 for Realtime-0.5B (the reference demos')."""
    store_url: str | None = None
    """`redis://HOST:PORT/DB`: resume tokens, the ring of sent frames, the admission queue and
    the job table in Redis (server/redis_store.py), shared by the gateways of a cluster. None:
    in this process, and jobs in SQLite under `jobs_dir`."""
    jobs_dir: str = "~/.local/share/vibecast/jobs"
    """Where jobs (POST /v1/jobs) keep their metadata (jobs.sqlite3) and audio; created when
    the first job comes."""
    jobs_max_age_s: float = 7 * 24 * 3600.0
    """Finished jobs older than this are removed with their audio."""
    jobs_max_bytes: int = 2 * 1024**3
    """Past this much job audio on disk, the oldest finished jobs are removed."""
    turn_cache: bool = True
    """Keep every turn made on disk (docs/turn-cache.md): a script run again replays its
    unchanged turns instead of generating them. `--no-turn-cache` turns it off."""
    turn_cache_dir: str = "~/.cache/vibecast/turns"
    turn_cache_max_bytes: int = 2 * 1024**3
    """Past this much, the least recently used turns are removed (float32 audio: ~96 KB/s)."""
    context_window: int = 0
    """VibeVoice: positions of context each session holds (voice prompts, the text block, the
    speech of the turns kept); `context` mode slides it at turn boundaries. 0: 2048 on a CPU,
    2560 on a GPU (docs/modes.md says why)."""
    dtype: str = "auto"
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 0
    """Sessions generating at once; more wait in the queue. 0: as many as the engine measured
    at start-up that it keeps in real time on this machine."""
    max_queue: int = 32
    """Sessions that may wait; past this a start is refused with `busy`."""
    resume_grace_s: float = 60.0
    """How long a session whose socket dropped keeps going, waiting for `resume`."""
    send_buffer_ms: int = 10_000
    """Audio a session may hold that the socket has not taken yet, before generation pauses."""
    api_keys: tuple[str, ...] = ()
    public: bool = False
    """Allow binding a non-loopback address without API keys."""
    starts_per_minute: int = 60
    """Session starts allowed per API key (or per client address without keys)."""
    archive_sessions: int = 64
    """Finished sessions whose audio stays downloadable (oldest dropped first)."""
    archive_ttl_s: float = 3600.0
    forwarded_allow_ips: str | None = None
    """Addresses (comma-separated, or '*') whose X-Forwarded-For/-Proto headers are believed:
    the reverse proxy in front of the server. None believes nobody, so a client cannot choose
    the address that its rate limit, downloads and log lines go by."""
    metrics_public: bool = False
    """Serve /metrics without an API key to everyone, not only to loopback clients."""
    content_filter_words: str | None = None
    """A UTF-8 file of words and phrases (matched case-insensitively as whole words) and
    `re:PATTERN` lines, one a line, `#` for comments; a turn that matches one is refused with
    `content_rejected` before any work. None: no list."""
    content_filter_hook: str | None = None
    """`module:function`, imported at start-up and called with each turn's text; it returns a
    reason (str) to refuse the turn with `content_rejected`, or None to accept it. None: no hook."""

    def replace(self, **changes: Any) -> ServerConfig:
        limit_names = {f.name for f in dataclasses.fields(Limits)}
        limits = {k: v for k, v in changes.items() if k in limit_names}
        rest = {k: v for k, v in changes.items() if k not in limit_names}
        if limits:
            rest["limits"] = dataclasses.replace(self.limits, **limits)
        return dataclasses.replace(self, **rest)


def _fields() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in (ServerConfig, Limits):
        hints.update({k: v for k, v in typing.get_type_hints(cls).items() if k != "limits"})
    return hints


FIELDS = _fields()


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = FIELDS[name]
    try:
        if kind == tuple[str, ...]:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(k).strip() for k in items if str(k).strip())
        if kind is bool:
            if isinstance(value, bool):
                return value
            word = str(value).lower()
            if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(value)
            return word in ("1", "true", "yes", "on")
        if kind in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return kind(value)
        if value in ("", None):  # str | None
            return None
        return str(value)
    except (TypeError, ValueError):
        what = getattr(kind, "__name__", str(kind))
        raise ValueError(f"{source}: {name} = {value!r} is not a valid {what}") from None


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge file, environment and flags (later wins) over the defaults."""
    changes: dict[str, Any] = {}
    if path is not None:
        data = tomllib.loads(Path(path).read_text("utf-8"))
        flat = {**data.pop("limits", {}), **data}
        for k, v in flat.items():
            if k not in FIELDS:
                raise ValueError(
                    f"{path}: unknown setting {k!r}; known: {', '.join(sorted(FIELDS))}"
                )
            changes[k] = _coerce(k, v, str(path))
    env = os.environ if env is None else env
    for k in FIELDS:
        var = f"VIBECAST_{k.upper()}"
        if var in env:
            changes[k] = _coerce(k, env[var], var)
    for k, v in (flags or {}).items():
        if v is not None:
            changes[k] = _coerce(k, v, f"--{k.replace('_', '-')}")
    return ServerConfig().replace(**changes)
