"""An engine serving remote gateways: one backend and its engine loop (scheduler.py), and each
session as a stream of event batches (wire.py) that a gateway consumes (server/remote.py).

Flow control crosses the process boundary by acknowledgement: the gateway acknowledges each
batch when its session takes it, and a stream whose unacknowledged batches reach `WINDOW` is
held by the loop like a session whose listener is behind. A stream also stops by itself when
its gateway stops saying it is alive (a gateway killed mid-session does not cancel the calls it
made: without this, orphaned streams generate to the end of their script).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ..protocol.messages import ProtocolError
from .backend import Backend, Turn
from .pipeline import PipelineEvent, TurnAudio, TurnFeed
from .scheduler import Scheduler
from .wire import RemoteError, StreamRequest, pack_events

log = logging.getLogger("vibecast.serving")

WINDOW = 8  # batches a stream may have in flight before its gateway acknowledges them
CHECK_S = 0.2  # how often a stream reads its acknowledgements and its gateway's liveness


class Liveness(Protocol):
    """Where gateways leave what engines need to know about a stream (Redis in a cluster)."""

    async def acked(self, stream: str) -> int:
        """Batches of `stream` its gateway has taken."""

    async def alive(self, stream: str) -> bool:
        """False once the gateway consuming `stream` has stopped saying it is there."""

    async def serving(self, stream: str, on: bool) -> None:
        """This engine started (True) or stopped (False) generating `stream`."""

    async def appended(self, script: str, have: int) -> tuple[list[Turn], bool]:
        """Turns appended to `script` from index `have` on, and whether it is complete."""

    async def abandoned(self, stream: str) -> None:
        """This engine stopped `stream` because its gateway was gone (for operators, tests)."""


def _seconds(events: list[PipelineEvent], rate: int) -> float:
    return sum(len(e.pcm) for e in events if isinstance(e, TurnAudio)) / rate


class _Sink:
    """A stream as the engine loop's sink (scheduler.py's `Sink`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rate: int) -> None:
        self._loop = loop
        self._rate = rate
        self._lock = threading.Lock()
        self._pending: deque[list[PipelineEvent]] = deque()
        self._ready = asyncio.Event()
        self.error: BaseException | None = None
        self.ended = False
        self.stopped = False
        self.sent = 0  # batches yielded to the gateway
        self.acked = 0
        self._queued_s = 0.0

    def _wake(self) -> None:
        self._loop.call_soon_threadsafe(self._ready.set)

    def lead_s(self) -> float:
        return self._queued_s

    def wants_more(self) -> bool:
        return not self.stopped and self.sent + len(self._pending) - self.acked < WINDOW

    def put(self, events: list[PipelineEvent], busy_s: float) -> None:
        with self._lock:
            self._pending.append(events)
            self._queued_s += _seconds(events, self._rate)
        self._wake()

    def hold(self, held: bool) -> None:
        return None

    def end(self, error: BaseException | None) -> None:
        self.error, self.ended = error, True
        self._wake()

    async def take(self) -> list[PipelineEvent] | None:
        """The next batch; None once the runner has ended and every batch was taken."""
        while True:
            with self._lock:
                if self._pending:
                    events = self._pending.popleft()
                    self._queued_s -= _seconds(events, self._rate)
                    return events
                if self.ended or self.stopped:
                    return None
                self._ready.clear()
            await self._ready.wait()

    def stop(self) -> None:
        self.stopped = True
        self._wake()


class EngineService:
    def __init__(self, backend: Backend, liveness: Liveness) -> None:
        self.backend = backend
        self.liveness = liveness
        self.scheduler = Scheduler(backend.name)
        self.streams: set[str] = set()

    def describe(self) -> dict[str, Any]:
        """What a gateway needs to offer this engine (its RemoteBackend)."""
        b = self.backend
        return {
            "name": b.name,
            "sample_rate": b.sample_rate,
            "modes": list(b.modes),
            "voices": [[v.id, v.name, v.description] for v in b.voices()],
            "capacity": b.realtime_capacity(),
            "seconds_per_char": b.seconds_per_char(),
            "fingerprint": b.fingerprint(),
            "steps": getattr(b, "steps", None),
        }

    async def stream(self, data: bytes) -> AsyncIterator[bytes]:
        request = StreamRequest.unpack(data)
        backend = self.backend

        def open_session() -> Any:
            session = backend.open_session(request.speakers, request.params)
            try:
                backend.check_turns(session, request.turns)
            except BaseException:
                backend.close_session(session)
                raise
            return session

        try:
            backend.check_params(request.params)
            session = await asyncio.wrap_future(self.scheduler.call(open_session))
        except ProtocolError as e:
            yield pack_events(RemoteError(str(e.code), e.message, e.field, e.turn))
            return
        sink = _Sink(asyncio.get_running_loop(), backend.sample_rate)
        feed = TurnFeed(request.turns, request.more)
        runner = backend.runner(session, feed, request.replayed, request.within)
        entry = self.scheduler.add(runner, sink)
        watcher = asyncio.create_task(self._watch(request, sink, session, feed))
        self.streams.add(request.stream)
        await self.liveness.serving(request.stream, True)
        try:
            while (events := await sink.take()) is not None:
                sink.sent += 1
                yield pack_events(events)
            failed = sink.error
            if isinstance(failed, ProtocolError):
                yield pack_events(
                    RemoteError(str(failed.code), failed.message, failed.field, failed.turn)
                )
            elif failed is not None:
                log.error("stream %s failed in the engine", request.stream, exc_info=failed)
                yield pack_events(RemoteError("internal", f"the engine failed ({failed!r})"))
        finally:
            watcher.cancel()
            self.scheduler.remove(entry)
            self.streams.discard(request.stream)
            await self.liveness.serving(request.stream, False)

    async def _watch(
        self, request: StreamRequest, sink: _Sink, session: Any, feed: TurnFeed
    ) -> None:
        """Read the stream's acknowledgements and appended turns; stop it once its gateway is
        gone."""
        stream = request.stream
        while not sink.ended:
            await asyncio.sleep(CHECK_S)
            sink.acked = await self.liveness.acked(stream)
            if not feed.complete:
                turns, complete = await self.liveness.appended(request.script, feed.total)
                try:
                    self.backend.check_turns(session, turns)
                except ProtocolError as e:  # the session's error, as a start would get it
                    sink.end(e)
                    return
                if turns or complete:
                    feed.add(turns, more=not complete)
            self.scheduler.wake()
            if not await self.liveness.alive(stream):
                log.info("stream %s: its gateway is gone; stopping it", stream)
                sink.stop()
                await self.liveness.abandoned(stream)
                return
