"""A gateway's backend when the model runs elsewhere (an engine replica of a cluster,
server/cluster.py): the Backend interface over a transport that streams a session's events
from an engine (engine/serving.py).

Sessions in the gateway are unchanged: their runner (`RemoteRunner`) hands the gateway's
engine loop the batches an engine streams, so flow control, resume, the turn cache and the
output stage work as in one process. When the engine dies mid-session, the runner asks another
one to go on after the last turn it finished (the turns' carries came with their ends) and
drops what it had already delivered of the turn in progress, sample for sample: with
deterministic backends (Piper, VibeVoice `turns` mode) the session's audio is exactly the
uninterrupted one; in `context` mode the turn in progress is made again in a rebuilt context,
so the audio after the splice may differ from what the lost engine would have made.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..engine.backend import Carry, SpeakerVoice, SynthesisParams, Turn, Voice, check_steps
from ..engine.pipeline import PipelineEvent, TurnAudio, TurnEnded, TurnFeed, TurnStarted
from ..engine.scheduler import Events
from ..engine.wire import RemoteError, StreamRequest, unpack_events
from ..protocol.messages import Code, ProtocolError

log = logging.getLogger("vibecast.remote")

BUFFER = 4  # batches a runner holds that its session has not taken (the engine's window is more)
ATTEMPTS = 3  # engines a session may lose before it fails
BEAT_S = 0.5  # how often a gateway says its streams are alive (engines give up after ~2 s)


class EngineLink(Protocol):
    """How a gateway reaches engines (Ray Serve handles in a cluster)."""

    def describe(self) -> dict[str, Any]: ...

    def stream(self, request: bytes) -> Iterable[bytes]:
        """The batches of one stream; raises when the engine serving it is lost."""

    def cancel(self, stream: Iterable[bytes]) -> None: ...

    def ack(self, stream: str, batches: int) -> None: ...

    def beat(self, streams: list[str]) -> None:
        """These streams still have their gateway."""

    def done(self, stream: str) -> None: ...

    def append(self, script: str, turns: list[Turn], complete: bool) -> None:
        """Turns appended to a session's script (`complete`: no more will come)."""


@dataclass
class RemoteSession:
    speakers: list[SpeakerVoice]
    params: SynthesisParams


