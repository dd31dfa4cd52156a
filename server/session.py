"""One session: a script being spoken, from `ready` to `done`. It outlives its socket (resume).

Threads and tasks:
- the engine thread runs the turn pipeline and the output stage (resampling, Opus) and posts
  each finished message to the event loop;
- the event loop holds the outbox (messages made, not yet sent) and the writer of whichever
  connection is attached; sent messages go to the store's ring for resume.

Flow control: the engine thread waits before each audio message while the session holds more
than `send_buffer_ms` of unsent audio, is more than `max_lead_ms` ahead of the client's last
`playback`, or has no connection (detached, waiting for `resume`). A stalled or absent reader
therefore pauses generation with bounded memory and no compute.

Terminal messages (`done`, `cancelled`, fatal `error`) are markers built when they are sent,
so `cancelled.last_seq` names the last audio frame that really went out and no audio follows.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.backend import Backend, SpeakerVoice, SynthesisParams, Turn
from ..engine.pipeline import TurnAudio, TurnEnded, TurnFeed, TurnStarted, run_turns
from ..protocol.messages import Audio, Cancelled, Code, Done, Error, Message, ProtocolError, Ready
from .archive import Archive
from .output import AudioOutput, OutputFormat
from .store import RingFrame, SessionStore

log = logging.getLogger("vibecast.session")


class State(enum.Enum):
    QUEUED = "queued"
    OPENING = "opening"  # engine session being prepared (voice prompts, caches)
    STREAMING = "streaming"
    FINISHED = "finished"  # every message made; some may still wait to be sent
    CANCELLED = "cancelled"
    FAILED = "failed"


ENDED = (State.FINISHED, State.CANCELLED, State.FAILED)


@dataclass
class SessionSpec:
    """A validated `start`: everything needed to begin, nothing allocated yet."""

    speakers: list[SpeakerVoice]
    turns: list[Turn]
    more: bool
    format: OutputFormat
    params: SynthesisParams
    request_id: str | None
    client: str  # API key name or address, for logs and rate limits


@dataclass
class OutFrame:
    data: bytes | None  # packed message; None for a marker built at send time
    seq: int | None = None  # audio seq
    samples: int = 0
    end_pts: int = 0
    replay: bool = True  # kept in the ring for resume
    marker: str | None = None  # "done" | "cancelled" | "error"
    error: Error | None = None


@dataclass
class Counters:
    started: float = field(default_factory=time.monotonic)
    ready_at: float = 0.0
    first_audio_at: float = 0.0
    engine_busy_s: float = 0.0  # time the engine thread spent computing (not waiting)
    generated: int = 0  # samples made
    sent: int = 0  # samples written to a socket
    played_ms: int | None = None
    turns_done: int = 0
    last_sent_seq: int = -1
    next_index: int = 0  # index of the next replayable frame


class Session:
    def __init__(
        self,
        spec: SessionSpec,
        backend: Backend,
        store: SessionStore,
        archive: Archive,
        limits: Any,
        send_buffer_ms: int,
        on_end: Callable[[Session], None],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.id = secrets.token_urlsafe(12)
        self.token = secrets.token_urlsafe(24)
        self.spec = spec
        self.backend = backend
        self.store = store
        self.archive = archive
        self.limits = limits
        self.send_buffer_ms = send_buffer_ms
        self.on_end = on_end
        self.on_change = on_change  # told when the engine pauses or resumes (tests wait on it)
        self.state = State.QUEUED
        self.counters = Counters()
        self.feed = TurnFeed(spec.turns, spec.more)
        self.output = AudioOutput(spec.format, backend.sample_rate)
        self.engine_session: Any = None
        self.outcome = ""  # for the log line at the end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: deque[OutFrame] = deque()
        self._wake = asyncio.Event()
        self._stop = threading.Event()
        self._room = threading.Condition()
        self._thread: threading.Thread | None = None
        self.attached = False  # a connection is writing for it; when not, generation pauses
        self.connection: Any = None  # the attached connection, closed when a resume takes over
        self.epoch = 0  # bumped by each connection that attaches; older writers stop
        self.announced = False  # `ready` (with the resume token) went out: resume is possible
        self.delivered = False  # the terminal message reached a socket
        self.touched = time.monotonic()  # last start or append with turns, for the idle check
        self.chars = sum(len(t.text) for t in spec.turns)
        self.paused = False  # the engine is waiting for the client (flow control)
        store.register(self.id, self.token)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Prepare the engine session (may raise ProtocolError); then the session is ready."""
        self.state = State.OPENING
        self._loop = asyncio.get_running_loop()
        spec = self.spec
        self.engine_session = await asyncio.to_thread(
            self.backend.open_session, spec.speakers, spec.params
        )
        self.state = State.STREAMING
        self.counters.ready_at = time.monotonic()

    def ready_message(self, model_name: str) -> Ready:
        return Ready(
            session_id=self.id,
            resume_token=self.token,
            model={"name": model_name, "sample_rate": self.backend.sample_rate},
            format=self.output.format_info(),
            speakers=[
                {"index": i, "name": s.name, "voice": s.voice_id or "upload"}
                for i, s in enumerate(self.spec.speakers)
            ],
            limits=self.limits.public(),
            request_id=self.spec.request_id,
            turns=self.feed.total,
        )

    def start_engine(self) -> None:
        if self.spec.format.codec == "opus":
            rate = self.spec.format.sample_rate
            self.archive.begin(self.id, self.output.pre_skip, rate, owner=self.spec.client)
        self._thread = threading.Thread(
            target=self._produce, name=f"session-{self.id}", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait for the engine thread to exit; True once it has (tests and shutdown use this)."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> None:
        """Stop generating and free the engine's memory (the thread exits at its next chunk)."""
        self._stop.set()
        self.feed.close()
        with self._room:
            self._room.notify_all()

    def abandon(self) -> None:
        """Nobody came back for it: stop quietly (no message can be delivered)."""
        if self.state not in ENDED:
            self.state = State.CANCELLED
            self.outcome = "abandoned"
            self.stop()
            self._finished()
        else:
            self.stop()

    def cancel(self) -> None:
        if self.state in ENDED and self.state is not State.FINISHED:
            return
        was_finished = self.state is State.FINISHED
        self.state = State.CANCELLED
        self.outcome = "cancelled"
        self.stop()
        # Unsent audio is dropped: nothing follows `cancelled` but the close.
        self._outbox = deque(f for f in self._outbox if f.seq is None and f.marker is None)
        self._push(OutFrame(None, marker="cancelled", replay=False))
        if not was_finished:
            self._finished()

    def fail(self, code: Code, message: str) -> None:
        """End the session with a fatal error sent after what is already queued."""
        if self.state in ENDED:
            return
        self.state = State.FAILED
        self.outcome = code.value
        self.stop()
        self._push(OutFrame(None, marker="error", replay=False, error=Error(code, message, True)))
        self._finished()

    def _finished(self) -> None:
        self.on_end(self)

    # -- what the connection calls -------------------------------------------------------------

    def set_attached(self, attached: bool) -> None:
        """A connection took the session, or let it go (generation pauses until one takes it)."""
        self.attached = attached
        with self._room:
            self._room.notify_all()

    def append(self, turns: list[Turn], more: bool) -> int:
        self.chars += sum(len(t.text) for t in turns)
        if turns:  # an empty append is not activity: it must not keep an open script alive
            self.touched = time.monotonic()
        return self.feed.add(turns, more)

    def playback(self, played_ms: int) -> None:
        self.counters.played_ms = played_ms
        with self._room:
            self._room.notify_all()

    async def next_frame(self) -> OutFrame:
        while not self._outbox:
            self._wake.clear()
            await self._wake.wait()
        return self._outbox.popleft()

    def requeue(self, frame: OutFrame) -> None:
        """Put back a frame a writer took but did not send (its socket went away)."""
        self._outbox.appendleft(frame)
        self._wake.set()

    def replay_after(self, last_seq: int) -> list[RingFrame] | None:
        return self.store.ring_after(self.id, last_seq)

    def build_marker(self, frame: OutFrame) -> Message:
        c = self.counters
        if frame.marker == "cancelled":
            return Cancelled(c.last_sent_seq)
        if frame.marker == "error":
            assert frame.error is not None
            return frame.error
        rate = self.spec.format.sample_rate
        return Done(
            samples=self.output.pts,
            duration_ms=round(self.output.pts * 1000 / rate),
            turns=self.feed.total,
            stats=self.stats(),
        )

    def sent(self, frame: OutFrame) -> None:
        """The writer took `frame`; account for it and keep it for resume."""
        c = self.counters
        if frame.seq is not None:
            c.last_sent_seq = frame.seq
            c.sent += frame.samples
            if not c.first_audio_at:
                c.first_audio_at = time.monotonic()
        if frame.replay and frame.data is not None:
            self.store.ring_append(
                self.id, RingFrame(c.next_index, frame.seq, frame.end_pts, frame.data)
            )
            c.next_index += 1
            keep_ms = self.limits.max_lead_ms + self.send_buffer_ms
            self.store.ring_trim(
                self.id, frame.end_pts - keep_ms * self.spec.format.sample_rate // 1000
            )
        with self._room:
            self._room.notify_all()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        rate = self.spec.format.sample_rate
        audio_s = self.output.pts / rate
        return {
            "ttfa_ms": round((c.first_audio_at - c.started) * 1000) if c.first_audio_at else None,
            "rtf": round(c.engine_busy_s / audio_s, 4) if audio_s else None,
            "wall_ms": round((time.monotonic() - c.started) * 1000),
            "queued_ms": round((c.ready_at - c.started) * 1000) if c.ready_at else None,
        }

    @property
    def generated_ms(self) -> int:
        return self.counters.generated * 1000 // self.spec.format.sample_rate

    @property
    def sent_ms(self) -> int:
        return self.counters.sent * 1000 // self.spec.format.sample_rate

    # -- the engine thread ---------------------------------------------------------------------

    def _push(self, frame: OutFrame) -> None:
        """On the event loop: queue a frame for the writer."""
        if frame.seq is not None and self.state is State.CANCELLED:
            return  # made after cancel: dropped
        self._outbox.append(frame)
        self._wake.set()

    def _post(self, message: Message, samples: int = 0, replay: bool = True) -> None:
        """From the engine thread: pack and hand a message to the event loop."""
        if self._stop.is_set():
            return  # the session is ending: nothing more will be sent
        seq = message.seq if isinstance(message, Audio) else None
        frame = OutFrame(message.pack(), seq, samples, self.output.pts, replay)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._push, frame)

    def _room_for_more(self) -> bool:
        if self._stop.is_set():
            return True
        if not self.attached:
            return False
        c = self.counters
        rate = self.spec.format.sample_rate
        if (c.generated - c.sent) * 1000 // rate > self.send_buffer_ms:
            return False
        if (
            c.played_ms is not None
            and c.generated * 1000 // rate - c.played_ms > self.limits.max_lead_ms
        ):
            return False
        return True

    def _produce(self) -> None:
        out = self.output
        rate = self.spec.format.sample_rate
        max_samples = int(self.limits.max_audio_s * rate)
        last_turn = -1
        closed_as_last = False  # the last turn ended knowing it was last (flush included)
        tick = time.monotonic()
        try:
            for event in run_turns(self.backend, self.engine_session, self.feed, self._stop):
                now = time.monotonic()
                self.counters.engine_busy_s += now - tick
                if isinstance(event, TurnStarted):
                    t = event.turn
                    self._post(out.turn_start(t.index, t.speaker, t.text))
                elif isinstance(event, TurnAudio):
                    msg = out.audio(event.turn, event.pcm)
                    if msg is not None:
                        self._send_audio(msg)
                elif isinstance(event, TurnEnded):
                    last = self.feed.complete and event.turn == self.feed.total - 1
                    msg, end = out.turn_end(event.turn, last)
                    if msg is not None:
                        self._send_audio(msg)
                    self._post(end)
                    self.counters.turns_done += 1
                    last_turn, closed_as_last = event.turn, last
                if out.pts > max_samples:
                    raise ProtocolError(
                        Code.TOO_LONG,
                        f"the audio passed limits.max_audio_s ({self.limits.max_audio_s:.0f} s) "
                        f"at turn {last_turn + 1}; split the script into several sessions.",
                        field="turns",
                        turn=last_turn + 1,
                        fatal=True,
                    )
                with self._room:  # pause here while the client is far enough behind
                    if not self._room_for_more():
                        self.paused = True
                        self.on_change()
                        self._room.wait_for(self._room_for_more)
                        self.paused = False
                        self.on_change()
                tick = time.monotonic()
            if not self._stop.is_set():
                tail = None if closed_as_last else out.end_of_stream(last_turn)
                if tail is not None:
                    self._send_audio(tail)
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._complete)
        except ProtocolError as e:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self.fail, e.code, e.message)
        except BaseException as e:  # noqa: BLE001 - the engine worker's boundary: anything else
            log.exception("session %s failed in the engine", self.id)
            kind = "out of memory" if "out of memory" in str(e).lower() else type(e).__name__
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(
                    self.fail,
                    Code.INTERNAL,
                    f"the server failed while generating this session ({kind}); this is a bug "
                    f"in vibecast, logged as session {self.id}. Other sessions are not affected.",
                )
        finally:
            try:
                if self.engine_session is not None:
                    self.backend.close_session(self.engine_session)
            finally:
                self.engine_session = None
                out.close()

    def _send_audio(self, msg: Audio) -> None:
        self.counters.generated += msg.samples
        if msg.packets:
            self.archive.write(self.id, msg.packets)
        self._post(msg, msg.samples)

    def _complete(self) -> None:
        if self.state is not State.STREAMING:
            return
        self.state = State.FINISHED
        self.outcome = "done"
        self.archive.finish(self.id, self.output.pts)
        self._push(OutFrame(None, marker="done", replay=True))
        self._finished()
