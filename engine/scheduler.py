"""The engine loop: one thread per loaded model, and the only code that runs the model.

Sessions own no threads. Each hands the loop a `Runner` (its turns as units of work: a text
stage, a vocoder window, a decode step) and a `Sink` (where its events go, how much audio its
listener has left, whether it wants more now). Each iteration the loop

  1. runs the queued jobs (opening a session: voice prompts, caches), oldest first;
  2. picks, among the runners that can run without waiting and whose sinks want audio, the one
     whose listener is closest to running dry (least lead: deadline first), and runs one unit;
     a runner of a batched backend runs one step for every runnable member of its group at
     once, so N sessions cost one step, not N;
  3. hands the events to the sinks, which encode them (resampling, Opus) on their own workers.

A session paused by flow control or detached from its socket is simply not picked: it costs
nothing while it waits. `wake()` is called whenever a sink's wish or a runner's readiness may
have changed (audio sent, playback reported, turns appended, a socket attached, a stop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from .backend import Carry
from .pipeline import PipelineEvent

log = logging.getLogger("vibecast.engine")

Events = list[PipelineEvent]


class Runner(Protocol):
    """One session's generation, as units of work the loop runs one at a time."""

    @property
    def group(self) -> Group | None:
        """The batch this runner steps with (one unit runs every runnable member), or None."""

    def ready(self) -> bool:
        """A unit can run now without waiting (for example for appended text)."""

    def run(self) -> Events | None:
        """One unit of work; None once the session's last turn has ended."""

    def close(self) -> None:
        """Free what the runner holds in the model (on the loop thread)."""

    def park(self) -> None:
        """Nobody listens to the session for now: move its state out of the way (loop thread).
        It comes back by itself when the loop next runs it."""


class Group(Protocol):
    wake: Callable[[], None]  # set by the loop: call when a member may have become ready

    def run(self, runners: list[Runner]) -> dict[Runner, Events | None | BaseException]:
        """One batched unit for these runners (all of this group, all ready): each one's
        events, None once it is done, or the error that ends that session alone."""


class Sink(Protocol):
    """The session side of a runner."""

    def lead_s(self) -> float:
        """Seconds of audio made and not yet heard; the least lead runs first."""

    def wants_more(self) -> bool:
        """False while flow control holds the session (buffer full, listener far behind, or no
        socket): the loop leaves it alone until `wake()`."""

    def put(self, events: Events, busy_s: float) -> None:
        """Events of one unit, and the loop's compute time spent on them. Must not block."""

    def hold(self, held: bool) -> None:
        """The loop found the session held by flow control (True), or running again (False)."""

    def end(self, error: BaseException | None) -> None:
        """The runner finished (None) or failed; nothing more will be put."""