class RemoteRunner:
    """A session's turns as made by a remote engine; a thread reads the stream into a small
    buffer that the gateway's engine loop takes from."""

    group = None

    def __init__(
        self,
        backend: RemoteBackend,
        session: RemoteSession,
        feed: TurnFeed,
        replayed: Sequence[Carry],
    ) -> None:
        self._backend = backend
        self._link = backend.link
        self._session = session
        self._feed = feed
        self._carries: list[Carry] = list(replayed)  # turn i's at index i
        self._started: set[int] = set()
        self._ended: set[int] = set()
        self._delivered: dict[int, int] = {}  # samples of a turn handed to the session
        self._seen: dict[int, int] = {}  # samples of a turn the current stream has made
        self._mark: tuple[int, Carry, int] | None = None  # (turn, mark, samples made up to it)
        self._from: dict[int, int] = {}  # where the current stream starts within a turn
        self.wake: Any = lambda: None  # the engine loop's (scheduler.py sets it)
        self._lock = threading.Condition()
        self._buffer: deque[tuple[str, Events]] = deque()
        self._over = False
        self._error: BaseException | None = None
        self._closed = False
        self._current: Iterable[bytes] | None = None
        self.stream_id = ""
        self.taken: dict[str, int] = {}
        self.engines_lost = 0
        self._script = secrets.token_hex(8)  # where appended turns go, whichever engine reads
        self._thread = threading.Thread(target=self._read, name="remote-stream", daemon=True)
        self._thread.start()
        if not feed.complete:
            threading.Thread(target=self._forward, name="remote-append", daemon=True).start()

    # -- the engine loop's side (scheduler.py's Runner) ---------------------------------------

    def ready(self) -> bool:
        with self._lock:
            return bool(self._buffer) or self._over

    def run(self) -> Events | None:
        with self._lock:
            if not self._buffer:
                if self._error is not None:
                    raise self._error
                return None
            stream, events = self._buffer.popleft()
            self._lock.notify_all()
        self.taken[stream] = self.taken.get(stream, 0) + 1
        self._link.ack(stream, self.taken[stream])
        return events

    def park(self) -> None:
        return None  # the engine holds the stream when its batches are not acknowledged

    def close(self) -> None:
        with self._lock:
            self._closed = True
            current = self._current
            self._lock.notify_all()
        if current is not None:
            self._link.cancel(current)
        self._backend.forget(self)
        if self.stream_id:
            self._link.done(self.stream_id)

    # -- the reading thread ---------------------------------------------------------------------

    def _forward(self) -> None:
        """Pass turns appended to the session's script on to the engines, each once it is final
        (a turn whose text streams in is spoken here once its text is complete)."""
        n = len(self._feed.known())  # an open turn is not known yet: it is passed on when final
        while True:
            turn = self._feed.get(n)  # waits for turn n, or for the script's end
            with self._lock:
                if self._closed:
                    return
            self._link.append(self._script, [] if turn is None else [turn], turn is None)
            if turn is None:
                return
            n += 1

    def _read(self) -> None:
        try:
            while not self._finished_stream():
                pass
        except BaseException as e:  # noqa: BLE001 - handed to the engine loop as the session's
            with self._lock:
                self._error = e
        with self._lock:
            self._over = True
        self.wake()

    def _finished_stream(self) -> bool:
        """Run one stream to its end: True when the session is over (or closed), False when the
        engine was lost and another should go on."""
        with self._lock:
            if self._closed:
                return True
        self.stream_id = secrets.token_hex(8)
        self._backend.watch(self)
        replayed = self._carries[: self._first_missing()]
        # Within the turn in progress, go on from the last place the lost engine marked (what
        # it had made up to there is not made again), else from the turn's start.
        within, self._from = None, {}
        if self._mark is not None and self._mark[0] == len(replayed):
            k, within, made = self._mark
            self._from = {k: made}
        self._seen = {}
        request = StreamRequest(
            self.stream_id,
            self._session.speakers,
            self._session.params,
            self._feed.known(),
            replayed,
            self._script,
            not self._feed.complete,
            within,
        )
        try:
            stream = self._link.stream(request.pack())
            with self._lock:
                if self._closed:
                    return True
                self._current = stream
            for data in stream:
                batch = unpack_events(data, self._feed)
                if isinstance(batch, RemoteError):
                    code, field, at = Code(batch.code), batch.field, batch.turn
                    raise ProtocolError(code, batch.message, field=field, turn=at, fatal=True)
                events = self._new(batch)
                with self._lock:
                    while len(self._buffer) >= BUFFER and not self._closed:
                        self._lock.wait()
                    if self._closed:
                        return True
                    if events:
                        self._buffer.append((self.stream_id, events))
                self.wake()
            return True
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine or the link to it is gone
            with self._lock:
                if self._closed:
                    return True
            self.engines_lost += 1
            if self.engines_lost >= ATTEMPTS:
                raise RuntimeError(f"lost {self.engines_lost} engines in a row: {e!r}") from e
            log.warning("stream %s lost its engine (%r); going on with another", self.stream_id, e)
            self._link.done(self.stream_id)
            return False

    def _first_missing(self) -> int:
        """Turns whose carries are all here: the next stream starts after them."""
        n = 0
        while n < len(self._carries) and self._carries[n] is not None:
            n += 1
        return n

    def _new(self, batch: list[PipelineEvent]) -> Events:
        """What of a batch the session has not had yet (a stream after a lost engine makes the
        turn in progress again, from its last mark or from its start)."""
        out: Events = []
        for e in batch:
            if isinstance(e, TurnStarted):
                self._seen[e.turn.index] = self._from.get(e.turn.index, 0)
                if e.turn.index not in self._started:
                    self._started.add(e.turn.index)
                    out.append(e)
            elif isinstance(e, TurnAudio):
                seen = self._seen.get(e.turn, 0)
                have = self._delivered.get(e.turn, 0)
                pcm = e.pcm[max(0, have - seen) :]
                self._seen[e.turn] = seen + len(e.pcm)
                if e.mark is not None:
                    self._mark = (e.turn, e.mark, self._seen[e.turn])
                if len(pcm):
                    self._delivered[e.turn] = have + len(pcm)
                    out.append(TurnAudio(e.turn, pcm))
            elif isinstance(e, TurnEnded) and e.turn not in self._ended:
                self._ended.add(e.turn)
                self._mark = None
                if e.carry is not None and len(self._carries) == e.turn:
                    self._carries.append(e.carry)
                out.append(e)
        return out


