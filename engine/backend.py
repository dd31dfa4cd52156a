"""What every speech backend provides, and the small types that cross the engine boundary.

A backend opens sessions (voice prompts, RNG, caches) and hands the engine loop
(engine/scheduler.py) a session's turns as units of work (`runner`): for Piper a turn's text
stage or one vocoder window at a time, for VibeVoice one decode step of every session at once.

Per-model facts (sample rate, voices, modes) live on the backend; per-call settings live in
`SynthesisParams` (Piper's split of PiperConfig vs SynthesisConfig).

A request the backend refuses raises `ProtocolError` (vibecast.protocol.messages), the one error
type that crosses the engine boundary; anything else it raises is a bug, reported as `internal`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from .pipeline import TurnFeed
    from .scheduler import Runner


Carry = dict[str, np.ndarray]
"""A backend's state after a turn, as named arrays (`TurnEnded.carry`): its random generator's
state, and for VibeVoice's `context` mode what the turn put in the context."""


@dataclass(frozen=True)
class Turn:
    """One line of the script."""

    index: int
    """Position in the session's script, from 0."""
    speaker: int
    """Index into the session's speakers."""
    text: str


@dataclass(frozen=True)
class Voice:
    """A voice the server offers by name (GET /v1/voices)."""

    id: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class SpeakerVoice:
    """The voice of one speaker in a session: a catalogue voice or uploaded audio."""

    name: str
    voice_id: str | None = None
    audio: np.ndarray | None = field(default=None, repr=False)
    """Uploaded voice prompt, mono float32 at `audio_rate`."""
    audio_rate: int = 0


@dataclass(frozen=True)
class SynthesisParams:
    """Per-session settings a client may choose (`start.options`)."""

    seed: int
    mode: str
    cfg_scale: float | None = None
    steps: int | None = None
    frames_per_turn: int | None = None
    """Benchmarks (VibeVoice): every turn is exactly this many frames; other backends ignore it."""


def check_steps(params: SynthesisParams, steps: int) -> None:
    """`options.steps` must be the engine's: every session shares one batched step."""
    from ..protocol.messages import Code, ProtocolError

    if params.steps is not None and params.steps != steps:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"options.steps is {params.steps}, but this server runs every session with "
            f"{steps} diffusion steps (they share one batch); leave it out or send {steps}.",
            field="options.steps",
        )


class Backend(Protocol):
    # Read-only members, so a backend may declare narrower types (a 1-tuple of modes).
    @property
    def name(self) -> str:
        """Model name echoed in `ready.model.name`."""

    @property
    def sample_rate(self) -> int:
        """Rate of the PCM that `render` yields."""

    @property
    def modes(self) -> tuple[str, ...]:
        """Generation modes; the first is the default."""

    def voices(self) -> list[Voice]: ...

    def check_params(self, params: SynthesisParams) -> None:
        """Raise ProtocolError for settings this backend cannot honour."""

    def open_session(self, speakers: list[SpeakerVoice], params: SynthesisParams) -> Any:
        """Per-session state (voice prompts, RNG, caches). Raises ProtocolError for unusable voices.

        Voice names have been checked against `voices()` by the server.
        """

    def close_session(self, session: Any) -> None: ...

    def check_turns(self, session: Any, turns: list[Turn]) -> None:
        """Raise ProtocolError(too_long) naming a turn the model cannot speak in one piece,
        when the turn arrives rather than when its time comes."""

    def runner(
        self,
        session: Any,
        feed: TurnFeed,
        replayed: Sequence[Carry] = (),
        within: Carry | None = None,
    ) -> Runner:
        """The session's turns as units of work for the engine loop (engine/scheduler.py).

        `replayed`: the carries of turns 0 .. n - 1 (replayed from the turn cache, or spoken
        by an engine that was lost); the runner starts at turn n as if it had just spoken
        them. `within`: a `TurnAudio.mark` of turn n: it goes on from there (backends without
        marks start turn n from its beginning)."""

    def fingerprint(self) -> str:
        """What, besides the request, decides the audio: the model's weights and the server's
        settings that shape it (steps, window, dtype, device kind). Keys the turn cache."""

    def realtime_capacity(self) -> int:
        """Sessions this backend keeps in real time at once on this machine (from warm-up)."""

    def counters(self) -> dict[str, float]:
        """Engine counters for /metrics (e.g. VibeVoice's `context_rebuilds`); may be empty."""

    def seconds_per_char(self) -> float:
        """A generous estimate of audio seconds per character, to refuse over-long scripts early."""

    def warmup(self) -> None: ...
