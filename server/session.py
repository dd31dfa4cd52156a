"""One session: a script being spoken, from `ready` to `done`. It outlives its socket (resume).

Where its work happens:
- the engine loop (engine/scheduler.py) runs its turns, unit by unit, whenever the session
  wants audio and no other session's listener is closer to running dry; this object is the
  loop's `Sink` for it;
- its output stage (resampling, Opus, packing) runs on a small shared worker pool, one unit
  after another in order, and posts each finished message to the event loop;
- the event loop holds the outbox (messages made, not yet sent) and the writer of whichever
  connection is attached; sent messages go to the store's ring for resume.

Flow control: the session wants audio only while it holds at most `send_buffer_ms` of audio the
socket has not taken, is at most `max_lead_ms` ahead of the client's last `playback`, and has a
connection. Otherwise the loop leaves it alone: a stalled, slow or absent reader pauses its
generation, with bounded memory and no compute.

Its life ends in one `Outcome`: `conclude` records how generation ended (done, cancelled,
failed) and queues the terminal message, which is built when it is sent, so `cancelled.last_seq`
names the last audio frame that really went out and no audio follows; the server's
`Sessions.end` then frees everything once that message is delivered or nobody came back for it.
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
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.backend import Backend, SpeakerVoice, SynthesisParams, Turn
from ..engine.pipeline import PipelineEvent, TurnAudio, TurnEnded, TurnFeed, TurnStarted
from ..engine.scheduler import Entry, Runner, Scheduler
from ..protocol.messages import (
    Audio,
    Cancelled,
    Code,
    Done,
    Error,
    Message,
    ProtocolError,
    Ready,
)
from .archive import Archive
from .output import AudioOutput, OutputFormat
from .revive import Continuation, save_carry, save_spec, save_turn_start
from .store import RingFrame, SessionStore
from .turn_cache import Carries, Replay, TurnCache, first_key, next_key

log = logging.getLogger("vibecast.session")


class State(enum.Enum):
    QUEUED = "queued"
    OPENING = "opening"  # engine session being prepared (voice prompts, caches)
    STREAMING = "streaming"
    CONCLUDED = "concluded"  # its outcome is known; the terminal message may wait to be sent


class Outcome(enum.Enum):
    """How a session ended: the `outcome` label of metrics and of the session_end log line."""

    DONE = "done"  # every turn spoken; `done` queued
    CANCELLED = "cancelled"  # the client cancelled; `cancelled` queued
    FAILED = "failed"  # a fatal `error` queued (its code is in `Session.error`)
    ABANDONED = "abandoned"  # its socket dropped and no resume came within the grace


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
    from_turn: int = 0
    """Send audio from this turn on; the turns before it are made (or replayed from the turn
    cache) for the context, and not sent."""
    opened: Turn | None = None
    """The turn after `turns` that the start opened (`stream: true`): its text so far, which
    grows with `text` messages. Not in `turns`, which are final (the turn cache looks them up,
    the backend checks them when the session opens)."""


@dataclass
class OutFrame:
    data: bytes | None  # packed message; None for the terminal message, built at send time
    seq: int | None = None  # audio seq
    samples: int = 0
    end_pts: int = 0
    replay: bool = True  # kept in the ring for resume
    starts: int | None = None  # a turn_start: its turn (a shared store keeps where it began)

    @property
    def terminal(self) -> bool:
        return self.data is None


@dataclass
class Counters:
    started: float = field(default_factory=time.monotonic)
    ready_at: float = 0.0
    first_audio_at: float = 0.0
    engine_busy_s: float = 0.0  # the engine loop's compute time for this session
    made: int = 0  # samples the engine made, at its own rate (flow control reads this)
    generated: int = 0  # samples encoded into messages, at the output rate
    sent: int = 0  # samples written to a socket
    played_ms: int | None = None
    played_at: float = 0.0  # when played_ms was reported
    turns_done: int = 0
    last_sent_seq: int = -1
    next_index: int = 0  # index of the next replayable frame


class Serial:
    """Runs one session's output work in order on a shared pool, so a few threads serve every
    session's output and no session's Opus encoding runs on the engine loop."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._queue: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(fn)
            if self._running:
                return
            self._running = True
        self._pool.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                fn = self._queue.popleft()
            fn()