@dataclass(eq=False)
class Entry:
    runner: Runner
    sink: Sink
    stopped: bool = False
    held: bool = False  # last seen as ready but held by flow control
    closed: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    def __init__(self, name: str = "engine") -> None:
        self._cond = threading.Condition()
        self._entries: list[Entry] = []
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._closing = False
        self.units = 0  # units run, for tests and metrics
        self.busy_s = 0.0  # time spent running units and jobs
        self._thread = threading.Thread(target=self._loop, name=f"{name}-loop", daemon=True)
        self._thread.start()

    # -- what sessions call (any thread) ------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the loop, before any further unit (opening sessions touches the model)."""
        done: Future[Any] = Future()
        with self._cond:
            if self._closing:
                done.set_exception(RuntimeError("the engine loop has stopped"))
                return done
            self._jobs.append((fn, done))
            self._cond.notify()
        return done

    def add(self, runner: Runner, sink: Sink) -> Entry:
        entry = Entry(runner, sink)
        if runner.group is not None:
            runner.group.wake = self.wake  # its background work (a prefill) may end any time
        elif hasattr(runner, "wake"):
            runner.wake = self.wake  # a remote runner: its batches arrive on another thread
        with self._cond:
            self._entries.append(entry)
            self._cond.notify()
        return entry

    def remove(self, entry: Entry) -> None:
        """Stop running `entry`; its runner is closed on the loop, then `entry.closed` is set."""
        with self._cond:
            entry.stopped = True
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            for e in self._entries:
                e.stopped = True
            self._cond.notify()
        self._thread.join(timeout)

    def alive(self) -> bool:
        """The loop's thread is running (health checks)."""
        return self._thread.is_alive()

    def active(self) -> int:
        with self._cond:
            return sum(1 for e in self._entries if not e.stopped)

    # -- the loop ------------------------------------------------------------------------------

    def _runnable(self) -> list[Entry]:
        ready = []
        for e in self._entries:
            if not e.runner.ready():
                continue
            wants = e.sink.wants_more()
            if wants == e.held:  # a change of state: tell the session (tests and metrics)
                e.held = not wants
                e.sink.hold(e.held)
            if wants:
                ready.append(e)
        return ready

    def _drop_stopped(self) -> list[Entry]:
        gone = [e for e in self._entries if e.stopped]
        if gone:
            self._entries = [e for e in self._entries if not e.stopped]
        return gone

    def _loop(self) -> None:
        while True:
            job = None
            with self._cond:
                while True:
                    gone = self._drop_stopped()
                    if gone:
                        break
                    if self._closing and not self._jobs:
                        return
                    if self._jobs:
                        job = self._jobs.popleft()
                        break
                    ready = self._runnable()
                    if ready:
                        break
                    self._cond.wait()
            if gone:
                for e in gone:
                    self._close(e)
                continue
            start = time.perf_counter()
            if job is not None:
                fn, done = job
                if done.set_running_or_notify_cancel():
                    try:
                        done.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        done.set_exception(e)
            else:
                self._run_unit(ready)
            self.busy_s += time.perf_counter() - start

    def _run_unit(self, ready: list[Entry]) -> None:
        first = min(ready, key=lambda e: e.sink.lead_s())
        group = first.runner.group
        members = [first] if group is None else [e for e in ready if e.runner.group is group]
        start = time.perf_counter()
        results: dict[Runner, Events | None | BaseException]
        try:
            if group is None:
                results = {first.runner: first.runner.run()}
            else:
                results = group.run([e.runner for e in members])
        except BaseException as error:  # noqa: BLE001 - the engine worker's boundary
            # One unit failed: the sessions in it fail, every other session carries on.
            log.exception("the engine failed in a unit of %d session(s)", len(members))
            for e in members:
                self._finish(e, error)
            return
        self.units += 1
        share = (time.perf_counter() - start) / len(members)
        for e in members:
            events = results.get(e.runner, [])
            if events is None or isinstance(events, BaseException):
                self._finish(e, events)
            elif events:
                e.sink.put(events, share)

    def _finish(self, entry: Entry, error: BaseException | None) -> None:
        with self._cond:
            entry.stopped = True
        entry.sink.end(error)

    def _close(self, entry: Entry) -> None:
        try:
            entry.runner.close()
        except Exception:  # noqa: BLE001 - freeing one session must not stop the loop
            log.exception("closing a session's engine state failed")
        finally:
            entry.closed.set()


HEADROOM = 0.7  # of the measured speed: output encoding, network, and turns that run slower
FIRST_AUDIO_S = 0.5  # what sessions that start together may wait for their first audio


def capacity_from_speed(audio_s: float, compute_s: float, first_audio_s: float = 0.0) -> int:
    """Sessions one engine loop keeps in real time, from one session's measured speed: the loop
    runs their units one after another, so N sessions need N times one session's compute; and
    N sessions started at once get their first audio one after another, so N first audios
    must fit in FIRST_AUDIO_S."""
    keeps_up = int(HEADROOM * audio_s / max(compute_s, 1e-9))
    starts = int(FIRST_AUDIO_S / first_audio_s) if first_audio_s > 0 else keeps_up
    return max(1, min(keeps_up, starts))


class TurnRunner:
    """A session's turns on a backend with `encode`/`render` and `carry`/`restore` (Piper): the
    text stage of a turn is one unit, each chunk of its render another, so the loop can put
    another session's urgent chunk between any two of them. `replayed`: the carries of the
    turns the turn cache replayed; it starts after them."""

    group = None

    def __init__(
        self,
        backend: Any,
        session: Any,
        feed: Any,
        replayed: Sequence[Carry] = (),
        within: Carry | None = None,
    ) -> None:
        self.backend = backend
        self.session = session
        self.feed = feed
        self._next = len(replayed)  # index of the next turn to start
        self._within = within  # where in that turn to go on from (a `mark` of the backend's)
        if replayed:
            backend.restore(session, replayed[-1])
        self._chunks: Any = None  # the render of the current turn
        self._turn = -1

    def ready(self) -> bool:
        return (
            self._chunks is not None or self.feed.complete or self.feed.peek(self._next) is not None
        )

    def run(self) -> Events | None:
        from .pipeline import TurnAudio, TurnEnded, TurnStarted

        if self._chunks is None:
            turn = self.feed.peek(self._next)
            if turn is None:  # ready() said so: the script is complete
                return None
            encoded = self.backend.encode(self.session, turn, turn.index % 2)
            self._chunks = self.backend.render(self.session, encoded, self._within)
            self._within = None
            self._turn = turn.index
            self._next += 1
            return [TurnStarted(turn)]
        pcm = next(self._chunks, None)
        if pcm is None:
            self._chunks = None
            return [TurnEnded(self._turn, carry=self.backend.carry(self.session))]
        return [TurnAudio(self._turn, pcm, self.backend.mark(self.session))] if len(pcm) else []

    def park(self) -> None:
        return None  # Piper keeps nothing in the model between units

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None
        self.backend.close_session(self.session)