class RemoteBackend:
    """The Backend interface (engine/backend.py) of engines reached over `link`."""

    def __init__(self, link: EngineLink, engines: int = 1) -> None:
        """`engines`: how many replicas there are; the capacity is theirs together (gateways
        admit against it through the shared store's one queue and running count)."""
        self.link = link
        info = link.describe()
        self.name: str = info["name"]
        self.sample_rate: int = info["sample_rate"]
        self.modes: tuple[str, ...] = tuple(info["modes"])
        self._voices = [Voice(*v) for v in info["voices"]]
        self._capacity = max(1, int(info["capacity"]) * engines)
        self._per_char: float = info["seconds_per_char"]
        self._fingerprint: str = info["fingerprint"]
        self._steps: int | None = info.get("steps")
        self._lock = threading.Lock()
        self._runners: set[RemoteRunner] = set()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="remote-beat", daemon=True).start()

    def voices(self) -> list[Voice]:
        return list(self._voices)

    def check_params(self, params: SynthesisParams) -> None:
        if params.mode not in self.modes:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.mode {params.mode!r} is not one this model offers: "
                f"{', '.join(repr(m) for m in self.modes)}.",
                field="options.mode",
            )
        if self._steps is not None:
            check_steps(params, self._steps)

    def open_session(self, speakers: list[SpeakerVoice], params: SynthesisParams) -> RemoteSession:
        return RemoteSession(speakers, params)

    def close_session(self, session: RemoteSession) -> None:
        return None

    def check_turns(self, session: RemoteSession, turns: list[Turn]) -> None:
        return None  # the engine checks the script when the stream opens (a fatal error then)

    def runner(
        self,
        session: RemoteSession,
        feed: TurnFeed,
        replayed: Sequence[Carry] = (),
        within: Carry | None = None,
    ) -> RemoteRunner:
        return RemoteRunner(self, session, feed, replayed)

    def realtime_capacity(self) -> int:
        return self._capacity

    def counters(self) -> dict[str, float]:
        return {}

    def seconds_per_char(self) -> float:
        return self._per_char

    def fingerprint(self) -> str:
        return self._fingerprint

    def warmup(self) -> None:
        return None

    # -- what runners call ----------------------------------------------------------------------

    def watch(self, runner: RemoteRunner) -> None:
        with self._lock:
            self._runners.add(runner)
        self.link.beat([runner.stream_id])  # before the engine first looks

    def forget(self, runner: RemoteRunner) -> None:
        with self._lock:
            self._runners.discard(runner)

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with self._lock:
                streams = [r.stream_id for r in self._runners if r.stream_id]
            if streams:
                try:
                    self.link.beat(streams)
                except Exception:  # noqa: BLE001 - the store is back at the next beat
                    log.exception("could not tell the engines our streams are alive")

    def close(self) -> None:
        self._stop.set()