class Session:
    def __init__(
        self,
        spec: SessionSpec,
        backend: Backend,
        scheduler: Scheduler,
        output_pool: Executor,
        store: SessionStore,
        archive: Archive,
        limits: Any,
        send_buffer_ms: int,
        on_concluded: Callable[[Session], None],
        on_change: Callable[[], None] = lambda: None,
        cache: TurnCache | None = None,
        taken_over: tuple[str, str, Continuation] | None = None,
    ) -> None:
        """`taken_over`: (id, resume token, where it goes on) of a session another gateway ran
        (server/revive.py); its state is in the store already."""
        self.id = secrets.token_urlsafe(12)
        self.token = secrets.token_urlsafe(24)
        self.going_on: Continuation | None = None
        if taken_over is not None:
            self.id, self.token, self.going_on = taken_over
        self.spec = spec
        self.backend = backend
        self.scheduler = scheduler
        self.store = store
        self.archive = archive
        self.limits = limits
        self.send_buffer_ms = send_buffer_ms
        self.on_concluded = on_concluded  # the server frees the session's engine slot
        self.on_change = on_change  # told when the engine pauses or resumes (tests wait on it)
        self.state = State.QUEUED
        self.outcome: Outcome | None = None
        self.error: Error | None = None  # the fatal error of a FAILED session
        self.counters = Counters()
        opened = [] if spec.opened is None else [spec.opened]
        self.feed = TurnFeed([*spec.turns, *opened], spec.more, open_last=bool(opened))
        self.streamed = {t.index for t in opened}  # turns whose text streamed in (`text`)
        self.output = AudioOutput(spec.format, backend.sample_rate)
        self.engine_session: Any = None
        self._entry: Entry | None = None
        self._runner: Runner | None = None
        self._output = Serial(output_pool)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: deque[OutFrame] = deque()
        self._wake = asyncio.Event()
        self._stop = threading.Event()
        self._last_turn = -1
        self._closed_as_last = False  # the last turn ended knowing it was last (flush included)
        self.attached = False  # a connection is writing for it; when not, generation pauses
        self.connection: Any = None  # the attached connection, closed when a resume takes over
        self.epoch = 0  # bumped by each connection that attaches; older writers stop
        self.announced = False  # `ready` (with the resume token) went out: resume is possible
        self.delivered = False  # the terminal message reached a socket
        self.touched = time.monotonic()  # last start, append with turns or text: the idle check
        self.chars = sum(len(t.text) for t in [*spec.turns, *opened])
        self.paused = False  # the engine loop holds it for the client (flow control)
        # The turn cache: the turns found for the start of the script (replayed before the
        # engine takes over), the chain of keys, and the audio of the turn being made.
        self.cache = cache
        self._found: list[Path] = []
        self._keys: list[str] = []  # key of turn i as a turn that did not end the script
        self._first_key = ""
        self._pcm: list[np.ndarray] = []
        self._swap = threading.Lock()  # the replay hands over to the engine vs `stop`
        # Fencing (a shared store): the epoch this gateway holds the session under; another
        # gateway that takes the session over bumps it, and this one then stops writing.
        self.fence = 0
        self._fenced = False
        if self.going_on is None:
            store.register(self.id, self.token)
        else:
            c = self.going_on
            self.output.go_on(c.seq, c.pts)
            self.fence = c.fence  # taken before the store was read for where to go on
            self.counters.next_index = c.index
            self.announced = True  # its client holds the token
            # What the engine makes again of the turn in progress and drops is not "made".
            self.counters.made = -c.skip * backend.sample_rate // spec.format.sample_rate

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Prepare the engine session (may raise ProtocolError); then the session is ready."""
        self.state = State.OPENING
        self._loop = asyncio.get_running_loop()
        spec = self.spec
        if self.cache is not None and self.going_on is None:  # files, hashes: off the loop
            try:
                self._found = await asyncio.to_thread(self._look_up)
            except OSError as e:  # an unreadable cache costs speed, not the session
                log.warning("turn cache lookup failed (%s); making every turn", e)
            if self.feed.complete and len(self._found) == self.feed.total:
                self.state = State.STREAMING  # all of it is in the cache: no engine session
                self.counters.ready_at = time.monotonic()
                return

        def open_and_check() -> Any:
            engine_session = self.backend.open_session(spec.speakers, spec.params)
            try:  # every turn known now is checked now, not when its time comes
                self.backend.check_turns(engine_session, spec.turns)
            except BaseException:
                self.backend.close_session(engine_session)
                raise
            return engine_session

        # Opening touches the model (voice prompts): a job on the engine loop.
        self.engine_session = await asyncio.wrap_future(self.scheduler.call(open_and_check))
        self.state = State.STREAMING
        self.counters.ready_at = time.monotonic()

    def ready_message(self, model_name: str) -> Ready:
        return Ready(
            session_id=self.id,
            resume_token=self.token,
            model={
                "name": model_name,
                "sample_rate": self.backend.sample_rate,
                # True: the backend speaks an open turn's text as it arrives; False: once final.
                "text_streaming": bool(getattr(self.backend, "streams_text", False)),
            },
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
        if self.store.shared and self.going_on is None:
            self.fence = self.store.attach(self.id)
            save_spec(self.store, self.id, self.spec)  # another gateway can take it over
        if not self._found:
            replayed = self.going_on.carries if self.going_on is not None else ()
            self._runner = self.backend.runner(self.engine_session, self.feed, replayed)
            self._entry = self.scheduler.add(self._runner, self)
            return
        assert self.cache is not None
        turns = self.feed.known()[: len(self._found)]
        self._runner = Replay(self.cache, self._found, turns, self.backend.sample_rate)
        self._entry = self.scheduler.add(self._runner, _ReplaySink(self))

    def _replayed(self) -> None:
        """On the engine loop: the cached turns are out; the engine goes on after them."""
        with self._swap:
            if self._stop.is_set():
                return  # `stop` frees the engine session
            if self.engine_session is None:  # the whole script came from the cache
                self.end(None)
                return
            assert self.cache is not None
            carries = Carries(self.cache, self._found)
            try:
                self._runner = self.backend.runner(self.engine_session, self.feed, carries)
            except BaseException as e:  # noqa: BLE001 - e.g. an entry removed meanwhile
                self.end(e)
                return
            self._entry = self.scheduler.add(self._runner, self)

    def _look_up(self) -> list[Path]:
        """The cached turns that open the script, in order, up to the first one missing."""
        assert self.cache is not None
        spec = self.spec
        self._first_key = first_key(self.backend.fingerprint(), spec.speakers, spec.params)
        found = []
        for turn in spec.turns:
            path = self.cache.find(self._key(turn, self._is_last(turn.index)))
            if path is None:
                break
            found.append(path)
        return found

    def _is_last(self, index: int) -> bool:
        """Whether turn `index` ends the script, as far as a `context` turn's audio depends on
        it: the model may speak on after the last line (docs/modes.md)."""
        if self.spec.params.mode != "context":
            return False
        return self.feed.complete and index == self.feed.total - 1

    def _key(self, turn: Turn, last: bool) -> str:
        while len(self._keys) < turn.index:  # the turns before it, none of which was last
            before = self.feed.peek(len(self._keys))
            assert before is not None
            self._keys.append(
                next_key(self._keys[-1] if self._keys else self._first_key, before, False)
            )
        previous = self._keys[turn.index - 1] if turn.index else self._first_key
        return next_key(previous, turn, last)

    def join(self, timeout: float) -> bool:
        """Wait until the engine loop has let go of the session; True once it has."""
        if self._entry is None:
            return True
        return self._entry.closed.wait(timeout)

    def stop(self) -> None:
        """Stop generating; the engine loop frees the session's state in the model."""
        with self._swap:
            self._stop.set()
            entry, runner = self._entry, self._runner
        self.feed.close()
        if entry is not None:
            self.scheduler.remove(entry)
        owned = runner is not None and not isinstance(runner, Replay)  # closes it when removed
        if not owned and self.engine_session is not None:  # opened, not running: free it
            engine_session, self.engine_session = self.engine_session, None
            self.scheduler.call(lambda: self.backend.close_session(engine_session))

    def conclude(self, outcome: Outcome, error: Error | None = None) -> None:
        """On the event loop: how generation ended. Stops it, queues the terminal message and
        frees the session's engine slot; only a `done` not yet delivered may still turn into
        `cancelled`."""
        if self.outcome is not None and not (
            self.outcome is Outcome.DONE and outcome is Outcome.CANCELLED
        ):
            return
        first = self.outcome is None
        self.state = State.CONCLUDED
        self.outcome, self.error = outcome, error
        self.stop()
        if outcome is Outcome.CANCELLED:  # unsent audio is dropped: only the close follows
            self._outbox = deque(f for f in self._outbox if f.seq is None and not f.terminal)
        elif outcome is Outcome.DONE:
            self.archive.finish(self.id, self.output.pts)
        if outcome is not Outcome.ABANDONED:
            self._push(OutFrame(None, replay=outcome is Outcome.DONE))
        if first:
            self.on_concluded(self)

    def cancel(self) -> None:
        self.conclude(Outcome.CANCELLED)

    def fail(self, code: Code, message: str) -> None:
        """End the session with a fatal error sent after what is already queued."""
        self.conclude(Outcome.FAILED, Error(code, message, True))

    # -- what the connection calls -------------------------------------------------------------

    def set_attached(self, attached: bool) -> None:
        """A connection took the session, or let it go (generation pauses until one takes it)."""
        self.attached = attached
        if not attached and self._runner is not None:
            self.scheduler.call(self._runner.park)  # on a GPU: its caches go to host memory
        self.scheduler.wake()

    def append(self, turns: list[Turn], more: bool, open_last: bool = False) -> int:
        """Add turns (ProtocolError names one the model cannot speak; then none is added);
        `open_last`: the last of them is open, its text comes in `text` messages."""
        final = turns[:-1] if open_last else turns  # an open turn is checked once it is final
        self.backend.check_turns(self.engine_session, final)
        self.chars += sum(len(t.text) for t in turns)
        if turns:  # an empty append is not activity: it must not keep an open script alive
            self.touched = time.monotonic()
        if open_last:
            self.streamed.add(turns[-1].index)
        total = self.feed.add(turns, more, open_last)
        self.scheduler.wake()
        return total

    def write(self, index: int, piece: str, final: bool) -> None:
        """More text of the open turn `index`, which the server has checked (the turn is open,
        the piece within the limits and the content filter). Final, the turn goes to the
        backend's check as an appended one does; one it refuses ends the session with that
        error (some of its text may have been spoken already by a backend that streams text,
        and text sent cannot be taken back)."""
        if final:
            got = self.feed.partial(index)
            assert got is not None
            turn = got[0]
            whole = Turn(index, turn.speaker, (turn.text + piece).strip())
            try:
                self.backend.check_turns(self.engine_session, [whole])
            except ProtocolError as e:
                self.conclude(Outcome.FAILED, Error(e.code, e.message, True, index, "text.text"))
                return
        self.chars += len(piece)
        self.touched = time.monotonic()
        self.feed.write(index, piece, final)
        self.scheduler.wake()  # the engine may wait for this turn (or, streaming, its text)

    def playback(self, played_ms: int) -> None:
        self.counters.played_ms = played_ms
        self.counters.played_at = time.monotonic()
        self.scheduler.wake()

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

    def terminal_message(self) -> Message:
        if self.outcome is Outcome.CANCELLED:
            return Cancelled(self.counters.last_sent_seq)
        if self.outcome is Outcome.FAILED:
            assert self.error is not None
            return self.error
        rate = self.spec.format.sample_rate
        return Done(
            samples=self.output.pts,
            duration_ms=round(self.output.pts * 1000 / rate),
            turns=self.feed.total,
            stats=self.stats(),
        )

    def fenced_out(self) -> bool:
        """Another gateway took this session over (a shared store): it refused this one's last
        frame (the ring keeps only the fence holder's), and this one stops writing for it."""
        return self._fenced

    def sent(self, frame: OutFrame) -> None:
        """The writer took `frame`; account for it and keep it for resume."""
        c = self.counters
        if frame.seq is not None:
            c.last_sent_seq = frame.seq
            c.sent += frame.samples
            if not c.first_audio_at:
                c.first_audio_at = time.monotonic()
        if frame.replay and frame.data is not None:
            kept = self.store.ring_append(
                self.id, RingFrame(c.next_index, frame.seq, frame.end_pts, frame.data), self.fence
            )
            if not kept:  # another gateway took the session over: it writes from now on
                self._fenced = True
                return
            if frame.starts is not None and self.store.shared:
                save_turn_start(self.store, self.id, frame.starts, frame.end_pts)
            c.next_index += 1
            keep_ms = self.limits.max_lead_ms + self.send_buffer_ms
            self.store.ring_trim(
                self.id, frame.end_pts - keep_ms * self.spec.format.sample_rate // 1000
            )
        self.scheduler.wake()

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

    # -- the engine loop's sink (called on the loop's thread) -----------------------------------

    def lead_s(self) -> float:
        """Audio made and not yet heard. Before any `playback`, the listener is taken to play
        from the first audio sent in real time; before any audio, the wait since `ready` counts
        against the session, so new sessions go first."""
        c = self.counters
        now = time.monotonic()
        made = c.made / self.backend.sample_rate
        if c.played_ms is not None:
            heard = c.played_ms / 1000 + (now - c.played_at)
        elif c.first_audio_at:
            heard = now - c.first_audio_at
        else:
            heard = now - c.ready_at
        return made - heard

    def wants_more(self) -> bool:
        if self._stop.is_set() or not self.attached:
            return False
        c = self.counters
        made_ms = c.made * 1000 // self.backend.sample_rate
        if made_ms - self.sent_ms > self.send_buffer_ms:
            return False
        return c.played_ms is None or made_ms - c.played_ms <= self.limits.max_lead_ms

    def hold(self, held: bool) -> None:
        # Through the output stage, so that `paused` is seen after the audio made before it.
        def note() -> None:
            self.paused = held
            self.on_change()

        self._output.submit(note)

    def put(self, events: list[PipelineEvent], busy_s: float) -> None:
        self.counters.engine_busy_s += busy_s
        for e in events:
            if isinstance(e, TurnAudio) and e.turn >= self.spec.from_turn:
                self.counters.made += len(e.pcm)  # turns not sent do not hold the engine back
        self._output.submit(lambda: self._guarded(self._emit, events))

    def end(self, error: BaseException | None) -> None:
        self._output.submit(lambda: self._guarded(self._engine_done, error))

    # -- the output stage (one session's work in order, on the output pool) ---------------------

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        if self._stop.is_set():
            return  # the session is ending: nothing more will be sent
        try:
            fn(*args)
        except ProtocolError as e:
            self._on_loop(self.fail, e.code, e.message)
        except BaseException as e:  # noqa: BLE001 - the output stage's boundary
            self._internal(e)

    def _internal(self, e: BaseException) -> None:
        log.error("session %s failed in the engine", self.id, exc_info=e)
        kind = (
            "out of memory"
            if isinstance(e, MemoryError) or "out of memory" in str(e)
            else (type(e).__name__)
        )
        self._on_loop(
            self.fail,
            Code.INTERNAL,
            f"the server failed while generating this session ({kind}); this is a bug in "
            f"vibecast, logged as session {self.id}. Other sessions are not affected.",
        )

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _emit(self, events: list[PipelineEvent]) -> None:
        out = self.output
        skip = self.spec.from_turn
        for event in events:
            if isinstance(event, TurnStarted):
                t = event.turn
                self._pcm = []
                start = out.turn_start(t.index, t.speaker, t.text)
                if t.index in self.streamed:
                    start.streamed = True  # its text is what was known when it started
                c = self.going_on
                if c is not None and c.started and t.index == c.turn:
                    out.go_on_in_turn(c.turn_pts, c.skip)  # its start went out before
                elif t.index >= skip:
                    self._post(start, starts=t.index)
            elif isinstance(event, TurnAudio):
                if self.cache is not None:
                    self._pcm.append(event.pcm)
                if event.turn < skip:
                    continue
                msg = out.audio(event.turn, event.pcm)
                if msg is not None:
                    self._send_audio(msg)
            elif isinstance(event, TurnEnded):
                if self.cache is not None and event.carry is not None:
                    self._store(event)
                if self.store.shared and event.carry is not None:
                    save_carry(self.store, self.id, event.turn, event.carry)
                if event.turn < skip:
                    self.counters.turns_done += 1
                    continue
                last = self.feed.complete and event.turn == self.feed.total - 1
                msg, end = out.turn_end(event.turn, last)
                if msg is not None:
                    self._send_audio(msg)
                if event.capped:
                    end.capped = True
                if event.turn in self.streamed:
                    whole = self.feed.partial(event.turn)
                    end.text = None if whole is None else whole[0].text
                self._post(end)
                self.counters.turns_done += 1
                self._last_turn, self._closed_as_last = event.turn, last
            if out.pts > int(self.limits.max_audio_s * self.spec.format.sample_rate):
                raise ProtocolError(
                    Code.TOO_LONG,
                    f"the audio passed limits.max_audio_s ({self.limits.max_audio_s:.0f} s) "
                    f"at turn {self._last_turn + 1}; split the script into several sessions.",
                    field="turns",
                    turn=self._last_turn + 1,
                    fatal=True,
                )

    def _store(self, event: TurnEnded) -> None:
        """A turn the engine made goes into the turn cache (on this session's output worker)."""
        assert self.cache is not None and event.carry is not None
        turn = self.feed.peek(event.turn)
        assert turn is not None
        pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.float32)
        self._pcm = []
        key = self._key(turn, self._is_last(turn.index))
        try:
            self.cache.put(key, pcm, event.capped, event.carry)
        except OSError as e:  # a full or read-only disk: the take goes on without storing
            log.warning("turn cache: could not store turn %d (%s)", turn.index, e)

    def _engine_done(self, error: BaseException | None) -> None:
        if error is not None:
            raise error
        if not self._closed_as_last:
            tail = self.output.end_of_stream(self._last_turn)
            if tail is not None:
                self._send_audio(tail)
        self.output.close()
        self._on_loop(self.conclude, Outcome.DONE)

    def _send_audio(self, msg: Audio) -> None:
        self.counters.generated += msg.samples
        if msg.packets:
            self.archive.write(self.id, msg.packets)
        self._post(msg, msg.samples)

    def _post(
        self, message: Message, samples: int = 0, replay: bool = True, starts: int | None = None
    ) -> None:
        """From the output stage: pack and hand a message to the event loop."""
        seq = message.seq if isinstance(message, Audio) else None
        frame = OutFrame(message.pack(), seq, samples, self.output.pts, replay, starts)
        self._on_loop(self._push, frame)

    def _push(self, frame: OutFrame) -> None:
        """On the event loop: queue a frame for the writer."""
        if frame.seq is not None and self.outcome is Outcome.CANCELLED:
            return  # made after cancel: dropped
        self._outbox.append(frame)
        self._wake.set()


class _ReplaySink:
    """The session as the sink of its replay (engine/scheduler.py's `Sink`): the same, except
    that the replay's end hands the session over to the engine instead of ending it."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.lead_s = session.lead_s
        self.wants_more = session.wants_more
        self.put = session.put
        self.hold = session.hold

    def end(self, error: BaseException | None) -> None:
        if error is not None:
            self._session.end(error)
        else:
            self._session._replayed()
